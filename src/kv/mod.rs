//! KV-cache re-injection: key re-rotation (RoPE, M-RoPE contiguous or interleaved, partial
//! rotary in either pair layout), span relocation in contiguous caches,
//! paged gather-rotate-scatter.
//!
//! The entry points ([`rerotate_keys`], [`relocate_span`] / [`relocate_spans`], [`append_entries`],
//! [`paged_reinject`]) take [`TensorView`](crate::tensor::TensorView)s on the CPU or a CUDA
//! device, check every argument once and run the CPU kernels or the CUDA ones (`dispatch`).
//! The CPU kernels themselves ([`cpu`]) work in place on caller memory described by strides
//! ([`StridedMut`], [`PagedCache`]), for f32, f16 and bf16 elements with f32 arithmetic and
//! angles from the integer position delta in f64. Inputs are checked before anything is
//! written.

mod contiguous;
mod dispatch;
mod paged;
mod rerotate;
mod rope;
mod strided;

/// The CPU kernels on typed strided views (what [`rerotate_keys`] and the others run for CPU
/// tensors), for callers that hold typed slices already.
pub mod cpu {
    pub use super::contiguous::{append_entries, relocate_span, relocate_spans};
    pub use super::paged::paged_reinject;
    pub use super::rerotate::rerotate_keys;
}

pub(crate) use contiguous::{check_append, check_relocate, SpanNames};
pub use contiguous::{LayerKv, LayerKvRef};
pub use dispatch::{
    append_entries, paged_reinject, relocate_deltas, relocate_span, relocate_spans, rerotate_keys,
    DeltaSource, OwnedDeltas, PagedLayoutKind, Positions, SpanDeltas, KV_DTYPES,
};
pub(crate) use paged::check_paged;
pub use paged::{PagedCache, PagedLayout};
pub(crate) use rerotate::check_rerotate;
pub use rope::{mrope_components, Deltas, DeviceDeltas, KernelDeltas, Rope, RopeConfig};
pub use strided::{Strided, StridedMut};
