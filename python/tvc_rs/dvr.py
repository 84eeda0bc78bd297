"""Dynamic Visual Reaffirmation (DVR): long-CoT answers with the image given again at their
self-reflection points (Rust: src/dvr).

- `DVRBuilder.plan(answer)`: the insertion points the policy (`DVRPolicy`) picks: after the
  sentence of a reflection phrase, at most ``max_insertions``, ``min_gap`` answer tokens apart,
  none in the first ``skip_first`` tokens.
- `DVRBuilder.build(question, image_sizes, answer, cutoff=...)`: a whole training sample
  (token ids, labels with the prompt and every vision token masked, M-RoPE positions), with the
  re-affirmed copy downscaled ``downscale`` times per side and its token count from the
  processor's ``smart_resize`` rule; truncation cuts at the cutoff as LLaMA-Factory does,
  never inside an image block: every re-affirmed image wholly before the cut is kept, one that
  straddles it (with its bridge) or lies beyond it is dropped (``answer_cut``).
- `build_dataset(...)` (the ``tvc-rs dvr build`` command): long-CoT records to
  LLaMA-Factory's sharegpt format with the re-affirmed images inserted.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
import itertools
from typing import Any, Iterator, Optional, Sequence

from tvc_rs._native import (
    IGNORE_INDEX,
    QWEN2_VL_SYSTEM,
    DVRBuilder,
    DVRImage,
    DVRPlan,
    DVRPolicy,
    DVRSample,
    Insertion,
    answer_cut,
    dvr_downscaled_size,
    dvr_family,
    infer_seqlen,
    vision_blocks,
)
from tvc_rs._native import qwen2_vl_patches as _qwen2_vl_patches
from tvc_rs.triggers import find_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "QWEN2_VL_SYSTEM",
    "DVRBuilder",
    "DVRImage",
    "DVRPlan",
    "DVRPolicy",
    "DVRSample",
    "Insertion",
    "dvr_downscaled_size",
    "dvr_family",
    "infer_seqlen",
    "vision_blocks",
    "answer_cut",
    "qwen2_vl_patches",
    "BuildReport",
    "build_dataset",
]


def qwen2_vl_patches(images, mean, std, *, layout="chw", patch_size=14, merge_size=2, temporal_patch_size=2):
    """Qwen2-VL ``pixel_values`` of resized ``uint8`` images, in one pass.

    Args:
        images: list of 3-D ``uint8`` NumPy arrays (or CPU tensors), ``(C, H, W)`` for
            ``layout="chw"`` or ``(H, W, C)`` for ``layout="hwc"``, any non-negative strides;
            ``H`` and ``W`` multiples of ``patch_size * merge_size`` (resize with
            ``smart_resize`` first).
        mean, std: ``C`` floats each, already divided by the rescale factor (what
            ``Qwen2VLImageProcessor`` fuses: ``image_mean / rescale_factor``).

    Returns:
        float32 NumPy array ``(sum of (H/patch)*(W/patch), C * temporal_patch_size * patch**2)``:
        ``(x - mean) / std`` in float32, each frame repeated to ``temporal_patch_size``, rows in
        the processor's merge order, images one after another. Equal bit for bit to
        ``Qwen2VLImageProcessor``'s ``pixel_values`` after its resize. Inputs are not modified.

    Raises:
        TypeError: an image that is not a uint8 array. ValueError: not 3-D, negative strides,
        sides not multiples of ``patch_size * merge_size``, channel count different from
        ``len(mean)``, a zero or non-finite ``std``.
    """
    import numpy as np

    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected a list of uint8 arrays, got {type(images).__name__}")
    arrays = []
    for i, image in enumerate(images):
        if hasattr(image, "detach") and hasattr(image, "numpy"):  # a CPU torch tensor: zero-copy view
            try:
                image = image.detach().numpy()
            except (RuntimeError, TypeError) as err:
                raise TypeError(f"images[{i}]: expected a CPU uint8 tensor or NumPy array: {err}") from None
        arrays.append(image if isinstance(image, np.ndarray) else np.asarray(image))
    return _qwen2_vl_patches(
        arrays, _floats(mean, "mean"), _floats(std, "std"), layout=layout, patch_size=patch_size,
        merge_size=merge_size, temporal_patch_size=temporal_patch_size,
    )


def _floats(values, name: str) -> list[float]:
    """A sequence of numbers as floats; TypeError naming the argument otherwise."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__}")
    out = []
    size = getattr(values, "size", None)
    size = values.numel() if callable(getattr(values, "numel", None)) else size
    if isinstance(size, int) and size > 1 << 16:
        raise ValueError(f"{name}: expected one number per channel, got an array of {size} elements")
    try:
        items = list(values)
    except TypeError as err:
        raise TypeError(f"{name}: expected a sequence of numbers: {err}") from None
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise TypeError(f"{name}[{i}]: expected a number, got {type(v).__name__}")
        try:
            out.append(float(v))
        except (TypeError, ValueError, OverflowError) as err:
            raise TypeError(f"{name}[{i}]: expected a number: {err}") from None
    return out


