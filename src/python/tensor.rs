//! Tensor interop through DLPack: NumPy arrays, PyTorch tensors (and anything else with
//! `__dlpack__`) come in as [`PyTensor`]s without a copy; results go out as [`Buffer`]s,
//! which Python turns into NumPy arrays or torch tensors with `np.from_dlpack` /
//! `torch.from_dlpack`, again without a copy.
//!
//! Import: `obj.__dlpack__(stream=None, max_version=(1, 0))` (falling back to the legacy call
//! for producers that do not take `max_version`), the capsule renamed to `used_dltensor[_versioned]`
//! as the protocol asks, and the producer's deleter called when the `PyTensor` is dropped.
//! Versioned capsules carry NumPy's read-only flag; legacy producers cannot export read-only
//! arrays at all.
//!
//! Export: a `Buffer` shares its `OwnedTensor` (an `Arc`) with every capsule it hands out, so the
//! memory lives as long as the last array made from it, and the deleter needs no GIL.

// Shared by every capability's bindings; not each helper is used by each build of the module.
#![allow(dead_code)]

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{opt_arg, Arg};

use super::errors::type_name;
use pyo3::types::{PyDict, PyTuple};

use crate::dtype::DType;
use crate::tensor::{contiguous_strides, dtype_list, Device, IntArray, OwnedTensor, TensorView};
use crate::{type_err, value_err};

/// Float dtypes of data arguments.
pub const FLOAT_DTYPES: &[DType] = &[DType::F32, DType::F16, DType::BF16];
/// What the KV functions take: float64 too (CPU only; computed in f32), so that float64 models'
/// caches go through the same code as the others.
pub const KV_DTYPES: &[DType] = crate::kv::KV_DTYPES;
/// Integer dtypes of index arguments.
pub const INDEX_DTYPES: &[DType] = &[DType::I32, DType::I64];

// ---- DLPack ABI (dlpack.h, v1.x; the legacy struct is the v0.x one) ----

const DL_CPU: i32 = 1;
const DL_CUDA: i32 = 2;
const DL_CUDA_HOST: i32 = 3;
const DL_CUDA_MANAGED: i32 = 13;

const DL_INT: u8 = 0;
const DL_UINT: u8 = 1;
const DL_FLOAT: u8 = 2;
const DL_BFLOAT: u8 = 4;
const DL_COMPLEX: u8 = 5;
const DL_BOOL: u8 = 6;

const FLAG_READ_ONLY: u64 = 1 << 0;
const FLAG_IS_COPIED: u64 = 1 << 1;

const NAME_LEGACY: &CStr = c"dltensor";
const NAME_VERSIONED: &CStr = c"dltensor_versioned";
const NAME_USED_LEGACY: &CStr = c"used_dltensor";
const NAME_USED_VERSIONED: &CStr = c"used_dltensor_versioned";

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[repr(C)]
#[derive(Debug)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    /// In elements; null means row-major (legacy producers).
    pub strides: *mut i64,
    pub byte_offset: u64,
}

