"""DVR training data: the TVC collator against LLaMA-Factory's own, dataset preprocessing, and
``tvc-rs dvr build`` throughput. Runs in the LLaMA-Factory environment (``.venv-lf``).

1. Collator: batches of 4 samples of about 2000 tokens with 4 images each (16 per batch): the
   question's image (a MATH-V image of the EMMA traces) and 3 re-affirmed copies (downscaled
   4x per side) inside the answer of a real long-CoT trace; once with the traces in file order,
   once with the traces whose images are largest (more of the batch is image processing). LLaMA-Factory 0.9.5's
   ``SFTDataCollatorWith4DAttentionMask`` with its ``qwen2_vl`` template against the same class
   as ``tvc-rs train`` installs it (``TvcSFTDataCollator``, template ``tvc_qwen2_vl``), on the
   same features; the outputs (every tensor of the batch) are checked equal before timing. The
   two are called alternately. Measured with the process's default threads, then again in a
   subprocess with one thread everywhere (torch, rayon, the image threads), as in DataLoader
   workers; LLaMA-Factory's collator (many small multi-threaded torch ops) slows down a lot when
   the machine is busy, so the load average is recorded with the results.
2. Preprocessing (tokenizing one example, expanding its image tokens): LLaMA-Factory's
   ``SupervisedDatasetProcessor`` (runs the image processor to count tokens) against
   ``TvcSupervisedDatasetProcessor`` (counts from the image size in Rust).
3. ``tvc-rs dvr build`` (``tvc_rs.build_dataset``) on the EMMA traces: records with a local image
   converted per second (images decoded, copies written).

    .venv-lf/bin/python benches/bench_dvr.py
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("TVC_ASSETS", ROOT.parent / "shared" / "assets"))
TRACES = ASSETS / "traces" / "emma_gemini2_flash_thinking_exp_1219.jsonl"
BATCH, TOKENS, COPIES, BATCHES = 4, 2000, 3, 4


def tiny_model(folder: Path) -> Path:
    """A random Qwen2-VL from a small config, with the real tokenizer and processor files."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=151936,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    for f in (ASSETS / "qwen2-vl").iterdir():
        if not f.name.startswith("config"):
            shutil.copy(f, folder / f.name)
    return folder


def timed_pair(first, second, batches, repeat: int) -> tuple[float, float]:
    """Median seconds per call of two collators, called alternately on the same batches (so that a
    busy machine weighs on both alike); each call gets a fresh copy (copying is not timed)."""
    samples: tuple[list[float], list[float]] = ([], [])
    for r in range(repeat):
        for fn, out in ((first, samples[0]), (second, samples[1])):
            features = copy.deepcopy(batches[r % len(batches)])
            t0 = time.perf_counter()
            fn(features)
            out.append(time.perf_counter() - t0)
    return statistics.median(samples[0]), statistics.median(samples[1])


