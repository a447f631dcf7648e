"""Mapping networks: M_G (z -> w, eq. 6) and the discriminator's camera mapping M_D (eq. 13)."""

from __future__ import annotations

import torch
from torch import nn

from clipportrait.nn.layers import FullyConnected, normalize_2nd_moment


class MappingNetwork(nn.Module):
    """StyleGAN2 mapping MLP with leaky-ReLU layers and a reduced learning rate.

    Inputs are a latent ``z`` (B, z_dim) and/or a condition ``c`` (B, c_dim); each is normalised to
    unit second moment (c after an embedding layer) and concatenated. The generator uses z only
    (the paper drops EG3D's generator pose conditioning, sec. 3.2); the discriminator uses c only.

    With ``w_avg_beta`` set, the running mean of w is tracked (``update_emas=True``) for the
    truncation trick: w <- w_avg + psi (w - w_avg) on the first ``truncation_cutoff`` copies.
    With ``num_ws > 0`` the output is broadcast to (B, num_ws, w_dim), else it is (B, w_dim).
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int,
        num_layers: int,
        lr_multiplier: float = 0.01,
        w_avg_beta: float | None = 0.998,
    ) -> None:
        super().__init__()
        if z_dim + c_dim <= 0:
            raise ValueError(f"z_dim={z_dim}, c_dim={c_dim}: the mapping needs at least one input")
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers}: expected >= 1")
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.w_avg_beta = w_avg_beta
        self.embed = FullyConnected(c_dim, w_dim) if c_dim > 0 else None
        features = [z_dim + (w_dim if c_dim > 0 else 0)] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            FullyConnected(a, b, activation="lrelu", lr_multiplier=lr_multiplier)
            for a, b in zip(features[:-1], features[1:])
        )
        if w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(
        self,
        z: torch.Tensor | None,
        c: torch.Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        source = z if z is not None else c
        if source is None:
            raise ValueError("z, c: the mapping needs at least one of them")
        # A small MLP: kept in float32 under autocast so w (and its truncation) stays precise.
        with torch.autocast(device_type=source.device.type, enabled=False):
            return self._forward(z, c, truncation_psi, truncation_cutoff, update_emas)

    def _forward(
        self, z: torch.Tensor | None, c: torch.Tensor | None, truncation_psi: float,
        truncation_cutoff: int | None, update_emas: bool,
    ) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            if z is None or z.ndim != 2 or z.shape[1] != self.z_dim:
                raise ValueError(f"z: expected shape (B, {self.z_dim}), got {None if z is None else tuple(z.shape)}")
            parts.append(normalize_2nd_moment(z.float()))
        if self.embed is not None:
            if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
                raise ValueError(f"c: expected shape (B, {self.c_dim}), got {None if c is None else tuple(c.shape)}")
            parts.append(normalize_2nd_moment(self.embed(c.float())))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for layer in self.layers:
            x = layer(x)
        if update_emas and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws > 0:
            x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1.0:
            if self.w_avg_beta is None:
                raise ValueError("truncation_psi != 1 needs w_avg tracking (w_avg_beta is None)")
            if self.num_ws > 0:
                cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
                head = self.w_avg.lerp(x[:, :cutoff], truncation_psi)
                x = torch.cat([head, x[:, cutoff:]], dim=1)
            else:
                x = self.w_avg.lerp(x, truncation_psi)
        return x


@torch.no_grad()
def sampled_mean_w(mapping: MappingNetwork, samples: int, seed: int) -> torch.Tensor:
    """The mean w (w_dim,) of ``samples`` mapped z ~ N(0, I) (seeded, drawn on the CPU), summed in float64."""
    device = next(mapping.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    total = torch.zeros(mapping.w_dim, dtype=torch.float64, device=device)
    for start in range(0, samples, 4096):
        z = torch.randn(min(4096, samples - start), mapping.z_dim, generator=gen).to(device)
        w = mapping(z)
        total += (w[:, 0] if w.ndim == 3 else w).double().sum(0)
    return (total / samples).float()


TRACKED_MEAN_TOLERANCE = 0.1


def tracked_mean_converged(tracked: torch.Tensor, sampled: torch.Tensor,
                           tolerance: float = TRACKED_MEAN_TOLERANCE) -> bool:
    """Whether the tracked w_avg is within ``tolerance`` of the sampled mean's norm from ``sampled_mean_w``."""
    return float((tracked.float() - sampled).norm()) <= tolerance * float(sampled.norm())


@torch.no_grad()
def settle_truncation_centre(mapping: MappingNetwork, samples: int = 10000,
                             tolerance: float = TRACKED_MEAN_TOLERANCE, seed: int = 0) -> dict:
    """Make truncation's centre the mean of w: the tracked w_avg (a running mean from zero with no bias
    correction, as in EG3D) stays far from it for the first few thousand steps of training. When it is
    more than ``tolerance`` of the mean's norm away from ``sampled_mean_w``, the sampled mean replaces it
    in ``mapping`` (the caller's loaded copy). Returns what was used, for the run's protocol."""
    sampled = sampled_mean_w(mapping, samples, seed)
    distance = float((mapping.w_avg.float() - sampled).norm())
    record = {"tracked_distance_to_sampled_mean": round(distance, 4), "sampled_mean_norm": round(float(sampled.norm()), 4),
              "samples": samples}
    if tracked_mean_converged(mapping.w_avg, sampled, tolerance):
        return {"centre": "tracked w_avg", **record}
    mapping.w_avg.copy_(sampled)
    return {"centre": "sampled mean (tracked w_avg not converged)", **record}
