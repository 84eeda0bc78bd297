// KV-cache re-injection on the GPU: key re-rotation, contiguous-cache span relocation, entry
// writes and paged gather-rotate-scatter (the CUDA counterparts of src/kv). Data is f32, f16 or
// bf16, arithmetic in f32, angles from the integer delta in f64 (tvc_common.cuh).
//
// Kernel names: <op>_<dtype>_<v|s>_<neox|gptj>. `v`: 16-byte packed access (the host checked the
// last axis is contiguous and every pointer / stride / split is a multiple of the pack); `s`:
// scalar access with any strides. Arguments come in one struct by value; the host (src/cuda/
// kv.rs) mirrors each struct, and its size is checked at compile time (TVC_SIZEOF_*).
#include "tvc_common.cuh"

#define MAX_LAYERS 32
// Distinct deltas whose cos / sin tables a block keeps in shared memory.
#define MAX_TABLE 32
#define UNROLL 4

// idx / items and idx % items, in 32 bits when idx fits (64-bit division is emulated).
__device__ __forceinline__ void split_index(i64 idx, int items, i64& q, int& r) {
    if (idx < 0xffffffffLL) {
        const u32 i = (u32)idx;
        q = i / (u32)items;
        r = (int)(i - (u32)q * (u32)items);
    } else {
        q = idx / items;
        r = (int)(idx - q * items);
    }
}

// Where the angles of a row come from: a table of distinct deltas in shared memory (rows
// `table_rows`; row of token t: map[t], or 0 without a map), or, with table_rows == 0, the
// token's own delta computed on the fly.
struct AngleSource {
    const int* map;
    int table_rows;
    int pad;
};

// Fills the shared table: rows [0, table_rows) of half pairs, plus an identity flag per row.
__device__ __forceinline__ void table_fill(const RopeArgs& rope, const DeltaArgs& delta, const AngleSource& src,
                                           float2* table, unsigned char* identity) {
    for (int r = 0; r < src.table_rows; ++r) {
        i64 d[3];
        delta_of(delta, r, d);
        if (threadIdx.x == 0) identity[r] = (d[0] == 0 && d[1] == 0 && d[2] == 0);
        rope_fill(rope, d, table + r * rope.half);
    }
}

// The cos / sin of rotation unit `item` of token `token`'s key: a pointer into the shared table,
// or `local` filled on the fly; null when the rotation is the identity.
template <bool INTERLEAVED, int W>
__device__ __forceinline__ const float2* unit_angles(const RopeArgs& rope, const DeltaArgs& delta, const AngleSource& src,
                                                     const float2* table, const unsigned char* identity, i64 token,
                                                     int item, float2* local) {
    const int first = unit_first_pair<INTERLEAVED, W>(item);
    if (src.table_rows > 0) {
        const int r = src.map ? src.map[token] : 0;
        return identity[r] ? nullptr : table + r * rope.half + first;
    }
    i64 d[3];
    delta_of(delta, token, d);
    if (d[0] == 0 && d[1] == 0 && d[2] == 0) return nullptr;
#pragma unroll
    for (int p = 0; p < unit_pairs<INTERLEAVED, W>(); ++p) local[p] = rope_cos_sin(rope, d, first + p);
    return local;
}

// ---------------------------------------------------------------- rerotate_keys

struct RerotateArgs {
    void* layers[MAX_LAYERS];
    i64 tokens;
    i64 token_stride, head_stride, dim_stride;
    DeltaArgs delta;
    RopeArgs rope;
    int n_layers;
    int heads;
};

