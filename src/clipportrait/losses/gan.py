"""Adversarial losses of Stage 1 (paper appendix B: EG3D's non-saturating loss and R1 penalty)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def g_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss -log sigmoid(D(G(z))) = softplus(-D(G(z))), per sample."""
    return F.softplus(-fake_logits)


def d_nonsaturating(real_logits: torch.Tensor | None, fake_logits: torch.Tensor | None) -> torch.Tensor:
    """Discriminator loss softplus(D(fake)) + softplus(-D(real)), per sample; either part may be None."""
    parts = []
    if fake_logits is not None:
        parts.append(F.softplus(fake_logits))
    if real_logits is not None:
        parts.append(F.softplus(-real_logits))
    if not parts:
        raise ValueError("d_nonsaturating: need real_logits or fake_logits")
    return sum(parts)


def r1_penalty(real_logits: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """R1 = ||grad_x D(x)||^2 over every input D saw (EG3D: the image and the raw image), per sample (B,).

    ``inputs`` must require grad and be what ``real_logits`` was computed from; the graph is kept
    (create_graph) so the penalty itself can be back-propagated into D.
    """
    for i, x in enumerate(inputs):
        if not x.requires_grad:
            raise ValueError(f"r1_penalty: inputs[{i}] does not require grad; call .requires_grad_() before D")
    grads = torch.autograd.grad(real_logits.sum(), inputs, create_graph=True, only_inputs=True)
    # Accumulate in at least float32 (bf16 autocast would lose the small gradients).
    return sum(g.to(torch.promote_types(g.dtype, torch.float32)).square().flatten(1).sum(1) for g in grads)
