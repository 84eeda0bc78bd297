//! PVC scheduling: which reflection hits become calibrations (the image given to the model
//! again), and the per-stream state that carries the decision from token to token.
//!
//! A [`Monitor`] is one generation being watched: the trigger detector's state, the schedule's
//! state, and the hits and calibrations so far. A [`MonitorBatch`] holds monitors in slots that
//! follow a serving engine's batch as requests come, go, move and swap between steps.

use std::sync::Arc;

use crate::error::Result;
use crate::triggers::{Detector, Hit, StreamState};

/// When hits become calibrations. Token counts are generated tokens of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// No calibration before this many tokens have been generated.
    pub warmup: u64,
    /// At least this many tokens from one calibration to the next.
    pub min_gap: u64,
    /// At most this many calibrations per stream (`None`: no limit).
    pub max_calibrations: Option<u32>,
    /// Calibrate without a trigger once this many tokens have passed since the last
    /// calibration (or since the start); `None`: only triggers calibrate.
    pub period: Option<u64>,
}

impl Default for Schedule {
    /// Every hit calibrates.
    fn default() -> Self {
        Schedule {
            warmup: 0,
            min_gap: 0,
            max_calibrations: None,
            period: None,
        }
    }
}

impl Schedule {
    pub fn new(
        warmup: u64,
        min_gap: u64,
        max_calibrations: Option<u32>,
        period: Option<u64>,
    ) -> Result<Schedule> {
        if period == Some(0) {
            return Err(crate::value_err!(
                "period: must be at least 1 token, or None for no periodic calibration"
            ));
        }
        Ok(Schedule {
            warmup,
            min_gap,
            max_calibrations,
            period,
        })
    }
}

/// Why a calibration happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A reflection phrase was hit.
    Trigger,
    /// `period` tokens passed without one.
    Period,
}

/// A calibration decided at token `token_index` (0-based among the stream's tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    pub token_index: u64,
    pub reason: Reason,
    /// The hit that triggered it (for `Reason::Trigger`).
    pub hit: Option<Hit>,
}

/// The schedule's state for one stream; it can be carried over when a request is continued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScheduleState {
    /// Tokens seen.
    pub tokens: u64,
    /// Calibrations made.
    pub calibrations: u32,
    /// Tokens since the last calibration (or since the start, when there was none).
    pub since_last: u64,
}

impl ScheduleState {
    /// A state that continues a stream: `calibrations` already made, `since_last` tokens since
    /// the last of them (or since the start).
    pub fn resume(calibrations: u32, since_last: u64) -> ScheduleState {
        ScheduleState {
            tokens: 0,
            calibrations,
            since_last,
        }
    }

    /// Advances by one token; `hit` says whether a phrase was confirmed at it. Returns the
    /// reason of the calibration decided at this token, if any.
    #[inline]
    pub fn on_token(&mut self, schedule: &Schedule, hit: bool) -> Option<Reason> {
        let index = self.tokens;
        self.tokens += 1;
        self.since_last += 1;
        let allowed = schedule
            .max_calibrations
            .is_none_or(|max| self.calibrations < max)
            && (self.calibrations > 0 || index >= schedule.warmup)
            && (self.calibrations == 0 || self.since_last >= schedule.min_gap);
        let reason = if !allowed {
            None
        } else if hit {
            Some(Reason::Trigger)
        } else if schedule.period.is_some_and(|p| self.since_last >= p) {
            Some(Reason::Period)
        } else {
            None
        };
        if reason.is_some() {
            self.calibrations += 1;
            self.since_last = 0;
        }
        reason
    }
}

