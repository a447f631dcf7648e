"""Geometry benchmarks: surface-field deformation (eq. 4-5) and the discriminator mesh render.

python -m benchmarks.bench_geometry --device cuda --out benchmarks/results/geometry-cuda.json
python -m benchmarks.bench_geometry --device cpu --small          # checks the script itself
python -m benchmarks.bench_geometry --device cpu --batches 8 --grids 4,8,16,32:256 --warmup 1 --no-baselines
    (the CPU table: the brute-force baseline alone would take ~1 h of the 20 required runs there;
    add --cpu-search torch for the pure PyTorch pair loops instead of the numba-compiled ones)

Deformation: 64*64*96 ray samples per image (EG3D's 64^2 neural render, 48+48 samples) against a
closed head-like mesh of 2,520 triangles (a latitude-longitude sphere squashed to head proportions
with smooth bumps), batches 1, 8, 32, for a few candidate-grid hierarchies and capacities (forward, and
forward + backward to the points at the default grid; the grid's overflow fraction and mean candidate
count are recorded under "extra"); baselines: pytorch3d's
brute-force point-to-triangle kernel and knn_points (K=1) against a ~5k-vertex version of the mesh.
Mesh render: world-coordinate render at 64^2 and 512^2, batch 32, of a ~10k-triangle (FLAME-size) mesh.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import common_args, report, time_fn
from clipportrait.geometry import cameras as C
from clipportrait.geometry.deformation import DeformationConfig, SurfaceFieldDeformation, build_fixed_grid
from clipportrait.geometry.mesh_render import render_vertex_coords


def uv_sphere(n_lat: int, n_lon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed unit sphere: 2 poles + (n_lat - 1) rings of n_lon vertices; 2 * n_lon * (n_lat - 1) faces,
    wound counter-clockwise seen from outside."""
    theta = torch.arange(1, n_lat) * torch.pi / n_lat
    phi = torch.arange(n_lon) * 2 * torch.pi / n_lon
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    ring = torch.stack((t.sin() * p.cos(), t.cos(), t.sin() * p.sin()), -1).reshape(-1, 3)
    verts = torch.cat((torch.tensor([[0.0, 1.0, 0.0]]), ring, torch.tensor([[0.0, -1.0, 0.0]])))
    south = verts.shape[0] - 1
    faces = []
    j = torch.arange(n_lon)
    jn = (j + 1) % n_lon
    faces.append(torch.stack((torch.zeros_like(j), 1 + jn, 1 + j), -1))
    for i in range(n_lat - 2):
        a, b = 1 + i * n_lon + j, 1 + i * n_lon + jn
        c, d = a + n_lon, b + n_lon
        faces += [torch.stack((a, b, c), -1), torch.stack((b, d, c), -1)]
    last = 1 + (n_lat - 2) * n_lon
    faces.append(torch.stack((last + j, last + jn, torch.full_like(j, south)), -1))
    return verts, torch.cat(faces)


