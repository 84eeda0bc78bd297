//! The PVC schedule against a plain model of its documented rules, on random hit patterns.

use proptest::prelude::*;
use tvc_rs::pvc::{Reason, Schedule, ScheduleState};

/// The rules written out: before the first calibration at least `warmup` tokens; between two,
/// at least `min_gap`; at most `max` in all; at a hit, or once `period` tokens have passed
/// since the last calibration (or the start).
fn model(hits: &[bool], s: &Schedule) -> Vec<(usize, Reason)> {
    let mut made: Vec<(usize, Reason)> = Vec::new();
    let mut last: i64 = -1;
    for (i, &hit) in hits.iter().enumerate() {
        let since = i as i64 - last;
        let allowed = s.max_calibrations.is_none_or(|m| made.len() < m as usize)
            && (!made.is_empty() || i as u64 >= s.warmup)
            && (made.is_empty() || since as u64 >= s.min_gap);
        if !allowed {
            continue;
        }
        if hit {
            made.push((i, Reason::Trigger));
            last = i as i64;
        } else if s.period.is_some_and(|p| since as u64 >= p) {
            made.push((i, Reason::Period));
            last = i as i64;
        }
    }
    made
}

proptest! {
    #[test]
    fn schedule_follows_its_rules(
        hits in prop::collection::vec(prop::bool::weighted(0.05), 0..2000),
        warmup in 0u64..300, min_gap in 0u64..300,
        max in prop::option::of(0u32..8), period in prop::option::of(1u64..400),
    ) {
        let schedule = Schedule::new(warmup, min_gap, max, period).unwrap();
        let mut state = ScheduleState::default();
        let got: Vec<(usize, Reason)> = hits
            .iter()
            .enumerate()
            .filter_map(|(i, &hit)| state.on_token(&schedule, hit).map(|r| (i, r)))
            .collect();
        prop_assert_eq!(got, model(&hits, &schedule));
    }
}

#[test]
fn period_zero_is_refused() {
    assert!(Schedule::new(0, 0, None, Some(0))
        .unwrap_err()
        .to_string()
        .contains("period"));
}

mod common;

use std::sync::{Arc, OnceLock};

use tvc_rs::pvc::{Calibration, ListRead, MonitorBatch, OutOfVocab};
use tvc_rs::triggers::Detector;

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

const TEXT: &str = "So the area is 12. Wait, that doesn't seem right. Hmm, let me check the image again: \
                    the cube is red.\n\nAlternatively, we could count them; wait... hold on, on second thought, 3.";

/// Token ids of `TEXT` with `unknown` ids (outside the vocabulary) inserted before the tokens
/// whose indices `insert_before` lists; also returns, for every original token, its new index.
fn with_unknown(ids: &[i64], insert_before: &[usize], unknown: i64) -> (Vec<i64>, Vec<u64>) {
    let mut out = Vec::new();
    let mut new_index = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        out.extend(std::iter::repeat_n(
            unknown,
            insert_before.iter().filter(|&&b| b == i).count(),
        ));
        new_index.push(out.len() as u64);
        out.push(id);
    }
    (out, new_index)
}

