"""EG3D's density regularisation (paper appendix B: "density regularization [6]").

Random points x ~ U([-e, e]^3) and their neighbours x + N(0, p^2) should have similar raw density:
    L = weight * mean |sigma(x) - sigma(x + eps)|
It discourages floating noise in empty space. Evaluated in the generator's canonical (tri-plane) space,
i.e. without the deformation: the field being smoothed is the one the tri-plane stores.
"""

from __future__ import annotations

from typing import Callable

import torch


def density_regularization(
    sigma_fn: Callable[[torch.Tensor], torch.Tensor],
    batch: int,
    num_points: int,
    perturb: float,
    extent: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """sigma_fn(points (B, 2N, 3)) -> raw density (B, 2N, 1); returns the (unweighted) L1 term."""
    initial = (torch.rand(batch, num_points, 3, device=device, generator=generator) * 2 - 1) * extent
    moved = initial + torch.randn(initial.shape, device=device, generator=generator) * perturb
    sigma = sigma_fn(torch.cat((initial, moved), dim=1))
    return (sigma[:, :num_points] - sigma[:, num_points:]).abs().mean()
