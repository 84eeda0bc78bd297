//! The CUDA backend: the same operations as the CPU kernels, on device memory.
//!
//! - [`driver`]: the CUDA driver through cudarc with dynamic loading (no CUDA toolkit at build
//!   time); devices and their primary contexts (shared with PyTorch), kernel launches on the
//!   caller's stream, small copies.
//! - [`nvrtc`]: NVRTC found and loaded at run time by path (PyTorch's / PyPI's
//!   `nvidia-cuda-nvrtc` wheel, `$TVC_NVRTC`, `$CUDA_HOME`, the loader's path).
//! - [`sources`]: `kernels/*.cu`, embedded in the library; [`cache`]: their CUBINs for the
//!   device's architecture, compiled on first use and kept on disk.
//! - [`compress`], [`kv`]: the launchers of each capability's kernels.
//!
//! Without a driver, a GPU or NVRTC every function here returns [`Error::Runtime`]; nothing
//! panics, and the CPU paths never touch this module.

pub mod alloc;
mod args;
pub mod cache;
pub mod compress;
pub mod driver;
pub mod kv;
pub mod nvrtc;
pub mod sources;

pub use driver::{device, device_count, driver_version, Stream};
pub use sources::KernelFile;

use crate::error::Result;

/// What a CUDA launch takes from its caller: the stream to queue the work on (the kernels run
/// asynchronously in its order) and, optionally, the caller's allocator for the small device
/// buffers an operation needs (uploaded indices, staging). Without one, the buffers come from
/// the driver's stream-ordered allocator and are freed on the stream after the kernels.
/// CPU operations ignore it.
#[derive(Default)]
pub struct Launch<'a> {
    pub stream: Stream,
    /// Returns a device pointer to at least the given number of bytes (16-byte aligned) on the
    /// operation's device, valid in stream order until the operation's call returns.
    pub scratch: Option<&'a mut dyn FnMut(usize) -> Result<u64>>,
}

impl<'a> Launch<'a> {
    /// The work on `stream`, buffers from the driver.
    pub fn on(stream: Stream) -> Self {
        Launch {
            stream,
            scratch: None,
        }
    }
}

/// One kernel's resources as ptxas reports them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// Compiles `file` for `sm_<arch>` (CUBIN, with `ptxas -v` through NVRTC) and, with `ptx`, also
/// its PTX for `compute_<arch>` (for a standalone ptxas). Needs NVRTC, not a GPU.
pub fn compile_for_check(
    file: KernelFile,
    arch: u32,
    ptx: bool,
) -> Result<(Vec<u8>, String, Option<Vec<u8>>)> {
    let nvrtc = nvrtc::nvrtc()?;
    let header = [sources::HEADER];
    let cubin = nvrtc.compile(
        file.source(),
        file.file_name(),
        &header,
        &sources::options(file, arch, "sm", &["--ptxas-options=-v"]),
        true,
    )?;
    let ptx = if ptx {
        Some(
            nvrtc
                .compile(
                    file.source(),
                    file.file_name(),
                    &header,
                    &sources::options(file, arch, "compute", &[]),
                    false,
                )?
                .image,
        )
    } else {
        None
    };
    Ok((cubin.image, cubin.log, ptx))
}

/// Parses ptxas' verbose report (`-v`), as NVRTC's log or ptxas' own output gives it.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let at = line.find(word)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources {
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(current) = out.last_mut() else {
            continue;
        };
        if line.contains("bytes stack frame") {
            current.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            current.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
            current.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            current.registers = number_before(line, "registers").unwrap_or(0);
            // "..., used 1 barriers, 2064 bytes smem, ..."
            current.shared_bytes = line
                .split(',')
                .find_map(|part| number_before(part, "bytes smem"))
                .unwrap_or(0);
        }
    }
    out
}

/// What the runtime found, for `tvc_rs.cuda.info()` and error reports.
#[derive(Debug, Clone, Default)]
pub struct RuntimeInfo {
    pub driver_version: Option<i32>,
    pub driver_error: Option<String>,
    pub device_count: usize,
    pub nvrtc_path: Option<String>,
    pub nvrtc_version: Option<(i32, i32)>,
    pub nvrtc_archs: Vec<i32>,
    pub nvrtc_error: Option<String>,
    pub cache_dir: Option<String>,
}

pub fn runtime_info() -> RuntimeInfo {
    let mut info = RuntimeInfo {
        cache_dir: cache::cache_dir().map(|d| d.display().to_string()),
        ..Default::default()
    };
    match driver_version() {
        Ok(v) => {
            info.driver_version = Some(v);
            info.device_count = device_count();
        }
        Err(e) => info.driver_error = Some(e.to_string()),
    }
    match nvrtc::nvrtc() {
        Ok(n) => {
            info.nvrtc_path = Some(n.path.display().to_string());
            info.nvrtc_version = Some(n.version);
            info.nvrtc_archs = n.archs.clone();
        }
        Err(e) => info.nvrtc_error = Some(e.to_string()),
    }
    info
}
