// Runs the kernels of one kernels/*.cu file on the host (tests/test_cuda_host.py builds it once
// per file: g++ -DTVC_HOST_FILE_COMPRESS or -DTVC_HOST_FILE_KV, loads it with ctypes).
//
// C API: tvc_host_launch(name, grid, block, dynamic shared bytes, args) runs the kernel's whole
// grid and returns 0, or 1 with a message (unknown kernel, wrong argument size, a barrier or
// warp operation not every thread reaches); tvc_host_kernels() lists the kernels it can launch.
#include "shim.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define TVC_ASAN 1
#else
#define TVC_ASAN 0
#endif

#include "tvc_common.cuh"

// Dynamic shared memory (`extern __shared__ T name[]` in the kernels; defined before them, so that
// no TLS wrapper is involved): the largest opt-in of
// sm_90, per OS thread; a launch's own size is the addressable part (the rest is poisoned under
// AddressSanitizer, so reading past the launch's size is caught).
#define TVC_MAX_DYNAMIC_SHARED 232448
#if defined(TVC_HOST_FILE_COMPRESS)
alignas(16) thread_local u64 sorted[TVC_MAX_DYNAMIC_SHARED / sizeof(u64)];
#define TVC_DYNAMIC_SHARED sorted
#else
alignas(16) thread_local float2 table[TVC_MAX_DYNAMIC_SHARED / sizeof(float2)];
#define TVC_DYNAMIC_SHARED table
#endif

#if defined(TVC_HOST_FILE_COMPRESS)
#include "compress.cu"
#elif defined(TVC_HOST_FILE_KV)
#include "kv.cu"
#else
#error "define TVC_HOST_FILE_COMPRESS or TVC_HOST_FILE_KV"
#endif

// Switching stacks: a few instructions on x86-64 (callee-saved registers, stack pointer; no
// signal mask system call as swapcontext makes), ucontext elsewhere.
#if defined(__x86_64__)
asm(R"(
.text
.p2align 4
.type tvc_host_swap,@function
tvc_host_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size tvc_host_swap, .-tvc_host_swap
)");
extern "C" void tvc_host_swap(void** save, void* to);
struct Context {
    void* sp;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

namespace tvc_host {

enum State { RUNNABLE, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
    Context ctx;
    char* stack;
    uint3 tid;
    State state;
    int op, arg;
    unsigned mask;
    uint64_t value, result;
};

const size_t STACK = 64 * 1024;
const size_t GUARD = 4096;
const int MAX_THREADS = 1024;

struct Worker {
    Context sched;
    std::vector<Fiber> fibers;
    char* stacks = nullptr;
    void (*entry)(const void*) = nullptr;
    const void* args = nullptr;
    std::string error;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
};

thread_local Fiber* current = nullptr;
thread_local Block* block = nullptr;
thread_local Worker* worker = nullptr;

const uint3& thread_idx() { return current->tid; }

// Fiber stacks with a guard page below each, kept for later launches.
std::mutex stacks_lock;
std::vector<char*> free_stacks;

char* take_stacks() {
    std::lock_guard<std::mutex> g(stacks_lock);
    if (!free_stacks.empty()) {
        char* s = free_stacks.back();
        free_stacks.pop_back();
        return s;
    }
    const size_t each = STACK + GUARD, total = each * MAX_THREADS;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("tvc_host: mmap");
        std::abort();
    }
    char* base = (char*)p;
    for (int i = 0; i < MAX_THREADS; ++i) mprotect(base + i * each, GUARD, PROT_NONE);
    return base;
}
void give_stacks(char* s) {
    std::lock_guard<std::mutex> g(stacks_lock);
    free_stacks.push_back(s);
}

void fiber_main();

#if defined(__x86_64__)
inline void swap(Context& save, Context& to) { tvc_host_swap(&save.sp, to.sp); }
void init_context(Context& c, char* stack, size_t size) {
    // Six callee-saved registers, then the return address fiber_main is entered through, on a
    // 16-byte boundary (so that the stack is aligned as at any function's entry).
    uintptr_t top = ((uintptr_t)(stack + size) & ~(uintptr_t)15) - 16;
    void** slot = (void**)top;
    slot[0] = (void*)&fiber_main;
    slot[1] = nullptr;
    for (int r = 1; r <= 6; ++r) slot[-r] = nullptr;
    c.sp = (void*)(slot - 6);
}
#else
inline void swap(Context& save, Context& to) { swapcontext(&save.uc, &to.uc); }
void init_context(Context& c, char* stack, size_t size) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, fiber_main, 0);
}
#endif

