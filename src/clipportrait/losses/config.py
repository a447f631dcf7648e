"""Typed config of the `regularizer` group: weights and intervals of every regulariser.

Each regulariser is switched off by one override (its weight to 0), e.g. ``regularizer.r1_gamma=0``
or ``regularizer.density_weight=0``. The defaults are EG3D's FFHQ-512 settings, which the paper follows
for Stage 1 (appendix B).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RegularizerConfig:
    # R1 gradient penalty on real images (Mescheder et al.), lazy: every r1_interval steps, scaled by it.
    r1_gamma: float = 1.0
    r1_interval: int = 16
    # EG3D's density regularisation: L1 between sigma at random points and at slightly moved points.
    density_weight: float = 0.25
    density_interval: int = 4
    density_points: int = 1000  # random points per sample
    density_perturb: float = 0.004  # std of the displacement (world units)
    density_extent: float = 1.0  # points uniform in [-extent, extent]^3 (EG3D: [-1, 1]^3)
    # Blur fade-in of the images shown to D: sigma falls linearly from blur_init_sigma to 0 over
    # blur_fade_kimg thousand real images (EG3D: 10 over 200 kimg). 0 disables it.
    blur_init_sigma: float = 10.0
    blur_fade_kimg: float = 200.0

    def validate(self) -> None:
        for name in ("r1_gamma", "density_weight", "density_perturb", "blur_init_sigma", "blur_fade_kimg"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"regularizer.{name}={value}: expected a finite value >= 0")
        for name in ("r1_interval", "density_interval", "density_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"regularizer.{name}={getattr(self, name)}: expected >= 1")
        if not self.density_extent > 0:
            raise ValueError(f"regularizer.density_extent={self.density_extent}: expected > 0")
