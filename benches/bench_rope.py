"""M-RoPE position ids: tvc_rs.mrope_position_ids against transformers' get_rope_index.

Batch of 8 sequences of up to 8192 tokens, 5 images per row (grid 1 x 72 x 72 patches = 1296
tokens each, a 1008 x 1008 image), placed at random points of the text (also inside the
answer), rows of different lengths left-padded with an attention_mask, as the processor returns
them. Both get the same input; the outputs are checked equal before timing.

    python benches/bench_rope.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, time_call, write_results  # noqa: E402

import tvc_rs  # noqa: E402

BATCH, SEQ, IMAGES_PER_ROW, GRID = 8, 8192, 5, (1, 72, 72)
IMAGE, VISION_START, VISION_END, PAD = 151655, 151652, 151653, 151643


def make_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    image_tokens = GRID[0] * (GRID[1] // 2) * (GRID[2] // 2)
    rows = []
    for _ in range(BATCH):
        length = int(rng.integers(SEQ - 400, SEQ + 1))
        text = length - IMAGES_PER_ROW * (image_tokens + 2)
        cuts = np.sort(rng.choice(np.arange(1, text), IMAGES_PER_ROW, replace=False))
        pieces = np.split(rng.integers(0, 151000, text), cuts)
        row = list(pieces[0])
        for piece in pieces[1:]:
            row += [VISION_START] + [IMAGE] * image_tokens + [VISION_END] + list(piece)
        rows.append(row)
    input_ids = np.full((BATCH, SEQ), PAD, dtype=np.int64)
    mask = np.zeros((BATCH, SEQ), dtype=np.int64)
    for i, row in enumerate(rows):  # left padding
        input_ids[i, SEQ - len(row):] = row
        mask[i, SEQ - len(row):] = 1
    grids = np.array([GRID] * (BATCH * IMAGES_PER_ROW), dtype=np.int64)
    return input_ids, mask, grids


def main() -> None:
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    warnings.simplefilter("ignore")
    # get_rope_index only reads the config; the smallest valid model is enough.
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=1024),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
    )
    model = Qwen2VLModel(config).eval()

    input_ids, mask, grids = make_batch()
    ids_t, mask_t, grids_t = map(torch.from_numpy, (input_ids, mask, grids))
    mm_types_t = (ids_t == IMAGE).long()  # the processor's mm_token_type_ids

    def reference():
        with torch.no_grad():
            return model.get_rope_index(ids_t, mm_types_t, image_grid_thw=grids_t, attention_mask=mask_t)

    ref_positions, ref_deltas = reference()
    cases = {
        "tvc_rs (NumPy in/out)": lambda: tvc_rs.mrope_position_ids(input_ids, grids, None, mask),
        "tvc_rs (torch in/out)": lambda: tvc_rs.mrope_position_ids(ids_t, grids_t, None, mask_t),
        "tvc_rs (torch, mm_token_type_ids)": lambda: tvc_rs.mrope_position_ids(
            ids_t, grids_t, None, mask_t, mm_token_type_ids=mm_types_t
        ),
    }
    for name, fn in cases.items():
        positions, deltas = fn()
        assert np.array_equal(np.asarray(positions), ref_positions.numpy()), name
        assert np.array_equal(np.asarray(deltas), ref_deltas.numpy()), name

    # transformers runs many small torch ops per row; with several intra-op threads they can be
    # much slower on a busy machine, so it is timed with the default thread count and with one,
    # and the faster of the two is the baseline.
    default_threads = torch.get_num_threads()
    rows = []
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        seconds = time_call(reference, repeat=20, min_seconds=2.0)
        rows.append({"implementation": f"transformers get_rope_index (torch threads={threads})", "ms": seconds * 1e3})
    torch.set_num_threads(default_threads)
    ref_ms = min(row["ms"] for row in rows)
    for name, fn in cases.items():
        seconds = time_call(fn, repeat=500, min_seconds=2.0)
        rows.append({"implementation": name, "ms": seconds * 1e3})
    for row in rows:
        row["speedup"] = ref_ms / row["ms"]

    kept = int(mask.sum())
    print(
        f"\nM-RoPE position ids, batch {BATCH} x {SEQ} tokens ({kept} kept, left padding), "
        f"{IMAGES_PER_ROW} images of grid {GRID} per row, Qwen2-VL, median per call\n"
    )
    print(markdown_table(rows, ["implementation", "ms", "speedup"]))
    print("\nspeedup: against the faster transformers row")
    path = write_results(
        "rope-cpu",
        rows,
        workload={
            "batch": BATCH, "seq": SEQ, "kept_tokens": kept, "images_per_row": IMAGES_PER_ROW,
            "grid_thw": GRID, "padding": "left", "model_type": "qwen2_vl",
        },
        speedup_baseline="faster transformers row",
        command="python benches/bench_rope.py",
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
