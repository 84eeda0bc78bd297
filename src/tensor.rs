//! Tensors the kernels read and write without owning them, and tensors tvc-rs owns to hand back.
//!
//! - [`TensorView`]: memory owned by someone else (a NumPy array, a PyTorch tensor, a Rust
//!   slice) described by dtype, shape, strides (in elements), device and writability, plus the
//!   name of the argument it came from so that every check can say what was wrong with which
//!   argument. The bindings in `python/tensor.rs` build views from DLPack capsules.
//! - [`Strided`]: a typed, CPU-readable view whose last axis is contiguous, either borrowed from
//!   the caller's memory (any non-negative strides) or a packed copy (for layouts that cannot be
//!   read lane by lane, e.g. a transposed matrix). Kernels take `&Strided<T>` and read lanes.
//! - [`OwnedTensor`]: a row-major result owned by Rust (exported to Python through DLPack).
//!
//! Nothing here knows about Python.

use std::borrow::Cow;
use std::marker::PhantomData;

pub use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::{type_err, value_err};

/// `dispatch_float!(dtype, T => expr)`: evaluate `expr` with `T` the Rust type of a float dtype
/// (f32, f16, bf16). Non-float dtypes must have been refused before (they hit `unreachable!`).
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_float {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::dtype::DType::F16 => {
                type $t = $crate::tensor::f16;
                $body
            }
            $crate::dtype::DType::BF16 => {
                type $t = $crate::tensor::bf16;
                $body
            }
            $crate::dtype::DType::F64 => {
                type $t = f64;
                $body
            }
            other => unreachable!("dtype {other} was refused by the argument check"),
        }
    };
}

/// `dispatch_dtype!(dtype, T => expr)`: as `dispatch_float!`, over every dtype.
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::dtype::DType::I32 => {
                type $t = i32;
                $body
            }
            $crate::dtype::DType::I64 => {
                type $t = i64;
                $body
            }
            other => $crate::dispatch_float!(other, $t => $body),
        }
    };
}

/// Where a tensor's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device with its ordinal.
    Cuda(i32),
    /// Any other DLPack device (ROCm, Metal, ...), kept for error messages.
    Other {
        device_type: i32,
        id: i32,
    },
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(id) => write!(f, "cuda:{id}"),
            Device::Other { device_type, id } => {
                write!(f, "DLPack device type {device_type} (id {id})")
            }
        }
    }
}

/// The element types a view can be read as: f32, f16, bf16 (data) and i32, i64 (indices).
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    #[doc(hidden)]
    fn into_data(values: Vec<Self>) -> TensorData;
    #[doc(hidden)]
    fn data_slice(data: &TensorData) -> Option<&[Self]>;
}

macro_rules! impl_element {
    ($t:ty, $dtype:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dtype;
            fn into_data(values: Vec<Self>) -> TensorData {
                TensorData::$dtype(values)
            }
            fn data_slice(data: &TensorData) -> Option<&[Self]> {
                match data {
                    TensorData::$dtype(values) => Some(values),
                    _ => None,
                }
            }
        }
    };
}
impl_element!(f32, F32);
impl_element!(f16, F16);
impl_element!(bf16, BF16);
impl_element!(f64, F64);
impl_element!(i32, I32);
impl_element!(i64, I64);

