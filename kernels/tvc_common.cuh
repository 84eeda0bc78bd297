// Shared helpers of the tvc-rs kernels: element types, conversions to and from f32, packed
// (up to 16-byte) loads and stores, block-wide flag scans and the RoPE angle tables.
//
// No CUDA headers are included: the kernels are compiled by NVRTC at run time, and NVRTC from
// a PyPI wheel has no toolkit include directory next to it. fp16 / bf16 conversions use PTX
// `cvt` (round to nearest even, as PyTorch and the CPU path); bf16 -> f32 is a shift.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

struct f16_t { u16 bits; };
struct bf16_t { u16 bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((u32)v.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float v) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float v) {
    bf16_t b;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(v));
#else
    u32 x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (u16)((x >> 16) | 0x40u);
    } else {
        b.bits = (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
    }
#endif
    return b;
}

// Run-time dtype codes (the same numbers as src/cuda/launch.rs): scalar reads of small
// arguments (scores, lse) of any float dtype.
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
__device__ __forceinline__ float load_any(const void* p, int dtype, i64 offset) {
    if (dtype == DT_F32) return ((const float*)p)[offset];
    if (dtype == DT_F16) return to_f32(((const f16_t*)p)[offset]);
    return to_f32(((const bf16_t*)p)[offset]);
}
// Integer arrays (indices, deltas, slots) arrive as int32 or int64.
__device__ __forceinline__ i64 load_int(const void* p, int is_i64, i64 offset) {
    return is_i64 ? ((const i64*)p)[offset] : (i64)((const int*)p)[offset];
}

// ---- packed access to W consecutive elements (W * sizeof(T) in {2, 4, 8, 16} bytes) ----

template <int BYTES> struct Raw;
template <> struct Raw<2> { typedef u16 type; };
template <> struct Raw<4> { typedef u32 type; };
template <> struct Raw<8> { typedef uint2 type; };
template <> struct Raw<16> { typedef uint4 type; };

template <typename T, int W> union Pack {
    typename Raw<sizeof(T) * W>::type raw;
    T e[W];
};

// W elements starting at p, `step` elements apart. CONTIG: step is 1 and p is aligned to the
// pack, so one (up to 16-byte) load; otherwise W scalar loads.
template <typename T, int W, bool CONTIG>
__device__ __forceinline__ void load_pack(const T* p, i64 step, Pack<T, W>& out) {
    if (CONTIG) {
        out.raw = *reinterpret_cast<const typename Raw<sizeof(T) * W>::type*>(p);
    } else {
#pragma unroll
        for (int i = 0; i < W; ++i) out.e[i] = p[i * step];
    }
}
template <typename T, int W, bool CONTIG>
__device__ __forceinline__ void store_pack(T* p, i64 step, const Pack<T, W>& in) {
    if (CONTIG) {
        *reinterpret_cast<typename Raw<sizeof(T) * W>::type*>(p) = in.raw;
    } else {
#pragma unroll
        for (int i = 0; i < W; ++i) p[i * step] = in.e[i];
    }
}

// ---- block-wide exclusive scans of flags (blockDim.x a multiple of 32, at most 1024) ----

// Exclusive prefix count of `flag` over the block (thread order) and the block total.
// `warp_totals` is shared scratch of 32 entries; the call synchronises the block twice.
__device__ __forceinline__ u32 block_flag_scan(bool flag, u32* warp_totals, u32& total) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 ballot = __ballot_sync(0xffffffffu, flag);
    const u32 in_warp = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    const u32 warps = (blockDim.x + 31u) >> 5;
    u32 before = 0, sum = 0;
    for (u32 w = 0; w < warps; ++w) {
        const u32 t = warp_totals[w];
        if (w < warp) before += t;
        sum += t;
    }
    __syncthreads();  // warp_totals may be reused by the next call
    total = sum;
    return before + in_warp;
}

// ---- RoPE ----

#define MAX_HALF 128