def main(single_thread: bool = False) -> None:
    """Everything; with ``single_thread`` only the collator rows, printed as JSON (the parent runs
    this in a subprocess with one thread everywhere: torch, rayon, the image threads)."""
    warnings.simplefilter("ignore")
    import torch
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    import tvc_rs
    from tvc_rs import llamafactory as tvc_lf

    tvc_lf.install()
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import TEMPLATES
    from llamafactory.extras.constants import IGNORE_INDEX
    from llamafactory.hparams import DataArguments

    tmp = Path(tempfile.mkdtemp(prefix="tvc-bench-dvr-"))
    try:
        model_dir = tiny_model(tmp / "model")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        processor = AutoProcessor.from_pretrained(model_dir)
        processor.tokenizer = tokenizer
        processor.image_max_pixels, processor.image_min_pixels = 768 * 768, 32 * 32  # LLaMA-Factory's defaults
        model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
        lf_template, tvc_template = TEMPLATES["qwen2_vl"], TEMPLATES["tvc_qwen2_vl"]
        lf_template.fix_special_tokens(tokenizer)

        # Samples: question image + 3 copies inside the answer (at line breaks spread over the
        # answer: where they sit does not change the collator's work), answer trimmed to ~TOKENS.
        records = [json.loads(line) for line in TRACES.read_text().splitlines()]
        data = DataArguments(template="tvc_qwen2_vl", cutoff_len=10**6)
        tvc_processor = tvc_lf.TvcSupervisedDatasetProcessor(template=tvc_template, tokenizer=tokenizer,
                                                             processor=processor, data_args=data)
        lf_processor = SupervisedDatasetProcessor(template=lf_template, tokenizer=tokenizer, processor=processor,
                                                  data_args=data)

        def make_examples(candidates):
            examples = []
            for record in candidates:
                answer = record["response"][:8000]
                breaks = [i for i, c in enumerate(answer) if c == "\n"]
                points = sorted({min(breaks, key=lambda b: abs(b - len(answer) * (k + 1) / (COPIES + 2)))
                                 for k in range(COPIES)}) if len(breaks) >= COPIES else []
                if len(points) < COPIES:
                    continue
                text, at = "", 0
                for point in points:
                    text += answer[at:point] + "<image>"
                    at = point
                text += answer[at:]
                image = ASSETS / record["local_image"]
                copy_path = tmp / f"{record['id']}_copy.png"
                with Image.open(image) as im:
                    im.convert("RGB").reduce(4).save(copy_path)
                question = tvc_rs.dvr._question_with_placeholders(record["question"], 1, "<image>")
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
                images = [str(image)] + [str(copy_path)] * COPIES

                def encoded(answer_text):
                    m = [messages[0], {"role": "assistant", "content": answer_text}]
                    return tvc_processor.encode_tvc_example(m[:1], m[1:], "", "", images, [], [])

                if len(encoded(text)[0]) < TOKENS:
                    continue
                # Trim the answer text after its last placeholder until the sample is ~TOKENS long.
                lo, hi = text.rfind("<image>") + len("<image>"), len(text)
                while hi - lo > 20:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if len(encoded(text[:mid])[0]) <= TOKENS else (lo, mid)
                messages[1]["content"] = text[:lo]
                ids, labels, kept = encoded(text[:lo])
                if len(kept) != 1 + COPIES or len(ids) > TOKENS:
                    continue
                examples.append((messages, images, ids, labels))
                if len(examples) == BATCH * BATCHES:
                    break
            if len(examples) < BATCH * BATCHES:
                raise SystemExit(f"only {len(examples)} usable traces")
            batches = [[{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "images": images,
                         "videos": None, "audios": None}
                        for _, images, ids, labels in examples[b * BATCH:(b + 1) * BATCH]] for b in range(BATCHES)]
            return examples, batches

        with_images = [r for r in records if r.get("local_image")]

        def pixels(record):
            with Image.open(ASSETS / record["local_image"]) as im:
                return im.width * im.height

        sets = {
            "EMMA traces in file order": make_examples(with_images),
            "EMMA traces with the largest images": make_examples(sorted(with_images, key=pixels, reverse=True)),
        }
        kwargs = dict(model=model, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX, tokenizer=tokenizer,
                      processor=processor)
        lf_collator = SFTDataCollatorWith4DAttentionMask(template=lf_template, **kwargs)
        tvc_collator = tvc_lf.TvcSFTDataCollator(template=tvc_template, **kwargs)
        repeat = 16
        rows = []
        for name, (examples, batches) in sets.items():
            for batch in batches:  # same outputs before timing
                a, b = lf_collator(copy.deepcopy(batch)), tvc_collator(copy.deepcopy(batch))
                for key in set(a) | set(b):
                    if not torch.equal(a[key], b[key]):
                        raise SystemExit(f"the collators disagree on {key}")
            lf_s, tvc_s = timed_pair(lf_collator, tvc_collator, batches, repeat)
            tokens = statistics.mean(len(f["input_ids"]) for batch in batches for f in batch)
            patches = statistics.mean(len(lf_collator(copy.deepcopy(batch))["pixel_values"]) for batch in batches)
            threads = "1 thread" if single_thread else f"{torch.get_num_threads()} torch threads"
            rows.append({"what": f"collator, {name}: {BATCH} x {tokens:.0f} tokens, {BATCH * (1 + COPIES)} images "
                                 f"({patches:.0f} patches), {threads}",
                         "llamafactory_s": lf_s, "tvc_rs_s": tvc_s, "llamafactory_samples_per_s": BATCH / lf_s,
                         "tvc_rs_samples_per_s": BATCH / tvc_s, "speedup": lf_s / tvc_s})

        if single_thread:
            print("ROWS " + json.dumps(rows))
            return
        # The same collator comparison with one thread everywhere (as in DataLoader workers).
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAYON_NUM_THREADS="1",
                   TVC_RS_LLAMAFACTORY=json.dumps({"tvc_image_threads": 1}))
        done = subprocess.run([sys.executable, __file__, "--single-thread"], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        rows += json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ROWS "))[5:])

        # Preprocessing one example (token expansion of its images), alternately.
        examples = sets["EMMA traces in file order"][0]
        lf_times, tvc_times = [], []
        for messages, images, _, _ in examples:
            for fn, out in ((lf_processor._encode_data_example, lf_times), (tvc_processor.encode_tvc_example, tvc_times)):
                t0 = time.perf_counter()
                fn(messages[:1], messages[1:], "", "", images, [], [])
                out.append(time.perf_counter() - t0)
        lf_prep, tvc_prep = statistics.median(lf_times), statistics.median(tvc_times)
        rows.append({"what": f"preprocessing one example ({1 + COPIES} images), EMMA traces in file order",
                     "llamafactory_s": lf_prep, "tvc_rs_s": tvc_prep, "llamafactory_samples_per_s": 1 / lf_prep,
                     "tvc_rs_samples_per_s": 1 / tvc_prep, "speedup": lf_prep / tvc_prep})

        # tvc-rs dvr build on the EMMA traces.
        runs = []
        for r in range(3):
            report = tvc_rs.build_dataset(TRACES, tmp / "build" / "emma.jsonl", tokenizer=ASSETS / "qwen2-vl",
                                          image_field="local_image", image_root=ASSETS, overwrite=True,
                                          progress=False)
            runs.append(report)
        build = sorted(runs, key=lambda r: r.seconds)[1]

        rows.append({"what": f"tvc-rs dvr build, EMMA traces ({build.written} of {build.records} records have a "
                             f"local image; {build.images_written} copies written)",
                     "tvc_rs_s": build.seconds, "tvc_rs_samples_per_s": build.samples_per_second})
        print(markdown_table(rows, ["what", "llamafactory_s", "tvc_rs_s", "llamafactory_samples_per_s",
                                    "tvc_rs_samples_per_s", "speedup"]))
        import llamafactory
        import transformers

        path = write_results("dvr-cpu", rows, llamafactory=llamafactory.__version__,
                             transformers=transformers.__version__, repeat=repeat, load_average=os.getloadavg(),
                             image_threads=tvc_lf.settings()["tvc_image_threads"] or min(8, os.cpu_count() or 1))
        print(f"\nwritten to {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if "--single-thread" in sys.argv:
        import torch

        torch.set_num_threads(1)
        main(single_thread=True)
    else:
        main()
