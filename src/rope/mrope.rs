//! 3-D (temporal, height, width) position ids of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V and
//! Qwen3.5 (and their MoE variants).
//!
//! The semantics are those of transformers 5.24's `get_rope_index` of each model (see
//! [`ModelType`] for how their videos differ):
//!
//! - Tokens are classified as text (0), image (1) or video (2): by comparing the id with
//!   `image_token_id` / `video_token_id` (what the processor's `mm_token_type_ids` holds) or
//!   from explicit `mm_token_type_ids`. Tokens masked out by `attention_mask` are dropped first.
//! - Each maximal run of image (or video) tokens is one vision input and takes the next row of
//!   `image_grid_thw` (`video_grid_thw`); rows are consumed in batch order (row 0's inputs first).
//!   A run must hold exactly `t * (h / m) * (w / m)` tokens (`m = spatial_merge_size`, floor
//!   division, as transformers does).
//! - A text run of `n` tokens starting at position `p` gets `p, p+1, ..., p+n-1` on all three
//!   axes; the next segment starts at `p + n`.
//! - A vision run starting at `p` gets, for frame group `i`, row `y`, column `x` (row-major):
//!   `(p + trunc(i * interval), p + y, p + x)`; the next segment starts at `p + max(h, w) / m`
//!   (the temporal extent is not counted, as in transformers). `interval` is 1 except for
//!   Qwen2.5-VL videos (`tokens_per_second * second_per_grid_ts`, see [`TimeInterval`]).
//! - `rope_delta = max(all positions) + 1 - kept_tokens`; padding gets position 0 on every axis.
//!
//! Rows are independent once their vision inputs have been matched with grids, so the batch
//! is computed row-parallel (rayon), writing straight into the caller's `[3, batch, seq]` buffer.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::rope::time::{Seconds, SecondsValue, TimeInterval, TokensPerSecond};
use crate::value_err;

/// `mm_token_type_ids` value of a text token.
pub const KIND_TEXT: u8 = 0;
/// `mm_token_type_ids` value of an image token.
pub const KIND_IMAGE: u8 = 1;
/// `mm_token_type_ids` value of a video token.
pub const KIND_VIDEO: u8 = 2;

/// The patch grid of one image or video, as in the processor's `image_grid_thw` /
/// `video_grid_thw`: temporal patches, height patches, width patches (before spatial merging).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GridThw {
    pub t: i64,
    pub h: i64,
    pub w: i64,
}

impl GridThw {
    pub const fn new(t: i64, h: i64, w: i64) -> Self {
        GridThw { t, h, w }
    }

    /// `name[index] = (t, h, w)` must have every dimension >= 1.
    pub fn check(&self, name: &str, index: usize) -> Result<()> {
        if self.t < 1 || self.h < 1 || self.w < 1 {
            return Err(value_err!(
                "{name}[{index}] = ({}, {}, {}): every grid dimension must be >= 1",
                self.t,
                self.h,
                self.w
            ));
        }
        Ok(())
    }

    /// The grid as the language model sees it: `(t, h / merge, w / merge)` (floor division).
    #[inline]
    pub fn llm_grid(&self, spatial_merge_size: i64) -> (i64, i64, i64) {
        (
            self.t,
            self.h / spatial_merge_size,
            self.w / spatial_merge_size,
        )
    }

    /// How many tokens this input occupies in the sequence: `t * (h / m) * (w / m)`, or `None`
    /// when that overflows (no sequence can hold it).
    pub fn token_count(&self, spatial_merge_size: i64) -> Option<usize> {
        let (t, h, w) = self.llm_grid(spatial_merge_size);
        let n = t.checked_mul(h)?.checked_mul(w)?;
        usize::try_from(n).ok()
    }

    /// How far the running position moves after this input: `max(h, w) / merge`.
    #[inline]
    pub fn advance(&self, spatial_merge_size: i64) -> i64 {
        self.h.max(self.w) / spatial_merge_size
    }
}

impl std::fmt::Display for GridThw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {}, {})", self.t, self.h, self.w)
    }
}

/// Which model's `get_rope_index` to follow (transformers `config.model_type`).
///
/// Images are placed the same way by all of them. Videos differ:
/// - Qwen2-VL: one block per video, temporal positions spaced by 1.
/// - Qwen2.5-VL: one block per video, temporal positions spaced by
///   `tokens_per_second * second_per_grid_ts`.
/// - Qwen3-VL, Qwen3.5, GLM-4.1V (and their MoE variants): each frame is its own block (a text
///   timestamp between frames), so a `video_grid_thw` row `(t, h, w)` stands for `t` rows
///   `(1, h, w)`, one per block, as their `get_rope_index` splits it.
/// - GLM-4.1V also marks video frames with the image token: an `image_token_id` token is a
///   video token when it lies between `<|begin_of_video|>` and `<|end_of_video|>` (the
///   processor's `mm_token_type_ids` rule), an image token elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ModelType {
    /// Qwen2-VL and QVQ (`"qwen2_vl"`).
    #[default]
    Qwen2Vl,
    /// Qwen2.5-VL (`"qwen2_5_vl"`).
    Qwen2_5Vl,
    /// Qwen3-VL, dense (`"qwen3_vl"`).
    Qwen3Vl,
    /// Qwen3-VL, mixture of experts (`"qwen3_vl_moe"`).
    Qwen3VlMoe,
    /// GLM-4.1V / GLM-4.5V dense (`"glm4v"`).
    Glm4v,
    /// GLM-4.5V mixture of experts (`"glm4v_moe"`).
    Glm4vMoe,
    /// Qwen3.5, dense (`"qwen3_5"`).
    Qwen3_5,
    /// Qwen3.5, mixture of experts (`"qwen3_5_moe"`).
    Qwen3_5Moe,
}

