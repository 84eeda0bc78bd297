"""M-RoPE position ids of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V and Qwen3.5, and Qwen2-VL image
token counts (Rust: src/rope).

``mrope_position_ids`` equals the model's own ``get_rope_index`` (transformers 5.24) element for
element; ``smart_resize``, ``image_grid_thw`` and ``image_token_count`` equal what
``Qwen2VLImageProcessor`` (fast and PIL) does to an image of that size.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from tvc_rs import _native

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "mrope_position_ids",
    "smart_resize",
    "image_grid_thw",
    "image_token_count",
    "image_processor_settings",
]

# The model types mrope_position_ids follows (transformers' config.model_type).
SUPPORTED_MODEL_TYPES = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "glm4v",
    "glm4v_moe",
    "qwen3_5",
    "qwen3_5_moe",
)

# Settings not given and not in the config take the defaults of the model type's transformers
# config class (Qwen2VLConfig(), Qwen3VLConfig(), Glm4vConfig(), ...), in the native code.
_DEFAULTS = {"model_type": "qwen2_vl"}

# Qwen2VLImageProcessor's defaults (= Qwen2-VL's preprocessor_config.json).
_MIN_PIXELS = 56 * 56
_MAX_PIXELS = 28 * 28 * 1280


def _torch_tensor_type():
    torch = sys.modules.get("torch")  # a tensor cannot exist unless torch is imported
    return None if torch is None else torch.Tensor


def _numpy(x: Any, name: str) -> np.ndarray | None:
    """``x`` as a C-contiguous NumPy array (no copy for contiguous CPU tensors and arrays)."""
    if x is None:
        return None
    tensor = _torch_tensor_type()
    try:
        if tensor is not None and isinstance(x, tensor):
            try:
                x = x.detach().cpu().numpy()
            except TypeError as err:  # e.g. bfloat16, which NumPy lacks
                raise TypeError(f"{name}: {err}") from None
        elif not isinstance(x, np.ndarray):
            x = np.asarray(x)
        return np.require(x, requirements="C")
    except MemoryError as err:  # a copy of a huge zero-stride view
        raise MemoryError(f"{name}: {err}") from None
    except ValueError as err:  # ragged nested lists
        if str(err).startswith(name):
            raise
        raise ValueError(f"{name}: cannot be read as an array: {err}") from None


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _config_settings(config: Any) -> dict:
    """The settings ``get_rope_index`` reads, from a transformers config object or its dict."""
    if config is None:
        return {}
    vision = _get(config, "vision_config")
    found = {
        "model_type": _get(config, "model_type"),
        "image_token_id": _get(config, "image_token_id"),
        "video_token_id": _get(config, "video_token_id"),
        "spatial_merge_size": _get(vision, "spatial_merge_size"),
        "tokens_per_second": _get(vision, "tokens_per_second"),
        # GLM-4.1V: video frames carry the image token between these markers.
        "video_start_token_id": _get(config, "video_start_token_id"),
        "video_end_token_id": _get(config, "video_end_token_id"),
    }
    return {k: v for k, v in found.items() if v is not None}


def mrope_position_ids(
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    *,
    second_per_grid_ts=None,
    mm_token_type_ids=None,
    config=None,
    model_type: str | None = None,
    spatial_merge_size: int | None = None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    tokens_per_second: int | float | None = None,
    video_start_token_id: int | None = None,
    video_end_token_id: int | None = None,
):
    """3-D M-RoPE position ids and rope deltas of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V, Qwen3.5.

    Equal element for element to the model's own ``get_rope_index`` in transformers:
    ``Qwen2VLModel`` (``model_type="qwen2_vl"``, also QVQ), ``Qwen2_5_VLModel``
    (``"qwen2_5_vl"``), ``Qwen3VLModel`` / ``Qwen3VLMoeModel`` (``"qwen3_vl"``,
    ``"qwen3_vl_moe"``), ``Glm4vModel`` / ``Glm4vMoeModel`` (``"glm4v"``, ``"glm4v_moe"``) and
    ``Qwen3_5Model`` / ``Qwen3_5MoeModel`` (``"qwen3_5"``, ``"qwen3_5_moe"``); tested with
    transformers 5.24.0 (requirements/test.txt), the Qwen2 types also with 5.6.0 (the
    LLaMA-Factory environment, requirements/llamafactory.txt).

    Images are placed the same way by every type. Videos: Qwen2-VL and Qwen2.5-VL make each video
    one block; the others make each frame its own block (a text timestamp between frames), so a
    ``video_grid_thw`` row ``(t, h, w)`` stands for ``t`` blocks of ``(1, h, w)``, as their
    ``get_rope_index`` splits it. GLM-4.1V's frames carry the image token: an ``image_token_id``
    token between ``video_start_token_id`` and ``video_end_token_id`` is a video token (the rule
    of ``Glm4vProcessor.create_mm_token_type_ids``).

    Args:
        input_ids: ``(batch, seq)`` int32 or int64, NumPy array or torch tensor (any device).
        image_grid_thw: ``(num_images, 3)`` integer ``(t, h, w)`` patch grids, one row per
            image of the whole batch in order (row 0's images first), as the processor returns.
        video_grid_thw: ``(num_videos, 3)`` integer grids of the videos, likewise.
        attention_mask: ``(batch, seq)`` bool / int / float; tokens where it is 0 are dropped
            before positions are assigned and get position 0. Left and right padding both work.
        second_per_grid_ts: ``(num_videos,)`` seconds per temporal grid step (Qwen2.5-VL only;
            a tensor, array or list, as the processor returns it). The temporal positions of
            video ``i`` are ``trunc(arange(t) * tokens_per_second * second_per_grid_ts[i])``,
            computed in the same dtype as transformers would (float32 for a float32 tensor or
            Python floats, float64 for a float64 tensor, exact for integers). Default: 1.
        mm_token_type_ids: ``(batch, seq)`` integers, 0 text / 1 image / 2 video, as the
            processor returns; when given it decides the token kinds instead of comparing
            ``input_ids`` with ``image_token_id`` / ``video_token_id``.
        config: the model's transformers config (``Qwen2VLConfig``, ``Qwen3VLConfig``,
            ``Glm4vConfig``, ``Qwen3_5Config``, ...; or its ``to_dict()``): ``model_type``,
            ``image_token_id``, ``video_token_id``, ``video_start_token_id``,
            ``video_end_token_id``, ``vision_config.spatial_merge_size`` and
            ``vision_config.tokens_per_second`` are read from it. Explicit keyword arguments take
            precedence. Pass it: settings found in neither take the defaults of the model type's
            transformers config class.
        model_type: one of ``SUPPORTED_MODEL_TYPES`` (default ``"qwen2_vl"``).
        spatial_merge_size: default 2.
        image_token_id: default 151655 (Qwen ``<|image_pad|>``); ``glm4v``: 151343
            (``<|image|>``); ``glm4v_moe``: 151363; ``qwen3_5``: 248056.
        video_token_id: default 151656 (Qwen ``<|video_pad|>``); ``qwen3_5``: 248057; not used
            by ``glm4v``.
        tokens_per_second: Qwen2.5-VL's ``vision_config.tokens_per_second``; default 4 (the
            transformers config default; released Qwen2.5-VL checkpoints use 2, so pass
            ``config=`` or set it).
        video_start_token_id, video_end_token_id: GLM-4.1V's ``<|begin_of_video|>`` /
            ``<|end_of_video|>`` ids (default 151341 / 151342); only read for ``glm4v`` /
            ``glm4v_moe`` when ``mm_token_type_ids`` is not given.

    Each maximal run of image (video) tokens is one image (video, or video frame) and takes the
    next grid row (frame); it must hold ``t * (h // m) * (w // m)`` tokens (``m = spatial_merge_size``). Text runs
    count up by one; a vision block starting at ``p`` gets ``(p + t_index, p + row, p + col)``
    and the next segment starts at ``p + max(h, w) // m``.

    Returns:
        ``(position_ids, rope_deltas)``: ``position_ids`` ``(3, batch, seq)`` with the dtype of
        ``input_ids``; ``rope_deltas`` ``(batch, 1)`` int64 (``max position + 1 - kept tokens``,
        0 for a fully masked row). Torch tensors on ``input_ids``' device if ``input_ids`` is a
        tensor, NumPy arrays otherwise. Inputs are never modified.

    Raises:
        ValueError: wrong rank or shape; ``attention_mask`` / ``mm_token_type_ids`` shape
            different from ``input_ids``; a grid dimension < 1; more or fewer grid rows than
            image / video blocks; a block whose token count does not match its grid;
            ``second_per_grid_ts`` length different from ``video_grid_thw`` or given for a
            model type other than Qwen2.5-VL; a ``model_type`` not in ``SUPPORTED_MODEL_TYPES``
            (the message lists them).
        TypeError: ``input_ids`` not int32 / int64; grids or ``mm_token_type_ids`` not integer;
            an unsupported ``attention_mask`` dtype.
    """
    settings = {**_DEFAULTS, **_config_settings(config)}
    explicit = {
        "model_type": model_type,
        "spatial_merge_size": spatial_merge_size,
        "image_token_id": image_token_id,
        "video_token_id": video_token_id,
        "tokens_per_second": tokens_per_second,
        "video_start_token_id": video_start_token_id,
        "video_end_token_id": video_end_token_id,
    }
    settings.update({k: v for k, v in explicit.items() if v is not None})

    tensor = _torch_tensor_type()
    device = input_ids.device if tensor is not None and isinstance(input_ids, tensor) else None
    position_ids, rope_deltas = _native.mrope_position_ids(
        _numpy(input_ids, "input_ids"),
        _numpy(image_grid_thw, "image_grid_thw"),
        _numpy(video_grid_thw, "video_grid_thw"),
        _numpy(attention_mask, "attention_mask"),
        mm_token_type_ids=_numpy(mm_token_type_ids, "mm_token_type_ids"),
        second_per_grid_ts=second_per_grid_ts,
        **settings,
    )
    if device is None:
        return position_ids, rope_deltas
    import torch

    return torch.from_numpy(position_ids).to(device), torch.from_numpy(rope_deltas).to(device)


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int = _MIN_PIXELS,
    max_pixels: int = _MAX_PIXELS,
    rule: str = "qwen2_vl",
    temporal_patch_size: int = 2,
) -> tuple[int, int]:
    """The ``(height, width)`` Qwen2-VL's image processor resizes an image to.

    Same as transformers 5.24.0's ``qwen2_vl.image_processing_qwen2_vl.smart_resize`` (tested with
    5.24.0 and, through the image processor's grids, 5.6.0): both sides
    become multiples of ``factor`` (``patch_size * merge_size``), the pixel count is scaled into
    ``[min_pixels, max_pixels]``, the aspect ratio is kept as far as rounding allows. Images
    smaller than ``factor`` are scaled up (5.24 no longer refuses them).

    ``rule="glm4v"`` is GLM-4.1V's ``smart_resize`` instead (``Glm4vImageProcessor``): the image
    counts as ``temporal_patch_size`` frames against the pixel bounds, and a side below
    ``factor`` is scaled up first. Qwen2.5-VL, Qwen3-VL and Qwen3.5 use ``"qwen2_vl"``.

    Raises:
        ValueError: a size, ``factor``, ``min_pixels``, ``max_pixels`` or
            ``temporal_patch_size`` < 1; an unknown ``rule``; an aspect ratio above 200 (the
            processor refuses those); ``height * width >= 2**53``.
    """
    return _native.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels,
                                rule=rule, temporal_patch_size=temporal_patch_size)


def image_grid_thw(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = _MIN_PIXELS,
    max_pixels: int = _MAX_PIXELS,
    rule: str = "qwen2_vl",
    temporal_patch_size: int = 2,
) -> tuple[int, int, int]:
    """``(1, grid_h, grid_w)``: the processor's ``image_grid_thw`` row for an image of this size.

    ``grid_h, grid_w`` are the resized sides divided by ``patch_size`` (patches before merging).
    ``min_pixels`` / ``max_pixels`` are the processor's ``size["shortest_edge"]`` /
    ``size["longest_edge"]``; ``rule`` / ``temporal_patch_size`` as in :func:`smart_resize`; see
    :func:`image_processor_settings` to read them all from a processor. Errors as
    :func:`smart_resize` (also ``patch_size`` / ``merge_size`` < 1).
    """
    return _native.image_grid_thw(
        height, width, patch_size=patch_size, merge_size=merge_size, min_pixels=min_pixels, max_pixels=max_pixels,
        rule=rule, temporal_patch_size=temporal_patch_size,
    )


def image_token_count(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = _MIN_PIXELS,
    max_pixels: int = _MAX_PIXELS,
    rule: str = "qwen2_vl",
    temporal_patch_size: int = 2,
) -> int:
    """How many ``<|image_pad|>`` tokens an image of this size becomes:
    ``grid_h * grid_w // merge_size**2`` (see :func:`image_grid_thw`). Errors as :func:`smart_resize`.
    """
    return _native.image_token_count(
        height, width, patch_size=patch_size, merge_size=merge_size, min_pixels=min_pixels, max_pixels=max_pixels,
        rule=rule, temporal_patch_size=temporal_patch_size,
    )


def image_processor_settings(source: Any) -> dict[str, Any]:
    """``{"patch_size", "merge_size", "min_pixels", "max_pixels", "rule", "temporal_patch_size"}``
    of a Qwen2-VL-style image processor, to pass as ``**settings`` to :func:`image_grid_thw` /
    :func:`image_token_count`. ``rule`` is ``"glm4v"`` for GLM-4.1V's processor
    (``Glm4vImageProcessor``, its own resize rule), else ``"qwen2_vl"``.

    ``source`` is a processor (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``,
    ``Glm4vProcessor``), an image processor, a ``preprocessor_config.json`` dict, or the path of
    that file or of the folder holding it (a folder saved by transformers 5, which writes
    ``processor_config.json`` with an ``image_processor`` entry instead, is read too). A dict is
    read as the processor's constructor reads it: top-level ``min_pixels`` / ``max_pixels``
    override ``size["shortest_edge"]`` / ``size["longest_edge"]``; missing values take the
    defaults.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            folder = path
            path = os.path.join(folder, "preprocessor_config.json")
            if not os.path.exists(path) and os.path.exists(os.path.join(folder, "processor_config.json")):
                path = os.path.join(folder, "processor_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                source = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"source: no such file: {path}") from None
        except OSError as err:
            raise OSError(f"source: cannot read {path}: {err}") from None
        except ValueError as err:  # invalid JSON or text
            raise ValueError(f"source: cannot read {path}: {err}") from None
        if not isinstance(source, Mapping):
            raise ValueError(f"source: {path} does not hold a JSON object")
        if isinstance(source.get("image_processor"), Mapping):  # processor_config.json
            source = source["image_processor"]
    if not isinstance(source, Mapping) and getattr(source, "image_processor", None) is not None:
        source = source.image_processor
    if isinstance(source, Mapping):
        size = source.get("size")
        size = {"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS} if size is None else dict(size)
        if source.get("min_pixels") is not None:
            size["shortest_edge"] = source["min_pixels"]
        if source.get("max_pixels") is not None:
            size["longest_edge"] = source["max_pixels"]
        patch_size, merge_size = source.get("patch_size", 14), source.get("merge_size", 2)
        kind, temporal = str(source.get("image_processor_type", "")), source.get("temporal_patch_size", 2)
    else:
        size, patch_size, merge_size = _get(source, "size"), _get(source, "patch_size"), _get(source, "merge_size")
        kind, temporal = type(source).__name__, _get(source, "temporal_patch_size") or 2
        if patch_size is None or merge_size is None or size is None:
            raise TypeError(
                "source must be a Qwen2-VL processor, image processor, preprocessor_config dict or path, "
                f"got {type(source).__name__}"
            )
    min_pixels, max_pixels = _get(size, "shortest_edge"), _get(size, "longest_edge")
    if not min_pixels or not max_pixels:
        # The processor's own message for the same configuration.
        raise ValueError(f"size must contain 'shortest_edge' and 'longest_edge' (or min_pixels / max_pixels), got {size}")
    rule = "glm4v" if kind.startswith("Glm4v") else "qwen2_vl"
    return {"patch_size": patch_size, "merge_size": merge_size, "min_pixels": min_pixels, "max_pixels": max_pixels,
            "rule": rule, "temporal_patch_size": temporal}
