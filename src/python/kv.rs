//! Bindings of `crate::kv`: key re-rotation, span relocation and entry writes in contiguous
//! (transformers) caches, paged re-injection in vLLM caches. Each argument is parsed once
//! (tensors through the shared DLPack interop, without copies; integer arrays through
//! `int_array`) and the core is called once: it checks everything and runs on the tensors'
//! device. CPU work runs with the GIL released; CUDA work is queued on PyTorch's current
//! stream (`CudaCall`).

use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{opt_arg, Arg};

use crate::kv::{
    self, DeltaSource, OwnedDeltas, PagedLayoutKind, Positions, Rope, RopeConfig, SpanDeltas,
};
use crate::python::cuda::{on_host, tensors_arg, CudaCall};
use crate::python::tensor::{
    int_array, int_table_arg, int_vector_arg, IntShape, PyTensor, INDEX_DTYPES, KV_DTYPES,
};
use crate::tensor::{IntArray, TensorView};
use crate::value_err;

// ---- arguments ----

/// The RoPE keywords, under the same names in every function.
fn rope_arg(
    rope_theta: f64,
    head_dim: i64,
    rotary_dim: Option<i64>,
    interleaved: bool,
    mrope_section: Option<Vec<i64>>,
    mrope_interleaved: bool,
) -> PyResult<Rope> {
    if head_dim < 1 {
        return Err(value_err!("head_dim = {head_dim}: must be >= 2").into());
    }
    if let Some(r) = rotary_dim {
        if r < 1 {
            return Err(value_err!(
                "rotary_dim = {r}: must be even and >= 2 (RoPE rotates pairs of dimensions)"
            )
            .into());
        }
    }
    let sections = match mrope_section {
        Some(s) if s.iter().any(|&x| x < 0) => {
            return Err(value_err!("mrope_section = {s:?}: every section must be >= 0").into());
        }
        Some(s) => Some(s.into_iter().map(|x| x as usize).collect()),
        None => None,
    };
    let config = RopeConfig::new(
        rope_theta,
        head_dim as usize,
        rotary_dim.map(|r| r as usize),
        interleaved,
        sections,
    )?
    .with_mrope_interleaved(mrope_interleaved)?;
    Ok(Rope::new(config))
}

/// The RoPE keywords of `rerotate_keys`, `relocate_span` and `paged_reinject`.
fn rope_kwargs(
    rope_theta: Arg<f64>,
    head_dim: Arg<i64>,
    rotary_dim: Option<Arg<i64>>,
    interleaved: Arg<bool>,
    mrope_section: Option<Arg<Vec<i64>>>,
    mrope_interleaved: Arg<bool>,
) -> PyResult<Rope> {
    rope_arg(
        rope_theta.get("rope_theta")?,
        head_dim.get("head_dim")?,
        opt_arg(rotary_dim, "rotary_dim")?,
        interleaved.get("interleaved")?,
        opt_arg(mrope_section, "mrope_section")?,
        mrope_interleaved.get("mrope_interleaved")?,
    )
}

/// `delta` as passed: host ints, or a CUDA tensor on a CUDA call (read in place).
enum DeltaArg {
    Host(OwnedDeltas),
    Tensor(PyTensor),
}

impl DeltaArg {
    fn parse(call: Option<&CudaCall<'_>>, obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Some(call) = call {
            if let Some(tensor) = call.device_tensor(obj, "delta", INDEX_DTYPES)? {
                return Ok(DeltaArg::Tensor(tensor));
            }
        }
        Ok(DeltaArg::Host(OwnedDeltas::from_array(int_array(
            obj,
            "delta",
            IntShape::Any,
        )?)?))
    }

    fn source(&self) -> DeltaSource<'_> {
        match self {
            DeltaArg::Host(d) => DeltaSource::Host(d.deltas()),
            DeltaArg::Tensor(t) => DeltaSource::Tensor(t.view()),
        }
    }
}

/// Host integers; on a CUDA call a CUDA tensor is copied to the host first.
fn host_array(
    call: Option<&CudaCall<'_>>,
    obj: &Bound<'_, PyAny>,
    name: &str,
) -> PyResult<IntArray> {
    match call {
        Some(_) => int_array(&on_host(obj)?, name, IntShape::Any),
        None => int_array(obj, name, IntShape::Any),
    }
}

