"""The interface shared by every morphable head model (FLAME and the procedural head).

A morphable model maps identity ``shape`` (B,100), ``expression`` (B,50) and ``pose`` (B,6) =
[global/neck axis-angle (3), jaw axis-angle (3)] to mesh vertices (B,V,3) in EG3D's world frame
(DESIGN.md section 4: y up, the face looks toward +z, world +x is the subject's left). These are the
FLAME parameters of the paper (sec. 3.2, the controls behind the deformation D of eq. (4)-(5));
the canonical mesh of eq. (5) is ``canonical_vertices()``: beta = 0, psi = 0, jaw slightly open.

Each model is built in its own native frame (FLAME: metres, origin near the neck) and moved into
the world frame by ``world = world_scale * native + world_translation`` (buffers ``world_scale``
(scalar) and ``world_translation`` (3,), also exposed together as ``world_transform``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ...utils.cuda_graphs import host_checks

REGION_SKIN, REGION_SCALP, REGION_BROWS, REGION_EYES, REGION_LIPS = 0, 1, 2, 3, 4
REGION_MOUTH_INTERIOR, REGION_NOSE, REGION_EARS, REGION_NECK = 5, 6, 7, 8
#: Names of the integer labels in ``vertex_regions`` (index = label).
REGION_NAMES: tuple[str, ...] = (
    "skin", "scalp", "brows", "eyes", "lips", "mouth_interior", "nose", "ears", "neck",
)

#: iBUG-68 landmark pairs that swap under a left-right mirror (0-based indices); the rest map to themselves.
IBUG68_MIRROR_PAIRS: tuple[tuple[int, int], ...] = (
    *((i, 16 - i) for i in range(8)),
    *((17 + i, 26 - i) for i in range(5)),
    (31, 35), (32, 34),
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
    (48, 54), (49, 53), (50, 52), (59, 55), (58, 56),
    (60, 64), (61, 63), (67, 65),
)


def ibug68_mirror_permutation() -> list[int]:
    """perm[i] = index of the landmark that landmark i becomes in the mirrored face."""
    perm = list(range(68))
    for a, b in IBUG68_MIRROR_PAIRS:
        perm[a], perm[b] = b, a
    return perm


def mirror_preserves_faces(faces: torch.Tensor, mirror_map: torch.Tensor) -> bool:
    """True when mapping every face through ``mirror_map`` with reversed winding gives the same face
    set, i.e. ``verts[:, mirror_map] * (-1, 1, 1)`` is a mesh of the same topology and orientation."""
    def canonical(f: torch.Tensor) -> set[tuple[int, ...]]:
        rolled = torch.stack([f.roll(-k, dims=1) for k in range(3)], 1)  # the 3 rotations of each face
        first = rolled[torch.arange(len(f)), f.argmin(1)]
        return {tuple(t) for t in first.tolist()}

    return canonical(mirror_map[faces][:, [0, 2, 1]]) == canonical(faces)


class MorphableParams(NamedTuple):
    shape: torch.Tensor  # (B, n_shape)
    expression: torch.Tensor  # (B, n_expr)
    pose: torch.Tensor  # (B, 6): global/neck axis-angle, jaw axis-angle


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: (..., 3) axis-angle -> (..., 3, 3) rotation; exact and smooth at angle 0."""
    angle_sq = (axis_angle * axis_angle).sum(-1, keepdim=True)[..., None]  # (...,1,1)
    angle = angle_sq.clamp_min(1e-24).sqrt()
    small = angle_sq < 1e-8
    # sin(a)/a and (1-cos(a))/a^2 with their Taylor series near 0 (avoids 0/0 and keeps gradients finite).
    sin_over = torch.where(small, 1 - angle_sq / 6, torch.sin(angle) / angle)
    one_minus_cos_over = torch.where(small, 0.5 - angle_sq / 24, (1 - torch.cos(angle)) / angle_sq.clamp_min(1e-24))
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack((zero, -z, y, z, zero, -x, -y, x, zero), dim=-1).reshape(*axis_angle.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sin_over * skew + one_minus_cos_over * (skew @ skew)


def linear_blend_skinning(
    vertices: torch.Tensor,
    joints: torch.Tensor,
    rotations: torch.Tensor,
    parents: Sequence[int],
    weights: torch.Tensor,
) -> torch.Tensor:
    """Linear blend skinning of rest-pose ``vertices`` (B,V,3).

    ``joints`` (B,J,3) are rest-pose joint positions, ``rotations`` (B,J,3,3) each joint's rotation
    relative to its parent, ``parents[j]`` the parent index (-1 for the root, parents before
    children), ``weights`` (V,J) rows summing to 1. Joint j's world transform is
    G_j = G_parent(j) [R_j | J_j - J_parent(j)], and vertex v moves to
    sum_j w_vj G_j [I | -J_j] v (the rest pose is removed so that identity rotations change nothing).
    """
    batch, num_joints = joints.shape[:2]
    if parents[0] != -1 or any(not (0 <= p < j) for j, p in enumerate(parents) if j > 0):
        raise ValueError(f"parents={list(parents)}: expected -1 for joint 0 and parent < child otherwise")
    global_rot: list[torch.Tensor] = []
    global_trans: list[torch.Tensor] = []
    for j in range(num_joints):
        if j == 0:
            global_rot.append(rotations[:, 0])
            global_trans.append(joints[:, 0])
        else:
            p = parents[j]
            offset = joints[:, j] - joints[:, p]
            global_rot.append(global_rot[p] @ rotations[:, j])
            global_trans.append(global_trans[p] + (global_rot[p] @ offset[..., None])[..., 0])
    rot = torch.stack(global_rot, dim=1)  # (B,J,3,3)
    # Translation that maps rest joint j onto its posed position: t_j - R_j J_j.
    trans = torch.stack(global_trans, dim=1) - (rot @ joints[..., None])[..., 0]
    blended_rot = torch.einsum("vj,bjkl->bvkl", weights, rot)
    blended_trans = torch.einsum("vj,bjk->bvk", weights, trans)
    return (blended_rot @ vertices[..., None])[..., 0] + blended_trans


def _check_param(value: torch.Tensor, name: str, size: int, batch: int | None) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape (B,{size}), got {type(value).__name__}")
    if value.dim() != 2 or value.shape[1] != size or (batch is not None and value.shape[0] != batch):
        expected = f"({batch if batch is not None else 'B'},{size})"
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(value.shape)}")
    if host_checks() and not torch.isfinite(value).all():  # replays of a CUDA graph check before
        raise ValueError(f"{name}: contains non-finite values")


