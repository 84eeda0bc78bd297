"""File safety of ``tvc-rs dvr build`` (issue 14): nothing existing is removed or replaced before
the new output is complete, an input with nothing to write writes nothing, folders are made only
when something goes in them, ``dataset_info.json`` is updated under a lock, and a line that is
not UTF-8 is one bad record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ASSETS
from test_dvr import SCRIPT, build_input, read_jsonl, run  # noqa: F401 (build_input is a fixture)

pytest.importorskip("PIL")


def common(tokenizer_json) -> list[str]:
    return ["--tokenizer", str(tokenizer_json), "--image-field", "local_image", "--image-root", str(ASSETS)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_with_a_bad_input_leaves_the_old_output_byte_identical(build_input, tmp_path, tokenizer_json):
    path, _ = build_input
    out = tmp_path / "data" / "dvr.jsonl"
    run("dvr", "build", str(path), "-o", str(out), *common(tokenizer_json), expect=1)
    before = snapshot(out.parent)
    assert "dvr.jsonl" in before and "dataset_info.json" in before
    # An input that fails while it is read (not UTF-8 as a JSON document) and one with only bad records.
    broken = tmp_path / "bad.json"
    broken.write_bytes(b'[{"question": "\xff"}')
    done = run("dvr", "build", str(broken), "-o", str(out), "--overwrite", *common(tokenizer_json), expect=2)
    assert "Traceback" not in done.stderr or "UnicodeDecodeError" in done.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{not json\n')
    run("dvr", "build", str(bad), "-o", str(out), "--overwrite", *common(tokenizer_json), expect=2)
    assert snapshot(out.parent) == before


def test_an_empty_input_writes_nothing(tmp_path, tokenizer_json):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "new" / "sub" / "o.jsonl"
    done = run("dvr", "build", str(empty), "-o", str(out), "--tokenizer", str(tokenizer_json), expect=2)
    assert "0 records" in done.stdout and "nothing to write" in done.stdout
    assert not (tmp_path / "new").exists()  # no output, no dataset_info.json, no images folder


def test_images_folder_only_when_a_copy_is_written(tmp_path, tokenizer_json):
    record = {"id": "t", "question": "What is shown?", "response": "It is a cat. Wait, let me check. Yes.",
              "local_image": None}
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(record) + "\n")
    out = tmp_path / "o" / "dvr.jsonl"
    run("dvr", "build", str(src), "-o", str(out), *common(tokenizer_json), "--allow-text-only")
    assert out.is_file() and not (out.parent / "images").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["dataset_info.json", "dataset_info.json.lock",
                                                            "dvr.jsonl", "dvr.report.json"]


def test_a_non_utf8_line_is_one_bad_record(build_input, tmp_path, tokenizer_json):
    path, good = build_input
    lines = path.read_bytes().splitlines(keepends=True)
    lines.insert(1, b'{"id": "latin1", "question": "caf\xe9", "response": "x"}\n')
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"".join(lines))
    out = tmp_path / "m" / "dvr.jsonl"
    done = run("dvr", "build", str(mixed), "-o", str(out), *common(tokenizer_json), expect=1)
    assert "bad record 1 (mixed.jsonl:2): not valid UTF-8: byte 0xe9" in done.stderr
    assert [r["tvc"]["id"] for r in read_jsonl(out)] == [r["id"] for r in good]


def test_scan_keeps_the_lines_around_a_non_utf8_one(qwen2_vl_dir, tmp_path):
    traces = tmp_path / "t.jsonl"
    traces.write_bytes(b'{"response": "Wait, no."}\n{"response": "caf\xe9"}\n{"response": "Hmm. Yes."}\n')
    done = subprocess.run([str(SCRIPT), "scan", str(traces), "--tokenizer", str(qwen2_vl_dir / "tokenizer.json"),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert "t.jsonl:2" in done.stderr and "UTF-8" in done.stderr
    assert "2 traces" in done.stdout or '"traces": 2' in done.stdout, done.stdout[-2000:]


def test_an_interrupted_build_leaves_the_old_files_valid(build_input, tmp_path, tokenizer_json):
    path, good = build_input
    out = tmp_path / "data" / "dvr.jsonl"
    run("dvr", "build", str(path), "-o", str(out), *common(tokenizer_json), expect=1)
    before = snapshot(out.parent)
    # A long input (the good records many times), killed while it runs.
    big = tmp_path / "big.jsonl"
    big.write_text(path.read_text() * 60)
    proc = subprocess.Popen([str(SCRIPT), "dvr", "build", str(big), "-o", str(out), "--overwrite",
                             *common(tokenizer_json), "--workers", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # Wait until it has staged something (a temporary output or a staged copy), then kill it.
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.endswith(".tmp") or ".tvc-staging-" in str(p) for p in out.parent.rglob("*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = {k: v for k, v in snapshot(out.parent).items() if ".tvc-staging-" not in k and not k.endswith(".tmp")}
    assert after == before  # leftovers of the killed run are only its own temporary files
    assert read_jsonl(out) and json.loads((out.parent / "dataset_info.json").read_text())["dvr"]


def test_two_concurrent_builds_in_one_folder(build_input, tmp_path, tokenizer_json):
    path, good = build_input
    folder = tmp_path / "shared"
    procs = [subprocess.Popen([str(SCRIPT), "dvr", "build", str(path), "-o", str(folder / f"{name}.jsonl"),
                               "--name", name, *common(tokenizer_json)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
             for name in ("first", "second", "third")]
    for p in procs:
        p.wait(timeout=600)
        assert p.returncode == 1, p.stderr.read()[-2000:]
    info = json.loads((folder / "dataset_info.json").read_text())
    assert set(info) == {"first", "second", "third"}
    for name in info:
        assert [r["tvc"]["id"] for r in read_jsonl(folder / f"{name}.jsonl")] == [r["id"] for r in good]
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tvc-staging-" in p.name]


def test_dataset_info_is_updated_under_a_lock(tmp_path):
    """Many writers at once (threads of separate processes would be the same): every entry lands."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom tvc_rs.dvr import _update_dataset_info\n"
        "for i in range(20):\n"
        "    _update_dataset_info(Path(sys.argv[1]), f'{sys.argv[2]}-{i}', {'file_name': 'x'})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(k)]) for k in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert len(info) == 80
    assert sorted(os.listdir(tmp_path)) == ["dataset_info.json", "dataset_info.json.lock"]