fn host_vector(
    call: Option<&CudaCall<'_>>,
    obj: &Bound<'_, PyAny>,
    name: &str,
) -> PyResult<Vec<i64>> {
    match call {
        Some(_) => int_vector_arg(&on_host(obj)?, name),
        None => int_vector_arg(obj, name),
    }
}

fn views(tensors: &mut [PyTensor]) -> Vec<TensorView<'_>> {
    tensors.iter_mut().map(|t| t.view_mut()).collect()
}

/// Runs a core operation: on the CPU with the GIL released, on a CUDA call on its stream.
fn run<T: Send>(
    py: Python<'_>,
    call: Option<&CudaCall<'_>>,
    op: impl FnOnce(crate::cuda::Launch<'_>) -> crate::error::Result<T> + Send,
) -> PyResult<T> {
    match call {
        Some(call) => call.launch(op),
        None => Ok(py.detach(|| op(crate::cuda::Launch::default()))?),
    }
}

/// `length` (the valid entries), when given: >= 0.
fn length_arg(length: Option<Arg<i64>>) -> PyResult<Option<usize>> {
    match opt_arg(length, "length")? {
        Some(l) if l < 0 => Err(value_err!("length = {l}: must be >= 0").into()),
        l => Ok(l.map(|l| l as usize)),
    }
}

/// The cache layers, `delta`, `old_positions`, `new_positions` of `relocate_span` /
/// `relocate_spans`.
type RelocateArgs<'a, 'py> = (
    &'a Bound<'py, PyAny>,
    &'a Bound<'py, PyAny>,
    Option<&'a Bound<'py, PyAny>>,
    Option<&'a Bound<'py, PyAny>>,
    Option<&'a Bound<'py, PyAny>>,
);

/// Parses the arguments `relocate_span` and `relocate_spans` share, once, and runs `op` (the
/// core function) on them.
fn relocate_call(
    py: Python<'_>,
    call: Option<&CudaCall<'_>>,
    (keys, values, delta, old_positions, new_positions): RelocateArgs<'_, '_>,
    op: impl FnOnce(
            &mut [TensorView<'_>],
            &mut [TensorView<'_>],
            SpanDeltas<'_>,
            crate::cuda::Launch<'_>,
        ) -> crate::error::Result<usize>
        + Send,
) -> PyResult<usize> {
    let mut k = tensors_arg(call, keys, "keys", KV_DTYPES)?;
    let mut v = tensors_arg(call, values, "values", KV_DTYPES)?;
    let delta = delta.map(|d| DeltaArg::parse(call, d)).transpose()?;
    let old = old_positions
        .map(|o| host_array(call, o, "old_positions"))
        .transpose()?;
    let new = new_positions
        .map(|n| host_array(call, n, "new_positions"))
        .transpose()?;
    let deltas = SpanDeltas::from_args(delta.as_ref().map(DeltaArg::source), old, new)?;
    let (mut keys, mut values) = (views(&mut k), views(&mut v));
    run(py, call, |launch| {
        op(&mut keys, &mut values, deltas, launch)
    })
}

// ---- functions ----

/// Rotate cached (already RoPE-rotated) keys in place by a position delta per token.
///
/// ``keys``: ``[tokens, heads, head_dim]`` float32/float16/bfloat16/float64, or a list/tuple of such
/// tensors (one per layer, same ``tokens``, all rotated in one call). Any strides: for a
/// transformers cache layer ``[batch, kv_heads, seq, head_dim]`` pass
/// ``layer.keys[b].transpose(0, 1)`` (a view; no copy). Written in place.
///
/// ``delta``: int, ``[tokens]`` or (M-RoPE) ``[tokens, 3]`` int32/int64. A key stored at
/// position ``p`` becomes the key at ``p + delta``: ``R(p + d) = R(d) R(p)``.
/// Only the first ``rotary_dim`` dims of each key change.
#[pyfunction]
#[pyo3(signature = (keys, delta, *, rope_theta, head_dim, rotary_dim = None, interleaved = Arg::of(false), mrope_section = None, mrope_interleaved = Arg::of(false)), text_signature = "(keys, delta, *, rope_theta, head_dim, rotary_dim=None, interleaved=False, mrope_section=None, mrope_interleaved=False)")]
#[allow(clippy::too_many_arguments)]
fn rerotate_keys(
    py: Python<'_>,
    keys: &Bound<'_, PyAny>,
    delta: &Bound<'_, PyAny>,
    rope_theta: Arg<f64>,
    head_dim: Arg<i64>,
    rotary_dim: Option<Arg<i64>>,
    interleaved: Arg<bool>,
    mrope_section: Option<Arg<Vec<i64>>>,
    mrope_interleaved: Arg<bool>,
) -> PyResult<()> {
    let rope = rope_kwargs(
        rope_theta,
        head_dim,
        rotary_dim,
        interleaved,
        mrope_section,
        mrope_interleaved,
    )?;
    CudaCall::maybe(py, keys, "keys", |call| {
        let mut tensors = tensors_arg(call, keys, "keys", KV_DTYPES)?;
        let delta = DeltaArg::parse(call, delta)?;
        let (mut keys, delta) = (views(&mut tensors), delta.source());
        run(py, call, |launch| {
            kv::rerotate_keys(&mut keys, delta, &rope, launch)
        })
    })
}

/// Evict cache positions ``[start, end)`` (e.g. the first image) from every layer.
///
/// ``keys``, ``values``: lists/tuples of per-layer tensors ``[batch, kv_heads, seq, head_dim]``
/// (transformers' ``[layer.keys for layer in cache.layers]`` and ``[layer.values ...]``; values
/// may have another head size), one dtype for all. Modified in place: entries
/// ``[end, length)`` move down to ``[start, length - (end - start))`` in keys and values, and
/// each moved key is re-rotated to its new position. Entries before ``start`` are untouched;
/// entries from the returned length on are stale: drop them (transformers 5.24.0:
/// ``cache.crop(new_length - old_length)``, a negative count removing that many).
///
/// The moved entries' deltas (``n = length - end`` of them), one of:
///
/// - ``delta``: int, ``[n]`` or ``[n, 3]`` (t, h, w);
/// - ``old_positions`` and ``new_positions``: their position ids before and after, ``[n]`` or,
///   for M-RoPE, ``[3, n]`` as transformers lays position ids out (``position_ids[:, b, end:length]``
///   and what ``get_rope_index`` assigns them in the rebuilt sequence: the ``relocate`` mode);
/// - neither (plain RoPE only): ``-(end - start)``. With M-RoPE an image advances positions by
///   ``max(t, h, w)`` of its grid, not by its token count, so the deltas must be given.
///
/// ``length``: valid entries (default ``seq``; e.g. a StaticCache's filled length).
/// Returns the new valid length ``length - (end - start)``.
#[pyfunction]
#[pyo3(signature = (keys, values, start, end, *, rope_theta, head_dim, delta = None, old_positions = None,
    new_positions = None, length = None, rotary_dim = None, interleaved = Arg::of(false), mrope_section = None, mrope_interleaved = Arg::of(false)), text_signature = "(keys, values, start, end, *, rope_theta, head_dim, delta=None, old_positions=None, new_positions=None, length=None, rotary_dim=None, interleaved=False, mrope_section=None, mrope_interleaved=False)")]
