//! DVR insertion and samples against independent re-statements: reflection points from
//! fancy-regex `(?i)(?<!\w)phrase(?!\w)` and the sentence rule written again here, on the real
//! Qwen2 tokenizer and long-CoT traces; samples (labels, positions, truncation) checked against
//! their definition; the patch layout and the block finder on random inputs.

mod common;

use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use tvc_rs::dvr::{
    answer_cut, downscaled_size, infer_seqlen, insert_text, plan_insertions, snap_cut,
    vision_blocks, write_patches, write_patches_many, ChatFormat, ImageU8, PatchSettings, Policy,
    SampleBuilder, VisionTokens, IGNORE_INDEX, QWEN2_VL_SYSTEM,
};
use tvc_rs::rope::{
    image_grid_thw, positions_for_sequence, GridThw, ImageSettings, ModelType, MropeConfig,
};
use tvc_rs::triggers::{Detector, DEFAULT_PHRASES};

fn detector() -> Option<Arc<Detector>> {
    static DETECTOR: OnceLock<Option<Arc<Detector>>> = OnceLock::new();
    DETECTOR
        .get_or_init(|| {
            let path = common::assets()?.join("qwen2-vl/tokenizer.json");
            Some(Arc::new(
                Detector::from_path(&path, None).expect("the real tokenizer loads"),
            ))
        })
        .clone()
}

/// (question, answer, image size if known) of the real traces.
fn traces() -> Vec<(String, String, Option<(i64, i64)>)> {
    let Some(assets) = common::assets() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for file in [
        "traces/emma_gemini2_flash_thinking_exp_1219.jsonl",
        "traces/qwen_blog_qvq72b_qwq32b_official.jsonl",
        "traces/marco_o1_cot_demo.jsonl",
        "traces/vlaa_thinking_readme_deepseek_r1.jsonl",
    ] {
        let text = std::fs::read_to_string(assets.join(file)).unwrap();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let answer = record["response"].as_str().unwrap_or_default().to_string();
            let question = record["question"].as_str().unwrap_or_default().to_string();
            // Image sizes are not in the traces; a fixed set of real MATH-V sizes stands in.
            let size = [(477, 545), (212, 1313), (510, 897), (135, 557), (324, 724)][out.len() % 5];
            out.push((question, answer, Some(size)));
        }
    }
    out
}

/// Reflection hits (char start, char end) by the regex reference.
fn reference_hits(text: &str) -> Vec<(usize, usize)> {
    static PATTERNS: OnceLock<Vec<fancy_regex::Regex>> = OnceLock::new();
    let patterns = PATTERNS.get_or_init(|| {
        DEFAULT_PHRASES
            .iter()
            .map(|p| {
                fancy_regex::Regex::new(&format!(r"(?i)(?<!\w){}(?!\w)", fancy_regex::escape(p)))
                    .unwrap()
            })
            .collect()
    });
    let mut out = Vec::new();
    for re in patterns {
        for m in re.find_iter(text) {
            let m = m.unwrap();
            let start = text[..m.start()].chars().count();
            out.push((start, start + m.as_str().chars().count()));
        }
    }
    out.sort_by_key(|&(s, e)| (e, s));
    out
}

/// The sentence rule, written again: from `from`, the first `.`/`!`/`?` followed (after closing
/// quotes, brackets or `*`) by whitespace; a CJK full stop, question or exclamation mark (after
/// closers); or a line break (the point before it). None at the end, or if only whitespace follows.
fn reference_sentence_end(chars: &[char], from: usize) -> Option<usize> {
    let py_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    let closer = |c: char| "\"'\u{201d}\u{2019})]}\u{bb}*".contains(c);
    let mut point = None;
    for i in from..chars.len() {
        let c = chars[i];
        if c == '\n' {
            point = Some(i);
            break;
        }
        if "\u{3002}\u{ff01}\u{ff1f}.!?".contains(c) {
            let mut j = i + 1;
            while j < chars.len() && closer(chars[j]) {
                j += 1;
            }
            if "\u{3002}\u{ff01}\u{ff1f}".contains(c) || j == chars.len() || py_space(chars[j]) {
                point = Some(j);
                break;
            }
        }
    }
    let p = point?;
    if chars[p..].iter().all(|&c| py_space(c)) {
        None
    } else {
        Some(p)
    }
}

