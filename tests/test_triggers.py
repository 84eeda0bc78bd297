"""Reflection triggers against an independent reference: Python's `re` with
`(?<!\\w)phrase(?!\\w)`, re.IGNORECASE, per phrase, on the text the tokens decode to
(`tokenizers`' own decode). Checked in all feeding modes: one token at a time, a batch of
streams with random churn, a whole token list, and plain text."""

from __future__ import annotations

import bisect
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tvc_rs
from conftest import ASSETS, asset

tokenizers = pytest.importorskip("tokenizers")

TRACES = [
    "traces/qwen_blog_qvq72b_qwq32b_official.jsonl",
    "traces/emma_gemini2_flash_thinking_exp_1219.jsonl",
    "traces/marco_o1_cot_demo.jsonl",
    "traces/vlaa_thinking_readme_deepseek_r1.jsonl",
]


# ---------------------------------------------------------------- reference (independent of tvc_rs)

def reference_text_hits(text: str, phrases: list[str]) -> list[tuple[int, int, int]]:
    """(phrase_index, char_start, char_end) of every match, per phrase, as `re.finditer` gives."""
    hits = []
    for index, phrase in enumerate(phrases):
        pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)
        hits += [(index, m.start(), m.end()) for m in pattern.finditer(text)]
    return sorted(hits, key=lambda h: (h[2], h[0]))


def byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes-to-unicode table, inverted (written here from its definition)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class Reference:
    """What the detector must report for a token list, computed from `tokenizers`' decode and `re`."""

    def __init__(self, tokenizer, phrases):
        self.tokenizer = tokenizer
        self.phrases = phrases
        self.special = {t.id for t in []}
        added = tokenizer.get_added_tokens_decoder()
        self.special = {i for i, t in added.items() if t.special}
        inverse = byte_level_decoder()
        self.vocab = {i: s for s, i in tokenizer.get_vocab(with_added_tokens=True).items()}
        self.inverse = inverse

    def token_bytes(self, token_id: int) -> bytes:
        token = self.vocab[token_id]
        try:
            return bytes(self.inverse[c] for c in token)
        except KeyError:
            return token.encode()

    def hits(self, ids: list[int], finished: bool = True) -> list[tuple[int, int, int, int]]:
        """(phrase_index, char_start, char_end, token_index): special tokens split the text into
        segments decoded and matched separately; a hit's token is the one holding the byte that
        completes the character after the phrase, or the special token / last token after it."""
        out = []
        offset = 0
        segment: list[int] = []
        segment_start = 0
        for i, token in enumerate(list(ids) + [None]):
            if token is not None and token not in self.special:
                segment.append(token)
                continue
            # A segment ends at a special token (index i) or at the end of the stream.
            at_end = token is None
            text = self.tokenizer.decode(segment, skip_special_tokens=False)
            ends, total = [], 0
            for t in segment:
                total += len(self.token_bytes(t))
                ends.append(total)
            encoded_prefix = [0]
            for ch in text:
                encoded_prefix.append(encoded_prefix[-1] + len(ch.encode("utf-8", "surrogatepass")))
            for p, start, end in reference_text_hits(text, self.phrases):
                if end < len(text):
                    # The token holding the last byte of the character after the phrase; for
                    # texts with replacement characters the byte positions are approximate, so
                    # those tests compare offsets only.
                    last_byte = encoded_prefix[end + 1] - 1
                    token_index = segment_start + bisect.bisect_right(ends, last_byte)
                elif at_end:
                    if not finished:
                        continue
                    token_index = len(ids) - 1
                else:
                    token_index = i
                out.append((p, start + offset, end + offset, token_index))
            offset += len(text)
            segment = []
            segment_start = i + 1
        return sorted(out, key=lambda h: (h[2], h[0]))


def as_tuples(hits, with_token=True):
    key = [(h.phrase_index, h.char_start, h.char_end) + ((h.token_index,) if with_token else ()) for h in hits]
    return sorted(key, key=lambda h: (h[2], h[0]))


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    return tokenizers.Tokenizer.from_file(str(tokenizer_json))


@pytest.fixture(scope="module")
def detector(tokenizer_json):
    return tvc_rs.ReflectionDetector(tokenizer_json)


@pytest.fixture(scope="module")
def reference(tokenizer, detector):
    return Reference(tokenizer, detector.phrases)


def load_traces():
    texts = []
    for relative in TRACES:
        path = ASSETS / relative
        if path.exists():
            texts += [json.loads(line)["response"] for line in path.open() if line.strip()]
    if not texts:
        pytest.skip(f"no traces under {ASSETS}")
    return texts


