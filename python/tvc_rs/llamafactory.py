"""LLaMA-Factory plugin for TVC's training stage (DVR): templates ``tvc_<model_type>`` for every
family LLaMA-Factory 0.9.5 has a template and a multimodal plugin for: ``tvc_qwen2_vl``,
``tvc_qwen2_5_vl`` (LLaMA-Factory's ``qwen2_vl`` template), ``tvc_qwen3_vl``, ``tvc_qwen3_vl_moe``
(``qwen3_vl``), ``tvc_qwen3_5``, ``tvc_qwen3_5_moe`` (``qwen3_5``), ``tvc_glm4v`` (``glm4v``) and
``tvc_glm4v_moe`` (``glm4_5v``). Each has the text of its LLaMA-Factory template and one plugin
class, `TvcPlugin`, set up for the family (its vision tokens and position rule).

Tested with LLaMA-Factory 0.9.5, transformers 5.6.0 and torch 2.11.0 (requirements/llamafactory.txt;
LLaMA-Factory 0.9.5 needs transformers <= 5.6).

LLaMA-Factory 0.9.5 left alone has two faults for DVR data (images inside the assistant's
answer): the ``<|image_pad|>`` tokens of such an image become training targets
(``SupervisedDatasetProcessor`` copies the whole answer into the labels), and truncation to
``cutoff_len`` can cut through an image block, after which the model fails with "Image features
and image tokens do not match". It also runs the image processor twice per image (once to count
tokens while preprocessing, once in the collator).

`install()` registers, under the TVC template names:

- a multimodal plugin (`TvcPlugin`) that, for a Qwen2-VL-type image processor (Qwen2-VL,
  Qwen2.5-VL, Qwen3-VL, Qwen3.5), counts image tokens from the image size with the processor's
  ``smart_resize`` rule (Rust; no decoding, no image processor) and builds ``pixel_values`` in
  the collator with the processor's own resize and a one-pass Rust normalize-and-patchify (bit
  for bit the processor's output); with GLM's image processor (its own resize rule) both are
  LLaMA-Factory's;
- a dataset processor that masks every vision token of the answers out of the labels and
  truncates without cutting image blocks: the sequence is cut at ``cutoff_len`` as LLaMA-Factory
  cuts it, except that the prompt keeps its images whole (the answer gives way) and an answer cut
  inside an image block (or inside the ``tvc_bridge`` right before it) moves to its start, so
  every re-affirmed image wholly inside the kept part is kept and only one that straddles the
  cut or lies beyond it goes; a cutoff smaller than the prompt up to the end of its last image is
  an error;
- a collator that checks blocks and images, masks vision labels again, and computes M-RoPE
  positions in Rust (equal to transformers' ``get_rope_index``).

LLaMA-Factory builds its SFT dataset processor and collator by name with no hook, so
``install()`` rebinds ``llamafactory.data.loader.SupervisedDatasetProcessor`` and
``llamafactory.train.sft.workflow.SFTDataCollatorWith4DAttentionMask`` to subclasses that behave
exactly as the originals for every other template. Multi-GPU runs re-launch through
``torchrun``, whose ranks import nothing of the parent: ``tvc-rs train`` points LLaMA-Factory's
launcher at a rank entry point that calls ``install()`` first, with the settings passed in the
environment (``TVC_RS_LLAMAFACTORY``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

try:
    import torch
    from llamafactory.data import mm_plugin as _mm
    from llamafactory.data import template as _template
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.extras.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
    from llamafactory.extras.logging import get_logger
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"tvc_rs.llamafactory needs LLaMA-Factory 0.9.5 and PyTorch ({err}): pip install llamafactory==0.9.5"
    ) from err

import numpy as np

from tvc_rs.dvr import answer_cut, dvr_family, infer_seqlen, qwen2_vl_patches, vision_blocks
from tvc_rs.rope import image_grid_thw, image_processor_settings, mrope_position_ids, smart_resize

__all__ = ["TVC_TEMPLATES", "TVC_SETTINGS", "install", "settings", "cli_train", "TvcPlugin",
           "TvcSupervisedDatasetProcessor", "TvcSFTDataCollator", "unsupported_families"]

logger = get_logger(__name__)

#: The model types (families) TVC has DVR for; a TVC template exists for those whose
#: LLaMA-Factory template (``dvr_family(m)["llamafactory_template"]``) the installed
#: LLaMA-Factory has (0.9.5: all of them).
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "qwen3_5", "qwen3_5_moe")

#: Template name -> the model type (family) it is for.
TVC_TEMPLATES = {f"tvc_{m}": m for m in FAMILIES if dvr_family(m)["llamafactory_template"] in _template.TEMPLATES}


def unsupported_families() -> dict[str, str]:
    """Families with no TVC template here, and why (the installed LLaMA-Factory lacks their template)."""
    return {m: f"LLaMA-Factory has no {dvr_family(m)['llamafactory_template']!r} template" for m in FAMILIES
            if f"tvc_{m}" not in TVC_TEMPLATES}

#: The YAML keys of `tvc-rs train` (removed before LLaMA-Factory reads the config) and defaults.
TVC_SETTINGS: dict[str, Any] = {
    # Mask every vision token (<|vision_start|>, pads, <|vision_end|>) of the answers out of the loss.
    "tvc_mask_visual_labels": True,
    # The bridge text of `tvc-rs dvr build --bridge`: when truncation cuts through a re-affirmed
    # image, the bridge right before it goes with it.
    "tvc_bridge": None,
    # Build pixel_values with the Rust patchify (False: the image processor, as LLaMA-Factory).
    "tvc_fast_images": True,
    # Threads that decode and resize images in the collator (0: one per CPU, at most 8).
    "tvc_image_threads": 0,
    # Check in the collator that every image block has the token count of its image's grid.
    "tvc_check_grids": True,
    # A folder where every collated batch is saved (npz) for inspection; None: off.
    "tvc_dump_batches": None,
}

ENV = "TVC_RS_LLAMAFACTORY"

_settings: dict[str, Any] = dict(TVC_SETTINGS)
_installed = False
_lock = threading.Lock()


def settings() -> dict[str, Any]:
    """The TVC settings in force (defaults, then ``$TVC_RS_LLAMAFACTORY``, then ``install()``'s)."""
    return dict(_settings)


def _check_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(TVC_SETTINGS))
    if unknown:
        raise ValueError(f"unknown TVC setting(s) {', '.join(unknown)}; known: {', '.join(TVC_SETTINGS)}")
    out = dict(values)
    for key in ("tvc_mask_visual_labels", "tvc_fast_images", "tvc_check_grids"):
        if key in out and not isinstance(out[key], bool):
            raise ValueError(f"{key} must be true or false, got {out[key]!r}")
    for key in ("tvc_bridge", "tvc_dump_batches"):
        if out.get(key) is not None and not isinstance(out[key], str):
            raise ValueError(f"{key} must be a string or null, got {out[key]!r}")
    if "tvc_image_threads" in out and (not isinstance(out["tvc_image_threads"], int) or out["tvc_image_threads"] < 0):
        raise ValueError(f"tvc_image_threads must be an integer >= 0, got {out['tvc_image_threads']!r}")
    return out


