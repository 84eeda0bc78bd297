//! Strided views of caller memory (NumPy / PyTorch / DLPack tensors, vLLM cache views) and the
//! row primitives the kernels share. Strides are in elements and may be negative.
//!
//! A mutable view never addresses one element twice (checked when it is made), so different
//! index tuples are different memory and threads may write different rows at the same time.

use std::marker::PhantomData;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::dtype::{DType, Float};
use crate::error::Result;
use crate::value_err;

use super::rope::{
    bf16_bits, rotate_in_place_dispatch as rotate_in_place, rotate_into_dispatch as rotate_into,
};

fn fmt_dims<D: std::fmt::Display>(dims: &[D]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    if parts.len() == 1 {
        format!("({},)", parts[0])
    } else {
        format!("({})", parts.join(", "))
    }
}

/// Lowest and highest element offset the view addresses, `None` when it is empty.
fn offset_range(shape: &[usize], strides: &[isize]) -> Option<(isize, isize)> {
    if shape.contains(&0) {
        return None;
    }
    let (mut lo, mut hi) = (0isize, 0isize);
    for (&n, &s) in shape.iter().zip(strides) {
        let reach = s * (n as isize - 1);
        if reach < 0 {
            lo += reach;
        } else {
            hi += reach;
        }
    }
    Some((lo, hi))
}

/// True when no two index tuples of `shape` map to the same offset. Sufficient test: with the
/// dimensions sorted by |stride|, each stride steps past everything the smaller ones reach.
pub(crate) fn is_non_overlapping(shape: &[usize], strides: &[isize]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut dims: Vec<(usize, usize)> = shape
        .iter()
        .zip(strides)
        .filter(|(&n, _)| n > 1)
        .map(|(&n, &s)| (s.unsigned_abs(), n))
        .collect();
    dims.sort_unstable();
    let mut reach = 0usize;
    for (stride, n) in dims {
        if stride <= reach {
            return false;
        }
        reach += stride * (n - 1);
    }
    true
}

fn check_extent(shape: &[usize], strides: &[isize], name: &str) -> Result<()> {
    // Offsets must fit in isize; a view cannot span more memory than exists anyway.
    let mut total: u128 = 0;
    for (&n, &s) in shape.iter().zip(strides) {
        total += (n as u128).saturating_sub(1) * s.unsigned_abs() as u128;
    }
    if total > (isize::MAX as u128) / 16 {
        return Err(value_err!(
            "{name}: shape {} with strides {} spans more memory than can exist",
            fmt_dims(shape),
            fmt_dims(strides)
        ));
    }
    Ok(())
}

/// A mutable N-d strided view of `T`.
pub struct StridedMut<'a, T, const N: usize> {
    ptr: *mut T,
    shape: [usize; N],
    strides: [isize; N],
    _marker: PhantomData<&'a mut T>,
}

// SAFETY: the view owns exclusive access to non-overlapping elements; the kernels hand disjoint
// rows to different threads.
unsafe impl<T: Send, const N: usize> Send for StridedMut<'_, T, N> {}
unsafe impl<T: Sync, const N: usize> Sync for StridedMut<'_, T, N> {}

impl<'a, T: Float, const N: usize> StridedMut<'a, T, N> {
    /// A view into `data` starting at element `offset` (the element at index 0,...,0).
    /// Errors if the view leaves `data` or addresses an element twice.
    pub fn new(
        data: &'a mut [T],
        offset: usize,
        shape: [usize; N],
        strides: [isize; N],
        name: &str,
    ) -> Result<Self> {
        check_extent(&shape, &strides, name)?;
        if let Some((lo, hi)) = offset_range(&shape, &strides) {
            let offset = offset as isize;
            if offset + lo < 0 || offset + hi >= data.len() as isize {
                return Err(value_err!(
                    "{name}: shape {} with strides {} at offset {offset} reaches outside a buffer of {} elements",
                    fmt_dims(&shape),
                    fmt_dims(&strides),
                    data.len()
                ));
            }
        }
        // SAFETY: offset <= len is checked above when the view is non-empty; an empty view
        // never dereferences its pointer.
        let ptr = unsafe { data.as_mut_ptr().add(offset.min(data.len())) };
        unsafe { Self::from_raw(ptr, shape, strides, name) }
    }

