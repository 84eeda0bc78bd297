//! Bindings of `crate::kv`: key re-rotation, span relocation and entry writes in contiguous
//! (transformers) caches, paged re-injection in vLLM caches. Tensors come in through the shared
//! DLPack interop (`tensor.rs`) without copies and are written in place; every argument is
//! checked before anything is written, and the work runs with the GIL released.

use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{opt_arg, Arg};
use pyo3::types::{PyList, PyTuple};

use crate::cuda::kv::{self as gpu_kv, DeltaSource, DeviceDeltas, Prepared};
use crate::dtype::{DType, Float};
use crate::kv::{
    append_entries as core_append, paged_reinject as core_paged, relocate_span as core_relocate,
    rerotate_keys as core_rerotate, Deltas, LayerKv, LayerKvRef, PagedCache, PagedLayout, Rope,
    RopeConfig, Strided, StridedMut,
};
use crate::python::cuda::{cuda_ordinal, device_of, CudaCall};
use crate::python::tensor::{int_vector_arg, PyTensor, INDEX_DTYPES, KV_DTYPES};
use crate::tensor::Device;
use crate::tensor::{tuple_str, TensorView};
use crate::{type_err, value_err};

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

/// Position deltas as passed: one int for all, `[n]`, or `[n, 3]` (t, h, w).
enum DeltaArg {
    Same(i64),
    PerToken(Vec<i64>),
    Thw(Vec<[i64; 3]>),
}

impl DeltaArg {
    fn deltas(&self) -> Deltas<'_> {
        match self {
            DeltaArg::Same(d) => Deltas::Same(*d),
            DeltaArg::PerToken(d) => Deltas::PerToken(d),
            DeltaArg::Thw(d) => Deltas::PerTokenThw(d),
        }
    }
}

/// An integer array (int32/int64 tensor, or nested sequences of ints) of rank <= 2, row-major.
fn int_array(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<(Vec<i64>, Vec<usize>)> {
    if obj.hasattr("__dlpack__")? {
        let tensor = PyTensor::extract(obj, name, INDEX_DTYPES)?;
        let view = tensor.view();
        view.expect_cpu()?;
        if view.ndim() > 2 {
            return Err(value_err!(
                "{name}: expected an int array of rank <= 2, got shape {}",
                view.shape_str()
            )
            .into());
        }
        let values: Vec<i64> = match view.dtype() {
            DType::I32 => view
                .strided::<i32>()?
                .to_contiguous()?
                .iter()
                .map(|&v| v as i64)
                .collect(),
            _ => view.strided::<i64>()?.to_contiguous()?.into_owned(),
        };
        return Ok((values, view.shape().to_vec()));
    }
    if let Ok(v) = obj.extract::<i64>() {
        return Ok((vec![v], vec![]));
    }
    if let Ok(v) = obj.extract::<Vec<i64>>() {
        let n = v.len();
        return Ok((v, vec![n]));
    }
    if let Ok(rows) = obj.extract::<Vec<Vec<i64>>>() {
        let cols = rows.first().map_or(0, |r| r.len());
        if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != cols) {
            return Err(value_err!(
                "{name}[{i}] has {} entries but {name}[0] has {cols}: rows must be equal",
                row.len()
            )
            .into());
        }
        let shape = vec![rows.len(), cols];
        return Ok((rows.into_iter().flatten().collect(), shape));
    }
    Err(type_err!(
        "{name}: expected an int, an int32/int64 array or a sequence of ints, got {}",
        obj.get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default()
    )
    .into())
}

fn delta_arg(obj: &Bound<'_, PyAny>) -> PyResult<DeltaArg> {
    let (values, shape) = int_array(obj, "delta")?;
    match shape.as_slice() {
        [] => Ok(DeltaArg::Same(values[0])),
        [_] => Ok(DeltaArg::PerToken(values)),
        [_, 3] => Ok(DeltaArg::Thw(values.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect())),
        _ => Err(value_err!(
            "delta: expected an int, an int array [n] or, for M-RoPE, [n, 3] (t, h, w deltas), got shape {}",
            tuple_str(&shape)
        )
        .into()),
    }
}