# ---------------------------------------------------------------- the dataset builder

# EMMA / MathVista style image tags in a question ("<image_1>"): they become placeholders.
_IMAGE_TAG = re.compile(r"<image_\d+>")


@dataclass
class BadRecord:
    """A record that could not be converted: its 0-based index, where it is, and why."""

    index: int
    source: str
    reason: str
    id: Optional[str] = None


@dataclass
class BuildReport:
    """What ``build_dataset`` did."""

    records: int = 0
    written: int = 0
    with_insertions: int = 0
    insertions: int = 0
    no_reflection: int = 0
    skipped_existing: int = 0
    images_written: int = 0
    seconds: float = 0.0
    bad: list[BadRecord] = field(default_factory=list)
    output: str = ""
    dataset_info: str = ""
    dataset_name: str = ""
    #: The model family and the TVC LLaMA-Factory template to train the data with.
    model_type: str = ""
    template: str = ""

    @property
    def samples_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["bad_records"] = len(self.bad)
        out["samples_per_second"] = self.samples_per_second
        return out


@dataclass
class _Job:
    index: int
    source: str
    id: Optional[str]
    question: str
    answer: str
    image_paths: list[Path]
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width)
    pixels: list[Any] = field(default_factory=list)  # decoded PIL images (for the copies)


class _BadLine:
    """A line of the input that is not valid UTF-8 (one bad record; the others are kept)."""

    def __init__(self, err: UnicodeDecodeError):
        self.reason = f"not valid UTF-8: byte 0x{err.object[err.start]:02x} at column {err.start + 1}"


def _read_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(index, source, record or JSONDecodeError / _BadLine)`` of a JSON list, a JSON record,
    or JSON lines. JSON lines are read one line at a time (any file size, constant memory)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        text = path.read_text(encoding="utf-8", errors="strict")
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            yield 0, f"{path.name}:{err.lineno}", err
            return
        for i, record in enumerate(document if isinstance(document, list) else [document]):
            yield i, f"{path.name}[{i}]", record
        return
    if path.suffix.lower() == ".json":
        try:
            yield 0, path.name, json.loads(path.read_text(encoding="utf-8"))
            return
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # JSON lines in a .json file
    yield from _read_lines(path, path.name)


def _read_lines(path: Path, name: str) -> Iterator[tuple[int, str, Any]]:
    index = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield index, f"{name}:{number}", _BadLine(err)
                index += 1
                continue
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as err:
                record = err
            yield index, f"{name}:{number}", record
            index += 1


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _question_with_placeholders(question: str, n_images: int, placeholder: str) -> str:
    """One placeholder per image: kept if already there, image tags (``<image_1>``) replaced, or
    the placeholders put first. ValueError when the counts cannot be matched."""
    present = question.count(placeholder)
    if present == n_images:
        return question
    if present:
        raise ValueError(f"the question holds {present} {placeholder!r} placeholder(s) but the record has {n_images} image(s)")
    tags = _IMAGE_TAG.findall(question)
    if tags and len(tags) == n_images:
        return _IMAGE_TAG.sub(placeholder, question)
    if tags:
        raise ValueError(f"the question holds {len(tags)} image tag(s) ({', '.join(tags[:3])}) but the record has "
                         f"{n_images} image(s)")
    return placeholder * n_images + question


