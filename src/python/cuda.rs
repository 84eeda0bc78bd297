//! Shared pieces of the CUDA bindings and the runtime functions behind `tvc_rs.cuda`.
//!
//! A call goes to the GPU when its main tensor argument is a CUDA tensor (`__dlpack_device__`
//! says so; nothing is exported before every tensor argument's device is checked). Then:
//! the call runs under `torch.cuda.device(<its device>)` (PyTorch exports a CUDA tensor only on
//! the current device), on `torch.cuda.current_stream(<device>)`, whose handle is passed to
//! `__dlpack__(stream=...)` as the DLPack protocol asks and to every launch; outputs are
//! `torch.empty` tensors on that device (PyTorch's caching allocator: no cudaMalloc, and the
//! memory is ordered on the same stream).

use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{opt_arg, Arg};
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::cuda::alloc::{DeviceAlloc, Output};
use crate::cuda::{self, KernelFile, Stream};
use crate::dtype::DType;
use crate::python::tensor::{buffer, PyTensor};
use crate::tensor::{Device, TensorView};
use crate::{type_err, value_err};

const DL_CUDA: i32 = 2;
const DL_CUDA_MANAGED: i32 = 13;

/// The device of a tensor-like argument without exporting it: `Some(Device)` for objects with
/// `__dlpack_device__`, `None` for plain Python values (ints, lists) and unknown devices.
pub fn device_of(obj: &Bound<'_, PyAny>) -> PyResult<Option<Device>> {
    if !obj.hasattr("__dlpack_device__")? {
        return Ok(None);
    }
    // Devices DLPack cannot express (torch's "meta") raise here; the import then reports them.
    let Ok((kind, id)) = obj
        .call_method0("__dlpack_device__")
        .and_then(|d| d.extract::<(i32, i32)>())
    else {
        return Ok(None);
    };
    Ok(Some(match kind {
        DL_CUDA | DL_CUDA_MANAGED => Device::Cuda(id),
        1 | 3 => Device::Cpu,
        other => Device::Other {
            device_type: other,
            id,
        },
    }))
}

/// The CUDA ordinal of `obj` (or of the first element of a list / tuple of tensors), if it is a
/// CUDA tensor.
pub fn cuda_ordinal(obj: &Bound<'_, PyAny>) -> PyResult<Option<i32>> {
    let first = if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        match obj.try_iter()?.next() {
            Some(item) => item?,
            None => return Ok(None),
        }
    } else {
        obj.clone()
    };
    Ok(match device_of(&first)? {
        Some(Device::Cuda(id)) => Some(id),
        _ => None,
    })
}

/// A call on `cuda:<ordinal>`: the torch module, the stream, and the device made current.
pub struct CudaCall<'py> {
    pub py: Python<'py>,
    pub ordinal: i32,
    pub stream: Stream,
    torch: Bound<'py, PyModule>,
    guard: Bound<'py, PyAny>,
    /// The argument whose device the others must share (for messages).
    pub primary: String,
}

impl<'py> CudaCall<'py> {
    /// Enters `torch.cuda.device(ordinal)`; [`CudaCall::finish`] leaves it.
    pub fn enter(py: Python<'py>, ordinal: i32, primary: &str) -> PyResult<Self> {
        let torch = py.import("torch").map_err(|_| {
            PyErr::from(type_err!("{primary}: CUDA tensors are supported as torch tensors, and torch cannot be imported"))
        })?;
        // Fail early, with the reason, where the runtime cannot work (no driver, no NVRTC).
        cuda::device(ordinal)?;
        let guard = torch
            .getattr("cuda")?
            .getattr("device")?
            .call1((ordinal,))?;
        guard.call_method0("__enter__")?;
        let handle: usize = torch
            .getattr("cuda")?
            .call_method1("current_stream", (ordinal,))?
            .getattr("cuda_stream")?
            .extract()?;
        Ok(CudaCall {
            py,
            ordinal,
            stream: Stream(handle),
            torch,
            guard,
            primary: primary.to_string(),
        })
    }