#[test]
fn insertions_follow_the_policy_on_real_traces() {
    let Some(detector) = detector() else { return };
    let traces = traces();
    assert!(traces.len() > 500);
    let policies = [
        Policy::default(),
        Policy {
            max_insertions: None,
            min_gap: 0,
            skip_first: 0,
            ..Policy::default()
        },
        Policy {
            max_insertions: Some(2),
            min_gap: 500,
            skip_first: 300,
            bridge: Some(" Let me look again:".into()),
            ..Policy::default()
        },
    ];
    let mut total = 0;
    for (_, answer, _) in &traces {
        let chars: Vec<char> = answer.chars().collect();
        let hits = reference_hits(answer);
        let ids = detector
            .vocab()
            .tokenizer()
            .encode_char_offsets(answer.as_str(), false)
            .unwrap();
        let starts: Vec<usize> = ids.get_offsets().iter().map(|o| o.0).collect();
        for policy in &policies {
            let insertions = plan_insertions(&detector, answer, policy).unwrap();
            let mut previous: Option<usize> = None;
            // Every candidate point in order (one per sentence holding a hit).
            let mut candidates: Vec<(usize, (usize, usize))> = Vec::new();
            for &(s, e) in &hits {
                if let Some(p) = reference_sentence_end(&chars, e) {
                    if candidates.last().is_none_or(|&(q, _)| p > q) {
                        candidates.push((p, (s, e)));
                    }
                }
            }
            // The greedy choice, restated.
            let mut expected = Vec::new();
            for &(p, hit) in &candidates {
                let token = starts.iter().filter(|&&s| s < p).count();
                if token < policy.skip_first || previous.is_some_and(|q| token - q < policy.min_gap)
                {
                    continue;
                }
                if policy.max_insertions.is_some_and(|m| expected.len() >= m) {
                    break;
                }
                previous = Some(token);
                expected.push((p, token, hit));
            }
            let got: Vec<_> = insertions
                .iter()
                .map(|i| {
                    (
                        i.char_index,
                        i.token_index,
                        (i.hit.char_start as usize, i.hit.char_end as usize),
                    )
                })
                .collect();
            assert_eq!(got, expected);
            for ins in &insertions {
                // After a real reflection phrase, inside its sentence.
                assert!(hits.contains(&(ins.hit.char_start as usize, ins.hit.char_end as usize)));
                assert!(ins.char_index >= ins.hit.char_end as usize);
                assert_eq!(answer[..ins.byte_index].chars().count(), ins.char_index);
            }
            for pair in insertions.windows(2) {
                assert!(pair[1].token_index - pair[0].token_index >= policy.min_gap);
            }
            // Text outside the insertions is unchanged byte for byte.
            let text = policy.insertion_text(1);
            let inserted = insert_text(answer, &insertions, &text);
            let mut rebuilt = String::new();
            let mut at = 0;
            for (k, ins) in insertions.iter().enumerate() {
                let here = ins.byte_index + k * text.len();
                assert_eq!(&inserted[here..here + text.len()], text);
                rebuilt.push_str(&inserted[at..here]);
                at = here + text.len();
            }
            rebuilt.push_str(&inserted[at..]);
            assert_eq!(rebuilt.as_bytes(), answer.as_bytes());
            total += insertions.len();
        }
    }
    assert!(total > 100, "the traces have reflection points: {total}");
}

fn builder(policy: Policy) -> Option<SampleBuilder> {
    let detector = detector()?;
    Some(
        SampleBuilder::new(
            detector,
            policy,
            ImageSettings::default(),
            ChatFormat::qwen2_vl(QWEN2_VL_SYSTEM),
            ModelType::Qwen2Vl,
        )
        .unwrap(),
    )
}

