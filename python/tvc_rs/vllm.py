"""TVC for vLLM 0.33: a logits processor that forces a calibration token at reflection points,
and a driver that continues each request with the image given again (PVC).

``TVCLogitsProcessor`` is one class for both of vLLM 0.33's custom logits-processor interfaces:
the default model runner's (V2, ``vllm.v1.worker.gpu.sample.logits_processor``: ``add_request``,
``apply_staged_writes``, ``apply(logits, ctx)``) and the legacy runner's (``VLLM_USE_V2_MODEL_RUNNER=0``,
``vllm.v1.sample.logits_processor``: ``update_state(BatchUpdate)``, ``apply(logits)``). The wheel
registers it under the ``vllm.logits_processors`` entry point, so every engine in an environment
with tvc-rs installed loads it; it can also be named with ``LLM(logits_processors=[...])`` or
``--logits-processors tvc_rs.vllm:TVCLogitsProcessor``.

A request is watched when its ``SamplingParams.extra_args`` carry TVC settings (see
:class:`TVCSettings`): ``{"tvc": {...}}`` offline, or the flat ``{"tvc": 1, "tvc_min_gap": 64,
...}`` that ``vllm_xargs`` of the OpenAI-compatible server allows. The processor feeds each
watched request's newest token to a Rust ``StreamBatch`` (one ``step`` call per decoding step
for the whole batch, GIL released); when the request's PVC schedule fires, the row is set to
``-inf`` everywhere but the calibration token (``0``), which the request also lists in its
``stop_token_ids``, so vLLM ends it there. Requests without TVC settings are never touched.

Engine-wide settings come from ``additional_config={"tvc": {...}}`` (``--additional-config``):
``calibration_token`` (token string or id, default ``"<|vision_pad|>"``), ``phrases``,
``tokenizer`` (default: the model's).

:func:`generate` drives an offline ``vllm.LLM`` through calibrations (``relocate``, ``append``
and, with tvc-rs' KV connector in the engine (:mod:`tvc_rs.vllm_kv`), ``kv`` modes); :func:`generate_async` does the same for an ``AsyncLLM`` with a streaming-input
session that keeps the request's KV cache (``append`` without any re-prefill).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch

import tvc_rs
from tvc_rs.pvc import DEFAULT_CALIBRATION_TOKEN, PVCConfig, PVCMode, bridge_ids, bridge_text

from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as LegacyLogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

__all__ = [
    "TVCLogitsProcessor",
    "TVCSettings",
    "DEFAULT_CALIBRATION_TOKEN_ID",
    "EXTRA_ARGS_KEY",
    "tvc_sampling_params",
    "TVCRequest",
    "TVCResult",
    "TVCCalibration",
    "generate",
    "generate_async",
]

# A child of vLLM's "vllm" logger, which vLLM configures (handler, level, format): messages
# under any other name (e.g. "tvc_rs.vllm") would go to Python's unconfigured root and be lost.
logger = logging.getLogger("vllm.tvc_rs")

EXTRA_ARGS_KEY = "tvc"
"""The key of the TVC settings in ``SamplingParams.extra_args``."""

DEFAULT_CALIBRATION_TOKEN_ID = 151654
"""``<|vision_pad|>`` in the Qwen2-VL / Qwen2.5-VL / QVQ tokenizers: the calibration token of a
request that names none."""

_NEG_INF = float("-inf")

# --------------------------------------------------------------------------------------------
# Per-request settings
# --------------------------------------------------------------------------------------------

_INT_FIELDS = {
    # name: (minimum, may be None)
    "warmup": (0, False),
    "min_gap": (0, False),
    "max_calibrations": (0, True),
    "period": (1, True),
    "calibrations_made": (0, False),
    "tokens_since_last": (0, True),
    "calibration_token": (0, True),
}
_U32_FIELDS = ("max_calibrations", "calibrations_made")


@dataclass(frozen=True)
class TVCSettings:
    """The TVC settings of one request, as carried in ``SamplingParams.extra_args``.

    Nested form (offline ``SamplingParams``): ``extra_args={"tvc": {"min_gap": 64, ...}}``
    (``{}`` for all defaults). Flat form (what ``vllm_xargs`` of the OpenAI-compatible server
    accepts): ``{"tvc": 1, "tvc_min_gap": 64, ...}``. ``"tvc"`` absent, ``None``, ``False`` or
    ``0``: TVC is off for the request.

    Attributes:
        warmup, min_gap, max_calibrations, period: the PVC schedule (``tvc_rs.PVCSchedule``).
        calibrations_made: calibrations earlier parts of the same answer made (a continued
            request), counted against ``max_calibrations``.
        tokens_since_last: generated tokens since the last calibration (or since the start),
            for ``min_gap`` and ``period`` (None: as many as this request has generated).
        calibration_token: the token id forced at a calibration (None: the engine's, by
            default ``<|vision_pad|>`` = 151654). It must be in the request's
            ``stop_token_ids``, so that vLLM ends the request there.
    """

    warmup: int = 0
    min_gap: int = 0
    max_calibrations: Optional[int] = None
    period: Optional[int] = None
    calibrations_made: int = 0
    tokens_since_last: Optional[int] = None
    calibration_token: Optional[int] = None

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            _check_int(getattr(self, name), name, name)

    @property
    def schedule(self) -> tvc_rs.PVCSchedule:
        return tvc_rs.PVCSchedule(self.warmup, self.min_gap, self.max_calibrations, self.period)

    @classmethod
    def from_schedule(cls, schedule: tvc_rs.PVCSchedule, **kwargs: Any) -> "TVCSettings":
        return cls(
            warmup=schedule.warmup,
            min_gap=schedule.min_gap,
            max_calibrations=schedule.max_calibrations,
            period=schedule.period,
            **kwargs,
        )

    def to_extra_args(self) -> dict:
        """The nested form, ``{"tvc": {...}}`` (only the fields that differ from the defaults)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {EXTRA_ARGS_KEY: {k: v for k, v in values.items() if v != defaults[k]}}

    @classmethod
    def from_extra_args(cls, extra_args: Optional[dict]) -> Optional["TVCSettings"]:
        """The settings in ``extra_args``, or None when TVC is off for the request.

        Raises:
            ValueError: a setting of the wrong type or range, an unknown ``tvc_*`` key, or both
                forms at once; the message names the key.
        """
        if not extra_args:
            return None
        flat = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith(EXTRA_ARGS_KEY + "_")}
        switch = extra_args.get(EXTRA_ARGS_KEY)
        if isinstance(switch, dict):
            if flat:
                raise ValueError(
                    f"extra_args: {', '.join(sorted(flat))} given together with extra_args['tvc'] as a dict; "
                    "use one form: {'tvc': {'min_gap': 64}} or {'tvc': 1, 'tvc_min_gap': 64}"
                )
            values, where = switch, "extra_args['tvc']"
            unknown = [k for k in values if k not in _INT_FIELDS]
            if unknown:
                raise ValueError(
                    f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(_INT_FIELDS)})"
                )
        else:
            if switch is None or switch is False or (type(switch) is int and switch == 0):
                if flat:
                    raise ValueError(
                        f"extra_args: {', '.join(sorted(flat))} given but TVC is not enabled for the request "
                        "(set extra_args['tvc'] to 1 or to a dict of settings)"
                    )
                return None
            if switch is not True and not (type(switch) is int and switch == 1):
                raise ValueError(
                    f"extra_args['tvc'] = {switch!r}: expected a dict of TVC settings, 1 / True (on, with "
                    "tvc_* keys for the settings) or 0 / False / None (off)"
                )
            values, where = {}, "extra_args"
            for key, value in flat.items():
                name = key[len(EXTRA_ARGS_KEY) + 1 :]
                if name not in _INT_FIELDS:
                    raise ValueError(f"extra_args: unknown setting {key!r} (known: tvc_{', tvc_'.join(_INT_FIELDS)})")
                values[name] = value
        for name, value in values.items():
            label = f"{where}[{name!r}]" if where != "extra_args" else f"extra_args['tvc_{name}']"
            _check_int(value, label, name)
        return cls(**values)

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Optional["TVCSettings"]:
        return cls.from_extra_args(params.extra_args)


