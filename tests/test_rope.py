"""tvc_rs.mrope_position_ids against transformers' real get_rope_index (tiny Qwen2-VL and
Qwen2.5-VL models with random weights), and smart_resize / image_grid_thw / image_token_count
against the real Qwen2-VL image processors (fast and PIL) on real and random image sizes."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tvc_rs
from conftest import ASSETS, asset

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as slow_module  # noqa: E402
from transformers.models.qwen2_vl import image_processing_qwen2_vl as fast_module  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel  # noqa: E402

IMAGE, VIDEO, VISION_START, VISION_END, PAD = 151655, 151656, 151652, 151653, 151643

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----------------------------------------------------------------------------- tiny models

_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def qwen2_vl() -> Qwen2VLModel:
    config = Qwen2VLConfig(
        text_config=_TEXT, vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
    )
    return Qwen2VLModel(config).eval()


def _qwen2_5_vl(tokens_per_second: int) -> Qwen2_5_VLModel:
    config = Qwen2_5_VLConfig(
        text_config=_TEXT,
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
            tokens_per_second=tokens_per_second,
        ),
    )
    return Qwen2_5_VLModel(config).eval()


@pytest.fixture(scope="module")
def qwen2_5_vl() -> Qwen2_5_VLModel:
    # tokens_per_second=2 as in the released Qwen2.5-VL checkpoints.
    return _qwen2_5_vl(2)


@pytest.fixture(scope="module")
def qwen2_5_vl_25() -> Qwen2_5_VLModel:
    # transformers' docstring example (25 tokens per second).
    return _qwen2_5_vl(25)


def mm_token_type_ids(ids: torch.Tensor) -> torch.Tensor:
    """What ProcessorMixin.create_mm_token_type_ids returns for Qwen2-VL: 1 image, 2 video."""
    types = torch.zeros_like(ids, dtype=torch.long)
    types[ids == IMAGE] = 1
    types[ids == VIDEO] = 2
    return types


def reference(model, ids, mask, image_grid, video_grid, seconds=None):
    kwargs = {} if seconds is None else {"second_per_grid_ts": seconds}

    def call(ids):
        with torch.no_grad():
            return model.get_rope_index(
                ids, mm_token_type_ids(ids), image_grid_thw=image_grid, video_grid_thw=video_grid,
                attention_mask=mask, **kwargs,
            )

    try:
        return call(ids)
    except RuntimeError as err:
        # transformers cannot scatter its int64 positions into an int32 output when there is an
        # attention_mask (without one it casts); the positions are those of int64 ids, cast.
        if ids.dtype != torch.int32 or "dtypes match" not in str(err):
            raise
        positions, deltas = call(ids.long())
        return positions.to(torch.int32), deltas


def assert_same(got, expected, *, torch_out: bool):
    positions, deltas = got
    ref_positions, ref_deltas = expected
    if torch_out:
        assert isinstance(positions, torch.Tensor) and isinstance(deltas, torch.Tensor)
        assert positions.device == ref_positions.device
        positions, deltas = positions.numpy(), deltas.numpy()
    else:
        assert isinstance(positions, np.ndarray) and isinstance(deltas, np.ndarray)
    assert positions.dtype == ref_positions.numpy().dtype
    assert deltas.dtype == np.int64 and ref_deltas.dtype == torch.int64
    np.testing.assert_array_equal(positions, ref_positions.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy())


# ----------------------------------------------------------------------------- random batches


@st.composite
def batches(draw, merge: int = 2, max_vision: int = 6):
    """A padded batch of 1..4 rows, each with 0..max_vision images / videos anywhere in random
    text (each wrapped in vision_start / vision_end as the chat template does). Returns
    ``(input_ids, attention_mask, image_grid_thw, video_grid_thw)`` as int64 NumPy arrays."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = draw(st.integers(1, 4))
    holes = draw(st.integers(0, 4)) == 0
    rows, images, videos = [], [], []
    for _ in range(batch):
        # At least one token: transformers fails on a row with no kept token.
        ids = list(rng.integers(0, 151000, draw(st.integers(1, 12))))
        for _ in range(draw(st.integers(0, max_vision))):
            video = draw(st.integers(0, 2)) == 0
            t = draw(st.integers(1, 4)) if video else 1
            # Also sides that merge does not divide: transformers floors them.
            h = draw(st.integers(merge, 6 * merge + 1))
            w = draw(st.integers(merge, 6 * merge + 1))
            (videos if video else images).append((t, h, w))
            ids += [VISION_START] + [VIDEO if video else IMAGE] * (t * (h // merge) * (w // merge)) + [VISION_END]
            ids += list(rng.integers(0, 151000, draw(st.integers(0, 12))))
        cells = []
        for token in ids:
            if holes and rng.random() < 0.1:
                # A masked-out token inside the sequence (transformers drops it before grouping),
                # sometimes with a vision id that would otherwise split or extend a block.
                cells.append((int(rng.choice([PAD, IMAGE, VIDEO])), 0))
            cells.append((int(token), 1))
        rows.append(cells)
    left = draw(st.booleans())
    seq = max(len(r) for r in rows) + draw(st.integers(0, 3))
    input_ids = np.full((batch, seq), PAD, dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for i, cells in enumerate(rows):
        span = slice(seq - len(cells), seq) if left else slice(0, len(cells))
        input_ids[i, span] = [c[0] for c in cells]
        mask[i, span] = [c[1] for c in cells]
    grids = lambda g: np.array(g, dtype=np.int64).reshape(-1, 3)  # noqa: E731
    return input_ids, mask, grids(images), grids(videos)


def _as(kind: str, array: np.ndarray, dtype=None):
    array = array if dtype is None else array.astype(dtype)
    return torch.from_numpy(np.ascontiguousarray(array)) if kind == "torch" else array


@settings(SLOW, max_examples=300)
@given(
    batch=batches(),
    container=st.sampled_from(["torch", "numpy"]),
    ids_dtype=st.sampled_from([np.int64, np.int32]),
    mask_dtype=st.sampled_from([np.int64, np.int32, np.bool_, np.float32, None]),
    grid_dtype=st.sampled_from([np.int64, np.int32]),
)
def test_qwen2_vl_random_batches(qwen2_vl, batch, container, ids_dtype, mask_dtype, grid_dtype):
    ids, mask, image_grid, video_grid = batch
    if mask_dtype is None:
        # No attention_mask: padding tokens count as text, as in transformers (masked tokens
        # inside a sequence would then be real image tokens: not such batches).
        assume(all(np.ptp(np.flatnonzero(row)) + 1 == row.sum() for row in mask))
        # Nor a masked-out vision id at a row's edge (it would be an image / video with no grid).
        assume(not np.isin(ids[mask == 0], [IMAGE, VIDEO]).any())
        mask = None
    expected = reference(
        qwen2_vl, torch.from_numpy(ids.astype(ids_dtype)), None if mask is None else torch.from_numpy(mask),
        torch.from_numpy(image_grid), torch.from_numpy(video_grid),
    )
    got = tvc_rs.mrope_position_ids(
        _as(container, ids, ids_dtype),
        _as(container, image_grid, grid_dtype),
        _as(container, video_grid, grid_dtype),
        None if mask is None else _as(container, mask, mask_dtype),
    )
    assert_same(got, expected, torch_out=container == "torch")


def _seconds(kind: str, values: list[float]):
    """second_per_grid_ts in the forms a caller can pass to transformers."""
    if kind == "torch_f32":  # what Qwen2.5-VL's processor returns
        return torch.tensor(values, dtype=torch.float32)
    if kind == "torch_f64":
        return torch.tensor(values, dtype=torch.float64)
    if kind == "torch_f16":
        return torch.tensor(values, dtype=torch.float16)
    if kind == "torch_bf16":
        return torch.tensor(values, dtype=torch.bfloat16)
    if kind == "torch_i64":
        return torch.tensor([round(v) for v in values], dtype=torch.int64)
    if kind == "list_float":
        return [float(v) for v in values]
    if kind == "list_mixed":
        return [int(round(v)) if i % 2 else float(v) for i, v in enumerate(values)]
    if kind == "numpy_f32":
        return np.array(values, dtype=np.float32)
    if kind == "numpy_f64":
        return np.array(values, dtype=np.float64)
    if kind == "numpy_f16":
        return np.array(values, dtype=np.float16)
    raise AssertionError(kind)


SECONDS_KINDS = [
    "none", "torch_f32", "torch_f64", "torch_f16", "torch_bf16", "torch_i64",
    "list_float", "list_mixed", "numpy_f32", "numpy_f64", "numpy_f16",
]


@settings(SLOW, max_examples=300)
@given(
    batch=batches(),
    seconds_kind=st.sampled_from(SECONDS_KINDS),
    data=st.data(),
    container=st.sampled_from(["torch", "numpy"]),
    ids_dtype=st.sampled_from([np.int64, np.int32]),
    tps25=st.booleans(),
)
def test_qwen2_5_vl_random_batches(qwen2_5_vl, qwen2_5_vl_25, batch, seconds_kind, data, container, ids_dtype, tps25):
    ids, mask, image_grid, video_grid = batch
    model = qwen2_5_vl_25 if tps25 else qwen2_5_vl
    n_videos = len(video_grid)
    values = data.draw(st.lists(st.floats(0.01, 5.0), min_size=n_videos, max_size=n_videos))
    seconds = None if seconds_kind == "none" else _seconds(seconds_kind, values)
    expected = reference(
        model, torch.from_numpy(ids.astype(ids_dtype)), torch.from_numpy(mask),
        torch.from_numpy(image_grid), torch.from_numpy(video_grid), seconds,
    )
    got = tvc_rs.mrope_position_ids(
        _as(container, ids, ids_dtype),
        _as(container, image_grid),
        _as(container, video_grid),
        _as(container, mask),
        second_per_grid_ts=seconds,
        config=model.config,
    )
    assert_same(got, expected, torch_out=container == "torch")


@pytest.mark.parametrize("seconds_kind", SECONDS_KINDS[1:])
@pytest.mark.parametrize("tps", [2, 25])
def test_qwen2_5_vl_time_rounding_edges(qwen2_5_vl, qwen2_5_vl_25, seconds_kind, tps):
    """Seconds of the form n / (tokens_per_second * d) and k / 100, over 12 frame groups: there
    i * interval lands on or next to an integer, and the dtype of the arithmetic (float32 for a
    float32 tensor or Python floats, float64, float16, ...) decides the truncated position."""
    model = qwen2_5_vl_25 if tps == 25 else qwen2_5_vl
    values = [n / (tps * d) for n in range(1, 41) for d in range(1, 8)] + [k / 100 for k in range(1, 500)]
    ids = [1]
    for _ in values:
        ids += [VISION_START] + [VIDEO] * 12 + [VISION_END, 2]  # 12 frame groups of one token
    ids = torch.tensor([ids])
    grids = torch.tensor([(12, 2, 2)] * len(values))
    seconds = _seconds(seconds_kind, values)
    expected = reference(model, ids, None, None, grids, seconds)
    got = tvc_rs.mrope_position_ids(ids, None, grids, second_per_grid_ts=seconds, config=model.config)
    assert_same(got, expected, torch_out=True)


@SLOW
@given(batch=batches(merge=1, max_vision=3), merge=st.sampled_from([1, 3]))
def test_other_spatial_merge_sizes(batch, merge):
    # A model with another spatial_merge_size; batches built for merge 1 are re-tokenised.
    config = Qwen2VLConfig(
        text_config=_TEXT,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, spatial_merge_size=merge),
    )
    if merge not in _MODELS:
        _MODELS[merge] = Qwen2VLModel(config).eval()
    model = _MODELS[merge]
    ids, mask, image_grid, video_grid = batch
    # Grids of merge 1 scaled so that their token counts hold for `merge`.
    image_grid = image_grid * np.array([1, merge, merge])
    video_grid = video_grid * np.array([1, merge, merge])
    expected = reference(model, torch.from_numpy(ids), torch.from_numpy(mask),
                         torch.from_numpy(image_grid), torch.from_numpy(video_grid))
    got = tvc_rs.mrope_position_ids(ids, image_grid, video_grid, mask, config=model.config)
    assert_same(got, expected, torch_out=False)
    got = tvc_rs.mrope_position_ids(ids, image_grid, video_grid, mask, spatial_merge_size=merge)
    assert_same(got, expected, torch_out=False)


_MODELS: dict = {}


def test_config_dict_and_explicit_settings_agree(qwen2_5_vl):
    ids = np.array([[1, VISION_START] + [VIDEO] * 8 + [VISION_END, 2, IMAGE, IMAGE, 3]])
    image_grid, video_grid = np.array([[1, 2, 4]]), np.array([[2, 4, 4]])
    seconds = torch.tensor([1.0])
    expected = reference(qwen2_5_vl, torch.from_numpy(ids), None, torch.from_numpy(image_grid),
                         torch.from_numpy(video_grid), seconds)
    for kwargs in (
        {"config": qwen2_5_vl.config},
        {"config": qwen2_5_vl.config.to_dict()},
        {"model_type": "qwen2_5_vl", "tokens_per_second": 2},
        {"config": Qwen2VLConfig(), "model_type": "qwen2_5_vl", "tokens_per_second": 2},
    ):
        got = tvc_rs.mrope_position_ids(ids, image_grid, video_grid, second_per_grid_ts=seconds, **kwargs)
        assert_same(got, expected, torch_out=False)
    # Default model type is Qwen2-VL (videos spaced by 1): different here.
    got = tvc_rs.mrope_position_ids(ids, image_grid, video_grid)
    assert not np.array_equal(got[0], expected[0].numpy())


def test_explicit_mm_token_type_ids(qwen2_vl):
    # mm_token_type_ids decides the kinds: here a non-default image token id.
    ids = torch.tensor([[5, 6, 777, 777, 777, 777, 8, 9, 777, 10]])
    types = (ids == 777).long()
    grids = torch.tensor([[1, 4, 4], [1, 2, 2]])
    with torch.no_grad():
        expected = qwen2_vl.get_rope_index(ids, types, image_grid_thw=grids)
    assert_same(tvc_rs.mrope_position_ids(ids, grids, mm_token_type_ids=types), expected, torch_out=True)
    assert_same(tvc_rs.mrope_position_ids(ids, grids, image_token_id=777), expected, torch_out=True)


def test_text_only_and_lists(qwen2_vl):
    ids = torch.randint(0, 1000, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, 7:] = 0
    expected = reference(qwen2_vl, ids, mask, None, None)
    assert_same(tvc_rs.mrope_position_ids(ids, attention_mask=mask), expected, torch_out=True)
    # Plain nested lists are accepted and give NumPy arrays.
    got = tvc_rs.mrope_position_ids(ids.tolist(), [], [], mask.tolist())
    assert_same(got, expected, torch_out=False)


def test_inputs_are_not_modified(qwen2_vl):
    ids = np.array([[PAD, 1, IMAGE, IMAGE, IMAGE, IMAGE, 2]], dtype=np.int32)
    mask = np.array([[0, 1, 1, 1, 1, 1, 1]])
    grid = np.array([[1, 4, 4]])
    copies = [a.copy() for a in (ids, mask, grid)]
    tvc_rs.mrope_position_ids(ids, grid, None, mask)
    with pytest.raises(ValueError):
        tvc_rs.mrope_position_ids(ids, np.array([[1, 4, 6]]), None, mask)
    for a, b in zip((ids, mask, grid), copies):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_inputs(qwen2_vl):
    ids = torch.tensor([[1, IMAGE, IMAGE, IMAGE, IMAGE, 2], [3, 4, 5, 6, 7, 8]]).t().contiguous().t()
    assert not ids.is_contiguous()
    grid = torch.tensor([[1, 4, 4]])
    assert_same(tvc_rs.mrope_position_ids(ids, grid), reference(qwen2_vl, ids, None, grid, None), torch_out=True)


def test_real_processor_batch_with_image_inside_the_answer(qwen2_vl):
    """End to end: the real Qwen2-VL processor (tokenizer + image processor from the assets) on a
    chat whose assistant answer re-inserts the image (DVR / PVC), padded left and right."""
    from PIL import Image
    from transformers import AutoProcessor

    folder = asset("qwen2-vl")
    image = Image.open(asset("images/tvc_case1_clevr.jpg"))
    other = Image.open(sorted(asset("images/mathv").glob("*.jpg"))[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = AutoProcessor.from_pretrained(folder)
    assert tvc_rs.image_processor_settings(processor) == tvc_rs.image_processor_settings(folder)
    texts = [
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many objects are left?<|im_end|>\n"
        "<|im_start|>assistant\nThere are 7. Wait, let me double-check the image. "
        "<|vision_start|><|image_pad|><|vision_end|> To be precise, 6.<|im_end|>",
        "<|im_start|>user\nWhat is shown?<|vision_start|><|image_pad|><|vision_end|><|im_end|>",
    ]
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        batch = processor(text=texts, images=[image, image, other], return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = qwen2_vl.get_rope_index(
                batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                attention_mask=batch["attention_mask"],
            )
        got = tvc_rs.mrope_position_ids(
            batch["input_ids"], batch["image_grid_thw"], attention_mask=batch["attention_mask"],
            config=qwen2_vl.config,
        )
        assert_same(got, expected, torch_out=True)
        got = tvc_rs.mrope_position_ids(
            batch["input_ids"], batch["image_grid_thw"], attention_mask=batch["attention_mask"],
            mm_token_type_ids=batch["mm_token_type_ids"],
        )
        assert_same(got, expected, torch_out=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_come_back_on_their_device(qwen2_vl):
    ids = torch.tensor([[1, IMAGE, IMAGE, IMAGE, IMAGE, 2]], device="cuda")
    grid = torch.tensor([[1, 4, 4]], device="cuda")
    positions, deltas = tvc_rs.mrope_position_ids(ids, grid)
    assert positions.device == ids.device and deltas.device == ids.device
    expected = reference(qwen2_vl, ids.cpu(), None, grid.cpu(), None)
    assert torch.equal(positions.cpu(), expected[0]) and torch.equal(deltas.cpu(), expected[1])


# ----------------------------------------------------------------------------- bad input

IDS = np.array([[1, IMAGE, IMAGE, IMAGE, IMAGE, 2, VIDEO, VIDEO, 3]])
GRID = np.array([[1, 4, 4]])
VGRID = np.array([[2, 2, 2]])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"input_ids": IDS[0]}, ValueError, re.escape("input_ids must have shape (batch, seq), got shape (9,)")),
        ({"input_ids": IDS[None]}, ValueError, re.escape("input_ids must have shape (batch, seq)")),
        ({"input_ids": IDS.astype(np.float32)}, TypeError, re.escape("input_ids: expected dtype int32 or int64, got float32")),
        ({"input_ids": IDS.astype(np.int16)}, TypeError, re.escape("input_ids: expected dtype int32 or int64, got int16")),
        ({"attention_mask": np.ones((1, 8))}, ValueError, re.escape("attention_mask must have the shape of input_ids (1, 9)")),
        ({"attention_mask": np.ones((2, 9))}, ValueError, re.escape("attention_mask must have the shape")),
        ({"attention_mask": np.full((1, 9), "x")}, ValueError, re.escape("attention_mask: cannot be read through DLPack")),
        ({"mm_token_type_ids": np.zeros((1, 3), dtype=int)}, ValueError, re.escape("mm_token_type_ids must have the shape")),
        ({"mm_token_type_ids": np.full((1, 9), 3)}, ValueError, re.escape("mm_token_type_ids[0, 0] = 3")),
        ({"mm_token_type_ids": np.zeros((1, 9))}, TypeError, re.escape("mm_token_type_ids: expected an integer dtype (int32, int64 or another int/uint), got float64")),
        ({"image_grid_thw": None}, ValueError, re.escape("image_grid_thw is None but the sequences hold 1 image block")),
        ({"image_grid_thw": np.zeros((0, 3), dtype=int)}, ValueError, re.escape("image_grid_thw has 0 row(s)")),
        ({"image_grid_thw": np.array([[1, 4, 4], [1, 2, 2]])}, ValueError, re.escape("image_grid_thw has 2 row(s) but the sequences hold 1")),
        ({"image_grid_thw": np.array([[1, 4, 6]])}, ValueError, re.escape("image block 0 ") + ".*" + re.escape(" has 4 tokens but image_grid_thw[0] = (1, 4, 6) needs")),
        ({"image_grid_thw": np.array([[1, 4, 0]])}, ValueError, re.escape("image_grid_thw[0] = (1, 4, 0): every grid dimension must be >= 1")),
        ({"image_grid_thw": np.array([[1, -4, 4]])}, ValueError, re.escape("image_grid_thw[0] = (1, -4, 4)")),
        ({"image_grid_thw": np.array([1, 4, 4])}, ValueError, re.escape("image_grid_thw: expected a 2-D tensor (num_images, 3) of (t, h, w), got shape (3,)")),
        ({"image_grid_thw": np.array([[1, 4]])}, ValueError, re.escape("image_grid_thw: expected shape (num_images, 3) of (t, h, w), got (1, 2)")),
        ({"image_grid_thw": np.array([[1.0, 4.0, 4.0]])}, TypeError, re.escape("image_grid_thw: expected an integer dtype")),
        ({"video_grid_thw": None}, ValueError, re.escape("video_grid_thw is None but the sequences hold 1 video block")),
        ({"video_grid_thw": np.array([[2, 2, 2], [1, 2, 2]])}, ValueError, re.escape("video_grid_thw has 2 row(s)")),
        ({"video_grid_thw": np.array([[1, 2, 2]])}, ValueError, re.escape("video block 0 ") + ".*" + re.escape(" has 2 tokens but video_grid_thw[0]")),
        ({"video_grid_thw": np.array([[0, 2, 2]])}, ValueError, re.escape("video_grid_thw[0] = (0, 2, 2)")),
        ({"video_grid_thw": np.array([[[2, 2, 2]]])}, ValueError, re.escape("video_grid_thw: expected a 2-D tensor (num_videos, 3) of (t, h, w), got shape (1, 1, 3)")),
        ({"second_per_grid_ts": [0.5]}, ValueError, re.escape("second_per_grid_ts is only used by model_type='qwen2_5_vl'")),
        ({"second_per_grid_ts": [0.5, 1.0], "model_type": "qwen2_5_vl"}, ValueError, re.escape("second_per_grid_ts has 2 value(s) but video_grid_thw has 1 row")),
        ({"second_per_grid_ts": [], "model_type": "qwen2_5_vl"}, ValueError, re.escape("second_per_grid_ts has 0 value(s)")),
        ({"second_per_grid_ts": np.ones((1, 1)), "model_type": "qwen2_5_vl"}, ValueError, re.escape("second_per_grid_ts must be 1-D")),
        ({"second_per_grid_ts": torch.ones((1, 1)), "model_type": "qwen2_5_vl"}, ValueError, re.escape("second_per_grid_ts must be 1-D")),
        ({"second_per_grid_ts": ["a"], "model_type": "qwen2_5_vl"}, TypeError, re.escape("second_per_grid_ts[0] must be a number")),
        ({"second_per_grid_ts": [float("nan")], "model_type": "qwen2_5_vl"}, ValueError, re.escape("second_per_grid_ts[0]: second_per_grid_ts must be finite")),
        ({"second_per_grid_ts": 3, "model_type": "qwen2_5_vl"}, TypeError, re.escape("second_per_grid_ts must be a tensor")),
        ({"model_type": "llava"}, ValueError, re.escape("model_type must be one of 'qwen2_vl', 'qwen2_5_vl', 'qwen3_vl',")),
        ({"spatial_merge_size": 0}, ValueError, re.escape("spatial_merge_size must be >= 1, got 0")),
        ({"tokens_per_second": "2", "model_type": "qwen2_5_vl"}, TypeError, re.escape("tokens_per_second must be an int or a float")),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"input_ids": IDS, "image_grid_thw": GRID, "video_grid_thw": VGRID, **kwargs}
    with pytest.raises(error, match=match):
        tvc_rs.mrope_position_ids(**args)


def test_native_reads_masks_of_any_dtype_and_strided_arrays():
    """The native call reads its arrays through DLPack: a mask of any numeric dtype means
    non-zero = kept (as ``tensor.bool()``), and strided views read as their contiguous copies."""
    native = tvc_rs._native.mrope_position_ids
    keep = np.ones((1, 9), bool)
    keep[0, 0] = False  # the leading text token is padding
    expected, expected_deltas = native(IDS, GRID, VGRID, keep)
    unmasked, _ = native(IDS, GRID, VGRID)
    assert not np.array_equal(expected, unmasked)  # the mask is read
    for dtype in [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64]:
        mask = keep.astype(dtype) * 3  # any non-zero value keeps
        positions, deltas = native(IDS, GRID, VGRID, mask)
        assert np.array_equal(positions, expected) and np.array_equal(deltas, expected_deltas), dtype
    nan_mask = np.where(keep, np.nan, 0.0)  # NaN is non-zero
    assert np.array_equal(native(IDS, GRID, VGRID, nan_mask)[0], expected)
    torch_mask = torch.from_numpy(keep).to(torch.bfloat16)
    assert np.array_equal(native(IDS, GRID, VGRID, torch_mask)[0], expected)
    for dtype in [np.int32, np.int64]:
        strided_ids = np.repeat(IDS.astype(dtype), 2, axis=1)[:, ::2]
        strided_grid = np.asfortranarray(np.repeat(GRID, 2, axis=0))[::2]
        strided_mask = np.repeat(keep, 2, axis=1)[:, ::2]
        assert not strided_ids.flags.c_contiguous
        positions, deltas = native(strided_ids, strided_grid, VGRID, strided_mask)
        assert positions.dtype == dtype
        assert np.array_equal(positions, expected) and np.array_equal(deltas, expected_deltas)


def test_bad_input_with_torch_tensors():
    with pytest.raises(TypeError, match=re.escape("input_ids")):
        tvc_rs.mrope_position_ids(torch.from_numpy(IDS).to(torch.bfloat16), GRID, VGRID)
    with pytest.raises(ValueError, match=re.escape("image_grid_thw")):
        tvc_rs.mrope_position_ids(torch.from_numpy(IDS), torch.tensor([[1, 4, 2]]), torch.from_numpy(VGRID))


def test_the_good_call_of_the_bad_input_table_works():
    positions, deltas = tvc_rs.mrope_position_ids(IDS, GRID, VGRID)
    assert positions.shape == (3, 1, 9) and deltas.shape == (1, 1)


# ----------------------------------------------------------------------------- image sizes


def _preprocessor_config() -> dict:
    path = ASSETS / "qwen2-vl" / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _processors(**overrides):
    config = {**_preprocessor_config(), **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [fast_module.Qwen2VLImageProcessor(**config), slow_module.Qwen2VLImageProcessorPil(**config)]


def _processor_grids(processor, images) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return processor(images=images, return_tensors="np")["image_grid_thw"].tolist()


def test_defaults_equal_the_processor_and_the_asset_config():
    config = json.loads(asset("qwen2-vl/preprocessor_config.json").read_text())
    defaults = tvc_rs.image_processor_settings(fast_module.Qwen2VLImageProcessor())
    assert defaults == {"patch_size": 14, "merge_size": 2, "min_pixels": 3136, "max_pixels": 1003520, "rule": "qwen2_vl",
                        "temporal_patch_size": 2}
    assert tvc_rs.image_processor_settings(config) == defaults
    import inspect

    for fn in (tvc_rs.image_grid_thw, tvc_rs.image_token_count):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in defaults} == defaults
    params = inspect.signature(tvc_rs.smart_resize).parameters
    assert params["factor"].default == 28
    assert params["min_pixels"].default == config["min_pixels"]
    assert params["max_pixels"].default == config["max_pixels"]


SETTINGS = [
    {},  # Qwen2-VL's preprocessor_config.json
    {"min_pixels": 3136, "max_pixels": 12845056},  # Qwen2.5-VL's
    {"min_pixels": 256 * 28 * 28, "max_pixels": 512 * 28 * 28},  # a typical custom range
    {"min_pixels": 100, "max_pixels": 30000},
]


@pytest.mark.parametrize("overrides", SETTINGS)
def test_every_real_image(overrides):
    from PIL import Image

    folder = asset("images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    assert len(paths) > 50
    images = [Image.open(p) for p in paths]
    for processor in _processors(**overrides):
        settings_ = tvc_rs.image_processor_settings(processor)
        expected = _processor_grids(processor, images)
        for image, grid in zip(images, expected):
            width, height = image.size
            assert list(tvc_rs.image_grid_thw(height, width, **settings_)) == grid
            assert tvc_rs.image_token_count(height, width, **settings_) == grid[1] * grid[2] // 4
            factor = 28
            assert tvc_rs.smart_resize(
                height, width, factor=factor, min_pixels=settings_["min_pixels"], max_pixels=settings_["max_pixels"]
            ) == (grid[1] * 14, grid[2] * 14)


sizes = st.integers(1, 6000)


@settings(max_examples=400, deadline=None)
@given(
    height=sizes, width=sizes, patch_size=st.sampled_from([14, 16, 7]), merge_size=st.sampled_from([1, 2, 3]),
    min_pixels=st.integers(1, 200_000), extra=st.integers(0, 20_000_000),
)
def test_random_sizes_against_smart_resize_and_patch_count(height, width, patch_size, merge_size, min_pixels, extra):
    max_pixels = min_pixels + extra
    factor = patch_size * merge_size
    processor = fast_module.Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels,
                                                  patch_size=patch_size, merge_size=merge_size)
    try:
        expected = fast_module.smart_resize(height, width, factor, min_pixels, max_pixels)
    except ValueError:
        for fn in (
            lambda: tvc_rs.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels),
            lambda: tvc_rs.image_token_count(height, width, **tvc_rs.image_processor_settings(processor)),
        ):
            with pytest.raises(ValueError, match=re.escape("aspect ratio")):
                fn()
        return
    assert slow_module.smart_resize(height, width, factor, min_pixels, max_pixels) == expected
    assert tvc_rs.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels) == expected
    settings_ = tvc_rs.image_processor_settings(processor)
    assert settings_ == dict(patch_size=patch_size, merge_size=merge_size, min_pixels=min_pixels, max_pixels=max_pixels,
                             rule="qwen2_vl", temporal_patch_size=2)
    patches = processor.get_number_of_image_patches(height, width, {})
    assert tvc_rs.image_token_count(height, width, **settings_) == patches // merge_size**2
    t, gh, gw = tvc_rs.image_grid_thw(height, width, **settings_)
    assert (t, gh * gw) == (1, patches)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=st.integers(1, 1200), width=st.integers(1, 1200),
    min_pixels=st.integers(1, 100_000), extra=st.integers(0, 2_000_000),
)
def test_random_sizes_against_the_full_processors(height, width, min_pixels, extra):
    from PIL import Image

    assume(max(height, width) / min(height, width) <= 200)
    image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    size = {"shortest_edge": min_pixels, "longest_edge": min_pixels + extra}
    for processor in _processors(size=size, min_pixels=None, max_pixels=None):
        settings_ = tvc_rs.image_processor_settings(processor)
        assert (settings_["min_pixels"], settings_["max_pixels"]) == (min_pixels, min_pixels + extra)
        [grid] = _processor_grids(processor, [image])
        assert list(tvc_rs.image_grid_thw(height, width, **settings_)) == grid