#[allow(clippy::too_many_arguments)]
fn relocate_span(
    py: Python<'_>,
    keys: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    start: Arg<i64>,
    end: Arg<i64>,
    rope_theta: Arg<f64>,
    head_dim: Arg<i64>,
    delta: Option<&Bound<'_, PyAny>>,
    old_positions: Option<&Bound<'_, PyAny>>,
    new_positions: Option<&Bound<'_, PyAny>>,
    length: Option<Arg<i64>>,
    rotary_dim: Option<Arg<i64>>,
    interleaved: Arg<bool>,
    mrope_section: Option<Arg<Vec<i64>>>,
    mrope_interleaved: Arg<bool>,
) -> PyResult<usize> {
    let start = start.get("start")?;
    let end = end.get("end")?;
    let rope = rope_kwargs(
        rope_theta,
        head_dim,
        rotary_dim,
        interleaved,
        mrope_section,
        mrope_interleaved,
    )?;
    if start < 0 || end < 0 {
        return Err(pyo3::exceptions::PyIndexError::new_err(format!(
            "start = {start}, end = {end}: the span [start, end) must lie inside the cache (>= 0)"
        )));
    }
    let (start, end, length) = (start as usize, end as usize, length_arg(length)?);
    CudaCall::maybe(py, keys, "keys", |call| {
        let moves = (keys, values, delta, old_positions, new_positions);
        relocate_call(py, call, moves, |keys, values, deltas, launch| {
            kv::relocate_span(keys, values, start, end, length, deltas, &rope, launch)
        })
    })
}

