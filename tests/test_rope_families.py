"""tvc_rs.mrope_position_ids for Qwen3-VL (dense, MoE), GLM-4.1V (dense, MoE) and Qwen3.5 (dense,
MoE) against each model's own get_rope_index (tiny models with random weights built from
transformers' config classes), on random padded batches with several images and videos (one
vision block per frame, text timestamps between frames, as their processors write them)."""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tvc_rs

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Glm4vConfig,
    Glm4vMoeConfig,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
)
from transformers.models.glm4v.modeling_glm4v import Glm4vModel  # noqa: E402
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor  # noqa: E402
from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeModel  # noqa: E402
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model  # noqa: E402
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeModel  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel  # noqa: E402
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeModel  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
_MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16)
_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)

# model type -> (config class, model class, text config overrides, vision config overrides)
FAMILIES = {
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLModel, {"head_dim": 16}, {"deepstack_visual_indexes": []}),
    "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLMoeModel, {"head_dim": 16, **_MOE}, {"deepstack_visual_indexes": []}),
    "glm4v": (Glm4vConfig, Glm4vModel, {}, {}),
    "glm4v_moe": (Glm4vMoeConfig, Glm4vMoeModel, {"n_routed_experts": 2, "num_experts_per_tok": 1,
                                                  "moe_intermediate_size": 16, "first_k_dense_replace": 1}, {}),
    "qwen3_5": (Qwen3_5Config, Qwen3_5Model, {"head_dim": 16, "layer_types": ["full_attention"]}, {}),
    "qwen3_5_moe": (Qwen3_5MoeConfig, Qwen3_5MoeModel, {"head_dim": 16, "layer_types": ["full_attention"], **_MOE}, {}),
}


def _build(model_type: str, merge: int = 2):
    config_cls, model_cls, text, vision = FAMILIES[model_type]
    config = config_cls(
        text_config={**_TEXT, **text},
        vision_config={**_VISION, **vision, "spatial_merge_size": merge},
    )
    assert config.model_type == model_type
    return model_cls(config).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    return _build(request.param)


def _is_glm(config) -> bool:
    return config.model_type.startswith("glm4v")


def mm_token_type_ids(config, ids: torch.Tensor) -> torch.Tensor:
    """What the family's processor returns as mm_token_type_ids (its own function)."""
    rows = ids.tolist()
    if _is_glm(config):
        processor = SimpleNamespace(
            image_token_id=config.image_token_id,
            video_start_id=config.video_start_token_id,
            video_end_id=config.video_end_token_id,
        )
        types = Glm4vProcessor.create_mm_token_type_ids(processor, rows)
    else:
        processor = SimpleNamespace(
            image_token_ids=[config.image_token_id], video_token_ids=[config.video_token_id], audio_token_ids=[]
        )
        types = ProcessorMixin.create_mm_token_type_ids(processor, rows)
    return torch.tensor(types, dtype=torch.long)


def reference(model, ids, mask, image_grid, video_grid):
    with torch.no_grad():
        return model.get_rope_index(
            ids, mm_token_type_ids(model.config, ids), image_grid_thw=image_grid, video_grid_thw=video_grid,
            attention_mask=mask,
        )


def _markers(config):
    """(text ids, pad, image open / close, frame open / close, video open / close) of a family."""
    if _is_glm(config):
        return dict(
            image_open=config.image_start_token_id, image_close=config.image_end_token_id,
            video_open=[config.video_start_token_id], video_close=[config.video_end_token_id],
            frame_token=config.image_token_id,
        )
    return dict(
        image_open=config.vision_start_token_id, image_close=config.vision_end_token_id,
        video_open=[], video_close=[], frame_token=config.video_token_id,
    )