    /// A view of caller memory.
    ///
    /// # Safety
    /// Every element `ptr + sum(idx[k] * strides[k])` must be valid for reads and writes for
    /// `'a`, and nothing else may access it meanwhile.
    pub unsafe fn from_raw(
        ptr: *mut T,
        shape: [usize; N],
        strides: [isize; N],
        name: &str,
    ) -> Result<Self> {
        check_extent(&shape, &strides, name)?;
        if !is_non_overlapping(&shape, &strides) {
            return Err(value_err!(
                "{name}: strides {} for shape {} address some elements twice; in-place writes need every element stored once (pass a contiguous copy)",
                fmt_dims(&strides),
                fmt_dims(&shape)
            ));
        }
        Ok(Self {
            ptr,
            shape,
            strides,
            _marker: PhantomData,
        })
    }

    pub fn shape(&self) -> [usize; N] {
        self.shape
    }

    pub fn strides(&self) -> [isize; N] {
        self.strides
    }

    /// Byte addresses `[lo, hi)` the view can touch, `None` when empty.
    pub(crate) fn address_range(&self) -> Option<(usize, usize)> {
        address_range(
            self.ptr as usize,
            &self.shape,
            &self.strides,
            size_of::<T>(),
        )
    }

    #[inline]
    pub(crate) fn ptr(&self) -> *mut T {
        self.ptr
    }
}

/// A read-only N-d strided view of `T`.
pub struct Strided<'a, T, const N: usize> {
    ptr: *const T,
    shape: [usize; N],
    strides: [isize; N],
    _marker: PhantomData<&'a T>,
}

unsafe impl<T: Sync, const N: usize> Send for Strided<'_, T, N> {}
unsafe impl<T: Sync, const N: usize> Sync for Strided<'_, T, N> {}

impl<'a, T: Float, const N: usize> Strided<'a, T, N> {
    /// A view into `data` starting at element `offset`; errors if it leaves `data`.
    pub fn new(
        data: &'a [T],
        offset: usize,
        shape: [usize; N],
        strides: [isize; N],
        name: &str,
    ) -> Result<Self> {
        check_extent(&shape, &strides, name)?;
        if let Some((lo, hi)) = offset_range(&shape, &strides) {
            let offset = offset as isize;
            if offset + lo < 0 || offset + hi >= data.len() as isize {
                return Err(value_err!(
                    "{name}: shape {} with strides {} at offset {offset} reaches outside a buffer of {} elements",
                    fmt_dims(&shape),
                    fmt_dims(&strides),
                    data.len()
                ));
            }
        }
        let ptr = unsafe { data.as_ptr().add(offset.min(data.len())) };
        Ok(Self {
            ptr,
            shape,
            strides,
            _marker: PhantomData,
        })
    }

    /// A view of caller memory.
    ///
    /// # Safety
    /// Every element the view addresses must be valid for reads for `'a` and not written meanwhile.
    pub unsafe fn from_raw(
        ptr: *const T,
        shape: [usize; N],
        strides: [isize; N],
        name: &str,
    ) -> Result<Self> {
        check_extent(&shape, &strides, name)?;
        Ok(Self {
            ptr,
            shape,
            strides,
            _marker: PhantomData,
        })
    }

    pub fn shape(&self) -> [usize; N] {
        self.shape
    }

    pub fn strides(&self) -> [isize; N] {
        self.strides
    }

    pub(crate) fn address_range(&self) -> Option<(usize, usize)> {
        address_range(
            self.ptr as usize,
            &self.shape,
            &self.strides,
            size_of::<T>(),
        )
    }

    #[inline]
    pub(crate) fn ptr(&self) -> *const T {
        self.ptr
    }
}

fn address_range(
    base: usize,
    shape: &[usize],
    strides: &[isize],
    elem: usize,
) -> Option<(usize, usize)> {
    let (lo, hi) = offset_range(shape, strides)?;
    let lo = base.wrapping_add_signed(lo * elem as isize);
    let hi = base.wrapping_add_signed(hi * elem as isize) + elem;
    Some((lo, hi))
}

