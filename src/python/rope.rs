//! Bindings of `crate::rope`: M-RoPE position ids and image token counts.
//!
//! The Python layer (`tvc_rs/rope.py`) hands over NumPy arrays (torch tensors already on the
//! host); they are read through DLPack (`super::tensor`), dtypes and ranks are checked, the GIL
//! is released and the core runs.

use half::{bf16, f16};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{opt_arg, Arg};

use super::errors::type_name;
use super::tensor::{bool_array, int_array, numpy_array, IntShape, PyTensor, INDEX_DTYPES};
use crate::dtype::DType;
use pyo3::types::{PyBool, PyFloat, PyInt};

use crate::rope::{
    self, BatchInput, GridThw, ImageSettings, MaskValue, ModelType, MropeConfig, PositionInt,
    ResizeRule, Seconds, SecondsValue, TokenId, TokenKinds, TokensPerSecond,
};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(mrope_position_ids, m)?)?;
    m.add_function(wrap_pyfunction!(smart_resize, m)?)?;
    m.add_function(wrap_pyfunction!(image_grid_thw, m)?)?;
    m.add_function(wrap_pyfunction!(image_token_count, m)?)?;
    Ok(())
}

fn shape_str(shape: &[usize]) -> String {
    crate::tensor::tuple_str(shape)
}

/// `(num, 3)` grids through the one integer parser; an empty sequence (any dtype, e.g.
/// `np.asarray([])`) means no rows.
fn grids(obj: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<Vec<GridThw>>> {
    let Some(obj) = obj else { return Ok(None) };
    if obj.len().ok() == Some(0) {
        return Ok(Some(Vec::new()));
    }
    let layout = if name.starts_with("image") {
        "(num_images, 3) of (t, h, w)"
    } else {
        "(num_videos, 3) of (t, h, w)"
    };
    let values = int_array(obj, name, IntShape::Table { cols: 3, layout })?.values;
    Ok(Some(
        values
            .chunks_exact(3)
            .map(|r| GridThw::new(r[0], r[1], r[2]))
            .collect(),
    ))
}

fn torch_tensor_type<'py>(py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
    // A tensor can only exist if torch is imported already; never import it here.
    let modules = py.import("sys")?.getattr("modules")?;
    match modules.get_item("torch") {
        Ok(torch) => Ok(Some(torch.getattr("Tensor")?)),
        Err(_) => Ok(None),
    }
}

fn seconds_value(
    dtype: &str,
    value: &Bound<'_, PyAny>,
    from_tensor: bool,
    index: usize,
) -> PyResult<Seconds> {
    let value = match dtype {
        "float16" => SecondsValue::F16(f16::from_f64(value.extract::<f64>()?)),
        "bfloat16" => SecondsValue::BF16(bf16::from_f64(value.extract::<f64>()?)),
        "float32" => SecondsValue::F32(value.extract::<f64>()? as f32),
        "float64" => SecondsValue::F64(value.extract::<f64>()?),
        "bool" | "int8" | "int16" | "int32" | "int64" | "uint8" | "uint16" | "uint32"
        | "uint64" => SecondsValue::Int(value.extract::<i64>()?),
        other => {
            return Err(PyTypeError::new_err(format!(
                "second_per_grid_ts[{index}] has dtype {other}; expected a float or integer dtype"
            )))
        }
    };
    Ok(Seconds { value, from_tensor })
}

