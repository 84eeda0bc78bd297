//! Strided views of caller memory (NumPy / PyTorch / DLPack tensors, vLLM cache views) and the
//! row primitives the kernels share. Strides are in elements and may be negative.
//!
//! A mutable view never addresses one element twice (checked when it is made), so different
//! index tuples are different memory and threads may write different rows at the same time.

use std::marker::PhantomData;

use crate::dtype::Float;
use crate::error::Result;
use crate::value_err;

use super::rope::{rotate_in_place, rotate_into};

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
    #[inline]
    unsafe fn load(self, buf: &mut Vec<T>) {
        buf.clear();
        buf.extend((0..self.len).map(|i| *self.ptr.offset(i as isize * self.stride)));
    }

    #[inline]
    unsafe fn store(self, buf: &[T]) {
        for (i, &v) in buf.iter().enumerate() {
            *self.ptr.offset(i as isize * self.stride) = v;
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
    scratch: &mut Vec<T>,
) {
    if row.stride == 1 {
        rotate_in_place(
            std::slice::from_raw_parts_mut(row.ptr, row.len),
            cos,
            sin,
            interleaved,
        );
    } else {
        row.load(scratch);
        rotate_in_place(scratch, cos, sin, interleaved);
        row.store(scratch);
    }
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
    scratch: &mut Vec<T>,
) {
    if src.stride == 1 && dst.stride == 1 {
        rotate_into(
            std::slice::from_raw_parts(src.ptr, src.len),
            std::slice::from_raw_parts_mut(dst.ptr, dst.len),
            cos,
            sin,
            interleaved,
        );
    } else {
        src.load(scratch);
        rotate_in_place(scratch, cos, sin, interleaved);
        dst.store(scratch);
    }
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
