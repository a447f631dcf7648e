"""Surface-field deformation (paper eq. 4-5): exact nearest-triangle search and the eq. 5 mapping."""

import math

import pytest
import torch
from pytorch3d.utils import ico_sphere

from clipportrait.geometry import cpu_search as CS
from clipportrait.geometry import deformation as D

LEVELS = [4, 8, 16]  # coarse enough for fast CPU tests; exactness does not depend on the levels


def _blobby_sphere(level: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A closed, non-convex head-sized mesh: an ico-sphere of radius 0.25 with smooth radial bumps."""
    mesh = ico_sphere(level)
    v, f = mesh.verts_packed(), mesh.faces_packed()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(4, 3, generator=g)
    bumps = sum(0.08 * torch.exp(-8 * (1 - v @ (d / d.norm()))) for d in dirs)
    return v * 0.25 * (1 + bumps)[:, None], f


def _points_near(verts: torch.Tensor, n: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = verts[torch.randint(verts.shape[0], (n,), generator=g)]
    return base + spread * torch.randn(n, 3, generator=g)


def _eq5_reference(x: torch.Tensor, t_obs: torch.Tensor, t_can: torch.Tensor) -> torch.Tensor:
    """Eq. 5 in float64 with barycentrics from a least-squares solve (independent of the module's
    closed form): x ~ a + v (b-a) + w (c-a) + s n projected on the plane of the triangle."""
    x, t_obs, t_can = x.double(), t_obs.double(), t_can.double()
    a, b, c = t_obs[:, 0], t_obs[:, 1], t_obs[:, 2]
    basis = torch.stack((b - a, c - a), dim=-1)  # (N,3,2)
    vw = torch.linalg.lstsq(basis, (x - a)[..., None]).solution[..., 0]
    bary = torch.cat((1 - vw.sum(-1, keepdim=True), vw), dim=-1)
    n_obs = torch.nn.functional.normalize(torch.linalg.cross(b - a, c - a, dim=-1), dim=-1)
    ca, cb, cc = t_can[:, 0], t_can[:, 1], t_can[:, 2]
    n_can = torch.nn.functional.normalize(torch.linalg.cross(cb - ca, cc - ca, dim=-1), dim=-1)
    proj = (bary[..., None] * t_obs).sum(1)
    offset = ((x - proj) * n_obs).sum(-1, keepdim=True)
    return (bary[..., None] * t_can).sum(1) + offset * n_can


def test_point_triangle_distance_matches_pytorch3d_and_sampling():
    """closest_point_barycentrics gives the exact distance: equal to pytorch3d's point-face kernel
    (an independent implementation) and never above a dense sampling of the triangle."""
    g = torch.Generator().manual_seed(1)
    p = torch.randn(400, 3, generator=g, dtype=torch.float64)
    tri = torch.randn(400, 3, 3, generator=g, dtype=torch.float64)
    bary = D.closest_point_barycentrics(p, tri[:, 0], tri[:, 1], tri[:, 2])
    assert (bary >= -1e-12).all() and torch.allclose(bary.sum(-1), torch.ones(400, dtype=torch.float64))
    ours = ((p - (bary[..., None] * tri).sum(1)) ** 2).sum(-1)
    import pytorch3d._C as p3d_c

    first = torch.zeros(1, dtype=torch.long)
    # One point vs one triangle at a time through pytorch3d: pair i with triangle i.
    p3d = torch.stack([
        p3d_c.point_face_dist_forward(p[i : i + 1].float(), first, tri[i : i + 1].float(), first, 1, 0.0)[0][0]
        for i in range(400)
    ])
    assert torch.allclose(ours.float(), p3d, rtol=1e-4, atol=1e-6)
    s = torch.linspace(0, 1, 41, dtype=torch.float64)
    vv, ww = torch.meshgrid(s, s, indexing="ij")
    ok = (vv + ww) <= 1
    samples_b = torch.stack((1 - vv[ok] - ww[ok], vv[ok], ww[ok]), -1)  # (S,3)
    sampled = (samples_b[None, :, :, None] * tri[:, None]).sum(2)  # (N,S,3)
    sampled_min = ((p[:, None] - sampled) ** 2).sum(-1).min(1).values
    assert (ours <= sampled_min + 1e-12).all()


def test_closest_point_of_degenerate_triangles_is_the_nearest_edge_point():
    """A degenerate triangle (collinear corners, either repeated corner, a single point) is the union of
    its edges: closest_point_barycentrics gives the float64 nearest edge point, with weights that sum
    to 1, and finite gradients (the mapping of eq. 5 differentiates through it)."""
    g = torch.Generator().manual_seed(5)
    n = 600
    a, d = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    cases = {"collinear": (a + d, a + 2.5 * d), "collinear, c between": (a + d, a + 0.4 * d),
             "a == b": (a.clone(), a + d), "b == c": (a + d, a + d), "a == c": (a + d, a.clone()),
             "a point": (a.clone(), a.clone())}
    for name, (b, c) in cases.items():
        p = torch.randn(n, 3, generator=g, dtype=torch.float64).requires_grad_()
        bary = D.closest_point_barycentrics(p, a, b, c)
        assert (bary >= 0).all() and torch.allclose(bary.sum(-1), torch.ones(n, dtype=torch.float64)), name
        got = (p - (bary[..., :1] * a + bary[..., 1:2] * b + bary[..., 2:] * c)).norm(dim=-1)
        to_edges = []
        for start, end in ((a, b), (b, c), (c, a)):
            edge = end - start
            t = ((p - start) * edge).sum(-1) / (edge * edge).sum(-1).clamp_min(1e-300)
            to_edges.append((p - start - t.clamp(0, 1)[:, None] * edge).norm(dim=-1))
        assert (got - torch.stack(to_edges).min(0).values).abs().max() < 1e-12, name
        (grad,) = torch.autograd.grad(got.sum(), p)
        assert torch.isfinite(grad).all(), name


def test_pair_distance_of_the_torch_search_matches_float64_reference():
    """The float32 pair distance of the PyTorch search (plane distance inside, nearest edge outside,
    from per-triangle constants) is the exact point-triangle distance: against the float64 closest
    point for regular triangles and nearly flat slivers, and against float64 segment distances for
    degenerate ones (collinear corners, a repeated corner, all corners equal: the nearest of the edges)."""
    g = torch.Generator().manual_seed(21)
    tri = torch.randn(3000, 3, 3, generator=g, dtype=torch.float64) * 0.05
    tri[:200, 2] = tri[:200, 0] + 0.7 * (tri[:200, 1] - tri[:200, 0])  # collinear
    tri[200:300, 2] = tri[200:300, 1]  # repeated corner (one zero-length edge)
    tri[300:350, 1:] = tri[300:350, :1]  # a point
    tri[350:450, 2] = tri[350:450, 0] + 0.5 * (tri[350:450, 1] - tri[350:450, 0]) + 1e-6  # sliver
    p = torch.randn(3000, 3, generator=g, dtype=torch.float64) * 0.05
    p[450:900] = tri[450:900].mean(1) + 1e-3 * torch.randn(450, 3, generator=g, dtype=torch.float64)  # near faces
    ours = D._pair_dist2(p.float().T.contiguous(), D._triangle_table(tri.float())).double().sqrt()
    assert torch.isfinite(ours).all()
    regular = D._point_triangle_dist2(p[350:], tri[350:]).sqrt()
    assert (ours[350:] - regular).abs().max() < 2e-6
    # A degenerate triangle is the union of its edges: nearest edge point in float64.
    to_edges = []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        start, edge = tri[:350, i], tri[:350, j] - tri[:350, i]
        t = ((p[:350] - start) * edge).sum(-1) / (edge * edge).sum(-1).clamp_min(1e-300)
        to_edges.append((p[:350] - start - t.clamp(0, 1)[:, None] * edge).norm(dim=-1))
    assert (ours[:350] - torch.stack(to_edges).min(0).values).abs().max() < 2e-6


@pytest.mark.parametrize("cpu_search", ["torch", "numba"])
def test_grid_search_is_exact_against_bruteforce(cpu_search):
    """On points near a bumpy closed mesh, the grid search's triangle is at the float64 brute-force
    minimum distance for >= 99.9 % of points (differing indices are exact ties at shared edges or
    vertices), it finds every point within shell + blend, and the mapped points agree with eq. 5
    evaluated on the brute-force triangle to 1e-5 wherever the indices agree; with the pair loops in
    PyTorch and compiled (numba)."""
    if cpu_search == "numba":
        pytest.importorskip("numba")
    verts, faces = _blobby_sphere(2)
    canon = verts * torch.tensor([1.1, 0.9, 1.0]) + torch.tensor([0.0, 0.02, 0.05])
    points = _points_near(verts, 3000, 0.06, seed=3)[None]
    cfg = D.DeformationConfig(shell=0.08, blend=0.04, grid_levels=LEVELS, backend="torch", cpu_search=cpu_search)
    assert isinstance(D.make_search(cfg, points.device), D._TorchSearch if cpu_search == "torch" else CS.NumbaSearch)
    module = D.SurfaceFieldDeformation(faces, cfg)
    out, info = module(points, verts[None], canon[None], return_info=True)
    bf_idx, bf_dist = D.nearest_triangle_bruteforce(points, verts[None], faces)
    reach = cfg.shell + cfg.blend
    within = bf_dist[0] <= reach
    assert (info.triangle[0][within] >= 0).all()
    tris64 = verts.double()[faces]
    chosen = info.triangle[0].clamp_min(0)
    p64 = points[0].double()
    our_d2 = D._point_triangle_dist2(p64, tris64[chosen])
    at_min = (our_d2.sqrt() - bf_dist[0]).abs() <= 1e-6
    assert at_min[within].float().mean() >= 0.999
    same = within & (info.triangle[0] == bf_idx[0]) & (bf_dist[0] <= cfg.shell)
    assert same.float().mean() > 0.8
    ref = _eq5_reference(p64[same], tris64[bf_idx[0][same]], canon.double()[faces][bf_idx[0][same]])
    assert torch.allclose(out[0][same].double(), ref, atol=1e-5)
    assert torch.allclose(info.distance[0][same].double(), bf_dist[0][same], atol=1e-6)


@pytest.mark.skipif(not CS.available(), reason="numba is not installed")
def test_numba_search_builds_the_torch_search_candidate_lists():
    """Every cell's candidate list of the whole grid (each level refined from its parent by `select`)
    and every point's nearest candidate (`nearest`) are the same with the compiled loops as with the
    PyTorch ones, on two meshes at once: same rule, same list order, same tie-breaking (first in list)."""
    verts, faces = _blobby_sphere(2)
    tris = torch.stack((verts, verts * 0.9 + 0.03))[:, faces]
    csr_torch = D.build_candidate_grid(tris, 0.12, [2, 4, 8], D._TorchSearch(1 << 20))
    csr_numba = D.build_candidate_grid(tris, 0.12, [2, 4, 8], CS.NumbaSearch())
    assert torch.equal(csr_numba.offsets, csr_torch.offsets)
    assert torch.equal(csr_numba.tris, csr_torch.tris)
    assert csr_torch.tris.numel() > 0
    points = torch.stack((_points_near(verts, 800, 0.06, seed=7), _points_near(verts * 0.9 + 0.03, 800, 0.06, seed=8)))
    tri_t, d2_t = D.grid_nearest(points, tris, 0.12, [2, 4, 8], D._TorchSearch(1 << 20))
    tri_n, d2_n = D.grid_nearest(points, tris, 0.12, [2, 4, 8], CS.NumbaSearch())
    assert torch.allclose(d2_n, d2_t, rtol=1e-6, atol=1e-9)
    # Differing indices are exact ties (shared edges and vertices) that float32 rounding splits:
    # both triangles are at the same float64 distance.
    found = tri_t >= 0
    assert torch.equal(tri_n >= 0, found) and found.float().mean() > 0.5
    tris64 = tris.double()
    for b in range(2):
        p64, chosen = points[b].double()[found[b]], [t[b][found[b]] for t in (tri_n, tri_t)]
        d_n, d_t = (D._point_triangle_dist2(p64, tris64[b][c]).sqrt() for c in chosen)
        assert (d_n - d_t).abs().max() < 1e-6
    assert (tri_n == tri_t).float().mean() > 0.9
    with pytest.raises(ValueError, match="cpu_search='gpu'"):
        D.DeformationConfig(cpu_search="gpu").validate()


_FORK_CHECK = r"""
import multiprocessing as mp, sys, torch
sys.path.insert(0, sys.argv[1])
from clipportrait.geometry import cpu_search as CS, deformation as D
from test_deformation import _blobby_sphere, _points_near
torch.set_num_threads(2)
v, f = _blobby_sphere(1)
D.grid_nearest(_points_near(v, 400, 0.05, 1)[None], v[None][:, f], 0.1, [2, 4], CS.NumbaSearch())
def child(queue):
    x = torch.rand(32, 3, 64, 64)
    queue.put(float(torch.nn.functional.interpolate(x, size=(160, 160), mode="bilinear").sum()))
ctx = mp.get_context("fork")
queue = ctx.Queue()
proc = ctx.Process(target=child, args=(queue,))
proc.start()
print("child result", queue.get(timeout=60))
proc.join()
"""


@pytest.mark.skipif(not CS.available(), reason="numba is not installed")
def test_processes_forked_after_the_numba_search_do_not_hang():
    """DataLoader workers and DDP ranks are forked from processes that ran the search: with numba's
    GNU OpenMP threading layer a forked child hung in torch's next parallel op (a DDP test did);
    the search uses numba's own pool, so a forked child's parallel torch op finishes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    done = subprocess.run([sys.executable, "-c", _FORK_CHECK, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "child result" in done.stdout, done.stderr[-2000:]


def test_identity_when_observation_equals_canonical():
    """obs = canon maps every point within the shell to itself with projection='plane'; with
    'closest' this still holds where the projection falls inside the triangle."""
    verts, faces = _blobby_sphere(2, seed=4)
    points = _points_near(verts, 1500, 0.05, seed=5)[None]
    for projection in ("plane", "closest"):
        cfg = D.DeformationConfig(shell=0.1, blend=0.05, grid_levels=LEVELS, backend="torch", projection=projection)
        out, info = D.SurfaceFieldDeformation(faces, cfg)(points, verts[None], verts[None], return_info=True)
        assert info.inside.float().mean() > 0.9
        mask = info.inside[0] if projection == "plane" else info.inside[0] & (info.barycentrics[0] > 1e-4).all(-1)
        assert mask.sum() > 200
        assert torch.allclose(out[0][mask], points[0][mask], atol=2e-6)


def test_rigid_motion_of_the_mesh_is_reproduced():
    """If the observation mesh is a rotated + translated canonical mesh, D inverts that motion for
    points inside the shell: D(R x_c + t) = x_c (plane projection)."""
    verts, faces = _blobby_sphere(2, seed=6)
    angle = 0.4
    R = torch.tensor([[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]])
    t = torch.tensor([0.03, -0.05, 0.1])
    obs = verts @ R.T + t
    canon_points = _points_near(verts, 1000, 0.04, seed=7)
    obs_points = (canon_points @ R.T + t)[None]
    cfg = D.DeformationConfig(shell=0.1, blend=0.05, grid_levels=LEVELS, backend="torch")
    out, info = D.SurfaceFieldDeformation(faces, cfg)(obs_points, obs[None], verts[None], return_info=True)
    assert torch.allclose(out[0][info.inside[0]], canon_points[info.inside[0]], atol=5e-6)


def test_small_mesh_changes_give_small_output_changes():
    """Perturbing the observation vertices by 1e-4 moves mapped points by O(1e-4) wherever the
    nearest triangle stays the same (no amplification by the mapping)."""
    verts, faces = _blobby_sphere(2, seed=8)
    canon = verts * 1.05
    points = _points_near(verts, 1000, 0.04, seed=9)[None]
    module = D.SurfaceFieldDeformation(faces, D.DeformationConfig(grid_levels=LEVELS, backend="torch"))
    out0, info0 = module(points, verts[None], canon[None], return_info=True)
    g = torch.Generator().manual_seed(10)
    out1, info1 = module(points, (verts + 1e-4 * torch.randn(verts.shape, generator=g))[None], canon[None], return_info=True)
    same = info0.triangle == info1.triangle
    assert same.float().mean() > 0.95
    assert (out1 - out0)[same].norm(dim=-1).max() < 2e-3


def test_rigid_fallback_beyond_shell_and_smooth_blend():
    """Points beyond shell + blend get exactly the fallback transform; weight is 1 inside the shell,
    0 beyond the band and strictly between inside the band, decreasing with distance."""
    verts, faces = _blobby_sphere(1, seed=11)
    canon = verts + torch.tensor([0.0, 0.0, 0.1])
    direction = torch.nn.functional.normalize(torch.randn(200, 3, generator=torch.Generator().manual_seed(12)), dim=-1)
    radii = torch.linspace(0.3, 0.6, 200)
    points = (direction * radii[:, None])[None]
    cfg = D.DeformationConfig(shell=0.05, blend=0.05, grid_levels=LEVELS, backend="torch")
    shift = torch.eye(4)
    shift[:3, 3] = torch.tensor([0.0, 0.0, 0.1])
    out, info = D.SurfaceFieldDeformation(faces, cfg)(points, verts[None], canon[None], fallback=shift[None], return_info=True)
    _, bf_dist = D.nearest_triangle_bruteforce(points, verts[None], faces)
    far = bf_dist[0] > 0.1 + 1e-6
    assert far.sum() > 10
    assert torch.equal(out[0][far], points[0][far] + torch.tensor([0.0, 0.0, 0.1]))
    assert (info.weight[0][far] == 0).all()
    near = bf_dist[0] < 0.05 - 1e-6
    assert (info.weight[0][near] == 1).all()
    band = ~far & ~near
    assert ((info.weight[0][band] > 0) & (info.weight[0][band] < 1)).float().mean() > 0.9
    w = D._smooth_weight(torch.linspace(0, 0.2, 101), 0.05, 0.05)
    assert (w[1:] <= w[:-1]).all() and w[0] == 1 and w[-1] == 0


def test_gradcheck_float64():
    """Gradients of eq. 5 w.r.t. points and observation vertices match finite differences (float64,
    a tetrahedron, points well inside Voronoi regions so the triangle choice is locally constant)."""
    verts = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.3]], dtype=torch.float64)
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    canon = verts * torch.tensor([1.2, 0.9, 1.1], dtype=torch.float64)
    points = torch.tensor([[[0.07, 0.06, -0.04], [0.12, 0.1, 0.11], [0.05, -0.03, 0.08]]], dtype=torch.float64)
    cfg = D.DeformationConfig(shell=0.1, blend=0.1, grid_levels=[2, 4], backend="torch")
    module = D.SurfaceFieldDeformation(faces, cfg)

    def fn(p, v):
        return module(p, v, canon[None])

    assert torch.autograd.gradcheck(fn, (points.requires_grad_(), verts[None].clone().requires_grad_()), eps=1e-7, atol=1e-6)