/// One tensor, or a list / tuple of them (one per layer), imported under `name` / `name[i]`.
fn tensor_list(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<PyTensor>> {
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        obj.try_iter()?
            .enumerate()
            .map(|(i, item)| PyTensor::extract(&item?, &format!("{name}[{i}]"), KV_DTYPES))
            .collect()
    } else {
        Ok(vec![PyTensor::extract(obj, name, KV_DTYPES)?])
    }
}

/// Shape and strides of a rank-N view; on the CPU path (`gpu` false) the view must be a CPU
/// tensor (the CUDA path checked every tensor's device when importing it).
fn fixed<const N: usize>(
    view: &TensorView<'_>,
    layout: &str,
    gpu: bool,
) -> PyResult<([usize; N], [isize; N])> {
    if !gpu {
        view.expect_cpu()?;
    }
    view.expect_rank(N, layout)?;
    let shape: [usize; N] = view.shape().try_into().expect("rank checked");
    let strides: [isize; N] = view.strides().try_into().expect("rank checked");
    Ok((shape, strides))
}

fn check_aligned<T>(view: &TensorView<'_>) -> PyResult<()> {
    if view.numel() > 0 && (view.data_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        return Err(value_err!(
            "{}: the data pointer is not aligned for {}; pass a freshly allocated array",
            view.name(),
            view.dtype()
        )
        .into());
    }
    Ok(())
}

/// A writable strided view of a tensor of dtype `T` and rank `N`.
fn writable<'t, T: Float, const N: usize>(
    tensor: &'t mut PyTensor,
    layout: &str,
    gpu: bool,
) -> PyResult<StridedMut<'t, T, N>> {
    let view = tensor.view_mut();
    let (shape, strides) = fixed::<N>(&view, layout, gpu)?;
    view.expect_dtype(T::DTYPE)?;
    view.expect_writable()?;
    check_aligned::<T>(&view)?;
    // SAFETY: the PyTensor keeps the producer's memory alive and is borrowed mutably for 't;
    // CPU, dtype, rank, alignment and writability are checked (overlap in `from_raw`).
    Ok(unsafe { StridedMut::from_raw(view.data_ptr() as *mut T, shape, strides, view.name())? })
}

/// A read-only strided view of a tensor of dtype `T` and rank `N`.
fn readable<'t, T: Float, const N: usize>(
    tensor: &'t PyTensor,
    layout: &str,
    gpu: bool,
) -> PyResult<Strided<'t, T, N>> {
    let view = tensor.view();
    let (shape, strides) = fixed::<N>(&view, layout, gpu)?;
    view.expect_dtype(T::DTYPE)?;
    check_aligned::<T>(&view)?;
    // SAFETY: as in `writable`, read only.
    Ok(unsafe { Strided::from_raw(view.data_ptr() as *const T, shape, strides, view.name())? })
}

fn first_dtype(tensors: &[PyTensor]) -> DType {
    tensors.first().map_or(DType::F32, |t| t.view().dtype())
}

// ---- functions ----

/// Rotates cached keys in place by a position delta per token (see `tvc_rs.kv.rerotate_keys`).
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
    let rope_theta = rope_theta.get("rope_theta")?;
    let head_dim = head_dim.get("head_dim")?;
    let rotary_dim = opt_arg(rotary_dim, "rotary_dim")?;
    let interleaved = interleaved.get("interleaved")?;
    let mrope_section = opt_arg(mrope_section, "mrope_section")?;
    let mrope_interleaved = mrope_interleaved.get("mrope_interleaved")?;
    let rope = rope_arg(
        rope_theta,
        head_dim,
        rotary_dim,
        interleaved,
        mrope_section,
        mrope_interleaved,
    )?;
    if let Some(ordinal) = cuda_ordinal(keys)? {
        return cuda_rerotate_keys(py, ordinal, keys, delta, &rope);
    }
    let mut tensors = tensor_list(keys, "keys")?;
    let delta = delta_arg(delta)?;
    crate::dispatch_float!(first_dtype(&tensors), T => {
        let mut views: Vec<StridedMut<T, 3>> = tensors
            .iter_mut()
            .map(|t| writable::<T, 3>(t, "[tokens, heads, head_dim]", false))
            .collect::<PyResult<_>>()?;
        let deltas = delta.deltas();
        py.detach(|| core_rerotate(&mut views, deltas, &rope))?;
    });
    Ok(())
}

