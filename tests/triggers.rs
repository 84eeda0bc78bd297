//! Trigger detection against an independent reference (fancy-regex `(?i)(?<!\w)phrase(?!\w)` on
//! the decoded text) on the real Qwen2 tokenizer and traces, and the equality of the feeding
//! modes on random inputs.

mod common;

use std::sync::OnceLock;

use proptest::prelude::*;
use tvc_rs::pvc::{MonitorBatch, Schedule, ScheduleState};
use tvc_rs::triggers::{Detector, Hit, Vocab, DEFAULT_PHRASES};

fn detector() -> Option<&'static Detector> {
    static DETECTOR: OnceLock<Option<Detector>> = OnceLock::new();
    DETECTOR
        .get_or_init(|| {
            let path = common::assets()?.join("qwen2-vl/tokenizer.json");
            Some(Detector::from_path(&path, None).expect("the real tokenizer loads"))
        })
        .as_ref()
}

/// (phrase, char_start, char_end) of every reference match, sorted by end then phrase.
fn reference(text: &str, phrases: &[String]) -> Vec<(u32, u64, u64)> {
    let mut out = Vec::new();
    for (i, phrase) in phrases.iter().enumerate() {
        let re = fancy_regex::Regex::new(&format!(
            r"(?i)(?<!\w){}(?!\w)",
            fancy_regex::escape(phrase)
        ))
        .unwrap();
        for m in re.find_iter(text) {
            let m = m.unwrap();
            let start = text[..m.start()].chars().count() as u64;
            let end = start + m.as_str().chars().count() as u64;
            out.push((i as u32, start, end));
        }
    }
    out.sort_by_key(|&(p, _, e)| (e, p));
    out
}

fn key(hits: &[Hit]) -> Vec<(u32, u64, u64)> {
    let mut out: Vec<_> = hits
        .iter()
        .map(|h| (h.phrase, h.char_start, h.char_end))
        .collect();
    out.sort_by_key(|&(p, _, e)| (e, p));
    out
}

fn traces() -> Vec<String> {
    let Some(assets) = common::assets() else {
        return Vec::new();
    };
    let mut texts = Vec::new();
    for name in [
        "qwen_blog_qvq72b_qwq32b_official.jsonl",
        "marco_o1_cot_demo.jsonl",
        "emma_gemini2_flash_thinking_exp_1219.jsonl",
    ] {
        let content = std::fs::read_to_string(assets.join("traces").join(name)).unwrap();
        for line in content.lines().filter(|l| !l.trim().is_empty()) {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            texts.push(record["response"].as_str().unwrap().to_string());
        }
    }
    texts
}

#[test]
fn real_traces_match_the_reference_as_text_and_as_tokens() {
    let Some(detector) = detector() else { return };
    let phrases: Vec<String> = detector.phrases().to_vec();
    let mut total = 0;
    for text in traces().iter().step_by(3) {
        let expected = reference(text, &phrases);
        assert_eq!(key(&detector.find_text(text)), expected);
        let ids: Vec<i64> = detector
            .vocab()
            .encode(text)
            .unwrap()
            .iter()
            .map(|&i| i as i64)
            .collect();
        let hits = detector.find_tokens(&ids).unwrap();
        assert_eq!(key(&hits), expected);
        total += expected.len();
    }
    assert!(total > 100, "{total}");
}

#[test]
fn hit_is_reported_at_the_token_that_confirms_the_boundary() {
    let Some(detector) = detector() else { return };
    // "Wait" = 14190, "," = 11; "Wait" alone is only confirmed by the end of the text.
    let hits = detector.find_tokens(&[14190, 11, 1077, 752]).unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(
        (hits[0].token_index, hits[0].char_start, hits[0].char_end),
        (Some(1), 0, 4)
    );
    let hits = detector.find_tokens(&[14190]).unwrap();
    assert_eq!(hits[0].token_index, Some(0));
    let mut state = detector.new_state();
    let mut streamed = Vec::new();
    detector.push(&mut state, 14190, 0, &mut streamed).unwrap();
    assert!(
        streamed.is_empty(),
        "not confirmed before the next character"
    );
    // A special token (<|im_end|>) confirms it.
    detector.push(&mut state, 151645, 1, &mut streamed).unwrap();
    assert_eq!(streamed[0].token_index, Some(1));
}

#[test]
fn bad_phrases_and_ids_are_refused() {
    let Some(detector) = detector() else { return };
    let vocab: Vocab = detector.vocab().clone();
    let bad = |phrases: &[&str]| {
        let phrases: Vec<String> = phrases.iter().map(|s| s.to_string()).collect();
        Detector::new(vocab.clone(), Some(&phrases))
            .unwrap_err()
            .to_string()
    };
    assert!(bad(&[]).contains("at least one phrase"));
    assert!(bad(&["wait", " "]).contains("phrases[1]"));
    assert!(bad(&["Hmm", "hMM"]).contains("repeats phrases[0]"));
    assert!(detector
        .find_tokens(&[1, 151_657])
        .unwrap_err()
        .to_string()
        .contains("151657"));
    assert!(detector.find_tokens(&[-4]).is_err());
}

fn texts() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "wait",
        "Wait",
        " WAIT",
        "hmm",
        "double-check",
        "let me check",
        "waiting",
        "await",
        "_",
        " ",
        ",",
        ".",
        "\n",
        "é",
        "İ",
        "ı",
        "ſ",
        "你好",
        "😀",
        "x",
        "9",
        "re-examine",
        "hold on",
    ]);
    prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Text, whole token list, one token at a time, and a batch slot give the same hits.
    #[test]
    fn all_feeding_modes_agree(text in texts()) {
        let Some(detector) = detector() else { return Ok(()) };
        let phrases: Vec<String> = detector.phrases().to_vec();
        let expected = reference(&text, &phrases);
        prop_assert_eq!(key(&detector.find_text(&text)), expected.clone());
        let ids: Vec<i64> = detector.vocab().encode(&text).unwrap().iter().map(|&i| i as i64).collect();
        let whole = detector.find_tokens(&ids).unwrap();
        prop_assert_eq!(key(&whole), expected);

        let mut state = detector.new_state();
        let mut streamed = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            detector.push(&mut state, id, i as u64, &mut streamed).unwrap();
        }
        detector.finish(&mut state, ids.len().checked_sub(1).map(|i| i as u64), &mut streamed);
        prop_assert_eq!(&streamed, &whole);

        let mut batch = MonitorBatch::new(std::sync::Arc::new(detector.clone()), 3);
        batch.add(2, Schedule::default(), ScheduleState::default()).unwrap();
        batch.add(0, Schedule::default(), ScheduleState::default()).unwrap();
        batch.swap(0, 1).unwrap();
        for &id in &ids {
            batch.step(&[-1, 11, id], |_, _| {}).unwrap();
        }
        let unfinished: Vec<Hit> = whole.iter().copied().filter(|h| h.char_end < state.chars()).collect();
        prop_assert_eq!(&batch.get(2).unwrap().unwrap().hits, &unfinished);
    }
}

#[test]
fn default_phrases_are_distinct_and_found() {
    let Some(detector) = detector() else { return };
    assert_eq!(detector.phrases().len(), DEFAULT_PHRASES.len());
    let text = DEFAULT_PHRASES.join(". ");
    assert_eq!(detector.find_text(&text).len(), DEFAULT_PHRASES.len());
}
