"""Overlay of a projected mesh wireframe and landmarks on an image, to check camera/mesh alignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from clipportrait.geometry.cameras import project_points, split_labels


def _to_uint8_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image: expected a (3,H,W) tensor in [-1,1], got shape {tuple(image.shape)}")
        array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return array.permute(1, 2, 0).numpy()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected a uint8 HxWx3 array, got {image.dtype} {image.shape}")
    return image


def draw_overlay(
    image: torch.Tensor | np.ndarray,
    verts: torch.Tensor,
    faces: torch.Tensor,
    labels: torch.Tensor,
    landmarks: torch.Tensor | None = None,
    path: str | Path | None = None,
    wire_color: tuple[int, int, int] = (0, 255, 0),
    landmark_color: tuple[int, int, int] = (255, 0, 0),
    landmark_radius: int = 2,
    cull_backfaces: bool = True,
) -> np.ndarray:
    """Draw the wireframe of mesh (V,3)/(F,3) and landmark dots (L,3 world points) projected with one
    camera label ((25,) or (1,25)) over ``image`` ((3,H,W) tensor in [-1,1] or uint8 HxWx3).

    Faces turned away from the camera are skipped when ``cull_backfaces`` (outward-wound meshes).
    Landmarks are drawn last, on top. Returns the HxWx3 uint8 overlay; writes a PNG when ``path``.
    """
    canvas = Image.fromarray(_to_uint8_hwc(image).copy())
    width, height = canvas.size
    labels = labels.reshape(1, -1).detach().float().cpu()
    split_labels(labels)
    if verts.dim() != 2 or verts.shape[1] != 3:
        raise ValueError(f"verts: expected shape (V,3), got {tuple(verts.shape)}")
    verts = verts.detach().float().cpu()
    faces = faces.detach().long().cpu()
    draw = ImageDraw.Draw(canvas)
    uv, depth = project_points(verts[None], labels)
    pixels = (uv[0] * torch.tensor([width, height])).numpy()
    tris = verts[faces]
    keep = (depth[0][faces] > 0).all(-1)
    if cull_backfaces:
        origin = split_labels(labels)[0][0, :3, 3]
        normals = torch.linalg.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0], dim=-1)
        keep &= ((origin - tris.mean(1)) * normals).sum(-1) > 0
    edges = torch.cat((faces[keep][:, [0, 1]], faces[keep][:, [1, 2]], faces[keep][:, [2, 0]]))
    edges = torch.unique(edges.sort(dim=1).values, dim=0)
    for i, j in edges.tolist():
        draw.line([tuple(pixels[i]), tuple(pixels[j])], fill=wire_color, width=1)
    if landmarks is not None:
        if landmarks.dim() != 2 or landmarks.shape[1] != 3:
            raise ValueError(f"landmarks: expected world points of shape (L,3), got {tuple(landmarks.shape)}")
        lm_uv, lm_depth = project_points(landmarks.detach().float().cpu()[None], labels)
        for (x, y), z in zip((lm_uv[0] * torch.tensor([width, height])).tolist(), lm_depth[0].tolist()):
            if z > 0:
                r = landmark_radius
                draw.ellipse([x - r, y - r, x + r, y + r], fill=landmark_color)
    result = np.asarray(canvas)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
    return result