#[repr(C)]
pub struct DLManagedTensor {
    pub dl_tensor: DLTensor,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DLPackVersion {
    pub major: u32,
    pub minor: u32,
}

#[repr(C)]
pub struct DLManagedTensorVersioned {
    pub version: DLPackVersion,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    pub flags: u64,
    pub dl_tensor: DLTensor,
}

fn dtype_from_dl(dtype: DLDataType) -> Result<DType, String> {
    let known = match (dtype.code, dtype.bits, dtype.lanes) {
        (DL_FLOAT, 32, 1) => Some(DType::F32),
        (DL_FLOAT, 16, 1) => Some(DType::F16),
        (DL_BFLOAT, 16, 1) => Some(DType::BF16),
        (DL_FLOAT, 64, 1) => Some(DType::F64),
        (DL_INT, 32, 1) => Some(DType::I32),
        (DL_INT, 64, 1) => Some(DType::I64),
        _ => None,
    };
    known.ok_or_else(|| {
        let kind = match dtype.code {
            DL_INT => "int",
            DL_UINT => "uint",
            DL_FLOAT => "float",
            DL_BFLOAT => "bfloat",
            DL_COMPLEX => "complex",
            DL_BOOL => return "bool".to_string(),
            code => return format!("DLPack dtype code {code} ({} bits)", dtype.bits),
        };
        if dtype.lanes == 1 {
            format!("{kind}{}", dtype.bits)
        } else {
            format!("{kind}{}x{}", dtype.bits, dtype.lanes)
        }
    })
}

fn dl_dtype(dtype: DType) -> DLDataType {
    let (code, bits) = match dtype {
        DType::F32 => (DL_FLOAT, 32),
        DType::F16 => (DL_FLOAT, 16),
        DType::BF16 => (DL_BFLOAT, 16),
        DType::F64 => (DL_FLOAT, 64),
        DType::I32 => (DL_INT, 32),
        DType::I64 => (DL_INT, 64),
    };
    DLDataType {
        code,
        bits,
        lanes: 1,
    }
}

fn device_from_dl(device: DLDevice) -> Device {
    match device.device_type {
        // Pinned host memory is ordinary CPU memory for reading and writing.
        DL_CPU | DL_CUDA_HOST => Device::Cpu,
        DL_CUDA | DL_CUDA_MANAGED => Device::Cuda(device.device_id),
        other => Device::Other {
            device_type: other,
            id: device.device_id,
        },
    }
}

// ---- import ----

enum Managed {
    Legacy(*mut DLManagedTensor),
    Versioned(*mut DLManagedTensorVersioned),
}

/// A consumed DLPack capsule; dropping it calls the producer's deleter.
struct Capsule(Managed);

impl Drop for Capsule {
    fn drop(&mut self) {
        // SAFETY: we consumed the capsule, so calling the deleter once is ours to do.
        unsafe {
            match self.0 {
                Managed::Legacy(ptr) => {
                    if let Some(deleter) = (*ptr).deleter {
                        deleter(ptr)
                    }
                }
                Managed::Versioned(ptr) => {
                    if let Some(deleter) = (*ptr).deleter {
                        deleter(ptr)
                    }
                }
            }
        }
    }
}

/// What `__dlpack__` handed over, before its dtype is matched: the one import of every array
/// argument ([`PyTensor`] for the core's dtypes; integer and bool arrays of any width for
/// [`int_array`] and [`bool_vector_arg`]).
pub(crate) struct Imported {
    capsule: Capsule,
    dtype: DLDataType,
    pub(crate) shape: Vec<usize>,
    /// In elements.
    pub(crate) strides: Vec<isize>,
    ptr: *mut u8,
    device: Device,
    readonly: bool,
}

impl Imported {
    fn shape_str(&self) -> String {
        crate::tensor::tuple_str(&self.shape)
    }

    /// `{name}: expected a {rank}-D tensor{layout}, got shape ...`, as `TensorView::expect_rank`.
    fn expect_rank(&self, name: &str, rank: usize, layout: &str) -> PyResult<()> {
        if self.shape.len() == rank {
            return Ok(());
        }
        let layout = if layout.is_empty() {
            String::new()
        } else {
            format!(" {layout}")
        };
        Err(value_err!(
            "{name}: expected a {rank}-D tensor{layout}, got shape {}",
            self.shape_str()
        )
        .into())
    }

    /// Every element in row-major order, read as `T` and mapped by `f` (any strides).
    /// The caller has checked that the memory is on the CPU and holds `T`s.
    fn read<T: Copy, U>(&self, mut f: impl FnMut(T) -> PyResult<U>) -> PyResult<Vec<U>> {
        let count: usize = self.shape.iter().product();
        let mut out = Vec::with_capacity(count);
        if count == 0 {
            return Ok(out);
        }
        let ptr = self.ptr as *const T;
        let mut index = vec![0usize; self.shape.len()];
        let mut offset: isize = 0;
        for _ in 0..count {
            // SAFETY: `index` stays inside `shape`, so `offset` addresses an element of the
            // producer's array, alive while `self.capsule` is.
            out.push(f(unsafe { ptr.offset(offset).read_unaligned() })?);
            // Odometer step over the dimensions, last fastest.
            for d in (0..index.len()).rev() {
                index[d] += 1;
                offset += self.strides[d];
                if index[d] < self.shape[d] {
                    break;
                }
                offset -= self.strides[d] * self.shape[d] as isize;
                index[d] = 0;
            }
        }
        Ok(out)
    }

    fn expect_cpu(&self, name: &str) -> PyResult<()> {
        match self.device {
            Device::Cpu => Ok(()),
            device => Err(value_err!(
                "{name}: expected a CPU array or tensor, got one on {device} (this argument is read on the host)"
            )
            .into()),
        }
    }

    /// Whether the dtype is an integer one [`Imported::int_values`] reads.
    fn is_int(&self) -> bool {
        matches!(
            (self.dtype.code, self.dtype.bits, self.dtype.lanes),
            (DL_INT | DL_UINT, 8 | 16 | 32 | 64, 1)
        )
    }

