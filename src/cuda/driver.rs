//! The CUDA driver through cudarc (dynamic loading, CUDA 13.0 bindings): devices, their primary
//! contexts (the ones PyTorch uses, so its pointers are valid here), kernel modules compiled on
//! first use, launches on the caller's stream, small host <-> device copies.
//!
//! cudarc panics when libcuda cannot be loaded or a symbol is missing; the presence of the
//! library is checked first, and every first contact with the driver runs under
//! `catch_unwind`, so that a machine without a driver gets an error, never a panic.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result as cu;
use cudarc::driver::sys;

use super::cache::{self, Origin};
use super::sources::KernelFile;
use crate::error::{Error, Result};

/// A CUDA stream handle as PyTorch gives it (`torch.cuda.current_stream().cuda_stream`); 0 is
/// the legacy default stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stream(pub usize);

impl Stream {
    fn raw(self) -> sys::CUstream {
        self.0 as sys::CUstream
    }
}

fn driver_error(what: &str, err: cu::DriverError) -> Error {
    let name = err
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", err.0));
    let text = err
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::Runtime(format!("CUDA error in {what}: {name} ({text})"))
}

/// Runs a first contact with the driver, turning a cudarc panic into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Runtime(format!(
                "CUDA driver failure in {what}: {msg}"
            )))
        }
    }
}

static DRIVER: OnceLock<std::result::Result<i32, String>> = OnceLock::new();