impl ModelType {
    /// Every supported type, in the order error messages list them.
    pub const ALL: [ModelType; 8] = [
        ModelType::Qwen2Vl,
        ModelType::Qwen2_5Vl,
        ModelType::Qwen3Vl,
        ModelType::Qwen3VlMoe,
        ModelType::Glm4v,
        ModelType::Glm4vMoe,
        ModelType::Qwen3_5,
        ModelType::Qwen3_5Moe,
    ];

    /// Parses transformers' `model_type` string (one of [`ModelType::supported`]).
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                value_err!(
                    "model_type must be one of {}, got {name:?}",
                    Self::supported()
                )
            })
    }

    /// The supported names, quoted and comma-separated (for messages).
    pub fn supported() -> String {
        Self::ALL
            .iter()
            .map(|m| format!("'{}'", m.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelType::Qwen2Vl => "qwen2_vl",
            ModelType::Qwen2_5Vl => "qwen2_5_vl",
            ModelType::Qwen3Vl => "qwen3_vl",
            ModelType::Qwen3VlMoe => "qwen3_vl_moe",
            ModelType::Glm4v => "glm4v",
            ModelType::Glm4vMoe => "glm4v_moe",
            ModelType::Qwen3_5 => "qwen3_5",
            ModelType::Qwen3_5Moe => "qwen3_5_moe",
        }
    }

    /// Whether each video frame is its own vision block (timestamps between frames).
    pub fn splits_video_frames(self) -> bool {
        !matches!(self, ModelType::Qwen2Vl | ModelType::Qwen2_5Vl)
    }

    /// Whether video frames use the image token inside begin/end-of-video markers (GLM-4.1V).
    pub fn marks_videos_by_blocks(self) -> bool {
        matches!(self, ModelType::Glm4v | ModelType::Glm4vMoe)
    }
}

/// The model settings `get_rope_index` reads from the model config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MropeConfig {
    pub model_type: ModelType,
    /// `vision_config.spatial_merge_size` (2 in every released model).
    pub spatial_merge_size: i64,
    /// `image_token_id` (Qwen `<|image_pad|>` 151655, GLM-4.1V `<|image|>` 151343, GLM-4.5V MoE
    /// 151363, Qwen3.5 248056).
    pub image_token_id: i64,
    /// `video_token_id` (Qwen `<|video_pad|>` 151656; unused by GLM-4.1V, whose frames carry
    /// the image token).
    pub video_token_id: i64,
    /// `vision_config.tokens_per_second` (Qwen2.5-VL only; transformers' default 4, the
    /// released Qwen2.5-VL checkpoints use 2).
    pub tokens_per_second: TokensPerSecond,
    /// GLM-4.1V's `video_start_token_id` / `video_end_token_id` (`<|begin_of_video|>` 151341,
    /// `<|end_of_video|>` 151342); required for `glm4v` / `glm4v_moe` when token kinds come
    /// from the ids, unused otherwise.
    pub video_start_token_id: Option<i64>,
    pub video_end_token_id: Option<i64>,
}

impl Default for MropeConfig {
    fn default() -> Self {
        Self::qwen2_vl()
    }
}

impl MropeConfig {
    /// transformers' `Qwen2VLConfig()` defaults.
    pub const fn qwen2_vl() -> Self {
        MropeConfig {
            model_type: ModelType::Qwen2Vl,
            spatial_merge_size: 2,
            image_token_id: 151655,
            video_token_id: 151656,
            tokens_per_second: TokensPerSecond::Int(4),
            video_start_token_id: None,
            video_end_token_id: None,
        }
    }

    /// transformers' `Qwen2_5_VLConfig()` defaults.
    pub const fn qwen2_5_vl() -> Self {
        MropeConfig {
            model_type: ModelType::Qwen2_5Vl,
            ..Self::qwen2_vl()
        }
    }

    /// The defaults of transformers' config class of `model_type` (`Qwen3VLConfig()`,
    /// `Glm4vConfig()`, `Qwen3_5Config()`, ...): token ids and merge size.
    pub const fn for_model(model_type: ModelType) -> Self {
        match model_type {
            ModelType::Qwen2Vl => Self::qwen2_vl(),
            ModelType::Qwen2_5Vl => Self::qwen2_5_vl(),
            ModelType::Qwen3Vl | ModelType::Qwen3VlMoe => MropeConfig {
                model_type,
                ..Self::qwen2_vl()
            },
            ModelType::Glm4v | ModelType::Glm4vMoe => MropeConfig {
                model_type,
                // Glm4vMoeConfig's image / video ids differ from Glm4vConfig's; the markers agree.
                image_token_id: if matches!(model_type, ModelType::Glm4v) {
                    151343
                } else {
                    151363
                },
                video_token_id: if matches!(model_type, ModelType::Glm4v) {
                    151344
                } else {
                    151364
                },
                video_start_token_id: Some(151341),
                video_end_token_id: Some(151342),
                ..Self::qwen2_vl()
            },
            ModelType::Qwen3_5 | ModelType::Qwen3_5Moe => MropeConfig {
                model_type,
                image_token_id: 248056,
                video_token_id: 248057,
                ..Self::qwen2_vl()
            },
        }
    }

    pub fn check(&self) -> Result<()> {
        if self.spatial_merge_size < 1 {
            return Err(value_err!(
                "spatial_merge_size must be >= 1, got {}",
                self.spatial_merge_size
            ));
        }
        if let TokensPerSecond::Float(v) = self.tokens_per_second {
            if !v.is_finite() {
                return Err(value_err!("tokens_per_second must be finite, got {v}"));
            }
        }
        Ok(())
    }

