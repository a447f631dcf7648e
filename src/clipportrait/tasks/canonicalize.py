"""task=canonicalize — invert every training image into the Stage-1 generator (eq. 9), re-render it
under the neutral camera and canonical geometry (eq. 10), embed it with the `lvlm` CLIP, and write the
canonicalisation cache (DESIGN.md section 6) that Stage 2 reads through ``data.clip_cache=<dir>``.

    python run.py task=canonicalize task.checkpoint=<stage-1 run>/checkpoints/last.ckpt data.path=<dataset>
    python run.py task=canonicalize ... task.inversion.steps=500 task.inversion.space=w_plus
    python run.py task=canonicalize ... task.embed=raw       # the "no canonicalisation" ablation (Fig. 4)
    python run.py task=canonicalize ... task.embed=oracle    # synthetic world: its own canonical re-render

Killed runs continue where they stopped when started again with the same ``task.out`` (finished
shards are kept, checked by sha256). Writes, besides the cache: ``<out>/report/`` (LPIPS histogram,
worst/best grids of target | inverted | canonical, per-image LPIPS) and summary numbers in the result
and ``metrics.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..canonical.config import InversionConfig
from .base import RunContext, TaskConfig, ensure_dataset

DESCRIPTION = "GAN inversion + canonical re-render + CLIP embedding of every image: the Stage-2 cache"


@dataclass
class Schema(TaskConfig):
    name: str = "canonicalize"
    checkpoint: Optional[str] = None  # Stage-1 checkpoint (EMA generator); required for embed=canonical
    embed: str = "canonical"  # canonical: E_img(x_hat) (eq. 10) | raw: E_img(x), no inversion (Fig. 4 ablation)
    #                           | oracle: the synthetic world's exact canonical re-render (canonical.oracle)
    data_path: str = "${data.path}"
    out: str = "${paths.output_dir}/canonical/${task.embed}"  # the cache directory
    device: str = "auto"  # auto: cuda when available
    batch_size: int = 8  # images inverted together
    shard_size: int = 256  # images per shard (the unit of resumption)
    render_size: int = 64  # stored inverted/canonical renders (uint8, at most this size, for the report); 0: none
    on_corrupt: str = "recompute"  # a finished shard that fails its sha256: recompute | error
    overwrite: bool = False  # replace a cache at `out` that was made from other inputs (else refused)
    report_cases: int = 8  # worst and best cases shown in the report grids
    inversion: InversionConfig = field(default_factory=InversionConfig)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg, ctx: RunContext) -> dict:
    import dataclasses
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from ..canonical.cache import CacheWriter, make_identity
    from ..canonical.config import EMBED_MODES, ON_CORRUPT
    from ..canonical.inversion import Inverter
    from ..canonical.pipeline import canonicalize_dataset
    from ..canonical.report import write_report
    from ..data.datamodule import PortraitDataset
    from ..errors import UserError
    from ..lvlm import build_clip
    from ..metrics.evaluation import dataset_content_hash
    from ..systems.stage1 import CHECKPOINT_KEY, Stage1Config, Stage1GAN, load_checkpoint_and_hash, load_weights
    from ..utils.console import console

    t = cfg.task
    checks = {"embed": (t.embed in EMBED_MODES, f"one of {', '.join(EMBED_MODES)}"),
              "on_corrupt": (t.on_corrupt in ON_CORRUPT, f"one of {', '.join(ON_CORRUPT)}"),
              "batch_size": (t.batch_size >= 1, ">= 1"), "shard_size": (t.shard_size >= 1, ">= 1"),
              "render_size": (t.render_size >= 0, ">= 0 (0: no stored renders)")}
    for key, (ok, expected) in checks.items():
        if not ok:
            raise UserError(f"task.{key}={getattr(t, key)!r}: expected {expected}")
    try:
        t.inversion.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    device = _device(t.device)
    data_path = ensure_dataset(cfg, t.data_path)

    inverter, stage1 = None, None
    if t.embed == "canonical":
        if not t.checkpoint:
            raise UserError("task.checkpoint is not set: embed=canonical inverts into a Stage-1 checkpoint "
                            "(or use task.embed=raw for the no-canonicalisation ablation)")
        checkpoint, digest = load_checkpoint_and_hash(t.checkpoint, map_location=device)  # metadata and weights
        meta = checkpoint[CHECKPOINT_KEY]
        stage1 = {"checkpoint": str(t.checkpoint), "sha256": digest, "step": int(meta.get("step", 0))}
        system = Stage1GAN(Stage1Config.from_dict(meta["config"]))
        load_weights(system, checkpoint, str(t.checkpoint))
        system = system.to(device).eval()
        del checkpoint
        inverter = Inverter(system, t.inversion)
        resolution = inverter.resolution
    else:
        resolution = cfg.data.resolution
    oracle = None
    if t.embed == "oracle":
        from ..canonical.oracle import SyntheticOracle
        from ..geometry.morphable import build_morphable

        oracle = SyntheticOracle(data_path, build_morphable(cfg.morphable), resolution)
    clip = build_clip(dataclasses.replace(cfg.lvlm, device=str(device)))
    dataset = PortraitDataset(data_path, resolution=resolution, flip=False, skip_bad=cfg.data.skip_bad,
                              verify_pixels=cfg.data.verify_pixels)
    console.print(f"canonicalize: hashing dataset {data_path} ({dataset.num_images} images)")
    dataset_hash = dataset_content_hash(data_path)
    config = {"resolution": resolution, "render_size": t.render_size, "lvlm_arch": cfg.lvlm.arch,
              "inversion": dataclasses.asdict(t.inversion) if t.embed == "canonical" else None}
    identity = make_identity(embed=t.embed, stage1_sha256=None if stage1 is None else stage1["sha256"],
                             lvlm_model_id=clip.model_id, dataset_hash=dataset_hash, num_items=dataset.num_images,
                             shard_size=t.shard_size, config=config)
    info = {"stage1": stage1, "dataset": {"path": str(data_path), "images": dataset.num_images},
            "lvlm": {"model_id": clip.model_id, "arch": cfg.lvlm.arch, "kind": cfg.lvlm.kind},
            "w_start": None if inverter is None else inverter.w_start_source}
    writer = CacheWriter(t.out, identity, info, on_corrupt=t.on_corrupt, overwrite=t.overwrite)

    def on_shard(stats) -> None:
        ctx.metrics.write({"event": "canonicalize/shard", **dataclasses.asdict(stats)})

    console.print(f"canonicalize: {dataset.num_images} images, embed={t.embed}, {writer.num_shards} shards "
                  f"of {t.shard_size} -> {writer.directory}")
    with writer:  # the directory's lock ends with the run, failed or not
        timing = canonicalize_dataset(dataset, clip, writer, t.embed, inverter, t.batch_size, t.render_size,
                                      on_shard, oracle)
    result = {"cache": str(writer.directory), "embed": t.embed, "images": dataset.num_images,
              "lvlm_model_id": clip.model_id, "dataset_hash": dataset_hash, **timing}
    if t.embed == "canonical":
        row_of = {name: i for i, name in enumerate(dataset.index.names)}

        def load_target(name: str, size: int) -> np.ndarray:
            pixels = dataset.index.read_image(row_of[name])
            return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))

        report = write_report(writer.directory, load_target, t.report_cases)
        result.update({k: v for k, v in report.items() if k != "report"})
        result["report"] = str(Path(report["report"]["histogram"]).parent)
        console.print(f"inversion LPIPS over {report['images']} images: mean {report['lpips_mean']:.4f}, median "
                      f"{report['lpips_median']:.4f}, p90 {report['lpips_p90']:.4f}, max {report['lpips_max']:.4f}; "
                      f"report in {result['report']}")
    ctx.metrics.write({"event": "canonicalize/summary", "stage1": stage1, **result})
    return result
