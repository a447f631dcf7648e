"""task=train_stage2 — text conditioning of a Stage-1 model (paper sec. 3.4-3.5, appendix B).

    python run.py task=train_stage2 task.stage1=<stage-1 run>/checkpoints/last.ckpt \\
        data.path=<dataset> data.clip_cache=<canonicalisation cache of task=canonicalize>
    python run.py task=train_stage2 ... task.train=alignment          # T_G and T_D only, Stage 1 frozen
    python run.py task=train_stage2 ... regularizer.jacobian_weight=0 # the collapse ablation (sec. 3.5)
    python run.py task=train_stage2 ... regularizer.jacobian_estimator=jvp   # eq. 22 instead of eq. 20
    python run.py task=train_stage2 ... task.resume=<stage-2 run>/checkpoints/last.ckpt

The architecture (backbone, discriminator, deformation, morphable) comes from the Stage-1 checkpoint
and must agree with the composed config (a clear error lists the differences). The cache must have
been made from this dataset and, for a canonical cache, from this Stage-1 checkpoint. Writes what
task=train_stage1 writes: checkpoints/, samples/, metrics.jsonl (with reg/jacobian and reg/norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..nn.alignment import AlignmentConfig
from ..systems.stage1 import OptimConfig
from .base import RunContext, TaskConfig

DESCRIPTION = "train Stage 2: CLIP alignment networks T_G/T_D with the R_r and R_norm regularisers"


@dataclass
class Schema(TaskConfig):
    name: str = "train_stage2"
    stage1: Optional[str] = None  # Stage-1 checkpoint to start from (required unless resuming)
    train: str = "all"  # all: G, D and the alignment networks | alignment: T_G and T_D only
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every_kimg: float = 100.0  # 0: only last.ckpt
    keep_checkpoints: int = 3
    grid_every_steps: int = 1000
    grid_identities: int = 4
    resume: Optional[str] = None  # a Stage-2 checkpoint of this project: continue training exactly


def embedding_width(path: str) -> int:
    """The CLIP embedding width of a cache (a canonicalisation-cache directory or a .npz)."""
    from pathlib import Path

    import numpy as np

    from ..canonical.cache import iter_shards
    from ..errors import UserError

    p = Path(path)
    if p.is_dir():
        return int(next(iter_shards(p))["r"].shape[1])
    if not p.is_file():
        raise UserError(f"data.clip_cache={path}: no such file or directory")
    try:
        with np.load(p, allow_pickle=False) as npz:
            return int(npz["embeddings"].shape[1])
    except Exception as err:
        raise UserError(f"data.clip_cache={path}: unreadable as a CLIP cache ({type(err).__name__}: {err})") from None


def check_cache_provenance(cache: str, stage1_sha256: str, source: str) -> None:
    """A canonical cache must come from the Stage-1 checkpoint that Stage 2 starts from (eq. 9-10 inverted
    into that generator), whose sha256 is ``stage1_sha256`` (``source`` says which checkpoint that is). A
    raw cache (the Fig. 4 ablation) has no such link."""
    from pathlib import Path

    from ..canonical.cache import read_manifest
    from ..errors import UserError

    if not Path(cache).is_dir():
        return
    manifest = read_manifest(cache)
    if manifest.get("embed") != "canonical":
        return
    if manifest.get("stage1_sha256") != stage1_sha256:
        raise UserError(f"data.clip_cache={cache} was made with another Stage-1 checkpoint (sha256 "
                        f"{manifest.get('stage1_sha256')}); {source} has sha256 {stage1_sha256}: run "
                        "task=canonicalize with this checkpoint, or start Stage 2 from the one the cache used")


def run(cfg, ctx: RunContext) -> dict:
    import dataclasses

    from ..canonical.cache import recorded_identity
    from ..errors import UserError
    from ..systems.stage1 import CHECKPOINT_KEY, Stage1Config, check_compatible, load_checkpoint
    from ..systems.stage2 import TRAINABLE, Stage2Config, Stage2GAN
    from .train_stage1 import check_resolution, fit, stage1_config

    t = cfg.task
    check_resolution(cfg)
    if t.train not in TRAINABLE:
        raise UserError(f"task.train={t.train!r}: expected one of {', '.join(TRAINABLE)}")
    if not cfg.data.clip_cache:
        raise UserError("data.clip_cache is not set: Stage 2 reads each training image's CLIP embedding from the "
                        "canonicalisation cache of task=canonicalize (data.clip_cache=<its task.out>)")
    try:
        cfg.regularizer.validate()
        t.alignment.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    width = embedding_width(cfg.data.clip_cache)
    if t.alignment.embed_dim not in (0, width):
        raise UserError(f"task.alignment.embed_dim={t.alignment.embed_dim} but the cache {cfg.data.clip_cache} holds "
                        f"{width}-d embeddings; leave it 0 to take the cache's width")
    alignment = dataclasses.replace(t.alignment, embed_dim=width)
    wanted = stage1_config(cfg)
    training = {"regularizer": dataclasses.asdict(cfg.regularizer), "optim": dataclasses.asdict(t.optim),
                "batch_size": cfg.data.batch_size, "max_steps": cfg.trainer.max_steps, "seed": cfg.seed}
    if t.resume:
        meta = load_checkpoint(t.resume)[CHECKPOINT_KEY]
        if meta.get("kind") != "Stage2GAN":
            raise UserError(f"task.resume={t.resume} holds a {meta.get('kind', 'Stage1GAN')}: resume continues a "
                            "Stage-2 run; start Stage 2 from a Stage-1 checkpoint with task.stage1")
        check_compatible(meta, wanted, "resume", t.resume, Stage1Config.ARCHITECTURE)
        recorded = meta["config"]
        if recorded.get("train", "all") != t.train:
            raise UserError(f"task.train={t.train} but the run in {t.resume} trains {recorded.get('train', 'all')!r} "
                            "(its optimiser state belongs to those parameters): resume with that value, or start a "
                            "new Stage-2 run from the Stage-1 checkpoint")
        check_cache_provenance(cfg.data.clip_cache, recorded.get("stage1_sha256"),
                               f"the Stage-1 checkpoint of task.resume={t.resume}")
        data = {**meta["config"], **training, "alignment": dataclasses.asdict(alignment), "train": t.train,
                "clip_cache": str(cfg.data.clip_cache), "clip_cache_identity": recorded_identity(cfg.data.clip_cache)}
        system = Stage2GAN(Stage2Config.from_dict(data), metrics_log=ctx.metrics.write)
    else:
        if not t.stage1:
            raise UserError("task.stage1 is not set: Stage 2 starts from a Stage-1 checkpoint "
                            "(<stage-1 run>/checkpoints/last.ckpt)")
        system = Stage2GAN.from_stage1(t.stage1, alignment=alignment, train=t.train, overrides=training,
                                       expect=wanted, metrics_log=ctx.metrics.write)  # hashes the file once
        check_cache_provenance(cfg.data.clip_cache, system.cfg.stage1_sha256, f"task.stage1={t.stage1}")
        system.cfg.clip_cache = str(cfg.data.clip_cache)
        system.cfg.clip_cache_identity = recorded_identity(cfg.data.clip_cache)
    return fit(cfg, ctx, system)