def test_batched_matches_single_and_canon_broadcast():
    """A batch of 2 different meshes with a shared (1,V,3) canonical mesh equals two separate calls."""
    v1, faces = _blobby_sphere(1, seed=13)
    v2, _ = _blobby_sphere(1, seed=14)
    canon = v1 * 0.95
    pts = torch.stack((_points_near(v1, 300, 0.05, 15), _points_near(v2, 300, 0.05, 16)))
    module = D.SurfaceFieldDeformation(faces, D.DeformationConfig(grid_levels=LEVELS, backend="torch"))
    batched = module(pts, torch.stack((v1, v2)), canon[None])
    assert torch.allclose(batched[0], module(pts[:1], v1[None], canon[None])[0], atol=1e-6)
    assert torch.allclose(batched[1], module(pts[1:], v2[None], canon[None])[0], atol=1e-6)


def test_disabled_and_bad_input():
    """enabled=False returns the (fallback-transformed) input; malformed shapes/configs raise ValueError."""
    verts, faces = _blobby_sphere(1)
    pts = torch.randn(1, 10, 3) * 0.3
    off = D.SurfaceFieldDeformation(faces, D.DeformationConfig(enabled=False))
    assert torch.equal(off(pts, verts[None], verts[None]), pts)
    module = D.SurfaceFieldDeformation(faces, D.DeformationConfig(grid_levels=LEVELS))
    with pytest.raises(ValueError, match="points"):
        module(pts[0], verts[None], verts[None])
    with pytest.raises(ValueError, match="canon_verts"):
        module(pts, verts[None], verts[None, :-1])
    with pytest.raises(ValueError, match="grid_levels"):
        D.DeformationConfig(grid_levels=[4, 6]).validate()
    with pytest.raises(ValueError, match="faces"):
        D.SurfaceFieldDeformation(faces.float())


