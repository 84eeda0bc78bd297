//! Visual-token compression on candle tensors: pooling, scores, selection, pruning and merging
//! (see [`crate::compress`]). Inputs are read in place with their strides; results are new CPU
//! tensors of the input's dtype (scores f32, indices and grid cells i64).

use candle_core::{DType as CandleDType, Device, Tensor};

use super::access::{expect_cpu, with_cpu, Operand};
use super::{IntoCandle, Result};
use crate::compress::{self as core, Budget, HostOnly, KeepFrom, Output};

/// Where [`prune_visual_tokens`] takes the kept tokens from.
#[derive(Debug, Clone, Copy)]
pub enum Keep<'a> {
    /// The indices to keep: an integer tensor `[kept]`, sorted and unique.
    Indices(&'a Tensor),
    /// Select from scores `[tokens]` (float) with a budget, as [`select_tokens`] does.
    Scores { scores: &'a Tensor, budget: Budget },
}

/// What [`prune_visual_tokens`] returns.
#[derive(Debug, Clone)]
pub struct Pruned {
    /// The kept (or merged) tokens, `[kept, dim]`, in their original order.
    pub tokens: Tensor,
    /// Their indices in `x`, i64 `[kept]`.
    pub indices: Tensor,
    /// With `grid_thw`: each kept token's `(t, h, w)` cell in its own grid, i64 `[kept, 3]`
    /// (for the M-RoPE positions of the pruned image).
    pub cells: Option<Tensor>,
}

fn grid_rows(grid_thw: &[[usize; 3]]) -> Vec<[i64; 3]> {
    grid_thw
        .iter()
        .map(|g| g.map(|d| i64::try_from(d).unwrap_or(i64::MAX)))
        .collect()
}

/// A result of the core (CPU tensors only here) as a candle tensor.
fn from_core(out: Output<std::convert::Infallible>) -> Result<Tensor> {
    // No device allocator, so no device result.
    let Output::Host(out) = out;
    crate::dispatch_dtype!(out.dtype(), T => {
        Tensor::from_slice(out.as_slice::<T>().expect("the dtype matches"), out.shape(), &Device::Cpu)
    })
}

/// The values of a rank-1 integer tensor (u8, u32, i16, i32 or i64), named `name` in errors.
pub(crate) fn int_vector(tensor: &Tensor, name: &str) -> Result<Vec<i64>> {
    expect_cpu(tensor, name)?;
    if tensor.rank() != 1 {
        return Err(super::candle_err(crate::value_err!(
            "{name}: expected a 1-D integer tensor, got shape {:?}",
            tensor.dims()
        )));
    }
    match tensor.dtype() {
        CandleDType::U8
        | CandleDType::U32
        | CandleDType::I16
        | CandleDType::I32
        | CandleDType::I64 => tensor.to_dtype(CandleDType::I64)?.to_vec1::<i64>(),
        other => Err(super::candle_err(crate::type_err!(
            "{name}: expected an integer dtype (u8, u32, i16, i32 or i64), got {other:?}"
        ))),
    }
}

/// k_h x k_w average pooling of `x` (`[tokens, dim]`, the tokens of `grid_thw`'s grids one
/// after the other, row-major on each) within each frame; edge windows average only the cells
/// they cover. Returns the pooled tokens `[new_tokens, dim]` and the new grids
/// (`t x ceil(h / k_h) x ceil(w / k_w)`). `grid_thw` is the grid of the tokens the language
/// model sees (Qwen2-VL: `image_grid_thw` with h and w divided by the spatial merge).
pub fn pool_visual_tokens(
    x: &Tensor,
    grid_thw: &[[usize; 3]],
    factor: (usize, usize),
) -> Result<(Tensor, Vec<[usize; 3]>)> {
    with_cpu(&[Operand::read(x, "x")], |locked| {
        locked[0].float_dtype()?;
        let (pooled, grids) =
            core::pool_visual_tokens(&locked[0].view()?, &grid_rows(grid_thw), factor, &HostOnly)
                .candle()?;
        Ok((
            from_core(pooled)?,
            grids.iter().map(|g| [g.t, g.h, g.w]).collect(),
        ))
    })
}

/// FastV-style importance of each visual key: the softmax attention of `query`
/// (`[q_tokens, q_heads, head_dim]`) over `keys` (`[k_tokens, kv_heads, head_dim]`, same dtype;
/// grouped-query attention), averaged over heads and query rows. With `lse` (`[q_tokens,
/// q_heads]`, the log-sum-exp of the full scaled attention rows) the probabilities are those of
/// the full softmax. `scale` defaults to `1 / sqrt(head_dim)`. Returns f32 `[k_tokens]`.
pub fn visual_token_scores(
    query: &Tensor,
    keys: &Tensor,
    lse: Option<&Tensor>,
    scale: Option<f32>,
) -> Result<Tensor> {
    let mut operands = vec![Operand::read(query, "query"), Operand::read(keys, "keys")];
    if let Some(lse) = lse {
        operands.push(Operand::read(lse, "lse"));
    }
    with_cpu(&operands, |locked| {
        let dtype = locked[0].float_dtype()?;
        locked[1].expect_dtype(dtype, "query")?;
        if let Some(lse) = locked.get(2) {
            lse.float_dtype()?;
        }
        let (q, k) = (locked[0].view()?, locked[1].view()?);
        let lse = locked.get(2).map(|l| l.view()).transpose()?;
        from_core(core::visual_token_scores(&q, &k, lse.as_ref(), scale, &HostOnly).candle()?)
    })
}

/// Indices (i64 `[kept]`, increasing) of the tokens to keep by `scores` (`[tokens]`, float):
/// as many as `budget` says (the top `keep`, a `ratio` of the tokens, or the fewest holding
/// `mass` of the total score, "dynamic pruning", clamped to its bounds); ties go to the lower
/// index.
pub fn select_tokens(scores: &Tensor, budget: Budget) -> Result<Tensor> {
    with_cpu(&[Operand::read(scores, "scores")], |locked| {
        locked[0].float_dtype()?;
        from_core(core::select_tokens(&locked[0].view()?, budget, &HostOnly).candle()?)
    })
}

/// Keeps the rows of `x` (`[tokens, dim]`) chosen by `keep`, in their original order. With
/// `merge`, each dropped token is averaged into its most similar kept token (ToMe-style). With
/// `grid_thw` (the grids of `x`'s tokens) the kept tokens' grid cells come back too.
pub fn prune_visual_tokens(
    x: &Tensor,
    keep: Keep<'_>,
    grid_thw: Option<&[[usize; 3]]>,
    merge: bool,
) -> Result<Pruned> {
    let mut operands = vec![Operand::read(x, "x")];
    let indices = match keep {
        Keep::Indices(indices) => Some(int_vector(indices, "indices")?),
        Keep::Scores { scores, .. } => {
            operands.push(Operand::read(scores, "scores"));
            None
        }
    };
    let rows = grid_thw.map(grid_rows);
    with_cpu(&operands, |locked| {
        locked[0].float_dtype()?;
        let x = locked[0].view()?;
        let scores = locked.get(1).map(|s| s.view()).transpose()?;
        let from = match (&indices, &scores, keep) {
            (Some(indices), _, _) => KeepFrom::Indices(indices.as_slice()),
            (None, Some(scores), Keep::Scores { budget, .. }) => {
                locked[1].float_dtype()?;
                KeepFrom::Scores((scores, budget))
            }
            _ => unreachable!("scores are read when given"),
        };
        let pruned =
            core::prune_visual_tokens(&x, from, rows.as_deref(), merge, &HostOnly).candle()?;
        Ok(Pruned {
            tokens: from_core(pruned.tokens)?,
            indices: from_core(pruned.indices)?,
            cells: pruned.cells.map(from_core).transpose()?,
        })
    })
}