fn layer_views<'t, T: Float>(
    keys: &'t mut [PyTensor],
    values: &'t mut [PyTensor],
    gpu: bool,
) -> PyResult<Vec<LayerKv<'t, T>>> {
    if keys.len() != values.len() {
        return Err(value_err!(
            "values has {} layers but keys has {}: one of each per layer",
            values.len(),
            keys.len()
        )
        .into());
    }
    keys.iter_mut()
        .zip(values.iter_mut())
        .map(|(k, v)| {
            Ok(LayerKv {
                keys: writable::<T, 4>(k, "[batch, kv_heads, seq, head_dim]", gpu)?,
                values: writable::<T, 4>(v, "[batch, kv_heads, seq, head_dim]", gpu)?,
            })
        })
        .collect()
}

/// Deltas for the entries after an evicted span, from `delta` or from old/new position ids.
fn relocate_deltas(
    delta: Option<&Bound<'_, PyAny>>,
    old_positions: Option<&Bound<'_, PyAny>>,
    new_positions: Option<&Bound<'_, PyAny>>,
    moved: usize,
    start: usize,
    end: usize,
    rope: &Rope,
) -> PyResult<DeltaArg> {
    let mrope = rope.config().is_mrope();
    match (delta, old_positions, new_positions) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            Err(value_err!("delta and old_positions/new_positions: pass one or the other, not both").into())
        }
        (Some(d), None, None) => delta_arg(d),
        (None, None, None) if mrope => Err(value_err!(
            "delta: required with mrope_section (or pass old_positions and new_positions): evicting an image shifts \
             M-RoPE positions by what get_rope_index assigns, not by end - start"
        )
        .into()),
        (None, None, None) => Ok(DeltaArg::Same(-((end - start) as i64))),
        (None, Some(_), None) | (None, None, Some(_)) => {
            Err(value_err!("old_positions and new_positions: pass both (the followers' position ids before and after)").into())
        }
        (None, Some(old), Some(new)) => {
            let (old, old_shape) = int_array(old, "old_positions")?;
            let (new, new_shape) = int_array(new, "new_positions")?;
            if old_shape != new_shape {
                return Err(value_err!(
                    "new_positions has shape {} but old_positions has {}: they must match",
                    tuple_str(&new_shape),
                    tuple_str(&old_shape)
                )
                .into());
            }
            let expected = if mrope { format!("(3, {moved})") } else { format!("({moved},)") };
            match old_shape.as_slice() {
                [n] if *n == moved => Ok(DeltaArg::PerToken(new.iter().zip(&old).map(|(a, b)| a - b).collect())),
                [3, n] if mrope && *n == moved => Ok(DeltaArg::Thw(
                    (0..moved).map(|j| [0, 1, 2].map(|c| new[c * moved + j] - old[c * moved + j])).collect(),
                )),
                _ => Err(value_err!(
                    "old_positions has shape {}: expected {expected}, the position ids of the length - end = {moved} entries after the span{}",
                    tuple_str(&old_shape),
                    if mrope { " as transformers lays them out ([3, n]: t, h, w)" } else { "" }
                )
                .into()),
            }
        }
    }
}

/// Evicts a span from every layer of a contiguous cache (see `tvc_rs.kv.relocate_span`).
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
    let rope_theta = rope_theta.get("rope_theta")?;
    let head_dim = head_dim.get("head_dim")?;
    let length = opt_arg(length, "length")?;
    let rotary_dim = opt_arg(rotary_dim, "rotary_dim")?;
    let interleaved = interleaved.get("interleaved")?;
    let mrope_section = opt_arg(mrope_section, "mrope_section")?;
    let mrope_interleaved = mrope_interleaved.get("mrope_interleaved")?;
    let rope = rope_arg(
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
    if let Some(l) = length {
        if l < 0 {
            return Err(value_err!("length = {l}: must be >= 0").into());
        }
    }
    let (start, end, length) = (start as usize, end as usize, length.map(|l| l as usize));
    if let Some(ordinal) = cuda_ordinal(keys)? {
        return cuda_relocate_span(
            py,
            ordinal,
            keys,
            values,
            start,
            end,
            length,
            delta,
            old_positions,
            new_positions,
            &rope,
        );
    }
    let mut k = tensor_list(keys, "keys")?;
    let mut v = tensor_list(values, "values")?;
    let new_len = crate::dispatch_float!(first_dtype(&k), T => {
        let mut layers = layer_views::<T>(&mut k, &mut v, false)?;
        let seq = layers.first().map_or(0, |l| l.keys.shape()[2]);
        let valid = length.unwrap_or(seq);
        let delta = if start <= end && end <= valid {
            relocate_deltas(delta, old_positions, new_positions, valid - end, start, end, &rope)?
        } else {
            // The core refuses the span, naming start / end / length.
            DeltaArg::Same(0)
        };
        let deltas = delta.deltas();
        py.detach(|| core_relocate(&mut layers, start, end, length, deltas, &rope))?
    });
    Ok(new_len)
}

