//! The on-disk cache of compiled kernels.
//!
//! A CUBIN is stored under `<cache>/kernels/<file>-sm<arch>-nvrtc<major>.<minor>-<key>.cubin`,
//! where `<cache>` is `$TVC_CACHE_DIR`, else `$XDG_CACHE_HOME/tvc-rs`, else `~/.cache/tvc-rs`, and
//! `<key>` is a SHA-256 over everything that changes the binary: the source, the shared header,
//! the NVRTC options (architecture included), the NVRTC version and the crate version.
//! Several processes may start at once: each writes a private temporary file in the same
//! directory and renames it into place (atomic), so a reader sees a whole file or none. A file
//! that does not load (e.g. truncated by a full disk) is compiled and written again. An
//! unwritable cache directory only costs a compile per process.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::nvrtc::nvrtc;
use super::sources::{options, KernelFile, HEADER};
use crate::error::Result;

/// Bumped when the cache layout or the compile setup changes in a way the key does not see.
const FORMAT: &str = "tvc-rs kernel cache 1";

/// The cache root (not created here).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TVC_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("tvc-rs"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|home| PathBuf::from(home).join(".cache").join("tvc-rs"))
}

/// Hex SHA-256 of the inputs of one compile.
pub fn key(file: KernelFile, options: &[String], nvrtc_version: (i32, i32)) -> String {
    let mut hash = Sha256::new();
    for part in [
        FORMAT,
        env!("CARGO_PKG_VERSION"),
        file.file_name(),
        file.source(),
        HEADER.0,
        HEADER.1,
    ] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    for option in options {
        hash.update((option.len() as u64).to_le_bytes());
        hash.update(option.as_bytes());
    }
    hash.update(nvrtc_version.0.to_le_bytes());
    hash.update(nvrtc_version.1.to_le_bytes());
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the CUBIN of `file` for `sm_<arch>` lives (with the loaded NVRTC's version).
pub fn cubin_path(root: &Path, file: KernelFile, arch: u32, nvrtc_version: (i32, i32)) -> PathBuf {
    let options = options(file, arch, "sm", &[]);
    let key = key(file, &options, nvrtc_version);
    let stem = file.file_name().trim_end_matches(".cu");
    root.join("kernels").join(format!(
        "{stem}-sm{arch}-nvrtc{}.{}-{}.cubin",
        nvrtc_version.0,
        nvrtc_version.1,
        &key[..24]
    ))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn store(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.{}-{:?}-{nanos}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("kernel"),
        std::process::id(),
        std::thread::current().id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// How a CUBIN was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Compiled,
}

/// The CUBIN of `file` for `sm_<arch>`: from the cache, else compiled (and cached). With
/// `skip_cache`, a cached file is ignored (it failed to load) and overwritten.
pub fn cubin(
    file: KernelFile,
    arch: u32,
    skip_cache: bool,
) -> Result<(Vec<u8>, Origin, Option<PathBuf>)> {
    let nvrtc = nvrtc()?;
    let path = cache_dir().map(|root| cubin_path(&root, file, arch, nvrtc.version));
    if let (Some(path), false) = (&path, skip_cache) {
        if let Ok(bytes) = std::fs::read(path) {
            if !bytes.is_empty() {
                return Ok((bytes, Origin::Cache, Some(path.clone())));
            }
        }
    }
    let compiled = nvrtc.compile(
        file.source(),
        file.file_name(),
        &[HEADER],
        &options(file, arch, "sm", &[]),
        true,
    )?;
    let stored = path.filter(|p| store(p, &compiled.image).is_ok());
    Ok((compiled.image, Origin::Compiled, stored))
}
