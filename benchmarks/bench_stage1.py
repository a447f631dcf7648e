"""Stage-1 training speed: images/s over full G+D cycles (G main every step, G reg every 4, D main every
step, D reg every 16 — EG3D's lazy schedule), with surface-field deformation and the mesh-render
discriminator conditioning on, plus the median time of each phase and peak memory.

    python -m benchmarks.bench_stage1 --device cuda                      # eg3d_512, batch 32
    python -m benchmarks.bench_stage1 --device cuda --batch 16 --no-tf32
    python -m benchmarks.bench_stage1 --small                            # tiny preset on CPU, checks the script
    python -m benchmarks.bench_stage1 --small --cpu-search torch         # ... with the PyTorch search loops

EG3D's official training loop on one H100 (DESIGN sec. 8): 27.2 images/s with TF32 off, 35.4 with
TF32 on (batch 32, no deformation, no mesh conditioning); the target is >= 41 images/s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import Timing, common_args, report, set_cuda_math, time_fn
from clipportrait.geometry.cameras import sample_ffhq_like
from clipportrait.geometry.deformation import DeformationConfig
from clipportrait.losses import RegularizerConfig
from clipportrait.nn.config import preset
from clipportrait.systems.stage1 import Stage1Config, Stage1GAN

EG3D_H100 = {"images_per_s_tf32_off": 27.2, "images_per_s_tf32_on": 35.4, "peak_gib": 54.6, "target": 41.0}


class RandomConditioning:
    """Stands in for the dataset's ConditioningSampler: FFHQ-like cameras, random morphable parameters."""

    def __init__(self, morphable, device: torch.device, pool: int = 256):
        gen = torch.Generator().manual_seed(0)
        params = morphable.sample_params(pool, generator=gen)
        self.tables = {"camera": sample_ffhq_like(pool, generator=gen), "shape": params.shape.cpu(),
                       "expression": params.expression.cpu(), "pose": params.pose.cpu(),
                       "flip": torch.zeros(pool, dtype=torch.bool)}
        self.tables = {k: v.to(device) for k, v in self.tables.items()}
        self.generator = torch.Generator().manual_seed(1)

    def sample(self, batch: int) -> dict[str, torch.Tensor]:
        pick = torch.randint(len(self.tables["camera"]), (batch,), generator=self.generator)
        return {k: v[pick.to(v.device)] for k, v in self.tables.items()}


def build(args, device: torch.device) -> tuple[Stage1GAN, dict[str, torch.Tensor]]:
    name = "tiny" if args.small else "eg3d_512"
    g, d = preset(name, compile=args.compile, d_compile=args.compile, upconv_fir=args.upconv_fir)
    deformation = DeformationConfig(enabled=not args.no_deformation, cpu_search=args.cpu_search)
    cfg = Stage1Config(backbone=g, discriminator=d, deformation=deformation,
                       regularizer=RegularizerConfig(), batch_size=args.batch)
    cfg.optim.mesh_render_resolution = args.rdr_resolution
    if args.no_rdr:
        cfg.discriminator.rdr_channels = 0
    system = Stage1GAN(cfg).to(device)
    system.conditioning = RandomConditioning(system.geometry.morphable, device)
    cond = system.conditioning.sample(args.batch)
    res = g.img_resolution
    real = {"image": torch.rand(args.batch, 3, res, res, device=device) * 2 - 1, **cond}
    return system, real


def main(argv: list[str] | None = None) -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--no-tf32", action="store_true")
    p.add_argument("--no-deformation", action="store_true")
    p.add_argument("--no-rdr", action="store_true", help="switch the mesh-render conditioning off")
    p.add_argument("--rdr-resolution", type=int, default=0, help="rasterise rdr at this size (0: image size)")
    p.add_argument("--cycles", type=int, default=2, help="16-step cycles timed for the throughput")
    p.add_argument("--cpu-search", default="auto", choices=["auto", "numba", "torch"],
                   help="deformation.cpu_search (CPU runs): numba-compiled or PyTorch pair loops")
    p.add_argument("--cudnn-benchmark", action="store_true", help="autotune convolutions (minutes of warm-up)")
    args = p.parse_args(argv)
    if args.small:
        args.batch = min(args.batch, 4)
    device = torch.device(args.device)
    set_cuda_math(tf32=not args.no_tf32, autotune=args.cudnn_benchmark)
    system, batch = build(args, device)
    opt_g, opt_d = system.configure_optimizers()
    reg = system.cfg.regularizer
    B = args.batch
    tag = ("tf32" if not args.no_tf32 else "fp32") + ("" if not args.no_deformation else " rigid") + \
        ("" if not args.no_rdr else " no-rdr")
    extra = {"preset": "tiny" if args.small else "eg3d_512", "deformation": not args.no_deformation,
             "cpu_search": args.cpu_search if device.type == "cpu" else None,
             "mesh_render": not args.no_rdr, "rdr_resolution": args.rdr_resolution or system.cfg.backbone.img_resolution,
             "upconv_fir": args.upconv_fir}

    def real():
        return system.real_inputs(batch)

    phases = {
        "G main": lambda: system.run_phase("g_main", opt_g, system.G, lambda i: system.loss_g_main(B), 1),
        "G reg (density)": lambda: system.run_phase("g_reg", opt_g, system.G, lambda i: system.loss_g_reg(B), 1,
                                                    reg.density_interval),
        "D main": lambda: system.run_phase("d_main", opt_d, system.D, lambda i: system.loss_d_main(real()), 1),
        "D reg (R1)": lambda: system.run_phase("d_reg", opt_d, system.D, lambda i: system.loss_d_reg(real()), 1,
                                               reg.r1_interval),
        "real inputs (rdr render)": real,
    }
    results: list[Timing] = []
    runs = max(args.runs, 20)
    for name, fn in phases.items():
        print(f"timing phase {name} (the first calls compile when --compile is on)", file=sys.stderr, flush=True)
        results.append(time_fn(fn, name=f"phase {name} {tag}", batch=B, dtype=tag, device=device,
                               warmup=args.warmup, runs=runs, extra=extra))

    def step():
        system.train_step(batch, opt_g, opt_d)

    print("timing full training steps", file=sys.stderr, flush=True)
    for _ in range(16):  # one full cycle of warm-up
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    cycle_ms = []
    for _ in range(args.cycles):
        t0 = time.perf_counter()
        for _ in range(16):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        cycle_ms.append((time.perf_counter() - t0) * 1e3 / 16)
    step_ms = sum(cycle_ms) / len(cycle_ms)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    results.append(Timing(f"training step, mean over {args.cycles}x16 steps {tag}", B, tag, step_ms, min(cycle_ms),
                          max(cycle_ms), args.cycles * 16, B / (step_ms / 1e3), peak,
                          {**extra, "eg3d_h100": EG3D_H100}))
    out = args.out or Path(__file__).parent / "results" / f"stage1-{device.type}{'-small' if args.small else ''}.json"
    report(results, title=f"Stage-1 training (EG3D H100: {EG3D_H100})", device=device, out=out)


if __name__ == "__main__":
    main()
