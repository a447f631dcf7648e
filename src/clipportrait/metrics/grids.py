"""Fixed-seed sample grids: one row per identity (fixed z and shape), columns = cameras x expressions.

Column c * E + e shows camera c with expression e (camera-major), so a row reads as a turntable of
expression sweeps. Cameras are yaw presets on the default orbit around the frontal camera
(`geometry.cameras`), or given labels. Expressions come from the dataset through a
`ConditioningSampler` (expression and jaw of drawn items; neck rotation zeroed so that only the
camera turns the head) or, given a plain conditioning dict, are the neutral face with the jaw opened
step by step. The same seed gives the same grid, so grids of successive checkpoints line up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.datamodule import ConditioningSampler
from ..data.format import PARAM_DIMS
from ..geometry.cameras import LABEL_DIM, intrinsics, lookat_cam2world, make_labels
from ..utils.files import atomic_open
from .evaluation import Generate, check_generated

JAW_AXIS = 3  # pose = [neck axis-angle (3), jaw axis-angle (3)]; jaw opens about x


def yaw_presets(count: int, max_yaw: float = 0.6) -> list[float]:
    """``count`` yaw angles (radians) evenly from -max_yaw to +max_yaw; [0.0] (frontal) for one."""
    if count < 1:
        raise ValueError(f"count={count}: expected >= 1 camera")
    if count == 1:
        return [0.0]
    return torch.linspace(-max_yaw, max_yaw, count).tolist()


def grid_cameras(cameras: int | Sequence[float] | torch.Tensor, pitch: float = 0.0) -> torch.Tensor:
    """Camera labels (C, 25): ``cameras`` is a count of yaw presets, a list of yaws in radians on the
    default orbit at ``pitch``, or labels (C, 25) used as they are."""
    if isinstance(cameras, torch.Tensor):
        if cameras.ndim != 2 or cameras.shape[1] != LABEL_DIM or cameras.shape[0] < 1:
            raise ValueError(f"cameras: labels of shape {tuple(cameras.shape)}; expected (C, {LABEL_DIM})")
        return cameras.float()
    yaws = yaw_presets(cameras) if isinstance(cameras, int) else [float(y) for y in cameras]
    if not yaws:
        raise ValueError("cameras: empty list of yaw angles")
    cam2world = lookat_cam2world(torch.tensor(yaws), torch.full((len(yaws),), float(pitch)))
    return make_labels(cam2world, intrinsics(batch=len(yaws)))


def _grid_conditions(
    sampler_or_cond: ConditioningSampler | dict[str, torch.Tensor],
    num_identities: int,
    num_expressions: int,
    generator: torch.Generator,
    jaw_max: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(identity tables: shape [+ clip_embedding], each (N, ...); expression (E, 50); pose (E, 6))."""
    if isinstance(sampler_or_cond, ConditioningSampler):
        tables = {k: v.cpu() for k, v in sampler_or_cond.tables.items()}
        who = torch.randint(len(sampler_or_cond), (num_identities,), generator=generator)
        how = torch.randint(len(sampler_or_cond), (num_expressions,), generator=generator)
        identity = {k: tables[k][who] for k in ("shape", "clip_embedding") if k in tables}
        pose = tables["pose"][how].clone()
        pose[:, :JAW_AXIS] = 0  # neck rotation would turn the head away from the column's camera
        return identity, tables["expression"][how], pose
    if not isinstance(sampler_or_cond, dict) or "shape" not in sampler_or_cond:
        raise ValueError(
            "sampler_or_cond: expected a ConditioningSampler or a dict with 'shape' (1 or num_identities, "
            f"{PARAM_DIMS['shape']}) and optionally 'clip_embedding'; got {type(sampler_or_cond).__name__}"
            + (f" with keys {sorted(sampler_or_cond)}" if isinstance(sampler_or_cond, dict) else "")
        )
    identity = {}
    for key in ("shape", "clip_embedding"):
        if key not in sampler_or_cond:
            continue
        value = torch.as_tensor(sampler_or_cond[key]).float().cpu()
        if value.ndim != 2 or value.shape[0] not in (1, num_identities):
            raise ValueError(f"sampler_or_cond[{key!r}]: shape {tuple(value.shape)}; expected (1 or {num_identities}, D)")
        identity[key] = value.expand(num_identities, -1)
    expression = torch.zeros(num_expressions, PARAM_DIMS["expression"])
    pose = torch.zeros(num_expressions, PARAM_DIMS["pose"])
    pose[:, JAW_AXIS] = torch.linspace(0.0, jaw_max, num_expressions) if num_expressions > 1 else 0.0
    return identity, expression, pose


def sample_grid(
    generate: Generate,
    sampler_or_cond: ConditioningSampler | dict[str, torch.Tensor],
    num_identities: int,
    cameras: int | Sequence[float] | torch.Tensor,
    expressions: int,
    seed: int,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    jaw_max: float = 0.3,
) -> np.ndarray:
    """uint8 (N*R, C*E*R, 3) grid: row n = identity n (z and shape fixed), column c*E + e = camera c
    (`grid_cameras`) with expression e (module docstring). Generated under ``torch.no_grad``."""
    if num_identities < 1 or expressions < 1 or batch_size < 1:
        raise ValueError(
            f"num_identities={num_identities}, expressions={expressions}, batch_size={batch_size}: expected >= 1"
        )
    generator = torch.Generator().manual_seed(int(seed))
    z = torch.randn(num_identities, generate.z_dim, generator=generator)
    labels = grid_cameras(cameras)
    identity, expression, pose = _grid_conditions(sampler_or_cond, num_identities, expressions, generator, jaw_max)
    n_cam = labels.shape[0]
    # Flattened cell order n-major, then camera, then expression: cell k -> (n, c, e).
    n_idx = torch.arange(num_identities).repeat_interleave(n_cam * expressions)
    c_idx = torch.arange(n_cam).repeat_interleave(expressions).repeat(num_identities)
    e_idx = torch.arange(expressions).repeat(num_identities * n_cam)
    cells = []
    with torch.no_grad():
        for start in range(0, len(n_idx), batch_size):
            n, c, e = (idx[start : start + batch_size] for idx in (n_idx, c_idx, e_idx))
            cond = {"camera": labels[c], "expression": expression[e], "pose": pose[e],
                    "flip": torch.zeros(len(n), dtype=torch.bool), **{k: v[n] for k, v in identity.items()}}
            cond = {k: v.to(device) for k, v in cond.items()}
            images = check_generated(generate(z[n].to(device), cond), len(n), "generate (grid)")
            cells.append(_to_uint8(images))
    pixels = torch.cat(cells)  # (N*C*E, R, R, 3)
    res = pixels.shape[1]
    columns = n_cam * expressions
    grid = pixels.view(num_identities, columns, res, res, 3).permute(0, 2, 1, 3, 4)
    return grid.reshape(num_identities * res, columns * res, 3).numpy()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [-1, 1] -> (B,H,W,3) uint8 with the FID quantisation floor(x * 127.5 + 128)."""
    scaled = (images.detach().float().cpu() + 1.0) * 127.5 + 0.5
    return scaled.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def save_png(path, array: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) or (H, W) array as PNG through a temporary file (never half written)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim not in (2, 3) or (
        array.ndim == 3 and array.shape[2] != 3
    ):
        what = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"save_png({path}): got {what}; expected a uint8 (H, W, 3) or (H, W) array")
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")
