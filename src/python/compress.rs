//! Bindings of `crate::compress`: arguments arrive through DLPack (NumPy / torch, no copy),
//! are checked here, the work runs on rayon with the GIL released, and results go back as
//! `Buffer`s that `python/tvc_rs/compress.py` turns into the caller's kind of array.

use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{opt_arg, Arg};

use crate::compress::{self, check_grids, check_indices, Budget, Grid};
use crate::error::Result;
use crate::python::cuda::cuda_ordinal;
use crate::python::cuda_compress as gpu;
use crate::python::tensor::{
    buffer, int_table_arg, int_vector_arg, Buffer, PyTensor, FLOAT_DTYPES,
};
use crate::tensor::{OwnedTensor, Strided};
use crate::{dispatch_float, value_err};

const GRID_LAYOUT: &str = "[n, 3] of (t, h, w)";

pub(super) fn grid_arg(grid_thw: &Bound<'_, PyAny>, tokens: usize) -> PyResult<Vec<Grid>> {
    let rows = int_table_arg(grid_thw, "grid_thw", 3, GRID_LAYOUT)?;
    let rows: Vec<[i64; 3]> = rows.iter().map(|r| [r[0], r[1], r[2]]).collect();
    Ok(check_grids(&rows, tokens, &format!("x has {tokens} rows"))?)
}

fn grid_buffer<'py>(py: Python<'py>, grids: &[Grid]) -> PyResult<Bound<'py, Buffer>> {
    let flat: Vec<i64> = grids
        .iter()
        .flat_map(|g| [g.t as i64, g.h as i64, g.w as i64])
        .collect();
    buffer(py, OwnedTensor::new(flat, vec![grids.len(), 3])?)
}

/// `x`: a CPU float tensor `[tokens, dim]`.
fn tokens_arg(x: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
    let tensor = PyTensor::extract(x, "x", FLOAT_DTYPES)?;
    {
        let view = tensor.view();
        view.expect_cpu()?;
        view.expect_rank(2, "[tokens, dim]")?;
    }
    Ok(tensor)
}

pub(super) fn factor_arg(factor: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let pair: Option<(i64, i64)> = match factor.extract::<i64>() {
        Ok(k) => Some((k, k)),
        Err(_) => factor.extract::<(i64, i64)>().ok(),
    };
    match pair {
        Some((kh, kw)) if kh >= 1 && kw >= 1 => Ok((kh as usize, kw as usize)),
        _ => Err(value_err!(
            "factor: expected an int >= 1 or a pair (kh, kw) of ints >= 1, got {}",
            factor
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| "?".into())
        )
        .into()),
    }
}

/// The selection rule from exactly one of keep / ratio / mass.
pub(super) fn budget_arg(
    keep: Option<i64>,
    ratio: Option<f64>,
    mass: Option<f64>,
) -> Result<Budget> {
    let given: Vec<&str> = [
        ("keep", keep.is_some()),
        ("ratio", ratio.is_some()),
        ("mass", mass.is_some()),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(name, _)| *name)
    .collect();
    if given.len() != 1 {
        let got = if given.is_empty() {
            "none".to_string()
        } else {
            given.join(" and ")
        };
        return Err(value_err!(
            "keep, ratio, mass: give exactly one of them, got {got}"
        ));
    }
    Ok(match (keep, ratio, mass) {
        (Some(k), _, _) if k < 0 => return Err(value_err!("keep: expected an int >= 0, got {k}")),
        (Some(k), _, _) => Budget::Keep(k as usize),
        (_, Some(r), _) => Budget::Ratio(r),
        (_, _, Some(m)) => Budget::Mass(m),
        _ => unreachable!("exactly one is set"),
    })
}

pub(super) fn keep_bounds(min_keep: i64, max_keep: Option<i64>) -> Result<(usize, Option<usize>)> {
    if min_keep < 0 {
        return Err(value_err!("min_keep: expected an int >= 0, got {min_keep}"));
    }
    if let Some(m) = max_keep.filter(|&m| m < 0) {
        return Err(value_err!("max_keep: expected an int >= 0, got {m}"));
    }
    Ok((min_keep as usize, max_keep.map(|m| m as usize)))
}

