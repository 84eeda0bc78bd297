//! One DVR training sample: the answer with re-affirmed images inserted, its token ids, labels
//! (prompt and every visual token masked) and M-RoPE positions, truncated to a cutoff without
//! cutting an image block (every re-affirmed image wholly inside the kept part stays).

use std::sync::Arc;

use super::policy::{downscaled_size, insert_text, plan_insertions, Insertion, Policy};
use super::truncate::{answer_cut, infer_seqlen, VisionTokens};
use crate::error::Result;
use crate::rope::{
    image_grid_thw, positions_for_sequence, GridThw, ImageSettings, ModelType, MropeConfig,
    SequencePositions,
};
use crate::triggers::{Detector, Vocab};
use crate::value_err;

/// The label of a token that is not trained on (PyTorch's and LLaMA-Factory's `IGNORE_INDEX`).
pub const IGNORE_INDEX: i64 = -100;

/// Qwen2-VL's default system prompt (LLaMA-Factory's `qwen2_vl` template and the chat template).
pub const QWEN2_VL_SYSTEM: &str = "You are a helpful assistant.";

/// LLaMA-Factory's `ReasoningTemplate` rule: an answer that holds neither thought marker gets
/// an empty thought before it (encoded on its own, trained on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmptyThought {
    /// `add_thought()`: `thought_words[0] + thought_words[1]` (`"<think>\n\n</think>\n\n"`).
    pub text: String,
    /// The stripped thought words; an answer holding either gets no empty thought.
    pub markers: (String, String),
}

impl EmptyThought {
    /// LLaMA-Factory's default thought words `("<think>\n", "\n</think>\n\n")`.
    pub fn think() -> EmptyThought {
        EmptyThought {
            text: "<think>\n\n</think>\n\n".to_string(),
            markers: ("<think>".to_string(), "</think>".to_string()),
        }
    }

    /// Whether `answer` gets the empty thought.
    pub fn applies_to(&self, answer: &str) -> bool {
        !answer.contains(self.markers.0.as_str()) && !answer.contains(self.markers.1.as_str())
    }
}

/// The text around a one-turn conversation, as LLaMA-Factory's template writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatFormat {
    /// Before the question (prefix, system block and the user's header).
    pub prompt_prefix: String,
    /// After the question, up to where the answer starts.
    pub prompt_suffix: String,
    /// Right before the answer, encoded with it (GLM's `"\n"`; empty for ChatML).
    pub answer_lead: String,
    /// After the answer (part of the trained target).
    pub answer_suffix: String,
    /// The empty thought of a reasoning template (None: a plain template).
    pub empty_thought: Option<EmptyThought>,
    /// `efficient_eos`: this token goes after the answer (trained on) and one token of the
    /// cutoff is kept for it (None: the answer suffix ends the turn).
    pub eos_token: Option<String>,
}

impl ChatFormat {
    /// LLaMA-Factory's `qwen2_vl` template (ChatML) with this system prompt; an empty one
    /// leaves the system block out.
    pub fn qwen2_vl(system: &str) -> ChatFormat {
        let mut prompt_prefix = String::new();
        if !system.is_empty() {
            prompt_prefix.push_str("<|im_start|>system\n");
            prompt_prefix.push_str(system);
            prompt_prefix.push_str("<|im_end|>\n");
        }
        prompt_prefix.push_str("<|im_start|>user\n");
        ChatFormat {
            prompt_prefix,
            prompt_suffix: "<|im_end|>\n<|im_start|>assistant\n".to_string(),
            answer_lead: String::new(),
            answer_suffix: "<|im_end|>\n".to_string(),
            empty_thought: None,
            eos_token: None,
        }
    }

    /// LLaMA-Factory's `qwen3_vl` and `qwen3_5` templates: ChatML, no default system prompt, a
    /// reasoning template (the empty thought before an answer without one).
    pub fn qwen3_vl(system: &str) -> ChatFormat {
        ChatFormat {
            empty_thought: Some(EmptyThought::think()),
            ..Self::qwen2_vl(system)
        }
    }

    /// LLaMA-Factory's `glm4v` template (and `glm4_5v`, the same text): `[gMASK]<sop>`, GLM's
    /// role tokens, the answer after a newline, a reasoning template, `efficient_eos` with
    /// `eos_token` (the tokenizer's, GLM-4.1V's `<|endoftext|>`).
    pub fn glm4v(system: &str, eos_token: &str) -> ChatFormat {
        let mut prompt_prefix = "[gMASK]<sop>".to_string();
        if !system.is_empty() {
            prompt_prefix.push_str("<|system|>\n");
            prompt_prefix.push_str(system);
        }
        prompt_prefix.push_str("<|user|>\n");
        ChatFormat {
            prompt_prefix,
            prompt_suffix: "<|assistant|>".to_string(),
            answer_lead: "\n".to_string(),
            answer_suffix: String::new(),
            empty_thought: Some(EmptyThought::think()),
            eos_token: Some(eos_token.to_string()),
        }
    }

