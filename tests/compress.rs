//! Compression kernels against plain f64 references written here, on random inputs
//! (proptest): pooling by explicit window loops, scores by a direct softmax, selection by a full
//! sort, pruning and merging by direct loops; f16/bf16 compared with the reference computed from
//! the same rounded inputs; strided (row-sliced) inputs; empty inputs; bad input errors.

use half::{bf16, f16};
use proptest::prelude::*;
use tvc_rs::compress::cpu::{
    pool_visual_tokens, prune_visual_tokens, select_tokens, visual_token_scores,
};
use tvc_rs::compress::{check_grids, check_indices, pooled_grid, token_cells, Budget, Grid, Rule};
use tvc_rs::dtype::Float;
use tvc_rs::tensor::Strided;
use tvc_rs::Error;

/// Deterministic pseudo-random values in [-1, 1) (SplitMix64), so failures reproduce from the seed.
fn random_values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn rounded<T: Float>(values: &[f32]) -> Vec<T> {
    values.iter().map(|&v| T::from_f32(v)).collect()
}

fn as_f64<T: Float>(values: &[T]) -> Vec<f64> {
    values.iter().map(|v| v.to_f32() as f64).collect()
}

/// Tolerance of a result stored as T (relative to 1 + |reference|).
fn tolerance<T: Float>() -> f64 {
    match T::DTYPE {
        tvc_rs::dtype::DType::F16 => 1e-3,
        tvc_rs::dtype::DType::BF16 => 8e-3,
        _ => 2e-6,
    }
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

// ---------- pooling ----------

fn pool_reference(x: &[f64], dim: usize, grids: &[Grid], kh: usize, kw: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut start = 0;
    for g in grids {
        for t in 0..g.t {
            for oh in 0..g.h.div_ceil(kh) {
                for ow in 0..g.w.div_ceil(kw) {
                    let mut sum = vec![0f64; dim];
                    let mut count = 0;
                    for r in oh * kh..((oh + 1) * kh).min(g.h) {
                        for c in ow * kw..((ow + 1) * kw).min(g.w) {
                            let token = start + (t * g.h + r) * g.w + c;
                            for d in 0..dim {
                                sum[d] += x[token * dim + d];
                            }
                            count += 1;
                        }
                    }
                    out.extend(sum.iter().map(|s| s / count as f64));
                }
            }
        }
        start += g.tokens();
    }
    out
}

fn check_pool<T: Float>(seed: u64, grids: &[Grid], dim: usize, kh: usize, kw: usize) {
    let tokens: usize = grids.iter().map(Grid::tokens).sum();
    let x: Vec<T> = rounded(&random_values(seed, tokens * dim));
    let strided = Strided::contiguous(&x, &[tokens, dim]).unwrap();
    let (pooled, new_grids) = pool_visual_tokens(&strided, grids, kh, kw).unwrap();
    let want = pool_reference(&as_f64(&x), dim, grids, kh, kw);
    assert_close(&as_f64(&pooled), &want, tolerance::<T>(), "pooled");
    for (g, n) in grids.iter().zip(&new_grids) {
        assert_eq!(*n, Grid::new(g.t, g.h.div_ceil(kh), g.w.div_ceil(kw)));
        assert_eq!(*n, pooled_grid(*g, kh, kw));
    }
}

fn grids_strategy() -> impl Strategy<Value = Vec<Grid>> {
    prop::collection::vec(
        (1usize..3, 1usize..10, 1usize..10).prop_map(|(t, h, w)| Grid::new(t, h, w)),
        0..4,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pooling_matches_window_loops(seed: u64, grids in grids_strategy(), dim in 0usize..20, kh in 1usize..6, kw in 1usize..6) {
        check_pool::<f32>(seed, &grids, dim, kh, kw);
        check_pool::<f16>(seed, &grids, dim, kh, kw);
        check_pool::<bf16>(seed, &grids, dim, kh, kw);
    }

    /// Rows read through a stride (every other row of a wider matrix) pool like a packed copy.
    #[test]
    fn pooling_reads_row_strided_input(seed: u64, grids in grids_strategy(), dim in 1usize..12, k in 1usize..4) {
        let tokens: usize = grids.iter().map(Grid::tokens).sum();
        let wide = random_values(seed, tokens * 2 * (dim + 3));
        let strided = Strided::new(&wide, &[tokens, dim], &[2 * (dim + 3), 1]).unwrap();
        let packed: Vec<f32> = strided.to_contiguous().unwrap().into_owned();
        let (got, _) = pool_visual_tokens(&strided, &grids, k, k).unwrap();
        let (want, _) = pool_visual_tokens(&Strided::contiguous(&packed, &[tokens, dim]).unwrap(), &grids, k, k).unwrap();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn pooling_the_tvc_setting() {
    check_pool::<f32>(7, &[Grid::new(1, 36, 36), Grid::new(2, 13, 7)], 64, 4, 4);
    check_pool::<f32>(8, &[Grid::new(1, 5, 3)], 3, 2, 7);
}

#[test]
fn pooling_refuses_bad_arguments() {
    let x = vec![0f32; 12 * 2];
    let strided = Strided::contiguous(&x, &[12, 2]).unwrap();
    let err = pool_visual_tokens(&strided, &[Grid::new(1, 3, 4)], 0, 2).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("factor:")),
        "{err:?}"
    );
    let err = pool_visual_tokens(&strided, &[Grid::new(1, 3, 3)], 2, 2).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("grid_thw: the grids hold 9 tokens") && m.contains("x has 12 rows")),
        "{err:?}"
    );
    let err = pool_visual_tokens(&strided, &[Grid::new(1, 12, 0)], 2, 2).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m == "grid_thw[0] = (1, 12, 0): every grid dimension must be >= 1"),
        "{err:?}"
    );
    let err = check_grids(&[[1, 2, 2], [1, -3, 4]], 4, "x has 4 rows").unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("grid_thw[1] = (1, -3, 4)")),
        "{err:?}"
    );
    let empty: Vec<f32> = Vec::new();
    let (pooled, grids) =
        pool_visual_tokens(&Strided::contiguous(&empty, &[0, 5]).unwrap(), &[], 2, 2).unwrap();
    assert!(pooled.is_empty() && grids.is_empty());
}

