"""Exponential moving average of the generator's weights (EG3D / StyleGAN2-ADA G_ema).

The half-life is given in thousands of images: after ``ema_kimg`` kimg the old weights count half.
With ``rampup`` the half-life is at most ``rampup * images seen`` so early training is not frozen.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(global_batch: int, images_seen: int, ema_kimg: float, rampup: float | None) -> float:
    """beta = 0.5 ** (global_batch / ema_nimg) with ema_nimg = 1000 * ema_kimg (ramped up)."""
    ema_nimg = ema_kimg * 1000
    if rampup is not None and rampup > 0:
        ema_nimg = min(ema_nimg, images_seen * rampup)
    return 0.5 ** (global_batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- model + beta * (ema - model) for parameters; buffers are copied (EG3D)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError(f"update_ema: {len(ema_params)} EMA parameters vs {len(params)} model parameters")
    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
