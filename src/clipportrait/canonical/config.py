"""Typed configs of canonicalisation (kept free of torch so the task schema imports fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

# canonical: E_img(x_hat) by GAN inversion (eq. 9-10); raw: the dataset image itself (the "no
# canonicalisation" ablation, Fig. 4); oracle: the synthetic world's own canonical re-render (canonical.oracle)
EMBED_MODES = ("canonical", "raw", "oracle")
ON_CORRUPT = ("recompute", "error")

W_SPACES = ("w", "w_plus")
W_INITS = ("auto", "buffer", "sampled")
PRECISIONS = ("fp32", "bf16")


@dataclass
class InversionConfig:
    """Settings of the inversion of eq. 9 (``task.inversion`` of task=canonicalize)."""

    steps: int = 200
    lr: float = 0.1  # peak Adam learning rate (StyleGAN2 projector)
    lr_rampup: float = 0.05  # fraction of the steps over which the rate ramps up linearly from 0
    lr_rampdown: float = 0.25  # fraction of the steps over which it ramps down to 0 (half cosine)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    space: str = "w"  # w: one w broadcast to every layer; w_plus: one w per layer
    pixel_weight: float = 0.0  # weight of the optional mean squared pixel term (images in [-1, 1])
    lpips_net: str = "vgg"
    lpips_resolution: int = 0  # compare at this size (area downsampling); 0: the generator's output size
    # Start: "buffer" = the mapping's tracked w_avg (copied from G into G_ema); "sampled" = mean of
    # w over w_avg_samples seeded z; "auto" = buffer when it is within 10% of the sampled mean, else sampled.
    w_init: str = "auto"
    w_avg_samples: int = 10000
    seed: int = 0  # z of the sampled mean
    precision: str = "fp32"  # "bf16": each step's render and LPIPS under bfloat16 autocast (CUDA only)
    # Coarse-to-fine: the first coarse_fraction of the steps compare the neural render (image_raw, before
    # super-resolution, at coarse_resolution; 0: the generator's neural rendering resolution) with the
    # image area-downsampled to that size; the rest compare the final image as above.
    coarse_fraction: float = 0.0
    coarse_resolution: int = 0
    coarse_restart: bool = False  # the final-image steps ramp the learning rate up and down again

    @property
    def coarse_steps(self) -> int:
        """How many of the first steps compare the neural render (``coarse_fraction`` of ``steps``)."""
        return round(self.coarse_fraction * self.steps)

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"inversion.steps={self.steps}: expected >= 1")
        if not self.lr > 0:
            raise ValueError(f"inversion.lr={self.lr}: expected > 0")
        if not (0 <= self.lr_rampup <= 1 and 0 < self.lr_rampdown <= 1):
            raise ValueError(f"inversion.lr_rampup={self.lr_rampup}, lr_rampdown={self.lr_rampdown}: expected "
                             f"fractions of the steps, rampup in [0, 1] and rampdown in (0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"inversion.betas={list(self.betas)}: expected two values in [0, 1)")
        if self.space not in W_SPACES:
            raise ValueError(f"inversion.space={self.space!r}: expected one of {W_SPACES}")
        if self.pixel_weight < 0:
            raise ValueError(f"inversion.pixel_weight={self.pixel_weight}: expected >= 0")
        if self.lpips_resolution < 0:
            raise ValueError(f"inversion.lpips_resolution={self.lpips_resolution}: expected >= 0 (0: output size)")
        if self.w_init not in W_INITS:
            raise ValueError(f"inversion.w_init={self.w_init!r}: expected one of {W_INITS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"inversion.precision={self.precision!r}: expected one of {PRECISIONS}")
        if not 0 <= self.coarse_fraction <= 1:
            raise ValueError(f"inversion.coarse_fraction={self.coarse_fraction}: expected a fraction of the steps in [0, 1]")
        if self.coarse_resolution < 0:
            raise ValueError(f"inversion.coarse_resolution={self.coarse_resolution}: expected >= 0 (0: the "
                             "generator's neural rendering resolution)")
        if self.w_avg_samples < 1:
            raise ValueError(f"inversion.w_avg_samples={self.w_avg_samples}: expected >= 1")
