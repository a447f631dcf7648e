"""Morphable head models (FLAME and the procedural stand-in) behind one interface."""

from .base import REGION_NAMES, MorphableModel, MorphableParams
from .config import MorphableConfig, build_morphable
from .procedural import ProceduralHead

__all__ = ["REGION_NAMES", "MorphableConfig", "MorphableModel", "MorphableParams", "ProceduralHead", "build_morphable"]
