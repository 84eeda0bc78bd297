//! NVRTC, found and loaded at run time by path.
//!
//! cudarc's own NVRTC bindings load a fixed list of library names through the dynamic loader's
//! search path (and panic when none is there), so they cannot use the NVRTC that PyTorch's CUDA
//! wheels put in `site-packages/nvidia/cu13/lib`, which is on no search path. This module
//! binds the dozen NVRTC functions the runtime needs with `libloading`, from the first of these
//! that loads (see [`candidates`]):
//!
//! 1. `$TVC_NVRTC`: a `libnvrtc.so*` file or a directory holding one (an absolute path);
//! 2. directories handed over by the Python layer ([`set_search_dirs`]): `nvidia/*/lib` of every
//!    `sys.path` entry, i.e. the `nvidia-cuda-nvrtc` wheel (also what torch installs);
//! 3. `$CUDA_HOME`, `$CUDA_PATH` (`lib64`, `lib`), `/usr/local/cuda/lib64`;
//! 4. the plain sonames `libnvrtc.so.13`, `libnvrtc.so.12`, `libnvrtc.so` on the loader's path.
//!
//! Relative paths are ignored everywhere: nothing is loaded relative to the current directory.
//!
//! NVRTC loads `libnvrtc-builtins.so.<major>.<minor>` by soname when it compiles; the copy next to
//! the chosen library is loaded first, so that NVRTC finds it already in the process.
//! Nothing here panics: a missing library or symbol is an [`Error::Runtime`].

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use libloading::Library;

use crate::error::{Error, Result};

type NvrtcResult = c_int;
type Program = *mut c_void;

struct Api {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
    error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    destroy: unsafe extern "C" fn(*mut Program) -> NvrtcResult,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    log: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    num_archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
}

/// A loaded NVRTC library.
pub struct Nvrtc {
    api: Api,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// `(major, minor)` as NVRTC reports it.
    pub version: (i32, i32),
    /// Virtual architectures it can compile for (e.g. 75, 80, 86, 89, 90, 100, 120).
    pub archs: Vec<i32>,
    _builtins: Option<Library>,
    _lib: Library,
}

// SAFETY: NVRTC's API is thread-safe (each program is used by one thread at a time here).
unsafe impl Send for Nvrtc {}
unsafe impl Sync for Nvrtc {}

/// What a compile produced.
pub struct Compiled {
    /// CUBIN (for `sm_XX`) or PTX text (for `compute_XX`, NUL-terminated as NVRTC returns it).
    pub image: Vec<u8>,
    /// NVRTC's log (warnings; with `-Xptxas -v` the register / spill report).
    pub log: String,
}

static SEARCH_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Loaded once and kept for the process; a failure is not remembered (the search may be
/// configured later, e.g. a library installed meanwhile).
static LOADED: OnceLock<Nvrtc> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

/// Directories to look for NVRTC in (after `$TVC_NVRTC`), e.g. `site-packages/nvidia/cu13/lib`.
/// Only effective before the first compile (NVRTC is loaded once per process).
/// Relative directories are dropped: NVRTC is never looked for relative to the current directory.
pub fn set_search_dirs(dirs: Vec<PathBuf>) {
    *SEARCH_DIRS.lock().unwrap_or_else(|e| e.into_inner()) =
        dirs.into_iter().filter(|d| d.is_absolute()).collect();
}

fn lib_files_in(dir: &Path) -> Vec<PathBuf> {
    // libnvrtc.so.13 before libnvrtc.so.12 before libnvrtc.so; never the .alt or builtins ones.
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let rest = name.strip_prefix("libnvrtc.so")?;
            let major = if rest.is_empty() {
                0
            } else {
                rest.strip_prefix('.')?.parse::<u32>().ok()?
            };
            Some((major, entry.path()))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Every place NVRTC is looked for, in order, with where the candidate came from.
pub fn candidates() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    // Absolute paths only (a relative one would depend on the current directory); bare sonames
    // go to the system loader at the end.
    if let Some(path) = std::env::var_os("TVC_NVRTC")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        if path.is_dir() {
            out.extend(
                lib_files_in(&path)
                    .into_iter()
                    .map(|p| (p, "$TVC_NVRTC".to_string())),
            );
        } else {
            out.push((path, "$TVC_NVRTC".to_string()));
        }
    }
    for dir in SEARCH_DIRS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        out.extend(
            lib_files_in(dir)
                .into_iter()
                .map(|p| (p, "Python site-packages".to_string())),
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
        {
            for sub in ["lib64", "lib"] {
                let dir = PathBuf::from(&root).join(sub);
                out.extend(
                    lib_files_in(&dir)
                        .into_iter()
                        .map(|p| (p, format!("${var}"))),
                );
            }
        }
    }
    out.extend(
        lib_files_in(Path::new("/usr/local/cuda/lib64"))
            .into_iter()
            .map(|p| (p, "/usr/local/cuda".to_string())),
    );
    for soname in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
        out.push((
            PathBuf::from(soname),
            "the dynamic loader's search path".to_string(),
        ));
    }
    out
}