/// `second_per_grid_ts` with each value's dtype and origin, which decide the arithmetic that
/// transformers ends up doing with it (see `crate::rope::time`).
fn seconds_list(py: Python<'_>, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<Seconds>>> {
    let Some(obj) = obj else { return Ok(None) };
    let tensor_type = torch_tensor_type(py)?;
    let is_tensor = |o: &Bound<'_, PyAny>| -> PyResult<bool> {
        match &tensor_type {
            Some(t) => o.is_instance(t),
            None => Ok(false),
        }
    };
    let one_d = |shape: Vec<usize>| -> PyResult<()> {
        if shape.len() != 1 {
            return Err(PyValueError::new_err(format!(
                "second_per_grid_ts must be 1-D (num_videos,), got shape {}",
                shape_str(&shape)
            )));
        }
        Ok(())
    };
    if is_tensor(obj)? {
        one_d(obj.getattr("shape")?.extract::<Vec<usize>>()?)?;
        let dtype = obj.getattr("dtype")?.str()?.to_string();
        let dtype = dtype.trim_start_matches("torch.");
        let values = obj.call_method0("tolist")?;
        return values
            .try_iter()?
            .enumerate()
            .map(|(i, v)| seconds_value(dtype, &v?, true, i))
            .collect::<PyResult<Vec<_>>>()
            .map(Some);
    }
    let numpy = py.import("numpy")?;
    if obj.is_instance(&numpy.getattr("ndarray")?)? {
        one_d(obj.getattr("shape")?.extract::<Vec<usize>>()?)?;
        let dtype = obj.getattr("dtype")?.str()?.to_string();
        let values = obj.call_method0("tolist")?;
        return values
            .try_iter()?
            .enumerate()
            .map(|(i, v)| seconds_value(&dtype, &v?, false, i))
            .collect::<PyResult<Vec<_>>>()
            .map(Some);
    }
    let numpy_generic = numpy.getattr("generic")?;
    let items = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "second_per_grid_ts must be a tensor, an array or a sequence of numbers, got {}",
            type_name(obj)
        ))
    })?;
    let mut out = Vec::new();
    for (i, item) in items.enumerate() {
        let item = item?;
        let seconds = if is_tensor(&item)? {
            let dtype = item.getattr("dtype")?.str()?.to_string();
            seconds_value(
                dtype.trim_start_matches("torch."),
                &item.call_method0("item")?,
                true,
                i,
            )?
        } else if item.is_instance(&numpy_generic)? {
            let dtype = item.getattr("dtype")?.str()?.to_string();
            seconds_value(&dtype, &item.call_method0("item")?, false, i)?
        } else if item.is_instance_of::<PyBool>() || item.is_instance_of::<PyInt>() {
            Seconds {
                value: SecondsValue::Int(item.extract::<i64>()?),
                from_tensor: false,
            }
        } else if item.is_instance_of::<PyFloat>() {
            Seconds::python_float(item.extract::<f64>()?)
        } else {
            return Err(PyTypeError::new_err(format!(
                "second_per_grid_ts[{i}] must be a number, got {}",
                type_name(&item)
            )));
        };
        out.push(seconds);
    }
    Ok(Some(out))
}

fn tokens_per_second(
    obj: Option<&Bound<'_, PyAny>>,
    model_type: ModelType,
) -> PyResult<TokensPerSecond> {
    let Some(obj) = obj else {
        return Ok(MropeConfig::for_model(model_type).tokens_per_second);
    };
    if obj.is_instance_of::<PyInt>() {
        return Ok(TokensPerSecond::Int(obj.extract::<i64>()?));
    }
    if let Ok(arr) = obj
        .getattr("dtype")
        .and_then(|d| d.getattr("kind"))
        .and_then(|k| k.extract::<String>())
    {
        if arr == "i" || arr == "u" || arr == "b" {
            return Ok(TokensPerSecond::Int(obj.extract::<i64>()?));
        }
    }
    obj.extract::<f64>()
        .map(TokensPerSecond::Float)
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "tokens_per_second must be an int or a float, got {}",
                type_name(obj)
            ))
        })
}

/// The arrays and settings of one call, checked, ready for the core.
struct Prepared {
    batch: usize,
    seq: usize,
    images: Option<Vec<GridThw>>,
    videos: Option<Vec<GridThw>>,
    seconds: Option<Vec<Seconds>>,
    cfg: MropeConfig,
}

fn compute<'py, I, M>(
    py: Python<'py>,
    ids: &[I],
    mask: Option<&[M]>,
    types: Option<&[i64]>,
    p: &Prepared,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)>
where
    I: TokenId + PositionInt + crate::tensor::Element,
    M: MaskValue,
{
    let input = BatchInput {
        input_ids: ids,
        batch: p.batch,
        seq: p.seq,
        kinds: types.map_or(TokenKinds::FromIds, TokenKinds::TypeIds),
        attention_mask: mask,
        image_grid_thw: p.images.as_deref(),
        video_grid_thw: p.videos.as_deref(),
        second_per_grid_ts: p.seconds.as_deref(),
    };
    let cfg = p.cfg;
    let (positions, deltas) = py.detach(|| -> crate::Result<(Vec<I>, Vec<i64>)> {
        let mut positions = vec![I::default(); 3 * p.batch * p.seq];
        let mut deltas = vec![0i64; p.batch];
        rope::batch_positions(&input, &cfg, &mut positions, &mut deltas)?;
        Ok((positions, deltas))
    })?;
    Ok((
        numpy_array(py, positions, vec![3, p.batch, p.seq])?,
        numpy_array(py, deltas, vec![p.batch, 1])?,
    ))
}

