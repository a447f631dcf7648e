"""Training-time services for the GAN systems: checkpoints on a kimg schedule, FID/KID evaluation and
fixed-seed sample grids. Each fires when the images seen cross a multiple of its interval, so the
schedule does not depend on batch size or number of processes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..metrics.config import EvaluationConfig

log = logging.getLogger(__name__)


def crossed(before: int, after: int, every: float) -> bool:
    """True when a multiple of ``every`` (images) lies in (before, after]; never for every <= 0."""
    if every <= 0:
        return False
    return int(after // every) > int(before // every)


def _images(system) -> tuple[int, int]:
    """(images seen before the last step, after it)."""
    after = system.images_seen
    return after - system.global_batch, after


class KimgCheckpoint(Callback):
    """``step-<step>.ckpt`` every ``every_kimg`` (keeping the newest ``keep``; 0 keeps all) and
    ``last.ckpt`` at the end of training. Files are written to a temporary name and renamed, so a
    kill never leaves a truncated checkpoint under a real name."""

    def __init__(self, dirpath: str | os.PathLike, every_kimg: float, keep: int = 3) -> None:
        self.dirpath, self.every, self.keep = Path(dirpath), every_kimg * 1000, keep

    def save(self, trainer: L.Trainer, name: str) -> Path:
        path = self.dirpath / name
        tmp = path.with_name(path.name + ".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank calls it; the strategy writes on rank 0
        if trainer.is_global_zero:
            os.replace(tmp, path)
            log.info("checkpoint %s", path)
        trainer.strategy.barrier("checkpoint")
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        before, after = _images(pl_module)
        if crossed(before, after, self.every):
            self.save(trainer, f"step-{pl_module.step_count:08d}.ckpt")
            if trainer.is_global_zero and self.keep > 0:
                for old in sorted(self.dirpath.glob("step-*.ckpt"))[: -self.keep]:
                    old.unlink()

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, "last.ckpt")


def real_statistics(dataset, settings: EvaluationConfig, cache_dir: str | None, device, show_progress: bool = True):
    from ..metrics.evaluation import RealStatistics, fid_feature_extractor

    return RealStatistics.load_or_compute(dataset, fid_feature_extractor(device), cache_dir,
                                          max_items=settings.real_max, batch_size=settings.batch_size, device=device,
                                          show_progress=show_progress)


def evaluate_system(system, dataset, stats, settings: EvaluationConfig, device, show_progress: bool = True) -> dict:
    """FID/KID record of ``system.generate_images`` (the EMA generator) against ``stats``; the one code
    path behind training-time evaluation and ``task=evaluate``."""
    from ..data.datamodule import ConditioningSampler
    from ..metrics.evaluation import BoundGenerator, evaluate_fid_kid

    sampler = ConditioningSampler(dataset, seed=settings.seed, device=device)
    generate = BoundGenerator(system.generate_images, system.cfg.backbone.z_dim)
    record = evaluate_fid_kid(generate, sampler, stats, settings.fid_samples, settings.batch_size, settings.seed, device,
                              kid_subset_size=settings.kid_subset_size, show_progress=show_progress)
    record["protocol"]["generator"] = "G_ema, noise_mode=const, truncation_psi=1"
    record["protocol"]["step"] = system.step_count
    return record


class FidEvaluation(Callback):
    """FID/KID of the EMA generator (EG3D's fid50k_full protocol with ``num_fakes`` samples: conditioning
    drawn from the dataset, real statistics of every image cached by content hash); one record per
    evaluation in metrics.jsonl with the protocol, and the values in the Lightning logger."""

    def __init__(self, settings: EvaluationConfig, cache_dir: str | None, write: Callable[[dict], None],
                 dataset=None) -> None:
        self.settings, self.cache_dir, self.dataset, self.write = settings, cache_dir, dataset, write
        self.stats = None
        self.last_step = -1

    def evaluate(self, trainer, pl_module) -> dict:
        dataset = self.dataset if self.dataset is not None else trainer.datamodule.dataset
        if self.stats is None:
            self.stats = real_statistics(dataset, self.settings, self.cache_dir, pl_module.device, trainer.is_global_zero)
        record = evaluate_system(pl_module, dataset, self.stats, self.settings, pl_module.device, trainer.is_global_zero)
        self.last_step = pl_module.step_count
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"metrics/fid": record["fid"], "metrics/kid": record["kid"]},
                                       step=pl_module.step_count)
        self.write({"event": "evaluation", "step": pl_module.step_count, "kimg": pl_module.images_seen / 1000, **record})
        return record

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        before, after = _images(pl_module)
        if crossed(before, after, self.settings.every_kimg * 1000):
            self.evaluate(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.settings.at_start and pl_module.step_count == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.settings.at_end and self.last_step != pl_module.step_count:
            self.evaluate(trainer, pl_module)


class SampleGrids(Callback):
    """A fixed-seed grid (rows: identities; columns: cameras x expressions) of the EMA generator every
    ``every_steps`` steps and at the end, saved as PNG and sent to the logger when it takes images."""

    def __init__(self, folder: str | os.PathLike, every_steps: int, dataset=None, identities: int = 4, cameras: int = 3,
                 expressions: int = 2, seed: int = 7) -> None:
        self.folder, self.every, self.dataset = Path(folder), every_steps, dataset
        self.identities, self.cameras, self.expressions, self.seed = identities, cameras, expressions, seed
        self.last_step = -1

    def grid(self, trainer, pl_module) -> Path | None:
        from ..data.datamodule import ConditioningSampler
        from ..metrics.evaluation import BoundGenerator
        from ..metrics.grids import sample_grid, save_png

        self.last_step = pl_module.step_count
        if not trainer.is_global_zero:
            return None
        dataset = self.dataset if self.dataset is not None else trainer.datamodule.dataset
        sampler = ConditioningSampler(dataset, seed=self.seed, device=pl_module.device)
        generate = BoundGenerator(pl_module.generate_images, pl_module.cfg.backbone.z_dim)
        array = sample_grid(generate, sampler, self.identities, self.cameras, self.expressions, self.seed,
                            device=pl_module.device)
        path = self.folder / f"grid-{pl_module.step_count:08d}.png"
        save_png(path, array)
        log_image(trainer.logger, "samples/grid", array, pl_module.step_count)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every > 0 and pl_module.step_count % self.every == 0:
            self.grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.last_step != pl_module.step_count:
            self.grid(trainer, pl_module)


def log_image(logger, key: str, array, step: int) -> None:
    """Send an HxWx3 uint8 image to TensorBoard or W&B; CSV loggers keep the PNG on disk only."""
    if logger is None:
        return
    experiment = getattr(logger, "experiment", None)
    if hasattr(logger, "log_image"):  # WandbLogger
        logger.log_image(key=key, images=[array], step=step)
    elif experiment is not None and hasattr(experiment, "add_image"):  # TensorBoard SummaryWriter
        experiment.add_image(key, torch.from_numpy(array).permute(2, 0, 1), global_step=step)