# ---------------------------------------------------------------- image sizes and token counts

def _image_size(image: Any) -> tuple[int, int]:
    """``(width, height)`` of an image as LLaMA-Factory would open it, reading only the header."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, dict):
        image = image["bytes"] if image.get("bytes") is not None else image["path"]
    if isinstance(image, bytes):
        import io

        image = io.BytesIO(image)
    with Image.open(image) as im:
        return im.size


def _regularized_size(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """The size LLaMA-Factory's ``Qwen2VLPlugin._preprocess_image`` gives an image (without
    resizing it): scaled under ``image_max_pixels`` / over ``image_min_pixels`` with ``int``
    truncation, sides raised to 28, aspect ratios above 200 cut to 180."""
    import math

    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
    if width / height > 200:
        width, height = height * 180, height
    if height / width > 200:
        width, height = width, width * 180
    return width, height


def _fast_image_processor(processor: Any) -> Optional[Any]:
    """The processor's image processor if the Rust path reproduces it exactly (transformers'
    torchvision-backend ``Qwen2VLImageProcessor`` with resize, rescale and normalize on)."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # pragma: no cover
        return None
    ip = getattr(processor, "image_processor", None)
    if ip is None or not isinstance(ip, TorchvisionBackend) or type(ip).__name__ not in (
            "Qwen2VLImageProcessor", "Qwen2_5_VLImageProcessor"):
        return None
    if not (getattr(ip, "do_resize", False) and getattr(ip, "do_rescale", False) and getattr(ip, "do_normalize", False)):
        return None
    return ip


_pool: Optional[ThreadPoolExecutor] = None


def _image_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        threads = _settings["tvc_image_threads"] or min(8, os.cpu_count() or 1)
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tvc-images")
    return _pool


# ---------------------------------------------------------------- the multimodal plugin