// How keys were rotated: the device mirror of the host's one rope description (src/kv/rope.rs
// RopeConfig). inv_freq is computed on the host in f64 exactly as the CPU path does
// (rope_theta ** (-2i / rotary_dim)); comp[i] is the M-RoPE component (0 t, 1 h, 2 w) of
// frequency pair i, from the host's mrope_components(): contiguous sections (Qwen2-VL, GLM-4.1V)
// or the interleaved map (Qwen3-VL, Qwen3.5: h if i % 3 == 1 and i < 3 s_h, w if i % 3 == 2 and
// i < 3 s_w, else t), so every kernel follows either map without a branch of its own. Partial
// rotary: half < head_dim / 2, dims from 2 * half on pass through, in either pair layout.
struct RopeArgs {
    double inv_freq[MAX_HALF];
    unsigned char comp[MAX_HALF];
    int half;        // rotary_dim / 2
    int head_dim;
    int interleaved; // GPT-J pairs (2i, 2i + 1) when 1, NeoX (i, i + half) when 0
    int pad;
};

// Position deltas: one for all tokens (kind 0), one per token (kind 1) or (t, h, w) per token
// (kind 2), from an int32/int64 device array with strides in elements.
struct DeltaArgs {
    const void* ptr;
    i64 same[3];
    i64 token_stride;
    i64 comp_stride;
    int kind;
    int is_i64;
};

__device__ __forceinline__ void delta_of(const DeltaArgs& d, i64 token, i64 (&out)[3]) {
    if (d.kind == 0) {
        out[0] = d.same[0]; out[1] = d.same[1]; out[2] = d.same[2];
    } else if (d.kind == 1) {
        const i64 v = load_int(d.ptr, d.is_i64, token * d.token_stride);
        out[0] = v; out[1] = v; out[2] = v;
    } else {
#pragma unroll
        for (int c = 0; c < 3; ++c) out[c] = load_int(d.ptr, d.is_i64, token * d.token_stride + c * d.comp_stride);
    }
}

// cos / sin of delta[comp[i]] * inv_freq[i], from the integer delta in f64 (as the CPU path:
// never a difference of two large angles), rounded to f32.
__device__ __forceinline__ float2 rope_cos_sin(const RopeArgs& r, const i64 (&delta)[3], int pair) {
    const double angle = (double)delta[r.comp[pair]] * r.inv_freq[pair];
    double s, c;
    sincos(angle, &s, &c);
    return make_float2((float)c, (float)s);
}

// Fills cs[0 .. half) for `delta` with the block's threads (no synchronisation inside).
__device__ __forceinline__ void rope_fill(const RopeArgs& r, const i64 (&delta)[3], float2* cs) {
    for (int i = threadIdx.x; i < r.half; i += blockDim.x) cs[i] = rope_cos_sin(r, delta, i);
}

// One work item of a cache row, loaded (and rotated) into registers, stored later: the kernels
// that move rows in place load a whole tile of items, synchronise, then store it.
//
// Key rows: items [0, rot_items) are rotation units, the rest pass-through packs.
//   NeoX: rotation unit u = elements [uW, uW + W) and [half + uW, half + uW + W) (two packs);
//   GPT-J: rotation unit u = elements [uW, uW + W), W / 2 pairs (one pack; W even).
//   Pass-through pack p = elements [2 half + pW, ...), at most W of them (fewer at the row's
//   end, only on the scalar path: the host picks packed access only when W divides evenly).
// Value rows: every item is a pass-through pack from element 0.
template <typename T, int W> struct RowItem {
    Pack<T, W> a, b;
    int o1, o2;   // element offsets of the packs within the row
    int count;    // elements of a pass-through pack (W for rotation units)
    int packs;    // 0 (nothing), 1 or 2
};

