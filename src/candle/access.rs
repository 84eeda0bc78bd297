//! Reaching the CPU memory behind candle tensors, with the layout candle gives them.
//!
//! candle tensors share an `Arc<RwLock<Storage>>`; a view (`narrow`, `transpose`, `i(..)`) is a
//! [`Layout`] (start offset and strides in elements) over the same storage. Reads go through
//! `Tensor::storage_and_layout` (a read lock). Writes go through candle's own in-place hook,
//! [`InplaceOp1`], the only public way to get `&mut CpuStorage`: one write lock per distinct
//! storage, taken by nesting the ops, so that an operation over many layers holds every lock at
//! once and checks everything before it writes anything. Tensors that share a storage (keys and
//! values narrowed out of one buffer, say) are reached through one lock, since candle's locks
//! are not re-entrant.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType as CandleDType, InplaceOp1, Layout, Storage, Tensor};

use super::{candle_err, Result};
use crate::dtype::DType;
use crate::tensor::{Device, TensorView};

/// One tensor handed to [`with_cpu`]: its argument name and whether it is written.
pub(crate) struct Operand<'t> {
    pub tensor: &'t Tensor,
    pub name: String,
    pub write: bool,
}

impl<'t> Operand<'t> {
    pub fn read(tensor: &'t Tensor, name: impl Into<String>) -> Self {
        Operand {
            tensor,
            name: name.into(),
            write: false,
        }
    }
}

/// An operand's memory while its lock is held: element `[0, ..., 0]`, dims and strides in
/// elements, the candle dtype.
pub(crate) struct Locked {
    pub name: String,
    pub ptr: *mut u8,
    pub dtype: CandleDType,
    pub dims: Vec<usize>,
    pub strides: Vec<isize>,
    pub write: bool,
}

impl Locked {
    /// The core's dtype (f32, f16, bf16, f64, i32, i64); `None` for candle's other dtypes.
    pub fn core_dtype(&self) -> Option<DType> {
        core_dtype(self.dtype)
    }

    /// The float dtype, or an error naming the operand.
    pub fn float_dtype(&self) -> Result<DType> {
        match self.core_dtype() {
            Some(d) if d.is_float() => Ok(d),
            _ => Err(candle_err(crate::type_err!(
                "{}: expected dtype f32, f16, bf16 or f64, got {:?}",
                self.name,
                self.dtype
            ))),
        }
    }

    /// A core [`TensorView`] of the memory (readable; writable when the operand is written).
    pub fn view(&self) -> Result<TensorView<'_>> {
        let dtype = self.core_dtype().ok_or_else(|| {
            candle_err(crate::type_err!(
                "{}: dtype {:?} is not supported here",
                self.name,
                self.dtype
            ))
        })?;
        // SAFETY: `ptr`, dims and strides describe memory of this dtype that the held lock
        // keeps alive (and exclusive when `write`) for as long as `self` is borrowed.
        Ok(unsafe {
            TensorView::from_raw_parts(
                self.name.clone(),
                self.ptr,
                dtype,
                self.dims.clone(),
                self.strides.clone(),
                Device::Cpu,
                !self.write,
                self.write,
            )
        })
    }

    /// Dims and strides as fixed-size arrays, after checking the rank (error names the operand).
    pub fn fixed<const N: usize>(&self, layout: &str) -> Result<([usize; N], [isize; N])> {
        let dims: [usize; N] = self.dims.as_slice().try_into().map_err(|_| {
            candle_err(crate::value_err!(
                "{}: expected a {N}-D tensor {layout}, got shape {}",
                self.name,
                crate::tensor::tuple_str(&self.dims)
            ))
        })?;
        let strides: [isize; N] = self
            .strides
            .as_slice()
            .try_into()
            .expect("same rank as dims");
        Ok((dims, strides))
    }

    /// Refuses an operand whose dtype differs from `expected` (the first operand's, `of`).
    pub fn expect_dtype(&self, expected: DType, of: &str) -> Result<()> {
        if self.core_dtype() != Some(expected) {
            return Err(candle_err(crate::type_err!(
                "{}: expected dtype {:?} (the dtype of {of}), got {:?}",
                self.name,
                candle_dtype(expected),
                self.dtype
            )));
        }
        Ok(())
    }
}

pub(crate) fn core_dtype(dtype: CandleDType) -> Option<DType> {
    match dtype {
        CandleDType::F32 => Some(DType::F32),
        CandleDType::F16 => Some(DType::F16),
        CandleDType::BF16 => Some(DType::BF16),
        CandleDType::F64 => Some(DType::F64),
        CandleDType::I32 => Some(DType::I32),
        CandleDType::I64 => Some(DType::I64),
        _ => None,
    }
}

