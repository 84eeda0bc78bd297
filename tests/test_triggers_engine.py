"""What a serving engine needs from `StreamBatch`: token ids outside the tokenizer's vocabulary
(models whose logits are wider than their tokenizer, e.g. Qwen2-VL's 151936 rows for 151657
tokens), `feed` for several tokens of one slot, and the per-step calls `advance` (rows that name
their stream) and `advance_lists` (per-slot token lists). Checked against Python's `re` on the
text `tokenizers` decodes, the way `tests/test_triggers.py` checks the detector itself, and
against the plain per-token stream."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tvc_rs

TEXT = (
    "The area is 12. Wait, that doesn't seem right. Hmm, let me check the image again: the cube "
    "is red.\n\nAlternatively, we count them; wait... hold on, on second thought, it is 3."
)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(tokenizer_json))


@pytest.fixture(scope="module")
def detector(tokenizer_json):
    return tvc_rs.ReflectionDetector(tokenizer_json)


def reference_ends(text: str, phrases: list[str]) -> list[tuple[str, int]]:
    """(phrase, end offset) of every match of ``(?<!\\w)phrase(?!\\w)``, case-insensitive, as
    the detector reports them (a phrase that could overlap itself is reported once per match)."""
    out = []
    for phrase in phrases:
        for m in re.finditer(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text, re.IGNORECASE):
            out.append((phrase, m.end()))
    return sorted(out, key=lambda x: (x[1], x[0]))


@settings(max_examples=40, deadline=None)
@given(
    inserts=st.lists(st.integers(0, 60), max_size=10),
    unknown=st.sampled_from([151657, 151935, 152063, 2**40]),
)
def test_out_of_vocab_ids_decode_to_no_text(detector, tokenizer, inserts, unknown):
    ids = detector.encode(TEXT)
    mixed, new_index = [], []
    for i, token in enumerate(ids):
        mixed.extend([unknown] * inserts.count(i))
        new_index.append(len(mixed))
        mixed.append(token)
    # tokenizers drops the ids it does not know when it decodes: the text is unchanged.
    if unknown < 2**32:
        assert tokenizer.decode(mixed, skip_special_tokens=False) == tokenizer.decode(ids)

    batch = detector.batch(2, out_of_vocab="no_text")
    assert batch.out_of_vocab == "no_text"
    batch.add(1)
    for token in mixed:
        batch.step(np.array([-1, token], dtype=np.int64))
    hits = batch.hits(1)
    assert [(h.phrase, h.char_end) for h in hits] == [
        e for e in reference_ends(TEXT, detector.phrases) if e[1] < len(TEXT)
    ]
    plain = detector.batch(2)
    plain.add(1)
    for token in ids:
        plain.step(np.array([-1, token]))
    assert [h.token_index for h in hits] == [new_index[h.token_index] for h in plain.hits(1)]
    assert batch.state(1) == (len(mixed), len(hits), len(mixed) - 1 - hits[-1].token_index)


@settings(max_examples=30, deadline=None)
@given(split=st.integers(0, 80), min_gap=st.integers(0, 20), made=st.integers(0, 3))
def test_feed_equals_one_step_per_token(detector, split, min_gap, made):
    ids = detector.encode(TEXT)
    schedule = tvc_rs.PVCSchedule(min_gap=min_gap)
    stepped = detector.batch(3)
    stepped.add(2, schedule, calibrations_made=made, tokens_since_last=5)
    want = []
    for token in ids:
        if stepped.step(np.array([-1, -1, token])).size:
            want.extend(c for _, c in stepped.last_calibrations)
    fed = detector.batch(3)
    fed.add(2, schedule, calibrations_made=made, tokens_since_last=5)
    got = fed.feed(2, np.array(ids[:split], dtype=np.int64))
    for token in ids[split:]:
        if fed.step(np.array([-1, -1, token])).size:
            got.extend(c for _, c in fed.last_calibrations)
    assert got == want == stepped.calibrations(2)
    assert fed.state(2) == stepped.state(2)


def test_feed_and_out_of_vocab_errors(detector):
    with pytest.raises(ValueError, match=re.escape("out_of_vocab = \"ignore\": expected \"raise\" or \"no_text\"")):
        detector.batch(2, out_of_vocab="ignore")
    batch = detector.batch(2)
    assert batch.out_of_vocab == "raise"
    batch.add(0)
    with pytest.raises(IndexError, match=re.escape("tokens[2]: token id 151700 is outside the vocabulary")):
        batch.feed(0, [14190, 11, 151700])
    assert batch.state(0) == (0, 0, 0)  # checked before anything was fed
    with pytest.raises(IndexError, match=re.escape("tokens[1] = -1: token ids must be >= 0")):
        batch.feed(0, [14190, -1])
    with pytest.raises(ValueError, match=re.escape("slot = 1: the slot holds no stream")):
        batch.feed(1, [14190])
    with pytest.raises(IndexError, match=re.escape("slot = 2")):
        batch.feed(2, [14190])
    with pytest.raises(TypeError, match=re.escape("tokens")):
        batch.feed(0, "wait")
    batch.step(np.array([-1, 151700]))  # an empty slot is skipped ...
    batch.add(1)
    with pytest.raises(IndexError, match=re.escape("tokens[1]")):
        batch.step(np.array([-1, 151700]))  # ... an active one is checked
    lenient = detector.batch(1, out_of_vocab="no_text")
    lenient.add(0)
    assert lenient.feed(0, [151700, 2**50]) == []
    assert lenient.state(0) == (2, 0, 2)


def due_rows_model(calibrated_at: set[int], events):
    """Rows a serving engine must force: a calibration decided at a fed token is due until a
    token is fed after it was first reported."""
    due = reported = False
    seen = 0
    out = []
    for index, sampling in events:
        if index == seen:
            if reported:
                due = reported = False
            due |= seen in calibrated_at
            seen += 1
        if sampling and due:
            reported = True
            out.append(True)
        else:
            out.append(False)
    return out


@settings(max_examples=40, deadline=None)
@given(events=st.lists(st.tuples(st.integers(-1, 2), st.booleans()), max_size=150), min_gap=st.integers(0, 8))
def test_advance_against_the_plain_stream(detector, events, min_gap):
    ids = detector.encode(TEXT)
    schedule = tvc_rs.PVCSchedule(min_gap=min_gap)
    stream = detector.stream(schedule)
    calibrated_at = {i for i, t in enumerate(ids) if stream.push(t) is not None}
    batch = detector.batch(4)
    batch.add(2, schedule)
    lists = detector.batch(4)
    lists.add(1, schedule)
    outputs = [None, [], None, None]
    seen = 0
    steps = []
    for delta, sampling in events:  # delta: 1 next token, 0 the same again, -1 none, 2 a skipped one
        index = {1: seen, 0: seen - 1, -1: -1, 2: seen + 1}[delta] if seen < len(ids) else -1
        steps.append((index, sampling))
        token = ids[index] if 0 <= index < len(ids) else -1
        rows = batch.advance(np.array([0, 2]), np.array([0, index]), np.array([ids[0], token]), np.array([True, sampling]))
        if index == seen:
            seen += 1
            outputs[1].append(token)
        slots, blind = lists.advance_lists(outputs, 2 if sampling else 1)
        assert blind == []
        assert rows.tolist() == ([1] if due_rows_model(calibrated_at, steps)[-1] else [])
        assert slots.tolist() == ([1] if rows.size else [])
    assert batch.state(2)[0] == lists.state(1)[0] == seen
    assert batch.calibrations(2) == lists.calibrations(1) == [c for c in stream.calibrations if c.token_index < seen]


def test_advance_reads_bools_and_ints_of_every_kind(detector):
    """`sampling` as a bool list, a NumPy bool array (also strided) or a torch bool tensor, and
    the integer rows as lists, narrow NumPy dtypes or torch tensors: the same rows come back."""
    torch = pytest.importorskip("torch")
    ids = detector.encode(TEXT)
    schedule = tvc_rs.PVCSchedule(min_gap=0)
    rng = np.random.default_rng()
    sampling = rng.random(len(ids)) < 0.7
    kinds = [
        lambda i, s: ([0, 2], [0, i], [ids[0], ids[i]], [True, bool(s)]),
        lambda i, s: (np.array([0, 2], np.uint8), np.array([0, i], np.int32), np.array([ids[0], ids[i]], np.uint32),
                      np.array([True, True, s, s])[::2]),
        lambda i, s: (torch.tensor([0, 2]), torch.tensor([0, i], dtype=torch.int16), torch.tensor([ids[0], ids[i]]),
                      torch.tensor([True, bool(s)])),
    ]
    results = []
    for kind in kinds:
        batch = detector.batch(4)
        batch.add(2, schedule)
        results.append([batch.advance(*kind(i, s)).tolist() for i, s in enumerate(sampling)])
    assert results[0] == results[1] == results[2]
    assert any(rows for rows in results[0])  # TEXT calibrates
    batch = detector.batch(4)
    batch.add(0)
    with pytest.raises(TypeError, match=re.escape("sampling: expected a bool array, got dtype int64")):
        batch.advance([0], [0], [14190], np.array([1]))
    with pytest.raises(ValueError, match=re.escape("sampling: expected a 1-D tensor, got shape (1, 1)")):
        batch.advance([0], [0], [14190], np.array([[True]]))


def test_advance_errors(detector):
    batch = detector.batch(3)
    batch.add(0)
    with pytest.raises(ValueError, match=re.escape("one entry per row: got 2, 1, 2 and 2")):
        batch.advance([0, 1], [0], [14190, 11], [True, True])
    with pytest.raises(IndexError, match=re.escape("slots[1] = 7: slot out of range")):
        batch.advance([0, 7], [0, 0], [14190, 11], [True, True])
    with pytest.raises(IndexError, match=re.escape("tokens[0]: token id 151700")):
        batch.advance([0], [0], [151700], [True])
    with pytest.raises(TypeError, match=re.escape("sampling")):
        batch.advance([0], [0], [14190], "yes")
    assert batch.state(0) == (0, 0, 0)
    with pytest.raises(ValueError, match=re.escape("rows = 4: more than the batch's 3 slots")):
        batch.advance_lists([None, None, None], 4)
    with pytest.raises(TypeError, match=re.escape("outputs[0]: expected a list of token ids or None")):
        batch.advance_lists([(1, 2)], 1)
    with pytest.raises(TypeError, match=re.escape("outputs[0][1]: expected an int token id")):
        batch.advance_lists([[14190, "x"]], 1)
    with pytest.raises(IndexError, match=re.escape("outputs[0][0]: token id 151700")):
        batch.advance_lists([[151700]], 1)
    assert batch.state(0) == (0, 0, 0)
    # Placeholders (-1) and lists that shrank are reported, not fed.
    assert batch.advance_lists([[14190, -1]], 1)[1] == [0]
    batch.advance_lists([[14190, 11]], 1)
    assert batch.state(0)[0] == 2
    assert batch.advance_lists([[14190]], 1)[1] == [0]


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_advance_seq_is_advance_on_sequence_lengths(detector, data):
    """Rows described by sequence length (vLLM's V2 runner) give what `advance` gives for
    token_index = seq_len - 1 - prompt_len[slot] and sampling = seq_len >= prefill_len[slot]."""
    ids = detector.encode(TEXT)
    capacity = 6
    prompt_len = np.array(data.draw(st.lists(st.integers(0, 20), min_size=capacity, max_size=capacity)), dtype=np.int32)
    prefill_len = prompt_len + np.array(data.draw(st.lists(st.integers(0, 5), min_size=capacity, max_size=capacity)), dtype=np.int32)
    by_seq, by_index = detector.batch(capacity), detector.batch(capacity)
    for b in (by_seq, by_index):
        for slot in range(0, capacity, 2):
            b.add(slot, tvc_rs.PVCSchedule(min_gap=3))
    for _ in range(data.draw(st.integers(1, 60))):
        slots = np.array(data.draw(st.lists(st.integers(0, capacity - 1), min_size=1, max_size=capacity, unique=True)), dtype=np.int64)
        seq = prompt_len[slots].astype(np.int64) + np.array(data.draw(st.lists(st.integers(0, 60), min_size=len(slots), max_size=len(slots))))
        tokens = np.array([ids[(s + 7 * int(slot)) % len(ids)] for s, slot in zip(seq, slots)], dtype=np.int32)
        padded = np.concatenate([seq, np.zeros(3, dtype=np.int64)]).astype(np.int32)  # as the runner pads
        got = by_seq.advance_seq(slots, padded, tokens, prompt_len, prefill_len)
        want = by_index.advance(slots, seq - 1 - prompt_len[slots], tokens, seq >= prefill_len[slots])
        assert got.tolist() == want.tolist()
    for slot in range(capacity):
        assert by_seq.state(slot) == by_index.state(slot)


def test_advance_seq_errors(detector):
    batch = detector.batch(3)
    batch.add(0)
    table = np.zeros(3, dtype=np.int32)
    with pytest.raises(IndexError, match=re.escape("slots[1] = 3: outside prompt_len / prefill_len")):
        batch.advance_seq([0, 3], [1, 1], [14190, 11], table, table)
    with pytest.raises(ValueError, match=re.escape("seq_lens: 1 entries for 2 rows of slots")):
        batch.advance_seq([0, 1], [1], [14190, 11], table, table)
    with pytest.raises(ValueError, match=re.escape("one entry per row")):
        batch.advance_seq([0, 1], [1, 1], [14190], table, table)
    assert batch.state(0) == (0, 0, 0)
