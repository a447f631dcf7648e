"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore (see schema.py)."""

from .schema import Config, register_configs

__all__ = ["Config", "register_configs"]