class MorphableModel(torch.nn.Module):
    """Base class: validation, world transform, landmarks, canonical pose, simplification, sampling.

    Subclasses register the buffers ``faces`` (F,3), ``simplified_vertex_ids`` (Vs,),
    ``simplified_faces`` (Fs,3) (indices into the simplified vertex list), ``mirror_map`` (V,),
    ``vertex_regions`` (V,) (labels into ``region_names``), ``world_scale`` (), ``world_translation``
    (3,), and either ``landmark_indices`` (68,) or ``landmark_faces`` (68,) + ``landmark_bary``
    (68,3); and implement ``_native_vertices``.
    """

    n_shape: int = 100
    n_expr: int = 50
    n_pose: int = 6
    region_names: tuple[str, ...] = REGION_NAMES

    faces: torch.Tensor
    simplified_vertex_ids: torch.Tensor
    simplified_faces: torch.Tensor
    mirror_map: torch.Tensor
    vertex_regions: torch.Tensor
    world_scale: torch.Tensor
    world_translation: torch.Tensor

    def __init__(self, canonical_jaw_angle: float) -> None:
        super().__init__()
        if not (-0.5 <= canonical_jaw_angle <= 0.8):
            raise ValueError(
                f"canonical_jaw_angle={canonical_jaw_angle}: expected radians in [-0.5, 0.8] (slightly open jaw, e.g. 0.1)"
            )
        self.canonical_jaw_angle = float(canonical_jaw_angle)

    # --- to implement -------------------------------------------------------------------------
    def _native_vertices(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- public API ---------------------------------------------------------------------------
    @property
    def num_vertices(self) -> int:
        return int(self.mirror_map.shape[0])

    @property
    def world_transform(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale (), translation (3,)): world = scale * native + translation."""
        return self.world_scale, self.world_translation

    def forward(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
        """Vertices (B,V,3) in EG3D world coordinates for the given parameters."""
        _check_param(shape, "shape", self.n_shape, None)
        batch = shape.shape[0]
        _check_param(expression, "expression", self.n_expr, batch)
        _check_param(pose, "pose", self.n_pose, batch)
        native = self._native_vertices(shape, expression, pose, **extra)
        return native * self.world_scale + self.world_translation

    def landmarks(self, vertices: torch.Tensor) -> torch.Tensor:
        """iBUG-68 landmarks (B,68,3) of meshes ``vertices`` (B,V,3) of this model."""
        if vertices.dim() != 3 or vertices.shape[1:] != (self.num_vertices, 3):
            raise ValueError(f"vertices: expected shape (B,{self.num_vertices},3), got {tuple(vertices.shape)}")
        indices = getattr(self, "landmark_indices", None)
        if indices is not None:
            return vertices[:, indices]
        faces = getattr(self, "landmark_faces", None)
        if faces is None:
            raise RuntimeError(f"{type(self).__name__} has no landmark embedding (give a landmark file)")
        corners = vertices[:, self.faces[faces]]  # (B,68,3 corners,3)
        return (corners * self.landmark_bary[None, :, :, None]).sum(2)

    def canonical_pose(self, batch: int = 1) -> torch.Tensor:
        """Pose (B,6) of the canonical space: no global rotation, jaw open by ``canonical_jaw_angle``."""
        pose = torch.zeros(batch, self.n_pose, device=self.world_scale.device, dtype=self.world_scale.dtype)
        pose[:, 3] = self.canonical_jaw_angle
        return pose

    def zero_params(self, batch: int = 1) -> MorphableParams:
        like = {"device": self.world_scale.device, "dtype": self.world_scale.dtype}
        return MorphableParams(
            torch.zeros(batch, self.n_shape, **like),
            torch.zeros(batch, self.n_expr, **like),
            torch.zeros(batch, self.n_pose, **like),
        )

    def canonical_vertices(self, batch: int = 1) -> torch.Tensor:
        """Canonical mesh of eq. (5): beta = 0, psi = 0, jaw open by ``canonical_jaw_angle``."""
        params = self.zero_params(batch)
        return self(params.shape, params.expression, self.canonical_pose(batch))

    def simplify(self, vertices: torch.Tensor) -> torch.Tensor:
        """Vertices (B,Vs,3) of the simplified mesh (faces: ``simplified_faces``) of full meshes (B,V,3)."""
        if vertices.dim() != 3 or vertices.shape[1:] != (self.num_vertices, 3):
            raise ValueError(f"vertices: expected shape (B,{self.num_vertices},3), got {tuple(vertices.shape)}")
        return vertices[:, self.simplified_vertex_ids]

    def mirror(self, vertices: torch.Tensor) -> torch.Tensor:
        """Meshes mirrored by x -> -x, in this model's topology (vertex i <- mirror of mirror_map[i])."""
        mirrored = vertices[:, self.mirror_map]
        # (no host-made constant: this runs inside CUDA graphs, which cannot copy from pageable memory)
        return torch.cat([-mirrored[..., :1], mirrored[..., 1:]], dim=-1)

    def sample_params(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        shape_scale: float = 1.0,
        expr_scale: float = 0.7,
        jaw_max: float = 0.3,
    ) -> MorphableParams:
        """Plausible random parameters: beta ~ N(0, shape_scale^2), psi ~ N(0, expr_scale^2) (both
        models scale their bases so that unit coefficients are one standard deviation), jaw opened
        uniformly in [0, jaw_max] radians about x with a small sideways component, no global rotation.
        Sampled on CPU with ``generator`` (reproducible), then moved to the model's device."""
        if batch < 1:
            raise ValueError(f"batch={batch}: expected >= 1")
        for name, value in (("shape_scale", shape_scale), ("expr_scale", expr_scale), ("jaw_max", jaw_max)):
            if not (value >= 0 and value == value):
                raise ValueError(f"{name}={value}: expected a non-negative number")
        device = self.world_scale.device
        shape = torch.randn(batch, self.n_shape, generator=generator) * shape_scale
        expression = torch.randn(batch, self.n_expr, generator=generator) * expr_scale
        pose = torch.zeros(batch, self.n_pose)
        pose[:, 3] = torch.rand(batch, generator=generator) * jaw_max
        pose[:, 4:6] = torch.randn(batch, 2, generator=generator) * (0.05 * jaw_max)
        dtype = self.world_scale.dtype
        return MorphableParams(shape.to(device, dtype), expression.to(device, dtype), pose.to(device, dtype))