// ---------- scores ----------

#[allow(clippy::too_many_arguments)]
fn scores_reference(
    q: &[f64],
    k: &[f64],
    lse: Option<&[f64]>,
    q_tokens: usize,
    q_heads: usize,
    k_tokens: usize,
    kv_heads: usize,
    d: usize,
    scale: f64,
) -> Vec<f64> {
    let group = q_heads / kv_heads;
    let mut out = vec![0f64; k_tokens];
    for qi in 0..q_tokens {
        for h in 0..q_heads {
            let g = h / group;
            let logits: Vec<f64> = (0..k_tokens)
                .map(|ki| {
                    scale
                        * (0..d)
                            .map(|e| q[(qi * q_heads + h) * d + e] * k[(ki * kv_heads + g) * d + e])
                            .sum::<f64>()
                })
                .collect();
            let probs: Vec<f64> = match lse {
                Some(lse) => logits
                    .iter()
                    .map(|s| (s - lse[qi * q_heads + h]).exp())
                    .collect(),
                None => {
                    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = logits.iter().map(|s| (s - max).exp()).sum();
                    logits.iter().map(|s| (s - max).exp() / sum).collect()
                }
            };
            for (o, p) in out.iter_mut().zip(probs) {
                *o += p;
            }
        }
    }
    out.iter()
        .map(|o| o / (q_tokens * q_heads) as f64)
        .collect()
}

