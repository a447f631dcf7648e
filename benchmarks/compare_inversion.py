"""Inversion quality of coarse-to-fine schedules (``inversion.coarse_fraction``) against the full objective.

    python -m benchmarks.compare_inversion --checkpoint outputs/demo/stage1/run/checkpoints/last.ckpt \\
        --data outputs/demo/synthetic_64 --images 16 --fractions 0,0.5,0.9 --out result.json

Inverts the dataset's first ``--images`` images (one batch, under their own cameras and meshes) into
the checkpoint's EMA generator once per coarse fraction, every run with the same steps, schedule and
LPIPS-VGG, and reports each run's final LPIPS on the final image (eq. 9's distance of the returned w),
the LPIPS of the starting w, and per fraction the mean ratio to the first fraction's LPIPS and how
many images ended more than 10% worse. The speed side is `benchmarks/bench_canonicalize.py`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    import torch

    from clipportrait.canonical.config import InversionConfig
    from clipportrait.canonical.inversion import Inverter
    from clipportrait.data.datamodule import PortraitDataset
    from clipportrait.systems.stage1 import CHECKPOINT_KEY, Stage1Config, Stage1GAN, load_checkpoint, load_weights

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a Stage-1 checkpoint (last.ckpt)")
    p.add_argument("--data", required=True, help="a dataset folder in the project's format")
    p.add_argument("--images", type=int, default=16, help="how many of the dataset's first images (one batch)")
    p.add_argument("--fractions", default="0,0.5,0.9", help="coarse fractions; the first is the reference")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--coarse-restart", action="store_true",
                   help="inversion.coarse_restart: the final-image steps run the learning-rate schedule again")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    device = torch.device(args.device)

    checkpoint = load_checkpoint(args.checkpoint, map_location=device)
    meta = checkpoint[CHECKPOINT_KEY]
    system = Stage1GAN(Stage1Config.from_dict(meta["config"]))
    load_weights(system, checkpoint, args.checkpoint)
    system = system.to(device).eval()
    dataset = PortraitDataset(args.data, resolution=system.cfg.backbone.img_resolution, flip=False)
    items = [dataset[i] for i in range(min(args.images, dataset.num_images))]
    batch = {k: torch.stack([item[k] for item in items]).to(device) for k in items[0]}
    images = batch["image"]
    cond = {k: batch[k] for k in ("camera", "shape", "expression", "pose", "flip")}

    runs, start = {}, None
    for fraction in fractions:
        inverter = Inverter(system, InversionConfig(steps=args.steps, coarse_fraction=fraction, w_avg_samples=2000,
                                                    coarse_restart=args.coarse_restart))
        if start is None:
            with torch.no_grad():
                deformer = system.geometry.deformer(system.geometry.observation(cond))
                start, _ = inverter.objective(inverter.render(inverter.w_start.expand(len(items), -1), cond, deformer),
                                              images)
        began = time.perf_counter()
        result = inverter.invert(images, cond)
        runs[fraction] = (result.lpips.cpu(), time.perf_counter() - began)
    reference = runs[fractions[0]][0]
    report = {"checkpoint": str(args.checkpoint), "step": int(meta.get("step", 0)), "data": str(args.data),
              "images": len(items), "steps": args.steps, "coarse_restart": args.coarse_restart, "device": str(device),
              "start_lpips_mean": float(start.mean()), "runs": []}
    for fraction, (lpips, seconds) in runs.items():
        report["runs"].append({"coarse_fraction": fraction, "lpips_mean": float(lpips.mean()),
                               "lpips_median": float(lpips.median()), "lpips_max": float(lpips.max()),
                               "mean_ratio_to_reference": float((lpips / reference).mean()),
                               "worse_by_10_percent": int((lpips > 1.1 * reference).sum()), "seconds": seconds})
    print(f"{len(items)} images, {args.steps} steps, start LPIPS {report['start_lpips_mean']:.4f}")
    print(f"{'coarse_fraction':>15} {'mean':>7} {'median':>7} {'max':>7} {'ratio':>6} {'>10% worse':>10}")
    for run in report["runs"]:
        print(f"{run['coarse_fraction']:>15} {run['lpips_mean']:7.4f} {run['lpips_median']:7.4f} {run['lpips_max']:7.4f} "
              f"{run['mean_ratio_to_reference']:6.3f} {run['worse_by_10_percent']:>10}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
