"""Procedural head: topology, symmetry, skinning, modes, landmarks, regions, framing, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipportrait.geometry.cameras import neutral_labels, project_points
from clipportrait.geometry.morphable import REGION_NAMES, ProceduralHead
from clipportrait.geometry.morphable.base import axis_angle_to_matrix, ibug68_mirror_permutation, mirror_preserves_faces
from clipportrait.geometry.morphable.config import MorphableConfig, build_morphable
from clipportrait.geometry.morphable.procedural import build_procedural_template

MIRROR = torch.tensor([-1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def head() -> ProceduralHead:
    return ProceduralHead(seed=0)


def _neutral(model: ProceduralHead) -> torch.Tensor:
    p = model.zero_params()
    return model(p.shape, p.expression, p.pose)


def _signed_volume(verts: torch.Tensor, faces: torch.Tensor) -> float:
    tri = verts.double()[faces]
    return float(torch.linalg.det(tri).sum() / 6.0)


def assert_closed_oriented_sphere(faces: np.ndarray, num_vertices: int) -> None:
    """Every undirected edge in exactly 2 faces, every directed edge once (consistent winding),
    every vertex used, Euler characteristic V - E + F = 2."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, directed_counts = np.unique(directed, axis=0, return_counts=True)
    assert directed_counts.max() == 1, "a directed edge appears twice: inconsistent orientation"
    undirected, counts = np.unique(np.sort(directed, axis=1), axis=0, return_counts=True)
    assert (counts == 2).all(), "an edge is not shared by exactly two faces"
    assert len(np.unique(faces)) == num_vertices
    assert num_vertices - len(undirected) + len(faces) == 2


