//! Reflection-trigger detection on decoded bytes (DESIGN.md section 4).
//!
//! A phrase matches where the case-insensitive regex `(?<!\w)phrase(?!\w)` matches the text the
//! tokens decode to. Each token's bytes go through a UTF-8 decoder and a phrase automaton one
//! character at a time, so the cost per token is its length, whatever the context. A hit is
//! reported at the token whose bytes confirm the word boundary after the phrase (the next
//! character, a special token, or the end of the text), so that feeding one token at a time,
//! a batch of streams, or a whole token list gives the same hits.

mod automaton;
mod detector;
mod unicode;
#[allow(clippy::unreadable_literal)]
mod unicode_tables;
mod vocab;

pub use automaton::MAX_PHRASE_CHARS;
pub use detector::{Detector, Hit, StreamState, DEFAULT_PHRASES};
pub use unicode::{fold, is_word, Utf8Decoder};
pub use vocab::{TokenKind, Vocab};