pub(crate) fn candle_dtype(dtype: DType) -> CandleDType {
    match dtype {
        DType::F32 => CandleDType::F32,
        DType::F16 => CandleDType::F16,
        DType::BF16 => CandleDType::BF16,
        DType::F64 => CandleDType::F64,
        DType::I32 => CandleDType::I32,
        DType::I64 => CandleDType::I64,
    }
}

/// Refuses anything but CPU storage, naming the argument.
pub(crate) fn expect_cpu(tensor: &Tensor, name: &str) -> Result<()> {
    let device = tensor.device();
    if device.is_cuda() {
        // The kernels of src/cuda run on PyTorch's stream through DLPack; driving them on
        // candle's stream needs candle's `cuda` feature, which needs the CUDA toolkit to build.
        return Err(candle_err(crate::value_err!(
            "tvc-rs candle API: CUDA storage is not supported yet; {name} is on {:?}. \
             Move it to the CPU (tensor.to_device(&Device::Cpu)) or use the Python API for CUDA tensors",
            device.location()
        )));
    }
    if !device.is_cpu() {
        return Err(candle_err(crate::value_err!(
            "tvc-rs candle API: {name} is on {:?}; only CPU storage is supported",
            device.location()
        )));
    }
    Ok(())
}

/// Start address of a CPU storage's buffer.
fn cpu_buffer(storage: &CpuStorage) -> *const u8 {
    match storage {
        CpuStorage::U8(v) => v.as_ptr(),
        CpuStorage::U32(v) => v.as_ptr().cast(),
        CpuStorage::I16(v) => v.as_ptr().cast(),
        CpuStorage::I32(v) => v.as_ptr().cast(),
        CpuStorage::I64(v) => v.as_ptr().cast(),
        CpuStorage::BF16(v) => v.as_ptr().cast(),
        CpuStorage::F16(v) => v.as_ptr().cast(),
        CpuStorage::F32(v) => v.as_ptr().cast(),
        CpuStorage::F64(v) => v.as_ptr().cast(),
        CpuStorage::F8E4M3(v) => v.as_ptr().cast(),
        CpuStorage::F6E2M3(v)
        | CpuStorage::F6E3M2(v)
        | CpuStorage::F4(v)
        | CpuStorage::F8E8M0(v) => v.as_ptr(),
    }
}

fn cpu_buffer_mut(storage: &mut CpuStorage) -> *mut u8 {
    match storage {
        CpuStorage::U8(v) => v.as_mut_ptr(),
        CpuStorage::U32(v) => v.as_mut_ptr().cast(),
        CpuStorage::I16(v) => v.as_mut_ptr().cast(),
        CpuStorage::I32(v) => v.as_mut_ptr().cast(),
        CpuStorage::I64(v) => v.as_mut_ptr().cast(),
        CpuStorage::BF16(v) => v.as_mut_ptr().cast(),
        CpuStorage::F16(v) => v.as_mut_ptr().cast(),
        CpuStorage::F32(v) => v.as_mut_ptr().cast(),
        CpuStorage::F64(v) => v.as_mut_ptr().cast(),
        CpuStorage::F8E4M3(v) => v.as_mut_ptr().cast(),
        CpuStorage::F6E2M3(v)
        | CpuStorage::F6E3M2(v)
        | CpuStorage::F4(v)
        | CpuStorage::F8E8M0(v) => v.as_mut_ptr(),
    }
}

/// The address identifying a tensor's storage (its buffer), read under a short read lock.
fn buffer_address(tensor: &Tensor) -> usize {
    let (storage, _) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => cpu_buffer(cpu) as usize,
        _ => unreachable!("expect_cpu ran first"),
    }
}

/// A storage to lock: through this tensor, for writing or for reading.
struct Lock<'t> {
    tensor: &'t Tensor,
    write: bool,
}

