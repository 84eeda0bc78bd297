//! Where a re-affirmed image goes in a long-CoT answer: after the sentence of a reflection
//! phrase, subject to a count limit, a minimum token gap and a warm-up of answer tokens.

use crate::error::Result;
use crate::triggers::{Detector, Hit};
use crate::value_err;

/// LLaMA-Factory's image placeholder (`IMAGE_PLACEHOLDER`).
pub const DEFAULT_PLACEHOLDER: &str = "<image>";
/// Pixel-space counterpart of the paper's 4x4 average pooling: each side divided by 4.
pub const DEFAULT_DOWNSCALE: u32 = 4;

/// The insertion policy. Token counts are answer tokens of the original answer (the tokens the
/// answer has before anything is inserted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// At most this many insertions per answer (`None`: no limit).
    pub max_insertions: Option<usize>,
    /// Two insertions are at least this many answer tokens apart.
    pub min_gap: usize,
    /// No insertion before this many answer tokens.
    pub skip_first: usize,
    /// Text put right before each re-affirmed image (e.g. " Let me look at the image again:").
    pub bridge: Option<String>,
    /// Each side of the re-affirmed image is divided by this (rounding up), >= 1.
    pub downscale: u32,
    /// The text that stands for one image in the output text.
    pub placeholder: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_insertions: Some(4),
            min_gap: 200,
            skip_first: 50,
            bridge: None,
            downscale: DEFAULT_DOWNSCALE,
            placeholder: DEFAULT_PLACEHOLDER.to_string(),
        }
    }
}

impl Policy {
    pub fn check(&self) -> Result<()> {
        if self.downscale < 1 {
            return Err(value_err!("downscale must be >= 1, got {}", self.downscale));
        }
        if self.placeholder.is_empty() {
            return Err(value_err!("placeholder must not be empty"));
        }
        if let Some(bridge) = &self.bridge {
            if bridge.contains(&self.placeholder) {
                return Err(value_err!(
                    "bridge = {bridge:?} contains the image placeholder {:?}",
                    self.placeholder
                ));
            }
        }
        Ok(())
    }

    /// The text inserted at one insertion point for `images` images.
    /// [`Policy::insertion_text`] with `images` checked first (at most [`MAX_IMAGES`]), so that
    /// no size given by a caller can ask for an impossible string.
    pub fn checked_insertion_text(&self, images: usize) -> Result<String> {
        check_images(images)?;
        Ok(self.insertion_text(images))
    }

    pub fn insertion_text(&self, images: usize) -> String {
        let mut text = self.bridge.clone().unwrap_or_default();
        for _ in 0..images {
            text.push_str(&self.placeholder);
        }
        text
    }
}

/// Most images one insertion point may hold (a question's images, each re-affirmed); a
/// Qwen2-VL image costs at least 6 tokens, so this is far above any context length.
pub const MAX_IMAGES: usize = 1 << 16;

/// `images` (the question's image count) checked against [`MAX_IMAGES`].
pub fn check_images(images: usize) -> Result<()> {
    if images > MAX_IMAGES {
        return Err(value_err!(
            "images = {images}: expected at most {MAX_IMAGES} images per insertion point"
        ));
    }
    Ok(())
}

/// Size of the re-affirmed copy of a `height x width` image: each side divided by `factor`,
/// rounded up (what Pillow's `Image.reduce(factor)` gives, the pixel-space kxk average pool
/// whose edge windows average only the pixels they cover).
pub fn downscaled_size(height: i64, width: i64, factor: u32) -> Result<(i64, i64)> {
    if height < 1 || width < 1 {
        return Err(value_err!(
            "image size ({height}, {width}): height and width must be >= 1"
        ));
    }
    if factor < 1 {
        return Err(value_err!("downscale must be >= 1, got {factor}"));
    }
    let f = factor as i64;
    Ok(((height + f - 1) / f, (width + f - 1) / f))
}

/// One chosen insertion point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insertion {
    /// Character offset in the answer (a Python `str` index) where the insertion goes.
    pub char_index: usize,
    /// The same point as a byte offset into the UTF-8 answer.
    pub byte_index: usize,
    /// Answer tokens before the point.
    pub token_index: usize,
    /// The reflection phrase whose sentence ends here (the first hit of that sentence).
    pub hit: Hit,
}

/// Whitespace as Python's `str.isspace()` (and `re`'s `\s`) sees it: Rust's White_Space plus
/// the information separators U+001C..U+001F.
#[inline]
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Characters that may close a sentence after its final punctuation (quotes, brackets, the
/// emphasis marks of Markdown).
#[inline]
fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '\u{201d}' | '\u{2019}' | ')' | ']' | '}' | '\u{bb}' | '*'
    )
}

/// Where the sentence that contains character `from - 1` ends: the first of
/// - `.`, `!` or `?` followed (after closing quotes or brackets) by whitespace: the point after
///   the closers;
/// - `。`, `！` or `？`: the point after it and its closers;
/// - a line break: the point before it;
///
/// searched from character `from`. `None` if the text ends first, or if nothing but whitespace
/// follows the point (an image there would precede no reasoning).
pub fn sentence_end(chars: &[char], from: usize) -> Option<usize> {
    SentenceEnds::new(chars).find(from)
}

