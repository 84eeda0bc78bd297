//! CUDA paths of the compression bindings (`python/compress.rs` dispatches here when the main
//! tensor is a CUDA tensor). Arguments are checked as on the CPU; outputs are torch tensors on
//! the input's device. Host metadata (grids, given indices) given as CUDA tensors is copied to
//! the host first (a synchronisation: pass it as a list or CPU tensor to avoid it).

use pyo3::prelude::*;

use super::compress::{budget_arg, factor_arg, grid_arg, keep_bounds};
use super::cuda::{device_of, CudaCall};
use super::tensor::{int_vector_arg, FLOAT_DTYPES};
use crate::compress::{
    check_indices, check_score_count, keep_from, select_tokens as cpu_select, Budget, Grid,
    KeepFrom,
};
use crate::cuda::compress as gpu;
use crate::dtype::DType;
use crate::tensor::Device;
use crate::value_err;

/// `obj` itself, or its `.cpu()` copy when it is a CUDA tensor (host metadata).
fn host<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    match device_of(obj)? {
        Some(Device::Cuda(_)) => obj.call_method0("cpu"),
        _ => Ok(obj.clone()),
    }
}

fn grids_tensor<'py>(call: &CudaCall<'py>, grids: &[Grid]) -> PyResult<Bound<'py, PyAny>> {
    let flat: Vec<i64> = grids
        .iter()
        .flat_map(|g| [g.t as i64, g.h as i64, g.w as i64])
        .collect();
    let (tensor, _) = call.upload_i64(&flat)?;
    tensor.call_method1("view", (grids.len(), 3))
}

fn narrow<'py>(tensor: &Bound<'py, PyAny>, len: usize) -> PyResult<Bound<'py, PyAny>> {
    tensor.call_method1("narrow", (0, 0, len))
}

pub fn pool_visual_tokens<'py>(
    py: Python<'py>,
    ordinal: i32,
    x: &Bound<'py, PyAny>,
    grid_thw: &Bound<'py, PyAny>,
    factor: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    CudaCall::run(py, ordinal, "x", |call| {
        let x = call.tensor(x, "x", FLOAT_DTYPES)?;
        let view = x.view();
        view.expect_rank(2, "[tokens, dim]")?;
        let grids = grid_arg(&host(grid_thw)?, view.dim(0))?;
        let (kh, kw) = factor_arg(factor)?;
        let (count, new_grids) = gpu::pool_shape(&grids, kh, kw);
        let (out, out_view) = call.empty(&[count, view.dim(1)], view.dtype())?;
        gpu::pool_visual_tokens(call.stream, &view, &grids, kh, kw, &out_view.view())?;
        Ok((out, grids_tensor(call, &new_grids)?))
    })
}

pub fn visual_token_scores<'py>(
    py: Python<'py>,
    ordinal: i32,
    query: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
    lse: Option<&Bound<'py, PyAny>>,
    scale: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    CudaCall::run(py, ordinal, "query", |call| {
        let query = call.tensor(query, "query", FLOAT_DTYPES)?;
        let keys = call.tensor(keys, "keys", FLOAT_DTYPES)?;
        let lse = lse
            .map(|l| call.tensor(l, "lse", FLOAT_DTYPES))
            .transpose()?;
        let (qv, kv) = (query.view(), keys.view());
        qv.expect_rank(3, "[q_tokens, q_heads, head_dim]")?;
        kv.expect_rank(3, "[k_tokens, kv_heads, head_dim]")?;
        if kv.dtype() != qv.dtype() {
            return Err(crate::type_err!(
                "keys: expected dtype {} (the dtype of query), got {}",
                qv.dtype(),
                kv.dtype()
            )
            .into());
        }
        let lv = lse.as_ref().map(|l| l.view());
        if let Some(l) = &lv {
            l.expect_rank(2, "[q_tokens, q_heads]")?;
        }
        let scale = gpu::check_scores(&qv, &kv, lv.as_ref(), scale.map(|s| s as f32))?;
        let (out, out_view) = call.empty(&[gpu::scores_workspace_len(&qv, &kv)], DType::F32)?;
        gpu::visual_token_scores(call.stream, &qv, &kv, lv.as_ref(), scale, &out_view.view())?;
        narrow(&out, kv.dim(0))
    })
}

