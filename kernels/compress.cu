// Visual-token compression on the GPU: pooling on the (t, h, w) grid, attention scores,
// top-k / mass selection, gather, grid cells and ToMe-style merging (the CUDA counterparts of
// src/compress). Data is f32, f16 or bf16; arithmetic in f32 (sums of probabilities in f64).
//
// Kernel names: <op>_<dtype>[_<v|s>]: `v` packed 16-byte access along the last axis (checked by
// the host), `s` scalar access with any strides. Arguments come in one struct by value, mirrored
// by src/cuda/compress.rs (sizes checked at compile time through TVC_SIZEOF_*).
#include "tvc_common.cuh"

#define MAX_GRIDS 64
#define NEG_INF (-__int_as_float(0x7f800000))

// ---------------------------------------------------------------- pooling

struct PoolArgs {
    const void* x;
    void* out;                    // [new_tokens, dim], row-major
    i64 row_stride, col_stride;   // of x, in elements
    i64 dim;
    i64 in_start[MAX_GRIDS];      // first token of each grid in x
    i64 out_start[MAX_GRIDS + 1]; // first output token of each grid (and the end)
    int t[MAX_GRIDS], h[MAX_GRIDS], w[MAX_GRIDS];
    int num_grids, kh, kw, pad;
};

// blockIdx.x: output token of this launch's grids; blockIdx.y * blockDim.x + threadIdx.x: pack
// of W columns. Windows at the bottom / right edge average only the cells they cover.
template <typename T, int W, bool CONTIG>
__device__ void pool(const PoolArgs& a) {
    const i64 o = a.out_start[0] + blockIdx.x;
    const i64 col = ((i64)blockIdx.y * blockDim.x + threadIdx.x) * W;
    if (col >= a.dim) return;
    int lo = 0, hi = a.num_grids - 1;  // the grid holding output token o
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (a.out_start[mid] <= o) lo = mid; else hi = mid - 1;
    }
    const int g = lo, gh = a.h[g], gw = a.w[g];
    const int ph = (gh + a.kh - 1) / a.kh, pw = (gw + a.kw - 1) / a.kw;
    const i64 local = o - a.out_start[g];
    const i64 frame = local / ((i64)ph * pw);
    const int cell = (int)(local - frame * ph * pw);
    const int r0 = (cell / pw) * a.kh, c0 = (cell % pw) * a.kw;
    const int rows = min(a.kh, gh - r0), cols = min(a.kw, gw - c0);
    const i64 first = a.in_start[g] + frame * gh * gw + (i64)r0 * gw + c0;
    float acc[W];
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = 0.f;
    const T* x = (const T*)a.x + col * a.col_stride;
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
            Pack<T, W> p;
            load_pack<T, W, CONTIG>(x + (first + (i64)r * gw + c) * a.row_stride, a.col_stride, p);
#pragma unroll
            for (int e = 0; e < W; ++e) acc[e] += to_f32(p.e[e]);
        }
    }
    const float scale = 1.f / (float)(rows * cols);
    Pack<T, W> out;
#pragma unroll
    for (int e = 0; e < W; ++e) out.e[e] = from_f32<T>(acc[e] * scale);
    T* dst = (T*)a.out + o * a.dim + col;
    if (CONTIG) {
        store_pack<T, W, true>(dst, 1, out);
    } else {
        dst[0] = out.e[0];
    }
}

// ---------------------------------------------------------------- attention scores

struct ScoresArgs {
    const void* query;   // [q_tokens, q_heads, head_dim]
    const void* keys;    // [k_tokens, kv_heads, head_dim]
    const void* lse;     // [q_tokens, q_heads] or null
    float* row_lse;      // [q_tokens * q_heads] workspace: log-sum-exp of each row over the keys
    float* out;          // [k_tokens]
    i64 query_strides[3], key_strides[3], lse_strides[2];
    i64 q_tokens, k_tokens;
    int q_heads, kv_heads, head_dim, lse_dtype;
    float scale;
    int pad;
};