@st.composite
def batches(draw, config, max_vision: int = 5):
    """A padded batch of 1..4 rows with 0..max_vision images / videos in random text, laid out as
    the family's processor writes them: an image is ``open, image * n, close``; a video of t
    frames is, per frame, a timestamp (text) then ``open, frame_token * n, close`` (GLM: the whole
    video inside ``<|begin_of_video|> ... <|end_of_video|>``, its frames with the image token).
    Returns ``(input_ids, attention_mask, image_grid_thw, video_grid_thw)`` int64 arrays."""
    merge = config.vision_config.spatial_merge_size
    m = _markers(config)
    pad = 0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    text = lambda n: [int(x) for x in rng.integers(1, 150000, n)]  # noqa: E731
    batch = draw(st.integers(1, 4))
    holes = draw(st.integers(0, 4)) == 0
    rows, images, videos = [], [], []
    for _ in range(batch):
        ids = text(draw(st.integers(1, 10)))
        for _ in range(draw(st.integers(0, max_vision))):
            video = draw(st.integers(0, 1)) == 0
            t = draw(st.integers(1, 4)) if video else 1
            # Also sides that merge does not divide: get_rope_index floors them.
            h = draw(st.integers(merge, 4 * merge + 1))
            w = draw(st.integers(merge, 4 * merge + 1))
            n = (h // merge) * (w // merge)
            if video:
                videos.append((t, h, w))
                ids += m["video_open"]
                for _ in range(t):
                    ids += text(draw(st.integers(1, 3)))  # the frame's timestamp
                    ids += [m["image_open"]] + [m["frame_token"]] * n + [m["image_close"]]
                ids += m["video_close"]
            else:
                images.append((1, h, w))
                ids += [m["image_open"]] + [config.image_token_id] * n + [m["image_close"]]
            ids += text(draw(st.integers(0, 8)))
        cells = []
        for token in ids:
            if holes and rng.random() < 0.1:
                # A masked-out token inside the sequence (dropped before grouping).
                cells.append((pad, 0))
            cells.append((int(token), 1))
        rows.append(cells)
    left = draw(st.booleans())
    seq = max(len(r) for r in rows) + draw(st.integers(0, 3))
    input_ids = np.full((batch, seq), pad, dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for i, cells in enumerate(rows):
        span = slice(seq - len(cells), seq) if left else slice(0, len(cells))
        input_ids[i, span] = [c[0] for c in cells]
        mask[i, span] = [c[1] for c in cells]
    grids = lambda g: np.array(g, dtype=np.int64).reshape(-1, 3)  # noqa: E731
    return input_ids, mask, grids(images), grids(videos)


def assert_same(got, expected):
    positions, deltas = got
    ref_positions, ref_deltas = expected
    assert isinstance(positions, torch.Tensor) and positions.dtype == ref_positions.dtype
    np.testing.assert_array_equal(positions.numpy(), ref_positions.numpy())
    np.testing.assert_array_equal(deltas.numpy(), ref_deltas.numpy())


@settings(SLOW, max_examples=60)
@given(data=st.data(), with_types=st.booleans(), with_mask=st.booleans())
def test_random_batches_equal_get_rope_index(model, data, with_types, with_mask):
    config = model.config
    ids, mask, image_grid, video_grid = data.draw(batches(config))
    if not with_mask and all(np.ptp(np.flatnonzero(row)) + 1 == row.sum() for row in mask):
        mask = None  # padding then counts as text, as in transformers
    ids_t = torch.from_numpy(ids)
    mask_t = None if mask is None else torch.from_numpy(mask)
    expected = reference(model, ids_t, mask_t, torch.from_numpy(image_grid), torch.from_numpy(video_grid))
    got = tvc_rs.mrope_position_ids(
        ids_t, torch.from_numpy(image_grid), torch.from_numpy(video_grid), mask_t,
        config=config,
        # Kinds from the processor's mm_token_type_ids, or from the ids and the config's settings.
        mm_token_type_ids=mm_token_type_ids(config, ids_t) if with_types else None,
    )
    assert_same(got, expected)


@pytest.mark.parametrize("model_type", ["qwen3_vl", "glm4v", "qwen3_5"])
@pytest.mark.parametrize("merge", [1, 3])
@settings(SLOW, max_examples=15)
@given(data=st.data())
def test_other_merge_sizes_from_the_config(model_type, merge, data):
    """spatial_merge_size is read from vision_config (here of a config dict)."""
    model = _cached(model_type, merge)
    ids, mask, image_grid, video_grid = data.draw(batches(model.config, max_vision=3))
    expected = reference(model, torch.from_numpy(ids), torch.from_numpy(mask),
                         torch.from_numpy(image_grid), torch.from_numpy(video_grid))
    got = tvc_rs.mrope_position_ids(torch.from_numpy(ids), image_grid, video_grid, torch.from_numpy(mask),
                                    config=model.config.to_dict())
    assert_same(got, expected)


@functools.cache
def _cached(model_type: str, merge: int):
    return _build(model_type, merge)


def test_qwen3_vl_video_frames_are_blocks():
    """A hand-written Qwen3-VL sequence: a video of 2 frames (timestamps between) then an
    image; the video's row (2, 4, 4) is two blocks of (1, 4, 4): each restarts h / w and
    advances by 2, with temporal position equal to the block start."""
    model = _build("qwen3_vl")
    c = model.config
    s, e, v, i = c.vision_start_token_id, c.vision_end_token_id, c.video_token_id, c.image_token_id
    ids = [7, 8, s, *[v] * 4, e, 9, s, *[v] * 4, e, 10, s, *[i] * 4, e]
    ids_t = torch.tensor([ids])
    video, image = torch.tensor([[2, 4, 4]]), torch.tensor([[1, 4, 4]])
    positions, _ = tvc_rs.mrope_position_ids(ids_t, image, video, config=c)
    expected, _ = reference(model, ids_t, None, image, video)
    np.testing.assert_array_equal(positions.numpy(), expected.numpy())
    # First frame's tokens at columns 3..6: t = 3, h = 3 + (0, 0, 1, 1), w = 3 + (0, 1, 0, 1).
    np.testing.assert_array_equal(positions[:, 0, 3:7].numpy(), [[3] * 4, [3, 3, 4, 4], [3, 4, 3, 4]])
    # The second frame starts after the first (advance 2), its timestamp and vision_start.
    np.testing.assert_array_equal(positions[:, 0, 10:14].numpy(), [[8] * 4, [8, 8, 9, 9], [8, 9, 8, 9]])


def test_glm4v_frames_use_the_image_token_inside_video_markers():
    """GLM-4.1V: the same image-token run is an image outside <|begin_of_video|> ... <|end_of_video|>
    and a video frame inside; without the markers' ids the kinds cannot be told apart."""
    model = _build("glm4v")
    c = model.config
    bi, ei, im = c.image_start_token_id, c.image_end_token_id, c.image_token_id
    bv, ev = c.video_start_token_id, c.video_end_token_id
    ids = [5, bi, *[im] * 4, ei, 6, bv, 1, bi, *[im] * 4, ei, 2, bi, *[im] * 4, ei, ev, 7]
    ids_t = torch.tensor([ids])
    image, video = torch.tensor([[1, 4, 4]]), torch.tensor([[2, 4, 4]])
    got = tvc_rs.mrope_position_ids(ids_t, image, video, config=c)
    assert_same(got, reference(model, ids_t, None, image, video))
    # As keywords, without the config (Glm4vConfig's defaults are the released ids).
    got = tvc_rs.mrope_position_ids(ids_t, image, video, model_type="glm4v")
    assert_same(got, reference(model, ids_t, None, image, video))
    # Markers that are not in the sequence: three image blocks and no video.
    with pytest.raises(ValueError, match=r"image_grid_thw has 1 row\(s\) but the sequences hold 3 image block"):
        tvc_rs.mrope_position_ids(ids_t, image, video, config=c, video_start_token_id=1_000_000)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_defaults_are_the_config_class_defaults(model_type):
    """Settings not given take the defaults of the family's transformers config class: a call
    with model_type only equals one with every id from ConfigClass()."""
    config_cls = FAMILIES[model_type][0]
    config = config_cls()
    image = config.image_token_id
    frame = config.image_token_id if _is_glm(config) else config.video_token_id
    m = _markers(config)
    ids = [3, m["image_open"], *[image] * 6, m["image_close"], 4, *m["video_open"], 9,
           m["image_open"], *[frame] * 6, m["image_close"], 8, m["image_open"], *[frame] * 6, m["image_close"],
           *m["video_close"], 5]
    image_grid, video_grid = np.array([[1, 4, 6]]), np.array([[2, 6, 4]])
    by_type = tvc_rs.mrope_position_ids(np.array([ids]), image_grid, video_grid, model_type=model_type)
    by_config = tvc_rs.mrope_position_ids(np.array([ids]), image_grid, video_grid, config=config)
    np.testing.assert_array_equal(by_type[0], by_config[0])
    np.testing.assert_array_equal(by_type[1], by_config[1])
    assert by_type[0][1].max() > 0  # the vision blocks were recognised


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError) as info:
        tvc_rs.mrope_position_ids(np.array([[1, 2]]), model_type="llava")
    message = str(info.value)
    assert message.startswith("model_type must be one of")
    for name in tvc_rs.SUPPORTED_MODEL_TYPES:
        assert f"'{name}'" in message
    assert set(tvc_rs.SUPPORTED_MODEL_TYPES) >= set(FAMILIES) | {"qwen2_vl", "qwen2_5_vl"}
    with pytest.raises(ValueError, match=re.escape("got \"llava_next\"")):
        tvc_rs.mrope_position_ids(np.array([[1, 2]]), config={"model_type": "llava_next"})


def test_bad_video_input_names_the_argument():
    c = Qwen3VLConfig()
    s, e, v = c.vision_start_token_id, c.vision_end_token_id, c.video_token_id
    ids = np.array([[1, s, v, v, v, v, e, 2, s, v, v, v, v, e]])
    # One video of 3 frames but only two frame blocks in the sequence.
    with pytest.raises(ValueError, match=r"video_grid_thw has 3 frame\(s\) in all .* hold 2 video block"):
        tvc_rs.mrope_position_ids(ids, None, np.array([[3, 4, 4]]), config=c)
    # A frame block of the wrong size.
    with pytest.raises(ValueError, match=r"video block 1 .* video_grid_thw frame\[1\] = \(1, 4, 2\)"):
        tvc_rs.mrope_position_ids(
            np.array([[1, s, v, v, v, v, e, 2, s, v, v, v, v, e]]), None, np.array([[1, 4, 4], [1, 4, 2]]), config=c
        )
    # A frame count no sequence can hold is refused before anything is allocated.
    with pytest.raises(ValueError, match="more frames than input_ids has tokens"):
        tvc_rs.mrope_position_ids(ids, None, np.array([[2**62, 4, 4]]), config=c)
    with pytest.raises(ValueError, match="second_per_grid_ts is only used by model_type='qwen2_5_vl'"):
        tvc_rs.mrope_position_ids(ids, None, np.array([[2, 4, 4]]), config=c, second_per_grid_ts=[1.0])
