//! The reflection-trigger detector: where the case-insensitive regex `(?<!\w)phrase(?!\w)`
//! matches the text a token stream decodes to, found one token at a time at O(1) per token.

use std::path::Path;

use super::automaton::{Automaton, MAX_PHRASE_CHARS};
use super::unicode::{fold, is_word, Utf8Decoder, REPLACEMENT};
use super::vocab::{TokenKind, Vocab};
use crate::error::Result;

/// Self-reflection phrases of QVQ / QwQ / DeepSeek-R1 / Gemini-thinking style traces, chosen by
/// counting them in the traces of `shared/assets/traces` (see the README). Phrases that others
/// contain ("but wait" in "wait") are left out: they would only repeat a hit.
pub const DEFAULT_PHRASES: &[&str] = &[
    "wait",
    "hmm",
    "alternatively",
    "double-check",
    "double check",
    "re-examine",
    "re-evaluate",
    "reconsider",
    "let me check",
    "let me verify",
    "let me think again",
    "let me re-read",
    "let me look at the image again",
    "looking at the image again",
    "on second thought",
    "on closer inspection",
    "upon closer inspection",
    "looking back",
    "hold on",
    "i made a mistake",
    "that doesn't seem right",
];

/// A phrase match: which phrase, where in the decoded text (character offsets, as Python `str`
/// indices), and the token at which it was confirmed (`None` when matching plain text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub phrase: u32,
    pub token_index: Option<u64>,
    pub char_start: u64,
    pub char_end: u64,
}

/// Kind of token as the hot loop sees it.
const FAST: u8 = 0; // complete UTF-8: precomputed character entries
const BYTES: u8 = 1; // not valid UTF-8 on its own: decoded byte by byte
const SPECIAL: u8 = 2;
const UNUSED: u8 = 3;

/// A character as the matcher needs it: its class (low 15 bits) and whether `\w` matches it.
type Entry = u16;
const WORD_BIT: u16 = 1 << 15;

/// The per-stream matching state; small, and cheap to move between batch slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    dfa: u32,
    /// Bit k: whether the character k places back (0 = the latest) is a word character.
    history: u128,
    /// Characters decoded so far.
    chars: u64,
    /// Phrases that ended at the previous character and wait for the next one to confirm the
    /// word boundary: a mask over the outputs of `pending_state`.
    pending: u64,
    pending_state: u32,
    utf8: Utf8Decoder,
    /// For phrases that can overlap themselves: the end of their last hit (`re.finditer` does
    /// not report overlapping matches of one pattern).
    last_end: Vec<u64>,
}

impl StreamState {
    /// Characters of decoded text seen so far.
    pub fn chars(&self) -> u64 {
        self.chars
    }
}

#[derive(Debug, Clone)]
pub struct Detector {
    phrases: Vec<String>,
    automaton: Automaton,
    vocab: Vocab,
    kind: Vec<u8>,
    entry_start: Vec<u32>,
    entries: Vec<Entry>,
    /// Per phrase: its slot in `StreamState::last_end`, or `u32::MAX` if it cannot overlap itself.
    overlap_slot: Vec<u32>,
    overlapping: usize,
}

impl Detector {
    /// A detector for `phrases` (the defaults when `None`) over the tokens of `vocab`.
    pub fn new(vocab: Vocab, phrases: Option<&[String]>) -> Result<Detector> {
        let phrases: Vec<String> = match phrases {
            Some(p) => p.to_vec(),
            None => DEFAULT_PHRASES.iter().map(|s| s.to_string()).collect(),
        };
        let chars = check_phrases(&phrases)?;
        let automaton = Automaton::new(&chars);
        if automaton.class_count() > (WORD_BIT as usize) {
            return Err(crate::value_err!(
                "phrases: more than 32767 distinct characters"
            ));
        }
        if automaton.max_outputs_per_state() > 64 {
            return Err(crate::value_err!(
                "phrases: more than 64 phrases end with the same text"
            ));
        }

        let mut overlap_slot = vec![u32::MAX; chars.len()];
        let mut overlapping = 0;
        for (slot, phrase) in overlap_slot.iter_mut().zip(&chars) {
            if can_overlap_itself(phrase) {
                *slot = overlapping as u32;
                overlapping += 1;
            }
        }

        let mut detector = Detector {
            phrases,
            automaton,
            kind: Vec::with_capacity(vocab.len()),
            entry_start: Vec::with_capacity(vocab.len() + 1),
            entries: Vec::new(),
            vocab,
            overlap_slot,
            overlapping,
        };
        for id in 0..detector.vocab.len() as u32 {
            detector.entry_start.push(detector.entries.len() as u32);
            let kind = match detector.vocab.kind(id) {
                Some(TokenKind::Special) => SPECIAL,
                Some(TokenKind::Unused) | None => UNUSED,
                Some(TokenKind::Text) => match std::str::from_utf8(detector.vocab.bytes(id)) {
                    Ok(text) => {
                        let entries: Vec<Entry> = text.chars().map(|c| detector.entry(c)).collect();
                        detector.entries.extend(entries);
                        FAST
                    }
                    Err(_) => BYTES,
                },
            };
            detector.kind.push(kind);
        }
        detector.entry_start.push(detector.entries.len() as u32);
        Ok(detector)
    }