fn check_scores<T: Float>(
    seed: u64,
    q_tokens: usize,
    kv_heads: usize,
    group: usize,
    k_tokens: usize,
    d: usize,
    with_lse: bool,
) {
    let q_heads = kv_heads * group;
    let q: Vec<T> = rounded(
        &random_values(seed, q_tokens * q_heads * d)
            .iter()
            .map(|v| v * 3.0)
            .collect::<Vec<_>>(),
    );
    let k: Vec<T> = rounded(
        &random_values(seed ^ 1, k_tokens * kv_heads * d)
            .iter()
            .map(|v| v * 3.0)
            .collect::<Vec<_>>(),
    );
    // A full-row lse: the visual logits plus some other keys' mass.
    let scale = 1.0 / (d as f64).sqrt();
    let lse: Option<Vec<f32>> = with_lse.then(|| {
        let extra = random_values(seed ^ 2, q_tokens * q_heads);
        let (qf, kf) = (as_f64(&q), as_f64(&k));
        (0..q_tokens * q_heads)
            .map(|row| {
                let (qi, h) = (row / q_heads, row % q_heads);
                let g = h / group;
                let total: f64 = (0..k_tokens)
                    .map(|ki| {
                        (scale
                            * (0..d)
                                .map(|e| qf[row * d + e] * kf[(ki * kv_heads + g) * d + e])
                                .sum::<f64>())
                        .exp()
                    })
                    .sum::<f64>();
                let _ = qi;
                (total + (2.0 + extra[row] as f64).exp()).ln() as f32
            })
            .collect()
    });
    let qs = Strided::contiguous(&q, &[q_tokens, q_heads, d]).unwrap();
    let ks = Strided::contiguous(&k, &[k_tokens, kv_heads, d]).unwrap();
    let lse_strided = lse
        .as_ref()
        .map(|l| Strided::contiguous(l, &[q_tokens, q_heads]).unwrap());
    let got = visual_token_scores(&qs, &ks, lse_strided.as_ref(), None).unwrap();
    let lse64: Option<Vec<f64>> = lse.as_ref().map(|l| l.iter().map(|&v| v as f64).collect());
    let want = scores_reference(
        &as_f64(&q),
        &as_f64(&k),
        lse64.as_deref(),
        q_tokens,
        q_heads,
        k_tokens,
        kv_heads,
        d,
        scale,
    );
    let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
    assert_close(&got, &want, 2e-5, "scores");
    if !with_lse && k_tokens > 0 {
        assert!((got.iter().sum::<f64>() - 1.0).abs() < 1e-4);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn scores_match_softmax(seed: u64, q_tokens in 1usize..5, kv_heads in 1usize..4, group in 1usize..9,
                            k_tokens in 0usize..40, d in 1usize..40, with_lse: bool) {
        check_scores::<f32>(seed, q_tokens, kv_heads, group, k_tokens, d, with_lse);
        check_scores::<bf16>(seed, q_tokens, kv_heads, group, k_tokens, d, with_lse);
        check_scores::<f16>(seed, q_tokens, kv_heads, group, k_tokens, d, with_lse);
    }
}

#[test]
fn scores_of_real_sizes() {
    check_scores::<f32>(3, 4, 4, 7, 300, 128, false);
    check_scores::<f32>(4, 2, 2, 6, 257, 80, true);
}

#[test]
fn scores_refuse_bad_shapes() {
    let q = vec![0f32; 2 * 6 * 4];
    let k = vec![0f32; 5 * 4 * 4];
    let qs = Strided::contiguous(&q, &[2, 6, 4]).unwrap();
    let ks = Strided::contiguous(&k, &[5, 4, 4]).unwrap();
    let err = visual_token_scores::<f32, f32>(&qs, &ks, None, None).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.contains("multiple of kv_heads")),
        "{err:?}"
    );
    let ks = Strided::contiguous(&k, &[5, 2, 8]).unwrap();
    let err = visual_token_scores::<f32, f32>(&qs, &ks, None, None).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("keys: head_dim 8")),
        "{err:?}"
    );
    let ks = Strided::contiguous(&k, &[10, 2, 4]).unwrap();
    let lse = vec![0f32; 6 * 2];
    let lse = Strided::contiguous(&lse, &[6, 2]).unwrap();
    let err = visual_token_scores(&qs, &ks, Some(&lse), None).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("lse: expected shape [q_tokens, q_heads] = (2, 6)")),
        "{err:?}"
    );
    let empty: Vec<f32> = Vec::new();
    let none = Strided::contiguous(&empty, &[0, 6, 4]).unwrap();
    let err = visual_token_scores::<f32, f32>(&none, &ks, None, None).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("query: expected at least one query token")),
        "{err:?}"
    );
    let no_keys = Strided::contiguous(&empty, &[0, 2, 4]).unwrap();
    assert!(visual_token_scores::<f32, f32>(&qs, &no_keys, None, None)
        .unwrap()
        .is_empty());
}

// ---------- selection ----------

