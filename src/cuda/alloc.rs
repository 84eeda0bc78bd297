//! Memory for results computed on a GPU.
//!
//! The operations of [`crate::compress`] take tensor views on any device and route by device;
//! results on a CUDA device go into tensors the *caller* allocates, through a [`DeviceAlloc`]:
//! PyTorch's caching allocator in the Python bindings (so results are torch tensors ordered on
//! PyTorch's stream), [`DriverAlloc`] (plain `cuMemAlloc`, [`DeviceTensor`]s) for Rust users,
//! [`HostOnly`] for callers with CPU tensors only. An operation whose output size depends on the
//! data (mass selection) allocates once it knows it, or narrows a larger workspace.

use std::sync::Arc;

use super::driver::{device, Device, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{contiguous_strides, Element, OwnedTensor, TensorView};

/// Where the CUDA results of an operation are allocated, and the stream it runs on.
pub trait DeviceAlloc {
    /// The caller's handle of one result (a torch tensor, a [`DeviceTensor`]).
    type Tensor;
    /// The CUDA device the allocator serves.
    fn ordinal(&self) -> i32;
    /// The stream every launch and copy is queued on.
    fn stream(&self) -> Stream;
    /// A new row-major tensor on the device (contents undefined).
    fn empty(&self, shape: &[usize], dtype: DType) -> Result<Self::Tensor>;
    /// The tensor's view (for the launchers), writable.
    fn view<'t>(&self, tensor: &'t Self::Tensor) -> TensorView<'t>;
    /// The tensor's first `len` entries along its first axis (no copy).
    fn narrow(&self, tensor: Self::Tensor, len: usize) -> Result<Self::Tensor>;
    /// Runs the CPU kernels of an operation on CPU tensors (the Python bindings release the
    /// GIL here).
    fn cpu_work<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        work()
    }
}

/// A result of an operation: on the host for CPU inputs, on the device for CUDA ones.
#[derive(Debug)]
pub enum Output<T> {
    Host(OwnedTensor),
    Device(T),
}

impl<T> Output<T> {
    /// The host result (`None` for a device one).
    pub fn host(self) -> Option<OwnedTensor> {
        match self {
            Output::Host(tensor) => Some(tensor),
            Output::Device(_) => None,
        }
    }

    /// The device result (`None` for a host one).
    pub fn device(self) -> Option<T> {
        match self {
            Output::Device(tensor) => Some(tensor),
            Output::Host(_) => None,
        }
    }
}

/// For callers whose tensors are all on the CPU: no device memory to give.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostOnly;

impl DeviceAlloc for HostOnly {
    type Tensor = std::convert::Infallible;

    fn ordinal(&self) -> i32 {
        -1
    }
    fn stream(&self) -> Stream {
        Stream(0)
    }
    fn empty(&self, _shape: &[usize], _dtype: DType) -> Result<Self::Tensor> {
        Err(Error::Runtime(
            "CUDA tensors need a device allocator (tvc_rs::cuda::alloc::DriverAlloc), not HostOnly"
                .into(),
        ))
    }
    fn view<'t>(&self, tensor: &'t Self::Tensor) -> TensorView<'t> {
        match *tensor {}
    }
    fn narrow(&self, tensor: Self::Tensor, _len: usize) -> Result<Self::Tensor> {
        match tensor {}
    }
}

/// One `cuMemAlloc` allocation, freed when the last tensor using it goes.
struct Allocation {
    device: Arc<Device>,
    ptr: u64,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: allocated by `Device::alloc` of this device; no tensor uses it any more.
        // A failure here (a dead context) leaves nothing to free.
        let _ = unsafe { self.device.free(self.ptr) };
    }
}

/// A row-major tensor in device memory allocated by [`DriverAlloc`].
#[derive(Clone)]
pub struct DeviceTensor {
    memory: Arc<Allocation>,
    dtype: DType,
    shape: Vec<usize>,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceTensor({} {:?} on cuda:{})",
            self.dtype, self.shape, self.memory.device.ordinal
        )
    }
}

