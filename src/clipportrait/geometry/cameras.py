"""EG3D camera labels: 25 floats = flattened 4x4 cam2world + flattened 3x3 normalised intrinsics.

Conventions (DESIGN.md section 4):

- Camera axes are OpenCV's: x right, y down, z forward (the viewing direction).
- World frame is EG3D's: y up; the frontal camera sits on +z looking toward -z, so world +x appears
  on the right of the image and world +y at the top.
- Intrinsics are normalised by the image size: a point at normalised image coordinate (0, 0) is the
  top-left corner of the image, (1, 1) the bottom-right corner, and the centre of pixel (row i,
  column j) of an R x R image is ((j + 0.5) / R, (i + 0.5) / R).
- Default orbit: radius 2.7 around the pivot (0, 0, 0.2); FFHQ focal 4.2647 with principal point 0.5.

The camera position on the orbit is
    origin = pivot + radius * (cos(pitch) sin(yaw), sin(pitch), cos(pitch) cos(yaw)),
so yaw = pitch = 0 is the frontal camera, positive yaw moves the camera toward world +x (it then sees
the head's +x side, i.e. the subject's left cheek for a subject facing +z), and positive pitch moves
it up (+y) so it looks down on the head.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..utils.cuda_graphs import host_checks

FFHQ_FOCAL = 4.2647
DEFAULT_RADIUS = 2.7
DEFAULT_PIVOT = (0.0, 0.0, 0.2)

LABEL_DIM = 25
# Keeps the look-at basis well defined: at |pitch| = pi/2 forward is parallel to world up.
_MAX_ABS_PITCH = torch.pi / 2 - 1e-5


def intrinsics(
    focal: float = FFHQ_FOCAL,
    cx: float = 0.5,
    cy: float = 0.5,
    batch: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Normalised pinhole intrinsics [[f, 0, cx], [0, f, cy], [0, 0, 1]] repeated to (batch, 3, 3)."""
    if batch < 1:
        raise ValueError(f"batch={batch}: expected a positive batch size")
    if not focal > 0:
        raise ValueError(f"focal={focal}: expected a positive normalised focal length")
    K = torch.tensor([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]], dtype=torch.float32, device=device)
    return K.expand(batch, 3, 3).clone()


def _as_batch(x: torch.Tensor | float, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32)
    if t.dim() == 0:
        t = t[None]
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a scalar or a 1-D tensor of angles, got shape {tuple(t.shape)}")
    return t


