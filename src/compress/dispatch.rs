//! The operations on tensor views of any device: one set of argument checks, then the CPU
//! kernels (rayon, [`crate::compress::cpu`]) or the CUDA launchers ([`crate::cuda::compress`]),
//! by the device of the main tensor (`x`, `query`, `scores`).
//!
//! CUDA results go into tensors the caller's [`DeviceAlloc`] makes (PyTorch's allocator in the
//! bindings, [`crate::cuda::alloc::DriverAlloc`] for Rust users): a result's size can depend on
//! the data (mass selection), so the operation allocates once it knows it, and the caller gets
//! its own kind of tensor back. CPU results are [`OwnedTensor`]s. Host metadata (grids, given
//! indices) is host data on both devices. Every other tensor must be on the main tensor's
//! device, except the scores of a prune on a GPU, which may be on the host (selected there, the
//! indices uploaded).

use super::grid::{check_grids, Grid};
use super::pool::{check_pool, pool_shape};
use super::prune::{check_indices, token_cells};
use super::scores::check_scores;
use super::select::{check_score_count, Budget, KeepFrom};
use super::{cpu, DATA_DTYPES};
use crate::cuda::alloc::{DeviceAlloc, Output};
use crate::cuda::compress as gpu;
use crate::dispatch_float;
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::tensor::{Device, OwnedTensor, Strided, TensorView};
use crate::value_err;

/// Where the kept tokens of [`prune_visual_tokens`] come from: indices (host data) or scores
/// with a budget.
pub type Keep<'k, 'v> = KeepFrom<&'k [i64], (&'k TensorView<'v>, Budget)>;

/// What [`prune_visual_tokens`] returns.
#[derive(Debug)]
pub struct Pruned<T> {
    /// The kept (or merged) tokens, `[kept, dim]`, dtype of `x`.
    pub tokens: Output<T>,
    /// Their rows in `x`, int64 `[kept]`, increasing.
    pub indices: Output<T>,
    /// With grids: each kept token's `(t, h, w)` cell in its own grid, int64 `[kept, 3]`.
    pub cells: Option<Output<T>>,
}

/// The device an operation runs on: its main tensor's (CPU or CUDA).
fn route(main: &TensorView<'_>) -> Result<Device> {
    match main.device() {
        Device::Cuda(id) => Ok(Device::Cuda(id)),
        _ => main.expect_cpu().map(|_| Device::Cpu),
    }
}

/// `view` lives on `device`, the device of `main` (the messages the bindings always gave).
fn expect_on(view: &TensorView<'_>, device: Device, main: &str) -> Result<()> {
    match device {
        Device::Cuda(id) if view.device() != device => Err(value_err!(
            "{}: expected a tensor on cuda:{id} (the device of {main}), got one on {}; pass every tensor on the same device",
            view.name(),
            view.device()
        )),
        Device::Cuda(_) => Ok(()),
        _ => view.expect_cpu().map(|_| ()),
    }
}

/// The allocator serves the device of the operation (`main`, on `cuda:<id>`).
fn expect_alloc<A: DeviceAlloc>(alloc: &A, id: i32, main: &str) -> Result<()> {
    if alloc.ordinal() < 0 {
        return Err(value_err!(
            "{main}: a CUDA tensor needs a device allocator for the results (tvc_rs::cuda::alloc::DriverAlloc), not HostOnly"
        ));
    }
    if alloc.ordinal() != id {
        return Err(Error::Runtime(format!(
            "the device allocator serves cuda:{}, but {main} is on cuda:{id}",
            alloc.ordinal()
        )));
    }
    Ok(())
}

fn device_ptr<A: DeviceAlloc>(alloc: &A, tensor: &A::Tensor) -> u64 {
    alloc.view(tensor).data_ptr() as u64
}

/// A float view's values as f32 (scores, lse: small).
fn f32_values(view: &TensorView<'_>) -> Result<Vec<f32>> {
    Ok(dispatch_float!(view.dtype(), T => {
        view.strided::<T>()?.to_contiguous()?.iter().map(|v| v.to_f32()).collect()
    }))
}

