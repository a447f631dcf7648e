"""A vectorised z-buffer rasteriser in PyTorch, for rendering many small meshes fast on CPU.

pytorch3d bins faces into tiles only on CUDA; its CPU kernel tests every face against every pixel
at ~90 ns per test, about 0.3-2.4 s for one 128x128 image of the 10k-face head on one core. The
synthetic data generator needs ~0.1 s per image, so it scan-converts with tensors instead: every face
is expanded into the pixel centres inside its screen bounding box (a few per face at these sizes),
each (face, pixel) candidate gets edge-function barycentrics and a depth, and the nearest candidate
per pixel wins (scatter-min). Conventions match pytorch3d's `MeshRasterizer` under
`geometry.cameras.to_pytorch3d_cameras` (pixel centres at (j + 0.5, i + 0.5), perspective-correct
barycentrics, no backface culling); the tests compare the two.
"""

from __future__ import annotations

import torch

from .cameras import project_points


def rasterize(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    labels: torch.Tensor,
    image_size: int,
    cull_backfaces: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rasterise meshes that share one face list under EG3D cameras.

    Args:
        vertices: (B,V,3) world coordinates.
        faces: (F,3) vertex indices shared by all meshes; zero-area faces cover no pixel, so parts
            of a mesh can be switched off per item by collapsing their vertices onto one point.
        labels: (B,25) EG3D camera labels.
        image_size: output images are image_size x image_size.
        cull_backfaces: optional (F,) bool: these faces are skipped when their right-hand normal
            (v1 - v0) x (v2 - v0) points away from the camera (safe for closed, outward-wound meshes;
            halves the work there).

    Returns:
        face_index (B,H,W) int64: row of ``faces`` visible at each pixel centre, -1 for background;
        bary (B,H,W,3): perspective-correct barycentric coordinates of the pixel centre in that face
        (zeros for background);
        depth (B,H,W): camera-space depth of the visible surface (-1 for background).
    """
    if vertices.dim() != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices: expected (B,V,3), got {tuple(vertices.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces: expected (F,3), got {tuple(faces.shape)}")
    if image_size < 1:
        raise ValueError(f"image_size={image_size}: expected a positive integer")
    batch, size = vertices.shape[0], image_size
    device, dtype = vertices.device, vertices.dtype
    uv, depth = project_points(vertices, labels)  # uv in [0,1]^2, x right / y down
    corners = (uv * size)[:, faces]  # (B,F,3,2) pixel units
    corner_depth = depth[:, faces]  # (B,F,3)
    # Pixel-centre index ranges covered by each face's bounding box.
    col_lo = torch.ceil(corners[..., 0].amin(-1) - 0.5).clamp(0, size).long()
    col_hi = torch.floor(corners[..., 0].amax(-1) - 0.5).clamp(-1, size - 1).long()
    row_lo = torch.ceil(corners[..., 1].amin(-1) - 0.5).clamp(0, size).long()
    row_hi = torch.floor(corners[..., 1].amax(-1) - 0.5).clamp(-1, size - 1).long()
    width = (col_hi - col_lo + 1).clamp_min(0)
    height = (row_hi - row_lo + 1).clamp_min(0)
    keep = (corner_depth > 0).all(-1)  # faces behind the camera are skipped
    if cull_backfaces is not None:
        tri = vertices[:, faces]  # (B,F,3,3)
        normal = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
        eye = labels[:, :16].reshape(-1, 4, 4)[:, None, :3, 3]  # camera centres (B,1,3)
        facing = (normal * (eye - tri[:, :, 0])).sum(-1) > 0
        keep &= facing | ~cull_backfaces.to(device)
    count = width * height * keep
    b_idx, f_idx = count.nonzero(as_tuple=True)
    per_face = count[b_idx, f_idx]
    owner = torch.repeat_interleave(torch.arange(len(b_idx), device=device), per_face)
    offset = torch.arange(len(owner), device=device) - (torch.cumsum(per_face, 0) - per_face)[owner]
    b, f = b_idx[owner], f_idx[owner]
    w = width[b, f]
    col = col_lo[b, f] + offset % w
    row = row_lo[b, f] + offset // w
    # Edge functions of the pixel centre against the three edges (screen space).
    p = torch.stack((col.to(dtype) + 0.5, row.to(dtype) + 0.5), -1)  # (P,2)
    tri = corners[b, f]  # (P,3,2)
    v0, v1, v2 = tri.unbind(1)

    def edge(a: torch.Tensor, c: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (c[:, 0] - a[:, 0]) * (q[:, 1] - a[:, 1]) - (c[:, 1] - a[:, 1]) * (q[:, 0] - a[:, 0])

    area = edge(v0, v1, v2)
    lam = torch.stack((edge(v1, v2, p), edge(v2, v0, p), edge(v0, v1, p)), -1) / torch.where(
        area == 0, torch.ones_like(area), area
    )[:, None]
    inside = (lam >= 0).all(-1) & (area != 0)
    lam, b, f, row, col = lam[inside], b[inside], f[inside], row[inside], col[inside]
    # Perspective-correct interpolation: weights lam_k / z_k renormalised; depth is their harmonic mean.
    inv_z = lam / corner_depth[b, f]
    inv_depth = inv_z.sum(-1)
    bary_p = inv_z / inv_depth[:, None]
    z = 1.0 / inv_depth
    pixel = (b * size + row) * size + col
    num_pixels = batch * size * size
    nearest = torch.full((num_pixels,), float("inf"), device=device, dtype=dtype)
    nearest = nearest.scatter_reduce(0, pixel, z, reduce="amin")
    # Among candidates at the minimum depth (shared edges), keep the last one deterministically.
    candidate = torch.arange(len(pixel), device=device)
    at_min = z <= nearest[pixel]
    winner = torch.full((num_pixels,), -1, device=device, dtype=torch.long)
    winner = winner.scatter_reduce(0, pixel[at_min], candidate[at_min], reduce="amax")
    hit = winner >= 0
    chosen = winner.clamp_min(0)
    face_index = torch.where(hit, f[chosen] if len(f) else winner, winner)
    bary = torch.where(hit[:, None], bary_p[chosen] if len(f) else 0.0, torch.zeros(num_pixels, 3, device=device, dtype=dtype))
    out_depth = torch.where(hit, nearest, torch.full_like(nearest, -1.0))
    return (
        face_index.reshape(batch, size, size),
        bary.reshape(batch, size, size, 3),
        out_depth.reshape(batch, size, size),
    )
