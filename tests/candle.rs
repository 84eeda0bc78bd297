//! The candle API (feature `candle`): every entry point against (1) the same core function run on
//! plain slices (must be bit-equal: the candle layer only reaches memory and checks arguments) and
//! (2) a float64 reference written here from the definitions, on random tensors of every float
//! dtype, contiguous and as strided views (narrow, transpose).

#![cfg(feature = "candle")]

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, WithDType};
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestRng};
use tvc_rs::candle as tc;
use tvc_rs::compress::{self as core_compress, Grid};
use tvc_rs::dtype::Float;
use tvc_rs::kv::{self as core_kv, Deltas, Rope, RopeConfig};

const CPU: Device = Device::Cpu;
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

// ---------------------------------------------------------------- tensors and views

/// How a test tensor is stored: as itself, as a `narrow` window of a larger tensor (padding on
/// every axis, filled with junk), or as the `transpose(0, 1)` of a tensor stored with its first
/// two axes swapped.
#[derive(Debug, Clone, Copy, PartialEq)]
enum View {
    Contiguous,
    Narrow,
    Transpose,
}

const VIEWS: [View; 3] = [View::Contiguous, View::Narrow, View::Transpose];

fn rng(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

fn random(rng: &mut TestRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn row_major_index(index: &[usize], shape: &[usize]) -> usize {
    index.iter().zip(shape).fold(0, |acc, (&i, &d)| acc * d + i)
}

/// Every multi-index of `shape`, row-major.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let total: usize = shape.iter().product();
    (0..total)
        .map(|mut flat| {
            let mut index = vec![0; shape.len()];
            for (i, &d) in shape.iter().enumerate().rev() {
                index[i] = flat % d;
                flat /= d;
            }
            index
        })
        .collect()
}

/// A tensor of `shape` and `dtype` holding `values` (row-major), stored as `view` says.
fn make(values: &[f64], shape: &[usize], dtype: DType, view: View, rng: &mut TestRng) -> Tensor {
    assert_eq!(values.len(), shape.iter().product::<usize>());
    let view = if view == View::Transpose && shape.len() < 2 {
        View::Narrow
    } else {
        view
    };
    match view {
        View::Contiguous => Tensor::from_vec(values.to_vec(), shape, &CPU)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        View::Narrow => {
            // One junk element before and two after on every axis.
            let big: Vec<usize> = shape.iter().map(|d| d + 3).collect();
            let mut data = random(rng, big.iter().product());
            for index in indices(shape) {
                let shifted: Vec<usize> = index.iter().map(|i| i + 1).collect();
                data[row_major_index(&shifted, &big)] = values[row_major_index(&index, shape)];
            }
            let mut t = Tensor::from_vec(data, big.as_slice(), &CPU)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for (axis, &d) in shape.iter().enumerate() {
                t = t.narrow(axis, 1, d).unwrap();
            }
            assert!(
                t.layout().start_offset() > 0,
                "a window inside the larger buffer"
            );
            t
        }
        View::Transpose => {
            let mut stored_shape = shape.to_vec();
            stored_shape.swap(0, 1);
            let mut data = vec![0.0; values.len()];
            for index in indices(shape) {
                let mut swapped = index.clone();
                swapped.swap(0, 1);
                data[row_major_index(&swapped, &stored_shape)] =
                    values[row_major_index(&index, shape)];
            }
            Tensor::from_vec(data, stored_shape.as_slice(), &CPU)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
        }
    }
}

/// The values a tensor holds (after rounding to its dtype), row-major, as f64.
fn values_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn values_t<T: WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

/// Absolute tolerance for values of magnitude about 1 computed in f32 and rounded to `dtype`.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2e-5,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: element {i} is {g}, the f64 reference says {w} (tol {tol})"
        );
    }
}

/// Bit-equal results of the candle API and the core on slices.
fn assert_same<T: WithDType + PartialEq + std::fmt::Debug>(
    candle: &Tensor,
    core: &[T],
    what: &str,
) {
    let got = values_t::<T>(candle);
    assert!(
        got == core,
        "{what}: the candle API differs from the core on slices"
    );
}

/// Runs `f` with the Rust element type of `dtype`.
macro_rules! with_type {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => unreachable!("{other:?}"),
        }
    };
}

