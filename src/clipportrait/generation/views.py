"""Cameras for generation: named presets, yaw/pitch in degrees <-> EG3D labels, turntable paths.

Angles follow `geometry.cameras`: the camera sits on the default orbit (radius 2.7 around the pivot
(0, 0, 0.2), FFHQ intrinsics); yaw = pitch = 0 is frontal; positive yaw moves the camera toward world
+x, the subject's left (so it shows the left cheek); positive pitch raises the camera (it looks down on
the head). Presets are named after where the camera goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..geometry.cameras import DEFAULT_PIVOT, intrinsics, lookat_cam2world, make_labels, split_labels

# name -> (yaw, pitch) in degrees. The synthetic world's cameras have yaw std 17 deg (clipped at 52)
# and pitch std 9 deg: the presets stay inside that range.
CAMERA_PRESETS: dict[str, tuple[float, float]] = {
    "frontal": (0.0, 0.0),
    "left": (30.0, 0.0),  # camera on the subject's left, shows the left cheek
    "right": (-30.0, 0.0),
    "three_quarter_left": (45.0, 0.0),
    "three_quarter_right": (-45.0, 0.0),
    "up": (0.0, 20.0),  # camera raised, looking down on the head
    "down": (0.0, -20.0),  # camera lowered, looking up at the chin
}
MAX_ABS_PITCH_DEG = 80.0  # the look-at basis degenerates toward +-90


@dataclass(frozen=True)
class View:
    name: str  # preset name, or "custom" for explicit angles
    yaw_deg: float
    pitch_deg: float


def resolve_view(camera: str, yaw_deg: float | None = None, pitch_deg: float | None = None) -> View:
    """The view of ``task.camera`` (a preset name); ``task.yaw``/``task.pitch`` (degrees), when set,
    replace the preset's angles."""
    if camera not in CAMERA_PRESETS:
        raise UserError(f"task.camera={camera!r}: unknown camera preset; known: {', '.join(CAMERA_PRESETS)} "
                        "(or set task.yaw / task.pitch in degrees)")
    yaw, pitch = CAMERA_PRESETS[camera]
    name = camera
    if yaw_deg is not None or pitch_deg is not None:
        yaw = yaw if yaw_deg is None else float(yaw_deg)
        pitch = pitch if pitch_deg is None else float(pitch_deg)
        name = "custom"
    if not (math.isfinite(yaw) and -180.0 <= yaw <= 180.0):
        raise UserError(f"task.yaw={yaw_deg!r}: expected degrees in [-180, 180]")
    if not (math.isfinite(pitch) and abs(pitch) <= MAX_ABS_PITCH_DEG):
        raise UserError(f"task.pitch={pitch_deg!r}: expected degrees in [-{MAX_ABS_PITCH_DEG:g}, {MAX_ABS_PITCH_DEG:g}]")
    return View(name, yaw, pitch)


def view_labels(yaw_deg, pitch_deg, device: torch.device | str | None = None) -> torch.Tensor:
    """EG3D labels (B,25) of cameras on the default orbit at ``yaw_deg``/``pitch_deg`` (scalars or (B,))."""
    yaw = torch.deg2rad(torch.as_tensor(yaw_deg, dtype=torch.float32)).reshape(-1)
    pitch = torch.deg2rad(torch.as_tensor(pitch_deg, dtype=torch.float32)).reshape(-1)
    yaw, pitch = torch.broadcast_tensors(yaw, pitch)
    cam2world = lookat_cam2world(yaw, pitch)
    return make_labels(cam2world, intrinsics(batch=cam2world.shape[0])).to(device)


def labels_yaw_pitch(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaw, pitch) in degrees, each (B,), of cameras given by labels (B,25): the inverse of
    `view_labels` for cameras looking at the default pivot (computed from the camera position)."""
    cam2world, _ = split_labels(labels)
    offset = cam2world[:, :3, 3].double() - torch.tensor(DEFAULT_PIVOT, dtype=torch.float64, device=labels.device)
    radius = offset.norm(dim=-1)
    pitch = torch.asin((offset[:, 1] / radius).clamp(-1, 1))
    yaw = torch.atan2(offset[:, 0], offset[:, 2])
    return torch.rad2deg(yaw), torch.rad2deg(pitch)


def turntable_yaws(frames: int, amplitude_deg: float, centre_deg: float = 0.0) -> list[float]:
    """Yaw angles (degrees) of a looping turntable: one sinusoidal sweep centre -> +amplitude -> centre
    -> -amplitude -> back, sampled at ``frames`` points (the last frame leads smoothly into the first)."""
    if frames < 2:
        raise UserError(f"task.turntable_frames={frames}: expected >= 2")
    if not 0.0 < amplitude_deg <= 90.0:
        raise UserError(f"task.turntable_yaw={amplitude_deg}: expected degrees in (0, 90]")
    return [centre_deg + amplitude_deg * math.sin(2.0 * math.pi * k / frames) for k in range(frames)]
