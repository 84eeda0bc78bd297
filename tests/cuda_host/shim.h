// What CUDA provides to kernels/*.cu, on the host (test infrastructure: tests/test_cuda_host.py).
//
// Every CUDA thread of a block is a fiber (its own stack) on one OS thread (harness.cpp). A
// synchronisation point (__syncthreads, a warp shuffle or ballot) is released only when every
// thread that must take part has arrived; each warp runs through its own shuffles before the next
// warp starts, warps in alternating order between barriers (so a missing barrier changes results).
// A barrier some threads never reach, a shuffle naming an exited or missing lane, or lanes at
// different warp operations is reported as an error instead of hanging. Blocks of a grid run on a
// few OS threads. `__shared__` variables are thread_local (one copy per OS thread, i.e. per
// running block); the dynamic shared memory is a buffer of exactly the launch's size.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define TVC_HOST_SHIM 1

#define __global__ __attribute__((visibility("default")))
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ thread_local
// Kernels compiled here are the GPU ones for the deployed architecture (sm_90: H100 / H200).
#define __CUDA_ARCH__ 900

struct uint3 { unsigned x, y, z; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace tvc_host {

struct Fiber;
struct Block {
    uint3 block_idx, block_dim, grid_dim;
};
extern thread_local Fiber* current;
extern thread_local Block* block;
const uint3& thread_idx();
// Arrive at a synchronisation point; returns once it is released. Warp operations pass this
// lane's value and get the result for this lane.
void sync_block();
uint64_t warp_op(int op, unsigned mask, uint64_t value, int arg);
enum { OP_SHFL_XOR = 1, OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_BALLOT };

// fp16 / bf16 conversions with round to nearest even (what PTX `cvt.rn` does): _Float16 is
// the compiler's IEEE binary16; bf16 by integer rounding of the f32 bits.
inline float f16_to_f32(uint16_t bits) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
}
inline uint16_t f32_to_f16(float v) {
    _Float16 h = (_Float16)v;
    uint16_t bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}
inline uint16_t f32_to_bf16(float v) {
    uint32_t x;
    std::memcpy(&x, &v, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
    const uint64_t rounded = (uint64_t)x + 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(rounded >> 16);
}

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp values up to 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T> inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace tvc_host

#define threadIdx (::tvc_host::thread_idx())
#define blockIdx (::tvc_host::block->block_idx)
#define blockDim (::tvc_host::block->block_dim)
#define gridDim (::tvc_host::block->grid_dim)

inline void __syncthreads() { tvc_host::sync_block(); }

template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    (void)width;
    return tvc_host::from_bits<T>(tvc_host::warp_op(tvc_host::OP_SHFL_XOR, mask, tvc_host::to_bits(v), lane_mask));
}
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    (void)width;
    return tvc_host::from_bits<T>(tvc_host::warp_op(tvc_host::OP_SHFL_IDX, mask, tvc_host::to_bits(v), src));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    (void)width;
    return tvc_host::from_bits<T>(tvc_host::warp_op(tvc_host::OP_SHFL_UP, mask, tvc_host::to_bits(v), (int)delta));
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    (void)width;
    return tvc_host::from_bits<T>(tvc_host::warp_op(tvc_host::OP_SHFL_DOWN, mask, tvc_host::to_bits(v), (int)delta));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    return (unsigned)tvc_host::warp_op(tvc_host::OP_BALLOT, mask, predicate != 0, 0);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }

inline float __int_as_float(int x) { return tvc_host::from_bits<float>((uint32_t)x); }
inline int __float_as_int(float x) { return (int)(uint32_t)tvc_host::to_bits(x); }
inline float __uint_as_float(unsigned x) { return tvc_host::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return (unsigned)tvc_host::to_bits(x); }

// Atomics (real ones: blocks run on several OS threads).
template <typename T> inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline float atomicAdd(float* p, float v) {
    float old = *p, desired;
    do {
        desired = old + v;
    } while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
template <typename T> inline T atomicMin(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T> inline T atomicMax(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T> inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
template <typename T> inline T atomicCAS(T* p, T expected, T desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return expected;
}

// CUDA's min / max overloads for mixed integer types (the common type, as the device headers).
template <typename A, typename B> inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B> inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a > (C)b ? (C)a : (C)b;
}
// expf, logf, fmaxf, sqrtf, sincos: the C library's (<cmath>, glibc).
