//! Which tokens to keep, given their importance scores.

use std::cmp::Ordering;

use crate::error::Result;
use crate::value_err;

/// How many tokens to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// The `n` highest-scoring tokens.
    Keep(usize),
    /// `round(ratio * tokens)` tokens (halves round up), `ratio` in [0, 1].
    Ratio(f64),
    /// "Dynamic": the fewest highest-scoring tokens whose scores sum to at least `mass` (in
    /// [0, 1]) times the total. Scores must be finite and non-negative.
    Mass(f64),
}

/// Where the kept tokens of a prune come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepFrom<I, S> {
    /// The caller's indices.
    Indices(I),
    /// A selection from scores, with a budget.
    Scores(S),
}

/// Checks the arguments of a prune: exactly one of `indices` and `scores`, and a budget
/// (`keep`, `ratio`, `mass`) only with scores.
pub fn keep_from<I, S>(
    indices: Option<I>,
    scores: Option<S>,
    budget: bool,
) -> Result<KeepFrom<I, S>> {
    match (indices, scores) {
        (Some(_), Some(_)) => Err(value_err!(
            "indices, scores: give indices or scores to select from, not both"
        )),
        (None, None) => Err(value_err!(
            "indices, scores: give the indices to keep or scores to select them from"
        )),
        (Some(_), None) if budget => Err(value_err!(
            "keep, ratio, mass: these select from scores; with indices given, leave them out"
        )),
        (Some(indices), None) => Ok(KeepFrom::Indices(indices)),
        (None, Some(scores)) => Ok(KeepFrom::Scores(scores)),
    }
}

/// Checks that there is one score per token.
pub fn check_score_count(scores: usize, tokens: usize) -> Result<()> {
    if scores != tokens {
        return Err(value_err!(
            "scores: expected {tokens} scores (one per row of x), got {scores}"
        ));
    }
    Ok(())
}

/// Indices (sorted increasingly) of the tokens to keep: the highest scores first, ties broken
/// towards the lower index, so the result is deterministic. The count from `budget` is clamped
/// to `[min_keep, max_keep]` and then to the number of scores.
pub fn select_tokens(
    scores: &[f32],
    budget: Budget,
    min_keep: usize,
    max_keep: Option<usize>,
) -> Result<Vec<usize>> {
    if let Some(max_keep) = max_keep {
        if min_keep > max_keep {
            return Err(value_err!(
                "min_keep ({min_keep}) must not exceed max_keep ({max_keep})"
            ));
        }
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(value_err!(
            "scores[{i}] is NaN: scores must not contain NaN"
        ));
    }
    let tokens = scores.len();
    // Highest score first, then lowest index; scores hold no NaN, so this is a total order.
    let by_rank = |&a: &usize, &b: &usize| -> Ordering {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(&b))
    };
    let clamp = |n: usize| {
        n.max(min_keep)
            .min(max_keep.unwrap_or(usize::MAX))
            .min(tokens)
    };
    let mut order: Vec<usize> = (0..tokens).collect();
    let count = match budget {
        Budget::Keep(n) => clamp(n),
        Budget::Ratio(ratio) => {
            if !(0.0..=1.0).contains(&ratio) {
                return Err(value_err!("ratio: expected a share in [0, 1], got {ratio}"));
            }
            clamp((ratio * tokens as f64).round() as usize)
        }
        Budget::Mass(mass) => {
            if !(0.0..=1.0).contains(&mass) {
                return Err(value_err!("mass: expected a share in [0, 1], got {mass}"));
            }
            if let Some(i) = scores.iter().position(|&s| s < 0.0 || !s.is_finite()) {
                return Err(value_err!(
                    "scores[{i}] = {}: mass selection needs finite, non-negative scores",
                    scores[i]
                ));
            }
            order.sort_unstable_by(by_rank);
            // The total is summed in the same order as the running sum, so mass = 1 stops
            // exactly at the last positive score.
            let total: f64 = order.iter().map(|&i| scores[i] as f64).sum();
            let target = mass * total;
            let mut running = 0f64;
            let mut n = 0;
            while n < tokens && running < target {
                running += scores[order[n]] as f64;
                n += 1;
            }
            let count = clamp(n);
            let mut kept = order[..count].to_vec();
            kept.sort_unstable();
            return Ok(kept);
        }
    };
    if count < tokens && count > 0 {
        order.select_nth_unstable_by(count - 1, by_rank);
    }
    let mut kept = order[..count].to_vec();
    kept.sort_unstable();
    Ok(kept)
}
