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
def update_ema(ema: nn.Module, model: nn.Module, beta: float, prefixes: tuple[str, ...] | None = None) -> None:
    """ema <- model + beta * (ema - model) for parameters (only those whose name starts with one of
    ``prefixes`` when given: the rest of ``ema`` is left as it is); buffers are copied (EG3D)."""
    ema_named, named = list(ema.named_parameters()), list(model.named_parameters())
    if [n for n, _ in ema_named] != [n for n, _ in named]:
        raise ValueError(f"update_ema: {len(ema_named)} EMA parameters vs {len(named)} model parameters, "
                         "or their names differ")
    pairs = [(e, p.detach()) for (name, e), (_, p) in zip(ema_named, named)
             if prefixes is None or name.startswith(prefixes)]
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