template <typename T>
__device__ __forceinline__ float warp_dot(const ScoresArgs& a, i64 q, int h, i64 k) {
    const int g = h / (a.q_heads / a.kv_heads);
    const T* qr = (const T*)a.query + q * a.query_strides[0] + h * a.query_strides[1];
    const T* kr = (const T*)a.keys + k * a.key_strides[0] + g * a.key_strides[1];
    float s = 0.f;
    for (int d = threadIdx.x & 31; d < a.head_dim; d += 32)
        s += to_f32(qr[d * a.query_strides[2]]) * to_f32(kr[d * a.key_strides[2]]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s;
}

// One block per (query token, head) row: the log-sum-exp of its scaled logits over all keys
// (online max / sum per warp, warps combined in a fixed order).
template <typename T>
__device__ void scores_rows(const ScoresArgs& a) {
    __shared__ float wm[32], ws[32];
    const i64 r = blockIdx.x;
    const i64 q = r / a.q_heads;
    const int h = (int)(r % a.q_heads);
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float m = NEG_INF, s = 0.f;
    for (i64 k = warp; k < a.k_tokens; k += warps) {
        const float logit = warp_dot<T>(a, q, h, k) * a.scale;
        if (logit > m) {
            s = s * expf(m - logit) + 1.f;
            m = logit;
        } else {
            s += expf(logit - m);
        }
    }
    if ((threadIdx.x & 31) == 0) { wm[warp] = m; ws[warp] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float big = NEG_INF;
        for (int w = 0; w < warps; ++w) big = fmaxf(big, wm[w]);
        float total = 0.f;
        for (int w = 0; w < warps; ++w)
            if (ws[w] > 0.f) total += ws[w] * expf(wm[w] - big);
        a.row_lse[r] = big + logf(total);
    }
}

// One warp per key: the mean over every (query token, head) row of exp(scale q.k - lse[row]),
// summed in f64 in row order (deterministic).
template <typename T>
__device__ void scores_keys(const ScoresArgs& a) {
    const i64 k = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (k >= a.k_tokens) return;
    const i64 rows = a.q_tokens * a.q_heads;
    double acc = 0.0;
    for (i64 r = 0; r < rows; ++r) {
        const i64 q = r / a.q_heads;
        const int h = (int)(r % a.q_heads);
        const float lse = a.lse ? load_any(a.lse, a.lse_dtype, q * a.lse_strides[0] + h * a.lse_strides[1]) : a.row_lse[r];
        acc += (double)expf(warp_dot<T>(a, q, h, k) * a.scale - lse);
    }
    if ((threadIdx.x & 31) == 0) a.out[k] = (float)(acc / (double)rows);
}

// ---------------------------------------------------------------- selection

// Scores as unsigned keys in the same order (higher score, higher key); -0 counts as +0 and
// NaN lowest, below -inf (top-k does not check for NaN: that would need a copy to the host).
__device__ __forceinline__ u32 order_key(float f) {
    if (f != f) return 0u;
    if (f == 0.f) f = 0.f;
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct SelectArgs {
    const void* scores;
    i64* out;        // [count] sorted indices
    i64 n, stride, count;
    int dtype, pad;
};

// One block: radix select of the count-th highest key (8 bits a pass), then the kept indices in
// increasing order by a flag scan; among scores equal to the threshold the lowest indices win.
__device__ void select_topk_impl(const SelectArgs& a) {
    __shared__ u32 hist[256];
    __shared__ u32 warp_totals[32];
    __shared__ u32 s_prefix, s_remaining;
    u32 prefix = 0, mask = 0, remaining = (u32)a.count;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (i64 i = threadIdx.x; i < a.n; i += blockDim.x) {
            const u32 k = order_key(load_any(a.scores, a.dtype, i * a.stride));
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u32 above = 0;
            int bin = 255;
            for (; bin > 0; --bin) {
                if (above + hist[bin] >= remaining) break;
                above += hist[bin];
            }
            s_prefix = prefix | ((u32)bin << shift);
            s_remaining = remaining - above;
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= 255u << shift;
    }
    const u32 threshold = prefix;  // keep every key above it and `remaining` equal to it
    u32 equal_before = 0, kept_before = 0;
    for (i64 base = 0; base < a.n; base += blockDim.x) {
        const i64 i = base + threadIdx.x;
        const u32 k = i < a.n ? order_key(load_any(a.scores, a.dtype, i * a.stride)) : 0u;
        const bool equal = i < a.n && k == threshold;
        u32 equal_total, kept_total;
        const u32 equal_rank = equal_before + block_flag_scan(equal, warp_totals, equal_total);
        const bool keep = i < a.n && (k > threshold || (equal && equal_rank < remaining));
        const u32 slot = kept_before + block_flag_scan(keep, warp_totals, kept_total);
        if (keep) a.out[slot] = i;
        equal_before += equal_total;
        kept_before += kept_total;
    }
}

struct MassArgs {
    const void* scores;
    i64* out;        // [n] workspace: the kept indices in increasing order first
    i64* header;     // [4]: count (-1 on bad input), first NaN index, first bad index, its value's bits
    i64 n, stride;
    double mass;
    i64 min_keep, max_keep;  // max_keep < 0: none
    int dtype;
    int pow2;        // n rounded up to a power of two: entries of the shared sort buffer
};

// Bitonic sort of `keys[0 .. size)` (size a power of two) into descending order.
__device__ void bitonic_desc(u64* keys, int size) {
    for (int k = 2; k <= size; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < size; i += blockDim.x) {
                const int partner = i ^ j;
                if (partner > i) {
                    const bool descending = (i & k) == 0;
                    const u64 x = keys[i], y = keys[partner];
                    if (descending ? (x < y) : (x > y)) { keys[i] = y; keys[partner] = x; }
                }
            }
            __syncthreads();
        }
    }
}