    /// The elements as `i64` (integer dtypes: check [`Imported::is_int`] and the device first).
    fn int_values(&self, name: &str) -> PyResult<Vec<i64>> {
        let ok = |v: i64| -> PyResult<i64> { Ok(v) };
        match (self.dtype.code, self.dtype.bits) {
            (DL_INT, 8) => self.read(|v: i8| ok(v as i64)),
            (DL_INT, 16) => self.read(|v: i16| ok(v as i64)),
            (DL_INT, 32) => self.read(|v: i32| ok(v as i64)),
            (DL_INT, 64) => self.read(ok),
            (DL_UINT, 8) => self.read(|v: u8| ok(v as i64)),
            (DL_UINT, 16) => self.read(|v: u16| ok(v as i64)),
            (DL_UINT, 32) => self.read(|v: u32| ok(v as i64)),
            (DL_UINT, 64) => self.read(|v: u64| {
                i64::try_from(v)
                    .map_err(|_| PyErr::from(value_err!("{name}: {v} does not fit in int64")))
            }),
            _ => Err(type_err!("{name}: not an integer array").into()),
        }
    }

    fn dtype_name(&self) -> String {
        dtype_from_dl(self.dtype)
            .map(|d| d.name().to_string())
            .unwrap_or_else(|name| name)
    }
}

/// Import `obj` through `__dlpack__` (see the module docs); dtype and device not checked.
fn import(obj: &Bound<'_, PyAny>, name: &str, stream: Option<isize>) -> PyResult<Imported> {
    let py = obj.py();
    if !obj.hasattr("__dlpack__")? {
        return Err(type_err!(
            "{name}: expected a NumPy array or a torch tensor (an object with __dlpack__), got {}",
            type_name(obj)
        )
        .into());
    }
    let export_failed = |err: PyErr| -> PyErr {
        value_err!("{name}: cannot be read through DLPack: {}", err.value(py)).into()
    };
    let kwargs = PyDict::new(py);
    kwargs.set_item("stream", stream)?;
    kwargs.set_item("max_version", (1u32, 0u32))?;
    let capsule = match obj.call_method("__dlpack__", (), Some(&kwargs)) {
        Ok(capsule) => capsule,
        // Producers older than DLPack 1.0 do not know `max_version`.
        Err(err) if err.is_instance_of::<PyTypeError>(py) => {
            kwargs.del_item("max_version")?;
            obj.call_method("__dlpack__", (), Some(&kwargs))
                .map_err(export_failed)?
        }
        Err(err) => return Err(export_failed(err)),
    };
    // SAFETY: the capsule checks below make sure of the pointer's type before use.
    let managed = unsafe { consume_capsule(&capsule) }.ok_or_else(|| {
        type_err!(
            "{name}: __dlpack__ returned {}, not a DLPack capsule",
            type_name(&capsule)
        )
    })?;
    // From here on, dropping `capsule` calls the producer's deleter.
    let capsule = Capsule(managed);
    let (tensor, readonly) = match capsule.0 {
        // SAFETY: valid until the deleter runs (when `capsule` drops).
        Managed::Legacy(ptr) => unsafe { (&(*ptr).dl_tensor, false) },
        Managed::Versioned(ptr) => unsafe {
            if (*ptr).version.major != 1 {
                return Err(value_err!(
                    "{name}: unsupported DLPack version {}.{} (expected 1.x)",
                    (*ptr).version.major,
                    (*ptr).version.minor
                )
                .into());
            }
            (&(*ptr).dl_tensor, (*ptr).flags & FLAG_READ_ONLY != 0)
        },
    };
    let ndim =
        usize::try_from(tensor.ndim).map_err(|_| value_err!("{name}: negative DLPack ndim"))?;
    // SAFETY: DLPack gives `ndim` shape entries and, when not null, `ndim` strides.
    let shape_i64: &[i64] = if ndim == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(tensor.shape, ndim) }
    };
    let shape: Vec<usize> = shape_i64
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| value_err!("{name}: negative dimension in DLPack shape"))
        })
        .collect::<Result<_, _>>()?;
    let strides: Vec<isize> = if tensor.strides.is_null() || ndim == 0 {
        contiguous_strides(&shape)
    } else {
        // SAFETY: see above.
        unsafe { std::slice::from_raw_parts(tensor.strides, ndim) }
            .iter()
            .map(|&s| s as isize)
            .collect()
    };
    let ptr = (tensor.data as *mut u8).wrapping_add(tensor.byte_offset as usize);
    Ok(Imported {
        dtype: tensor.dtype,
        device: device_from_dl(tensor.device),
        capsule,
        shape,
        strides,
        ptr,
        readonly,
    })
}

