"""Morphable conditioning for generation: expression presets, explicit vectors, or dataset rows.

Presets are built from the morphable model's *named* expression modes (the procedural head names
its 50 modes, e.g. "smile_left"/"smile_right"; a preset's "smile" means both sides) and the jaw
angle (pose[3], radians about x, positive opens the mouth, as in `MorphableModel.sample_params`).
A model without named modes (FLAME) only gets the presets that use the jaw alone. Coefficients are
in the model's units (unit coefficient = one standard deviation); the synthetic world draws
expressions with std 0.6 and jaw openings in [0, 0.25] rad, so the presets sit at the edge of what
the generator saw, where the change is clearly visible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import UserError
from ..geometry.morphable import MorphableModel

FROM_DATASET = "from_dataset"
# Coefficients are in standard deviations: beyond this the mesh is one the generator never saw.
TYPICAL_RANGE = 3.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpressionPreset:
    description: str
    modes: dict[str, float] = field(default_factory=dict)  # mode name (both sides of a left/right pair) -> coefficient
    jaw: float = 0.0  # radians, positive opens


EXPRESSION_PRESETS: dict[str, ExpressionPreset] = {
    "neutral": ExpressionPreset("all expression coefficients 0, jaw closed"),
    "open_mouth": ExpressionPreset("jaw open by 0.3 rad", jaw=0.3),
    "smile": ExpressionPreset("mouth corners up and out, cheeks raised", {"smile": 1.5, "cheek_raise": 1.0}),
    "raised_brows": ExpressionPreset("inner and outer brows raised", {"inner_brow_raise": 1.5, "outer_brow_raise": 1.5}),
    "frown": ExpressionPreset("mouth corners down, brows lowered", {"frown": 1.5, "brow_lower": 1.5}),
    "surprise": ExpressionPreset("brows raised, eyes wide, jaw dropped",
                                 {"inner_brow_raise": 1.5, "outer_brow_raise": 1.5, "eye_wide": 1.5}, jaw=0.2),
    "squint": ExpressionPreset("lower lids raised", {"eye_squint": 1.5}),
    "pucker": ExpressionPreset("lips pushed forward", {"lips_pucker": 1.5}),
}


def mode_indices(model: MorphableModel, mode: str) -> list[int]:
    """Indices of ``mode`` in the model's expression basis: the mode itself, or both sides of a pair."""
    names = tuple(getattr(model, "expression_names", ()) or ())
    found = [i for i, n in enumerate(names) if n in (mode, f"{mode}_left", f"{mode}_right")]
    return found


def usable_presets(model: MorphableModel) -> list[str]:
    return [name for name, p in EXPRESSION_PRESETS.items() if all(mode_indices(model, m) for m in p.modes)]