// One block, n <= pow2 entries of shared memory: validate (finite, >= 0), sort by (score desc,
// index asc), add the sorted scores in f64 one after the other exactly as the CPU path does
// (so the count is the same), then sort the kept indices increasingly.
__device__ void select_mass_impl(const MassArgs& a) {
    extern __shared__ u64 sorted[];
    __shared__ unsigned long long first_nan, first_bad;
    __shared__ i64 s_count;
    if (threadIdx.x == 0) { first_nan = ~0ull; first_bad = ~0ull; }
    __syncthreads();
    for (int i = threadIdx.x; i < a.pow2; i += blockDim.x) {
        u64 key = 0;
        if (i < a.n) {
            const float f = load_any(a.scores, a.dtype, (i64)i * a.stride);
            if (f != f) atomicMin(&first_nan, (unsigned long long)i);
            else if (f < 0.f || f == -NEG_INF) atomicMin(&first_bad, (unsigned long long)i);
            key = ((u64)order_key(f) << 32) | (u64)(0xffffffffu - (u32)i);
        }
        sorted[i] = key;
    }
    __syncthreads();
    if (first_nan != ~0ull || first_bad != ~0ull) {
        if (threadIdx.x == 0) {
            a.header[0] = -1;
            a.header[1] = first_nan == ~0ull ? -1 : (i64)first_nan;
            a.header[2] = first_bad == ~0ull ? -1 : (i64)first_bad;
            a.header[3] = first_bad == ~0ull ? 0 : (i64)__float_as_uint(load_any(a.scores, a.dtype, (i64)first_bad * a.stride));
        }
        return;
    }
    bitonic_desc(sorted, a.pow2);
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (i64 c = 0; c < a.n; ++c) total += (double)key_value((u32)(sorted[c] >> 32));
        const double target = a.mass * total;
        double running = 0.0;
        i64 n = 0;
        while (n < a.n && running < target) {
            running += (double)key_value((u32)(sorted[n] >> 32));
            ++n;
        }
        n = max(n, a.min_keep);
        if (a.max_keep >= 0) n = min(n, a.max_keep);
        n = min(n, a.n);
        s_count = n;
        a.header[0] = n;
        a.header[1] = -1;
        a.header[2] = -1;
        a.header[3] = 0;
    }
    __syncthreads();
    const i64 count = s_count;
    // The kept entries become their indices (ascending sort = descending of the complement).
    for (int i = threadIdx.x; i < a.pow2; i += blockDim.x) {
        const u32 index = 0xffffffffu - (u32)(sorted[i] & 0xffffffffu);
        sorted[i] = i < count ? (u64)(0xffffffffu - index) : 0ull;
    }
    __syncthreads();
    bitonic_desc(sorted, a.pow2);
    for (int i = threadIdx.x; i < count; i += blockDim.x) a.out[i] = (i64)(0xffffffffu - (u32)sorted[i]);
}