@dataclass
class TvcPlugin(_mm.Qwen2VLPlugin):
    """The TVC plugin of one family (``model_type``; its vision tokens come from
    ``dvr_family``): images only. With a Qwen2-VL-type image processor it counts image tokens
    from image sizes (Rust) and builds ``pixel_values`` with the processor's resize and a Rust
    normalize-and-patchify; with another (GLM's) it uses LLaMA-Factory's own path. The image
    block text is the family's (LLaMA-Factory's ``qwen2_vl`` / ``qwen3_vl`` / ``glm4v`` plugins
    write the same text for images)."""

    model_type: str = "qwen2_vl"

    @classmethod
    def for_family(cls, model_type: str) -> "TvcPlugin":
        start, end, image, video = dvr_family(model_type)["vision_tokens"]
        return cls(image_token=image, video_token=video, audio_token=None, vision_bos_token=start, vision_eos_token=end,
                   model_type=model_type)

    @property
    def vision_token_names(self) -> tuple[str, str, str, str]:
        return (self.vision_bos_token, self.vision_eos_token, self.image_token, self.video_token)

    def image_grid(self, image: Any, processor: Any) -> tuple[int, int, int]:
        """``image_grid_thw`` of one image, from its size only."""
        width, height = _image_size(image)
        width, height = _regularized_size(width, height, getattr(processor, "image_max_pixels", 768 * 768),
                                          getattr(processor, "image_min_pixels", 32 * 32))
        return image_grid_thw(height, width, **image_processor_settings(processor.image_processor))

    def image_token_counts(self, images: list, processor: Any) -> list[int]:
        merge = getattr(processor.image_processor, "merge_size")
        return [t * h * w // (merge * merge) for t, h, w in (self.image_grid(im, processor) for im in images)]

    def process_messages(self, messages, images, videos, audios, processor):
        if videos or audios:
            raise ValueError("tvc_rs: the TVC templates take images only (this example has videos or audios)")
        if not self.expand_mm_tokens or not _counts_in_rust(processor):
            return super().process_messages(messages, images, videos, audios, processor)
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        counts = self.image_token_counts(images, processor)
        out, k = [], 0
        for message in messages:
            content = message["content"]
            pieces = content.split(IMAGE_PLACEHOLDER)
            text = [pieces[0]]
            for piece in pieces[1:]:
                text.append(f"{self.vision_bos_token}{self.image_token * counts[k]}{self.vision_eos_token}")
                text.append(piece)
                k += 1
            out.append({**message, "content": "".join(text)})
        return out

    def get_mm_inputs(self, images, videos, audios, imglens, vidlens, audlens, batch_ids, processor):
        self._validate_input(processor, images, videos, audios)
        ip = _fast_image_processor(processor) if _settings["tvc_fast_images"] else None
        if videos or audios or ip is None or not images:
            mm_inputs = self._get_mm_inputs(images, videos, audios, processor)
        else:
            mm_inputs = self._fast_image_inputs(images, processor, ip)
        if _settings["tvc_check_grids"] and images:
            _check_blocks_against_grids(batch_ids, imglens, mm_inputs.get("image_grid_thw"), ip or
                                        processor.image_processor, _block_ids(processor.tokenizer, self))
        return mm_inputs

    def _fast_image_inputs(self, images: list, processor: Any, ip: Any) -> dict[str, torch.Tensor]:
        from transformers.image_processing_backends import TorchvisionBackend
        from transformers.image_utils import SizeDict

        max_pixels = getattr(processor, "image_max_pixels", 768 * 768)
        min_pixels = getattr(processor, "image_min_pixels", 32 * 32)
        patch, merge = ip.patch_size, ip.merge_size
        limits = image_processor_settings(ip)

        def prepare(image):
            # LLaMA-Factory's own reading and regularization, then the processor's own
            # conversion and resize (the same calls, so the same pixels).
            image = self._regularize_images([image], image_max_pixels=max_pixels, image_min_pixels=min_pixels)["images"][0]
            tensor = ip.process_image(image, do_convert_rgb=ip.do_convert_rgb)
            height, width = tensor.shape[-2:]
            rh, rw = smart_resize(height, width, factor=patch * merge, min_pixels=limits["min_pixels"],
                                  max_pixels=limits["max_pixels"])
            # The backend's plain resize: what the processor calls with the smart_resize size.
            tensor = TorchvisionBackend.resize(ip, image=tensor.unsqueeze(0), size=SizeDict(height=rh, width=rw),
                                               resample=ip.resample)[0]
            return tensor.numpy(), (1, rh // patch, rw // patch)

        # A DVR sample repeats its re-affirmed copy at every insertion point: read each image once.
        keys = [_image_key(image) for image in images]
        first: dict[Any, int] = {}
        unique = []
        for key, image in zip(keys, images):
            if key not in first:
                first[key] = len(unique)
                unique.append(image)
        done = list(_image_pool().map(prepare, unique)) if len(unique) > 1 else [prepare(unique[0])]
        prepared = [done[first[key]] for key in keys]
        mean = (torch.tensor(ip.image_mean) * (1.0 / ip.rescale_factor)).tolist()
        std = (torch.tensor(ip.image_std) * (1.0 / ip.rescale_factor)).tolist()
        pixel_values = qwen2_vl_patches([p[0] for p in prepared], mean, std, layout="chw", patch_size=patch,
                                        merge_size=merge, temporal_patch_size=ip.temporal_patch_size)
        return {
            "pixel_values": torch.from_numpy(pixel_values),
            "image_grid_thw": torch.tensor([p[1] for p in prepared], dtype=torch.long),
        }


def _image_key(image: Any) -> Any:
    """What makes two image inputs of a batch the same image (a path, the same bytes, the same object)."""
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.fspath(image))
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return ("bytes", hash(image["bytes"]), len(image["bytes"]))
        return ("path", image.get("path"))
    if isinstance(image, bytes):
        return ("bytes", hash(image), len(image))
    return ("object", id(image))


_RUST_RESIZE = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil", "Qwen2_5_VLImageProcessor")


def _counts_in_rust(processor: Any) -> bool:
    """Whether the processor's image processor resizes by Qwen2-VL's ``smart_resize`` (which the
    Rust token count reproduces); GLM's has its own rule."""
    return type(getattr(processor, "image_processor", None)).__name__ in _RUST_RESIZE


def _block_ids(tokenizer: Any, plugin: "TvcPlugin") -> dict[str, int]:
    """The ids of the plugin's vision block tokens, as ``vision_blocks`` keywords."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in plugin.vision_token_names]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"tvc_rs: the tokenizer lacks the vision tokens {', '.join(plugin.vision_token_names)} of "
                         f"{plugin.model_type}; use the TVC template of the model's family "
                         f"({', '.join(TVC_TEMPLATES)})")
    return dict(zip(("vision_start", "vision_end", "image_pad", "video_pad"), ids))


def _check_blocks_against_grids(batch_ids, imglens, grids, image_processor, block_ids: dict[str, int]) -> None:
    """Every image block of the batch has the token count of its image's grid (a clear error
    instead of the model's "Image features and image tokens do not match")."""
    if grids is None:
        return
    merge = image_processor.merge_size
    counts = (torch.as_tensor(grids).prod(-1) // (merge * merge)).tolist()
    k = 0
    for row, (ids, n) in enumerate(zip(batch_ids, imglens)):
        blocks = vision_blocks(np.asarray(ids, dtype=np.int64), **block_ids)
        image_blocks = [b for b in blocks.tolist() if not b[4]]
        if len(image_blocks) != n:
            raise ValueError(f"tvc_rs: sample {row} of the batch has {len(image_blocks)} image blocks but {n} images")
        for b in image_blocks:
            if b[3] - b[2] != counts[k]:
                raise ValueError(
                    f"tvc_rs: image {k} of the batch (sample {row}) has {b[3] - b[2]} tokens in the text but its grid "
                    f"{grids[k].tolist()} gives {counts[k]}: was the file changed after preprocessing?")
            k += 1


# ---------------------------------------------------------------- the dataset processor

def _vision_ids(tokenizer: Any, plugin: "TvcPlugin") -> tuple[int, int, int, int]:
    ids = _block_ids(tokenizer, plugin)
    return ids["vision_start"], ids["vision_end"], ids["image_pad"], ids["video_pad"]


@dataclass
class TvcSupervisedDatasetProcessor(SupervisedDatasetProcessor):
    """LLaMA-Factory's SFT dataset processor; with a TVC template, vision tokens of the answers
    are masked and truncation keeps image blocks whole (every re-affirmed image wholly before the
    cut is kept)."""

    def _is_tvc(self) -> bool:
        return isinstance(self.template.mm_plugin, TvcPlugin)

    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not self._is_tvc():
            return super().preprocess_dataset(examples)
        model_inputs = defaultdict(list)
        for i in range(len(examples["_prompt"])):
            if len(examples["_prompt"][i]) % 2 != 1 or len(examples["_response"][i]) != 1:
                logger.warning_rank0(
                    "Dropped invalid example: {}".format(examples["_prompt"][i] + examples["_response"][i]))
                continue
            input_ids, labels, images = self.encode_tvc_example(
                prompt=examples["_prompt"][i], response=examples["_response"][i], system=examples["_system"][i],
                tools=examples["_tools"][i], images=examples["_images"][i] or [],
                videos=examples["_videos"][i] or [], audios=examples["_audios"][i] or [])
            model_inputs["input_ids"].append(input_ids)
            model_inputs["attention_mask"].append([1] * len(input_ids))
            model_inputs["labels"].append(labels)
            model_inputs["images"].append(images or None)
            model_inputs["videos"].append(examples["_videos"][i])
            model_inputs["audios"].append(examples["_audios"][i])
        return model_inputs

    def _encode_pairs(self, messages, images, videos, audios, system, tools):
        messages = self.template.mm_plugin.process_messages(messages, images, videos, audios, self.processor)
        discarding_history_cot = self.data_args.mask_history and not self.template.preserve_thinking
        return self.template.encode_multiturn(self.tokenizer, messages, system, tools, discarding_history_cot)

    def encode_tvc_example(self, prompt, response, system, tools, images, videos, audios):
        """``(input_ids, labels, images kept)`` of one example."""
        if videos or audios:
            raise ValueError("tvc_rs: the TVC templates take images only (this example has videos or audios)")
        cutoff = self.data_args.cutoff_len
        bridge = _settings["tvc_bridge"]
        messages = prompt + response
        extra = 1 if self.template.efficient_eos else 0

        # Every image is encoded; truncation below cuts at cutoff_len and keeps each image block
        # wholly before the cut (a block that straddles it goes, with its bridge).
        pairs = self._encode_pairs(messages, list(images), [], [], system, tools)
        bridge_ids = np.asarray(self.tokenizer.encode(bridge, add_special_tokens=False) if bridge else [],
                                dtype=np.int64)

        start, end, image_pad, video_pad = _vision_ids(self.tokenizer, self.template.mm_plugin)
        blocks_kw = dict(vision_start=start, vision_end=end, image_pad=image_pad, video_pad=video_pad)
        # Images of each turn in order (prompt images of turn t, then its answer's).
        turn_images = []
        k = 0
        for t in range(0, len(messages), 2):
            counts = [messages[t + j]["content"].count(IMAGE_PLACEHOLDER) for j in (0, 1)]
            turn_images.append((list(range(k, k + counts[0])), list(range(k + counts[0], k + sum(counts)))))
            k += sum(counts)

        input_ids: list[int] = []
        labels: list[int] = []
        used: list[int] = []  # kept images, in sequence order
        total_length = extra
        order = list(enumerate(pairs))
        if self.data_args.mask_history:
            order = order[::-1]  # the last turns first, as LLaMA-Factory
        for n, (turn, (source_ids, target_ids)) in enumerate(order):
            if total_length >= cutoff:
                break
            source_len, target_len = infer_seqlen(len(source_ids), len(target_ids), cutoff - total_length)
            source_blocks = vision_blocks(np.asarray(source_ids, dtype=np.int64), **blocks_kw)
            budget = cutoff - total_length
            listed = source_blocks.tolist()
            if listed and source_len < listed[-1][1]:
                # The prompt's images are kept whole: it keeps up to the end of its last image
                # block and the answer gives way.
                start_, end_ = listed[-1][0], listed[-1][1]
                if end_ > budget:
                    raise ValueError(
                        f"tvc_rs: cutoff_len = {cutoff} is smaller than the prompt up to the end of its image "
                        f"({end_} tokens{'' if budget == cutoff else f', {budget} left for this turn'}; the image "
                        f"block alone has {end_ - start_}): the image would be cut off; raise cutoff_len")
                source_len = end_
                target_len = min(target_len, budget - source_len)
            target_array = np.asarray(target_ids, dtype=np.int64)
            target_blocks = vision_blocks(target_array, **blocks_kw)
            if target_len < len(target_ids):
                target_len = answer_cut(target_array, target_len, bridge=bridge_ids, **blocks_kw)
            source_ids, target_ids = source_ids[:source_len], target_ids[:target_len]
            total_length += source_len + target_len
            prompt_images, answer_images = turn_images[turn]
            turn_used = [img for img, b in zip(prompt_images, source_blocks.tolist()) if b[1] <= source_len]
            turn_used += [img for img, b in zip(answer_images, target_blocks.tolist()) if b[1] <= target_len]

            if self.data_args.train_on_prompt:
                source_label = list(source_ids)
            elif self.template.efficient_eos and turn != 0:
                source_label = [self.tokenizer.eos_token_id] + [IGNORE_INDEX] * (source_len - 1)
            else:
                source_label = [IGNORE_INDEX] * source_len
            if self.data_args.mask_history and n != 0:
                target_label = [IGNORE_INDEX] * target_len
            else:
                target_label = list(target_ids)
            if _settings["tvc_mask_visual_labels"]:
                visual = {start, end, image_pad, video_pad}
                source_label = [IGNORE_INDEX if i in visual else l for i, l in zip(source_ids, source_label)]
                target_label = [IGNORE_INDEX if i in visual else l for i, l in zip(target_ids, target_label)]
            if self.data_args.mask_history:
                input_ids = source_ids + target_ids + input_ids
                labels = source_label + target_label + labels
                used = turn_used + used
            else:
                input_ids += source_ids + target_ids
                labels += source_label + target_label
                used += turn_used
        if self.template.efficient_eos:
            input_ids += [self.tokenizer.eos_token_id]
            labels += [self.tokenizer.eos_token_id]
        return input_ids, labels, [images[i] for i in used]


# ---------------------------------------------------------------- the collator

@dataclass
class TvcSFTDataCollator(SFTDataCollatorWith4DAttentionMask):
    """LLaMA-Factory's SFT collator; with a TVC template, image blocks are checked whole (a
    block cut at the end of a sample is removed with its image), vision labels are masked and
    M-RoPE positions come from Rust."""

    def __post_init__(self):
        super().__post_init__()
        plugin = getattr(self.template, "mm_plugin", None)
        self.tvc = isinstance(plugin, TvcPlugin)
        if not self.tvc:
            return
        self._vision = _vision_ids(self.tokenizer, plugin)
        self._dumped = 0
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type is not None and model_type != plugin.model_type:
            name = next(k for k, v in TVC_TEMPLATES.items() if v == model_type) if model_type in \
                TVC_TEMPLATES.values() else None
            raise ValueError(f"tvc_rs: the template is for {plugin.model_type} models but the model is {model_type}"
                             + (f"; use template: {name}" if name else f"; the TVC templates are {', '.join(TVC_TEMPLATES)}"))

    def _checked_row(self, feature: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """``(input_ids, attention_mask, labels, images)`` of a feature with its image blocks checked
        whole (a block cut at the end goes, with its image) and its vision labels masked."""
        ids = np.asarray(feature["input_ids"], dtype=np.int64)
        mask = np.asarray(feature["attention_mask"], dtype=np.int64) if "attention_mask" in feature else \
            np.ones_like(ids)
        labels = np.asarray(feature["labels"], dtype=np.int64)
        images = list(feature.get("images") or [])
        blocks = vision_blocks(ids, vision_start=self._vision[0], vision_end=self._vision[1],
                               image_pad=self._vision[2], video_pad=self._vision[3]).tolist()
        complete = [b for b in blocks if b[5]]
        broken = [b for b in blocks if not b[5]]
        if broken:
            b = broken[0]
            if len(broken) > 1 or b is not blocks[-1] or b[1] != len(ids):
                raise ValueError(f"tvc_rs: a vision block at tokens {b[0]}..{b[1]} of a {len(ids)}-token sample is "
                                 "broken (missing <|vision_start|> or <|vision_end|>)")
            # A block cut at the end (data tokenized without the TVC processor): drop it and its image.
            ids, mask, labels = ids[: b[0]], mask[: b[0]], labels[: b[0]]
            images = images[: sum(1 for c in complete if not c[4])]
            logger.warning_rank0_once("tvc_rs: removed an image block cut by truncation at the end of a sample")
        n_image_blocks = sum(1 for b in complete if not b[4])
        if n_image_blocks != len(images):
            raise ValueError(f"tvc_rs: a sample has {n_image_blocks} image blocks but {len(images)} images")
        if _settings["tvc_mask_visual_labels"]:
            labels = labels.copy()
            labels[np.isin(ids, self._vision)] = IGNORE_INDEX
        return ids, mask, labels, images

    def _fast_path(self, features: list[dict[str, Any]]) -> bool:
        """Whether the batch can skip LLaMA-Factory's general path (padding by the tokenizer, fake
        audio, packing): images only, longest padding, PyTorch tensors."""
        from transformers.utils import PaddingStrategy

        if self.padding not in (True, "longest", PaddingStrategy.LONGEST) or self.return_tensors != "pt":
            return False
        if self.neat_packing or self.tokenizer.pad_token_id is None or self.template.mm_plugin.audio_token:
            return False
        allowed = {"input_ids", "attention_mask", "labels", "images", "videos", "audios"}
        return all(set(f) <= allowed and not f.get("videos") and not f.get("audios") for f in features)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not self.tvc:
            return super().__call__(features)
        rows = [self._checked_row(f) for f in features]
        if self._fast_path(features):
            batch = self._collate(rows)
        else:
            for feature, (ids, mask, labels, images) in zip(features, rows):
                feature.update(input_ids=ids.tolist(), attention_mask=mask.tolist(), labels=labels.tolist(),
                               images=images or None)
            batch = super().__call__(features)
        if _settings["tvc_dump_batches"]:
            self._dump(batch)
        return batch

    def _collate(self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, list]]) -> dict[str, torch.Tensor]:
        """LLaMA-Factory's collation of an images-only batch (same tensors), with NumPy padding."""
        from llamafactory.data.collator import prepare_4d_attention_mask

        plugin = self.template.mm_plugin
        right = self.tokenizer.padding_side == "right"
        images = [image for row in rows for image in row[3]]
        imglens = [len(row[3]) for row in rows]
        if plugin.image_token is not None and not images:
            # As LLaMA-Factory: a masked white image keeps every rank's vision tower in step (ZeRO-3 / FSDP).
            from PIL import Image

            fake = Image.new("RGB", (64, 64), (255, 255, 255))
            text = plugin.process_messages([{"role": "user", "content": IMAGE_PLACEHOLDER}], [fake], [], [],
                                           self.processor)[0]["content"]
            fake_ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
            ids, mask, labels, _ = rows[0]
            pad = (np.zeros(len(fake_ids), np.int64), np.full(len(fake_ids), IGNORE_INDEX, np.int64))
            if right:
                rows[0] = (np.concatenate([ids, fake_ids]), np.concatenate([mask, pad[0]]),
                           np.concatenate([labels, pad[1]]), [])
            else:
                rows[0] = (np.concatenate([fake_ids, ids]), np.concatenate([pad[0], mask]),
                           np.concatenate([pad[1], labels]), [])
            images, imglens[0] = [fake], 1
        n = len(rows)
        mm_inputs = plugin.get_mm_inputs(images, [], [], imglens, [0] * n, [0] * n, [row[0] for row in rows],
                                         self.processor)
        length = max(len(row[0]) for row in rows)
        if self.pad_to_multiple_of:
            length = (length + self.pad_to_multiple_of - 1) // self.pad_to_multiple_of * self.pad_to_multiple_of
        input_ids = np.full((n, length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((n, length), dtype=np.int64)
        labels = np.full((n, length), self.label_pad_token_id, dtype=np.int64)
        for i, (ids, mask, lab, _) in enumerate(rows):
            cols = slice(0, len(ids)) if right else slice(length - len(ids), length)
            input_ids[i, cols], attention_mask[i, cols], labels[i, cols] = ids, mask, lab
        batch: dict[str, Any] = {"input_ids": torch.from_numpy(input_ids),
                                 "attention_mask": torch.from_numpy(attention_mask),
                                 "labels": torch.from_numpy(labels)}
        if self.get_rope_func is not None:
            self._compute_rope_position_ids(batch, mm_inputs)
            if batch["position_ids"].dim() == 3:  # LLaMA-Factory's layout: text positions first
                batch["position_ids"] = torch.cat([batch["position_ids"][0].unsqueeze(0), batch["position_ids"]], 0)
        batch.update(mm_inputs)
        if self.block_diag_attn and self.attn_implementation != "flash_attention_2":
            batch["attention_mask"] = prepare_4d_attention_mask(batch["attention_mask"], self.compute_dtype)
        for key, value in batch.items():
            if torch.is_tensor(value) and torch.is_floating_point(value):
                batch[key] = value.to(self.compute_dtype)
        return batch

    def _compute_rope_position_ids(self, features: dict[str, torch.Tensor], mm_inputs: dict[str, Any]) -> None:
        if not self.tvc:
            return super()._compute_rope_position_ids(features, mm_inputs)
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        if attention_mask.sum() == 0:  # only padding: LLaMA-Factory's own convention
            return super()._compute_rope_position_ids(features, mm_inputs)
        image_grid_thw = mm_inputs.get("image_grid_thw")
        if image_grid_thw is not None and not bool(((input_ids == self._vision[2]) & (attention_mask >= 1)).any()):
            # Only LLaMA-Factory's masked placeholder image: get_rope_index never reads its grid.
            image_grid_thw = None
        features["position_ids"], features["rope_deltas"] = mrope_position_ids(
            input_ids, image_grid_thw, mm_inputs.get("video_grid_thw"), attention_mask >= 1,
            second_per_grid_ts=mm_inputs.get("second_per_grid_ts"), config=self.model.config)

    def _dump(self, batch: dict[str, Any]) -> None:
        folder = Path(_settings["tvc_dump_batches"])
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {k: v.detach().cpu().numpy() for k, v in batch.items()
                  if torch.is_tensor(v) and k not in ("pixel_values",)}
        rank = os.environ.get("RANK", "0")
        np.savez(folder / f"batch_rank{rank}_pid{os.getpid()}_{self._dumped:05d}.npz", **arrays)
        self._dumped += 1


# ---------------------------------------------------------------- install and the train command

def install(values: Optional[Mapping[str, Any]] = None) -> None:
    """Registers the TVC templates, plugins, dataset processor and collator with LLaMA-Factory.
    Idempotent. ``values`` are TVC settings (``TVC_SETTINGS`` keys); without them they are read
    from ``$TVC_RS_LLAMAFACTORY`` (JSON), which `tvc-rs train` sets for every rank."""
    global _installed
    if values is None and os.environ.get(ENV):
        values = json.loads(os.environ[ENV])
    with _lock:
        if values is not None:
            _settings.update(_check_settings(values))
        if _installed:
            return
        if "tvc" not in _mm.PLUGINS:
            _mm.register_mm_plugin("tvc", TvcPlugin)
        for name, model_type in TVC_TEMPLATES.items():
            if name in _template.TEMPLATES:
                continue
            base = _template.TEMPLATES[dvr_family(model_type)["llamafactory_template"]]
            # The base template's text and settings, with the family's TVC plugin.
            _template.register_template(
                name=name, format_user=base.format_user, format_assistant=base.format_assistant,
                format_system=base.format_system, format_function=base.format_function,
                format_observation=base.format_observation, format_tools=base.format_tools,
                format_prefix=base.format_prefix, default_system=base.default_system,
                stop_words=list(base.stop_words), thought_words=base.thought_words,
                tool_call_words=base.tool_call_words, efficient_eos=base.efficient_eos,
                replace_eos=base.replace_eos, replace_jinja_template=base.replace_jinja_template,
                enable_thinking=base.enable_thinking, preserve_thinking=base.preserve_thinking,
                mm_plugin=TvcPlugin.for_family(model_type), template_class=type(base),
            )
        # LLaMA-Factory looks these classes up by name at run time, with no hook: rebind the names.
        import llamafactory.data.loader as loader
        import llamafactory.train.sft.workflow as workflow

        loader.SupervisedDatasetProcessor = TvcSupervisedDatasetProcessor
        workflow.SFTDataCollatorWith4DAttentionMask = TvcSFTDataCollator
        _installed = True


def _load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no such file: {path}")
    if path.endswith((".yaml", ".yml")):
        config = OmegaConf.load(Path(path).absolute())
    elif path.endswith(".json"):
        config = OmegaConf.create(json.loads(Path(path).read_text(encoding="utf-8")))
    else:
        raise ValueError(f"config: expected a .yaml, .yml or .json file, got {path}")
    merged = OmegaConf.to_container(OmegaConf.merge(config, OmegaConf.from_cli(overrides)))
    if not isinstance(merged, dict):
        raise ValueError(f"config: {path} does not hold a mapping of settings")
    return merged


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(LLaMA-Factory's settings, TVC settings)`` of a config: keys starting with ``tvc_`` are
    TVC's (checked: an unknown one is a ValueError)."""
    tvc = {k: v for k, v in config.items() if k.startswith("tvc_")}
    rest = {k: v for k, v in config.items() if not k.startswith("tvc_")}
    return rest, _check_settings(tvc)


def check_config(config: Mapping[str, Any]) -> None:
    """Refuses, before anything is launched, a template LLaMA-Factory does not know and TVC
    templates with settings they do not support."""
    template = config.get("template")
    if template is None:
        return
    if template not in _template.TEMPLATES:
        if str(template).startswith("tvc_"):
            raise ValueError(f"template: unknown TVC template {template!r}; the TVC templates are "
                             f"{', '.join(TVC_TEMPLATES)}")
        raise ValueError(f"template: LLaMA-Factory has no template {template!r}")
    if template in TVC_TEMPLATES:
        if config.get("packing") or config.get("neat_packing"):
            raise ValueError(f"template {template}: packing is not supported with the TVC templates")
        stage = config.get("stage", "sft")
        if stage != "sft":
            raise ValueError(f"template {template}: the TVC templates support stage: sft, got {stage!r}")


def cli_train(config_path: str, overrides: Optional[list[str]] = None) -> int:
    """``tvc-rs train CONFIG.yaml [KEY=VALUE ...]``: LLaMA-Factory's ``train`` with the TVC plugin
    installed here and in every torchrun rank; ``tvc_*`` keys are TVC settings."""
    import llamafactory.launcher as launcher

    config = _load_config(config_path, list(overrides or []))
    lf_config, tvc = split_config(config)
    install(tvc)
    check_config(lf_config)
    os.environ[ENV] = json.dumps(settings())
    rank_entry = Path(__file__).resolve().parent / "_launch" / "llamafactory_rank.py"
    with tempfile.TemporaryDirectory(prefix="tvc-rs-train-") as tmp:
        # LLaMA-Factory reads a file (in every rank): the config without the TVC keys.
        stripped = Path(tmp) / Path(config_path).with_suffix(".yaml").name
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.create(lf_config), stripped)
        argv, launcher_file = sys.argv, launcher.__file__
        sys.argv = ["llamafactory-cli", "train", str(stripped)]
        launcher.__file__ = str(rank_entry)  # torchrun runs this file in each rank
        try:
            launcher.launch()
        finally:
            sys.argv, launcher.__file__ = argv, launcher_file
    return 0
