//! Visual-token compression: pooling on the (t, h, w) grid, attention scores, selection,
//! pruning and merging.
//!
//! Visual tokens are rows of a `[tokens, dim]` matrix holding one or several images (or videos)
//! one after the other, each laid out row-major on its `(t, h, w)` grid: token
//! `start + (t_i * h + h_i) * w + w_i`. In Qwen2-VL terms the grid is the one of the tokens the
//! language model sees, i.e. `image_grid_thw` with h and w divided by the 2x2 spatial merge.
//!
//! One function per operation takes [`TensorView`](crate::tensor::TensorView)s on any device,
//! checks every argument once and routes by device: the CPU kernels in
//! [`cpu`] (rayon), or the CUDA launchers of `kernels/compress.cu` ([`crate::cuda::compress`])
//! with results in the caller's device memory ([`DeviceAlloc`]).
//!
//! - [`pool_visual_tokens`]: kh x kw average pooling within each frame.
//! - [`visual_token_scores`]: FastV / PyramidDrop-style importance (softmax attention of a few
//!   query rows over the visual keys, averaged over heads and rows).
//! - [`select_tokens`]: top-k, ratio or attention-mass ("dynamic") selection of sorted indices,
//!   by a [`Budget`].
//! - [`prune_visual_tokens`]: gather the kept tokens, optionally merging each dropped token
//!   into its most similar kept one (ToMe-style), and their grid cells.
//!
//! Data is f32, f16 or bf16 ([`DATA_DTYPES`]); arithmetic is in f32.

mod dispatch;
mod grid;
mod kernels;
mod pool;
mod prune;
mod scores;
mod select;

pub use crate::cuda::alloc::{DeviceAlloc, HostOnly, Output};
pub use dispatch::{
    pool_visual_tokens, prune_visual_tokens, select_tokens, visual_token_scores, Keep, Pruned,
};
pub use grid::{check_grids, Grid};
pub use pool::{pool_shape, pooled_grid};
pub use prune::{check_indices, token_cells};
pub use select::{check_score_count, keep_from, Budget, KeepFrom, Rule};

/// The dtypes of token data: f32, f16, bf16.
pub const DATA_DTYPES: &[crate::dtype::DType] = &[
    crate::dtype::DType::F32,
    crate::dtype::DType::F16,
    crate::dtype::DType::BF16,
];

/// The CPU kernels behind the operations, on typed [`Strided`](crate::tensor::Strided) data
/// (for callers that hold it; they check their arguments the same way).
pub mod cpu {
    pub use super::pool::pool_visual_tokens;
    pub use super::prune::prune_visual_tokens;
    pub use super::scores::visual_token_scores;
    pub use super::select::select_tokens;
}