def test_aspect_ratio_above_200_fails_like_the_processor():
    from PIL import Image

    image = Image.fromarray(np.zeros((1, 201, 3), dtype=np.uint8))
    for processor in _processors():
        with pytest.raises(ValueError, match=re.escape("aspect ratio")):
            _processor_grids(processor, [image])
    with pytest.raises(ValueError, match=re.escape("aspect ratio must be at most 200")):
        tvc_rs.image_grid_thw(1, 201)
    assert tvc_rs.image_grid_thw(1, 200) == (1, 2, 58)


@pytest.mark.parametrize("fn", [tvc_rs.smart_resize, tvc_rs.image_grid_thw, tvc_rs.image_token_count])
@pytest.mark.parametrize("height, width, name", [(0, 10, "height"), (10, 0, "width"), (-3, 10, "height"), (10, -1, "width")])
def test_non_positive_sizes(fn, height, width, name):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be >= 1, got {min(height, width)}")):
        fn(height, width)


@pytest.mark.parametrize(
    "fn, kwargs, name",
    [
        (tvc_rs.smart_resize, {"factor": 0}, "factor"),
        (tvc_rs.smart_resize, {"min_pixels": 0}, "min_pixels"),
        (tvc_rs.smart_resize, {"max_pixels": -1}, "max_pixels"),
        (tvc_rs.image_grid_thw, {"patch_size": 0}, "patch_size"),
        (tvc_rs.image_token_count, {"merge_size": -2}, "merge_size"),
        (tvc_rs.image_token_count, {"min_pixels": 0}, "min_pixels"),
    ],
)
def test_non_positive_settings(fn, kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be >= 1")):
        fn(100, 100, **kwargs)


def test_sizes_must_be_integers():
    with pytest.raises(TypeError):
        tvc_rs.image_token_count(100.5, 100)


def test_image_processor_settings_sources(tmp_path: Path):
    folder = asset("qwen2-vl")
    expected = {"patch_size": 14, "merge_size": 2, "min_pixels": 3136, "max_pixels": 1003520, "rule": "qwen2_vl",
                "temporal_patch_size": 2}
    assert tvc_rs.image_processor_settings(folder) == expected
    assert tvc_rs.image_processor_settings(folder / "preprocessor_config.json") == expected
    q25 = json.loads(asset("qwen2.5-vl/preprocessor_config.json").read_text())
    assert tvc_rs.image_processor_settings(q25)["max_pixels"] == 12845056
    # As the constructor: top-level min/max_pixels win over size.
    custom = {"size": {"shortest_edge": 10, "longest_edge": 20}, "max_pixels": 99}
    assert tvc_rs.image_processor_settings(custom)["max_pixels"] == 99
    assert tvc_rs.image_processor_settings(custom)["min_pixels"] == 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = fast_module.Qwen2VLImageProcessor(**custom)
    assert tvc_rs.image_processor_settings(processor) == tvc_rs.image_processor_settings(custom)
    with pytest.raises(ValueError, match=re.escape("shortest_edge")):
        tvc_rs.image_processor_settings({"size": {"min_pixels": 10, "max_pixels": 20}})
    with pytest.raises(TypeError, match=re.escape("source must be")):
        tvc_rs.image_processor_settings(object())


# ------------------------------------------------------------------ GLM-4.1V's resize rule


@settings(max_examples=400, deadline=None)
@given(
    height=sizes, width=sizes, patch_size=st.sampled_from([14, 16]), temporal=st.sampled_from([1, 2, 3]),
    min_pixels=st.integers(1, 200_000), extra=st.integers(0, 20_000_000),
)
def test_glm4v_random_sizes_against_its_smart_resize(height, width, patch_size, temporal, min_pixels, extra):
    """GLM-4.1V's own rule (an image counted as temporal_patch_size frames, thin images scaled
    up first): transformers' ``glm4v`` smart_resize as its image processor calls it."""
    from transformers.models.glm4v import image_processing_glm4v as glm

    max_pixels, factor = min_pixels + extra, patch_size * 2
    kwargs = dict(factor=factor, min_pixels=min_pixels, max_pixels=max_pixels, rule="glm4v", temporal_patch_size=temporal)
    try:
        expected = glm.smart_resize(num_frames=temporal, height=height, width=width, temporal_factor=temporal,
                                    factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError:
        with pytest.raises(ValueError, match=re.escape("aspect ratio")):
            tvc_rs.smart_resize(height, width, **kwargs)
        return
    assert tvc_rs.smart_resize(height, width, **kwargs) == expected
    grid = tvc_rs.image_grid_thw(height, width, patch_size=patch_size, merge_size=2, min_pixels=min_pixels,
                                 max_pixels=max_pixels, rule="glm4v", temporal_patch_size=temporal)
    assert grid == (1, expected[0] // patch_size, expected[1] // patch_size)


def test_glm4v_every_real_image_and_its_saved_processor(tmp_path: Path):
    """The grids of GLM-4.1V's image processor on every real image, from the settings read off
    the processor, and off the folder transformers 5 saves it to (processor_config.json)."""
    from PIL import Image
    from tiny_models import family_processor

    processor = family_processor("glm4v", ASSETS)
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    settings_ = tvc_rs.image_processor_settings(processor)
    assert settings_["rule"] == "glm4v" and settings_["temporal_patch_size"] == 2
    assert tvc_rs.image_processor_settings(tmp_path) == settings_
    paths = sorted(p for p in asset("images").rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    images = [Image.open(p).convert("RGB") for p in paths] + [Image.new("RGB", (20, 300)), Image.new("RGB", (9, 9))]
    grids = processor.image_processor(images=images, return_tensors="np")["image_grid_thw"].tolist()
    for image, grid in zip(images, grids):
        width, height = image.size
        assert list(tvc_rs.image_grid_thw(height, width, **settings_)) == grid, image.size
        assert tvc_rs.image_token_count(height, width, **settings_) == grid[1] * grid[2] // 4
    # Qwen3-VL's processor keeps Qwen2-VL's rule (patch 16)
    qwen3 = tvc_rs.image_processor_settings(family_processor("qwen3_vl", ASSETS))
    assert (qwen3["rule"], qwen3["patch_size"]) == ("qwen2_vl", 16)


def test_resize_rule_errors():
    with pytest.raises(ValueError, match=re.escape('rule must be "qwen2_vl"')):
        tvc_rs.smart_resize(100, 100, rule="glm5")
    with pytest.raises(ValueError, match=re.escape("temporal_patch_size must be >= 1")):
        tvc_rs.image_grid_thw(100, 100, rule="glm4v", temporal_patch_size=0)
    with pytest.raises(TypeError, match="rule"):
        tvc_rs.image_token_count(100, 100, rule=2)
