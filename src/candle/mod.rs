//! The Rust API on candle tensors (cargo feature `candle`), for inference engines built on
//! [candle](https://github.com/huggingface/candle).
//!
//! Every function here is a thin layer over the core: it reaches the tensors' CPU memory with
//! the layout candle gives them (any strides: `narrow`, `transpose`, `i(..)` views are read and
//! written in place, no copy), checks the arguments, and calls the same function the Python
//! bindings call. Results come back as new candle tensors on the CPU; KV-cache operations write
//! into the given tensors (and so into every tensor sharing their storage).
//!
//! - compression: [`pool_visual_tokens`], [`visual_token_scores`], [`select_tokens`],
//!   [`prune_visual_tokens`] (with merging);
//! - KV cache: [`rerotate_keys`], [`relocate_span`] / [`relocate_spans`], [`append_entries`], [`paged_reinject`];
//! - positions: [`mrope_position_ids`] (Qwen2-VL / Qwen2.5-VL `get_rope_index`);
//! - generation loops: [`push_token`] and [`step_batch`] feed sampled token tensors to the
//!   reflection detector and the PVC schedule ([`Monitor`], [`MonitorBatch`]).
//!
//! Data is f32, f16 or bf16, arithmetic in f32 (angles from integer deltas in f64), as in the
//! core. Storage must be the CPU's: CUDA tensors get an error saying so (the core's CUDA kernels
//! are reached from Python only for now). Errors are `candle_core::Error::Msg` with the core's
//! message, which names the argument and what was expected.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use tvc_rs::candle::{self as tc, Deltas, Rope, RopeConfig};
//! # fn main() -> candle_core::Result<()> {
//! // The image for re-injection: 4 x 4 average pooling on its merged token grid (36 x 36).
//! let image_embeds = Tensor::randn(0f32, 1.0, (36 * 36, 64), &Device::Cpu)?.to_dtype(DType::BF16)?;
//! let (pooled, grid) = tc::pool_visual_tokens(&image_embeds, &[[1, 36, 36]], (4, 4))?;
//! assert_eq!((pooled.dims(), grid), (&[81, 64][..], vec![[1, 9, 9]]));
//!
//! // A two-layer cache, [batch, kv_heads, seq, head_dim] per layer: evict the image's entries
//! // [start, end) and re-rotate every later key to its new position.
//! let layer = || Tensor::randn(0f32, 1.0, (1, 4, 100, 128), &Device::Cpu)?.to_dtype(DType::BF16);
//! let (keys, values) = (vec![layer()?, layer()?], vec![layer()?, layer()?]);
//! let (start, end) = (10, 91);
//! let rope = Rope::new(RopeConfig::new(1e6, 128, None, false, None)?);
//! let shift = Deltas::Same(-((end - start) as i64));
//! let len = tc::relocate_span(&keys, &values, start, end, None, shift, &rope)?;
//! let keys: Vec<Tensor> = keys.iter().map(|k| k.narrow(2, 0, len)).collect::<candle_core::Result<_>>()?;
//! assert_eq!(keys[0].dims(), &[1, 4, 19, 128]);
//! # Ok(())
//! # }
//! ```

mod access;
mod compress;
mod kv;
mod pvc;
mod rope;

pub use compress::{
    pool_visual_tokens, prune_visual_tokens, select_tokens, visual_token_scores, Keep, Pruned,
};
pub use kv::{
    append_entries, paged_reinject, relocate_span, relocate_spans, rerotate_keys, PagedLayoutKind,
};
pub use pvc::{push_token, step_batch};
pub use rope::{mrope_position_ids, MropeInput};

pub use crate::compress::Budget;
pub use crate::kv::{Deltas, Rope, RopeConfig};
pub use crate::pvc::{Calibration, Monitor, MonitorBatch, Reason, Schedule, ScheduleState};
pub use crate::rope::{GridThw, MropeConfig};
pub use crate::triggers::{Detector, Hit};

/// candle's result type: every error is a `candle_core::Error`.
pub type Result<T> = candle_core::Result<T>;

/// A core error as a candle error, its message unchanged (it names the argument).
pub(crate) fn candle_err(error: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(error.to_string())
}

/// So that `?` turns core errors (e.g. from [`RopeConfig::new`]) into candle errors.
impl From<crate::Error> for candle_core::Error {
    fn from(error: crate::Error) -> Self {
        candle_err(error)
    }
}

/// `?` on core results inside this module.
pub(crate) trait IntoCandle<T> {
    fn candle(self) -> Result<T>;
}

impl<T> IntoCandle<T> for crate::Result<T> {
    fn candle(self) -> Result<T> {
        self.map_err(candle_err)
    }
}