/// One watched generation: detector state, schedule state, hits and calibrations.
#[derive(Debug, Clone)]
pub struct Monitor {
    pub schedule: Schedule,
    pub trigger: StreamState,
    pub state: ScheduleState,
    /// The schedule state before the latest token, so that a hit confirmed only by the end
    /// of the text can still be decided at that token.
    before_last: ScheduleState,
    pub hits: Vec<Hit>,
    pub calibrations: Vec<Calibration>,
    /// A calibration is due: decided and not yet carried out. Set when a calibration is
    /// decided; it stays set through later tokens until [`Monitor::take_due`] has reported it
    /// and a token has been fed after that (a serving engine keeps forcing the calibration
    /// until the next token shows that the forced sample was taken).
    pub due: bool,
    /// `take_due` reported the due calibration; the next token clears it.
    reported: bool,
}

impl Monitor {
    pub fn new(detector: &Detector, schedule: Schedule, state: ScheduleState) -> Monitor {
        Monitor {
            schedule,
            trigger: detector.new_state(),
            state,
            before_last: state,
            hits: Vec::new(),
            calibrations: Vec::new(),
            due: false,
            reported: false,
        }
    }

    /// Whether a calibration is due; reporting it lets the next token clear it.
    #[inline]
    pub fn take_due(&mut self) -> bool {
        self.reported |= self.due;
        self.due
    }

    /// A new token arrived: a reported calibration has been carried out.
    #[inline]
    fn on_new_token(&mut self) {
        if self.reported {
            self.due = false;
            self.reported = false;
        }
    }

    /// Feeds one generated token; returns the calibration decided at it, if any. An invalid
    /// token id is refused before anything changes.
    #[inline]
    pub fn push(&mut self, detector: &Detector, token: i64) -> Result<Option<Calibration>> {
        let index = self.state.tokens;
        let before = self.hits.len();
        detector.push(&mut self.trigger, token, index, &mut self.hits)?;
        self.on_new_token();
        let first_new_hit = self.hits.get(before).copied();
        self.before_last = self.state;
        Ok(self.decide(index, first_new_hit))
    }

    /// Feeds a token that decodes to no text (an id the tokenizer does not know, as a model
    /// whose logits are wider than its tokenizer can sample): it counts as a generated token for
    /// the schedule but leaves the decoded text, and so the trigger state, unchanged.
    #[inline]
    pub fn push_no_text(&mut self) -> Option<Calibration> {
        let index = self.state.tokens;
        self.on_new_token();
        self.before_last = self.state;
        self.decide(index, None)
    }

    /// Ends the text: a phrase at the very end becomes a hit (at the last token). Returns the
    /// calibration it would make, if the schedule allows one there.
    pub fn finish(&mut self, detector: &Detector) -> Option<Calibration> {
        let before = self.hits.len();
        let last = self.state.tokens.checked_sub(1);
        detector.finish(&mut self.trigger, last, &mut self.hits);
        let hit = self.hits.get(before).copied()?;
        let last = last?;
        // The last token was decided without this hit: decide it again with the hit, unless
        // it calibrated already.
        if self
            .calibrations
            .last()
            .is_some_and(|c| c.token_index == last)
        {
            return None;
        }
        self.state = self.before_last;
        self.decide(last, Some(hit))
    }

    #[inline]
    fn decide(&mut self, index: u64, hit: Option<Hit>) -> Option<Calibration> {
        let reason = self.state.on_token(&self.schedule, hit.is_some())?;
        let calibration = Calibration {
            token_index: index,
            reason,
            hit: if reason == Reason::Trigger { hit } else { None },
        };
        self.calibrations.push(calibration);
        self.due = true;
        Some(calibration)
    }
}

/// What a batch does with a token id outside the tokenizer's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutOfVocab {
    /// Refuse it (an index error, nothing changes).
    #[default]
    Raise,
    /// Count it as a generated token that decodes to no text ([`Monitor::push_no_text`]), as
    /// `tokenizers` drops ids it does not know when decoding.
    NoText,
}

/// What a caller read of one slot's token list for [`MonitorBatch::advance_lists`]: the list's
/// length, and its tokens past [`MonitorBatch::tokens_seen`] as `tokens[start..end]` (an empty
/// range when it did not grow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListRead {
    pub slot: usize,
    pub len: usize,
    pub start: usize,
    pub end: usize,
}