/// A tensor argument imported through DLPack: the consumed capsule's tensor and a view of it.
///
/// Read with [`PyTensor::view`]; write in place with [`PyTensor::view_mut`] (which refuses
/// read-only arrays). Dropping it calls the producer's deleter, so keep it alive as long as
/// any slice of it is in use (slices borrow it, so the compiler checks that).
pub struct PyTensor {
    /// Lifetime erased; only handed out re-borrowed from `&self` / `&mut self`.
    view: TensorView<'static>,
    _capsule: Capsule,
}

impl PyTensor {
    /// Import `obj` (any object with `__dlpack__`) as argument `name`, accepting `dtypes`.
    ///
    /// Errors name the argument: not an array (TypeError), a dtype not in `dtypes` (TypeError),
    /// a tensor the producer refuses to export (ValueError, e.g. one that requires grad).
    /// The device is not checked here: call `view().expect_cpu()` (CPU kernels) or dispatch on
    /// `view().device()`.
    pub fn extract(obj: &Bound<'_, PyAny>, name: &str, dtypes: &[DType]) -> PyResult<PyTensor> {
        Self::extract_with_stream(obj, name, dtypes, None)
    }

    /// As [`PyTensor::extract`], passing `stream` to `__dlpack__` (for CUDA producers: the
    /// consumer's stream, so that the producer orders its work before ours).
    pub fn extract_with_stream(
        obj: &Bound<'_, PyAny>,
        name: &str,
        dtypes: &[DType],
        stream: Option<isize>,
    ) -> PyResult<PyTensor> {
        let imported = import(obj, name, stream)?;
        let dtype = dtype_from_dl(imported.dtype)
            .ok()
            .filter(|dtype| dtypes.contains(dtype))
            .ok_or_else(|| {
                type_err!(
                    "{name}: expected dtype {}, got {}",
                    dtype_list(dtypes),
                    imported.dtype_name()
                )
            })?;
        let device = imported.device;
        if dtype == DType::F64 && device != Device::Cpu {
            // The CUDA kernels are built for f32 / f16 / bf16 only.
            return Err(type_err!(
                "{name}: float64 tensors are supported on the CPU only, got one on {device} (use float32, float16 or bfloat16)"
            )
            .into());
        }
        let Imported {
            capsule,
            shape,
            strides,
            ptr,
            readonly,
            ..
        } = imported;
        // SAFETY: the producer's memory stays valid until the capsule's deleter runs, after
        // the view (fields drop in order); the view is only handed out borrowed from the
        // PyTensor.
        let view = unsafe {
            TensorView::from_raw_parts(name, ptr, dtype, shape, strides, device, readonly, true)
        };
        Ok(PyTensor {
            view,
            _capsule: capsule,
        })
    }

    /// A read-only view, borrowed from `self`.
    pub fn view(&self) -> TensorView<'_> {
        self.view.reborrow()
    }

    /// A view that may write in place (`as_mut_slice` refuses read-only arrays), borrowing
    /// `self` exclusively.
    pub fn view_mut(&mut self) -> TensorView<'_> {
        self.view.reborrow_mut()
    }
}

/// Take the DLManagedTensor out of a fresh capsule and mark the capsule used.
unsafe fn consume_capsule(capsule: &Bound<'_, PyAny>) -> Option<Managed> {
    let raw = capsule.as_ptr();
    if ffi::PyCapsule_IsValid(raw, NAME_VERSIONED.as_ptr()) == 1 {
        let ptr = ffi::PyCapsule_GetPointer(raw, NAME_VERSIONED.as_ptr())
            as *mut DLManagedTensorVersioned;
        if ptr.is_null() || ffi::PyCapsule_SetName(raw, NAME_USED_VERSIONED.as_ptr()) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        return Some(Managed::Versioned(ptr));
    }
    if ffi::PyCapsule_IsValid(raw, NAME_LEGACY.as_ptr()) == 1 {
        let ptr = ffi::PyCapsule_GetPointer(raw, NAME_LEGACY.as_ptr()) as *mut DLManagedTensor;
        if ptr.is_null() || ffi::PyCapsule_SetName(raw, NAME_USED_LEGACY.as_ptr()) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        return Some(Managed::Legacy(ptr));
    }
    None
}

/// The shape an integer argument must have (see [`int_array`]).
#[derive(Clone, Copy)]
pub enum IntShape<'a> {
    /// An int, a vector `[n]` or a table `[n, m]` (positions, deltas).
    Any,
    /// A vector `[n]` (indices, slots).
    Vector,
    /// A table `[n, cols]`; `layout` names it in errors (`"[n, 3] of (t, h, w)"`).
    Table { cols: usize, layout: &'a str },
}