/// int64 `values` on the device.
fn upload<A: DeviceAlloc>(alloc: &A, values: &[i64]) -> Result<A::Tensor> {
    let tensor = alloc.empty(&[values.len()], DType::I64)?;
    // SAFETY: a fresh int64 tensor of values.len() entries on the allocator's device.
    unsafe {
        gpu::write_indices(
            alloc.ordinal(),
            alloc.stream(),
            device_ptr(alloc, &tensor),
            values,
        )?
    };
    Ok(tensor)
}

fn index_tensor(indices: &[usize], shape: Vec<usize>) -> Result<OwnedTensor> {
    OwnedTensor::new(indices.iter().map(|&i| i as i64).collect(), shape)
}

/// kh x kw average pooling of `x` (`[tokens, dim]`, float) within each frame of its grids
/// (`grid_thw`, `(t, h, w)` rows whose tokens add up to `tokens`); edge windows average only the
/// cells they cover. Returns the pooled tokens `[new_tokens, dim]` (dtype of `x`) and the new
/// grids, `(t, ceil(h / kh), ceil(w / kw))`.
pub fn pool_visual_tokens<A: DeviceAlloc>(
    x: &TensorView<'_>,
    grid_thw: &[[i64; 3]],
    factor: (usize, usize),
    alloc: &A,
) -> Result<(Output<A::Tensor>, Vec<Grid>)> {
    let device = route(x)?;
    x.expect_dtypes(DATA_DTYPES)?;
    x.expect_rank(2, "[tokens, dim]")?;
    let (tokens, dim) = (x.dim(0), x.dim(1));
    let grids = check_grids(grid_thw, tokens, &format!("x has {tokens} rows"))?;
    let (kh, kw) = check_pool(x.shape(), &grids, factor.0, factor.1)?;
    let (count, new_grids) = pool_shape(&grids, kh, kw);
    match device {
        Device::Cuda(id) => {
            expect_alloc(alloc, id, x.name())?;
            let out = alloc.empty(&[count, dim], x.dtype())?;
            gpu::pool_visual_tokens(alloc.stream(), x, &grids, kh, kw, &alloc.view(&out))?;
            Ok((Output::Device(out), new_grids))
        }
        _ => {
            let pooled = dispatch_float!(x.dtype(), T => {
                let rows = x.strided::<T>()?;
                let (pooled, _) = alloc.cpu_work(|| cpu::pool_visual_tokens(&rows, &grids, kh, kw))?;
                OwnedTensor::new(pooled, vec![count, dim])?
            });
            Ok((Output::Host(pooled), new_grids))
        }
    }
}

/// FastV-style importance of each of `keys`' tokens (`[k_tokens, kv_heads, head_dim]`): the
/// softmax attention of `query` (`[q_tokens, q_heads, head_dim]`, same dtype; grouped-query
/// attention) averaged over heads and query rows; with `lse` (`[q_tokens, q_heads]`) the
/// probabilities of the full softmax. See [`cpu::visual_token_scores`]. Returns f32 `[k_tokens]`.
pub fn visual_token_scores<A: DeviceAlloc>(
    query: &TensorView<'_>,
    keys: &TensorView<'_>,
    lse: Option<&TensorView<'_>>,
    scale: Option<f32>,
    alloc: &A,
) -> Result<Output<A::Tensor>> {
    let device = route(query)?;
    query.expect_dtypes(DATA_DTYPES)?;
    keys.expect_dtypes(DATA_DTYPES)?;
    query.expect_rank(3, "[q_tokens, q_heads, head_dim]")?;
    expect_on(keys, device, query.name())?;
    keys.expect_rank(3, "[k_tokens, kv_heads, head_dim]")?;
    if keys.dtype() != query.dtype() {
        return Err(crate::type_err!(
            "keys: expected dtype {} (the dtype of query), got {}",
            query.dtype(),
            keys.dtype()
        ));
    }
    if let Some(lse) = lse {
        lse.expect_dtypes(DATA_DTYPES)?;
        expect_on(lse, device, query.name())?;
        lse.expect_rank(2, "[q_tokens, q_heads]")?;
    }
    let scale = check_scores(query.shape(), keys.shape(), lse.map(|l| l.shape()), scale)?;
    let k_tokens = keys.dim(0);
    match device {
        Device::Cuda(id) => {
            expect_alloc(alloc, id, query.name())?;
            let out = alloc.empty(&[k_tokens], DType::F32)?;
            let workspace = alloc.empty(&[query.dim(0) * query.dim(1)], DType::F32)?;
            gpu::visual_token_scores(
                alloc.stream(),
                query,
                keys,
                lse,
                scale,
                &alloc.view(&out),
                &alloc.view(&workspace),
            )?;
            Ok(Output::Device(out))
        }
        _ => {
            let lse = match lse {
                Some(lse) => Some(Strided::from_vec(f32_values(lse)?, lse.shape())),
                None => None,
            };
            let scores = dispatch_float!(query.dtype(), T => {
                let (q, k) = (query.strided::<T>()?, keys.strided::<T>()?);
                alloc.cpu_work(|| cpu::visual_token_scores(&q, &k, lse.as_ref(), Some(scale)))?
            });
            Ok(Output::Host(OwnedTensor::new(scores, vec![k_tokens])?))
        }
    }
}

