"""Render a morphable head with its landmarks (pytorch3d, Lambertian shading) for a visual check.

    python -m clipportrait.geometry.morphable.preview --out /tmp/clipportrait_head

writes ``frontal.png``, ``yaw30.png`` (neutral, landmarks in red), ``expression.png`` (random
parameters, jaw open), ``regions.png`` (vertex regions) and ``simplified.png``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from ..cameras import intrinsics, lookat_cam2world, make_labels, project_points, to_pytorch3d_cameras
from .base import MorphableModel

_REGION_COLOURS = np.array(
    [[0.85, 0.68, 0.58], [0.35, 0.22, 0.12], [0.25, 0.15, 0.1], [0.95, 0.95, 1.0], [0.8, 0.3, 0.35],
     [0.4, 0.05, 0.05], [0.9, 0.6, 0.5], [0.95, 0.55, 0.5], [0.75, 0.6, 0.5]], dtype=np.float32,
)


def render_mesh(
    vertices: torch.Tensor, faces: torch.Tensor, labels: torch.Tensor, colours: torch.Tensor | None = None, size: int = 256
) -> np.ndarray:
    """Render one mesh (V,3) under camera ``labels`` (1,25): (size,size,3) uint8 with head-light shading."""
    from pytorch3d.renderer import MeshRasterizer, RasterizationSettings

    cameras = to_pytorch3d_cameras(labels, size)
    from pytorch3d.structures import Meshes

    mesh = Meshes(verts=[vertices], faces=[faces])
    raster = MeshRasterizer(cameras=cameras, raster_settings=RasterizationSettings(image_size=size, faces_per_pixel=1))
    fragments = raster(mesh)
    face_idx = fragments.pix_to_face[0, ..., 0]
    hit = face_idx >= 0
    # Smooth (Phong-interpolated) vertex normals and colours, lit by a light at the camera.
    bary = fragments.bary_coords[0, ..., 0, :][hit]  # (P,3)
    corners = faces[face_idx[hit]]  # (P,3)
    normals = (mesh.verts_normals_packed()[corners] * bary[..., None]).sum(1)
    points = (vertices[corners] * bary[..., None]).sum(1)
    cam_pos = labels[0, :16].reshape(4, 4)[:3, 3]
    to_cam = torch.nn.functional.normalize(cam_pos - points, dim=-1)
    shade = (torch.nn.functional.normalize(normals, dim=-1) * to_cam).sum(-1).clamp(0, 1) * 0.8 + 0.2
    base = (colours[corners] * bary[..., None]).sum(1) if colours is not None else torch.full((len(points), 3), 0.8)
    image = torch.full((size, size, 3), 0.15)
    image[hit] = base * shade[:, None]
    return (image.clamp(0, 1).numpy() * 255).astype(np.uint8)


def draw_points(image: np.ndarray, uv: np.ndarray, colour=(255, 0, 0)) -> np.ndarray:
    size = image.shape[0]
    out = image.copy()
    for u, v in uv:
        c, r = int(u * size), int(v * size)
        out[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = colour
    return out


def camera(yaw_deg: float, pitch_deg: float = 0.0) -> torch.Tensor:
    c2w = lookat_cam2world(math.radians(yaw_deg), math.radians(pitch_deg))
    return make_labels(c2w, intrinsics(batch=1))


def main() -> None:
    from PIL import Image

    from .config import MorphableConfig, build_morphable

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/clipportrait_head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=384)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model: MorphableModel = build_morphable(MorphableConfig(seed=args.seed))
    params = model.zero_params()
    neutral = model(params.shape, params.expression, torch.zeros(1, 6))[0]
    lms = model.landmarks(neutral[None])
    region_colours = torch.as_tensor(_REGION_COLOURS)[model.vertex_regions]
    for name, yaw in (("frontal", 0.0), ("yaw30", 30.0), ("yaw90", 90.0)):
        labels = camera(yaw)
        img = render_mesh(neutral, model.faces, labels, size=args.size)
        uv, _ = project_points(lms, labels)
        Image.fromarray(draw_points(img, uv[0].numpy())).save(out / f"{name}.png")
        Image.fromarray(render_mesh(neutral, model.faces, labels, region_colours, size=args.size)).save(out / f"regions_{name}.png")
    gen = torch.Generator().manual_seed(args.seed)
    tiles = []
    for _ in range(4):
        p = model.sample_params(1, gen, jaw_max=0.35)
        verts = model(p.shape, p.expression, p.pose)[0]
        tiles.append(render_mesh(verts, model.faces, camera(20.0, 5.0), size=args.size // 2))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(out / "samples.png")
    canonical = model.canonical_vertices()[0]
    simp = model.simplify(canonical[None])[0]
    Image.fromarray(
        np.concatenate(
            (render_mesh(canonical, model.faces, camera(30.0), size=args.size), render_mesh(simp, model.simplified_faces, camera(30.0), size=args.size)),
            axis=1,
        )
    ).save(out / "canonical_full_vs_simplified.png")
    print(f"{model.num_vertices} vertices, {len(model.faces)} faces; simplified {len(model.simplified_vertex_ids)} vertices, "
          f"{len(model.simplified_faces)} faces; images in {out}")


if __name__ == "__main__":
    main()