def _job(index: int, source: str, record: Any, *, question_field: str, answer_field: str, image_field: str,
         id_field: str, image_root: Path, placeholder: str, allow_text_only: bool) -> _Job | BadRecord:
    if isinstance(record, json.JSONDecodeError):
        return BadRecord(index, source, f"invalid JSON: {record.msg} (column {record.colno})")
    if isinstance(record, _BadLine):
        return BadRecord(index, source, record.reason)
    if not isinstance(record, dict):
        return BadRecord(index, source, f"expected a JSON object, got {type(record).__name__}")
    rid = record.get(id_field)
    rid = None if rid is None else str(rid)
    answer = record.get(answer_field)
    if not isinstance(answer, str) or not answer.strip():
        what = "missing" if answer_field not in record else ("empty" if isinstance(answer, str) else
                                                               f"a {type(answer).__name__}, not a string")
        return BadRecord(index, source, f"no answer: the {answer_field!r} field is {what}", rid)
    question = record.get(question_field, None)
    if not isinstance(question, str):
        what = "missing" if question_field not in record else f"a {type(question).__name__}, not a string"
        return BadRecord(index, source, f"no question: the {question_field!r} field is {what}", rid)
    images = _as_list(record.get(image_field))
    if not images and not allow_text_only:
        return BadRecord(index, source, f"missing image: no {image_field!r} field or it is empty "
                                        "(pass --allow-text-only to keep text-only records)", rid)
    paths = []
    for image in images:
        if not isinstance(image, str) or not image:
            return BadRecord(index, source, f"the {image_field!r} field holds a {type(image).__name__}, "
                                            "expected an image path", rid)
        path = Path(image)
        if not path.is_absolute():
            path = image_root / path
        if not path.is_file():
            return BadRecord(index, source, f"missing image: {path} does not exist", rid)
        paths.append(path)
    if placeholder in answer:
        return BadRecord(index, source, f"the answer already contains the image placeholder {placeholder!r}", rid)
    try:
        question = _question_with_placeholders(question, len(paths), placeholder)
    except ValueError as err:
        return BadRecord(index, source, str(err), rid)
    return _Job(index, source, rid, question, answer, paths)


def _decode(job: _Job) -> _Job | BadRecord:
    """Opens and fully decodes every image of the job (an unreadable file is a bad record)."""
    from PIL import Image

    for path in job.image_paths:
        try:
            with Image.open(path) as im:
                im.load()
                pixels = im if im.mode == "RGB" else im.convert("RGB")
                job.sizes.append((im.height, im.width))
                job.pixels.append(pixels.copy() if pixels is im else pixels)
        except Exception as err:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            return BadRecord(job.index, job.source, f"unreadable image {path}: {type(err).__name__}: {err}", job.id)
    return job


def _write_copies(job: _Job, factor: int, folder: Path, staging: "_Staging") -> list[Path]:
    """Writes the downscaled copy of each image of the job (``Image.reduce``: the average of
    each ``factor x factor`` window; edge windows average the pixels they cover) into the
    staging folder; returns the paths they will have in ``folder`` once the build completes."""
    out = []
    for j, pixels in enumerate(job.pixels):
        copy = pixels.reduce(factor) if factor > 1 else pixels
        expected = dvr_downscaled_size(job.sizes[j][0], job.sizes[j][1], factor)
        if (copy.height, copy.width) != expected:  # Pillow's rounding, checked once per image
            raise RuntimeError(f"Image.reduce gave {copy.size[::-1]}, expected {expected}")
        path = folder / f"{job.index:07d}_{j}.png"
        copy.save(staging.file_for(path), format="PNG")
        out.append(path)
    return out