/// Native part of `tvc_rs.mrope_position_ids` (arguments on the host, settings resolved).
#[pyfunction]
#[pyo3(signature = (
    input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, *,
    mm_token_type_ids=None, second_per_grid_ts=None, model_type=Arg::of("qwen2_vl".to_string()), spatial_merge_size=None,
    image_token_id=None, video_token_id=None, tokens_per_second=None, video_start_token_id=None, video_end_token_id=None
), text_signature = "(input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, *, mm_token_type_ids=None, second_per_grid_ts=None, model_type='qwen2_vl', spatial_merge_size=None, image_token_id=None, video_token_id=None, tokens_per_second=None, video_start_token_id=None, video_end_token_id=None)")]
#[allow(clippy::too_many_arguments)]
fn mrope_position_ids<'py>(
    py: Python<'py>,
    input_ids: &Bound<'py, PyAny>,
    image_grid_thw: Option<&Bound<'py, PyAny>>,
    video_grid_thw: Option<&Bound<'py, PyAny>>,
    attention_mask: Option<&Bound<'py, PyAny>>,
    mm_token_type_ids: Option<&Bound<'py, PyAny>>,
    second_per_grid_ts: Option<&Bound<'py, PyAny>>,
    model_type: Arg<String>,
    spatial_merge_size: Option<Arg<i64>>,
    image_token_id: Option<Arg<i64>>,
    video_token_id: Option<Arg<i64>>,
    tokens_per_second: Option<&Bound<'py, PyAny>>,
    video_start_token_id: Option<Arg<i64>>,
    video_end_token_id: Option<Arg<i64>>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let model_type = ModelType::parse(&model_type.get("model_type")?)?;
    // Settings not given take the defaults of the model type's transformers config class.
    let defaults = MropeConfig::for_model(model_type);
    let cfg = MropeConfig {
        model_type,
        spatial_merge_size: opt_arg(spatial_merge_size, "spatial_merge_size")?
            .unwrap_or(defaults.spatial_merge_size),
        image_token_id: opt_arg(image_token_id, "image_token_id")?
            .unwrap_or(defaults.image_token_id),
        video_token_id: opt_arg(video_token_id, "video_token_id")?
            .unwrap_or(defaults.video_token_id),
        tokens_per_second: self::tokens_per_second(tokens_per_second, model_type)?,
        video_start_token_id: opt_arg(video_start_token_id, "video_start_token_id")?
            .or(defaults.video_start_token_id),
        video_end_token_id: opt_arg(video_end_token_id, "video_end_token_id")?
            .or(defaults.video_end_token_id),
    };

    let ids = PyTensor::extract(input_ids, "input_ids", INDEX_DTYPES)?;
    let ids = ids.view();
    ids.expect_cpu()?;
    if ids.ndim() != 2 {
        return Err(PyValueError::new_err(format!(
            "input_ids must have shape (batch, seq), got shape {}",
            shape_str(ids.shape())
        )));
    }
    let (batch, seq) = (ids.dim(0), ids.dim(1));
    let same_shape = |shape: &[usize], name: &str| -> PyResult<()> {
        if shape != ids.shape() {
            return Err(PyValueError::new_err(format!(
                "{name} must have the shape of input_ids {}, got shape {}",
                shape_str(ids.shape()),
                shape_str(shape)
            )));
        }
        Ok(())
    };
    // Any numeric mask: non-zero means kept, as `tensor.bool()`.
    let mask = match attention_mask {
        Some(m) => {
            let (values, shape) = bool_array(m, "attention_mask", true)?;
            same_shape(&shape, "attention_mask")?;
            Some(values)
        }
        None => None,
    };
    let types = match mm_token_type_ids {
        Some(t) => {
            let types = int_array(t, "mm_token_type_ids", IntShape::Any)?;
            same_shape(&types.shape, "mm_token_type_ids")?;
            Some(types.values)
        }
        None => None,
    };
    let prepared = Prepared {
        batch,
        seq,
        images: grids(image_grid_thw, "image_grid_thw")?,
        videos: grids(video_grid_thw, "video_grid_thw")?,
        seconds: seconds_list(py, second_per_grid_ts)?,
        cfg,
    };
    let (mask, types) = (mask.as_deref(), types.as_deref());
    // The positions keep the dtype of input_ids, as transformers' do.
    match ids.dtype() {
        DType::I32 => {
            let strided = ids.strided::<i32>()?;
            let ids = strided.to_contiguous()?;
            compute::<i32, bool>(py, &ids, mask, types, &prepared)
        }
        _ => {
            let strided = ids.strided::<i64>()?;
            let ids = strided.to_contiguous()?;
            compute::<i64, bool>(py, &ids, mask, types, &prepared)
        }
    }
}

