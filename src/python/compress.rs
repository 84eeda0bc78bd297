//! Bindings of `crate::compress`, re-exported as they are by `python/tvc_rs/compress.py`: each
//! argument is parsed once (tensors through DLPack, NumPy / torch, no copy; integer arrays
//! through `int_array`), the core is called once and routes by device; results go back as the
//! caller's kind of array (CPU `Buffer`s made NumPy arrays or torch tensors, or torch tensors
//! on the input's GPU), in the named tuples `Pooled` / `Pruned`. Host metadata (grids, given
//! indices) passed as CUDA tensors is copied to the host first (a synchronisation); grids
//! returned are host data too.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

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

/// A result as the caller's kind of array (`tvc_rs._tensor.like`: a torch tensor for torch
/// input, NumPy otherwise; no copy).
fn like<'py>(
    out: &Bound<'py, PyAny>,
    reference: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = out.py();
    static LIKE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    LIKE.get_or_try_init(py, || {
        py.import("tvc_rs._tensor")?
            .getattr("like")
            .map(Bound::unbind)
    })?
    .bind(py)
    .call1((out, reference))
}

/// A result type: a `collections.namedtuple` made once, with its documentation.
struct ResultType {
    name: &'static str,
    doc: &'static str,
    fields: &'static [(&'static str, &'static str)],
    made: PyOnceLock<Py<PyAny>>,
}

static POOLED: ResultType = ResultType {
    name: "Pooled",
    doc: "Result of :func:`pool_visual_tokens`.",
    fields: &[
        ("tokens", "``[new_tokens, dim]``, same dtype as ``x``, row-major on the new grids."),
        (
            "grid_thw",
            "``[n, 3]`` int64: ``(t, ceil(h / kh), ceil(w / kw))`` per input grid; host data (a CPU tensor for CUDA input).",
        ),
    ],
    made: PyOnceLock::new(),
};

static PRUNED: ResultType = ResultType {
    name: "Pruned",
    doc: "Result of :func:`prune_visual_tokens`.",
    fields: &[
        ("tokens", "``[kept, dim]``, same dtype as ``x``, in their original order."),
        ("indices", "``[kept]`` int64, sorted: the rows of ``x`` that were kept."),
        (
            "positions",
            "``[kept, 3]`` int64 ``(t, h, w)`` cell of each kept token within its own grid (for M-RoPE positions of a pruned image; on the input's device), or ``None`` without ``grid_thw``.",
        ),
    ],
    made: PyOnceLock::new(),
};

fn result_type<'py>(py: Python<'py>, kind: &ResultType) -> PyResult<Bound<'py, PyAny>> {
    let made = kind.made.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        let names: Vec<&str> = kind.fields.iter().map(|(name, _)| *name).collect();
        let kwargs = pyo3::types::PyDict::new(py);
        // Re-exported by tvc_rs.compress, where pickle finds it.
        kwargs.set_item("module", "tvc_rs.compress")?;
        let class = py
            .import("collections")?
            .getattr("namedtuple")?
            .call((kind.name, names), Some(&kwargs))?;
        class.setattr("__doc__", kind.doc)?;
        for (name, doc) in kind.fields {
            class.getattr(*name)?.setattr("__doc__", *doc)?;
        }
        Ok(class.unbind())
    })?;
    Ok(made.bind(py).clone())
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

/// Average-pool visual tokens with ``kh x kw`` windows inside each frame of their grids.
///
/// Args:
///     x: ``[tokens, dim]`` float32 / float16 / bfloat16, the tokens of every grid one after
///         the other. Any strides: rows are read in place when the last axis is contiguous
///         (slices such as ``x[a:b]``, ``x[:, :k]``, ``x[::2]``), other layouts are copied first.
///     grid_thw: ``[n, 3]`` int array or a list of ``(t, h, w)``: the grids of the tokens in
///         ``x`` (after the 2x2 merge in Qwen2-VL terms); ``sum(t * h * w)`` must equal
///         ``tokens``, every dimension ``>= 1``.
///     factor: ``k`` (``k x k`` windows) or ``(kh, kw)``, each ``>= 1``. TVC uses 4.
///
/// Returns:
///     ``Pooled(tokens, grid_thw)``: an ``h x w`` grid becomes ``ceil(h/kh) x ceil(w/kw)``;
///     windows at the bottom / right edge average only the cells they cover. Frames (``t``)
///     are pooled separately. Outputs are of the kind of ``x`` (NumPy or torch).
///
/// Raises:
///     ValueError: bad ``factor`` (0, negative), grids that are not ``[n, 3]``, with a
///         dimension < 1 or whose tokens do not add up to ``tokens``; ``x`` not 2-D.
///     TypeError: ``x`` not an array, or of another dtype.
#[pyfunction]
#[pyo3(signature = (x, grid_thw, factor = None), text_signature = "(x, grid_thw, factor=4)")]
fn pool_visual_tokens<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    grid_thw: &Bound<'py, PyAny>,
    factor: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let (tokens, grids) = Place::run(py, x, "x", |place| {
        let x = place.tensor(x, "x", DATA_DTYPES)?;
        let grids = grid_arg(place, grid_thw)?;
        let factor = factor.map_or(Ok((4, 4)), factor_arg)?;
        let (pooled, new_grids) = compress::pool_visual_tokens(&x.view(), &grids, factor, place)?;
        Ok((place.output(pooled)?, grid_output(py, &new_grids)?))
    })?;
    result_type(py, &POOLED)?.call1((like(&tokens, x)?, like(&grids, x)?))
}

