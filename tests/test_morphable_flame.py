"""FLAME loader (restricted unpickling, chumpy, LBS) and the vertex-subset decimation."""

from __future__ import annotations

import importlib
import pickle
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial.transform import Rotation

from clipportrait.geometry.morphable.base import linear_blend_skinning
from clipportrait.geometry.morphable.config import MorphableConfig, build_morphable
from clipportrait.geometry.morphable.flame import FRAMING_CHIN_Y, FRAMING_NOSE_TIP_Z, FlameModel
from clipportrait.geometry.morphable.procedural import grid_faces
from clipportrait.geometry.morphable.safe_pickle import UnsafePickleError, load_model_pickle
from clipportrait.geometry.morphable.simplify import decimate

RINGS, COLUMNS = 10, 16


def _sphere_head() -> tuple[np.ndarray, np.ndarray]:
    """A mirror-symmetric lat-long sphere (radius 0.1 m, slightly elongated) with outward faces."""
    alpha = np.linspace(0, np.pi, RINGS + 2)[1:-1]
    phi = 2 * np.pi * np.arange(COLUMNS) / COLUMNS
    ring = np.stack(
        (np.outer(np.sin(alpha), np.sin(phi)), np.repeat(np.cos(alpha)[:, None], COLUMNS, 1) * 1.2, np.outer(np.sin(alpha), np.cos(phi))),
        -1,
    ).reshape(-1, 3)
    verts = np.concatenate(([[0, 1.2, 0]], ring, [[0, -1.2, 0]])) * 0.1
    verts[np.abs(verts) < 1e-12] = 0.0
    return verts, grid_faces(RINGS, COLUMNS)


def _flame_dict(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    verts, faces = _sphere_head()
    v = len(verts)
    regressor = np.zeros((5, v))
    regressor[0, -COLUMNS - 1 : -1] = 1.0 / COLUMNS  # root: bottom ring centre
    regressor[1, -2 * COLUMNS - 1 : -COLUMNS - 1] = 1.0 / COLUMNS
    regressor[2, 1 + 6 * COLUMNS : 1 + 7 * COLUMNS] = 1.0 / COLUMNS  # jaw
    regressor[3, 1 + 3 * COLUMNS + 2] = 1.0
    regressor[4, 1 + 3 * COLUMNS + COLUMNS - 2] = 1.0
    weights = rng.dirichlet(np.ones(5) * 0.5, size=v)
    return {
        "v_template": verts,
        "f": faces.astype(np.uint32),
        "shapedirs": rng.normal(scale=1e-3, size=(v, 3, 400)),
        "posedirs": rng.normal(scale=1e-3, size=(v, 3, 36)),
        "J_regressor": sp.csc_matrix(regressor),
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "bs_style": "lbs",
    }


def _landmark_file(tmp_path, num_faces: int) -> str:
    """DECA-style embedding: 68 faces chosen so that landmark 8 is low, 30 forward, 36/45 apart."""
    verts, faces = _sphere_head()
    centres = verts[faces].mean(1)
    targets = np.zeros((68, 3))
    targets[:, :] = (0.0, 0.0, 0.1)
    targets[0:17] = np.stack((np.linspace(-0.08, 0.08, 17), -0.06 - 0.04 * np.cos(np.linspace(-1.5, 1.5, 17)), np.full(17, 0.05)), 1)
    targets[36], targets[45] = (-0.04, 0.03, 0.09), (0.04, 0.03, 0.09)
    targets[30] = (0.0, 0.0, 0.1)
    idx = np.argmin(np.linalg.norm(centres[None] - targets[:, None], axis=-1), axis=1)
    path = tmp_path / "landmark_embedding.npy"
    np.save(path, {"full_lmk_faces_idx": idx[None], "full_lmk_bary_coords": np.full((1, 68, 3), 1 / 3)}, allow_pickle=True)
    return str(path)


def _write(tmp_path, name: str, obj, protocol: int = 2) -> str:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return str(path)


@pytest.fixture
def flame(tmp_path) -> FlameModel:
    return FlameModel(
        _write(tmp_path, "generic_model.pkl", _flame_dict()), landmarks_path=_landmark_file(tmp_path, 320),
        target_faces_simplified=120,
    )


def test_lbs_matches_a_hand_built_two_joint_chain():
    """Root at the origin, child at (1,0,0) rotated 90 degrees about z: a vertex at (2,0,0) bound to
    the child goes to (1,1,0); one bound half/half goes to the average; a root rotation carries the
    child along."""
    joints = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0]]])
    verts = torch.tensor([[[2.0, 0, 0], [2.0, 0, 0], [0.5, 0, 0]]])
    weights = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    rz90 = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    rot = torch.stack((torch.eye(3), rz90))[None]
    out = linear_blend_skinning(verts, joints, rot, (-1, 0), weights)
    torch.testing.assert_close(out[0], torch.tensor([[1.0, 1, 0], [1.5, 0.5, 0], [0.5, 0, 0]]))
    rot_root = torch.stack((rz90, torch.eye(3)))[None]
    out = linear_blend_skinning(verts, joints, rot_root, (-1, 0), weights)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 2, 0], [0.0, 2, 0], [0.0, 0.5, 0]]))