    /// The temporal spacing of a video with this config; `seconds` is its `second_per_grid_ts`
    /// entry (`None`: not given, transformers then uses the Python int 1).
    pub fn video_interval(&self, seconds: Option<Seconds>) -> Result<TimeInterval> {
        match self.model_type {
            ModelType::Qwen2_5Vl => {
                let seconds = seconds.unwrap_or(Seconds {
                    value: SecondsValue::Int(1),
                    from_tensor: false,
                });
                TimeInterval::qwen2_5_vl(self.tokens_per_second, seconds)
            }
            _ => Ok(TimeInterval::Int(1)),
        }
    }

    /// GLM-4.1V's video markers, required when kinds come from the ids.
    fn video_markers(&self) -> Result<Option<(i64, i64)>> {
        if !self.model_type.marks_videos_by_blocks() {
            return Ok(None);
        }
        match (self.video_start_token_id, self.video_end_token_id) {
            (Some(start), Some(end)) => Ok(Some((start, end))),
            _ => Err(value_err!(
                "model_type={:?} needs video_start_token_id and video_end_token_id (the config's \
                 <|begin_of_video|> / <|end_of_video|> ids) to tell video frames from images",
                self.model_type.name()
            )),
        }
    }
}

/// One piece of a sequence: a run of text tokens, or one image / video.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Segment {
    /// `len` text tokens.
    Text(usize),
    /// One image (`t` is 1 for images from the processor; any `t >= 1` is accepted).
    Image(GridThw),
    /// One video and the spacing of its temporal positions ([`MropeConfig::video_interval`]).
    Video(GridThw, TimeInterval),
}

impl Segment {
    /// Number of tokens of the segment (`None` if a grid's count overflows).
    pub fn token_count(&self, spatial_merge_size: i64) -> Option<usize> {
        match self {
            Segment::Text(n) => Some(*n),
            Segment::Image(g) | Segment::Video(g, _) => g.token_count(spatial_merge_size),
        }
    }
}

/// The positions of one sequence (kept tokens only, in order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SequencePositions {
    /// Temporal axis.
    pub t: Vec<i64>,
    /// Height axis.
    pub h: Vec<i64>,
    /// Width axis.
    pub w: Vec<i64>,
    /// `max(all positions) + 1 - len` (0 for an empty sequence): the offset transformers adds
    /// to the 1-D position of each generated token (`position = index + rope_delta`).
    pub rope_delta: i64,
    /// Where a text segment appended to this sequence would start in `get_rope_index`'s own
    /// walk (differs from `len + rope_delta` only after a Qwen2.5-VL video whose temporal
    /// positions outrun `max(h, w) / merge`).
    pub next_position: i64,
}

impl SequencePositions {
    pub fn len(&self) -> usize {
        self.t.len()
    }

    pub fn is_empty(&self) -> bool {
        self.t.is_empty()
    }

    /// `[t, h, w]` of token `i`.
    pub fn get(&self, i: usize) -> Option<[i64; 3]> {
        Some([*self.t.get(i)?, *self.h.get(i)?, *self.w.get(i)?])
    }
}

/// Integer element of the position output (the dtype of `input_ids`: int32 or int64).
pub trait PositionInt: Copy + Send + Sync + Default + 'static {
    /// Converts with wrap-around, as PyTorch's assignment into a narrower integer tensor does.
    fn from_i64(value: i64) -> Self;
}

impl PositionInt for i64 {
    #[inline(always)]
    fn from_i64(value: i64) -> Self {
        value
    }
}

impl PositionInt for i32 {
    #[inline(always)]
    fn from_i64(value: i64) -> Self {
        value as i32
    }
}

/// Integer element of `input_ids`.
pub trait TokenId: Copy + Send + Sync + 'static {
    fn to_i64(self) -> i64;
}

impl TokenId for i64 {
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self
    }
}

impl TokenId for i32 {
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
}

/// Element of `attention_mask`: a token is kept where the value is non-zero (`tensor.bool()`).
pub trait MaskValue: Copy + Send + Sync + 'static {
    fn is_kept(self) -> bool;
}

macro_rules! mask_value_int {
    ($($t:ty),*) => {$(
        impl MaskValue for $t {
            #[inline(always)]
            fn is_kept(self) -> bool {
                self != 0
            }
        }
    )*};
}
mask_value_int!(u8, i8, i16, u16, i32, u32, i64, u64);

impl MaskValue for bool {
    #[inline(always)]
    fn is_kept(self) -> bool {
        self
    }
}

impl MaskValue for f32 {
    #[inline(always)]
    fn is_kept(self) -> bool {
        // NaN counts as kept, as in `tensor.bool()`.
        self != 0.0
    }
}

impl MaskValue for f64 {
    #[inline(always)]
    fn is_kept(self) -> bool {
        self != 0.0
    }
}

/// How tokens are classified as text / image / video.
#[derive(Debug, Clone, Copy)]
pub enum TokenKinds<'a> {
    /// Compare each id with the config's `image_token_id` and `video_token_id`.
    FromIds,
    /// Explicit `mm_token_type_ids` (0 text, 1 image, 2 video), same layout as `input_ids`.
    TypeIds(&'a [i64]),
}