/// Monitors in numbered slots, fed one token per slot per decoding step.
#[derive(Debug, Clone)]
pub struct MonitorBatch {
    detector: Arc<Detector>,
    slots: Vec<Option<Monitor>>,
    out_of_vocab: OutOfVocab,
}

impl MonitorBatch {
    pub fn new(detector: Arc<Detector>, capacity: usize) -> MonitorBatch {
        MonitorBatch::with_out_of_vocab(detector, capacity, OutOfVocab::Raise)
    }

    pub fn with_out_of_vocab(
        detector: Arc<Detector>,
        capacity: usize,
        out_of_vocab: OutOfVocab,
    ) -> MonitorBatch {
        MonitorBatch {
            detector,
            slots: vec![None; capacity],
            out_of_vocab,
        }
    }

    pub fn out_of_vocab(&self) -> OutOfVocab {
        self.out_of_vocab
    }

    /// Feeds one token to `monitor`, following the batch's out-of-vocabulary rule (ids were
    /// checked before when the rule is `Raise`).
    #[inline]
    fn push(
        detector: &Detector,
        out_of_vocab: OutOfVocab,
        monitor: &mut Monitor,
        token: i64,
    ) -> Result<Option<Calibration>> {
        if out_of_vocab == OutOfVocab::NoText && detector.check_token(token).is_err() {
            return Ok(monitor.push_no_text());
        }
        monitor.push(detector, token)
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn detector(&self) -> &Arc<Detector> {
        &self.detector
    }

    fn check_slot(&self, slot: i64, name: &str) -> Result<usize> {
        if slot < 0 || slot as u64 >= self.slots.len() as u64 {
            return Err(crate::index_err!(
                "{name} = {slot}: slot out of range (the batch has slots 0 to {})",
                self.slots.len() as i64 - 1
            ));
        }
        Ok(slot as usize)
    }

    /// Starts watching a new stream in `slot` (replacing whatever was there).
    pub fn add(&mut self, slot: i64, schedule: Schedule, state: ScheduleState) -> Result<()> {
        let slot = self.check_slot(slot, "slot")?;
        self.slots[slot] = Some(Monitor::new(&self.detector, schedule, state));
        Ok(())
    }

    /// Stops watching `slot`; returns its monitor (None if it was empty).
    pub fn remove(&mut self, slot: i64) -> Result<Option<Monitor>> {
        let slot = self.check_slot(slot, "slot")?;
        Ok(self.slots[slot].take())
    }

    /// The stream in `from` moves to `to` (replacing what was there); `from` becomes empty.
    pub fn move_slot(&mut self, from: i64, to: i64) -> Result<()> {
        let from = self.check_slot(from, "from_slot")?;
        let to = self.check_slot(to, "to_slot")?;
        if from != to {
            self.slots[to] = self.slots[from].take();
        }
        Ok(())
    }

    /// The streams in `a` and `b` trade places.
    pub fn swap(&mut self, a: i64, b: i64) -> Result<()> {
        let a = self.check_slot(a, "slot_a")?;
        let b = self.check_slot(b, "slot_b")?;
        self.slots.swap(a, b);
        Ok(())
    }

    pub fn get(&self, slot: i64) -> Result<Option<&Monitor>> {
        let slot = self.check_slot(slot, "slot")?;
        Ok(self.slots[slot].as_ref())
    }

    /// Whether `slot` holds a stream.
    pub fn is_active(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| s.is_some())
    }