/// Loads and initialises the driver once; returns its CUDA version (e.g. 13000).
pub fn driver_version() -> Result<i32> {
    DRIVER
        .get_or_init(|| {
            // SAFETY: only tries to dlopen the driver's library names.
            let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
            if !present {
                return Err("no CUDA driver: libcuda.so.1 could not be loaded (no NVIDIA driver on this machine); \
                            CUDA tensors need an NVIDIA GPU and its driver"
                    .to_string());
            }
            guarded("cuInit", || {
                cu::init().map_err(|e| driver_error("cuInit", e))?;
                let mut version = 0;
                // SAFETY: out-parameter.
                unsafe { sys::cuDriverGetVersion(&mut version) }.result().map_err(|e| driver_error("cuDriverGetVersion", e))?;
                Ok(version)
            })
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(Error::Runtime)
}

/// Number of CUDA devices (0 without a driver).
pub fn device_count() -> usize {
    driver_version()
        .and_then(|_| {
            guarded("cuDeviceGetCount", || {
                cu::device::get_count().map_err(|e| driver_error("cuDeviceGetCount", e))
            })
        })
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

/// A compiled kernel function.
#[derive(Debug, Clone, Copy)]
pub struct Function(sys::CUfunction);
// SAFETY: CUfunction handles may be used from any thread (the context is made current first).
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

struct Module {
    module: sys::CUmodule,
    functions: Mutex<HashMap<String, Function>>,
}
// SAFETY: as for Function; the map is behind a mutex.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

/// One GPU: its primary context, architecture and loaded modules.
pub struct Device {
    pub ordinal: i32,
    ctx: sys::CUcontext,
    /// Compute capability, e.g. (9, 0).
    pub capability: (i32, i32),
    pub name: String,
    pub multiprocessors: i32,
    /// Largest dynamic shared memory a block may opt into, in bytes.
    pub max_shared_optin: i32,
    modules: Mutex<HashMap<KernelFile, Arc<Module>>>,
}
// SAFETY: the context handle is process-wide; the module map is behind a mutex.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

static DEVICES: Mutex<Vec<Option<Arc<Device>>>> = Mutex::new(Vec::new());

/// The device `cuda:<ordinal>`, set up on first use.
pub fn device(ordinal: i32) -> Result<Arc<Device>> {
    driver_version()?;
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(Some(device)) = devices.get(ordinal.max(0) as usize) {
        return Ok(device.clone());
    }
    let count = device_count();
    if ordinal < 0 || ordinal as usize >= count {
        return Err(Error::Runtime(format!(
            "cuda:{ordinal} does not exist: the driver sees {count} CUDA device(s)"
        )));
    }
    let device = guarded("device setup", || {
        let cu_device = cu::device::get(ordinal).map_err(|e| driver_error("cuDeviceGet", e))?;
        // SAFETY: a valid device; the primary context is retained for the process's lifetime.
        let ctx = unsafe { cu::primary_ctx::retain(cu_device) }
            .map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
        let attr = |a| {
            unsafe { cu::device::get_attribute(cu_device, a) }
                .map_err(|e| driver_error("cuDeviceGetAttribute", e))
        };
        use sys::CUdevice_attribute_enum as A;
        Ok(Device {
            ordinal,
            ctx,
            capability: (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            name: cu::device::get_name(cu_device).unwrap_or_else(|_| "CUDA device".into()),
            multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            max_shared_optin: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
            modules: Mutex::new(HashMap::new()),
        })
    })?;
    let device = Arc::new(device);
    if devices.len() <= ordinal as usize {
        devices.resize(ordinal as usize + 1, None);
    }
    devices[ordinal as usize] = Some(device.clone());
    Ok(device)
}

/// The architecture to compile for on a device of compute capability `capability`, among the
/// ones NVRTC supports: the device's own, else the highest of the same major version below it
/// (CUBINs run on later minor versions of their major).
pub fn pick_arch(capability: (i32, i32), supported: &[i32]) -> Result<u32> {
    let own = capability.0 * 10 + capability.1;
    if supported.is_empty() || supported.contains(&own) {
        return Ok(own as u32);
    }
    supported
        .iter()
        .copied()
        .filter(|&a| a / 10 == capability.0 && a <= own)
        .max()
        .map(|a| a as u32)
        .ok_or_else(|| {
            Error::Runtime(format!(
                "this NVRTC cannot compile for compute capability {}.{} (it supports sm_{}); install a matching nvidia-cuda-nvrtc",
                capability.0,
                capability.1,
                supported.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", sm_")
            ))
        })
}

impl Device {
    /// Makes the device's primary context current on this thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: a retained primary context.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| driver_error("cuCtxSetCurrent", e))
    }

    fn module(&self, file: KernelFile) -> Result<Arc<Module>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(module) = modules.get(&file) {
            return Ok(module.clone());
        }
        self.bind()?;
        let arch = pick_arch(self.capability, &super::nvrtc::nvrtc()?.archs)?;
        let load = |image: &[u8]| -> Result<sys::CUmodule> {
            // SAFETY: a CUBIN image; the driver validates it.
            unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }
                .map_err(|e| driver_error("cuModuleLoadData", e))
        };
        let (image, origin, _) = cache::cubin(file, arch, false)?;
        let module = match load(&image) {
            Ok(module) => module,
            // A damaged cache entry: compile again and overwrite it.
            Err(_) if origin == Origin::Cache => load(&cache::cubin(file, arch, true)?.0)?,
            Err(err) => return Err(err),
        };
        let module = Arc::new(Module {
            module,
            functions: Mutex::new(HashMap::new()),
        });
        modules.insert(file, module.clone());
        Ok(module)
    }

    /// Kernel `name` of `file` (compiled and loaded on first use).
    pub fn function(&self, file: KernelFile, name: &str) -> Result<Function> {
        let module = self.module(file)?;
        let mut functions = module.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(name) {
            return Ok(*f);
        }
        let c_name =
            CString::new(name).map_err(|_| Error::Runtime(format!("bad kernel name {name}")))?;
        // SAFETY: a loaded module.
        let f = unsafe { cu::module::get_function(module.module, c_name) }
            .map_err(|e| driver_error(&format!("cuModuleGetFunction({name})"), e))?;
        functions.insert(name.to_string(), Function(f));
        Ok(Function(f))
    }

    /// Launches `f` with its single by-value argument struct `args` on `stream`.
    ///
    /// # Safety
    /// `args` must be the kernel's argument struct (the same layout as in the .cu file) and
    /// every device pointer in it valid for what the kernel does with it until the kernel ends.
    pub unsafe fn launch<A>(
        &self,
        f: Function,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        stream: Stream,
        args: &A,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        self.bind()?;
        if shared > 48 * 1024 {
            cu::function::set_function_attribute(
                f.0,
                sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared as i32,
            )
            .map_err(|e| driver_error("cuFuncSetAttribute", e))?;
        }
        let mut params = [args as *const A as *mut c_void];
        cu::launch_kernel(f.0, grid, (block, 1, 1), shared, stream.raw(), &mut params)
            .map_err(|e| driver_error("cuLaunchKernel", e))
    }

    /// Copies host bytes to device memory, ordered on `stream`. From pageable memory the
    /// driver stages the bytes before returning, so `src` may be dropped afterwards.
    ///
    /// # Safety
    /// `dst` must be device memory of at least `src.len()` bytes.
    pub unsafe fn copy_to_device(&self, dst: u64, src: &[u8], stream: Stream) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        cu::memcpy_htod_async(dst, src, stream.raw())
            .map_err(|e| driver_error("cuMemcpyHtoDAsync", e))
    }

    /// Copies device bytes to the host and waits for them: a synchronisation of `stream`.
    ///
    /// # Safety
    /// `src` must be device memory of at least `dst.len()` bytes.
    pub unsafe fn copy_to_host(&self, dst: &mut [u8], src: u64, stream: Stream) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        cu::memcpy_dtoh_async(dst, src, stream.raw())
            .map_err(|e| driver_error("cuMemcpyDtoHAsync", e))?;
        cu::stream::synchronize(stream.raw()).map_err(|e| driver_error("cuStreamSynchronize", e))
    }

    /// Allocates `bytes` of device memory ordered on `stream` (the device's default memory
    /// pool); free it with [`Device::free_async`] on the same stream.
    pub fn alloc_async(&self, bytes: usize, stream: Stream) -> Result<u64> {
        self.bind()?;
        // SAFETY: a plain allocation; the pointer is only handed out.
        unsafe { cu::malloc_async(stream.raw(), bytes.max(1)) }
            .map_err(|e| driver_error("cuMemAllocAsync", e))
    }

    /// Frees memory from [`Device::alloc_async`] once the work queued on `stream` is done.
    ///
    /// # Safety
    /// `ptr` must come from `alloc_async` and nothing queued later may use it.
    pub unsafe fn free_async(&self, ptr: u64, stream: Stream) -> Result<()> {
        self.bind()?;
        cu::free_async(ptr, stream.raw()).map_err(|e| driver_error("cuMemFreeAsync", e))
    }

    /// Allocates `bytes` of device memory (`cuMemAlloc`; at least one byte, so that the
    /// pointer is a real allocation). Free it with [`Device::free`].
    pub fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: a plain allocation in the bound context.
        unsafe { cu::malloc_sync(bytes.max(1)) }.map_err(|e| driver_error("cuMemAlloc", e))
    }

    /// Frees memory from [`Device::alloc`] (after the work queued on it, as `cuMemFree` waits).
    ///
    /// # Safety
    /// `ptr` must come from [`Device::alloc`] of this device and not be used afterwards.
    pub unsafe fn free(&self, ptr: u64) -> Result<()> {
        self.bind()?;
        cu::free_sync(ptr).map_err(|e| driver_error("cuMemFree", e))
    }

    /// Copies device to device on `stream`.
    ///
    /// # Safety
    /// Both ranges must be device memory of `bytes` bytes.
    pub unsafe fn copy_device(
        &self,
        dst: u64,
        src: u64,
        bytes: usize,
        stream: Stream,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        cu::memcpy_dtod_async(dst, src, bytes, stream.raw())
            .map_err(|e| driver_error("cuMemcpyDtoDAsync", e))
    }
}