/// Evict several spans (e.g. every image block) from every layer in one pass.
///
/// ``spans``: ``(start, end)`` pairs (a sequence of 2-tuples or an int array ``[k, 2]``),
/// sorted and disjoint (``end`` of one <= ``start`` of the next; adjacent and empty spans
/// allowed), each inside ``length``. ``keys`` and ``values`` as for ``relocate_span``, modified
/// in place: every entry from ``spans[0][0]`` to ``length`` that lies in no span moves down to
/// close the gaps, order kept, and each moved key is re-rotated to its new position. The same
/// result as ``relocate_span`` once per span from the last to the first, with each entry rotated
/// once by its total delta. No spans: nothing is touched.
///
/// The moved entries' deltas (``n`` of them: the entries from ``spans[0][0]`` on outside the
/// spans), one of:
///
/// - ``delta``: int, ``[n]`` or ``[n, 3]`` (t, h, w);
/// - ``old_positions`` and ``new_positions``: their position ids before and after, ``[n]`` or,
///   for M-RoPE, ``[3, n]`` as transformers lays position ids out;
/// - neither (plain RoPE only): each entry moves back by the number of evicted entries before it.
///
/// ``length``: valid entries (default ``seq``). Returns the new valid length ``length`` minus the
/// evicted entries.
///
/// Raises:
///     ValueError: ``spans`` unsorted, overlapping, a span with ``start > end`` or rows that are
///         not pairs; shapes, deltas as for ``relocate_span``.
///     IndexError: a span outside ``[0, length]``; ``length`` above ``seq``.
///     TypeError: ``spans`` not integer pairs.
#[pyfunction]
#[pyo3(signature = (keys, values, spans, *, rope_theta, head_dim, delta = None, old_positions = None,
    new_positions = None, length = None, rotary_dim = None, interleaved = Arg::of(false), mrope_section = None, mrope_interleaved = Arg::of(false)), text_signature = "(keys, values, spans, *, rope_theta, head_dim, delta=None, old_positions=None, new_positions=None, length=None, rotary_dim=None, interleaved=False, mrope_section=None, mrope_interleaved=False)")]
#[allow(clippy::too_many_arguments)]
fn relocate_spans(
    py: Python<'_>,
    keys: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    spans: &Bound<'_, PyAny>,
    rope_theta: Arg<f64>,
    head_dim: Arg<i64>,
    delta: Option<&Bound<'_, PyAny>>,
    old_positions: Option<&Bound<'_, PyAny>>,
    new_positions: Option<&Bound<'_, PyAny>>,
    length: Option<Arg<i64>>,
    rotary_dim: Option<Arg<i64>>,
    interleaved: Arg<bool>,
    mrope_section: Option<Arg<Vec<i64>>>,
    mrope_interleaved: Arg<bool>,
) -> PyResult<usize> {
    let rope = rope_kwargs(
        rope_theta,
        head_dim,
        rotary_dim,
        interleaved,
        mrope_section,
        mrope_interleaved,
    )?;
    let length = length_arg(length)?;
    CudaCall::maybe(py, keys, "keys", |call| {
        let layout = "[n, 2] of (start, end)";
        let rows = match call {
            Some(_) => int_table_arg(&on_host(spans)?, "spans", 2, layout)?,
            None => int_table_arg(spans, "spans", 2, layout)?,
        };
        let spans = rows
            .iter()
            .enumerate()
            .map(
                |(i, r)| match (usize::try_from(r[0]), usize::try_from(r[1])) {
                    (Ok(s), Ok(e)) => Ok((s, e)),
                    _ => Err(pyo3::exceptions::PyIndexError::new_err(format!(
                    "spans[{i}] = ({}, {}): a span [start, end) must lie inside the cache (>= 0)",
                    r[0], r[1]
                ))),
                },
            )
            .collect::<PyResult<Vec<_>>>()?;
        let moves = (keys, values, delta, old_positions, new_positions);
        relocate_call(py, call, moves, |keys, values, deltas, launch| {
            kv::relocate_spans(keys, values, &spans, length, deltas, &rope, launch)
        })
    })
}