def test_plain_pickle_loads_and_jaw_lbs_matches_independent_numpy(flame, tmp_path):
    """A FLAME-format pickle of numpy/scipy arrays loads; with only the jaw rotated, every vertex
    equals the float64 numpy computation (1 - w_jaw) v_p + w_jaw (R (v_p - J_jaw) + J_jaw), where
    v_p includes shape, expression and the pose correctives."""
    data = _flame_dict()
    rng = np.random.default_rng(1)
    beta, psi = rng.normal(size=100), rng.normal(size=50)
    jaw = np.array([0.3, 0.05, -0.02])
    v_shaped = data["v_template"] + data["shapedirs"][..., :100] @ beta + data["shapedirs"][..., 300:350] @ psi
    joints = data["J_regressor"].toarray() @ v_shaped
    R = Rotation.from_rotvec(jaw).as_matrix()
    pose_feature = np.concatenate([np.zeros(9), (R - np.eye(3)).ravel(), np.zeros(18)])
    v_posed = v_shaped + data["posedirs"] @ pose_feature
    w = data["weights"][:, 2:3]
    expected_native = (1 - w) * v_posed + w * ((v_posed - joints[2]) @ R.T + joints[2])
    pose = torch.tensor([[0, 0, 0, *jaw]], dtype=torch.float32)
    out = flame(torch.tensor(beta[None], dtype=torch.float32), torch.tensor(psi[None], dtype=torch.float32), pose)
    expected = expected_native * flame.world_scale.item() + flame.world_translation.numpy()
    np.testing.assert_allclose(out[0].numpy(), expected, atol=2e-6)


def test_global_pose_rotates_the_rest_mesh_about_the_root(flame):
    """Rotating by the global pose equals rotating the unposed mesh about the root joint."""
    p = flame.zero_params()
    rest = flame(p.shape, p.expression, p.pose)
    aa = torch.tensor([[0.1, 0.4, -0.2]])
    rotated = flame(p.shape, p.expression, torch.cat((aa, torch.zeros(1, 3)), 1))
    root = (flame.joint_regressor[0] @ flame.v_template) * flame.world_scale + flame.world_translation
    R = torch.tensor(Rotation.from_rotvec(aa[0].double().numpy()).as_matrix(), dtype=torch.float32)
    torch.testing.assert_close(rotated[0], (rest[0] - root) @ R.T + root, atol=1e-6, rtol=0)


def test_chumpy_pickle_loads_without_importing_chumpy(tmp_path):
    """Arrays wrapped in a chumpy.ch.Ch (a throwaway fake package) load as the same numpy arrays,
    and loading never imports the chumpy module."""
    package = tmp_path / "fakepkgs" / "chumpy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ch.py").write_text("class Ch:\n    def __init__(self, x):\n        self.x = x\n")
    sys.path.insert(0, str(tmp_path / "fakepkgs"))
    try:
        ch = importlib.import_module("chumpy.ch")
        data = _flame_dict()
        data["shapedirs"] = ch.Ch(data["shapedirs"])
        data["v_template"] = ch.Ch(data["v_template"])
        path = _write(tmp_path, "chumpy_model.pkl", data)
    finally:
        sys.path.remove(str(tmp_path / "fakepkgs"))
        for name in ("chumpy.ch", "chumpy"):
            sys.modules.pop(name, None)
    assert "chumpy" not in sys.modules
    loaded = load_model_pickle(path)
    assert "chumpy" not in sys.modules and "chumpy.ch" not in sys.modules
    plain = _flame_dict()
    np.testing.assert_array_equal(loaded["shapedirs"], plain["shapedirs"])
    np.testing.assert_array_equal(loaded["J_regressor"].toarray(), plain["J_regressor"].toarray())
    model = FlameModel(path, world_scale=2.0, world_translation=(0, 0, 0), target_faces_simplified=120)
    np.testing.assert_allclose(model.v_template.numpy(), plain["v_template"], rtol=1e-6)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_with_the_global_and_file_named(tmp_path):
    """A pickle whose reduce calls os.system is refused (UnsafePickleError naming the global and
    the file) and the command never runs; so is any other class."""
    marker = tmp_path / "pwned"
    path = _write(tmp_path, "evil.pkl", {"v_template": _Evil(str(marker))})
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*(posix|os|nt)\.system"):
        load_model_pickle(path)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=r"collections\.OrderedDict"):
        import collections

        load_model_pickle(_write(tmp_path, "odict.pkl", collections.OrderedDict(a=1)))
    with pytest.raises(UnsafePickleError):
        build_morphable(MorphableConfig(kind="flame", flame_path=path))