/// `scores` as f32 (any float dtype, any strides), one per token.
pub(super) fn scores_arg(scores: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    let tensor = PyTensor::extract(scores, "scores", FLOAT_DTYPES)?;
    let view = tensor.view();
    view.expect_cpu()?;
    view.expect_rank(1, "[tokens]")?;
    Ok(dispatch_float!(view.dtype(), T => {
        view.strided::<T>()?.to_contiguous()?.iter().map(|v| crate::dtype::Float::to_f32(*v)).collect()
    }))
}

#[pyfunction]
#[pyo3(signature = (x, grid_thw, factor))]
fn pool_visual_tokens<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    grid_thw: &Bound<'py, PyAny>,
    factor: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    if let Some(ordinal) = cuda_ordinal(x)? {
        return gpu::pool_visual_tokens(py, ordinal, x, grid_thw, factor);
    }
    let x = tokens_arg(x)?;
    let view = x.view();
    let grids = grid_arg(grid_thw, view.dim(0))?;
    let (kh, kw) = factor_arg(factor)?;
    let dim = view.dim(1);
    let (pooled, new_grids) = dispatch_float!(view.dtype(), T => {
        let rows = view.strided::<T>()?;
        let (pooled, new_grids) = py.detach(|| compress::pool_visual_tokens(&rows, &grids, kh, kw))?;
        let count = new_grids.iter().map(Grid::tokens).sum();
        (OwnedTensor::new(pooled, vec![count, dim])?, new_grids)
    });
    Ok((
        buffer(py, pooled)?.into_any(),
        grid_buffer(py, &new_grids)?.into_any(),
    ))
}

#[pyfunction]
#[pyo3(signature = (query, keys, lse = None, scale = None))]
fn visual_token_scores<'py>(
    py: Python<'py>,
    query: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
    lse: Option<&Bound<'py, PyAny>>,
    scale: Option<Arg<f64>>,
) -> PyResult<Bound<'py, PyAny>> {
    let scale = opt_arg(scale, "scale")?;
    if let Some(ordinal) = cuda_ordinal(query)? {
        return gpu::visual_token_scores(py, ordinal, query, keys, lse, scale);
    }
    let query = PyTensor::extract(query, "query", FLOAT_DTYPES)?;
    let keys = PyTensor::extract(keys, "keys", FLOAT_DTYPES)?;
    let lse = lse
        .map(|lse| PyTensor::extract(lse, "lse", FLOAT_DTYPES))
        .transpose()?;
    let (qv, kv) = (query.view(), keys.view());
    qv.expect_cpu()?
        .expect_rank(3, "[q_tokens, q_heads, head_dim]")?;
    kv.expect_cpu()?
        .expect_rank(3, "[k_tokens, kv_heads, head_dim]")?;
    if kv.dtype() != qv.dtype() {
        return Err(crate::type_err!(
            "keys: expected dtype {} (the dtype of query), got {}",
            qv.dtype(),
            kv.dtype()
        )
        .into());
    }
    let lse_f32: Option<Strided<'static, f32>> = match &lse {
        Some(lse) => {
            let view = lse.view();
            view.expect_cpu()?.expect_rank(2, "[q_tokens, q_heads]")?;
            let values: Vec<f32> = dispatch_float!(view.dtype(), T => {
                view.strided::<T>()?.to_contiguous()?.iter().map(|v| crate::dtype::Float::to_f32(*v)).collect()
            });
            Some(Strided::from_vec(values, view.shape()))
        }
        None => None,
    };
    let scale = scale.map(|s| s as f32);
    let scores = dispatch_float!(qv.dtype(), T => {
        let (q, k) = (qv.strided::<T>()?, kv.strided::<T>()?);
        py.detach(|| compress::visual_token_scores(&q, &k, lse_f32.as_ref(), scale))?
    });
    let count = scores.len();
    Ok(buffer(py, OwnedTensor::new(scores, vec![count])?)?.into_any())
}