def _check_int(value: Any, label: str, name: str) -> None:
    """``value`` of setting ``name`` (``label`` in messages): an int in its range. ValueError
    for anything else (vLLM turns ValueError from ``validate_params`` into HTTP 400)."""
    minimum, nullable = _INT_FIELDS[name]
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        expected = f"an integer >= {minimum}" + (" or None" if nullable else "")
        raise ValueError(f"{label} = {value!r}: expected {expected}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{label} = {value}: must be >= {minimum}")
    limit = 2**32 - 1 if name in _U32_FIELDS else 2**63 - 1
    if value > limit:
        raise ValueError(f"{label} = {value}: must be <= {limit}")


def tvc_sampling_params(
    params: Optional[SamplingParams] = None,
    schedule: Optional[tvc_rs.PVCSchedule] = None,
    *,
    calibration_token: int = DEFAULT_CALIBRATION_TOKEN_ID,
    calibrations_made: int = 0,
    tokens_since_last: Optional[int] = None,
    max_tokens: Optional[int] = None,
) -> SamplingParams:
    """A copy of ``params`` (default ``SamplingParams()``) with TVC on: the settings in
    ``extra_args["tvc"]`` and ``calibration_token`` added to ``stop_token_ids``.
    ``max_tokens``, when given, replaces the copy's. ``params`` is not modified."""
    params = SamplingParams() if params is None else params
    settings = TVCSettings.from_schedule(
        schedule if schedule is not None else tvc_rs.PVCSchedule(),
        calibrations_made=calibrations_made,
        tokens_since_last=tokens_since_last,
        calibration_token=calibration_token,
    )
    if params.structured_outputs is not None:
        raise ValueError("params: TVC cannot be combined with structured_outputs (a forced token would break the grammar)")
    extra = {k: v for k, v in (params.extra_args or {}).items() if not (k == EXTRA_ARGS_KEY or k.startswith(EXTRA_ARGS_KEY + "_"))}
    extra.update(settings.to_extra_args())
    stop_ids = list(dict.fromkeys([*(params.stop_token_ids or []), calibration_token]))
    new = params.clone()
    new.extra_args = extra
    new.stop_token_ids = stop_ids
    new._all_stop_token_ids = set(new._all_stop_token_ids) | {calibration_token}
    if max_tokens is not None:
        new.max_tokens = max_tokens
    return new


# --------------------------------------------------------------------------------------------
# The logits processor
# --------------------------------------------------------------------------------------------


def _engine_settings(vllm_config: "VllmConfig") -> dict:
    extra = getattr(vllm_config, "additional_config", None)
    settings = extra.get(EXTRA_ARGS_KEY) if isinstance(extra, dict) else None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"additional_config['tvc']: expected a dict of TVC engine settings, got {type(settings).__name__}")
    unknown = set(settings) - {"calibration_token", "phrases", "tokenizer"}
    if unknown:
        raise ValueError(
            f"additional_config['tvc']: unknown setting {sorted(unknown)[0]!r} (known: calibration_token, phrases, tokenizer)"
        )
    return settings


def _named_explicitly(cls: type, vllm_config: "VllmConfig") -> bool:
    """Whether the engine was asked for TVC (not only loaded through the entry point)."""
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict) and EXTRA_ARGS_KEY in extra:
        return True
    names = getattr(vllm_config.model_config, "logits_processors", None) or ()
    fqcn = f"{cls.__module__}:{cls.__qualname__}"
    return any(n is cls or (isinstance(n, type) and issubclass(n, cls)) or n == fqcn for n in names)


def _load_tokenizer(vllm_config: "VllmConfig", source: Any):
    """A ``tokenizers.Tokenizer``: from ``source`` (path), else the model's tokenizer folder,
    else through vLLM's own tokenizer loading (remote names, revisions)."""
    from tokenizers import Tokenizer

    model_config = vllm_config.model_config
    for candidate in ([source] if source is not None else []) + [getattr(model_config, "tokenizer", None)]:
        if candidate is None:
            continue
        path = Path(os.fspath(candidate))
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.is_file():
            return Tokenizer.from_file(str(path))
        if source is not None and candidate is source:
            raise OSError(f"additional_config['tvc']['tokenizer'] = {os.fspath(source)!r}: no tokenizer.json there")
    if getattr(model_config, "skip_tokenizer_init", False):
        raise ValueError("the engine runs with skip_tokenizer_init; give additional_config['tvc']['tokenizer']")
    from vllm.tokenizers import cached_tokenizer_from_config

    hf = cached_tokenizer_from_config(model_config)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"the model's tokenizer ({type(hf).__name__}) is not a fast tokenizer; give additional_config['tvc']['tokenizer']")
    return backend


