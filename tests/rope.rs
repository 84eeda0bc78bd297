//! Tests of the pure-Rust M-RoPE core (`tvc_rs::rope`): hand-derived examples, a literal
//! re-statement of transformers' `get_rope_index` as an independent reference on random
//! batches (proptest), invariants, errors, and `smart_resize`.

use half::{bf16, f16};
use proptest::prelude::*;
use tvc_rs::rope::{
    batch_positions, image_grid_thw, image_token_count, positions_for_segments,
    positions_for_sequence, segments_for_sequence, smart_resize, BatchInput, GridThw,
    ImageSettings, ModelType, MropeConfig, Seconds, SecondsValue, Segment, TimeInterval,
    TokenKinds, TokensPerSecond,
};
use tvc_rs::Error;

const IMAGE: i64 = 151655;
const VIDEO: i64 = 151656;
const VISION_START: i64 = 151652;
const VISION_END: i64 = 151653;

fn cfg(merge: i64) -> MropeConfig {
    MropeConfig {
        spatial_merge_size: merge,
        ..MropeConfig::qwen2_vl()
    }
}

fn message(err: Error) -> String {
    match err {
        Error::Value(m)
        | Error::Type(m)
        | Error::Index(m)
        | Error::Io(m)
        | Error::Runtime(m)
        | Error::Memory(m) => m,
    }
}

// ---------------------------------------------------------------- hand-derived examples

