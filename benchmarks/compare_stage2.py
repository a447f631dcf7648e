"""Compare Stage-2 checkpoints on the synthetic world's text metrics (the collapse ablation of sec. 3.5).

    python -m benchmarks.compare_stage2 --data <synthetic dataset> --lvlm-arch clipportrait-cnn \\
        --lvlm-weights <clip .pt> --run with_Rr=<ckpt> --run without_Rr=<ckpt> --out result.json

Each checkpoint is evaluated by `metrics.stage2.evaluate_text_control` with the same prompts, seeds and
conditioning (diversity = mean pairwise LPIPS among a prompt's samples, which differ in z only; CLIP
score; text-control accuracy from colour probes calibrated on the real images; silhouette IoU), at
alpha 1 and 0. With ``--cache`` (the canonicalisation cache the runs trained on) also
`metrics.stage2.embedding_collapse` at cached image embeddings: how much of w's spread over z survives
T_G (w_retention, 1 = none lost, 0 = collapsed) and the image diversity at alpha 1 and 0. The FID of
each run is read from its metrics.jsonl (the last evaluation record).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def last_fid(checkpoint: Path) -> dict | None:
    """The last FID record of the run: <run>/eval/metrics.jsonl (task=evaluate) or the training's own."""
    run = checkpoint.parent.parent
    for metrics in (run / "eval" / "metrics.jsonl", run / "metrics.jsonl"):
        if not metrics.exists():
            continue
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evaluations = [r for r in records if r.get("event") == "evaluation"]
        if evaluations:
            last = evaluations[-1]
            return {"fid": last["fid"], "kid": last["kid"], "step": last["step"], "source": str(metrics),
                    "fid_samples": last["protocol"].get("num_fakes", last["protocol"].get("fid_samples"))}
    return None


def main(argv: list[str] | None = None) -> dict:
    from clipportrait.data.datamodule import PortraitDataset
    from clipportrait.lvlm import build_clip
    from clipportrait.lvlm.config import LVLMConfig
    from clipportrait.metrics.control import ColorProbe
    from clipportrait.metrics.lpips import build_lpips
    from clipportrait.metrics.stage2 import TextEvalConfig, embedding_collapse, evaluate_text_control
    from clipportrait.systems.stage2 import Stage2GAN

    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--lvlm-arch", default="clipportrait-cnn")
    p.add_argument("--lvlm-weights", required=True)
    p.add_argument("--run", action="append", required=True, help="name=checkpoint (repeat)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--values", type=int, default=4, help="values per attribute")
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=None, help="the runs' canonicalisation cache: also measure embedding_collapse")
    p.add_argument("--rows", type=int, default=16, help="dataset rows (cached embeddings) of embedding_collapse")
    # CPU by default (the numbers in benchmarks/results were taken there); the colour probes' distances
    # follow the features' device (the CUDA device mismatch is fixed; the whole script not yet rerun there)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    clip = build_clip(LVLMConfig(arch=args.lvlm_arch, kind="project", weights=args.lvlm_weights, device=str(device)))
    dataset = PortraitDataset(args.data, flip=False)
    cached = PortraitDataset(args.data, flip=False, clip_cache=args.cache) if args.cache else None
    lpips = build_lpips("alex")
    results = {}
    probes = None
    for spec in args.run:
        name, checkpoint = spec.split("=", 1)
        system = Stage2GAN.from_checkpoint(checkpoint, map_location=device).eval()
        if probes is None:
            probes = {a: ColorProbe.fit(args.data, a, morphable=system.geometry.morphable)
                      for a in ("hair_color", "eye_color", "skin_tone")}
        row = {"checkpoint": checkpoint, "regularizer": system.cfg.regularizer.__dict__, "steps": None,
               "fid": last_fid(Path(checkpoint))}
        for alpha in (1.0, 0.0):
            settings = TextEvalConfig(samples_per_prompt=args.samples, values_per_attribute=args.values, alpha=alpha)
            r = evaluate_text_control(system, clip, dataset, settings, lpips=lpips, probes=probes, device=device)
            row[f"alpha{alpha:g}"] = {k: r[k] for k in ("clip_score", "diversity_lpips", "silhouette_iou",
                                                         "text_control_accuracy") if k in r}
        if cached is not None:
            collapse = embedding_collapse(system, cached, rows=args.rows, samples=args.samples, lpips=lpips, device=device)
            row["embedding_collapse"] = {k: v for k, v in collapse.items() if k != "w_retention_per_row"}
        results[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k.startswith("alpha") or k in ("fid", "embedding_collapse")}),
              flush=True)
    out = {"runs": results, "protocol": {"samples_per_prompt": args.samples, "values_per_attribute": args.values,
                                         "lvlm": clip.model_id, "data": args.data,
                                         "probe_ceiling": {a: p.heldout_accuracy for a, p in probes.items()}}}
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
