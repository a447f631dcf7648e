"""Tri-plane lookup and volume rendering (eq. 3) against hand-computed and closed-form results."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipportrait.nn.renderer import composite, importance_depths, render_rays, stratified_depths
from clipportrait.nn.triplane import TriplaneDecoder, sample_triplane


def _coordinate_planes(res: int) -> torch.Tensor:
    """(1, 3, 2, res, res): channel 0 holds each pixel centre's grid x (width) coordinate, channel 1 its y."""
    centres = (torch.arange(res, dtype=torch.float64) + 0.5) / res * 2 - 1
    u = centres.reshape(1, res).expand(res, res)
    v = centres.reshape(res, 1).expand(res, res)
    plane = torch.stack([u, v])
    return plane.expand(1, 3, 2, res, res).contiguous()


def test_triplane_axes_and_box_warp():
    """Bilinear lookup of linear coordinate planes is exact: plane 0 reads (x, y), plane 1 (x, z),
    plane 2 (z, y) (EG3D's axes), each scaled by 2 / box_warp; points outside the box read zero."""
    box_warp = 2.0
    planes = _coordinate_planes(16)
    pts = torch.tensor([[[0.3, -0.5, 0.7], [-0.8, 0.1, -0.25], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    feats = sample_triplane(planes, pts, box_warp)  # (1, 3, M, 2)
    assert feats.shape == (1, 3, 3, 2)
    x, y, z = pts[0].unbind(-1)
    s = 2.0 / box_warp
    torch.testing.assert_close(feats[0, 0], torch.stack([x, y], -1) * s)
    torch.testing.assert_close(feats[0, 1], torch.stack([x, z], -1) * s)
    torch.testing.assert_close(feats[0, 2], torch.stack([z, y], -1) * s)
    outside = sample_triplane(planes, torch.tensor([[[5.0, 5.0, 5.0]]], dtype=torch.float64), box_warp)
    assert torch.count_nonzero(outside) == 0
    with pytest.raises(ValueError, match="points"):
        sample_triplane(planes, torch.zeros(1, 4, 2, dtype=torch.float64))


def test_decoder_shapes_and_feature_range():
    """The decoder averages the 3 plane features and returns (B, M, C) features inside
    (-0.001, 1.001) plus a (B, M, 1) raw density; it depends on the plane mean only."""
    torch.manual_seed(0)
    dec = TriplaneDecoder(8, 16, 5)
    f = torch.randn(2, 3, 10, 8) * 10
    feats, sigma = dec(f)
    assert feats.shape == (2, 10, 5) and sigma.shape == (2, 10, 1)
    assert feats.min() > -0.001 and feats.max() < 1.001
    permuted = f[:, [2, 0, 1]]
    torch.testing.assert_close(dec(permuted)[1], sigma)


def test_decoder_mlp_recomputation_matches_modules_and_numerical_gradients():
    """The decoder's MLP (hidden layer recomputed in the backward) equals FC -> softplus -> FC of its
    own layers, and its backward passes gradcheck (float64) for the input, weights and biases."""
    from clipportrait.nn.triplane import _RecomputedMLP

    torch.manual_seed(0)
    dec = TriplaneDecoder(4, 6, 3, lr_multiplier=0.5).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    want = dec.out(torch.nn.functional.softplus(dec.hidden(x)))
    feats, sigma = dec.decode(x)
    torch.testing.assert_close(sigma, want[..., :1])
    torch.testing.assert_close(feats, torch.sigmoid(want[..., 1:]) * 1.002 - 0.001)
    args = (x.requires_grad_(), torch.randn(6, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(6, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 6, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(_RecomputedMLP.apply, args)


def test_composite_constant_density_is_exact():
    """With constant activated density sigma on the whole ray, alpha = 1 - exp(-sigma (t_S - t_1))
    and the composited feature is alpha * f mapped to [-1, 1] (2 alpha f - 1)."""
    s = 17
    depths = torch.linspace(2.0, 3.0, s, dtype=torch.float64).reshape(1, 1, s, 1)
    raw = torch.full_like(depths, 0.3)
    sigma = math.log1p(math.exp(0.3 - 1.0))
    feats = torch.full((1, 1, s, 2), 0.25, dtype=torch.float64)
    out = composite(depths, feats, raw, density_bias=-1.0)
    alpha = 1 - math.exp(-sigma * 1.0)
    assert out["alpha"].item() == pytest.approx(alpha, abs=1e-8)
    torch.testing.assert_close(out["features"], torch.full((1, 1, 2), 2 * alpha * 0.25 - 1, dtype=torch.float64))
    # Weights are geometric: w_k = exp(-sigma delta k) (1 - exp(-sigma delta)).
    delta = 1.0 / (s - 1)
    k = torch.arange(s - 1, dtype=torch.float64)
    want_w = torch.exp(-sigma * delta * k) * (1 - math.exp(-sigma * delta))
    torch.testing.assert_close(out["weights"].reshape(-1), want_w, atol=1e-8, rtol=0)


def _slab_field(z0: float, z1: float, sigma: float, colour: float):
    """Density ``sigma`` (after softplus(raw - 1)) for z0 <= z <= z1, ~0 elsewhere; constant colour."""
    raw_in = math.log(math.expm1(sigma)) + 1.0

    def field(points: torch.Tensor):
        inside = (points[..., 2:3] >= z0) & (points[..., 2:3] <= z1)
        raw = torch.where(inside, torch.full_like(points[..., :1], raw_in), torch.full_like(points[..., :1], -60.0))
        return torch.full_like(points[..., :1].expand(*points.shape[:-1], 3), colour), raw

    return field


def _slab_rays():
    """Rays from (0, 0, -2.75) with z-direction cosines 1, 0.97, 0.9 (two batch items)."""
    cosines = torch.tensor([1.0, 0.97, 0.9, 0.95])
    sines = torch.sqrt(1 - cosines**2)
    dirs = torch.stack([sines, torch.zeros_like(sines), cosines], -1).reshape(2, 2, 3)
    origins = torch.tensor([0.0, 0.0, -2.75]).expand(2, 2, 3)
    return origins, dirs, cosines.reshape(2, 2, 1)


def _slab_closed_form(cos: torch.Tensor, z0: float, z1: float, sigma: float):
    t_in = (z0 + 2.75) / cos
    length = (z1 - z0) / cos
    trans = torch.exp(-sigma * length)
    depth = t_in + 1 / sigma - length * trans / (1 - trans)  # mean of the exponential truncated to the slab
    return 1 - trans, depth


def test_render_slab_matches_closed_form_transmittance_alpha_depth():
    """A constant-density slab |z| <= 0.2 seen along oblique rays: alpha = 1 - exp(-sigma L / cos),
    depth = t_in + 1/sigma - L' T / (1 - T), feature = 2 alpha c - 1 (dense stratified sampling)."""
    z0, z1, sigma, colour = -0.2, 0.2, 5.0, 0.6
    origins, dirs, cos = _slab_rays()
    out = render_rays(_slab_field(z0, z1, sigma, colour), origins, dirs, num_coarse=3000, num_importance=0,
                      ray_start=2.25, ray_end=3.3, perturb=False)
    alpha, depth = _slab_closed_form(cos, z0, z1, sigma)
    torch.testing.assert_close(out["alpha"], alpha, atol=2e-3, rtol=0)
    torch.testing.assert_close(out["depth"], depth, atol=2e-3, rtol=0)
    torch.testing.assert_close(out["features"], (2 * alpha * colour - 1).expand(2, 2, 3), atol=3e-3, rtol=0)


def _gaussian_shell_field(amplitude: float, width: float):
    """Activated density amplitude * exp(-z^2 / (2 width^2)): a smooth thin 'surface' at z = 0."""

    def field(points: torch.Tensor):
        sigma = amplitude * torch.exp(-points[..., 2:3].square() / (2 * width**2)) + 1e-6
        return torch.full_like(points, 0.5), torch.log(torch.expm1(sigma)) + 1.0  # raw, as softplus(raw - 1) = sigma

    return field


def test_importance_sampling_beats_uniform_on_thin_surface():
    """On a thin Gaussian density shell, 32 stratified + 32 importance samples give a smaller
    alpha error (closed form 1 - exp(-A w sqrt(2 pi) / cos)) and depth error (dense reference)
    than 64 uniform samples: the second pass concentrates samples where the weights are."""
    amplitude, width = 80.0, 0.01
    origins, dirs, cos = _slab_rays()
    field = _gaussian_shell_field(amplitude, width)
    alpha = 1 - torch.exp(-amplitude * width * math.sqrt(2 * math.pi) / cos)
    dense = render_rays(field, origins, dirs, 20000, 0, 2.25, 3.3, perturb=False)
    torch.testing.assert_close(dense["alpha"], alpha, atol=1e-5, rtol=0)
    hier = render_rays(field, origins, dirs, 32, 32, 2.25, 3.3, perturb=False)
    flat = render_rays(field, origins, dirs, 64, 0, 2.25, 3.3, perturb=False)
    a_err = lambda o: float((o["alpha"] - alpha).abs().max())  # noqa: E731
    d_err = lambda o: float((o["depth"] - dense["depth"]).abs().max())  # noqa: E731
    assert a_err(hier) < 0.3 * a_err(flat) and a_err(hier) < 2e-3
    assert d_err(hier) < 0.3 * d_err(flat) and d_err(hier) < 1e-3


def test_importance_depths_follow_inverse_cdf():
    """Deterministic importance samples equal np.interp(u, cdf, edges) of the smoothed
    (max-pool, avg-pool, +0.01) coarse weights at levels u = (i + 0.5) / n, and stay sorted."""
    rng = np.random.default_rng(0)
    s, n = 9, 12
    edges = np.sort(rng.uniform(2.0, 3.0, s))
    weights = np.zeros(s - 1)
    weights[5] = 0.9
    weights[1] = 0.05
    got = importance_depths(
        torch.tensor(edges, dtype=torch.float32).reshape(1, 1, s, 1),
        torch.tensor(weights, dtype=torch.float32).reshape(1, 1, s - 1, 1), n, perturb=False,
    ).reshape(-1).numpy()
    w = weights + 1e-5
    padded = np.concatenate([[-np.inf], w, [-np.inf]])
    pooled = np.maximum(padded[:-1], padded[1:])  # max-pool width 2, padding 1 -> s values
    smooth = 0.5 * (pooled[:-1] + pooled[1:]) + 0.01
    cdf = np.concatenate([[0.0], np.cumsum(smooth / smooth.sum())])
    want = np.interp((np.arange(n) + 0.5) / n, cdf, edges)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.diff(got) >= 0)


def test_stratified_depths_range_and_errors():
    """Stratified depths are linspace(start, end) without jitter and within one spacing above it
    with jitter; a reversed range is rejected naming ray_start/ray_end."""
    d = stratified_depths(2, 3, 5, 2.0, 3.0, perturb=False, device=torch.device("cpu"))
    torch.testing.assert_close(d[1, 2, :, 0], torch.linspace(2.0, 3.0, 5))
    torch.manual_seed(0)
    j = stratified_depths(2, 3, 5, 2.0, 3.0, perturb=True, device=torch.device("cpu"))
    assert ((j - d) >= 0).all() and ((j - d) < 0.25).all() and (j != d).any()
    with pytest.raises(ValueError, match="ray_start"):
        stratified_depths(1, 1, 4, 3.0, 2.0, perturb=False, device=torch.device("cpu"))


def _mid_point_reference(depths, features, raw, density_bias):
    """Eq. 3 written out literally: mid-point features and densities of the sorted samples."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    sigma = torch.nn.functional.softplus((raw[:, :, 1:] + raw[:, :, :-1]) / 2 + density_bias)
    alpha = 1 - torch.exp(-sigma * deltas)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], 2), 2)[:, :, :-1]
    weights = alpha * trans
    return (weights * (features[:, :, 1:] + features[:, :, :-1]) / 2).sum(2) * 2 - 1, weights


def test_hierarchical_render_equals_sorted_union_reference():
    """render_rays composites the union of coarse and importance samples as eq. 3 on the depth-sorted
    union (features summed in evaluation order with per-sample weights): equal to the literal
    concatenate-sort-mid-point reference (float32 rendering of the same samples), with the same
    gradients w.r.t. the field."""
    torch.manual_seed(0)
    batch, rays, coarse, fine, channels = 2, 5, 7, 6, 3
    origins = torch.randn(batch, rays, 3, dtype=torch.float64) * 0.1 + torch.tensor([0.0, 0.0, -2.7], dtype=torch.float64)
    dirs = torch.nn.functional.normalize(torch.randn(batch, rays, 3, dtype=torch.float64) * 0.1
                                         + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), dim=-1)
    mix = torch.randn(3, channels + 1, dtype=torch.float64, requires_grad=True)

    def field(points):
        h = torch.sin(points * 3) @ mix
        return torch.sigmoid(h[..., 1:]), h[..., :1] * 4

    out = render_rays(field, origins, dirs, coarse, fine, 2.25, 3.3, perturb=False, density_bias=-1.0)
    # The same samples: stratified depths, then importance depths from the coarse weights.
    depths = stratified_depths(batch, rays, coarse, 2.25, 3.3, False, origins.device)
    feats_c, raw_c = field((origins[:, :, None] + dirs[:, :, None] * depths).reshape(batch, -1, 3))
    _, coarse_w = _mid_point_reference(depths, feats_c.reshape(batch, rays, coarse, -1),
                                       raw_c.reshape(batch, rays, coarse, 1), -1.0)
    fine_d = importance_depths(depths, coarse_w.detach(), fine, perturb=False)
    all_d = torch.cat([depths, fine_d], 2)
    order = all_d.argsort(2)
    all_d = all_d.gather(2, order)
    feats, raw = field((origins[:, :, None] + dirs[:, :, None] * all_d).reshape(batch, -1, 3))
    want, weights = _mid_point_reference(all_d, feats.reshape(batch, rays, coarse + fine, -1),
                                         raw.reshape(batch, rays, coarse + fine, 1), -1.0)
    torch.testing.assert_close(out["features"], want.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["weights"], weights.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["alpha"], weights.sum(2).float(), atol=1e-6, rtol=1e-5)
    probe = torch.randn_like(want)
    (g_out,) = torch.autograd.grad((out["features"] * probe).sum() + out["depth"].sum(), mix)
    depth_ref = (weights * (all_d[:, :, 1:] + all_d[:, :, :-1]) / 2).sum(2) / weights.sum(2)
    (g_ref,) = torch.autograd.grad((want * probe).sum() + depth_ref.sum(), mix)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-4)