    /// The format of LLaMA-Factory's template for `model_type` (see [`ModelType`]'s
    /// `llamafactory_template`); `system` None: the template's default system prompt;
    /// `eos_token` None: the family's released tokenizer's (used by `efficient_eos` only).
    pub fn for_model(
        model_type: ModelType,
        system: Option<&str>,
        eos_token: Option<&str>,
    ) -> ChatFormat {
        match model_type {
            ModelType::Qwen2Vl | ModelType::Qwen2_5Vl => {
                Self::qwen2_vl(system.unwrap_or(QWEN2_VL_SYSTEM))
            }
            ModelType::Qwen3Vl
            | ModelType::Qwen3VlMoe
            | ModelType::Qwen3_5
            | ModelType::Qwen3_5Moe => Self::qwen3_vl(system.unwrap_or("")),
            ModelType::Glm4v | ModelType::Glm4vMoe => {
                Self::glm4v(system.unwrap_or(""), eos_token.unwrap_or(GLM4V_EOS))
            }
        }
    }
}

/// GLM-4.1V's and GLM-4.5V's eos token (their tokenizer_config.json).
pub const GLM4V_EOS: &str = "<|endoftext|>";

/// The names of a family's vision block tokens: `(start, end, image pad, video pad)`.
pub fn vision_token_names(model_type: ModelType) -> [&'static str; 4] {
    match model_type {
        ModelType::Glm4v | ModelType::Glm4vMoe => [
            "<|begin_of_image|>",
            "<|end_of_image|>",
            "<|image|>",
            "<|video|>",
        ],
        _ => [
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
    }
}

/// The LLaMA-Factory 0.9.5 template whose text a family's samples follow.
pub fn llamafactory_template(model_type: ModelType) -> &'static str {
    match model_type {
        ModelType::Qwen2Vl | ModelType::Qwen2_5Vl => "qwen2_vl",
        ModelType::Qwen3Vl | ModelType::Qwen3VlMoe => "qwen3_vl",
        ModelType::Qwen3_5 | ModelType::Qwen3_5Moe => "qwen3_5",
        ModelType::Glm4v => "glm4v",
        ModelType::Glm4vMoe => "glm4_5v",
    }
}

fn token_id(vocab: &Vocab, token: &str, model_type: ModelType) -> Result<i64> {
    vocab
        .tokenizer()
        .token_to_id(token)
        .map(|i| i as i64)
        .ok_or_else(|| {
            value_err!(
                "tokenizer: has no {token} token; a {} tokenizer is needed",
                model_type.name()
            )
        })
}

/// The ids of a family's vision block tokens ([`vision_token_names`]) in a tokenizer's
/// vocabulary.
pub fn vision_tokens(vocab: &Vocab, model_type: ModelType) -> Result<VisionTokens> {
    let [start, end, image, video] = vision_token_names(model_type);
    Ok(VisionTokens {
        vision_start: token_id(vocab, start, model_type)?,
        vision_end: token_id(vocab, end, model_type)?,
        image_pad: token_id(vocab, image, model_type)?,
        video_pad: token_id(vocab, video, model_type)?,
    })
}

/// One image of a sample, in the order the sequence holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleImage {
    /// Which image of the question it shows.
    pub source: usize,
    /// Whether it is a re-affirmed copy inside the answer.
    pub inserted: bool,
    /// The size handed to the image processor (the downscaled size for a copy).
    pub height: i64,
    pub width: i64,
    /// The processor's `image_grid_thw` row for it.
    pub grid: GridThw,
}

/// A built sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The answer with the kept insertions (bridge and placeholders); the rest of the answer
    /// is unchanged byte for byte.
    pub answer_text: String,
    /// Every insertion point the policy chose.
    pub insertions: Vec<Insertion>,
    /// How many re-affirmed images the sequence keeps (those wholly before the cut).
    pub kept_images: usize,
    /// How many re-affirmed images the policy asked for (insertions x question images).
    pub planned_images: usize,
    pub input_ids: Vec<u32>,
    /// `IGNORE_INDEX` on the prompt and on every vision token of the answer; the token id elsewhere.
    pub labels: Vec<i64>,
    pub positions: SequencePositions,
    /// The images of the sequence, in order (question images first).
    pub images: Vec<SampleImage>,
    /// Prompt tokens kept.
    pub prompt_tokens: usize,
    /// Tokens cut off by truncation (0 if none), image blocks after the cut included.
    pub cut_tokens: usize,
}