template <bool INTERLEAVED, int W> __device__ __forceinline__ int rot_items(int half) {
    return INTERLEAVED ? (2 * half) / W : half / W;
}
template <int W> __device__ __forceinline__ int pass_items(int first, int dim) {
    return (dim - first + W - 1) / W;
}

template <typename T, int W, bool CONTIG>
__device__ __forceinline__ void load_pass(const T* row, i64 step, int first, int dim, int p, RowItem<T, W>& it) {
    it.o1 = first + p * W;
    it.count = min(W, dim - it.o1);
    it.packs = 1;
    if (CONTIG) {
        load_pack<T, W, true>(row + it.o1, 1, it.a);
    } else {
#pragma unroll
        for (int e = 0; e < W; ++e)
            if (e < it.count) it.a.e[e] = row[(i64)(it.o1 + e) * step];
    }
}

// First frequency pair of rotation unit `item`.
template <bool INTERLEAVED, int W> __device__ __forceinline__ int unit_first_pair(int item) {
    return INTERLEAVED ? item * (W / 2) : item * W;
}
// Pairs in one rotation unit.
template <bool INTERLEAVED, int W> __device__ __forceinline__ int unit_pairs() { return INTERLEAVED ? W / 2 : W; }

// Item `item` of a key row at `row`. A rotation unit is rotated by `cs` (the cos / sin of the
// unit's own pairs, from unit_first_pair on) unless cs is null (then copied unchanged).
template <typename T, int W, bool CONTIG, bool INTERLEAVED>
__device__ __forceinline__ void load_key_item(const T* row, i64 step, int item, int half, int head_dim,
                                              const float2* cs, RowItem<T, W>& it) {
    const int rot = rot_items<INTERLEAVED, W>(half);
    if (item >= rot) {
        load_pass<T, W, CONTIG>(row, step, 2 * half, head_dim, item - rot, it);
        return;
    }
    it.count = W;
    if (!INTERLEAVED) {
        it.o1 = item * W;
        it.o2 = half + item * W;
        it.packs = 2;
        load_pack<T, W, CONTIG>(row + (i64)it.o1 * step, step, it.a);
        load_pack<T, W, CONTIG>(row + (i64)it.o2 * step, step, it.b);
        if (cs == nullptr) return;
#pragma unroll
        for (int e = 0; e < W; ++e) {
            const float2 k = cs[e];
            const float x1 = to_f32(it.a.e[e]), x2 = to_f32(it.b.e[e]);
            it.a.e[e] = from_f32<T>(x1 * k.x - x2 * k.y);
            it.b.e[e] = from_f32<T>(x2 * k.x + x1 * k.y);
        }
    } else {
        it.o1 = item * W;
        it.packs = 1;
        load_pack<T, W, CONTIG>(row + (i64)it.o1 * step, step, it.a);
        if (cs == nullptr) return;
#pragma unroll
        for (int p = 0; p < W / 2; ++p) {
            const float2 k = cs[p];
            const float x1 = to_f32(it.a.e[2 * p]), x2 = to_f32(it.a.e[2 * p + 1]);
            it.a.e[2 * p] = from_f32<T>(x1 * k.x - x2 * k.y);
            it.a.e[2 * p + 1] = from_f32<T>(x2 * k.x + x1 * k.y);
        }
    }
}

template <typename T, int W, bool CONTIG>
__device__ __forceinline__ void store_item(T* row, i64 step, const RowItem<T, W>& it) {
    if (it.packs == 0) return;
    if (CONTIG) {
        store_pack<T, W, true>(row + it.o1, 1, it.a);
        if (it.packs == 2) store_pack<T, W, true>(row + it.o2, 1, it.b);
    } else {
#pragma unroll
        for (int e = 0; e < W; ++e)
            if (e < it.count) row[(i64)(it.o1 + e) * step] = it.a.e[e];
        if (it.packs == 2) {
#pragma unroll
            for (int e = 0; e < W; ++e) row[(i64)(it.o2 + e) * step] = it.b.e[e];
        }
    }
}
