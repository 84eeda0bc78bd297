"""Generation in ``tvc_rs.hf``: ``generate`` and ``PVCSession.run``, the model's own
``generate`` in segments between calibrations, with the stopping criterion that watches for
reflections, the user's criteria and streamer carried across segments, and the result."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tvc_rs.hf.model import _torch
from tvc_rs.hf.session import CalibrationRecord, _Session
from tvc_rs.pvc import PVCConfig

# Arguments of transformers' generate that tvc_rs builds itself for every segment.
_OWN_ARGUMENTS = (
    "input_ids", "inputs", "attention_mask", "pixel_values", "pixel_values_videos", "image_grid_thw",
    "video_grid_thw", "mm_token_type_ids", "inputs_embeds", "cache", "past_key_values", "position_ids",
    "mm_encoder_outputs",
)


@dataclass
class PVCResult:
    """What ``generate`` returns."""

    text: str
    """The response as the model saw it: generated text with the bridge phrases of the
    calibrations in place (image tokens left out)."""
    token_ids: list
    """The model's own generated token ids (no bridges, no image tokens)."""
    calibrations: list
    """One ``CalibrationRecord`` per calibration."""
    sequence: Any
    """The final sequence ``[L]`` (LongTensor, the mode's layout; the last token is not in ``cache``)."""
    position_ids: Any
    """Its M-RoPE positions ``[3, L]``."""
    prompt_length: int
    """Tokens of the original prompt."""
    stop_reason: str
    """``"eos"``, ``"max_new_tokens"`` or ``"stopping_criteria"``."""
    seconds: float
    generated_text: str = ""
    """Only the model's own tokens, decoded."""
    scores: Optional[tuple] = None
    """Processed scores per generated token (with ``output_scores=True``)."""
    logits: Optional[tuple] = None
    """Raw logits per generated token (with ``output_logits=True``)."""
    cache: Any = None
    """The model's cache at the end (holds every token of ``sequence`` but the last)."""

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")

    def marked_text(self, mark: Optional[Callable[[CalibrationRecord], str]] = None) -> str:
        """``text`` with a marker inserted before each calibration's bridge phrase."""
        if mark is None:
            mark = lambda c: (  # noqa: E731
                f"[[PVC #{c.index + 1}: {c.phrase or c.reason!r} at token {c.token_index}, {c.mode}, "
                f"{c.visual_tokens} image tokens, {c.seconds * 1000:.1f} ms]]"
            )
        out, last = [], 0
        for c in self.calibrations:
            out.append(self.text[last:c.text_offset])
            out.append(mark(c))
            last = c.text_offset
        out.append(self.text[last:])
        return "".join(out)

    def as_dict(self) -> dict:
        return {
            "text": self.text, "generated_text": self.generated_text, "token_ids": list(self.token_ids),
            "calibrations": [c.as_dict() for c in self.calibrations], "prompt_length": self.prompt_length,
            "stop_reason": self.stop_reason, "seconds": self.seconds,
            "generated_tokens": len(self.token_ids), "tokens_per_second": self.tokens_per_second,
        }


class _CalibrationWatch:
    """Stopping criterion: feeds each new token to the reflection stream, stops at a calibration."""

    def __init__(self, stream: Any, vocab_size: int, boundary_id: int):
        self.stream = stream
        self.vocab_size = vocab_size
        self.boundary_id = boundary_id
        self.fired = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        torch = _torch()
        token = int(input_ids[0, -1])
        if not 0 <= token < self.vocab_size:
            # Ids past the tokenizer (a model's padded vocabulary) have no text: a word boundary,
            # like the special tokens.
            token = self.boundary_id
        calibration = self.stream.push(token)
        if calibration is not None:
            self.fired = calibration
        return torch.full((input_ids.shape[0],), calibration is not None, dtype=torch.bool, device=input_ids.device)