@pytest.fixture(scope="module")
def trace_ids(tokenizer):
    return [tokenizer.encode(text, add_special_tokens=False).ids for text in load_traces()]


# ---------------------------------------------------------------- the real traces, all modes

def test_default_phrases_are_found_in_the_traces(detector):
    counts = {p: 0 for p in detector.phrases}
    for text in load_traces():
        for h in detector.find_text(text):
            counts[h.phrase] += 1
    for phrase in ["wait", "hmm", "alternatively", "double-check", "re-examine"]:
        assert counts[phrase] > 0, phrase


def test_find_text_equals_re_on_every_trace(detector):
    for text in load_traces():
        assert as_tuples(detector.find_text(text), with_token=False) == reference_text_hits(text, detector.phrases)


def test_find_tokens_equals_re_on_every_trace(detector, reference, trace_ids):
    total = 0
    for ids in trace_ids:
        expected = reference.hits(ids)
        assert as_tuples(detector.find_tokens(ids)) == expected
        total += len(expected)
    assert total > 500  # the traces are full of reflection phrases


def test_streaming_one_token_at_a_time_equals_re(detector, reference, trace_ids):
    for ids in trace_ids[::7]:
        stream = detector.stream()
        for token in ids:
            stream.push(token)
        assert as_tuples(stream.hits) == reference.hits(ids, finished=False)
        stream.finish()
        assert as_tuples(stream.hits) == reference.hits(ids)


def test_batch_with_random_churn_equals_re(detector, reference, trace_ids):
    """Streams enter, leave, move and swap between slots between steps, as in vLLM's batch;
    each stream's hits must be those of its own tokens."""
    rng = random.Random(1234)
    capacity = 16
    batch = detector.batch(capacity)
    pending = list(range(len(trace_ids)))
    rng.shuffle(pending)
    slot_of: dict[int, int] = {}  # stream -> slot
    fed: dict[int, int] = {}  # stream -> tokens fed
    checked = 0

    def check(stream, slot):
        nonlocal checked
        ids = trace_ids[stream][: fed[stream]]
        assert as_tuples(batch.hits(slot)) == reference.hits(ids, finished=False), stream
        checked += 1

    while pending or slot_of:
        # Churn before the step.
        free = [s for s in range(capacity) if s not in slot_of.values()]
        while pending and free and rng.random() < 0.7:
            stream, slot = pending.pop(), free.pop(rng.randrange(len(free)))
            batch.add(slot)
            slot_of[stream], fed[stream] = slot, 0
        if slot_of and rng.random() < 0.3:
            a, b = rng.sample(range(capacity), 2)
            batch.swap(a, b)
            for stream, slot in slot_of.items():
                slot_of[stream] = b if slot == a else a if slot == b else slot
        if slot_of and rng.random() < 0.3:
            stream = rng.choice(list(slot_of))
            free = [s for s in range(capacity) if s not in slot_of.values()]
            if free:
                to = rng.choice(free)
                batch.move(slot_of[stream], to)
                slot_of[stream] = to
        if slot_of and rng.random() < 0.02:
            # A request aborted early.
            stream = rng.choice(list(slot_of))
            check(stream, slot_of[stream])
            assert batch.remove(slot_of.pop(stream))
        tokens = np.full(capacity, -1, dtype=np.int64)
        for stream, slot in slot_of.items():
            tokens[slot] = trace_ids[stream][fed[stream]]
            fed[stream] += 1
        fired = batch.step(tokens)
        assert sorted(fired.tolist()) == sorted(slot for slot, _ in batch.last_calibrations)
        for stream, slot in list(slot_of.items()):
            if fed[stream] == len(trace_ids[stream]):
                check(stream, slot)
                batch.remove(slot_of.pop(stream))
    assert checked == len(trace_ids)


# ---------------------------------------------------------------- random text and tokens

ALPHABET = list("wWaAiItThHmM -,.'_\n0") + ["é", "İ", "ı", "ſ", "K", "你", "😀", "ß", "ü"]
PIECES = ["wait", "Wait", " wait", "hmm", "HMM", "double-check", "double check", "let me check",
          "waiting", "await", "re-examine", "hold on", "_wait", "wait_", "looking back"]


@st.composite
def texts(draw):
    parts = draw(st.lists(st.one_of(st.sampled_from(PIECES), st.sampled_from(ALPHABET)), max_size=60))
    return "".join(parts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts())
