//! Visual-token compression on candle tensors: pooling, scores, selection, pruning and merging
//! (see [`crate::compress`]). Inputs are read in place with their strides; results are new CPU
//! tensors of the input's dtype (scores f32, indices and grid cells i64).

use candle_core::{DType as CandleDType, Device, Tensor};

use super::access::{expect_cpu, with_cpu, Locked, Operand};
use super::{IntoCandle, Result};
use crate::compress::{self as core, Budget, Grid};
use crate::dispatch_float;
use crate::dtype::Float;
use crate::tensor::Strided;

/// Where [`prune_visual_tokens`] takes the kept tokens from.
#[derive(Debug, Clone, Copy)]
pub enum Keep<'a> {
    /// The indices to keep: an integer tensor `[kept]`, sorted and unique.
    Indices(&'a Tensor),
    /// Select from scores `[tokens]` (float) with a budget, as [`select_tokens`] does.
    Scores {
        scores: &'a Tensor,
        budget: Budget,
        min_keep: usize,
        max_keep: Option<usize>,
    },
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

fn grids_arg(grid_thw: &[[usize; 3]], tokens: usize) -> Result<Vec<Grid>> {
    let rows: Vec<[i64; 3]> = grid_thw
        .iter()
        .map(|g| g.map(|d| i64::try_from(d).unwrap_or(i64::MAX)))
        .collect();
    core::check_grids(&rows, tokens, &format!("x has {tokens} rows")).candle()
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

/// The values of a rank-`rank` float tensor as f32 (exact for f16 / bf16), row-major.
fn float_values(locked: &Locked, rank: usize, layout: &str) -> Result<Vec<f32>> {
    let dtype = locked.float_dtype()?;
    let view = locked.view()?;
    view.expect_rank(rank, layout).candle()?;
    Ok(dispatch_float!(dtype, T => {
        view.strided::<T>().candle()?.to_contiguous().candle()?.iter().map(|v| v.to_f32()).collect()
    }))
}

fn index_tensor(indices: &[usize]) -> Result<Tensor> {
    let values: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_vec(values, indices.len(), &Device::Cpu)
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
        let dtype = locked[0].float_dtype()?;
        let view = locked[0].view()?;
        view.expect_rank(2, "[tokens, dim]").candle()?;
        let (tokens, dim) = (view.dim(0), view.dim(1));
        let grids = grids_arg(grid_thw, tokens)?;
        dispatch_float!(dtype, T => {
            let rows = view.strided::<T>().candle()?;
            let (pooled, new_grids) =
                core::pool_visual_tokens(&rows, &grids, factor.0, factor.1).candle()?;
            let count = new_grids.iter().map(Grid::tokens).sum::<usize>();
            let pooled = Tensor::from_vec(pooled, (count, dim), &Device::Cpu)?;
            Ok((pooled, new_grids.iter().map(|g| [g.t, g.h, g.w]).collect()))
        })
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
    let scores = with_cpu(&operands, |locked| {
        let dtype = locked[0].float_dtype()?;
        locked[1].expect_dtype(dtype, "query")?;
        let (q, k) = (locked[0].view()?, locked[1].view()?);
        q.expect_rank(3, "[q_tokens, q_heads, head_dim]").candle()?;
        k.expect_rank(3, "[k_tokens, kv_heads, head_dim]")
            .candle()?;
        let lse = match locked.get(2) {
            Some(l) => {
                let values = float_values(l, 2, "[q_tokens, q_heads]")?;
                Some(Strided::from_vec(values, &l.dims))
            }
            None => None,
        };
        dispatch_float!(dtype, T => {
            let (q, k) = (q.strided::<T>().candle()?, k.strided::<T>().candle()?);
            core::visual_token_scores(&q, &k, lse.as_ref(), scale).candle()
        })
    })?;
    let count = scores.len();
    Tensor::from_vec(scores, count, &Device::Cpu)
}

/// Indices (i64 `[kept]`, increasing) of the tokens to keep by `scores` (`[tokens]`, float):
/// the top `keep`, a `ratio` of the tokens, or the fewest holding `mass` of the total score
/// ("dynamic pruning"), clamped to `[min_keep, max_keep]`; ties go to the lower index.
pub fn select_tokens(
    scores: &Tensor,
    budget: Budget,
    min_keep: usize,
    max_keep: Option<usize>,
) -> Result<Tensor> {
    let scores = with_cpu(&[Operand::read(scores, "scores")], |l| {
        float_values(&l[0], 1, "[tokens]")
    })?;
    let kept = core::select_tokens(&scores, budget, min_keep, max_keep).candle()?;
    index_tensor(&kept)
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
    // Small integer and score arguments are read first, the tokens in place after.
    enum From {
        Indices(Vec<i64>),
        Scores(Vec<f32>, Budget, usize, Option<usize>),
    }
    let from = match keep {
        Keep::Indices(indices) => From::Indices(int_vector(indices, "indices")?),
        Keep::Scores {
            scores,
            budget,
            min_keep,
            max_keep,
        } => {
            let values = with_cpu(&[Operand::read(scores, "scores")], |l| {
                float_values(&l[0], 1, "[tokens]")
            })?;
            From::Scores(values, budget, min_keep, max_keep)
        }
    };
    with_cpu(&[Operand::read(x, "x")], |locked| {
        let dtype = locked[0].float_dtype()?;
        let view = locked[0].view()?;
        view.expect_rank(2, "[tokens, dim]").candle()?;
        let (tokens, dim) = (view.dim(0), view.dim(1));
        let indices = match &from {
            From::Indices(indices) => core::check_indices(indices, tokens).candle()?,
            From::Scores(scores, budget, min_keep, max_keep) => {
                core::check_score_count(scores.len(), tokens).candle()?;
                core::select_tokens(scores, *budget, *min_keep, *max_keep).candle()?
            }
        };
        let grids = grid_thw.map(|g| grids_arg(g, tokens)).transpose()?;
        let kept = dispatch_float!(dtype, T => {
            let rows = view.strided::<T>().candle()?;
            let kept = core::prune_visual_tokens(&rows, &indices, merge).candle()?;
            Tensor::from_vec(kept, (indices.len(), dim), &Device::Cpu)?
        });
        let cells = match grids {
            Some(grids) => {
                let cells = core::token_cells(&grids, &indices).candle()?;
                let flat: Vec<i64> = cells.iter().flatten().copied().collect();
                Some(Tensor::from_vec(flat, (indices.len(), 3), &Device::Cpu)?)
            }
            None => None,
        };
        Ok(Pruned {
            tokens: kept,
            indices: index_tensor(&indices)?,
            cells,
        })
    })
}
