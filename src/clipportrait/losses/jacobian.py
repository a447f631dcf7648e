"""Stage-2 regularisers on the alignment network (paper sec. 3.5, appendix A).

R_r (eq. 19) is the squared Frobenius norm of the Jacobian of w_r with respect to the CLIP embedding r.
Computing the Jacobian itself (``torch.autograd.functional.jacobian``) is far too slow in training, so
two unbiased stochastic estimators are offered, both differentiable so they can be minimised:

- finite differences (eq. 20 / 23, the paper's choice): E_eps [ |f(x + eps) - f(x)|^2 / sigma^2 ],
  eps ~ N(0, sigma^2 I); exact as sigma -> 0, biased by higher-order terms at finite sigma;
- Jacobian-vector products (eq. 22): E_v [ |J v|^2 ], v ~ N(0, I); exact in expectation for any f,
  one forward-mode pass per sample (`torch.func.jvp`).

Both return one estimate per batch row: ``f`` must map (B, M) to (B, ...) row by row (no mixing
across the batch), which holds for the alignment networks.

R_norm (eq. 21) = (|w_r| - |w|)^2 keeps the aligned style vector from drifting to large norms.
"""

from __future__ import annotations

from typing import Callable

import torch

ESTIMATORS = ("finite_difference", "jvp")


def _row_sq_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).square().sum(dim=1)


def jacobian_norm_fd(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: float, samples: int = 1,
                     fx: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) estimate of |df/dx|_F^2 per row by finite differences (eq. 20 / 23), averaged over
    ``samples`` perturbations eps ~ N(0, sigma^2 I). ``fx`` = f(x) when already computed."""
    if not sigma > 0:
        raise ValueError(f"sigma={sigma}: expected > 0")
    if samples < 1:
        raise ValueError(f"samples={samples}: expected >= 1")
    fx = f(x) if fx is None else fx
    total = x.new_zeros(x.shape[0])
    for _ in range(samples):
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) * sigma
        total = total + _row_sq_norm(f(x + eps) - fx)
    return total / (samples * sigma**2)


def jacobian_norm_jvp(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, samples: int = 1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) estimate of |df/dx|_F^2 per row as |J v|^2 with v ~ N(0, I) (eq. 22), averaged over
    ``samples`` directions; differentiable with respect to f's parameters."""
    if samples < 1:
        raise ValueError(f"samples={samples}: expected >= 1")
    total = x.new_zeros(x.shape[0])
    for _ in range(samples):
        v = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        _, jv = torch.func.jvp(f, (x,), (v,))
        total = total + _row_sq_norm(jv)
    return total / samples


def jacobian_norm(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, estimator: str, sigma: float,
                  samples: int, fx: torch.Tensor | None = None) -> torch.Tensor:
    """R_r of eq. 19 per row with the chosen estimator (``ESTIMATORS``)."""
    if estimator == "finite_difference":
        return jacobian_norm_fd(f, x, sigma, samples, fx=fx)
    if estimator == "jvp":
        return jacobian_norm_jvp(f, x, samples)
    raise ValueError(f"jacobian estimator {estimator!r}: expected one of {ESTIMATORS}")


def norm_growth_penalty(w_aligned: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """R_norm of eq. 21 per row: (|w_r| - |w|)^2 over each row's flattened style vector."""
    return (w_aligned.flatten(1).norm(dim=1) - w.flatten(1).norm(dim=1)).square()