/// Selects on the device into a new int64 tensor; returns (tensor, pointer, count).
fn select_on_device<'py>(
    call: &CudaCall<'py>,
    scores: &Bound<'py, PyAny>,
    budget: Budget,
    min_keep: usize,
    max_keep: Option<usize>,
    tokens: Option<usize>,
) -> PyResult<(Bound<'py, PyAny>, u64, usize)> {
    let scores = call.tensor(scores, "scores", FLOAT_DTYPES)?;
    let view = scores.view();
    view.expect_rank(1, "[tokens]")?;
    let n = view.dim(0);
    if let Some(tokens) = tokens {
        if n != tokens {
            return Err(
                value_err!("scores: expected {tokens} scores (one per row of x), got {n}").into(),
            );
        }
    }
    match gpu::budget_count(n, budget, min_keep, max_keep)? {
        Some(count) => {
            let (out, out_view) = call.empty(&[count], DType::I64)?;
            let ptr = out_view.view().data_ptr() as u64;
            gpu::select_topk(call.stream, &view, count, ptr)?;
            Ok((out, ptr, count))
        }
        None => {
            let Budget::Mass(mass) = budget else {
                unreachable!("budget_count gives None for mass only")
            };
            let (ws, ws_view) = call.empty(&[gpu::mass_workspace_len(n)], DType::I64)?;
            let ptr = ws_view.view().data_ptr() as u64;
            // SAFETY: ws holds mass_workspace_len(n) int64 on this device.
            let count =
                unsafe { gpu::select_mass(call.stream, &view, mass, min_keep, max_keep, ptr)? };
            Ok((narrow(&ws, count)?, ptr, count))
        }
    }
}

pub fn select_tokens<'py>(
    py: Python<'py>,
    ordinal: i32,
    scores: &Bound<'py, PyAny>,
    keep: Option<i64>,
    ratio: Option<f64>,
    mass: Option<f64>,
    min_keep: i64,
    max_keep: Option<i64>,
) -> PyResult<Bound<'py, PyAny>> {
    CudaCall::run(py, ordinal, "scores", |call| {
        let budget = budget_arg(keep, ratio, mass)?;
        let (min_keep, max_keep) = keep_bounds(min_keep, max_keep)?;
        Ok(select_on_device(call, scores, budget, min_keep, max_keep, None)?.0)
    })
}

#[allow(clippy::too_many_arguments)]
pub fn prune_visual_tokens<'py>(
    py: Python<'py>,
    ordinal: i32,
    x: &Bound<'py, PyAny>,
    indices: Option<&Bound<'py, PyAny>>,
    scores: Option<&Bound<'py, PyAny>>,
    keep: Option<i64>,
    ratio: Option<f64>,
    mass: Option<f64>,
    min_keep: i64,
    max_keep: Option<i64>,
    grid_thw: Option<&Bound<'py, PyAny>>,
    merge: bool,
) -> PyResult<(
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
)> {
    CudaCall::run(py, ordinal, "x", |call| {
        let x = call.tensor(x, "x", FLOAT_DTYPES)?;
        let view = x.view();
        view.expect_rank(2, "[tokens, dim]")?;
        let (tokens, dim) = (view.dim(0), view.dim(1));
        let budget_given = keep.is_some() || ratio.is_some() || mass.is_some();
        let (kept, kept_ptr, count) = match keep_from(indices, scores, budget_given)? {
            KeepFrom::Indices(indices) => {
                call.expect_here(indices, "indices")?;
                let checked = check_indices(&int_vector_arg(&host(indices)?, "indices")?, tokens)?;
                let values: Vec<i64> = checked.iter().map(|&i| i as i64).collect();
                let (tensor, ptr) = call.upload_i64(&values)?;
                (tensor, ptr, values.len())
            }
            KeepFrom::Scores(scores) => {
                let budget = budget_arg(keep, ratio, mass)?;
                let (min_keep, max_keep) = keep_bounds(min_keep, max_keep)?;
                match device_of(scores)? {
                    Some(Device::Cuda(_)) => {
                        select_on_device(call, scores, budget, min_keep, max_keep, Some(tokens))?
                    }
                    _ => {
                        // Scores on the host: select there, upload the indices.
                        let values = super::compress::scores_arg(scores)?;
                        check_score_count(values.len(), tokens)?;
                        let kept: Vec<i64> = cpu_select(&values, budget, min_keep, max_keep)?
                            .into_iter()
                            .map(|i| i as i64)
                            .collect();
                        let (tensor, ptr) = call.upload_i64(&kept)?;
                        (tensor, ptr, kept.len())
                    }
                }
            }
        };
        let grids = grid_thw
            .map(|g| host(g).and_then(|g| grid_arg(&g, tokens)))
            .transpose()?;
        let (out, out_view) = call.empty(&[count, dim], view.dtype())?;
        if merge && count > 0 && count < tokens && dim > 0 {
            let (_ws, ws_view) = call.empty(
                &[gpu::merge_workspace_len(tokens, count).max(1)],
                DType::I64,
            )?;
            // SAFETY: kept holds count sorted int64 indices, ws the merge workspace, on this device.
            unsafe {
                gpu::merge(
                    call.stream,
                    &view,
                    kept_ptr,
                    count,
                    ws_view.view().data_ptr() as u64,
                    &out_view.view(),
                )?
            };
        } else {
            gpu::gather(call.stream, &view, kept_ptr, count, &out_view.view())?;
        }
        let positions = match grids {
            Some(grids) => {
                let (cells, cells_view) = call.empty(&[count, 3], DType::I64)?;
                gpu::token_cells(
                    call.stream,
                    call.ordinal,
                    kept_ptr,
                    count,
                    &grids,
                    &cells_view.view(),
                )?;
                Some(cells)
            }
            None => None,
        };
        Ok((out, kept, positions))
    })
}
