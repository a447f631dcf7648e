"""Schemas of the config groups that belong to the framework itself (paths, trainer, logger).

Component groups keep their schema next to their code (threestudio style): `nn/config.py`,
`data/config.py`, `geometry/morphable/config.py`, `geometry/deformation.py`. Task schemas live in
their task modules. `schema.py` assembles them into the top-level `Config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "${paths.root_dir}/data"
    output_dir: str = "${paths.root_dir}/outputs"
    # Converted pretrained weights; the assets module reads $CLIPPORTRAIT_CACHE first.
    cache_dir: str = "${oc.env:CLIPPORTRAIT_CACHE,${oc.env:HOME}/.cache/clipportrait}"


@dataclass
class TrainerConfig:
    """Arguments handed to lightning.Trainer (only the ones the project supports)."""

    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    max_steps: int = 100
    log_every_n_steps: int = 10
    # torch.use_deterministic_algorithms via Lightning: CPU runs repeat exactly. CUDA has no deterministic
    # backward for bilinear resizes or grid_sample (torch raises) and the Triton tri-plane lookup adds
    # with atomics, so on a GPU `true` is refused; `deterministic_warn_only` takes torch's deterministic
    # kernels where they exist and warns for the rest (close repeats, not exact ones).
    deterministic: bool = False
    deterministic_warn_only: bool = False
    gradient_clip_val: Optional[float] = None
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    allow_tf32: bool = True  # torch.backends matmul/cudnn TF32 on GPU
    benchmark: bool = False  # cudnn.benchmark: autotune convolutions (slow first step, faster after)
    max_time: Optional[str] = None  # wall-clock limit "DD:HH:MM:SS"; training then ends as at max_steps


@dataclass
class LoggerConfig:
    """Experiment tracking. kind: csv | tensorboard | wandb | none.

    W&B runs offline unless a project is set AND an API key is available (WANDB_API_KEY or a
    `wandb login`) AND WANDB_MODE is not 'offline'; offline runs can be synced later with
    `wandb sync <run dir>/wandb/offline-run-*`.
    """

    kind: str = "csv"
    project: Optional[str] = None
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
