"""Exponential backoff with jitter, shared by the poll loop and result reporting."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from `initial` up to `maximum`.

    Each delay is drawn from the upper half of the current step ("equal jitter"), so workers that
    lost the same server do not come back in lockstep, yet never retry much sooner than planned.
    """

    def __init__(self, initial: float, maximum: float, *, multiplier: float = 2.0) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"need 0 < initial <= maximum, got initial={initial}, maximum={maximum}")
        self._initial = initial
        self._maximum = maximum
        self._multiplier = multiplier
        self._step = initial

    def next_delay(self) -> float:
        step = self._step
        self._step = min(self._maximum, self._step * self._multiplier)
        return step / 2 + random.uniform(0, step / 2)

    def reset(self) -> None:
        self._step = self._initial
