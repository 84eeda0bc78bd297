"""The inputs of a ``tvc_rs.hf`` run: images (PIL, paths, arrays), chat messages and the
processor's tensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np


def _load_image(image: Any, index: int):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"images[{index}]: no such file {str(path)!r}")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except Exception as err:  # PIL raises several types for unreadable files
            raise ValueError(f"images[{index}]: cannot read {str(path)!r} as an image: {err}") from None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) or type(image).__name__ == "Tensor":
        return image  # the processor checks arrays and tensors itself
    raise TypeError(f"images[{index}] must be a PIL image, a path, a NumPy array or a tensor, got {type(image).__name__}")


def _messages_and_images(images: Any, question: Optional[str], messages: Optional[list]) -> tuple:
    """(chat messages with image placeholders, list of loaded images)."""
    if images is None:
        given = []
    elif isinstance(images, (list, tuple)):
        given = list(images)
    else:
        given = [images]
    if messages is None:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty str (or give messages=)")
        if not given:
            raise ValueError("images: PVC needs at least one image (got none); pass images=<PIL image or path>")
        loaded = [_load_image(img, i) for i, img in enumerate(given)]
        content = [{"type": "image"} for _ in loaded] + [{"type": "text", "text": question}]
        return [{"role": "user", "content": content}], loaded
    if question is not None:
        raise ValueError("give either question or messages, not both")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of chat messages")
    loaded, pending = [], list(given)
    out = []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{m}] must be a dict with 'role' and 'content'")
        content = message["content"]
        if isinstance(content, str):
            out.append(dict(message))
            continue
        items = []
        for item in content:
            if isinstance(item, dict) and (item.get("type") == "image" or "image" in item):
                payload = item.get("image", item.get("path", item.get("url")))
                if payload is None:
                    if not pending:
                        raise ValueError(f"images: messages hold more image placeholders than the {len(given)} image(s) given")
                    payload = pending.pop(0)
                loaded.append(_load_image(payload, len(loaded)))
                items.append({"type": "image"})
            else:
                items.append(item)
        out.append({**message, "content": items})
    if pending:
        raise ValueError(f"images: {len(pending)} image(s) given beyond the image placeholders of messages")
    if not loaded:
        raise ValueError("images: PVC needs at least one image (the messages hold none)")
    return out, loaded


def _prepare_inputs(processor: Any, images: Any, question: Optional[str], messages: Optional[list]) -> dict:
    chat, loaded = _messages_and_images(images, question, messages)
    if not hasattr(processor, "apply_chat_template") or getattr(processor, "image_processor", None) is None:
        raise TypeError(f"processor must be a Qwen2-VL-family processor (AutoProcessor), got {type(processor).__name__}")
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    try:
        inputs = processor(images=loaded, text=[text], return_tensors="pt")
    except Exception as err:  # the processor's own check (size, aspect ratio, channels, ...)
        raise ValueError(f"images: the processor rejected the image(s): {type(err).__name__}: {err}") from None
    if inputs.get("pixel_values") is None or inputs.get("image_grid_thw") is None:
        raise ValueError("images: the processor returned no pixel values for the image(s)")
    return dict(inputs)