/// Refuses views whose memory ranges meet (named as `names[i]`), so that they can be written
/// from different threads. Empty views never conflict.
pub(crate) fn check_disjoint(ranges: &[(Option<(usize, usize)>, String)]) -> Result<()> {
    let mut spans: Vec<(usize, usize, &str)> = ranges
        .iter()
        .filter_map(|(r, name)| r.map(|(lo, hi)| (lo, hi, name.as_str())))
        .collect();
    spans.sort_unstable_by_key(|s| s.0);
    for pair in spans.windows(2) {
        if pair[1].0 < pair[0].1 {
            let (mut a, mut b) = (pair[0].2, pair[1].2);
            // Name them in the caller's order for a stable message.
            let pos = |n: &str| ranges.iter().position(|(_, m)| m == n);
            if pos(a) > pos(b) {
                std::mem::swap(&mut a, &mut b);
            }
            return Err(value_err!(
                "{a} and {b} share memory: every tensor written in one call must be separate (pass copies)"
            ));
        }
    }
    Ok(())
}

/// A row (the last dimension) in caller memory: pointer, length, element stride.
pub(crate) struct Row<T> {
    pub ptr: *mut T,
    pub len: usize,
    pub stride: isize,
}
impl<T> Clone for Row<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Row<T> {}

impl<T: Float> Row<T> {
    /// The first `out.len()` elements as f32.
    #[inline]
    unsafe fn load(self, out: &mut [f32]) {
        if self.stride == 1 {
            load_f32(std::slice::from_raw_parts(self.ptr, out.len()), out);
        } else {
            for (i, o) in out.iter_mut().enumerate() {
                *o = (*self.ptr.offset(i as isize * self.stride)).to_f32();
            }
        }
    }

    /// Writes `values` to the first `values.len()` elements.
    #[inline]
    unsafe fn store(self, values: &[f32]) {
        if self.stride == 1 {
            store_f32(
                values,
                std::slice::from_raw_parts_mut(self.ptr, values.len()),
            );
        } else {
            for (i, &v) in values.iter().enumerate() {
                *self.ptr.offset(i as isize * self.stride) = T::from_f32(v);
            }
        }
    }

    /// The row past its first `skip` elements.
    #[inline]
    unsafe fn skip(self, skip: usize) -> Self {
        Row {
            ptr: self.ptr.offset(skip as isize * self.stride),
            len: self.len - skip,
            stride: self.stride,
        }
    }
}

/// f16 / bf16 rows convert through f32 with slice conversions that vectorise (F16C for f16 via
/// `half`, bit shifts for bf16), not element by element.
#[inline]
fn load_f32<T: Float>(src: &[T], out: &mut [f32]) {
    match T::DTYPE {
        DType::F16 => {
            // SAFETY: T is f16 (checked by DTYPE).
            let src = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f16, src.len()) };
            src.convert_to_f32_slice(out);
        }
        DType::BF16 => {
            // SAFETY: T is bf16, a u16 bit pattern.
            let src = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u16, src.len()) };
            for (o, &bits) in out.iter_mut().zip(src) {
                *o = f32::from_bits((bits as u32) << 16);
            }
        }
        _ => {
            for (o, s) in out.iter_mut().zip(src) {
                *o = s.to_f32();
            }
        }
    }
}

#[inline]
fn store_f32<T: Float>(values: &[f32], out: &mut [T]) {
    match T::DTYPE {
        DType::F16 => {
            // SAFETY: T is f16 (checked by DTYPE).
            let out =
                unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f16, out.len()) };
            out.convert_from_f32_slice(values);
        }
        DType::BF16 => {
            // SAFETY: T is bf16, a u16 bit pattern.
            let out =
                unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u16, out.len()) };
            for (o, &v) in out.iter_mut().zip(values) {
                *o = bf16_bits(v);
            }
        }
        _ => {
            for (o, &v) in out.iter_mut().zip(values) {
                *o = T::from_f32(v);
            }
        }
    }
}

