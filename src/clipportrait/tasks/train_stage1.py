"""task=train_stage1 — train the deformable 3D GAN of Stage 1 (paper sec. 3.1-3.2, appendix B).

    python run.py task=train_stage1 experiment=demo                       # CPU, synthetic world
    python run.py task=train_stage1 data=folder data.path=... backbone=eg3d_512 discriminator=eg3d_512 trainer=gpu
    python run.py task=train_stage1 ... task.resume=<run>/checkpoints/last.ckpt      # continue exactly
    python run.py task=train_stage1 ... task.init_from=<stage-1 checkpoint>          # weights only
    python run.py -m task=train_stage1 experiment=demo regularizer.r1_gamma=0.5,1    # sweep

Writes into the run directory: checkpoints/ (kimg schedule + last.ckpt), samples/ (fixed-seed grids),
metrics.jsonl (training scalars every trainer.log_every_n_steps, FID/KID records with their
protocol, skipped non-finite steps; the `evaluation` group sets the FID protocol and its schedule),
and the logger's files. ``trainer.max_steps`` counts training
steps (one G and one D update each, plus the lazy regularisers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .base import RunContext, TaskConfig
from ..systems.stage1 import OptimConfig

DESCRIPTION = "train the Stage-1 deformable 3D GAN (checkpoints, FID/KID, sample grids, exact resume)"


@dataclass
class Schema(TaskConfig):
    name: str = "train_stage1"
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every_kimg: float = 100.0  # 0: only last.ckpt
    keep_checkpoints: int = 3  # newest periodic checkpoints kept (0: all)
    grid_every_steps: int = 1000  # fixed-seed sample grid (0: only at the end)
    grid_identities: int = 4
    resume: Optional[str] = None  # a checkpoint of this project: continue training exactly
    init_from: Optional[str] = None  # a Stage-1 checkpoint: start from its weights (fresh optimisers/step)


def stage1_config(cfg):
    from ..systems.stage1 import Stage1Config

    return Stage1Config(backbone=cfg.backbone, discriminator=cfg.discriminator, deformation=cfg.deformation,
                        morphable=cfg.morphable, regularizer=cfg.regularizer, optim=cfg.task.optim,
                        batch_size=cfg.data.batch_size, max_steps=cfg.trainer.max_steps, seed=cfg.seed)


def lightning_deterministic(t, cuda_available: bool) -> bool | str:
    """Lightning's ``deterministic`` argument from the `trainer` group: False, True, or "warn"
    (``deterministic_warn_only``). ``trainer.deterministic=true`` on CUDA is refused before any work:
    the generator's backward goes through bilinear resizes (super-resolution, the dual discriminator's
    raw image) for which torch has no deterministic CUDA kernel, so the first step would raise."""
    from ..errors import UserError

    if not t.deterministic:
        return False
    if t.deterministic_warn_only:
        return "warn"
    on_cuda = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and cuda_available)
    if on_cuda:
        raise UserError(
            f"trainer.deterministic=true with trainer.accelerator={t.accelerator}: on CUDA, bilinear "
            "interpolation and grid_sample have no deterministic backward (torch raises at the first step) and "
            "the Triton tri-plane lookup adds its gradients with atomics. Set trainer.deterministic_warn_only=true "
            "to use torch's deterministic kernels where they exist (runs then differ only slightly), or train on "
            "the CPU (trainer=cpu) for exact repeats")
    return True


def build_trainer(cfg, ctx: RunContext, callbacks: list):
    """A Lightning Trainer for the GAN systems from the `trainer` and `logger` groups."""
    import lightning as L
    import torch

    from ..errors import UserError
    from ..systems.distributed import GanDDPStrategy
    from ..utils.loggers import build_logger

    t = cfg.trainer
    if t.gradient_clip_val is not None:
        raise UserError("trainer.gradient_clip_val is not supported by the GAN systems (manual optimisation); "
                        "leave it null")
    deterministic = lightning_deterministic(t, torch.cuda.is_available())
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(t.allow_tf32)
        torch.backends.cudnn.allow_tf32 = bool(t.allow_tf32)
    strategy = t.strategy
    if strategy in ("ddp", "ddp_spawn"):
        strategy = GanDDPStrategy(start_method="spawn" if strategy == "ddp_spawn" else "popen")
    elif strategy != "auto":
        raise UserError(f"trainer.strategy={t.strategy!r}: expected auto, ddp or ddp_spawn")
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=-1, max_epochs=-1, logger=build_logger(cfg.logger, ctx.run_dir) or False,
        callbacks=callbacks, log_every_n_steps=t.log_every_n_steps, deterministic=deterministic,
        enable_progress_bar=t.enable_progress_bar, num_sanity_val_steps=0, use_distributed_sampler=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(ctx.run_dir),
        benchmark=t.benchmark, max_time=t.max_time,
    )


def fit(cfg, ctx: RunContext, system, data_cfg=None) -> dict:
    """Train a GAN system (Stage 1 or 2) with the task's checkpoint/grid settings and the `evaluation`
    group's FID schedule; returns steps, kimg, the last checkpoint and the last FID/KID."""
    from ..data.datamodule import PortraitDataModule
    from ..systems.callbacks import FidEvaluation, KimgCheckpoint, SampleGrids

    t = cfg.task
    cfg.evaluation.validate()
    checkpoints = KimgCheckpoint(ctx.checkpoints, t.checkpoint_every_kimg, t.keep_checkpoints)
    callbacks = [checkpoints, SampleGrids(ctx.samples, t.grid_every_steps, identities=t.grid_identities)]
    if cfg.evaluation.every_kimg > 0 or cfg.evaluation.at_end:
        callbacks.append(FidEvaluation(cfg.evaluation, cfg.paths.cache_dir, ctx.metrics.write))
    trainer = build_trainer(cfg, ctx, callbacks)
    trainer.fit(system, PortraitDataModule(data_cfg or cfg.data), ckpt_path=t.resume, weights_only=True)
    evaluations = [r for r in ctx.metrics.read() if r.get("event") == "evaluation"]
    result = {"steps": system.step_count, "kimg": system.images_seen / 1000,
              "checkpoint": str(ctx.checkpoints / "last.ckpt")}
    if evaluations:
        result.update(fid=evaluations[-1]["fid"], kid=evaluations[-1]["kid"])
    return result


def check_resolution(cfg) -> None:
    from ..errors import UserError

    if cfg.data.resolution != cfg.backbone.img_resolution:
        raise UserError(f"data.resolution={cfg.data.resolution} but backbone.img_resolution="
                        f"{cfg.backbone.img_resolution}: the discriminator compares images of one size; set them equal")


def run(cfg, ctx: RunContext) -> dict:
    from ..errors import UserError
    from ..systems.stage1 import Stage1GAN, load_checkpoint, load_weights

    t = cfg.task
    check_resolution(cfg)
    if t.resume and t.init_from:
        raise UserError("task.resume and task.init_from are exclusive: resume continues a run, init_from starts a "
                        "new one from its weights")
    system = Stage1GAN(stage1_config(cfg), metrics_log=ctx.metrics.write)
    if t.init_from:
        load_weights(system, load_checkpoint(t.init_from), t.init_from)
    return fit(cfg, ctx, system)
