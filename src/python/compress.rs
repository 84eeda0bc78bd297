//! Bindings of `crate::compress`: each argument is parsed once (tensors through DLPack, NumPy /
//! torch, no copy; integer arrays through `int_array`), the core is called once and routes by
//! device; results go back as `Buffer`s (CPU) that `python/tvc_rs/compress.py` turns into the
//! caller's kind of array, or as torch tensors on the input's GPU. Host metadata (grids, given
//! indices) passed as CUDA tensors is copied to the host first (a synchronisation); grids
//! returned are host data too.

use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{opt_arg, Arg};

use crate::compress::{self, keep_from, Budget, Grid, KeepFrom, DATA_DTYPES};
use crate::python::cuda::Place;
use crate::python::tensor::{buffer, int_array, IntShape};
use crate::tensor::OwnedTensor;
use crate::value_err;

const GRID_LAYOUT: &str = "[n, 3] of (t, h, w)";

/// `grid_thw` rows (checked by the core).
fn grid_arg(place: &Place<'_, '_>, grid_thw: &Bound<'_, PyAny>) -> PyResult<Vec<[i64; 3]>> {
    let flat = int_array(
        &place.host(grid_thw, "grid_thw")?,
        "grid_thw",
        IntShape::Table {
            cols: 3,
            layout: GRID_LAYOUT,
        },
    )?
    .values;
    Ok(flat.chunks(3).map(|r| [r[0], r[1], r[2]]).collect())
}

/// New grids as a host int64 `[n, 3]` Buffer, also for CUDA input: they are metadata that
/// callers read on the host, so an upload would only cost them a synchronisation.
fn grid_output<'py>(py: Python<'py>, grids: &[Grid]) -> PyResult<Bound<'py, PyAny>> {
    let flat: Vec<i64> = grids
        .iter()
        .flat_map(|g| [g.t as i64, g.h as i64, g.w as i64])
        .collect();
    Ok(buffer(py, OwnedTensor::new(flat, vec![grids.len(), 3])?)?.into_any())
}

fn factor_arg(factor: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
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

#[pyfunction]
#[pyo3(signature = (x, grid_thw, factor))]
fn pool_visual_tokens<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    grid_thw: &Bound<'py, PyAny>,
    factor: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    Place::run(py, x, "x", |place| {
        let x = place.tensor(x, "x", DATA_DTYPES)?;
        let grids = grid_arg(place, grid_thw)?;
        let factor = factor_arg(factor)?;
        let (pooled, new_grids) = compress::pool_visual_tokens(&x.view(), &grids, factor, place)?;
        Ok((place.output(pooled)?, grid_output(py, &new_grids)?))
    })
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
    let scale = opt_arg(scale, "scale")?.map(|s| s as f32);
    Place::run(py, query, "query", |place| {
        let query = place.tensor(query, "query", DATA_DTYPES)?;
        let keys = place.tensor(keys, "keys", DATA_DTYPES)?;
        let lse = lse
            .map(|lse| place.tensor(lse, "lse", DATA_DTYPES))
            .transpose()?;
        let lse = lse.as_ref().map(|l| l.view());
        let scores =
            compress::visual_token_scores(&query.view(), &keys.view(), lse.as_ref(), scale, place)?;
        place.output(scores)
    })
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
    let budget = Budget::from_args(
        opt_arg(keep, "keep")?,
        opt_arg(ratio, "ratio")?,
        opt_arg(mass, "mass")?,
        min_keep.get("min_keep")?,
        opt_arg(max_keep, "max_keep")?,
    )?;
    Place::run(py, scores, "scores", |place| {
        let scores = place.tensor(scores, "scores", DATA_DTYPES)?;
        place.output(compress::select_tokens(&scores.view(), budget, place)?)
    })
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
    let budget_given = keep.is_some() || ratio.is_some() || mass.is_some();
    let from = keep_from(indices, scores, budget_given)?;
    Place::run(py, x, "x", |place| {
        let x = place.tensor(x, "x", DATA_DTYPES)?;
        let from = match from {
            KeepFrom::Indices(indices) => KeepFrom::Indices(
                int_array(
                    &place.host(indices, "indices")?,
                    "indices",
                    IntShape::Vector,
                )?
                .values,
            ),
            KeepFrom::Scores(scores) => KeepFrom::Scores((
                place.tensor(scores, "scores", DATA_DTYPES)?,
                Budget::from_args(keep, ratio, mass, min_keep, max_keep)?,
            )),
        };
        let grids = grid_thw.map(|g| grid_arg(place, g)).transpose()?;
        let scores_view = match &from {
            KeepFrom::Scores((scores, _)) => Some(scores.view()),
            KeepFrom::Indices(_) => None,
        };
        let keep = match (&from, &scores_view) {
            (KeepFrom::Indices(indices), _) => KeepFrom::Indices(indices.as_slice()),
            (KeepFrom::Scores((_, budget)), Some(view)) => KeepFrom::Scores((view, *budget)),
            _ => unreachable!("a view of the scores is made when they are given"),
        };
        let pruned =
            compress::prune_visual_tokens(&x.view(), keep, grids.as_deref(), merge, place)?;
        Ok((
            place.output(pruned.tokens)?,
            place.output(pruned.indices)?,
            pruned.cells.map(|c| place.output(c)).transpose()?,
        ))
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pool_visual_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(visual_token_scores, m)?)?;
    m.add_function(wrap_pyfunction!(select_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(prune_visual_tokens, m)?)?;
    Ok(())
}