class _Staging:
    """Files of a build written beside their final places and moved there only at the end, so
    that an interrupted or failed build replaces nothing: the output goes to a unique temporary
    file in its folder, image copies to a unique hidden folder inside the images folder.
    Folders are made when the first file goes into them."""

    def __init__(self, output: Path, copies_dir: Path):
        self.output, self.copies_dir = output, copies_dir
        self.tag = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.tmp_output: Optional[Path] = None
        self.copies_tmp = copies_dir / f".tvc-staging-{self.tag}"
        self.staged: dict[Path, Path] = {}  # final path -> staged file
        self.made: list[Path] = []  # folders this build made (removed again if it fails)
        self._lock = threading.Lock()

    def _mkdir(self, folder: Path) -> None:
        missing = []
        for parent in [folder, *folder.parents]:
            if parent.exists():
                break
            missing.append(parent)
        folder.mkdir(parents=True, exist_ok=True)
        self.made.extend(missing)  # innermost first

    def open_output(self, keep_from: Optional[Path] = None, keep_bytes: int = 0):
        self._mkdir(self.output.parent)
        self.tmp_output = self.output.with_name(f".{self.output.name}.{self.tag}.tmp")
        out = open(self.tmp_output, "xb")
        if keep_from is not None and keep_bytes:
            with open(keep_from, "rb") as src:
                remaining = keep_bytes
                while remaining:
                    block = src.read(min(remaining, 1 << 20))
                    if not block:
                        break
                    out.write(block)
                    remaining -= len(block)
        return out

    def file_for(self, final: Path) -> Path:
        with self._lock:
            if not self.copies_tmp.exists():
                self._mkdir(self.copies_tmp)
            staged = self.copies_tmp / final.name
            self.staged[final] = staged
            return staged

    def commit(self) -> None:
        """Moves the image copies, then the output, into place (each an atomic rename)."""
        for final, staged in self.staged.items():
            os.replace(staged, final)
        self.staged.clear()
        if self.copies_tmp.exists():
            self.copies_tmp.rmdir()
        if self.tmp_output is not None:
            os.replace(self.tmp_output, self.output)
            self.tmp_output = None
        self.made.clear()

    def discard(self) -> None:
        """Removes what this build staged (its own temporary files only)."""
        for staged in self.staged.values():
            try:
                staged.unlink()
            except FileNotFoundError:
                pass
        self.staged.clear()
        try:
            self.copies_tmp.rmdir()
        except OSError:
            pass
        if self.tmp_output is not None:
            try:
                self.tmp_output.unlink()
            except FileNotFoundError:
                pass
            self.tmp_output = None
        for folder in sorted(self.made, key=lambda p: len(p.parts), reverse=True):  # only if empty
            try:
                folder.rmdir()
            except OSError:
                pass
        self.made.clear()