    /// One decoding step: `tokens[i]` is the newest token of slot `i`; negative values and
    /// empty slots are skipped. Calls `on_calibration(slot, calibration)` for every slot that
    /// calibrates at this step. All token ids are checked before any stream changes.
    pub fn step(
        &mut self,
        tokens: &[i64],
        mut on_calibration: impl FnMut(usize, Calibration),
    ) -> Result<()> {
        if tokens.len() > self.slots.len() {
            return Err(crate::value_err!(
                "tokens: {} entries for a batch of {} slots",
                tokens.len(),
                self.slots.len()
            ));
        }
        if self.out_of_vocab == OutOfVocab::Raise {
            for (slot, &token) in tokens.iter().enumerate() {
                if token >= 0 && self.slots[slot].is_some() {
                    self.detector
                        .check_token(token)
                        .map_err(|e| crate::index_err!("tokens[{slot}]: {e}"))?;
                }
            }
        }
        let detector = &*self.detector;
        let out_of_vocab = self.out_of_vocab;
        for (slot, (&token, monitor)) in tokens.iter().zip(self.slots.iter_mut()).enumerate() {
            if token < 0 {
                continue;
            }
            if let Some(monitor) = monitor {
                if let Some(calibration) = Self::push(detector, out_of_vocab, monitor, token)? {
                    on_calibration(slot, calibration);
                }
            }
        }
        Ok(())
    }

    /// Feeds several tokens, in order, to the stream in `slot` (a request that joins the batch
    /// with tokens already generated, or tokens a step did not show). Returns the calibrations
    /// they make. Ids are checked before anything changes (under `OutOfVocab::Raise`); a
    /// negative id is refused; an empty slot is an error.
    pub fn feed(&mut self, slot: i64, tokens: &[i64]) -> Result<Vec<Calibration>> {
        let index = self.check_slot(slot, "slot")?;
        if self.slots[index].is_none() {
            return Err(crate::value_err!("slot = {slot}: the slot holds no stream"));
        }
        for (i, &token) in tokens.iter().enumerate() {
            if token < 0 {
                return Err(crate::index_err!(
                    "tokens[{i}] = {token}: token ids must be >= 0"
                ));
            }
            if self.out_of_vocab == OutOfVocab::Raise {
                self.detector
                    .check_token(token)
                    .map_err(|e| crate::index_err!("tokens[{i}]: {e}"))?;
            }
        }
        let detector = &*self.detector;
        let out_of_vocab = self.out_of_vocab;
        let Some(monitor) = self.slots[index].as_mut() else {
            return Err(crate::value_err!("slot = {slot}: the slot holds no stream"));
        };
        let mut made = Vec::new();
        for &token in tokens {
            if let Some(calibration) = Self::push(detector, out_of_vocab, monitor, token)? {
                made.push(calibration);
            }
        }
        Ok(made)
    }
}

impl MonitorBatch {
    /// One step of a serving engine whose rows name their stream: row `i` belongs to slot
    /// `slots[i]`, and `tokens[i]` is token number `token_index[i]` of that stream. A token is
    /// fed when it is the one the stream expects next (`token_index == tokens seen`); rows
    /// that repeat a token already fed, or show none (`token_index < 0` or `tokens[i] < 0`),
    /// feed nothing. Then `on_force(i)` is called for every row with `sampling[i]` set whose
    /// stream has a calibration due ([`Monitor::take_due`]). Empty slots are skipped. Lengths
    /// and slots are checked, and (under `OutOfVocab::Raise`) the ids that would be fed, before
    /// any stream changes.
    pub fn advance(
        &mut self,
        slots: &[i64],
        token_index: &[i64],
        tokens: &[i64],
        sampling: &[bool],
        mut on_force: impl FnMut(usize),
    ) -> Result<()> {
        let n = slots.len();
        if token_index.len() != n || tokens.len() != n || sampling.len() != n {
            return Err(crate::value_err!(
                "slots, token_index, tokens and sampling must have one entry per row: got {}, {}, {} and {}",
                n,
                token_index.len(),
                tokens.len(),
                sampling.len()
            ));
        }
        for (row, &slot) in slots.iter().enumerate() {
            if slot < 0 || slot as u64 >= self.slots.len() as u64 {
                return Err(crate::index_err!(
                    "slots[{row}] = {slot}: slot out of range (the batch has slots 0 to {})",
                    self.slots.len() as i64 - 1
                ));
            }
            if self.out_of_vocab == OutOfVocab::Raise {
                if let Some(monitor) = &self.slots[slot as usize] {
                    if token_index[row] >= 0
                        && token_index[row] as u64 == monitor.state.tokens
                        && tokens[row] >= 0
                    {
                        self.detector
                            .check_token(tokens[row])
                            .map_err(|e| crate::index_err!("tokens[{row}]: {e}"))?;
                    }
                }
            }
        }
        let detector = &*self.detector;
        let out_of_vocab = self.out_of_vocab;
        for row in 0..n {
            let Some(monitor) = self.slots[slots[row] as usize].as_mut() else {
                continue;
            };
            if token_index[row] >= 0
                && token_index[row] as u64 == monitor.state.tokens
                && tokens[row] >= 0
            {
                Self::push(detector, out_of_vocab, monitor, tokens[row])?;
            }
            if sampling[row] && monitor.take_due() {
                on_force(row);
            }
        }
        Ok(())
    }

