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
    # Stage 2 (paper sec. 3.5, appendix A-B). R_r (eq. 19) on the alignment network T_G, estimated by
    # finite differences (eq. 20, the paper's choice) or Jacobian-vector products (eq. 22). The
    # perturbation is applied to r as T_G sees it (scaled to unit second moment per component), so
    # sigma=0.1 is small next to the embedding's entries whatever the CLIP width. The penalty is then
    # |d w_r / d r_n|_F^2, about 1/D of eq. 19's |d w_r / d r|_F^2 for unit-norm embeddings of width D
    # (512 for ViT-B/32): the paper's weight on a differently scaled quantity. The collapse measurements
    # in the README were made with it.
    jacobian_weight: float = 0.01
    jacobian_sigma: float = 0.1
    jacobian_samples: int = 1  # eps vectors per sample (paper: 1, no gain seen from 2-8)
    jacobian_estimator: str = "finite_difference"  # finite_difference (eq. 20) | jvp (eq. 22)
    norm_weight: float = 10.0  # R_norm (eq. 21)
    alpha_drop: float = 0.5  # probability of alpha = 0 (unconditional) per sample (sec. 3.5, against eq. 16)

    def validate(self) -> None:
        for name in ("r1_gamma", "density_weight", "density_perturb", "blur_init_sigma", "blur_fade_kimg",
                     "jacobian_weight", "norm_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"regularizer.{name}={value}: expected a finite value >= 0")
        for name in ("r1_interval", "density_interval", "density_points", "jacobian_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"regularizer.{name}={getattr(self, name)}: expected >= 1")
        if not self.density_extent > 0:
            raise ValueError(f"regularizer.density_extent={self.density_extent}: expected > 0")
        if not self.jacobian_sigma > 0:
            raise ValueError(f"regularizer.jacobian_sigma={self.jacobian_sigma}: expected > 0")
        if self.jacobian_estimator not in ("finite_difference", "jvp"):
            raise ValueError(f"regularizer.jacobian_estimator={self.jacobian_estimator!r}: expected "
                             "finite_difference (eq. 20) or jvp (eq. 22)")
        if not 0 <= self.alpha_drop <= 1:
            raise ValueError(f"regularizer.alpha_drop={self.alpha_drop}: expected a probability in [0, 1]")
