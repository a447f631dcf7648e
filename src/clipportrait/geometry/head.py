"""The geometry of one batch of portraits, as the generator and discriminator consume it.

Given a batch's morphable parameters (shape, expression, pose, flip — from the dataset or from a
`ConditioningSampler`), `HeadGeometry` builds

- the observation meshes (full resolution, mirrored for flipped items),
- the surface-field deformation D bound to them (eq. 4-5): observation points -> canonical space,
  using the simplified meshes; the canonical mesh is the model's (beta = 0, psi = 0, jaw open),
- the mesh render "rdr" that conditions the discriminator (eq. 12): world xyz + coverage mask.

Training, evaluation, canonicalisation and generation all go through this one object, so a fake
image and the real image it is compared with are always conditioned the same way.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .deformation import DeformationConfig, SurfaceFieldDeformation
from .mesh_render import render_vertex_coords
from ..utils.cuda_graphs import capturing
from .morphable import MorphableModel

Deformer = Callable[[torch.Tensor], torch.Tensor]


def observation_vertices(cond: dict[str, torch.Tensor], morphable: MorphableModel) -> torch.Tensor:
    """Observation-space mesh vertices (B,V,3) of a batch: built from its shape/expression/pose and,
    where ``cond['flip']``, mirrored by the model (x -> -x with the ``mirror_map`` permutation)."""
    for key in ("shape", "expression", "pose", "flip"):
        if key not in cond:
            raise KeyError(f"conditioning: missing {key!r} (have {sorted(cond)})")
    # Full precision even inside an autocast region: bf16 world coordinates are off by ~0.004.
    with torch.autocast(device_type=cond["shape"].device.type, enabled=False):
        verts = morphable(cond["shape"], cond["expression"], cond["pose"])
    flip = cond["flip"].to(device=verts.device, dtype=torch.bool)
    if not capturing() and not flip.any():  # (a captured graph keeps both branches' work)
        return verts
    return torch.where(flip[:, None, None], morphable.mirror(verts), verts)


class HeadGeometry(torch.nn.Module):
    """Observation meshes, bound deformation and mesh renders for batches of morphable parameters.

    ``render_resolution``: the mesh is rasterised at this size and resized (bilinear) to the size
    asked of ``mesh_render``; 0 rasterises at the asked size. Rasterising at the neural-rendering
    size and upsampling is much cheaper at 512^2 and keeps the coarse geometry the discriminator needs.
    """

    def __init__(self, morphable: MorphableModel, deformation: DeformationConfig, render_resolution: int = 0):
        super().__init__()
        if render_resolution < 0:
            raise ValueError(f"render_resolution={render_resolution}: expected >= 0 (0 = the discriminator's size)")
        self.morphable = morphable
        self.deformation = SurfaceFieldDeformation(morphable.simplified_faces, deformation)
        self.render_resolution = int(render_resolution)
        with torch.no_grad():
            canonical = morphable.simplify(morphable.canonical_vertices(1))
        self.register_buffer("canonical_simplified", canonical, persistent=False)

    @property
    def deforms(self) -> bool:
        return bool(self.deformation.cfg.enabled)

    def observation(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full observation vertices (B,V,3) of ``cond`` (keys shape, expression, pose, flip)."""
        return observation_vertices(cond, self.morphable)

    def deformer(self, obs_verts: torch.Tensor) -> Deformer | None:
        """D of eq. 4 bound to these observation meshes; None when deformation is disabled (the
        generator then samples the tri-plane at the observation points directly)."""
        if not self.deforms:
            return None
        obs = self.morphable.simplify(obs_verts)
        return self.deformation.bind(obs, self.canonical_simplified.to(obs.dtype))

    def mesh_render(self, obs_verts: torch.Tensor, camera: torch.Tensor, resolution: int) -> torch.Tensor:
        """rdr (B,4,resolution,resolution): world xyz of the visible surface + coverage mask (eq. 12)."""
        size = self.render_resolution or resolution
        with torch.no_grad():
            rdr = render_vertex_coords(obs_verts.float(), self.morphable.faces, camera.float(), size)
        if size != resolution:
            rdr = F.interpolate(rdr, size=(resolution, resolution), mode="bilinear", align_corners=False)
        return rdr