/// Native `tvc_rs.smart_resize`.
#[pyfunction]
#[pyo3(signature = (height, width, *, factor = Arg::of(28), min_pixels = Arg::of(3136), max_pixels = Arg::of(1003520), rule = Arg::of("qwen2_vl".to_string()), temporal_patch_size = Arg::of(2)), text_signature = "(height, width, *, factor=28, min_pixels=3136, max_pixels=1003520, rule='qwen2_vl', temporal_patch_size=2)")]
fn smart_resize(
    height: Arg<i64>,
    width: Arg<i64>,
    factor: Arg<i64>,
    min_pixels: Arg<i64>,
    max_pixels: Arg<i64>,
    rule: Arg<String>,
    temporal_patch_size: Arg<i64>,
) -> PyResult<(i64, i64)> {
    let height = height.get("height")?;
    let width = width.get("width")?;
    let factor = factor.get("factor")?;
    let min_pixels = min_pixels.get("min_pixels")?;
    let max_pixels = max_pixels.get("max_pixels")?;
    let rule = resize_rule(rule, temporal_patch_size)?;
    Ok(rope::resize(
        height, width, factor, min_pixels, max_pixels, rule,
    )?)
}

fn resize_rule(rule: Arg<String>, temporal_patch_size: Arg<i64>) -> PyResult<ResizeRule> {
    let name = rule.get("rule")?;
    let temporal_patch_size = temporal_patch_size.get("temporal_patch_size")?;
    Ok(ResizeRule::parse(&name, temporal_patch_size)?)
}

/// Native `tvc_rs.image_grid_thw`.
#[pyfunction]
#[pyo3(signature = (height, width, *, patch_size = Arg::of(14), merge_size = Arg::of(2), min_pixels = Arg::of(3136), max_pixels = Arg::of(1003520), rule = Arg::of("qwen2_vl".to_string()), temporal_patch_size = Arg::of(2)), text_signature = "(height, width, *, patch_size=14, merge_size=2, min_pixels=3136, max_pixels=1003520, rule='qwen2_vl', temporal_patch_size=2)")]
#[allow(clippy::too_many_arguments)]
fn image_grid_thw(
    height: Arg<i64>,
    width: Arg<i64>,
    patch_size: Arg<i64>,
    merge_size: Arg<i64>,
    min_pixels: Arg<i64>,
    max_pixels: Arg<i64>,
    rule: Arg<String>,
    temporal_patch_size: Arg<i64>,
) -> PyResult<(i64, i64, i64)> {
    let height = height.get("height")?;
    let width = width.get("width")?;
    let patch_size = patch_size.get("patch_size")?;
    let merge_size = merge_size.get("merge_size")?;
    let min_pixels = min_pixels.get("min_pixels")?;
    let max_pixels = max_pixels.get("max_pixels")?;
    let settings = ImageSettings {
        patch_size,
        merge_size,
        min_pixels,
        max_pixels,
        rule: resize_rule(rule, temporal_patch_size)?,
    };
    let [t, h, w] = rope::image_grid_thw(height, width, &settings)?;
    Ok((t, h, w))
}

/// Native `tvc_rs.image_token_count`.
#[pyfunction]
#[pyo3(signature = (height, width, *, patch_size = Arg::of(14), merge_size = Arg::of(2), min_pixels = Arg::of(3136), max_pixels = Arg::of(1003520), rule = Arg::of("qwen2_vl".to_string()), temporal_patch_size = Arg::of(2)), text_signature = "(height, width, *, patch_size=14, merge_size=2, min_pixels=3136, max_pixels=1003520, rule='qwen2_vl', temporal_patch_size=2)")]
#[allow(clippy::too_many_arguments)]
fn image_token_count(
    height: Arg<i64>,
    width: Arg<i64>,
    patch_size: Arg<i64>,
    merge_size: Arg<i64>,
    min_pixels: Arg<i64>,
    max_pixels: Arg<i64>,
    rule: Arg<String>,
    temporal_patch_size: Arg<i64>,
) -> PyResult<i64> {
    let height = height.get("height")?;
    let width = width.get("width")?;
    let patch_size = patch_size.get("patch_size")?;
    let merge_size = merge_size.get("merge_size")?;
    let min_pixels = min_pixels.get("min_pixels")?;
    let max_pixels = max_pixels.get("max_pixels")?;
    let settings = ImageSettings {
        patch_size,
        merge_size,
        min_pixels,
        max_pixels,
        rule: resize_rule(rule, temporal_patch_size)?,
    };
    Ok(rope::image_token_count(height, width, &settings)?)
}