#[test]
fn samples_mask_vision_labels_and_have_get_rope_index_positions() {
    let Some(b) = builder(Policy {
        min_gap: 50,
        ..Policy::default()
    }) else {
        return;
    };
    let vision = b.vision;
    let mut with_copies = 0;
    for (question, answer, size) in traces().iter().take(400) {
        let sizes: Vec<(i64, i64)> = size.iter().copied().collect();
        let sample = b.build(question, &sizes, answer, None).unwrap();
        let ids: Vec<i64> = sample.input_ids.iter().map(|&i| i as i64).collect();
        assert_eq!(sample.labels.len(), ids.len());
        for (i, (&id, &label)) in ids.iter().zip(&sample.labels).enumerate() {
            if i < sample.prompt_tokens || vision.is_visual(id) {
                assert_eq!(label, IGNORE_INDEX, "token {i}");
            } else {
                assert_eq!(label, id, "token {i}");
            }
        }
        // Blocks: whole, one per image, with the grid's token count; copies downscaled.
        let blocks = vision_blocks(&ids, &vision);
        assert_eq!(blocks.len(), sample.images.len());
        for (block, image) in blocks.iter().zip(&sample.images) {
            assert!(block.complete);
            assert_eq!(block.pads(), image.grid.token_count(2).unwrap());
            let (h, w) = if image.inserted {
                downscaled_size(sizes[image.source].0, sizes[image.source].1, 4).unwrap()
            } else {
                sizes[image.source]
            };
            assert_eq!((image.height, image.width), (h, w));
            let g = image_grid_thw(h, w, &ImageSettings::default()).unwrap();
            assert_eq!(image.grid, GridThw::new(g[0], g[1], g[2]));
            if image.inserted {
                assert!(block.start >= sample.prompt_tokens);
            }
        }
        with_copies += (sample.kept_images > 0) as usize;
        assert_eq!(sample.kept_images, sample.planned_images);
        assert_eq!(sample.cut_tokens, 0);
        // Positions: get_rope_index's rule (positions_for_sequence is checked against
        // transformers in tests/rope.rs and tests/test_rope.py).
        let grids: Vec<GridThw> = sample.images.iter().map(|i| i.grid).collect();
        let expected =
            positions_for_sequence(&ids, &grids, &[], None, &MropeConfig::qwen2_vl()).unwrap();
        assert_eq!(sample.positions, expected);
        // The answer text: the original with the bridge and placeholders at the insertion points.
        assert_eq!(
            sample.answer_text,
            b.insert(answer, &sample.insertions, sizes.len())
        );
    }
    assert!(with_copies > 20);
}

/// LLaMA-Factory 0.9.5's `infer_seqlen`, written again (Python's float arithmetic).
fn lf_infer_seqlen(source: usize, target: usize, cutoff: usize) -> (usize, usize) {
    let max_target = if target * 2 < cutoff {
        cutoff
    } else if source * 2 < cutoff {
        cutoff - source
    } else {
        (cutoff as f64 * (target as f64 / (source + target) as f64)) as usize
    };
    let new_target = max_target.min(target);
    let new_source = cutoff.saturating_sub(new_target).min(source);
    (new_source, new_target)
}

/// `(start, end)` of every `<|vision_start|> pads <|vision_end|>` run of `ids`, by a plain scan.
fn reference_blocks(ids: &[i64], v: &VisionTokens) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut open = None;
    for (i, &id) in ids.iter().enumerate() {
        if id == v.vision_start {
            open = Some(i);
        } else if id == v.vision_end {
            if let Some(s) = open.take() {
                out.push((s, i + 1));
            }
        }
    }
    out
}