/// `(3, 4, 5)`, `(3,)`, `()`: shapes and strides written the way Python prints tuples.
pub fn tuple_str<T: std::fmt::Display>(values: &[T]) -> String {
    match values {
        [only] => format!("({only},)"),
        _ => format!(
            "({})",
            values
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// "float32, float16 or bfloat16"
pub fn dtype_list(dtypes: &[DType]) -> String {
    let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
    match names.as_slice() {
        [] => String::new(),
        [only] => only.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Row-major strides (in elements) of a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut step = 1isize;
    for (stride, &dim) in strides.iter_mut().zip(shape).rev() {
        *stride = step;
        step = step.saturating_mul(dim.max(1) as isize);
    }
    strides
}

/// A tensor in memory owned by someone else, named after the argument it was passed as.
///
/// The lifetime ties the view to its owner (the DLPack capsule's producer, or a Rust slice).
/// A view is writable only when it was made from mutable memory (`from_mut_slice`, or
/// `PyTensor::view_mut` in the bindings) and the owner did not mark it read-only; reading
/// never needs more than `&self`, writing takes `&mut self` so that one view hands out one
/// mutable slice at a time. Two *different* views may still alias (the caller passed the same
/// array twice): check [`TensorView::overlaps`] before writing through one while reading another.
pub struct TensorView<'a> {
    name: String,
    /// Address of element `[0, 0, ...]` (byte offset already applied).
    ptr: *mut u8,
    dtype: DType,
    shape: Vec<usize>,
    /// In elements; may be negative or zero (NumPy reversed / broadcast views).
    strides: Vec<isize>,
    device: Device,
    /// The owner forbids writes (e.g. a NumPy array with `writeable=False`).
    readonly: bool,
    /// Opened for writing (mutable borrow of the owner) and not read-only.
    writable: bool,
    _owner: PhantomData<&'a ()>,
}

impl<'a> TensorView<'a> {
    /// A view of raw memory.
    ///
    /// # Safety
    /// `ptr` must address element `[0, ..., 0]` of a tensor with the given dtype, shape and
    /// strides (in elements) that stays valid for `'a`, readable if `device` is the CPU, and
    /// writable as long as the view is when `writable` is true (and nobody else reads or writes
    /// it meanwhile).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn from_raw_parts(
        name: impl Into<String>,
        ptr: *mut u8,
        dtype: DType,
        shape: Vec<usize>,
        strides: Vec<isize>,
        device: Device,
        readonly: bool,
        writable: bool,
    ) -> Self {
        debug_assert_eq!(shape.len(), strides.len());
        TensorView {
            name: name.into(),
            ptr,
            dtype,
            shape,
            strides,
            device,
            readonly,
            writable: writable && !readonly,
            _owner: PhantomData,
        }
    }

    /// A read-only row-major view of a slice (for Rust callers and tests).
    pub fn from_slice<T: Element>(
        name: impl Into<String>,
        data: &'a [T],
        shape: &[usize],
    ) -> Result<Self> {
        let name = name.into();
        check_len(&name, data.len(), shape)?;
        // SAFETY: the slice holds exactly the row-major elements of `shape` and lives for 'a.
        Ok(unsafe {
            Self::from_raw_parts(
                name,
                data.as_ptr() as *mut u8,
                T::DTYPE,
                shape.to_vec(),
                contiguous_strides(shape),
                Device::Cpu,
                false,
                false,
            )
        })
    }

    /// A writable row-major view of a mutable slice.
    pub fn from_mut_slice<T: Element>(
        name: impl Into<String>,
        data: &'a mut [T],
        shape: &[usize],
    ) -> Result<Self> {
        let name = name.into();
        check_len(&name, data.len(), shape)?;
        // SAFETY: exclusive borrow of exactly the row-major elements of `shape` for 'a.
        Ok(unsafe {
            Self::from_raw_parts(
                name,
                data.as_mut_ptr() as *mut u8,
                T::DTYPE,
                shape.to_vec(),
                contiguous_strides(shape),
                Device::Cpu,
                false,
                true,
            )
        })
    }

    /// A read-only view of the same memory (borrowing this one).
    pub fn reborrow(&self) -> TensorView<'_> {
        TensorView {
            name: self.name.clone(),
            ptr: self.ptr,
            dtype: self.dtype,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            device: self.device,
            readonly: self.readonly,
            writable: false,
            _owner: PhantomData,
        }
    }

    /// A view of the same memory with the same write access, borrowing this one exclusively.
    pub fn reborrow_mut(&mut self) -> TensorView<'_> {
        let mut view = self.reborrow();
        view.writable = self.writable;
        view
    }

    /// The same view under another argument name (e.g. `"cache[3]"`).
    pub fn renamed(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Strides in elements.
    pub fn strides(&self) -> &[isize] {
        &self.strides
    }
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    /// Size of `axis` (panics if `axis >= ndim`; check the rank first).
    pub fn dim(&self, axis: usize) -> usize {
        self.shape[axis]
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn is_readonly(&self) -> bool {
        self.readonly
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// Address of element `[0, ..., 0]` (for the CUDA backend and overlap checks).
    pub fn data_ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// `(3, 4, 5)`
    pub fn shape_str(&self) -> String {
        tuple_str(&self.shape)
    }

    /// `x: expected a 2-D tensor [tokens, dim], got shape (3, 4, 5)`; `layout` may be empty.
    pub fn expect_rank(&self, rank: usize, layout: &str) -> Result<&Self> {
        if self.ndim() == rank {
            return Ok(self);
        }
        let layout = if layout.is_empty() {
            String::new()
        } else {
            format!(" {layout}")
        };
        Err(value_err!(
            "{}: expected a {rank}-D tensor{layout}, got shape {}",
            self.name,
            self.shape_str()
        ))
    }

    /// `x: expected dtype float32, got int64` (TypeError).
    pub fn expect_dtype(&self, dtype: DType) -> Result<&Self> {
        self.expect_dtypes(&[dtype])
    }

    /// `x: expected dtype float32, float16 or bfloat16, got int64` (TypeError).
    pub fn expect_dtypes(&self, dtypes: &[DType]) -> Result<&Self> {
        if dtypes.contains(&self.dtype) {
            return Ok(self);
        }
        Err(type_err!(
            "{}: expected dtype {}, got {}",
            self.name,
            dtype_list(dtypes),
            self.dtype
        ))
    }

    /// The view's memory is on the CPU (the CPU kernels' arguments: a CUDA tensor here is mixed
    /// with CPU ones, since calls whose main tensor is on a GPU go to the CUDA backend).
    pub fn expect_cpu(&self) -> Result<&Self> {
        match self.device {
            Device::Cpu => Ok(self),
            Device::Cuda(_) => Err(value_err!(
                "{}: expected a CPU tensor like the other arguments, got one on {}; pass every tensor on the same device",
                self.name,
                self.device
            )),
            Device::Other { .. } => Err(value_err!(
                "{}: tensors on {} are not supported; pass a CPU tensor",
                self.name,
                self.device
            )),
        }
    }

    /// `keys: expected a tensor on the same device as query (cpu), got cuda:0`.
    pub fn expect_same_device(&self, other: &TensorView<'_>) -> Result<&Self> {
        if self.device == other.device {
            return Ok(self);
        }
        Err(value_err!(
            "{}: expected a tensor on the same device as {} ({}), got {}",
            self.name,
            other.name,
            other.device,
            self.device
        ))
    }

    /// Row-major (C) order with no gaps; strides of axes of size 1 do not matter.
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut expected = 1isize;
        for (&dim, &stride) in self.shape.iter().zip(&self.strides).rev() {
            if dim != 1 && stride != expected {
                return false;
            }
            expected *= dim as isize;
        }
        true
    }

    pub fn expect_contiguous(&self) -> Result<&Self> {
        if self.is_contiguous() {
            return Ok(self);
        }
        Err(value_err!(
            "{}: expected a contiguous (row-major) tensor, got strides {} (in elements) for shape {}; \
             pass x.contiguous() (torch) or np.ascontiguousarray(x)",
            self.name,
            tuple_str(&self.strides),
            self.shape_str()
        ))
    }

    /// The view may be written through (`cache: the array is read-only ...` otherwise).
    pub fn expect_writable(&self) -> Result<&Self> {
        if self.readonly {
            return Err(value_err!(
                "{}: the array is read-only (e.g. a NumPy array with writeable=False); pass a writable array",
                self.name
            ));
        }
        if !self.writable {
            return Err(Error::Runtime(format!(
                "{}: internal error: the view was not opened for writing (use view_mut)",
                self.name
            )));
        }
        Ok(self)
    }

    /// No two index tuples address the same element (a prerequisite for writing through the view).
    pub fn is_non_overlapping(&self) -> bool {
        if self.numel() <= 1 {
            return true;
        }
        let mut axes: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(&dim, _)| dim > 1)
            .map(|(&dim, &stride)| (stride.unsigned_abs(), dim))
            .collect();
        axes.sort_unstable();
        let mut reach = 1usize; // elements spanned by the inner axes so far
        for (stride, dim) in axes {
            if stride < reach {
                return false;
            }
            reach += stride * (dim - 1);
        }
        true
    }

    /// Byte range `[start, end)` the view touches, or `None` when it is empty.
    pub fn byte_span(&self) -> Option<(usize, usize)> {
        if self.numel() == 0 {
            return None;
        }
        let size = self.dtype.size_bytes() as isize;
        let (mut low, mut high) = (0isize, 0isize);
        for (&dim, &stride) in self.shape.iter().zip(&self.strides) {
            let extent = (dim as isize - 1) * stride;
            if extent < 0 {
                low += extent;
            } else {
                high += extent;
            }
        }
        let base = self.ptr as isize;
        Some((
            (base + low * size) as usize,
            (base + (high + 1) * size) as usize,
        ))
    }

    /// The two views may share memory (same device and intersecting byte ranges).
    pub fn overlaps(&self, other: &TensorView<'_>) -> bool {
        if self.device != other.device {
            return false;
        }
        match (self.byte_span(), other.byte_span()) {
            (Some((a0, a1)), Some((b0, b1))) => a0 < b1 && b0 < a1,
            _ => false,
        }
    }

    fn check_element<T: Element>(&self) -> Result<()> {
        self.expect_cpu()?;
        self.expect_dtype(T::DTYPE)?;
        Ok(())
    }

    fn aligned<T>(&self) -> bool {
        (self.ptr as usize) % std::mem::align_of::<T>() == 0
    }

    fn misaligned_error<T>(&self) -> Error {
        value_err!(
            "{}: the data pointer is not aligned to {} bytes for {}; pass a freshly allocated array",
            self.name,
            std::mem::align_of::<T>(),
            self.dtype
        )
    }

    /// The elements of a contiguous CPU tensor of dtype `T`, in row-major order.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_element::<T>()?;
        self.expect_contiguous()?;
        let len = self.numel();
        if len == 0 {
            return Ok(&[]);
        }
        if !self.aligned::<T>() {
            return Err(self.misaligned_error::<T>());
        }
        // SAFETY: contiguous, CPU, dtype checked, aligned; valid for the view's lifetime.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const T, len) })
    }

    /// The elements of a contiguous, writable CPU tensor of dtype `T`, for writing in place.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_element::<T>()?;
        self.expect_contiguous()?;
        self.expect_writable()?;
        let len = self.numel();
        if len == 0 {
            return Ok(&mut []);
        }
        if !self.aligned::<T>() {
            return Err(self.misaligned_error::<T>());
        }
        // SAFETY: as in `as_slice`, plus the owner allows writes and `&mut self` is exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, len) })
    }

    /// A view whose lanes (last axis) can be read as slices, borrowed when possible.
    ///
    /// Borrowed (no copy) when the last axis has stride 1 (or size <= 1), every stride is
    /// non-negative and the data is aligned: contiguous tensors and slices such as `x[a:b]`,
    /// `x[::2]`, `x[:, :k]`, `k.transpose(0, 1)` of a `[heads, seq, dim]` tensor. Anything else
    /// (a transposed matrix, negative strides, misaligned data) is packed into a row-major copy.
    pub fn strided<T: Element>(&self) -> Result<Strided<'_, T>> {
        self.check_element::<T>()?;
        match self.borrowable_strides::<T>() {
            Some(strides) => {
                let len = self.numel();
                let span = if len == 0 {
                    0
                } else {
                    1 + self
                        .shape
                        .iter()
                        .zip(&strides)
                        .map(|(&d, &s)| (d - 1) * s)
                        .sum::<usize>()
                };
                let strides = if len == 0 {
                    vec![0; strides.len()]
                } else {
                    strides
                };
                let data: &[T] =
                    // SAFETY: CPU, dtype and alignment checked; non-negative strides, so the
                    // `span` elements from the first one hold every element of the view.
                    if span == 0 { &[] } else { unsafe { std::slice::from_raw_parts(self.ptr as *const T, span) } };
                Ok(Strided {
                    data: Cow::Borrowed(data),
                    shape: self.shape.clone(),
                    strides,
                })
            }
            None => Ok(Strided::from_vec(self.packed::<T>()?, &self.shape)),
        }
    }

    /// A writable view whose lanes (last axis) are slices, for writing in place (e.g. into a
    /// KV cache slice): CPU, dtype `T`, writable, last axis contiguous, non-negative strides,
    /// aligned, and no two elements sharing memory. Anything else is refused naming the
    /// argument (writes cannot go through a copy).
    pub fn strided_mut<T: Element>(&mut self) -> Result<StridedMut<'_, T>> {
        self.check_element::<T>()?;
        self.expect_writable()?;
        let strides = self.borrowable_strides::<T>().ok_or_else(|| {
            value_err!(
                "{}: expected a tensor whose last axis is contiguous (stride 1) and whose strides are \
                 non-negative to write into, got strides {} (in elements) for shape {}",
                self.name,
                tuple_str(&self.strides),
                self.shape_str()
            )
        })?;
        if !self.is_non_overlapping() {
            return Err(value_err!(
                "{}: cannot write into a tensor whose elements share memory (strides {} for shape {})",
                self.name,
                tuple_str(&self.strides),
                self.shape_str()
            ));
        }
        Ok(StridedMut {
            ptr: self.ptr as *mut T,
            shape: self.shape.clone(),
            strides: if self.numel() == 0 {
                vec![0; self.ndim()]
            } else {
                strides
            },
            _borrow: PhantomData,
        })
    }

    /// Like [`TensorView::strided`], but refuses (naming the argument) instead of copying.
    pub fn strided_no_copy<T: Element>(&self) -> Result<Strided<'_, T>> {
        self.check_element::<T>()?;
        if self.borrowable_strides::<T>().is_none() {
            return Err(value_err!(
                "{}: expected a tensor whose last axis is contiguous (stride 1) and whose strides are \
                 non-negative, got strides {} (in elements) for shape {}; pass x.contiguous() (torch) \
                 or np.ascontiguousarray(x)",
                self.name,
                tuple_str(&self.strides),
                self.shape_str()
            ));
        }
        self.strided()
    }

    fn borrowable_strides<T>(&self) -> Option<Vec<usize>> {
        if self.numel() == 0 {
            return Some(vec![0; self.ndim()]);
        }
        if !self.aligned::<T>() {
            return None;
        }
        let mut strides = Vec::with_capacity(self.ndim());
        for (axis, (&dim, &stride)) in self.shape.iter().zip(&self.strides).enumerate() {
            let stride = if dim == 1 { 0 } else { stride };
            if stride < 0 || (axis + 1 == self.ndim() && dim > 1 && stride != 1) {
                return None;
            }
            strides.push(stride as usize);
        }
        Some(strides)
    }

    /// Row-major copy of the elements, for any strides and alignment.
    fn packed<T: Element>(&self) -> Result<Vec<T>> {
        // A zero-stride view (`x.expand(2**40)`) is tiny in memory but huge once copied.
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                value_err!(
                    "{}: shape {} has too many elements",
                    self.name,
                    self.shape_str()
                )
            })?;
        let mut out = crate::error::try_vec::<T>(
            numel,
            &format!("{} (a copy of shape {})", self.name, self.shape_str()),
        )?;
        if numel == 0 {
            return Ok(out);
        }
        let last = self.ndim().saturating_sub(1);
        let mut index = vec![0usize; self.ndim()];
        loop {
            let base: isize = index
                .iter()
                .zip(&self.strides)
                .map(|(&i, &s)| i as isize * s)
                .sum();
            let (lane_len, lane_stride) = if self.ndim() == 0 {
                (1, 0)
            } else {
                (self.shape[last], self.strides[last])
            };
            for j in 0..lane_len as isize {
                // SAFETY: every index tuple within the shape addresses an element of the view.
                let value = unsafe {
                    (self.ptr as *const T)
                        .offset(base + j * lane_stride)
                        .read_unaligned()
                };
                out.push(value);
            }
            // Advance the multi-index over every axis but the last.
            let mut axis = last;
            loop {
                if axis == 0 {
                    return Ok(out);
                }
                axis -= 1;
                index[axis] += 1;
                if index[axis] < self.shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
    }
}