// Switches between the scheduler and a fiber, telling AddressSanitizer about the stacks.
void enter(Fiber& f) {
    current = &f;
#if TVC_ASAN
    __sanitizer_start_switch_fiber(nullptr, f.stack, STACK);
#endif
    swap(worker->sched, f.ctx);
#if TVC_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
}
void leave(bool finished) {
#if TVC_ASAN
    __sanitizer_start_switch_fiber(nullptr, worker->sched_stack_bottom, worker->sched_stack_size);
#endif
    if (finished) {  // never resumed
        Context dead;
        swap(dead, worker->sched);
    }
    swap(current->ctx, worker->sched);
#if TVC_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &worker->sched_stack_bottom, &worker->sched_stack_size);
#endif
}

void fiber_main() {
#if TVC_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &worker->sched_stack_bottom, &worker->sched_stack_size);
#endif
    worker->entry(worker->args);
    current->state = DONE;
    leave(true);
}

void sync_block() {
    current->state = AT_BARRIER;
    leave(false);
}

uint64_t warp_op(int op, unsigned mask, uint64_t value, int arg) {
    current->op = op;
    current->mask = mask;
    current->value = value;
    current->arg = arg;
    current->state = AT_WARP;
    leave(false);
    return current->result;
}

const char* state_name(State s) {
    switch (s) {
        case RUNNABLE: return "running";
        case AT_BARRIER: return "at __syncthreads";
        case AT_WARP: return "at a warp shuffle / ballot";
        default: return "exited";
    }
}

std::string where(const Fiber& f) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "block (%u, %u, %u) thread (%u, %u, %u)", block->block_idx.x, block->block_idx.y,
                  block->block_idx.z, f.tid.x, f.tid.y, f.tid.z);
    return buf;
}

// Releases warp w0 / 32's operation once every lane it names has arrived; false on an error.
bool release_warp(int w0, int n, bool& released) {
    auto& fs = worker->fibers;
    {
        const int lanes = std::min(32, n - w0);
        int first = -1;
        for (int l = 0; l < lanes; ++l)
            if (fs[w0 + l].state == AT_WARP) { first = l; break; }
        if (first < 0) return true;
        const Fiber& f0 = fs[w0 + first];
        const unsigned mask = f0.mask;
        bool ready = true;
        for (int l = 0; l < 32; ++l) {
            if (!(mask >> l & 1u)) continue;
            if (l >= lanes) {
                worker->error = where(f0) + ": warp operation with mask naming lane " + std::to_string(l) +
                                ", which does not exist (block of " + std::to_string(n) + " threads)";
                return false;
            }
            const Fiber& f = fs[w0 + l];
            if (f.state == DONE) {
                worker->error = where(f0) + ": warp operation waits for lane " + std::to_string(l) + ", which exited";
                return false;
            }
            if (f.state != AT_WARP) { ready = false; continue; }
            if (f.mask != mask || f.op != f0.op || (f.op != OP_SHFL_IDX && f.arg != f0.arg)) {
                worker->error = where(f) + ": lanes of one warp are at different warp operations";
                return false;
            }
        }
        for (int l = 0; l < lanes; ++l) {
            const Fiber& f = fs[w0 + l];
            if (f.state == AT_WARP && !(mask >> l & 1u)) {
                worker->error = where(f) + ": warp operation whose mask leaves out the calling lane";
                return false;
            }
        }
        if (!ready) return true;
        uint64_t ballot = 0;
        for (int l = 0; l < lanes; ++l)
            if ((mask >> l & 1u) && fs[w0 + l].value) ballot |= 1ull << l;
        for (int l = 0; l < lanes; ++l) {
            Fiber& f = fs[w0 + l];
            if (!(mask >> l & 1u)) continue;
            int src = l;
            switch (f.op) {
                case OP_SHFL_XOR: src = l ^ f.arg; break;
                case OP_SHFL_IDX: src = f.arg & 31; break;
                case OP_SHFL_UP: src = l - f.arg >= 0 ? l - f.arg : l; break;
                case OP_SHFL_DOWN: src = l + f.arg < 32 ? l + f.arg : l; break;
                default: break;
            }
            if (f.op == OP_BALLOT) {
                f.result = ballot;
            } else {
                if (src < 0 || src >= lanes || !(mask >> src & 1u)) src = l;  // undefined on the GPU
                f.result = fs[w0 + src].value;
            }
            f.state = RUNNABLE;
        }
        released = true;
    }
    return true;
}