def test_random_text_all_modes_equal_re(detector, reference, tokenizer, text):
    assert as_tuples(detector.find_text(text), with_token=False) == reference_text_hits(text, detector.phrases)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    from_tokens = detector.find_tokens(ids)
    assert as_tuples(from_tokens) == reference.hits(ids)
    stream = detector.stream()
    for token in ids:
        stream.push(token)
    stream.finish()
    assert as_tuples(stream.hits) == as_tuples(from_tokens)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_token_ids_with_broken_utf8_and_special_tokens(detector, reference, tokenizer, data):
    """Arbitrary ids, including byte tokens that are only part of a UTF-8 character and special
    tokens (image pads, chat markers), decoded the way `tokenizers` decodes them."""
    phrase_ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in PIECES]
    special = [151643, 151644, 151645, 151652, 151653, 151655, 151656]
    partial_bytes = [tokenizer.token_to_id(c) for c in ["ä", "¸", "Ĭ", "Ġ", "ï", "¼"]]
    items = data.draw(st.lists(st.one_of(
        st.sampled_from(phrase_ids),
        st.lists(st.integers(0, 151642), min_size=1, max_size=3),
        st.lists(st.sampled_from(special), min_size=1, max_size=2),
        st.lists(st.sampled_from([t for t in partial_bytes if t is not None]), min_size=1, max_size=3),
    ), max_size=25))
    ids = [t for item in items for t in item]
    hits = detector.find_tokens(ids)
    expected = reference.hits(ids)
    assert as_tuples(hits, with_token=False) == [h[:3] for h in expected]
    if "\ufffd" not in tokenizer.decode(ids, skip_special_tokens=False):
        assert as_tuples(hits) == expected
    # Streaming, and a batch in which this stream shares the step with others, agree exactly.
    stream = detector.stream()
    batch = detector.batch(3)
    batch.add(1)
    batch.add(2)
    for token in ids:
        stream.push(token)
        batch.step(np.array([-1, token, ids[0]], dtype=np.int64))
    assert as_tuples(batch.hits(1)) == as_tuples(stream.hits)
    stream.finish()
    assert as_tuples(stream.hits) == as_tuples(hits)


def test_special_tokens_never_match_and_are_boundaries(tokenizer):
    # "im_start" is inside "<|im_start|>": a special token's text never matches.
    detector = tvc_rs.ReflectionDetector(tokenizer, phrases=["wait", "im_start", "endoftext"])
    wait = tokenizer.encode("Wait", add_special_tokens=False).ids
    ing = tokenizer.encode("ing", add_special_tokens=False).ids
    # "Wait" + <|im_end|> + "ing": the special token ends the word, so "Wait" is a hit,
    # confirmed at the special token.
    hits = detector.find_tokens(wait + [151645] + ing)
    assert [(h.phrase, h.token_index) for h in hits] == [("wait", len(wait))]
    assert detector.find_tokens([151644, 151643, 151655]) == []


def test_self_overlapping_phrase_reports_like_finditer(tokenizer):
    detector = tvc_rs.ReflectionDetector(tokenizer, phrases=["hmm hmm"])
    text = "hmm hmm hmm hmm hmm"
    assert as_tuples(detector.find_text(text), with_token=False) == reference_text_hits(text, ["hmm hmm"])
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert [(h.char_start, h.char_end) for h in detector.find_tokens(ids)] == [(0, 7), (8, 15)]


# ---------------------------------------------------------------- tokenizer sources

