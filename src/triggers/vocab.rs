//! Token id -> the bytes it decodes to, read from a Hugging Face `tokenizer.json` with the
//! `tokenizers` crate, the way `Tokenizer::decode` turns ids into text.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Ordinary text: its bytes join the decoded text.
    Text,
    /// A special added token (chat markers, vision pads): no text; a boundary between texts.
    Special,
    /// An id below the vocabulary size that no token uses.
    Unused,
}

/// The bytes of every token id.
#[derive(Clone)]
pub struct Vocab {
    bytes: Vec<u8>,
    start: Vec<u32>,
    kind: Vec<TokenKind>,
    /// The tokenizer it was read from, to encode texts.
    tokenizer: Arc<Tokenizer>,
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocab")
            .field("len", &self.kind.len())
            .finish_non_exhaustive()
    }
}

impl Vocab {
    /// Loads `tokenizer.json`, or the `tokenizer.json` inside a model folder.
    pub fn from_path(path: &Path) -> Result<Vocab> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            return Err(if path.is_dir() {
                crate::io_err!(
                    "tokenizer: the folder {} holds no tokenizer.json",
                    path.display()
                )
            } else {
                crate::io_err!("tokenizer: no such file or folder: {}", path.display())
            });
        }
        let tokenizer = Tokenizer::from_file(&file).map_err(|e| {
            crate::value_err!(
                "tokenizer: cannot read {} as a tokenizer.json: {e}",
                file.display()
            )
        })?;
        Vocab::from_tokenizer(tokenizer)
    }

    /// Parses the JSON text of a `tokenizer.json` (what `tokenizers.Tokenizer.to_str()` gives).
    pub fn from_json(json: &str) -> Result<Vocab> {
        let tokenizer = Tokenizer::from_str(json)
            .map_err(|e| crate::value_err!("tokenizer: not a valid tokenizer.json: {e}"))?;
        Vocab::from_tokenizer(tokenizer)
    }

    pub fn from_tokenizer(tokenizer: Tokenizer) -> Result<Vocab> {
        let added = tokenizer.get_added_tokens_decoder();
        let vocab = tokenizer.get_vocab(true);
        let size = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        if size == 0 {
            return Err(Error::Value("tokenizer: the vocabulary is empty".into()));
        }
        let mut token_of: Vec<Option<&str>> = vec![None; size];
        for (token, &id) in &vocab {
            token_of[id as usize] = Some(token.as_str());
        }
        let byte_level = tokenizer.get_decoder().is_some_and(is_byte_level);
        let char_to_byte = byte_level_char_to_byte();

        let mut bytes = Vec::new();
        let mut start = Vec::with_capacity(size + 1);
        let mut kind = Vec::with_capacity(size);
        for (id, token) in token_of.iter().enumerate() {
            start.push(bytes.len() as u32);
            let Some(token) = token else {
                kind.push(TokenKind::Unused);
                continue;
            };
            if added.get(&(id as u32)).is_some_and(|t| t.special) {
                kind.push(TokenKind::Special);
                continue;
            }
            kind.push(TokenKind::Text);
            if byte_level {
                // As tokenizers' ByteLevel decoder: map every character back to its byte, or
                // keep the token's own UTF-8 when some character is not a byte-level one.
                let mapped: Option<Vec<u8>> = token.chars().map(|c| char_to_byte(c)).collect();
                match mapped {
                    Some(b) => bytes.extend_from_slice(&b),
                    None => bytes.extend_from_slice(token.as_bytes()),
                }
            } else if let Some(byte) = byte_fallback(token) {
                bytes.push(byte);
            } else {
                // SentencePiece style: the metaspace stands for a space.
                bytes.extend_from_slice(token.replace('\u{2581}', " ").as_bytes());
            }
        }
        start.push(bytes.len() as u32);
        Ok(Vocab {
            bytes,
            start,
            kind,
            tokenizer: Arc::new(tokenizer),
        })
    }

    /// Token ids of `text`, without added special tokens (chat templates add their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| crate::value_err!("text: cannot be tokenized: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Number of ids (the largest id plus one).
    pub fn len(&self) -> usize {
        self.kind.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kind.is_empty()
    }

    pub fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kind.get(id as usize).copied()
    }

    /// The bytes token `id` decodes to (empty for special and unused ids).
    pub fn bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        &self.bytes[self.start[i] as usize..self.start[i + 1] as usize]
    }
}

fn is_byte_level(decoder: &DecoderWrapper) -> bool {
    match decoder {
        DecoderWrapper::ByteLevel(_) => true,
        DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().any(is_byte_level),
        _ => false,
    }
}

/// `<0xAB>` byte-fallback tokens of SentencePiece vocabularies.
fn byte_fallback(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() == 2 {
        u8::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

/// The inverse of GPT-2's bytes-to-unicode table used by byte-level BPE: printable bytes stand
/// for themselves, the other 68 bytes for the code points 256, 257, ... in byte order.
fn byte_level_char_to_byte() -> impl Fn(char) -> Option<u8> {
    let mut table = [None; 324];
    let mut shifted = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let cp = if printable {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        table[cp as usize] = Some(b as u8);
    }
    move |c: char| table.get(c as usize).copied().flatten()
}