    /// Runs `f` on the device, leaving the device context whatever happens.
    pub fn run<T>(
        py: Python<'py>,
        ordinal: i32,
        primary: &str,
        f: impl FnOnce(&CudaCall<'py>) -> PyResult<T>,
    ) -> PyResult<T> {
        let call = Self::enter(py, ordinal, primary)?;
        let result = f(&call);
        let none = py.None();
        let exited = call
            .guard
            .call_method1("__exit__", (none.clone_ref(py), none.clone_ref(py), none));
        let value = result?;
        exited?;
        Ok(value)
    }

    /// The DLPack `stream` argument for this call's stream (1 is the legacy default stream).
    fn dlpack_stream(&self) -> isize {
        if self.stream.0 == 0 {
            1
        } else {
            self.stream.0 as isize
        }
    }

    /// Checks that tensor argument `obj` (named `name`) lives on this call's device.
    pub fn expect_here(&self, obj: &Bound<'py, PyAny>, name: &str) -> PyResult<()> {
        match device_of(obj)? {
            Some(Device::Cuda(id)) if id == self.ordinal => Ok(()),
            Some(other) => Err(value_err!(
                "{name}: expected a tensor on cuda:{} (the device of {}), got one on {other}; pass every tensor on the same device",
                self.ordinal,
                self.primary
            )
            .into()),
            None => Ok(()),
        }
    }

    /// Imports a CUDA tensor argument (after checking its device), synchronised with our stream.
    pub fn tensor(
        &self,
        obj: &Bound<'py, PyAny>,
        name: &str,
        dtypes: &[DType],
    ) -> PyResult<PyTensor> {
        if !obj.hasattr("__dlpack__")? {
            return Err(type_err!(
                "{name}: expected a torch tensor, got {}",
                obj.get_type().name()?
            )
            .into());
        }
        self.expect_here(obj, name)?;
        PyTensor::extract_with_stream(obj, name, dtypes, Some(self.dlpack_stream()))
    }

    /// The call on the device of `obj` (or of the first of a list of tensors) when it is a CUDA
    /// tensor, else `f(None)`: a CPU call.
    pub fn maybe<T>(
        py: Python<'py>,
        obj: &Bound<'py, PyAny>,
        primary: &str,
        f: impl FnOnce(Option<&CudaCall<'py>>) -> PyResult<T>,
    ) -> PyResult<T> {
        match cuda_ordinal(obj)? {
            Some(ordinal) => Self::run(py, ordinal, primary, |call| f(Some(call))),
            None => f(None),
        }
    }

    /// `obj` imported when it is a CUDA tensor (deltas read in place), `None` for host data.
    pub fn device_tensor(
        &self,
        obj: &Bound<'py, PyAny>,
        name: &str,
        dtypes: &[DType],
    ) -> PyResult<Option<PyTensor>> {
        match device_of(obj)? {
            Some(Device::Cuda(_)) => Ok(Some(self.tensor(obj, name, dtypes)?)),
            _ => Ok(None),
        }
    }

    /// Runs a core operation with this call's stream and PyTorch's allocator for its device
    /// buffers (stream-ordered: they go back to the cache after the kernels).
    pub fn launch<T>(
        &self,
        f: impl FnOnce(cuda::Launch<'_>) -> crate::error::Result<T>,
    ) -> PyResult<T> {
        let mut buffers = Vec::new();
        let mut failed: Option<PyErr> = None;
        let result = {
            let mut alloc = |bytes: usize| -> crate::error::Result<u64> {
                match self.empty(&[bytes.div_ceil(8)], DType::I64) {
                    Ok((tensor, view)) => {
                        let ptr = view.view().data_ptr() as u64;
                        buffers.push((tensor, view));
                        Ok(ptr)
                    }
                    Err(err) => {
                        let text = err.to_string();
                        failed = Some(err);
                        Err(crate::error::Error::Runtime(text))
                    }
                }
            };
            f(cuda::Launch {
                stream: self.stream,
                scratch: Some(&mut alloc),
            })
        };
        if let Some(err) = failed {
            return Err(err);
        }
        Ok(result?)
    }

    /// A new contiguous torch tensor on this device and its imported view.
    pub fn empty(&self, shape: &[usize], dtype: DType) -> PyResult<(Bound<'py, PyAny>, PyTensor)> {
        let torch_dtype = self.torch.getattr(dtype.name())?;
        let kwargs = PyDict::new(self.py);
        kwargs.set_item("dtype", torch_dtype)?;
        kwargs.set_item("device", format!("cuda:{}", self.ordinal))?;
        let tensor =
            self.torch
                .call_method("empty", (PyTuple::new(self.py, shape)?,), Some(&kwargs))?;
        let view =
            PyTensor::extract_with_stream(&tensor, "output", &[dtype], Some(self.dlpack_stream()))?;
        Ok((tensor, view))
    }
}

/// `obj`, or its `.cpu()` copy when it is a CUDA tensor (host data such as slots).
pub fn on_host<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    match device_of(obj)? {
        Some(Device::Cuda(_)) => obj.call_method0("cpu"),
        _ => Ok(obj.clone()),
    }
}

/// A tensor argument or a list / tuple of them (`name[i]`): through `call` on a CUDA call
/// ([`CudaCall::tensor`]), else as plain DLPack imports (whose device the core checks).
pub fn tensors_arg<'py>(
    call: Option<&CudaCall<'py>>,
    obj: &Bound<'py, PyAny>,
    name: &str,
    dtypes: &[DType],
) -> PyResult<Vec<PyTensor>> {
    let one = |item: &Bound<'py, PyAny>, name: &str| match call {
        Some(call) => call.tensor(item, name, dtypes),
        None => PyTensor::extract(item, name, dtypes),
    };
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        obj.try_iter()?
            .enumerate()
            .map(|(i, item)| one(&item?, &format!("{name}[{i}]")))
            .collect()
    } else {
        Ok(vec![one(obj, name)?])
    }
}