#[pyfunction]
#[pyo3(signature = (scores, keep = None, ratio = None, mass = None, min_keep = Arg::of(1), max_keep = None), text_signature = "(scores, keep=None, ratio=None, mass=None, min_keep=1, max_keep=None)")]
fn select_tokens<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    keep: Option<Arg<i64>>,
    ratio: Option<Arg<f64>>,
    mass: Option<Arg<f64>>,
    min_keep: Arg<i64>,
    max_keep: Option<Arg<i64>>,
) -> PyResult<Bound<'py, PyAny>> {
    let keep = opt_arg(keep, "keep")?;
    let ratio = opt_arg(ratio, "ratio")?;
    let mass = opt_arg(mass, "mass")?;
    let min_keep = min_keep.get("min_keep")?;
    let max_keep = opt_arg(max_keep, "max_keep")?;
    if let Some(ordinal) = cuda_ordinal(scores)? {
        return gpu::select_tokens(py, ordinal, scores, keep, ratio, mass, min_keep, max_keep);
    }
    let scores = scores_arg(scores)?;
    let budget = budget_arg(keep, ratio, mass)?;
    let (min_keep, max_keep) = keep_bounds(min_keep, max_keep)?;
    let kept = py.detach(|| compress::select_tokens(&scores, budget, min_keep, max_keep))?;
    let kept: Vec<i64> = kept.into_iter().map(|i| i as i64).collect();
    let count = kept.len();
    Ok(buffer(py, OwnedTensor::new(kept, vec![count])?)?.into_any())
}

type Pruned<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
);

#[pyfunction]
#[pyo3(signature = (x, indices = None, *, scores = None, keep = None, ratio = None, mass = None,
                    min_keep = Arg::of(1), max_keep = None, grid_thw = None, merge = Arg::of(false)), text_signature = "(x, indices=None, *, scores=None, keep=None, ratio=None, mass=None, min_keep=1, max_keep=None, grid_thw=None, merge=False)")]
#[allow(clippy::too_many_arguments)]
fn prune_visual_tokens<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    indices: Option<&Bound<'py, PyAny>>,
    scores: Option<&Bound<'py, PyAny>>,
    keep: Option<Arg<i64>>,
    ratio: Option<Arg<f64>>,
    mass: Option<Arg<f64>>,
    min_keep: Arg<i64>,
    max_keep: Option<Arg<i64>>,
    grid_thw: Option<&Bound<'py, PyAny>>,
    merge: Arg<bool>,
) -> PyResult<Pruned<'py>> {
    let keep = opt_arg(keep, "keep")?;
    let ratio = opt_arg(ratio, "ratio")?;
    let mass = opt_arg(mass, "mass")?;
    let min_keep = min_keep.get("min_keep")?;
    let max_keep = opt_arg(max_keep, "max_keep")?;
    let merge = merge.get("merge")?;
    if let Some(ordinal) = cuda_ordinal(x)? {
        return gpu::prune_visual_tokens(
            py, ordinal, x, indices, scores, keep, ratio, mass, min_keep, max_keep, grid_thw, merge,
        );
    }
    let x = tokens_arg(x)?;
    let view = x.view();
    let (tokens, dim) = (view.dim(0), view.dim(1));
    let budget_given = keep.is_some() || ratio.is_some() || mass.is_some();
    let indices: Vec<usize> = match compress::keep_from(indices, scores, budget_given)? {
        compress::KeepFrom::Indices(indices) => {
            check_indices(&int_vector_arg(indices, "indices")?, tokens)?
        }
        compress::KeepFrom::Scores(scores) => {
            let scores = scores_arg(scores)?;
            compress::check_score_count(scores.len(), tokens)?;
            let budget = budget_arg(keep, ratio, mass)?;
            let (min_keep, max_keep) = keep_bounds(min_keep, max_keep)?;
            compress::select_tokens(&scores, budget, min_keep, max_keep)?
        }
    };
    let grids = grid_thw.map(|g| grid_arg(g, tokens)).transpose()?;
    let kept = dispatch_float!(view.dtype(), T => {
        let rows = view.strided::<T>()?;
        let kept = py.detach(|| compress::prune_visual_tokens(&rows, &indices, merge))?;
        OwnedTensor::new(kept, vec![indices.len(), dim])?
    });
    let positions = match grids {
        Some(grids) => {
            let cells = compress::token_cells(&grids, &indices)?;
            let flat: Vec<i64> = cells.iter().flatten().copied().collect();
            Some(buffer(py, OwnedTensor::new(flat, vec![indices.len(), 3])?)?.into_any())
        }
        None => None,
    };
    let count = indices.len();
    let indices: Vec<i64> = indices.into_iter().map(|i| i as i64).collect();
    Ok((
        buffer(py, kept)?.into_any(),
        buffer(py, OwnedTensor::new(indices, vec![count])?)?.into_any(),
        positions,
    ))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pool_visual_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(visual_token_scores, m)?)?;
    m.add_function(wrap_pyfunction!(select_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(prune_visual_tokens, m)?)?;
    Ok(())
}
