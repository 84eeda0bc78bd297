//! tvc-rs: the fast core of TVC (Take-along Visual Conditioning).
//!
//! One module per capability; none of them knows about Python. The PyO3 bindings live in
//! `python/` behind the `python` cargo feature and only convert, check and call in; `candle/`
//! (feature `candle`) does the same for candle tensors.

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

/// The same operations on candle tensors (cargo feature `candle`).
#[cfg(feature = "candle")]
pub mod candle;

pub use error::{Error, Result};