def head_like_mesh(n_lat: int, n_lon: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A sphere scaled to a head's proportions (~0.5 tall) with smooth bumps (nose, chin, ears)."""
    v, f = uv_sphere(n_lat, n_lon)
    g = torch.Generator().manual_seed(seed)
    bumps = torch.zeros(v.shape[0])
    for centre in torch.tensor([[0, 0, 1.0], [0, -0.6, 0.8], [1.0, 0, 0], [-1.0, 0, 0]]) + 0.05 * torch.randn(4, 3, generator=g):
        bumps += 0.15 * torch.exp(-12 * (1 - v @ (centre / centre.norm())))
    v = v * (1 + bumps)[:, None] * torch.tensor([0.19, 0.25, 0.22]) + torch.tensor([0.0, 0.05, 0.1])
    return v.to(device), f.to(device)


def sample_points(labels: torch.Tensor, res: int, samples: int) -> torch.Tensor:
    """Stratified samples along each ray in EG3D's depth range [2.25, 3.3]: (B, res*res*samples, 3)."""
    origins, dirs = C.ray_bundle(labels, res)
    depths = torch.linspace(2.25, 3.3, samples, device=labels.device)
    return (origins[:, :, None] + depths[None, None, :, None] * dirs[:, :, None]).reshape(labels.shape[0], -1, 3)


def main(argv: list[str] | None = None) -> None:
    parser = common_args(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--grids", type=str, nargs="+", default=["4,8,16,32:256", "4,8,16,32:128", "8,16,32:256"],
                        help="candidate grids to time: comma-separated resolutions, ':', finest-cell capacity")
    parser.add_argument("--cpu-search", default="auto", choices=["auto", "numba", "torch"],
                        help="deformation.cpu_search: the CPU search's pair loops (numba-compiled or PyTorch)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="also time pytorch3d's brute-force point-face distance and knn_points")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    res, samples = (16, 24) if args.small else (64, 96)
    batches = args.batches or ([1, 2] if args.small else [1, 8, 32])
    verts, faces = head_like_mesh(*((12, 12) if args.small else (36, 36)), device)  # 264 / 2,520 faces
    canon = verts * 1.03
    results = []
    timing = dict(device=device, warmup=args.warmup, runs=args.runs)
    for batch in batches:
        labels = C.sample_ffhq_like(batch, generator=torch.Generator().manual_seed(batch), device=device)
        points = sample_points(labels, res, samples)
        obs = verts[None] + 0.005 * torch.randn(batch, *verts.shape, device=device)
        n = points.shape[1]
        extra = {"points_per_image": n, "triangles": faces.shape[0],
                 **({"cpu_search": args.cpu_search, "threads": torch.get_num_threads()} if device.type == "cpu" else {})}
        for spec in args.grids:
            levels, capacity = spec.split(":")
            cfg = DeformationConfig(grid_levels=[int(x) for x in levels.split(",")], grid_capacity=int(capacity),
                                    cpu_search=args.cpu_search)
            module = SurfaceFieldDeformation(faces, cfg).to(device)
            if device.type == "cuda":
                grid = build_fixed_grid(obs[:, faces].float(), cfg.shell + cfg.blend, cfg.grid_levels, cfg.grid_capacity)
                own = grid.counts <= cfg.grid_capacity
                stats = {"overflow_cells": int((~own).sum()), "cells": grid.counts.numel(),
                         "mean_candidates_nonempty": float(grid.counts[grid.counts > 0].float().mean())}
            else:
                stats = {}
            with torch.no_grad():
                results.append(time_fn(lambda: module(points, obs, canon[None]), name=f"deformation {spec}",
                                       batch=batch, dtype="float32", extra={**extra, **stats}, **timing))
            if spec == args.grids[0] and device.type == "cuda":
                obs_tris = obs[:, faces].float()
                results.append(time_fn(lambda: build_fixed_grid(obs_tris, cfg.shell + cfg.blend, cfg.grid_levels,
                                                                cfg.grid_capacity),
                                       name=f"deformation {spec} grid build only", batch=batch, dtype="float32",
                                       extra=extra, **timing))
            if spec == args.grids[0]:
                pts = points.clone().requires_grad_()
                results.append(time_fn(lambda: torch.autograd.grad(module(pts, obs, canon[None]).sum(), pts),
                                       name=f"deformation {spec} fwd+bwd (points)", batch=batch, dtype="float32",
                                       extra=extra, **timing))
        if not args.baselines:
            continue
        import pytorch3d._C as p3d_c

        flat_points = points.reshape(-1, 3)
        first_pt = torch.arange(batch, device=device) * n
        tris = obs[:, faces].reshape(-1, 3, 3)
        first_tri = torch.arange(batch, device=device) * faces.shape[0]
        results.append(time_fn(lambda: p3d_c.point_face_dist_forward(flat_points, first_pt, tris, first_tri, n, 0.0),
                               name="pytorch3d point_face_dist (brute force)", batch=batch, dtype="float32", extra=extra, **timing))
        from pytorch3d.ops import knn_points

        dense = head_like_mesh(*((12, 12) if args.small else (72, 70)), device)[0][None].expand(batch, -1, -1).contiguous()
        results.append(time_fn(lambda: knn_points(points, dense, K=1),
                               name=f"pytorch3d knn_points K=1 ({dense.shape[1]} verts)", batch=batch, dtype="float32",
                               extra=extra, **timing))
    render_verts, render_faces = head_like_mesh(*((12, 12) if args.small else (72, 70)), device)  # 9,940 faces
    render_batch = 2 if args.small else 32
    labels = C.sample_ffhq_like(render_batch, generator=torch.Generator().manual_seed(0), device=device)
    rv = render_verts[None].expand(render_batch, -1, -1)
    for image_res in ([32, 64] if args.small else [64, 512]):
        results.append(time_fn(lambda: render_vertex_coords(rv, render_faces, labels, image_res),
                               name=f"mesh render {image_res}^2 ({render_faces.shape[0]} faces)", batch=render_batch,
                               dtype="float32", extra={"faces": render_faces.shape[0]}, **timing))
    out = args.out or f"benchmarks/results/geometry-{device.type}.json"
    report(results, title="geometry", device=device, out=out)


if __name__ == "__main__":
    main()