/// A padded batch, row-major `[batch, seq]`, as `get_rope_index` receives it.
#[derive(Debug, Clone, Copy)]
pub struct BatchInput<'a, I, M> {
    pub input_ids: &'a [I],
    pub batch: usize,
    pub seq: usize,
    pub kinds: TokenKinds<'a>,
    pub attention_mask: Option<&'a [M]>,
    /// `None` and `Some(&[])` differ only in error messages.
    pub image_grid_thw: Option<&'a [GridThw]>,
    pub video_grid_thw: Option<&'a [GridThw]>,
    /// One entry per row of `video_grid_thw` (Qwen2.5-VL only).
    pub second_per_grid_ts: Option<&'a [Seconds]>,
}

/// A maximal run of kept tokens of one kind.
#[derive(Debug, Clone, Copy)]
struct Run {
    kind: u8,
    len: usize,
    /// Column of the run's first token (for error messages).
    start_col: usize,
}

/// What the first pass learns about a row.
#[derive(Debug, Default)]
struct RowScan {
    runs: Vec<Run>,
    kept: usize,
    /// First and last kept column.
    span: Option<(usize, usize)>,
    images: usize,
    videos: usize,
}

impl RowScan {
    /// Whether the kept tokens form one contiguous block (no mask, or padding only at the ends).
    fn kept_contiguous(&self) -> bool {
        match self.span {
            Some((first, last)) => last - first + 1 == self.kept,
            None => true,
        }
    }
}

/// Runs of one row token by token, skipping tokens that are not kept (the general case: a mask
/// with holes). Rows whose kept tokens are one block go through [`scan_block`].
fn scan_row(kind_at: impl Fn(usize) -> u8, kept_at: impl Fn(usize) -> bool, seq: usize) -> RowScan {
    let mut scan = RowScan::default();
    let mut first_kept = None;
    let mut last_kept = 0;
    let mut col = 0;
    while col < seq {
        if !kept_at(col) {
            col += 1;
            continue;
        }
        // A new run starts here; extend it over kept tokens of the same kind (skipping masked
        // ones, which transformers drops before grouping).
        let kind = kind_at(col);
        let start = col;
        let mut len = 1;
        last_kept = col;
        col += 1;
        while col < seq {
            if kept_at(col) {
                if kind_at(col) != kind {
                    break;
                }
                len += 1;
                last_kept = col;
            }
            col += 1;
        }
        first_kept.get_or_insert(start);
        match kind {
            KIND_IMAGE => scan.images += 1,
            KIND_VIDEO => scan.videos += 1,
            _ => {}
        }
        scan.kept += len;
        scan.runs.push(Run {
            kind,
            len,
            start_col: start,
        });
    }
    scan.span = first_kept.map(|first| (first, last_kept));
    scan
}

/// Index of the first element of `xs` for which `pred` holds. Checks blocks of 16 without
/// early exit first (vectorisable), then locates the hit inside the block.
#[inline]
fn find_first<X: Copy>(xs: &[X], pred: impl Fn(X) -> bool) -> Option<usize> {
    let mut chunks = xs.chunks_exact(16);
    let mut base = 0;
    for chunk in &mut chunks {
        if chunk.iter().fold(false, |any, &x| any | pred(x)) {
            return chunk.iter().position(|&x| pred(x)).map(|p| base + p);
        }
        base += 16;
    }
    chunks
        .remainder()
        .iter()
        .position(|&x| pred(x))
        .map(|p| base + p)
}

/// `scan_row` for a block of kept tokens `[offset, offset + xs.len())` (the common case:
/// no mask, or padding only at the ends): runs are found by searching slices. `run_len(rest,
/// kind)` is the length of the leading run of `kind` in `rest`; callers match on the kind so
/// that each search is a plain comparison the compiler vectorises.
fn scan_block<X: Copy>(
    xs: &[X],
    offset: usize,
    kind_of: impl Fn(X) -> u8,
    run_len: impl Fn(&[X], u8) -> usize,
) -> RowScan {
    let mut scan = RowScan::default();
    let mut i = 0;
    while i < xs.len() {
        let kind = kind_of(xs[i]);
        let len = 1 + run_len(&xs[i + 1..], kind);
        match kind {
            KIND_IMAGE => scan.images += 1,
            KIND_VIDEO => scan.videos += 1,
            _ => {}
        }
        scan.runs.push(Run {
            kind,
            len,
            start_col: offset + i,
        });
        i += len;
    }
    scan.kept = xs.len();
    if !xs.is_empty() {
        scan.span = Some((offset, offset + xs.len() - 1));
    }
    scan
}

/// Length of the leading run of `kind` in `ids` (kinds by token id).
fn id_run_len<I: TokenId>(ids: &[I], kind: u8, image: i64, video: i64) -> usize {
    let end = match kind {
        KIND_IMAGE => find_first(ids, |x: I| x.to_i64() != image),
        KIND_VIDEO => find_first(ids, |x: I| x.to_i64() != video),
        _ => find_first(ids, |x: I| (x.to_i64() == image) | (x.to_i64() == video)),
    };
    end.unwrap_or(ids.len())
}

/// The kept columns `[first, last]` of a mask row if they are contiguous (or the row is empty:
/// `Some(None)`); `None` if there are holes.
fn contiguous_span<M: MaskValue>(mask: &[M]) -> Option<Option<(usize, usize)>> {
    let Some(first) = mask.iter().position(|m| m.is_kept()) else {
        return Some(None);
    };
    let last = mask.iter().rposition(|m| m.is_kept()).unwrap_or(first);
    let holes = mask[first..=last]
        .iter()
        .fold(false, |any, m| any | !m.is_kept());
    (!holes).then_some(Some((first, last)))
}

fn kind_name(kind: u8) -> &'static str {
    if kind == KIND_IMAGE {
        "image"
    } else {
        "video"
    }
}

