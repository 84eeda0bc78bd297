//! KV-cache re-injection against an f64 reference written from scratch: keys built at positions
//! p with a reference RoPE, re-rotated by d, must equal the keys built at p + d.

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::TestRng;
use tvc_rs::dtype::Float;
use tvc_rs::kv::cpu::{
    append_entries, paged_reinject, relocate_span, relocate_spans, rerotate_keys,
};
use tvc_rs::kv::*;
use tvc_rs::Error;

// ---------------------------------------------------------------- reference (f64, from scratch)

struct RefRope {
    theta: f64,
    rotary_dim: usize,
    interleaved: bool,
    /// Which position component (t, h, w) turns each frequency pair.
    comp: Vec<usize>,
}

impl RefRope {
    fn new(theta: f64, rotary_dim: usize, interleaved: bool, sections: Option<&[usize]>) -> Self {
        let mut comp = Vec::new();
        match sections {
            Some(s) => {
                for (j, &len) in s.iter().enumerate() {
                    comp.extend(std::iter::repeat_n(j % 3, len));
                }
            }
            None => comp.resize(rotary_dim / 2, 0),
        }
        assert_eq!(comp.len(), rotary_dim / 2);
        Self {
            theta,
            rotary_dim,
            interleaved,
            comp,
        }
    }

    /// `x` rotated to position `pos` (t, h, w); dims past rotary_dim untouched.
    fn apply(&self, x: &[f64], pos: [i64; 3]) -> Vec<f64> {
        let mut out = x.to_vec();
        let half = self.rotary_dim / 2;
        for i in 0..half {
            let freq = 1.0 / self.theta.powf(2.0 * i as f64 / self.rotary_dim as f64);
            let angle = pos[self.comp[i]] as f64 * freq;
            let (a, b) = if self.interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            out[a] = x[a] * angle.cos() - x[b] * angle.sin();
            out[b] = x[b] * angle.cos() + x[a] * angle.sin();
        }
        out
    }
}

fn rand_vec(rng: &mut TestRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Tolerance per element for |x| <= ~1.4 after rounding to T.
fn tol<T: Float>() -> f64 {
    match T::DTYPE {
        tvc_rs::dtype::DType::F32 => 2e-6,
        tvc_rs::dtype::DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

fn to_t<T: Float>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x as f32)).collect()
}

fn max_err<T: Float>(got: &[T], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (g.to_f32() as f64 - w).abs())
        .fold(0.0, f64::max)
}

fn rope_of(
    theta: f64,
    head_dim: usize,
    rotary_dim: usize,
    interleaved: bool,
    sections: Option<Vec<usize>>,
) -> Rope {
    Rope::new(RopeConfig::new(theta, head_dim, Some(rotary_dim), interleaved, sections).unwrap())
}

// ---------------------------------------------------------------- strategies

#[derive(Debug, Clone)]
struct Case {
    head_dim: usize,
    rotary_dim: usize,
    interleaved: bool,
    sections: Option<Vec<usize>>,
    theta: f64,
    tokens: usize,
    heads: usize,
    seed: u64,
    big: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=5,
        0usize..=3,
        any::<bool>(),
        any::<bool>(),
        0usize..=12,
        0usize..=4,
        any::<u64>(),
        any::<bool>(),
        prop::sample::select(vec![10000.0, 1e6, 500.0]),
    )
        .prop_flat_map(
            |(half_quarters, extra, interleaved, mrope, tokens, heads, seed, big, theta)| {
                let rotary_half = 4 * half_quarters + extra; // 4..=23 pairs
                let rotary_dim = 2 * rotary_half;
                let head_dim_extra = 0usize..=6;
                let sections = if mrope {
                    // Three sections (sometimes more) summing to rotary_dim / 2.
                    (0..=rotary_half, 0..=rotary_half, 0usize..=1)
                        .prop_map(move |(a, b, four)| {
                            let (a, b) = (a.min(b), a.max(b));
                            let mut s = vec![a, b - a, rotary_half - b];
                            if four == 1 && s[2] > 1 {
                                let last = s.pop().unwrap();
                                s.push(last / 2);
                                s.push(last - last / 2);
                            }
                            Some(s)
                        })
                        .boxed()
                } else {
                    Just(None).boxed()
                };
                (head_dim_extra, sections).prop_map(move |(he, sections)| Case {
                    head_dim: rotary_dim + he,
                    rotary_dim,
                    interleaved,
                    sections,
                    theta,
                    tokens,
                    heads,
                    seed,
                    big,
                })
            },
        )
}

fn positions_and_deltas(rng: &mut TestRng, case: &Case) -> (Vec<[i64; 3]>, Vec<[i64; 3]>) {
    let span = if case.big { 70_000 } else { 300 };
    let mut pos = Vec::new();
    let mut delta = Vec::new();
    for _ in 0..case.tokens {
        let p: [i64; 3] = if case.sections.is_some() {
            [
                rng.random_range(0..span),
                rng.random_range(0..span),
                rng.random_range(0..span),
            ]
        } else {
            let p = rng.random_range(0..span);
            [p; 3]
        };
        let d: [i64; 3] = if case.sections.is_some() {
            [
                rng.random_range(-span..span),
                rng.random_range(-span..span),
                rng.random_range(-span..span),
            ]
        } else {
            let d = rng.random_range(-span..span);
            [d; 3]
        };
        pos.push(p);
        delta.push(d);
    }
    (pos, delta)
}

fn add(p: [i64; 3], d: [i64; 3]) -> [i64; 3] {
    [p[0] + d[0], p[1] + d[1], p[2] + d[2]]
}

/// Keys `[tokens, heads, head_dim]` of random base vectors built at `pos`, re-rotated by `delta`:
/// compared with the reference at `pos + delta` (f32), and with the stored keys rotated by
/// `delta` in f64 (every dtype).
fn check_rerotate<T: Float>(case: &Case) {
    let mut rng = TestRng::from_seed(
        proptest::test_runner::RngAlgorithm::ChaCha,
        &case.seed.to_le_bytes().repeat(4),
    );
    let (pos, delta) = positions_and_deltas(&mut rng, case);
    let reference = RefRope::new(
        case.theta,
        case.rotary_dim,
        case.interleaved,
        case.sections.as_deref(),
    );
    let rope = rope_of(
        case.theta,
        case.head_dim,
        case.rotary_dim,
        case.interleaved,
        case.sections.clone(),
    );
    let (t, h, d) = (case.tokens, case.heads, case.head_dim);
    let mut keys_f64 = Vec::new();
    let mut moved_f64 = Vec::new();
    let mut want = Vec::new();
    for ti in 0..t {
        for _ in 0..h {
            let x = rand_vec(&mut rng, d);
            keys_f64.extend(reference.apply(&x, pos[ti]));
            want.extend(reference.apply(&x, add(pos[ti], delta[ti])));
        }
    }
    let mut keys: Vec<T> = to_t(&keys_f64);
    for ti in 0..t {
        for hi in 0..h {
            let row: Vec<f64> = keys[(ti * h + hi) * d..][..d]
                .iter()
                .map(|v| v.to_f32() as f64)
                .collect();
            moved_f64.extend(reference.apply(&row, delta[ti]));
        }
    }
    let deltas = if case.sections.is_some() {
        Deltas::PerTokenThw(&delta)
    } else {
        let flat: Vec<i64> = delta.iter().map(|d| d[0]).collect();
        let mut view = StridedMut::new(
            &mut keys,
            0,
            [t, h, d],
            [(h * d) as isize, d as isize, 1],
            "keys",
        )
        .unwrap();
        rerotate_keys(
            std::slice::from_mut(&mut view),
            Deltas::PerToken(&flat),
            &rope,
        )
        .unwrap();
        assert_close(&keys, &moved_f64, &want);
        return;
    };
    let mut view = StridedMut::new(
        &mut keys,
        0,
        [t, h, d],
        [(h * d) as isize, d as isize, 1],
        "keys",
    )
    .unwrap();
    rerotate_keys(std::slice::from_mut(&mut view), deltas, &rope).unwrap();
    assert_close(&keys, &moved_f64, &want);
}