fn select_reference(
    scores: &[f32],
    budget: Rule,
    min_keep: usize,
    max_keep: Option<usize>,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    let n = match budget {
        Rule::Keep(n) => n,
        Rule::Ratio(r) => (r * scores.len() as f64).round() as usize,
        Rule::Mass(m) => {
            let total: f64 = order.iter().map(|&i| scores[i] as f64).sum();
            let mut running = 0.0;
            let mut n = 0;
            for &i in &order {
                if running >= m * total {
                    break;
                }
                running += scores[i] as f64;
                n += 1;
            }
            n
        }
    };
    let n = n
        .max(min_keep)
        .min(max_keep.unwrap_or(usize::MAX))
        .min(scores.len());
    let mut kept = order[..n].to_vec();
    kept.sort();
    kept
}

/// The CPU selection with a checked budget.
fn select(
    scores: &[f32],
    rule: Rule,
    min_keep: usize,
    max_keep: Option<usize>,
) -> Result<Vec<usize>, Error> {
    select_tokens(scores, Budget::new(rule, min_keep, max_keep)?)
}

fn scores_strategy() -> impl Strategy<Value = Vec<f32>> {
    // Few distinct values so that ties are common.
    prop::collection::vec(
        prop_oneof![(0u8..6).prop_map(|v| v as f32 / 4.0), 0f32..2.0],
        0..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn selection_matches_a_full_sort(scores in scores_strategy(), keep in 0usize..70, ratio in 0f64..=1.0,
                                     mass in 0f64..=1.0, min_keep in 0usize..5, extra in prop::option::of(0usize..40)) {
        let max_keep = extra.map(|e| e + min_keep);
        for budget in [Rule::Keep(keep), Rule::Ratio(ratio), Rule::Mass(mass)] {
            let got = select(&scores, budget, min_keep, max_keep).unwrap();
            prop_assert_eq!(&got, &select_reference(&scores, budget, min_keep, max_keep), "{:?}", budget);
            prop_assert!(got.windows(2).all(|w| w[0] < w[1]));
        }
    }
}

#[test]
fn selection_refuses_nan_and_bad_budgets() {
    let err = select(&[0.1, f32::NAN], Rule::Keep(1), 1, None).unwrap_err();
    assert_eq!(
        err,
        Error::Value("scores[1] is NaN: scores must not contain NaN".into())
    );
    let err = select(&[0.1, -0.2], Rule::Mass(0.5), 1, None).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("scores[1] = -0.2: mass selection")),
        "{err:?}"
    );
    assert!(select(&[0.1, -0.2], Rule::Keep(1), 1, None).is_ok());
    let err = select(&[0.1], Rule::Ratio(1.5), 1, None).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("ratio:")),
        "{err:?}"
    );
    let err = select(&[0.1], Rule::Keep(1), 3, Some(2)).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("min_keep (3)")),
        "{err:?}"
    );
    assert!(select(&[], Rule::Keep(3), 1, None).unwrap().is_empty());
    // Ratio rounding: halves up, 0.1 * 30 = 3.0000000000000004 stays 3.
    let thirty = vec![1.0f32; 30];
    assert_eq!(select(&thirty, Rule::Ratio(0.1), 0, None).unwrap().len(), 3);
    assert_eq!(
        select(&[1.0, 1.0, 1.0], Rule::Ratio(0.5), 0, None).unwrap(),
        vec![0, 1]
    );
}

// ---------- pruning and merging ----------

/// The merged rows, or `None` when some dropped token is (nearly) equally similar to two kept
/// ones: then f32 rounding may pick either, and the case says nothing.
fn merge_reference(x: &[f64], dim: usize, kept: &[usize]) -> Option<Vec<f64>> {
    let tokens = x.len() / dim;
    let row = |i: usize| &x[i * dim..(i + 1) * dim];
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
    let mut sums: Vec<Vec<f64>> = kept.iter().map(|&k| row(k).to_vec()).collect();
    let mut sizes = vec![1usize; kept.len()];
    for j in (0..tokens).filter(|j| !kept.contains(j)) {
        let sims: Vec<f64> = kept
            .iter()
            .map(|&k| {
                row(j).iter().zip(row(k)).map(|(a, b)| a * b).sum::<f64>()
                    / (norm(row(j)) * norm(row(k)))
            })
            .collect();
        let best = (0..kept.len()).fold(0, |b, i| if sims[i] > sims[b] { i } else { b });
        if (0..kept.len()).any(|i| i != best && sims[best] - sims[i] < 1e-5) {
            return None;
        }
        for (s, v) in sums[best].iter_mut().zip(row(j)) {
            *s += v;
        }
        sizes[best] += 1;
    }
    Some(
        sums.iter()
            .zip(&sizes)
            .flat_map(|(s, &n)| s.iter().map(move |v| v / n as f64))
            .collect(),
    )
}

