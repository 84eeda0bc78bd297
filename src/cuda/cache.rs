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
//!
//! Safety of what is loaded: the file name is a digest of the *inputs*, so the file also carries
//! a SHA-256 of its *contents* (a header line `TVC-CUBIN sha256:<hex>`), checked before the
//! CUBIN is handed to the driver: a truncated, damaged or edited file is compiled again. A
//! cached file is read only if it is a regular file (never through a symbolic link: opened with
//! `O_NOFOLLOW`), owned by the user and writable by nobody else, in folders the user owns; the
//! folders are created `0700`.

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

const MAGIC: &[u8] = b"TVC-CUBIN sha256:";

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A cache file's contents: the header line with the CUBIN's SHA-256, then the CUBIN.
pub fn encode(cubin: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 65 + cubin.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(hex_sha256(cubin).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(cubin);
    out
}

/// The CUBIN of a cache file whose stored digest matches its contents, else `None`.
pub fn decode(data: &[u8]) -> Option<&[u8]> {
    let rest = data.strip_prefix(MAGIC)?;
    if rest.len() < 65 || rest[64] != b'\n' {
        return None;
    }
    let (digest, cubin) = (&rest[..64], &rest[65..]);
    (!cubin.is_empty() && hex_sha256(cubin).as_bytes() == digest).then_some(cubin)
}

/// Creates `dir` (and missing parents) with mode 0700, and checks that it is a real folder
/// (not a symbolic link) owned by the user and writable by nobody else.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)?;
    if !trusted(dir, true) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{}: not a folder owned by this user and private to it",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// `path` is no symbolic link, is a folder (`dir`) or a regular file, owned by the effective
/// user and not writable by group or others.
fn trusted(path: &Path, dir: bool) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| trusted_meta(&meta, dir))
}

fn trusted_meta(meta: &std::fs::Metadata, dir: bool) -> bool {
    let kind_ok = if dir { meta.is_dir() } else { meta.is_file() };
    if !kind_ok || meta.file_type().is_symlink() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            return false;
        }
    }
    true
}

/// The CUBIN in the cache file at `path`, if the file (and its folder) can be trusted and its
/// digest matches; `None` otherwise (then it is compiled again).
pub fn load(path: &Path) -> Option<Vec<u8>> {
    if !path.parent().is_some_and(|dir| trusted(dir, true)) {
        return None;
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    let mut file = options.open(path).ok()?;
    // The checks are on the file opened (fstat), not on the path: another process renaming a
    // new cache file into place meanwhile is no reason to distrust it, and a swapped-in file
    // is checked itself.
    if !trusted_meta(&file.metadata().ok()?, false) {
        return None;
    }
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut data).ok()?;
    decode(&data).map(|cubin| cubin.to_vec())
}

/// Writes `bytes` (a CUBIN) to `path` with its digest ([`encode`]), through a private
/// temporary file and a rename, in a folder created 0700.
pub fn store(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Some(root) = dir.parent() {
        private_dir(root)?;
    }
    private_dir(dir)?;
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
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp)?;
        f.write_all(&encode(bytes))?;
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
        if let Some(bytes) = load(path) {
            return Ok((bytes, Origin::Cache, Some(path.clone())));
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