fn assert_close<T: Float>(got: &[T], moved_from_stored: &[f64], from_scratch: &[f64]) {
    // Against the stored keys rotated in f64: the kernel's own error, about one rounding of T.
    let e1 = max_err(got, moved_from_stored);
    assert!(
        e1 <= tol::<T>(),
        "{:?}: error {e1} vs stored keys rotated in f64",
        T::DTYPE
    );
    // Against keys built at p + d from scratch: R(p + d) = R(d) R(p), plus the input rounding.
    let e2 = max_err(got, from_scratch);
    assert!(
        e2 <= 2.0 * tol::<T>(),
        "{:?}: error {e2} vs reference at p + d",
        T::DTYPE
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn rerotate_equals_rope_at_shifted_position_f32(case in case()) {
        check_rerotate::<f32>(&case);
    }

    #[test]
    fn rerotate_equals_rope_at_shifted_position_f16(case in case()) {
        check_rerotate::<f16>(&case);
    }

    #[test]
    fn rerotate_equals_rope_at_shifted_position_bf16(case in case()) {
        check_rerotate::<bf16>(&case);
    }

    #[test]
    fn relocate_span_matches_reference(case in case(), span in (0usize..6, 0usize..6), batch in 1usize..3, layers in 1usize..3, same in any::<bool>()) {
        check_relocate(&case, span, batch, layers, same);
    }

    #[test]
    fn relocate_spans_matches_reference(case in case(), cuts in proptest::collection::vec(0usize..12, 0..8), batch in 1usize..3, layers in 1usize..3, shift in any::<bool>()) {
        check_relocate_spans(&case, cuts, batch, layers, shift);
    }

    #[test]
    fn paged_round_trip_every_layout(case in case(), blocks in 1usize..6, block_size in 1usize..5, layout in 0usize..4, mode in 0usize..4) {
        check_paged(&case, blocks, block_size, layout, mode);
    }
}

#[test]
fn large_positions_exact_in_f32() {
    // At p ~ 1e6 the f32 angle p * inv_freq is off by up to ~0.06 rad; the delta rotation is not.
    let (theta, d) = (1e6, 128);
    let reference = RefRope::new(theta, d, false, None);
    let rope = rope_of(theta, d, d, false, None);
    let mut rng = TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
    for &(p, delta) in &[
        (1_000_000i64, -999_999i64),
        (32_768, 7),
        (5, 1_048_576),
        (2_000_000_000, -3),
    ] {
        let x = rand_vec(&mut rng, d);
        let mut keys: Vec<f32> = to_t(&reference.apply(&x, [p; 3]));
        let want = reference.apply(&x, [p + delta; 3]);
        let mut view =
            StridedMut::new(&mut keys, 0, [1, 1, d], [d as isize, d as isize, 1], "keys").unwrap();
        rerotate_keys(std::slice::from_mut(&mut view), Deltas::Same(delta), &rope).unwrap();
        assert!(
            max_err(&keys, &want) < 2e-6,
            "p = {p}, delta = {delta}: {}",
            max_err(&keys, &want)
        );
    }
}

#[test]
fn strided_keys_match_contiguous() {
    // keys as a transposed view: [tokens, heads, dim] of memory laid out [heads, tokens, dim],
    // and a view with the dim reversed (negative stride) of a [tokens, heads, dim] buffer.
    let (t, h, d) = (7, 3, 10);
    let rope = rope_of(10000.0, d, 8, true, None);
    let mut rng = TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
    let data: Vec<f32> = (0..t * h * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let deltas: Vec<i64> = (0..t as i64).map(|i| 3 * i - 9).collect();
    // Reference: the contiguous [t, h, d] copy.
    let mut contiguous = vec![0f32; t * h * d];
    for ti in 0..t {
        for hi in 0..h {
            for k in 0..d {
                contiguous[(ti * h + hi) * d + k] = data[(hi * t + ti) * d + k];
            }
        }
    }
    let mut transposed = data.clone();
    {
        let mut v = StridedMut::new(
            &mut contiguous,
            0,
            [t, h, d],
            [(h * d) as isize, d as isize, 1],
            "keys",
        )
        .unwrap();
        rerotate_keys(
            std::slice::from_mut(&mut v),
            Deltas::PerToken(&deltas),
            &rope,
        )
        .unwrap();
        let mut v = StridedMut::new(
            &mut transposed,
            0,
            [t, h, d],
            [d as isize, (t * d) as isize, 1],
            "keys",
        )
        .unwrap();
        rerotate_keys(
            std::slice::from_mut(&mut v),
            Deltas::PerToken(&deltas),
            &rope,
        )
        .unwrap();
    }
    for ti in 0..t {
        for hi in 0..h {
            for k in 0..d {
                assert_eq!(
                    contiguous[(ti * h + hi) * d + k],
                    transposed[(hi * t + ti) * d + k]
                );
            }
        }
    }
    // Reversed dims: element k of the view is element d-1-k of memory.
    let mut reversed: Vec<f32> = Vec::with_capacity(t * h * d);
    for ti in 0..t {
        for hi in 0..h {
            for k in (0..d).rev() {
                reversed.push(data[(hi * t + ti) * d + k]);
            }
        }
    }
    let mut v = StridedMut::new(
        &mut reversed,
        d - 1,
        [t, h, d],
        [(h * d) as isize, d as isize, -1],
        "keys",
    )
    .unwrap();
    rerotate_keys(
        std::slice::from_mut(&mut v),
        Deltas::PerToken(&deltas),
        &rope,
    )
    .unwrap();
    for ti in 0..t {
        for hi in 0..h {
            for k in 0..d {
                assert_eq!(
                    contiguous[(ti * h + hi) * d + k],
                    reversed[(ti * h + hi) * d + d - 1 - k]
                );
            }
        }
    }
}

// ---------------------------------------------------------------- relocate / append

/// One f32 layer over `k` and `v`: keys `shape` with `key_strides`, values the same with head
/// size `value_dim` and `value_strides`.
fn kv_layer<'a>(
    k: &'a mut [f32],
    v: &'a mut [f32],
    shape: [usize; 4],
    key_strides: [isize; 4],
    value_dim: usize,
    value_strides: [isize; 4],
) -> LayerKv<'a, f32> {
    let [b, h, s, _] = shape;
    LayerKv {
        keys: StridedMut::new(k, 0, shape, key_strides, "keys").unwrap(),
        values: StridedMut::new(v, 0, [b, h, s, value_dim], value_strides, "values").unwrap(),
    }
}