_TRITON_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from clipportrait.geometry import deformation as D
from test_deformation import _blobby_sphere, _points_near
# The interpreter's cost is per program and op: few, wide programs (the CUDA test covers the real ones).
D._QUERY_LAUNCH = (256, 4)
D._refine_launch = lambda n_cells: (64, 32)
v, f = _blobby_sphere(1)
tris = v[None][:, f]
csr = D.build_candidate_grid(tris, 0.12, [2, 4], D._TorchSearch(1 << 20))
capacity = 20
fixed = D.build_fixed_grid(tris, 0.12, [2, 4], capacity)
fitting = overflowed = 0
for cell in range(64):
    want = csr.tris[csr.offsets[cell] : csr.offsets[cell + 1]].tolist()
    got = fixed.pool[fixed.starts[cell] : fixed.starts[cell] + fixed.counts[cell]].tolist()
    if len(want) <= capacity:
        fitting += 1
        assert got == want, cell  # same candidates, same (ascending) order
    else:
        overflowed += 1
        assert set(want) <= set(got) and len(got) > capacity, cell
assert fitting > 0 and overflowed > 0
# Seeds: each finest cell's candidate nearest to its centre (-1 without candidates); spheres hold their triangles.
res = fixed.res
ijk = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
centres = (fixed.lo[0] + (ijk + 0.5) * fixed.size[0] / res).double()
tris_all = tris[0].double()
for cell in range(res**3):
    cands = fixed.pool[fixed.starts[cell] : fixed.starts[cell] + fixed.counts[cell]].long()
    seed = int(fixed.seeds[cell])
    if len(cands) == 0:
        assert seed == -1, cell
        continue
    d = D._point_triangle_dist2(centres[cell], tris_all[cands]).sqrt()
    assert seed in cands.tolist() and D._point_triangle_dist2(centres[cell], tris_all[seed]).sqrt() <= d.min() + 1e-6, cell