/// Every integer-array argument (indices, slots, positions, deltas, grids, token ids) goes
/// through here: an integer array of any width (int8..int64, uint8..uint64; CPU, any strides,
/// read through DLPack) or Python ints / sequences of ints, as row-major `i64`s with their
/// shape, checked against `want`.
pub fn int_array(obj: &Bound<'_, PyAny>, name: &str, want: IntShape<'_>) -> PyResult<IntArray> {
    if obj.hasattr("__dlpack__")? {
        let array = import(obj, name, None)?;
        if !array.is_int() {
            return Err(type_err!(
                "{name}: expected an integer dtype (int32, int64 or another int/uint), got {}",
                array.dtype_name()
            )
            .into());
        }
        array.expect_cpu(name)?;
        match want {
            IntShape::Any if array.shape.len() > 2 => {
                return Err(value_err!(
                    "{name}: expected an int array of rank <= 2, got shape {}",
                    array.shape_str()
                )
                .into());
            }
            IntShape::Any => {}
            IntShape::Vector => array.expect_rank(name, 1, "")?,
            IntShape::Table { cols, layout } => {
                array.expect_rank(name, 2, layout)?;
                if array.shape[1] != cols {
                    return Err(value_err!(
                        "{name}: expected shape {layout}, got {}",
                        array.shape_str()
                    )
                    .into());
                }
            }
        }
        return Ok(IntArray {
            values: array.int_values(name)?,
            shape: array.shape.clone(),
        });
    }
    let vector = |values: Vec<i64>| IntArray {
        shape: vec![values.len()],
        values,
    };
    let (rows, cols, layout): (Vec<Vec<i64>>, Option<usize>, &str) = match want {
        IntShape::Any => {
            if let Ok(v) = obj.extract::<i64>() {
                return Ok(IntArray {
                    values: vec![v],
                    shape: vec![],
                });
            }
            if let Ok(values) = obj.extract::<Vec<i64>>() {
                return Ok(vector(values));
            }
            let rows = obj.extract::<Vec<Vec<i64>>>().map_err(|_| {
                PyErr::from(type_err!(
                    "{name}: expected an int, an integer array or a sequence of ints, got {}",
                    type_name(obj)
                ))
            })?;
            (rows, None, "")
        }
        IntShape::Vector => {
            return obj.extract::<Vec<i64>>().map(vector).map_err(|_| {
                type_err!(
                    "{name}: expected a 1-D integer array or a sequence of ints, got {}",
                    type_name(obj)
                )
                .into()
            })
        }
        IntShape::Table { cols, layout } => {
            let rows = obj.extract::<Vec<Vec<i64>>>().map_err(|_| {
                PyErr::from(type_err!(
                    "{name}: expected an integer array {layout} or a sequence of {cols}-tuples of ints, got {}",
                    type_name(obj)
                ))
            })?;
            (rows, Some(cols), layout)
        }
    };
    // One row-length check for both shapes: a table's fixed width, else the first row's.
    let cols = cols.unwrap_or_else(|| rows.first().map_or(0, |r| r.len()));
    if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != cols) {
        let why = if layout.is_empty() {
            format!("as {name}[0]: rows must be equal")
        } else {
            layout.to_string()
        };
        return Err(value_err!(
            "{name}[{i}] has {} entries, expected {cols} ({why})",
            row.len()
        )
        .into());
    }
    Ok(IntArray {
        shape: vec![rows.len(), cols],
        values: rows.concat(),
    })
}

/// A bool argument and its shape: a bool array (CPU, any strides, through DLPack); with
/// `numeric`, integer and float arrays too, non-zero (and NaN) meaning true as `tensor.bool()`.
pub fn bool_array(
    obj: &Bound<'_, PyAny>,
    name: &str,
    numeric: bool,
) -> PyResult<(Vec<bool>, Vec<usize>)> {
    let array = import(obj, name, None)?;
    let kind = (array.dtype.code, array.dtype.bits, array.dtype.lanes);
    let float = matches!(kind, (DL_FLOAT, 16 | 32 | 64, 1) | (DL_BFLOAT, 16, 1));
    if kind != (DL_BOOL, 8, 1) && !(numeric && (float || array.is_int())) {
        return Err(if numeric {
            type_err!(
                "{name}: expected a bool, integer or float dtype, got {}",
                array.dtype_name()
            )
        } else {
            type_err!(
                "{name}: expected a bool array, got dtype {}",
                array.dtype_name()
            )
        }
        .into());
    }
    // Checked before any read: the memory must be the host's.
    array.expect_cpu(name)?;
    let values = match kind {
        (DL_BOOL, _, _) => array.read(|v: u8| Ok(v != 0))?,
        (DL_FLOAT, 16, _) => array.read(|v: half::f16| Ok(v.to_f32() != 0.0))?,
        (DL_BFLOAT, 16, _) => array.read(|v: half::bf16| Ok(v.to_f32() != 0.0))?,
        (DL_FLOAT, 32, _) => array.read(|v: f32| Ok(v != 0.0))?,
        (DL_FLOAT, 64, _) => array.read(|v: f64| Ok(v != 0.0))?,
        _ => array
            .int_values(name)?
            .into_iter()
            .map(|v| v != 0)
            .collect(),
    };
    Ok((values, array.shape.clone()))
}