/// FastV / PyramidDrop-style importance of each visual token (attention it receives).
///
/// ``p[q, h, :] = softmax(scale * query[q, h] . keys[:, h // (q_heads // kv_heads)])`` over
/// the visual keys (grouped-query attention), averaged over heads and query rows.
///
/// Args:
///     query: ``[q_tokens, q_heads, head_dim]``, e.g. the last text tokens' queries at one
///         layer (after RoPE, as the attention saw them). ``q_tokens >= 1``.
///     keys: ``[k_tokens, kv_heads, head_dim]``, the visual tokens' keys at the same layer,
///         same dtype as ``query``; ``q_heads`` must be a multiple of ``kv_heads``. A
///         ``[kv_heads, seq, head_dim]`` cache slice ``k[:, a:b].transpose(0, 1)`` is read in
///         place (any strides with a contiguous last axis; other layouts are copied).
///     lse: optional ``[q_tokens, q_heads]`` natural log-sum-exp of the *full* scaled attention
///         rows (flash-attention's ``softmax_lse`` is ``[heads, tokens]``: pass its transpose).
///         Then ``p = exp(scale * q . k - lse)``: the share of the whole attention row that
///         goes to each visual token, not a softmax over the visual keys alone.
///     scale: softmax scale, default ``1 / sqrt(head_dim)``.
///
/// Returns:
///     ``[k_tokens]`` float32 (NumPy or torch, as ``query``). All keys given are scored in one
///     softmax; to score several images separately, call once per image.
///
/// Raises:
///     ValueError: wrong ranks, mismatched head_dim, q_heads not a multiple of kv_heads,
///         no query rows, ``lse`` of the wrong shape.
///     TypeError: non-float dtypes, or ``keys`` of another dtype than ``query``.
#[pyfunction]
#[pyo3(signature = (query, keys, *, lse = None, scale = None), text_signature = "(query, keys, *, lse=None, scale=None)")]
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
    .and_then(|scores| like(&scores, query))
}

/// Sorted indices of the tokens to keep, by score (give exactly one of keep / ratio / mass).
///
/// - ``keep=n``: the ``n`` highest scores;
/// - ``ratio=r`` (in [0, 1]): ``round(r * tokens)`` of them, halves rounded up;
/// - ``mass=m`` (in [0, 1], "dynamic"): the fewest highest-scoring tokens whose scores sum to
///   at least ``m`` times the total (scores must be finite and non-negative).
///
/// The count is clamped to ``[min_keep, max_keep]``, then to ``tokens``. Ties break towards the
/// lower index, so the result is deterministic.
///
/// Args:
///     scores: ``[tokens]`` float (any strides).
///
/// Returns:
///     ``[kept]`` int64 indices in increasing order (NumPy or torch, as ``scores``).
///
/// Raises:
///     ValueError: NaN scores (negative or infinite ones with ``mass``), none or several of
///         keep / ratio / mass, a share outside [0, 1], ``min_keep > max_keep``.
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
    .and_then(|kept| like(&kept, scores))
}

/// Keep a subset of visual tokens, optionally merging the dropped ones into the kept ones.
///
/// Args:
///     x: ``[tokens, dim]`` float32 / float16 / bfloat16 (any strides, as in
///         :func:`pool_visual_tokens`).
///     indices: the rows to keep, int array or list, unique and sorted increasingly. Or
///         leave it out and give ``scores`` (``[tokens]``) with one of ``keep`` / ``ratio`` /
///         ``mass`` (and ``min_keep`` / ``max_keep``) to select them as :func:`select_tokens`.
///         Several images in ``x`` are selected from together.
///     grid_thw: optional grids of the tokens (as in :func:`pool_visual_tokens`): then each
///         kept token's ``(t, h, w)`` cell within its own grid is returned as ``positions``.
///     merge: average each dropped token into its most similar kept token (cosine similarity,
///         ties to the lower index), ToMe-style: a kept token becomes the mean of itself and
///         the tokens merged into it.
///
/// Returns:
///     ``Pruned(tokens, indices, positions)``; outputs are of the kind of ``x``.
///
/// Raises:
///     IndexError: an index out of range. ValueError: duplicated or unsorted indices, both or
///     neither of indices / scores, ``scores`` of the wrong length, bad grids. TypeError:
///     wrong dtypes.
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
) -> PyResult<Bound<'py, PyAny>> {
    let keep = opt_arg(keep, "keep")?;
    let ratio = opt_arg(ratio, "ratio")?;
    let mass = opt_arg(mass, "mass")?;
    let min_keep = min_keep.get("min_keep")?;
    let max_keep = opt_arg(max_keep, "max_keep")?;
    let merge = merge.get("merge")?;
    let budget_given = keep.is_some() || ratio.is_some() || mass.is_some();
    let from = keep_from(indices, scores, budget_given)?;
    let (tokens, kept, positions) = Place::run(py, x, "x", |place| {
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
    })?;
    let positions = match positions {
        Some(p) => like(&p, x)?,
        None => py.None().into_bound(py),
    };
    result_type(py, &PRUNED)?.call1((like(&tokens, x)?, like(&kept, x)?, positions))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("Pooled", result_type(m.py(), &POOLED)?)?;
    m.add("Pruned", result_type(m.py(), &PRUNED)?)?;
    m.add_function(wrap_pyfunction!(pool_visual_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(visual_token_scores, m)?)?;
    m.add_function(wrap_pyfunction!(select_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(prune_visual_tokens, m)?)?;
    Ok(())
}