/// Writes new entries into every layer of a contiguous cache (see `tvc_rs.kv.append_entries`).
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
    if let Some(ordinal) = cuda_ordinal(keys)? {
        return cuda_append_entries(
            py,
            ordinal,
            keys,
            values,
            new_keys,
            new_values,
            positions,
            delta,
            rope.as_ref(),
        );
    }
    let delta = delta.map(delta_arg).transpose()?;
    let mut k = tensor_list(keys, "keys")?;
    let mut v = tensor_list(values, "values")?;
    let nk = tensor_list(new_keys, "new_keys")?;
    let nv = tensor_list(new_values, "new_values")?;
    if nk.len() != nv.len() {
        return Err(value_err!(
            "new_values has {} layers but new_keys has {}: one of each per layer",
            nv.len(),
            nk.len()
        )
        .into());
    }
    let positions: Vec<i64> = match positions.extract::<i64>() {
        // One int: the new entries go to start, start + 1, ...
        Ok(start) if !positions.hasattr("__len__")? => {
            let n = nk
                .first()
                .and_then(|t| t.view().shape().get(2).copied())
                .unwrap_or(0) as i64;
            (start..start + n).collect()
        }
        _ => int_vector_arg(positions, "positions")?,
    };
    crate::dispatch_float!(first_dtype(&k), T => {
        let mut layers = layer_views::<T>(&mut k, &mut v, false)?;
        let new: Vec<LayerKvRef<T>> = nk
            .iter()
            .zip(&nv)
            .map(|(a, b)| {
                Ok(LayerKvRef {
                    keys: readable::<T, 4>(a, "[batch, kv_heads, n, head_dim]", false)?,
                    values: readable::<T, 4>(b, "[batch, kv_heads, n, head_dim]", false)?,
                })
            })
            .collect::<PyResult<_>>()?;
        let rotate = match (&delta, &rope) {
            (Some(d), Some(r)) => Some((d.deltas(), r)),
            _ => None,
        };
        py.detach(|| core_append(&mut layers, &new, &positions, rotate))?;
    });
    Ok(())
}

fn paged_layout(
    view: &TensorView<'_>,
    layout: &str,
    head_dim: usize,
    gpu: bool,
) -> PyResult<PagedLayout> {
    let name = view.name().to_string();
    Ok(match layout {
        "vllm" => {
            let (shape, strides) = fixed::<4>(
                view,
                "[num_blocks, kv_heads, block_size, 2 * head_dim] (layout \"vllm\")",
                gpu,
            )?;
            PagedLayout::vllm(shape, strides, head_dim, &name)?
        }
        "kv_blocks" => {
            let (shape, strides) = fixed::<5>(
                view,
                "[2, num_blocks, block_size, kv_heads, head_dim] (layout \"kv_blocks\")",
                gpu,
            )?;
            PagedLayout::kv_blocks(shape, strides, head_dim, &name)?
        }
        "blocks_kv" => {
            let (shape, strides) = fixed::<5>(
                view,
                "[num_blocks, 2, block_size, kv_heads, head_dim] (layout \"blocks_kv\")",
                gpu,
            )?;
            PagedLayout::blocks_kv(shape, strides, head_dim, &name)?
        }
        other => {
            return Err(value_err!(
                "layout = '{other}': expected 'vllm', 'kv_blocks' or 'blocks_kv'"
            )
            .into());
        }
    })
}