/// Returns false when the case was skipped (a near-tie in the similarities).
fn check_prune<T: Float>(
    seed: u64,
    tokens: usize,
    dim: usize,
    keep_mask: &[bool],
    merge: bool,
) -> bool {
    let x: Vec<T> = rounded(&random_values(seed, tokens * dim));
    let kept: Vec<usize> = (0..tokens).filter(|&i| keep_mask[i]).collect();
    let strided = Strided::contiguous(&x, &[tokens, dim]).unwrap();
    let got = prune_visual_tokens(&strided, &kept, merge).unwrap();
    let xf = as_f64(&x);
    let want: Vec<f64> = if merge && !kept.is_empty() && dim > 0 {
        match merge_reference(&xf, dim, &kept) {
            Some(want) => want,
            None => return false,
        }
    } else {
        kept.iter()
            .flat_map(|&k| xf[k * dim..(k + 1) * dim].to_vec())
            .collect()
    };
    assert_close(&as_f64(&got), &want, tolerance::<T>(), "pruned");
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, max_global_rejects: 4096, ..ProptestConfig::default() })]

    #[test]
    fn pruning_and_merging_match_direct_loops(seed: u64, mask in prop::collection::vec(any::<bool>(), 0..50),
                                              dim in 0usize..24, merge: bool) {
        // Near-ties (certain in 1-D, where every cosine is +-1) are skipped: rounding decides them.
        prop_assume!(check_prune::<f32>(seed, mask.len(), dim, &mask, merge));
        check_prune::<bf16>(seed, mask.len(), dim, &mask, false);
        check_prune::<f16>(seed, mask.len(), dim, &mask, false);
        check_prune::<bf16>(seed, mask.len(), dim, &mask, merge);
        check_prune::<f16>(seed, mask.len(), dim, &mask, merge);
    }
}

#[test]
fn merging_of_large_rows() {
    let mask: Vec<bool> = (0..70).map(|i| i % 3 == 0).collect();
    assert!(check_prune::<f32>(21, 70, 1100, &mask, true));
    assert!(check_prune::<f16>(12, 70, 600, &mask, true));
    assert!(check_prune::<bf16>(13, 70, 600, &mask, true));
}

#[test]
fn indices_are_checked() {
    assert_eq!(check_indices(&[0, 2, 5], 6).unwrap(), vec![0, 2, 5]);
    let err = check_indices(&[0, 6], 6).unwrap_err();
    assert_eq!(
        err,
        Error::Index("indices[1] = 6 is out of range for 6 tokens (the rows of x)".into())
    );
    let err = check_indices(&[-1], 6).unwrap_err();
    assert!(matches!(err, Error::Index(_)));
    let err = check_indices(&[1, 1], 6).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.contains("repeats")),
        "{err:?}"
    );
    let err = check_indices(&[3, 1], 6).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("indices must be sorted")),
        "{err:?}"
    );
    let x = vec![0f32; 12];
    let strided = Strided::contiguous(&x, &[6, 2]).unwrap();
    assert!(matches!(
        prune_visual_tokens(&strided, &[2, 1], false),
        Err(Error::Value(_))
    ));
    assert!(matches!(
        prune_visual_tokens(&strided, &[7], true),
        Err(Error::Index(_))
    ));
}

#[test]
fn cells_of_kept_tokens() {
    let grids = [Grid::new(1, 2, 3), Grid::new(2, 2, 2)];
    let cells = token_cells(&grids, &[0, 4, 5, 6, 11, 13]).unwrap();
    assert_eq!(
        cells,
        vec![
            [0, 0, 0],
            [0, 1, 1],
            [0, 1, 2],
            [0, 0, 0],
            [1, 0, 1],
            [1, 1, 1]
        ]
    );
    assert!(matches!(token_cells(&grids, &[14]), Err(Error::Index(_))));
}

// ---------- the operations on tensor views (one per operation, any device) ----------

mod views {
    use super::*;
    use tvc_rs::compress::{self as ops, HostOnly, KeepFrom, Output};
    use tvc_rs::dtype::DType;
    use tvc_rs::tensor::{Device, OwnedTensor, TensorView};

