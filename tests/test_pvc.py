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
