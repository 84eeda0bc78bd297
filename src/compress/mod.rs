//! Visual-token compression: pooling on the (t, h, w) grid, attention scores, selection,
//! pruning and merging.
//!
//! Visual tokens are rows of a `[tokens, dim]` matrix holding one or several images (or videos)
//! one after the other, each laid out row-major on its `(t, h, w)` grid: token
//! `start + (t_i * h + h_i) * w + w_i`. In Qwen2-VL terms the grid is the one of the tokens the
//! language model sees, i.e. `image_grid_thw` with h and w divided by the 2x2 spatial merge.
//!
//! - [`pool_visual_tokens`]: kh x kw average pooling within each frame.
//! - [`visual_token_scores`]: FastV / PyramidDrop-style importance (softmax attention of a few
//!   query rows over the visual keys, averaged over heads and rows).
//! - [`select_tokens`]: top-k, ratio or attention-mass ("dynamic") selection of sorted indices.
//! - [`prune_visual_tokens`]: gather the kept tokens, optionally merging each dropped token
//!   into its most similar kept one (ToMe-style), and [`token_cells`] for their grid positions.
//!
//! Data is f32, f16 or bf16 (any [`Float`](crate::dtype::Float)); arithmetic is in f32.

mod grid;
mod kernels;
mod pool;
mod prune;
mod scores;
mod select;

pub use grid::{check_grids, Grid};
pub use pool::{pool_visual_tokens, pooled_grid};
pub use prune::{check_indices, prune_visual_tokens, token_cells};
pub use scores::visual_token_scores;
pub use select::{check_score_count, keep_from, select_tokens, Budget, KeepFrom};
