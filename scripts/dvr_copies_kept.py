"""How many re-affirmed image copies DVR samples keep under truncation, before and after
issue 16 ("DVR keeps what fits"), on the EMMA traces that have a local image.

    python scripts/dvr_copies_kept.py [--cutoffs 1024,2048,4096,8192] [--assets DIR] [--json OUT]

Runs in the main environment (.venv: the installed tvc_rs wheel, transformers for
``get_rope_index``). For every EMMA trace with an image whose answer gets at least one copy
(``DVRBuilder`` with the default policy of ``tvc-rs dvr build``: at most 4 insertions, 200
tokens apart, none in the first 50) and every cutoff:

- after: ``DVRBuilder.build(..., cutoff=c)`` (the same rule as the LLaMA-Factory processor;
  tests/test_llamafactory.py checks they are equal): cut at the cutoff, keep every copy wholly
  before the cut;
- before: the rule it replaces, restated here: drop copies, last first, until the whole
  sample fits; only then cut the text. Dropping the last copies of a plan is the plan of the
  same policy with fewer insertions, so the kept count is the largest k whose sample (policy
  with ``max_insertions = k``) fits, or 0;
- checks on every truncated sample: no image block cut (a plain scan of
  ``<|vision_start|> ... <|vision_end|>``), every vision token of the answer labelled -100
  (so every kept copy's labels are masked), positions equal to transformers' own
  ``Qwen2VLModel.get_rope_index`` on the same ids and grids.

Prints a Markdown table (the one in docs/llamafactory.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151655, 151656
EMMA = "traces/emma_gemini2_flash_thinking_exp_1219.jsonl"


def blocks(ids: list[int]) -> tuple[list[tuple[int, int]], bool]:
    """(start, end) of each complete block and whether every vision token is in one."""
    out, start, whole = [], None, True
    for i, t in enumerate(ids):
        if t == VISION_START:
            whole &= start is None
            start = i
        elif t == VISION_END:
            whole &= start is not None
            if start is not None:
                out.append((start, i + 1))
            start = None
        elif t in (IMAGE_PAD, VIDEO_PAD):
            whole &= start is not None
    return out, whole and start is None


def rope_model():
    import torch
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2))
    torch.manual_seed(0)
    return Qwen2VLModel(config).eval()


def transformers_positions(model, sample) -> np.ndarray:
    import torch

    ids = torch.as_tensor(sample.input_ids, dtype=torch.long)[None]
    types = (ids == IMAGE_PAD).long()
    grids = torch.as_tensor(sample.image_grid_thw, dtype=torch.long)
    with torch.no_grad():
        positions, _ = model.get_rope_index(ids, types, image_grid_thw=grids if len(grids) else None,
                                            attention_mask=torch.ones_like(ids))
    return positions[:, 0].numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cutoffs", default="1024,2048,4096,8192", help="comma-separated cutoff_len values")
    parser.add_argument("--assets", default=os.environ.get("TVC_ASSETS", str(Path(__file__).resolve().parents[2]
                                                                             / "shared" / "assets")),
                        help="the shared assets folder ($TVC_ASSETS)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import tvc_rs
    from PIL import Image

    assets = Path(args.assets)
    cutoffs = [int(c) for c in args.cutoffs.split(",")]
    policy = tvc_rs.DVRPolicy()  # tvc-rs dvr build's defaults
    builder = tvc_rs.DVRBuilder(assets / "qwen2-vl", policy=policy)
    records = [json.loads(line) for line in (assets / EMMA).read_text().splitlines() if line.strip()]
    cases = []
    for r in records:
        if not r.get("local_image"):
            continue
        with Image.open(assets / r["local_image"]) as im:
            size = (im.height, im.width)
        full = builder.build(r["question"], [size], r["response"])
        if full.planned_images:
            # Lengths of the sample with its first k copies (k = 0 .. planned), for the old rule.
            lengths = [len(tvc_rs.DVRBuilder(assets / "qwen2-vl", policy=tvc_rs.DVRPolicy(
                max_insertions=k, min_gap=policy.min_gap, skip_first=policy.skip_first)).build(
                    r["question"], [size], r["response"])) for k in range(full.planned_images + 1)]
            assert lengths[-1] == len(full)
            cases.append((r, size, full, lengths))
    model = rope_model()

    rows = []
    for cutoff in cutoffs:
        row = dict(cutoff=cutoff, samples=len(cases), truncated=0, planned=0, before=0, after=0, none_before=0,
                   none_after=0, refused=0, blocks_cut=0, unmasked=0, positions_differ=0)
        for r, size, full, lengths in cases:
            row["planned"] += full.planned_images
            row["truncated"] += len(full) > cutoff
            before = max((k for k, n in enumerate(lengths) if n <= cutoff), default=0)
            try:
                sample = builder.build(r["question"], [size], r["response"], cutoff=cutoff)
            except ValueError:
                row["refused"] += 1  # the question's image itself does not fit: the clear error
                continue
            ids = sample.input_ids.tolist()
            found, whole = blocks(ids)
            row["blocks_cut"] += not whole or len(found) != len(sample.images)
            labels = sample.labels.tolist()
            row["unmasked"] += any(labels[i] != -100 for s, e in found for i in range(s, e))
            row["positions_differ"] += not np.array_equal(transformers_positions(model, sample),
                                                          sample.position_ids)
            row["before"] += before
            row["after"] += sample.kept_images
            row["none_before"] += before == 0
            row["none_after"] += sample.kept_images == 0
        rows.append(row)

    print(f"EMMA traces with a local image whose answer gets copies: {len(cases)} (policy: {policy!r})\n")
    print("| cutoff_len | samples longer than the cutoff | copies planned | copies kept before | copies kept after "
          "| samples keeping no copy, before / after | image blocks cut | kept copies with unmasked labels "
          "| positions != get_rope_index |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['cutoff']} | {row['truncated']} of {row['samples']} | {row['planned']} | {row['before']} "
              f"| {row['after']} | {row['none_before']} / {row['none_after']} | {row['blocks_cut']} "
              f"| {row['unmasked']} | {row['positions_differ']} |")
    if any(row["refused"] for row in rows):
        print("\nrefused (question image does not fit):", {row["cutoff"]: row["refused"] for row in rows})
    if args.json:
        Path(args.json).write_text(json.dumps(dict(samples=len(cases), rows=rows), indent=1))
    bad = sum(row["blocks_cut"] + row["unmasked"] + row["positions_differ"] for row in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
