"""tvc_rs.pvc's Python side: ``PVCMode`` and ``PVCConfig.mode`` (the schedule itself is
tests/pvc.rs and tests/test_triggers.py)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

import tvc_rs
from tvc_rs.pvc import PVC_MODES, PVCConfig, PVCMode


def test_mode_enum_values_and_derived_tuple():
    assert [m.value for m in PVCMode] == ["relocate", "append", "kv"]
    assert PVC_MODES == ("relocate", "append", "kv")
    assert tvc_rs.PVCMode is PVCMode and tvc_rs.PVC_MODES == PVC_MODES


@pytest.mark.parametrize("given", ["relocate", "append", "kv"])
def test_config_takes_a_string_or_the_enum_and_keeps_the_enum(given):
    member = PVCMode(given)
    for value in (given, member):
        config = PVCConfig(mode=value)
        assert config.mode is member
    # A str enum: equal to its value, printed and serialized as it (records, JSON, labels).
    assert config.mode == given and str(config.mode) == given and f"{config.mode}" == given
    assert json.loads(json.dumps({"mode": config.mode})) == {"mode": given}
    # dataclasses.replace runs the check again and keeps the enum.
    assert dataclasses.replace(PVCConfig(), mode=given).mode is member


def test_default_mode_is_relocate():
    assert PVCConfig().mode is PVCMode.RELOCATE


@pytest.mark.parametrize("bad", ["fast", "KV", "", " kv"])
def test_unknown_mode_names_mode_and_lists_the_values(bad):
    with pytest.raises(ValueError, match=re.escape(f"mode = {bad!r}: expected one of 'relocate', 'append', 'kv'")):
        PVCConfig(mode=bad)


@pytest.mark.parametrize("bad", [None, 1, b"kv", ["kv"]])
def test_mode_of_another_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match=re.escape(f"mode must be a tvc_rs.PVCMode or one of {list(PVC_MODES)}, got {type(bad).__name__}")):
        PVCConfig(mode=bad)


# ------------------------------------------------------------------ the bridge-spacing rule

BRIDGE = tvc_rs.DEFAULT_BRIDGE


@pytest.mark.parametrize(
    "bridge, text_before, want",
    [
        (BRIDGE, "Wait,", " " + BRIDGE),  # after a word: one space
        (BRIDGE, "Wait, ", BRIDGE),  # the text ends with whitespace
        (BRIDGE, "so 3.\n", BRIDGE),
        (BRIDGE, "\u6240\u4ee5\u7b54\u6848\u662f3\u3002", " " + BRIDGE),  # CJK full stop is no whitespace
        (BRIDGE, "x\u3000", BRIDGE),  # ideographic space is
        (BRIDGE, "", BRIDGE),  # nothing yet: the answer starts on the template's own line
        ("\n" + BRIDGE, "Wait,", "\n" + BRIDGE),  # the bridge brings its own whitespace
        (" " + BRIDGE, "Wait,", " " + BRIDGE),
        ("", "Wait,", ""),
        ("", "", ""),
    ],
)
def test_bridge_text_cases(bridge, text_before, want):
    from tvc_rs.pvc import bridge_text

    assert bridge_text(bridge, text_before) == want


def test_bridge_text_joins_with_exactly_one_separator():
    """Over random texts and bridges: the answer text plus the bridge never runs two words
    together and never adds a space next to existing whitespace."""
    from hypothesis import given, settings, strategies as st

    from tvc_rs.pvc import bridge_text

    pieces = st.text(alphabet=st.sampled_from(list("ab,.:\n\t \u3000\u00e9\u6587")), max_size=6)

    @settings(max_examples=300, deadline=None)
    @given(pieces, pieces)
    def check(bridge, text_before):
        out = bridge_text(bridge, text_before)
        if not bridge:
            assert out == ""
            return
        assert out in (bridge, " " + bridge)
        joined_at_space = bridge[0].isspace() or not text_before or text_before[-1].isspace()
        assert (out == bridge) == joined_at_space

    check()


def test_bridge_ids_encode_the_bridge_text(tokenizer_json):
    """bridge_ids is the tokenizer's encoding of bridge_text (no special tokens), [] when empty."""
    from transformers import PreTrainedTokenizerFast

    from tvc_rs.pvc import bridge_ids

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    assert bridge_ids(tok, BRIDGE, "Wait,") == tok.encode(" " + BRIDGE, add_special_tokens=False)
    assert bridge_ids(tok, BRIDGE, "Wait,")[0] != bridge_ids(tok, BRIDGE, "Wait,\n")[0]
    assert bridge_ids(tok, BRIDGE, "Wait,\n") == tok.encode(BRIDGE, add_special_tokens=False)
    assert bridge_ids(tok, "", "Wait,") == []