/// The truncated sample by the issue's rule, from the untruncated one: cut as LLaMA-Factory
/// cuts; the prompt keeps its image whole; an answer cut inside a copy (or inside the bridge
/// tokens right before it) moves to its start. `None` when the prompt's image does not fit.
/// Returns (ids, prompt tokens kept, copies kept).
fn reference_truncation(
    full: &[i64],
    prompt: usize,
    cutoff: usize,
    v: &VisionTokens,
    bridge: &[i64],
) -> Option<(Vec<i64>, usize, usize)> {
    let (source, target) = (&full[..prompt], &full[prompt..]);
    let (mut s_keep, mut t_keep) = lf_infer_seqlen(source.len(), target.len(), cutoff);
    let prompt_end = reference_blocks(source, v).last().map_or(0, |b| b.1);
    if s_keep < prompt_end {
        if prompt_end > cutoff {
            return None;
        }
        s_keep = prompt_end;
        t_keep = t_keep.min(cutoff - prompt_end);
    }
    let blocks = reference_blocks(target, v);
    for &(s, e) in &blocks {
        let unit =
            if !bridge.is_empty() && s >= bridge.len() && target[s - bridge.len()..s] == *bridge {
                s - bridge.len()
            } else {
                s
            };
        if unit < t_keep && t_keep < e {
            t_keep = unit;
        }
    }
    let kept = blocks.iter().filter(|b| b.1 <= t_keep).count();
    let mut ids = source[..s_keep].to_vec();
    ids.extend_from_slice(&target[..t_keep]);
    Some((ids, s_keep, kept))
}

#[test]
fn truncation_cuts_first_and_keeps_every_copy_before_the_cut() {
    let bridge_text = " Let me look at the image again:";
    let Some(plain) = builder(Policy {
        min_gap: 30,
        skip_first: 0,
        max_insertions: Some(6),
        ..Policy::default()
    }) else {
        return;
    };
    let bridged = SampleBuilder {
        policy: Policy {
            bridge: Some(bridge_text.to_string()),
            ..plain.policy.clone()
        },
        ..plain.clone()
    };
    let vision = plain.vision;
    let bridge_ids: Vec<i64> = plain
        .detector
        .vocab()
        .encode(bridge_text)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let (mut checked, mut straddled, mut bridges_dropped, mut kept_with_text_cut) = (0, 0, 0, 0);
    for (b, bridge) in [(&plain, &[][..]), (&bridged, &bridge_ids[..])] {
        for (question, answer, size) in traces().iter().take(60) {
            let sizes: Vec<(i64, i64)> = size.iter().copied().collect();
            let full = b.build(question, &sizes, answer, None).unwrap();
            if full.planned_images == 0 {
                continue;
            }
            let full_ids: Vec<i64> = full.input_ids.iter().map(|&i| i as i64).collect();
            let n = full_ids.len();
            let copies: Vec<(usize, usize)> =
                reference_blocks(&full_ids[full.prompt_tokens..], &vision);
            // Cutoffs through the middle of each copy, just before and after it, and round ones.
            let mut cutoffs = vec![n, n - 1, n - 40, n / 2, 420];
            for &(s, e) in &copies {
                let at = full.prompt_tokens + s;
                cutoffs.extend([at + (e - s) / 2, at, at + e - s, at.saturating_sub(3)]);
            }
            for cutoff in cutoffs {
                let result = b.build(question, &sizes, answer, Some(cutoff));
                let expected =
                    reference_truncation(&full_ids, full.prompt_tokens, cutoff, &vision, bridge);
                let (sample, (ids_ref, prompt_ref, kept_ref)) = match (result, expected) {
                    (Err(e), None) => {
                        assert!(e.to_string().contains("cutoff"), "{e}");
                        continue;
                    }
                    (Ok(s), Some(r)) => (s, r),
                    (r, e) => panic!("cutoff {cutoff}: {r:?} vs reference {e:?}"),
                };
                checked += 1;
                let ids: Vec<i64> = sample.input_ids.iter().map(|&i| i as i64).collect();
                assert_eq!(ids, ids_ref, "cutoff {cutoff}");
                assert!(ids.len() <= cutoff);
                assert_eq!(sample.prompt_tokens, prompt_ref);
                assert_eq!(sample.kept_images, kept_ref, "cutoff {cutoff}");
                assert_eq!(sample.cut_tokens, n - ids.len());
                // Every block whole, one image per block, the copies the first ones.
                let blocks = vision_blocks(&ids, &vision);
                assert!(blocks.iter().all(|b| b.complete));
                assert_eq!(blocks.len(), sample.images.len());
                assert_eq!(sample.images, full.images[..blocks.len()].to_vec());
                if copies.iter().any(|&(s, e)| {
                    let (s, e) = (full.prompt_tokens + s, full.prompt_tokens + e);
                    s < cutoff && cutoff < e
                }) && ids.len() > full.prompt_tokens
                {
                    straddled += 1;
                }
                if !bridge.is_empty() && ids.len() < n && ids.ends_with(bridge) {
                    panic!("cutoff {cutoff}: the kept text ends in a bridge without its image");
                }
                if !bridge.is_empty()
                    && kept_ref < full.planned_images
                    && ids.len() + bridge.len() <= n
                    && full_ids[ids.len()..].starts_with(bridge)
                {
                    bridges_dropped += 1;
                }
                if sample.kept_images > 0 && sample.cut_tokens > 0 {
                    kept_with_text_cut += 1;
                }
                // The answer text holds exactly the kept copies.
                assert_eq!(
                    sample.answer_text.matches("<image>").count(),
                    sample.kept_images
                );
                let grids: Vec<GridThw> = sample.images.iter().map(|i| i.grid).collect();
                let expected =
                    positions_for_sequence(&ids, &grids, &[], None, &MropeConfig::qwen2_vl())
                        .unwrap();
                assert_eq!(sample.positions, expected);
                for (i, (&id, &label)) in ids.iter().zip(&sample.labels).enumerate() {
                    if i < sample.prompt_tokens || vision.is_visual(id) {
                        assert_eq!(label, IGNORE_INDEX);
                    } else {
                        assert_eq!(label, id);
                    }
                }
            }
        }
    }
    // The cases that matter happened: cuts through copies, bridges that went with their copy,
    // copies kept while the text was cut (what dropping copies first never did).
    assert!(checked > 100, "{checked}");
    assert!(straddled > 20, "{straddled}");
    assert!(bridges_dropped > 5, "{bridges_dropped}");
    assert!(kept_with_text_cut > 20, "{kept_with_text_cut}");
}

