"""PVC ``kv`` mode inside vLLM: a KV connector that fills a continuation's cache from the request
it continues, by moving entries instead of computing them.

At a calibration in ``kv`` mode the driver (:func:`tvc_rs.vllm.generate`) ends the request at the
calibration token and submits a continuation that carries ``relocate``'s token sequence (prompt
without its image blocks, the text so far with earlier bridges, the bridge, the compressed
image). The stopped request and its continuation share every text token but the last generated
one; this connector makes vLLM take those from the stopped request's blocks:

- scheduler side: ``request_finished`` keeps the stopped request's blocks (returns ``True``:
  vLLM frees them only once a worker reports the request in ``finished_sending``);
  ``get_num_new_matched_tokens`` reports the shared tokens as computed (a synchronous load),
  ``update_state_after_alloc`` records the continuation's blocks, ``build_connector_meta``
  turns both into slot lists;
- worker side: ``start_load_kv`` gathers the entries, re-rotates each key by its integer
  M-RoPE delta (new position minus old, per token, in float64: tvc-rs' kernels) and scatters
  them into the continuation's blocks before the forward pass; ``get_finished`` then reports the
  stopped request, whose blocks vLLM frees.

So a continuation prefills only the last generated token, the bridge and the compressed image,
as ``tvc_rs.hf.generate(..., mode="kv")`` does. Each tensor-parallel rank moves the heads it
holds (its own cache tensors); the scheduler waits for every rank's report.

Registered through vLLM's own mechanism, :func:`kv_transfer_config` (``KVTransferConfig`` with
``kv_connector_module_path``); nothing in vLLM is patched. Requests that carry no
``kv_transfer_params["tvc_kv"]`` are not touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["TVCKVConnector", "kv_transfer_config", "kv_mode_refusal", "PARAMS_KEY"]

logger = logging.getLogger("vllm.tvc_rs.kv")

PARAMS_KEY = "tvc_kv"
"""The key of the connector's settings in a request's ``kv_transfer_params``."""

# A held request nobody continued (the driver died, a session was cancelled) is let go after this.
_HOLD_SECONDS = 600.0


def kv_transfer_config() -> dict:
    """The ``kv_transfer_config`` that gives an engine PVC's ``kv`` mode:
    ``LLM(..., kv_transfer_config=tvc_rs.vllm_kv.kv_transfer_config())`` (or
    ``--kv-transfer-config`` with this dict as JSON)."""
    return {
        "kv_connector": "TVCKVConnector",
        "kv_connector_module_path": "tvc_rs.vllm_kv",
        "kv_role": "kv_both",
    }


def kv_mode_refusal(model_config: Any) -> Optional[str]:
    """Why the model cannot use ``kv`` mode (None when it can): layers that keep a recurrent state
    (Mamba, linear attention) summarise the whole context, image included, in one state that
    cannot be evicted from or re-positioned, and attention-free models have no cache to move."""
    hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    kinds = [str(k) for k in (getattr(hf, "layer_types", None) or ())]
    recurrent = sorted({k for k in kinds if k not in ("attention", "full_attention", "sliding_attention")})
    if getattr(model_config, "is_attention_free", False):
        return "the model is attention-free: it keeps a recurrent state, no KV cache whose image entries could be evicted"
    if recurrent or getattr(model_config, "is_hybrid", False):
        what = f" ({', '.join(recurrent)} layers)" if recurrent else ""
        return (
            f"the model is a hybrid with layers that keep a recurrent state instead of a KV cache{what}: that state "
            "has absorbed the image and cannot be evicted from or re-rotated; use mode 'relocate' or 'append'"
        )
    return None


@dataclass
class _Load:
    source: str
    src_slots: np.ndarray  # [n] int64
    dst_slots: np.ndarray  # [n] int64
    delta: np.ndarray  # [n, 3] int64


@dataclass
class TVCKVMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)  # held requests whose blocks may go


@dataclass
class _Held:
    request_id: str  # vLLM's (internal) id, which finished_sending must name
    block_ids: list[int]
    since: float


class TVCKVConnector(KVConnectorBase_V1):
    """See the module doc. Made by vLLM (one per role and rank), never by hand."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        model_config = vllm_config.model_config
        self._block_size = vllm_config.cache_config.block_size
        self._refusal = kv_mode_refusal(model_config)
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if self._refusal is None and len(groups) > 1:
            self._refusal = f"the model's cache has {len(groups)} groups (layers of different kinds); kv mode needs one"
        # scheduler side
        self._held: dict[str, _Held] = {}
        self._planned: dict[str, tuple[str, np.ndarray]] = {}  # request -> (source, segments)
        self._loads: list[_Load] = []
        self._releases: list[str] = []
        # worker side
        self._caches: list[torch.Tensor] = []
        self._layout: Optional[tuple] = None
        self._finished: set[str] = set()
        try:
            self._rope = _rope_kwargs(model_config)
        except ValueError:
            # Not a model kv mode knows: the engine still serves it (the driver refuses kv requests).
            self._rope = None

    # ---------------------------------------------------------------- scheduler side

    @staticmethod
    def _params(request: "Request") -> Optional[dict]:
        params = getattr(request, "kv_transfer_params", None)
        value = params.get(PARAMS_KEY) if isinstance(params, dict) else None
        return value if isinstance(value, dict) else None

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = self._params(request)
        if params is None or "source" not in params:
            return 0, False
        source = str(params["source"])
        if self._refusal is not None or source not in self._held:
            if source in self._held:
                self._releases.append(self._held.pop(source).request_id)
            logger.warning("TVC kv: request %s is prefilled in full (%s)", request.request_id,
                           self._refusal or f"the blocks of {source} are not held")
            return 0, False
        segments = np.asarray(params["segments"], dtype=np.int64).reshape(-1, 6)
        shared = int(segments[:, 2].sum()) if len(segments) else 0
        self._planned[request.request_id] = (source, segments)
        return max(0, shared - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        plan = self._planned.pop(request.request_id, None)
        if plan is None:
            return
        source, segments = plan
        held = self._held.pop(source, None)
        if held is None:
            return
        self._releases.append(held.request_id)
        if num_external_tokens <= 0:
            return
        dst_blocks = np.asarray(blocks.get_block_ids()[0], dtype=np.int64)
        src_blocks = np.asarray(held.block_ids, dtype=np.int64)
        shared = int(segments[:, 2].sum())
        first = shared - num_external_tokens  # tokens before it came from the prefix cache
        dst, src, delta = [], [], []
        for d0, s0, n, dt, dh, dw in segments.tolist():
            lo = max(d0, first)
            if lo >= d0 + n:
                continue
            i = np.arange(lo, d0 + n, dtype=np.int64)
            j = i - d0 + s0
            dst.append(i)
            src.append(j)
            delta.append(np.broadcast_to(np.asarray([dt, dh, dw], dtype=np.int64), (len(i), 3)))
        if not dst:
            return
        i, j = np.concatenate(dst), np.concatenate(src)
        bs = self._block_size
        self._loads.append(
            _Load(
                source=held.request_id,
                src_slots=src_blocks[j // bs] * bs + j % bs,
                dst_slots=dst_blocks[i // bs] * bs + i % bs,
                delta=np.ascontiguousarray(np.concatenate(delta)),
            )
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        now = time.monotonic()
        for key in [k for k, h in self._held.items() if now - h.since > _HOLD_SECONDS]:
            held = self._held.pop(key)
            logger.warning("TVC kv: the blocks of %s were held %.0f s without a continuation; freed", held.request_id, _HOLD_SECONDS)
            self._releases.append(held.request_id)
        meta = TVCKVMetadata(loads=self._loads, releases=self._releases)
        self._loads, self._releases = [], []
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, Optional[dict]]:
        params = self._params(request)
        if params is None or self._refusal is not None:
            return False, None
        hold = params.get("hold")
        # Held only when the request stopped at its calibration token: the driver continues it.
        if hold is None or request.stop_reason != hold or not block_ids:
            return False, None
        # Keyed by the driver's name for the part: vLLM's own id gets a random suffix the driver
        # of an AsyncLLM never sees.
        self._held[str(params.get("key", request.request_id))] = _Held(request.request_id, list(block_ids), time.monotonic())
        return True, None

    def has_pending_block_frees(self) -> bool:
        return bool(self._releases)

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._caches = list(kv_caches.values())
        if self._caches:
            self._layout = _detect_layout(self._caches[0], self._vllm_config)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TVCKVMetadata)
        for load in meta.loads:
            self._move(load)
            self._finished.add(load.source)
        self._finished.update(meta.releases)

    def _move(self, load: _Load) -> None:
        from tvc_rs.kv import paged_reinject, rerotate_keys

        kind = self._layout[0] if self._layout else None
        if kind in ("vllm", "kv_blocks", "blocks_kv"):  # CUDA: tvc-rs' paged kernel, K and V in one pass
            caches = self._caches
            device = caches[0].device
            paged_reinject(caches, load.src_slots, load.dst_slots, torch.from_numpy(load.delta).to(device), layout=kind, **self._rope)
            return
        if kind != "cpu_attn":
            raise RuntimeError(f"TVC kv: unsupported KV cache layout {self._layout!r}")
        _, key_strides, value_strides = self._layout
        # Slots count in the scheduler's blocks; a kernel block may be smaller (vLLM splits a
        # block into consecutive kernel blocks), so blocks and offsets come from the cache's own size.
        bs = self._caches[0].shape[2]
        src_b, src_o = (torch.from_numpy(load.src_slots // bs), torch.from_numpy(load.src_slots % bs))
        dst_b, dst_o = (torch.from_numpy(load.dst_slots // bs), torch.from_numpy(load.dst_slots % bs))
        views = [(_view(c, *key_strides), _view(c, *value_strides)) for c in self._caches]
        keys = [k[src_b, :, src_o, :].contiguous() for k, _ in views]  # [n, heads, head_dim] each
        values = [v[src_b, :, src_o, :].clone() for _, v in views]
        rerotate_keys(keys, torch.from_numpy(load.delta), **self._rope)
        for (k, v), nk, nv in zip(views, keys, values):
            k[dst_b, :, dst_o, :] = nk
            v[dst_b, :, dst_o, :] = nv

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        done, self._finished = self._finished, set()
        return (done or None), None


# ---------------------------------------------------------------- helpers


def _rope_kwargs(model_config: Any) -> dict:
    """The kernels' rope keywords for the engine's model, read from its config by the one reader
    (pair layout, partial rotary, the interleaved frequency map of Qwen3-VL / Qwen3.5 included)."""
    from tvc_rs.kv import rope_settings

    return rope_settings(model_config.hf_config)


def _view(cache: torch.Tensor, offset: int, token_stride: int, dim_stride: int) -> torch.Tensor:
    """``[blocks, heads, block_size, head_dim]`` view of the keys or values of one CPU_ATTN cache
    ``[blocks, heads, block_size, 2 * head_dim]``."""
    nb, heads, bs, twice = cache.shape
    hd = twice // 2
    sb, sh = cache.stride(0), cache.stride(1)
    return cache.as_strided((nb, heads, bs, hd), (sb, sh, token_stride, dim_stride), cache.storage_offset() + offset)


def _detect_layout(cache: torch.Tensor, vllm_config: Any) -> tuple:
    """Where a token's key and value lie in the cache. CUDA: the layouts of tvc-rs' paged kernel
    (``[blocks, heads, block_size, 2 * head_dim]``, K and V together per head as vLLM 0.33 keeps
    them; ``[2, blocks, ...]`` / ``[blocks, 2, ...]`` of earlier FlashAttention / FlashInfer).
    CPU: vLLM's CPU_ATTN backend keeps per block and head ``block_size`` keys then
    ``block_size`` values, and its kernel may store the keys dimension-major; where they go is
    found by writing known keys with the backend's own cache-write op into a scratch block."""
    if cache.device.type == "cuda":
        if cache.dim() == 4:
            return ("vllm",)
        if cache.dim() == 5 and cache.shape[0] == 2:
            return ("kv_blocks",)
        if cache.dim() == 5 and cache.shape[1] == 2:
            return ("blocks_kv",)
        return ("unknown", tuple(cache.shape))
    if cache.dim() != 4 or not cache.is_contiguous():
        return ("unknown", tuple(cache.shape))
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    _, heads, bs, twice = cache.shape
    hd = twice // 2
    isa = _get_attn_isa(cache.dtype, bs, hd, vllm_config.cache_config.cache_dtype)
    scratch = torch.zeros((1, heads, bs, twice), dtype=cache.dtype)
    k_cache, v_cache = scratch.view(1, heads, 2 * bs, hd).chunk(2, dim=2)
    n = bs * hd
    # small integers: exact in every float type
    key = (torch.arange(bs * heads * hd) % 251 + 1).reshape(bs, heads, hd).to(cache.dtype)
    value = -key
    ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, torch.arange(bs, dtype=torch.int64), isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    found = []
    for offset, source in ((0, key), (n, value)):
        for token_stride, dim_stride in ((hd, 1), (1, bs)):
            view = _view(scratch, offset, token_stride, dim_stride)[0]  # [heads, bs, hd]
            if torch.equal(view, source.transpose(0, 1)):
                found.append((offset, token_stride, dim_stride))
                break
        else:
            return ("unknown", tuple(cache.shape), isa)
    return ("cpu_attn", found[0], found[1])