// Runs one block to completion; false (and worker->error) on a synchronisation error.
bool run_block(int n) {
    auto& fs = worker->fibers;
    for (int i = 0; i < n; ++i) {
        Fiber& f = fs[i];
        f.stack = worker->stacks + i * (STACK + GUARD) + GUARD;
        f.tid = uint3{(unsigned)i % block->block_dim.x, (unsigned)(i / block->block_dim.x) % block->block_dim.y,
                      (unsigned)(i / (block->block_dim.x * block->block_dim.y))};
        f.state = RUNNABLE;
#if TVC_ASAN
        // The stack's last fiber left its frames' redzones behind (it never returned).
        ASAN_UNPOISON_MEMORY_REGION(f.stack, STACK);
#endif
        init_context(f.ctx, f.stack, STACK);
    }
    const int warps = (n + 31) / 32;
    for (int round = 0;; ++round) {
        // Each warp runs as far as it can (through its own shuffles and ballots) before the
        // next one starts, warps and lanes in one order, then the other, between barriers: a
        // read of shared memory with no barrier between it and another warp's write then sees
        // a different value one way or the other, and the results differ.
        const bool reverse = round & 1;
        for (int k = 0; k < warps; ++k) {
            const int w0 = 32 * (reverse ? warps - 1 - k : k), lanes = std::min(32, n - w0);
            for (bool released = true; released;) {
                for (int j = 0; j < lanes; ++j) {
                    Fiber& f = fs[w0 + (reverse ? lanes - 1 - j : j)];
                    if (f.state == RUNNABLE) enter(f);
                }
                released = false;
                if (!release_warp(w0, n, released)) return false;
            }
        }
        int at_barrier = 0, done = 0, at_warp = 0;
        for (int i = 0; i < n; ++i) {
            at_barrier += fs[i].state == AT_BARRIER;
            done += fs[i].state == DONE;
            at_warp += fs[i].state == AT_WARP;
        }
        if (done == n) return true;
        if (at_warp == 0 && at_barrier == n) {
            for (int i = 0; i < n; ++i) fs[i].state = RUNNABLE;
            continue;
        }
        // Nothing can move: describe the first thread of each state.
        std::string msg = "deadlock or divergent synchronisation in block (" + std::to_string(block->block_idx.x) + ", " +
                          std::to_string(block->block_idx.y) + ", " + std::to_string(block->block_idx.z) +
                          "): " + std::to_string(at_barrier) + " threads at __syncthreads, " + std::to_string(at_warp) +
                          " at warp operations, " + std::to_string(done) + " exited";
        for (int s = AT_BARRIER; s <= DONE; ++s)
            for (int i = 0; i < n; ++i)
                if (fs[i].state == s) {
                    msg += "; first " + std::string(state_name((State)s)) + ": thread " + std::to_string(i);
                    break;
                }
        worker->error = msg;
        return false;
    }
}

struct Kernel {
    const char* name;
    void (*entry)(const void*);
    size_t args_size;
};

}  // namespace tvc_host

using tvc_host::Kernel;

#define TVC_K(NAME, ARGS) {#NAME, [](const void* p) { NAME(*(const ARGS*)p); }, sizeof(ARGS)},
#define TVC_DT3(M, ...) M(f32, __VA_ARGS__) M(f16, __VA_ARGS__) M(bf16, __VA_ARGS__)