    fn host(out: Output<std::convert::Infallible>) -> OwnedTensor {
        let Output::Host(out) = out;
        out
    }

    fn f64s(out: &OwnedTensor) -> Vec<f64> {
        out.as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect()
    }

    fn rows(grids: &[Grid]) -> Vec<[i64; 3]> {
        grids
            .iter()
            .map(|g| [g.t as i64, g.h as i64, g.w as i64])
            .collect()
    }

    /// A view that says it lives on `device` (never read: the checks refuse it first).
    fn on(device: Device, name: &str, data: &[f32], shape: &[usize]) -> TensorView<'static> {
        let strides = tvc_rs::tensor::contiguous_strides(shape);
        // SAFETY: the data is leaked (lives for 'static) and holds the shape's elements.
        let data: &'static [f32] = Box::leak(data.to_vec().into_boxed_slice());
        unsafe {
            TensorView::from_raw_parts(
                name,
                data.as_ptr() as *mut u8,
                DType::F32,
                shape.to_vec(),
                strides,
                device,
                false,
                false,
            )
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn operations_on_cpu_views_match_the_references(seed: u64, grids in grids_strategy(), dim in 1usize..12,
                                                         k in 1usize..4, ratio in 0f64..=1.0, merge: bool) {
            let tokens: usize = grids.iter().map(Grid::tokens).sum();
            let x = random_values(seed, tokens * dim);
            let xv = TensorView::from_slice("x", &x, &[tokens, dim]).unwrap();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();

            let (pooled, new_grids) = ops::pool_visual_tokens(&xv, &rows(&grids), (k, k), &HostOnly).unwrap();
            let pooled = host(pooled);
            prop_assert_eq!(new_grids.clone(), grids.iter().map(|&g| pooled_grid(g, k, k)).collect::<Vec<_>>());
            assert_close(&f64s(&pooled), &pool_reference(&x64, dim, &grids, k, k), 1e-5, "pool");

            // Scores of the tokens as keys of one head, queried by two of the tokens.
            let q_tokens = tokens.min(2);
            let keys = TensorView::from_slice("keys", &x, &[tokens, 1, dim]).unwrap();
            let query = TensorView::from_slice("query", &x[..q_tokens * dim], &[q_tokens, 1, dim]).unwrap();
            if q_tokens > 0 {
                let scores = host(ops::visual_token_scores(&query, &keys, None, None, &HostOnly).unwrap());
                let want = scores_reference(&x64[..q_tokens * dim], &x64, None, q_tokens, 1, tokens, 1, dim,
                                            1.0 / (dim as f64).sqrt());
                assert_close(&f64s(&scores), &want, 1e-5, "scores");
            }

            let scores: Vec<f32> = x.iter().step_by(dim).map(|v| v.abs()).collect();
            let sv = TensorView::from_slice("scores", &scores, &[tokens]).unwrap();
            let budget = Budget::new(Rule::Ratio(ratio), 1, None).unwrap();
            let kept = host(ops::select_tokens(&sv, budget, &HostOnly).unwrap());
            let want = select_reference(&scores, Rule::Ratio(ratio), 1, None);
            prop_assert_eq!(kept.as_slice::<i64>().unwrap().to_vec(), want.iter().map(|&i| i as i64).collect::<Vec<_>>());

            let pruned = ops::prune_visual_tokens(&xv, KeepFrom::Scores((&sv, budget)), Some(&rows(&grids)), merge,
                                                  &HostOnly).unwrap();
            prop_assert_eq!(host(pruned.indices).as_slice::<i64>().unwrap().to_vec(),
                            want.iter().map(|&i| i as i64).collect::<Vec<_>>());
            let cells = host(pruned.cells.unwrap());
            let want_cells: Vec<i64> = token_cells(&grids, &want).unwrap().into_iter().flatten().collect();
            prop_assert_eq!(cells.as_slice::<i64>().unwrap().to_vec(), want_cells);
            let tokens_out = f64s(&host(pruned.tokens));
            let want_rows: Option<Vec<f64>> = if merge {
                merge_reference(&x64, dim, &want)
            } else {
                Some(want.iter().flat_map(|&i| x64[i * dim..(i + 1) * dim].to_vec()).collect())
            };
            if let Some(want_rows) = want_rows {
                assert_close(&tokens_out, &want_rows, 1e-5, "prune");
            }
        }
    }