/// Builds DVR samples: reflection points from a detector, insertions by a policy, image token
/// counts from the processor's `smart_resize` rule, positions as `get_rope_index`.
#[derive(Debug, Clone)]
pub struct SampleBuilder {
    pub detector: Arc<Detector>,
    pub policy: Policy,
    pub images: ImageSettings,
    pub format: ChatFormat,
    pub vision: VisionTokens,
    pub model_type: ModelType,
    /// `get_rope_index`'s settings: the family's, with the tokenizer's ids.
    pub mrope: MropeConfig,
    /// The id of the format's `eos_token` (`efficient_eos`).
    pub eos: Option<u32>,
}

/// A piece of the sequence under construction.
enum Part {
    Text(String),
    /// Index into the sample's image list.
    Image(usize),
}

impl SampleBuilder {
    pub fn new(
        detector: Arc<Detector>,
        policy: Policy,
        images: ImageSettings,
        format: ChatFormat,
        model_type: ModelType,
    ) -> Result<SampleBuilder> {
        policy.check()?;
        images.factor()?;
        let vocab = detector.vocab();
        let vision = vision_tokens(vocab, model_type)?;
        let mut mrope = MropeConfig {
            spatial_merge_size: images.merge_size,
            image_token_id: vision.image_pad,
            video_token_id: vision.video_pad,
            ..MropeConfig::for_model(model_type)
        };
        if model_type.marks_videos_by_blocks() {
            // GLM tells video frames from images by these markers (read, not assumed).
            mrope.video_start_token_id = Some(token_id(vocab, "<|begin_of_video|>", model_type)?);
            mrope.video_end_token_id = Some(token_id(vocab, "<|end_of_video|>", model_type)?);
        }
        let eos = match &format.eos_token {
            Some(token) => Some(
                token_id(vocab, token, model_type)
                    .map_err(|_| value_err!("eos_token: the tokenizer has no {token} token"))?
                    as u32,
            ),
            None => None,
        };
        Ok(SampleBuilder {
            detector,
            policy,
            images,
            format,
            vision,
            model_type,
            mrope,
            eos,
        })
    }

    /// Insertion points of one answer (see [`plan_insertions`]).
    pub fn plan(&self, answer: &str) -> Result<Vec<Insertion>> {
        plan_insertions(&self.detector, answer, &self.policy)
    }

    /// The answer with every planned insertion for `images` question images.
    pub fn insert(&self, answer: &str, insertions: &[Insertion], images: usize) -> String {
        insert_text(answer, insertions, &self.policy.insertion_text(images))
    }

    fn block_tokens(&self, image: &SampleImage) -> usize {
        // t * (h / m) * (w / m) pads plus <|vision_start|> and <|vision_end|>.
        image.grid.token_count(self.images.merge_size).unwrap_or(0) + 2
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if !text.is_empty() {
            out.extend(self.detector.vocab().encode(text)?);
        }
        Ok(())
    }

    fn encode_parts(
        &self,
        parts: &[Part],
        images: &[SampleImage],
        out: &mut Vec<u32>,
        blocks: &mut Vec<(usize, usize, usize)>,
    ) -> Result<()> {
        for part in parts {
            match part {
                Part::Text(text) => self.encode(text, out)?,
                Part::Image(i) => {
                    let start = out.len();
                    out.push(self.vision.vision_start as u32);
                    let pads = self.block_tokens(&images[*i]) - 2;
                    out.extend(std::iter::repeat_n(self.vision.image_pad as u32, pads));
                    out.push(self.vision.vision_end as u32);
                    blocks.push((start, out.len(), *i));
                }
            }
        }
        Ok(())
    }