/// Selection on the device of `scores` (checked: 1-D float, on `alloc`'s device): int64 indices.
fn select_on_device<A: DeviceAlloc>(
    scores: &TensorView<'_>,
    budget: Budget,
    alloc: &A,
) -> Result<A::Tensor> {
    let n = scores.dim(0);
    match budget.count(n) {
        Some(count) => {
            let out = alloc.empty(&[count], DType::I64)?;
            gpu::select_topk(alloc.stream(), scores, count, device_ptr(alloc, &out))?;
            Ok(out)
        }
        None => {
            let workspace = alloc.empty(&[gpu::mass_workspace_len(n)], DType::I64)?;
            // SAFETY: the workspace holds mass_workspace_len(n) int64 on the scores' device.
            let count = unsafe {
                gpu::select_mass(
                    alloc.stream(),
                    scores,
                    budget,
                    device_ptr(alloc, &workspace),
                )?
            };
            alloc.narrow(workspace, count)
        }
    }
}

fn check_scores_arg(scores: &TensorView<'_>, device: Device, main: &str) -> Result<()> {
    scores.expect_dtypes(DATA_DTYPES)?;
    expect_on(scores, device, main)?;
    scores.expect_rank(1, "[tokens]")?;
    Ok(())
}

/// Indices (int64 `[kept]`, increasing) of the tokens to keep by `scores` (`[tokens]`, float):
/// the highest first, ties to the lower index, as many as `budget` says. On a GPU top-k does not
/// check for NaN (that would wait for the GPU; NaN ranks lowest there) and mass selection waits
/// for the GPU once (the count decides the output size).
pub fn select_tokens<A: DeviceAlloc>(
    scores: &TensorView<'_>,
    budget: Budget,
    alloc: &A,
) -> Result<Output<A::Tensor>> {
    let device = route(scores)?;
    check_scores_arg(scores, device, scores.name())?;
    match device {
        Device::Cuda(id) => {
            expect_alloc(alloc, id, scores.name())?;
            Ok(Output::Device(select_on_device(scores, budget, alloc)?))
        }
        _ => {
            let values = f32_values(scores)?;
            let kept = alloc.cpu_work(|| cpu::select_tokens(&values, budget))?;
            Ok(Output::Host(index_tensor(&kept, vec![kept.len()])?))
        }
    }
}