spheres = fixed.spheres.double()
assert ((tris_all - spheres[:, None, :3]).norm(dim=-1) <= spheres[:, None, 3]).all()
canon = v * torch.tensor([1.1, 0.9, 1.0]) + 0.02
pts = _points_near(v, 150, 0.06, 1)[None]
shift = torch.eye(4)
shift[:3, 3] = torch.tensor([0.01, -0.02, 0.03])
tris64 = v.double()[f]
# plane + points-only gradient: the Triton backward kernel; closest: the PyTorch backward.
for projection, capacity, fallback in (("plane", 512, shift[None]), ("closest", 6, None)):
    kw = dict(shell=0.08, blend=0.04, grid_levels=[2, 4], projection=projection)
    torch_mod = D.SurfaceFieldDeformation(f, D.DeformationConfig(backend="torch", **kw))
    fused_mod = D.SurfaceFieldDeformation(f, D.DeformationConfig(backend="triton", grid_capacity=capacity, **kw))
    p_t = pts.clone().requires_grad_()
    p_k = pts.clone().requires_grad_()
    out_t, info = torch_mod(p_t, v[None], canon[None], fallback=fallback, return_info=True)
    out_k = fused_mod(p_k, v[None], canon[None], fallback=fallback)
    _, idx = D.triton_deform(pts, tris, canon[None][:, f], fallback, fused_mod.cfg)
    idx = idx.long()
    assert torch.equal(idx < 0, info.triangle < 0)
    found = idx[0] >= 0
    # Differing indices must be exact ties: the kernel's triangle is at the torch search's distance.
    d_kernel = D._point_triangle_dist2(pts[0].double(), tris64[idx[0].clamp_min(0)]).sqrt()
    assert ((d_kernel - info.distance[0].double()).abs()[found] < 1e-6).all()
    same = idx == info.triangle
    assert same.float().mean() > 0.9
    assert torch.allclose(out_k[same], out_t[same], atol=1e-5)
    assert torch.equal(out_k[idx < 0], out_t[idx < 0])
    # Backward of the fused path (on the kernel's triangles) equals the torch path's.
    weights = torch.randn(out_t.shape, generator=torch.Generator().manual_seed(2))
    (g_t,) = torch.autograd.grad((out_t * weights).sum(), p_t)
    (g_k,) = torch.autograd.grad((out_k * weights).sum(), p_k)
    assert torch.allclose(g_k[same], g_t[same], atol=1e-5)
    # Bound to the meshes: the grid is built once for several calls, with the unbound results.
    builds = []
    plain_build = D.build_fixed_grid
    D.build_fixed_grid = lambda *a: builds.append(1) or plain_build(*a)
    bound = fused_mod.bind(v[None], canon[None], fallback)
    first, second = bound(pts), bound(pts[:, :40])
    D.build_fixed_grid = plain_build
    assert len(builds) == 1
    unbound = fused_mod(pts, v[None], canon[None], fallback=fallback)
    assert torch.equal(first, unbound) and torch.equal(second, unbound[:, :40])
