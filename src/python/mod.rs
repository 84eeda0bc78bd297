//! The `tvc_rs._native` extension module: thin bindings over the Rust core. Each capability
//! has its own file here with a `register` function; arguments are converted and checked here,
//! the GIL is released around heavy calls, and the work happens in the core modules.

use pyo3::prelude::*;

mod compress;
mod cuda;
mod dvr;
mod errors;
mod kv;
mod pvc;
mod rope;
pub(crate) mod tensor;
mod triggers;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    triggers::register(m)?;
    pvc::register(m)?;
    rope::register(m)?;
    compress::register(m)?;
    kv::register(m)?;
    tensor::register(m)?;
    dvr::register(m)?;
    cuda::register(m)?;
    Ok(())
}