/// A 1-D bool argument: a bool array (see [`bool_array`]) or a sequence of bools.
pub fn bool_vector_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<bool>> {
    if obj.hasattr("__dlpack__")? {
        let (values, shape) = bool_array(obj, name, false)?;
        if shape.len() != 1 {
            return Err(value_err!(
                "{name}: expected a 1-D tensor, got shape {}",
                crate::tensor::tuple_str(&shape)
            )
            .into());
        }
        return Ok(values);
    }
    obj.extract::<Vec<bool>>().map_err(|_| {
        type_err!(
            "{name}: expected a 1-D bool array or a sequence of bools, got {}",
            type_name(obj)
        )
        .into()
    })
}

/// A uint8 array (images): CPU, any strides, through DLPack. Read its bytes with
/// [`Imported::bytes`].
pub(crate) fn uint8_array(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Imported> {
    let array = import(obj, name, None)?;
    if (array.dtype.code, array.dtype.bits, array.dtype.lanes) != (DL_UINT, 8, 1) {
        return Err(type_err!("{name}: expected dtype uint8, got {}", array.dtype_name()).into());
    }
    array.expect_cpu(name)?;
    Ok(array)
}

impl Imported {
    /// The bytes of a uint8 array with non-negative strides, from its first element to its
    /// last (`None` for negative strides), borrowed from the import.
    pub(crate) fn bytes(&self) -> Option<&[u8]> {
        if self.strides.iter().any(|&s| s < 0) {
            return None;
        }
        let span = if self.shape.iter().any(|&d| d == 0) {
            0
        } else {
            1 + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&d, &s)| (d - 1) * s as usize)
                .sum::<usize>()
        };
        // SAFETY: the strides are non-negative, so every element lies in [ptr, ptr + span),
        // memory the producer keeps alive until the capsule (owned by `self`) drops.
        Some(unsafe { std::slice::from_raw_parts(self.ptr as *const u8, span) })
    }
}

/// A result as a NumPy array: `numpy.from_dlpack` of a [`Buffer`] (no copy).
pub fn numpy_array<'py, T: crate::tensor::Element>(
    py: Python<'py>,
    values: Vec<T>,
    shape: Vec<usize>,
) -> PyResult<Bound<'py, PyAny>> {
    let tensor = OwnedTensor::new(values, shape)?;
    py.import("numpy")?
        .getattr("from_dlpack")?
        .call1((Buffer::new(tensor),))
}

/// [`int_array`] of a vector `[n]` (`indices`-like arguments).
pub fn int_vector_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<i64>> {
    Ok(int_array(obj, name, IntShape::Vector)?.values)
}

/// [`int_array`] of a table `[n, cols]` (e.g. `grid_thw`), one `Vec` per row.
pub fn int_table_arg(
    obj: &Bound<'_, PyAny>,
    name: &str,
    cols: usize,
    layout: &str,
) -> PyResult<Vec<Vec<i64>>> {
    let flat = int_array(obj, name, IntShape::Table { cols, layout })?.values;
    Ok(flat.chunks(cols.max(1)).map(|row| row.to_vec()).collect())
}

// ---- export ----

/// A Rust-owned result, handed to Python through DLPack.
///
/// `np.from_dlpack(buffer)` and `torch.from_dlpack(buffer)` give an array / tensor sharing its
/// memory (no copy); the memory is freed when the last of them goes. bfloat16 buffers can only
/// become torch tensors (NumPy has no bfloat16).
#[pyclass(frozen, module = "tvc_rs._native", name = "Buffer")]
pub struct Buffer {
    tensor: Arc<OwnedTensor>,
}

impl Buffer {
    pub fn new(tensor: OwnedTensor) -> Self {
        Buffer {
            tensor: Arc::new(tensor),
        }
    }

    pub fn tensor(&self) -> &OwnedTensor {
        &self.tensor
    }
}

