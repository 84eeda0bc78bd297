//! The CUDA sources, embedded in the library (`kernels/*.cu`), and how they are compiled.

use super::args;

/// The shared header every kernel file includes.
pub const HEADER: (&str, &str) = (
    "tvc_common.cuh",
    include_str!("../../kernels/tvc_common.cuh"),
);

/// One kernel file (one capability).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelFile {
    Compress,
    Kv,
}

impl KernelFile {
    pub const ALL: [KernelFile; 2] = [KernelFile::Compress, KernelFile::Kv];

    /// `compress.cu`
    pub fn file_name(self) -> &'static str {
        match self {
            KernelFile::Compress => "compress.cu",
            KernelFile::Kv => "kv.cu",
        }
    }

    pub fn source(self) -> &'static str {
        match self {
            KernelFile::Compress => include_str!("../../kernels/compress.cu"),
            KernelFile::Kv => include_str!("../../kernels/kv.cu"),
        }
    }

    /// `(struct name, size in bytes)` of every argument struct the Rust side builds: passed as
    /// `-DTVC_SIZEOF_<name>=<size>` so that a layout mismatch is a compile error.
    pub fn arg_sizes(self) -> Vec<(&'static str, usize)> {
        match self {
            KernelFile::Compress => args::compress::sizes(),
            KernelFile::Kv => args::kv::sizes(),
        }
    }
}

/// NVRTC options for `arch` (e.g. 90); `target` "sm" gives a CUBIN, "compute" PTX.
/// No fast math: probabilities and rotations must match the CPU path to f32 rounding.
pub fn options(file: KernelFile, arch: u32, target: &str, extra: &[&str]) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={target}_{arch}"),
        "--std=c++17".to_string(),
        "--generate-line-info".to_string(),
    ];
    options.extend(
        file.arg_sizes()
            .into_iter()
            .map(|(name, size)| format!("-DTVC_SIZEOF_{name}={size}")),
    );
    options.extend(extra.iter().map(|s| s.to_string()));
    options
}
