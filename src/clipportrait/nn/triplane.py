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

from clipportrait.nn.layers import FullyConnected, frozen

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
    # Slices, not a list index: indexing with a Python list copies it to the device, which CUDA
    # graph capture forbids.
    grid = torch.stack([points[..., axis] for axis in _AXIS_INDEX], dim=-1) * (2.0 / box_warp)  # (B, M, 6)
    grid = grid.reshape(batch, m, 3, 2).permute(0, 2, 1, 3).reshape(batch * 3, 1, m, 2)
    feats = F.grid_sample(
        planes.reshape(batch * 3, channels, height, width),
        grid.to(planes.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (B*3, C, 1, M)
    return feats.reshape(batch, 3, channels, m).transpose(2, 3)


class _RecomputedMLP(torch.autograd.Function):
    """y = W2 softplus(W1 x + b1) + b2 (float32) saving only x: the hidden layer, twice as wide as x
    and evaluated at every sample of every ray, is recomputed in the backward. At EG3D's sizes this
    keeps about 0.8 GB per render pass at batch 8 out of the saved activations for a GEMM and one
    elementwise pass more in the backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        ctx.save_for_backward(x, w1, b1, w2)
        return F.linear(F.softplus(F.linear(x, w1, b1)), w2, b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, w1, b1, w2 = ctx.saved_tensors
        hidden = F.linear(x, w1, b1)
        rows_y = grad_y.reshape(-1, grad_y.shape[-1])
        grad_w2 = rows_y.T @ F.softplus(hidden).reshape(-1, hidden.shape[-1])
        grad_hidden = (grad_y @ w2).mul_(torch.sigmoid(hidden))  # softplus' = sigmoid
        rows_h = grad_hidden.reshape(-1, hidden.shape[-1])
        grad_w1 = rows_h.T @ x.reshape(-1, x.shape[-1])
        grad_x = grad_hidden @ w1 if ctx.needs_input_grad[0] else None
        return grad_x, grad_w1, rows_h.sum(0), grad_w2, rows_y.sum(0)


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
        return self.decode(plane_features.mean(dim=1))

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plane-averaged features (B, M, C) -> features (B, M, out_features), raw density (B, M, 1).

        Computed in float32 or wider (autocast off) by ``_RecomputedMLP``; the same function as
        ``self.out(softplus(self.hidden(x)))``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            layers = [frozen(fc, dtype, fc.weight_transforms) for fc in (self.hidden, self.out)]
            x = _RecomputedMLP.apply(x.to(dtype), *layers[0], *layers[1])
        features = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001
        return features, x[..., :1]