def test_detector_from_every_kind_of_tokenizer(tokenizer_json, qwen2_vl_dir, tokenizer, detector):
    transformers = pytest.importorskip("transformers")
    fast = transformers.AutoTokenizer.from_pretrained(str(qwen2_vl_dir))
    text = "Hmm. Wait, let me double-check the image again."
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    expected = as_tuples(detector.find_tokens(ids))
    for source in [str(tokenizer_json), tokenizer_json, qwen2_vl_dir, str(qwen2_vl_dir), tokenizer, fast]:
        other = tvc_rs.ReflectionDetector(source)
        assert other.vocab_size == detector.vocab_size == 151657
        assert as_tuples(other.find_tokens(ids)) == expected
    assert detector.encode(text) == ids


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"])
def test_token_ids_of_every_integer_dtype_and_strides(detector, dtype):
    """Token ids go through the one integer parser (DLPack): every integer width, any strides
    (reversed, every other), NumPy and torch, read as the same ids as a Python list."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    # Narrow dtypes get random ids of their range; wide ones the vocabulary and some "Wait"s.
    high = min(int(np.iinfo(dtype).max), detector.vocab_size - 1)
    ids = rng.integers(0, high + 1, 64)
    if high == detector.vocab_size - 1:
        ids[::7] = detector.encode("Wait")[0]
    expected = detector.find_tokens(ids.tolist())
    array = np.asarray(ids, dtype=dtype)
    assert detector.find_tokens(array) == expected
    wide = np.repeat(array, 2)[::2]  # stride 2 elements
    assert not wide.flags.c_contiguous and detector.find_tokens(wide) == expected
    reversed_ids = array[::-1]
    assert detector.find_tokens(reversed_ids) == detector.find_tokens(ids[::-1].tolist())
    if dtype in ("int8", "int16", "int32", "int64", "uint8"):
        assert detector.find_tokens(torch.from_numpy(array)) == expected


def test_token_ids_refuse_what_is_not_integral(detector):
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=re.escape("tokens: 9223372036854775808 does not fit in int64")):
        detector.find_tokens(np.array([1, 2**63], np.uint64))
    with pytest.raises(TypeError, match=re.escape("tokens: expected an integer dtype (int32, int64 or another int/uint), got bool")):
        detector.find_tokens(np.array([True]))
    with pytest.raises(TypeError, match=re.escape("tokens: expected an integer dtype (int32, int64 or another int/uint), got float32")):
        detector.find_tokens(torch.tensor([1.0]))
    with pytest.raises(TypeError, match=re.escape("tokens: expected a 1-D integer array or a sequence of ints, got str")):
        detector.find_tokens("wait")


def test_find_tokens_accepts_numpy_and_torch(detector, tokenizer):
    torch = pytest.importorskip("torch")
    ids = tokenizer.encode("Wait, hmm.", add_special_tokens=False).ids
    expected = detector.find_tokens(ids)
    assert detector.find_tokens(np.array(ids, dtype=np.int32)) == expected
    assert detector.find_tokens(np.array(ids, dtype=np.uint32)) == expected
    assert detector.find_tokens(torch.tensor(ids)) == expected
    assert detector.find_tokens(tuple(ids)) == expected


# ---------------------------------------------------------------- PVC schedule vs a model of its rules

def schedule_model(hit_tokens: set[int], n_tokens: int, warmup, min_gap, max_calibrations, period):
    """The documented rules, written out: a calibration at token i needs i >= warmup before the
    first one, at least min_gap tokens since the previous one, fewer than max_calibrations so
    far; it happens at a hit, or when `period` tokens passed since the last one (or the start)."""
    made, last = [], -1
    for i in range(n_tokens):
        since = i - last
        allowed = (max_calibrations is None or len(made) < max_calibrations) and \
                  (made or i >= warmup) and (not made or since >= min_gap)
        if not allowed:
            continue
        if i in hit_tokens:
            made.append((i, "trigger"))
            last = i
        elif period is not None and since >= period:
            made.append((i, "period"))
            last = i
    return made


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    warmup=st.integers(0, 400), min_gap=st.integers(0, 300), max_calibrations=st.one_of(st.none(), st.integers(0, 6)),
    period=st.one_of(st.none(), st.integers(1, 500)), which=st.integers(0, 10_000),
)
def test_schedule_follows_its_rules(detector, trace_ids, warmup, min_gap, max_calibrations, period, which):
    ids = trace_ids[which % len(trace_ids)][:3000]
    schedule = tvc_rs.PVCSchedule(warmup=warmup, min_gap=min_gap, max_calibrations=max_calibrations, period=period)
    stream = detector.stream(schedule)
    returned = [c for c in (stream.push(t) for t in ids) if c is not None]
    hit_tokens = {h.token_index for h in stream.hits}
    expected = schedule_model(hit_tokens, len(ids), warmup, min_gap, max_calibrations, period)
    assert [(c.token_index, c.reason) for c in stream.calibrations] == expected
    assert returned == stream.calibrations
    for c in stream.calibrations:
        assert (c.hit is not None) == (c.reason == "trigger")
        if c.hit is not None:
            assert c.hit.token_index == c.token_index and c.phrase == c.hit.phrase
    # The same through a batch slot, and through push_many.
    batch = detector.batch(2)
    batch.add(1, schedule)
    for t in ids:
        batch.step(np.array([-1, t]))
    assert batch.calibrations(1) == stream.calibrations
    again = detector.stream(schedule)
    assert again.push_many(ids) == stream.calibrations


def test_schedule_state_carries_over_a_continued_request(detector, trace_ids):
    ids = trace_ids[0]
    schedule = tvc_rs.PVCSchedule(warmup=50, min_gap=200, max_calibrations=4, period=700)
    whole = detector.stream(schedule)
    whole.push_many(ids)
    # Stop after the first calibration and continue in a new stream, as a driver that restarts
    # the request at each calibration does.
    first = whole.calibrations[0].token_index
    head = detector.stream(schedule)
    head.push_many(ids[: first + 1])
    tail = detector.stream(schedule, calibrations_made=head.calibrations_made, tokens_since_last=head.tokens_since_last)
    # The continuation has no text context of the head: feed it from a word boundary on.
    tail.push_many(ids[first + 1:])
    shifted = [c.token_index + first + 1 for c in tail.calibrations]
    assert shifted[: len(whole.calibrations) - 1] == [c.token_index for c in whole.calibrations[1:]][: len(shifted)]
    assert head.calibrations_made + tail.calibrations_made - 1 == len(whole.calibrations)


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_clear_errors(detector, tokenizer_json, tmp_path):
    with pytest.raises(OSError, match=re.escape("no such file")):
        tvc_rs.ReflectionDetector(tmp_path / "missing.json")
    with pytest.raises(OSError, match=re.escape("holds no tokenizer.json")):
        tvc_rs.ReflectionDetector(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape("tokenizer")):
        tvc_rs.ReflectionDetector(bad)
    with pytest.raises(TypeError, match=re.escape("tokenizer")):
        tvc_rs.ReflectionDetector(42)
    with pytest.raises(ValueError, match=re.escape("phrases[1]")):
        tvc_rs.ReflectionDetector(tokenizer_json, phrases=["wait", ""])
    with pytest.raises(ValueError, match=re.escape("phrases[1]")):
        tvc_rs.ReflectionDetector(tokenizer_json, phrases=["wait", "   "])
    with pytest.raises(ValueError, match=re.escape("phrases")):
        tvc_rs.ReflectionDetector(tokenizer_json, phrases=[])
    with pytest.raises(ValueError, match=re.escape("phrases[1]") + ".*" + re.escape("repeats phrases[0]")):
        tvc_rs.ReflectionDetector(tokenizer_json, phrases=["wait", "WAIT"])
    with pytest.raises(TypeError, match=re.escape("phrases")):
        tvc_rs.ReflectionDetector(tokenizer_json, phrases="wait")
    with pytest.raises(ValueError, match=re.escape("phrases")):
        tvc_rs.ReflectionDetector(tokenizer_json, phrases=["x" * 200])

    stream = detector.stream()
    stream.push(14190)
    for bad_id in [151657, 10**9, -1]:
        with pytest.raises(IndexError, match=re.escape(f"token id {bad_id}")):
            stream.push(bad_id)
    assert stream.tokens_seen == 1
    with pytest.raises(IndexError, match=re.escape("tokens[2]")):
        stream.push_many([11, 11, 151700])
    assert stream.tokens_seen == 1  # nothing was fed
    with pytest.raises(IndexError, match=re.escape("token id")):
        detector.find_tokens([1, 2, 999999])
    with pytest.raises(TypeError, match=re.escape("tokens: expected an integer dtype")):
        detector.find_tokens(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=re.escape("1-D")):
        detector.find_tokens(np.zeros((2, 2), dtype=np.int64))

    batch = detector.batch(4)
    batch.add(0)
    for call in [lambda: batch.add(4), lambda: batch.remove(-1), lambda: batch.move(0, 9),
                 lambda: batch.swap(7, 0), lambda: batch.hits(4)]:
        with pytest.raises(IndexError, match=re.escape("slot")):
            call()
    with pytest.raises(ValueError, match=re.escape("tokens: 5 entries for a batch of 4 slots")):
        batch.step(np.zeros(5, dtype=np.int64))
    batch.step(np.array([14190, 0, 0, 0]))
    with pytest.raises(IndexError, match=re.escape("tokens[0]")):
        batch.step(np.array([151999, 0, 0, 0]))
    assert batch.state(0) == (1, 0, 1)  # the failed step changed nothing
    with pytest.raises(ValueError, match=re.escape("capacity")):
        detector.batch(-1)

    for kwargs, name in [({"warmup": -1}, "warmup"), ({"min_gap": -5}, "min_gap"),
                         ({"max_calibrations": -1}, "max_calibrations"), ({"period": 0}, "period")]:
        with pytest.raises(ValueError, match=re.escape(name)):
            tvc_rs.PVCSchedule(**kwargs)
    with pytest.raises(ValueError, match=re.escape("calibrations_made")):
        detector.stream(calibrations_made=-1)
    with pytest.raises(ValueError, match=re.escape("tokens_since_last")):
        detector.stream(tokens_since_last=-3)
