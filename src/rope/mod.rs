//! M-RoPE position ids (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V, Qwen3.5) and Qwen2-VL image
//! token counts.
//!
//! - [`mrope`]: the 3-D position ids `(t, h, w)` and the rope delta of one sequence
//!   ([`positions_for_sequence`], [`positions_for_segments`]) or of a padded batch
//!   ([`batch_positions`]), equal to transformers 5.24's `get_rope_index` of each model
//!   ([`ModelType`]).
//! - [`time`]: how Qwen2.5-VL spaces the temporal positions of a video
//!   (`tokens_per_second * second_per_grid_ts`), reproducing PyTorch's dtype rules exactly.
//! - [`resize`]: Qwen2-VL's `smart_resize` and the image grid / token count it implies.

pub mod mrope;
pub mod resize;
pub mod time;

pub use mrope::{
    batch_positions, positions_for_segments, positions_for_sequence, segments_for_sequence,
    BatchInput, GridThw, MaskValue, ModelType, MropeConfig, PositionInt, Segment,
    SequencePositions, TokenId, TokenKinds, KIND_IMAGE, KIND_TEXT, KIND_VIDEO,
};
pub use resize::{
    family_image_grid_thw, glm4v_smart_resize, image_grid_thw, image_token_count, smart_resize,
    ImageSettings,
};
pub use time::{Seconds, SecondsValue, TimeInterval, TokensPerSecond};