/// A torch tensor made by [`CudaCall`] for a result, and its view.
pub struct TorchTensor<'py> {
    pub tensor: Bound<'py, PyAny>,
    view: PyTensor,
}

/// A PyTorch failure inside an operation of the core (allocation, narrowing).
fn runtime(err: PyErr) -> crate::error::Error {
    crate::error::Error::Runtime(format!("torch: {err}"))
}

/// Where a binding's call runs: on the CPU, or on the CUDA device of its main tensor (under
/// [`CudaCall`]). The glue around one call of the core: tensors imported for that device, results
/// made into what Python gets (`Buffer`s on the CPU, torch tensors on a GPU).
pub enum Place<'c, 'py> {
    Cpu(Python<'py>),
    Cuda(&'c CudaCall<'py>),
}

impl<'py> Place<'_, 'py> {
    /// Runs `f` on the device of `main` (argument `primary`).
    pub fn run<T>(
        py: Python<'py>,
        main: &Bound<'py, PyAny>,
        primary: &str,
        f: impl FnOnce(&Place<'_, 'py>) -> PyResult<T>,
    ) -> PyResult<T> {
        match cuda_ordinal(main)? {
            Some(ordinal) => CudaCall::run(py, ordinal, primary, |call| f(&Place::Cuda(call))),
            None => f(&Place::Cpu(py)),
        }
    }

    /// Imports tensor argument `obj`: on a GPU with the call's stream (a tensor on another device
    /// is refused, one on the CPU imported as it is: the core decides where it may be).
    pub fn tensor(
        &self,
        obj: &Bound<'py, PyAny>,
        name: &str,
        dtypes: &[DType],
    ) -> PyResult<PyTensor> {
        match self {
            Place::Cuda(call) if device_of(obj)? != Some(Device::Cpu) => {
                call.tensor(obj, name, dtypes)
            }
            _ => PyTensor::extract(obj, name, dtypes),
        }
    }

    /// Host metadata (grids, indices) as given, or copied to the host from the call's device.
    pub fn host(&self, obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Place::Cuda(call) if matches!(device_of(obj)?, Some(Device::Cuda(_))) => {
                call.expect_here(obj, name)?;
                obj.call_method0("cpu")
            }
            _ => Ok(obj.clone()),
        }
    }

    /// A result for Python: a `Buffer` (host) or the torch tensor (device).
    pub fn output(&self, out: Output<TorchTensor<'py>>) -> PyResult<Bound<'py, PyAny>> {
        match out {
            Output::Host(tensor) => Ok(buffer(self.py(), tensor)?.into_any()),
            Output::Device(tensor) => Ok(tensor.tensor),
        }
    }

    pub fn py(&self) -> Python<'py> {
        match self {
            Place::Cpu(py) => *py,
            Place::Cuda(call) => call.py,
        }
    }
}