/// Write new entries (e.g. a compressed image's K/V) into every layer of a contiguous cache.
///
/// ``keys``, ``values``: per-layer ``[batch, kv_heads, seq, head_dim]`` (written in place).
/// ``new_keys``, ``new_values``: per-layer ``[batch, kv_heads, n, head_dim]`` (read only; must
/// not share memory with the cache). ``positions``: an int ``start`` (entries go to
/// ``start .. start + n``) or ``[n]`` int32/int64 distinct cache indices ``< seq``.
/// ``delta`` (optional; needs ``rope_theta`` and ``head_dim``): rotate each new key by it while
/// writing (int, ``[n]`` or ``[n, 3]``). The cache must already be long enough (grow it first).
#[pyfunction]
#[pyo3(signature = (keys, values, new_keys, new_values, positions, *, delta = None, rope_theta = None,
    head_dim = None, rotary_dim = None, interleaved = Arg::of(false), mrope_section = None, mrope_interleaved = Arg::of(false)), text_signature = "(keys, values, new_keys, new_values, positions, *, delta=None, rope_theta=None, head_dim=None, rotary_dim=None, interleaved=False, mrope_section=None, mrope_interleaved=False)")]
#[allow(clippy::too_many_arguments)]
fn append_entries(
    py: Python<'_>,
    keys: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    new_keys: &Bound<'_, PyAny>,
    new_values: &Bound<'_, PyAny>,
    positions: &Bound<'_, PyAny>,
    delta: Option<&Bound<'_, PyAny>>,
    rope_theta: Option<Arg<f64>>,
    head_dim: Option<Arg<i64>>,
    rotary_dim: Option<Arg<i64>>,
    interleaved: Arg<bool>,
    mrope_section: Option<Arg<Vec<i64>>>,
    mrope_interleaved: Arg<bool>,
) -> PyResult<()> {
    let rope_theta = opt_arg(rope_theta, "rope_theta")?;
    let head_dim = opt_arg(head_dim, "head_dim")?;
    let rotary_dim = opt_arg(rotary_dim, "rotary_dim")?;
    let interleaved = interleaved.get("interleaved")?;
    let mrope_section = opt_arg(mrope_section, "mrope_section")?;
    let mrope_interleaved = mrope_interleaved.get("mrope_interleaved")?;
    let rope = match (delta, rope_theta, head_dim) {
        (Some(_), Some(theta), Some(dim)) => Some(rope_arg(
            theta,
            dim,
            rotary_dim,
            interleaved,
            mrope_section,
            mrope_interleaved,
        )?),
        (Some(_), _, _) => {
            return Err(value_err!(
                "delta: rotating the new keys needs rope_theta and head_dim as well"
            )
            .into());
        }
        (None, _, _) => None,
    };
    CudaCall::maybe(py, keys, "keys", |call| {
        let delta = delta.map(|d| DeltaArg::parse(call, d)).transpose()?;
        let mut k = tensors_arg(call, keys, "keys", KV_DTYPES)?;
        let mut v = tensors_arg(call, values, "values", KV_DTYPES)?;
        let nk = tensors_arg(call, new_keys, "new_keys", KV_DTYPES)?;
        let nv = tensors_arg(call, new_values, "new_values", KV_DTYPES)?;
        let list = match positions.extract::<i64>() {
            // One int: the new entries go to start, start + 1, ...
            Ok(start) if !positions.hasattr("__len__")? => Err(start),
            _ => Ok(host_vector(call, positions, "positions")?),
        };
        let positions = match &list {
            Ok(list) => Positions::List(list),
            Err(start) => Positions::From(*start),
        };
        let (mut keys, mut values) = (views(&mut k), views(&mut v));
        let new_keys: Vec<TensorView> = nk.iter().map(|t| t.view()).collect();
        let new_values: Vec<TensorView> = nv.iter().map(|t| t.view()).collect();
        let rotate = match (&delta, &rope) {
            (Some(d), Some(r)) => Some((d.source(), r)),
            _ => None,
        };
        run(py, call, |launch| {
            kv::append_entries(
                &mut keys,
                &mut values,
                &new_keys,
                &new_values,
                positions,
                rotate,
                launch,
            )
        })
    })
}