def _update_dataset_info(out_dir: Path, name: str, entry: dict) -> Path:
    """Sets ``dataset_info.json[name]`` under an exclusive lock (``fcntl.flock`` on
    ``dataset_info.json.lock``), writing a unique temporary file and renaming it, so that
    concurrent builds in one folder each add their entry and readers never see a torn file."""
    info_path = out_dir / "dataset_info.json"
    lock_path = out_dir / "dataset_info.json.lock"
    with open(lock_path, "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no advisory locks; the rename below is still atomic
            pass
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        if not isinstance(info, dict):
            raise ValueError(f"{info_path}: expected a JSON object of datasets, got {type(info).__name__}")
        info[name] = entry
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".dataset_info.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, info_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    return info_path


def _relative(path: Path, base: Path) -> str:
    """The path relative to ``base`` when it lies inside it (LLaMA-Factory resolves media
    against the dataset folder), else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _existing_indices(output: Path) -> tuple[set[int], int]:
    """Indices already written to ``output`` (resume); a torn last line is cut off. Returns the
    indices and the number of bytes kept."""
    done: set[int] = set()
    keep = 0
    with open(output, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                done.add(int(record["tvc"]["index"]))
            except (ValueError, KeyError, TypeError):
                break  # a torn write from an interrupted run: everything from here is redone
            keep += len(line)
    return done, keep


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.started = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} records "
                         f"({rate:.1f}/s)")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def build_dataset(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    tokenizer: Any,
    policy: Optional[DVRPolicy] = None,
    phrases: Optional[Sequence[str]] = None,
    question_field: str = "question",
    answer_field: str = "response",
    image_field: str = "image",
    id_field: str = "id",
    image_root: Optional[str | os.PathLike] = None,
    images_dir: Optional[str | os.PathLike] = None,
    dataset_name: Optional[str] = None,
    allow_text_only: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    workers: Optional[int] = None,
    chunk_size: int = 64,
    limit: Optional[int] = None,
    progress: Optional[bool] = None,
    model_type: str = "qwen2_vl",
) -> BuildReport:
    """Converts long-CoT records to LLaMA-Factory's sharegpt format with re-affirmed images.

    Input: JSON lines, or a JSON list, of records with a question, an answer and image path(s)
    (a string or a list; relative paths are resolved against ``image_root``, default the input
    file's folder). Field names are settable. A question gets one ``<image>`` placeholder per
    image: those it has are kept, image tags like ``<image_1>`` are replaced, else the
    placeholders go first.

    Output (JSON lines at ``output``): ``{"messages": [user, assistant], "images": [...],
    "tvc": {"index", "id", "insertions", "phrases"}}`` where the assistant text has the
    policy's bridge and ``<image>`` placeholders at each insertion point and ``images`` lists
    the question's images, then one downscaled copy per question image and insertion point.
    Copies are PNG files in ``images_dir`` (default: ``images`` next to ``output``); paths
    inside the output's folder are written relative to it (LLaMA-Factory's default
    ``media_dir`` is the dataset folder), others absolute. The ``dataset_info.json`` next to
    ``output`` gets (or updates) the entry ``dataset_name`` (default: the output's stem).

    ``model_type`` is the model family the data is for (``DVRBuilder``'s): the tokenizer must
    have its vision tokens, and the report names its TVC template (``BuildReport.template``,
    ``tvc_<model_type>``); the data itself is the same for every family.

    Records with no reflection point are written unchanged (question, answer, images) and
    counted (``no_reflection``). Bad records (invalid JSON, no answer, no question, missing
    image, unreadable image file, placeholder count mismatch) are not written; each is reported
    with its index in ``BuildReport.bad``. With ``resume``, records already in ``output``
    (by ``tvc.index``) are skipped and new ones appended; a torn last line is rewritten.

    Raises:
        FileExistsError: ``output`` exists and neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: ``input`` does not exist. ImportError: Pillow is missing.
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ImportError("tvc-rs dvr build needs Pillow to read and downscale images: pip install 'tvc-rs[dvr]'") from None
    started = time.perf_counter()
    input_path, output_path = Path(input), Path(output)
    if not input_path.is_file():
        raise FileNotFoundError(f"input: no such file: {input_path}")
    if output_path.exists() and not (resume or overwrite):
        raise FileExistsError(f"output: {output_path} exists; pass resume=True (--resume) to continue it or "
                              "overwrite=True (--overwrite) to start again")
    if chunk_size < 1:
        raise ValueError(f"chunk_size = {chunk_size}: must be >= 1")
    builder = tokenizer if isinstance(tokenizer, DVRBuilder) else DVRBuilder(tokenizer, phrases=phrases, policy=policy,
                                                                              model_type=model_type)
    policy = builder.policy
    out_dir = output_path.resolve().parent
    copies_dir = Path(images_dir) if images_dir is not None else out_dir / "images"
    root = Path(image_root) if image_root is not None else input_path.resolve().parent
    name = dataset_name or output_path.stem

    # Nothing existing is removed or replaced before the new output is complete: the output is
    # written to a temporary file beside it (with resume: the kept records copied first) and
    # renamed at the end; a failure or an interruption leaves the old files as they were.
    done: set[int] = set()
    keep = 0
    if output_path.exists() and resume:
        done, keep = _existing_indices(output_path)
    staging = _Staging(output_path, copies_dir)
    out = None
    report = BuildReport(output=str(output_path), dataset_name=name, model_type=builder.model_type,
                         template=f"tvc_{builder.model_type}")
    records: Iterator[tuple[int, str, Any]] = _read_records(input_path)
    if limit is not None:
        records = itertools.islice(records, limit)

    workers = workers or os.cpu_count() or 1
    bar = _Progress(0, sys.stderr.isatty() if progress is None else progress)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            while True:
                chunk = []
                for index, source, record in itertools.islice(records, chunk_size):
                    report.records += 1
                    if index in done:
                        report.skipped_existing += 1
                        continue
                    chunk.append((index, source, record))
                if not chunk and report.records == bar.total:
                    break
                bar.total = report.records
                jobs: list[_Job] = []
                for index, source, record in chunk:
                    item = _job(index, source, record, question_field=question_field, answer_field=answer_field,
                                image_field=image_field, id_field=id_field, image_root=root,
                                placeholder=policy.placeholder, allow_text_only=allow_text_only)
                    (jobs if isinstance(item, _Job) else report.bad).append(item)
                decoded = list(pool.map(_decode, jobs))
                jobs = []
                for item in decoded:
                    (jobs if isinstance(item, _Job) else report.bad).append(item)
                plans = builder.plan_many([j.answer for j in jobs], [len(j.image_paths) for j in jobs])
                planned = []
                for job, plan in zip(jobs, plans):
                    if plan.error is not None:
                        report.bad.append(BadRecord(job.index, job.source, plan.error, job.id))
                        continue
                    if not job.image_paths:
                        plan_insertions, text = [], job.answer  # text-only: nothing to re-affirm
                    else:
                        plan_insertions, text = plan.insertions, plan.answer_text
                    planned.append((job, plan_insertions, text))
                copies = list(pool.map(
                    lambda p: _write_copies(p[0], policy.downscale, copies_dir, staging) if p[1] else [], planned))
                lines = []
                for (job, insertions, text), copy_paths in zip(planned, copies):
                    images = [_relative(p, out_dir) for p in job.image_paths]
                    copy_names = [_relative(p, out_dir) for p in copy_paths]
                    for _ in insertions:
                        images.extend(copy_names)
                    record = {
                        "messages": [{"role": "user", "content": job.question},
                                     {"role": "assistant", "content": text}],
                        "images": images,
                        "tvc": {"index": job.index, "id": job.id, "insertions": len(insertions),
                                "phrases": [i.phrase for i in insertions]},
                    }
                    lines.append(json.dumps(record, ensure_ascii=False))
                    report.written += 1
                    report.images_written += len(copy_paths)
                    if insertions:
                        report.with_insertions += 1
                        report.insertions += len(insertions)
                    else:
                        report.no_reflection += 1
                    job.pixels.clear()
                if lines:
                    if out is None:
                        out = staging.open_output(output_path if keep else None, keep)
                    out.write(("\n".join(lines) + "\n").encode("utf-8"))
                bar.update(len(chunk))
        bar.close()
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            out = None
        if report.written == 0:
            # Nothing to write: no output, no dataset entry, no folders (an existing output,
            # resumed or not, stays as it was).
            staging.discard()
            report.seconds = time.perf_counter() - started
            return report
        staging.commit()
    except BaseException:
        if out is not None:
            out.close()
        staging.discard()
        raise

    report.bad.sort(key=lambda b: b.index)
    info_path = _update_dataset_info(out_dir, name, {
        "file_name": _relative(output_path, out_dir),
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    })
    report.dataset_info = str(info_path)
    report.seconds = time.perf_counter() - started
    report_path = output_path.with_name(output_path.stem + ".report.json")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{report_path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, report_path)
    return report


def cli_build(args: Any) -> int:
    """``tvc-rs dvr build``: runs `build_dataset` with the parsed arguments and prints the
    report. Exit status 0 ok, 1 some bad records, 2 nothing written."""
    policy = DVRPolicy(max_insertions=args.max_insertions, min_gap=args.min_gap, skip_first=args.skip_first,
                       bridge=args.bridge, downscale=args.downscale)
    phrases = [p.strip() for p in args.phrases.split(",")] if args.phrases else None
    report = build_dataset(
        args.input, args.output, tokenizer=str(find_tokenizer(args.tokenizer)), policy=policy, phrases=phrases,
        model_type=args.model_type,
        question_field=args.question_field, answer_field=args.answer_field, image_field=args.image_field,
        id_field=args.id_field, image_root=args.image_root, images_dir=args.images_dir, dataset_name=args.name,
        allow_text_only=args.allow_text_only, resume=args.resume, overwrite=args.overwrite, workers=args.workers,
        limit=args.limit, progress=False if args.no_progress else None,
    )
    for bad in report.bad:
        rid = f", id {bad.id}" if bad.id else ""
        print(f"tvc-rs dvr build: bad record {bad.index} ({bad.source}{rid}): {bad.reason}", file=sys.stderr)
    print(f"tvc-rs dvr build: {report.records} records: {report.written} written ({report.with_insertions} with "
          f"{report.insertions} re-affirmed image insertions, {report.no_reflection} without a reflection point, "
          f"kept unchanged), {len(report.bad)} bad, {report.skipped_existing} already written; "
          f"{report.samples_per_second:.1f} samples/s")
    if report.written:
        print(f"tvc-rs dvr build: wrote {report.output}, {report.images_written} image copies, dataset "
              f"{report.dataset_name!r} in {report.dataset_info}; train it with template: {report.template}")
    else:
        print(f"tvc-rs dvr build: nothing to write; {report.output} and dataset_info.json left as they were")
    if report.written == 0 and report.skipped_existing == 0:
        return 2
    return 1 if report.bad else 0
