"""What every task shares: its schema base class and the run context handed to ``run``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TaskConfig:
    """Base schema of the `task` group; each task module subclasses it as ``Schema``."""

    name: str = "???"


def is_rank_zero() -> bool:
    """True in the process that owns the run directory's files (rank 0 of a distributed job, or the
    only process). Lightning keeps ``rank_zero_only.rank`` current from the launcher's environment."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


class MetricsLog:
    """Append-only JSON-lines file (``metrics.jsonl``): one record per evaluation/event.

    Each line is written with a single write() + flush + fsync so a crash never leaves a partial
    line in the middle of the file. Only rank 0 writes (other ranks' calls do nothing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not is_rank_zero():
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        line = json.dumps(record, sort_keys=False, default=_json_default) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to metrics.jsonl")


def ensure_dataset(cfg, path: str | os.PathLike) -> Path:
    """``path`` when a dataset is there; for ``data.kind=synthetic`` a missing one is rendered first
    (from ``data.synthetic`` with the configured head); otherwise a UserError."""
    path = Path(path)
    if path.exists():
        return path
    if cfg.data.kind != "synthetic":
        from ..errors import UserError

        raise UserError(f"no dataset at {path} (data.kind={cfg.data.kind}): point data.path (or task.data_path) at one")
    from ..data.synthetic import generate_synthetic
    from ..geometry.morphable import build_morphable
    from ..utils.console import console

    console.print(f"dataset {path} missing: generating the synthetic world there first")
    return Path(generate_synthetic(cfg.data.synthetic, path, model=build_morphable(cfg.morphable)))


@dataclass
class RunContext:
    """Where a task writes: the Hydra run directory and its standard sub-folders."""

    run_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.run_dir / "samples"

    @property
    def metrics(self) -> MetricsLog:
        return MetricsLog(self.run_dir / "metrics.jsonl")
