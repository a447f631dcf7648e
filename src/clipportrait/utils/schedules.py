"""Scalars that change over training (blur sigma, loss weights, alpha), as objects fed the global step.

Configs speak in kimg (thousands of real images shown, EG3D's unit); `kimg_to_steps` converts with
the global batch so a schedule is a pure function of the step, restored exactly on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def kimg_to_steps(kimg: float, global_batch: int) -> int:
    """Steps needed to show ``kimg`` thousand images with ``global_batch`` images per step (ceil)."""
    if global_batch < 1:
        raise ValueError(f"global_batch={global_batch}: expected >= 1")
    return int(math.ceil(kimg * 1000 / global_batch))


@dataclass(frozen=True)
class Constant:
    value: float

    def __call__(self, step: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Linear:
    """``start`` until ``begin``, then linearly to ``end`` at step ``begin + duration``, then ``end``."""

    start: float
    end: float
    duration: int
    begin: int = 0

    def __post_init__(self) -> None:
        if self.duration < 0 or self.begin < 0:
            raise ValueError(f"Linear schedule: duration={self.duration}, begin={self.begin}; expected >= 0")

    def __call__(self, step: int) -> float:
        if self.duration == 0:
            return float(self.end if step >= self.begin else self.start)
        t = min(max((step - self.begin) / self.duration, 0.0), 1.0)
        return float(self.start + (self.end - self.start) * t)