#[test]
fn image_between_text_by_hand() {
    // "a b <image 4x6 patches> c d", merge 2: the image is 1 x 2 x 3 = 6 tokens at start 2.
    let ids = [10, 11, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 12, 13];
    let p = positions_for_sequence(&ids, &[GridThw::new(1, 4, 6)], &[], None, &cfg(2)).unwrap();
    assert_eq!(p.t, vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
    assert_eq!(p.h, vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
    assert_eq!(p.w, vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
    // max position 6, 10 tokens: 6 + 1 - 10.
    assert_eq!(p.rope_delta, -3);
    assert_eq!(p.next_position, 7);
}

#[test]
fn qwen2_5_video_time_scaling_by_hand() {
    // Video grid (3, 2, 2), merge 2: 3 frame groups of 1 token; tokens_per_second 2 and
    // second_per_grid_ts 1.0 give temporal steps of 2. After the video the position moves by
    // max(h, w) / 2 = 1 only, but the delta counts the largest temporal position.
    let q25 = MropeConfig {
        tokens_per_second: TokensPerSecond::Int(2),
        ..MropeConfig::qwen2_5_vl()
    };
    let ids = [7, VIDEO, VIDEO, VIDEO, 8];
    let seconds = [Seconds::python_float(1.0)];
    let p =
        positions_for_sequence(&ids, &[], &[GridThw::new(3, 2, 2)], Some(&seconds), &q25).unwrap();
    assert_eq!(p.t, vec![0, 1, 3, 5, 2]);
    assert_eq!(p.h, vec![0, 1, 1, 1, 2]);
    assert_eq!(p.w, vec![0, 1, 1, 1, 2]);
    assert_eq!(p.rope_delta, 5 + 1 - 5);
    assert_eq!(p.next_position, 3);

    // Qwen2-VL spaces the same video by 1.
    let p = positions_for_sequence(&ids, &[], &[GridThw::new(3, 2, 2)], None, &cfg(2)).unwrap();
    assert_eq!(p.t, vec![0, 1, 2, 3, 2]);
}

#[test]
fn text_only_is_arange_with_zero_delta() {
    let ids: Vec<i64> = (0..17).collect();
    let p = positions_for_sequence(&ids, &[], &[], None, &cfg(2)).unwrap();
    assert_eq!(p.t, ids);
    assert_eq!(p.h, ids);
    assert_eq!(p.w, ids);
    assert_eq!(p.rope_delta, 0);
}

#[test]
fn empty_sequence() {
    let p = positions_for_sequence(&[], &[], &[], None, &cfg(2)).unwrap();
    assert!(p.is_empty());
    assert_eq!(p.rope_delta, 0);
}

#[test]
fn padded_batch_by_hand() {
    // Row 0 left-padded, row 1 right-padded; the image of row 1 is grid row 1.
    let ids: Vec<i64> = vec![0, 0, 5, IMAGE, 6, 7, 8, IMAGE, IMAGE, 0];
    let mask: Vec<i32> = vec![0, 0, 1, 1, 1, 1, 1, 1, 1, 0];
    let images = [GridThw::new(1, 2, 2), GridThw::new(2, 2, 2)];
    let input = BatchInput {
        input_ids: &ids,
        batch: 2,
        seq: 5,
        kinds: TokenKinds::FromIds,
        attention_mask: Some(&mask),
        image_grid_thw: Some(&images),
        video_grid_thw: None,
        second_per_grid_ts: None,
    };
    let mut out = vec![-1i64; 30];
    let mut deltas = vec![-99i64; 2];
    batch_positions(&input, &cfg(2), &mut out, &mut deltas).unwrap();
    // t plane, h plane, w plane; each [2, 5].
    assert_eq!(&out[0..10], &[0, 0, 0, 1, 2, 0, 1, 2, 3, 0]);
    assert_eq!(&out[10..20], &[0, 0, 0, 1, 2, 0, 1, 2, 2, 0]);
    assert_eq!(&out[20..30], &[0, 0, 0, 1, 2, 0, 1, 2, 2, 0]);
    assert_eq!(deltas, vec![0, 0]);
}

// ---------------------------------------------------------------- the reference

/// A literal re-statement of transformers' `get_rope_index`: drop masked tokens, group
/// consecutive equal token types, text -> arange, vision -> meshgrid of the next grid.
fn reference(
    rows: &[Vec<i64>],
    masks: &[Vec<bool>],
    images: &[GridThw],
    videos: &[GridThw],
    intervals: &[TimeInterval],
    merge: i64,
) -> (Vec<Vec<[i64; 3]>>, Vec<i64>) {
    let mut image_iter = images.iter();
    let mut video_iter = videos.iter().zip(intervals.iter());
    let mut out = Vec::new();
    let mut deltas = Vec::new();
    for (row, mask) in rows.iter().zip(masks) {
        let kept: Vec<(usize, i64)> = row
            .iter()
            .enumerate()
            .filter(|(c, _)| mask[*c])
            .map(|(c, &id)| (c, id))
            .collect();
        let kind = |id: i64| {
            if id == IMAGE {
                1
            } else if id == VIDEO {
                2
            } else {
                0
            }
        };
        let mut groups: Vec<(i32, usize)> = Vec::new();
        for &(_, id) in &kept {
            match groups.last_mut() {
                Some((k, n)) if *k == kind(id) => *n += 1,
                _ => groups.push((kind(id), 1)),
            }
        }
        let mut llm: Vec<[i64; 3]> = Vec::new();
        let mut current = 0i64;
        for (k, n) in groups {
            if k == 0 {
                for i in 0..n as i64 {
                    llm.push([current + i; 3]);
                }
                current += n as i64;
            } else {
                let (grid, interval) = if k == 1 {
                    (*image_iter.next().unwrap(), TimeInterval::Int(1))
                } else {
                    let (g, i) = video_iter.next().unwrap();
                    (*g, *i)
                };
                let (t, h, w) = (grid.t, grid.h / merge, grid.w / merge);
                let temporal: Vec<i64> = (0..t).map(|i| interval.scale(i)).collect();
                let height: Vec<i64> = (0..h).map(|i| i + current).collect();
                let width: Vec<i64> = (0..w).map(|i| i + current).collect();
                for &pt in &temporal {
                    for &ph in &height {
                        for &pw in &width {
                            llm.push([pt + current, ph, pw]);
                        }
                    }
                }
                current += grid.h.max(grid.w) / merge;
            }
        }
        let mut full = vec![[0i64; 3]; row.len()];
        for ((col, _), pos) in kept.iter().zip(&llm) {
            full[*col] = *pos;
        }
        let max = llm.iter().flat_map(|p| p.iter().copied()).max();
        deltas.push(max.map_or(0, |m| m + 1 - kept.len() as i64));
        out.push(full);
    }
    (out, deltas)
}

// ---------------------------------------------------------------- random batches

#[derive(Debug, Clone)]
enum Piece {
    Text(Vec<i64>),
    Image(GridThw),
    Video(GridThw),
}

#[derive(Debug, Clone)]
struct Case {
    merge: i64,
    rows: Vec<Vec<Piece>>,
    /// Padding per row: (left, right, holes inside the sequence).
    pads: Vec<(usize, usize, Vec<usize>)>,
    qwen2_5: bool,
    seconds: Vec<f32>,
}

fn grid_strategy(merge: i64) -> impl Strategy<Value = GridThw> {
    // Heights / widths not divisible by merge too: transformers floors them.
    (1i64..4, merge..5 * merge, merge..5 * merge).prop_map(|(t, h, w)| GridThw::new(t, h, w))
}

fn piece_strategy(merge: i64) -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => prop::collection::vec(0i64..1000, 0..12).prop_map(Piece::Text),
        2 => grid_strategy(merge).prop_map(|g| Piece::Image(GridThw::new(1, g.h, g.w))),
        1 => grid_strategy(merge).prop_map(Piece::Video),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (1i64..4, 1usize..5, any::<bool>()).prop_flat_map(|(merge, batch, qwen2_5)| {
        let rows = prop::collection::vec(prop::collection::vec(piece_strategy(merge), 0..8), batch);
        let pads = prop::collection::vec(
            (
                0usize..4,
                0usize..4,
                prop::collection::vec(0usize..64, 0..3),
            ),
            batch,
        );
        let seconds = prop::collection::vec(0.05f32..3.0, 64);
        (Just(merge), rows, pads, Just(qwen2_5), seconds).prop_map(
            |(merge, rows, pads, qwen2_5, seconds)| Case {
                merge,
                rows,
                pads,
                qwen2_5,
                seconds,
            },
        )
    })
}

/// Token ids of a row: every vision input is wrapped in vision_start / vision_end, as the
/// chat template does, so two inputs never form one run.
fn row_ids(pieces: &[Piece], merge: i64) -> Vec<i64> {
    let mut ids = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => ids.extend(t),
            Piece::Image(g) | Piece::Video(g) => {
                let id = if matches!(piece, Piece::Image(_)) {
                    IMAGE
                } else {
                    VIDEO
                };
                ids.push(VISION_START);
                ids.extend(std::iter::repeat_n(id, g.token_count(merge).unwrap()));
                ids.push(VISION_END);
            }
        }
    }
    ids
}

