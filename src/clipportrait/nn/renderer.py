"""Volume rendering of a radiance field along camera rays (eq. 3), EG3D-style.

Two passes per ray: ``num_coarse`` stratified depths in [ray_start, ray_end], then
``num_importance`` depths drawn by inverse-CDF sampling from the (smoothed) coarse weights; the
field is evaluated at both sets, the union is sorted and composited with the mid-point rule:

    sigma_k = softplus((s_k + s_{k+1}) / 2 + density_bias),   delta_k = t_{k+1} - t_k
    alpha_k = 1 - exp(-sigma_k delta_k),   T_k = prod_{j<k} (1 - alpha_j)
    F = sum_k T_k alpha_k (f_k + f_{k+1}) / 2                  (discretised eq. 3)

Depth is the weight-normalised mean of the interval mid-points and ``alpha`` the sum of weights
(1 - transmittance through the whole ray). The field is a callable so deformation (eq. 4) can be
composed in front of the tri-plane lookup by the caller; ``field(points, mapped=True)`` takes points
already mapped (``render_rays``'s ``coarse_mapped``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Field = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # points (B, N, 3) -> (features, raw density)


def stratified_depths(
    batch: int, num_rays: int, num_samples: int, ray_start: float, ray_end: float, perturb: bool,
    device: torch.device,
) -> torch.Tensor:
    """Evenly spaced depths (B, R, S, 1); with ``perturb`` each is jittered by U[0, spacing) (EG3D)."""
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples}: need at least 2 depths per ray")
    if not ray_end > ray_start:
        raise ValueError(f"ray_start={ray_start}, ray_end={ray_end}: expected ray_end > ray_start")
    depths = torch.linspace(ray_start, ray_end, num_samples, device=device)
    depths = depths.reshape(1, 1, num_samples, 1).expand(batch, num_rays, num_samples, 1)
    if perturb:
        spacing = (ray_end - ray_start) / (num_samples - 1)
        depths = depths + torch.rand_like(depths) * spacing
    return depths.contiguous()


def interval_weights(depths: torch.Tensor, raw_density: torch.Tensor, density_bias: float = -1.0) -> torch.Tensor:
    """Compositing weights T_k alpha_k (B, R, S-1, 1) of the intervals between depth-sorted samples
    (eq. 3 with the mid-point density), in float32 or wider."""
    with torch.autocast(device_type=depths.device.type, enabled=False):
        dtype = torch.promote_types(depths.dtype, torch.float32)  # never below float32 (bf16 cumprod drifts)
        depths, raw_density = depths.to(dtype), raw_density.to(dtype)
        deltas = depths[:, :, 1:] - depths[:, :, :-1]
        sigma = F.softplus((raw_density[:, :, 1:] + raw_density[:, :, :-1]) * 0.5 + density_bias)
        alpha = 1.0 - torch.exp(-sigma * deltas)
        # Exclusive cumulative product = transmittance before each interval; 1e-10 keeps it > 0.
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :, :1]), 1.0 - alpha + 1e-10], dim=2), dim=2)
        return alpha * trans[:, :, :-1]


def sample_weights(weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weights (B, R, S, 1) u_j = (w_{j-1} + w_j) / 2 (w_{-1} = w_{S-1} = 0) of interval
    weights (B, R, S-1, 1): sum_k w_k (f_k + f_{k+1}) / 2 = sum_j u_j f_j, so the mid-point features of
    eq. 3 are never materialised and the sum can run over the samples in any order."""
    padded = F.pad(weights, (0, 0, 1, 1))
    return (padded[:, :, 1:] + padded[:, :, :-1]) * 0.5