class TVCLogitsProcessor(V2LogitsProcessor, LegacyLogitsProcessor):
    """Forces a calibration token where a request's PVC schedule fires (see the module doc).

    Constructed by vLLM, never by hand: ``(vllm_config, req_states)`` by the V2 model runner,
    ``(vllm_config, device, is_pin_memory)`` by the legacy one; one instance per worker (each
    tensor-parallel rank has its own and sees every request; under batch-sharded sampling each
    rank applies it to the requests it samples, slot ``% tp_size``).

    Engine-wide settings: ``additional_config={"tvc": {"calibration_token": ..., "phrases":
    [...], "tokenizer": path}}``. When TVC is asked for explicitly (``additional_config["tvc"]``
    given, or the class named in ``logits_processors``) the tokenizer and detector are loaded at
    start and a tokenizer without the calibration token is refused there (``ValueError``).
    Loaded only through the entry point, the processor loads them on the first TVC request and,
    if that fails, logs an error and leaves TVC requests untouched rather than stop an engine
    that never asked for TVC.
    """

    def __init__(self, vllm_config: "VllmConfig", *args: Any, **kwargs: Any) -> None:
        self._vllm_config = vllm_config
        if args and isinstance(args[0], LogitsProcRequestState) or "req_states" in kwargs:
            self._runner = "v2"
            req_states = args[0] if args else kwargs["req_states"]
            self._req_states: Optional[LogitsProcRequestState] = req_states
            capacity = req_states.max_num_reqs
            self._device = req_states.device
            self._vocab_size = req_states.vocab_size
        else:
            self._runner = "legacy"
            self._req_states = None
            capacity = vllm_config.scheduler_config.max_num_seqs
            self._device = args[0] if args else kwargs.get("device")
            self._vocab_size = vllm_config.model_config.get_vocab_size()
        self._capacity = int(capacity)
        self._settings = _engine_settings(vllm_config)
        self._explicit = _named_explicitly(type(self), vllm_config)

        cap = self._capacity
        self._watched = np.zeros(cap, dtype=bool)
        self._cal_token = np.zeros(cap, dtype=np.int64)
        self._num_watched = 0
        self._new_slots: list[int] = []  # V2: slots added since the last apply_staged_writes
        self._outputs: list[Optional[list[int]]] = [None] * cap  # legacy: output-token lists
        self._warned: set[str] = set()
        if self._req_states is not None:
            self._prompt_len = self._req_states.prompt_len.np
            self._prefill_len = self._req_states.prefill_len.np

        self._state = "unloaded"  # "ready" | "failed"
        self._streams = None
        self._default_cal_token = -1
        if self._explicit:
            self._load(strict=True)

    # ---- setup -------------------------------------------------------------------------------

    def _load(self, strict: bool) -> bool:
        """Loads the tokenizer and detector; True when TVC can run."""
        if self._state != "unloaded":
            return self._state == "ready"
        try:
            tokenizer = _load_tokenizer(self._vllm_config, self._settings.get("tokenizer"))
            token = self._settings.get("calibration_token", DEFAULT_CALIBRATION_TOKEN)
            token_id = self._resolve_token(tokenizer, token)
            phrases = self._settings.get("phrases")
            detector = tvc_rs.ReflectionDetector(tokenizer, phrases)
        except Exception as error:
            self._state = "failed"
            if strict:
                raise
            logger.error("TVC is off for this engine: %s", error)
            return False
        self._streams = detector.batch(self._capacity, out_of_vocab="no_text")
        self._default_cal_token = token_id
        self._state = "ready"
        logger.info(
            "TVC logits processor ready (%s model runner, %d slots, calibration token %r = %d, %d phrases)",
            self._runner, self._capacity, token, token_id, len(detector.phrases),
        )
        return True

    def _resolve_token(self, tokenizer: Any, token: Any) -> int:
        if isinstance(token, bool) or not isinstance(token, (int, str)):
            raise ValueError(f"additional_config['tvc']['calibration_token'] = {token!r}: expected a token string or id")
        if isinstance(token, str):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"calibration token {token!r}: the tokenizer has no such token; TVC needs a token the model never "
                    "generates (Qwen2-VL family: '<|vision_pad|>'); set additional_config['tvc']['calibration_token']"
                )
        else:
            token_id = token
            if tokenizer.id_to_token(token_id) is None:
                raise ValueError(f"calibration token id {token_id}: not a token of the tokenizer")
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(
                f"calibration token {token!r} = {token_id}: outside the model's logits (vocab_size {self._vocab_size})"
            )
        return token_id

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # ---- interface shared by both runners ----------------------------------------------------

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuses TVC settings of the wrong type or range (``ValueError``; vLLM turns it into a
        ``VLLMValidationError``, HTTP 400), a calibration token missing from ``stop_token_ids``,
        and TVC together with structured outputs."""
        settings = TVCSettings.from_sampling_params(sampling_params)
        if settings is None:
            return
        if settings.calibration_token is not None and settings.calibration_token not in (sampling_params.stop_token_ids or ()):
            raise ValueError(
                f"extra_args['tvc']: calibration_token {settings.calibration_token} must also be in stop_token_ids "
                f"(got {sampling_params.stop_token_ids}), so that the request ends at a calibration"
            )
        if sampling_params.structured_outputs is not None:
            raise ValueError("extra_args['tvc']: TVC cannot be combined with structured_outputs (a forced token would break the grammar)")

    def is_argmax_invariant(self) -> bool:
        """A forced token changes greedy decoding too."""
        return False

    def _watch(self, slot: int, params: SamplingParams) -> bool:
        """Starts watching ``slot`` if ``params`` carries TVC settings; False when it does not."""
        if self._watched[slot]:
            self._unwatch(slot)
        try:
            settings = TVCSettings.from_sampling_params(params)
        except ValueError as error:  # validate_params refused it at admission already
            self._warn_once("invalid", "TVC settings ignored: %s", error)
            return False
        if settings is None or not self._load(strict=False):
            return False
        token = settings.calibration_token if settings.calibration_token is not None else self._default_cal_token
        if token not in (params.stop_token_ids or ()):
            self._warn_once(
                "stop", "TVC request ignored: its calibration token %d is not in its stop_token_ids %s", token, params.stop_token_ids
            )
            return False
        if token >= self._vocab_size:
            self._warn_once("range", "TVC request ignored: calibration token %d >= vocab_size %d", token, self._vocab_size)
            return False
        self._streams.add(
            slot, settings.schedule, calibrations_made=settings.calibrations_made, tokens_since_last=settings.tokens_since_last
        )
        self._watched[slot] = True
        self._cal_token[slot] = token
        self._num_watched += 1
        return True

    def _unwatch(self, slot: int) -> None:
        if self._watched[slot]:
            self._watched[slot] = False
            self._num_watched -= 1
            self._streams.remove(slot)
        self._outputs[slot] = None

    def _force(self, logits: torch.Tensor, rows: np.ndarray, slots: np.ndarray) -> None:
        """Rows ``rows`` of ``logits`` become ``-inf`` everywhere but their slots' calibration
        token (``0``)."""
        tokens = self._cal_token[slots]
        if logits.device.type == "cpu" or rows.size == 1:
            # On the CPU a fill per row is many times faster than index_fill_ / index_put_.
            for row, token in zip(rows.tolist(), tokens.tolist()):
                logits[row].fill_(_NEG_INF)
                logits[row, token] = 0.0
            return
        index = torch.from_numpy(rows.astype(np.int64)).to(logits.device, non_blocking=True)
        logits.index_fill_(0, index, _NEG_INF)
        logits[index, torch.from_numpy(tokens).to(logits.device, non_blocking=True)] = 0.0

    def apply(self, logits: torch.Tensor, ctx: Optional["LogitsContext"] = None) -> torch.Tensor:
        if ctx is None:
            return self._apply_legacy(logits)
        return self._apply_v2(logits, ctx)

    # ---- V2 model runner ---------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """V2: a request enters slot ``req_idx`` (a new one, a resumed one, or the next chunk of
        a streaming-input session); returns whether the processor acts on it."""
        if not self._watch(req_idx, sampling_params):
            return False
        self._new_slots.append(req_idx)
        return True

    def apply_staged_writes(self) -> None:
        """V2: replays the output tokens a resumed (preempted) request brings back, read from
        the runner's token buffer once it has been written."""
        if not self._new_slots:
            return
        req_states = self._req_states
        prompt_len = req_states.prompt_len.np
        prefill_len = req_states.prefill_len.np
        for slot in self._new_slots:
            if self._watched[slot] and prefill_len[slot] > prompt_len[slot]:
                earlier = req_states.all_token_ids.gpu[slot, int(prompt_len[slot]) : int(prefill_len[slot])]
                # A calibration among them is due at the slot's next sampling row.
                self._streams.feed(slot, earlier.cpu().numpy())
        self._new_slots.clear()

    def _apply_v2(self, logits: torch.Tensor, ctx: "LogitsContext") -> torch.Tensor:
        if not self._num_watched:
            return logits
        slots = ctx.idx_mapping_np
        num_reqs = slots.shape[0]
        if ctx.expanded_idx_mapping.shape[0] == num_reqs:
            # One logits row per request (no speculative decoding): row i is request i, whose
            # input position the host-side sequence lengths give exactly.
            # Row i's input token is output number seq_len - 1 - prompt_len of its request; the
            # row samples unless it is an intermediate chunk of a prefill (seq_len < prefill_len).
            input_ids = ctx.input_ids.cpu().numpy()  # the step's one device-to-host copy
            rows = self._streams.advance_seq(slots, ctx.seq_lens_upper_bound_np, input_ids, self._prompt_len, self._prefill_len)
            if rows.size:
                self._force(logits, rows, slots[rows])
            return logits
        return self._apply_v2_speculative(logits, ctx)

    def _apply_v2_speculative(self, logits: torch.Tensor, ctx: "LogitsContext") -> torch.Tensor:
        """Several rows per request (speculative decoding): act on each request's first row,
        whose input is its last committed token; tokens committed since the last step (accepted
        drafts) are read from the runner's token buffer. A trigger completed inside accepted
        drafts is forced at the next step, up to the number of drafts late."""
        host = torch.stack(
            [ctx.expanded_idx_mapping.long(), ctx.expanded_local_pos.long(), ctx.input_ids.long(), ctx.pos.long()]
        ).cpu().numpy()
        first = np.flatnonzero(host[1] == 0)  # a request's rows are consecutive, in batch order
        slots = host[0, first]
        positions = host[3, first]
        index = positions - self._prompt_len[slots]
        sampling = positions + 1 >= self._prefill_len[slots]
        for k in np.flatnonzero(self._watched[slots] & sampling):
            slot = int(slots[k])
            state = self._streams.state(slot)
            seen = 0 if state is None else state[0]
            if index[k] > seen:
                start = int(self._prompt_len[slot]) + seen
                self._streams.feed(slot, self._req_states.all_token_ids.gpu[slot, start : start + int(index[k]) - seen].cpu().numpy())
        forced = self._streams.advance(slots, index, host[2, first], sampling)
        if forced.size:
            self._force(logits, first[forced], slots[forced])
        return logits

    # ---- legacy model runner -----------------------------------------------------------------

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        """Legacy: follows the persistent batch (removed, then added, then moved)."""
        if batch_update is None:
            return
        watched = self._watched
        for slot in batch_update.removed:
            if watched[slot]:
                self._unwatch(slot)
        for slot, params, _prompt, output_ids in batch_update.added:
            # (replacing whatever the slot held)
            if self._watch(slot, params):
                self._outputs[slot] = output_ids
        for a, b, direction in batch_update.moved:
            if not (watched[a] or watched[b]):
                continue
            if direction == MoveDirectionality.SWAP:
                self._streams.swap(a, b)
                for array in (self._watched, self._cal_token):
                    array[a], array[b] = array[b], array[a]
                self._outputs[a], self._outputs[b] = self._outputs[b], self._outputs[a]
            else:  # UNIDIRECTIONAL: a's request replaces b's; a is empty afterwards
                if watched[b]:
                    self._unwatch(b)
                if watched[a]:
                    self._streams.move(a, b)
                    watched[b], self._cal_token[b] = True, self._cal_token[a]
                    self._outputs[b] = self._outputs[a]
                    watched[a] = False
                    self._outputs[a] = None

    def _apply_legacy(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._num_watched:
            return logits
        # Rows are slots. Every watched request's list is read for the tokens it gained; a
        # calibration due is forced until the next token shows the forced sample was taken (a
        # request still in its prefill has its sample dropped).
        slots, blind = self._streams.advance_lists(self._outputs, logits.shape[0])
        for slot in blind:
            # A placeholder: under async scheduling the legacy runner fills in sampled ids only
            # when a logits processor named in `logits_processors` is loaded.
            self._warn_once(
                "placeholder",
                "TVC cannot see the tokens of its requests (async scheduling with the legacy model runner and TVC "
                "loaded only through the entry point): pass logits_processors=['tvc_rs.vllm:TVCLogitsProcessor'] "
                "(--logits-processors tvc_rs.vllm:TVCLogitsProcessor) or use the V2 model runner; TVC requests are "
                "left untouched",
            )
            self._unwatch(slot)
        if slots.size:
            self._force(logits, slots, slots)
        return logits


# --------------------------------------------------------------------------------------------
# The PVC driver
# --------------------------------------------------------------------------------------------


@dataclass
class TVCRequest:
    """One request for :func:`generate` / :func:`generate_async`.

    Attributes:
        prompt: the prompt with the chat template applied (text, or its token ids), holding one
            ``<|vision_start|><|image_pad|><|vision_end|>`` per image, as Qwen2-VL's template
            writes it (vLLM expands each ``<|image_pad|>`` to the image's tokens).
        images: the images, in prompt order (``PIL.Image``).
        sampling_params: the request's sampling settings (default ``SamplingParams()``);
            ``max_tokens`` counts the tokens of the whole answer, over all its parts.
        vision_features: optional, per image, ``(features, grid_thw)``: the vision tower's
            output for the image (``[t*h*w/4, hidden]``, after the 2x2 merge) and its
            ``image_grid_thw`` row ``(t, h, w)`` in patches. When given, images go to the model
            as ``image_embeds`` (the engine needs ``enable_mm_embeds=True``) and the re-injected
            image is the features pooled ``pool x pool`` on the merged grid; otherwise the
            re-injected image is the image downscaled so that its token grid shrinks by ``pool``.
            Not for GLM-4.1V (vLLM's GLM takes no ``image_embeds``: refused with a message).
        request_id: a name for the result (default: the request's index).
    """

    prompt: str | Sequence[int]
    images: Sequence[Any] = ()
    sampling_params: Optional[SamplingParams] = None
    vision_features: Optional[Sequence[tuple[Any, Sequence[int]]]] = None
    request_id: Optional[str] = None


@dataclass
class TVCCalibration:
    """A calibration of one answer.

    Attributes:
        token_index: the generated token (0-based over the whole answer, model tokens only)
            after which the image was given again.
        reason: ``"trigger"`` (a reflection phrase) or ``"period"``; ``"unknown"`` if the
            engine stopped at the calibration token but the driver's own replay of the schedule
            found no calibration there (different phrases configured, or the model produced the
            token itself).
        phrase: the trigger phrase (None for ``"period"``).
        mode: the ``PVCMode`` (equal to its string, ``"relocate"``, ``"append"`` or ``"kv"``).
        image_tokens: visual tokens injected (all images of the request, compressed).
    """

    token_index: int
    reason: str
    phrase: Optional[str]
    mode: PVCMode
    image_tokens: int


@dataclass
class TVCResult:
    """What :func:`generate` returns per request.

    Attributes:
        request_id: the request's ``request_id`` (or its index).
        text: the answer: the generated text with each calibration's bridge phrase in place
            (no vision tokens).
        token_ids: the tokens the model generated (bridge phrases and images excluded).
        calibrations: the calibrations, in order.
        finish_reason: the last part's (``"stop"``, ``"length"``, ...).
        prompt_tokens: per part of the answer (the first request, then one per calibration),
            the context its prefill ran over, images expanded: the engine request's prompt, or
            in a streaming-input session (:func:`generate_async`, append) everything the request
            held once the part's chunk was added.
        cached_tokens: per part, the tokens of that context that were not computed again
            (vLLM's prefix-cache hits, or in a streaming session everything before the chunk;
            None where vLLM did not report it): ``prompt_tokens - cached_tokens`` is what each
            part cost to prefill.
    """

    request_id: str
    text: str
    token_ids: list[int]
    calibrations: list[TVCCalibration]
    finish_reason: Optional[str]
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[Optional[int]] = field(default_factory=list)


def _check_kv_engine(vllm_config: "VllmConfig") -> None:
    """kv mode needs tvc-rs' KV connector in the engine and a model whose every layer keeps a KV cache."""
    from tvc_rs.vllm_kv import kv_mode_refusal

    why = kv_mode_refusal(vllm_config.model_config)
    if why is not None:
        raise ValueError(f"pvc.mode = 'kv': {why}")
    from tvc_rs.kv import rope_settings

    try:
        rope_settings(vllm_config.model_config.hf_config)
    except ValueError as error:
        raise ValueError(f"pvc.mode = 'kv': the keys cannot be re-rotated for this model: {error}") from None
    kv = getattr(vllm_config, "kv_transfer_config", None)
    if kv is None or getattr(kv, "kv_connector", None) != "TVCKVConnector" or getattr(kv, "kv_connector_module_path", None) != "tvc_rs.vllm_kv":
        raise ValueError(
            "pvc.mode = 'kv': the engine has no TVC KV connector; start it with "
            "kv_transfer_config=tvc_rs.vllm_kv.kv_transfer_config() (--kv-transfer-config "
            "'{\"kv_connector\": \"TVCKVConnector\", \"kv_connector_module_path\": \"tvc_rs.vllm_kv\", \"kv_role\": \"kv_both\"}')"
        )


# The image block per model family: (config attribute, token as the chat template writes it) of
# the block's start, placeholder and end (issue 15). Ids come from the model's config; the token
# strings only where a config lacks them.
_QWEN_IMAGE_BLOCK = (
    ("vision_start_token_id", "<|vision_start|>"), ("image_token_id", "<|image_pad|>"), ("vision_end_token_id", "<|vision_end|>"),
)
_GLM_IMAGE_BLOCK = (
    ("image_start_token_id", "<|begin_of_image|>"), ("image_token_id", "<|image|>"), ("image_end_token_id", "<|end_of_image|>"),
)
_IMAGE_BLOCKS = {
    "qwen2_vl": _QWEN_IMAGE_BLOCK, "qwen2_5_vl": _QWEN_IMAGE_BLOCK, "qwen3_vl": _QWEN_IMAGE_BLOCK,
    "qwen3_vl_moe": _QWEN_IMAGE_BLOCK, "qwen3_5": _QWEN_IMAGE_BLOCK, "glm4v": _GLM_IMAGE_BLOCK, "glm4v_moe": _GLM_IMAGE_BLOCK,
}


# Families whose vLLM model cannot take precomputed features: vLLM 0.32 / 0.33's GLM-4.1V
# processor uses the default input parser, which has no ``{"image_embeds", "image_grid_thw"}``
# item (Qwen2-VL's, Qwen3-VL's and Qwen3.5's have one).
_NO_IMAGE_EMBEDS = ("glm4v", "glm4v_moe")


def _image_block_ids(vllm_config: Any, token_id: Callable[[str], int]) -> tuple[int, int, int]:
    """(start, placeholder, end) token ids of an image block for the engine's model."""
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    model_type = getattr(hf_config, "model_type", None)
    block = _IMAGE_BLOCKS.get(model_type, _QWEN_IMAGE_BLOCK)
    out = []
    for attribute, token in block:
        value = getattr(hf_config, attribute, None)
        out.append(int(value) if isinstance(value, int) else token_id(token))
    return out[0], out[1], out[2]


def deepstack_levels(hf_config: Any) -> int:
    """DeepStack levels of a Qwen3-VL config (0 for other families). vLLM's Qwen3-VL takes
    ``image_embeds`` with the levels packed on the last dimension, ``[tokens, (1 + levels) *
    out_hidden_size]`` (the main features first, then each level in the order of
    ``vision_config.deepstack_visual_indexes``), as its vision tower returns them: give
    ``vision_features`` in that layout; pooling acts per channel, so every level is pooled as
    the main features."""
    vision = getattr(hf_config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or ())


class _Driver:
    """What every session of one engine shares: tokenizer, special ids, detector, image sizes."""

    def __init__(self, vllm_config: "VllmConfig", tokenizer: Any, pvc: Optional[PVCConfig]) -> None:
        pvc = PVCConfig() if pvc is None else pvc
        if pvc.mode == PVCMode.KV:
            _check_kv_engine(vllm_config)
        if pvc.prune is not None:
            raise ValueError(
                f"pvc.prune = {pvc.prune!r}: not available with vLLM (pruning by attention needs the model's "
                "attention weights, which vLLM does not return); use pool"
            )
        self.pvc = pvc
        self.vllm_config = vllm_config
        self.tokenizer = tokenizer
        engine = _engine_settings(vllm_config)
        engine_phrases = engine.get("phrases")
        if pvc.phrases is not None and engine_phrases is not None and list(pvc.phrases) != list(engine_phrases):
            raise ValueError(
                "pvc.phrases differ from the engine's additional_config['tvc']['phrases']: the driver replays the "
                "engine's decisions and needs the same phrases"
            )
        phrases = pvc.phrases if pvc.phrases is not None else engine_phrases
        self.detector = tvc_rs.ReflectionDetector(tokenizer, None if phrases is None else list(phrases))

        def token_id(token: str) -> int:
            ids = tokenizer.convert_tokens_to_ids([token])
            unk = getattr(tokenizer, "unk_token_id", None)
            if not ids or ids[0] is None or (unk is not None and ids[0] == unk and token != getattr(tokenizer, "unk_token", None)):
                raise ValueError(f"the tokenizer has no token {token!r}")
            return int(ids[0])

        self.calibration_token = token_id(pvc.calibration_token)
        self.vision_start, self.image_pad, self.vision_end = _image_block_ids(vllm_config, token_id)
        self.image_settings = self._image_settings()

    def _image_settings(self) -> dict:
        """patch_size, merge_size, min_pixels, max_pixels and the resize rule of the engine's image
        processor (`tvc_rs.image_processor_settings`)."""
        model_config = self.vllm_config.model_config
        source: Any = model_config.model
        if not os.path.isdir(source):  # a hub name: the file vLLM's processor loaded, from the cache
            try:
                from huggingface_hub import try_to_load_from_cache

                for name in ("preprocessor_config.json", "processor_config.json"):
                    cached = try_to_load_from_cache(source, name, revision=getattr(model_config, "revision", None))
                    if isinstance(cached, str):
                        source = cached
                        break
            except (ImportError, ValueError):
                pass
        try:
            settings = dict(tvc_rs.image_processor_settings(source))
        except (OSError, ValueError, TypeError):
            logger.warning("TVC: no preprocessor_config.json / processor_config.json found for %s; re-injected images sized with "
                           "Qwen2-VL's defaults", model_config.model)
            settings = {}
        # The engine's value: ModelConfig.mm_processor_kwargs is an InitVar (None once the config
        # is built); it lives on the multimodal config.
        overrides = getattr(getattr(model_config, "multimodal_config", None), "mm_processor_kwargs", None) or {}
        for key in ("min_pixels", "max_pixels"):
            if overrides.get(key) is not None:
                settings[key] = int(overrides[key])
        return settings

    def image_block(self) -> list[int]:
        return [self.vision_start, self.image_pad, self.vision_end]


class _Session:
    """One answer through its calibrations: the prompts to submit and the record."""

    def __init__(self, driver: _Driver, request: TVCRequest, request_id: str) -> None:
        self.driver = driver
        self.request_id = request_id
        tok = driver.tokenizer
        ids = tok.encode(request.prompt) if isinstance(request.prompt, str) else [int(t) for t in request.prompt]
        images = list(request.images)
        features = None if request.vision_features is None else list(request.vision_features)
        count = len(features) if features is not None else len(images)
        if count == 0:
            raise ValueError(f"request {request_id}: TVC needs at least one image (images or vision_features)")
        if features is not None and images and len(images) != len(features):
            raise ValueError(
                f"request {request_id}: {len(images)} images but {len(features)} vision_features; give one per image"
            )
        spans = self._image_spans(ids, request_id)
        if len(spans) != count:
            raise ValueError(
                f"request {request_id}: the prompt holds {len(spans)} <|vision_start|><|image_pad|><|vision_end|> "
                f"blocks for {count} images"
            )
        self.prompt_ids = ids
        self.question_ids = [t for i, t in enumerate(ids) if not any(a <= i < b for a, b in spans)]
        self.images = images
        self.features = None
        model_type = getattr(getattr(driver.vllm_config.model_config, "hf_config", None), "model_type", None)
        if features is not None and model_type in _NO_IMAGE_EMBEDS:
            raise ValueError(
                f"request {request_id}: vision_features: vLLM's {model_type} takes no image_embeds (its input parser "
                "has no path for precomputed features with their grid); give the images instead"
            )
        if features is not None:
            self.features = [(_as_tensor(f, f"vision_features[{i}][0]"), _grid(g, f"vision_features[{i}][1]")) for i, (f, g) in enumerate(features)]
            merge = driver.image_settings.get("merge_size", 2)
            for i, (f, (t, h, w)) in enumerate(self.features):
                if h % merge or w % merge or f.shape[0] != t * h * w // (merge * merge):
                    raise ValueError(
                        f"vision_features[{i}]: {f.shape[0]} features for image_grid_thw ({t}, {h}, {w}); expected "
                        f"t*h*w/{merge * merge} = {t * h * w // (merge * merge)} with h and w multiples of {merge}"
                    )
            hf_config = getattr(driver.vllm_config.model_config, "hf_config", None)
            levels = deepstack_levels(hf_config)
            width = getattr(getattr(hf_config, "vision_config", None), "out_hidden_size", None)
            if levels and isinstance(width, int):
                for i, (f, _) in enumerate(self.features):
                    if f.ndim != 2 or f.shape[1] != (1 + levels) * width:
                        raise ValueError(
                            f"vision_features[{i}]: shape {tuple(f.shape)}; this Qwen3-VL model takes image_embeds "
                            f"[tokens, (1 + {levels} DeepStack levels) * {width}] = [tokens, {(1 + levels) * width}] "
                            "(the features and each DeepStack level packed on the last dimension)"
                        )
        self.params = request.sampling_params if request.sampling_params is not None else SamplingParams()
        if self.params.n != 1:
            raise ValueError(f"request {request_id}: sampling_params.n = {self.params.n}; TVC continues one answer, use n=1")
        self.max_tokens = self.params.max_tokens
        self.compressed: Optional[list[tuple[Any, int]]] = None
        self.assistant: list[int] = []  # everything after the prompt: answer parts, bridges, images
        self.injected: list[Any] = []  # multimodal items of the re-injected images
        self.generated: list[int] = []
        self.pieces: list[str] = []
        self.calibrations: list[TVCCalibration] = []
        self.finish_reason: Optional[str] = None
        self.prompt_tokens: list[int] = []
        self.cached_tokens: list[Optional[int]] = []
        self.replay = driver.detector.batch(1, out_of_vocab="no_text")
        # kv mode: the text the continuation shares with the stopped part (prompt without images,
        # answer parts, bridges), the grids of the images of the part now running, and the link
        # that tells the connector which held blocks to fill the next part from.
        self.text_assistant: list[int] = []
        self.grids: list[tuple[int, int, int]] = []
        self.kv_key = f"{request_id}-{uuid.uuid4().hex[:12]}"
        self.kv_link: Optional[dict] = None

    def _image_spans(self, ids: list[int], request_id: str) -> list[tuple[int, int]]:
        d = self.driver
        spans = []
        for i, t in enumerate(ids):
            if t == d.image_pad:
                if not (0 < i < len(ids) - 1 and ids[i - 1] == d.vision_start and ids[i + 1] == d.vision_end):
                    raise ValueError(
                        f"request {request_id}: <|image_pad|> at token {i} is not inside <|vision_start|>...<|vision_end|> "
                        "(give the prompt as the chat template writes it, one <|image_pad|> per image)"
                    )
                spans.append((i - 1, i + 2))
        return spans

    # -- what goes to the engine ----------------------------------------------------------------

    def _settings(self) -> SamplingParams:
        remaining = None if self.max_tokens is None else self.max_tokens - len(self.generated)
        params = tvc_sampling_params(
            self.params,
            self.driver.pvc.schedule,
            calibration_token=self.driver.calibration_token,
            calibrations_made=len(self.calibrations),
            tokens_since_last=0 if self.calibrations else None,
            max_tokens=remaining,
        )
        if self.driver.pvc.mode == PVCMode.KV:
            # The connector holds this part's blocks when it stops at the calibration token, under
            # this part's key; a continuation names the part it continues and what to move.
            link = {"hold": self.driver.calibration_token, "key": f"{self.kv_key}-{len(self.calibrations)}"}
            if self.kv_link is not None:
                link.update(self.kv_link)
            params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": {"tvc_kv": link}}
        return params

    def _mm_data(self) -> dict:
        """The question's images and every injected copy (the first request, append's continuations)."""
        if self.features is not None:
            items = list(self.features) + list(self.injected)
            return {
                "image": {
                    "image_embeds": torch.cat([f for f, _ in items]),
                    "image_grid_thw": torch.tensor([list(g) for _, g in items], dtype=torch.int64),
                }
            }
        return {"image": list(self.images) + list(self.injected)}

    def first(self) -> tuple[dict, SamplingParams]:
        prompt = {"prompt_token_ids": list(self.prompt_ids), "multi_modal_data": self._mm_data()}
        self.grids = [self._item_grid(item) for item in (self.features if self.features is not None else self.images)]
        return prompt, self._settings()

    def continuation(self) -> dict:
        """The next engine prompt, after the latest calibration."""
        if self.driver.pvc.mode == PVCMode.APPEND:
            return {"prompt_token_ids": self.prompt_ids + self.assistant, "multi_modal_data": self._mm_data()}
        # relocate (and kv, which approximates it): the question without its images, the text so
        # far with every bridge, and only the newest compressed image(s): earlier copies are
        # dropped, as in tvc_rs.hf.
        newest = self.injected[-self._count():]
        if self.features is not None:
            mm = {"image": {"image_embeds": torch.cat([f for f, _ in newest]),
                            "image_grid_thw": torch.tensor([list(g) for _, g in newest], dtype=torch.int64)}}
        else:
            mm = {"image": list(newest)}
        prompt = {"prompt_token_ids": self.question_ids + self.text_assistant + self._newest_blocks, "multi_modal_data": mm}
        if self.driver.pvc.mode == PVCMode.KV:
            # Salted so that its blocks, whose entries were moved rather than computed, serve
            # only this answer's later parts from the prefix cache.
            prompt["cache_salt"] = self.kv_key
        return prompt

    def streaming_chunk(self, bridge_and_images: list[int]) -> dict:
        """The next chunk of a streaming-input session: only the new tokens and images."""
        if self.features is not None:
            f, g = self._last_injected()
            return {
                "prompt_token_ids": bridge_and_images,
                "multi_modal_data": {"image": {"image_embeds": torch.cat(f), "image_grid_thw": torch.tensor(g, dtype=torch.int64)}},
            }
        return {"prompt_token_ids": bridge_and_images, "multi_modal_data": {"image": list(self.injected[-self._count():])}}

    def _last_injected(self) -> tuple[list[Any], list[list[int]]]:
        items = self.injected[-self._count():]
        return [f for f, _ in items], [list(g) for _, g in items]

    def _count(self) -> int:
        return len(self.features) if self.features is not None else len(self.images)

    # -- compression ----------------------------------------------------------------------------

    def _compress(self) -> list[tuple[Any, int]]:
        """Per image: (multimodal item of the compressed image, its visual token count)."""
        if self.compressed is not None:
            return self.compressed
        k = self.driver.pvc.pool
        settings = self.driver.image_settings
        merge = settings.get("merge_size", 2)
        out = []
        if self.features is not None:
            for f, (t, h, w) in self.features:
                if k == 1:
                    out.append(((f, (t, h, w)), f.shape[0]))
                    continue
                # On the features' own device (the CUDA kernels for CUDA features): no host copy.
                pooled = tvc_rs.pool_visual_tokens(f, [(t, h // merge, w // merge)], k)
                # The pooled grid is host data (no device sync to read it).
                pt, ph, pw = (int(d) for d in pooled.grid_thw[0])
                out.append(((pooled.tokens, (pt, ph * merge, pw * merge)), pt * ph * pw))
        else:
            from PIL import Image

            patch = settings.get("patch_size", 14)
            unit = patch * merge
            for image in self.images:
                width, height = image.size
                _, gh, gw = tvc_rs.image_grid_thw(height, width, **settings)
                rh, rw = gh * patch, gw * patch
                th, tw = -(-rh // unit // k) * unit, -(-rw // unit // k) * unit
                small = image if k == 1 else image.resize((tw, th), Image.Resampling.BICUBIC)
                out.append((small, tvc_rs.image_token_count(th, tw, **settings) if k > 1 else tvc_rs.image_token_count(height, width, **settings)))
        self.compressed = out
        return out

    # -- what comes back ------------------------------------------------------------------------

    def on_finished(self, output: Any) -> Optional[dict]:
        """Takes a finished engine output of this session; returns the next prompt (the
        sampling settings come from :meth:`next_params`), or None when the answer is done."""
        part = self.take_part(output)
        if part is None:
            return None
        return self.continuation()

    def take_part(self, output: Any) -> Optional[list[int]]:
        """Records one part; returns the tokens to add for the next one (bridge phrase and image
        blocks) when it stopped at a calibration, else None."""
        completion = output.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        prompt_tokens = getattr(output, "prompt_tokens", None)  # a streaming part counts its own
        if prompt_tokens is None and output.prompt_token_ids is not None:
            prompt_tokens = len(output.prompt_token_ids)
        if prompt_tokens is not None:
            self.prompt_tokens.append(prompt_tokens)
            self.cached_tokens.append(output.num_cached_tokens)
        cal = self.driver.calibration_token
        calibrated = completion.stop_reason == cal and ids and ids[-1] == cal
        part = ids[:-1] if calibrated else ids
        made = len(self.calibrations)
        self.replay.add(0, self.driver.pvc.schedule, calibrations_made=made, tokens_since_last=0 if made else None)
        found = self.replay.feed(0, np.asarray(part, dtype=np.int64)) if part else []
        offset = len(self.generated)
        self.generated.extend(part)
        self.text_assistant.extend(part)
        self.assistant.extend(part)
        tok = self.driver.tokenizer
        self.pieces.append(tok.decode(part, skip_special_tokens=True))
        remaining = None if self.max_tokens is None else self.max_tokens - len(self.generated)
        if not calibrated or (remaining is not None and remaining <= 0):
            self.finish_reason = completion.finish_reason if not calibrated else "length"
            return None
        last = found[-1] if found and found[-1].token_index == len(part) - 1 else None
        if last is None:
            logger.warning(
                "TVC request %s stopped at the calibration token but the driver's replay of its schedule made no "
                "calibration there (different phrases in the engine?); continuing as if it had", self.request_id
            )
        compressed = self._compress()
        # The answer's text so far ends as its newest piece with any text (tvc_rs.hf reads its
        # transcript so).
        text_before = next((piece for piece in reversed(self.pieces) if piece), "")
        bridge = bridge_text(self.driver.pvc.bridge, text_before)
        bridge_tokens = bridge_ids(tok, self.driver.pvc.bridge, text_before)
        images_ids: list[int] = []
        for _ in compressed:
            images_ids += self.driver.image_block()
        added = bridge_tokens + images_ids
        if self.driver.pvc.mode == PVCMode.KV:
            self.kv_link = self._kv_link(output, part)
            self.grids = [self._item_grid(item) for item, _ in compressed]
        self.text_assistant.extend(bridge_tokens)
        self._newest_blocks = images_ids
        self.pieces.append(bridge)
        self.assistant.extend(added)
        self.injected.extend(item for item, _ in compressed)
        self.calibrations.append(
            TVCCalibration(
                token_index=offset + len(part) - 1,
                reason=last.reason if last is not None else "unknown",
                phrase=last.phrase if last is not None else None,
                mode=self.driver.pvc.mode,
                image_tokens=sum(n for _, n in compressed),
            )
        )
        return added

    def next_params(self) -> SamplingParams:
        return self._settings()

    # -- kv mode ------------------------------------------------------------------------------------

    def _item_grid(self, item: Any) -> tuple[int, int, int]:
        """The (t, h, w) patch grid the engine gives an image item (features: their grid; a PIL
        image: the processor's resize rule with the engine's settings)."""
        if isinstance(item, tuple):
            return tuple(int(v) for v in item[1])  # type: ignore[return-value]
        settings = self.driver.image_settings
        width, height = item.size
        return tuple(int(v) for v in tvc_rs.image_grid_thw(height, width, **settings))  # type: ignore[return-value]

    def _kv_link(self, output: Any, part: list[int]) -> dict:
        """What the connector moves into the continuation: runs ``[dst, src, n, dt, dh, dw]`` of
        tokens ``dst..dst+n`` of the continuation taken from tokens ``src..src+n`` of the stopped
        part, each key re-rotated by its M-RoPE delta (new position minus old). The continuation
        starts with ``relocate``'s text (no image blocks); all of it but its last token (the one
        that confirmed the calibration, computed again at its new place as tvc_rs.hf does) is
        shared with the stopped part."""
        d = self.driver
        src = [int(t) for t in output.prompt_token_ids] + [int(t) for t in output.outputs[0].token_ids]
        grids = np.asarray(self.grids, dtype=np.int64).reshape(-1, 3)
        old, _ = tvc_rs.mrope_position_ids(np.asarray([src], dtype=np.int64), grids if len(grids) else None,
                                           config=d.vllm_config.model_config.hf_config)
        old = np.asarray(old)[:, 0, :]  # [3, L]
        text_idx, inside = [], False
        for i, t in enumerate(src):
            if t == d.vision_start:
                inside = True
            if not inside:
                text_idx.append(i)
            if t == d.vision_end:
                inside = False
        shared = self.question_ids + self.text_assistant  # ends with the token that confirmed it
        m = len(shared) - 1
        idx = np.asarray(text_idx[:m], dtype=np.int64)
        if len(idx) != m or [src[i] for i in idx.tolist()] != shared[:m]:
            raise RuntimeError(f"request {self.request_id}: kv mode: the stopped part's text differs from the continuation's")
        # The continuation's text has no image: its M-RoPE position is its index, on all three axes.
        delta = np.arange(m, dtype=np.int64)[:, None] - old[:, idx].T  # [m, 3]
        runs: list[list[int]] = []
        for i in range(m):
            row = delta[i].tolist()
            last = runs[-1] if runs else None
            if last is not None and last[3:] == row and last[1] + last[2] == idx[i] and last[0] + last[2] == i:
                last[2] += 1
            else:
                runs.append([i, int(idx[i]), 1, *row])
        return {"source": f"{self.kv_key}-{len(self.calibrations)}", "segments": runs}

    def result(self) -> TVCResult:
        return TVCResult(
            request_id=self.request_id,
            text="".join(self.pieces),
            token_ids=list(self.generated),
            calibrations=list(self.calibrations),
            finish_reason=self.finish_reason,
            prompt_tokens=list(self.prompt_tokens),
            cached_tokens=list(self.cached_tokens),
        )


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [tokens, hidden] tensor, got {tensor.ndim} dimensions")
    return tensor


def _grid(value: Any, name: str) -> tuple[int, int, int]:
    grid = tuple(int(v) for v in np.asarray(value).reshape(-1))
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"{name} = {value!r}: expected an image_grid_thw row (t, h, w) of positive ints")
    return grid  # type: ignore[return-value]


def _requests(requests: Any) -> list[TVCRequest]:
    if isinstance(requests, TVCRequest):
        return [requests]
    out = []
    for i, r in enumerate(requests):
        if isinstance(r, dict):
            r = TVCRequest(**r)
        if not isinstance(r, TVCRequest):
            raise TypeError(f"requests[{i}]: expected a TVCRequest (or a dict of its fields), got {type(r).__name__}")
        out.append(r)
    return out


def generate(llm: Any, requests: Any, pvc: Optional[PVCConfig] = None) -> list[TVCResult]:
    """Runs TVC requests on an offline ``vllm.LLM`` with PVC.

    Every request goes to the engine with TVC on (the processor must be loaded: it is, through
    the entry point, when tvc-rs is installed). A request that stops at a calibration is
    continued at once, in the same engine loop as the others: in ``relocate`` mode with the
    prompt rebuilt without its images, followed by everything generated so far with every
    bridge phrase, and only the newest compressed image(s) (earlier copies dropped, as in
    ``tvc_rs.hf``; a new prefill of all of it but what the prefix cache holds); in ``append`` mode with the
    same prompt plus the generated tokens, the bridge phrase and the compressed image(s), as
    token ids, so that vLLM's prefix cache serves everything before (a prefill of the new tokens
    only); in ``kv`` mode with relocate's sequence holding only the newest compressed image(s),
    whose text (all but its last token) the engine's ``TVCKVConnector`` moves from the stopped
    request's blocks, re-rotated to its new positions, instead of computing it (a prefill of
    the last generated token, the bridge and the image: see :mod:`tvc_rs.vllm_kv`; the engine
    needs ``kv_transfer_config=tvc_rs.vllm_kv.kv_transfer_config()``). Results come back in the
    order of ``requests``.

    ``pvc`` (default ``PVCConfig()``): mode, pool factor, bridge phrase, schedule, phrases,
    calibration token. Its phrases must be the engine's (``additional_config["tvc"]["phrases"]``,
    default ``DEFAULT_PHRASES``).
    """
    engine = llm.llm_engine
    driver = _Driver(engine.vllm_config, llm.get_tokenizer(), pvc)
    sessions = [
        _Session(driver, r, r.request_id if r.request_id is not None else str(i)) for i, r in enumerate(_requests(requests))
    ]
    owner: dict[str, _Session] = {}

    def submit(session: _Session, prompt: dict, params: SamplingParams) -> None:
        (engine_id,) = llm.enqueue([prompt], [params], use_tqdm=False)
        # enqueue returns vLLM's internal id ("<external>-<8 random chars>") while step()
        # reports outputs under the external one (the LLM's counter, never containing "-");
        # without randomisation (VLLM_DISABLE_REQUEST_ID_RANDOMIZATION) the two are equal.
        owner[engine_id.split("-", 1)[0]] = session

    for session in sessions:
        submit(session, *session.first())
    while engine.has_unfinished_requests():
        for output in engine.step():
            session = owner.get(output.request_id)
            if session is None or not output.finished:
                continue
            del owner[output.request_id]
            prompt = session.on_finished(output)
            if prompt is not None:
                submit(session, prompt, session.next_params())
    return [s.result() for s in sessions]


async def generate_async(engine: Any, request: TVCRequest, pvc: Optional[PVCConfig] = None, *, request_id: Optional[str] = None) -> TVCResult:
    """Runs one TVC request on a ``vllm.v1.engine.async_llm.AsyncLLM``.

    ``append`` mode uses a streaming-input session (``AsyncLLM.generate`` with an async
    generator of ``StreamingInput``): at a calibration the engine keeps the request, its KV
    cache and every generated token but the calibration token itself, and takes the next
    chunk, the bridge phrase and the compressed image(s): no re-prefill at all. ``relocate``
    and ``kv`` modes submit each part as a new request, as :func:`generate` does.
    """
    import asyncio
    import uuid

    from vllm.engine.protocol import StreamingInput
    from vllm.sampling_params import RequestOutputKind

    driver = _Driver(engine.vllm_config, engine.get_tokenizer() if hasattr(engine, "get_tokenizer") else engine.tokenizer, pvc)
    name = request_id or request.request_id or "0"
    session = _Session(driver, request, name)

    def params_of(p: SamplingParams) -> SamplingParams:
        p.output_kind = RequestOutputKind.DELTA
        return p

    if driver.pvc.mode in (PVCMode.RELOCATE, PVCMode.KV):
        prompt, params = session.first()
        while prompt is not None:
            final = None
            async for out in engine.generate(prompt, params, f"{name}-{uuid.uuid4().hex[:8]}"):
                final = out
            prompt = session.on_finished(final)
            params = session.next_params()
        return session.result()

    chunks: asyncio.Queue = asyncio.Queue()
    first_prompt, first_params = session.first()
    await chunks.put(StreamingInput(prompt=first_prompt, sampling_params=params_of(first_params)))

    async def inputs():
        while True:
            chunk = await chunks.get()
            if chunk is None:
                return
            yield chunk

    collected: list[int] = []
    # A session's outputs report the prompt chunks so far (not the generated tokens between them)
    # and the first chunk's cache hits; each part's own figures are counted here instead: its
    # context is everything the request holds before its chunk, which it did not prefill.
    reported = 0  # prompt tokens of the chunks so far, as the engine reports them
    context = 0  # tokens the request holds: chunks and generated tokens (calibration tokens dropped)
    async for out in engine.generate(inputs(), params_of(first_params.clone()), f"{name}-{uuid.uuid4().hex[:8]}"):
        completion = out.outputs[0]
        collected.extend(completion.token_ids)
        if completion.finish_reason is None and not out.finished:
            continue
        if session.finish_reason is None and (collected or out.finished):
            chunk = len(out.prompt_token_ids) - reported if out.prompt_token_ids is not None else None
            if chunk is None or reported == 0:
                prompt_tokens, cached = (chunk, out.num_cached_tokens)
            else:
                prompt_tokens, cached = (context + chunk, context)
            reported += chunk or 0
            context += (chunk or 0) + len(collected) - (1 if collected and collected[-1] == driver.calibration_token else 0)
            part = _PartOutput(out, collected, prompt_tokens, cached)
            collected = []
            added = session.take_part(part)
            if added is None:
                await chunks.put(None)
            else:
                await chunks.put(StreamingInput(prompt=session.streaming_chunk(added), sampling_params=params_of(session.next_params())))
        if out.finished:
            break
    return session.result()


class _PartOutput:
    """A streaming-input part as a finished output: the part's tokens with the boundary's
    finish and stop reasons, and the part's own context length and cached tokens."""

    def __init__(self, output: Any, token_ids: list[int], prompt_tokens: Optional[int], cached_tokens: Optional[int]) -> None:
        completion = output.outputs[0]
        self.outputs = [dataclasses.replace(completion, token_ids=list(token_ids))]
        self.prompt_tokens = prompt_tokens
        self.num_cached_tokens = cached_tokens