    #[test]
    fn budgets_are_checked_when_made_naming_the_argument() {
        let err = |r: Result<Budget, Error>| match r.unwrap_err() {
            Error::Value(m) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            err(Budget::from_args(Some(1), Some(0.5), None, 1, None)),
            "keep, ratio, mass: give exactly one of them, got keep and ratio"
        );
        assert_eq!(
            err(Budget::from_args(None, None, None, 1, None)),
            "keep, ratio, mass: give exactly one of them, got none"
        );
        assert_eq!(
            err(Budget::from_args(Some(-1), None, None, 1, None)),
            "keep: expected an int >= 0, got -1"
        );
        assert_eq!(
            err(Budget::from_args(None, None, Some(0.5), -2, None)),
            "min_keep: expected an int >= 0, got -2"
        );
        assert_eq!(
            err(Budget::from_args(None, None, Some(0.5), 0, Some(-3))),
            "max_keep: expected an int >= 0, got -3"
        );
        assert!(err(Budget::from_args(None, Some(1.5), None, 0, None)).starts_with("ratio:"));
        assert!(err(Budget::from_args(None, None, Some(-0.1), 0, None)).starts_with("mass:"));
        assert!(err(Budget::from_args(Some(2), None, None, 3, Some(2))).starts_with("min_keep (3)"));
        let budget = Budget::from_args(None, Some(0.5), None, 2, Some(3)).unwrap();
        assert_eq!(
            (budget.rule(), budget.min_keep(), budget.max_keep()),
            (Rule::Ratio(0.5), 2, Some(3))
        );
        assert_eq!(
            [0, 2, 5, 10].map(|n| budget.count(n)),
            [Some(0), Some(2), Some(3), Some(3)]
        );
        assert_eq!(
            Budget::new(Rule::Mass(0.5), 0, None).unwrap().count(4),
            None
        );
    }

    #[test]
    fn tensors_on_different_devices_are_refused() {
        let data = [0.5f32; 24];
        let cpu = |name: &str, shape: &[usize]| {
            on(Device::Cpu, name, &data[..shape.iter().product()], shape)
        };
        let gpu = |name: &str, shape: &[usize]| {
            on(
                Device::Cuda(0),
                name,
                &data[..shape.iter().product()],
                shape,
            )
        };
        let msg = |e: &Error| e.to_string();
        let e = ops::visual_token_scores(
            &cpu("query", &[1, 2, 4]),
            &gpu("keys", &[3, 2, 4]),
            None,
            None,
            &HostOnly,
        )
        .unwrap_err();
        assert!(msg(&e)
            .contains("keys: expected a CPU tensor like the other arguments, got one on cuda:0"),);
        let e = ops::visual_token_scores(
            &gpu("query", &[1, 2, 4]),
            &cpu("keys", &[3, 2, 4]),
            None,
            None,
            &HostOnly,
        )
        .unwrap_err();
        assert!(msg(&e)
            .contains("keys: expected a tensor on cuda:0 (the device of query), got one on cpu"));
        // A CUDA tensor without a device allocator: said, nothing launched.
        let e = ops::pool_visual_tokens(&gpu("x", &[4, 2]), &[[1, 2, 2]], (2, 2), &HostOnly)
            .unwrap_err();
        assert!(msg(&e).contains("x: a CUDA tensor needs a device allocator"));
        // Argument checks come first, on every device.
        let e = ops::pool_visual_tokens(&gpu("x", &[4, 2]), &[[1, 2, 3]], (2, 2), &HostOnly)
            .unwrap_err();
        assert!(msg(&e).contains("grid_thw: the grids hold 6 tokens"), "{e}");
        let e =
            ops::select_tokens(&gpu("scores", &[2, 2]), Budget::keep(1), &HostOnly).unwrap_err();
        assert!(
            msg(&e).contains("scores: expected a 1-D tensor [tokens]"),
            "{e}"
        );
        let other = on(
            Device::Other {
                device_type: 8,
                id: 0,
            },
            "x",
            &data[..8],
            &[4, 2],
        );
        let e = ops::prune_visual_tokens(&other, KeepFrom::Indices(&[0]), None, false, &HostOnly)
            .unwrap_err();
        assert!(
            msg(&e).contains("x: tensors on DLPack device type 8"),
            "{e}"
        );
    }
}
