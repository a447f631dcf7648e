"""Tri-plane lookup: the fused Triton kernel (nn/triplane_triton.py) forward, and its backward (the
planes' gradient by atomic adds), against the PyTorch lookup (``grid_sample``) forward + backward.

    python -m benchmarks.bench_triplane --device cuda
    python -m benchmarks.bench_triplane --device cpu --small     # checks the script (PyTorch rows only)

Workload: one render pass at eg3d_512 sizes: batch 32, a 64^2 ray grid from FFHQ-like cameras with 48
unperturbed depths per ray (6.3M points, ray-major, as the renderer queries them), 256^2 planes of 32
channels. Every point's 32 channels go to 4 corners of 3 planes: 2.4G atomic adds per backward.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Timing, common_args, report, set_cuda_math, time_variant
from clipportrait.geometry.cameras import ray_bundle, sample_ffhq_like
from clipportrait.nn import triplane_triton
from clipportrait.nn.config import BackboneConfig
from clipportrait.nn.renderer import sample_points, stratified_depths
from clipportrait.nn.triplane import sample_triplane


def pass_points(batch: int, rays: int, samples: int, device: torch.device) -> torch.Tensor:
    """The coarse pass's sample points (B, rays^2 * samples, 3) of FFHQ-like cameras."""
    cfg = BackboneConfig()
    origins, dirs = ray_bundle(sample_ffhq_like(batch, generator=torch.Generator().manual_seed(0)).to(device), rays)
    depths = stratified_depths(batch, rays * rays, samples, cfg.ray_start, cfg.ray_end, False, device)
    return sample_points(origins, dirs, depths).contiguous()


def main(argv: list[str] | None = None) -> None:
    args = common_args(__doc__.splitlines()[0]).parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        set_cuda_math(tf32=True)
    batch, rays, samples, size, channels = (2, 16, 8, 32, 8) if args.small else (32, 64, 48, 256, 32)
    points = pass_points(batch, rays, samples, device)
    gen = torch.Generator(device=device).manual_seed(1)
    planes = torch.randn(batch, 3, channels, size, size, device=device, generator=gen)
    grad = torch.randn(batch, points.shape[1], channels, device=device, generator=gen)
    extra = {"points": int(points.shape[0] * points.shape[1]), "plane_resolution": size, "channels": channels}
    results: list[Timing] = []

    def run(label, fn):
        time_variant(results, label, fn, batch=batch, dtype="fp32", device=device, warmup=args.warmup,
                     runs=args.runs, extra=extra)

    if triplane_triton.available(planes):
        planes_cl = triplane_triton.channels_last_planes(planes)
        run("fused lookup forward", lambda: triplane_triton.triplane_mean(planes_cl, points, 1.0))
        leaf = planes_cl.detach().requires_grad_(True)
        out = triplane_triton.triplane_mean(leaf, points, 1.0)
        run("fused lookup backward (atomic adds)", lambda: torch.autograd.grad(out, leaf, grad, retain_graph=True))
    else:
        print("fused lookup: not available here (needs CUDA); PyTorch rows only")
    leaf = planes.detach().requires_grad_(True)

    def pytorch_lookup():
        features = sample_triplane(leaf, points).mean(1)
        return torch.autograd.grad(features, leaf, grad)

    run("PyTorch lookup (grid_sample) forward + backward", pytorch_lookup)
    out_path = args.out or f"benchmarks/results/triplane-{device.type}.json"
    report(results, title=f"tri-plane lookup, {extra['points']} points, {size}^2 x {channels} planes, batch {batch}",
           device=device, out=out_path)


if __name__ == "__main__":
    main()