fn check_grids(name: &str, grids: Option<&[GridThw]>) -> Result<()> {
    for (i, grid) in grids.unwrap_or(&[]).iter().enumerate() {
        grid.check(name, i)?;
    }
    Ok(())
}

/// Matches the vision runs of all rows with the grids, in batch order, and checks each run's
/// token count. Returns each row's first image and first video index.
fn assign_grids(
    scans: &[RowScan],
    row_label: &dyn Fn(usize) -> String,
    images: Option<&[GridThw]>,
    videos: Option<&[GridThw]>,
    spatial_merge_size: i64,
    video_frames: bool,
) -> Result<Vec<(usize, usize)>> {
    let total_images: usize = scans.iter().map(|s| s.images).sum();
    let total_videos: usize = scans.iter().map(|s| s.videos).sum();
    for (name, total, grids, token) in [
        ("image_grid_thw", total_images, images, "image_token_id"),
        ("video_grid_thw", total_videos, videos, "video_token_id"),
    ] {
        let rows = if video_frames && name == "video_grid_thw" {
            "frame(s) in all (this model_type makes each video frame its own block)"
        } else {
            "row(s)"
        };
        match grids {
            None if total > 0 => {
                return Err(value_err!(
                    "{name} is None but the sequences hold {total} {} block(s) (runs of {token} tokens)",
                    &name[..5]
                ))
            }
            Some(grids) if grids.len() != total => {
                return Err(value_err!(
                    "{name} has {} {rows} but the sequences hold {total} {} block(s) (runs of {token} tokens); \
                     each block takes one, in batch order",
                    grids.len(),
                    &name[..5]
                ))
            }
            _ => {}
        }
    }
    let images = images.unwrap_or(&[]);
    let videos = videos.unwrap_or(&[]);
    let mut offsets = Vec::with_capacity(scans.len());
    let (mut next_image, mut next_video) = (0usize, 0usize);
    for (row, scan) in scans.iter().enumerate() {
        offsets.push((next_image, next_video));
        let (mut block_image, mut block_video) = (0usize, 0usize);
        for run in &scan.runs {
            let (name, index, grid, block) = match run.kind {
                KIND_IMAGE => {
                    let r = (
                        "image_grid_thw",
                        next_image,
                        images[next_image],
                        block_image,
                    );
                    next_image += 1;
                    block_image += 1;
                    r
                }
                KIND_VIDEO => {
                    let r = (
                        if video_frames {
                            "video_grid_thw frame"
                        } else {
                            "video_grid_thw"
                        },
                        next_video,
                        videos[next_video],
                        block_video,
                    );
                    next_video += 1;
                    block_video += 1;
                    r
                }
                _ => continue,
            };
            let expected = grid.token_count(spatial_merge_size);
            if expected != Some(run.len) {
                let (t, h, w) = grid.llm_grid(spatial_merge_size);
                let expected = match expected {
                    Some(n) => n.to_string(),
                    None => "too many".to_string(),
                };
                return Err(value_err!(
                    "{}: {} block {block} (starting at column {}) has {} tokens but {name}[{index}] = {grid} \
                     needs t * (h // {m}) * (w // {m}) = {t} * {h} * {w} = {expected} (spatial_merge_size = {m})",
                    row_label(row),
                    kind_name(run.kind),
                    run.start_col,
                    run.len,
                    m = spatial_merge_size,
                ));
            }
        }
    }
    Ok(offsets)
}

fn video_intervals(
    cfg: &MropeConfig,
    videos: Option<&[GridThw]>,
    second_per_grid_ts: Option<&[Seconds]>,
) -> Result<Vec<TimeInterval>> {
    let n_videos = videos.map_or(0, |v| v.len());
    if let Some(seconds) = second_per_grid_ts {
        if cfg.model_type != ModelType::Qwen2_5Vl {
            return Err(value_err!(
                "second_per_grid_ts is only used by model_type='qwen2_5_vl' (got model_type='{}'); \
                 this model spaces video frames by 1",
                cfg.model_type.name()
            ));
        }
        if seconds.len() != n_videos {
            return Err(value_err!(
                "second_per_grid_ts has {} value(s) but video_grid_thw has {n_videos} row(s); one value per video",
                seconds.len()
            ));
        }
    }
    (0..n_videos)
        .map(|i| {
            cfg.video_interval(second_per_grid_ts.map(|s| s[i]))
                .map_err(|err| match err {
                    Error::Value(msg) => value_err!("second_per_grid_ts[{i}]: {msg}"),
                    other => other,
                })
        })
        .collect()
}

/// The grids of the video blocks: `video_grid_thw` itself, or, for models that make each frame
/// its own block, every row `(t, h, w)` as `t` rows `(1, h, w)` (transformers'
/// `repeat_interleave`). `tokens` bounds the frame count (each block holds a token) so that a
/// huge `t` is refused before anything is allocated.
fn video_blocks(
    cfg: &MropeConfig,
    videos: Option<&[GridThw]>,
    tokens: usize,
) -> Result<Option<Vec<GridThw>>> {
    let Some(videos) = videos else {
        return Ok(None);
    };
    if !cfg.model_type.splits_video_frames() {
        return Ok(Some(videos.to_vec()));
    }
    let frames = videos
        .iter()
        .try_fold(0i64, |n, g| n.checked_add(g.t))
        .filter(|&n| n <= tokens as i64)
        .ok_or_else(|| {
            value_err!(
                "video_grid_thw: the videos have more frames than input_ids has tokens ({tokens}); \
                 model_type='{}' makes each frame its own block of tokens",
                cfg.model_type.name()
            )
        })?;
    let mut out = Vec::with_capacity(frames as usize);
    for g in videos {
        out.extend((0..g.t).map(|_| GridThw::new(1, g.h, g.w)));
    }
    Ok(Some(out))
}