/// Keeps the rows of `x` (`[tokens, dim]`, float) that `keep` gives (sorted unique indices, or
/// a selection from scores `[tokens]` with a budget), in their original order. With `merge`,
/// each dropped token is averaged into its most similar kept token (ToMe-style). With `grid_thw`
/// (the grids of `x`'s tokens) the kept tokens' grid cells come back too.
pub fn prune_visual_tokens<A: DeviceAlloc>(
    x: &TensorView<'_>,
    keep: Keep<'_, '_>,
    grid_thw: Option<&[[i64; 3]]>,
    merge: bool,
    alloc: &A,
) -> Result<Pruned<A::Tensor>> {
    let device = route(x)?;
    x.expect_dtypes(DATA_DTYPES)?;
    x.expect_rank(2, "[tokens, dim]")?;
    let (tokens, dim) = (x.dim(0), x.dim(1));
    let grids_of = |rows: &[[i64; 3]]| check_grids(rows, tokens, &format!("x has {tokens} rows"));
    let Device::Cuda(id) = device else {
        let indices = match keep {
            KeepFrom::Indices(indices) => check_indices(indices, tokens)?,
            KeepFrom::Scores((scores, budget)) => {
                check_scores_arg(scores, device, x.name())?;
                check_score_count(scores.dim(0), tokens)?;
                let values = f32_values(scores)?;
                alloc.cpu_work(|| cpu::select_tokens(&values, budget))?
            }
        };
        let grids = grid_thw.map(grids_of).transpose()?;
        let count = indices.len();
        let kept = dispatch_float!(x.dtype(), T => {
            let rows = x.strided::<T>()?;
            let kept = alloc.cpu_work(|| cpu::prune_visual_tokens(&rows, &indices, merge))?;
            OwnedTensor::new(kept, vec![count, dim])?
        });
        let cells = match grids {
            Some(grids) => {
                let cells = token_cells(&grids, &indices)?;
                let flat: Vec<i64> = cells.iter().flatten().copied().collect();
                Some(Output::Host(OwnedTensor::new(flat, vec![count, 3])?))
            }
            None => None,
        };
        return Ok(Pruned {
            tokens: Output::Host(kept),
            indices: Output::Host(index_tensor(&indices, vec![count])?),
            cells,
        });
    };

    expect_alloc(alloc, id, x.name())?;
    let kept = match keep {
        KeepFrom::Indices(indices) => {
            let checked = check_indices(indices, tokens)?;
            let values: Vec<i64> = checked.iter().map(|&i| i as i64).collect();
            upload(alloc, &values)?
        }
        KeepFrom::Scores((scores, budget)) => {
            scores.expect_dtypes(DATA_DTYPES)?;
            if scores.device() != Device::Cpu {
                expect_on(scores, device, x.name())?;
            }
            scores.expect_rank(1, "[tokens]")?;
            check_score_count(scores.dim(0), tokens)?;
            if scores.device() == device {
                select_on_device(scores, budget, alloc)?
            } else {
                // Scores on the host: select there, upload the indices.
                let values = f32_values(scores)?;
                let kept: Vec<i64> = alloc
                    .cpu_work(|| cpu::select_tokens(&values, budget))?
                    .into_iter()
                    .map(|i| i as i64)
                    .collect();
                upload(alloc, &kept)?
            }
        }
    };
    let grids = grid_thw.map(grids_of).transpose()?;
    let (kept_ptr, count) = (device_ptr(alloc, &kept), alloc.view(&kept).dim(0));
    let out = alloc.empty(&[count, dim], x.dtype())?;
    let stream = alloc.stream();
    if merge && count > 0 && count < tokens && dim > 0 {
        let workspace = alloc.empty(
            &[gpu::merge_workspace_len(tokens, count).max(1)],
            DType::I64,
        )?;
        // SAFETY: `kept` holds count sorted int64 indices, the workspace the merge's, on this
        // device.
        unsafe {
            gpu::merge(
                stream,
                x,
                kept_ptr,
                count,
                device_ptr(alloc, &workspace),
                &alloc.view(&out),
            )?
        };
    } else {
        gpu::gather(stream, x, kept_ptr, count, &alloc.view(&out))?;
    }
    let cells = match grids {
        Some(grids) => {
            let cells = alloc.empty(&[count, 3], DType::I64)?;
            gpu::token_cells(stream, id, kept_ptr, count, &grids, &alloc.view(&cells))?;
            Some(Output::Device(cells))
        }
        None => None,
    };
    Ok(Pruned {
        tokens: Output::Device(out),
        indices: Output::Device(kept),
        cells,
    })
}
