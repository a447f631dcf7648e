"""Stage-1 generator speed: eg3d_512 latency (batch 1), throughput (batch 32), forward+backward
(batch 8) and peak memory, in TF32 and bf16, with and without surface-field deformation.

    python -m benchmarks.bench_generator --device cuda --out benchmarks/results/bench_generator-cuda.json
    python -m benchmarks.bench_generator --small          # tiny preset on CPU, checks the script
    ... --compile cuda                                     # every row with backbone.compile=cuda
    ... --cuda-graphs                                      # extra batch-1 variant replayed as a CUDA graph

EG3D's official generator on an H100 (DESIGN sec. 8): batch-1 forward 23.5 ms, batch-32 forward
200.7 images/s, batch-8 forward+backward 129.4 ms, peak 0.49 / 10.0 / 13.1 GiB.
"""

from __future__ import annotations

import functools
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.harness import Timing, common_args, report, set_cuda_math, time_variant
from clipportrait.geometry.cameras import ray_bundle, sample_ffhq_like
from clipportrait.nn import build_generator, preset
from clipportrait.nn.compiled import wanted
from clipportrait.utils.cuda_graphs import GraphCaptureError, GraphedFunction

EG3D_H100 = {"b1_forward_ms": 23.5, "b32_forward_images_per_s": 200.7, "b8_fwd_bwd_ms": 129.4,
             "peak_gib": [0.49, 10.0, 13.1]}


@functools.lru_cache(maxsize=None)
def _head(faces_target: int, device: torch.device):
    from clipportrait.geometry.morphable.config import MorphableConfig, build_morphable

    return build_morphable(MorphableConfig(target_faces_simplified=faces_target)).to(device)


def make_deformer(batch: int, device: torch.device, faces_target: int):
    """A factory of surface-field deformations bound to random observation meshes of the procedural
    head's simplified mesh (~faces_target triangles) and its canonical mesh, and the face count. Call
    the factory once per generator call, as the training and generation code binds per batch (the
    bound deformation builds its search grid at its first call and reuses it for the second pass)."""
    from clipportrait.geometry.deformation import SurfaceFieldDeformation

    head = _head(faces_target, device)
    gen = torch.Generator().manual_seed(0)
    params = head.sample_params(batch, generator=gen)
    obs = head.simplify(head(params.shape, params.expression, params.pose))
    canon = head.simplify(head.canonical_vertices(1))
    deformation = SurfaceFieldDeformation(head.simplified_faces).to(device)
    return functools.partial(deformation.bind, obs, canon), int(head.simplified_faces.shape[0])