/// GLM-4.1V's token kinds, as its processor's `create_mm_token_type_ids`: an `image` token is
/// a video token (2) where more `start` than `end` markers precede it (itself included), an
/// image token (1) elsewhere; everything else is text (0). Rows of `seq` ids.
fn marker_kinds<I: TokenId>(
    ids: &[I],
    seq: usize,
    image: i64,
    (start, end): (i64, i64),
) -> Vec<i64> {
    let mut kinds = vec![0i64; ids.len()];
    if seq == 0 {
        return kinds;
    }
    kinds
        .par_chunks_mut(seq)
        .zip(ids.par_chunks(seq))
        .for_each(|(kinds, ids)| {
            let mut depth = 0i64;
            for (k, &id) in kinds.iter_mut().zip(ids) {
                let id = id.to_i64();
                depth += (id == start) as i64 - (id == end) as i64;
                if id == image {
                    *k = if depth > 0 {
                        KIND_VIDEO as i64
                    } else {
                        KIND_IMAGE as i64
                    };
                }
            }
        });
    kinds
}

/// Writes the positions of `segments` (whose token counts sum to `t.len()`) into `t`, `h`, `w`.
/// Returns `(max position or i64::MIN if empty, next position)`.
fn write_segments<T: PositionInt>(
    segments: impl Iterator<Item = Segment>,
    spatial_merge_size: i64,
    t: &mut [T],
    h: &mut [T],
    w: &mut [T],
) -> (i64, i64) {
    let mut pos = 0i64;
    let mut max = i64::MIN;
    let mut offset = 0usize;
    for segment in segments {
        match segment {
            Segment::Text(n) => {
                let ts = &mut t[offset..offset + n];
                for (k, v) in ts.iter_mut().enumerate() {
                    *v = T::from_i64(pos + k as i64);
                }
                h[offset..offset + n].copy_from_slice(ts);
                w[offset..offset + n].copy_from_slice(ts);
                if n > 0 {
                    max = max.max(pos + n as i64 - 1);
                }
                offset += n;
                pos += n as i64;
            }
            Segment::Image(grid) | Segment::Video(grid, _) => {
                let interval = match segment {
                    Segment::Video(_, interval) => interval,
                    _ => TimeInterval::Int(1),
                };
                let (gt, gh, gw) = grid.llm_grid(spatial_merge_size);
                let (gh_u, gw_u) = (gh as usize, gw as usize);
                let n = gt as usize * gh_u * gw_u;
                let (ts, hs, ws) = (
                    &mut t[offset..offset + n],
                    &mut h[offset..offset + n],
                    &mut w[offset..offset + n],
                );
                if n > 0 {
                    // One frame group's h and w pattern, then repeated for each group.
                    let frame = gh_u * gw_u;
                    let rows = hs[..frame]
                        .chunks_exact_mut(gw_u)
                        .zip(ws[..frame].chunks_exact_mut(gw_u));
                    for (y, (h_row, w_row)) in rows.enumerate() {
                        h_row.fill(T::from_i64(pos + y as i64));
                        for (x, v) in w_row.iter_mut().enumerate() {
                            *v = T::from_i64(pos + x as i64);
                        }
                    }
                    for i in 1..gt as usize {
                        hs.copy_within(0..frame, i * frame);
                        ws.copy_within(0..frame, i * frame);
                    }
                    for i in 0..gt as usize {
                        let tv = T::from_i64(pos + interval.scale(i as i64));
                        ts[i * frame..(i + 1) * frame].fill(tv);
                    }
                    let t_max = interval.scale(0).max(interval.scale(gt - 1));
                    max = max.max(pos + t_max.max(gh - 1).max(gw - 1));
                }
                offset += n;
                pos += grid.advance(spatial_merge_size);
            }
        }
    }
    (max, pos)
}

/// The segments of one scanned row, with grids taken from `images[first_image..]` etc.
fn row_segments<'a>(
    scan: &'a RowScan,
    images: &'a [GridThw],
    videos: &'a [GridThw],
    intervals: &'a [TimeInterval],
    (first_image, first_video): (usize, usize),
) -> impl Iterator<Item = Segment> + 'a {
    let (mut next_image, mut next_video) = (first_image, first_video);
    scan.runs.iter().map(move |run| match run.kind {
        KIND_IMAGE => {
            next_image += 1;
            Segment::Image(images[next_image - 1])
        }
        KIND_VIDEO => {
            next_video += 1;
            Segment::Video(videos[next_video - 1], intervals[next_video - 1])
        }
        _ => Segment::Text(run.len),
    })
}

fn rope_delta(max: i64, kept: usize) -> i64 {
    if kept == 0 {
        0
    } else {
        max + 1 - kept as i64
    }
}