/// Rotates `row` in place by the table row `(cos, sin)`.
///
/// # Safety
/// The row's elements are valid and only this thread touches them.
#[inline]
pub(crate) unsafe fn rotate_row<T: Float>(
    row: Row<T>,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
    scratch: &mut Vec<f32>,
) {
    let rot = 2 * cos.len();
    if row.stride == 1 {
        // SAFETY (of the casts): T is the type DTYPE names.
        match T::DTYPE {
            DType::F32 => {
                let row = std::slice::from_raw_parts_mut(row.ptr as *mut f32, rot);
                return rotate_in_place(row, cos, sin, interleaved);
            }
            DType::BF16 => {
                let row = std::slice::from_raw_parts_mut(row.ptr as *mut u16, rot);
                return rotate_in_place(row, cos, sin, interleaved);
            }
            _ => {}
        }
    }
    scratch.resize(rot, 0.0);
    row.load(scratch);
    rotate_in_place(scratch, cos, sin, interleaved);
    row.store(scratch);
}

/// Writes `src` rotated to `dst` (a different row of the same length).
///
/// # Safety
/// Both rows are valid, they do not share memory, and only this thread writes `dst`.
#[inline]
pub(crate) unsafe fn rotate_row_into<T: Float>(
    src: Row<T>,
    dst: Row<T>,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
    scratch: &mut Vec<f32>,
) {
    if src.stride == 1 && dst.stride == 1 {
        // SAFETY (of the casts): T is the type DTYPE names.
        match T::DTYPE {
            DType::F32 => {
                let s = std::slice::from_raw_parts(src.ptr as *const f32, src.len);
                let d = std::slice::from_raw_parts_mut(dst.ptr as *mut f32, dst.len);
                return rotate_into(s, d, cos, sin, interleaved);
            }
            DType::BF16 => {
                let s = std::slice::from_raw_parts(src.ptr as *const u16, src.len);
                let d = std::slice::from_raw_parts_mut(dst.ptr as *mut u16, dst.len);
                return rotate_into(s, d, cos, sin, interleaved);
            }
            _ => {}
        }
    }
    let rot = 2 * cos.len();
    scratch.resize(rot, 0.0);
    src.load(scratch);
    rotate_in_place(scratch, cos, sin, interleaved);
    dst.store(scratch);
    copy_row(src.skip(rot), dst.skip(rot));
}

/// Copies `src` to `dst` (rows of the same length that do not share memory).
///
/// # Safety
/// As for [`rotate_row_into`].
#[inline]
pub(crate) unsafe fn copy_row<T: Float>(src: Row<T>, dst: Row<T>) {
    if src.stride == 1 && dst.stride == 1 {
        std::ptr::copy_nonoverlapping(src.ptr, dst.ptr, src.len);
    } else {
        for i in 0..src.len as isize {
            *dst.ptr.offset(i * dst.stride) = *src.ptr.offset(i * src.stride);
        }
    }
}

/// `*mut T` that may cross threads; the kernels guarantee that threads touch disjoint elements.
pub(crate) struct SendPtr<T>(pub *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn bf16_rounding_matches_half() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
        ];
        let sampled = (0..u32::MAX / 7919).map(|i| f32::from_bits(i.wrapping_mul(7919)));
        // Ties: exactly halfway between two bf16 values, with even and odd lower neighbours.
        let ties = (0..1000u32).map(|i| f32::from_bits(0x3f80_8000 + (i << 16)));
        for v in specials.into_iter().chain(sampled).chain(ties) {
            let want = bf16::from_f32(v);
            let got = bf16::from_bits(bf16_bits(v));
            if want.is_nan() {
                assert!(got.is_nan(), "{v:e}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{v:e} ({:#x})", v.to_bits());
            }
        }
    }

    #[test]
    fn row_conversions_round_trip() {
        let values: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        let mut halves = vec![f16::ZERO; values.len()];
        store_f32(&values, &mut halves);
        let mut back = vec![0f32; values.len()];
        load_f32(&halves, &mut back);
        for ((h, v), b) in halves.iter().zip(&values).zip(&back) {
            assert_eq!(h.to_bits(), f16::from_f32(*v).to_bits());
            assert_eq!(*b, h.to_f32());
        }
    }
}
