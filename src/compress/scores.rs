//! FastV / PyramidDrop-style importance of visual tokens: the softmax attention that a few
//! query rows (e.g. the last text tokens at one layer) pay to each visual key, averaged over
//! heads and query rows.

use rayon::prelude::*;

use crate::compress::kernels::{accumulate_probabilities, matmul_nt, to_f32_slice};
use crate::dtype::Float;
use crate::error::Result;
use crate::tensor::{tuple_str, Strided};
use crate::value_err;

/// Query rows per matrix product: the logits block `[ROWS, k_tokens]` stays in L2.
const ROWS: usize = 16;
/// The row space is cut into about this many tasks whatever the thread count, and their partial
/// sums are added in order, so the result does not depend on scheduling.
const CHUNKS: usize = 64;

/// Importance of each of `keys`' tokens: `mean over (q, h) of p[q, h, k]` with
/// `p[q, h, :] = softmax(scale * query[q, h] · keys[:, h / (q_heads / kv_heads)])`
/// (grouped-query attention), or, with `lse` (`[q_tokens, q_heads]`, the natural log-sum-exp of
/// the *full* scaled attention rows, as flash-attention returns it), `p = exp(scale * q · k - lse)`:
/// the probabilities of the full softmax rather than of the visual slice alone.
///
/// `query` is `[q_tokens, q_heads, head_dim]`, `keys` `[k_tokens, kv_heads, head_dim]`;
/// `scale` defaults to `1 / sqrt(head_dim)`. All keys given are scored together (one softmax
/// over all of them); to score images separately, call once per image. Returns `[k_tokens]`.
pub fn visual_token_scores<T: Float, L: Float>(
    query: &Strided<'_, T>,
    keys: &Strided<'_, T>,
    lse: Option<&Strided<'_, L>>,
    scale: Option<f32>,
) -> Result<Vec<f32>> {
    let scale = check_scores(query.shape(), keys.shape(), lse.map(|l| l.shape()), scale)?;
    let (q_tokens, q_heads, head_dim) = (query.shape()[0], query.shape()[1], query.shape()[2]);
    let (k_tokens, kv_heads) = (keys.shape()[0], keys.shape()[1]);
    if k_tokens == 0 {
        return Ok(Vec::new());
    }

    // Pack each kv head's keys [k_tokens, head_dim] and each group's query rows
    // [q_tokens * group, head_dim] (row = q * group + head within the group) as f32.
    let group = q_heads / kv_heads;
    let mut packed_keys: Vec<f32> = crate::error::try_zeroed(
        crate::error::checked_size(&[kv_heads, k_tokens, head_dim], "keys")?,
        "keys (an f32 copy)",
    )?;
    packed_keys
        .par_chunks_mut(k_tokens * head_dim)
        .enumerate()
        .for_each(|(g, block)| {
            for (k, row) in block.chunks_exact_mut(head_dim).enumerate() {
                to_f32_slice(keys.lane2(k, g), row);
            }
        });
    let group_rows = q_tokens * group;
    let mut packed_query: Vec<f32> = crate::error::try_zeroed(
        crate::error::checked_size(&[q_heads, q_tokens, head_dim], "query")?,
        "query (an f32 copy)",
    )?;
    packed_query
        .par_chunks_mut(group_rows * head_dim)
        .enumerate()
        .for_each(|(g, block)| {
            for (row, out) in block.chunks_exact_mut(head_dim).enumerate() {
                to_f32_slice(query.lane2(row / group, g * group + row % group), out);
            }
        });
    let lse: Option<Vec<f32>> = lse.map(|lse| {
        let mut flat = vec![0f32; q_tokens * q_heads];
        for (q, out) in flat.chunks_exact_mut(q_heads).enumerate() {
            to_f32_slice(lse.lane(&[q]), out);
        }
        flat
    });

    // Tasks: pieces of one group's rows (they share the keys), at most about CHUNKS of them
    // whatever the thread count; their partial sums are added in task order (deterministic).
    let piece = ROWS.max((kv_heads * group_rows).div_ceil(CHUNKS));
    let tasks: Vec<(usize, usize, usize)> = (0..kv_heads)
        .flat_map(|g| {
            (0..group_rows)
                .step_by(piece)
                .map(move |r| (g, r, (r + piece).min(group_rows)))
        })
        .collect();
    let partials: Vec<Vec<f64>> = tasks
        .into_par_iter()
        .map(|(g, first, end)| {
            let mut acc = vec![0f64; k_tokens];
            let mut logits = vec![0f32; ROWS * k_tokens];
            let group_keys = &packed_keys[g * k_tokens * head_dim..(g + 1) * k_tokens * head_dim];
            let group_query =
                &packed_query[g * group_rows * head_dim..(g + 1) * group_rows * head_dim];
            for block in (first..end).step_by(ROWS) {
                let rows = ROWS.min(end - block);
                matmul_nt(
                    &group_query[block * head_dim..(block + rows) * head_dim],
                    group_keys,
                    rows,
                    k_tokens,
                    head_dim,
                    &mut logits,
                );
                for (r, logit_row) in logits[..rows * k_tokens]
                    .chunks_exact_mut(k_tokens)
                    .enumerate()
                {
                    // Row `q * group + h` of the group is query token q, head g * group + h.
                    let (q, head) = ((block + r) / group, g * group + (block + r) % group);
                    accumulate_probabilities(
                        logit_row,
                        scale,
                        lse.as_ref().map(|l| l[q * q_heads + head]),
                        &mut acc,
                    );
                }
            }
            acc
        })
        .collect();

    let mut total: Vec<f64> = crate::error::try_zeroed(k_tokens, "keys (one score per key token)")?;
    for partial in &partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    let rows = (q_tokens * q_heads) as f64;
    Ok(total.iter().map(|&t| (t / rows) as f32).collect())
}