// One block per token: its angles once in shared memory, then every layer's and head's key.
template <typename T, int W, bool CONTIG, bool INTERLEAVED>
__device__ void rerotate(const RerotateArgs& a) {
    __shared__ float2 cs[MAX_HALF];
    const i64 t = blockIdx.x;
    i64 d[3];
    delta_of(a.delta, t, d);
    if (d[0] == 0 && d[1] == 0 && d[2] == 0) return;  // uniform over the block
    rope_fill(a.rope, d, cs);
    __syncthreads();
    const int items = rot_items<INTERLEAVED, W>(a.rope.half);
    const int total = a.n_layers * a.heads * items;
    for (int w = threadIdx.x; w < total; w += blockDim.x) {
        const int item = w % items, h = (w / items) % a.heads, l = w / (items * a.heads);
        T* row = (T*)a.layers[l] + t * a.token_stride + h * a.head_stride;
        RowItem<T, W> it;
        load_key_item<T, W, CONTIG, INTERLEAVED>(row, a.dim_stride, item, a.rope.half, a.rope.head_dim,
                                                 cs + unit_first_pair<INTERLEAVED, W>(item), it);
        store_item<T, W, CONTIG>(row, a.dim_stride, it);
    }
}

// ---------------------------------------------------------------- relocate_span

struct RelocateArgs {
    void* keys[MAX_LAYERS];
    void* values[MAX_LAYERS];
    i64 key_strides[4];    // batch, head, seq, dim
    i64 value_strides[4];
    i64 start, end, moved;
    i64 seg_rows;          // moved rows per block (all of them when moves overlap)
    i64 removed;           // rows evicted (0: nothing moves, keys may still rotate in place)
    i64 n_runs;            // 1: moved row t comes from end + t; more: from the table `runs`
    const i64* runs;       // per span (first, end): rows t >= first come from end + (t - first)
    DeltaArgs delta;
    AngleSource angles;
    RopeArgs rope;
    int n_layers, batch, heads, key_dim, value_dim;
    int pad;
};

// The source row of moved entry t: one span, end + t; several, the last run starting at or
// before t (runs of evicted spans that end next to another are empty and share `first`).
__device__ __forceinline__ i64 source_row(const RelocateArgs& a, i64 t) {
    if (a.n_runs <= 1) return a.end + t;
    int lo = 0, hi = (int)a.n_runs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (a.runs[2 * mid] <= t) lo = mid; else hi = mid - 1;
    }
    return a.runs[2 * lo + 1] + (t - a.runs[2 * lo]);
}

