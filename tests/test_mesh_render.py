"""Discriminator mesh render: world-coordinate colours under EG3D cameras, analytic silhouettes."""

import pytest
import torch
from pytorch3d.utils import ico_sphere

from clipportrait.geometry import cameras as C
from clipportrait.geometry.mesh_render import render_vertex_coords


def _sphere(level: int = 3, radius: float = 0.3, centre=(0.05, -0.02, 0.2)):
    mesh = ico_sphere(level)
    return mesh.verts_packed() * radius + torch.tensor(centre), mesh.faces_packed()


def _labels(batch: int) -> torch.Tensor:
    return C.sample_ffhq_like(batch, generator=torch.Generator().manual_seed(0), yaw_std=0.5)


def test_colours_are_world_points_seen_through_pixel_centres():
    """Every covered pixel's colour is a 3D point that projects onto that pixel's centre (EG3D camera,
    row 0 = top) and lies on the visible (camera-facing) side of the sphere mesh."""
    verts, faces = _sphere()
    labels = _labels(2)
    res = 48
    out = render_vertex_coords(verts.expand(2, -1, -1), faces, labels, res)
    assert out.shape == (2, 4, res, res)
    for b in range(2):
        mask = out[b, 3] > 0
        rows, cols = mask.nonzero(as_tuple=True)
        xyz = out[b, :3, rows, cols].T
        uv, _ = C.project_points(xyz[None], labels[b : b + 1])
        centres = torch.stack(((cols + 0.5) / res, (rows + 0.5) / res), dim=-1).float()
        assert (uv[0] - centres).abs().max() < 1e-3
        # On the surface: between the inscribed and circumscribed spheres of the mesh.
        r = (xyz - torch.tensor([0.05, -0.02, 0.2])).norm(dim=-1)
        assert r.max() <= 0.3 + 1e-5 and r.min() >= 0.29
        # Facing the camera: the front hemisphere as seen from the camera origin.
        origin = C.split_labels(labels[b : b + 1])[0][0, :3, 3]
        normal = (xyz - torch.tensor([0.05, -0.02, 0.2])) / r[:, None]
        assert ((origin - xyz) * normal).sum(-1).min() > -1e-2
        assert (out[b, :3][:, ~mask] == 0).all()


def test_vertex_colour_at_its_projected_pixel():
    """At a front-facing vertex's projected pixel the colour equals the vertex coordinates to within
    the pixel footprint (128^2 image, ~0.005 world units per pixel at the sphere)."""
    verts, faces = _sphere(level=2, radius=0.2)
    labels = C.neutral_labels()
    res = 128
    out = render_vertex_coords(verts[None], faces, labels, res)
    uv, _ = C.project_points(verts[None], labels)
    front = verts[:, 2] > 0.2 + 0.1  # well inside the visible cap of the frontal view
    assert front.sum() > 10 and (uv[0][front] > 0).all() and (uv[0][front] < 1).all()
    pix = (uv[0][front] * res).floor().long()
    colours = out[0, :3, pix[:, 1], pix[:, 0]].T
    assert (out[0, 3, pix[:, 1], pix[:, 0]] == 1).all()
    assert (colours - verts[front]).norm(dim=-1).max() < 0.01


def test_mask_matches_analytic_sphere_silhouette():
    """Pixels whose centre ray hits the mesh's inscribed sphere are covered; pixels whose ray misses
    the circumscribed sphere are background (exact bounds of the polyhedral silhouette)."""
    centre = torch.tensor([0.05, -0.02, 0.2])
    verts, faces = _sphere(level=3)
    tris = verts[faces]
    normals = torch.nn.functional.normalize(torch.linalg.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0], dim=-1), dim=-1)
    inner = ((tris[:, 0] - centre) * normals).sum(-1).abs().min()
    labels = _labels(3)
    res = 64
    mask = render_vertex_coords(verts.expand(3, -1, -1), faces, labels, res)[:, 3]
    origins, dirs = C.ray_bundle(labels, res)
    to_c = centre - origins
    along = (to_c * dirs).sum(-1)
    ray_dist = (to_c - along[..., None] * dirs).norm(dim=-1).reshape(3, res, res)
    assert (mask[ray_dist < inner - 1e-4] == 1).all()
    assert (mask[ray_dist > 0.3 + 1e-4] == 0).all()
    assert mask.sum() > 0.1 * mask.numel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pytorch3d bins faces only on CUDA")
def test_cuda_renders_agree_with_pytorch3d_naive_and_binned():
    """On CUDA the project's scan converter (the default) and pytorch3d's coarse-to-fine (binned)
    rasteriser both give pytorch3d's naive render: coverage up to edge pixels, same coordinates."""
    verts, faces = _sphere(level=4)
    labels = _labels(4).cuda()
    verts = verts.cuda().expand(4, -1, -1)
    naive = render_vertex_coords(verts, faces, labels, 256, bin_size=0)
    # pytorch3d's two kernels share their arithmetic; the scan converter interpolates in its own
    # (float32 rounding: 1e-4, as on CPU in the test below).
    for other, atol in ((render_vertex_coords(verts, faces, labels, 256, bin_size=32), 1e-5),
                        (render_vertex_coords(verts, faces, labels, 256), 1e-4)):
        assert (naive[:, 3] != other[:, 3]).float().mean() < 1e-3
        err = float((naive * other[:, 3:] - other * naive[:, 3:]).abs().max())
        assert err < atol, err


def test_cpu_scan_converter_agrees_with_pytorch3d():
    """On CPU the project's z-buffer renders what pytorch3d's rasteriser (bin_size=0) renders: the
    same coverage up to edge pixels and the same world coordinates where both cover a pixel."""
    from clipportrait.geometry.morphable.procedural import ProceduralHead

    head = ProceduralHead(seed=0)
    params = head.sample_params(3, generator=torch.Generator().manual_seed(1))
    verts = head(params.shape, params.expression, params.pose)
    labels = _labels(3)
    ours = render_vertex_coords(verts, head.faces, labels, 48)
    ref = render_vertex_coords(verts, head.faces, labels, 48, bin_size=0)
    assert ref[:, 3].mean() > 0.1
    assert (ours[:, 3] != ref[:, 3]).float().mean() < 5e-3
    both = (ours[:, 3:] * ref[:, 3:]).bool().expand(-1, 3, -1, -1)
    assert torch.allclose(ours[:, :3][both], ref[:, :3][both], atol=1e-4)


def test_bad_input():
    """Malformed verts/labels raise ValueError naming the argument."""
    verts, faces = _sphere(level=1)
    labels = _labels(1)
    with pytest.raises(ValueError, match="verts"):
        render_vertex_coords(verts, faces, labels, 64)
    with pytest.raises(ValueError, match="labels"):
        render_vertex_coords(verts[None], faces, labels[:, :20], 64)