def test_bad_flame_files_get_clear_errors(tmp_path):
    """Missing keys, wrong shapes and too few expression components name the file and the key."""
    data = _flame_dict()
    del data["posedirs"]
    with pytest.raises(ValueError, match=r"missing keys \['posedirs'\]"):
        FlameModel(_write(tmp_path, "a.pkl", data), world_scale=1.0, world_translation=(0, 0, 0))
    data = _flame_dict()
    data["shapedirs"] = data["shapedirs"][..., :320]
    with pytest.raises(ValueError, match=r"b\.pkl: shapedirs has 320 components"):
        FlameModel(_write(tmp_path, "b.pkl", data), world_scale=1.0, world_translation=(0, 0, 0))
    with pytest.raises(ValueError, match="flame_landmarks_path"):
        FlameModel(_write(tmp_path, "c.pkl", _flame_dict()))


def test_flame_world_transform_landmarks_mirror_and_simplification(flame):
    """Landmarks put the neutral mesh in the shared framing (chin y, nose z, chin-to-crown 0.5);
    the mirror map of a symmetric template is an exact involution; the simplified mesh is a closed
    vertex subset with about the requested face count; canonical pose opens the jaw."""
    p = flame.zero_params()
    verts = flame(p.shape, p.expression, p.pose)
    lm = flame.landmarks(verts)[0]
    assert lm[8, 1].item() == pytest.approx(FRAMING_CHIN_Y, abs=1e-5)
    assert lm[30, 2].item() == pytest.approx(FRAMING_NOSE_TIP_Z, abs=1e-5)
    assert (verts[0, :, 1].max() - lm[8, 1]).item() == pytest.approx(0.5, abs=1e-5)
    assert flame.mirror_error < 1e-9 and flame.mirror_topology_exact
    torch.testing.assert_close(flame.mirror_map[flame.mirror_map], torch.arange(flame.num_vertices))
    assert abs(len(flame.simplified_faces) - 120) <= 2
    assert flame.canonical_pose()[0, 3].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"eye_pose: expected shape \(1,6\)"):
        flame(p.shape, p.expression, p.pose, eye_pose=torch.zeros(1, 3))


def test_decimation_keeps_a_closed_oriented_vertex_subset_and_the_volume():
    """Decimating a closed sphere keeps only original vertices, reaches the target face count,
    stays a closed consistently oriented genus-0 mesh and keeps the enclosed volume within 10%;
    on an open grid every boundary vertex survives."""
    from test_morphable_procedural import assert_closed_oriented_sphere

    rings, columns = 24, 32
    alpha = np.linspace(0, np.pi, rings + 2)[1:-1]
    phi = 2 * np.pi * np.arange(columns) / columns
    ring = np.stack((np.outer(np.sin(alpha), np.sin(phi)), np.repeat(np.cos(alpha)[:, None], columns, 1), np.outer(np.sin(alpha), np.cos(phi))), -1)
    verts = np.concatenate(([[0, 1, 0]], ring.reshape(-1, 3), [[0, -1, 0]]))
    faces = grid_faces(rings, columns)
    ids, sfaces = decimate(verts, faces, 400)
    assert len(sfaces) == 400 and len(np.unique(ids)) == len(ids)
    assert_closed_oriented_sphere(sfaces, len(ids))
    volume = lambda v, f: np.linalg.det(v[f]).sum() / 6  # noqa: E731
    assert 0.9 * volume(verts, faces) < volume(verts[ids], sfaces) <= volume(verts, faces)
    # Open grid: boundary kept.
    n = 12
    gx, gy = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float))
    grid = np.stack((gx.ravel(), gy.ravel(), 0.01 * np.sin(gx.ravel() + gy.ravel())), 1)
    quads = [(i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1) for i in range(n - 1) for j in range(n - 1)]
    tris = np.array([t for a, b, c, d in quads for t in ((a, b, c), (b, d, c))])
    ids, sfaces = decimate(grid, tris, 80)
    boundary = {i for i in range(n * n) if grid[i, 0] in (0, n - 1) or grid[i, 1] in (0, n - 1)}
    assert boundary <= set(ids.tolist()) and len(sfaces) <= 84
