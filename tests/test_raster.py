"""The vectorised rasteriser of clipportrait.data.raster against pytorch3d's MeshRasterizer."""

import pytest
import torch
from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
from pytorch3d.structures import Meshes
from pytorch3d.utils import ico_sphere

from clipportrait.geometry.raster import rasterize
from clipportrait.geometry.cameras import sample_ffhq_like, to_pytorch3d_cameras


def _scene(batch: int = 3):
    sphere = ico_sphere(3)
    base = sphere.verts_packed() * 0.3
    g = torch.Generator().manual_seed(0)
    # Different bumpy spheres per item so depth ordering and silhouettes vary.
    verts = base[None] * (1 + 0.15 * torch.rand(batch, base.shape[0], 1, generator=g)) + torch.tensor([0.0, 0.0, 0.1])
    return verts, sphere.faces_packed(), sample_ffhq_like(batch, g)


@pytest.mark.parametrize("size", [24, 40])
def test_matches_pytorch3d(size):
    """Same visible face at every pixel (>= 99.5%, ties on shared edges may differ), barycentrics
    within 1e-3 where faces agree, and depth equal to pytorch3d's z-buffer."""
    verts, faces, labels = _scene()
    face_index, bary, depth = rasterize(verts, faces, labels, size)
    raster = MeshRasterizer(
        cameras=to_pytorch3d_cameras(labels, size), raster_settings=RasterizationSettings(image_size=size, faces_per_pixel=1)
    )
    frags = raster(Meshes(verts, faces[None].expand(len(verts), -1, -1)))
    ref = frags.pix_to_face[..., 0]
    ref = torch.where(ref >= 0, ref % faces.shape[0], ref)
    assert ((ref >= 0) == (face_index >= 0)).float().mean() > 0.995
    same = (ref == face_index) & (ref >= 0)
    assert same.float().sum() / (ref >= 0).float().sum() > 0.995
    assert torch.allclose(bary[same], frags.bary_coords[..., 0, :][same], atol=1e-3)
    assert torch.allclose(depth[same], frags.zbuf[..., 0][same], atol=1e-4)
    assert (depth[face_index < 0] == -1).all()


def test_hand_computed_triangle():
    """A frontal triangle covering the image centre: the centre pixel's depth is the plane's
    depth at the optical axis, and a triangle collapsed to a point covers nothing."""
    labels = sample_ffhq_like(1, torch.Generator().manual_seed(0), yaw_std=0.0, pitch_std=0.0)
    # The frontal camera sits at (0, 0, 2.7 + 0.2) looking at (0, 0, 0.2): a plane at z = 0.2 is at depth 2.7.
    verts = torch.tensor([[[-0.3, -0.3, 0.2], [0.3, -0.3, 0.2], [0.0, 0.3, 0.2], [0.0, 0.0, 0.5], [0.0, 0.0, 0.5], [0.0, 0.0, 0.5]]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    face_index, _, depth = rasterize(verts, faces, labels, 16)
    assert face_index[0, 8, 8] == 0 and abs(float(depth[0, 8, 8]) - 2.7) < 1e-4
    assert not (face_index == 1).any()


def test_rejects_bad_shapes():
    """Wrong vertex/face shapes are errors naming the argument."""
    with pytest.raises(ValueError, match="vertices"):
        rasterize(torch.zeros(4, 3), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 25), 8)
    with pytest.raises(ValueError, match="faces"):
        rasterize(torch.zeros(1, 4, 3), torch.zeros(3, dtype=torch.long), torch.zeros(1, 25), 8)


def test_backface_culling():
    """On a closed outward-wound mesh, culling back faces changes nothing; with the winding reversed
    culling removes the near side instead, so the far (inner) side shows: same coverage, larger depth."""
    verts, faces, labels = _scene()
    plain, _, plain_depth = rasterize(verts, faces, labels, 24)
    cull = torch.ones(len(faces), dtype=torch.bool)
    culled, _, _ = rasterize(verts, faces, labels, 24, cull)
    assert torch.equal(plain, culled)
    inner, _, inner_depth = rasterize(verts, faces[:, [0, 2, 1]], labels, 24, cull)
    covered = plain >= 0
    assert torch.equal(inner >= 0, covered)
    assert (inner_depth[covered] > plain_depth[covered] + 0.05).float().mean() > 0.9