fn run_steps(batch: &mut MonitorBatch, ids: &[i64]) -> Vec<Calibration> {
    let mut made = Vec::new();
    for &id in ids {
        batch.step(&[-1, id], |_, c| made.push(c)).unwrap();
    }
    made
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// An id the tokenizer does not know adds no text: the hits are those of the text without
    /// it, at the same tokens; the schedule counts it as a generated token.
    #[test]
    fn out_of_vocab_ids_count_as_tokens_without_text(
        insert_before in prop::collection::vec(0usize..60, 0..12),
        unknown in prop::sample::select(vec![151657i64, 151935, 152063, 1 << 40]),
        period in prop::option::of(5u64..40),
    ) {
        let Some(detector) = detector() else { return Ok(()) };
        let ids: Vec<i64> = detector.vocab().encode(TEXT).unwrap().into_iter().map(i64::from).collect();
        let (mixed, new_index) = with_unknown(&ids, &insert_before, unknown);

        let mut plain = MonitorBatch::with_out_of_vocab(detector.clone(), 2, OutOfVocab::NoText);
        plain.add(1, Schedule::default(), ScheduleState::default()).unwrap();
        run_steps(&mut plain, &ids);
        let mut lenient = MonitorBatch::with_out_of_vocab(detector.clone(), 2, OutOfVocab::NoText);
        lenient.add(1, Schedule::new(0, 0, None, period).unwrap(), ScheduleState::default()).unwrap();
        let made = run_steps(&mut lenient, &mixed);

        let expected: Vec<(u32, Option<u64>, u64, u64)> = plain.get(1).unwrap().unwrap().hits.iter()
            .map(|h| (h.phrase, h.token_index.map(|t| new_index[t as usize]), h.char_start, h.char_end)).collect();
        let got: Vec<(u32, Option<u64>, u64, u64)> = lenient.get(1).unwrap().unwrap().hits.iter()
            .map(|h| (h.phrase, h.token_index, h.char_start, h.char_end)).collect();
        prop_assert_eq!(got, expected);

        // The schedule saw every id: replaying its rules over the hit pattern of the mixed
        // sequence gives the same calibrations.
        let hit_at: Vec<bool> = (0..mixed.len() as u64)
            .map(|i| lenient.get(1).unwrap().unwrap().hits.iter().any(|h| h.token_index == Some(i))).collect();
        let schedule = Schedule::new(0, 0, None, period).unwrap();
        let want: Vec<(usize, Reason)> = model(&hit_at, &schedule);
        prop_assert_eq!(made.iter().map(|c| (c.token_index as usize, c.reason)).collect::<Vec<_>>(), want);
        prop_assert_eq!(lenient.get(1).unwrap().unwrap().state.tokens, mixed.len() as u64);
    }

    /// `feed` of a token list equals stepping the tokens one by one.
    #[test]
    fn feed_equals_steps(split in 0usize..60, min_gap in 0u64..20) {
        let Some(detector) = detector() else { return Ok(()) };
        let ids: Vec<i64> = detector.vocab().encode(TEXT).unwrap().into_iter().map(i64::from).collect();
        let split = split.min(ids.len());
        let schedule = Schedule::new(0, min_gap, None, None).unwrap();
        let mut stepped = MonitorBatch::new(detector.clone(), 2);
        stepped.add(1, schedule, ScheduleState::resume(1, 3)).unwrap();
        let want = run_steps(&mut stepped, &ids);
        let mut fed = MonitorBatch::new(detector.clone(), 2);
        fed.add(1, schedule, ScheduleState::resume(1, 3)).unwrap();
        let mut got = fed.feed(1, &ids[..split]).unwrap();
        got.extend(run_steps(&mut fed, &ids[split..]));
        prop_assert_eq!(got, want);
        prop_assert_eq!(&fed.get(1).unwrap().unwrap().hits, &stepped.get(1).unwrap().unwrap().hits);
    }
}

#[test]
fn out_of_vocab_ids_are_refused_by_default_and_feed_checks_first() {
    let Some(detector) = detector() else { return };
    let mut batch = MonitorBatch::new(detector.clone(), 3);
    assert_eq!(batch.out_of_vocab(), OutOfVocab::Raise);
    batch
        .add(0, Schedule::default(), ScheduleState::default())
        .unwrap();
    let err = batch
        .step(&[151700, -1, -1], |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokens[0]") && err.contains("outside the vocabulary"),
        "{err}"
    );
    let err = batch.feed(0, &[14190, 11, 151700]).unwrap_err().to_string();
    assert!(err.contains("tokens[2]"), "{err}");
    assert_eq!(
        batch.get(0).unwrap().unwrap().state.tokens,
        0,
        "nothing was fed"
    );
    let err = batch.feed(0, &[14190, -3]).unwrap_err().to_string();
    assert!(err.contains("tokens[1] = -3"), "{err}");
    let err = batch.feed(1, &[14190]).unwrap_err().to_string();
    assert!(
        err.contains("slot = 1") && err.contains("no stream"),
        "{err}"
    );
    assert!(batch
        .feed(3, &[14190])
        .unwrap_err()
        .to_string()
        .contains("slot = 3"));
    // Under NoText such ids are fed as tokens without text.
    let mut lenient = MonitorBatch::with_out_of_vocab(detector, 1, OutOfVocab::NoText);
    lenient
        .add(0, Schedule::default(), ScheduleState::default())
        .unwrap();
    assert!(lenient.feed(0, &[151700, 1 << 50]).unwrap().is_empty());
    assert_eq!(lenient.get(0).unwrap().unwrap().state.tokens, 2);
}