def _finish(depths: torch.Tensor, weights: torch.Tensor, weighted_features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of compositing from sorted depths, interval weights and sum_j u_j f_j."""
    weight_total = weights.sum(dim=2)
    mid_depths = (depths[:, :, 1:] + depths[:, :, :-1]) * 0.5
    # Normalised depth; rays that hit nothing report the far end (as EG3D after its clamp).
    t_min, t_max = depths[:, :, 0], depths[:, :, -1]
    depth = (weights * mid_depths).sum(dim=2) / weight_total.clamp_min(1e-10)
    depth = torch.where(weight_total > 1e-10, depth, t_max)
    depth = torch.minimum(torch.maximum(depth, t_min), t_max)
    return {"features": weighted_features * 2.0 - 1.0, "depth": depth, "alpha": weight_total, "weights": weights}


def composite(
    depths: torch.Tensor, features: torch.Tensor, raw_density: torch.Tensor, density_bias: float = -1.0
) -> dict[str, torch.Tensor]:
    """Mid-point compositing (eq. 3) of samples sorted by depth along each ray.

    depths (B, R, S, 1), features (B, R, S, C), raw_density (B, R, S, 1) ->
    features (B, R, C) mapped from [0, 1] to [-1, 1] (empty space is -1), depth (B, R, 1),
    alpha (B, R, 1), weights (B, R, S-1, 1).
    """
    if depths.shape[-2] < 2 or depths.shape[:-1] != features.shape[:-1] or depths.shape != raw_density.shape:
        raise ValueError(
            f"depths {tuple(depths.shape)}, features {tuple(features.shape)}, raw_density "
            f"{tuple(raw_density.shape)}: expected (B, R, S>=2, 1), (B, R, S, C), (B, R, S, 1)"
        )
    with torch.autocast(device_type=depths.device.type, enabled=False):
        dtype = torch.promote_types(depths.dtype, torch.float32)
        depths, features = depths.to(dtype), features.to(dtype)
        weights = interval_weights(depths, raw_density, density_bias)
        return _finish(depths, weights, (sample_weights(weights) * features).sum(dim=2))


def importance_depths(depths: torch.Tensor, weights: torch.Tensor, num_samples: int, perturb: bool) -> torch.Tensor:
    """Inverse-CDF samples (B, R, n, 1) from the piecewise-constant pdf of the coarse weights.

    ``weights`` (B, R, S-1, 1) belong to the intervals [t_k, t_{k+1}] of ``depths`` (B, R, S, 1).
    As EG3D, weights are smoothed (max-pool then average-pool of width 2) and floored by 0.01 so
    empty rays still spread their samples. Without ``perturb`` the CDF levels are (i + 0.5) / n.
    """
    with torch.no_grad(), torch.autocast(device_type=depths.device.type, enabled=False):
        batch, rays, s, _ = depths.shape
        edges = depths.reshape(batch * rays, s).float()
        w = weights.reshape(batch * rays, 1, s - 1).float() + 1e-5
        w = F.avg_pool1d(F.max_pool1d(w, 2, 1, padding=1), 2, 1).squeeze(1) + 0.01  # (BR, S-1)
        pdf = w / w.sum(dim=-1, keepdim=True)
        cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1)], dim=-1)  # (BR, S)
        cdf[:, -1] = 1.0
        levels = torch.arange(num_samples, device=depths.device, dtype=torch.float32)
        jitter = torch.rand(batch * rays, num_samples, device=depths.device) if perturb else 0.5
        u = ((levels + jitter) / num_samples).expand(batch * rays, num_samples).contiguous()
        upper = torch.searchsorted(cdf.contiguous(), u, right=True).clamp(1, s - 1)
        lower = upper - 1
        cdf_lo, cdf_hi = cdf.gather(1, lower), cdf.gather(1, upper)
        t_lo, t_hi = edges.gather(1, lower), edges.gather(1, upper)
        span = cdf_hi - cdf_lo
        frac = (u - cdf_lo) / torch.where(span < 1e-8, torch.ones_like(span), span)
        samples = t_lo + frac.clamp(0.0, 1.0) * (t_hi - t_lo)
    return samples.reshape(batch, rays, num_samples, 1)


def sample_points(origins: torch.Tensor, dirs: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """Points (B, R*S, 3) at ``depths`` (B, R, S, 1) along rays (B, R, 3), ray-major: what a field sees."""
    batch, rays, samples, _ = depths.shape
    return (origins.unsqueeze(2) + dirs.unsqueeze(2) * depths).reshape(batch, rays * samples, 3)


def _evaluate(field: Field, origins: torch.Tensor, dirs: torch.Tensor, depths: torch.Tensor,
              mapped: torch.Tensor | None = None):
    batch, rays, samples, _ = depths.shape
    if mapped is None:
        features, raw_density = field(sample_points(origins, dirs, depths))
    else:
        features, raw_density = field(mapped, mapped=True)
    return features.reshape(batch, rays, samples, -1), raw_density.reshape(batch, rays, samples, 1)


def render_rays(
    field: Field,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    num_coarse: int,
    num_importance: int,
    ray_start: float,
    ray_end: float,
    perturb: bool = True,
    density_bias: float = -1.0,
    coarse_mapped: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Render rays (B, R, 3) through ``field``: stratified + importance passes, then composite.

    The coarse pass's weights only place the importance samples (no gradient, as in EG3D). The union
    of both passes is composited in depth order; only depths and densities are sorted: the per-sample
    weights are put back in evaluation order and the features summed there (``sample_weights``), which
    spares sorting and concatenating the (B, R, S, C) feature tensors.

    ``coarse_mapped``: the coarse pass's points (``sample_points`` of the unperturbed stratified
    depths) already taken through the field's point mapping (the deformation of eq. 4), e.g. on another
    CUDA stream while the tri-plane was synthesised; the field is then called as
    ``field(coarse_mapped, mapped=True)`` for that pass. Only without ``perturb`` (the depths are fixed)."""
    if origins.ndim != 3 or origins.shape[-1] != 3 or dirs.shape != origins.shape:
        raise ValueError(
            f"origins {tuple(origins.shape)}, dirs {tuple(dirs.shape)}: expected matching (B, R, 3) tensors"
        )
    batch, rays, _ = origins.shape
    if coarse_mapped is not None and (perturb or coarse_mapped.shape != (batch, rays * num_coarse, 3)):
        raise ValueError(f"coarse_mapped {tuple(coarse_mapped.shape)}: expected ({batch}, {rays * num_coarse}, 3), "
                         "and perturb=False (mapped coarse points belong to the fixed stratified depths)")
    depths = stratified_depths(batch, rays, num_coarse, ray_start, ray_end, perturb, origins.device)
    features, raw_density = _evaluate(field, origins, dirs, depths, coarse_mapped)
    if num_importance == 0:
        return composite(depths, features, raw_density, density_bias)
    with torch.no_grad():
        coarse_weights = interval_weights(depths, raw_density, density_bias)
    fine_depths = importance_depths(depths, coarse_weights, num_importance, perturb)
    fine_features, fine_density = _evaluate(field, origins, dirs, fine_depths)
    with torch.autocast(device_type=depths.device.type, enabled=False):
        depths = torch.cat([depths, fine_depths], dim=2)
        order = torch.argsort(depths, dim=2)
        depths = depths.gather(2, order)
        weights = interval_weights(depths, torch.cat([raw_density, fine_density], dim=2).gather(2, order), density_bias)
        # Per-sample weights back in evaluation order (scatter is gather's inverse for a permutation).
        unsorted = torch.zeros_like(depths).scatter(2, order, sample_weights(weights))
        dtype = weights.dtype
        weighted = (unsorted[:, :, :num_coarse] * features.to(dtype)).sum(dim=2) + (
            unsorted[:, :, num_coarse:] * fine_features.to(dtype)).sum(dim=2)
        return _finish(depths, weights, weighted)
