//! Inner loops shared by the compression kernels: dtype conversion of whole rows, a
//! vectorisable `exp`, a blocked `A · Bᵀ` for dot products (attention logits, cosine
//! similarities) compiled twice (AVX2+FMA chosen at run time, portable otherwise), and filling
//! a fresh output in parallel without zero-initialising it first.

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
        dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f32, src.len()) });
    } else if TypeId::of::<T>() == TypeId::of::<f16>() {
        // SAFETY: T is f16.
        unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f16, src.len()) }.convert_to_f32_slice(dst);
    } else if TypeId::of::<T>() == TypeId::of::<bf16>() {
        // SAFETY: T is bf16.
        unsafe { std::slice::from_raw_parts(src.as_ptr() as *const bf16, src.len()) }.convert_to_f32_slice(dst);
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

/// `acc[i] += src[i] as f32`; `scratch` (same length) holds the conversion for f16/bf16.
#[inline]
pub(crate) fn add_row<T: Float>(acc: &mut [f32], src: &[T], scratch: &mut [f32]) {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32.
        let src = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f32, src.len()) };
        for (a, s) in acc.iter_mut().zip(src) {
            *a += *s;
        }
    } else {
        to_f32_slice(src, scratch);
        for (a, s) in acc.iter_mut().zip(scratch.iter()) {
            *a += *s;
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
/// of at least `min_rows` rows. Every call must write every element of its row.
pub(crate) fn par_rows<T, F>(rows: usize, width: usize, min_rows: usize, fill: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &mut [MaybeUninit<T>]) + Sync,
{
    let len = rows * width;
    let mut out: Vec<T> = Vec::with_capacity(len);
    if width > 0 {
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(width)
            .with_min_len(min_rows.max(1))
            .enumerate()
            .for_each(|(row, dst)| fill(row, dst));
    }
    // SAFETY: every row was written by `fill` (the contract above); width 0 means len 0.
    unsafe { out.set_len(len) };
    out
}

/// As [`par_rows`], with per-task scratch state made by `init` (e.g. an f32 accumulator).
pub(crate) fn par_rows_init<T, S, I, F>(rows: usize, width: usize, min_rows: usize, init: I, fill: F) -> Vec<T>
where
    T: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut [MaybeUninit<T>]) + Sync + Send,
{
    let len = rows * width;
    let mut out: Vec<T> = Vec::with_capacity(len);
    if width > 0 {
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(width)
            .with_min_len(min_rows.max(1))
            .enumerate()
            .for_each_init(init, |state, (row, dst)| fill(state, row, dst));
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

const LANES: usize = 8;
/// Elements of the shared dimension per block: rows of both operands stay in L1/L2.
const K_BLOCK: usize = 512;
/// Rows of `b` per block: `N_BLOCK * K_BLOCK * 4` bytes = 128 KiB, resident in L2.
const N_BLOCK: usize = 64;

/// `out[i * n + j] = a_i · b_j` for row-major `a` `[m, k]` and `b` `[n, k]` (f32).
pub(crate) fn matmul_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    debug_assert!(a.len() >= m * k && b.len() >= n * k && out.len() >= m * n);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { matmul_nt_avx2(a, b, m, n, k, out) };
        }
    }
    matmul_nt_impl::<false>(a, b, m, n, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matmul_nt_avx2(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    matmul_nt_impl::<true>(a, b, m, n, k, out)
}

#[inline(always)]
fn matmul_nt_impl<const FMA: bool>(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32]) {
    out[..m * n].fill(0.0);
    for k0 in (0..k).step_by(K_BLOCK) {
        let k1 = (k0 + K_BLOCK).min(k);
        for n0 in (0..n).step_by(N_BLOCK) {
            let n1 = (n0 + N_BLOCK).min(n);
            let mut i = 0;
            while i + 4 <= m {
                row_block::<4, FMA>(a, b, i, n0, n1, k, k0, k1, n, out);
                i += 4;
            }
            while i < m {
                row_block::<1, FMA>(a, b, i, n0, n1, k, k0, k1, n, out);
                i += 1;
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_block<const MR: usize, const FMA: bool>(
    a: &[f32],
    b: &[f32],
    i: usize,
    n0: usize,
    n1: usize,
    k: usize,
    k0: usize,
    k1: usize,
    n: usize,
    out: &mut [f32],
) {
    let a_rows: [&[f32]; MR] = std::array::from_fn(|r| &a[(i + r) * k + k0..(i + r) * k + k1]);
    let mut j = n0;
    while j + 2 <= n1 {
        let b_rows = [&b[j * k + k0..j * k + k1], &b[(j + 1) * k + k0..(j + 1) * k + k1]];
        let dots = tile::<MR, 2, FMA>(&a_rows, &b_rows);
        for r in 0..MR {
            out[(i + r) * n + j] += dots[r][0];
            out[(i + r) * n + j + 1] += dots[r][1];
        }
        j += 2;
    }
    if j < n1 {
        let b_rows = [&b[j * k + k0..j * k + k1]];
        let dots = tile::<MR, 1, FMA>(&a_rows, &b_rows);
        for r in 0..MR {
            out[(i + r) * n + j] += dots[r][0];
        }
    }
}

/// Dot products of `MR` rows with `NR` rows of the same length, in `LANES`-wide accumulators.
#[inline(always)]
fn tile<const MR: usize, const NR: usize, const FMA: bool>(a: &[&[f32]; MR], b: &[&[f32]; NR]) -> [[f32; NR]; MR] {
    let len = a[0].len();
    let body = len / LANES * LANES;
    let mut acc = [[[0f32; LANES]; NR]; MR];
    let mut c = 0;
    while c < body {
        let av: [&[f32; LANES]; MR] = std::array::from_fn(|r| a[r][c..c + LANES].try_into().unwrap());
        let bv: [&[f32; LANES]; NR] = std::array::from_fn(|q| b[q][c..c + LANES].try_into().unwrap());
        for r in 0..MR {
            for q in 0..NR {
                for l in 0..LANES {
                    acc[r][q][l] = if FMA {
                        av[r][l].mul_add(bv[q][l], acc[r][q][l])
                    } else {
                        av[r][l] * bv[q][l] + acc[r][q][l]
                    };
                }
            }
        }
        c += LANES;
    }
    let mut dots = [[0f32; NR]; MR];
    for r in 0..MR {
        for q in 0..NR {
            let mut sum = acc[r][q].iter().sum::<f32>();
            for t in body..len {
                sum += a[r][t] * b[q][t];
            }
            dots[r][q] = sum;
        }
    }
    dots
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
                assert!((got - want).abs() <= 4e-7 * want, "exp({x}) = {got}, want {want}");
            }
            x += 0.0137;
        }
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn matmul_matches_naive() {
        for &(m, n, k) in &[(0, 3, 5), (1, 1, 1), (5, 7, 9), (9, 130, 1100), (4, 2, 8)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let b: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
            let mut out = vec![f32::NAN; m * n];
            matmul_nt(&a, &b, m, n, k, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| a[i * k + t] as f64 * b[j * k + t] as f64).sum();
                    assert!((out[i * n + j] as f64 - want).abs() < 1e-3 * (1.0 + want.abs()));
                }
            }
        }
    }
}
