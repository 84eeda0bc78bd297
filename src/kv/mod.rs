//! KV-cache re-injection: key re-rotation (RoPE, M-RoPE contiguous or interleaved, partial
//! rotary in either pair layout), span relocation in contiguous caches,
//! paged gather-rotate-scatter.
//!
//! Everything works in place on caller memory described by strides ([`StridedMut`],
//! [`PagedCache`]), for f32, f16 and bf16 elements with f32 arithmetic and angles from the
//! integer position delta in f64. Inputs are checked before anything is written.

mod contiguous;
mod paged;
mod rerotate;
mod rope;
mod strided;

pub use contiguous::{append_entries, relocate_span, LayerKv, LayerKvRef};
pub(crate) use contiguous::{check_append, check_relocate};
pub(crate) use paged::check_paged;
pub use paged::{paged_reinject, PagedCache, PagedLayout};
pub(crate) use rerotate::check_rerotate;
pub use rerotate::rerotate_keys;
pub(crate) use rope::check_delta_shape;
pub use rope::{mrope_components, Deltas, Rope, RopeConfig};
pub use strided::{Strided, StridedMut};