impl<'py> DeviceAlloc for Place<'_, 'py> {
    type Tensor = TorchTensor<'py>;

    fn ordinal(&self) -> i32 {
        match self {
            Place::Cpu(_) => -1,
            Place::Cuda(call) => call.ordinal,
        }
    }
    fn stream(&self) -> Stream {
        match self {
            Place::Cpu(_) => Stream(0),
            Place::Cuda(call) => call.stream,
        }
    }
    fn empty(&self, shape: &[usize], dtype: DType) -> crate::error::Result<TorchTensor<'py>> {
        match self {
            Place::Cpu(_) => Err(crate::error::Error::Runtime(
                "internal error: a device result for a call on the CPU".into(),
            )),
            Place::Cuda(call) => {
                let (tensor, view) = call.empty(shape, dtype).map_err(runtime)?;
                Ok(TorchTensor { tensor, view })
            }
        }
    }
    fn view<'t>(&self, tensor: &'t TorchTensor<'py>) -> TensorView<'t> {
        tensor.view.view()
    }
    fn narrow(
        &self,
        tensor: TorchTensor<'py>,
        len: usize,
    ) -> crate::error::Result<TorchTensor<'py>> {
        match self {
            Place::Cpu(_) => Ok(tensor),
            Place::Cuda(call) => {
                let narrowed = tensor
                    .tensor
                    .call_method1("narrow", (0, 0, len))
                    .map_err(runtime)?;
                let view = PyTensor::extract_with_stream(
                    &narrowed,
                    "output",
                    &[tensor.view.view().dtype()],
                    Some(call.dlpack_stream()),
                )
                .map_err(runtime)?;
                Ok(TorchTensor {
                    tensor: narrowed,
                    view,
                })
            }
        }
    }
    /// The CPU kernels run with the GIL released.
    fn cpu_work<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        self.py().detach(work)
    }
}

/// `_cuda_set_search_dirs(dirs)`: where to look for NVRTC after $TVC_NVRTC (called by
/// `tvc_rs.cuda` with the `nvidia/*/lib` directories of `sys.path`).
#[pyfunction]
fn _cuda_set_search_dirs(dirs: Vec<std::path::PathBuf>) {
    cuda::nvrtc::set_search_dirs(dirs);
}

/// `_cuda_info()`: what the runtime finds (driver, devices, NVRTC, cache), as a dict.
#[pyfunction]
fn _cuda_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let info = py.detach(cuda::runtime_info);
    let d = PyDict::new(py);
    d.set_item("driver_version", info.driver_version)?;
    d.set_item("driver_error", info.driver_error)?;
    d.set_item("device_count", info.device_count)?;
    d.set_item("nvrtc_path", info.nvrtc_path)?;
    d.set_item("nvrtc_version", info.nvrtc_version)?;
    d.set_item("nvrtc_archs", info.nvrtc_archs)?;
    d.set_item("nvrtc_error", info.nvrtc_error)?;
    d.set_item("cache_dir", info.cache_dir)?;
    d.set_item(
        "kernel_files",
        KernelFile::ALL
            .iter()
            .map(|f| f.file_name())
            .collect::<Vec<_>>(),
    )?;
    let devices = PyList::empty(py);
    for ordinal in 0..info.device_count as i32 {
        if let Ok(dev) = cuda::device(ordinal) {
            let entry = PyDict::new(py);
            entry.set_item("name", &dev.name)?;
            entry.set_item("capability", dev.capability)?;
            entry.set_item("multiprocessors", dev.multiprocessors)?;
            devices.append(entry)?;
        }
    }
    d.set_item("devices", devices)?;
    Ok(d)
}

fn kernel_file(name: &str) -> PyResult<KernelFile> {
    KernelFile::ALL
        .into_iter()
        .find(|f| f.file_name() == name || f.file_name().trim_end_matches(".cu") == name)
        .ok_or_else(|| value_err!("file = '{name}': expected one of compress.cu, kv.cu").into())
}

