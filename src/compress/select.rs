//! Which tokens to keep, given their importance scores.

use std::cmp::Ordering;

use crate::error::Result;
use crate::value_err;

/// The rule a [`Budget`] counts the kept tokens by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The `n` highest-scoring tokens.
    Keep(usize),
    /// `round(ratio * tokens)` tokens (halves round up), `ratio` in [0, 1].
    Ratio(f64),
    /// "Dynamic": the fewest highest-scoring tokens whose scores sum to at least `mass` (in
    /// [0, 1]) times the total. Scores must be finite and non-negative.
    Mass(f64),
}

/// How many tokens a selection keeps: a [`Rule`], its count clamped to `[min_keep, max_keep]`
/// and then to the number of tokens. Checked when made (errors name the argument), so every
/// `Budget` is valid; the CPU and CUDA selections take it as it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    rule: Rule,
    min_keep: usize,
    max_keep: Option<usize>,
}

impl Budget {
    /// `ratio` / `mass` must lie in [0, 1], `min_keep` not exceed `max_keep`.
    pub fn new(rule: Rule, min_keep: usize, max_keep: Option<usize>) -> Result<Self> {
        if let Some(max_keep) = max_keep {
            if min_keep > max_keep {
                return Err(value_err!(
                    "min_keep ({min_keep}) must not exceed max_keep ({max_keep})"
                ));
            }
        }
        match rule {
            Rule::Ratio(ratio) if !(0.0..=1.0).contains(&ratio) => {
                return Err(value_err!("ratio: expected a share in [0, 1], got {ratio}"))
            }
            Rule::Mass(mass) if !(0.0..=1.0).contains(&mass) => {
                return Err(value_err!("mass: expected a share in [0, 1], got {mass}"))
            }
            _ => {}
        }
        Ok(Budget {
            rule,
            min_keep,
            max_keep,
        })
    }

    /// The `n` highest-scoring tokens, no bounds.
    pub fn keep(n: usize) -> Self {
        Budget {
            rule: Rule::Keep(n),
            min_keep: 0,
            max_keep: None,
        }
    }

    /// From optional arguments as a caller names them (the Python API): exactly one of `keep`,
    /// `ratio`, `mass`; `keep`, `min_keep` and `max_keep` >= 0.
    pub fn from_args(
        keep: Option<i64>,
        ratio: Option<f64>,
        mass: Option<f64>,
        min_keep: i64,
        max_keep: Option<i64>,
    ) -> Result<Self> {
        let given: Vec<&str> = [
            ("keep", keep.is_some()),
            ("ratio", ratio.is_some()),
            ("mass", mass.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| *name)
        .collect();
        let rule = match (keep, ratio, mass) {
            (Some(k), None, None) if k < 0 => {
                return Err(value_err!("keep: expected an int >= 0, got {k}"))
            }
            (Some(k), None, None) => Rule::Keep(k as usize),
            (None, Some(r), None) => Rule::Ratio(r),
            (None, None, Some(m)) => Rule::Mass(m),
            _ => {
                let got = if given.is_empty() {
                    "none".to_string()
                } else {
                    given.join(" and ")
                };
                return Err(value_err!(
                    "keep, ratio, mass: give exactly one of them, got {got}"
                ));
            }
        };
        if min_keep < 0 {
            return Err(value_err!("min_keep: expected an int >= 0, got {min_keep}"));
        }
        if let Some(m) = max_keep.filter(|&m| m < 0) {
            return Err(value_err!("max_keep: expected an int >= 0, got {m}"));
        }
        Self::new(rule, min_keep as usize, max_keep.map(|m| m as usize))
    }

    pub fn rule(&self) -> Rule {
        self.rule
    }
    pub fn min_keep(&self) -> usize {
        self.min_keep
    }
    pub fn max_keep(&self) -> Option<usize> {
        self.max_keep
    }

    /// `n` clamped to `[min_keep, max_keep]`, then to `tokens`.
    pub fn clamp(&self, n: usize, tokens: usize) -> usize {
        n.max(self.min_keep)
            .min(self.max_keep.unwrap_or(usize::MAX))
            .min(tokens)
    }

    /// How many of `tokens` scores are kept; `None` for [`Rule::Mass`] (it depends on them).
    pub fn count(&self, tokens: usize) -> Option<usize> {
        match self.rule {
            Rule::Keep(n) => Some(self.clamp(n, tokens)),
            Rule::Ratio(ratio) => {
                Some(self.clamp((ratio * tokens as f64).round() as usize, tokens))
            }
            Rule::Mass(_) => None,
        }
    }
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
/// towards the lower index, so the result is deterministic. The CPU kernel of
/// [`crate::compress::select_tokens`].
pub fn select_tokens(scores: &[f32], budget: Budget) -> Result<Vec<usize>> {
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
    let mut order: Vec<usize> = (0..tokens).collect();
    let count = match budget.count(tokens) {
        Some(count) => count,
        None => {
            let Rule::Mass(mass) = budget.rule else {
                unreachable!("only mass has no count")
            };
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
            let count = budget.clamp(n, tokens);
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