def preset_parameters(model: MorphableModel, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(expression (n_expr,), pose (6,)) of the preset ``name`` for ``model``."""
    if name not in EXPRESSION_PRESETS:
        raise UserError(f"task.expression={name!r}: unknown expression preset; known: "
                        f"{', '.join(EXPRESSION_PRESETS)} (or {FROM_DATASET}, or task.expression_vector)")
    preset = EXPRESSION_PRESETS[name]
    expression = torch.zeros(model.n_expr)
    for mode, value in preset.modes.items():
        indices = mode_indices(model, mode)
        if not indices:
            raise UserError(f"task.expression={name!r} needs the expression mode {mode!r}, which the morphable model "
                            f"{type(model).__name__} does not name; presets usable with it: "
                            f"{', '.join(usable_presets(model))} (or give task.expression_vector)")
        expression[indices] = value
    pose = torch.zeros(model.n_pose)
    pose[3] = preset.jaw
    return expression, pose


def _vector(values: Sequence[float], size: int, key: str) -> torch.Tensor:
    values = [float(v) for v in values]
    if len(values) != size:
        raise UserError(f"{key} has {len(values)} values: expected {size} (the morphable model's size), or [] for "
                        "the default")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"{key}: non-finite value at index {bad[0]} ({values[bad[0]]}); expected finite coefficients")
    far = [i for i, v in enumerate(values) if abs(v) > TYPICAL_RANGE]
    if far:
        log.warning("%s: %d coefficient(s) beyond +-%g standard deviations (index %d: %g): such meshes lie outside "
                    "what the generator was trained on, expect distorted portraits", key, len(far), TYPICAL_RANGE,
                    far[0], values[far[0]])
    return torch.tensor(values, dtype=torch.float32)


@dataclass
class MorphableChoice:
    """Per-seed morphable parameters (S rows) and a JSON description of where they came from."""

    shape: torch.Tensor  # (S, n_shape)
    expression: torch.Tensor  # (S, n_expr)
    pose: torch.Tensor  # (S, 6)
    description: dict

    def rows(self, index: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index, dtype=torch.long)
        return {"shape": self.shape[index], "expression": self.expression[index], "pose": self.pose[index],
                "flip": torch.zeros(len(index), dtype=torch.bool)}


def dataset_rows(dataset_path: str, seeds: Sequence[int]) -> tuple[list[int], dict[str, np.ndarray]]:
    """One dataset row per seed (drawn uniformly with the seed) and the dataset's parameter tables."""
    from ..data.format import DatasetError, read_index

    try:
        index = read_index(dataset_path)
    except (DatasetError, FileNotFoundError, OSError, ValueError) as err:
        raise UserError(f"task.expression={FROM_DATASET} draws rows of data.path={dataset_path}: {err}") from None
    count = len(index.names)
    rows = [int(np.random.default_rng(int(seed)).integers(count)) for seed in seeds]
    return rows, {"shape": index.shape, "expression": index.expression, "pose": index.pose,
                  "names": [index.names[r] for r in rows]}


def resolve_morphable(model: MorphableModel, seeds: Sequence[int], expression: str = "neutral",
                      expression_vector: Sequence[float] = (), shape_vector: Sequence[float] = (),
                      jaw: float | None = None, dataset_path: str | None = None) -> MorphableChoice:
    """Parameters for each seed: a preset (or ``from_dataset``: the shape, expression and pose of one
    dataset row per seed); ``expression_vector``/``shape_vector``/``jaw``, when given, replace the
    corresponding part. The default identity is the mean shape (beta = 0)."""
    seeds = list(seeds)
    count = len(seeds)
    description: dict = {"expression": expression}
    if expression == FROM_DATASET:
        if not dataset_path:
            raise UserError(f"task.expression={FROM_DATASET} needs data.path (the dataset to draw rows from)")
        rows, tables = dataset_rows(dataset_path, seeds)
        shape = torch.from_numpy(np.asarray(tables["shape"][rows], dtype=np.float32))
        expr = torch.from_numpy(np.asarray(tables["expression"][rows], dtype=np.float32))
        pose = torch.from_numpy(np.asarray(tables["pose"][rows], dtype=np.float32))
        for key, table, size in (("shape", shape, model.n_shape), ("expression", expr, model.n_expr),
                                 ("pose", pose, model.n_pose)):
            if table.shape[1] != size:
                raise UserError(f"data.path={dataset_path}: its {key} parameters have {table.shape[1]} values, the "
                                f"checkpoint's morphable model expects {size}")
        description.update({"dataset": str(dataset_path), "rows": rows, "names": tables["names"]})
    else:
        e, p = preset_parameters(model, expression)
        shape = torch.zeros(count, model.n_shape)
        expr, pose = e.expand(count, -1).clone(), p.expand(count, -1).clone()
        description["preset"] = EXPRESSION_PRESETS[expression].description
    if len(expression_vector):
        expr = _vector(expression_vector, model.n_expr, "task.expression_vector").expand(count, -1).clone()
        description["expression_vector"] = [float(v) for v in expression_vector]
    if len(shape_vector):
        shape = _vector(shape_vector, model.n_shape, "task.shape_vector").expand(count, -1).clone()
        description["shape_vector"] = [float(v) for v in shape_vector]
    if jaw is not None:
        if not (math.isfinite(float(jaw)) and -0.2 <= float(jaw) <= 0.8):
            raise UserError(f"task.jaw={jaw!r}: expected radians in [-0.2, 0.8] (0 closed, 0.3 open)")
        pose = pose.clone()
        pose[:, 3] = float(jaw)
        description["jaw"] = float(jaw)
    return MorphableChoice(shape, expr, pose, description)