// ---------------------------------------------------------------- gather, cells, merge

struct GatherArgs {
    const void* x;
    void* out;            // [count, dim], row-major
    const i64* indices;   // [count]
    i64 count, dim, row_stride, col_stride;
};

template <typename T, int W, bool CONTIG>
__device__ void gather(const GatherArgs& a) {
    const i64 row = blockIdx.x;
    const i64 col = ((i64)blockIdx.y * blockDim.x + threadIdx.x) * W;
    if (col >= a.dim) return;
    Pack<T, W> p;
    load_pack<T, W, CONTIG>((const T*)a.x + a.indices[row] * a.row_stride + col * a.col_stride, a.col_stride, p);
    T* dst = (T*)a.out + row * a.dim + col;
    if (CONTIG) store_pack<T, W, true>(dst, 1, p); else dst[0] = p.e[0];
}

struct CellsArgs {
    const i64* indices;   // [count], sorted
    i64* out;             // [count, 3]
    i64 count;
    i64 in_start[MAX_GRIDS + 1];  // first token of each grid of this launch (and the end)
    int t[MAX_GRIDS], h[MAX_GRIDS], w[MAX_GRIDS];
    int num_grids, pad;
};

// The (t, h, w) cell of each index within its own grid; indices outside this launch's grids
// are left for the launch that holds them.
__device__ void cells_impl(const CellsArgs& a) {
    const i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= a.count) return;
    const i64 i = a.indices[j];
    if (i < a.in_start[0] || i >= a.in_start[a.num_grids]) return;
    int lo = 0, hi = a.num_grids - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (a.in_start[mid] <= i) lo = mid; else hi = mid - 1;
    }
    const i64 local = i - a.in_start[lo];
    const i64 plane = (i64)a.h[lo] * a.w[lo];
    const i64 rest = local % plane;
    a.out[3 * j] = local / plane;
    a.out[3 * j + 1] = rest / a.w[lo];
    a.out[3 * j + 2] = rest % a.w[lo];
}

struct ComplementArgs {
    const i64* kept;   // [count], sorted, unique
    i64* dropped;      // [n - count]
    i64 n, count;
};

// One block: the indices in [0, n) that are not in `kept`, in increasing order.
__device__ void complement_impl(const ComplementArgs& a) {
    __shared__ u32 warp_totals[32];
    i64 before = 0;
    for (i64 base = 0; base < a.n; base += blockDim.x) {
        const i64 i = base + threadIdx.x;
        bool is_dropped = false;
        if (i < a.n) {
            i64 lo = 0, hi = a.count;  // first kept >= i
            while (lo < hi) {
                const i64 mid = (lo + hi) >> 1;
                if (a.kept[mid] < i) lo = mid + 1; else hi = mid;
            }
            is_dropped = !(lo < a.count && a.kept[lo] == i);
        }
        u32 total;
        const u32 slot = block_flag_scan(is_dropped, warp_totals, total);
        if (is_dropped) a.dropped[before + slot] = i;
        before += total;
    }
}

struct NormArgs {
    const void* x;
    float* out;          // [count] 1 / max(|x[rows[i]]|, 1e-12)
    const i64* rows;
    i64 count, dim, row_stride, col_stride;
};

