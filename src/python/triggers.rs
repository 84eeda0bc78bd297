//! Bindings of `src/triggers` (the detector) and of the per-stream and batch monitors of
//! `src/pvc` that the detector hands out: `ReflectionDetector`, `ReflectionStream`,
//! `StreamBatch`, `Hit`, `TextScan`.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

#[allow(unused_imports)]
use crate::python::errors::{about, opt_arg, type_name, Arg};
use pyo3::types::{PyList, PyString};

use super::pvc::{Calibration, PVCSchedule};
use super::tensor::{bool_vector_arg, int_vector_arg, numpy_array};
use crate::pvc::{ListRead, Monitor, MonitorBatch, OutOfVocab, Schedule, ScheduleState};
use crate::triggers::{Detector, Hit as CoreHit, DEFAULT_PHRASES};

/// A reflection phrase found in decoded text: `phrase` (as configured) matched the characters
/// `char_start:char_end` of the text (Python `str` offsets); `token_index` is the token whose
/// bytes confirmed the match's end (None when matching plain text).
#[pyclass(name = "Hit", module = "tvc_rs", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct Hit {
    #[pyo3(get)]
    pub token_index: Option<u64>,
    #[pyo3(get)]
    pub phrase: String,
    #[pyo3(get)]
    pub phrase_index: u32,
    #[pyo3(get)]
    pub char_start: u64,
    #[pyo3(get)]
    pub char_end: u64,
}

impl Hit {
    pub fn new(hit: &CoreHit, phrases: &[String]) -> Hit {
        Hit {
            token_index: hit.token_index,
            phrase: phrases[hit.phrase as usize].clone(),
            phrase_index: hit.phrase,
            char_start: hit.char_start,
            char_end: hit.char_end,
        }
    }
}

#[pymethods]
impl Hit {
    fn __repr__(&self) -> String {
        let token = self
            .token_index
            .map_or("None".to_string(), |t| t.to_string());
        format!(
            "Hit(token_index={token}, phrase={:?}, char_start={}, char_end={})",
            self.phrase, self.char_start, self.char_end
        )
    }
}