def precision_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def main(argv: list[str] | None = None) -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--cuda-graphs", action="store_true", help="also time batch-1 replayed as a CUDA graph")
    parser.add_argument("--no-deform", action="store_true", help="skip the with-deformation rows")
    parser.add_argument("--latency-only", action="store_true",
                        help="skip the main table: only the batch-1 eager / --cuda-graphs variants")
    parser.add_argument("--faces", type=int, default=2500, help="triangles of the deformation mesh")
    parser.add_argument("--eager", action="store_true",
                        help="cuda_fast_path=False: the NCHW reference path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        set_cuda_math(tf32=True, autotune=True)
    name = "tiny" if args.small else "eg3d_512"
    # --small only checks the script: a coarser render keeps it to a few minutes on a busy CPU.
    g_cfg, _ = preset(name, neural_rendering_resolution=16, depth_samples=8, importance_samples=8) if args.small \
        else preset(name)
    g_cfg.cuda_fast_path = not args.eager
    g_cfg.compile = args.compile
    b_lat, b_thr, b_train = (1, 2, 2) if args.small else (1, 32, 8)
    faces = 300 if args.small else args.faces
    torch.manual_seed(0)
    G = build_generator(g_cfg).to(device)
    G_params = sum(p.numel() for p in G.parameters())
    results: list[Timing] = []

    def run(label: str, fn, batch: int, precision: str, extra: dict) -> None:
        time_variant(results, label, fn, batch=batch, dtype=precision, device=device, warmup=args.warmup,
                     runs=args.runs, extra=extra)

    deform_options = [False] if args.no_deform else [False, True]
    for deform in [] if args.latency_only else deform_options:
        for precision in ("tf32", "bf16"):
            tag = f"{'deform' if deform else 'rigid'} {precision}"
            for batch, mode in ((b_lat, "forward"), (b_thr, "forward"), (b_train, "fwd+bwd")):
                deformer, n_faces = make_deformer(batch, device, faces) if deform else (lambda: None, 0)
                z = torch.randn(batch, g_cfg.z_dim, device=device)
                c = sample_ffhq_like(batch, generator=torch.Generator().manual_seed(1)).to(device)
                extra = {"preset": name, "params": G_params, "deformation_faces": n_faces, "mode": mode,
                         "cuda_fast_path": g_cfg.cuda_fast_path, "compile": g_cfg.compile}

                if mode == "forward":
                    G.eval()

                    def fn(z=z, c=c, deformer=deformer, precision=precision):
                        with torch.inference_mode(), precision_context(precision, device):
                            return G(z, c, deformer())["image"]
                else:
                    G.train()

                    def fn(z=z, c=c, deformer=deformer, precision=precision):
                        with precision_context(precision, device):
                            out = G(z, c, deformer())
                            loss = out["image"].float().square().mean() + out["image_raw"].float().square().mean()
                        loss.backward()

                run(f"G {mode} {tag}", fn, batch, precision, extra)
                G.zero_grad(set_to_none=True)
    G.eval()

    if args.latency_only or args.cuda_graphs:
        # Rays of a fixed camera are computed once, as an interactive viewer would cache them (the
        # whole text -> portrait path, rays included, is graphed in bench_generate).
        z = torch.randn(b_lat, g_cfg.z_dim, device=device)
        c = sample_ffhq_like(b_lat, generator=torch.Generator().manual_seed(1)).to(device)
        origins, dirs = ray_bundle(c, g_cfg.neural_rendering_resolution)

        bind, n_faces = make_deformer(b_lat, device, faces)

        for deform, precision in [(d, p) for d in deform_options for p in ("tf32", "bf16")]:
            tag = f"{'deform' if deform else 'rigid'} {precision}"

            def core(z: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor, deform=deform) -> torch.Tensor:
                # Bound inside, so a captured graph contains the deformation's grid build too.
                return G.render(G.mapping(z), origins, dirs, bind() if deform else None)["image"]

            def eager(precision=precision, step=core):
                with torch.inference_mode(), precision_context(precision, device):
                    return step(z, origins, dirs)

            extra = {"preset": name, "params": G_params, "rays": "precomputed", "compile": g_cfg.compile,
                     "deformation_faces": n_faces if deform else 0}
            run(f"G mapping+render {tag} {'compiled' if wanted(g_cfg.compile, z) else 'eager'}", eager, b_lat,
                precision, extra)
            if args.cuda_graphs and device.type == "cuda":
                graphed = GraphedFunction(lambda z, origins, dirs, step=core: {"image": step(z, origins, dirs)})

                def replay(precision=precision, graphed=graphed):
                    with torch.inference_mode(), precision_context(precision, device):
                        return graphed(z, origins, dirs)["image"]

                try:
                    replay()  # captures
                except GraphCaptureError as exc:
                    traceback.print_exc()
                    print(f"CUDA graph capture failed ({type(exc).__name__}: {exc})", file=sys.stderr)
                else:
                    run(f"G mapping+render {tag} cuda-graph", replay, b_lat, precision,
                        {**extra, "cuda_graph": True})

    out = args.out or Path(__file__).parent / "results" / f"bench_generator-{device.type}.json"
    report(results, title=f"Stage-1 generator ({name}); EG3D H100 reference: {EG3D_H100}", device=device, out=out)


if __name__ == "__main__":
    main()
