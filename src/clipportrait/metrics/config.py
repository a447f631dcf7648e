"""Typed config of the `evaluation` group: how FID/KID are measured, in training and in task=evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class EvaluationConfig:
    """EG3D's fid50k_full protocol with ``fid_samples`` fakes: fakes use cameras and morphable parameters
    drawn from the dataset; real statistics of every image (or ``real_max``), cached by content hash."""

    fid_samples: int = 10000  # fakes per evaluation (fid50k_full: 50000)
    real_max: Optional[int] = None  # real images in the statistics (None: all)
    kid_subset_size: int = 1000
    batch_size: int = 16
    seed: int = 123
    every_kimg: float = 100.0  # during training (0: not periodically)
    at_end: bool = True  # during training: once more when training ends
    at_start: bool = False  # during training: also before the first step (the start of the FID curve)

    def validate(self) -> None:
        for name in ("fid_samples", "kid_subset_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluation.{name}={getattr(self, name)}: expected >= 1")
        if self.real_max is not None and self.real_max < 1:
            raise ValueError(f"evaluation.real_max={self.real_max}: expected null (all images) or >= 1")
        if self.every_kimg < 0:
            raise ValueError(f"evaluation.every_kimg={self.every_kimg}: expected >= 0")