print("ok")
"""


@pytest.mark.slow(seconds=18)
def test_triton_kernels_match_torch_search_in_interpreter():
    """The Triton kernels (run by Triton's CPU interpreter): the fixed-capacity grid lists exactly the
    PyTorch grid's candidates in each cell that fits its capacity and a superset in each that
    overflows; the fused search + eq. 5 kernel picks triangles at the same distance as the PyTorch
    path (indices equal up to exact ties), maps points identically (1e-5, both projections, with and
    without a fallback, with and without overflow) and its backward (the Triton points-gradient kernel
    for the plane projection, PyTorch for 'closest') gives the PyTorch path's gradients; a deformation
    bound to its meshes builds the grid once for several calls and returns the unbound results; each
    finest cell's search seed is its candidate nearest to its centre, and the bounding spheres that let
    the search skip candidates hold their triangles."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _TRITON_CHECK, str(Path(__file__).parent)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")
def test_cuda_backends_are_exact_against_bruteforce():
    """On CUDA, the fused Triton path (ample and tiny grid capacity, the latter overflowing into parent
    lists) and the PyTorch path all find a triangle at the float64 brute-force minimum distance for
    >= 99.9 % of points within reach, map points identically (1e-5) and give the same point gradients
    (1e-4) wherever they chose the same triangle (elsewhere they picked different triangles of an exact tie)."""
    verts, faces = _blobby_sphere(3)
    canon = verts * torch.tensor([1.1, 0.9, 1.0]) + torch.tensor([0.0, 0.02, 0.05])
    points = torch.stack([_points_near(verts, 20000, 0.06, seed=s) for s in (5, 6)])
    bf_idx, bf_dist = D.nearest_triangle_bruteforce(points, verts[None].expand(2, -1, -1), faces)
    tris64 = verts.double()[faces]
    weights = torch.randn(points.shape, generator=torch.Generator().manual_seed(7)).cuda()
    outs = {}
    for name, backend, capacity in (("triton", "triton", 256), ("triton-overflow", "triton", 8), ("torch", "torch", 256)):
        cfg = D.DeformationConfig(shell=0.08, blend=0.04, backend=backend, grid_capacity=capacity)
        module = D.SurfaceFieldDeformation(faces.cuda(), cfg)
        p = points.cuda().requires_grad_()
        out = module(p, verts[None].expand(2, -1, -1).cuda(), canon[None].cuda())
        (grad,) = torch.autograd.grad((out * weights).sum(), p)
        _, info = module(points.cuda(), verts[None].expand(2, -1, -1).cuda(), canon[None].cuda(), return_info=True)
        within = bf_dist <= cfg.shell + cfg.blend
        assert torch.equal((info.triangle.cpu() >= 0)[within], torch.ones_like(within)[within]), name
        chosen = info.triangle.cpu().clamp_min(0)
        d = D._point_triangle_dist2(points.double().reshape(-1, 3), tris64[chosen.reshape(-1)]).sqrt().reshape(2, -1)
        assert ((d - bf_dist).abs() <= 1e-5)[within].float().mean() >= 0.999, name
        outs[name] = out.detach().cpu(), info.triangle.cpu(), grad.cpu()
    for name in ("triton", "triton-overflow"):
        same = outs[name][1] == outs["torch"][1]
        # Both pick a brute-force-nearest triangle (checked above); at exact ties (points nearest to a
        # shared vertex or edge) float32 rounding of each implementation decides which.
        assert same.float().mean() > 0.95, name
        assert torch.allclose(outs[name][0][same], outs["torch"][0][same], atol=1e-5), name
        assert torch.allclose(outs[name][2][same], outs["torch"][2][same], atol=1e-4), name