#[test]
fn bad_input_is_refused_with_the_argument_named() {
    let Some(b) = builder(Policy::default()) else {
        return;
    };
    let err = b
        .build("<image> and <image>", &[(100, 100)], "Wait. Fine.", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("question") && err.contains("2") && err.contains("1 image"),
        "{err}"
    );
    let err = b
        .build("q", &[(100, 100)], "Wait, <image> here.", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("answer") && err.contains("placeholder"),
        "{err}"
    );
    let err = b
        .build("q", &[(0, 100)], "Wait. Fine.", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("images[0]"), "{err}");
    let err = b
        .build("q", &[(10, 3000)], "Wait. Fine.", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("images[0]") && err.contains("aspect ratio"),
        "{err}"
    );
    let err = b
        .build("q", &[(100, 100)], "Wait. Fine.", Some(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cutoff"), "{err}");
    let err = b
        .build("q", &[(1000, 1000)], "Wait. Fine.", Some(100))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cutoff = 100") && err.contains("image"),
        "{err}"
    );
    let bad = Policy {
        downscale: 0,
        ..Policy::default()
    };
    assert!(bad.check().unwrap_err().to_string().contains("downscale"));
    let bad = Policy {
        bridge: Some("see <image>".into()),
        ..Policy::default()
    };
    assert!(bad.check().unwrap_err().to_string().contains("bridge"));
    assert!(downscaled_size(0, 5, 4)
        .unwrap_err()
        .to_string()
        .contains("height"));
}

#[test]
fn infer_seqlen_keeps_within_the_cutoff() {
    for s in 0..60 {
        for t in 0..60 {
            for c in 0..130 {
                let (ks, kt) = infer_seqlen(s, t, c);
                assert!(ks <= s && kt <= t && ks + kt <= c.max(0));
                if s + t <= c && !(2 * s >= c && 2 * t >= c) {
                    assert_eq!((ks, kt), (s, t));
                }
            }
        }
    }
}

fn naive_patches(
    data: &[u8],
    c: usize,
    h: usize,
    w: usize,
    at: impl Fn(usize, usize, usize) -> usize,
    mean: &[f32],
    std: &[f32],
    s: &PatchSettings,
) -> Vec<f32> {
    // The processor's view + permute, written as index arithmetic over (row, column).
    let (p, m, t) = (s.patch_size, s.merge_size, s.temporal_patch_size);
    let (gh, gw) = (h / p, w / p);
    let mut out = Vec::new();
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    for ch in 0..c {
                        for _ in 0..t {
                            for py in 0..p {
                                for px in 0..p {
                                    let y = (bh * m + mh) * p + py;
                                    let x = (bw * m + mw) * p + px;
                                    out.push((data[at(ch, y, x)] as f32 - mean[ch]) / std[ch]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn patches_equal_the_processor_layout(
        bh in 1usize..4, bw in 1usize..4, c in 1usize..4, p in 1usize..5, m in 1usize..3, t in 1usize..3,
        hwc in any::<bool>(), seed in any::<u64>(),
    ) {
        let s = PatchSettings { patch_size: p, merge_size: m, temporal_patch_size: t };
        let (h, w) = (bh * p * m, bw * p * m);
        let mut state = seed | 1;
        let data: Vec<u8> = (0..c * h * w).map(|_| { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state as u8 }).collect();
        let mean: Vec<f32> = (0..c).map(|i| 100.0 + 7.3 * i as f32).collect();
        let std: Vec<f32> = (0..c).map(|i| 60.0 + 3.1 * i as f32).collect();
        let strides = if hwc { [1, w * c, c] } else { [h * w, w, 1] };
        let image = ImageU8 { data: &data, channels: c, height: h, width: w, strides };
        let rows = tvc_rs::dvr::patch_rows(h, w, &s).unwrap();
        let mut out = vec![0f32; rows * s.row_len(c)];
        write_patches(&image, &mean, &std, &s, &mut out).unwrap();
        let expected = naive_patches(&data, c, h, w, |ch, y, x| ch * strides[0] + y * strides[1] + x * strides[2], &mean, &std, &s);
        prop_assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>());

        // Several images, one given twice (written once, then copied) and one other: each part
        // equals the image's patches alone.
        let other: Vec<u8> = data.iter().map(|v| v.wrapping_mul(31).wrapping_add(7)).collect();
        let second = ImageU8 { data: &other, ..image };
        let mut many = vec![f32::NAN; 3 * out.len()];
        write_patches_many(&[image, second, image], &mean, &std, &s, &mut many).unwrap();
        let mut second_alone = vec![0f32; out.len()];
        write_patches(&second, &mean, &std, &s, &mut second_alone).unwrap();
        let n = out.len();
        prop_assert_eq!(&many[..n], &out[..]);
        prop_assert_eq!(&many[n..2 * n], &second_alone[..]);
        prop_assert_eq!(&many[2 * n..], &out[..]);
        prop_assert!(write_patches_many(&[image], &mean, &std, &s, &mut many).is_err(), "a wrong output size is refused");
    }

    #[test]
    fn blocks_and_snapped_cuts(tokens in proptest::collection::vec(0u8..6, 0..80), cut in 0usize..90) {
        // 0,1: text; 2: vision_start; 3: image pad; 4: vision_end; 5: video pad.
        let v = VisionTokens { vision_start: 2, vision_end: 4, image_pad: 3, video_pad: 5 };
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let blocks = vision_blocks(&ids, &v);
        // Reference: maximal runs of one pad kind, extended by an adjacent start / end.
        let mut i = 0;
        let mut expected = Vec::new();
        while i < ids.len() {
            if ids[i] == 3 || ids[i] == 5 {
                let mut j = i;
                while j < ids.len() && ids[j] == ids[i] { j += 1; }
                let s = if i > 0 && ids[i - 1] == 2 { i - 1 } else { i };
                let e = if j < ids.len() && ids[j] == 4 { j + 1 } else { j };
                expected.push((s, e, i, j, ids[i] == 5, s < i && e > j));
                i = e.max(j);
            } else { i += 1; }
        }
        let got: Vec<_> = blocks.iter().map(|b| (b.start, b.end, b.pads_start, b.pads_end, b.video, b.complete)).collect();
        prop_assert_eq!(got, expected);
        let cut = cut.min(ids.len());
        let snapped = snap_cut(&blocks, cut);
        prop_assert!(snapped <= cut);
        prop_assert!(blocks.iter().all(|b| !b.is_split_by(snapped)));
        if blocks.iter().all(|b| !b.is_split_by(cut)) { prop_assert_eq!(snapped, cut); }
    }

    #[test]
    fn answer_cut_is_the_largest_cut_that_keeps_blocks_and_bridges_whole(
        tokens in proptest::collection::vec(0u8..6, 0..80), keep in 0usize..90, bridge_len in 0usize..3,
    ) {
        // 0,1: text (the bridge is `bridge_len` ones); 2: vision_start; 3: image pad; 4: vision_end; 5: video pad.
        let v = VisionTokens { vision_start: 2, vision_end: 4, image_pad: 3, video_pad: 5 };
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let bridge = vec![1i64; bridge_len];
        let got = answer_cut(&ids, keep, &v, &bridge);
        // Reference, by brute force: the largest c <= keep that splits no block and no
        // bridge-plus-block unit (units from the reference scan of blocks_and_snapped_cuts).
        let blocks = vision_blocks(&ids, &v);
        let units: Vec<(usize, usize)> = blocks.iter().map(|b| {
            let n = bridge.len();
            if n > 0 && b.start >= n && ids[b.start - n..b.start].iter().all(|&t| t == 1) { (b.start - n, b.end) } else { (b.start, b.end) }
        }).collect();
        let expected = (0..=keep.min(ids.len())).rev()
            .find(|&c| units.iter().all(|&(s, e)| !(s < c && c < e)))
            .unwrap();
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn qwen3_vl_samples_carry_the_reasoning_templates_empty_thought() {
    let Some(detector) = detector() else {
        return;
    };
    let b = SampleBuilder::new(
        detector.clone(),
        Policy::default(),
        ImageSettings::for_model(ModelType::Qwen3Vl),
        ChatFormat::for_model(ModelType::Qwen3Vl, None, None),
        ModelType::Qwen3Vl,
    )
    .unwrap();
    assert_eq!(b.images.patch_size, 16);
    let vocab = detector.vocab();
    let thought = vocab.encode("<think>\n\n</think>\n\n").unwrap();
    let plain = b
        .build("<image>Q?", &[(300, 400)], "The answer.", None)
        .unwrap();
    let prompt = plain.prompt_tokens;
    // No system block (LLaMA-Factory's qwen3_vl has no default system prompt).
    assert_eq!(
        &plain.input_ids[..3],
        &vocab.encode("<|im_start|>user\n").unwrap()[..3]
    );
    assert_eq!(
        &plain.input_ids[prompt..prompt + thought.len()],
        &thought[..]
    );
    // The empty thought is trained on (LLaMA-Factory puts it in the response).
    assert!(plain.labels[prompt..prompt + thought.len()]
        .iter()
        .all(|&l| l != IGNORE_INDEX));
    // An answer that has its own thought gets none.
    let own = b
        .build(
            "<image>Q?",
            &[(300, 400)],
            "<think>\nhm\n</think>\n\nThe answer.",
            None,
        )
        .unwrap();
    assert_eq!(
        &own.input_ids[prompt..],
        &vocab
            .encode("<think>\nhm\n</think>\n\nThe answer.<|im_end|>\n")
            .unwrap()[..]
    );
}