/// Positions of a segment list (one sequence with images / videos anywhere, e.g. inserted
/// in the middle of an answer). Grids must have every dimension >= 1.
pub fn positions_for_segments(
    segments: &[Segment],
    spatial_merge_size: i64,
) -> Result<SequencePositions> {
    if spatial_merge_size < 1 {
        return Err(value_err!(
            "spatial_merge_size must be >= 1, got {spatial_merge_size}"
        ));
    }
    let mut total = 0usize;
    for (i, segment) in segments.iter().enumerate() {
        if let Segment::Image(grid) | Segment::Video(grid, _) = segment {
            grid.check("segments", i)?;
            if grid.token_count(spatial_merge_size) == Some(0) {
                return Err(value_err!(
                    "segments[{i}] = {grid}: h and w must be >= spatial_merge_size = {spatial_merge_size} \
                     (the grid gives no tokens)"
                ));
            }
        }
        let n = segment
            .token_count(spatial_merge_size)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| {
                value_err!(
                    "segments[{i}]: the sequence would exceed {} tokens",
                    usize::MAX
                )
            })?;
        total = n;
    }
    let mut out = SequencePositions {
        t: vec![0; total],
        h: vec![0; total],
        w: vec![0; total],
        ..Default::default()
    };
    let (max, next) = write_segments(
        segments.iter().copied(),
        spatial_merge_size,
        &mut out.t,
        &mut out.h,
        &mut out.w,
    );
    out.rope_delta = rope_delta(max, total);
    out.next_position = next;
    Ok(out)
}

/// Splits one unpadded sequence of token ids into segments: runs of `image_token_id` take the
/// rows of `image_grid_thw` in order, runs of `video_token_id` those of `video_grid_thw`
/// (with `second_per_grid_ts[i]` for video `i`, Qwen2.5-VL only). Checks that every grid
/// is used exactly once and that each run has the grid's token count.
pub fn segments_for_sequence(
    ids: &[i64],
    image_grid_thw: &[GridThw],
    video_grid_thw: &[GridThw],
    second_per_grid_ts: Option<&[Seconds]>,
    cfg: &MropeConfig,
) -> Result<Vec<Segment>> {
    cfg.check()?;
    check_grids("image_grid_thw", Some(image_grid_thw))?;
    check_grids("video_grid_thw", Some(video_grid_thw))?;
    let mut intervals = video_intervals(cfg, Some(video_grid_thw), second_per_grid_ts)?;
    let blocks = video_blocks(cfg, Some(video_grid_thw), ids.len())?.unwrap_or_default();
    if cfg.model_type.splits_video_frames() {
        intervals = vec![TimeInterval::Int(1); blocks.len()];
    }
    let (image, video) = (cfg.image_token_id, cfg.video_token_id);
    let scan = match cfg.video_markers()? {
        Some(markers) => {
            let kinds = marker_kinds(ids, ids.len(), image, markers);
            scan_row(|col| kinds[col] as u8, |_| true, ids.len())
        }
        None => scan_row(|col| classify(ids[col], image, video), |_| true, ids.len()),
    };
    let scans = [scan];
    let offsets = assign_grids(
        &scans,
        &|_| "ids".to_string(),
        Some(image_grid_thw),
        Some(&blocks),
        cfg.spatial_merge_size,
        cfg.model_type.splits_video_frames(),
    )?;
    Ok(row_segments(&scans[0], image_grid_thw, &blocks, &intervals, offsets[0]).collect())
}

/// Positions of one unpadded sequence of token ids (images and videos anywhere, including
/// inside an answer): `positions_for_segments(segments_for_sequence(...))`.
pub fn positions_for_sequence(
    ids: &[i64],
    image_grid_thw: &[GridThw],
    video_grid_thw: &[GridThw],
    second_per_grid_ts: Option<&[Seconds]>,
    cfg: &MropeConfig,
) -> Result<SequencePositions> {
    let segments =
        segments_for_sequence(ids, image_grid_thw, video_grid_thw, second_per_grid_ts, cfg)?;
    positions_for_segments(&segments, cfg.spatial_merge_size)
}

#[inline(always)]
fn classify(id: i64, image: i64, video: i64) -> u8 {
    if id == image {
        KIND_IMAGE
    } else if id == video {
        KIND_VIDEO
    } else {
        KIND_TEXT
    }
}