/// Move entries of a paged (vLLM) cache: gather, re-rotate keys, scatter, for every layer.
///
/// ``kv_caches``: one tensor or a list (one per layer), written in place, in ``layout``:
///
/// - ``"vllm"`` (vLLM 0.33): ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, keys then
///   values in the last dimension, with whatever strides vLLM's ``KVCacheLayout`` gave the view
///   (NHD by default, HND for FlashInfer's TRT-LLM kernels);
/// - ``"kv_blocks"`` (earlier vLLM FlashAttention): ``[2, num_blocks, block_size, kv_heads, head_dim]``;
/// - ``"blocks_kv"`` (earlier vLLM FlashInfer): ``[num_blocks, 2, block_size, kv_heads, head_dim]``.
///
/// ``src_slots``, ``dst_slots``: ``[n]`` int32/int64 slots numbered as vLLM's slot mapping,
/// ``block_number * block_size + offset``; a pair with a negative slot (``PAD_SLOT_ID = -1``)
/// is skipped. Destinations must be distinct. All sources are read before any destination is
/// written, so moves within one cache may overlap. ``delta``: int, ``[n]`` or ``[n, 3]``.
/// Returns the number of entries moved per layer.
#[pyfunction]
#[pyo3(signature = (kv_caches, src_slots, dst_slots, delta, *, rope_theta, head_dim, layout = Arg::of("vllm".to_string()),
    rotary_dim = None, interleaved = Arg::of(false), mrope_section = None, mrope_interleaved = Arg::of(false)), text_signature = "(kv_caches, src_slots, dst_slots, delta, *, rope_theta, head_dim, layout='vllm', rotary_dim=None, interleaved=False, mrope_section=None, mrope_interleaved=False)")]
#[allow(clippy::too_many_arguments)]
fn paged_reinject(
    py: Python<'_>,
    kv_caches: &Bound<'_, PyAny>,
    src_slots: &Bound<'_, PyAny>,
    dst_slots: &Bound<'_, PyAny>,
    delta: &Bound<'_, PyAny>,
    rope_theta: Arg<f64>,
    head_dim: Arg<i64>,
    layout: Arg<String>,
    rotary_dim: Option<Arg<i64>>,
    interleaved: Arg<bool>,
    mrope_section: Option<Arg<Vec<i64>>>,
    mrope_interleaved: Arg<bool>,
) -> PyResult<usize> {
    let layout = PagedLayoutKind::parse(&layout.get("layout")?)?;
    let rope = rope_kwargs(
        rope_theta,
        head_dim,
        rotary_dim,
        interleaved,
        mrope_section,
        mrope_interleaved,
    )?;
    CudaCall::maybe(py, kv_caches, "kv_caches", |call| {
        let mut tensors = tensors_arg(call, kv_caches, "kv_caches", KV_DTYPES)?;
        let src = host_vector(call, src_slots, "src_slots")?;
        let dst = host_vector(call, dst_slots, "dst_slots")?;
        let delta = DeltaArg::parse(call, delta)?;
        let (mut caches, delta) = (views(&mut tensors), delta.source());
        run(py, call, |launch| {
            kv::paged_reinject(&mut caches, layout, &src, &dst, delta, &rope, launch)
        })
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rerotate_keys, m)?)?;
    m.add_function(wrap_pyfunction!(relocate_span, m)?)?;
    m.add_function(wrap_pyfunction!(relocate_spans, m)?)?;
    m.add_function(wrap_pyfunction!(append_entries, m)?)?;
    m.add_function(wrap_pyfunction!(paged_reinject, m)?)?;
    Ok(())
}