/// The checks of [`visual_token_scores`] on shapes alone (shared by the CPU and CUDA paths):
/// ranks, head_dim, grouped-query heads, at least one query token, the `lse` shape and a finite
/// scale. Returns the scale (`1 / sqrt(head_dim)` by default).
pub(crate) fn check_scores(
    query: &[usize],
    keys: &[usize],
    lse: Option<&[usize]>,
    scale: Option<f32>,
) -> Result<f32> {
    if query.len() != 3 {
        return Err(value_err!(
            "query: expected a 3-D tensor [q_tokens, q_heads, head_dim], got shape {}",
            tuple_str(query)
        ));
    }
    if keys.len() != 3 {
        return Err(value_err!(
            "keys: expected a 3-D tensor [k_tokens, kv_heads, head_dim], got shape {}",
            tuple_str(keys)
        ));
    }
    let (q_tokens, q_heads, head_dim) = (query[0], query[1], query[2]);
    let (kv_heads, key_dim) = (keys[1], keys[2]);
    if key_dim != head_dim {
        return Err(value_err!(
            "keys: head_dim {key_dim} differs from query's {head_dim} (query {}, keys {})",
            tuple_str(query),
            tuple_str(keys)
        ));
    }
    if head_dim == 0 {
        return Err(value_err!(
            "query: head_dim must be >= 1, got shape {}",
            tuple_str(query)
        ));
    }
    if kv_heads == 0 || q_heads == 0 || q_heads % kv_heads != 0 {
        return Err(value_err!(
            "keys: q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads}) for grouped-query attention"
        ));
    }
    if q_tokens == 0 {
        return Err(value_err!(
            "query: expected at least one query token to average over, got shape {}",
            tuple_str(query)
        ));
    }
    if let Some(lse) = lse {
        if lse != [q_tokens, q_heads] {
            return Err(value_err!(
                "lse: expected shape [q_tokens, q_heads] = ({q_tokens}, {q_heads}), got {} \
                 (flash-attention's softmax_lse is [heads, tokens]: pass its transpose)",
                tuple_str(lse)
            ));
        }
    }
    let scale = scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !scale.is_finite() {
        return Err(value_err!("scale: expected a finite number, got {scale}"));
    }
    Ok(scale)
}
