//! tvc-rs: the fast core of TVC (Take-along Visual Conditioning).
//!
//! One module per capability; none of them knows about Python. The PyO3 bindings live in
//! `python/` behind the `python` cargo feature and only convert, check and call in.

pub mod compress;
pub mod cuda;
pub mod dtype;
pub mod dvr;
pub mod error;
pub mod kv;
pub mod pvc;
pub mod rope;
pub mod tensor;
pub mod triggers;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