/// Gathers, re-rotates and scatters entries of a paged (vLLM) cache (see `tvc_rs.kv.paged_reinject`).
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
    let rope_theta = rope_theta.get("rope_theta")?;
    let head_dim = head_dim.get("head_dim")?;
    let layout_owned = layout.get("layout")?;
    let layout: &str = &layout_owned;
    let rotary_dim = opt_arg(rotary_dim, "rotary_dim")?;
    let interleaved = interleaved.get("interleaved")?;
    let mrope_section = opt_arg(mrope_section, "mrope_section")?;
    let mrope_interleaved = mrope_interleaved.get("mrope_interleaved")?;
    let rope = rope_arg(
        rope_theta,
        head_dim,
        rotary_dim,
        interleaved,
        mrope_section,
        mrope_interleaved,
    )?;
    if let Some(ordinal) = cuda_ordinal(kv_caches)? {
        return cuda_paged_reinject(
            py,
            ordinal,
            kv_caches,
            src_slots,
            dst_slots,
            delta,
            layout,
            head_dim as usize,
            &rope,
        );
    }
    let mut tensors = tensor_list(kv_caches, "kv_caches")?;
    let src = int_vector_arg(src_slots, "src_slots")?;
    let dst = int_vector_arg(dst_slots, "dst_slots")?;
    let delta = delta_arg(delta)?;
    let moved = crate::dispatch_float!(first_dtype(&tensors), T => {
        let mut caches: Vec<PagedCache<T>> = tensors
            .iter_mut()
            .map(|t| {
                let view = t.view_mut();
                let layout = paged_layout(&view, layout, head_dim as usize, false)?;
                view.expect_dtype(T::DTYPE)?;
                view.expect_writable()?;
                check_aligned::<T>(&view)?;
                let name = view.name().to_string();
                // SAFETY: the PyTensor keeps the memory alive and is borrowed mutably for the
                // call; CPU, dtype, shape, alignment and writability are checked (overlap in
                // `from_raw`).
                Ok(unsafe { PagedCache::from_raw(view.data_ptr() as *mut T, layout, &name)? })
            })
            .collect::<PyResult<_>>()?;
        let deltas = delta.deltas();
        py.detach(|| core_paged(&mut caches, &src, &dst, deltas, &rope))?
    });
    Ok(moved)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rerotate_keys, m)?)?;
    m.add_function(wrap_pyfunction!(relocate_span, m)?)?;
    m.add_function(wrap_pyfunction!(append_entries, m)?)?;
    m.add_function(wrap_pyfunction!(paged_reinject, m)?)?;
    Ok(())
}

// ---- CUDA ----
//
// The same functions for CUDA tensors: the same argument checks (the CPU path's own), then the
// kernels of kernels/kv.cu on the current stream (see src/cuda/kv.rs). Deltas may be CUDA
// tensors (read in place); slots and positions are host data (the checks and the move order
// need them), copied to the host first when given as CUDA tensors.

fn device_delta(
    call: &CudaCall<'_>,
    obj: &Bound<'_, PyAny>,
) -> PyResult<Option<(PyTensor, DeviceDeltas)>> {
    if !matches!(device_of(obj)?, Some(Device::Cuda(_))) {
        return Ok(None);
    }
    let tensor = call.tensor(obj, "delta", INDEX_DTYPES)?;
    let deltas = {
        let view = tensor.view();
        let (len, thw, token_stride, comp_stride) = match *view.shape() {
            [n] => (n, false, view.strides()[0], 0),
            [n, 3] => (n, true, view.strides()[0], view.strides()[1]),
            _ => {
                return Err(value_err!(
                    "delta: expected an int, an int array [n] or, for M-RoPE, [n, 3] (t, h, w deltas), got shape {}",
                    view.shape_str()
                )
                .into())
            }
        };
        DeviceDeltas {
            ptr: view.data_ptr() as u64,
            is_i64: view.dtype() == DType::I64,
            len,
            thw,
            token_stride: token_stride as i64,
            comp_stride: comp_stride as i64,
        }
    };
    Ok(Some((tensor, deltas)))
}

/// `obj`, or its `.cpu()` copy when it is a CUDA tensor (host data such as slots).
fn on_host<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    match device_of(obj)? {
        Some(Device::Cuda(_)) => obj.call_method0("cpu"),
        _ => Ok(obj.clone()),
    }
}