fn check_relocate(case: &Case, span: (usize, usize), batch: usize, layers: usize, same: bool) {
    let mut rng = TestRng::from_seed(
        proptest::test_runner::RngAlgorithm::ChaCha,
        &case.seed.to_le_bytes().repeat(4),
    );
    let (heads, d, seq) = (case.heads.max(1), case.head_dim, case.tokens);
    let (start, end) = (span.0.min(span.1).min(seq), span.0.max(span.1).min(seq));
    let length = seq;
    let moved = length - end;
    let reference = RefRope::new(
        case.theta,
        case.rotary_dim,
        case.interleaved,
        case.sections.as_deref(),
    );
    let rope = rope_of(
        case.theta,
        d,
        case.rotary_dim,
        case.interleaved,
        case.sections.clone(),
    );
    let deltas3: Vec<[i64; 3]> = (0..moved)
        .map(|_| {
            if case.sections.is_some() && !same {
                [
                    rng.random_range(-500..50),
                    rng.random_range(-500..50),
                    rng.random_range(-500..50),
                ]
            } else {
                [-((end - start) as i64); 3]
            }
        })
        .collect();
    let dv = d + 1; // values with another head size
    let n_k = batch * heads * seq * d;
    let n_v = batch * heads * seq * dv;
    let mut ks: Vec<Vec<f32>> = (0..layers)
        .map(|_| (0..n_k).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let mut vs: Vec<Vec<f32>> = (0..layers)
        .map(|_| (0..n_v).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    // Reference: rows before start unchanged; row start + t = rotate(row end + t, delta t).
    let mut want_k = ks.clone();
    let mut want_v = vs.clone();
    for l in 0..layers {
        for bh in 0..batch * heads {
            for t in 0..moved {
                let src: Vec<f64> = ks[l][(bh * seq + end + t) * d..][..d]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let rot = reference.apply(&src, deltas3[t]);
                for k in 0..d {
                    want_k[l][(bh * seq + start + t) * d + k] = rot[k] as f32;
                }
                for k in 0..dv {
                    want_v[l][(bh * seq + start + t) * dv + k] =
                        vs[l][(bh * seq + end + t) * dv + k];
                }
            }
        }
    }
    let new_len = {
        let mut views: Vec<LayerKv<f32>> = ks
            .iter_mut()
            .zip(vs.iter_mut())
            .map(|(k, v)| {
                let contiguous = |dim: usize| {
                    [
                        (heads * seq * dim) as isize,
                        (seq * dim) as isize,
                        dim as isize,
                        1,
                    ]
                };
                kv_layer(
                    k,
                    v,
                    [batch, heads, seq, d],
                    contiguous(d),
                    dv,
                    contiguous(dv),
                )
            })
            .collect();
        let flat: Vec<i64> = deltas3.iter().map(|x| x[0]).collect();
        let deltas = if same {
            Deltas::Same(-((end - start) as i64))
        } else if case.sections.is_some() {
            Deltas::PerTokenThw(&deltas3)
        } else {
            Deltas::PerToken(&flat)
        };
        relocate_span(&mut views, start, end, None, deltas, &rope).unwrap()
    };
    assert_eq!(new_len, length - (end - start));
    for l in 0..layers {
        for bh in 0..batch * heads {
            for p in 0..new_len {
                for k in 0..d {
                    let i = (bh * seq + p) * d + k;
                    assert!(
                        (ks[l][i] as f64 - want_k[l][i] as f64).abs() < 2e-6,
                        "layer {l} row {p}"
                    );
                }
                for k in 0..dv {
                    let i = (bh * seq + p) * dv + k;
                    assert_eq!(vs[l][i], want_v[l][i]);
                }
            }
        }
    }
}

/// Several spans out in one pass: spans from sorted cut points (pairs, adjacent and empty ones
/// included), values seen through a [batch, seq, heads, dim] layout (strided).
fn check_relocate_spans(
    case: &Case,
    mut cuts: Vec<usize>,
    batch: usize,
    layers: usize,
    shift: bool,
) {
    let mut rng = TestRng::from_seed(
        proptest::test_runner::RngAlgorithm::ChaCha,
        &case.seed.to_le_bytes().repeat(4),
    );
    let (heads, d, seq) = (case.heads.max(1), case.head_dim, case.tokens);
    cuts.iter_mut().for_each(|c| *c = (*c).min(seq));
    cuts.sort_unstable();
    let spans: Vec<(usize, usize)> = cuts.chunks_exact(2).map(|c| (c[0], c[1])).collect();
    let length = seq;
    let start = spans.first().map_or(length, |s| s.0);
    let kept: Vec<usize> = (start..length)
        .filter(|&p| !spans.iter().any(|&(s, e)| s <= p && p < e))
        .collect();
    let plain = case.sections.is_none() || shift;
    let deltas3: Vec<[i64; 3]> = kept
        .iter()
        .map(|&p| {
            if plain && shift {
                let gone: usize = spans
                    .iter()
                    .filter(|s| s.0 <= p)
                    .map(|s| s.1.min(p) - s.0)
                    .sum();
                [-(gone as i64); 3]
            } else if plain {
                [rng.random_range(-500..500); 3]
            } else {
                [0, 1, 2].map(|_| rng.random_range(-500..500))
            }
        })
        .collect();
    let reference = RefRope::new(
        case.theta,
        case.rotary_dim,
        case.interleaved,
        case.sections.as_deref(),
    );
    let rope = rope_of(
        case.theta,
        d,
        case.rotary_dim,
        case.interleaved,
        case.sections.clone(),
    );
    let dv = d + 2;
    let mut ks: Vec<Vec<f32>> = (0..layers)
        .map(|_| {
            (0..batch * heads * seq * d)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect()
        })
        .collect();
    let mut vs: Vec<Vec<f32>> = (0..layers)
        .map(|_| {
            (0..batch * seq * heads * dv)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect()
        })
        .collect();
    let k_at = |b: usize, h: usize, p: usize| ((b * heads + h) * seq + p) * d;
    let v_at = |b: usize, h: usize, p: usize| ((b * seq + p) * heads + h) * dv;
    let mut want_k = ks.clone();
    let mut want_v = vs.clone();
    for l in 0..layers {
        for b in 0..batch {
            for h in 0..heads {
                for (t, &p) in kept.iter().enumerate() {
                    let src: Vec<f64> = ks[l][k_at(b, h, p)..][..d]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    let rot = reference.apply(&src, deltas3[t]);
                    for k in 0..d {
                        want_k[l][k_at(b, h, start + t) + k] = rot[k] as f32;
                    }
                    for k in 0..dv {
                        want_v[l][v_at(b, h, start + t) + k] = vs[l][v_at(b, h, p) + k];
                    }
                }
            }
        }
    }
    let new_len = {
        let mut views: Vec<LayerKv<f32>> = ks
            .iter_mut()
            .zip(vs.iter_mut())
            .map(|(k, v)| {
                let keys = [
                    (heads * seq * d) as isize,
                    (seq * d) as isize,
                    d as isize,
                    1,
                ];
                // Values stored [batch, seq, heads, dim].
                let values = [
                    (seq * heads * dv) as isize,
                    dv as isize,
                    (heads * dv) as isize,
                    1,
                ];
                kv_layer(k, v, [batch, heads, seq, d], keys, dv, values)
            })
            .collect();
        let flat: Vec<i64> = deltas3.iter().map(|x| x[0]).collect();
        let deltas = if plain {
            Deltas::PerToken(&flat)
        } else {
            Deltas::PerTokenThw(&deltas3)
        };
        relocate_spans(&mut views, &spans, None, deltas, &rope).unwrap()
    };
    assert_eq!(new_len, start + kept.len());
    for l in 0..layers {
        for b in 0..batch {
            for h in 0..heads {
                for p in 0..seq {
                    for k in 0..d {
                        let i = k_at(b, h, p) + k;
                        let tol = if p < new_len { 2e-6 } else { 0.0 };
                        let want = if p < new_len { want_k[l][i] } else { ks[l][i] };
                        assert!(
                            (ks[l][i] as f64 - want as f64).abs() <= tol,
                            "layer {l} row {p}"
                        );
                    }
                    if p < new_len {
                        for k in 0..dv {
                            let i = v_at(b, h, p) + k;
                            assert_eq!(vs[l][i], want_v[l][i], "values layer {l} row {p}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn relocate_spans_bad_spans_write_nothing() {
    let (seq, d) = (10, 8);
    let rope = rope_of(10000.0, d, d, false, None);
    let mut k: Vec<f32> = (0..seq * d).map(|x| x as f32).collect();
    let mut v = k.clone();
    let before = (k.clone(), v.clone());
    {
        let strides = [(seq * d) as isize, (seq * d) as isize, d as isize, 1];
        let mut layers = vec![kv_layer(
            &mut k,
            &mut v,
            [1, 1, seq, d],
            strides,
            d,
            strides,
        )];
        let cases: Vec<(Vec<(usize, usize)>, Option<usize>, &str)> = vec![
            (
                vec![(2, 5), (4, 6)],
                None,
                "spans[1] = (4, 6) starts before spans[0] = (2, 5) ends",
            ),
            (
                vec![(5, 3)],
                None,
                "spans[0] = (5, 3): the span [start, end) needs start <= end",
            ),
            (
                vec![(1, 2), (8, 11)],
                None,
                "spans[1] = (8, 11): end must be <= length = 10",
            ),
            (vec![(1, 2)], Some(11), "length = 11"),
        ];
        for (spans, length, msg) in cases {
            let e =
                relocate_spans(&mut layers, &spans, length, Deltas::Same(0), &rope).unwrap_err();
            assert!(e.to_string().contains(msg), "{e} lacks {msg}");
        }
        assert_eq!(
            relocate_spans(&mut layers, &[], None, Deltas::Same(3), &rope).unwrap(),
            seq
        );
    }
    assert_eq!((k, v), before);
}

#[test]
fn append_entries_writes_rotated_keys_and_values() {
    let (b, h, seq, d, n) = (2, 3, 9, 12, 4);
    let rope = rope_of(10000.0, d, d, false, Some(vec![2, 2, 2]));
    let reference = RefRope::new(10000.0, d, false, Some(&[2, 2, 2]));
    let mut rng = TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
    let mut k: Vec<f32> = (0..b * h * seq * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut v: Vec<f32> = (0..b * h * seq * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let nk: Vec<f32> = (0..b * h * n * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let nv: Vec<f32> = (0..b * h * n * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let positions = [8i64, 2, 5, 6];
    let deltas = [[3i64, -1, 4], [0, 0, 0], [100, 7, -7], [-5, -5, -5]];
    let (k0, v0) = (k.clone(), v.clone());
    {
        let strides = |m: usize| [(h * m * d) as isize, (m * d) as isize, d as isize, 1];
        let mut layers = vec![LayerKv {
            keys: StridedMut::new(&mut k, 0, [b, h, seq, d], strides(seq), "keys").unwrap(),
            values: StridedMut::new(&mut v, 0, [b, h, seq, d], strides(seq), "values").unwrap(),
        }];
        let new = vec![LayerKvRef {
            keys: Strided::new(&nk, 0, [b, h, n, d], strides(n), "new_keys").unwrap(),
            values: Strided::new(&nv, 0, [b, h, n, d], strides(n), "new_values").unwrap(),
        }];
        append_entries(
            &mut layers,
            &new,
            &positions,
            Some((Deltas::PerTokenThw(&deltas), &rope)),
        )
        .unwrap();
    }
    for bh in 0..b * h {
        for p in 0..seq {
            let row = |x: &Vec<f32>, m: usize, r: usize| x[(bh * m + r) * d..][..d].to_vec();
            match positions.iter().position(|&q| q as usize == p) {
                None => {
                    assert_eq!(row(&k, seq, p), row(&k0, seq, p));
                    assert_eq!(row(&v, seq, p), row(&v0, seq, p));
                }
                Some(j) => {
                    let src: Vec<f64> = row(&nk, n, j).iter().map(|&x| x as f64).collect();
                    let want = reference.apply(&src, deltas[j]);
                    assert!(max_err(&row(&k, seq, p), &want) < 2e-6);
                    assert_eq!(row(&v, seq, p), row(&nv, n, j));
                }
            }
        }
    }
}

// ---------------------------------------------------------------- paged

/// Element offset of (block, slot, head, dim, kv) in a layout of `blocks x block_size x heads x d`.
fn layout_of(
    which: usize,
    blocks: usize,
    bs: usize,
    heads: usize,
    d: usize,
    name: &str,
) -> (PagedLayout, usize) {
    let total = 2 * blocks * bs * heads * d;
    let layout = match which {
        // vLLM 0.33, NHD (LBNHC): physical [blocks, block_size, heads, 2d], logical [B, H, N, 2d].
        0 => PagedLayout::vllm(
            [blocks, heads, bs, 2 * d],
            [
                (bs * heads * 2 * d) as isize,
                (2 * d) as isize,
                (heads * 2 * d) as isize,
                1,
            ],
            d,
            name,
        ),
        // vLLM 0.33, HND (LBHNC): physical = logical [blocks, heads, block_size, 2d].
        1 => PagedLayout::vllm(
            [blocks, heads, bs, 2 * d],
            [
                (heads * bs * 2 * d) as isize,
                (bs * 2 * d) as isize,
                (2 * d) as isize,
                1,
            ],
            d,
            name,
        ),
        // Earlier vLLM FlashAttention: [2, blocks, block_size, heads, d].
        2 => PagedLayout::kv_blocks(
            [2, blocks, bs, heads, d],
            [
                (blocks * bs * heads * d) as isize,
                (bs * heads * d) as isize,
                (heads * d) as isize,
                d as isize,
                1,
            ],
            d,
            name,
        ),
        // Earlier vLLM FlashInfer: [blocks, 2, block_size, heads, d].
        _ => PagedLayout::blocks_kv(
            [blocks, 2, bs, heads, d],
            [
                (2 * bs * heads * d) as isize,
                (bs * heads * d) as isize,
                (heads * d) as isize,
                d as isize,
                1,
            ],
            d,
            name,
        ),
    };
    (layout.unwrap(), total)
}

fn elem(l: &PagedLayout, slot: usize, head: usize, k: usize, value: bool) -> usize {
    let off = (slot / l.block_size) as isize * l.block_stride
        + (slot % l.block_size) as isize * l.slot_stride
        + head as isize * l.head_stride
        + k as isize * l.dim_stride
        + if value { l.value_offset } else { 0 };
    off as usize
}

fn check_paged(case: &Case, blocks: usize, bs: usize, which: usize, mode: usize) {
    let mut rng = TestRng::from_seed(
        proptest::test_runner::RngAlgorithm::ChaCha,
        &case.seed.to_le_bytes().repeat(4),
    );
    let (heads, d) = (case.heads.max(1), case.head_dim);
    let slots = blocks * bs;
    let reference = RefRope::new(
        case.theta,
        case.rotary_dim,
        case.interleaved,
        case.sections.as_deref(),
    );
    let rope = rope_of(
        case.theta,
        d,
        case.rotary_dim,
        case.interleaved,
        case.sections.clone(),
    );
    let layers = 2;
    // Destinations: distinct slots (a random permutation), some -1 (padding). Sources, some -1:
    // mode 0 random slots (repeats allowed); 1 the destinations shifted by k along the
    // permutation (chains and cycles of moves within the cache); 2 some entries in place;
    // 3 pairs swapping slots.
    let mut perm: Vec<usize> = (0..slots).collect();
    for i in (1..slots).rev() {
        perm.swap(i, rng.random_range(0..=i));
    }
    let n = rng.random_range(0..=slots);
    let dst: Vec<i64> = perm[..n]
        .iter()
        .map(|&s| {
            if rng.random_range(0..8) == 0 {
                -1
            } else {
                s as i64
            }
        })
        .collect();
    let shift = rng.random_range(1..=slots.max(1));
    let src: Vec<i64> = (0..n)
        .map(|i| {
            let s = match mode {
                0 => rng.random_range(0..slots) as i64,
                1 => perm[(i + shift) % slots] as i64,
                2 if rng.random_range(0..2) == 0 => perm[i] as i64,
                2 => rng.random_range(0..slots) as i64,
                _ => perm[(i ^ 1).min(slots - 1)] as i64,
            };
            if rng.random_range(0..10) == 0 {
                -1
            } else {
                s
            }
        })
        .collect();
    let deltas: Vec<[i64; 3]> = (0..n)
        .map(|_| {
            if case.sections.is_some() {
                [
                    rng.random_range(-9000..9000),
                    rng.random_range(-90..90),
                    rng.random_range(-90..90),
                ]
            } else {
                [rng.random_range(-40000..40000); 3]
            }
        })
        .collect();
    let flat: Vec<i64> = deltas.iter().map(|x| x[0]).collect();
    let (layout, total) = layout_of(which, blocks, bs, heads, d, "kv_caches[0]");
    let mut caches: Vec<Vec<f32>> = (0..layers)
        .map(|_| (0..total).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let before = caches.clone();
    let moved = {
        let mut views: Vec<PagedCache<f32>> = caches
            .iter_mut()
            .map(|c| PagedCache::new(c, 0, layout, "kv_caches").unwrap())
            .collect();
        let deltas = if case.sections.is_some() {
            Deltas::PerTokenThw(&deltas)
        } else {
            Deltas::PerToken(&flat)
        };
        paged_reinject(&mut views, &src, &dst, deltas, &rope).unwrap()
    };
    assert_eq!(
        moved,
        src.iter()
            .zip(&dst)
            .filter(|(s, d)| **s >= 0 && **d >= 0)
            .count()
    );
    for l in 0..layers {
        let mut written = vec![None; slots];
        for i in 0..n {
            if src[i] >= 0 && dst[i] >= 0 {
                written[dst[i] as usize] = Some(i);
            }
        }
        for slot in 0..slots {
            for hd in 0..heads {
                let key_before: Vec<f64> = (0..d)
                    .map(|k| {
                        before[l][elem(&layout, src_or(written[slot], &src, slot), hd, k, false)]
                            as f64
                    })
                    .collect();
                let want_k = match written[slot] {
                    Some(i) => reference.apply(&key_before, deltas[i]),
                    None => key_before,
                };
                for k in 0..d {
                    let got = caches[l][elem(&layout, slot, hd, k, false)] as f64;
                    assert!((got - want_k[k]).abs() < 2e-6, "layout {which} slot {slot}");
                    let want_v =
                        before[l][elem(&layout, src_or(written[slot], &src, slot), hd, k, true)];
                    assert_eq!(caches[l][elem(&layout, slot, hd, k, true)], want_v);
                }
            }
        }
    }
}

fn src_or(entry: Option<usize>, src: &[i64], slot: usize) -> usize {
    entry.map_or(slot, |i| src[i] as usize)
}

// ---------------------------------------------------------------- bad input: errors, nothing written

#[test]
fn config_errors_name_the_argument() {
    let msg = |r: Result<RopeConfig, Error>| match r.unwrap_err() {
        Error::Value(m) => m,
        e => panic!("{e:?}"),
    };
    assert!(msg(RopeConfig::new(10000.0, 64, Some(7), false, None)).starts_with("rotary_dim = 7"));
    assert!(msg(RopeConfig::new(10000.0, 64, Some(128), false, None)).contains("head_dim = 64"));
    assert!(msg(RopeConfig::new(
        10000.0,
        64,
        None,
        false,
        Some(vec![8, 8, 8])
    ))
    .starts_with("mrope_section = [8, 8, 8]"));
    assert!(msg(RopeConfig::new(-1.0, 64, None, false, None)).starts_with("rope_theta"));
    assert!(msg(RopeConfig::new(f64::NAN, 64, None, false, None)).starts_with("rope_theta"));
}

#[test]
fn bad_input_leaves_caches_untouched() {
    let (t, h, d) = (4, 2, 8);
    let rope = rope_of(10000.0, d, d, false, None);
    let original: Vec<f32> = (0..t * h * d).map(|i| i as f32 * 0.01).collect();
    let mut keys = original.clone();
    let mut view = StridedMut::new(
        &mut keys,
        0,
        [t, h, d],
        [(h * d) as isize, d as isize, 1],
        "keys",
    )
    .unwrap();
    let err = rerotate_keys(
        std::slice::from_mut(&mut view),
        Deltas::PerToken(&[1, 2, 3]),
        &rope,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("delta has 3 entries")),
        "{err:?}"
    );
    let err = rerotate_keys(
        std::slice::from_mut(&mut view),
        Deltas::PerTokenThw(&[[1, 2, 3]; 4]),
        &rope,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.contains("mrope_section is None")),
        "{err:?}"
    );
    let wrong = rope_of(10000.0, 16, 16, false, None);
    assert!(rerotate_keys(std::slice::from_mut(&mut view), Deltas::Same(1), &wrong).is_err());
    assert_eq!(keys, original);

    // Overlapping (stride-0) and out-of-buffer views are refused when made.
    let mut buf = vec![0f32; 16];
    assert!(StridedMut::new(&mut buf, 0, [2, 2, 4], [0, 4, 1], "keys").is_err());
    assert!(StridedMut::new(&mut buf, 0, [2, 2, 8], [16, 8, 1], "keys").is_err());
    assert!(StridedMut::new(&mut buf, 3, [0, 2, 8], [16, 8, 1], "keys").is_ok());

    // relocate_span: span out of range, shared memory, mismatched shapes.
    let (b, seq) = (1, 5);
    let mut k = vec![1f32; b * h * seq * d];
    let mut v = vec![2f32; b * h * seq * d];
    let st = [(h * seq * d) as isize, (seq * d) as isize, d as isize, 1];
    {
        let mut layers = vec![LayerKv {
            keys: StridedMut::new(&mut k, 0, [b, h, seq, d], st, "keys").unwrap(),
            values: StridedMut::new(&mut v, 0, [b, h, seq, d], st, "values").unwrap(),
        }];
        assert!(
            matches!(relocate_span(&mut layers, 1, 6, None, Deltas::Same(-5), &rope), Err(Error::Index(m)) if m.starts_with("end = 6"))
        );
        assert!(
            matches!(relocate_span(&mut layers, 3, 2, None, Deltas::Same(-5), &rope), Err(Error::Value(m)) if m.starts_with("start = 3"))
        );
        assert!(
            matches!(relocate_span(&mut layers, 1, 2, None, Deltas::PerToken(&[1]), &rope), Err(Error::Value(m)) if m.starts_with("delta has 1"))
        );
        assert!(
            matches!(relocate_span(&mut layers, 1, 2, Some(9), Deltas::Same(-1), &rope), Err(Error::Index(m)) if m.starts_with("length = 9"))
        );
    }
    assert!(k.iter().all(|&x| x == 1.0) && v.iter().all(|&x| x == 2.0));

    // Keys and values views of the same memory are refused.
    let mut both = vec![0f32; 2 * b * h * seq * d];
    let (lo, hi) = both.split_at_mut(b * h * seq * d + 1);
    let _ = hi;
    let ptr = lo.as_mut_ptr();
    let keys = unsafe { StridedMut::from_raw(ptr, [b, h, seq, d], st, "keys").unwrap() };
    let values = unsafe { StridedMut::from_raw(ptr.add(1), [b, h, seq, d], st, "values").unwrap() };
    let mut layers = vec![LayerKv { keys, values }];
    let err = relocate_span(&mut layers, 1, 2, None, Deltas::Same(-1), &rope).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("keys[0] and values[0] share memory")),
        "{err:?}"
    );
}

#[test]
fn paged_bad_input_leaves_cache_untouched() {
    let (blocks, bs, heads, d) = (3, 4, 2, 8);
    let rope = rope_of(10000.0, d, d, false, None);
    let (layout, total) = layout_of(0, blocks, bs, heads, d, "kv_caches[0]");
    let original: Vec<f32> = (0..total).map(|i| i as f32).collect();
    let mut cache = original.clone();
    {
        let mut views = vec![PagedCache::new(&mut cache, 0, layout, "kv_caches[0]").unwrap()];
        let e = paged_reinject(&mut views, &[0, 1], &[5, 5], Deltas::Same(1), &rope).unwrap_err();
        assert!(
            matches!(&e, Error::Value(m) if m.starts_with("dst_slots[1] = 5 repeats dst_slots[0]")),
            "{e:?}"
        );
        let e = paged_reinject(&mut views, &[0, 12], &[5, 6], Deltas::Same(1), &rope).unwrap_err();
        assert!(
            matches!(&e, Error::Index(m) if m.starts_with("src_slots[1] = 12")),
            "{e:?}"
        );
        let e = paged_reinject(&mut views, &[0, 1], &[5, 99], Deltas::Same(1), &rope).unwrap_err();
        assert!(
            matches!(&e, Error::Index(m) if m.starts_with("dst_slots[1] = 99")),
            "{e:?}"
        );
        let e = paged_reinject(&mut views, &[0, 1], &[5], Deltas::Same(1), &rope).unwrap_err();
        assert!(
            matches!(&e, Error::Value(m) if m.starts_with("src_slots has 2")),
            "{e:?}"
        );
        let e = paged_reinject(&mut views, &[0, 1], &[5, 6], Deltas::PerToken(&[1]), &rope)
            .unwrap_err();
        assert!(
            matches!(&e, Error::Value(m) if m.starts_with("delta has 1")),
            "{e:?}"
        );
        // Negative slots are skipped, not errors; a skipped pair may repeat a destination.
        assert_eq!(
            paged_reinject(&mut views, &[-1, 2], &[5, -1], Deltas::Same(1), &rope).unwrap(),
            0
        );
    }
    assert_eq!(cache, original);
    // Layout checks.
    assert!(PagedLayout::vllm([3, 2, 4, 15], [120, 60, 15, 1], 8, "kv_caches[0]").is_err());
    let bad = PagedLayout {
        value_offset: 0,
        ..layout
    };
    assert!(PagedCache::new(&mut cache, 0, bad, "kv_caches[0]").is_err());
}

#[test]
fn several_layers_in_one_call_match_one_at_a_time() {
    let (layers, t, h, d) = (3, 11, 2, 16);
    let rope = rope_of(1e6, d, 12, false, Some(vec![2, 2, 2]));
    let mut rng = TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
    let deltas: Vec<[i64; 3]> = (0..t)
        .map(|_| {
            [
                rng.random_range(-99..99),
                rng.random_range(-9..9),
                rng.random_range(-9..9),
            ]
        })
        .collect();
    let data: Vec<Vec<f32>> = (0..layers)
        .map(|_| {
            (0..t * h * d)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect()
        })
        .collect();
    let strides = [(h * d) as isize, d as isize, 1];
    let mut together = data.clone();
    let mut views: Vec<_> = together
        .iter_mut()
        .map(|k| StridedMut::new(k, 0, [t, h, d], strides, "keys").unwrap())
        .collect();
    rerotate_keys(&mut views, Deltas::PerTokenThw(&deltas), &rope).unwrap();
    for (l, mut alone) in data.into_iter().enumerate() {
        let mut view = StridedMut::new(&mut alone, 0, [t, h, d], strides, "keys").unwrap();
        rerotate_keys(
            std::slice::from_mut(&mut view),
            Deltas::PerTokenThw(&deltas),
            &rope,
        )
        .unwrap();
        assert_eq!(alone, together[l]);
    }
}

#[test]
fn paged_long_chains_and_cycles() {
    // Shift by one slot along 300 slots: a chain of 299 moves (more waves than the planner
    // allows, so staged through a buffer); the same closed into a cycle; a shift by 37 (waves).
    let (blocks, bs, heads, d) = (75, 4, 2, 8);
    let slots = blocks * bs;
    let rope = rope_of(10000.0, d, d, true, None);
    let reference = RefRope::new(10000.0, d, true, None);
    let (layout, total) = layout_of(3, blocks, bs, heads, d, "kv_caches[0]");
    let mut rng = TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
    for (n, shift) in [(slots - 1, 1), (slots, 1), (slots - 37, 37), (slots, 150)] {
        let src: Vec<i64> = (0..n).map(|i| ((i + shift) % slots) as i64).collect();
        let dst: Vec<i64> = (0..n as i64).collect();
        let deltas: Vec<i64> = (0..n).map(|_| rng.random_range(-500..500)).collect();
        let before: Vec<f32> = (0..total).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut cache = before.clone();
        let mut views = vec![PagedCache::new(&mut cache, 0, layout, "kv_caches[0]").unwrap()];
        assert_eq!(
            paged_reinject(&mut views, &src, &dst, Deltas::PerToken(&deltas), &rope).unwrap(),
            n
        );
        for i in 0..slots {
            for h in 0..heads {
                let s = if i < n { src[i] as usize } else { i };
                let key: Vec<f64> = (0..d)
                    .map(|k| before[elem(&layout, s, h, k, false)] as f64)
                    .collect();
                let want = if i < n {
                    reference.apply(&key, [deltas[i]; 3])
                } else {
                    key
                };
                for k in 0..d {
                    let got = cache[elem(&layout, i, h, k, false)] as f64;
                    assert!((got - want[k]).abs() < 2e-6, "n {n} shift {shift} slot {i}");
                    assert_eq!(
                        cache[elem(&layout, i, h, k, true)],
                        before[elem(&layout, s, h, k, true)]
                    );
                }
            }
        }
    }
}

#[test]
fn paged_layers_sharing_memory_are_refused_before_writing() {
    let (blocks, bs, heads, d) = (3, 4, 2, 8);
    let rope = rope_of(10000.0, d, d, false, None);
    let (layout, total) = layout_of(0, blocks, bs, heads, d, "kv_caches[0]");
    let original: Vec<f32> = (0..total).map(|i| i as f32).collect();
    let mut cache = original.clone();
    let ptr = cache.as_mut_ptr();
    // One buffer given for two layers (what `paged_reinject([a, a], ...)` passes).
    let mut views = unsafe {
        vec![
            PagedCache::from_raw(ptr, layout, "kv_caches[0]").unwrap(),
            PagedCache::from_raw(ptr, layout, "kv_caches[1]").unwrap(),
        ]
    };
    let e = paged_reinject(&mut views, &[0], &[5], Deltas::Same(1), &rope).unwrap_err();
    assert!(
        matches!(&e, Error::Value(m) if m.starts_with("kv_caches[0] and kv_caches[1] share memory")),
        "{e:?}"
    );
    drop(views);
    assert_eq!(cache, original);
}

#[test]
fn head_dim_is_bounded_before_any_table_is_built() {
    let err = RopeConfig::new(1e6, 1 << 40, None, false, None).unwrap_err();
    assert!(
        matches!(&err, Error::Value(m) if m.starts_with("head_dim = 1099511627776")),
        "{err:?}"
    );
    assert!(RopeConfig::new(1e6, 1 << 16, None, false, None).is_ok());
}

#[test]
fn interleaved_mrope_map_and_rotation() {
    // Qwen3-VL [24, 20, 20] over 64 pairs, Qwen3.5 [11, 11, 10] over 32: h at j % 3 == 1 below
    // 3 s_h, w at j % 3 == 2 below 3 s_w, t elsewhere (written out from the rule).
    for (sections, rotary_dim) in [([24usize, 20, 20], 128usize), ([11, 11, 10], 64)] {
        let config = RopeConfig::new(1e6, 256, Some(rotary_dim), false, Some(sections.to_vec()))
            .unwrap()
            .with_mrope_interleaved(true)
            .unwrap();
        let comp = mrope_components(&config);
        let want: Vec<u8> = (0..rotary_dim / 2)
            .map(|j| match j % 3 {
                1 if j < 3 * sections[1] => 1,
                2 if j < 3 * sections[2] => 2,
                _ => 0,
            })
            .collect();
        assert_eq!(comp, want);
        assert_eq!(Rope::new(config.clone()).components(), &want[..]);
        // Rotation of a partial-rotary key by a (t, h, w) delta, both pair layouts.
        for interleaved in [false, true] {
            let config = RopeConfig {
                interleaved,
                ..config.clone()
            };
            let rope = Rope::new(config);
            let reference = RefRope {
                theta: 1e6,
                rotary_dim,
                interleaved,
                comp: want.iter().map(|&c| c as usize).collect(),
            };
            let mut rng = TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
            let x = rand_vec(&mut rng, 256);
            let (p, d) = ([900, 30, 4000], [-700, 12, -3000]);
            let stored = reference.apply(&x, p);
            let mut keys: Vec<f32> = stored.iter().map(|&v| v as f32).collect();
            let mut view =
                StridedMut::new(&mut keys, 0, [1, 1, 256], [256, 256, 1], "keys").unwrap();
            rerotate_keys(
                std::slice::from_mut(&mut view),
                Deltas::PerTokenThw(&[d]),
                &rope,
            )
            .unwrap();
            let want = reference.apply(&x, add(p, d));
            assert!(max_err(&keys, &want) < 4e-6, "{}", max_err(&keys, &want));
        }
    }
    // Interleaving needs three sections.
    let four = RopeConfig::new(1e4, 16, None, false, Some(vec![2, 2, 2, 2])).unwrap();
    assert!(four.with_mrope_interleaved(true).is_err());
    let none = RopeConfig::new(1e4, 16, None, false, None).unwrap();
    assert!(none.with_mrope_interleaved(true).is_err());
}

// ---------------------------------------------------------------- device dispatch (tensor views)

mod views {
    //! The view-taking entry points (`tvc_rs::kv::rerotate_keys`, ...): the same results as the
    //! f64 reference on CPU views, one device for all tensors, and the CUDA path where a GPU is.

    use super::*;
    use tvc_rs::cuda::Launch;
    use tvc_rs::kv as core;
    use tvc_rs::tensor::{Device, IntArray, TensorView};

    fn random(rng: &mut TestRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn rng() -> TestRng {
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha)
    }

    #[test]
    fn rerotate_on_cpu_views_matches_the_reference() {
        let (tokens, heads, d) = (7, 3, 16);
        let rope = rope_of(10000.0, d, 12, true, None);
        let reference = RefRope::new(10000.0, 12, true, None);
        let mut r = rng();
        let keys0 = random(&mut r, tokens * heads * d);
        let deltas: Vec<i64> = (0..tokens as i64).map(|t| 5 * t - 11).collect();
        // Deltas as host ints and as an int32 CPU tensor: the same result.
        let as_i32: Vec<i32> = deltas.iter().map(|&x| x as i32).collect();
        for from_tensor in [false, true] {
            let mut keys = keys0.clone();
            {
                let mut views =
                    [TensorView::from_mut_slice("keys", &mut keys, &[tokens, heads, d]).unwrap()];
                let source = if from_tensor {
                    core::DeltaSource::Tensor(
                        TensorView::from_slice("delta", &as_i32, &[tokens]).unwrap(),
                    )
                } else {
                    core::DeltaSource::Host(Deltas::PerToken(&deltas))
                };
                core::rerotate_keys(&mut views, source, &rope, Launch::default()).unwrap();
            }
            for t in 0..tokens {
                for h in 0..heads {
                    let at = (t * heads + h) * d;
                    let src: Vec<f64> = keys0[at..at + d].iter().map(|&x| x as f64).collect();
                    let want = reference.apply(&src, [deltas[t]; 3]);
                    assert!(
                        max_err(&keys[at..at + d], &want) < 2e-6,
                        "token {t} head {h}"
                    );
                }
            }
        }
    }

    #[test]
    fn relocate_from_positions_on_cpu_views_matches_the_reference() {
        // M-RoPE: the followers' (t, h, w) position ids before and after, as transformers
        // lays them out ([3, n]); the core derives the deltas.
        let (b, h, seq, d) = (2, 2, 10, 12);
        let (start, end) = (3, 6);
        let moved = seq - end;
        let rope = rope_of(10000.0, d, d, false, Some(vec![2, 2, 2]));
        let reference = RefRope::new(10000.0, d, false, Some(&[2, 2, 2]));
        let mut r = rng();
        let (k0, v0) = (
            random(&mut r, b * h * seq * d),
            random(&mut r, b * h * seq * d),
        );
        let old: Vec<i64> = (0..3 * moved as i64).map(|i| 40 + 3 * i).collect();
        let new: Vec<i64> = (0..3 * moved as i64).map(|i| 7 + i * i % 13).collect();
        let (mut k, mut v) = (k0.clone(), v0.clone());
        let length = {
            let mut keys = [TensorView::from_mut_slice("keys", &mut k, &[b, h, seq, d]).unwrap()];
            let mut values =
                [TensorView::from_mut_slice("values", &mut v, &[b, h, seq, d]).unwrap()];
            let deltas = core::SpanDeltas::from_args(
                None,
                Some(IntArray {
                    values: old.clone(),
                    shape: vec![3, moved],
                }),
                Some(IntArray {
                    values: new.clone(),
                    shape: vec![3, moved],
                }),
            )
            .unwrap();
            core::relocate_span(
                &mut keys,
                &mut values,
                start,
                end,
                None,
                deltas,
                &rope,
                Launch::default(),
            )
            .unwrap()
        };
        assert_eq!(length, seq - (end - start));
        for bh in 0..b * h {
            let row = |x: &Vec<f32>, p: usize| x[(bh * seq + p) * d..][..d].to_vec();
            for p in 0..start {
                assert_eq!(row(&k, p), row(&k0, p));
            }
            for j in 0..moved {
                let delta = [0, 1, 2].map(|c| new[c * moved + j] - old[c * moved + j]);
                let src: Vec<f64> = row(&k0, end + j).iter().map(|&x| x as f64).collect();
                assert!(max_err(&row(&k, start + j), &reference.apply(&src, delta)) < 2e-6);
                assert_eq!(row(&v, start + j), row(&v0, end + j));
            }
        }
    }

    #[test]
    fn one_device_for_all_tensors_checked_before_anything_is_written() {
        let rope = rope_of(10000.0, 8, 8, false, None);
        let mut k = vec![0.5f32; 2 * 4 * 8];
        let mut v = vec![0.25f32; 2 * 4 * 8];
        let k0 = k.clone();
        // A delta tensor on another device than the CPU keys (never dereferenced: refused).
        let elsewhere = [0i64; 4];
        let cuda_delta = unsafe {
            TensorView::from_raw_parts(
                "delta",
                elsewhere.as_ptr() as *mut u8,
                tvc_rs::dtype::DType::I64,
                vec![4],
                vec![1],
                Device::Cuda(0),
                false,
                false,
            )
        };
        let mut keys = [TensorView::from_mut_slice("keys", &mut k, &[1, 2, 4, 8]).unwrap()];
        let mut values = [TensorView::from_mut_slice("values", &mut v, &[1, 2, 4, 8]).unwrap()];
        let err = core::relocate_span(
            &mut keys,
            &mut values,
            0,
            0,
            None,
            core::SpanDeltas::Given(core::DeltaSource::Tensor(cuda_delta)),
            &rope,
            Launch::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("delta") && err.contains("cuda:0") && err.contains("same device"),
            "{err}"
        );
        // Positions and delta together, and one without the other: refused by argument name.
        let both = core::SpanDeltas::from_args(
            Some(core::DeltaSource::Host(Deltas::Same(1))),
            Some(IntArray {
                values: vec![1],
                shape: vec![1],
            }),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(both.contains("pass one or the other"), "{both}");
        let half = core::SpanDeltas::from_args(
            None,
            None,
            Some(IntArray {
                values: vec![1],
                shape: vec![1],
            }),
        )
        .unwrap_err()
        .to_string();
        assert!(half.contains("pass both"), "{half}");
        drop((keys, values));
        assert_eq!(k, k0);
        // float64 caches are CPU only: a float64 view on a GPU is refused before any launch.
        let cache = [0f64; 2 * 4 * 8];
        let f64_on_gpu = unsafe {
            TensorView::from_raw_parts(
                "keys",
                cache.as_ptr() as *mut u8,
                tvc_rs::dtype::DType::F64,
                vec![2, 4, 8],
                vec![32, 8, 1],
                Device::Cuda(0),
                false,
                true,
            )
        };
        let err = core::rerotate_keys(
            &mut [f64_on_gpu],
            core::DeltaSource::Host(Deltas::Same(1)),
            &rope,
            Launch::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "keys: float64 tensors are supported on the CPU only, got one on cuda:0"
            ),
            "{err}"
        );
    }

    #[test]
    fn cuda_views_match_the_cpu_path() {
        let Ok(dev) = tvc_rs::cuda::device(0) else {
            eprintln!("skipping: no CUDA device");
            return;
        };
        let (tokens, heads, d) = (33, 4, 64);
        let rope = rope_of(1e6, d, d, false, None);
        let mut r = rng();
        let keys0 = random(&mut r, tokens * heads * d);
        let deltas: Vec<i64> = (0..tokens as i64).map(|t| 1000 - 37 * t).collect();
        let mut want = keys0.clone();
        {
            let mut views =
                [TensorView::from_mut_slice("keys", &mut want, &[tokens, heads, d]).unwrap()];
            let source = core::DeltaSource::Host(Deltas::PerToken(&deltas));
            core::rerotate_keys(&mut views, source, &rope, Launch::default()).unwrap();
        }
        let stream = tvc_rs::cuda::Stream(0);
        let bytes = keys0.len() * 4;
        let ptr = dev.alloc_async(bytes, stream).unwrap();
        let host: Vec<u8> = keys0.iter().flat_map(|x| x.to_ne_bytes()).collect();
        let mut back = vec![0u8; bytes];
        unsafe {
            dev.copy_to_device(ptr, &host, stream).unwrap();
            let view = TensorView::from_raw_parts(
                "keys",
                ptr as *mut u8,
                tvc_rs::dtype::DType::F32,
                vec![tokens, heads, d],
                vec![(heads * d) as isize, d as isize, 1],
                Device::Cuda(0),
                false,
                true,
            );
            let source = core::DeltaSource::Host(Deltas::PerToken(&deltas));
            core::rerotate_keys(&mut [view], source, &rope, Launch::on(stream)).unwrap();
            dev.copy_to_host(&mut back, ptr, stream).unwrap();
            dev.free_async(ptr, stream).unwrap();
        }
        let got: Vec<f32> = back
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-5, "max |cuda - cpu| = {err}");
    }
}
