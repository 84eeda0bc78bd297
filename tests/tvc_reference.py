"""What TVC must decide, written out without tvc_rs (shared by the vLLM tests)."""

from __future__ import annotations

import re


class ExpectedStream:
    """What the processor must decide for one request, written out without tvc_rs: the text the
    outputs decode to (``tokenizers``), ``re`` for ``(?<!\\w)phrase(?!\\w)``, and the PVC rules."""

    def __init__(self, tokenizer, phrases, settings):
        self.tokenizer = tokenizer
        self.patterns = [re.compile(r"(?<!\w)" + re.escape(p) + r"(?!\w)", re.IGNORECASE) for p in phrases]
        self.s = settings
        self.ids: list[int] = []
        self.confirmed: set[tuple[int, int]] = set()
        self.made = settings.calibrations_made
        self.since = settings.tokens_since_last or 0
        self.pending = False
        self.calibrations: list[int] = []
        self.phrases: list[str | None] = []  # the phrase of each calibration (None: period)

    def push(self, token: int) -> None:
        index = len(self.ids)
        self.ids.append(token)
        # Text so far; a character still incomplete at the end is not there yet.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False).rstrip("\ufffd")
        hit = None
        for p, pattern in enumerate(self.patterns):
            for m in pattern.finditer(text):
                if m.end() < len(text) and (p, m.start()) not in self.confirmed:
                    self.confirmed.add((p, m.start()))
                    hit = hit or m.group(0).lower()
        s = self.s
        self.since += 1
        allowed = (
            (s.max_calibrations is None or self.made < s.max_calibrations)
            and (self.made > 0 or index >= s.warmup)
            and (self.made == 0 or self.since >= s.min_gap)
        )
        if allowed and (hit or (s.period is not None and self.since >= s.period)):
            self.made += 1
            self.since = 0
            self.pending = True
            self.calibrations.append(index)
            self.phrases.append(hit)