    pub fn from_path(path: &Path, phrases: Option<&[String]>) -> Result<Detector> {
        Detector::new(Vocab::from_path(path)?, phrases)
    }

    pub fn from_json(json: &str, phrases: Option<&[String]>) -> Result<Detector> {
        Detector::new(Vocab::from_json(json)?, phrases)
    }

    pub fn phrases(&self) -> &[String] {
        &self.phrases
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Number of token ids (the largest id plus one).
    pub fn vocab_size(&self) -> usize {
        self.kind.len()
    }

    /// A fresh stream state for this detector.
    pub fn new_state(&self) -> StreamState {
        StreamState {
            last_end: vec![0; self.overlapping],
            ..StreamState::default()
        }
    }

    /// Checks that `token` can be fed, without feeding it.
    #[inline]
    pub fn check_token(&self, token: i64) -> Result<u32> {
        if token < 0 || token as u64 >= self.kind.len() as u64 {
            return Err(crate::index_err!(
                "token id {token} is outside the vocabulary (ids 0 to {})",
                self.kind.len() - 1
            ));
        }
        if self.kind[token as usize] == UNUSED {
            return Err(crate::index_err!(
                "token id {token} is not a token of this tokenizer's vocabulary"
            ));
        }
        Ok(token as u32)
    }

    /// Feeds token `token` (the `token_index`-th of the stream); hits it confirms are appended
    /// to `hits`. An invalid id is refused before anything changes.
    #[inline]
    pub fn push(
        &self,
        state: &mut StreamState,
        token: i64,
        token_index: u64,
        hits: &mut Vec<Hit>,
    ) -> Result<()> {
        let id = self.check_token(token)? as usize;
        let at = Some(token_index);
        match self.kind[id] {
            FAST => {
                if state.utf8.is_pending() {
                    // A complete token cannot continue an unfinished character.
                    let mut utf8 = state.utf8;
                    utf8.flush(&mut |c| self.step(state, self.entry(c), at, hits));
                    state.utf8 = utf8;
                }
                let range = self.entry_start[id] as usize..self.entry_start[id + 1] as usize;
                for &entry in &self.entries[range] {
                    self.step(state, entry, at, hits);
                }
            }
            BYTES => {
                let mut utf8 = state.utf8;
                for &byte in self.vocab.bytes(id as u32) {
                    utf8.push(byte, &mut |c| self.step(state, self.entry(c), at, hits));
                }
                state.utf8 = utf8;
            }
            _ => self.boundary(state, at, hits),
        }
        Ok(())
    }

    /// Ends the text: a phrase at the very end is confirmed (at `last_token_index`). Feeding
    /// more afterwards starts a new text, as after a special token.
    pub fn finish(
        &self,
        state: &mut StreamState,
        last_token_index: Option<u64>,
        hits: &mut Vec<Hit>,
    ) {
        self.boundary(state, last_token_index, hits);
    }

    /// Every hit in a whole token list, as streaming it and finishing would give.
    pub fn find_tokens(&self, tokens: &[i64]) -> Result<Vec<Hit>> {
        if let Some(bad) = tokens.iter().find(|&&t| self.check_token(t).is_err()) {
            return Err(self.check_token(*bad).unwrap_err());
        }
        let mut state = self.new_state();
        let mut hits = Vec::new();
        for (i, &token) in tokens.iter().enumerate() {
            self.push(&mut state, token, i as u64, &mut hits)?;
        }
        let last = tokens.len().checked_sub(1).map(|i| i as u64);
        self.finish(&mut state, last, &mut hits);
        Ok(hits)
    }

    /// Every hit in `text` (character offsets; no token indices).
    pub fn find_text(&self, text: &str) -> Vec<Hit> {
        let mut state = self.new_state();
        let mut hits = Vec::new();
        for c in text.chars() {
            self.step(&mut state, self.entry(c), None, &mut hits);
        }
        self.finish(&mut state, None, &mut hits);
        hits
    }

    #[inline]
    fn entry(&self, c: char) -> Entry {
        self.automaton.class(c) | if is_word(c) { WORD_BIT } else { 0 }
    }

    /// One decoded character.
    #[inline(always)]
    fn step(&self, state: &mut StreamState, entry: Entry, at: Option<u64>, hits: &mut Vec<Hit>) {
        let word = entry & WORD_BIT != 0;
        if state.pending != 0 {
            if !word {
                self.confirm(state, at, hits);
            }
            state.pending = 0;
        }
        state.history = (state.history << 1) | word as u128;
        state.dfa = self.automaton.step(state.dfa, entry & !WORD_BIT);
        let outputs = self.automaton.outputs(state.dfa);
        if !outputs.is_empty() {
            let mut mask = 0u64;
            for (i, out) in outputs.iter().enumerate() {
                // The character before the phrase must not be a word character.
                if (state.history >> out.chars) & 1 == 0 {
                    mask |= 1 << i;
                }
            }
            state.pending = mask;
            state.pending_state = state.dfa;
        }
        state.chars += 1;
    }

    /// Reports the pending phrases as hits ending at the current character offset.
    #[cold]
    fn confirm(&self, state: &mut StreamState, at: Option<u64>, hits: &mut Vec<Hit>) {
        let end = state.chars;
        let outputs = self.automaton.outputs(state.pending_state);
        for (i, out) in outputs.iter().enumerate() {
            if state.pending >> i & 1 == 0 {
                continue;
            }
            let start = end - out.chars as u64;
            let slot = self.overlap_slot[out.phrase as usize];
            if slot != u32::MAX {
                if start < state.last_end[slot as usize] {
                    continue;
                }
                state.last_end[slot as usize] = end;
            }
            hits.push(Hit {
                phrase: out.phrase,
                token_index: at,
                char_start: start,
                char_end: end,
            });
        }
    }

    /// A special token or the end of the text: no phrase continues across it, and it confirms
    /// the word boundary of a pending phrase.
    fn boundary(&self, state: &mut StreamState, at: Option<u64>, hits: &mut Vec<Hit>) {
        let mut utf8 = state.utf8;
        utf8.flush(&mut |c| self.step(state, self.entry(c), at, hits));
        state.utf8 = utf8;
        if state.pending != 0 {
            self.confirm(state, at, hits);
            state.pending = 0;
        }
        state.history <<= 1;
        state.dfa = 0;
    }
}

/// Checks the phrase list; returns each phrase's characters.
fn check_phrases(phrases: &[String]) -> Result<Vec<Vec<char>>> {
    if phrases.is_empty() {
        return Err(crate::value_err!(
            "phrases: expected at least one phrase, got an empty list"
        ));
    }
    let mut chars = Vec::with_capacity(phrases.len());
    let mut folded_seen: std::collections::HashMap<Vec<char>, usize> = Default::default();
    for (i, phrase) in phrases.iter().enumerate() {
        if phrase.trim().is_empty() {
            return Err(crate::value_err!(
                "phrases[{i}] = {phrase:?}: a phrase must contain a non-space character"
            ));
        }
        let c: Vec<char> = phrase.chars().collect();
        if c.len() > MAX_PHRASE_CHARS {
            return Err(crate::value_err!(
                "phrases[{i}]: {} characters long; at most {MAX_PHRASE_CHARS} are supported",
                c.len()
            ));
        }
        if c.contains(&REPLACEMENT) {
            return Err(crate::value_err!(
                "phrases[{i}] = {phrase:?}: contains U+FFFD, the replacement character"
            ));
        }
        let folded: Vec<char> = c.iter().map(|&ch| fold(ch)).collect();
        if let Some(&j) = folded_seen.get(&folded) {
            return Err(crate::value_err!(
                "phrases[{i}] = {phrase:?} repeats phrases[{j}] = {:?} (matching ignores case)",
                phrases[j]
            ));
        }
        folded_seen.insert(folded, i);
        chars.push(c);
    }
    Ok(chars)
}

/// Whether two matches of `phrase` can overlap: a proper suffix equals a prefix (up to case),
/// and both the character before that suffix and the one after the prefix are not word
/// characters, so that both matches pass the boundary checks.
fn can_overlap_itself(phrase: &[char]) -> bool {
    let folded: Vec<char> = phrase.iter().map(|&c| fold(c)).collect();
    let n = folded.len();
    (1..n).any(|k| {
        folded[k..] == folded[..n - k] && !is_word(phrase[k - 1]) && !is_word(phrase[n - k])
    })
}