def test_generation_is_deterministic_and_seed_changes_only_the_modes():
    """Two builds from one seed are bitwise equal; another seed changes the random identity modes
    but keeps the template geometry and topology."""
    build_procedural_template.cache_clear()
    a = build_procedural_template(3)
    build_procedural_template.cache_clear()
    b = build_procedural_template(3)
    c = build_procedural_template(4)
    for name in ("vertices", "faces", "shapedirs", "exprdirs", "skinning_weights", "landmark_indices", "regions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.vertices, c.vertices)
    assert np.abs(a.shapedirs[..., 20:] - c.shapedirs[..., 20:]).max() > 1e-4


def test_full_and_simplified_meshes_are_closed_spheres_with_outward_normals(head):
    """Full and simplified meshes are closed, consistently oriented genus-0 manifolds whose signed
    volume is positive (normals point outward); the simplified mesh has about 2,500 faces built on a
    subset of the full mesh's vertices and is simplified identically for any parameters."""
    faces = head.faces.numpy()
    assert_closed_oriented_sphere(faces, head.num_vertices)
    assert 4500 <= head.num_vertices <= 5500 and 9000 <= len(faces) <= 11000
    verts = _neutral(head)
    assert _signed_volume(verts[0], head.faces) > 0
    ids = head.simplified_vertex_ids
    assert len(torch.unique(ids)) == len(ids) and ids.max() < head.num_vertices
    sfaces = head.simplified_faces.numpy()
    assert abs(len(sfaces) - 2500) <= 250
    assert_closed_oriented_sphere(sfaces, len(ids))
    params = head.sample_params(2, torch.Generator().manual_seed(1))
    posed = head(*params)
    simple = head.simplify(posed)
    torch.testing.assert_close(simple, posed[:, ids])
    volume_full, volume_simple = _signed_volume(posed[0], head.faces), _signed_volume(simple[0], head.simplified_faces)
    assert 0.85 * volume_full < volume_simple <= volume_full * 1.001


def test_mirror_map_is_an_exact_involution_preserving_faces_and_orientation(head):
    """mirror_map is an involution; the neutral template equals its own mirror image exactly; the
    face list maps onto itself with reversed winding; a mirrored posed mesh keeps the same faces and
    positive volume; and it equals the model evaluated at the mirrored parameters."""
    m = head.mirror_map
    torch.testing.assert_close(m[m], torch.arange(head.num_vertices))
    verts = _neutral(head)
    assert (head.mirror(verts) - verts).abs().max() == 0
    faces = head.faces.numpy()
    mapped = m.numpy()[faces][:, [0, 2, 1]]  # mirrored triangle, winding reversed
    canon = lambda f: {tuple(np.roll(t, -int(np.argmin(t)))) for t in f}  # noqa: E731
    assert canon(mapped) == canon(faces)
    assert mirror_preserves_faces(head.faces, m)
    assert not mirror_preserves_faces(head.faces[:, [0, 2, 1]], torch.arange(head.num_vertices))
    gen = torch.Generator().manual_seed(5)
    params = head.sample_params(1, gen)
    posed = head(*params)
    mirrored = head.mirror(posed)
    assert _signed_volume(mirrored[0], head.faces) == pytest.approx(_signed_volume(posed[0], head.faces), rel=1e-4)
    # Mirrored parameters reproduce the mirrored mesh; both kinds of identity mode occur.
    expected = head(*head.mirror_parameters(params))
    assert (expected - mirrored).abs().max() < 1e-5
    mirrored_dirs = head.shapedirs[m] * MIRROR[None, :, None]
    assert set(torch.sign((mirrored_dirs * head.shapedirs).sum((0, 1))).tolist()) == {1.0, -1.0}


def test_identity_modes_are_orthogonal_smooth_with_decreasing_std(head):
    """Identity modes are mutually orthogonal in R^{3V}, their RMS vertex motion decreases with the
    index, and they are exactly symmetric or antisymmetric under the mirror."""
    modes = head.shapedirs.double().reshape(-1, 100)
    gram = modes.T @ modes
    norms = gram.diagonal().sqrt()
    cos = gram / (norms[:, None] * norms[None])
    assert (cos - torch.eye(100, dtype=torch.float64)).abs().max() < 1e-4
    assert (norms[1:] < norms[:-1]).all()
    m = head.mirror_map
    mirrored = head.shapedirs[m] * MIRROR[None, :, None]
    sym = (mirrored - head.shapedirs).abs().amax((0, 1))
    anti = (mirrored + head.shapedirs).abs().amax((0, 1))
    assert (torch.minimum(sym, anti) < 1e-7).all()
    # Smooth: far less rough than per-vertex noise on the same mesh.
    noise = torch.randn(head.num_vertices, 3, 1, generator=torch.Generator().manual_seed(0))
    assert (_roughness(head, head.shapedirs) < 0.15 * _roughness(head, noise)).all()
    assert (_roughness(head, head.exprdirs) < 0.15 * _roughness(head, noise)).all()


def _roughness(model: ProceduralHead, fields: torch.Tensor) -> torch.Tensor:
    """Per field (V,3,K): 99th percentile over edges of |d_i - d_j| / |x_i - x_j|, over max |d|."""
    e = torch.cat([model.faces[:, [0, 1]], model.faces[:, [1, 2]], model.faces[:, [2, 0]]])
    length = (model.v_template[e[:, 0]] - model.v_template[e[:, 1]]).norm(dim=1)
    slope = (fields[e[:, 0]] - fields[e[:, 1]]).norm(dim=1) / length[:, None]
    return torch.quantile(slope, 0.99, dim=0) / fields.norm(dim=1).amax(0)


def test_jaw_opening_moves_chin_down_and_back_and_leaves_crown_fixed(head):
    """Opening the jaw (positive x rotation) moves the chin landmark down and back, the lower lip
    down, leaves the crown and the upper face exactly in place, and changes vertices smoothly."""
    p = head.zero_params()
    closed = head(p.shape, p.expression, p.pose)
    pose = p.pose.clone()
    pose[:, 3] = 0.3
    opened = head(p.shape, p.expression, pose)
    lm_c, lm_o = head.landmarks(closed)[0], head.landmarks(opened)[0]
    assert lm_o[8, 1] < lm_c[8, 1] - 0.02 and lm_o[8, 2] < lm_c[8, 2]
    assert lm_o[57, 1] < lm_c[57, 1] - 0.01
    assert (lm_o[27:31] - lm_c[27:31]).abs().max() == 0  # nose
    crown = closed[0, :, 1] > 0.1
    assert crown.sum() > 50 and (opened[0, crown] - closed[0, crown]).abs().max() == 0
    assert (opened - closed).norm(dim=-1).max() < 0.2


def test_global_pose_rotates_the_whole_mesh_about_the_root_joint(head):
    """The global axis-angle rotates every vertex rigidly about the root joint (independent check
    with Rodrigues' matrix applied to the rest mesh), in world units."""
    p = head.zero_params()
    rest = head(p.shape, p.expression, p.pose)
    aa = torch.tensor([[0.2, -0.3, 0.1]])
    pose = torch.cat((aa, torch.zeros(1, 3)), 1)
    rotated = head(p.shape, p.expression, pose)
    joint = (head.joint_regressor[0] @ head.v_template) * head.world_scale + head.world_translation
    R = axis_angle_to_matrix(aa)[0]
    expected = (rest[0] - joint) @ R.T + joint
    torch.testing.assert_close(rotated[0], expected, atol=1e-5, rtol=0)


def test_expression_modes_are_local(head):
    """Every expression mode leaves the crown, the ears and the neck exactly unchanged, and moves
    only a small part of the mesh; mouth modes do not move the eyes and eye modes not the lips."""
    moved = head.exprdirs.norm(dim=1) > 0  # (V,50)
    regions = head.vertex_regions
    crown = head.v_template[:, 1] > 0.09
    for label in (REGION_NAMES.index("ears"), REGION_NAMES.index("neck")):
        assert not moved[regions == label].any()
    assert not moved[crown].any()
    assert (moved.float().mean(0) < 0.05).all()
    eyes, lips = regions == REGION_NAMES.index("eyes"), regions == REGION_NAMES.index("lips")
    smile = head.expression_names.index("smile_left")
    close = head.expression_names.index("eyelid_close_left")
    assert moved[lips, smile].any() and not moved[eyes, smile].any()
    assert moved[eyes, close].any() and not moved[lips, close].any()


def test_landmarks_follow_ibug_layout(head):
    """Landmarks sit on the face in iBUG-68 order: nose tip is the most forward, mirror pairs are
    exact mirror images, index 0..16 runs from world -x (image left) to +x along the jaw, brows
    above eyes above nose tip above mouth above chin, and each lands in the matching region."""
    lm = head.landmarks(_neutral(head))[0]
    assert int(lm[:, 2].argmax()) == 30 or lm[30, 2] == lm[:, 2].max()
    perm = ibug68_mirror_permutation()
    torch.testing.assert_close(lm[perm] * MIRROR, lm, atol=0, rtol=0)
    assert (lm[1:9, 0] > lm[:8, 0]).all() and lm[0, 0] < -0.1 and lm[8, 0] == 0
    assert lm[36, 0] < lm[39, 0] < 0 < lm[42, 0] < lm[45, 0]
    y = lambda idx: lm[idx, 1].mean()  # noqa: E731
    assert y(list(range(17, 27))) > y(list(range(36, 48))) > lm[30, 1] > y(list(range(48, 60))) > lm[8, 1]
    region = lambda i: REGION_NAMES[int(head.vertex_regions[head.landmark_indices[i]])]  # noqa: E731
    assert {region(i) for i in (30, 33)} == {"nose"}
    assert {region(i) for i in range(36, 48)} == {"eyes"}
    assert {region(i) for i in (51, 57, 62, 66)} == {"lips"}


def test_regions_cover_the_named_parts(head):
    """Every region of the name table except the mouth interior labels some vertices; the scalp is
    on top, the neck at the bottom."""
    counts = torch.bincount(head.vertex_regions, minlength=len(REGION_NAMES))
    for i, name in enumerate(REGION_NAMES):
        assert (counts[i] > 0) == (name != "mouth_interior"), name
    v = head.v_template
    assert head.vertex_regions[int(v[:, 1].argmax())] == REGION_NAMES.index("scalp")
    assert head.vertex_regions[int(v[:, 1].argmin())] == REGION_NAMES.index("neck")


def test_neutral_frontal_projection_frames_like_ffhq(head):
    """Seen by the neutral camera the head lies inside the image, the crown near the top edge, the
    chin in the lower fifth, the face centred; the nose tip lands on the pixel given by the pinhole
    formula u = 0.5 + f x / d, v = 0.5 - f y / d with d = 2.9 - z (camera at z = 2.9 looking at -z)."""
    verts = _neutral(head)
    labels = neutral_labels()
    uv, depth = project_points(verts, labels)
    head_part = verts[0, :, 1] > -0.25
    assert (uv[0, head_part] > 0).all() and (uv[0, head_part] < 1).all() and (depth > 0).all()
    assert uv[0, :, 1].min() < 0.12
    lm = head.landmarks(verts)
    uv_lm, _ = project_points(lm, labels)
    assert 0.8 <= uv_lm[0, 8, 1] <= 0.95
    assert abs(uv_lm[0, 30, 0] - 0.5) < 1e-6 and 0.4 < uv_lm[0, 30, 1] < 0.6
    x, y, z = lm[0, 30].double().tolist()
    d = 2.9 - z
    assert uv_lm[0, 30, 0].item() == pytest.approx(0.5 + 4.2647 * x / d, abs=1e-5)
    assert uv_lm[0, 30, 1].item() == pytest.approx(0.5 - 4.2647 * y / d, abs=1e-5)
    box = verts[0, head_part].abs().max()
    assert box < 0.5  # inside the tri-plane box


def test_forward_validates_inputs(head):
    """Wrong shapes or non-finite values raise ValueError naming the argument and expected shape."""
    p = head.zero_params(2)
    with pytest.raises(ValueError, match=r"expression: expected shape \(2,50\), got \(2, 49\)"):
        head(p.shape, p.expression[:, :49], p.pose)
    with pytest.raises(ValueError, match=r"shape: expected shape \(B,100\)"):
        head(p.shape[0], p.expression, p.pose)
    bad = p.pose.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="pose: contains non-finite"):
        head(p.shape, p.expression, bad)
    with pytest.raises(ValueError, match="vertices: expected shape"):
        head.landmarks(torch.zeros(1, 10, 3))