// One block per (layer, batch, head, keys|values) lane and segment of rows. Rows go up in
// order, a tile at a time: the whole tile is loaded (and rotated) into registers, the block
// synchronises, then the tile is stored. A row is only ever written after every row that reads
// it was loaded (destinations lie at or below their sources, in the same order), so
// overlapping moves are safe, several spans included.
template <typename T, int W, bool CONTIG, bool INTERLEAVED>
__device__ void relocate(const RelocateArgs& a) {
    extern __shared__ float2 table[];
    __shared__ unsigned char identity[MAX_TABLE];
    const int part = blockIdx.x & 1;
    const int lane = blockIdx.x >> 1;
    const int h = lane % a.heads, b = (lane / a.heads) % a.batch, l = lane / (a.heads * a.batch);
    if (part == 1 && a.removed == 0) return;  // values stay where they are
    if (part == 0) {
        table_fill(a.rope, a.delta, a.angles, table, identity);
        __syncthreads();
    }
    const i64* s = part ? a.value_strides : a.key_strides;
    T* base = (T*)(part ? a.values[l] : a.keys[l]) + b * s[0] + h * s[1];
    const int dim = part ? a.value_dim : a.key_dim;
    const int rot = part ? 0 : rot_items<INTERLEAVED, W>(a.rope.half);
    const int items = rot + pass_items<W>(part ? 0 : 2 * a.rope.half, dim);
    const i64 r0 = (i64)blockIdx.y * a.seg_rows;
    const i64 r1 = min(a.moved, r0 + a.seg_rows);
    if (r0 >= r1 || items == 0) return;
    const i64 total = (r1 - r0) * items;
    for (i64 tile = 0; tile < total; tile += (i64)blockDim.x * UNROLL) {
        RowItem<T, W> it[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const i64 idx = tile + (i64)k * blockDim.x + threadIdx.x;
            it[k].packs = 0;
            if (idx >= total) continue;
            i64 t;
            int item;
            split_index(idx, items, t, item);
            t += r0;
            const i64 row = source_row(a, t);
            const bool in_place = row == a.start + t;
            const T* src = base + row * s[2];
            if (part == 1 || item >= rot) {
                if (in_place) continue;  // unrotated data moved onto itself
                load_pass<T, W, CONTIG>(src, s[3], part ? 0 : 2 * a.rope.half, dim, item - rot, it[k]);
            } else {
                float2 local[W];
                const float2* cs = unit_angles<INTERLEAVED, W>(a.rope, a.delta, a.angles, table, identity, t, item, local);
                if (cs == nullptr && in_place) continue;  // in place and unrotated: nothing to do
                load_key_item<T, W, CONTIG, INTERLEAVED>(src, s[3], item, a.rope.half, dim, cs, it[k]);
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const i64 idx = tile + (i64)k * blockDim.x + threadIdx.x;
            if (it[k].packs == 0) continue;
            i64 t;
            int item;
            split_index(idx, items, t, item);
            t += r0;
            store_item<T, W, CONTIG>(base + (a.start + t) * s[2], s[3], it[k]);
        }
    }
}

// ---------------------------------------------------------------- append_entries

#define MAX_APPEND_LAYERS 24

struct AppendArgs {
    void* keys[MAX_APPEND_LAYERS];
    void* values[MAX_APPEND_LAYERS];
    const void* new_keys[MAX_APPEND_LAYERS];
    const void* new_values[MAX_APPEND_LAYERS];
    i64 key_strides[4];        // batch, head, seq, dim of the cache
    i64 value_strides[4];
    i64 new_key_strides[4];    // batch, head, entry, dim of the new entries
    i64 new_value_strides[4];
    const i64* positions;      // cache position of each new entry (null: start + j)
    i64 start;
    i64 n;
    DeltaArgs delta;
    RopeArgs rope;
    int rotate;
    int n_layers, batch, heads, key_dim, value_dim;
};

// One block per (new entry, batch row): its angles once, then every layer's and head's key and
// value. Sources are separate tensors (checked by the host), so there is no ordering to keep.
template <typename T, int W, bool CONTIG, bool INTERLEAVED>
__device__ void append(const AppendArgs& a) {
    __shared__ float2 cs[MAX_HALF];
    const i64 j = blockIdx.x;
    const int b = blockIdx.y;
    bool rotate = a.rotate != 0;
    if (rotate) {
        i64 d[3];
        delta_of(a.delta, j, d);
        rotate = !(d[0] == 0 && d[1] == 0 && d[2] == 0);  // uniform over the block
        if (rotate) {
            rope_fill(a.rope, d, cs);
            __syncthreads();
        }
    }
    const i64 pos = a.positions ? a.positions[j] : a.start + j;
    const int half = rotate ? a.rope.half : 0;
    const int rot = rotate ? rot_items<INTERLEAVED, W>(half) : 0;
    const int k_items = rot + pass_items<W>(2 * half, a.key_dim);
    const int v_items = pass_items<W>(0, a.value_dim);
    const int per_head = k_items + v_items;
    const int total = a.n_layers * a.heads * per_head;
    for (int w = threadIdx.x; w < total; w += blockDim.x) {
        int item = w % per_head;
        const int h = (w / per_head) % a.heads, l = w / (per_head * a.heads);
        RowItem<T, W> it;
        if (item < k_items) {
            const T* src = (const T*)a.new_keys[l] + b * a.new_key_strides[0] + h * a.new_key_strides[1] + j * a.new_key_strides[2];
            T* dst = (T*)a.keys[l] + b * a.key_strides[0] + h * a.key_strides[1] + pos * a.key_strides[2];
            if (item < rot) {
                load_key_item<T, W, CONTIG, INTERLEAVED>(src, a.new_key_strides[3], item, half, a.key_dim,
                                                         cs + unit_first_pair<INTERLEAVED, W>(item), it);
            } else {
                load_pass<T, W, CONTIG>(src, a.new_key_strides[3], 2 * half, a.key_dim, item - rot, it);
            }
            store_item<T, W, CONTIG>(dst, a.key_strides[3], it);
        } else {
            item -= k_items;
            const T* src = (const T*)a.new_values[l] + b * a.new_value_strides[0] + h * a.new_value_strides[1] + j * a.new_value_strides[2];
            T* dst = (T*)a.values[l] + b * a.value_strides[0] + h * a.value_strides[1] + pos * a.value_strides[2];
            load_pass<T, W, CONTIG>(src, a.new_value_strides[3], 0, a.value_dim, item, it);
            store_item<T, W, CONTIG>(dst, a.value_strides[3], it);
        }
    }
}

// ---------------------------------------------------------------- paged_reinject

struct PagedArgs {
    void* caches[MAX_LAYERS];
    // Element offsets: block, slot in block, head, dim; values lie value_offset after keys.
    i64 block_stride, slot_stride, head_stride, dim_stride, value_offset;
    const i64* entries;    // (src slot, dst slot, delta row) per entry, in a safe order
    i64 n_entries;
    i64 seg_entries;       // entries per block (all of them when moves depend on each other)
    void* staging;         // mode 1 / 2: [entries, total_layers, heads, 2, head_dim] rows
    i64 layer0;            // index of caches[0] among all layers (staging rows)
    DeltaArgs delta;
    AngleSource angles;
    RopeArgs rope;
    int mode;              // 0 move, 1 gather into staging (rotated), 2 scatter from staging
    int n_layers, total_layers, heads, head_dim, block_size;
};

// One block per (layer, head, keys|values) lane and segment of entries, entries in the host's
// order a tile at a time (load, synchronise, store), as in relocate: the host orders the entries
// so that every entry reading a slot comes before the entry overwriting it; entries on cycles
// are staged (gathered in one launch, scattered in the next).
template <typename T, int W, bool CONTIG, bool INTERLEAVED>
__device__ void paged(const PagedArgs& a) {
    extern __shared__ float2 table[];
    __shared__ unsigned char identity[MAX_TABLE];
    const int part = blockIdx.x & 1;
    const int lane = blockIdx.x >> 1;
    const int h = lane % a.heads, l = lane / a.heads;
    if (part == 0 && a.mode != 2) {
        table_fill(a.rope, a.delta, a.angles, table, identity);
        __syncthreads();
    }
    T* cache = (T*)a.caches[l] + h * a.head_stride + (part ? a.value_offset : 0);
    const int rot = (part == 0 && a.mode != 2) ? rot_items<INTERLEAVED, W>(a.rope.half) : 0;
    const int first_pass = (part == 0 && a.mode != 2) ? 2 * a.rope.half : 0;
    const int items = rot + pass_items<W>(first_pass, a.head_dim);
    const i64 e0 = (i64)blockIdx.y * a.seg_entries;
    const i64 e1 = min(a.n_entries, e0 + a.seg_entries);
    if (e0 >= e1 || items == 0) return;
    const i64 total = (e1 - e0) * items;
    for (i64 tile = 0; tile < total; tile += (i64)blockDim.x * UNROLL) {
        RowItem<T, W> it[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const i64 idx = tile + (i64)k * blockDim.x + threadIdx.x;
            it[k].packs = 0;
            if (idx >= total) continue;
            i64 e;
            int item;
            split_index(idx, items, e, item);
            e += e0;
            const i64 s = a.entries[3 * e], d = a.entries[3 * e + 1], row = a.entries[3 * e + 2];
            const T* src;
            i64 step = a.dim_stride;
            if (a.mode == 2) {
                src = (const T*)a.staging + ((((e * a.total_layers) + a.layer0 + l) * a.heads + h) * 2 + part) * a.head_dim;
                step = 1;
            } else {
                src = cache + (s / a.block_size) * a.block_stride + (s % a.block_size) * a.slot_stride;
            }
            if (item >= rot) {
                if (a.mode == 0 && s == d) continue;  // pass-through data stays in place
                load_pass<T, W, CONTIG>(src, step, first_pass, a.head_dim, item - rot, it[k]);
            } else {
                float2 local[W];
                const float2* cs = unit_angles<INTERLEAVED, W>(a.rope, a.delta, a.angles, table, identity, row, item, local);
                if (cs == nullptr && a.mode == 0 && s == d) continue;
                load_key_item<T, W, CONTIG, INTERLEAVED>(src, step, item, a.rope.half, a.head_dim, cs, it[k]);
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const i64 idx = tile + (i64)k * blockDim.x + threadIdx.x;
            if (it[k].packs == 0) continue;
            i64 e;
            int item;
            split_index(idx, items, e, item);
            e += e0;
            if (a.mode == 1) {
                T* dst = (T*)a.staging + ((((e * a.total_layers) + a.layer0 + l) * a.heads + h) * 2 + part) * a.head_dim;
                store_item<T, W, CONTIG>(dst, 1, it[k]);
            } else {
                const i64 d = a.entries[3 * e + 1];
                store_item<T, W, CONTIG>(cache + (d / a.block_size) * a.block_stride + (d % a.block_size) * a.slot_stride,
                                         a.dim_stride, it[k]);
            }
        }
    }
}

// ---------------------------------------------------------------- entry points

#ifdef TVC_SIZEOF_RerotateArgs
static_assert(sizeof(RerotateArgs) == TVC_SIZEOF_RerotateArgs, "RerotateArgs differs from src/cuda/kv.rs");
static_assert(sizeof(RelocateArgs) == TVC_SIZEOF_RelocateArgs, "RelocateArgs differs from src/cuda/kv.rs");
static_assert(sizeof(AppendArgs) == TVC_SIZEOF_AppendArgs, "AppendArgs differs from src/cuda/kv.rs");
static_assert(sizeof(PagedArgs) == TVC_SIZEOF_PagedArgs, "PagedArgs differs from src/cuda/kv.rs");
#endif
static_assert(sizeof(RerotateArgs) <= 4096 && sizeof(RelocateArgs) <= 4096 && sizeof(AppendArgs) <= 4096 &&
              sizeof(PagedArgs) <= 4096, "kernel arguments must fit in 4 KiB");

// W: elements per 16-byte pack (v) or per scalar unit (s: 1 for NeoX, 2 for GPT-J pairs).
#define KV_KERNELS(NAME, ARGS, BLOCK, T, TN, WV)                                                                     \
    extern "C" __global__ void __launch_bounds__(BLOCK) NAME##_##TN##_v_neox(const ARGS a) { NAME<T, WV, true, false>(a); } \
    extern "C" __global__ void __launch_bounds__(BLOCK) NAME##_##TN##_v_gptj(const ARGS a) { NAME<T, WV, true, true>(a); }  \
    extern "C" __global__ void __launch_bounds__(BLOCK) NAME##_##TN##_s_neox(const ARGS a) { NAME<T, 1, false, false>(a); } \
    extern "C" __global__ void __launch_bounds__(BLOCK) NAME##_##TN##_s_gptj(const ARGS a) { NAME<T, 2, false, true>(a); }

#define KV_ALL(NAME, ARGS, BLOCK)                \
    KV_KERNELS(NAME, ARGS, BLOCK, float, f32, 4) \
    KV_KERNELS(NAME, ARGS, BLOCK, f16_t, f16, 8) \
    KV_KERNELS(NAME, ARGS, BLOCK, bf16_t, bf16, 8)

KV_ALL(rerotate, RerotateArgs, 128)
KV_ALL(relocate, RelocateArgs, 256)
KV_ALL(append, AppendArgs, 128)
KV_ALL(paged, PagedArgs, 256)