fn err_msg<T: std::fmt::Debug>(r: candle_core::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------- compression

fn random_grids(rng: &mut TestRng) -> Vec<[usize; 3]> {
    (0..rng.random_range(1..=2usize))
        .map(|_| {
            [
                rng.random_range(1..=2usize),
                rng.random_range(1..=7usize),
                rng.random_range(1..=7usize),
            ]
        })
        .collect()
}

fn to_grids(g: &[[usize; 3]]) -> Vec<Grid> {
    g.iter().map(|&[t, h, w]| Grid::new(t, h, w)).collect()
}

/// kh x kw average pooling within each frame, edge windows over the cells they cover.
fn ref_pool(x: &[f64], dim: usize, grids: &[[usize; 3]], kh: usize, kw: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut start = 0;
    for &[t, h, w] in grids {
        for f in 0..t {
            for oh in 0..h.div_ceil(kh) {
                for ow in 0..w.div_ceil(kw) {
                    let mut acc = vec![0.0; dim];
                    let mut n = 0.0;
                    for r in oh * kh..((oh + 1) * kh).min(h) {
                        for c in ow * kw..((ow + 1) * kw).min(w) {
                            let token = start + (f * h + r) * w + c;
                            for (a, v) in acc.iter_mut().zip(&x[token * dim..(token + 1) * dim]) {
                                *a += v;
                            }
                            n += 1.0;
                        }
                    }
                    out.extend(acc.iter().map(|a| a / n));
                }
            }
        }
        start += t * h * w;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn pool_visual_tokens_matches_core_and_f64(seed in any::<u64>(), dim in 1usize..=9, kh in 1usize..=4, kw in 1usize..=4) {
        let mut rng = rng(seed);
        let grids = random_grids(&mut rng);
        let tokens: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let values = random(&mut rng, tokens * dim);
        for dtype in DTYPES {
            for view in VIEWS {
                let x = make(&values, &[tokens, dim], dtype, view, &mut rng);
                let stored = values_f64(&x);
                let (pooled, new_grids) = tc::pool_visual_tokens(&x, &grids, (kh, kw)).unwrap();
                let want_grids: Vec<[usize; 3]> = grids.iter().map(|&[t, h, w]| [t, h.div_ceil(kh), w.div_ceil(kw)]).collect();
                prop_assert_eq!(&new_grids, &want_grids);
                let count: usize = want_grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
                prop_assert_eq!(pooled.dims(), &[count, dim]);
                prop_assert_eq!(pooled.dtype(), dtype);
                assert_close(&values_f64(&pooled), &ref_pool(&stored, dim, &grids, kh, kw), tol(dtype), &format!("pool {dtype:?} {view:?}"));
                with_type!(dtype, T => {
                    let slice = values_t::<T>(&x);
                    let rows = tvc_rs::tensor::Strided::contiguous(&slice, &[tokens, dim]).unwrap();
                    let (core, _) = core_compress::cpu::pool_visual_tokens(&rows, &to_grids(&grids), kh, kw).unwrap();
                    assert_same(&pooled, &core, &format!("pool {dtype:?} {view:?}"));
                });
            }
        }
    }
}

/// Mean over (query token, query head) of softmax(scale q . k) over the keys (GQA).
fn ref_scores(
    q: &[f64],
    k: &[f64],
    q_tokens: usize,
    q_heads: usize,
    k_tokens: usize,
    kv_heads: usize,
    d: usize,
) -> Vec<f64> {
    let scale = 1.0 / (d as f64).sqrt();
    let group = q_heads / kv_heads;
    let mut out = vec![0.0; k_tokens];
    for qt in 0..q_tokens {
        for qh in 0..q_heads {
            let kh = qh / group;
            let logits: Vec<f64> = (0..k_tokens)
                .map(|kt| {
                    (0..d)
                        .map(|i| q[(qt * q_heads + qh) * d + i] * k[(kt * kv_heads + kh) * d + i])
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            for (o, l) in out.iter_mut().zip(&logits) {
                *o += (l - max).exp() / sum;
            }
        }
    }
    out.iter()
        .map(|o| o / (q_tokens * q_heads) as f64)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn visual_token_scores_matches_core_and_f64(seed in any::<u64>(), q_tokens in 1usize..=3, kv_heads in 1usize..=3,
                                                group in 1usize..=3, k_tokens in 1usize..=20, d in 1usize..=16) {
        let mut rng = rng(seed);
        let q_heads = kv_heads * group;
        let q = random(&mut rng, q_tokens * q_heads * d);
        let k = random(&mut rng, k_tokens * kv_heads * d);
        for dtype in DTYPES {
            for view in VIEWS {
                let qt = make(&q, &[q_tokens, q_heads, d], dtype, view, &mut rng);
                let kt = make(&k, &[k_tokens, kv_heads, d], dtype, view, &mut rng);
                let scores = tc::visual_token_scores(&qt, &kt, None, None).unwrap();
                prop_assert_eq!(scores.dtype(), DType::F32);
                let want = ref_scores(&values_f64(&qt), &values_f64(&kt), q_tokens, q_heads, k_tokens, kv_heads, d);
                assert_close(&values_f64(&scores), &want, 1e-5, &format!("scores {dtype:?} {view:?}"));
                with_type!(dtype, T => {
                    let (qs, ks) = (values_t::<T>(&qt), values_t::<T>(&kt));
                    let core = core_compress::cpu::visual_token_scores::<T, f32>(
                        &tvc_rs::tensor::Strided::contiguous(&qs, &[q_tokens, q_heads, d]).unwrap(),
                        &tvc_rs::tensor::Strided::contiguous(&ks, &[k_tokens, kv_heads, d]).unwrap(),
                        None, None).unwrap();
                    assert_same(&scores, &core, &format!("scores {dtype:?} {view:?}"));
                });
            }
        }
    }
}

/// The `keep` highest scores (ties to the lower index), in increasing index order.
fn ref_top(scores: &[f64], keep: usize) -> Vec<i64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    let mut kept: Vec<i64> = order[..keep.min(scores.len())]
        .iter()
        .map(|&i| i as i64)
        .collect();
    kept.sort();
    kept
}

/// Gather of `indices`, or with `merge` each dropped row averaged into its most cosine-similar
/// kept row (ties to the lower index), every kept row the mean of itself and its merged rows.
fn ref_prune(x: &[f64], dim: usize, indices: &[usize], merge: bool) -> Vec<f64> {
    let row = |i: usize| &x[i * dim..(i + 1) * dim];
    let mut sums: Vec<Vec<f64>> = indices.iter().map(|&i| row(i).to_vec()).collect();
    let mut counts = vec![1.0; indices.len()];
    if merge && !indices.is_empty() {
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        for dropped in (0..x.len() / dim).filter(|i| !indices.contains(i)) {
            let mut best = (f64::NEG_INFINITY, 0);
            for (slot, &kept) in indices.iter().enumerate() {
                let dot: f64 = row(dropped).iter().zip(row(kept)).map(|(a, b)| a * b).sum();
                let cos = dot / (norm(row(dropped)) * norm(row(kept))).max(1e-30);
                if cos > best.0 {
                    best = (cos, slot);
                }
            }
            for (s, v) in sums[best.1].iter_mut().zip(row(dropped)) {
                *s += v;
            }
            counts[best.1] += 1.0;
        }
    }
    sums.iter()
        .zip(&counts)
        .flat_map(|(s, c)| s.iter().map(move |v| v / c))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn select_and_prune_match_core_and_f64(seed in any::<u64>(), dim in 2usize..=8, keep in 0usize..=12, merge in any::<bool>()) {
        let mut rng = rng(seed);
        let grids = random_grids(&mut rng);
        let tokens: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let values = random(&mut rng, tokens * dim);
        let raw_scores: Vec<f64> = random(&mut rng, tokens).iter().map(|s| s.abs()).collect();
        for dtype in DTYPES {
            for view in VIEWS {
                let scores = make(&raw_scores, &[tokens], dtype, view, &mut rng);
                let stored_scores = values_f64(&scores);
                let scores_f32: Vec<f32> = stored_scores.iter().map(|&s| s as f32).collect();
                // select_tokens: top-k against the reference, every budget against the core
                let kept = tc::select_tokens(&scores, tc::Budget::keep(keep)).unwrap();
                prop_assert_eq!(kept.to_vec1::<i64>().unwrap(), ref_top(&stored_scores, keep));
                for rule in [core_compress::Rule::Keep(keep), core_compress::Rule::Ratio(0.3), core_compress::Rule::Mass(0.8)] {
                    let budget = tc::Budget::new(rule, 1, Some(10)).unwrap();
                    let got = tc::select_tokens(&scores, budget).unwrap();
                    let core: Vec<i64> = core_compress::cpu::select_tokens(&scores_f32, budget).unwrap().iter().map(|&i| i as i64).collect();
                    assert_same(&got, &core, &format!("select {budget:?} {dtype:?} {view:?}"));
                }
                // prune_visual_tokens from scores, with the grid cells
                let x = make(&values, &[tokens, dim], dtype, view, &mut rng);
                let stored = values_f64(&x);
                let pruned = tc::prune_visual_tokens(&x, tc::Keep::Scores { scores: &scores, budget: tc::Budget::keep(keep) }, Some(&grids), merge).unwrap();
                let want_indices = ref_top(&stored_scores, keep);
                prop_assert_eq!(pruned.indices.to_vec1::<i64>().unwrap(), want_indices.clone());
                let idx: Vec<usize> = want_indices.iter().map(|&i| i as usize).collect();
                assert_close(&values_f64(&pruned.tokens), &ref_prune(&stored, dim, &idx, merge), tol(dtype), &format!("prune merge={merge} {dtype:?} {view:?}"));
                // cells: (t, h, w) of each kept index within its own grid
                let mut want_cells = Vec::new();
                for &i in &idx {
                    let mut local = i;
                    for &[t, h, w] in &grids {
                        if local < t * h * w {
                            want_cells.extend([(local / (h * w)) as i64, (local % (h * w) / w) as i64, (local % w) as i64]);
                            break;
                        }
                        local -= t * h * w;
                    }
                }
                prop_assert_eq!(values_t::<i64>(pruned.cells.as_ref().unwrap()), want_cells);
                with_type!(dtype, T => {
                    let slice = values_t::<T>(&x);
                    let rows = tvc_rs::tensor::Strided::contiguous(&slice, &[tokens, dim]).unwrap();
                    let core = core_compress::cpu::prune_visual_tokens(&rows, &idx, merge).unwrap();
                    assert_same(&pruned.tokens, &core, &format!("prune {dtype:?} {view:?}"));
                });
                // from an index tensor (u32, as candle's argmax and arange give)
                let index_tensor = Tensor::from_vec(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), idx.len(), &CPU).unwrap();
                let by_index = tc::prune_visual_tokens(&x, tc::Keep::Indices(&index_tensor), None, merge).unwrap();
                prop_assert!(by_index.cells.is_none());
                prop_assert_eq!(values_f64(&by_index.tokens), values_f64(&pruned.tokens));
            }
        }
    }
}

// ---------------------------------------------------------------- KV cache

/// Frequency pair i's (t, h, w) component under `sections` (all t without).
fn components(rotary_dim: usize, sections: Option<&[usize]>) -> Vec<usize> {
    match sections {
        Some(s) => s
            .iter()
            .enumerate()
            .flat_map(|(j, &n)| std::iter::repeat_n(j % 3, n))
            .collect(),
        None => vec![0; rotary_dim / 2],
    }
}

/// `x` rotated by the position change `delta` (t, h, w), NeoX or GPT-J pairing, in f64.
fn ref_rotate(
    x: &[f64],
    delta: [i64; 3],
    theta: f64,
    rotary_dim: usize,
    interleaved: bool,
    sections: Option<&[usize]>,
) -> Vec<f64> {
    let comp = components(rotary_dim, sections);
    let half = rotary_dim / 2;
    let mut out = x.to_vec();
    for i in 0..half {
        let angle = delta[comp[i]] as f64 / theta.powf(2.0 * i as f64 / rotary_dim as f64);
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        out[a] = x[a] * angle.cos() - x[b] * angle.sin();
        out[b] = x[b] * angle.cos() + x[a] * angle.sin();
    }
    out
}

#[derive(Debug, Clone)]
struct RopeCase {
    theta: f64,
    head_dim: usize,
    rotary_dim: usize,
    interleaved: bool,
    sections: Option<Vec<usize>>,
}

impl RopeCase {
    fn rope(&self) -> Rope {
        Rope::new(
            RopeConfig::new(
                self.theta,
                self.head_dim,
                Some(self.rotary_dim),
                self.interleaved,
                self.sections.clone(),
            )
            .unwrap(),
        )
    }
    fn rotate(&self, x: &[f64], delta: [i64; 3]) -> Vec<f64> {
        ref_rotate(
            x,
            delta,
            self.theta,
            self.rotary_dim,
            self.interleaved,
            self.sections.as_deref(),
        )
    }
}

fn rope_case() -> impl Strategy<Value = RopeCase> {
    (
        1usize..=4,
        0usize..=2,
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![10000.0, 1e6]),
    )
        .prop_map(|(pairs, extra_pairs, interleaved, mrope, theta)| {
            let rotary_dim = 2 * (pairs + if mrope { 2 } else { 0 });
            let sections = mrope.then(|| {
                let half = rotary_dim / 2;
                vec![half - 2, 1, 1]
            });
            RopeCase {
                theta,
                head_dim: rotary_dim + 2 * extra_pairs,
                rotary_dim,
                interleaved,
                sections,
            }
        })
}

fn random_delta(rng: &mut TestRng, mrope: bool) -> [i64; 3] {
    let mut d = || rng.random_range(-3000i64..3000);
    if mrope {
        [d(), d(), d()]
    } else {
        let v = d();
        [v, v, v]
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn rerotate_keys_matches_core_and_f64(seed in any::<u64>(), case in rope_case(), tokens in 0usize..=6, heads in 1usize..=3, layers in 1usize..=2) {
        let mut rng = rng(seed);
        let mrope = case.sections.is_some();
        let deltas: Vec<[i64; 3]> = (0..tokens).map(|_| random_delta(&mut rng, mrope)).collect();
        let per_token: Vec<i64> = deltas.iter().map(|d| d[0]).collect();
        let d = case.head_dim;
        for dtype in DTYPES {
            for view in VIEWS {
                let keys: Vec<Tensor> = (0..layers).map(|_| make(&random(&mut rng, tokens * heads * d), &[tokens, heads, d], dtype, view, &mut rng)).collect();
                let before: Vec<Vec<f64>> = keys.iter().map(values_f64).collect();
                let deltas_arg = if mrope { Deltas::PerTokenThw(&deltas) } else { Deltas::PerToken(&per_token) };
                tc::rerotate_keys(&keys, deltas_arg, &case.rope()).unwrap();
                for (layer, (k, old)) in keys.iter().zip(&before).enumerate() {
                    let want: Vec<f64> = (0..tokens * heads).flat_map(|row| case.rotate(&old[row * d..(row + 1) * d], deltas[row / heads])).collect();
                    assert_close(&values_f64(k), &want, tol(dtype), &format!("rerotate layer {layer} {dtype:?} {view:?}"));
                    with_type!(dtype, T => {
                        let mut slice: Vec<T> = old.iter().map(|&v| T::from_f32(v as f32)).collect();
                        let strides = [(heads * d) as isize, d as isize, 1];
                        let mut views = vec![core_kv::StridedMut::new(&mut slice, 0, [tokens, heads, d], strides, "keys").unwrap()];
                        core_kv::cpu::rerotate_keys(&mut views, deltas_arg, &case.rope()).unwrap();
                        drop(views);
                        assert_same(k, &slice, &format!("rerotate {dtype:?} {view:?}"));
                    });
                }
            }
        }
    }
}

/// A `[batch, heads, seq, d]` cache layer stored as the view says; `Transpose` here stores it
/// `[batch, seq, heads, d]` and transposes axes 1 and 2 (a layout engines use), `Narrow` is a
/// window of a longer, wider buffer.
fn cache_layer(
    values: &[f64],
    shape: [usize; 4],
    dtype: DType,
    view: View,
    rng: &mut TestRng,
) -> Tensor {
    match view {
        View::Transpose => {
            let [b, h, s, d] = shape;
            let mut data = vec![0.0; values.len()];
            for index in indices(&shape) {
                data[row_major_index(&[index[0], index[2], index[1], index[3]], &[b, s, h, d])] =
                    values[row_major_index(&index, &shape)];
            }
            Tensor::from_vec(data, (b, s, h, d), &CPU)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        }
        other => make(values, &shape, dtype, other, rng),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn relocate_span_matches_core_and_f64(seed in any::<u64>(), case in rope_case(), seq in 0usize..=9, batch in 1usize..=2, heads in 1usize..=2, layers in 1usize..=2) {
        let mut rng = rng(seed);
        let mrope = case.sections.is_some();
        let start = rng.random_range(0..=seq);
        let end = rng.random_range(start..=seq);
        let moved = seq - end;
        let deltas: Vec<[i64; 3]> = (0..moved).map(|_| random_delta(&mut rng, mrope)).collect();
        let d = case.head_dim;
        let shape = [batch, heads, seq, d];
        let n = batch * heads * seq * d;
        for dtype in DTYPES {
            for view in VIEWS {
                let keys: Vec<Tensor> = (0..layers).map(|_| cache_layer(&random(&mut rng, n), shape, dtype, view, &mut rng)).collect();
                let values: Vec<Tensor> = (0..layers).map(|_| cache_layer(&random(&mut rng, n), shape, dtype, view, &mut rng)).collect();
                let (k0, v0): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (keys.iter().map(values_f64).collect(), values.iter().map(values_f64).collect());
                let deltas_arg = if mrope { Deltas::PerTokenThw(&deltas) } else { Deltas::Same(-((end - start) as i64)) };
                let new_len = tc::relocate_span(&keys, &values, start, end, None, deltas_arg, &case.rope()).unwrap();
                prop_assert_eq!(new_len, seq - (end - start));
                for l in 0..layers {
                    let (got_k, got_v) = (values_f64(&keys[l]), values_f64(&values[l]));
                    for bh in 0..batch * heads {
                        for pos in 0..new_len {
                            let at = |p: usize| (bh * seq + p) * d;
                            let (src, delta) = if pos < start { (pos, [0; 3]) } else {
                                let j = pos - start;
                                (end + j, if mrope { deltas[j] } else { [-((end - start) as i64); 3] })
                            };
                            let want_k = if pos < start { k0[l][at(src)..at(src) + d].to_vec() } else { case.rotate(&k0[l][at(src)..at(src) + d], delta) };
                            assert_close(&got_k[at(pos)..at(pos) + d], &want_k, tol(dtype), &format!("relocate keys {dtype:?} {view:?}"));
                            prop_assert_eq!(&got_v[at(pos)..at(pos) + d], &v0[l][at(src)..at(src) + d]);
                        }
                    }
                }
                with_type!(dtype, T => {
                    let to_t = |v: &Vec<f64>| -> Vec<T> { v.iter().map(|&x| T::from_f32(x as f32)).collect() };
                    let mut ks: Vec<Vec<T>> = k0.iter().map(to_t).collect();
                    let mut vs: Vec<Vec<T>> = v0.iter().map(to_t).collect();
                    let strides = [(heads * seq * d) as isize, (seq * d) as isize, d as isize, 1];
                    let mut core_layers: Vec<core_kv::LayerKv<T>> = ks.iter_mut().zip(vs.iter_mut()).map(|(k, v)| core_kv::LayerKv {
                        keys: core_kv::StridedMut::new(k, 0, shape, strides, "keys").unwrap(),
                        values: core_kv::StridedMut::new(v, 0, shape, strides, "values").unwrap(),
                    }).collect();
                    core_kv::cpu::relocate_span(&mut core_layers, start, end, None, deltas_arg, &case.rope()).unwrap();
                    drop(core_layers);
                    for l in 0..layers {
                        assert_same(&keys[l], &ks[l], &format!("relocate keys {dtype:?} {view:?}"));
                        assert_same(&values[l], &vs[l], &format!("relocate values {dtype:?} {view:?}"));
                    }
                });
            }
        }
    }

    #[test]
    fn relocate_spans_match_f64(seed in any::<u64>(), case in rope_case(), seq in 0usize..=12, n_spans in 0usize..=3, layers in 1usize..=2) {
        let mut rng = rng(seed);
        let mrope = case.sections.is_some();
        // Sorted, disjoint (possibly adjacent or empty) spans inside the cache.
        let mut cuts: Vec<usize> = (0..2 * n_spans).map(|_| rng.random_range(0..=seq)).collect();
        cuts.sort();
        let spans: Vec<(usize, usize)> = cuts.chunks(2).map(|c| (c[0], c[1])).collect();
        let evicted = |p: usize| spans.iter().any(|&(a, b)| a <= p && p < b);
        let first = spans.first().map_or(seq, |s| s.0);
        let sources: Vec<usize> = (first..seq).filter(|&p| !evicted(p)).collect();
        let deltas: Vec<[i64; 3]> = sources.iter().map(|_| random_delta(&mut rng, mrope)).collect();
        let plain: Vec<i64> = deltas.iter().map(|d| d[0]).collect();
        let d = case.head_dim;
        let shape = [1, 2, seq, d];
        let n = 2 * seq * d;
        for dtype in DTYPES {
            for view in VIEWS {
                let keys: Vec<Tensor> = (0..layers).map(|_| cache_layer(&random(&mut rng, n), shape, dtype, view, &mut rng)).collect();
                let values: Vec<Tensor> = (0..layers).map(|_| cache_layer(&random(&mut rng, n), shape, dtype, view, &mut rng)).collect();
                let (k0, v0): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (keys.iter().map(values_f64).collect(), values.iter().map(values_f64).collect());
                let deltas_arg = if mrope { Deltas::PerTokenThw(&deltas) } else { Deltas::PerToken(&plain) };
                let new_len = tc::relocate_spans(&keys, &values, &spans, None, deltas_arg, &case.rope()).unwrap();
                prop_assert_eq!(new_len, first + sources.len());
                for l in 0..layers {
                    let (got_k, got_v) = (values_f64(&keys[l]), values_f64(&values[l]));
                    for h in 0..2 {
                        let at = |p: usize| (h * seq + p) * d;
                        for pos in 0..new_len {
                            let (src, delta) = if pos < first { (pos, [0; 3]) } else { (sources[pos - first], deltas[pos - first]) };
                            let want_k = if pos < first { k0[l][at(src)..at(src) + d].to_vec() } else { case.rotate(&k0[l][at(src)..at(src) + d], delta) };
                            assert_close(&got_k[at(pos)..at(pos) + d], &want_k, tol(dtype), &format!("relocate_spans keys {dtype:?} {view:?} {spans:?}"));
                            prop_assert_eq!(&got_v[at(pos)..at(pos) + d], &v0[l][at(src)..at(src) + d]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn append_entries_matches_core_and_f64(seed in any::<u64>(), case in rope_case(), seq in 1usize..=8, heads in 1usize..=2, layers in 1usize..=2, rotate in any::<bool>()) {
        let mut rng = rng(seed);
        let mrope = case.sections.is_some();
        let n = rng.random_range(0..=seq);
        // n distinct positions in a random order
        let mut positions: Vec<i64> = (0..seq as i64).collect();
        for i in (1..positions.len()).rev() {
            positions.swap(i, rng.random_range(0..=i));
        }
        positions.truncate(n);
        let deltas: Vec<[i64; 3]> = (0..n).map(|_| random_delta(&mut rng, mrope)).collect();
        let d = case.head_dim;
        let (shape, new_shape) = ([1, heads, seq, d], [1, heads, n, d]);
        for dtype in DTYPES {
            for view in VIEWS {
                let keys: Vec<Tensor> = (0..layers).map(|_| cache_layer(&random(&mut rng, heads * seq * d), shape, dtype, view, &mut rng)).collect();
                let values: Vec<Tensor> = (0..layers).map(|_| cache_layer(&random(&mut rng, heads * seq * d), shape, dtype, view, &mut rng)).collect();
                let new_k: Vec<Tensor> = (0..layers).map(|_| cache_layer(&random(&mut rng, heads * n * d), new_shape, dtype, view, &mut rng)).collect();
                let new_v: Vec<Tensor> = (0..layers).map(|_| cache_layer(&random(&mut rng, heads * n * d), new_shape, dtype, view, &mut rng)).collect();
                let (k0, v0) = (keys.iter().map(values_f64).collect::<Vec<_>>(), values.iter().map(values_f64).collect::<Vec<_>>());
                let rope = case.rope();
                let deltas_arg = Deltas::PerTokenThw(&deltas);
                let per_token: Vec<i64> = deltas.iter().map(|d| d[0]).collect();
                let deltas_arg = if mrope { deltas_arg } else { Deltas::PerToken(&per_token) };
                tc::append_entries(&keys, &values, &new_k, &new_v, &positions, rotate.then_some((deltas_arg, &rope))).unwrap();
                for l in 0..layers {
                    let (nk, nv) = (values_f64(&new_k[l]), values_f64(&new_v[l]));
                    let (mut want_k, mut want_v) = (k0[l].clone(), v0[l].clone());
                    for h in 0..heads {
                        for (j, &p) in positions.iter().enumerate() {
                            let (dst, src) = ((h * seq + p as usize) * d, (h * n + j) * d);
                            let k = if rotate { case.rotate(&nk[src..src + d], deltas[j]) } else { nk[src..src + d].to_vec() };
                            want_k[dst..dst + d].copy_from_slice(&k);
                            want_v[dst..dst + d].copy_from_slice(&nv[src..src + d]);
                        }
                    }
                    assert_close(&values_f64(&keys[l]), &want_k, tol(dtype), &format!("append keys {dtype:?} {view:?}"));
                    prop_assert_eq!(values_f64(&values[l]), want_v);
                    with_type!(dtype, T => {
                        let to_t = |v: &[f64]| -> Vec<T> { v.iter().map(|&x| T::from_f32(x as f32)).collect() };
                        let (mut ks, mut vs) = (to_t(&k0[l]), to_t(&v0[l]));
                        let (nks, nvs) = (values_t::<T>(&new_k[l]), values_t::<T>(&new_v[l]));
                        let s = |len: usize| [(heads * len * d) as isize, (len * d) as isize, d as isize, 1];
                        let mut cache = vec![core_kv::LayerKv {
                            keys: core_kv::StridedMut::new(&mut ks, 0, shape, s(seq), "keys").unwrap(),
                            values: core_kv::StridedMut::new(&mut vs, 0, shape, s(seq), "values").unwrap(),
                        }];
                        let new = vec![core_kv::LayerKvRef {
                            keys: core_kv::Strided::new(&nks, 0, new_shape, s(n), "new_keys").unwrap(),
                            values: core_kv::Strided::new(&nvs, 0, new_shape, s(n), "new_values").unwrap(),
                        }];
                        core_kv::cpu::append_entries(&mut cache, &new, &positions, rotate.then_some((deltas_arg, &rope))).unwrap();
                        drop(cache);
                        assert_same(&keys[l], &ks, &format!("append keys {dtype:?} {view:?}"));
                        assert_same(&values[l], &vs, &format!("append values {dtype:?} {view:?}"));
                    });
                }
            }
        }
    }

    #[test]
    fn paged_reinject_matches_core_and_f64(seed in any::<u64>(), case in rope_case(), blocks in 1usize..=4, block_size in 1usize..=4, heads in 1usize..=2, moves in 0usize..=6) {
        let mut rng = rng(seed);
        let mrope = case.sections.is_some();
        let d = case.head_dim;
        let slots = blocks * block_size;
        // distinct destinations, sources anywhere (negative pairs skipped)
        let mut dst: Vec<i64> = (0..slots as i64).collect();
        for i in (1..dst.len()).rev() {
            dst.swap(i, rng.random_range(0..=i));
        }
        dst.truncate(moves.min(slots));
        let src: Vec<i64> = dst.iter().map(|_| if rng.random_range(0..5) == 0 { -1 } else { rng.random_range(0..slots as i64) }).collect();
        let deltas: Vec<[i64; 3]> = dst.iter().map(|_| random_delta(&mut rng, mrope)).collect();
        let per_token: Vec<i64> = deltas.iter().map(|d| d[0]).collect();
        let deltas_arg = if mrope { Deltas::PerTokenThw(&deltas) } else { Deltas::PerToken(&per_token) };
        // vLLM 0.33 NHD: stored [blocks, block_size, heads, 2d], seen as [blocks, heads, block_size, 2d]
        let shape = [blocks, heads, block_size, 2 * d];
        for dtype in DTYPES {
            for view in [View::Contiguous, View::Transpose, View::Narrow] {
                let cache = cache_layer(&random(&mut rng, slots * heads * 2 * d), shape, dtype, view, &mut rng);
                let before = values_f64(&cache);
                let moved = tc::paged_reinject(std::slice::from_ref(&cache), tc::PagedLayoutKind::Vllm, &src, &dst, deltas_arg, &case.rope()).unwrap();
                prop_assert_eq!(moved, src.iter().filter(|&&s| s >= 0).count());
                let at = |slot: usize, h: usize| ((slot / block_size * heads + h) * block_size + slot % block_size) * 2 * d;
                let mut want = before.clone();
                for (i, (&s, &t)) in src.iter().zip(&dst).enumerate() {
                    if s < 0 { continue; }
                    for h in 0..heads {
                        let (from, to) = (at(s as usize, h), at(t as usize, h));
                        let k = case.rotate(&before[from..from + d], deltas[i]);
                        want[to..to + d].copy_from_slice(&k);
                        want[to + d..to + 2 * d].copy_from_slice(&before[from + d..from + 2 * d]);
                    }
                }
                assert_close(&values_f64(&cache), &want, tol(dtype), &format!("paged {dtype:?} {view:?}"));
                with_type!(dtype, T => {
                    let mut data: Vec<T> = before.iter().map(|&x| T::from_f32(x as f32)).collect();
                    let strides = [(heads * block_size * 2 * d) as isize, (block_size * 2 * d) as isize, (2 * d) as isize, 1];
                    let layout = core_kv::PagedLayout::vllm(shape, strides, d, "cache").unwrap();
                    let mut caches = vec![core_kv::PagedCache::new(&mut data, 0, layout, "cache").unwrap()];
                    core_kv::cpu::paged_reinject(&mut caches, &src, &dst, deltas_arg, &case.rope()).unwrap();
                    drop(caches);
                    assert_same(&cache, &data, &format!("paged {dtype:?} {view:?}"));
                });
            }
        }
    }
}

/// Keys and values narrowed out of one `[2, ...]` buffer (one storage): reached through one
/// lock, written correctly, and refused when the two views overlap.
#[test]
fn keys_and_values_sharing_one_storage() {
    let mut rng = rng(7);
    let (heads, seq, d) = (2, 6, 4);
    let data = random(&mut rng, 2 * heads * seq * d);
    let kv = Tensor::from_vec(data.clone(), (2, 1, heads, seq, d), &CPU)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let data = values_f64(&kv);
    let (k, v) = (kv.i(0).unwrap(), kv.i(1).unwrap());
    let rope = Rope::new(RopeConfig::new(10000.0, d, None, false, None).unwrap());
    let len = tc::relocate_span(
        &[k.clone()],
        &[v.clone()],
        1,
        3,
        None,
        Deltas::Same(-2),
        &rope,
    )
    .unwrap();
    assert_eq!(len, 4);
    let (got_k, got_v) = (values_f64(&k), values_f64(&v));
    let half = heads * seq * d;
    for h in 0..heads {
        for pos in 0..len {
            let src = if pos < 1 { pos } else { pos + 2 };
            let delta = if pos < 1 { 0 } else { -2 };
            let (from, to) = ((h * seq + src) * d, (h * seq + pos) * d);
            let want = ref_rotate(&data[from..from + d], [delta; 3], 10000.0, d, false, None);
            assert_close(&got_k[to..to + d], &want, 1e-6, "shared storage keys");
            assert_eq!(&got_v[to..to + d], &data[half + from..half + from + d]);
        }
    }
    // The same tensor as keys and values: the core's overlap check names them.
    let msg = err_msg(tc::relocate_span(
        &[k.clone()],
        &[k.clone()],
        1,
        3,
        None,
        Deltas::Same(-2),
        &rope,
    ));
    assert!(msg.contains("keys") && msg.contains("values"), "{msg}");
}

// ---------------------------------------------------------------- M-RoPE positions

/// Qwen2-VL `get_rope_index` (transformers 5.24) for rows of text with images (no padding), from
/// its definition: text tokens count up; an image's tokens get (t, h, w) cell offsets from the
/// position after the preceding text; the text after it starts `max(h, w) / 2` further (the
/// merged grid's larger side); the delta is the largest position + 1 - seq.
fn ref_mrope(rows: &[Vec<i64>], grids: &[[i64; 3]], image_token: i64) -> (Vec<i64>, Vec<i64>) {
    let (batch, seq) = (rows.len(), rows[0].len());
    let mut out = vec![0i64; 3 * batch * seq];
    let mut deltas = Vec::new();
    let mut next_grid = 0;
    for (b, row) in rows.iter().enumerate() {
        let mut next = 0i64;
        let mut largest = -1i64;
        let mut col = 0;
        while col < seq {
            if row[col] == image_token {
                let [t, h, w] = grids[next_grid];
                next_grid += 1;
                let (lh, lw) = (h / 2, w / 2);
                for i in 0..(t * lh * lw) as usize {
                    let cell = [
                        i as i64 / (lh * lw),
                        i as i64 % (lh * lw) / lw,
                        i as i64 % lw,
                    ];
                    for c in 0..3 {
                        out[(c * batch + b) * seq + col + i] = next + cell[c];
                        largest = largest.max(next + cell[c]);
                    }
                }
                col += (t * lh * lw) as usize;
                next += lh.max(lw);
            } else {
                for c in 0..3 {
                    out[(c * batch + b) * seq + col] = next;
                }
                largest = largest.max(next);
                next += 1;
                col += 1;
            }
        }
        deltas.push(largest + 1 - seq as i64);
    }
    (out, deltas)
}

#[test]
fn mrope_position_ids_match_core_and_reference() {
    let mut rng = rng(11);
    let image = 151655i64;
    for case in 0..20 {
        let batch = rng.random_range(1..=3usize);
        let mut rows = Vec::new();
        let mut grids = Vec::new();
        for _ in 0..batch {
            let mut row: Vec<i64> = (0..rng.random_range(0..5))
                .map(|_| rng.random_range(0..1000))
                .collect();
            for _ in 0..rng.random_range(0..=2) {
                let g = [
                    rng.random_range(1..=2i64),
                    2 * rng.random_range(1..=3i64),
                    2 * rng.random_range(1..=3i64),
                ];
                row.extend(std::iter::repeat_n(
                    image,
                    (g[0] * g[1] * g[2] / 4) as usize,
                ));
                // at least one text token after an image: adjacent images would be one block
                row.extend((0..rng.random_range(1..4)).map(|_| rng.random_range(0..1000i64)));
                grids.push(g);
            }
            rows.push(row);
        }
        // pad every row to the same length with text (no mask: all kept)
        let seq = rows.iter().map(|r| r.len()).max().unwrap().max(1);
        for row in rows.iter_mut() {
            row.resize(seq, 0);
        }
        let flat: Vec<i64> = rows.concat();
        let thw: Vec<tc::GridThw> = grids
            .iter()
            .map(|g| tc::GridThw::new(g[0], g[1], g[2]))
            .collect();
        for ids_dtype in [DType::I64, DType::U32] {
            let ids = Tensor::from_vec(flat.clone(), (batch, seq), &CPU)
                .unwrap()
                .to_dtype(ids_dtype)
                .unwrap();
            let mask = Tensor::ones((batch, seq), DType::U8, &CPU).unwrap();
            let input = tc::MropeInput {
                attention_mask: Some(&mask),
                image_grid_thw: Some(&thw),
                ..Default::default()
            };
            let (pos, deltas) =
                tc::mrope_position_ids(&ids, input, &tc::MropeConfig::qwen2_vl()).unwrap();
            assert_eq!(pos.dims(), &[3, batch, seq]);
            let (want_pos, want_deltas) = ref_mrope(&rows, &grids, image);
            assert_eq!(values_t::<i64>(&pos), want_pos, "case {case}");
            assert_eq!(deltas.to_vec1::<i64>().unwrap(), want_deltas, "case {case}");
            let mut core_pos = vec![0i64; 3 * batch * seq];
            let mut core_deltas = vec![0i64; batch];
            let core_input = tvc_rs::rope::BatchInput::<i64, u8> {
                input_ids: &flat,
                batch,
                seq,
                kinds: tvc_rs::rope::TokenKinds::FromIds,
                attention_mask: None,
                image_grid_thw: Some(&thw),
                video_grid_thw: None,
                second_per_grid_ts: None,
            };
            tvc_rs::rope::batch_positions(
                &core_input,
                &tc::MropeConfig::qwen2_vl(),
                &mut core_pos,
                &mut core_deltas,
            )
            .unwrap();
            assert_eq!(values_t::<i64>(&pos), core_pos);
        }
    }
}

// ---------------------------------------------------------------- detector and schedule

#[test]
fn push_token_and_step_batch_match_the_core_monitor() {
    let Some(assets) = common::assets() else {
        return;
    };
    let detector = tc::Detector::from_path(&assets.join("qwen2-vl/tokenizer.json"), None).unwrap();
    let ids: Vec<u32> = detector
        .vocab()
        .encode("So 3 are left. Wait, let me double-check the image. Hmm, yes.")
        .unwrap();
    let schedule = tc::Schedule::new(0, 0, None, None).unwrap();
    let mut by_tensor = tc::Monitor::new(&detector, schedule, tc::ScheduleState::default());
    let mut by_core = by_tensor.clone();
    let mut batch = tc::MonitorBatch::new(std::sync::Arc::new(detector.clone()), 2);
    batch
        .add(0, schedule, tc::ScheduleState::default())
        .unwrap();
    batch
        .add(1, schedule, tc::ScheduleState::default())
        .unwrap();
    let mut from_batch = Vec::new();
    for &id in &ids {
        let got =
            tc::push_token(&mut by_tensor, &detector, &Tensor::new(id, &CPU).unwrap()).unwrap();
        let want = by_core.push(&detector, id as i64).unwrap();
        assert_eq!(got, want);
        // slot 1 skips this step (-1, as the core's step does)
        let step = Tensor::new(&[id as i64, -1], &CPU).unwrap();
        from_batch.extend(tc::step_batch(&mut batch, &step).unwrap());
    }
    let phrases: Vec<String> = by_tensor
        .calibrations
        .iter()
        .filter_map(|c| c.hit)
        .map(|h| detector.phrases()[h.phrase as usize].clone())
        .collect();
    assert_eq!(phrases, ["wait", "double-check", "hmm"]);
    assert_eq!(
        from_batch.iter().map(|(s, c)| (*s, *c)).collect::<Vec<_>>(),
        by_core
            .calibrations
            .iter()
            .map(|c| (0, *c))
            .collect::<Vec<_>>()
    );
    // errors name the argument
    let msg = err_msg(tc::push_token(
        &mut by_tensor,
        &detector,
        &Tensor::new(&[1.0f32], &CPU).unwrap(),
    ));
    assert!(msg.contains("token") && msg.contains("integer"), "{msg}");
    let msg = err_msg(tc::push_token(
        &mut by_tensor,
        &detector,
        &Tensor::new(&[1u32, 2], &CPU).unwrap(),
    ));
    assert!(msg.contains("token"), "{msg}");
}

// ---------------------------------------------------------------- argument errors

#[test]
fn errors_name_the_argument() {
    // f64 passes candle's float check (the KV functions take it) and the core's compression
    // refuses it, naming its dtypes.
    let x = Tensor::zeros((4, 3), DType::F64, &CPU).unwrap();
    let msg = err_msg(tc::pool_visual_tokens(&x, &[[1, 2, 2]], (2, 2)));
    assert!(
        msg.starts_with("x:") && msg.contains("float32, float16 or bfloat16, got float64"),
        "{msg}"
    );
    let x = Tensor::zeros((4, 3, 1), DType::F32, &CPU).unwrap();
    let msg = err_msg(tc::pool_visual_tokens(&x, &[[1, 2, 2]], (2, 2)));
    assert!(msg.starts_with("x:") && msg.contains("2-D"), "{msg}");
    let x = Tensor::zeros((4, 3), DType::F32, &CPU).unwrap();
    let msg = err_msg(tc::pool_visual_tokens(&x, &[[1, 2, 3]], (2, 2)));
    assert!(msg.contains("grid_thw"), "{msg}");
    let q = Tensor::zeros((1, 2, 4), DType::F32, &CPU).unwrap();
    let k = Tensor::zeros((5, 2, 4), DType::F16, &CPU).unwrap();
    let msg = err_msg(tc::visual_token_scores(&q, &k, None, None));
    assert!(msg.starts_with("keys:") && msg.contains("query"), "{msg}");
    let idx = Tensor::new(&[3i64, 1], &CPU).unwrap();
    let msg = err_msg(tc::prune_visual_tokens(
        &x,
        tc::Keep::Indices(&idx),
        None,
        false,
    ));
    assert!(msg.contains("indices"), "{msg}");
    let rope = Rope::new(RopeConfig::new(10000.0, 4, None, false, None).unwrap());
    let keys = Tensor::zeros((1, 2, 5, 4), DType::F32, &CPU).unwrap();
    let values = Tensor::zeros((1, 2, 5, 4), DType::BF16, &CPU).unwrap();
    let msg = err_msg(tc::relocate_span(
        &[keys.clone()],
        &[values],
        0,
        1,
        None,
        Deltas::Same(-1),
        &rope,
    ));
    assert!(
        msg.starts_with("values[0]:") && msg.contains("keys[0]"),
        "{msg}"
    );
    let msg = err_msg(tc::relocate_span(
        &[keys.clone()],
        &[keys.copy().unwrap()],
        2,
        9,
        None,
        Deltas::Same(-1),
        &rope,
    ));
    assert!(msg.contains("end"), "{msg}");
    // A broadcast view cannot be written in place, and nothing is written before the check.
    let row = Tensor::ones((1, 1, 1, 4), DType::F32, &CPU)
        .unwrap()
        .broadcast_as((1, 2, 5, 4))
        .unwrap();
    let msg = err_msg(tc::rerotate_keys(
        &[row.i(0).unwrap()],
        Deltas::Same(1),
        &rope,
    ));
    assert!(
        msg.starts_with("keys[0]:") && msg.contains("twice"),
        "{msg}"
    );
    let msg = err_msg(tc::paged_reinject(
        &[keys.clone()],
        tc::PagedLayoutKind::Vllm,
        &[0],
        &[1],
        Deltas::Same(0),
        &rope,
    ));
    assert!(msg.contains("kv_caches[0]"), "{msg}");
    let ids = Tensor::zeros((1, 3), DType::F32, &CPU).unwrap();
    let msg = err_msg(tc::mrope_position_ids(
        &ids,
        Default::default(),
        &tc::MropeConfig::qwen2_vl(),
    ));
    assert!(msg.starts_with("input_ids:"), "{msg}");
}