    /// Builds the sample for `question` (holding one placeholder per image, or none: the images
    /// then come first), the question images' `(height, width)` and `answer`. With `cutoff`,
    /// the sequence is at most that long: it is cut as LLaMA-Factory cuts (`infer_seqlen`),
    /// never through an image block: the prompt keeps at least up to the end of its last image
    /// (the answer keeps less), and an answer cut inside a block (or inside the policy's
    /// bridge right before it) moves to the start of the block (of the bridge), see
    /// [`answer_cut`]. Every re-affirmed image wholly inside the kept part is kept; one that
    /// straddles the cut or lies beyond it is dropped.
    ///
    /// Errors (`Error::Value`): a size < 1 or a processor-refused aspect ratio (`images[i]`);
    /// a placeholder count that is neither 0 nor the number of images (`question`); the
    /// placeholder inside the answer (`answer`); a cutoff of 0, or one smaller than the prompt
    /// up to the end of an image block it would otherwise cut (`cutoff`).
    pub fn build(
        &self,
        question: &str,
        image_sizes: &[(i64, i64)],
        answer: &str,
        cutoff: Option<usize>,
    ) -> Result<Sample> {
        let placeholder = self.policy.placeholder.as_str();
        let n_images = image_sizes.len();
        let mut question_images = Vec::with_capacity(n_images);
        let mut copies = Vec::with_capacity(n_images);
        for (i, &(h, w)) in image_sizes.iter().enumerate() {
            let grid = image_grid_thw(h, w, &self.images)
                .map_err(|e| value_err!("images[{i}] = ({h}, {w}): {e}"))?;
            question_images.push(SampleImage {
                source: i,
                inserted: false,
                height: h,
                width: w,
                grid: grid_of(grid),
            });
            let (dh, dw) = downscaled_size(h, w, self.policy.downscale)?;
            let grid = image_grid_thw(dh, dw, &self.images).map_err(|e| {
                value_err!("images[{i}] = ({h}, {w}) downscaled to ({dh}, {dw}): {e}")
            })?;
            copies.push(SampleImage {
                source: i,
                inserted: true,
                height: dh,
                width: dw,
                grid: grid_of(grid),
            });
        }
        if cutoff == Some(0) {
            return Err(value_err!("cutoff must be >= 1, got 0"));
        }
        let in_question = question.matches(placeholder).count();
        if in_question != 0 && in_question != n_images {
            return Err(value_err!(
                "question: holds {in_question} image placeholder(s) {placeholder:?} but {n_images} image(s) were given"
            ));
        }
        let insertions = if n_images == 0 {
            Vec::new()
        } else {
            self.plan(answer)?
        };

        // The prompt: its text and the question's image blocks.
        let mut images: Vec<SampleImage> = question_images.clone();
        let mut source_parts = vec![Part::Text(self.format.prompt_prefix.clone())];
        let mut pieces = question.split(placeholder);
        let push_text = |parts: &mut Vec<Part>, text: &str| match parts.last_mut() {
            Some(Part::Text(t)) => t.push_str(text),
            _ => parts.push(Part::Text(text.to_string())),
        };
        if in_question == 0 {
            for i in 0..n_images {
                source_parts.push(Part::Image(i));
            }
            push_text(&mut source_parts, question);
        } else {
            push_text(&mut source_parts, pieces.next().unwrap_or(""));
            for (i, piece) in pieces.enumerate() {
                source_parts.push(Part::Image(i));
                push_text(&mut source_parts, piece);
            }
        }
        push_text(&mut source_parts, &self.format.prompt_suffix);
        let mut source = Vec::new();
        let mut source_blocks = Vec::new();
        self.encode_parts(&source_parts, &images, &mut source, &mut source_blocks)?;

        // The answer: piece k is the text before insertion k plus its bridge (encoded as one
        // text, as the template encodes the whole answer), then the insertion's copies; then the
        // tail after the last insertion and the answer suffix.
        images.extend(insertions.iter().flat_map(|_| copies.iter().copied()));
        let bridge = self.policy.bridge.as_deref().unwrap_or("");
        let bounds: Vec<usize> = std::iter::once(0)
            .chain(insertions.iter().map(|i| i.byte_index))
            .collect();
        let planned = insertions.len() * n_images;
        let mut target = Vec::new();
        let mut target_blocks = Vec::new();
        let mut target_parts = Vec::with_capacity(n_images);
        // A reasoning template's empty thought: its own encode, before the answer, when the
        // answer as the template sees it (bridges included) holds no thought marker.
        if let Some(thought) = &self.format.empty_thought {
            if thought.applies_to(answer) && (insertions.is_empty() || thought.applies_to(bridge)) {
                self.encode(&thought.text, &mut target)?;
            }
        }
        let lead = self.format.answer_lead.as_str();
        for k in 0..insertions.len() {
            let lead = if k == 0 { lead } else { "" };
            self.encode(
                &format!("{lead}{}{bridge}", &answer[bounds[k]..bounds[k + 1]]),
                &mut target,
            )?;
            target_parts.clear();
            target_parts.extend((0..n_images).map(|j| Part::Image(n_images + k * n_images + j)));
            self.encode_parts(&target_parts, &images, &mut target, &mut target_blocks)?;
        }
        self.encode(
            &format!(
                "{}{}{}",
                if insertions.is_empty() { lead } else { "" },
                &answer[bounds[insertions.len()]..],
                self.format.answer_suffix
            ),
            &mut target,
        )?;

        // Cut at the cutoff first (LLaMA-Factory's split), then move a cut that falls inside an
        // image block (or the bridge right before it) to its start: every copy wholly inside the
        // kept part stays, a copy that straddles the cut or lies beyond it goes.
        let (mut source_keep, mut target_keep) = (source.len(), target.len());
        // efficient_eos: LLaMA-Factory keeps one token of the cutoff for the eos.
        let cutoff = match (cutoff, self.eos) {
            (Some(c), Some(_)) if c < 2 => {
                return Err(value_err!(
                    "cutoff = {c}: must be >= 2 (one token is the eos of model_type={:?})",
                    self.model_type.name()
                ))
            }
            (Some(c), Some(_)) => Some(c - 1),
            (c, _) => c,
        };
        if let Some(cutoff) = cutoff {
            // As LLaMA-Factory, the split is applied whether or not the turn fits.
            (source_keep, target_keep) = infer_seqlen(source.len(), target.len(), cutoff);
            // The question's images are kept whole: the prompt keeps up to the end of its last
            // image block, the answer gives way.
            if let Some(&(start, end, i)) = source_blocks.last() {
                if source_keep < end {
                    if end > cutoff {
                        return Err(value_err!(
                            "cutoff = {cutoff} is smaller than the prompt up to the end of its image {i} ({end} \
                             tokens; the image block alone has {} tokens): the image would be cut off",
                            end - start
                        ));
                    }
                    source_keep = end;
                    target_keep = target_keep.min(cutoff - end);
                }
            }
            if target_keep < target.len() {
                let bridge_ids: Vec<i64> = if bridge.is_empty() {
                    Vec::new()
                } else {
                    self.detector
                        .vocab()
                        .encode(bridge)?
                        .into_iter()
                        .map(i64::from)
                        .collect()
                };
                let target64: Vec<i64> = target.iter().map(|&i| i as i64).collect();
                target_keep = answer_cut(&target64, target_keep, &self.vision, &bridge_ids);
            }
        }
        let cut_tokens = source.len() + target.len() - source_keep - target_keep;
        let mut kept_blocks: Vec<usize> = source_blocks
            .iter()
            .filter(|b| b.1 <= source_keep)
            .map(|b| b.2)
            .collect();
        kept_blocks.extend(
            target_blocks
                .iter()
                .filter(|b| b.1 <= target_keep)
                .map(|b| b.2),
        );
        let kept_copies = kept_blocks.iter().filter(|&&i| i >= n_images).count();

        let mut input_ids = source;
        input_ids.truncate(source_keep);
        let mut labels = vec![IGNORE_INDEX; input_ids.len()];
        labels.extend(target[..target_keep].iter().map(|&id| {
            if self.vision.is_visual(id as i64) {
                IGNORE_INDEX
            } else {
                id as i64
            }
        }));
        input_ids.extend_from_slice(&target[..target_keep]);
        if let Some(eos) = self.eos {
            input_ids.push(eos);
            labels.push(eos as i64);
        }

        let sample_images: Vec<SampleImage> = kept_blocks.iter().map(|&i| images[i]).collect();
        let grids: Vec<GridThw> = sample_images.iter().map(|im| im.grid).collect();
        let ids64: Vec<i64> = input_ids.iter().map(|&i| i as i64).collect();
        let positions = positions_for_sequence(&ids64, &grids, &[], None, &self.mrope)?;

        // The answer text with the copies that are kept (an insertion none of whose copies is
        // kept loses its bridge too); the text itself is the whole answer.
        let mut kept_per_insertion = vec![0usize; insertions.len()];
        for &i in kept_blocks.iter().filter(|&&i| i >= n_images) {
            kept_per_insertion[(i - n_images) / n_images] += 1;
        }
        let mut answer_text = String::with_capacity(answer.len());
        for (k, ins) in insertions.iter().enumerate() {
            answer_text.push_str(&answer[bounds[k]..ins.byte_index]);
            if kept_per_insertion[k] > 0 {
                answer_text.push_str(bridge);
                for _ in 0..kept_per_insertion[k] {
                    answer_text.push_str(placeholder);
                }
            }
        }
        answer_text.push_str(&answer[bounds[insertions.len()]..]);

        Ok(Sample {
            answer_text,
            insertions,
            kept_images: kept_copies,
            planned_images: planned,
            input_ids,
            labels,
            positions,
            images: sample_images,
            prompt_tokens: source_keep,
            cut_tokens,
        })
    }
}

fn grid_of(thw: [i64; 3]) -> GridThw {
    GridThw::new(thw[0], thw[1], thw[2])
}