/// Position ids `[3, batch, seq]` (row-major, written to `out_positions`) and rope deltas
/// `[batch]` (written to `out_deltas`) of a padded batch, as transformers' `get_rope_index`.
/// Every input is checked before anything is written; masked-out tokens get 0.
pub fn batch_positions<I: TokenId, M: MaskValue, T: PositionInt>(
    input: &BatchInput<'_, I, M>,
    cfg: &MropeConfig,
    out_positions: &mut [T],
    out_deltas: &mut [i64],
) -> Result<()> {
    cfg.check()?;
    let (batch, seq) = (input.batch, input.seq);
    let tokens = batch
        .checked_mul(seq)
        .ok_or_else(|| value_err!("input_ids shape ({batch}, {seq}) is too large"))?;
    if input.input_ids.len() != tokens {
        return Err(value_err!(
            "input_ids has {} elements, expected batch * seq = {tokens}",
            input.input_ids.len()
        ));
    }
    if let Some(mask) = input.attention_mask {
        if mask.len() != tokens {
            return Err(value_err!(
                "attention_mask has {} elements, expected batch * seq = {tokens}",
                mask.len()
            ));
        }
    }
    if let TokenKinds::TypeIds(types) = input.kinds {
        if types.len() != tokens {
            return Err(value_err!(
                "mm_token_type_ids has {} elements, expected batch * seq = {tokens}",
                types.len()
            ));
        }
        if let Some(bad) = types.iter().position(|&v| !(0..=2).contains(&v)) {
            return Err(value_err!(
                "mm_token_type_ids[{}, {}] = {}: expected 0 (text), 1 (image) or 2 (video)",
                bad / seq,
                bad % seq,
                types[bad]
            ));
        }
    }
    if out_positions.len() != 3 * tokens || out_deltas.len() != batch {
        return Err(value_err!(
            "output buffers have {} and {} elements, expected 3 * batch * seq = {} and batch = {batch}",
            out_positions.len(),
            out_deltas.len(),
            3 * tokens
        ));
    }
    check_grids("image_grid_thw", input.image_grid_thw)?;
    check_grids("video_grid_thw", input.video_grid_thw)?;
    let mut intervals = video_intervals(cfg, input.video_grid_thw, input.second_per_grid_ts)?;
    let blocks = video_blocks(cfg, input.video_grid_thw, tokens)?;
    if cfg.model_type.splits_video_frames() {
        intervals = vec![TimeInterval::Int(1); blocks.as_ref().map_or(0, |b| b.len())];
    }
    let video_grid_thw = blocks.as_deref();
    // GLM-4.1V: the kinds follow from the video markers, as its processor computes them.
    let marker_types = match (input.kinds, cfg.video_markers()?) {
        (TokenKinds::FromIds, Some(markers)) => Some(marker_kinds(
            input.input_ids,
            seq,
            cfg.image_token_id,
            markers,
        )),
        _ => None,
    };
    let kinds = match &marker_types {
        Some(types) => TokenKinds::TypeIds(types),
        None => input.kinds,
    };

    // Pass 1: runs of each row (parallel), then grids matched in batch order (sequential).
    let (image_id, video_id) = (cfg.image_token_id, cfg.video_token_id);
    let scans: Vec<RowScan> = (0..batch)
        .into_par_iter()
        .map(|row| {
            let base = row * seq;
            let mask = input.attention_mask.map(|m| &m[base..base + seq]);
            // Kept tokens as one block [first, last] where possible: then a slice search.
            let block = match mask {
                None => Some(if seq == 0 { None } else { Some((0, seq - 1)) }),
                Some(mask) => contiguous_span(mask),
            };
            match (kinds, block, mask) {
                (_, Some(None), _) => RowScan::default(),
                (TokenKinds::FromIds, Some(Some((first, last))), _) => {
                    let ids = &input.input_ids[base + first..=base + last];
                    scan_block(
                        ids,
                        first,
                        |id: I| classify(id.to_i64(), image_id, video_id),
                        |rest, kind| id_run_len(rest, kind, image_id, video_id),
                    )
                }
                (TokenKinds::TypeIds(types), Some(Some((first, last))), _) => scan_block(
                    &types[base + first..=base + last],
                    first,
                    |v: i64| v as u8,
                    |rest, kind| find_first(rest, |v: i64| v != kind as i64).unwrap_or(rest.len()),
                ),
                (TokenKinds::FromIds, None, Some(mask)) => {
                    let ids = &input.input_ids[base..base + seq];
                    scan_row(
                        |col| classify(ids[col].to_i64(), image_id, video_id),
                        |col| mask[col].is_kept(),
                        seq,
                    )
                }
                (TokenKinds::TypeIds(types), None, Some(mask)) => {
                    let types = &types[base..base + seq];
                    scan_row(|col| types[col] as u8, |col| mask[col].is_kept(), seq)
                }
                // Holes are only found in a mask.
                (_, None, None) => RowScan::default(),
            }
        })
        .collect();
    let offsets = assign_grids(
        &scans,
        &|row| format!("input_ids[{row}]"),
        input.image_grid_thw,
        video_grid_thw,
        cfg.spatial_merge_size,
        cfg.model_type.splits_video_frames(),
    )?;

    // Pass 2: write each row straight into its three planes (parallel).
    if tokens == 0 {
        out_deltas.fill(0);
        return Ok(());
    }
    let images = input.image_grid_thw.unwrap_or(&[]);
    let videos = video_grid_thw.unwrap_or(&[]);
    let merge = cfg.spatial_merge_size;
    let plane = batch * seq;
    let (plane_t, rest) = out_positions.split_at_mut(plane);
    let (plane_h, plane_w) = rest.split_at_mut(plane);
    plane_t
        .par_chunks_mut(seq)
        .zip(plane_h.par_chunks_mut(seq))
        .zip(plane_w.par_chunks_mut(seq))
        .zip(out_deltas.par_iter_mut())
        .enumerate()
        .for_each(|(row, (((t, h), w), delta))| {
            let scan = &scans[row];
            let segments = row_segments(scan, images, videos, &intervals, offsets[row]);
            let max = match (scan.kept_contiguous(), input.attention_mask) {
                (false, Some(mask)) => {
                    // Holes in the mask: compute compactly, then scatter to the kept columns.
                    let mask = &mask[row * seq..(row + 1) * seq];
                    let n = scan.kept;
                    let mut compact = vec![T::default(); 3 * n];
                    let (ct, rest) = compact.split_at_mut(n);
                    let (ch, cw) = rest.split_at_mut(n);
                    let max = write_segments(segments, merge, ct, ch, cw).0;
                    let mut k = 0;
                    for col in 0..seq {
                        if mask[col].is_kept() {
                            t[col] = ct[k];
                            h[col] = ch[k];
                            w[col] = cw[k];
                            k += 1;
                        } else {
                            t[col] = T::default();
                            h[col] = T::default();
                            w[col] = T::default();
                        }
                    }
                    max
                }
                _ => {
                    // Kept tokens are one block (no mask, or padding only at the ends).
                    let (first, last) = scan.span.unwrap_or((0, 0));
                    let end = if scan.kept == 0 { 0 } else { last + 1 };
                    for plane in [&mut *t, &mut *h, &mut *w] {
                        plane[..first].fill(T::default());
                        plane[end..].fill(T::default());
                    }
                    write_segments(
                        segments,
                        merge,
                        &mut t[first..end],
                        &mut h[first..end],
                        &mut w[first..end],
                    )
                    .0
                }
            };
            *delta = rope_delta(max, scan.kept);
        });
    Ok(())
}
