"""task=evaluate — FID/KID of a Stage-1 or Stage-2 checkpoint (or its inference bundle), by the same code path as training-time evaluation.

    python run.py task=evaluate task.checkpoint=<run>/checkpoints/last.ckpt data.path=<dataset>
    python run.py task=evaluate task.checkpoint=... evaluation.fid_samples=50000   # EG3D fid50k_full

The protocol is the `evaluation` group's. The EMA generator renders ``evaluation.fid_samples`` fakes with cameras and morphable parameters drawn from the
dataset (for a Stage-2 checkpoint also the CLIP embedding of the drawn row, from ``data.clip_cache`` or
the cache the checkpoint recorded, at alpha = 1); real statistics cover every image of the dataset (or ``evaluation.real_max``) and are cached under
``paths.cache_dir`` by the dataset's content hash. One record with the protocol goes to metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from .base import RunContext, TaskConfig

DESCRIPTION = "FID/KID of a Stage-1 or Stage-2 checkpoint (fid50k_full protocol, cached real statistics)"


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
    from ..systems.bundle import open_for_inference
    from .generate import machine_overrides

    t = cfg.task
    try:
        cfg.evaluation.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    if t.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(t.device)
    # a checkpoint or a bundle, with this machine's FLAME files (as task=generate opens it)
    system, opened = open_for_inference(t.checkpoint, map_location=device, overrides=machine_overrides(cfg))
    kind = opened["kind"]
    # The step and image count the checkpoint was saved at (loading weights leaves the system at 0).
    step, kimg = opened["step"], opened["images_seen"] / 1000
    resolution = system.cfg.backbone.img_resolution
    clip_cache = None
    if kind == "Stage2GAN":
        clip_cache = cfg.data.clip_cache or system.cfg.clip_cache or None
        if clip_cache:
            from ..canonical.cache import check_recorded_identity

            check_recorded_identity(clip_cache, system.cfg.clip_cache_identity, f"task.checkpoint={t.checkpoint}")
        if not clip_cache:
            raise UserError(f"{t.checkpoint} is a Stage-2 checkpoint: set data.clip_cache to its canonicalisation cache "
                            "(the fakes are conditioned on the embeddings of the dataset rows they are drawn from)")
    dataset = PortraitDataset(cfg.data.path, resolution=resolution, flip=cfg.data.flip, clip_cache=clip_cache,
                              skip_bad=cfg.data.skip_bad, verify_pixels=cfg.data.verify_pixels)
    stats = real_statistics(dataset, cfg.evaluation, cfg.paths.cache_dir, device)
    record = evaluate_system(system, dataset, stats, cfg.evaluation, device)
    record["protocol"]["checkpoint"] = str(t.checkpoint)
    record["protocol"]["step"] = step
    record["protocol"]["system"] = kind
    if clip_cache:
        record["protocol"]["clip_cache"] = str(clip_cache)
    ctx.metrics.write({"event": "evaluation", "step": step, "kimg": kimg, **record})
    return {"fid": record["fid"], "kid": record["kid"], "fid_samples": cfg.evaluation.fid_samples}