struct Built {
    ids: Vec<i64>,
    mask: Vec<bool>,
    seq: usize,
    rows: Vec<Vec<i64>>,
    masks: Vec<Vec<bool>>,
    images: Vec<GridThw>,
    videos: Vec<GridThw>,
    per_row: Vec<(Vec<i64>, Vec<GridThw>, Vec<GridThw>)>,
}

fn build(case: &Case) -> Built {
    let contents: Vec<Vec<i64>> = case.rows.iter().map(|r| row_ids(r, case.merge)).collect();
    // Holes are masked-out tokens inserted inside the content (ids that would otherwise count).
    let mut rows = Vec::new();
    let mut masks = Vec::new();
    for (content, (left, right, holes)) in contents.iter().zip(&case.pads) {
        let mut ids = vec![0i64; *left];
        let mut mask = vec![false; *left];
        for (i, &id) in content.iter().enumerate() {
            if holes.contains(&i) {
                ids.push(IMAGE); // a masked image id must not count
                mask.push(false);
            }
            ids.push(id);
            mask.push(true);
        }
        ids.extend(std::iter::repeat_n(VIDEO, *right));
        mask.extend(std::iter::repeat_n(false, *right));
        rows.push(ids);
        masks.push(mask);
    }
    let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    for (ids, mask) in rows.iter_mut().zip(masks.iter_mut()) {
        // Right-pad to the common length.
        let extra = seq - ids.len();
        ids.extend(std::iter::repeat_n(0, extra));
        mask.extend(std::iter::repeat_n(false, extra));
    }
    let mut images = Vec::new();
    let mut videos = Vec::new();
    let mut per_row = Vec::new();
    for (pieces, content) in case.rows.iter().zip(&contents) {
        let (mut ri, mut rv) = (Vec::new(), Vec::new());
        for piece in pieces {
            match piece {
                Piece::Image(g) => ri.push(*g),
                Piece::Video(g) => rv.push(*g),
                Piece::Text(_) => {}
            }
        }
        images.extend(&ri);
        videos.extend(&rv);
        per_row.push((content.clone(), ri, rv));
    }
    Built {
        ids: rows.concat(),
        mask: masks.concat(),
        seq,
        rows,
        masks,
        images,
        videos,
        per_row,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn batch_equals_reference(case in case_strategy()) {
        let b = build(&case);
        let batch = case.rows.len();
        let config = MropeConfig {
            model_type: if case.qwen2_5 { ModelType::Qwen2_5Vl } else { ModelType::Qwen2Vl },
            tokens_per_second: TokensPerSecond::Int(2),
            ..cfg(case.merge)
        };
        let seconds: Vec<Seconds> = (0..b.videos.len())
            .map(|i| Seconds { value: SecondsValue::F32(case.seconds[i % case.seconds.len()]), from_tensor: true })
            .collect();
        let seconds_arg = if case.qwen2_5 { Some(seconds.as_slice()) } else { None };
        let intervals: Vec<TimeInterval> = (0..b.videos.len())
            .map(|i| config.video_interval(seconds_arg.map(|s| s[i])).unwrap())
            .collect();

        let input = BatchInput {
            input_ids: &b.ids,
            batch,
            seq: b.seq,
            kinds: TokenKinds::FromIds,
            attention_mask: Some(&b.mask),
            image_grid_thw: Some(&b.images),
            video_grid_thw: Some(&b.videos),
            second_per_grid_ts: seconds_arg,
        };
        let mut out = vec![7i64; 3 * batch * b.seq];
        let mut deltas = vec![7i64; batch];
        batch_positions(&input, &config, &mut out, &mut deltas).unwrap();

        let (expected, expected_deltas) =
            reference(&b.rows, &b.masks, &b.images, &b.videos, &intervals, case.merge);
        let plane = batch * b.seq;
        for row in 0..batch {
            for col in 0..b.seq {
                let got = [0, 1, 2].map(|a| out[a * plane + row * b.seq + col]);
                prop_assert_eq!(got, expected[row][col], "row {} col {}", row, col);
            }
        }
        prop_assert_eq!(&deltas, &expected_deltas);

        // The same through int32 output and explicit mm_token_type_ids.
        let types: Vec<i64> = b.ids.iter().map(|&id| if id == IMAGE { 1 } else if id == VIDEO { 2 } else { 0 }).collect();
        let ids32: Vec<i32> = b.ids.iter().map(|&id| id as i32).collect();
        let input32 = BatchInput {
            input_ids: &ids32[..],
            batch,
            seq: b.seq,
            kinds: TokenKinds::TypeIds(&types),
            attention_mask: Some(&b.mask[..]),
            image_grid_thw: Some(&b.images),
            video_grid_thw: Some(&b.videos),
            second_per_grid_ts: seconds_arg,
        };
        let mut out32 = vec![7i32; 3 * batch * b.seq];
        let mut deltas32 = vec![7i64; batch];
        batch_positions(&input32, &config, &mut out32, &mut deltas32).unwrap();
        prop_assert_eq!(out32.iter().map(|&v| v as i64).collect::<Vec<_>>(), out.clone());
        prop_assert_eq!(&deltas32, &deltas);

        // Each row alone (unpadded) through the single-sequence API, with its own grids.
        let mut video_offset = 0;
        for (row, (content, ri, rv)) in b.per_row.iter().enumerate() {
            let s = seconds_arg.map(|s| &s[video_offset..video_offset + rv.len()]);
            video_offset += rv.len();
            let p = positions_for_sequence(content, ri, rv, s, &config).unwrap();
            let kept: Vec<usize> = (0..b.seq).filter(|&c| b.masks[row][c]).collect();
            prop_assert_eq!(kept.len(), p.len());
            for (i, &col) in kept.iter().enumerate() {
                prop_assert_eq!(p.get(i).unwrap(), expected[row][col]);
            }
            prop_assert_eq!(p.rope_delta, deltas[row]);
        }
    }

    #[test]
    fn text_runs_count_up_by_one_and_resume_after_vision(pieces in prop::collection::vec(piece_strategy(2), 0..10)) {
        let ids = row_ids(&pieces, 2);
        let images: Vec<GridThw> = pieces.iter().filter_map(|p| if let Piece::Image(g) = p { Some(*g) } else { None }).collect();
        let videos: Vec<GridThw> = pieces.iter().filter_map(|p| if let Piece::Video(g) = p { Some(*g) } else { None }).collect();
        let segments = segments_for_sequence(&ids, &images, &videos, None, &cfg(2)).unwrap();
        let p = positions_for_segments(&segments, 2).unwrap();
        prop_assert_eq!(p.len(), ids.len());
        let mut offset = 0usize;
        let mut pos = 0i64;
        for segment in &segments {
            let n = segment.token_count(2).unwrap();
            match segment {
                Segment::Text(_) => {
                    for k in 0..n {
                        prop_assert_eq!(p.get(offset + k).unwrap(), [pos + k as i64; 3]);
                    }
                    pos += n as i64;
                }
                Segment::Image(g) | Segment::Video(g, _) => {
                    // Every axis stays inside [pos, pos + extent) and the block starts at pos.
                    prop_assert_eq!(p.get(offset).unwrap(), [pos; 3]);
                    for k in 0..n {
                        let [t, h, w] = p.get(offset + k).unwrap();
                        prop_assert!(t >= pos && t < pos + g.t);
                        prop_assert!(h >= pos && h < pos + g.h / 2);
                        prop_assert!(w >= pos && w < pos + g.w / 2);
                    }
                    pos += g.h.max(g.w) / 2;
                }
            }
            offset += n;
        }
        prop_assert_eq!(p.next_position, pos);
        let max = p.t.iter().chain(&p.h).chain(&p.w).copied().max();
        prop_assert_eq!(p.rope_delta, max.map_or(0, |m| m + 1 - ids.len() as i64));
    }

    #[test]
    fn smart_resize_invariants(h in 1i64..5000, w in 1i64..5000, min_k in 1i64..40, max_k in 1i64..2000) {
        let factor = 28;
        let (min_pixels, max_pixels) = (min_k * 784, max_k * 784 + min_k * 784);
        match smart_resize(h, w, factor, min_pixels, max_pixels) {
            Ok((rh, rw)) => {
                prop_assert!(h.max(w) as f64 / h.min(w) as f64 <= 200.0);
                prop_assert!(rh >= factor && rw >= factor);
                prop_assert_eq!(rh % factor, 0);
                prop_assert_eq!(rw % factor, 0);
                let settings = ImageSettings { patch_size: 14, merge_size: 2, min_pixels, max_pixels, ..Default::default() };
                prop_assert_eq!(image_grid_thw(h, w, &settings).unwrap(), [1, rh / 14, rw / 14]);
                prop_assert_eq!(image_token_count(h, w, &settings).unwrap(), rh * rw / (28 * 28));
            }
            Err(e) => {
                prop_assert!(h.max(w) as f64 / h.min(w) as f64 > 200.0, "{}", message(e));
            }
        }
    }
}

// ---------------------------------------------------------------- errors

fn grids_err(ids: &[i64], images: &[GridThw], videos: &[GridThw]) -> String {
    message(positions_for_sequence(ids, images, videos, None, &cfg(2)).unwrap_err())
}

#[test]
fn too_few_and_too_many_grids() {
    let ids = [1, IMAGE, 2, IMAGE, 3];
    let one = GridThw::new(1, 2, 2);
    assert!(grids_err(&ids, &[one], &[])
        .contains("image_grid_thw has 1 row(s) but the sequences hold 2 image block(s)"));
    assert!(grids_err(&ids, &[one, one, one], &[]).contains("image_grid_thw has 3 row(s)"));
    assert!(grids_err(&[1, VIDEO], &[], &[]).contains("video_grid_thw has 0 row(s)"));
    assert!(grids_err(&[1, 2], &[], &[one])
        .contains("video_grid_thw has 1 row(s) but the sequences hold 0"));
}

#[test]
fn block_token_count_must_match_grid() {
    let msg = grids_err(&[1, IMAGE, IMAGE, IMAGE, 2], &[GridThw::new(1, 4, 4)], &[]);
    assert!(msg.contains("image block 0"), "{msg}");
    assert!(msg.contains("has 3 tokens"), "{msg}");
    assert!(msg.contains("image_grid_thw[0] = (1, 4, 4)"), "{msg}");
    assert!(msg.contains("= 4"), "{msg}");
    // Two images without a separator are one run: it cannot match either grid.
    let one = GridThw::new(1, 2, 2);
    let msg = grids_err(&[IMAGE, IMAGE], &[one, one], &[]);
    assert!(
        msg.contains("image_grid_thw has 2 row(s) but the sequences hold 1"),
        "{msg}"
    );
}

#[test]
fn non_positive_grid_dims() {
    let msg = grids_err(&[IMAGE], &[GridThw::new(1, 4, 0)], &[]);
    assert_eq!(
        msg,
        "image_grid_thw[0] = (1, 4, 0): every grid dimension must be >= 1"
    );
    let msg = grids_err(&[VIDEO], &[], &[GridThw::new(-1, 2, 2)]);
    assert!(msg.starts_with("video_grid_thw[0] = (-1, 2, 2)"), "{msg}");
    let msg =
        message(positions_for_segments(&[Segment::Image(GridThw::new(1, 1, 4))], 2).unwrap_err());
    assert!(msg.contains("segments[0]"), "{msg}");
}

#[test]
fn second_per_grid_ts_checks() {
    let v = GridThw::new(2, 2, 2);
    let ids = [1, VIDEO, VIDEO, 2];
    let s = [Seconds::python_float(0.5)];
    let q25 = MropeConfig::qwen2_5_vl();
    let msg = message(positions_for_sequence(&ids, &[], &[v], Some(&[]), &q25).unwrap_err());
    assert!(
        msg.contains("second_per_grid_ts has 0 value(s) but video_grid_thw has 1 row(s)"),
        "{msg}"
    );
    let msg = message(positions_for_sequence(&ids, &[], &[v], Some(&s), &cfg(2)).unwrap_err());
    assert!(
        msg.contains("only used by model_type='qwen2_5_vl'"),
        "{msg}"
    );
    let nan = [Seconds::python_float(f64::NAN)];
    let msg = message(positions_for_sequence(&ids, &[], &[v], Some(&nan), &q25).unwrap_err());
    assert!(msg.starts_with("second_per_grid_ts[0]"), "{msg}");
    assert!(positions_for_sequence(&ids, &[], &[v], Some(&s), &q25).is_ok());
}

#[test]
fn batch_shape_checks() {
    let ids = [1i64, 2, 3, 4];
    let base = BatchInput::<i64, bool> {
        input_ids: &ids,
        batch: 2,
        seq: 2,
        kinds: TokenKinds::FromIds,
        attention_mask: None,
        image_grid_thw: None,
        video_grid_thw: None,
        second_per_grid_ts: None,
    };
    let mut out = vec![0i64; 12];
    let mut deltas = vec![0i64; 2];
    assert!(batch_positions(&base, &cfg(2), &mut out, &mut deltas).is_ok());
    let mask = [true; 3];
    let bad = BatchInput {
        attention_mask: Some(&mask),
        ..base
    };
    let msg = message(batch_positions(&bad, &cfg(2), &mut out, &mut deltas).unwrap_err());
    assert!(msg.starts_with("attention_mask has 3 elements"), "{msg}");
    let types = [0i64, 3, 0, 0];
    let bad = BatchInput {
        kinds: TokenKinds::TypeIds(&types),
        ..base
    };
    let msg = message(batch_positions(&bad, &cfg(2), &mut out, &mut deltas).unwrap_err());
    assert_eq!(
        msg,
        "mm_token_type_ids[0, 1] = 3: expected 0 (text), 1 (image) or 2 (video)"
    );
    let msg = message(batch_positions(&base, &cfg(0), &mut out, &mut deltas).unwrap_err());
    assert!(msg.starts_with("spatial_merge_size must be >= 1"), "{msg}");
    // Outputs untouched by a failed call.
    let mut out = vec![9i64; 12];
    let bad_ids = [1i64, IMAGE, 3, 4];
    let bad = BatchInput {
        input_ids: &bad_ids,
        ..base
    };
    assert!(batch_positions(&bad, &cfg(2), &mut out, &mut deltas).is_err());
    assert!(out.iter().all(|&v| v == 9));
}

#[test]
fn empty_batch_and_empty_rows() {
    let input = BatchInput::<i64, bool> {
        input_ids: &[],
        batch: 3,
        seq: 0,
        kinds: TokenKinds::FromIds,
        attention_mask: None,
        image_grid_thw: None,
        video_grid_thw: None,
        second_per_grid_ts: None,
    };
    let mut deltas = vec![5i64; 3];
    batch_positions::<i64, bool, i64>(&input, &cfg(2), &mut [], &mut deltas).unwrap();
    assert_eq!(deltas, vec![0, 0, 0]);
    // A fully masked row: zeros and delta 0.
    let ids = [1i64, 2, 3, 4];
    let mask = [false, false, true, true];
    let input = BatchInput {
        input_ids: &ids,
        batch: 2,
        seq: 2,
        attention_mask: Some(&mask[..]),
        ..input
    };
    let mut out = vec![5i64; 12];
    let mut deltas = vec![5i64; 2];
    batch_positions(&input, &cfg(2), &mut out, &mut deltas).unwrap();
    assert_eq!(out, vec![0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]);
    assert_eq!(deltas, vec![0, 0]);
}

// ---------------------------------------------------------------- time intervals

#[test]
fn time_interval_arithmetic_follows_the_input_dtype() {
    let k = TokensPerSecond::Int(2);
    let f32_tensor = Seconds {
        value: SecondsValue::F32(0.35),
        from_tensor: true,
    };
    assert_eq!(
        TimeInterval::qwen2_5_vl(k, f32_tensor).unwrap(),
        TimeInterval::F32(2.0 * 0.35f32)
    );
    let f64_tensor = Seconds {
        value: SecondsValue::F64(0.35),
        from_tensor: true,
    };
    assert_eq!(
        TimeInterval::qwen2_5_vl(k, f64_tensor).unwrap(),
        TimeInterval::F64(0.7)
    );
    // A Python float: the product is a Python float, then used in float32 arithmetic.
    assert_eq!(
        TimeInterval::qwen2_5_vl(k, Seconds::python_float(0.35)).unwrap(),
        TimeInterval::F32(0.7f64 as f32)
    );
    let int = Seconds {
        value: SecondsValue::Int(3),
        from_tensor: false,
    };
    assert_eq!(
        TimeInterval::qwen2_5_vl(k, int).unwrap(),
        TimeInterval::Int(6)
    );
    let int_tensor_float_tps = Seconds {
        value: SecondsValue::Int(3),
        from_tensor: true,
    };
    assert_eq!(
        TimeInterval::qwen2_5_vl(TokensPerSecond::Float(0.5), int_tensor_float_tps).unwrap(),
        TimeInterval::F32(1.5)
    );
    let half = Seconds {
        value: SecondsValue::F16(f16::from_f32(0.3)),
        from_tensor: true,
    };
    assert!(matches!(
        TimeInterval::qwen2_5_vl(k, half).unwrap(),
        TimeInterval::F16(_)
    ));
    let b = Seconds {
        value: SecondsValue::BF16(bf16::from_f32(0.3)),
        from_tensor: true,
    };
    assert!(matches!(
        TimeInterval::qwen2_5_vl(k, b).unwrap(),
        TimeInterval::BF16(_)
    ));

    // Truncation happens after rounding to the arithmetic's precision.
    assert_eq!(
        TimeInterval::F32(0.1f32).scale(10),
        (10.0f32 * 0.1f32) as i64
    );
    assert_eq!(TimeInterval::F64(0.1).scale(30), (30.0f64 * 0.1) as i64);
    assert_eq!(TimeInterval::Int(3).scale(4), 12);
}

// ---------------------------------------------------------------- smart_resize

#[test]
fn smart_resize_by_hand() {
    // Values of Qwen2VLImageProcessor on images of these sizes (defaults).
    let d = ImageSettings::default();
    assert_eq!(image_grid_thw(4000, 3000, &d).unwrap(), [1, 82, 60]);
    assert_eq!(image_grid_thw(1, 1, &d).unwrap(), [1, 4, 4]);
    assert_eq!(image_grid_thw(13, 4, &d).unwrap(), [1, 8, 4]);
    assert_eq!(image_grid_thw(1, 200, &d).unwrap(), [1, 2, 58]);
    assert_eq!(image_token_count(4000, 3000, &d).unwrap(), 82 * 60 / 4);
    // 240 x 320 (TVC's CLEVR image): round(240/28)=9 -> 252, round(320/28)=11 -> 308.
    assert_eq!(
        smart_resize(240, 320, 28, 3136, 1003520).unwrap(),
        (252, 308)
    );
    // Python's round is half-to-even: 42 / 28 = 1.5 -> 2, 70 / 28 = 2.5 -> 2.
    assert_eq!(smart_resize(42, 70, 28, 1, 1 << 40).unwrap(), (56, 56));
}

#[test]
fn smart_resize_errors() {
    let msg = message(smart_resize(1, 201, 28, 3136, 1003520).unwrap_err());
    assert!(msg.contains("aspect ratio must be at most 200"), "{msg}");
    assert!(smart_resize(1, 200, 28, 3136, 1003520).is_ok());
    for (args, name) in [
        ((0, 5, 28, 1, 1), "height"),
        ((5, -1, 28, 1, 1), "width"),
        ((5, 5, 0, 1, 1), "factor"),
        ((5, 5, 28, 0, 1), "min_pixels"),
        ((5, 5, 28, 1, -3), "max_pixels"),
    ] {
        let (h, w, f, lo, hi) = args;
        let msg = message(smart_resize(h, w, f, lo, hi).unwrap_err());
        assert!(msg.starts_with(&format!("{name} must be >= 1")), "{msg}");
    }
    let msg = message(smart_resize(1 << 27, 1 << 27, 28, 3136, 1003520).unwrap_err());
    assert!(msg.contains("2**53"), "{msg}");
    let bad = ImageSettings {
        patch_size: 0,
        ..ImageSettings::default()
    };
    assert!(message(image_token_count(10, 10, &bad).unwrap_err())
        .starts_with("patch_size must be >= 1"));
}

#[test]
fn qwen3_vl_and_glm4v_videos_by_hand() {
    // Qwen3-VL: a video (2, 2, 4), merge 2, is two frame blocks of 1 x 1 x 2 tokens with a
    // timestamp token between them; each block restarts t / h / w at its own start.
    let q3 = MropeConfig::for_model(ModelType::Qwen3Vl);
    let ids = [7, VIDEO, VIDEO, 8, VIDEO, VIDEO, 9];
    let p = positions_for_sequence(&ids, &[], &[GridThw::new(2, 2, 4)], None, &q3).unwrap();
    assert_eq!(p.t, vec![0, 1, 1, 3, 4, 4, 6]);
    assert_eq!(p.h, vec![0, 1, 1, 3, 4, 4, 6]);
    assert_eq!(p.w, vec![0, 1, 2, 3, 4, 5, 6]);
    // Without the split (Qwen2-VL) the two runs would need two video rows.
    assert!(positions_for_sequence(&ids, &[], &[GridThw::new(2, 2, 4)], None, &cfg(2)).is_err());

    // GLM-4.1V: image tokens inside <|begin_of_video|> ... <|end_of_video|> are video frames.
    let glm = MropeConfig::for_model(ModelType::Glm4v);
    let (im, bv, ev) = (151343, 151341, 151342);
    let ids = [1, im, im, 2, bv, im, im, 3, im, im, ev, 4];
    let image = [GridThw::new(1, 2, 4)];
    let video = [GridThw::new(2, 2, 4)];
    let p = positions_for_sequence(&ids, &image, &video, None, &glm).unwrap();
    assert_eq!(p.w, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    assert_eq!(p.h, vec![0, 1, 1, 3, 4, 5, 5, 7, 8, 8, 10, 11]);
    // Without the markers' ids the kinds cannot be told.
    let no_markers = MropeConfig {
        video_start_token_id: None,
        ..glm
    };
    let err = positions_for_sequence(&ids, &image, &video, None, &no_markers).unwrap_err();
    assert!(message(err).contains("needs video_start_token_id"));
}

#[test]
fn model_type_names_round_trip_and_unknown_lists_all() {
    for m in ModelType::ALL {
        assert_eq!(ModelType::parse(m.name()).unwrap(), m);
    }
    let msg = message(ModelType::parse("llava").unwrap_err());
    for m in ModelType::ALL {
        assert!(msg.contains(&format!("'{}'", m.name())), "{msg}");
    }
}