template <typename T>
__device__ void inv_norms(const NormArgs& a) {
    const i64 i = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (i >= a.count) return;
    const T* row = (const T*)a.x + a.rows[i] * a.row_stride;
    float s = 0.f;
    for (i64 d = threadIdx.x & 31; d < a.dim; d += 32) {
        const float v = to_f32(row[d * a.col_stride]);
        s += v * v;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if ((threadIdx.x & 31) == 0) a.out[i] = 1.f / fmaxf(sqrtf(s), 1e-12f);
}

struct SimilarityArgs {
    const void* x;
    const i64* kept;
    const i64* dropped;
    const float* inv_norms;  // of the kept rows
    int* target;             // [n_dropped]: position in `kept` of the most similar kept row
    i64 n_kept, n_dropped, dim, row_stride, col_stride;
};

#define SIM_D 32   // dropped rows per block
#define SIM_K 64   // kept rows per tile
#define SIM_C 32   // columns per step

// Tiled products of 32 dropped rows with every kept row (f32), similarity = dot / |kept|, the
// best kept row per dropped row: kept tiles in increasing order, strictly greater wins, so ties
// go to the lower kept index and NaN never wins (as the CPU path).
template <typename T>
__device__ void similarity(const SimilarityArgs& a) {
    __shared__ float A[SIM_D][SIM_C + 1];
    __shared__ float B[SIM_K][SIM_C + 1];
    __shared__ float S[SIM_D][SIM_K + 1];
    const int tid = threadIdx.x;        // 256 threads
    const int ty = tid >> 4, tx = tid & 15;
    const i64 d0 = (i64)blockIdx.x * SIM_D;
    float best = NEG_INF;
    int best_k = 0;
    for (i64 k0 = 0; k0 < a.n_kept; k0 += SIM_K) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        for (i64 c0 = 0; c0 < a.dim; c0 += SIM_C) {
            for (int e = tid; e < SIM_D * SIM_C; e += 256) {
                const int r = e / SIM_C, c = e % SIM_C;
                float v = 0.f;
                if (d0 + r < a.n_dropped && c0 + c < a.dim)
                    v = to_f32(((const T*)a.x)[a.dropped[d0 + r] * a.row_stride + (c0 + c) * a.col_stride]);
                A[r][c] = v;
            }
            for (int e = tid; e < SIM_K * SIM_C; e += 256) {
                const int r = e / SIM_C, c = e % SIM_C;
                float v = 0.f;
                if (k0 + r < a.n_kept && c0 + c < a.dim)
                    v = to_f32(((const T*)a.x)[a.kept[k0 + r] * a.row_stride + (c0 + c) * a.col_stride]);
                B[r][c] = v;
            }
            __syncthreads();
#pragma unroll 8
            for (int c = 0; c < SIM_C; ++c) {
                const float x0 = A[2 * ty][c], x1 = A[2 * ty + 1][c];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float y = B[4 * tx + j][c];
                    acc[0][j] += x0 * y;
                    acc[1][j] += x1 * y;
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const i64 k = k0 + 4 * tx + j;
                S[2 * ty + i][4 * tx + j] = k < a.n_kept ? acc[i][j] * a.inv_norms[k] : NEG_INF;
            }
        __syncthreads();
        if (tid < SIM_D) {
            for (int j = 0; j < SIM_K && k0 + j < a.n_kept; ++j) {
                const float v = S[tid][j];
                if (v > best) { best = v; best_k = (int)(k0 + j); }
            }
        }
        __syncthreads();
    }
    if (tid < SIM_D && d0 + tid < a.n_dropped) a.target[d0 + tid] = best_k;
}

struct MergeArgs {
    const void* x;
    void* out;              // [n_kept, dim]
    const i64* kept;
    const i64* dropped;
    const int* target;
    i64 n_kept, n_dropped, dim, row_stride, col_stride;
};

// Each kept row becomes the mean of itself and the dropped rows whose target it is (added in
// index order, then scaled by 1 / (1 + members), as the CPU path).
template <typename T, int W, bool CONTIG>
__device__ void merge(const MergeArgs& a) {
    const i64 k = blockIdx.x;
    const i64 col = ((i64)blockIdx.y * blockDim.x + threadIdx.x) * W;
    if (col >= a.dim) return;
    const T* x = (const T*)a.x + col * a.col_stride;
    float acc[W];
    Pack<T, W> p;
    load_pack<T, W, CONTIG>(x + a.kept[k] * a.row_stride, a.col_stride, p);
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = to_f32(p.e[e]);
    int members = 0;
    for (i64 j = 0; j < a.n_dropped; ++j) {
        if (a.target[j] != (int)k) continue;
        load_pack<T, W, CONTIG>(x + a.dropped[j] * a.row_stride, a.col_stride, p);
#pragma unroll
        for (int e = 0; e < W; ++e) acc[e] += to_f32(p.e[e]);
        ++members;
    }
    const float scale = 1.f / (float)(1 + members);
#pragma unroll
    for (int e = 0; e < W; ++e) p.e[e] = from_f32<T>(acc[e] * scale);
    T* dst = (T*)a.out + k * a.dim + col;
    if (CONTIG) store_pack<T, W, true>(dst, 1, p); else dst[0] = p.e[0];
}

// ---------------------------------------------------------------- entry points

#ifdef TVC_SIZEOF_PoolArgs
static_assert(sizeof(PoolArgs) == TVC_SIZEOF_PoolArgs, "PoolArgs differs from src/cuda/compress.rs");
static_assert(sizeof(ScoresArgs) == TVC_SIZEOF_ScoresArgs, "ScoresArgs differs from src/cuda/compress.rs");
static_assert(sizeof(SelectArgs) == TVC_SIZEOF_SelectArgs, "SelectArgs differs from src/cuda/compress.rs");
static_assert(sizeof(MassArgs) == TVC_SIZEOF_MassArgs, "MassArgs differs from src/cuda/compress.rs");
static_assert(sizeof(GatherArgs) == TVC_SIZEOF_GatherArgs, "GatherArgs differs from src/cuda/compress.rs");
static_assert(sizeof(CellsArgs) == TVC_SIZEOF_CellsArgs, "CellsArgs differs from src/cuda/compress.rs");
static_assert(sizeof(ComplementArgs) == TVC_SIZEOF_ComplementArgs, "ComplementArgs differs from src/cuda/compress.rs");
static_assert(sizeof(NormArgs) == TVC_SIZEOF_NormArgs, "NormArgs differs from src/cuda/compress.rs");
static_assert(sizeof(SimilarityArgs) == TVC_SIZEOF_SimilarityArgs, "SimilarityArgs differs from src/cuda/compress.rs");
static_assert(sizeof(MergeArgs) == TVC_SIZEOF_MergeArgs, "MergeArgs differs from src/cuda/compress.rs");
#endif

#define PACKED_KERNELS(NAME, ARGS, BLOCK, T, TN, WV)                                                            \
    extern "C" __global__ void __launch_bounds__(BLOCK) NAME##_##TN##_v(const ARGS a) { NAME<T, WV, true>(a); } \
    extern "C" __global__ void __launch_bounds__(BLOCK) NAME##_##TN##_s(const ARGS a) { NAME<T, 1, false>(a); }
#define TYPED_KERNEL(NAME, ARGS, BLOCK, T, TN) \
    extern "C" __global__ void __launch_bounds__(BLOCK) NAME##_##TN(const ARGS a) { NAME<T>(a); }
#define PER_DTYPE(MACRO, NAME, ARGS, BLOCK, ...)      \
    MACRO(NAME, ARGS, BLOCK, float, f32 __VA_ARGS__)  \
    MACRO(NAME, ARGS, BLOCK, f16_t, f16 __VA_ARGS__)  \
    MACRO(NAME, ARGS, BLOCK, bf16_t, bf16 __VA_ARGS__)

PACKED_KERNELS(pool, PoolArgs, 128, float, f32, 4)
PACKED_KERNELS(pool, PoolArgs, 128, f16_t, f16, 8)
PACKED_KERNELS(pool, PoolArgs, 128, bf16_t, bf16, 8)
PACKED_KERNELS(gather, GatherArgs, 128, float, f32, 4)
PACKED_KERNELS(gather, GatherArgs, 128, f16_t, f16, 8)
PACKED_KERNELS(gather, GatherArgs, 128, bf16_t, bf16, 8)
PACKED_KERNELS(merge, MergeArgs, 128, float, f32, 4)
PACKED_KERNELS(merge, MergeArgs, 128, f16_t, f16, 8)
PACKED_KERNELS(merge, MergeArgs, 128, bf16_t, bf16, 8)
PER_DTYPE(TYPED_KERNEL, scores_rows, ScoresArgs, 256)
PER_DTYPE(TYPED_KERNEL, scores_keys, ScoresArgs, 256)
PER_DTYPE(TYPED_KERNEL, inv_norms, NormArgs, 256)
PER_DTYPE(TYPED_KERNEL, similarity, SimilarityArgs, 256)

extern "C" __global__ void __launch_bounds__(1024) select_topk(const SelectArgs a) { select_topk_impl(a); }
extern "C" __global__ void __launch_bounds__(1024) select_mass(const MassArgs a) { select_mass_impl(a); }
extern "C" __global__ void __launch_bounds__(256) token_cells(const CellsArgs a) { cells_impl(a); }
extern "C" __global__ void __launch_bounds__(1024) complement(const ComplementArgs a) { complement_impl(a); }
