"""Fused tri-plane lookup on CUDA (Triton): bilinear features from the three planes, averaged.

The same arithmetic as ``triplane.sample_triplane(...).mean(1)`` (``grid_sample``, bilinear, zero
padding, ``align_corners=False``) in one kernel, on planes stored channels-last (B, 3, H, W, C).
Why: ``grid_sample`` on (B*3, C, H, W) planes reads and, in its backward, atomically adds each
channel of a corner at a stride of H*W elements, which made its backward about a tenth of the
generator's training step on an H100. Channels-last, one point's C channels of a corner are one
contiguous row, so loads and atomic adds are coalesced, and the (B, 3, M, C) per-plane features are
never materialised.

The backward gives the planes' gradient only (the points' gradient is never needed in training: rays
and the deformation do not depend on G's parameters); ``TriplaneGenerator.field`` uses the PyTorch
lookup for points that require one.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path is used
    triton = None


if triton is not None:

    @triton.jit
    def _corner_terms(u, v, scale, H, W):
        """Pixel coordinates (align_corners=False) of grid position (u, v) * scale: the top-left
        corner (x0, y0) and the fractional offsets; positions are clamped to [-2, size + 1] first,
        which changes no weight (every corner beyond [-1, size] is zero padding) but keeps the
        integer conversion in range; NaN positions are marked invalid."""
        ix = ((u * scale + 1.0) * W - 1.0) * 0.5
        iy = ((v * scale + 1.0) * H - 1.0) * 0.5
        ok = (ix == ix) & (iy == iy)
        ix = tl.minimum(tl.maximum(tl.where(ok, ix, -2.0), -2.0), W + 1.0)
        iy = tl.minimum(tl.maximum(tl.where(ok, iy, -2.0), -2.0), H + 1.0)
        x0f = tl.floor(ix)
        y0f = tl.floor(iy)
        return x0f.to(tl.int32), y0f.to(tl.int32), ix - x0f, iy - y0f

    @triton.jit
    def _triplane_kernel(planes_ptr, pts_ptr, out_ptr, total, n_per, H, W, scale,
                         C: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        """Forward: out[k] = mean_p bilinear(plane p of batch k // n_per, point k). Backward
        (``BACKWARD``): atomically add grad_out[k] * weight / 3 into each corner of ``planes_ptr``
        (then the planes' gradient buffer) and read grad_out from ``out_ptr``."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        batch = offs // n_per
        ch = tl.arange(0, C)
        px = tl.load(pts_ptr + offs * 3 + 0, mask=m, other=0.0)
        py = tl.load(pts_ptr + offs * 3 + 1, mask=m, other=0.0)
        pz = tl.load(pts_ptr + offs * 3 + 2, mask=m, other=0.0)
        if BACKWARD:
            g = tl.load(out_ptr + offs[:, None] * C + ch[None, :], mask=m[:, None], other=0.0) * (1.0 / 3.0)
        else:
            acc = tl.zeros((BLOCK, C), dtype=tl.float32)
        for p in tl.static_range(3):
            # Plane axes as triplane.PLANE_AXES: (x, y), (x, z), (z, y) as (width, height).
            if p == 0:
                u, v = px, py
            elif p == 1:
                u, v = px, pz
            else:
                u, v = pz, py
            x0, y0, fx, fy = _corner_terms(u, v, scale, H, W)
            plane = (batch * 3 + p) * H
            for corner in tl.static_range(4):
                dx = corner % 2
                dy = corner // 2
                xi = x0 + dx
                yi = y0 + dy
                wx = fx if dx == 1 else 1.0 - fx
                wy = fy if dy == 1 else 1.0 - fy
                valid = m & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
                row = ((plane + yi) * W + xi) * C
                ptrs = planes_ptr + row[:, None] + ch[None, :]
                if BACKWARD:
                    # Relaxed: only the sums matter, read after the kernel. Triton's default (acq_rel)
                    # orders memory around every add: 17.7 ms per coarse pass at eg3d_512, batch 32
                    # on an H100, 3.7 ms relaxed (benchmarks/bench_triplane.py).
                    tl.atomic_add(ptrs, g * (wx * wy)[:, None], mask=valid[:, None], sem="relaxed")
                else:
                    acc += tl.load(ptrs, mask=valid[:, None], other=0.0) * (wx * wy)[:, None]
        if not BACKWARD:
            tl.store(out_ptr + offs[:, None] * C + ch[None, :], acc * (1.0 / 3.0), mask=m[:, None])


_BLOCK, _WARPS = 64, 4


def _launch(planes_cl: torch.Tensor, points: torch.Tensor, out: torch.Tensor, scale: float, backward: bool) -> None:
    height, width, channels = planes_cl.shape[2:]
    total = points.shape[0] * points.shape[1]
    if total:
        _triplane_kernel[(triton.cdiv(total, _BLOCK),)](
            planes_cl, points, out, total, points.shape[1], height, width, scale,
            C=channels, BACKWARD=backward, BLOCK=_BLOCK, num_warps=_WARPS)


class _TriplaneMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, planes_cl: torch.Tensor, points: torch.Tensor, scale: float) -> torch.Tensor:
        pts = points.detach().float().contiguous()
        out = torch.empty(*points.shape[:2], planes_cl.shape[-1], device=points.device, dtype=torch.float32)
        _launch(planes_cl.detach(), pts, out, scale, backward=False)
        ctx.save_for_backward(pts)
        ctx.plane_shape, ctx.scale = planes_cl.shape, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (pts,) = ctx.saved_tensors
        grad_planes = torch.zeros(ctx.plane_shape, device=pts.device, dtype=torch.float32)
        _launch(grad_planes, pts, grad_out.float().contiguous(), ctx.scale, backward=True)
        return grad_planes, None, None


def channels_last_planes(planes: torch.Tensor) -> torch.Tensor:
    """(B, 3, C, H, W) -> contiguous float32 (B, 3, H, W, C), differentiable."""
    return planes.float().permute(0, 1, 3, 4, 2).contiguous()


def available(planes: torch.Tensor) -> bool:
    """Whether the fused kernel applies to ``planes`` (B, 3, C, H, W): Triton present, CUDA tensors
    (or Triton's CPU interpreter, TRITON_INTERPRET=1) and a power-of-two channel count."""
    if triton is None:
        return False
    on_device = planes.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    channels = planes.shape[2]
    return on_device and channels & (channels - 1) == 0


def triplane_mean(planes_cl: torch.Tensor, points: torch.Tensor, box_warp: float) -> torch.Tensor:
    """Mean bilinear features (B, M, C) float32 of ``points`` (B, M, 3) from channels-last planes."""
    return _TriplaneMean.apply(planes_cl, points, 2.0 / box_warp)