#if defined(TVC_HOST_FILE_COMPRESS)
#define TVC_PACKED(T, NAME, ARGS) TVC_K(NAME##_##T##_v, ARGS) TVC_K(NAME##_##T##_s, ARGS)
#define TVC_TYPED(T, NAME, ARGS) TVC_K(NAME##_##T, ARGS)
static const Kernel KERNELS[] = {
    TVC_DT3(TVC_PACKED, pool, PoolArgs) TVC_DT3(TVC_PACKED, gather, GatherArgs) TVC_DT3(TVC_PACKED, merge, MergeArgs)
    TVC_DT3(TVC_TYPED, scores_rows, ScoresArgs) TVC_DT3(TVC_TYPED, scores_keys, ScoresArgs)
    TVC_DT3(TVC_TYPED, inv_norms, NormArgs) TVC_DT3(TVC_TYPED, similarity, SimilarityArgs)
    TVC_K(select_topk, SelectArgs) TVC_K(select_mass, MassArgs) TVC_K(token_cells, CellsArgs)
    TVC_K(complement, ComplementArgs)
};
#else
#define TVC_KV4(T, NAME, ARGS) \
    TVC_K(NAME##_##T##_v_neox, ARGS) TVC_K(NAME##_##T##_v_gptj, ARGS) TVC_K(NAME##_##T##_s_neox, ARGS) TVC_K(NAME##_##T##_s_gptj, ARGS)
static const Kernel KERNELS[] = {
    TVC_DT3(TVC_KV4, rerotate, RerotateArgs) TVC_DT3(TVC_KV4, relocate, RelocateArgs)
    TVC_DT3(TVC_KV4, append, AppendArgs) TVC_DT3(TVC_KV4, paged, PagedArgs)
};
#endif

namespace {

void set_error(char* err, size_t len, const std::string& msg) {
    if (len == 0) return;
    std::snprintf(err, len, "%s", msg.c_str());
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int tvc_host_kernel_count() { return (int)(sizeof KERNELS / sizeof KERNELS[0]); }
__attribute__((visibility("default"))) const char* tvc_host_kernel_name(int i) { return KERNELS[i].name; }
__attribute__((visibility("default"))) int tvc_host_asan() { return TVC_ASAN; }

// Runs the grid on `workers` OS threads (blocks taken in order from a shared counter).
__attribute__((visibility("default"))) int tvc_host_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,
                                                           unsigned bx, unsigned by, unsigned bz, size_t shared,
                                                           const void* args, size_t args_size, int workers, char* err,
                                                           size_t err_len) {
    using namespace tvc_host;
    const Kernel* k = nullptr;
    for (const Kernel& c : KERNELS)
        if (std::strcmp(c.name, name) == 0) k = &c;
    if (!k) return set_error(err, err_len, std::string("no kernel named ") + name), 1;
    if (args_size != k->args_size)
        return set_error(err, err_len, std::string(name) + ": arguments of " + std::to_string(args_size) +
                                           " bytes, the kernel takes " + std::to_string(k->args_size)), 1;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (threads == 0 || threads > (unsigned long long)MAX_THREADS || bz > 64)
        return set_error(err, err_len, std::string(name) + ": invalid block size"), 1;
    if (gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535 || gx > 0x7fffffffu)
        return set_error(err, err_len, std::string(name) + ": invalid grid size"), 1;
    if (shared > TVC_MAX_DYNAMIC_SHARED)
        return set_error(err, err_len, std::string(name) + ": more dynamic shared memory than sm_90 allows"), 1;
    const unsigned long long blocks = (unsigned long long)gx * gy * gz;
    const int n_workers = (int)std::max(1ull, std::min<unsigned long long>(workers > 0 ? workers : 1, blocks));
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::mutex error_lock;
    std::string first_error;
    auto work = [&]() {
        Worker w;
        w.fibers.resize(threads);
        w.stacks = take_stacks();
        w.entry = k->entry;
        w.args = args;
        worker = &w;
        Block b;
        b.block_dim = uint3{bx, by, bz};
        b.grid_dim = uint3{gx, gy, gz};
        block = &b;
        char* dyn = (char*)TVC_DYNAMIC_SHARED;
#if TVC_ASAN
        ASAN_POISON_MEMORY_REGION(dyn + shared, TVC_MAX_DYNAMIC_SHARED - shared);
#endif
        for (;;) {
            const unsigned long long i = next.fetch_add(1);
            if (i >= blocks || failed.load()) break;
            b.block_idx = uint3{(unsigned)(i % gx), (unsigned)(i / gx % gy), (unsigned)(i / ((unsigned long long)gx * gy))};
            std::memset(dyn, 0xa5, shared);  // uninitialised on the GPU: not zeros here either
            if (!run_block((int)threads)) {
                failed = true;
                std::lock_guard<std::mutex> g(error_lock);
                if (first_error.empty()) first_error = std::string(name) + ": " + w.error;
                break;
            }
        }
#if TVC_ASAN
        ASAN_UNPOISON_MEMORY_REGION(dyn, TVC_MAX_DYNAMIC_SHARED);
#endif
        give_stacks(w.stacks);
        worker = nullptr;
        block = nullptr;
        current = nullptr;
    };
    if (n_workers == 1) {
        work();
    } else {
        std::vector<std::thread> pool;
        for (int i = 0; i < n_workers; ++i) pool.emplace_back(work);
        for (auto& t : pool) t.join();
    }
    if (failed) return set_error(err, err_len, first_error), 1;
    return 0;
}

}  // extern "C"