/// [`sentence_end`] for many increasing `from`s of one text in linear time overall: the
/// whitespace-only tail is found once, and the last scan is reused while `from` has not passed
/// the terminator it found (whether a character ends a sentence depends only on what follows).
struct SentenceEnds<'a> {
    chars: &'a [char],
    /// Index of the last character that is not whitespace.
    last_non_space: Option<usize>,
    /// (scan start, index where the scan stopped, sentence end found there).
    last: Option<(usize, usize, Option<usize>)>,
}

impl<'a> SentenceEnds<'a> {
    fn new(chars: &'a [char]) -> Self {
        SentenceEnds {
            chars,
            last_non_space: chars.iter().rposition(|&c| !is_py_space(c)),
            last: None,
        }
    }

    fn find(&mut self, from: usize) -> Option<usize> {
        let end = match self.last {
            Some((start, stop, end)) if start <= from && from <= stop => end,
            _ => {
                let (stop, end) = self.scan(from);
                self.last = Some((from, stop, end));
                end
            }
        };
        // Nothing but whitespace after the point: an image there would precede no reasoning.
        end.filter(|&e| self.last_non_space.is_some_and(|l| l >= e))
    }

    /// (index of the terminator, or the text's length; the point after it).
    fn scan(&self, from: usize) -> (usize, Option<usize>) {
        let chars = self.chars;
        let n = chars.len();
        let mut i = from;
        loop {
            if i >= n {
                return (n, None);
            }
            match chars[i] {
                '\n' => return (i, Some(i)),
                '.' | '!' | '?' => {
                    let mut j = i + 1;
                    while j < n && is_closer(chars[j]) {
                        j += 1;
                    }
                    if j == n || is_py_space(chars[j]) {
                        return (i, Some(j));
                    }
                }
                '\u{3002}' | '\u{ff01}' | '\u{ff1f}' => {
                    let mut j = i + 1;
                    while j < n && is_closer(chars[j]) {
                        j += 1;
                    }
                    return (i, Some(j));
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// The insertion points of `answer` under `policy`: one per sentence that holds a reflection
/// phrase, in order, taken greedily when it is at least `skip_first` answer tokens in and
/// `min_gap` tokens after the previous one, until `max_insertions`.
///
/// Errors: the answer already contains the placeholder (its images could not be told apart).
pub fn plan_insertions(
    detector: &Detector,
    answer: &str,
    policy: &Policy,
) -> Result<Vec<Insertion>> {
    policy.check()?;
    if let Some(at) = answer.find(policy.placeholder.as_str()) {
        return Err(value_err!(
            "answer: already contains the image placeholder {:?} (at character {}); it cannot be told from an inserted image",
            policy.placeholder,
            answer[..at].chars().count()
        ));
    }
    let mut hits = detector.find_text(answer);
    if hits.is_empty() || policy.max_insertions == Some(0) {
        return Ok(Vec::new());
    }
    hits.sort_by_key(|h| (h.char_end, h.char_start));

    let chars: Vec<char> = answer.chars().collect();
    let mut sentence_ends = SentenceEnds::new(&chars);
    let encoding = detector
        .vocab()
        .tokenizer()
        .encode_char_offsets(answer, false)
        .map_err(|e| value_err!("answer: cannot be tokenized: {e}"))?;
    let mut token_starts: Vec<usize> = encoding.get_offsets().iter().map(|o| o.0).collect();
    token_starts.sort_unstable();
    // Answer tokens that start before character `p`.
    let token_at = |p: usize| token_starts.partition_point(|&s| s < p);

    let mut out: Vec<Insertion> = Vec::new();
    let mut last_point: Option<usize> = None;
    for hit in hits {
        let Some(point) = sentence_ends.find(hit.char_end as usize) else {
            continue;
        };
        if last_point.is_some_and(|p| point <= p) {
            continue; // same sentence as an earlier hit
        }
        last_point = Some(point);
        let token_index = token_at(point);
        if token_index < policy.skip_first {
            continue;
        }
        if let Some(prev) = out.last() {
            if token_index - prev.token_index < policy.min_gap {
                continue;
            }
        }
        if policy.max_insertions.is_some_and(|m| out.len() >= m) {
            break;
        }
        out.push(Insertion {
            char_index: point,
            byte_index: 0,
            token_index,
            hit,
        });
    }
    // Byte offsets of the chosen points, in one pass.
    let mut it = out.iter_mut().peekable();
    for (char_index, (byte_index, _)) in answer
        .char_indices()
        .chain(std::iter::once((answer.len(), ' ')))
        .enumerate()
    {
        while let Some(ins) = it.peek_mut() {
            if ins.char_index != char_index {
                break;
            }
            ins.byte_index = byte_index;
            it.next();
        }
    }
    Ok(out)
}

/// `answer` with `insertion_text` put at each insertion point (points in increasing order).
pub fn insert_text(answer: &str, insertions: &[Insertion], insertion_text: &str) -> String {
    let mut out = String::with_capacity(answer.len() + insertions.len() * insertion_text.len());
    let mut at = 0;
    for ins in insertions {
        out.push_str(&answer[at..ins.byte_index]);
        out.push_str(insertion_text);
        at = ins.byte_index;
    }
    out.push_str(&answer[at..]);
    out
}
