//! Truncation that never cuts an image block, and the image blocks of a token sequence.

/// LLaMA-Factory 0.9.5's `infer_seqlen` (data/processor/processor_utils.py): how many source
/// (prompt) and target (answer) tokens a turn keeps under `cutoff`. The float arithmetic is
/// Python's (f64, truncation by `int`).
pub fn infer_seqlen(source_len: usize, target_len: usize, cutoff: usize) -> (usize, usize) {
    let max_target = if target_len * 2 < cutoff {
        cutoff
    } else if source_len * 2 < cutoff {
        cutoff - source_len
    } else {
        let ratio = target_len as f64 / (source_len + target_len) as f64;
        (cutoff as f64 * ratio) as usize
    };
    let new_target = max_target.min(target_len);
    let max_source = cutoff.saturating_sub(new_target);
    (max_source.min(source_len), new_target)
}

/// The special tokens that make up a vision block: `<|vision_start|>`, a run of pads,
/// `<|vision_end|>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionTokens {
    pub vision_start: i64,
    pub vision_end: i64,
    pub image_pad: i64,
    pub video_pad: i64,
}

impl VisionTokens {
    /// Qwen2-VL's ids (151652, 151653, 151655, 151656).
    pub const QWEN2_VL: VisionTokens = VisionTokens {
        vision_start: 151652,
        vision_end: 151653,
        image_pad: 151655,
        video_pad: 151656,
    };

    /// Whether `id` is one of the block's tokens (the ones whose labels are masked).
    #[inline]
    pub fn is_visual(&self, id: i64) -> bool {
        id == self.vision_start
            || id == self.vision_end
            || id == self.image_pad
            || id == self.video_pad
    }
}

/// One vision block of a sequence: a maximal run of image (or video) pads at `pads_start..pads_end`,
/// with the `<|vision_start|>` before it and the `<|vision_end|>` after it when present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// First token of the block (the `<|vision_start|>` if there is one, else the first pad).
    pub start: usize,
    /// One past the last token (past the `<|vision_end|>` if there is one).
    pub end: usize,
    pub pads_start: usize,
    pub pads_end: usize,
    /// Whether the pads are video pads.
    pub video: bool,
    /// Whether both the `<|vision_start|>` and the `<|vision_end|>` are there.
    pub complete: bool,
}

impl Block {
    pub fn pads(&self) -> usize {
        self.pads_end - self.pads_start
    }

    /// Whether cutting the sequence before token `cut` would split this block.
    #[inline]
    pub fn is_split_by(&self, cut: usize) -> bool {
        self.start < cut && cut < self.end
    }
}

/// The vision blocks of `ids`, in order. A `<|vision_start|>` or `<|vision_end|>` that is not
/// next to a run of pads is not part of any block.
pub fn vision_blocks(ids: &[i64], tokens: &VisionTokens) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut i = 0;
    let n = ids.len();
    while i < n {
        let id = ids[i];
        if id != tokens.image_pad && id != tokens.video_pad {
            i += 1;
            continue;
        }
        let pads_start = i;
        while i < n && ids[i] == id {
            i += 1;
        }
        let pads_end = i;
        let has_start = pads_start > 0 && ids[pads_start - 1] == tokens.vision_start;
        let has_end = pads_end < n && ids[pads_end] == tokens.vision_end;
        blocks.push(Block {
            start: if has_start {
                pads_start - 1
            } else {
                pads_start
            },
            end: if has_end { pads_end + 1 } else { pads_end },
            pads_start,
            pads_end,
            video: id == tokens.video_pad,
            complete: has_start && has_end,
        });
        if has_end {
            i += 1;
        }
    }
    blocks
}

/// The largest cut `<= cut` that splits none of `blocks` (sorted, non-overlapping).
pub fn snap_cut(blocks: &[Block], cut: usize) -> usize {
    match blocks.iter().find(|b| b.is_split_by(cut)) {
        Some(b) => b.start,
        None => cut,
    }
}

/// Where an answer `ids` is cut so that it keeps at most `keep` tokens (LLaMA-Factory's split,
/// see [`infer_seqlen`]) and no image block is cut: a cut inside a block moves to the start of
/// that block, so every block wholly inside the first `keep` tokens is kept and a block that
/// straddles the cut goes. `bridge`: the token ids of the bridge text written right before a
/// re-affirmed image (empty: none); when they stand right before the straddling block they go
/// with it (a cut inside them moves to their start too), so that no kept text ends in a bridge
/// whose image was cut off. Returns the number of tokens kept, `<= keep.min(ids.len())`.
pub fn answer_cut(ids: &[i64], keep: usize, tokens: &VisionTokens, bridge: &[i64]) -> usize {
    let keep = keep.min(ids.len());
    // The first block that ends after the cut is the only one the cut can split.
    match vision_blocks(ids, tokens)
        .into_iter()
        .find(|b| b.end > keep)
    {
        None => keep,
        Some(b) => {
            let n = bridge.len();
            let start = if n > 0 && b.start >= n && ids[b.start - n..b.start] == *bridge {
                b.start - n
            } else {
                b.start
            };
            keep.min(start)
        }
    }
}