class _Recorded:
    """A user stopping criterion, remembering whether it stopped the last step."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.stopped = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        done = self._inner(input_ids, scores, **kwargs)
        self.stopped = bool(done.any()) if hasattr(done, "any") else bool(done)
        return done

    def __getattr__(self, name: str) -> Any:  # e.g. eos_token_id, which generate looks for
        if name == "_inner":  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self._inner, name)


class _SegmentStreamer:
    """Passes a user streamer what a single generate call would: the prompt once, then every new
    token (and the bridge text of each calibration), and ``end()`` once at the very end."""

    def __init__(self, user: Any):
        self.user = user
        self.first_segment = True
        self.skip_context = True

    def start_segment(self) -> None:
        self.skip_context = True

    def put(self, value: Any) -> None:
        if self.skip_context:
            self.skip_context = False
            if not self.first_segment:
                return  # the context of a continued segment was already streamed
            self.first_segment = False
        if self.user is not None:
            self.user.put(value)

    def put_bridge(self, ids: list) -> None:
        if self.user is not None and ids:
            self.user.put(_torch().tensor([ids]))

    def end(self) -> None:
        pass

    def finish(self) -> None:
        if self.user is not None:
            self.user.end()


class PVCSession(_Session):
    """One PVC generation, step by step (``generate`` runs it; benchmarks and tests drive it).

    ``PVCSession(model, processor, images, question, config=...)`` checks everything, runs the
    vision tower once and prepares the prompt; ``prefill()`` encodes the prompt but its last token;
    ``run(**generate_kwargs)`` generates with calibrations; ``calibrate()`` injects the image now.
    State between steps: ``sequence`` ``[L]`` and ``positions`` ``[3, L]`` (CPU LongTensors), the
    model's ``cache`` holding all of ``sequence`` but its last token.
    """

    def run(
        self,
        *,
        max_new_tokens: Optional[int] = None,
        logits_processor: Any = None,
        stopping_criteria: Any = None,
        streamer: Any = None,
        generation_config: Any = None,
        on_calibration: Optional[Callable[[CalibrationRecord], None]] = None,
        **kwargs: Any,
    ) -> PVCResult:
        """Generate with calibrations; arguments as transformers' ``generate`` (see ``generate``)."""
        torch = _torch()
        from transformers import StoppingCriteriaList

        own = sorted(k for k in kwargs if k in _OWN_ARGUMENTS)
        if own:
            raise ValueError(f"{', '.join(own)}: tvc_rs.hf.generate builds these from images and question itself")
        for name in ("num_beams", "num_return_sequences"):
            if kwargs.get(name, 1) not in (None, 1):
                raise ValueError(f"{name} = {kwargs[name]}: PVC generates one sequence (beam search is not supported)")
        for name in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: not supported with PVC")
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(name, False):
                raise ValueError(f"{name}: not supported by tvc_rs.hf.generate (see visual_attention_curve)")
        if kwargs.get("use_cache") is False:
            raise ValueError("use_cache = False: PVC works on the model's cache")
        gen_config = generation_config if generation_config is not None else self.model.generation_config
        max_length = kwargs.pop("max_length", None)
        if max_new_tokens is None:
            if max_length is not None:
                max_new_tokens = max_length - self.prompt_length
            elif getattr(gen_config, "max_new_tokens", None) is not None:
                max_new_tokens = gen_config.max_new_tokens
            else:
                max_new_tokens = 20  # transformers' default
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens!r}: must be an int >= 1")
        min_new_tokens = kwargs.pop("min_new_tokens", None)
        min_length = kwargs.pop("min_length", None)
        if min_new_tokens is None and min_length:
            min_new_tokens = max(0, min_length - self.prompt_length)
        want_scores = bool(kwargs.pop("output_scores", False))
        want_logits = bool(kwargs.pop("output_logits", False))
        kwargs.pop("return_dict_in_generate", None)

        user_criteria = [_Recorded(c) for c in (stopping_criteria or [])]
        if kwargs.get("stop_strings") is not None:
            from transformers import StopStringCriteria

            user_criteria.append(_Recorded(StopStringCriteria(self.tokenizer, kwargs.pop("stop_strings"))))
        if kwargs.get("max_time") is not None:
            from transformers import MaxTimeCriteria

            user_criteria.append(_Recorded(MaxTimeCriteria(kwargs.pop("max_time"))))
        eos = kwargs.get("eos_token_id", getattr(gen_config, "eos_token_id", None))
        eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if kwargs.get("pad_token_id") is None and getattr(gen_config, "pad_token_id", None) is None:
            pad = self.tokenizer.pad_token_id
            kwargs["pad_token_id"] = pad if pad is not None else (min(eos_ids) if eos_ids else None)

        watch = _CalibrationWatch(self.stream, self.detector.vocab_size, self.image_token_id)
        streams = _SegmentStreamer(streamer)
        scores, logits = [], []
        t_start = time.perf_counter()
        if self.cache is None:
            self.prefill()
        stop_reason = "max_new_tokens"
        base = len(self.generated)  # the budget counts this call's tokens
        try:
            while True:
                remaining = max_new_tokens - (len(self.generated) - base)
                length = len(self.layout.ids)
                pending_position = int(self.layout.positions[0, -1])
                self.model.model.rope_deltas = torch.tensor([[pending_position - (length - 1)]], device=self.device)
                segment_kwargs = dict(kwargs)
                if min_new_tokens:
                    segment_kwargs["min_new_tokens"] = max(0, min_new_tokens - (len(self.generated) - base))
                watch.fired = None
                streams.start_segment()
                out = self.model.generate(
                    input_ids=self.layout.ids[None].to(self.device),
                    attention_mask=torch.ones((1, length), dtype=torch.long, device=self.device),
                    max_new_tokens=remaining,
                    logits_processor=logits_processor,
                    stopping_criteria=StoppingCriteriaList([*user_criteria, watch]),
                    streamer=streams if streamer is not None else None,
                    generation_config=generation_config,
                    return_dict_in_generate=True,
                    output_scores=want_scores,
                    output_logits=want_logits,
                    **{self.cache_arg: self.cache},
                    **segment_kwargs,
                )
                new = out.sequences[0, length:].tolist()
                if want_scores and out.scores is not None:
                    scores.extend(out.scores)
                if want_logits and out.logits is not None:
                    logits.extend(out.logits)
                self.generated.extend(new)
                self.transcript.append(("text", list(new)))
                self._append_text(new)
                if self.cache.get_seq_length() != len(self.layout.ids) - 1:
                    raise RuntimeError(
                        f"internal: cache holds {self.cache.get_seq_length()} tokens after a segment of "
                        f"{len(self.layout.ids)} (generate must leave exactly the last token out)"
                    )
                if new and new[-1] in eos_ids:
                    stop_reason = "eos"
                    break
                if any(c.stopped for c in user_criteria):
                    stop_reason = "stopping_criteria"
                    break
                if len(self.generated) - base >= max_new_tokens or not new:
                    stop_reason = "max_new_tokens"
                    break
                if watch.fired is None:
                    stop_reason = "stopping_criteria"
                    break
                record = self.calibrate(watch.fired)
                streams.put_bridge(record.bridge_ids)
                if on_calibration is not None:
                    on_calibration(record)
        finally:
            streams.finish()
        seconds = time.perf_counter() - t_start
        return self._result(stop_reason, seconds, tuple(scores) if want_scores else None,
                            tuple(logits) if want_logits else None)

    def _result(self, stop_reason: str, seconds: float, scores: Any, logits: Any) -> PVCResult:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prefix: list = []
        records = iter(self.records)
        for kind, ids in self.transcript:
            if kind == "bridge":
                record = next(records)
                record.text_offset = len(decode(prefix))
            prefix.extend(ids)
        return PVCResult(
            text=decode(prefix),
            token_ids=list(self.generated),
            calibrations=list(self.records),
            sequence=self.layout.ids.clone(),
            position_ids=self.layout.positions.clone(),
            prompt_length=self.prompt_length,
            stop_reason=stop_reason,
            seconds=seconds,
            generated_text=decode(self.generated),
            scores=scores,
            logits=logits,
            cache=self.cache,
        )


