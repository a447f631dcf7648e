"""Morphable head models (FLAME and the procedural stand-in) behind one interface."""

from .base import REGION_NAMES, MorphableModel, MorphableParams
from .procedural import ProceduralHead

__all__ = ["REGION_NAMES", "MorphableModel", "MorphableParams", "ProceduralHead"]