impl From<OwnedTensor> for Buffer {
    fn from(tensor: OwnedTensor) -> Self {
        Buffer::new(tensor)
    }
}

/// What a capsule's DLManagedTensor points into; freed by the deleter.
struct ExportContext {
    _tensor: Arc<OwnedTensor>,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

#[repr(C)]
struct LegacyExport {
    managed: DLManagedTensor,
    context: ExportContext,
}

#[repr(C)]
struct VersionedExport {
    managed: DLManagedTensorVersioned,
    context: ExportContext,
}

unsafe extern "C" fn delete_legacy(managed: *mut DLManagedTensor) {
    // SAFETY: `managed` is the first field of a boxed LegacyExport made in `__dlpack__`.
    drop(Box::from_raw(managed as *mut LegacyExport));
}

unsafe extern "C" fn delete_versioned(managed: *mut DLManagedTensorVersioned) {
    // SAFETY: as above, for VersionedExport.
    drop(Box::from_raw(managed as *mut VersionedExport));
}

/// Frees a capsule nobody consumed (its name is still `dltensor`).
unsafe extern "C" fn legacy_capsule_destructor(capsule: *mut ffi::PyObject) {
    if ffi::PyCapsule_IsValid(capsule, NAME_LEGACY.as_ptr()) == 1 {
        let managed =
            ffi::PyCapsule_GetPointer(capsule, NAME_LEGACY.as_ptr()) as *mut DLManagedTensor;
        if let Some(deleter) = (*managed).deleter {
            deleter(managed);
        }
    }
}

unsafe extern "C" fn versioned_capsule_destructor(capsule: *mut ffi::PyObject) {
    if ffi::PyCapsule_IsValid(capsule, NAME_VERSIONED.as_ptr()) == 1 {
        let managed = ffi::PyCapsule_GetPointer(capsule, NAME_VERSIONED.as_ptr())
            as *mut DLManagedTensorVersioned;
        if let Some(deleter) = (*managed).deleter {
            deleter(managed);
        }
    }
}

#[pymethods]
impl Buffer {
    /// DLPack export (array API standard): a versioned capsule when the consumer asks for
    /// DLPack >= 1.0 (`max_version`), else a legacy one. CPU only; `copy=True` copies.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<Arg<(u32, u32)>>,
        dl_device: Option<Arg<(i32, i32)>>,
        copy: Option<Arg<bool>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let max_version = opt_arg(max_version, "max_version")?;
        let dl_device = opt_arg(dl_device, "dl_device")?;
        let copy = opt_arg(copy, "copy")?;
        // CPU memory: nothing to synchronise, but the array API says stream is None or an int.
        if let Some(stream) = &stream {
            if !stream.is_none()
                && (!stream.is_instance_of::<pyo3::types::PyInt>()
                    || stream.is_instance_of::<pyo3::types::PyBool>())
            {
                return Err(PyTypeError::new_err(format!(
                    "stream: expected None or an int, got {}",
                    type_name(stream)
                )));
            }
        }
        if let Some((device_type, device_id)) = dl_device {
            if device_type != DL_CPU {
                return Err(PyBufferError::new_err(format!(
                    "tvc_rs Buffer lives on the CPU and cannot be exported to DLPack device ({device_type}, {device_id})"
                )));
            }
        }
        let tensor = if copy == Some(true) {
            Arc::new((*self.tensor).clone())
        } else {
            Arc::clone(&self.tensor)
        };
        let shape: Vec<i64> = tensor.shape().iter().map(|&d| d as i64).collect();
        let strides: Vec<i64> = contiguous_strides(tensor.shape())
            .iter()
            .map(|&s| s as i64)
            .collect();
        let dl_tensor = DLTensor {
            data: tensor.as_ptr() as *mut c_void,
            device: DLDevice {
                device_type: DL_CPU,
                device_id: 0,
            },
            ndim: shape.len() as i32,
            dtype: dl_dtype(tensor.dtype()),
            shape: std::ptr::null_mut(),
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        };
        let context = ExportContext {
            _tensor: tensor,
            shape,
            strides,
        };
        let versioned = matches!(max_version, Some((major, _)) if major >= 1);
        // The Vecs' heap buffers do not move when the box is made, so the pointers stay valid.
        let (pointer, name, destructor): (*mut c_void, &CStr, ffi::PyCapsule_Destructor) =
            if versioned {
                let mut export = Box::new(VersionedExport {
                    managed: DLManagedTensorVersioned {
                        version: DLPackVersion { major: 1, minor: 0 },
                        manager_ctx: std::ptr::null_mut(),
                        deleter: Some(delete_versioned),
                        flags: if copy == Some(true) {
                            FLAG_IS_COPIED
                        } else {
                            0
                        },
                        dl_tensor,
                    },
                    context,
                });
                export.managed.dl_tensor.shape = export.context.shape.as_mut_ptr();
                export.managed.dl_tensor.strides = export.context.strides.as_mut_ptr();
                let raw = Box::into_raw(export);
                // SAFETY: just allocated.
                unsafe { (*raw).managed.manager_ctx = raw as *mut c_void };
                (
                    raw as *mut c_void,
                    NAME_VERSIONED,
                    versioned_capsule_destructor,
                )
            } else {
                let mut export = Box::new(LegacyExport {
                    managed: DLManagedTensor {
                        dl_tensor,
                        manager_ctx: std::ptr::null_mut(),
                        deleter: Some(delete_legacy),
                    },
                    context,
                });
                export.managed.dl_tensor.shape = export.context.shape.as_mut_ptr();
                export.managed.dl_tensor.strides = export.context.strides.as_mut_ptr();
                let raw = Box::into_raw(export);
                // SAFETY: just allocated.
                unsafe { (*raw).managed.manager_ctx = raw as *mut c_void };
                (raw as *mut c_void, NAME_LEGACY, legacy_capsule_destructor)
            };
        // SAFETY: `pointer` is a boxed export whose first field is the managed tensor; the
        // destructor frees it unless a consumer renamed the capsule (and then owns it).
        unsafe {
            let capsule = ffi::PyCapsule_New(pointer, name.as_ptr(), Some(destructor));
            if capsule.is_null() {
                if versioned {
                    delete_versioned(pointer as *mut DLManagedTensorVersioned);
                } else {
                    delete_legacy(pointer as *mut DLManagedTensor);
                }
            }
            Bound::from_owned_ptr_or_err(py, capsule)
        }
    }

