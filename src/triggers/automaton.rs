//! A multi-phrase matcher over case-folded characters: an Aho-Corasick automaton compiled to a
//! full DFA over a small alphabet (one class per distinct folded character of the phrases,
//! class 0 for every other character), so that each character costs one table lookup.

use std::collections::{BTreeMap, VecDeque};

use super::unicode::fold;

/// Longest phrase in characters: the stream keeps one bit of word/non-word history per
/// character in a `u128`, and the character before a phrase must still be in it.
pub const MAX_PHRASE_CHARS: usize = 127;

/// One phrase that ends at a state: its index in the phrase list and its length in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    pub phrase: u32,
    pub chars: u32,
}

#[derive(Debug, Clone)]
pub struct Automaton {
    /// Folded phrase character -> class, for ASCII (0 = not in any phrase).
    ascii_class: [u16; 128],
    /// Folded non-ASCII phrase characters and their classes, sorted by code point.
    other_class: Vec<(u32, u16)>,
    classes: usize,
    /// `next[state * classes + class]`.
    next: Vec<u32>,
    /// Outputs of state `s` are `outputs[output_start[s]..output_start[s + 1]]`.
    output_start: Vec<u32>,
    outputs: Vec<Output>,
}

impl Automaton {
    /// Builds the matcher. Phrases must be non-empty, at most [`MAX_PHRASE_CHARS`] characters,
    /// and distinct after case folding (checked by the caller, which names the argument).
    pub fn new(phrases: &[Vec<char>]) -> Automaton {
        // Alphabet: one class per distinct folded character.
        let mut class_of: BTreeMap<char, u16> = BTreeMap::new();
        for phrase in phrases {
            for &c in phrase {
                let next_class = class_of.len() as u16 + 1;
                class_of.entry(fold(c)).or_insert(next_class);
            }
        }
        let classes = class_of.len() + 1;
        let mut ascii_class = [0u16; 128];
        let mut other_class = Vec::new();
        for (&c, &class) in &class_of {
            if (c as u32) < 128 {
                ascii_class[c as usize] = class;
            } else {
                other_class.push((c as u32, class));
            }
        }

        // Trie.
        let mut goto: Vec<Vec<u32>> = vec![vec![u32::MAX; classes]];
        let mut ends: Vec<Vec<Output>> = vec![Vec::new()];
        for (index, phrase) in phrases.iter().enumerate() {
            let mut state = 0usize;
            for &c in phrase {
                let class = class_of[&fold(c)] as usize;
                if goto[state][class] == u32::MAX {
                    goto.push(vec![u32::MAX; classes]);
                    ends.push(Vec::new());
                    goto[state][class] = (goto.len() - 1) as u32;
                }
                state = goto[state][class] as usize;
            }
            ends[state].push(Output {
                phrase: index as u32,
                chars: phrase.len() as u32,
            });
        }

        // Failure links in breadth-first order, turning the trie into a full DFA; each state
        // inherits the outputs of its failure state (the phrases that end as its suffixes).
        let states = goto.len();
        let mut fail = vec![0u32; states];
        let mut queue = VecDeque::new();
        for class in 0..classes {
            let target = goto[0][class];
            if target == u32::MAX {
                goto[0][class] = 0;
            } else {
                queue.push_back(target as usize);
            }
        }
        while let Some(state) = queue.pop_front() {
            let inherited = ends[fail[state] as usize].clone();
            ends[state].extend(inherited);
            for class in 0..classes {
                let target = goto[state][class];
                let via_fail = goto[fail[state] as usize][class];
                if target == u32::MAX {
                    goto[state][class] = via_fail;
                } else {
                    fail[target as usize] = via_fail;
                    queue.push_back(target as usize);
                }
            }
        }

        let mut next = Vec::with_capacity(states * classes);
        let mut output_start = Vec::with_capacity(states + 1);
        let mut outputs = Vec::new();
        for state in 0..states {
            next.extend_from_slice(&goto[state]);
            output_start.push(outputs.len() as u32);
            // Longest phrase first, then phrase order: a stable, documented order of hits.
            let mut ending = ends[state].clone();
            ending.sort_by_key(|o| (std::cmp::Reverse(o.chars), o.phrase));
            outputs.extend(ending);
        }
        output_start.push(outputs.len() as u32);
        Automaton {
            ascii_class,
            other_class,
            classes,
            next,
            output_start,
            outputs,
        }
    }

    /// The class of a character (0 when no phrase contains it, up to case).
    #[inline]
    pub fn class(&self, c: char) -> u16 {
        let folded = fold(c) as u32;
        if folded < 128 {
            self.ascii_class[folded as usize]
        } else {
            match self
                .other_class
                .binary_search_by_key(&folded, |&(cp, _)| cp)
            {
                Ok(i) => self.other_class[i].1,
                Err(_) => 0,
            }
        }
    }

    #[inline(always)]
    pub fn step(&self, state: u32, class: u16) -> u32 {
        self.next[state as usize * self.classes + class as usize]
    }

    /// The phrases that end at `state`, longest first.
    #[inline(always)]
    pub fn outputs(&self, state: u32) -> &[Output] {
        let s = state as usize;
        &self.outputs[self.output_start[s] as usize..self.output_start[s + 1] as usize]
    }

    /// The largest number of phrases that end at one state.
    pub fn max_outputs_per_state(&self) -> usize {
        self.output_start
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }

    pub fn class_count(&self) -> usize {
        self.classes
    }
}