/// One event of an engine step for the stream in slot 1: feed its next token, show it again
/// (an intermediate prefill chunk, a repeated step), or show none; and whether the row samples.
#[derive(Debug, Clone, Copy)]
enum Show {
    Next,
    Again,
    Nothing,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `advance` feeds a token only when it is the next one, and reports a due calibration on
    /// every sampling row until a token follows the report; `feed_and_collect` the same for
    /// whole lists of new tokens.
    #[test]
    fn advance_feeds_the_next_token_and_reports_due_calibrations(
        events in prop::collection::vec((prop::sample::select(vec![Show::Next, Show::Next, Show::Again, Show::Nothing]), prop::bool::weighted(0.8)), 0..120),
        min_gap in 0u64..10,
    ) {
        let Some(detector) = detector() else { return Ok(()) };
        let ids: Vec<i64> = detector.vocab().encode(TEXT).unwrap().into_iter().map(i64::from).collect();
        let schedule = Schedule::new(0, min_gap, None, None).unwrap();
        let mut batch = MonitorBatch::new(detector.clone(), 3);
        batch.add(1, schedule, ScheduleState::default()).unwrap();
        let mut lists = MonitorBatch::new(detector.clone(), 3);
        lists.add(2, schedule, ScheduleState::default()).unwrap();
        // The same rows described by sequence length (vLLM's V2 runner), prompts of PROMPT tokens.
        const PROMPT: i64 = 7;
        let mut by_seq = MonitorBatch::new(detector.clone(), 3);
        by_seq.add(1, schedule, ScheduleState::default()).unwrap();
        // The model: calibrations where the plain stream makes them; due from a calibration
        // until a token follows its first report.
        let mut plain = MonitorBatch::new(detector.clone(), 2);
        plain.add(1, schedule, ScheduleState::default()).unwrap();
        let (mut seen, mut due, mut reported) = (0usize, false, false);
        for (show, sampling) in events {
            let (index, token) = match show {
                Show::Next if seen < ids.len() => (seen as i64, ids[seen]),
                Show::Again if seen > 0 => (seen as i64 - 1, ids[seen - 1]),
                _ => (-1, -1),
            };
            if index >= 0 && index as usize == seen {
                let mut made = false;
                plain.step(&[-1, token], |_, _| made = true).unwrap();
                if reported { due = false; reported = false; }
                due |= made;
                seen += 1;
            }
            let want: Vec<usize> = if sampling && due { reported = true; vec![1] } else { vec![] };
            let mut got = Vec::new();
            // Row 0 is an empty slot, row 1 the stream.
            batch.advance(&[0, 1], &[0, index], &[ids[0], token], &[true, sampling], |row| got.push(row)).unwrap();
            prop_assert_eq!(&got, &want);
            // A row that does not sample is an intermediate prefill chunk: seq_len < prefill_len.
            let prefill = [0, if sampling { 0 } else { i64::MAX }, 0];
            let mut got_seq = Vec::new();
            by_seq.advance_seq(&[0, 1], &[PROMPT + 1, PROMPT + index + 1, 99], &[ids[0], token], &[PROMPT; 3], &prefill, |row| got_seq.push(row)).unwrap();
            prop_assert_eq!(&got_seq, &want);
            // The same through lists (vLLM's legacy runner): slot 2's list is the tokens so far.
            let fed_before = lists.tokens_seen(2).unwrap();
            let read = ListRead { slot: 2, len: seen, start: fed_before, end: seen };
            let mut got_lists = Vec::new();
            let blind = lists.advance_lists(&[read], &ids, if sampling { 3 } else { 2 }, |slot| got_lists.push(slot)).unwrap();
            prop_assert!(blind.is_empty());
            prop_assert_eq!(got_lists, want.iter().map(|_| 2usize).collect::<Vec<_>>());
        }
        prop_assert_eq!(batch.get(1).unwrap().unwrap().state.tokens as usize, seen);
        prop_assert_eq!(&batch.get(1).unwrap().unwrap().calibrations, &plain.get(1).unwrap().unwrap().calibrations);
        prop_assert_eq!(&by_seq.get(1).unwrap().unwrap().calibrations, &plain.get(1).unwrap().unwrap().calibrations);
    }
}