impl std::fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorView")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("strides", &self.strides)
            .field("device", &self.device)
            .field("readonly", &self.readonly)
            .field("writable", &self.writable)
            .finish()
    }
}

fn check_len(name: &str, len: usize, shape: &[usize]) -> Result<()> {
    let numel: usize = shape.iter().product();
    if numel != len {
        return Err(value_err!(
            "{name}: {len} elements cannot have shape {}",
            tuple_str(shape)
        ));
    }
    Ok(())
}

/// A writable CPU tensor of `T` whose lanes (last axis) are disjoint slices; made by
/// [`TensorView::strided_mut`], which checked that no two elements share memory.
pub struct StridedMut<'a, T> {
    ptr: *mut T,
    shape: Vec<usize>,
    strides: Vec<usize>,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: a StridedMut is an exclusive borrow of its elements, like `&mut [T]`.
unsafe impl<T: Send> Send for StridedMut<'_, T> {}
unsafe impl<T: Sync> Sync for StridedMut<'_, T> {}

impl<T: Copy> StridedMut<'_, T> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    /// Number of lanes: the product of every dimension but the last.
    pub fn lanes(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(1)]
            .iter()
            .product()
    }

    fn lane_offset(&self, mut lane: usize) -> usize {
        let outer = self.shape.len().saturating_sub(1);
        let mut offset = 0;
        for axis in (0..outer).rev() {
            offset += (lane % self.shape[axis]) * self.strides[axis];
            lane /= self.shape[axis];
        }
        offset
    }

    fn lane_len(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Lane number `lane` (row-major over the outer dimensions), for reading.
    pub fn lane(&self, lane: usize) -> &[T] {
        assert!(lane < self.lanes(), "lane {lane} out of range");
        // SAFETY: in range; the elements are borrowed for the view's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.add(self.lane_offset(lane)), self.lane_len()) }
    }

    /// Lane number `lane`, for writing.
    pub fn lane_mut(&mut self, lane: usize) -> &mut [T] {
        assert!(lane < self.lanes(), "lane {lane} out of range");
        // SAFETY: as in `lane`, and `&mut self` is exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(self.lane_offset(lane)), self.lane_len())
        }
    }

    /// `f(lane, slice)` for every lane, in parallel (rayon); lanes are disjoint.
    pub fn par_for_each_lane<F>(&mut self, f: F)
    where
        T: Send + Sync,
        F: Fn(usize, &mut [T]) + Sync + Send,
    {
        use rayon::prelude::*;
        if self.lane_len() == 0 {
            return;
        }
        let this = &*self;
        (0..this.lanes()).into_par_iter().for_each(|lane| {
            // SAFETY: lanes are disjoint (checked by `strided_mut`), so each task owns its slice.
            let slice = unsafe {
                std::slice::from_raw_parts_mut(
                    this.ptr.add(this.lane_offset(lane)),
                    this.lane_len(),
                )
            };
            f(lane, slice)
        });
    }
}

