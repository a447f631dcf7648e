"""Canonicalisation throughput (paper eq. 9-10): images/s of LPIPS-VGG inversion into the EMA generator
(deformable render under each image's camera and mesh, Adam on w) + canonical re-render + CLIP embedding.

    python -m benchmarks.bench_canonicalize --device cuda                      # eg3d_512, 200 steps, batch sweep
    python -m benchmarks.bench_canonicalize --device cuda --tiny               # the tiny backbone
    python -m benchmarks.bench_canonicalize --device cuda --batches 8,16 --full   # + one whole inversion, timed
    python -m benchmarks.bench_canonicalize --device cuda --precision bf16     # steps under bf16 autocast
    python -m benchmarks.bench_canonicalize --device cuda --coarse-fraction 0.85  # coarse-to-fine steps
    python -m benchmarks.bench_canonicalize --small                            # CPU: checks the script

For each batch B (the sweep stops at the first out-of-memory): the median of one optimisation step
(render + LPIPS + backward + Adam; a coarse step on the neural render and a fine step on the final
image, timed apart) and of the canonical render + CLIP embedding (of x_hat and its mirror), each over
>= 20 runs after warm-up; images/s = B / (coarse steps x coarse step + fine steps x fine step + finish). ``--full`` also
times one complete ``Inverter.invert`` of ``--steps`` steps + finish per batch (wall clock, once).
Random weights and random targets: the cost does not depend on them. DESIGN.md section 8: >= 2 images/s
at eg3d_512 with 200 steps on one H100. LPIPS weights resolve offline from the asset cache
($CLIPPORTRAIT_CACHE) or come from ``--lpips-weights``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.harness import Timing, common_args, report, time_fn
from clipportrait.canonical.config import InversionConfig
from clipportrait.canonical.inversion import Inverter
from clipportrait.geometry.cameras import sample_ffhq_like
from clipportrait.geometry.deformation import DeformationConfig
from clipportrait.lvlm import LVLMConfig, build_clip
from clipportrait.metrics.lpips import build_lpips
from clipportrait.nn.config import preset
from clipportrait.systems.stage1 import Stage1Config, Stage1GAN

TARGET_IMAGES_PER_S = 2.0  # eg3d_512, 200 steps, one H100 (DESIGN.md section 8)


def build_system(name: str, deformation: bool, device: torch.device, compile_mode: str,
                 upconv_fir: str = "fold") -> Stage1GAN:
    g, d = preset(name, compile=compile_mode, upconv_fir=upconv_fir)
    cfg = Stage1Config(backbone=g, discriminator=d, deformation=DeformationConfig(enabled=deformation))
    torch.manual_seed(0)
    return Stage1GAN(cfg).to(device).eval()


def random_batch(system: Stage1GAN, batch: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(batch)
    params = system.geometry.morphable.sample_params(batch, generator=gen)
    cond = {"camera": sample_ffhq_like(batch, generator=gen), "shape": params.shape.cpu(),
            "expression": params.expression.cpu(), "pose": params.pose.cpu(),
            "flip": torch.zeros(batch, dtype=torch.bool)}
    res = system.cfg.backbone.img_resolution
    images = torch.rand(batch, 3, res, res, generator=gen) * 2 - 1
    return images.to(device), {k: v.to(device) for k, v in cond.items()}


def random_lpips(device: torch.device) -> torch.nn.Module:
    """LPIPS-VGG with random trunk and heads: the same layers and cost as the real metric, for timing
    where the weights are not at hand (nothing is downloaded)."""
    import lpips

    return lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False).eval().requires_grad_(False).to(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def main(argv: list[str] | None = None) -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny backbone instead of eg3d_512")
    p.add_argument("--steps", type=int, default=200, help="inversion steps per image (for images/s)")
    p.add_argument("--batches", default="4,8,16,32,64", help="batch sizes to try, ascending")
    p.add_argument("--no-tf32", action="store_true")
    p.add_argument("--no-deformation", action="store_true")
    p.add_argument("--lpips-resolution", type=int, default=0, help="compare at this size (0: output size)")
    p.add_argument("--lpips-weights", default=None, help="LPIPS state dict (default: the offline asset)")
    p.add_argument("--random-lpips", action="store_true",
                   help="LPIPS-VGG with random weights (timing only: the cost does not depend on the weights)")
    p.add_argument("--full", action="store_true", help="also time one whole inversion per batch")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="inversion.precision: bf16 runs each step's render and LPIPS under autocast")
    p.add_argument("--coarse-fraction", type=float, default=0.0,
                   help="inversion.coarse_fraction: the first steps compare the neural render")
    p.add_argument("--coarse-resolution", type=int, default=0, help="inversion.coarse_resolution (0: neural)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    torch.backends.cudnn.allow_tf32 = not args.no_tf32
    name = "tiny" if (args.tiny or args.small) else "eg3d_512"
    batches = [int(b) for b in args.batches.split(",")]
    steps = args.steps
    if args.small:
        batches, steps = [b for b in batches if b <= 2] or [1], min(steps, 3)
    system = build_system(name, not args.no_deformation, device, args.compile, args.upconv_fir)
    cfg = InversionConfig(steps=steps, lpips_resolution=args.lpips_resolution, w_avg_samples=1000,
                          precision=args.precision, coarse_fraction=args.coarse_fraction,
                          coarse_resolution=args.coarse_resolution)
    lpips = random_lpips(device) if args.random_lpips else build_lpips("vgg", device=device, weights=args.lpips_weights)
    inverter = Inverter(system, cfg, lpips=lpips)
    clip = build_clip(LVLMConfig(kind="random", weights=None, device=str(device)))
    tag = ("tf32" if not args.no_tf32 else "fp32") + ("" if not args.no_deformation else " rigid")
    tag = tag if args.precision == "fp32" else f"bf16 autocast ({tag})"
    extra = {"preset": name, "steps": steps, "deformation": not args.no_deformation,
             "lpips_resolution": args.lpips_resolution or system.cfg.backbone.img_resolution,
             "clip": "clipportrait-tiny (random weights)", "target_images_per_s": TARGET_IMAGES_PER_S,
             "lpips_weights": "random" if args.random_lpips else "vgg v0.1", "precision": args.precision,
             "coarse_steps": cfg.coarse_steps, "upconv_fir": args.upconv_fir,
             "coarse_resolution": cfg.coarse_resolution or system.cfg.backbone.neural_rendering_resolution}
    runs = max(args.runs, 20)
    results: list[Timing] = []
    for batch in batches:
        try:
            images, cond = random_batch(system, batch, device)
            state = inverter.start(images, cond)
            stages = {}  # which steps each kind covers: [first, end)
            if cfg.coarse_steps:
                stages["coarse"] = (0, cfg.coarse_steps)
            if cfg.coarse_steps < steps:
                stages["fine"] = (cfg.coarse_steps, steps)
            timed = {}
            for kind, (first, end) in stages.items():
                counter = iter(range(10**9))
                label = "inversion step" if kind == "fine" and not cfg.coarse_steps else f"inversion {kind} step"
                timed[kind] = time_fn(lambda: inverter.step(state, first + next(counter) % (end - first)),
                                      name=f"{name} {label} {tag}", batch=batch, dtype=tag, device=device,
                                      warmup=args.warmup, runs=runs, extra=extra)

            def finish():
                x_hat = inverter.canonical(state.w.detach())
                with torch.no_grad():
                    clip.encode_images(x_hat.clamp(-1, 1))
                    clip.encode_images(x_hat.clamp(-1, 1).flip(-1))

            done = time_fn(finish, name=f"{name} canonical render + CLIP x2 {tag}", batch=batch, dtype=tag,
                           device=device, warmup=args.warmup, runs=runs, extra=extra)
        except Exception as err:
            if not is_oom(err):
                raise
            print(f"batch {batch}: out of memory, stopping the sweep")
            break
        def projected(stat: str) -> float:
            return sum((end - first) * getattr(timed[kind], stat) for kind, (first, end) in stages.items()) + \
                getattr(done, stat)

        per_batch_ms = projected("median_ms")
        peak = max((t.peak_mem_gib for t in timed.values() if t.peak_mem_gib is not None), default=None)
        results += [*timed.values(), done, Timing(f"{name} {steps}-step canonicalisation, projected {tag}", batch,
                                                  tag, per_batch_ms, projected("p10_ms"), projected("p90_ms"), runs,
                                                  batch / (per_batch_ms / 1e3), peak, extra)]
        if args.full:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            result = inverter.invert(images, cond)
            x_hat = inverter.canonical(result.w)
            with torch.no_grad():
                clip.encode_images(x_hat.clamp(-1, 1))
                clip.encode_images(x_hat.clamp(-1, 1).flip(-1))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = (time.perf_counter() - t0) * 1e3
            results.append(Timing(f"{name} {steps}-step canonicalisation, measured {tag}", batch, tag, wall,
                                  wall, wall, 1, batch / (wall / 1e3), peak, extra))
    if not results:
        raise SystemExit("no batch size fitted in memory")
    suffix = ('-small' if args.small else ('-tiny' if args.tiny else '')) + ('-bf16' if args.precision == 'bf16' else '')
    default = f"canonicalize-{device.type}{suffix}.json"
    out = args.out or Path(__file__).parent / "results" / default
    report(results, title=f"Canonicalisation (target >= {TARGET_IMAGES_PER_S} images/s at eg3d_512, 200 steps)",
           device=device, out=out)


if __name__ == "__main__":
    main()