unsafe fn symbol<T: Copy>(lib: &Library, name: &str) -> std::result::Result<T, String> {
    lib.get::<T>(name.as_bytes())
        .map(|s| *s)
        .map_err(|e| format!("symbol {name} missing: {e}"))
}

impl Nvrtc {
    fn open(path: &Path) -> std::result::Result<Nvrtc, String> {
        // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
        let lib = unsafe { Library::new(path) }.map_err(|e| e.to_string())?;
        // SAFETY: the signatures are NVRTC's (nvrtc.h, stable since CUDA 11.2).
        let api = unsafe {
            Api {
                version: symbol(&lib, "nvrtcVersion")?,
                error_string: symbol(&lib, "nvrtcGetErrorString")?,
                create: symbol(&lib, "nvrtcCreateProgram")?,
                destroy: symbol(&lib, "nvrtcDestroyProgram")?,
                compile: symbol(&lib, "nvrtcCompileProgram")?,
                log_size: symbol(&lib, "nvrtcGetProgramLogSize")?,
                log: symbol(&lib, "nvrtcGetProgramLog")?,
                ptx_size: symbol(&lib, "nvrtcGetPTXSize")?,
                ptx: symbol(&lib, "nvrtcGetPTX")?,
                cubin_size: symbol(&lib, "nvrtcGetCUBINSize")?,
                cubin: symbol(&lib, "nvrtcGetCUBIN")?,
                num_archs: symbol(&lib, "nvrtcGetNumSupportedArchs")?,
                archs: symbol(&lib, "nvrtcGetSupportedArchs")?,
            }
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: plain out-parameters.
        unsafe { (api.version)(&mut major, &mut minor) };
        let mut count = 0;
        let mut archs = Vec::new();
        // SAFETY: the array has the size NVRTC reported.
        unsafe {
            if (api.num_archs)(&mut count) == 0 && count > 0 {
                archs = vec![0; count as usize];
                if (api.archs)(archs.as_mut_ptr()) != 0 {
                    archs.clear();
                }
            }
        }
        // The builtins library next to NVRTC (a wheel's directory is on no search path).
        let builtins_name = format!("libnvrtc-builtins.so.{major}.{minor}");
        let beside = path
            .parent()
            .map(|dir| dir.join(&builtins_name))
            .filter(|p| p.exists());
        // SAFETY: as for NVRTC itself.
        let builtins = match beside {
            Some(file) => Some(
                unsafe { Library::new(&file) }.map_err(|e| format!("{}: {e}", file.display()))?,
            ),
            None => unsafe { Library::new(&builtins_name) }.ok(),
        };
        if builtins.is_none() {
            return Err(format!(
                "{builtins_name} is neither next to it nor on the loader's search path"
            ));
        }
        // Report the real file for a soname found on the search path.
        let resolved = if path.is_absolute() {
            path.to_path_buf()
        } else {
            resolve_loaded(path).unwrap_or_else(|| path.to_path_buf())
        };
        Ok(Nvrtc {
            api,
            path: resolved,
            version: (major, minor),
            archs,
            _builtins: builtins,
            _lib: lib,
        })
    }

    fn error(&self, code: NvrtcResult) -> String {
        // SAFETY: NVRTC returns a static string for every code.
        let text = unsafe { (self.api.error_string)(code) };
        if text.is_null() {
            return format!("NVRTC error {code}");
        }
        // SAFETY: non-null static C string.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }

    /// Compiles `source` (named `name` in messages) with the in-memory `headers` (name, text)
    /// and `options`; `cubin` picks the CUBIN (for `-arch=sm_XX`) or the PTX.
    pub fn compile(
        &self,
        source: &str,
        name: &str,
        headers: &[(&str, &str)],
        options: &[String],
        cubin: bool,
    ) -> Result<Compiled> {
        let c = |s: &str| {
            CString::new(s).map_err(|_| Error::Runtime(format!("NUL byte in NVRTC input {name}")))
        };
        let source_c = c(source)?;
        let name_c = c(name)?;
        let header_texts: Vec<CString> =
            headers.iter().map(|(_, t)| c(t)).collect::<Result<_>>()?;
        let header_names: Vec<CString> =
            headers.iter().map(|(n, _)| c(n)).collect::<Result<_>>()?;
        let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
        let name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
        let option_c: Vec<CString> = options.iter().map(|o| c(o)).collect::<Result<_>>()?;
        let option_ptrs: Vec<*const c_char> = option_c.iter().map(|s| s.as_ptr()).collect();
        let mut program: Program = std::ptr::null_mut();
        // SAFETY: every pointer is a live NUL-terminated string for the call's duration.
        let created = unsafe {
            (self.api.create)(
                &mut program,
                source_c.as_ptr(),
                name_c.as_ptr(),
                headers.len() as c_int,
                text_ptrs.as_ptr(),
                name_ptrs.as_ptr(),
            )
        };
        if created != 0 {
            return Err(Error::Runtime(format!(
                "NVRTC could not create program {name}: {}",
                self.error(created)
            )));
        }
        struct Guard<'a>(&'a Api, Program);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                // SAFETY: the program was created and is destroyed once.
                unsafe { (self.0.destroy)(&mut self.1) };
            }
        }
        let guard = Guard(&self.api, program);
        // SAFETY: live program and option strings.
        let status = unsafe {
            (self.api.compile)(guard.1, option_ptrs.len() as c_int, option_ptrs.as_ptr())
        };
        let log = self
            .read(guard.1, self.api.log_size, self.api.log)
            .unwrap_or_default();
        let log = String::from_utf8_lossy(&log)
            .trim_end_matches('\0')
            .to_string();
        if status != 0 {
            return Err(Error::Runtime(format!(
                "NVRTC {}.{} failed to compile {name} ({}): {}\n{log}",
                self.version.0,
                self.version.1,
                options.join(" "),
                self.error(status)
            )));
        }
        let image = if cubin {
            self.read(guard.1, self.api.cubin_size, self.api.cubin)?
        } else {
            self.read(guard.1, self.api.ptx_size, self.api.ptx)?
        };
        Ok(Compiled { image, log })
    }

    fn read(
        &self,
        program: Program,
        size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
        get: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    ) -> Result<Vec<u8>> {
        let mut len = 0usize;
        // SAFETY: live program; the buffer has the size NVRTC reported.
        unsafe {
            let code = size(program, &mut len);
            if code != 0 {
                return Err(Error::Runtime(format!("NVRTC: {}", self.error(code))));
            }
            let mut buf = vec![0u8; len];
            if len > 0 {
                let code = get(program, buf.as_mut_ptr() as *mut c_char);
                if code != 0 {
                    return Err(Error::Runtime(format!("NVRTC: {}", self.error(code))));
                }
            }
            Ok(buf)
        }
    }
}