impl DeviceTensor {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// A read-only view named `name` (to pass the tensor to an operation).
    pub fn view(&self, name: &str) -> TensorView<'_> {
        self.raw_view(name, false)
    }

    fn raw_view(&self, name: &str, writable: bool) -> TensorView<'_> {
        // SAFETY: the allocation holds the row-major elements of `shape` and lives as long as
        // `self`; only the allocator's outputs are writable.
        unsafe {
            TensorView::from_raw_parts(
                name,
                self.memory.ptr as *mut u8,
                self.dtype,
                self.shape.clone(),
                contiguous_strides(&self.shape),
                crate::tensor::Device::Cuda(self.memory.device.ordinal),
                false,
                writable,
            )
        }
    }

    /// A copy on the host, after the work queued on `stream` (a synchronisation).
    pub fn to_host(&self, stream: Stream) -> Result<OwnedTensor> {
        crate::dispatch_dtype!(self.dtype, T => self.read::<T>(stream))
    }

    fn read<T: Element>(&self, stream: Stream) -> Result<OwnedTensor> {
        let n: usize = self.shape.iter().product();
        let mut values: Vec<T> = Vec::with_capacity(n);
        // SAFETY: `n` elements of T (plain numbers: every bit pattern is a value) are copied
        // into the spare capacity before the length is set.
        unsafe {
            let bytes = std::slice::from_raw_parts_mut(
                values.as_mut_ptr() as *mut u8,
                n * std::mem::size_of::<T>(),
            );
            self.memory
                .device
                .copy_to_host(bytes, self.memory.ptr, stream)?;
            values.set_len(n);
        }
        OwnedTensor::new(values, self.shape.clone())
    }
}

/// Device memory straight from the driver, on one device and stream: for Rust users of the
/// CUDA path (and its tests).
pub struct DriverAlloc {
    device: Arc<Device>,
    stream: Stream,
}

impl DriverAlloc {
    /// `cuda:<ordinal>`, working on `stream` (`Stream(0)`: the legacy default stream). Fails
    /// with the reason where there is no driver or no such device.
    pub fn new(ordinal: i32, stream: Stream) -> Result<Self> {
        Ok(DriverAlloc {
            device: device(ordinal)?,
            stream,
        })
    }

    /// A device copy of `data` (row-major `shape`), queued on the stream.
    pub fn upload<T: Element>(&self, data: &[T], shape: &[usize]) -> Result<DeviceTensor> {
        // Checks that `data` has the shape's element count.
        TensorView::from_slice("data", data, shape)?;
        let tensor = self.empty(shape, T::DTYPE)?;
        // SAFETY: plain numbers, read as bytes; the allocation holds them all.
        unsafe {
            let bytes =
                std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data));
            self.device
                .copy_to_device(tensor.memory.ptr, bytes, self.stream)?;
        }
        Ok(tensor)
    }
}

impl DeviceAlloc for DriverAlloc {
    type Tensor = DeviceTensor;

    fn ordinal(&self) -> i32 {
        self.device.ordinal
    }
    fn stream(&self) -> Stream {
        self.stream
    }
    fn empty(&self, shape: &[usize], dtype: DType) -> Result<DeviceTensor> {
        let bytes = crate::error::checked_size(shape, "output")?
            .checked_mul(dtype.size_bytes())
            .ok_or_else(|| Error::Runtime("output: too large".into()))?;
        let ptr = self.device.alloc(bytes)?;
        Ok(DeviceTensor {
            memory: Arc::new(Allocation {
                device: self.device.clone(),
                ptr,
            }),
            dtype,
            shape: shape.to_vec(),
        })
    }
    fn view<'t>(&self, tensor: &'t DeviceTensor) -> TensorView<'t> {
        tensor.raw_view("output", true)
    }
    fn narrow(&self, mut tensor: DeviceTensor, len: usize) -> Result<DeviceTensor> {
        if tensor.shape.first().is_none_or(|&n| len > n) {
            return Err(Error::Runtime(format!(
                "internal error: cannot narrow {tensor:?} to {len}"
            )));
        }
        tensor.shape[0] = len;
        Ok(tensor)
    }
}