    /// [`advance`](Self::advance) for rows described by sequence length (vLLM's V2 runner):
    /// row `i` is slot `slots[i]`, its input token `tokens[i]` is token number
    /// `seq_lens[i] - 1 - prompt_len[slot]` of the stream, and the row samples when
    /// `seq_lens[i] >= prefill_len[slot]` (not an intermediate chunk of a prefill).
    /// `seq_lens` may be longer than `slots` (padding); `prompt_len` and `prefill_len` are
    /// indexed by slot.
    pub fn advance_seq(
        &mut self,
        slots: &[i64],
        seq_lens: &[i64],
        tokens: &[i64],
        prompt_len: &[i64],
        prefill_len: &[i64],
        on_force: impl FnMut(usize),
    ) -> Result<()> {
        if seq_lens.len() < slots.len() {
            return Err(crate::value_err!(
                "seq_lens: {} entries for {} rows of slots (one per row; padding after them is ignored)",
                seq_lens.len(),
                slots.len()
            ));
        }
        let mut token_index = Vec::with_capacity(slots.len());
        let mut sampling = Vec::with_capacity(slots.len());
        for (row, (&slot, &seq)) in slots.iter().zip(seq_lens).enumerate() {
            let slot_index = usize::try_from(slot).ok();
            let (Some(&prompt), Some(&prefill)) = (
                slot_index.and_then(|s| prompt_len.get(s)),
                slot_index.and_then(|s| prefill_len.get(s)),
            ) else {
                return Err(crate::index_err!(
                    "slots[{row}] = {slot}: outside prompt_len / prefill_len"
                ));
            };
            token_index.push(seq - 1 - prompt);
            sampling.push(seq >= prefill);
        }
        self.advance(slots, &token_index, tokens, &sampling, on_force)
    }

    /// Tokens the stream in `slot` has taken (None for an empty or out-of-range slot): where a
    /// caller reading token lists ([`advance_lists`](Self::advance_lists)) starts reading.
    pub fn tokens_seen(&self, slot: usize) -> Option<usize> {
        self.slots
            .get(slot)?
            .as_ref()
            .map(|m| m.state.tokens as usize)
    }