def test_canonical_mesh_has_the_configured_open_jaw_and_sampling_is_reproducible():
    """canonical_vertices uses beta = psi = 0 and the config's jaw angle; sample_params is
    reproducible from a generator and respects jaw_max."""
    model = build_morphable(MorphableConfig(canonical_jaw_angle=0.2))
    p = model.zero_params()
    pose = torch.zeros(1, 6)
    pose[0, 3] = 0.2
    torch.testing.assert_close(model.canonical_vertices(), model(p.shape, p.expression, pose))
    a = model.sample_params(8, torch.Generator().manual_seed(0), jaw_max=0.25)
    b = model.sample_params(8, torch.Generator().manual_seed(0), jaw_max=0.25)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert (a.pose[:, 3] >= 0).all() and (a.pose[:, 3] <= 0.25).all() and (a.pose[:, :3] == 0).all()


def test_build_morphable_reports_bad_configs(tmp_path):
    """Unknown kinds, missing FLAME files (with where to get FLAME), FLAME-only overrides on the
    procedural head and an implausible jaw angle give errors naming the value."""
    with pytest.raises(ValueError, match="kind='bfm'"):
        build_morphable(MorphableConfig(kind="bfm"))
    with pytest.raises(FileNotFoundError, match="flame.is.tue.mpg.de"):
        build_morphable(MorphableConfig(kind="flame"))
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        build_morphable(MorphableConfig(kind="flame", flame_path=str(tmp_path / "nope.pkl")))
    with pytest.raises(ValueError, match="FLAME only"):
        build_morphable(MorphableConfig(world_scale=2.0))
    with pytest.raises(ValueError, match="canonical_jaw_angle=3.0"):
        build_morphable(MorphableConfig(canonical_jaw_angle=3.0))


def test_buffers_follow_the_module_to_another_dtype(head):
    """All arrays are buffers: .double() converts the float ones and the forward pass follows."""
    model = ProceduralHead(seed=0).double()
    p = model.zero_params()
    out = model(p.shape.double(), p.expression.double(), p.pose.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), _neutral(head))
