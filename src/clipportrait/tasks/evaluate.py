"""task=evaluate — FID/KID of a Stage-1 checkpoint, by the same code path as training-time evaluation.

    python run.py task=evaluate task.checkpoint=<run>/checkpoints/last.ckpt data.path=<dataset>
    python run.py task=evaluate task.checkpoint=... evaluation.fid_samples=50000   # EG3D fid50k_full

The protocol is the `evaluation` group's. The EMA generator renders ``evaluation.fid_samples`` fakes with cameras and morphable parameters drawn from the
dataset; real statistics cover every image of the dataset (or ``evaluation.real_max``) and are cached under
``paths.cache_dir`` by the dataset's content hash. One record with the protocol goes to metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from .base import RunContext, TaskConfig

DESCRIPTION = "FID/KID of a Stage-1 checkpoint (fid50k_full protocol, cached real statistics)"


@dataclass
class Schema(TaskConfig):
    name: str = "evaluate"
    checkpoint: str = "???"
    device: str = "auto"  # auto: cuda when available


def run(cfg, ctx: RunContext) -> dict:
    import torch

    from ..data.datamodule import PortraitDataset
    from ..errors import UserError
    from ..systems.callbacks import evaluate_system, real_statistics
    from ..systems.stage1 import Stage1GAN

    t = cfg.task
    try:
        cfg.evaluation.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    if t.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(t.device)
    system = Stage1GAN.from_checkpoint(t.checkpoint, map_location=device).eval()
    resolution = system.cfg.backbone.img_resolution
    dataset = PortraitDataset(cfg.data.path, resolution=resolution, flip=cfg.data.flip, skip_bad=cfg.data.skip_bad,
                              verify_pixels=cfg.data.verify_pixels)
    stats = real_statistics(dataset, cfg.evaluation, cfg.paths.cache_dir, device)
    record = evaluate_system(system, dataset, stats, cfg.evaluation, device)
    record["protocol"]["checkpoint"] = str(t.checkpoint)
    ctx.metrics.write({"event": "evaluation", "step": system.step_count, **record})
    return {"fid": record["fid"], "kid": record["kid"], "fid_samples": cfg.evaluation.fid_samples}
