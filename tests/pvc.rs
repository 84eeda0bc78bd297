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
    assert!(Schedule::new(0, 0, None, Some(0)).unwrap_err().to_string().contains("period"));
}
