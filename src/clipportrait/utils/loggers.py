"""Lightning loggers chosen by `logger=` (csv | tensorboard | wandb | none)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

LOGGER_KINDS = ("csv", "tensorboard", "wandb", "none")


def wandb_mode(cfg) -> str:
    """'online' only when the user asked for a project and has a key and did not force offline."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return "offline"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path(os.path.expanduser("~/.netrc")).exists()
    return "online" if (cfg.project and has_key) else "offline"


def build_logger(cfg, run_dir: str | os.PathLike):
    """A Lightning logger writing under ``run_dir`` (or None for kind=none)."""
    kind = cfg.kind
    save_dir = str(run_dir)
    name = cfg.name or "logs"
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=save_dir, name=name, version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=save_dir, name=name, version="", default_hp_metric=False)
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode(cfg)
        return WandbLogger(save_dir=save_dir, project=cfg.project or "clipportrait", entity=cfg.entity,
                           name=cfg.name, tags=list(cfg.tags), offline=(mode == "offline"))
    if kind == "none":
        return None
    raise UserError(f"logger.kind={kind!r} is not supported; choose one of {', '.join(LOGGER_KINDS)}")
