"""The CLIP alignment networks of Stage 2: T_G (eq. 11) and T_D (eq. 14).

Both map (x, r) -> a residual direction for x, where x is the generator's style vector w (T_G) or the
discriminator's camera embedding v (T_D) and r the CLIP embedding; the caller adds alpha times it:
w_r(alpha) = w + alpha T_G(w, r), v_r(alpha) = v + alpha T_D(v, r). The paper uses "a ResNet
architecture" zero-initialised so that Stage 2 starts exactly at Stage 1; here that is an MLP of
pre-activation residual blocks whose output layer starts at zero (the output is exactly 0 at step 0,
and the gradient still reaches every layer through the output layer's weights after the first step).

Inputs are normalised to unit second moment per row (StyleGAN's normalisation of z), so the
networks see the same scale for any CLIP width, and the finite-difference R_r (eq. 20) perturbs r in
that normalised space (`delta`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import FullyConnected, normalize_2nd_moment


@dataclass
class AlignmentConfig:
    """Architecture of T_G and T_D (both use it; their input and output widths come from G and D)."""

    hidden: int = 512  # width of the residual MLP
    blocks: int = 2  # residual blocks
    lr_multiplier: float = 1.0  # equalised-lr multiplier of every layer
    embed_dim: int = 0  # CLIP embedding width (0: taken from the canonicalisation cache)

    def validate(self) -> None:
        if self.hidden < 1 or self.blocks < 0:
            raise ValueError(f"alignment hidden={self.hidden}, blocks={self.blocks}: expected hidden >= 1, blocks >= 0")
        if not self.lr_multiplier > 0:
            raise ValueError(f"alignment lr_multiplier={self.lr_multiplier}: expected > 0")
        if self.embed_dim < 0:
            raise ValueError(f"alignment embed_dim={self.embed_dim}: expected >= 0")


class ResidualBlock(nn.Module):
    def __init__(self, width: int, lr_multiplier: float) -> None:
        super().__init__()
        self.fc1 = FullyConnected(width, width, activation="lrelu", lr_multiplier=lr_multiplier)
        self.fc2 = FullyConnected(width, width, activation="lrelu", lr_multiplier=lr_multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaled so the residual sum keeps unit variance (StyleGAN2's ResNet D uses the same sqrt(0.5)).
        return (x + self.fc2(self.fc1(x))) * (0.5**0.5)


class AlignmentNetwork(nn.Module):
    """T(x, r) -> (B, x_dim): a zero-initialised residual MLP on [normalised x, normalised r]."""

    def __init__(self, x_dim: int, embed_dim: int, cfg: AlignmentConfig) -> None:
        super().__init__()
        cfg.validate()
        if x_dim < 1 or embed_dim < 1:
            raise ValueError(f"AlignmentNetwork x_dim={x_dim}, embed_dim={embed_dim}: expected >= 1")
        self.x_dim, self.embed_dim = x_dim, embed_dim
        self.input = FullyConnected(x_dim + embed_dim, cfg.hidden, activation="lrelu", lr_multiplier=cfg.lr_multiplier)
        self.blocks = nn.Sequential(*(ResidualBlock(cfg.hidden, cfg.lr_multiplier) for _ in range(cfg.blocks)))
        self.output = FullyConnected(cfg.hidden, x_dim, lr_multiplier=cfg.lr_multiplier)
        with torch.no_grad():  # zero-initialised (paper sec. 3.4): Stage 2 starts as Stage 1
            self.output.weight.zero_()
            self.output.bias.zero_()

    @staticmethod
    def normalize(t: torch.Tensor) -> torch.Tensor:
        return normalize_2nd_moment(t.float())

    def delta(self, x_normalized: torch.Tensor, r_normalized: torch.Tensor) -> torch.Tensor:
        """T on already normalised inputs (the space in which R_r perturbs r)."""
        h = self.input(torch.cat([x_normalized, r_normalized], dim=1))
        return self.output(self.blocks(h))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.x_dim:
            raise ValueError(f"alignment input: expected (B, {self.x_dim}), got {tuple(x.shape)}")
        if r.ndim != 2 or r.shape != (x.shape[0], self.embed_dim):
            raise ValueError(f"CLIP embedding: expected ({x.shape[0]}, {self.embed_dim}), got {tuple(r.shape)}")
        # Kept in float32 under autocast like the mapping network: w is small and precision matters.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.delta(self.normalize(x), self.normalize(r))