/// The optional `phrases` argument: None, or a list of strings (a single string is refused,
/// not split into characters).
pub(crate) fn phrases_arg(phrases: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<String>>> {
    match phrases {
        None => Ok(None),
        Some(p) if p.is_instance_of::<PyString>() => Err(PyTypeError::new_err(
            "phrases: expected a list of strings, got a single string",
        )),
        Some(p) => p
            .extract::<Vec<String>>()
            .map(Some)
            .map_err(|_| PyTypeError::new_err("phrases: expected a list of strings")),
    }
}

/// Finds self-reflection phrases ("wait", "hmm", "let me double-check", ...) in the text a
/// token stream decodes to: where the case-insensitive regex `(?<!\w)phrase(?!\w)` matches.
///
/// tokenizer: a path to tokenizer.json or to a model folder holding one, a
/// `tokenizers.Tokenizer`, or a transformers fast tokenizer. phrases: the phrases to find
/// (default: `tvc_rs.DEFAULT_PHRASES`).
#[pyclass(name = "ReflectionDetector", module = "tvc_rs", frozen)]
pub struct ReflectionDetector {
    pub(crate) inner: Arc<Detector>,
}

pub(crate) fn detector_from(
    py: Python<'_>,
    tokenizer: &Bound<'_, PyAny>,
    phrases: Option<Vec<String>>,
) -> PyResult<Detector> {
    let phrases = phrases.as_deref();
    if let Ok(path) = tokenizer.extract::<PathBuf>() {
        return Ok(py.detach(|| Detector::from_path(&path, phrases))?);
    }
    // transformers fast tokenizers wrap a `tokenizers.Tokenizer` as `backend_tokenizer`.
    let backend = if tokenizer.hasattr("backend_tokenizer")? {
        tokenizer.getattr("backend_tokenizer")?
    } else {
        tokenizer.clone()
    };
    if backend.hasattr("to_str")? {
        let json: String = backend.call_method0("to_str")?.extract()?;
        return Ok(py.detach(|| Detector::from_json(&json, phrases))?);
    }
    Err(PyTypeError::new_err(format!(
        "tokenizer: expected a path to tokenizer.json or a model folder, a tokenizers.Tokenizer, or a transformers \
         fast tokenizer; got {}",
        tokenizer.get_type().name().map(|n| n.to_string()).unwrap_or_default()
    )))
}

fn hits_to_py(hits: &[CoreHit], phrases: &[String]) -> Vec<Hit> {
    hits.iter().map(|h| Hit::new(h, phrases)).collect()
}

fn schedule_state(
    calibrations_made: i64,
    tokens_since_last: Option<i64>,
) -> PyResult<ScheduleState> {
    if !(0..=u32::MAX as i64).contains(&calibrations_made) {
        return Err(PyValueError::new_err(format!(
            "calibrations_made = {calibrations_made}: must be >= 0"
        )));
    }
    let since = match tokens_since_last {
        None => 0,
        Some(s) if s >= 0 => s as u64,
        Some(s) => {
            return Err(PyValueError::new_err(format!(
                "tokens_since_last = {s}: must be >= 0"
            )))
        }
    };
    Ok(ScheduleState::resume(calibrations_made as u32, since))
}

#[pymethods]
impl ReflectionDetector {
    #[new]
    #[pyo3(signature = (tokenizer, phrases=None))]
    fn new(
        py: Python<'_>,
        tokenizer: &Bound<'_, PyAny>,
        phrases: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let phrases = phrases_arg(phrases)?;
        Ok(ReflectionDetector {
            inner: Arc::new(detector_from(py, tokenizer, phrases)?),
        })
    }

    /// The phrases this detector finds, in the order of `Hit.phrase_index`.
    #[getter]
    fn phrases(&self) -> Vec<String> {
        self.inner.phrases().to_vec()
    }

    /// Number of token ids (the largest id plus one).
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// Every hit in `text`; `token_index` is None, offsets are `str` indices.
    fn find_text(&self, py: Python<'_>, text: Arg<String>) -> PyResult<Vec<Hit>> {
        let text = text.get("text")?;
        let hits = py.detach(|| self.inner.find_text(&text));
        Ok(hits_to_py(&hits, self.inner.phrases()))
    }

    /// Every hit in a whole token list, exactly as streaming the tokens one at a time and then
    /// calling `finish()` gives. Offsets are into the decoded text.
    fn find_tokens(&self, py: Python<'_>, tokens: &Bound<'_, PyAny>) -> PyResult<Vec<Hit>> {
        let ids = int_vector_arg(tokens, "tokens")?;
        let hits = py
            .detach(|| self.inner.find_tokens(&ids))
            .map_err(about("tokens"))?;
        Ok(hits_to_py(&hits, self.inner.phrases()))
    }

    /// Token ids of `text` with this tokenizer (no special tokens added).
    fn encode(&self, py: Python<'_>, text: Arg<String>) -> PyResult<Vec<u32>> {
        let text_owned = text.get("text")?;
        let text: &str = &text_owned;
        Ok(py.detach(|| self.inner.vocab().encode(text))?)
    }

    /// A stream that watches one generation token by token, with a PVC schedule (default:
    /// every hit calibrates). `calibrations_made` and `tokens_since_last` continue the
    /// schedule of an earlier part of the same generation.
    #[pyo3(signature = (schedule=None, *, calibrations_made = Arg::of(0), tokens_since_last=None), text_signature = "($self, schedule=None, *, calibrations_made=0, tokens_since_last=None)")]
    fn stream(
        &self,
        schedule: Option<Arg<PVCSchedule>>,
        calibrations_made: Arg<i64>,
        tokens_since_last: Option<Arg<i64>>,
    ) -> PyResult<ReflectionStream> {
        let calibrations_made = calibrations_made.get("calibrations_made")?;
        let tokens_since_last = opt_arg(tokens_since_last, "tokens_since_last")?;
        let schedule = opt_arg(schedule, "schedule")?.map_or_else(Schedule::default, |s| s.inner);
        let state = schedule_state(calibrations_made, tokens_since_last)?;
        Ok(ReflectionStream {
            detector: self.inner.clone(),
            monitor: Monitor::new(&self.inner, schedule, state),
        })
    }

    /// Streams in `capacity` numbered slots, fed one token per slot per decoding step.
    ///
    /// out_of_vocab: what a token id outside the tokenizer's vocabulary does: "raise" (an
    /// IndexError, nothing changes) or "no_text" (it counts as a generated token that decodes to
    /// no text, as `tokenizers` drops unknown ids; for models whose logits are wider than
    /// their tokenizer).
    #[pyo3(signature = (capacity, *, out_of_vocab = Arg::of("raise".to_string())), text_signature = "($self, capacity, *, out_of_vocab='raise')")]
    fn batch(&self, capacity: Arg<i64>, out_of_vocab: Arg<String>) -> PyResult<StreamBatch> {
        let capacity = capacity.get("capacity")?;
        let out_of_vocab_owned = out_of_vocab.get("out_of_vocab")?;
        let out_of_vocab: &str = &out_of_vocab_owned;
        if !(0..=1 << 24).contains(&capacity) {
            return Err(PyValueError::new_err(format!(
                "capacity = {capacity}: must be between 0 and 16777216"
            )));
        }
        let out_of_vocab = match out_of_vocab {
            "raise" => OutOfVocab::Raise,
            "no_text" => OutOfVocab::NoText,
            other => {
                return Err(PyValueError::new_err(format!(
                    "out_of_vocab = {other:?}: expected \"raise\" or \"no_text\""
                )))
            }
        };
        Ok(StreamBatch {
            inner: MonitorBatch::with_out_of_vocab(
                self.inner.clone(),
                capacity as usize,
                out_of_vocab,
            ),
            last: Vec::new(),
        })
    }

    /// Tokenizes each text and watches it as if it were generated, with `schedule`; returns a
    /// `TextScan` per text (with `error` set for a text that cannot be tokenized). In parallel.
    #[pyo3(signature = (texts, schedule=None))]
    fn scan(
        &self,
        py: Python<'_>,
        texts: Arg<Vec<String>>,
        schedule: Option<Arg<PVCSchedule>>,
    ) -> PyResult<Vec<TextScan>> {
        let texts = texts.get("texts")?;
        let schedule = opt_arg(schedule, "schedule")?.map_or_else(Schedule::default, |s| s.inner);
        let results = py.detach(|| crate::pvc::scan_texts(&self.inner, &texts, schedule));
        let phrases = self.inner.phrases();
        Ok(results
            .into_iter()
            .map(|r| match r {
                Ok(scan) => TextScan {
                    tokens: scan.tokens,
                    hits: hits_to_py(&scan.hits, phrases),
                    calibrations: scan
                        .calibrations
                        .iter()
                        .map(|c| Calibration::new(c, phrases))
                        .collect(),
                    error: None,
                },
                Err(e) => TextScan {
                    tokens: 0,
                    hits: Vec::new(),
                    calibrations: Vec::new(),
                    error: Some(e.to_string()),
                },
            })
            .collect())
    }

    fn __repr__(&self) -> String {
        format!(
            "ReflectionDetector(vocab_size={}, phrases={:?})",
            self.inner.vocab_size(),
            self.inner.phrases()
        )
    }
}

/// What a schedule makes of one text: token count, hits and calibrations.
#[pyclass(name = "TextScan", module = "tvc_rs", frozen)]
#[derive(Clone)]
pub struct TextScan {
    #[pyo3(get)]
    tokens: usize,
    #[pyo3(get)]
    hits: Vec<Hit>,
    #[pyo3(get)]
    calibrations: Vec<Calibration>,
    /// Why the text could not be scanned, or None.
    #[pyo3(get)]
    error: Option<String>,
}

#[pymethods]
impl TextScan {
    fn __repr__(&self) -> String {
        format!(
            "TextScan(tokens={}, hits={}, calibrations={})",
            self.tokens,
            self.hits.len(),
            self.calibrations.len()
        )
    }
}

/// One generation watched token by token (from `ReflectionDetector.stream()`).
#[pyclass(name = "ReflectionStream", module = "tvc_rs")]
pub struct ReflectionStream {
    detector: Arc<Detector>,
    monitor: Monitor,
}

#[pymethods]
impl ReflectionStream {
    /// Feeds the next generated token; returns the calibration decided at it, or None.
    /// An id outside the vocabulary raises IndexError and changes nothing.
    fn push(&mut self, token_id: Arg<i64>) -> PyResult<Option<Calibration>> {
        let token_id = token_id.get("token_id")?;
        let calibration = self
            .monitor
            .push(&self.detector, token_id)
            .map_err(about("token_id"))?;
        Ok(calibration.map(|c| Calibration::new(&c, self.detector.phrases())))
    }

    /// Feeds several tokens; returns the calibrations they make. All ids are checked first.
    fn push_many(
        &mut self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Calibration>> {
        let ids = int_vector_arg(tokens, "tokens")?;
        for (i, &id) in ids.iter().enumerate() {
            self.detector.check_token(id).map_err(|e| {
                pyo3::exceptions::PyIndexError::new_err(format!("tokens[{i}]: {e}"))
            })?;
        }
        let detector = &self.detector;
        let monitor = &mut self.monitor;
        let made = py.detach(|| {
            let mut made = Vec::new();
            for &id in &ids {
                if let Some(c) = monitor.push(detector, id)? {
                    made.push(c);
                }
            }
            crate::Result::Ok(made)
        })?;
        Ok(made
            .iter()
            .map(|c| Calibration::new(c, self.detector.phrases()))
            .collect())
    }

    /// Ends the text: a phrase right at the end becomes a hit (at the last token); returns the
    /// calibration that makes, if any. Tokens fed afterwards start a new text.
    fn finish(&mut self) -> Option<Calibration> {
        self.monitor
            .finish(&self.detector)
            .map(|c| Calibration::new(&c, self.detector.phrases()))
    }

    /// Every hit so far.
    #[getter]
    fn hits(&self) -> Vec<Hit> {
        hits_to_py(&self.monitor.hits, self.detector.phrases())
    }

    /// Every calibration so far.
    #[getter]
    fn calibrations(&self) -> Vec<Calibration> {
        self.monitor
            .calibrations
            .iter()
            .map(|c| Calibration::new(c, self.detector.phrases()))
            .collect()
    }

    /// Tokens fed so far.
    #[getter]
    fn tokens_seen(&self) -> u64 {
        self.monitor.state.tokens
    }

    /// Calibrations made, including those carried over with `calibrations_made`.
    #[getter]
    fn calibrations_made(&self) -> u32 {
        self.monitor.state.calibrations
    }

    /// Tokens since the last calibration (or since the start).
    #[getter]
    fn tokens_since_last(&self) -> u64 {
        self.monitor.state.since_last
    }

    /// Characters of decoded text so far.
    #[getter]
    fn text_length(&self) -> u64 {
        self.monitor.trigger.chars()
    }

    #[getter]
    fn schedule(&self) -> PVCSchedule {
        PVCSchedule {
            inner: self.monitor.schedule,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "ReflectionStream(tokens_seen={}, hits={}, calibrations={})",
            self.monitor.state.tokens,
            self.monitor.hits.len(),
            self.monitor.calibrations.len()
        )
    }
}

/// Streams in numbered slots that follow a serving engine's batch (from
/// `ReflectionDetector.batch(capacity)`): `add`, `remove`, `move` and `swap` slots as requests
/// come, go and are reordered, and call `step(tokens)` once per decoding step.
#[pyclass(name = "StreamBatch", module = "tvc_rs")]
pub struct StreamBatch {
    inner: MonitorBatch,
    last: Vec<(usize, crate::pvc::Calibration)>,
}

#[pymethods]
impl StreamBatch {
    #[getter]
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// Starts watching a new stream in `slot` (replacing what was there).
    #[pyo3(signature = (slot, schedule=None, *, calibrations_made = Arg::of(0), tokens_since_last=None), text_signature = "($self, slot, schedule=None, *, calibrations_made=0, tokens_since_last=None)")]
    fn add(
        &mut self,
        slot: Arg<i64>,
        schedule: Option<Arg<PVCSchedule>>,
        calibrations_made: Arg<i64>,
        tokens_since_last: Option<Arg<i64>>,
    ) -> PyResult<()> {
        let slot = slot.get("slot")?;
        let calibrations_made = calibrations_made.get("calibrations_made")?;
        let tokens_since_last = opt_arg(tokens_since_last, "tokens_since_last")?;
        let schedule = opt_arg(schedule, "schedule")?.map_or_else(Schedule::default, |s| s.inner);
        let state = schedule_state(calibrations_made, tokens_since_last)?;
        Ok(self.inner.add(slot, schedule, state)?)
    }

    /// Stops watching `slot`; returns whether it held a stream.
    fn remove(&mut self, slot: Arg<i64>) -> PyResult<bool> {
        let slot = slot.get("slot")?;
        Ok(self.inner.remove(slot)?.is_some())
    }

    /// The stream in `from_slot` moves to `to_slot` (replacing what was there); `from_slot`
    /// becomes empty.
    #[pyo3(name = "move")]
    fn move_slot(&mut self, from_slot: Arg<i64>, to_slot: Arg<i64>) -> PyResult<()> {
        let from_slot = from_slot.get("from_slot")?;
        let to_slot = to_slot.get("to_slot")?;
        Ok(self.inner.move_slot(from_slot, to_slot)?)
    }

    /// The streams in `slot_a` and `slot_b` trade places.
    fn swap(&mut self, slot_a: Arg<i64>, slot_b: Arg<i64>) -> PyResult<()> {
        let slot_a = slot_a.get("slot_a")?;
        let slot_b = slot_b.get("slot_b")?;
        Ok(self.inner.swap(slot_a, slot_b)?)
    }

    /// "raise" or "no_text": what a token id outside the vocabulary does (see
    /// `ReflectionDetector.batch`).
    #[getter]
    fn out_of_vocab(&self) -> &'static str {
        match self.inner.out_of_vocab() {
            OutOfVocab::Raise => "raise",
            OutOfVocab::NoText => "no_text",
        }
    }

    /// Feeds several tokens, in order, to the stream in `slot` (a request that joins with
    /// tokens already generated, or tokens that steps did not show); returns the calibrations
    /// they make. Ids are checked before anything changes; an empty slot is a ValueError.
    fn feed(
        &mut self,
        py: Python<'_>,
        slot: Arg<i64>,
        tokens: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Calibration>> {
        let slot = slot.get("slot")?;
        let ids = int_vector_arg(tokens, "tokens")?;
        let inner = &mut self.inner;
        let made = py
            .detach(|| inner.feed(slot, &ids))
            .map_err(about("tokens"))?;
        let phrases = self.inner.detector().phrases();
        Ok(made.iter().map(|c| Calibration::new(c, phrases)).collect())
    }

    /// Whether `slot` holds a stream.
    fn is_active(&self, slot: Arg<i64>) -> PyResult<bool> {
        let slot = slot.get("slot")?;
        Ok(self.inner.get(slot)?.is_some())
    }

    /// One decoding step: `tokens[i]` is the newest token of slot `i` (a 1-D integer array or
    /// list, at most `capacity` long); negative entries and empty slots are skipped. Returns
    /// the slots that calibrate at this step (int32 array, ascending). All ids are checked
    /// before any stream changes.
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = int_vector_arg(tokens, "tokens")?;
        let ids = &ids[..];
        let inner = &mut self.inner;
        let last = &mut self.last;
        last.clear();
        py.detach(|| inner.step(ids, |slot, c| last.push((slot, c))))?;
        let slots: Vec<i32> = self.last.iter().map(|(slot, _)| *slot as i32).collect();
        let n = slots.len();
        numpy_array(py, slots, vec![n])
    }

    /// One step of a serving engine whose rows name their stream (vLLM's V2 model runner):
    /// row `i` is slot `slots[i]`, `tokens[i]` is token number `token_index[i]` of that stream
    /// (fed when it is the next one the stream expects, ignored when already fed or negative),
    /// `sampling[i]` whether the row samples a token. Returns the rows (int32, ascending) that
    /// must emit the calibration token: their stream has a calibration due. A due calibration
    /// stays due, and is returned again, until a token is fed after it was returned. Lengths,
    /// slots and (out_of_vocab="raise") ids are checked before anything changes.
    fn advance<'py>(
        &mut self,
        py: Python<'py>,
        slots: &Bound<'py, PyAny>,
        token_index: &Bound<'py, PyAny>,
        tokens: &Bound<'py, PyAny>,
        sampling: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let slots = int_vector_arg(slots, "slots")?;
        let token_index = int_vector_arg(token_index, "token_index")?;
        let tokens = int_vector_arg(tokens, "tokens")?;
        let sampling = bool_vector_arg(sampling, "sampling")?;
        let inner = &mut self.inner;
        let (slots, token_index, tokens) = (&slots[..], &token_index[..], &tokens[..]);
        let mut forced: Vec<i32> = Vec::new();
        py.detach(|| {
            inner.advance(slots, token_index, tokens, &sampling, |row| {
                forced.push(row as i32)
            })
        })?;
        let n = forced.len();
        numpy_array(py, forced, vec![n])
    }

    /// `advance` for an engine that describes each row by its sequence length (vLLM's V2 model
    /// runner): row `i` (slot `slots[i]`) has `seq_lens[i]` tokens up to and including its input
    /// token `tokens[i]`; the slot's stream starts after `prompt_len[slot]` tokens, so the input
    /// token is token number `seq_lens[i] - 1 - prompt_len[slot]` of the stream; the row samples
    /// when `seq_lens[i] >= prefill_len[slot]` (earlier rows are chunks of a prefill). The
    /// tables are indexed by slot. Returns the rows that must emit the calibration token.
    fn advance_seq<'py>(
        &mut self,
        py: Python<'py>,
        slots: &Bound<'py, PyAny>,
        seq_lens: &Bound<'py, PyAny>,
        tokens: &Bound<'py, PyAny>,
        prompt_len: &Bound<'py, PyAny>,
        prefill_len: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let slots = int_vector_arg(slots, "slots")?;
        let tokens = int_vector_arg(tokens, "tokens")?;
        let seq_lens = int_vector_arg(seq_lens, "seq_lens")?;
        let prompt_len = int_vector_arg(prompt_len, "prompt_len")?;
        let prefill_len = int_vector_arg(prefill_len, "prefill_len")?;
        let (inner, slots, tokens) = (&mut self.inner, &slots[..], &tokens[..]);
        let mut forced: Vec<i32> = Vec::new();
        py.detach(|| {
            inner.advance_seq(slots, &seq_lens, tokens, &prompt_len, &prefill_len, |row| {
                forced.push(row as i32)
            })
        })?;
        let n = forced.len();
        numpy_array(py, forced, vec![n])
    }

    /// One step of a serving engine that keeps each stream's generated tokens in a list
    /// (vLLM's legacy model runner): `outputs[slot]` is the token list of the request in
    /// `slot` (or None). Feeds every active stream the tokens its list gained since the last
    /// call, then returns `(slots, blind)`: the slots below `rows` (int32, ascending) with a
    /// calibration due (returned again until a token follows), and the slots whose new tokens
    /// could not be read (a negative placeholder id, or a list shorter than what was fed);
    /// those are not fed.
    fn advance_lists<'py>(
        &mut self,
        py: Python<'py>,
        outputs: &Bound<'py, PyAny>,
        rows: Arg<usize>,
    ) -> PyResult<(Bound<'py, PyAny>, Vec<usize>)> {
        let rows = rows.get("rows")?;
        let outputs = outputs.cast::<PyList>().map_err(|_| {
            PyTypeError::new_err(format!(
                "outputs: expected a list (one entry per row: a list of token ids or None), got {}",
                type_name(outputs)
            ))
        })?;
        // Only the lists are read here (their new items); what they mean is the core's
        // `advance_lists`.
        let mut tokens: Vec<i64> = Vec::new();
        let mut reads: Vec<ListRead> = Vec::new();
        let count = outputs.len().min(self.inner.capacity());
        let list_ptr = outputs.as_ptr();
        for slot in 0..count {
            let Some(seen) = self.inner.tokens_seen(slot) else {
                continue;
            };
            // Raw list access: this runs for every request at every decoding step, and the
            // safe accessors cost several times more per item.
            // SAFETY: the GIL is held, `outputs` is a list and `slot` is below its length;
            // PyList_GetItem returns a borrowed reference that stays valid while the list is
            // not modified, and nothing below runs Python code that could modify it.
            let item =
                unsafe { pyo3::ffi::PyList_GetItem(list_ptr, slot as pyo3::ffi::Py_ssize_t) };
            if item.is_null() {
                return Err(PyErr::fetch(py));
            }
            if item == unsafe { pyo3::ffi::Py_None() } {
                continue;
            }
            // SAFETY: `item` is a valid borrowed reference (above).
            if unsafe { pyo3::ffi::PyList_Check(item) } == 0 {
                return Err(PyTypeError::new_err(format!(
                    "outputs[{slot}]: expected a list of token ids or None"
                )));
            }
            // SAFETY: `item` is a list.
            let len = unsafe { pyo3::ffi::PyList_Size(item) } as usize;
            let start = tokens.len();
            for k in seen..len {
                // SAFETY: `item` is a list and `k` is below its length; the reference is borrowed.
                let value = unsafe { pyo3::ffi::PyList_GetItem(item, k as pyo3::ffi::Py_ssize_t) };
                if value.is_null() {
                    return Err(PyErr::fetch(py));
                }
                // SAFETY: `value` is a valid borrowed reference; PyLong_AsLongLong sets an
                // error (returning -1) for anything that is not an int.
                let token = unsafe { pyo3::ffi::PyLong_AsLongLong(value) };
                if token == -1 {
                    if let Some(err) = PyErr::take(py) {
                        return Err(PyTypeError::new_err(format!(
                            "outputs[{slot}][{k}]: expected an int token id ({err})"
                        )));
                    }
                }
                tokens.push(token);
            }
            reads.push(ListRead {
                slot,
                len,
                start,
                end: tokens.len(),
            });
        }
        let inner = &mut self.inner;
        let mut forced: Vec<i32> = Vec::new();
        let blind = py.detach(|| {
            inner.advance_lists(&reads, &tokens, rows, |slot| forced.push(slot as i32))
        })?;
        let n = forced.len();
        Ok((numpy_array(py, forced, vec![n])?, blind))
    }

    /// The calibrations of the latest `step`, as (slot, Calibration) pairs.
    #[getter]
    fn last_calibrations(&self) -> Vec<(usize, Calibration)> {
        let phrases = self.inner.detector().phrases();
        self.last
            .iter()
            .map(|(slot, c)| (*slot, Calibration::new(c, phrases)))
            .collect()
    }

    /// Every hit of the stream in `slot`.
    fn hits(&self, slot: Arg<i64>) -> PyResult<Vec<Hit>> {
        let slot = slot.get("slot")?;
        let phrases = self.inner.detector().phrases();
        Ok(self
            .inner
            .get(slot)?
            .map(|m| hits_to_py(&m.hits, phrases))
            .unwrap_or_default())
    }

    /// Every calibration of the stream in `slot`.
    fn calibrations(&self, slot: Arg<i64>) -> PyResult<Vec<Calibration>> {
        let slot = slot.get("slot")?;
        let phrases = self.inner.detector().phrases();
        Ok(self
            .inner
            .get(slot)?
            .map(|m| {
                m.calibrations
                    .iter()
                    .map(|c| Calibration::new(c, phrases))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// (tokens_seen, calibrations_made, tokens_since_last) of the stream in `slot`, or None
    /// for an empty slot: what a continued request passes back to `add`.
    fn state(&self, slot: Arg<i64>) -> PyResult<Option<(u64, u32, u64)>> {
        let slot = slot.get("slot")?;
        Ok(self
            .inner
            .get(slot)?
            .map(|m| (m.state.tokens, m.state.calibrations, m.state.since_last)))
    }

    fn __repr__(&self) -> String {
        let active = (0..self.inner.capacity())
            .filter(|&s| self.inner.is_active(s))
            .count();
        format!(
            "StreamBatch(capacity={}, active={active}, out_of_vocab={:?})",
            self.inner.capacity(),
            self.out_of_vocab()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ReflectionDetector>()?;
    m.add_class::<ReflectionStream>()?;
    m.add_class::<StreamBatch>()?;
    m.add_class::<Hit>()?;
    m.add_class::<TextScan>()?;
    m.add("DEFAULT_PHRASES", DEFAULT_PHRASES.to_vec())?;
    Ok(())
}
