"""Diagnostics of ``tvc_rs.hf``: visual forgetting, the share of attention on image tokens at
each generated token (``visual_attention_curve``), as CSV and as a plot."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from tvc_rs.hf.generation import PVCResult, PVCSession
from tvc_rs.pvc import PVCConfig, PVCSchedule


@dataclass
class AttentionCurve:
    """Attention on the image at each generated token, per layer, split into the original image
    and the re-injected copies, as mass and per token.

    Masses are shares of the query's attention row (mean over heads); they depend on how many
    tokens an image has: a 4 x 4 pooled copy has about 1/16 of the original's tokens, so its mass
    is small even when each of its tokens is looked at more. The per-token views divide that out:
    ``*_per_token`` is the mean attention per image token relative to the mean per text token
    (1 = an image token gets as much as an average text token)."""

    label: str
    image_share: Any
    """``[tokens, layers]`` float64: attention mass of the query that produced each generated
    token on all image tokens in context (``original_share + injected_share``)."""
    injected_share: Any
    """``[tokens, layers]``: the part of it on re-injected (calibration) images."""
    calibrations: list
    """Token indices after which a calibration was made."""
    result: PVCResult
    token_texts: list = field(default_factory=list)
    original_share: Any = None
    """``[tokens, layers]``: the part on the question's own image(s), while in context
    (``relocate`` and ``kv`` evict them at a calibration: 0 from then on)."""
    original_tokens: Any = None
    """``[tokens]`` int: image tokens of the question's image(s) in context at each step."""
    injected_tokens: Any = None
    """``[tokens]`` int: re-injected image tokens in context at each step."""
    context_tokens: Any = None
    """``[tokens]`` int: tokens the query attends to (image and text) at each step."""

    def __post_init__(self) -> None:
        if self.original_share is None:
            self.original_share = self.image_share - self.injected_share

    @property
    def layers(self) -> int:
        return int(self.image_share.shape[1])

    @property
    def text_tokens(self) -> Any:
        """``[tokens]`` int: non-image tokens in context at each step."""
        return self.context_tokens - self.original_tokens - self.injected_tokens

    def _per_token(self, share: Any, count: Any) -> Any:
        text_mass = 1.0 - self.image_share
        count = np.asarray(count, dtype=np.float64)[:, None]
        text = np.asarray(self.text_tokens, dtype=np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (share / count) / (text_mass / text)
        return np.where(count > 0, out, np.nan)

    @property
    def image_per_token(self) -> Any:
        """``[tokens, layers]``: mean attention per image token (original and re-injected) over
        mean attention per text token."""
        return self._per_token(self.image_share, self.original_tokens + self.injected_tokens)

    @property
    def original_per_token(self) -> Any:
        """``[tokens, layers]``: the same for the question's image tokens (NaN once evicted)."""
        return self._per_token(self.original_share, self.original_tokens)

    @property
    def injected_per_token(self) -> Any:
        """``[tokens, layers]``: the same for re-injected image tokens (NaN before the first)."""
        return self._per_token(self.injected_share, self.injected_tokens)

    def by_fraction(self, parts: int = 8, layer: int = 0, values: Any = None) -> list:
        """Mean over each ``1/parts`` of the response of ``values`` (``[tokens, layers]``;
        default ``image_share``; the paper reports 1/8, 4/8, 7/8)."""
        values = self.image_share if values is None else values
        n = values.shape[0]
        out = []
        for p in range(parts):
            a, b = (p * n) // parts, ((p + 1) * n) // parts
            chunk = values[a:b, layer]
            chunk = chunk[~np.isnan(chunk)]
            out.append(float(chunk.mean()) if len(chunk) else float("nan"))
        return out


def visual_attention_curve(
    model: Any,
    processor: Any,
    images: Any = None,
    question: Optional[str] = None,
    *,
    messages: Optional[list] = None,
    config: Optional[PVCConfig] = None,
    label: Optional[str] = None,
    **generate_kwargs: Any,
) -> AttentionCurve:
    """Measure visual forgetting over one generation (the TVC paper's Figure: attention share
    on image tokens along the response), with PVC (``config``) or without (``config=None``).

    The model runs with eager attention for the measurement (switched back afterwards). At every
    decoding step each layer's attention row of the query that produces the next token is read
    (mean over heads); its mass on the question's image tokens and on re-injected copies is
    recorded apart, with the number of each kind of token in context, so that
    `AttentionCurve` can give masses and per-token ratios. Arguments as ``generate``; greedy
    decoding unless sampling settings are given.
    """
    plain = config is None
    if plain:
        config = PVCConfig(schedule=PVCSchedule(max_calibrations=0))
    session = PVCSession(model, processor, images, question, messages=messages, config=config)
    if session.recurrent_layers:
        raise ValueError(
            f"visual_attention_curve: {session.family.name}'s layers {session.recurrent_layers} are linear "
            "attention (no attention rows to read); it needs a model whose every layer is full attention"
        )
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    rows: list = []
    injected_rows: list = []
    current: dict = {}
    current_injected: dict = {}
    counts: list = []  # (original image tokens, injected image tokens, context tokens) per step
    layers = session.text_model.layers
    recording = {"on": False}

    def make_hook(index: int):
        def hook(module, args, output):
            if not recording["on"]:
                return
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None or weights.shape[2] != 1:
                return
            row = weights[0, :, -1].double().mean(0).cpu()  # [kv]
            lay = session.layout
            n = row.shape[0]
            mask = lay.image_mask[:n]
            inj = lay.injected_mask[:n]
            current[index] = float(row[:mask.shape[0]][mask].sum())
            current_injected[index] = float(row[:inj.shape[0]][inj].sum())
            if index == len(layers) - 1:
                rows.append([current.get(i, float("nan")) for i in range(len(layers))])
                injected_rows.append([current_injected.get(i, float("nan")) for i in range(len(layers))])
                n_injected = int(inj.sum())
                counts.append((int(mask.sum()) - n_injected, n_injected, n))
        return hook

    handles = [layer.self_attn.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    original_generate = model.generate

    def recording_generate(*args, **kwargs):
        recording["on"] = True
        try:
            return original_generate(*args, **kwargs)
        finally:
            recording["on"] = False

    model.generate = recording_generate
    try:
        result = session.run(**generate_kwargs)
    finally:
        del model.generate
        for handle in handles:
            handle.remove()
        if previous != "eager":
            model.set_attn_implementation(previous)
    shares = np.asarray(rows, dtype=np.float64).reshape(-1, len(layers))
    injected = np.asarray(injected_rows, dtype=np.float64).reshape(-1, len(layers))
    # generate may run one forward more than it keeps tokens for (never on CPU/CUDA today).
    shares, injected = shares[: len(result.token_ids)], injected[: len(result.token_ids)]
    counts_array = np.asarray(counts, dtype=np.int64).reshape(-1, 3)[: len(result.token_ids)]
    texts = [session.tokenizer.decode([t]) for t in result.token_ids]
    return AttentionCurve(
        label=label or ("without PVC" if plain else f"PVC ({config.mode})"),
        image_share=shares,
        injected_share=injected,
        calibrations=[c.token_index for c in result.calibrations],
        result=result,
        token_texts=texts,
        original_share=shares - injected,
        original_tokens=counts_array[:, 0],
        injected_tokens=counts_array[:, 1],
        context_tokens=counts_array[:, 2],
    )


#: The columns of `write_attention_csv` (and of ``tvc-rs diagnose``'s CSV).
ATTENTION_CSV_COLUMNS = [
    "run", "token_index", "token", "calibrated", "layer",
    "image_share", "original_share", "injected_share",
    "original_tokens", "injected_tokens", "text_tokens",
    "image_per_token", "original_per_token", "injected_per_token",
]


def write_attention_csv(curves: Union[AttentionCurve, Sequence[AttentionCurve]], path: Union[str, os.PathLike]) -> None:
    """One row per (run, generated token, layer), columns `ATTENTION_CSV_COLUMNS`:

    - ``calibrated``: 1 on a token after which the image was given again;
    - ``image_share``: attention mass (mean over heads) on all image tokens in context, the sum of
      ``original_share`` (the question's image) and ``injected_share`` (re-injected copies);
    - ``original_tokens``, ``injected_tokens``, ``text_tokens``: how many of each are in context;
    - ``*_per_token``: mean attention per image token of that kind over mean attention per text
      token (1 = as much as an average text token; empty when there is no such token).
    """
    import csv

    if isinstance(curves, AttentionCurve):
        curves = [curves]

    def number(v: float) -> str:
        return "" if np.isnan(v) else f"{v:.6g}"

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(ATTENTION_CSV_COLUMNS)
        for curve in curves:
            calibrated = set(curve.calibrations)
            image_pt, original_pt, injected_pt = (curve.image_per_token, curve.original_per_token,
                                                  curve.injected_per_token)
            text = curve.text_tokens
            for t in range(curve.image_share.shape[0]):
                token = curve.token_texts[t] if t < len(curve.token_texts) else ""
                for layer in range(curve.layers):
                    writer.writerow([
                        curve.label, t, token, int(t in calibrated), layer,
                        number(curve.image_share[t, layer]), number(curve.original_share[t, layer]),
                        number(curve.injected_share[t, layer]),
                        int(curve.original_tokens[t]), int(curve.injected_tokens[t]), int(text[t]),
                        number(image_pt[t, layer]), number(original_pt[t, layer]), number(injected_pt[t, layer]),
                    ])


def plot_attention_curves(
    curves: Union[AttentionCurve, Sequence[AttentionCurve]],
    path: Union[str, os.PathLike],
    layers: Iterable[int] = (0, -1),
    title: Optional[str] = None,
) -> None:
    """Draw, for each layer in ``layers`` (one column each), into a PNG:

    - top: attention mass on the question's image (solid), on the re-injected copies (dashed)
      and their sum (dotted; drawn for runs that have copies), per run; an image not in context
      (evicted by ``relocate`` / ``kv``, or a copy not given yet) is not drawn;
    - bottom: the per-token view, mean attention per image token over mean attention per text
      token (log scale; 1 = as much as a text token), for the question's image and the copies.

    Calibrations are vertical lines in the run's colour, numbered at the top. Needs matplotlib
    (``pip install 'tvc-rs[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or 'tvc-rs[plot]')") from None
    if isinstance(curves, AttentionCurve):
        curves = [curves]
    layers = list(layers)
    fig, axes = plt.subplots(2, len(layers), figsize=(6.5 * len(layers), 8), squeeze=False, sharex="col")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, layer in enumerate(layers):
        mass_ax, ratio_ax = axes[0][column], axes[1][column]
        for k, curve in enumerate(curves):
            color = colors[k % len(colors)]
            index = layer % curve.layers
            x = np.arange(curve.image_share.shape[0])
            has_copies = bool(np.any(curve.injected_tokens > 0))
            # An image not in context (evicted, or not given yet) is not drawn, rather than drawn at 0.
            original = np.where(curve.original_tokens > 0, curve.original_share[:, index], np.nan)
            injected = np.where(curve.injected_tokens > 0, curve.injected_share[:, index], np.nan)
            mass_ax.plot(x, original, color=color, linewidth=1.2, label=f"{curve.label}: question's image")
            if has_copies:
                mass_ax.plot(x, injected, color=color, linewidth=1.2, linestyle="--", marker=".", markersize=3,
                             label=f"{curve.label}: re-injected image")
                mass_ax.plot(x, curve.image_share[:, index], color=color, linewidth=0.8, linestyle=":",
                             label=f"{curve.label}: both (sum)")
            ratio_ax.plot(x, curve.original_per_token[:, index], color=color, linewidth=1.2,
                          label=f"{curve.label}: question's image, per token")
            if has_copies:
                ratio_ax.plot(x, curve.injected_per_token[:, index], color=color, linewidth=1.2, linestyle="--",
                              marker=".", markersize=3, label=f"{curve.label}: re-injected image, per token")
            for number, c in enumerate(curve.calibrations, 1):
                for ax in (mass_ax, ratio_ax):
                    ax.axvline(c + 0.5, color=color, linestyle="-.", linewidth=0.8, alpha=0.7)
                mass_ax.annotate(f"PVC {number}", xy=(c + 0.5, 1.0), xycoords=("data", "axes fraction"),
                                 xytext=(2, -10), textcoords="offset points", fontsize=7, color=color)
        name = curves[0].layers + layer if layer < 0 else layer
        mass_ax.set_title(f"layer {name}: attention mass on image tokens")
        mass_ax.set_ylabel("share of the attention row")
        mass_ax.set_ylim(bottom=0)
        mass_ax.legend(fontsize=7)
        ratio_ax.set_title(f"layer {name}: attention per image token / per text token")
        ratio_ax.set_yscale("log")
        low, high = ratio_ax.get_ylim()
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ratio_ax.yaxis.set_major_formatter(plain)
        if high / low < 30:  # within about a decade: label the minor ticks too
            ratio_ax.yaxis.set_minor_formatter(plain)
        ratio_ax.axhline(1.0, color="grey", linewidth=0.8)
        ratio_ax.set_xlabel("generated token (dash-dot lines: calibrations)")
        ratio_ax.set_ylabel("per-token ratio (1 = a text token)")
        ratio_ax.legend(fontsize=7)
    fig.suptitle(title or "visual forgetting: attention on the image along the response")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
