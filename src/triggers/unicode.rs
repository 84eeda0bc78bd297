//! The two character properties that make matching agree with Python's `re` (str pattern,
//! `re.IGNORECASE`): what `\w` matches, and the case fold under which two characters are equal.
//! The tables come from CPython's own data (scripts/gen_unicode_tables.py).

use super::unicode_tables::{FOLD_PAIRS, WORD_RANGES};

/// U+FFFD, what invalid UTF-8 decodes to (as `String::from_utf8_lossy` and tokenizers do).
pub const REPLACEMENT: char = '\u{FFFD}';

/// Whether Python's `re` `\w` matches `c` (`c.isalnum() or c == "_"`).
#[inline]
pub fn is_word(c: char) -> bool {
    let cp = c as u32;
    if cp < 0x80 {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    match WORD_RANGES.binary_search_by(|&(lo, hi)| {
        if hi < cp {
            std::cmp::Ordering::Less
        } else if lo > cp {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }) {
        Ok(_) => true,
        Err(_) => false,
    }
}

/// The canonical case fold of `c`: two characters match under `re.IGNORECASE` exactly when
/// their folds are equal (sre's simple lowercase plus its extra equivalences such as i/ı, s/ſ).
#[inline]
pub fn fold(c: char) -> char {
    let cp = c as u32;
    if cp < 0x80 {
        return c.to_ascii_lowercase();
    }
    match FOLD_PAIRS.binary_search_by_key(&cp, |&(from, _)| from) {
        Ok(i) => char::from_u32(FOLD_PAIRS[i].1).unwrap_or(c),
        Err(_) => c,
    }
}

/// Incremental UTF-8 decoding with the replacement rule of `String::from_utf8_lossy` (each
/// maximal invalid subpart becomes one U+FFFD), so that decoding token by token gives the same
/// characters as decoding the concatenated bytes at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utf8Decoder {
    /// Bytes of an unfinished sequence (a valid prefix), and how many there are.
    buf: [u8; 4],
    len: u8,
    /// Total length of the unfinished sequence.
    need: u8,
}

impl Utf8Decoder {
    /// Whether an unfinished multi-byte sequence is waiting for more bytes.
    #[inline]
    pub fn is_pending(&self) -> bool {
        self.len != 0
    }

    /// Feeds one byte; calls `emit` for every character it completes or replaces.
    #[inline]
    pub fn push(&mut self, byte: u8, emit: &mut impl FnMut(char)) {
        if self.len != 0 {
            if Self::continues(self.buf[0], self.len, byte) {
                self.buf[self.len as usize] = byte;
                self.len += 1;
                if self.len == self.need {
                    let s = &self.buf[..self.len as usize];
                    // A complete sequence built only from valid continuations is valid UTF-8.
                    let c = std::str::from_utf8(s)
                        .ok()
                        .and_then(|s| s.chars().next())
                        .unwrap_or(REPLACEMENT);
                    self.len = 0;
                    emit(c);
                }
                return;
            }
            // The unfinished prefix is a maximal invalid subpart: one replacement, then restart.
            self.len = 0;
            emit(REPLACEMENT);
        }
        match byte {
            0x00..=0x7F => emit(byte as char),
            0xC2..=0xDF => self.start(byte, 2),
            0xE0..=0xEF => self.start(byte, 3),
            0xF0..=0xF4 => self.start(byte, 4),
            _ => emit(REPLACEMENT),
        }
    }

    /// Ends the byte stream: an unfinished sequence becomes one U+FFFD.
    #[inline]
    pub fn flush(&mut self, emit: &mut impl FnMut(char)) {
        if self.len != 0 {
            self.len = 0;
            emit(REPLACEMENT);
        }
    }

    #[inline]
    fn start(&mut self, byte: u8, need: u8) {
        self.buf[0] = byte;
        self.len = 1;
        self.need = need;
    }

    /// Whether `byte` may follow `len` bytes of a sequence that started with `lead`.
    #[inline]
    fn continues(lead: u8, len: u8, byte: u8) -> bool {
        let (lo, hi) = if len == 1 {
            match lead {
                0xE0 => (0xA0, 0xBF),
                0xED => (0x80, 0x9F),
                0xF0 => (0x90, 0xBF),
                0xF4 => (0x80, 0x8F),
                _ => (0x80, 0xBF),
            }
        } else {
            (0x80, 0xBF)
        };
        (lo..=hi).contains(&byte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_bytes(bytes: &[u8]) -> String {
        let mut dec = Utf8Decoder::default();
        let mut out = String::new();
        for &b in bytes {
            dec.push(b, &mut |c| out.push(c));
        }
        dec.flush(&mut |c| out.push(c));
        out
    }

    #[test]
    fn lossy_decoding_matches_std() {
        let cases: [&[u8]; 9] = [
            b"plain ascii",
            "caf\u{e9} \u{4f60}\u{597d} \u{1f600}".as_bytes(),
            b"\xe4\xbd",
            b"\xe4\xbdA",
            b"\xf0\x80\x80",
            b"\xed\xa0\x80",
            b"\xff\xfe\x80abc",
            b"\xf4\x90\x80\x80",
            b"\xc2",
        ];
        for bytes in cases {
            assert_eq!(
                decode_bytes(bytes),
                String::from_utf8_lossy(bytes),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn word_and_fold_follow_python() {
        assert!(
            is_word('a')
                && is_word('_')
                && is_word('9')
                && is_word('\u{4f60}')
                && is_word('\u{e9}')
        );
        assert!(!is_word(' ') && !is_word('-') && !is_word('\'') && !is_word(REPLACEMENT));
        assert_eq!(fold('W'), 'w');
        assert_eq!(fold('\u{130}'), 'i'); // İ
        assert_eq!(fold('\u{131}'), 'i'); // ı
        assert_eq!(fold('\u{17f}'), 's'); // ſ
        assert_eq!(fold('\u{212a}'), 'k'); // Kelvin sign
    }
}