/// Takes the lock of each storage in `locks` (nested, in the given order), collecting their
/// buffers' base addresses, and runs `body` with all of them held.
fn lock_all(
    locks: &[Lock<'_>],
    bases: &mut Vec<*mut u8>,
    body: &mut dyn FnMut(&[*mut u8]) -> Result<()>,
) -> Result<()> {
    match locks.split_first() {
        None => body(bases),
        Some((first, rest)) if first.write => first.tensor.inplace_op1(&LockNext {
            rest,
            bases: RefCell::new(bases),
            body: RefCell::new(body),
        }),
        Some((first, rest)) => {
            let (guard, _) = first.tensor.storage_and_layout();
            let base = match &*guard {
                Storage::Cpu(cpu) => cpu_buffer(cpu) as *mut u8,
                _ => unreachable!("expect_cpu ran first"),
            };
            bases.push(base);
            lock_all(rest, bases, body)
        }
    }
}

struct LockNext<'a, 'b> {
    rest: &'a [Lock<'a>],
    bases: RefCell<&'b mut Vec<*mut u8>>,
    body: RefCell<&'b mut dyn FnMut(&[*mut u8]) -> Result<()>>,
}

impl InplaceOp1 for LockNext<'_, '_> {
    fn name(&self) -> &'static str {
        "tvc-rs"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        let mut bases = self.bases.borrow_mut();
        bases.push(cpu_buffer_mut(storage));
        let mut body = self.body.borrow_mut();
        lock_all(self.rest, &mut bases, &mut **body)
    }
}

/// Runs `body` with the CPU memory of every operand (in the order given), write operands
/// locked for writing, the others for reading. Checks first that every tensor is on the CPU
/// and that no written tensor addresses an element twice (a broadcast view).
pub(crate) fn with_cpu<R>(
    operands: &[Operand<'_>],
    body: impl FnOnce(&[Locked]) -> Result<R>,
) -> Result<R> {
    for op in operands {
        expect_cpu(op.tensor, &op.name)?;
        if op.write && op.tensor.elem_count() > 0 && op.tensor.layout().has_internal_overlap() {
            return Err(candle_err(crate::value_err!(
                "{}: strides {:?} for shape {:?} address some elements twice (a broadcast view); \
                 in-place writes need every element stored once (pass a contiguous copy)",
                op.name,
                op.tensor.stride(),
                op.tensor.dims()
            )));
        }
    }
    // Group the operands by storage buffer; a group is locked for writing when any member is
    // written. Groups are locked in address order so that two calls cannot wait on each other.
    let addresses: Vec<usize> = operands
        .iter()
        .map(|op| buffer_address(op.tensor))
        .collect();
    let mut groups: Vec<usize> = addresses.clone();
    groups.sort_unstable();
    groups.dedup();
    let group_of: Vec<usize> = addresses
        .iter()
        .map(|a| groups.binary_search(a).expect("address listed"))
        .collect();
    let mut writer_of_group: Vec<Option<&Tensor>> = vec![None; groups.len()];
    let mut reader_of_group: Vec<Option<&Tensor>> = vec![None; groups.len()];
    for (op, &g) in operands.iter().zip(&group_of) {
        // An empty tensor is never written: a read lock does (and candle's write path refuses
        // the zero strides it gives empty tensors).
        if op.write && op.tensor.elem_count() > 0 {
            writer_of_group[g].get_or_insert(op.tensor);
        } else {
            reader_of_group[g].get_or_insert(op.tensor);
        }
    }
    // One lock per storage, all taken in address order (as candle orders its own) so that two
    // calls cannot wait on each other.
    let locks: Vec<Lock<'_>> = (0..groups.len())
        .map(|g| match writer_of_group[g] {
            Some(tensor) => Lock {
                tensor,
                write: true,
            },
            None => Lock {
                tensor: reader_of_group[g].expect("every group has a member"),
                write: false,
            },
        })
        .collect();

    let mut body = Some(body);
    let mut result = None;
    let mut run = |bases: &[*mut u8]| -> Result<()> {
        for (base, &address) in bases.iter().zip(&groups) {
            debug_assert_eq!(*base as usize, address, "a storage moved between two locks");
        }
        let locked: Vec<Locked> = operands
            .iter()
            .zip(&group_of)
            .map(|(op, &g)| {
                let layout = op.tensor.layout();
                let elem = op.tensor.dtype().size_in_bytes();
                Locked {
                    name: op.name.clone(),
                    // In bounds: candle keeps every layout inside its storage.
                    ptr: bases[g].wrapping_add(layout.start_offset() * elem),
                    dtype: op.tensor.dtype(),
                    dims: layout.dims().to_vec(),
                    strides: layout.stride().iter().map(|&s| s as isize).collect(),
                    write: op.write,
                }
            })
            .collect();
        let body = body.take().expect("run once");
        result = Some(body(&locked)?);
        Ok(())
    };
    lock_all(&locks, &mut Vec::with_capacity(locks.len()), &mut run)?;
    Ok(result.expect("the body ran"))
}
