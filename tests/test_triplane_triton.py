"""The fused Triton tri-plane lookup against the PyTorch path (grid_sample), run by Triton's CPU
interpreter in a subprocess (TRITON_INTERPRET must be set before Triton is imported) and, where a
GPU is present, compiled on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_CHECK = r"""
import torch
from clipportrait.nn import build_generator, preset
from clipportrait.nn import triplane_triton as T
from clipportrait.nn.triplane import sample_triplane

torch.manual_seed(0)
B, C, H, W, M = 2, 8, 5, 7, 400
planes = torch.randn(B, 3, C, H, W, requires_grad=True)
pts = (torch.rand(B, M, 3) - 0.5) * 1.6  # about half outside the box: zero padding
# Box corners and faces, the centre, a point beyond the box, a NaN point (reads zero in both paths).
pts[0, :6] = torch.tensor([[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5], [0.0, 0.0, 0.0], [0.49, -0.3, 0.2],
                           [3.0, 0.1, 0.1], [-0.25, 0.5, -0.5]])
assert T.available(planes)
for box_warp in (1.0, 2.0):
    ref = sample_triplane(planes, pts, box_warp).mean(1)
    out = T.triplane_mean(T.channels_last_planes(planes), pts, box_warp)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * g).sum(), planes)
    (g_out,) = torch.autograd.grad((out * g).sum(), planes)
    assert torch.allclose(g_out, g_ref, atol=1e-5), (g_out - g_ref).abs().max()
assert not T.available(torch.zeros(1, 3, 6, 4, 4))  # 6 channels: not a power of two

# The whole tiny generator: fused and PyTorch lookups give the same images and parameter gradients.
cfg, _ = preset("tiny", neural_rendering_resolution=8, depth_samples=6, importance_samples=6, img_resolution=32,
                sr_input_resolution=16)
G = build_generator(cfg)
z = torch.randn(2, cfg.z_dim)
from clipportrait.geometry.cameras import sample_ffhq_like
c = sample_ffhq_like(2, generator=torch.Generator().manual_seed(1))
calls = []
plain = T.triplane_mean
T.triplane_mean = lambda *a: calls.append(1) or plain(*a)
results = {}
for fused in (True, False):
    G.cfg.cuda_fast_path = fused
    G.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    out = G(z, c, noise_mode="const")
    (out["image"].square().mean() + out["image_raw"].square().mean()).backward()
    results[fused] = out["image"].detach(), {n: p.grad.clone() for n, p in G.named_parameters() if p.grad is not None}
    assert len(calls) == (2 if fused else 0), len(calls)  # coarse + importance pass, fused only
    calls.clear()
assert torch.allclose(results[True][0], results[False][0], atol=1e-5)
assert results[True][1].keys() == results[False][1].keys()
for name, grad in results[True][1].items():
    assert torch.allclose(grad, results[False][1][name], atol=1e-5, rtol=1e-4), name
print("ok")
"""


def test_fused_triplane_lookup_matches_grid_sample_in_interpreter():
    """Under Triton's interpreter: the fused lookup equals grid_sample's bilinear, zero-padded,
    align_corners=False lookup averaged over the planes (box corners, faces, outside points, two box
    sizes) and its backward gives the same plane gradients; a tiny generator gives the same images and
    parameter gradients with the fused and the PyTorch lookup."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_points_requiring_grad_take_the_pytorch_path():
    """The fused kernel has no gradient for the points, so the field falls back to grid_sample when
    points require one: gradients reach the points (checked against finite differences)."""
    from clipportrait.nn import build_generator, preset

    cfg, _ = preset("tiny")
    G = build_generator(cfg).double()
    planes = torch.randn(1, 3, cfg.triplane_channels, 8, 8, dtype=torch.float64)
    pts = (torch.rand(1, 5, 3, dtype=torch.float64) - 0.5) * 0.5
    pts.requires_grad_(True)
    field = G.field(planes)
    assert torch.autograd.gradcheck(lambda p: field(p)[1], (pts,), eps=1e-6, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")
def test_fused_triplane_lookup_on_cuda():
    """Compiled on CUDA at EG3D's sizes (32 channels, 256^2 planes): forward and plane gradients equal
    grid_sample's (float32 atomics change the summation order only)."""
    from clipportrait.nn import triplane_triton as T
    from clipportrait.nn.triplane import sample_triplane

    torch.manual_seed(0)
    planes = torch.randn(2, 3, 32, 256, 256, device="cuda", requires_grad=True)
    pts = (torch.rand(2, 50_000, 3, device="cuda") - 0.5) * 1.2
    ref = sample_triplane(planes, pts, 1.0).mean(1)
    out = T.triplane_mean(T.channels_last_planes(planes), pts, 1.0)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * g).sum(), planes)
    (g_out,) = torch.autograd.grad((out * g).sum(), planes)
    assert torch.allclose(g_out, g_ref, atol=1e-4)