/// `_cuda_compile(file, arch, ptx=False) -> (cubin, log, ptx or None)`: NVRTC compile of one
/// kernel file for sm_<arch> with ptxas' verbose report in the log (no GPU needed).
#[pyfunction]
#[pyo3(signature = (file, arch, ptx = Arg::of(false)), text_signature = "(file, arch, ptx=False)")]
fn _cuda_compile<'py>(
    py: Python<'py>,
    file: Arg<String>,
    arch: Arg<u32>,
    ptx: Arg<bool>,
) -> PyResult<Bound<'py, PyTuple>> {
    let file_owned = file.get("file")?;
    let file: &str = &file_owned;
    let arch = arch.get("arch")?;
    let ptx = ptx.get("ptx")?;
    let file = kernel_file(file)?;
    let (cubin, log, ptx) = py.detach(|| cuda::compile_for_check(file, arch, ptx))?;
    let ptx = ptx.map(|p| PyBytes::new(py, &p).into_any());
    PyTuple::new(
        py,
        [
            PyBytes::new(py, &cubin).into_any(),
            log.into_pyobject(py)?.into_any(),
            ptx.unwrap_or_else(|| py.None().into_bound(py)),
        ],
    )
}

/// `_cuda_parse_ptxas(log) -> [dict]`: registers, shared memory, stack and spills per kernel.
#[pyfunction]
fn _cuda_parse_ptxas<'py>(py: Python<'py>, log: Arg<String>) -> PyResult<Bound<'py, PyList>> {
    let log_owned = log.get("log")?;
    let log: &str = &log_owned;
    let out = PyList::empty(py);
    for k in cuda::parse_ptxas_report(log) {
        let d = PyDict::new(py);
        d.set_item("kernel", k.name)?;
        d.set_item("registers", k.registers)?;
        d.set_item("shared_bytes", k.shared_bytes)?;
        d.set_item("stack_bytes", k.stack_bytes)?;
        d.set_item("spill_store_bytes", k.spill_store_bytes)?;
        d.set_item("spill_load_bytes", k.spill_load_bytes)?;
        out.append(d)?;
    }
    Ok(out)
}

/// `_cuda_cache_path(file, arch) -> str | None`: where the CUBIN of `file` for sm_<arch> is
/// cached with the NVRTC that loads (None without a cache directory).
#[pyfunction]
fn _cuda_cache_path(py: Python<'_>, file: Arg<String>, arch: Arg<u32>) -> PyResult<Option<String>> {
    let file_owned = file.get("file")?;
    let file: &str = &file_owned;
    let arch = arch.get("arch")?;
    let file = kernel_file(file)?;
    let nvrtc = py.detach(cuda::nvrtc::nvrtc)?;
    Ok(cuda::cache::cache_dir().map(|root| {
        cuda::cache::cubin_path(&root, file, arch, nvrtc.version)
            .display()
            .to_string()
    }))
}

/// `_cuda_cached_cubin(file, arch) -> (bytes, bool)`: the CUBIN from the cache, compiling and
/// storing it if needed (True when it came from the cache). No GPU needed.
#[pyfunction]
fn _cuda_cached_cubin<'py>(
    py: Python<'py>,
    file: Arg<String>,
    arch: Arg<u32>,
) -> PyResult<(Bound<'py, PyBytes>, bool)> {
    let file_owned = file.get("file")?;
    let file: &str = &file_owned;
    let arch = arch.get("arch")?;
    let file = kernel_file(file)?;
    let (image, origin, _) = py.detach(|| cuda::cache::cubin(file, arch, false))?;
    Ok((
        PyBytes::new(py, &image),
        origin == cuda::cache::Origin::Cache,
    ))
}

/// `_cuda_warmup(device)`: compiles (or loads from the cache) and loads every kernel file on
/// `cuda:<device>`.
#[pyfunction]
fn _cuda_warmup(py: Python<'_>, device: Arg<i32>) -> PyResult<()> {
    let device = device.get("device")?;
    py.detach(|| -> crate::error::Result<()> {
        let dev = cuda::device(device)?;
        dev.function(KernelFile::Compress, "gather_f32_s")?;
        dev.function(KernelFile::Kv, "rerotate_f32_s_neox")?;
        Ok(())
    })?;
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_cuda_set_search_dirs, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_parse_ptxas, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_cache_path, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_cached_cubin, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_warmup, m)?)?;
    Ok(())
}