def generate(
    model: Any,
    processor: Any,
    images: Any = None,
    question: Optional[str] = None,
    *,
    messages: Optional[list] = None,
    config: Optional[PVCConfig] = None,
    on_calibration: Optional[Callable[[CalibrationRecord], None]] = None,
    **generate_kwargs: Any,
) -> PVCResult:
    """Generate an answer with Periodic Visual Calibration.

    Args:
        model: a transformers Qwen2-VL-family model (``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration``; QVQ and TVC checkpoints load as these).
        processor: its ``AutoProcessor`` (tokenizer + image processor + chat template).
        images: a PIL image, a path, or a list of them (the question's images, in order).
        question: the user's question; the chat template puts the images before it. Or give
            ``messages`` (chat messages whose content holds ``{"type": "image", "image": ...}``
            items, or ``{"type": "image"}`` placeholders filled from ``images`` in order).
        config: ``tvc_rs.PVCConfig`` (mode, pool / prune, bridge, schedule, phrases); default
            ``PVCConfig()`` (relocate, 4x4 pooling, calibrate at every reflection phrase).
        on_calibration: called with each ``CalibrationRecord`` right after it is made.
        **generate_kwargs: passed to transformers' ``generate`` for every segment:
            ``max_new_tokens`` (over all segments; default as transformers), ``min_new_tokens``,
            sampling settings (``do_sample``, ``temperature``, ``top_p``, ...), ``logits_processor``
            (the same objects throughout: a processor's own state carries over), ``stopping_criteria``,
            ``stop_strings``, ``max_time`` (over the whole generation), ``streamer`` (gets the
            prompt once, each generated token, and each calibration's bridge text; ``end()`` once),
            ``generation_config``, ``output_scores`` / ``output_logits`` (collected over all
            segments into the result).

    Returns:
        ``PVCResult`` (text, token ids, one record per calibration, the final sequence, its
        positions and cache).

    Raises:
        TypeError: ``model`` not Qwen2-VL-family; ``config`` not a ``PVCConfig``; an image of an
            unsupported type.
        ValueError: no image; an image the processor rejects; ``config.pool`` larger than an
            image's merged grid; beam search or other settings PVC cannot honour.
        FileNotFoundError: an image path that does not exist.
    """
    session = PVCSession(model, processor, images, question, messages=messages, config=config)
    return session.run(on_calibration=on_calibration, **generate_kwargs)