def lookat_from_origin(origin: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """cam2world (B,4,4) of cameras at ``origin`` (B,3) looking at ``target`` (B,3), EG3D's look-at.

    forward = normalize(target - origin), right = -normalize(up x forward) with up = world +y,
    up' = normalize(forward x right), R = [right | up' | forward]. For the frontal camera this gives
    camera y (image down) = world -y, as OpenCV axes require.
    """
    forward = torch.nn.functional.normalize(target - origin, dim=-1)
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=origin.dtype, device=origin.device).expand_as(forward)
    right = -torch.nn.functional.normalize(torch.linalg.cross(world_up, forward, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.linalg.cross(forward, right, dim=-1), dim=-1)
    cam2world = torch.eye(4, dtype=origin.dtype, device=origin.device).repeat(origin.shape[0], 1, 1)
    cam2world[:, :3, :3] = torch.stack((right, up, forward), dim=-1)
    cam2world[:, :3, 3] = origin
    return cam2world


def lookat_cam2world(
    yaw: torch.Tensor | float,
    pitch: torch.Tensor | float,
    radius: float = DEFAULT_RADIUS,
    pivot: Sequence[float] = DEFAULT_PIVOT,
) -> torch.Tensor:
    """cam2world (B,4,4) of cameras on the orbit of ``radius`` around ``pivot``, looking at the pivot.

    ``yaw``/``pitch`` are radians (scalars or (B,) tensors, broadcast together); (0, 0) is frontal,
    positive yaw moves the camera toward world +x, positive pitch moves it up (+y). Pitch is clamped
    just inside +-pi/2 where the look-at basis is undefined. The result is on ``yaw``'s device.
    """
    if not radius > 0:
        raise ValueError(f"radius={radius}: expected a positive orbit radius")
    if len(pivot) != 3:
        raise ValueError(f"pivot={pivot}: expected 3 coordinates")
    device = yaw.device if isinstance(yaw, torch.Tensor) else (pitch.device if isinstance(pitch, torch.Tensor) else None)
    yaw_t, pitch_t = torch.broadcast_tensors(_as_batch(yaw, "yaw").to(device), _as_batch(pitch, "pitch").to(device))
    pitch_t = pitch_t.clamp(-_MAX_ABS_PITCH, _MAX_ABS_PITCH)
    target = torch.tensor(pivot, dtype=torch.float32, device=device).expand(yaw_t.shape[0], 3)
    offset = torch.stack(
        (torch.cos(pitch_t) * torch.sin(yaw_t), torch.sin(pitch_t), torch.cos(pitch_t) * torch.cos(yaw_t)), dim=-1
    )
    return lookat_from_origin(target + radius * offset, target)


def make_labels(cam2world: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Concatenate flattened cam2world (B,4,4) and normalised intrinsics (B,3,3) into labels (B,25)."""
    if cam2world.dim() != 3 or cam2world.shape[1:] != (4, 4):
        raise ValueError(f"cam2world: expected shape (B,4,4), got {tuple(cam2world.shape)}")
    if K.dim() != 3 or K.shape[1:] != (3, 3):
        raise ValueError(f"K: expected shape (B,3,3), got {tuple(K.shape)}")
    if K.shape[0] != cam2world.shape[0]:
        raise ValueError(f"K batch {K.shape[0]} != cam2world batch {cam2world.shape[0]}")
    return torch.cat((cam2world.reshape(-1, 16), K.reshape(-1, 9)), dim=1)


def split_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B,25) -> (cam2world (B,4,4), K (B,3,3)); ValueError on a wrong shape or non-finite values."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[1] != LABEL_DIM:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected a tensor of shape (B,{LABEL_DIM}) (EG3D camera labels), got {shape}")
    if host_checks() and not torch.isfinite(labels).all():  # replays of a CUDA graph check before
        bad = (~torch.isfinite(labels)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"labels: non-finite values in rows {bad}")
    return labels[:, :16].reshape(-1, 4, 4), labels[:, 16:].reshape(-1, 3, 3)


def neutral_labels(batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Labels (B,25) of the frontal camera on the default orbit with FFHQ intrinsics."""
    zeros = torch.zeros(batch, device=device)
    return make_labels(lookat_cam2world(zeros, zeros), intrinsics(batch=batch, device=device))


def sample_ffhq_like(
    batch: int,
    generator: torch.Generator | None = None,
    yaw_std: float = 0.3,
    pitch_std: float = 0.15,
    yaw_clip: float = 0.9,
    pitch_clip: float = 0.45,
    pitch_mean: float = 0.0,
    radius: float = DEFAULT_RADIUS,
    pivot: Sequence[float] = DEFAULT_PIVOT,
    focal: float = FFHQ_FOCAL,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random labels (B,25) with FFHQ-like poses: yaw ~ N(0, yaw_std), pitch ~ N(pitch_mean, pitch_std),
    each clipped to +-clip (pitch around its mean). Deterministic for a given ``generator``; sampling
    happens on the generator's device and the result is moved to ``device``."""
    if yaw_std < 0 or pitch_std < 0 or yaw_clip < 0 or pitch_clip < 0:
        raise ValueError(
            f"yaw_std={yaw_std}, pitch_std={pitch_std}, yaw_clip={yaw_clip}, pitch_clip={pitch_clip}: expected >= 0"
        )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(2, batch, generator=generator, device=gen_device)
    yaw = (noise[0] * yaw_std).clamp(-yaw_clip, yaw_clip)
    pitch = pitch_mean + (noise[1] * pitch_std).clamp(-pitch_clip, pitch_clip)
    cam2world = lookat_cam2world(yaw.to(device), pitch.to(device), radius=radius, pivot=pivot)
    return make_labels(cam2world, intrinsics(focal=focal, batch=batch, device=cam2world.device))


def inverse_3x3(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverses (B,3,3) and determinants (B,) of matrices (B,3,3) by the adjugate: the columns of
    det * m^-1 are r1 x r2, r2 x r0, r0 x r1 for rows r_i. Elementwise work only, unlike
    torch.linalg (its batched solvers synchronise with the host or call MAGMA, which CUDA graphs
    cannot hold). Singular rows give non-finite entries; callers check ``det``."""
    r0, r1, r2 = m.unbind(dim=-2)
    adjugate = torch.stack([torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], dim=-1)
    det = (r0 * adjugate[..., :, 0]).sum(-1)
    return adjugate / det[..., None, None], det


def ray_bundle(labels: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through the pixel centres: origins and unit directions, both (B, R*R, 3).

    Ray k = i * R + j goes through the centre ((j + 0.5)/R, (i + 0.5)/R) of row i, column j, lifted
    to camera space at z = 1 with the inverse normalised intrinsics, then mapped by cam2world.
    """
    if resolution < 1:
        raise ValueError(f"resolution={resolution}: expected a positive integer")
    cam2world, K = split_labels(labels)
    centres = (torch.arange(resolution, device=labels.device, dtype=labels.dtype) + 0.5) / resolution
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    pix = torch.stack((cols.flatten(), rows.flatten(), torch.ones_like(cols.flatten())), dim=-1)  # (R*R,3)
    K_inv, det = inverse_3x3(K)
    if host_checks() and bool(det.eq(0).any()):  # replays of a CUDA graph check before
        raise ValueError(f"labels: singular intrinsics in rows {det.eq(0).nonzero().flatten().tolist()}")
    cam_dirs = K_inv @ pix.T  # (B,3,R*R), z = 1
    directions = torch.nn.functional.normalize((cam2world[:, :3, :3] @ cam_dirs).transpose(1, 2), dim=-1)
    origins = cam2world[:, None, :3, 3].expand_as(directions)
    return origins, directions


def world_to_camera(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Points (B,N,3) in world coordinates -> OpenCV camera coordinates (B,N,3)."""
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points: expected shape (B,N,3), got {tuple(points.shape)}")
    cam2world, _ = split_labels(labels)
    if points.shape[0] != cam2world.shape[0]:
        raise ValueError(f"points batch {points.shape[0]} != labels batch {cam2world.shape[0]}")
    R, t = cam2world[:, :3, :3], cam2world[:, :3, 3]
    # x_cam = R^T (x_world - t), written row-wise as (x - t) @ R.
    return (points - t[:, None]) @ R


def project_points(points: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points (B,N,3): normalised image coordinates (B,N,2) (x right, y down, the image
    spans [0,1]^2) and camera-space depth z (B,N). Points behind the camera get meaningless coords."""
    _, K = split_labels(labels)
    cam = world_to_camera(points, labels)
    depth = cam[..., 2]
    uvw = cam @ K.transpose(1, 2)
    return uvw[..., :2] / uvw[..., 2:3], depth


def to_pytorch3d_cameras(labels: torch.Tensor, image_size: int | tuple[int, int]):
    """pytorch3d ``PerspectiveCameras`` equivalent to ``labels`` for an image of ``image_size``
    (int for square, or (height, width)); normalised intrinsics are scaled to pixels."""
    from pytorch3d.utils import cameras_from_opencv_projection

    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height < 1 or width < 1:
        raise ValueError(f"image_size={image_size}: expected positive sizes")
    cam2world, K = split_labels(labels)
    world2cam_R = cam2world[:, :3, :3].transpose(1, 2)
    tvec = -(world2cam_R @ cam2world[:, :3, 3:4])[..., 0]
    scale = torch.tensor([width, height, 1.0], dtype=K.dtype, device=K.device)
    K_pixels = K * scale[:, None]  # row 0 scales by width, row 1 by height
    sizes = torch.tensor([[height, width]], dtype=K.dtype, device=K.device).expand(K.shape[0], 2)
    return cameras_from_opencv_projection(world2cam_R, tvec, K_pixels, sizes)


def mirror_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels of the horizontally flipped image: the scene mirrored by x -> -x in world space.

    cam2world' = M cam2world diag(-1,1,1,1) with M = diag(-1,1,1,1) (negates entries (0,1), (0,2),
    (0,3), (1,0), (2,0), as EG3D's flip augmentation does); intrinsics get cx' = 1 - cx and skew' = -skew.
    """
    cam2world, K = split_labels(labels)
    flip = torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=labels.dtype, device=labels.device)
    cam2world = flip[:, None] * cam2world * flip[None, :]
    K = K.clone()
    K[:, 0, 2] = K[:, 2, 2] - K[:, 0, 2]  # 1 - cx for a normalised K (K[2,2] = 1)
    K[:, 0, 1] = -K[:, 0, 1]
    return make_labels(cam2world, K)