/// The file a soname resolved to, from /proc/self/maps (Linux), for reports.
fn resolve_loaded(soname: &Path) -> Option<PathBuf> {
    let name = soname.file_name()?.to_str()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(name))
        })
        .map(PathBuf::from)
}

/// The process's NVRTC (loaded on first use), or why none could be loaded.
pub fn nvrtc() -> Result<&'static Nvrtc> {
    if let Some(loaded) = LOADED.get() {
        return Ok(loaded);
    }
    let _one_at_a_time = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(loaded) = LOADED.get() {
        return Ok(loaded);
    }
    let mut tried = Vec::new();
    for (path, origin) in candidates() {
        match Nvrtc::open(&path) {
            Ok(nvrtc) => return Ok(LOADED.get_or_init(|| nvrtc)),
            Err(why) => tried.push(format!("  {} (from {origin}): {why}", path.display())),
        }
    }
    Err(Error::Runtime(format!(
        "NVRTC (the CUDA runtime compiler) was not found; tvc_rs compiles its CUDA kernels with it at run time. \
         Install it with `pip install nvidia-cuda-nvrtc==13.0.*` (PyTorch's CUDA 13 wheels already bring it) \
         or point $TVC_NVRTC at libnvrtc.so. Tried:\n{}",
        tried.join("\n")
    )))
}

/// True when an NVRTC library can be loaded (loads it).
pub fn available() -> bool {
    nvrtc().is_ok()
}
