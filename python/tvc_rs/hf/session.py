"""A PVC run's state in ``tvc_rs.hf``: the prompt's blocks and the sequence layout (token ids,
M-RoPE positions, image spans), the model's cache, compression of the images (pooling, pruning
by attention) and the calibration itself (``relocate``, ``append``, ``kv``). The generate loop
on top of it is ``tvc_rs.hf.generation``."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from tvc_rs.compress import pool_visual_tokens, prune_visual_tokens, select_tokens, visual_token_scores
from tvc_rs.hf.inputs import _prepare_inputs
from tvc_rs.hf.model import _check_model, _compressible, _Rope, _torch
from tvc_rs.kv import relocate_spans, rerotate_keys
from tvc_rs.pvc import PVCConfig, PVCMode, bridge_ids
from tvc_rs.rope import mrope_position_ids
from tvc_rs.triggers import ReflectionDetector


@dataclass
class CalibrationRecord:
    """One calibration as it happened."""

    index: int
    """0-based number of the calibration in this generation."""
    token_index: int
    """Generated token (0-based, counting only the model's own tokens) after which the image was
    given again: the token that confirmed the trigger (or the ``period``-th token)."""
    reason: str
    """``"trigger"`` or ``"period"``."""
    phrase: Optional[str]
    """The reflection phrase that triggered it (None for a period calibration)."""
    mode: PVCMode
    visual_tokens: int
    """Image tokens injected (all images together)."""
    grids: list
    """Per injected image, the merged ``(t, h, w)`` grid its tokens lie on (pooled grid, or the
    full grid of a pruned image)."""
    evicted_tokens: int
    """Sequence entries dropped (``relocate``, ``kv``: earlier image blocks with their
    vision start / end tokens; ``append``: 0)."""
    prefilled_tokens: int
    """Tokens run through the model at the calibration (``relocate``: the whole rebuilt sequence)."""
    seconds: float
    """Wall time of the calibration (compression, cache surgery, prefill)."""
    bridge_ids: list
    """Token ids of the bridge text as injected (``sep + bridge``)."""
    sequence_index: int = 0
    """Index in the sequence (as it was right after the calibration) of the first bridge token."""
    text_offset: int = 0
    """Character offset in ``PVCResult.text`` where the bridge text starts."""

    def as_dict(self) -> dict:
        return {
            "index": self.index, "token_index": self.token_index, "reason": self.reason, "phrase": self.phrase,
            "mode": self.mode, "visual_tokens": self.visual_tokens, "grids": [list(g) for g in self.grids],
            "evicted_tokens": self.evicted_tokens, "prefilled_tokens": self.prefilled_tokens,
            "seconds": self.seconds, "text_offset": self.text_offset,
        }



@dataclass
class _Image:
    """An image block ``<|vision_start|> pads <|vision_end|>`` of the sequence."""

    source: int  # which question image
    grid: tuple  # merged (t, h, w) grid of the (full or pooled) image
    features: Any  # [tokens, hidden] in the model's dtype, on its device
    kept: Any = None  # LongTensor of kept cells (row-major in grid) for a pruned image, else None
    injected: bool = False  # False for the prompt's own images

    @property
    def tokens(self) -> int:
        return int(self.features.shape[0])


@dataclass
class _Text:
    ids: list


@dataclass
class _Layout:
    ids: Any  # LongTensor [L] (CPU)
    positions: Any  # LongTensor [3, L] (CPU)
    spans: list  # (start, end, _Image): sequence indices of the whole block incl. start/end tokens
    image_mask: Any  # BoolTensor [L]: image pad tokens
    injected_mask: Any  # BoolTensor [L]: pads of re-injected images


def _merge_text(blocks: list) -> list:
    out: list = []
    for block in blocks:
        if isinstance(block, _Text):
            if not block.ids:
                continue
            if out and isinstance(out[-1], _Text):
                out[-1] = _Text(out[-1].ids + list(block.ids))
                continue
            out.append(_Text(list(block.ids)))
        else:
            out.append(block)
    return out


def _drop_images(layout: _Layout) -> tuple:
    """The layout without its image blocks, and the kept entries (BoolTensor ``[L]``). Every token
    after a block moves to where the block started: its positions shift by ``p(start) - p(end)``
    (text positions have three equal components; later blocks shift with them)."""
    torch = _torch()
    n = len(layout.ids)
    kept = torch.ones(n, dtype=torch.bool)
    shift = torch.zeros(n, dtype=layout.positions.dtype)
    for start, end, _ in layout.spans:
        kept[start:end] = False
        if end < n:
            shift[end:] += layout.positions[0, start] - layout.positions[0, end]
    positions = (layout.positions + shift)[:, kept]
    none = torch.zeros(int(kept.sum()), dtype=torch.bool)
    return _Layout(layout.ids[kept], positions, [], none, none.clone()), kept


def _concat(head: _Layout, tail: _Layout) -> _Layout:
    """``head`` followed by ``tail`` (laid out on its own, from position 0)."""
    torch = _torch()
    n = len(head.ids)
    offset = int(head.positions[:, -1].max()) + 1 if n else 0
    spans = head.spans + [(start + n, end + n, block) for start, end, block in tail.spans]
    return _Layout(
        torch.cat([head.ids, tail.ids]),
        torch.cat([head.positions, tail.positions + offset], dim=1),
        spans,
        torch.cat([head.image_mask, tail.image_mask]),
        torch.cat([head.injected_mask, tail.injected_mask]),
    )


def _text_layout(ids: list) -> _Layout:
    """Text tokens laid out on their own, from position 0 (three equal components)."""
    torch = _torch()
    none = torch.zeros(len(ids), dtype=torch.bool)
    positions = torch.arange(len(ids), dtype=torch.long).expand(3, -1)
    return _Layout(torch.tensor(ids, dtype=torch.long), positions, [], none, none.clone())


_DETECTORS: dict = {}


def _detector(tokenizer: Any, phrases: Optional[Sequence[str]]) -> ReflectionDetector:
    """Building a detector decodes the whole vocabulary (about 2 s for Qwen's): keep a few."""
    key = (id(tokenizer), None if phrases is None else tuple(phrases))
    found = _DETECTORS.get(key)
    if found is not None and found[0] is tokenizer:
        return found[1]
    detector = ReflectionDetector(tokenizer, phrases=phrases)
    if len(_DETECTORS) >= 4:
        _DETECTORS.pop(next(iter(_DETECTORS)))
    _DETECTORS[key] = (tokenizer, detector)
    return detector


class _Session:
    """The state of one PVC generation and every step but the generate loop (``PVCSession``,
    in ``tvc_rs.hf.generation``, adds that)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        images: Any = None,
        question: Optional[str] = None,
        *,
        messages: Optional[list] = None,
        config: Optional[PVCConfig] = None,
    ):
        torch = _torch()
        self.family = _check_model(model)
        if config is None:
            config = PVCConfig()
        if not isinstance(config, PVCConfig):
            raise TypeError(f"config must be a tvc_rs.PVCConfig, got {type(config).__name__}")
        self.model = model
        self.processor = processor
        self.config = config
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise TypeError(f"processor must be a Qwen2-VL-family processor with a tokenizer, got {type(processor).__name__}")
        mc = model.config
        self.text_config = mc.get_text_config() if hasattr(mc, "get_text_config") else mc.text_config
        self.image_token_id = int(mc.image_token_id)
        self.vision_start_id = int(getattr(mc, self.family.start_token))
        self.vision_end_id = int(getattr(mc, self.family.end_token))
        self.merge = int(mc.vision_config.spatial_merge_size)
        self.rope = _Rope(mc, self.family)
        # DeepStack (Qwen3-VL): vision features of these tower layers are added to the hidden
        # states after the first decoder layers, at the image tokens.
        self.deepstack_levels = len(getattr(mc.vision_config, "deepstack_visual_indexes", None) or ())
        # Hybrid models (Qwen3.5): linear-attention layers keep a recurrent state, not a KV cache.
        layer_types = list(getattr(self.text_config, "layer_types", None) or [])
        self.recurrent_layers = [i for i, t in enumerate(layer_types) if t != "full_attention"]
        if self.recurrent_layers:
            if config.mode == PVCMode.KV:
                raise ValueError(
                    f"config.mode = 'kv' is not possible for {self.family.name} (model_type {mc.model_type!r}): "
                    f"its layers {self.recurrent_layers} are {layer_types[self.recurrent_layers[0]]!r}, a recurrent "
                    "state over the whole sequence with no per-token cache entries to evict or move; use 'relocate' or 'append'"
                )
            if config.prune_spec is not None:
                raise ValueError(
                    f"config.prune: not supported for {self.family.name} (model_type {mc.model_type!r}): the probe of "
                    "the pending token cannot be taken back out of its linear-attention layers' recurrent state; use pool"
                )
        if self.deepstack_levels and config.prune_spec is not None and config.prune_spec.get("merge"):
            raise ValueError(
                f"config.prune['merge'] = True: not supported for {self.family.name}: its DeepStack levels would "
                "have to be merged with the main features' assignment; use merge=False or pool"
            )
        if config.mode == PVCMode.KV and not self.rope.supported:
            raise ValueError(f"config.mode = 'kv' needs default RoPE, the model uses rope_type {self.rope.rope_type!r}")
        layers = self.text_config.num_hidden_layers
        if self.prune is not None and self.prune.get("layer") is not None and not -layers <= self.prune["layer"] < layers:
            raise ValueError(f"prune['layer'] = {self.prune['layer']}: the model has {layers} layers")
        self.text_model = model.model.language_model
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        if config.mode == PVCMode.KV and self.device.type != "cpu" and self.dtype == torch.float64:
            raise ValueError(
                f"config.mode = 'kv' with a float64 model on {self.device}: the KV kernels take float32, float16 "
                "or bfloat16 there (float64 on the CPU only); use relocate or append, or another dtype"
            )
        forward_args = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward_args else "past_key_values"

        inputs = _prepare_inputs(processor, images, question, messages)
        ids = inputs["input_ids"]
        if ids.shape[0] != 1:
            raise ValueError(f"one question at a time: the processor returned a batch of {ids.shape[0]}")
        grids = inputs["image_grid_thw"].cpu()
        k = config.pool
        if self.prune is None and k > 1:  # checked before the vision tower runs
            for i, (_, h, w) in enumerate(grids.tolist()):
                h, w = h // self.merge, w // self.merge
                if k > h or k > w:
                    raise ValueError(
                        f"pool = {k} is larger than the merged grid of images[{i}] ({h} x {w} tokens); "
                        f"use a factor <= {min(h, w)} or pool=1"
                    )
        with torch.no_grad():
            pixels = inputs["pixel_values"].to(self.device)
            out = model.model.get_image_features(pixels, grids.to(self.device))
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            levels = getattr(out, "deepstack_features", None) if self.deepstack_levels else None
        features = [f.to(self.dtype) for f in features]
        if self.deepstack_levels and (levels is None or len(levels) != self.deepstack_levels):
            raise RuntimeError(
                f"internal: the vision tower returned {0 if levels is None else len(levels)} DeepStack levels, "
                f"its config names {self.deepstack_levels}"
            )
        self.images = []  # merged grid and features of each question image
        for i, (grid, feats) in enumerate(zip(grids.tolist(), features)):
            merged = (grid[0], grid[1] // self.merge, grid[2] // self.merge)
            if merged[0] * merged[1] * merged[2] != feats.shape[0]:
                raise ValueError(f"images[{i}]: {feats.shape[0]} features for a {merged} grid")
            if self.deepstack_levels:
                # DeepStack levels ride along on the hidden dimension: [tokens, (1 + levels) * hidden].
                # Pooling and pruning act per token and channel, so they treat every level alike.
                feats = torch.cat([feats] + [level[i].to(self.dtype) for level in levels], dim=-1)
            self.images.append((merged, feats))
        self.blocks = self._prompt_blocks(ids[0].tolist())
        self.prompt_length = int(ids.shape[1])
        self.layout = self._layout(self.blocks)
        self.detector = _detector(self.tokenizer, config.phrases)
        self.stream = self.detector.stream(config.schedule)
        self.cache = None
        self.generated: list = []
        self.transcript: list = []  # ("text" | "bridge", ids) in the order the model saw them
        self.records: list = []
        self._pooled: dict = {}  # pool factor -> pooled images (computed once)

    @property
    def prune(self) -> Optional[dict]:
        return self.config.prune_spec

    # ------------------------------------------------------------ layout helpers

    def _prompt_blocks(self, ids: list) -> list:
        blocks, text, i, image = [], [], 0, 0
        while i < len(ids):
            if ids[i] != self.image_token_id:
                text.append(ids[i])
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == self.image_token_id:
                j += 1
            if not text or text[-1] != self.vision_start_id or j >= len(ids) or ids[j] != self.vision_end_id:
                raise ValueError("the prompt's image tokens are not wrapped in <|vision_start|> ... <|vision_end|>")
            if image >= len(self.images):
                raise ValueError("the prompt holds more image blocks than images")
            grid, feats = self.images[image]
            if j - i != feats.shape[0]:
                raise ValueError(f"image block {image} has {j - i} tokens, its features {feats.shape[0]}")
            text.pop()
            if text:
                blocks.append(_Text(text))
            blocks.append(_Image(image, grid, feats))
            text, i, image = [], j + 1, image + 1
        if text:
            blocks.append(_Text(text))
        return blocks

    def _layout(self, blocks: list) -> _Layout:
        """Token ids and M-RoPE positions of a block list (tvc-rs ``mrope_position_ids`` over the
        sequence with every pruned image at its full grid, then the pruned cells dropped)."""
        torch = _torch()
        virtual, keep, grids, spans_v = [], [], [], []
        for block in blocks:
            if isinstance(block, _Text):
                virtual.extend(block.ids)
                keep.append(np.ones(len(block.ids), dtype=bool))
                continue
            t, h, w = block.grid
            full = t * h * w
            start = len(virtual)
            virtual.append(self.vision_start_id)
            virtual.extend([self.image_token_id] * full)
            virtual.append(self.vision_end_id)
            mask = np.ones(full, dtype=bool)
            if block.kept is not None:
                mask[:] = False
                mask[np.asarray(block.kept.cpu())] = True
            keep.append(np.concatenate([[True], mask, [True]]))
            grids.append((t, h * self.merge, w * self.merge))
            spans_v.append((start, block))
        virtual_ids = np.asarray(virtual, dtype=np.int64)[None]
        grid_arr = np.asarray(grids, dtype=np.int64).reshape(-1, 3) if grids else None
        positions, _ = mrope_position_ids(
            virtual_ids, grid_arr, config=self.model.config, **self._position_settings()
        )
        keep_all = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
        ids = torch.from_numpy(virtual_ids[0][keep_all].copy())
        pos = torch.from_numpy(np.ascontiguousarray(positions[:, 0, keep_all]))
        # Block spans in the real (pruned) sequence.
        index_map = np.cumsum(keep_all) - 1
        spans, image_mask, injected = [], torch.zeros(len(ids), dtype=torch.bool), torch.zeros(len(ids), dtype=torch.bool)
        for start_v, block in spans_v:
            start = int(index_map[start_v])
            end = start + block.tokens + 2
            spans.append((start, end, block))
            image_mask[start + 1:end - 1] = True
            if block.injected:
                injected[start + 1:end - 1] = True
        return _Layout(ids, pos, spans, image_mask, injected)

    def _position_settings(self) -> dict:
        """Explicit settings for ``mrope_position_ids`` where it does not know the model type
        (``tvc_rs.rope.SUPPORTED_MODEL_TYPES``).
        Our layouts hold images only (no videos), which every supported family places by the
        Qwen2-VL rule: a run of image tokens starting at ``p`` gets ``(p, p + row, p + col)``
        and the next token ``p + max(h, w)``."""
        from tvc_rs import rope

        if self.model.config.model_type in getattr(rope, "SUPPORTED_MODEL_TYPES", ("qwen2_vl", "qwen2_5_vl")):
            return {}  # mrope_position_ids reads everything from the config
        return {"model_type": "qwen2_vl", "image_token_id": self.image_token_id, "spatial_merge_size": self.merge}

    @property
    def sequence(self) -> Any:
        return self.layout.ids

    @property
    def positions(self) -> Any:
        return self.layout.positions

    def _append_text(self, ids: list) -> None:
        """Extend the last text block (and the layout) by generated tokens: positions count on."""
        if not ids:
            return
        if self.blocks and isinstance(self.blocks[-1], _Text):
            self.blocks[-1].ids.extend(ids)
        else:
            self.blocks.append(_Text(list(ids)))
        self.layout = _concat(self.layout, _text_layout(ids))

    def _embeds(self, layout: _Layout, a: int, b: int) -> tuple:
        """(inputs_embeds ``[1, b - a, hidden]`` of layout positions ``a .. b``, DeepStack
        features of its image tokens ``[levels, image tokens, hidden]`` in order, or None)."""
        torch = _torch()
        emb = self.embed(layout.ids[a:b].to(self.device))
        hidden = emb.shape[-1]
        stacked = []
        for start, end, block in layout.spans:
            lo, hi = max(start + 1, a), min(end - 1, b)
            if lo < hi:
                feats = block.features[lo - start - 1:hi - start - 1]
                emb[lo - a:hi - a] = feats[:, :hidden].to(emb.dtype)
                stacked.append(feats[:, hidden:])
        if not self.deepstack_levels or not stacked:
            return emb[None], None
        levels = torch.cat(stacked).to(emb.dtype)
        return emb[None], levels.reshape(levels.shape[0], self.deepstack_levels, hidden).transpose(0, 1)

    def _forward(self, layout: _Layout, a: int, b: int) -> None:
        """Run layout tokens ``a .. b`` through the text model into the cache (no logits)."""
        torch = _torch()
        if b <= a:
            return
        if self.cache.get_seq_length() != a:
            raise RuntimeError(f"internal: cache holds {self.cache.get_seq_length()} tokens, expected {a}")
        embeds, deepstack = self._embeds(layout, a, b)
        extra = {}
        if deepstack is not None:
            # As Qwen3VLModel.forward drives its language model: the mask of the image tokens of
            # this chunk and, per level, their features in order.
            extra = {
                "visual_pos_masks": layout.image_mask[None, a:b].to(self.device),
                "deepstack_visual_embeds": list(deepstack),
            }
        with torch.no_grad():
            self.text_model(
                inputs_embeds=embeds,
                position_ids=layout.positions[:, None, a:b].to(self.device),
                **{self.cache_arg: self.cache},
                use_cache=True,
                **extra,
            )

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def prefill(self) -> None:
        """Encode the prompt but its last token (``generate`` feeds that one)."""
        self.cache = self._new_cache()
        self._forward(self.layout, 0, len(self.layout.ids) - 1)

    def extend(self, ids: Sequence[int]) -> None:
        """Append text tokens as if generated (encoded into the cache; the last one stays
        pending). The reflection detector does not see them. For building long contexts in
        benchmarks and tests."""
        ids = [int(i) for i in ids]
        if not ids:
            return
        if self.cache is None:
            self.prefill()
        start = len(self.layout.ids) - 1
        self.generated.extend(ids)
        self.transcript.append(("text", list(ids)))
        self._append_text(ids)
        self._forward(self.layout, start, len(self.layout.ids) - 1)

    # ------------------------------------------------------------ compression

    def _pooled_images(self) -> list:
        k = self.config.pool
        if k not in self._pooled:
            out = []
            for i, (grid, feats) in enumerate(self.images):
                if k == 1:
                    out.append(_Image(i, grid, feats, injected=True))
                    continue
                # On the features' device (the CUDA kernels for a GPU model), no host copy.
                pooled = pool_visual_tokens(_compressible(feats), [grid], k)
                tokens = pooled.tokens.to(self.dtype)
                # The pooled grid is host data (no device sync to read it).
                new_grid = tuple(int(d) for d in pooled.grid_thw[0])
                out.append(_Image(i, new_grid, tokens, injected=True))
            self._pooled[k] = out
        return self._pooled[k]

    def _probe_queries(self) -> dict:
        """Queries (after RoPE) of the pending token at the scoring layer(s): ``{layer: [heads, d]}``.
        The pending token is run once and its cache entry dropped again."""
        layers = self.text_model.layers
        chosen = self.prune.get("layer")
        wanted = range(len(layers)) if chosen is None else [chosen % len(layers)]
        captured: dict = {}
        handles = []
        for index in wanted:
            attn = layers[index].self_attn
            # Qwen3's queries are RMS-normed per head after the projection, before RoPE.
            proj = getattr(attn, "q_norm", None) or attn.q_proj

            def hook(module, args, output, index=index):
                captured[index] = output[0, -1].detach()

            handles.append(proj.register_forward_hook(hook))
        a = len(self.layout.ids) - 1
        try:
            self._forward(self.layout, a, a + 1)
        finally:
            for handle in handles:
                handle.remove()
        self.cache.crop(-1)
        position = self.layout.positions[:, a]  # [3]
        out = {}
        for index, q in captured.items():
            q = q.float().reshape(-1, self.rope.head_dim)[None].contiguous()  # [1, heads, d], on its device
            rerotate_keys(q, position[None].clone(), **self.rope.kwargs())
            out[index] = q
        return out

    def _pruned_images(self) -> list:
        """Per question image, its newest copy in the cache pruned by the pending token's attention."""
        queries = self._probe_queries()
        spec = self.prune
        # Score the full image while it is in the cache (append mode), else its newest copy.
        latest: dict = {}
        for start, end, block in self.layout.spans:
            if block.source not in latest or latest[block.source][2].kept is not None:
                latest[block.source] = (start, end, block)
        out = []
        for source, (grid, _) in enumerate(self.images):
            start, end, block = latest[source]
            scores = None
            for index, q in queries.items():
                keys = self.cache.layers[index].keys[0, :, start + 1:end - 1]  # [kv_heads, n, d]
                s = visual_token_scores(q, keys.transpose(0, 1).float())  # the cache in place (f32 models)
                scores = s if scores is None else scores + s
            present = block.tokens
            full = grid[0] * grid[1] * grid[2]
            select = {"min_keep": spec.get("min_keep", 1), "max_keep": spec.get("max_keep")}
            if "keep" in spec:
                select["keep"] = min(spec["keep"], present)
            elif "ratio" in spec:
                select["keep"] = min(max(1, int(math.floor(spec["ratio"] * full + 0.5))), present)
            else:
                select["mass"] = spec["mass"]
            if select["max_keep"] is not None and select["min_keep"] > select["max_keep"]:
                raise ValueError(f"prune: min_keep {select['min_keep']} > max_keep {select['max_keep']}")
            chosen = select_tokens(scores, **select)
            pruned = prune_visual_tokens(_compressible(block.features), chosen, merge=bool(spec.get("merge", False)))
            # The kept cells place the tokens (host-side layout): a few integers to the host.
            chosen = chosen.cpu()
            cells = chosen if block.kept is None else block.kept[chosen]
            out.append(_Image(source, grid, pruned.tokens.to(self.dtype), kept=cells.clone(), injected=True))
        return out

    # ------------------------------------------------------------ calibration

    def _bridge_ids(self) -> list:
        # The answer's text so far ends as its newest part that decodes to any text (as the
        # vLLM driver reads its parts): PVCResult.text, up to here.
        # Its last character lies in the last few tokens (at most 4 bytes): decode those, not a
        # whole long part, unless they are special tokens only.
        text_before = ""
        for _, ids in reversed(self.transcript):
            text_before = self.tokenizer.decode(ids[-8:], skip_special_tokens=True)
            if not text_before and len(ids) > 8:
                text_before = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text_before:
                break
        return bridge_ids(self.tokenizer, self.config.bridge, text_before)

    def _evict_images(self) -> int:
        """kv mode: drop every image block from the cache, re-rotating what follows to the
        positions of the sequence without them (``self.layout`` becomes that sequence).
        Returns the entries dropped."""
        torch = _torch()
        lay = self.layout
        cached = len(lay.ids) - 1  # the pending last token is not in the cache
        after, kept = _drop_images(lay)
        # Each kept entry's delta (new - old position); every image block leaves the cache in one
        # pass, the cached entries kept from the first block on moving down to close the gaps.
        delta = torch.zeros(len(lay.ids), 3, dtype=torch.long)
        delta[kept] = (after.positions - lay.positions[:, kept]).T
        spans = [(start, end) for start, end, _ in lay.spans]
        moved = kept.clone()
        moved[: spans[0][0] if spans else cached] = False
        moved[cached:] = False
        keys = [layer.keys for layer in self.cache.layers]
        values = [layer.values for layer in self.cache.layers]
        new_length = relocate_spans(keys, values, spans, delta=delta[moved], length=cached, **self.rope.kwargs())
        dropped = cached - new_length
        self.cache.crop(-dropped)
        self.blocks = _merge_text([b for b in self.blocks if isinstance(b, _Text)])
        self.layout = after
        return dropped

    def calibrate(self, calibration: Any = None) -> CalibrationRecord:
        """Give the image again now, after the last token of ``sequence`` (which must be the
        pending token: not yet in the cache). Returns the record."""
        torch = _torch()
        if self.cache is None:
            self.prefill()
        if self.layout.spans and self.layout.spans[-1][1] == len(self.layout.ids):
            raise RuntimeError("calibrate: no token since the last image block (generate or extend() first)")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        mode = self.config.mode
        images = self._pooled_images() if self.prune is None else self._pruned_images()
        bridge = self._bridge_ids()
        before_len = len(self.layout.ids)
        evicted = 0
        if mode == PVCMode.APPEND:
            start = len(self.layout.ids) - 1
        elif mode == PVCMode.RELOCATE:
            evicted = sum(b.tokens + 2 for b in self.blocks if isinstance(b, _Image))
            self.blocks = _merge_text([b for b in self.blocks if isinstance(b, _Text)])
            self.layout = _drop_images(self.layout)[0]
            self.cache = self._new_cache()
            start = 0
        else:  # kv
            evicted = self._evict_images()
            start = before_len - 1 - evicted
        tail = _merge_text([_Text(list(bridge))] + list(images))
        self.blocks = _merge_text(self.blocks + tail)
        # Positions of what is added, counted on from the sequence so far (M-RoPE positions of a
        # suffix only depend on where it starts): the earlier sequence is not laid out again.
        self.layout = _concat(self.layout, self._layout(tail))
        # The last <|vision_end|> is left out: it is the first input of the next generate segment.
        end = len(self.layout.ids) - 1
        self._forward(self.layout, start, end)
        sync()
        seconds = time.perf_counter() - t0
        bridge_at = len(self.layout.ids) - sum(img.tokens + 2 for img in images) - len(bridge)
        record = CalibrationRecord(
            index=len(self.records),
            token_index=int(calibration.token_index) if calibration is not None else len(self.generated) - 1,
            reason=getattr(calibration, "reason", "manual"),
            phrase=getattr(calibration, "phrase", None),
            mode=mode,
            visual_tokens=sum(img.tokens for img in images),
            grids=[tuple(img.grid) for img in images],
            evicted_tokens=evicted,
            prefilled_tokens=end - start,
            seconds=seconds,
            bridge_ids=list(bridge),
            sequence_index=bridge_at,
        )
        self.records.append(record)
        self.transcript.append(("bridge", list(bridge)))
        return record
