"""Tri-plane feature lookup and the decoder MLP (sec. 3.2: f' -> (f, sigma)).

Plane axes follow EG3D's projection exactly: plane 0 is indexed by (x, y), plane 1 by (x, z) and
plane 2 by (z, y), each as (grid_sample width coordinate, height coordinate). The box of side
``box_warp`` centred at the origin maps to grid coordinates [-1, 1] (``align_corners=False``, so
pixel centres sit at (j + 0.5) / R * box_warp - box_warp / 2); outside the box features are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipportrait.nn.layers import FullyConnected

# For each plane, which coordinates of a point give its (width, height) grid position.
PLANE_AXES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (2, 1))
_AXIS_INDEX = [a for pair in PLANE_AXES for a in pair]


def sample_triplane(planes: torch.Tensor, points: torch.Tensor, box_warp: float = 1.0) -> torch.Tensor:
    """Bilinear features of ``points`` (B, M, 3) from ``planes`` (B, 3, C, H, W) -> (B, 3, M, C)."""
    if planes.ndim != 5 or planes.shape[1] != 3:
        raise ValueError(f"planes: expected (B, 3, C, H, W), got {tuple(planes.shape)}")
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != planes.shape[0]:
        raise ValueError(f"points: expected (B={planes.shape[0]}, M, 3), got {tuple(points.shape)}")
    batch, _, channels, height, width = planes.shape
    m = points.shape[1]
    grid = points[..., _AXIS_INDEX] * (2.0 / box_warp)  # (B, M, 6)
    grid = grid.reshape(batch, m, 3, 2).permute(0, 2, 1, 3).reshape(batch * 3, 1, m, 2)
    feats = F.grid_sample(
        planes.reshape(batch * 3, channels, height, width),
        grid.to(planes.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (B*3, C, 1, M)
    return feats.reshape(batch, 3, channels, m).transpose(2, 3)


class TriplaneDecoder(nn.Module):
    """Mean over planes -> FC -> softplus -> FC -> (raw density, features).

    Features go through a widened sigmoid (range (-0.001, 1.001), EG3D's choice that keeps
    gradients alive at the saturated ends); the raw density is activated later by the renderer.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, lr_multiplier: float = 1.0) -> None:
        super().__init__()
        self.out_features = out_features
        self.hidden = FullyConnected(in_features, hidden, lr_multiplier=lr_multiplier)
        self.out = FullyConnected(hidden, 1 + out_features, lr_multiplier=lr_multiplier)

    def forward(self, plane_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, M, C) -> features (B, M, out_features), raw density (B, M, 1)."""
        x = plane_features.mean(dim=1)
        x = self.out(F.softplus(self.hidden(x)))
        features = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001
        return features, x[..., :1]
