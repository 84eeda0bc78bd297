//! Inner loops shared by the compression kernels: dtype conversion of whole rows, a
//! vectorisable `exp`, a blocked `A · Bᵀ` for dot products (attention logits, cosine
//! similarities: an AVX2+FMA register-tiled kernel chosen at run time, a portable one
//! otherwise), and filling a fresh output in parallel without zero-initialising it first.

use std::any::TypeId;
use std::mem::MaybeUninit;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::dtype::Float;

/// `dst[i] = src[i] as f32`, vectorised for f16 (F16C when present) and bf16.
#[inline]
pub(crate) fn to_f32_slice<T: Float>(src: &[T], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32.
        dst.copy_from_slice(unsafe {
            std::slice::from_raw_parts(src.as_ptr() as *const f32, src.len())
        });
    } else if TypeId::of::<T>() == TypeId::of::<f16>() {
        // SAFETY: T is f16.
        unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f16, src.len()) }
            .convert_to_f32_slice(dst);
    } else if TypeId::of::<T>() == TypeId::of::<bf16>() {
        // SAFETY: T is bf16.
        unsafe { std::slice::from_raw_parts(src.as_ptr() as *const bf16, src.len()) }
            .convert_to_f32_slice(dst);
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

/// The CPU can run the AVX2 + FMA + F16C versions (cached by `std` after the first call).
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[i] = scale * sum over rows of rows[r][i]` (every row at least `out.len()` long).
pub(crate) fn mean_of_rows<T: Float>(
    rows: &[&[T]],
    scale: f32,
    acc: &mut [f32],
    scratch: &mut [f32],
    out: &mut [MaybeUninit<T>],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma()
            && [
                TypeId::of::<f32>(),
                TypeId::of::<f16>(),
                TypeId::of::<bf16>(),
            ]
            .contains(&TypeId::of::<T>())
        {
            // SAFETY: the CPU has AVX2, FMA and F16C; T is one of the types `load8` reads.
            return unsafe { avx2::mean_of_rows(rows, scale, out) };
        }
    }
    sum_rows(acc, rows, true, scratch);
    write_scaled(out, acc, scale);
}

/// `acc[i] = (init ? 0 : acc[i]) + sum over rows of rows[r][i]` for up to 4 rows at a time
/// (one pass over `acc` per 4 input rows). f32 and bf16 are read directly; f16 goes through
/// `scratch` (4 x len) with the vectorised conversion.
#[inline(always)]
pub(crate) fn sum_rows<T: Float>(acc: &mut [f32], rows: &[&[T]], init: bool, scratch: &mut [f32]) {
    let len = acc.len();
    if init && rows.is_empty() {
        acc.fill(0.0);
    }
    if len == 0 {
        return;
    }
    let mut first = init;
    for group in rows.chunks(4) {
        if TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<bf16>() {
            match group {
                [a] => sum_group::<T, 1>(acc, [a], first),
                [a, b] => sum_group::<T, 2>(acc, [a, b], first),
                [a, b, c] => sum_group::<T, 3>(acc, [a, b, c], first),
                [a, b, c, d] => sum_group::<T, 4>(acc, [a, b, c, d], first),
                _ => unreachable!("chunks of 1 to 4"),
            }
        } else {
            let converted: Vec<&[f32]> = group
                .iter()
                .zip(scratch.chunks_exact_mut(len))
                .map(|(row, buf)| {
                    to_f32_slice(row, buf);
                    &*buf
                })
                .collect();
            match converted.as_slice() {
                [a] => sum_group::<f32, 1>(acc, [a], first),
                [a, b] => sum_group::<f32, 2>(acc, [a, b], first),
                [a, b, c] => sum_group::<f32, 3>(acc, [a, b, c], first),
                [a, b, c, d] => sum_group::<f32, 4>(acc, [a, b, c, d], first),
                _ => unreachable!("chunks of 1 to 4"),
            }
        }
        first = false;
    }
}

/// Element as f32 for the types read without a scratch buffer (f32, bf16: a shift).
#[inline(always)]
fn load<T: Float>(value: T) -> f32 {
    if TypeId::of::<T>() == TypeId::of::<bf16>() {
        // SAFETY: T is bf16 (2 bytes); widening its bits is the exact conversion.
        let bits: u16 = unsafe { std::mem::transmute_copy(&value) };
        f32::from_bits((bits as u32) << 16)
    } else {
        value.to_f32()
    }
}

#[inline(always)]
fn sum_group<T: Float, const N: usize>(acc: &mut [f32], rows: [&[T]; N], init: bool) {
    let len = acc.len();
    let rows: [&[T]; N] = rows.map(|row| &row[..len]);
    if init {
        for i in 0..len {
            let mut sum = load(rows[0][i]);
            for row in &rows[1..] {
                sum += load(row[i]);
            }
            acc[i] = sum;
        }
    } else {
        for i in 0..len {
            let mut sum = load(rows[0][i]);
            for row in &rows[1..] {
                sum += load(row[i]);
            }
            acc[i] += sum;
        }
    }
}

/// `dst[i] = T::from(src[i] * scale)`.
#[inline]
pub(crate) fn write_scaled<T: Float>(dst: &mut [MaybeUninit<T>], src: &[f32], scale: f32) {
    debug_assert_eq!(src.len(), dst.len());
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(T::from_f32(s * scale));
    }
}

/// `dst[i] = src[i]`.
#[inline]
pub(crate) fn write_copy<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    assert_eq!(src.len(), dst.len());
    // SAFETY: same length, T: Copy, distinct allocations (dst is uninitialised output).
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr() as *mut T, src.len()) }
}

/// A `rows x width` row-major Vec whose rows `fill(row, out_row)` writes in parallel, in tasks
/// of at least `min_rows` rows; with no more than `min_rows` rows, on the calling thread (waking
/// rayon's workers costs tens of microseconds, more than a small call's work). Every call must
/// write every element of its row.
pub(crate) fn par_rows<T, F>(rows: usize, width: usize, min_rows: usize, fill: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &mut [MaybeUninit<T>]) + Sync,
{
    let len = rows * width;
    let mut out: Vec<T> = Vec::with_capacity(len);
    if width > 0 {
        if rows <= min_rows {
            for (row, dst) in out.spare_capacity_mut()[..len]
                .chunks_mut(width)
                .enumerate()
            {
                fill(row, dst);
            }
        } else {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(width)
                .with_min_len(min_rows.max(1))
                .enumerate()
                .for_each(|(row, dst)| fill(row, dst));
        }
    }
    // SAFETY: every row was written by `fill` (the contract above); width 0 means len 0.
    unsafe { out.set_len(len) };
    out
}

/// As [`par_rows`], with per-task scratch state made by `init` (e.g. an f32 accumulator).
pub(crate) fn par_rows_init<T, S, I, F>(
    rows: usize,
    width: usize,
    min_rows: usize,
    init: I,
    fill: F,
) -> Vec<T>
where
    T: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut [MaybeUninit<T>]) + Sync + Send,
{
    let len = rows * width;
    let mut out: Vec<T> = Vec::with_capacity(len);
    if width > 0 {
        if rows <= min_rows {
            let mut state = init();
            for (row, dst) in out.spare_capacity_mut()[..len]
                .chunks_mut(width)
                .enumerate()
            {
                fill(&mut state, row, dst);
            }
        } else {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(width)
                .with_min_len(min_rows.max(1))
                .enumerate()
                .for_each_init(init, |state, (row, dst)| fill(state, row, dst));
        }
    }
    // SAFETY: every row was written by `fill` (the contract of `par_rows`); width 0 means len 0.
    unsafe { out.set_len(len) };
    out
}

/// `e^x` to about 2 ulp for |x| < 87, 0 below -87.3, +inf above 88.7; written with plain
/// arithmetic so that loops over it vectorise (libm's `expf` does not).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to an integer
    let clamped = x.clamp(-87.3, 88.7);
    let n = (clamped * LOG2E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // exp(r) on |r| <= ln2/2 (Cephes coefficients).
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_6e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = e * scale;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// `acc[k] += p[k]` for one attention row of raw dot products `logits` (overwritten):
/// `p = softmax(scale * logits)`, or `p = exp(scale * logits - lse)` when `lse` is given.
pub(crate) fn accumulate_probabilities(
    logits: &mut [f32],
    scale: f32,
    lse: Option<f32>,
    acc: &mut [f64],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { accumulate_probabilities_avx2(logits, scale, lse, acc) };
        }
    }
    accumulate_probabilities_impl(logits, scale, lse, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_probabilities_avx2(
    logits: &mut [f32],
    scale: f32,
    lse: Option<f32>,
    acc: &mut [f64],
) {
    accumulate_probabilities_impl(logits, scale, lse, acc)
}

/// Written as separate simple loops (map, max, sum) so that each vectorises.
#[inline(always)]
fn accumulate_probabilities_impl(
    logits: &mut [f32],
    scale: f32,
    lse: Option<f32>,
    acc: &mut [f64],
) {
    let acc = &mut acc[..logits.len()];
    match lse {
        Some(lse) => {
            for s in logits.iter_mut() {
                *s = exp_f32(*s * scale - lse);
            }
            for (a, &p) in acc.iter_mut().zip(logits.iter()) {
                *a += p as f64;
            }
        }
        None => {
            for s in logits.iter_mut() {
                *s *= scale;
            }
            let mut lanes = [f32::NEG_INFINITY; LANES];
            let chunks = logits.chunks_exact(LANES);
            let tail = chunks
                .remainder()
                .iter()
                .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            for chunk in chunks {
                for l in 0..LANES {
                    lanes[l] = lanes[l].max(chunk[l]);
                }
            }
            let max = lanes.iter().fold(tail, |m, &s| m.max(s));
            for s in logits.iter_mut() {
                *s = exp_f32(*s - max);
            }
            let inv = 1.0 / sum(logits) as f64;
            for (a, &e) in acc.iter_mut().zip(logits.iter()) {
                *a += e as f64 * inv;
            }
        }
    }
}

/// Sum in `LANES` partial sums (vectorises, unlike a sequential f32 sum).
#[inline(always)]
pub(crate) fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for l in 0..LANES {
            lanes[l] += chunk[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

const LANES: usize = 8;
/// Elements of the shared dimension per block: rows of both operands stay in L1/L2.
const K_BLOCK: usize = 512;
/// Rows of `b` per block: `N_BLOCK * K_BLOCK * 4` bytes = 128 KiB, resident in L2.
const N_BLOCK: usize = 64;

/// `out[i * n + j] = a_i · b_j` for row-major `a` `[m, k]` and `b` `[n, k]` (f32).
pub(crate) fn matmul_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && out.len() >= m * n);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA; the sizes were checked above.
            return unsafe { avx2::matmul_nt(a, b, m, n, k, out) };
        }
    }
    matmul_nt_portable(a, b, m, n, k, out)
}

/// The same blocking as the AVX2 path, with `LANES`-wide arrays the compiler vectorises.
fn matmul_nt_portable(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    out[..m * n].fill(0.0);
    for k0 in (0..k).step_by(K_BLOCK) {
        let k1 = (k0 + K_BLOCK).min(k);
        for n0 in (0..n).step_by(N_BLOCK) {
            let n1 = (n0 + N_BLOCK).min(n);
            for i in 0..m {
                let a_row = &a[i * k + k0..i * k + k1];
                for j in n0..n1 {
                    let b_row = &b[j * k + k0..j * k + k1];
                    let mut acc = [0f32; LANES];
                    let (a_chunks, b_chunks) =
                        (a_row.chunks_exact(LANES), b_row.chunks_exact(LANES));
                    let tail: f32 = a_chunks
                        .remainder()
                        .iter()
                        .zip(b_chunks.remainder())
                        .map(|(x, y)| x * y)
                        .sum();
                    for (x, y) in a_chunks.zip(b_chunks) {
                        for l in 0..LANES {
                            acc[l] += x[l] * y[l];
                        }
                    }
                    out[i * n + j] += acc.iter().sum::<f32>() + tail;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles read best with explicit indices
mod avx2 {
    use std::any::TypeId;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use half::{bf16, f16};

    use super::{K_BLOCK, N_BLOCK};
    use crate::dtype::Float;

    /// Rows of `a` and of `b` per register tile: 4 x 3 accumulators of 8 lanes (12 of the 16
    /// ymm registers), 7 loads per 12 FMAs.
    const MR: usize = 4;
    const NR: usize = 3;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn matmul_nt(
        a: &[f32],
        b: &[f32],
        m: usize,
        n: usize,
        k: usize,
        out: &mut [f32],
    ) {
        out[..m * n].fill(0.0);
        let (a, b, out) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
        for k0 in (0..k).step_by(K_BLOCK) {
            let len = K_BLOCK.min(k - k0);
            for n0 in (0..n).step_by(N_BLOCK) {
                let n1 = (n0 + N_BLOCK).min(n);
                let mut i = 0;
                while i < m {
                    let rows = MR.min(m - i);
                    let mut j = n0;
                    while j < n1 {
                        let cols = NR.min(n1 - j);
                        let a_tile = a.add(i * k + k0);
                        let b_tile = b.add(j * k + k0);
                        let out_tile = out.add(i * n + j);
                        match (rows, cols) {
                            (4, 3) => tile::<4, 3>(a_tile, b_tile, k, len, out_tile, n),
                            (4, 2) => tile::<4, 2>(a_tile, b_tile, k, len, out_tile, n),
                            (4, 1) => tile::<4, 1>(a_tile, b_tile, k, len, out_tile, n),
                            (3, 3) => tile::<3, 3>(a_tile, b_tile, k, len, out_tile, n),
                            (3, 2) => tile::<3, 2>(a_tile, b_tile, k, len, out_tile, n),
                            (3, 1) => tile::<3, 1>(a_tile, b_tile, k, len, out_tile, n),
                            (2, 3) => tile::<2, 3>(a_tile, b_tile, k, len, out_tile, n),
                            (2, 2) => tile::<2, 2>(a_tile, b_tile, k, len, out_tile, n),
                            (2, 1) => tile::<2, 1>(a_tile, b_tile, k, len, out_tile, n),
                            (1, 3) => tile::<1, 3>(a_tile, b_tile, k, len, out_tile, n),
                            (1, 2) => tile::<1, 2>(a_tile, b_tile, k, len, out_tile, n),
                            _ => tile::<1, 1>(a_tile, b_tile, k, len, out_tile, n),
                        }
                        j += cols;
                    }
                    i += rows;
                }
            }
        }
    }

    /// `out[r * ld_out + q] += a_r · b_q` over `len` elements, rows `ld` apart.
    #[inline(always)]
    unsafe fn tile<const R: usize, const Q: usize>(
        a: *const f32,
        b: *const f32,
        ld: usize,
        len: usize,
        out: *mut f32,
        ld_out: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); Q]; R];
        let body = len / 8 * 8;
        let mut c = 0;
        while c < body {
            let mut bv = [_mm256_setzero_ps(); Q];
            for q in 0..Q {
                bv[q] = _mm256_loadu_ps(b.add(q * ld + c));
            }
            for r in 0..R {
                let av = _mm256_loadu_ps(a.add(r * ld + c));
                for q in 0..Q {
                    acc[r][q] = _mm256_fmadd_ps(av, bv[q], acc[r][q]);
                }
            }
            c += 8;
        }
        for r in 0..R {
            for q in 0..Q {
                let mut sum = horizontal_sum(acc[r][q]);
                for t in body..len {
                    sum += *a.add(r * ld + t) * *b.add(q * ld + t);
                }
                *out.add(r * ld_out + q) += sum;
            }
        }
    }

    /// Eight elements of `T` (f32, f16 or bf16) at `ptr` as f32 lanes.
    #[inline(always)]
    unsafe fn load8<T: Float>(ptr: *const T) -> __m256 {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            _mm256_loadu_ps(ptr as *const f32)
        } else if TypeId::of::<T>() == TypeId::of::<bf16>() {
            let half = _mm_loadu_si128(ptr as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16))
        } else {
            debug_assert!(TypeId::of::<T>() == TypeId::of::<f16>());
            _mm256_cvtph_ps(_mm_loadu_si128(ptr as *const __m128i))
        }
    }

    /// `out[i] = scale * sum over rows of rows[r][i]`, every row of `out.len()` elements:
    /// 64 columns at a time summed over all rows in eight registers, so nothing but the
    /// inputs and the output ever touches memory.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn mean_of_rows<T: Float>(
        rows: &[&[T]],
        scale: f32,
        out: &mut [MaybeUninit<T>],
    ) {
        let len = out.len();
        for row in rows {
            assert!(row.len() >= len);
        }
        let scale_v = _mm256_set1_ps(scale);
        let mut buffer = [0f32; 64];
        let mut c = 0;
        while c + 64 <= len {
            let mut acc = [_mm256_setzero_ps(); 8];
            for row in rows {
                let ptr = row.as_ptr().add(c);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, load8(ptr.add(8 * j)));
                }
            }
            store_chunk(&acc, scale_v, &mut buffer, &mut out[c..c + 64]);
            c += 64;
        }
        while c + 8 <= len {
            let mut acc = _mm256_setzero_ps();
            for row in rows {
                acc = _mm256_add_ps(acc, load8(row.as_ptr().add(c)));
            }
            store_chunk(&[acc], scale_v, &mut buffer, &mut out[c..c + 8]);
            c += 8;
        }
        for i in c..len {
            let sum: f32 = rows.iter().map(|row| row[i].to_f32()).sum();
            out[i].write(T::from_f32(sum * scale));
        }
    }

    #[inline(always)]
    unsafe fn store_chunk<T: Float>(
        acc: &[__m256],
        scale: __m256,
        buffer: &mut [f32; 64],
        out: &mut [MaybeUninit<T>],
    ) {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            let dst = out.as_mut_ptr() as *mut f32;
            for (j, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(dst.add(8 * j), _mm256_mul_ps(*a, scale));
            }
        } else {
            for (j, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(buffer.as_mut_ptr().add(8 * j), _mm256_mul_ps(*a, scale));
            }
            for (o, &v) in out.iter_mut().zip(buffer.iter()) {
                o.write(T::from_f32(v));
            }
        }
    }

    #[inline(always)]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        let single = _mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 0b01));
        _mm_cvtss_f32(single)
    }
}

/// Squared Euclidean norm, vectorised.
#[inline]
pub(crate) fn squared_norm(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for chunk in chunks {
        for l in 0..LANES {
            acc[l] += chunk[l] * chunk[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut x = -90.0f32;
        while x < 90.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if want > 1e-37 && want < 1e38 {
                assert!(
                    (got - want).abs() <= 4e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            }
            x += 0.0137;
        }
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    /// Both builds of the window mean (AVX2 where the CPU has it, and the portable one) against
    /// an f64 sum, for every dtype and lengths around the 64- and 8-column blocks.
    #[test]
    fn mean_of_rows_matches_f64() {
        fn check<T: Float>() {
            for &(count, len) in &[
                (1, 1),
                (3, 7),
                (16, 64),
                (5, 71),
                (4, 200),
                (9, 3584 + 13),
                (2, 0),
            ] {
                let rows: Vec<Vec<T>> = (0..count)
                    .map(|r| {
                        (0..len)
                            .map(|i| T::from_f32(((i * 31 + r * 17) % 23) as f32 / 7.0 - 1.5))
                            .collect()
                    })
                    .collect();
                let views: Vec<&[T]> = rows.iter().map(|r| r.as_slice()).collect();
                let scale = 1.0 / count as f32;
                let want: Vec<f64> = (0..len)
                    .map(|i| views.iter().map(|r| r[i].to_f32() as f64).sum::<f64>() * scale as f64)
                    .collect();
                let (mut acc, mut scratch) = (vec![0f32; len], vec![0f32; 4 * len]);
                for portable in [false, true] {
                    let mut out: Vec<MaybeUninit<T>> =
                        (0..len).map(|_| MaybeUninit::uninit()).collect();
                    if portable {
                        sum_rows(&mut acc, &views, true, &mut scratch);
                        write_scaled(&mut out, &acc, scale);
                    } else {
                        mean_of_rows(&views, scale, &mut acc, &mut scratch, &mut out);
                    }
                    for (i, o) in out.iter().enumerate() {
                        // SAFETY: every element was written above.
                        let got = unsafe { o.assume_init() }.to_f32() as f64;
                        let tol = match T::DTYPE {
                            crate::dtype::DType::F32 => 1e-5,
                            crate::dtype::DType::F16 => 2e-3,
                            _ => 1e-2,
                        };
                        assert!(
                            (got - want[i]).abs() <= tol * (1.0 + want[i].abs()),
                            "{i}: {got} vs {}",
                            want[i]
                        );
                    }
                }
            }
        }
        check::<f32>();
        check::<f16>();
        check::<bf16>();
    }

    #[test]
    fn matmul_matches_naive() {
        for &(m, n, k) in &[
            (0, 3, 5),
            (1, 1, 1),
            (5, 7, 9),
            (9, 130, 1100),
            (4, 2, 8),
            (7, 5, 3),
            (13, 67, 515),
            (32, 17, 5),
            (5, 33, 20),
            (6, 4, 1),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let b: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            for portable in [false, true] {
                let mut out = vec![f32::NAN; m * n];
                if portable {
                    matmul_nt_portable(&a, &b, m, n, k, &mut out);
                } else {
                    matmul_nt(&a, &b, m, n, k, &mut out);
                }
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| a[i * k + t] as f64 * b[j * k + t] as f64)
                            .sum();
                        assert!((out[i * n + j] as f64 - want).abs() < 1e-3 * (1.0 + want.abs()));
                    }
                }
            }
        }
    }
}