    /// `(kDLCPU, 0)`
    fn __dlpack_device__(&self) -> (i32, i32) {
        (DL_CPU, 0)
    }

    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.tensor.shape())
    }

    /// `"float32"`, `"float16"`, `"bfloat16"`, `"int32"` or `"int64"`.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.tensor.dtype().name()
    }

    fn __repr__(&self) -> String {
        format!(
            "Buffer(shape={}, dtype={})",
            crate::tensor::tuple_str(self.tensor.shape()),
            self.tensor.dtype().name()
        )
    }
}

/// Hand a result to Python as a [`Buffer`].
pub fn buffer<'py>(py: Python<'py>, tensor: OwnedTensor) -> PyResult<Bound<'py, Buffer>> {
    Bound::new(py, Buffer::new(tensor))
}

/// `_tensor_info(x, name="x")`: what the interop reads from an array (for tests and debugging).
#[pyfunction]
#[pyo3(signature = (x, name = Arg::of("x".to_string())), text_signature = "(x, name='x')")]
fn _tensor_info<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    name: Arg<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let name_owned = name.get("name")?;
    let name: &str = &name_owned;
    let all = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F64,
        DType::I32,
        DType::I64,
    ];
    let tensor = PyTensor::extract(x, name, &all)?;
    let view = tensor.view();
    let info = PyDict::new(py);
    info.set_item("dtype", view.dtype().name())?;
    info.set_item("shape", PyTuple::new(py, view.shape())?)?;
    info.set_item("strides", PyTuple::new(py, view.strides())?)?;
    info.set_item("device", view.device().to_string())?;
    info.set_item("readonly", view.is_readonly())?;
    info.set_item("contiguous", view.is_contiguous())?;
    info.set_item("data_ptr", view.data_ptr() as usize)?;
    Ok(info)
}

/// `_tensor_copy(x)`: a row-major copy of any CPU array as a Buffer (exercises the strided
/// reader and the export; for tests).
#[pyfunction]
fn _tensor_copy<'py>(py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, Buffer>> {
    let all = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F64,
        DType::I32,
        DType::I64,
    ];
    let tensor = PyTensor::extract(x, "x", &all)?;
    let view = tensor.view();
    view.expect_cpu()?;
    let shape = view.shape().to_vec();
    let owned = crate::dispatch_dtype!(view.dtype(), T => {
        OwnedTensor::new(view.strided::<T>()?.to_contiguous()?.into_owned(), shape)?
    });
    buffer(py, owned)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Buffer>()?;
    m.add_function(wrap_pyfunction!(_tensor_info, m)?)?;
    m.add_function(wrap_pyfunction!(_tensor_copy, m)?)?;
    Ok(())
}