#[test]
fn advance_checks_before_it_changes_anything() {
    let Some(detector) = detector() else { return };
    let mut batch = MonitorBatch::new(detector.clone(), 2);
    batch
        .add(0, Schedule::default(), ScheduleState::default())
        .unwrap();
    let err = batch
        .advance(&[0, 1], &[0], &[14190, 11], &[true, true], |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("one entry per row") && err.contains("got 2, 1, 2 and 2"),
        "{err}"
    );
    let err = batch
        .advance(&[0, 5], &[0, 0], &[14190, 11], &[true, true], |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("slots[1] = 5: slot out of range"), "{err}");
    let err = batch
        .advance(&[1, 0], &[0, 0], &[14190, 151700], &[true, true], |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokens[1]") && err.contains("outside the vocabulary"),
        "{err}"
    );
    assert_eq!(
        batch.get(0).unwrap().unwrap().state.tokens,
        0,
        "nothing was fed"
    );
    // Only the token the stream expects is checked: a repeated or skipped one is ignored.
    batch
        .advance(&[0], &[3], &[151700], &[true], |_| {})
        .unwrap();
    assert_eq!(batch.get(0).unwrap().unwrap().state.tokens, 0);
}

#[test]
fn advance_lists_reports_blind_slots_and_checks_before_it_feeds() {
    let Some(detector) = detector() else { return };
    let mut batch = MonitorBatch::new(detector.clone(), 3);
    for slot in 0..2 {
        batch
            .add(slot, Schedule::default(), ScheduleState::default())
            .unwrap();
    }
    let read = |slot, len, start, end| ListRead {
        slot,
        len,
        start,
        end,
    };
    // Slot 0 gains two tokens; slot 1 one placeholder (-1): blind, not fed; slot 2 is empty.
    let tokens = [14190, 11, -1];
    let blind = batch
        .advance_lists(
            &[read(0, 2, 0, 2), read(1, 1, 2, 3), read(2, 5, 3, 3)],
            &tokens,
            3,
            |_| {},
        )
        .unwrap();
    assert_eq!(blind, vec![1]);
    assert_eq!(batch.tokens_seen(0), Some(2));
    assert_eq!(batch.tokens_seen(1), Some(0));
    assert_eq!(batch.tokens_seen(2), None);
    // A list shorter than what was fed: blind.
    let blind = batch
        .advance_lists(&[read(0, 1, 0, 0)], &[], 3, |_| {})
        .unwrap();
    assert_eq!(blind, vec![0]);
    // Refused before anything changes: too many rows, an id outside the vocabulary (slot 0's
    // good token is not fed either), a read that does not match the list.
    let err = batch
        .advance_lists(&[], &[], 4, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rows = 4: more than the batch's 3 slots"),
        "{err}"
    );
    let err = batch
        .advance_lists(
            &[read(0, 3, 0, 1), read(1, 1, 1, 2)],
            &[14190, 151700],
            3,
            |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("outputs[1][0]"), "{err}");
    assert_eq!(batch.tokens_seen(0), Some(2));
    let err = batch
        .advance_lists(&[read(0, 4, 0, 1)], &[14190], 3, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("slot 0 has 2 new tokens"), "{err}");
}