/// A CPU tensor of `T` whose last axis is contiguous: each lane (all indices but the last
/// fixed) is a slice. Borrowed from the caller or, for layouts that cannot be read that way,
/// a packed row-major copy (see [`TensorView::strided`]).
#[derive(Debug, Clone)]
pub struct Strided<'a, T: Clone> {
    data: Cow<'a, [T]>,
    shape: Vec<usize>,
    /// In elements; the last one is 1 (or irrelevant when the last axis has size <= 1).
    strides: Vec<usize>,
}

impl<'a, T: Copy> Strided<'a, T> {
    /// A row-major view of a slice.
    pub fn contiguous(data: &'a [T], shape: &[usize]) -> Result<Self> {
        check_len("data", data.len(), shape)?;
        Ok(Strided {
            data: Cow::Borrowed(data),
            shape: shape.to_vec(),
            strides: unsigned_strides(shape),
        })
    }

    /// A row-major tensor owning its elements.
    pub fn from_vec(data: Vec<T>, shape: &[usize]) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Strided {
            data: Cow::Owned(data),
            shape: shape.to_vec(),
            strides: unsigned_strides(shape),
        }
    }

    /// A view of `data` with explicit strides (in elements); the last stride must be 1.
    pub fn new(data: &'a [T], shape: &[usize], strides: &[usize]) -> Result<Self> {
        if shape.len() != strides.len() {
            return Err(value_err!(
                "data: shape {} and strides {} differ in rank",
                tuple_str(shape),
                tuple_str(strides)
            ));
        }
        let numel: usize = shape.iter().product();
        if numel == 0 {
            return Ok(Strided {
                data: Cow::Borrowed(&[]),
                shape: shape.to_vec(),
                strides: vec![0; shape.len()],
            });
        }
        if let (Some(&dim), Some(&stride)) = (shape.last(), strides.last()) {
            if dim > 1 && stride != 1 {
                return Err(value_err!(
                    "data: the last stride must be 1, got strides {}",
                    tuple_str(strides)
                ));
            }
        }
        let span = 1 + shape
            .iter()
            .zip(strides)
            .map(|(&d, &s)| (d - 1) * s)
            .sum::<usize>();
        if span > data.len() {
            return Err(value_err!(
                "data: shape {} with strides {} needs {span} elements, got {}",
                tuple_str(shape),
                tuple_str(strides),
                data.len()
            ));
        }
        Ok(Strided {
            data: Cow::Borrowed(data),
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the elements are the caller's memory, false for a packed copy.
    pub fn is_borrowed(&self) -> bool {
        matches!(self.data, Cow::Borrowed(_))
    }

    /// The lane at `index` (one index per axis but the last).
    #[inline]
    pub fn lane(&self, index: &[usize]) -> &[T] {
        debug_assert_eq!(index.len() + 1, self.ndim());
        let start: usize = index.iter().zip(&self.strides).map(|(&i, &s)| i * s).sum();
        let len = *self.shape.last().unwrap_or(&1);
        &self.data[start..start + len]
    }

    /// Row `i` of a 2-D tensor.
    #[inline]
    pub fn row(&self, i: usize) -> &[T] {
        debug_assert_eq!(self.ndim(), 2);
        let start = i * self.strides[0];
        &self.data[start..start + self.shape[1]]
    }

    /// Lane `[i, j, :]` of a 3-D tensor.
    #[inline]
    pub fn lane2(&self, i: usize, j: usize) -> &[T] {
        debug_assert_eq!(self.ndim(), 3);
        let start = i * self.strides[0] + j * self.strides[1];
        &self.data[start..start + self.shape[2]]
    }

    /// All elements when they are row-major without gaps.
    pub fn as_contiguous(&self) -> Option<&[T]> {
        let numel = self.numel();
        if self.strides == unsigned_strides(&self.shape) || numel == 0 {
            Some(&self.data[..numel])
        } else {
            None
        }
    }

    /// Row-major copy of the elements (borrowed when already row-major).
    ///
    /// [`Error::Memory`] when the copy cannot be allocated (a zero-stride view of a huge shape).
    pub fn to_contiguous(&self) -> Result<Cow<'_, [T]>> {
        if let Some(slice) = self.as_contiguous() {
            return Ok(Cow::Borrowed(slice));
        }
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                value_err!(
                    "data: shape {} has too many elements",
                    tuple_str(&self.shape)
                )
            })?;
        let mut out = crate::error::try_vec::<T>(
            numel,
            &format!("a row-major copy of shape {}", tuple_str(&self.shape)),
        )?;
        if self.ndim() == 0 {
            out.extend_from_slice(&self.data[..1]);
            return Ok(Cow::Owned(out));
        }
        let outer = &self.shape[..self.ndim() - 1];
        let mut index = vec![0usize; outer.len()];
        if numel == 0 {
            return Ok(Cow::Owned(out));
        }
        loop {
            out.extend_from_slice(self.lane(&index));
            let mut axis = outer.len();
            loop {
                if axis == 0 {
                    return Ok(Cow::Owned(out));
                }
                axis -= 1;
                index[axis] += 1;
                if index[axis] < outer[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
    }
}

fn unsigned_strides(shape: &[usize]) -> Vec<usize> {
    let numel: usize = shape.iter().product();
    if numel == 0 {
        return vec![0; shape.len()];
    }
    contiguous_strides(shape)
        .into_iter()
        .map(|s| s as usize)
        .collect()
}

/// The elements of an [`OwnedTensor`], one variant per dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// A row-major tensor owned by Rust: the results the kernels hand back.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedTensor {
    data: TensorData,
    shape: Vec<usize>,
}

impl OwnedTensor {
    /// `data` in row-major order; its length must be the product of `shape`.
    pub fn new<T: Element>(data: Vec<T>, shape: Vec<usize>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::Runtime(format!(
                "internal error: {} elements cannot have shape {}",
                data.len(),
                tuple_str(&shape)
            )));
        }
        Ok(OwnedTensor {
            data: T::into_data(data),
            shape,
        })
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::F64(_) => DType::F64,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
        }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn data(&self) -> &TensorData {
        &self.data
    }
    /// The elements if the dtype is `T`.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        T::data_slice(&self.data)
    }
    /// Address of the first element (dangling but aligned when empty).
    pub fn as_ptr(&self) -> *const u8 {
        match &self.data {
            TensorData::F32(v) => v.as_ptr() as *const u8,
            TensorData::F16(v) => v.as_ptr() as *const u8,
            TensorData::BF16(v) => v.as_ptr() as *const u8,
            TensorData::F64(v) => v.as_ptr() as *const u8,
            TensorData::I32(v) => v.as_ptr() as *const u8,
            TensorData::I64(v) => v.as_ptr() as *const u8,
        }
    }
    /// A read-only view (e.g. to feed one result into another kernel).
    pub fn view(&self, name: impl Into<String>) -> TensorView<'_> {
        // SAFETY: row-major elements owned by self, borrowed for the view's lifetime.
        unsafe {
            TensorView::from_raw_parts(
                name,
                self.as_ptr() as *mut u8,
                self.dtype(),
                self.shape.clone(),
                contiguous_strides(&self.shape),
                Device::Cpu,
                false,
                false,
            )
        }
    }
}
