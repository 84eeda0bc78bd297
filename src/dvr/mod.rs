//! Dynamic Visual Reaffirmation (DVR), TVC's training stage: long-CoT answers get the image
//! again at their self-reflection points ("Wait, let me double-check the image. <image> ...").
//!
//! - [`policy`]: where: after the sentence of a reflection phrase (found by the
//!   [`Detector`](crate::triggers::Detector)), at most N times, a minimum number of answer
//!   tokens apart, not in the first K tokens; the copy is the image downscaled per side (the
//!   pixel-space counterpart of the paper's 4x4 pooling).
//! - [`sample`]: a whole training sample: token ids, labels with the prompt and every vision
//!   token of the answer masked, M-RoPE positions; truncation cuts at the cutoff (LLaMA-Factory's
//!   split), keeps every re-affirmed image wholly before the cut and never cuts an image block.
//! - [`truncate`]: LLaMA-Factory's length split (`infer_seqlen`), the vision blocks of a token
//!   sequence and the answer cut that keeps them whole (`answer_cut`).
//! - [`patches`]: Qwen2-VL's `pixel_values` from a resized `uint8` image in one pass.

pub mod patches;
pub mod policy;
pub mod sample;
pub mod truncate;

pub use patches::{patch_rows, write_patches, write_patches_many, ImageU8, PatchSettings};
pub use policy::{
    downscaled_size, insert_text, is_py_space, plan_insertions, sentence_end, Insertion, Policy,
    DEFAULT_DOWNSCALE, DEFAULT_PLACEHOLDER,
};
pub use sample::{
    llamafactory_template, vision_token_names, vision_tokens, ChatFormat, EmptyThought, Sample,
    SampleBuilder, SampleImage, GLM4V_EOS, IGNORE_INDEX, QWEN2_VL_SYSTEM,
};
pub use truncate::{answer_cut, infer_seqlen, snap_cut, vision_blocks, Block, VisionTokens};
