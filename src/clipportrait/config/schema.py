"""The top-level typed config and its registration in Hydra's ConfigStore.

Every group node is a dataclass, so a misspelt key or a wrong type fails while the config is
composed, before any work starts (cli.py turns that failure into a one-paragraph message).
The `task` node is typed per task: `conf/task/<name>.yaml` starts from `<name>_schema`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..data.config import DataConfig
from ..geometry.deformation import DeformationConfig
from ..geometry.morphable.config import MorphableConfig
from ..losses.config import RegularizerConfig
from ..metrics.config import EvaluationConfig
from ..lvlm.config import LVLMConfig
from ..nn.config import BackboneConfig, DiscriminatorConfig
from .base import LoggerConfig, PathsConfig, TrainerConfig


@dataclass
class Config:
    task: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    morphable: MorphableConfig = field(default_factory=MorphableConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    deformation: DeformationConfig = field(default_factory=DeformationConfig)
    lvlm: LVLMConfig = field(default_factory=LVLMConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    print_config: bool = True


_registered = False


def register_configs() -> None:
    """Register the top-level schema and one schema per task (idempotent)."""
    global _registered
    if _registered:
        return
    from ..tasks import TASKS, load_task

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name in TASKS:
        cs.store(group="task", name=f"{name}_schema", node=load_task(name).Schema)
    _registered = True