    /// One step of a serving engine that keeps each stream's generated tokens in a list (vLLM's
    /// legacy model runner). For each [`ListRead`] (a list's length and, when it grew past
    /// [`tokens_seen`](Self::tokens_seen), its new tokens as `tokens[start..end]`): a list
    /// shorter than what was fed, or new tokens holding a negative placeholder id, make the slot
    /// *blind* (returned, not fed); otherwise the stream is fed its new tokens. Then
    /// `on_force(slot)` for every slot below `rows` with a calibration due. Everything
    /// (`rows`, the reads, and under `OutOfVocab::Raise` every id) is checked before any stream
    /// changes. Returns the blind slots, ascending as read.
    pub fn advance_lists(
        &mut self,
        reads: &[ListRead],
        tokens: &[i64],
        rows: usize,
        on_force: impl FnMut(usize),
    ) -> Result<Vec<usize>> {
        if rows > self.slots.len() {
            return Err(crate::value_err!(
                "rows = {rows}: more than the batch's {} slots",
                self.slots.len()
            ));
        }
        let mut spans = Vec::with_capacity(reads.len());
        let mut blind = Vec::new();
        for read in reads {
            let Some(seen) = self.tokens_seen(read.slot) else {
                continue;
            };
            if read.len < seen {
                blind.push(read.slot);
                continue;
            }
            let new = read.len - seen;
            let part = tokens.get(read.start..read.end).filter(|p| p.len() == new);
            let Some(part) = part else {
                return Err(crate::value_err!(
                    "reads: slot {} has {new} new tokens (list length {} after {seen} seen) but tokens[{}..{}] of {} were given",
                    read.slot, read.len, read.start, read.end, tokens.len()
                ));
            };
            if new == 0 {
                continue;
            }
            if part.iter().any(|&t| t < 0) {
                blind.push(read.slot);
                continue;
            }
            if self.out_of_vocab == OutOfVocab::Raise {
                for (k, &t) in part.iter().enumerate() {
                    self.detector.check_token(t).map_err(|e| {
                        crate::index_err!("outputs[{}][{}]: {e}", read.slot, seen + k)
                    })?;
                }
            }
            spans.push((read.slot, read.start, read.end));
        }
        self.feed_and_collect(tokens, &spans, rows, on_force)?;
        Ok(blind)
    }

    /// Feeds, for each `(slot, start, end)` of `spans`, `tokens[start..end]` to the stream in
    /// `slot` (the tokens generated since its last one; empty slots are skipped), then calls
    /// `on_force(slot)` for every slot below `rows` whose stream has a calibration due. Ids must
    /// have been checked (`OutOfVocab::Raise`) by the caller; an invalid one is an error
    /// (streams fed before it keep their tokens).
    pub fn feed_and_collect(
        &mut self,
        tokens: &[i64],
        spans: &[(usize, usize, usize)],
        rows: usize,
        mut on_force: impl FnMut(usize),
    ) -> Result<()> {
        let detector = &*self.detector;
        let out_of_vocab = self.out_of_vocab;
        for &(slot, start, end) in spans {
            let Some(part) = tokens.get(start..end) else {
                return Err(crate::value_err!(
                    "spans: ({slot}, {start}, {end}) is outside the {} tokens",
                    tokens.len()
                ));
            };
            if let Some(Some(monitor)) = self.slots.get_mut(slot) {
                for &token in part {
                    Self::push(detector, out_of_vocab, monitor, token)?;
                }
            }
        }
        for (slot, monitor) in self.slots.iter_mut().enumerate().take(rows) {
            if let Some(monitor) = monitor {
                if monitor.take_due() {
                    on_force(slot);
                }
            }
        }
        Ok(())
    }
}

/// What a schedule makes of one text: its token count, hits and calibrations.
#[derive(Debug, Clone)]
pub struct TextScan {
    pub tokens: usize,
    pub hits: Vec<Hit>,
    pub calibrations: Vec<Calibration>,
}

/// Tokenizes `text` and watches it as if it were generated, token by token.
pub fn scan_text(detector: &Detector, text: &str, schedule: Schedule) -> Result<TextScan> {
    let ids = detector.vocab().encode(text)?;
    let mut monitor = Monitor::new(detector, schedule, ScheduleState::default());
    for &id in &ids {
        monitor.push(detector, id as i64)?;
    }
    monitor.finish(detector);
    Ok(TextScan {
        tokens: ids.len(),
        hits: monitor.hits,
        calibrations: monitor.calibrations,
    })
}

/// [`scan_text`] over many texts, in parallel.
pub fn scan_texts(
    detector: &Detector,
    texts: &[String],
    schedule: Schedule,
) -> Vec<Result<TextScan>> {
    use rayon::prelude::*;
    texts
        .par_iter()
        .map(|text| scan_text(detector, text, schedule))
        .collect()
}