/// Allocates the upload (and staging) buffers of a prepared operation and launches it.
fn run_prepared(call: &CudaCall<'_>, prepared: &Prepared, dtype: DType) -> PyResult<()> {
    let words = prepared.upload_words();
    let upload = if words > 0 {
        Some(call.empty(&[words], DType::I64)?)
    } else {
        None
    };
    let staging = if prepared.staging_elements() > 0 {
        Some(call.empty(&[prepared.staging_elements()], dtype)?)
    } else {
        None
    };
    let ptr = |b: &Option<(Bound<'_, PyAny>, PyTensor)>| {
        b.as_ref().map_or(0, |(_, t)| t.view().data_ptr() as u64)
    };
    // SAFETY: the views the operation was prepared from are alive (borrowed by the caller), the
    // buffers have the sizes asked for, all on this call's device; the buffers go back to
    // PyTorch's allocator on this stream, after the kernels in stream order.
    unsafe { prepared.launch(call.stream, ptr(&upload), ptr(&staging))? };
    Ok(())
}

fn cuda_rerotate_keys(
    py: Python<'_>,
    ordinal: i32,
    keys: &Bound<'_, PyAny>,
    delta: &Bound<'_, PyAny>,
    rope: &Rope,
) -> PyResult<()> {
    CudaCall::run(py, ordinal, "keys", |call| {
        let mut tensors = call.tensors(keys, "keys", KV_DTYPES)?;
        let device = device_delta(call, delta)?;
        let host = if device.is_none() {
            Some(delta_arg(delta)?)
        } else {
            None
        };
        crate::dispatch_float!(first_dtype(&tensors), T => {
            let views: Vec<StridedMut<T, 3>> = tensors
                .iter_mut()
                .map(|t| writable::<T, 3>(t, "[tokens, heads, head_dim]", true))
                .collect::<PyResult<_>>()?;
            let source = match (&device, &host) {
                (Some((_, d)), _) => DeltaSource::Device(*d),
                (None, Some(h)) => DeltaSource::Host(h.deltas()),
                (None, None) => unreachable!("one of them is set"),
            };
            let prepared = gpu_kv::rerotate_keys(ordinal, &views, source, rope)?;
            run_prepared(call, &prepared, T::DTYPE)?;
        });
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
fn cuda_relocate_span(
    py: Python<'_>,
    ordinal: i32,
    keys: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    start: usize,
    end: usize,
    length: Option<usize>,
    delta: Option<&Bound<'_, PyAny>>,
    old_positions: Option<&Bound<'_, PyAny>>,
    new_positions: Option<&Bound<'_, PyAny>>,
    rope: &Rope,
) -> PyResult<usize> {
    CudaCall::run(py, ordinal, "keys", |call| {
        let mut k = call.tensors(keys, "keys", KV_DTYPES)?;
        let mut v = call.tensors(values, "values", KV_DTYPES)?;
        let device = match delta {
            Some(d) if old_positions.is_none() && new_positions.is_none() => device_delta(call, d)?,
            _ => None,
        };
        let old = old_positions.map(on_host).transpose()?;
        let new = new_positions.map(on_host).transpose()?;
        crate::dispatch_float!(first_dtype(&k), T => {
            let layers = layer_views::<T>(&mut k, &mut v, true)?;
            let seq = layers.first().map_or(0, |l| l.keys.shape()[2]);
            let valid = length.unwrap_or(seq);
            let host = match &device {
                Some(_) => None,
                None if start <= end && end <= valid => {
                    Some(relocate_deltas(delta, old.as_ref(), new.as_ref(), valid - end, start, end, rope)?)
                }
                // The shared checks refuse the span, naming start / end / length.
                None => Some(DeltaArg::Same(0)),
            };
            let source = match (&device, &host) {
                (Some((_, d)), _) => DeltaSource::Device(*d),
                (None, Some(h)) => DeltaSource::Host(h.deltas()),
                (None, None) => unreachable!("one of them is set"),
            };
            let prepared = gpu_kv::relocate_span(ordinal, &layers, start, end, length, source, rope)?;
            run_prepared(call, &prepared, T::DTYPE)?;
            Ok(prepared.result)
        })
    })
}

#[allow(clippy::too_many_arguments)]
fn cuda_append_entries(
    py: Python<'_>,
    ordinal: i32,
    keys: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    new_keys: &Bound<'_, PyAny>,
    new_values: &Bound<'_, PyAny>,
    positions: &Bound<'_, PyAny>,
    delta: Option<&Bound<'_, PyAny>>,
    rope: Option<&Rope>,
) -> PyResult<()> {
    CudaCall::run(py, ordinal, "keys", |call| {
        let mut k = call.tensors(keys, "keys", KV_DTYPES)?;
        let mut v = call.tensors(values, "values", KV_DTYPES)?;
        let nk = call.tensors(new_keys, "new_keys", KV_DTYPES)?;
        let nv = call.tensors(new_values, "new_values", KV_DTYPES)?;
        if nk.len() != nv.len() {
            return Err(value_err!(
                "new_values has {} layers but new_keys has {}: one of each per layer",
                nv.len(),
                nk.len()
            )
            .into());
        }
        let device = delta.map(|d| device_delta(call, d)).transpose()?.flatten();
        let host = match (delta, &device) {
            (Some(d), None) => Some(delta_arg(d)?),
            _ => None,
        };
        let positions = on_host(positions)?;
        let positions: Vec<i64> = match positions.extract::<i64>() {
            Ok(start) if !positions.hasattr("__len__")? => {
                let n = nk
                    .first()
                    .and_then(|t| t.view().shape().get(2).copied())
                    .unwrap_or(0) as i64;
                (start..start + n).collect()
            }
            _ => int_vector_arg(&positions, "positions")?,
        };
        crate::dispatch_float!(first_dtype(&k), T => {
            let layers = layer_views::<T>(&mut k, &mut v, true)?;
            let new: Vec<LayerKvRef<T>> = nk
                .iter()
                .zip(&nv)
                .map(|(a, b)| {
                    Ok(LayerKvRef {
                        keys: readable::<T, 4>(a, "[batch, kv_heads, n, head_dim]", true)?,
                        values: readable::<T, 4>(b, "[batch, kv_heads, n, head_dim]", true)?,
                    })
                })
                .collect::<PyResult<_>>()?;
            let rotate = match (rope, &device, &host) {
                (Some(r), Some((_, d)), _) => Some((DeltaSource::Device(*d), r)),
                (Some(r), None, Some(h)) => Some((DeltaSource::Host(h.deltas()), r)),
                _ => None,
            };
            let prepared = gpu_kv::append_entries(ordinal, &layers, &new, &positions, rotate)?;
            run_prepared(call, &prepared, T::DTYPE)?;
        });
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
fn cuda_paged_reinject(
    py: Python<'_>,
    ordinal: i32,
    kv_caches: &Bound<'_, PyAny>,
    src_slots: &Bound<'_, PyAny>,
    dst_slots: &Bound<'_, PyAny>,
    delta: &Bound<'_, PyAny>,
    layout: &str,
    head_dim: usize,
    rope: &Rope,
) -> PyResult<usize> {
    CudaCall::run(py, ordinal, "kv_caches", |call| {
        let mut tensors = call.tensors(kv_caches, "kv_caches", KV_DTYPES)?;
        let src = int_vector_arg(&on_host(src_slots)?, "src_slots")?;
        let dst = int_vector_arg(&on_host(dst_slots)?, "dst_slots")?;
        let device = device_delta(call, delta)?;
        let host = if device.is_none() {
            Some(delta_arg(delta)?)
        } else {
            None
        };
        crate::dispatch_float!(first_dtype(&tensors), T => {
            let caches: Vec<PagedCache<T>> = tensors
                .iter_mut()
                .map(|t| {
                    let view = t.view_mut();
                    let layout = paged_layout(&view, layout, head_dim, true)?;
                    view.expect_dtype(T::DTYPE)?;
                    view.expect_writable()?;
                    check_aligned::<T>(&view)?;
                    let name = view.name().to_string();
                    // SAFETY: device memory kept alive by the PyTensor and never dereferenced
                    // on the host; `from_raw` only checks the layout.
                    Ok(unsafe { PagedCache::from_raw(view.data_ptr() as *mut T, layout, &name)? })
                })
                .collect::<PyResult<_>>()?;
            if caches.is_empty() {
                return Err(value_err!("kv_caches is empty: pass one cache tensor per layer").into());
            }
            let source = match (&device, &host) {
                (Some((_, d)), _) => DeltaSource::Device(*d),
                (None, Some(h)) => DeltaSource::Host(h.deltas()),
                (None, None) => unreachable!("one of them is set"),
            };
            let prepared = gpu_kv::paged_reinject(ordinal, &caches, &src, &dst, source, rope)?;
            run_prepared(call, &prepared, T::DTYPE)?;
            Ok(prepared.result)
        })
    })
}
