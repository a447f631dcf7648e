"""FLAME (Li et al. 2017) loaded from the user's official model file, behind ``MorphableModel``.

FLAME cannot be redistributed: register at https://flame.is.tue.mpg.de and point
``morphable.flame_path`` at ``generic_model.pkl`` (FLAME 2020) or ``flame2023.pkl``. Files are read
with the restricted unpickler of ``safe_pickle`` (chumpy arrays become numpy, nothing is executed).

Model (paper sec. 3.2: beta in R^100, theta in R^6, psi in R^50):
    v_shaped = T + S beta + E psi                 (S = shapedirs[..., :100], E = shapedirs[..., 300:350])
    J        = J_regressor v_shaped               (5 joints: global, neck, jaw, left eye, right eye)
    v_posed  = v_shaped + P (R(theta) - I)        (pose correctives of joints 1..4)
    v        = LBS(v_posed, J, R(theta), weights)
with theta = [global (3), jaw (3)]; neck and eye rotations are optional keyword arguments
``neck_pose`` (B,3) and ``eye_pose`` (B,6). The native frame (metres) is mapped to EG3D's world
frame by ``world_scale``/``world_translation``: given explicitly, or fitted from the landmarks so
that the procedural head's framing holds (``fit_world_transform``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .base import (
    REGION_BROWS, REGION_EARS, REGION_EYES, REGION_LIPS, REGION_NECK, REGION_NOSE, REGION_SCALP, REGION_SKIN,
    MorphableModel, axis_angle_to_matrix, linear_blend_skinning, mirror_preserves_faces,
)
from .safe_pickle import load_model_pickle
from .simplify import decimate

#: World-frame framing shared with the procedural head: chin-to-crown height, chin height, nose-tip depth.
FRAMING_HEAD_HEIGHT = 0.5
FRAMING_CHIN_Y = -0.2
FRAMING_NOSE_TIP_Z = 0.32

_REQUIRED = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
FLAME_SHAPE_COMPONENTS = 300  # expression directions start after the 300 shape directions


def _dense(value: Any) -> np.ndarray:
    return np.asarray(value.toarray() if hasattr(value, "toarray") else value, dtype=np.float64)


def fit_world_transform(vertices: np.ndarray, landmarks: np.ndarray) -> tuple[float, np.ndarray]:
    """Scale/translation putting a neutral head (native coords) in the shared FFHQ-like framing:
    chin (landmark 8) to crown (highest vertex) = FRAMING_HEAD_HEIGHT, chin at FRAMING_CHIN_Y,
    nose tip (landmark 30) at z = FRAMING_NOSE_TIP_Z, landmarks centred in x."""
    chin, nose = landmarks[8], landmarks[30]
    height = vertices[:, 1].max() - chin[1]
    if not height > 0:
        raise ValueError("cannot fit the world transform: landmark 8 (chin) is not below the crown")
    scale = FRAMING_HEAD_HEIGHT / height
    translation = np.array(
        [-scale * landmarks[:, 0].mean(), FRAMING_CHIN_Y - scale * chin[1], FRAMING_NOSE_TIP_Z - scale * nose[2]]
    )
    return float(scale), translation


def load_landmark_embedding(path: str | Path, num_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """(faces (68,), barycentric (68,3)) from DECA's ``landmark_embedding.npy`` or a FLAME-style pickle."""
    data = load_model_pickle(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict landmark embedding, got {type(data).__name__}")
    for faces_key, bary_key in (("full_lmk_faces_idx", "full_lmk_bary_coords"), ("lmk_faces_idx", "lmk_bary_coords"),
                                ("lmk_face_idx", "lmk_b_coords")):
        if faces_key in data and bary_key in data:
            faces = np.asarray(data[faces_key]).reshape(-1).astype(np.int64)
            bary = np.asarray(data[bary_key], dtype=np.float64).reshape(-1, 3)
            if len(faces) != 68 or len(bary) != 68:
                raise ValueError(f"{path}: {faces_key}/{bary_key} hold {len(faces)} landmarks, expected the 68 iBUG ones")
            if faces.min() < 0 or faces.max() >= num_faces:
                raise ValueError(f"{path}: {faces_key} indexes outside the model's {num_faces} faces")
            return faces, bary
    raise ValueError(f"{path}: no 68-point embedding found (keys {sorted(data)}); expected full_lmk_faces_idx + full_lmk_bary_coords")


def mirror_map_by_matching(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """mirror_map[i] = vertex nearest to the mirror image of vertex i, and the largest match distance."""
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(vertices).query(vertices * np.array([-1.0, 1.0, 1.0]))
    return idx.astype(np.int64), float(dist.max())


def regions_from_landmarks(vertices: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Approximate region labels of a neutral head from its iBUG-68 landmarks (native coordinates)."""
    scale = np.linalg.norm(landmarks[36] - landmarks[45])  # outer eye corner distance
    regions = np.full(len(vertices), REGION_SKIN)

    def near(indices: Sequence[int], radius: float) -> np.ndarray:
        d = np.linalg.norm(vertices[:, None] - landmarks[None, list(indices)], axis=-1).min(1)
        return d < radius * scale

    front_z = landmarks[:, 2].min() - 0.25 * scale
    brow_y = landmarks[17:27, 1].max()
    regions[(vertices[:, 1] > brow_y + 0.35 * scale) | ((vertices[:, 2] < front_z - 0.3 * scale) & (vertices[:, 1] > landmarks[30, 1]))] = REGION_SCALP
    regions[(vertices[:, 1] < landmarks[8, 1]) & (vertices[:, 2] < landmarks[8, 2] - 0.25 * scale)] = REGION_NECK
    half_width = np.abs(landmarks[[0, 16], 0]).max()
    regions[(np.abs(vertices[:, 0]) > half_width * 1.02) & (vertices[:, 2] < landmarks[0, 2])] = REGION_EARS
    regions[near(range(17, 27), 0.09)] = REGION_BROWS
    regions[near(range(27, 36), 0.12)] = REGION_NOSE
    regions[near(range(36, 48), 0.08)] = REGION_EYES
    regions[near(range(48, 68), 0.07)] = REGION_LIPS
    return regions


def _require(model: dict, path: Path) -> None:
    missing = [k for k in _REQUIRED if k not in model]
    if missing:
        raise ValueError(f"{path}: not a FLAME model file, missing keys {missing} (found {sorted(model)})")


class FlameModel(MorphableModel):
    """FLAME from an official model file; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        landmarks_path: Optional[str | Path] = None,
        canonical_jaw_angle: float = 0.1,
        target_faces_simplified: int = 2500,
        world_scale: Optional[float] = None,
        world_translation: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__(canonical_jaw_angle)
        path = Path(path)
        model = load_model_pickle(path)
        if not isinstance(model, dict):
            raise ValueError(f"{path}: expected a dict of FLAME arrays, got {type(model).__name__}")
        _require(model, path)
        template = _dense(model["v_template"])
        faces = np.asarray(model["f"], dtype=np.int64)
        num_vertices = len(template)
        shapedirs = _dense(model["shapedirs"])
        posedirs = _dense(model["posedirs"])
        regressor = _dense(model["J_regressor"])
        weights = _dense(model["weights"])
        kintree = np.asarray(model["kintree_table"], dtype=np.int64)
        expected = {
            "v_template": (template.shape, (num_vertices, 3)),
            "shapedirs": (shapedirs.shape[:2], (num_vertices, 3)),
            "posedirs": (posedirs.shape, (num_vertices, 3, 36)),
            "J_regressor": (regressor.shape, (5, num_vertices)),
            "weights": (weights.shape, (num_vertices, 5)),
            "kintree_table": (kintree.shape, (2, 5)),
        }
        for key, (found, want) in expected.items():
            if tuple(found) != want:
                raise ValueError(f"{path}: {key} has shape {tuple(found)}, expected {want}")
        if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= num_vertices:
            raise ValueError(f"{path}: f must be (F,3) vertex indices < {num_vertices}, got shape {faces.shape}")
        if shapedirs.shape[2] < FLAME_SHAPE_COMPONENTS + self.n_expr:
            raise ValueError(
                f"{path}: shapedirs has {shapedirs.shape[2]} components, expected >= {FLAME_SHAPE_COMPONENTS + self.n_expr} "
                f"({FLAME_SHAPE_COMPONENTS} shape + expression)"
            )
        parents = kintree[0].copy()
        parents[0] = -1  # the root's parent is stored as 2**32 - 1
        self.parents = tuple(int(p) for p in parents)
        self.source = str(path)

        landmark_faces = landmark_bary = None
        if landmarks_path is not None:
            landmark_faces, landmark_bary = load_landmark_embedding(landmarks_path, len(faces))
        if world_scale is None or world_translation is None:
            if landmark_faces is None:
                raise ValueError(
                    f"{path}: give morphable.flame_landmarks_path (68-point embedding) or both morphable.world_scale "
                    "and morphable.world_translation, so FLAME can be placed in EG3D's world frame"
                )
            lms = (template[faces[landmark_faces]] * landmark_bary[..., None]).sum(1)
            world_scale, translation = fit_world_transform(template, lms)
        else:
            translation = np.asarray(world_translation, dtype=np.float64)
            if translation.shape != (3,) or not world_scale > 0:
                raise ValueError(f"world_scale={world_scale}, world_translation={world_translation}: expected > 0 and 3 numbers")
        mirror_map, self.mirror_error = mirror_map_by_matching(template)
        if landmark_faces is not None:
            lms = (template[faces[landmark_faces]] * landmark_bary[..., None]).sum(1)
            regions = regions_from_landmarks(template, lms)
        else:
            regions = np.full(num_vertices, REGION_SKIN)
        simplified_ids, simplified_faces = decimate(template, faces, target_faces_simplified)

        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
        i64 = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64)  # noqa: E731
        self.register_buffer("v_template", f32(template))
        self.register_buffer("shapedirs", f32(shapedirs[:, :, : self.n_shape]))
        self.register_buffer("exprdirs", f32(shapedirs[:, :, FLAME_SHAPE_COMPONENTS : FLAME_SHAPE_COMPONENTS + self.n_expr]))
        # (36, V*3) so pose features (B,36) map to per-vertex offsets, as in the official code.
        self.register_buffer("posedirs", f32(posedirs.reshape(-1, 36).T))
        self.register_buffer("joint_regressor", f32(regressor))
        self.register_buffer("skinning_weights", f32(weights))
        self.register_buffer("faces", i64(faces))
        self.register_buffer("mirror_map", i64(mirror_map))
        self.register_buffer("vertex_regions", i64(regions))
        self.register_buffer("simplified_vertex_ids", i64(simplified_ids))
        self.register_buffer("simplified_faces", i64(simplified_faces))
        self.register_buffer("world_scale", torch.tensor(float(world_scale)))
        self.register_buffer("world_translation", f32(translation))
        # Flip augmentation through mirror_map is only exact if the triangulation is symmetric too.
        self.mirror_topology_exact = mirror_preserves_faces(self.faces, self.mirror_map)
        if landmark_faces is not None:
            self.register_buffer("landmark_faces", i64(landmark_faces))
            self.register_buffer("landmark_bary", f32(landmark_bary))

    def _native_vertices(
        self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor,
        neck_pose: Optional[torch.Tensor] = None, eye_pose: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        batch = shape.shape[0]
        zeros3 = pose.new_zeros(batch, 3)
        if neck_pose is not None and tuple(neck_pose.shape) != (batch, 3):
            raise ValueError(f"neck_pose: expected shape ({batch},3), got {tuple(neck_pose.shape)}")
        if eye_pose is not None and tuple(eye_pose.shape) != (batch, 6):
            raise ValueError(f"eye_pose: expected shape ({batch},6), got {tuple(eye_pose.shape)}")
        full_pose = torch.cat(
            (pose[:, :3], zeros3 if neck_pose is None else neck_pose, pose[:, 3:],
             pose.new_zeros(batch, 6) if eye_pose is None else eye_pose), dim=1,
        ).reshape(batch, 5, 3)
        v_shaped = (
            self.v_template
            + torch.einsum("vcs,bs->bvc", self.shapedirs, shape)
            + torch.einsum("vce,be->bvc", self.exprdirs, expression)
        )
        joints = torch.einsum("jv,bvc->bjc", self.joint_regressor, v_shaped)
        rotations = axis_angle_to_matrix(full_pose)
        eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
        pose_feature = (rotations[:, 1:] - eye).reshape(batch, 36)
        v_posed = v_shaped + (pose_feature @ self.posedirs).reshape(batch, -1, 3)
        return linear_blend_skinning(v_posed, joints, rotations, self.parents, self.skinning_weights)
