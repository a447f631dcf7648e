"""Mesh render for discriminator conditioning ("rdr", paper sec. 3.2 after eq. 5): the observation
mesh rasterised under the sample's camera, coloured by vertex WORLD coordinates, plus a coverage mask.

Rasterisation is the project's scan-converting z-buffer (``geometry.raster``, tested against
pytorch3d) on every device: on CPU pytorch3d's kernel tests every face against every pixel (~0.3 s per
32^2 image of the 10k-face head), and on an H100 the Stage-1 benchmark's rdr phase (32 heads at 512^2
plus the raw image) takes 20 ms with the scan converter against 136 ms with pytorch3d's binned one.
pytorch3d's ``MeshRasterizer`` stays available through ``bin_size`` (0: naive, > 0: binned) as the
reference the tests compare with. Cameras are converted from EG3D labels (``to_pytorch3d_cameras``).
Image row 0 is the top of the image and column 0 the left, as in OpenCV and ``project_points``.
Attributes are interpolated with perspective-correct barycentrics, so a covered pixel's colour is the
world position of the surface point seen through that pixel's centre.
"""

from __future__ import annotations

import torch

from clipportrait.geometry.cameras import split_labels, to_pytorch3d_cameras

def render_vertex_coords(
    verts: torch.Tensor,
    faces: torch.Tensor,
    labels: torch.Tensor,
    resolution: int,
    bin_size: int | None = None,
    max_faces_per_bin: int | None = None,
) -> torch.Tensor:
    """Render meshes (B,V,3) sharing ``faces`` (F,3) under camera labels (B,25) at resolution^2.

    Returns (B,4,H,W): channels 0-2 = interpolated world xyz of the visible surface, channel 3 =
    coverage mask (1 covered, 0 background); background pixels are 0 in all channels.
    ``bin_size`` selects pytorch3d's rasteriser instead of the project's (0: naive; > 0: binned, CUDA
    only, with ``max_faces_per_bin`` defaulting to room for every face so bins never overflow).
    """
    from pytorch3d.ops import interpolate_face_attributes
    from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
    from pytorch3d.structures import Meshes

    if verts.dim() != 3 or verts.shape[-1] != 3:
        raise ValueError(f"verts: expected shape (B,V,3), got {tuple(verts.shape)}")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces: expected shape (F,3), got {tuple(faces.shape)}")
    if resolution < 1:
        raise ValueError(f"resolution={resolution}: expected a positive integer")
    split_labels(labels)  # validates shape and finiteness
    if labels.shape[0] != verts.shape[0]:
        raise ValueError(f"labels batch {labels.shape[0]} != verts batch {verts.shape[0]}")
    batch = verts.shape[0]
    faces = faces.to(device=verts.device, dtype=torch.long)
    if bin_size is None:
        from clipportrait.geometry.raster import rasterize

        face_index, bary, _ = rasterize(verts, faces, labels.to(verts.dtype), resolution)
        mask = (face_index >= 0).to(verts.dtype)
        corners = verts[torch.arange(batch, device=verts.device)[:, None, None, None], faces[face_index.clamp_min(0)]]
        xyz = (bary[..., None] * corners).sum(-2) * mask[..., None]  # (B,H,W,3)
        return torch.cat((xyz, mask[..., None]), dim=-1).permute(0, 3, 1, 2).contiguous()
    if verts.device.type != "cuda":
        bin_size = 0  # pytorch3d implements binning only on CUDA
    if max_faces_per_bin is None:
        max_faces_per_bin = faces.shape[0]
    settings = RasterizationSettings(
        image_size=resolution,
        blur_radius=0.0,
        faces_per_pixel=1,
        bin_size=bin_size,
        max_faces_per_bin=max_faces_per_bin,
        perspective_correct=True,
        cull_backfaces=False,
    )
    cameras = to_pytorch3d_cameras(labels.to(verts.dtype), resolution)
    meshes = Meshes(verts=verts, faces=faces[None].expand(batch, -1, -1))
    fragments = MeshRasterizer(cameras=cameras, raster_settings=settings)(meshes)
    face_xyz = meshes.verts_packed()[meshes.faces_packed()]  # (B*F,3,3)
    xyz = interpolate_face_attributes(fragments.pix_to_face, fragments.bary_coords, face_xyz)[..., 0, :]
    mask = (fragments.pix_to_face[..., 0] >= 0).to(verts.dtype)
    xyz = xyz * mask[..., None]
    return torch.cat((xyz, mask[..., None]), dim=-1).permute(0, 3, 1, 2).contiguous()
