"""Stage-1 deformable tri-plane generator G (Fig. 2; eq. 3-8).

    w = M_G(z)                      (eq. 6, no camera input: generator pose conditioning dropped)
    planes = S_G(w)                 (eq. 7, 3 x C channels at R^2)
    x_raw, depth = V(planes, c_cam, D)   (eq. 8: rays from the camera label; every sample point x in
                                    observation space is mapped to canonical space by D (eq. 4)
                                    before the tri-plane lookup; composited with eq. 3)
    x = SR(x_raw, features, w)      (super-resolution)

``deformer`` is any callable (B, N, 3) -> (B, N, 3); the real one is
``geometry.deformation.SurfaceFieldDeformation`` bound to the meshes by the caller (eq. 5).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from clipportrait.nn.config import BackboneConfig
from clipportrait.nn.mapping import MappingNetwork
from clipportrait.nn.renderer import render_rays, sample_points, stratified_depths
from clipportrait.nn import triplane_triton
from clipportrait.nn.compiled import eager_only, maybe_compiled, wanted
from clipportrait.nn.superres import SuperResolution
from clipportrait.nn.synthesis import SynthesisNetwork
from clipportrait.nn.triplane import TriplaneDecoder, sample_triplane

Deformer = Callable[[torch.Tensor], torch.Tensor]


class RadianceField:
    """Observation-space points -> (features, raw density) of a tri-plane; ``mapped=True``: points
    already taken through ``deformer`` (canonical space).

    On CUDA (``cuda_fast_path``) the plane lookup is the fused Triton kernel on channels-last planes
    (``planes_cl``, converted once per render for every query); the PyTorch lookup serves CPUs and
    points that require a gradient. ``deforms`` is a plain bool because a compiled renderer guards on
    it, while it does not guard on the eager-only deformer: checking ``deformer is not None`` inside
    the graph made a rigid render after a deformable one replay the deformable graph and call None."""

    def __init__(self, decoder: TriplaneDecoder, planes: torch.Tensor, planes_cl: torch.Tensor | None,
                 box_warp: float, deformer: Deformer | None) -> None:
        self.decoder, self.planes, self.planes_cl = decoder, planes, planes_cl
        self.box_warp, self.deformer = box_warp, deformer
        self.deforms = deformer is not None

    def __call__(self, points: torch.Tensor, mapped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.deforms and not mapped:
            deformed = self.deformer(points)
            if deformed.shape != points.shape:
                raise ValueError(f"deformer: returned shape {tuple(deformed.shape)}, expected {tuple(points.shape)}")
            points = deformed
        if self.planes_cl is not None and not points.requires_grad:
            return self.decoder.decode(triplane_triton.triplane_mean(self.planes_cl, points, self.box_warp))
        return self.decoder(sample_triplane(self.planes, points, self.box_warp))


class TriplaneGenerator(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = SynthesisNetwork(
            cfg.w_dim, cfg.triplane_resolution, 3 * cfg.triplane_channels, cfg.channel_base, cfg.channel_max,
            num_bf16_res=cfg.synthesis_bf16_res, conv_clamp=cfg.conv_clamp, fast_path=cfg.cuda_fast_path,
            split_fir=cfg.upconv_fir == "split",
        )
        self.num_ws = self.backbone.num_ws
        self.mapping = MappingNetwork(
            cfg.z_dim, 0, cfg.w_dim, self.num_ws, cfg.mapping_layers, cfg.mapping_lr_multiplier, cfg.w_avg_beta
        )
        self.decoder = TriplaneDecoder(cfg.triplane_channels, cfg.decoder_hidden, cfg.decoder_features,
                                       cfg.decoder_lr_multiplier)
        self.superresolution = SuperResolution(
            cfg.decoder_features, cfg.w_dim, cfg.sr_input_resolution, cfg.sr_channels,
            use_bf16=cfg.sr_bf16, conv_clamp=cfg.sr_conv_clamp, antialias=cfg.sr_antialias,
            fast_path=cfg.cuda_fast_path, split_fir=cfg.upconv_fir == "split",
        )

    # -- pieces -------------------------------------------------------------------------------
    def planes(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """ws (B, num_ws, w_dim) -> tri-plane (B, 3, C, R, R), float32."""
        img = maybe_compiled(SynthesisNetwork.forward, self.cfg.compile, ws)(self.backbone, ws, noise_mode)
        c, r = self.cfg.triplane_channels, self.cfg.triplane_resolution
        return img.reshape(img.shape[0], 3, c, r, r)

    def field(self, planes: torch.Tensor, deformer: Deformer | None = None) -> "RadianceField":
        """The radiance field of ``planes`` (see `RadianceField`), its deformation run eagerly when the
        render is compiled."""
        fused = self.cfg.cuda_fast_path and triplane_triton.available(planes)
        planes_cl = triplane_triton.channels_last_planes(planes) if fused else None
        if deformer is not None and wanted(self.cfg.compile, planes):  # the render is compiled
            deformer = eager_only(deformer)
        return RadianceField(self.decoder, planes, planes_cl, self.cfg.box_warp, deformer)

    def sample_density(
        self, ws: torch.Tensor, points: torch.Tensor, deformer: Deformer | None = None, noise_mode: str = "random"
    ) -> dict[str, torch.Tensor]:
        """Raw density (B, N, 1) and features (B, N, C) at observation points (for density regularisation)."""
        features, raw_density = self.field(self.planes(ws, noise_mode), deformer)(points)
        return {"features": features, "sigma": raw_density}

    def render(
        self,
        ws: torch.Tensor,
        origins: torch.Tensor,
        dirs: torch.Tensor,
        deformer: Deformer | None = None,
        noise_mode: str = "random",
        perturb: bool | None = None,
        coarse_mapped: torch.Tensor | None = None,
        coarse_ready: torch.cuda.Event | None = None,
        super_resolve: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Render from explicit rays (B, r*r, 3) (ray k = row k // r, column k % r) and super-resolve.

        Returns image (B, 3, H, W), image_raw (B, 3, r, r), image_depth / image_alpha (B, 1, r, r),
        feature_image (B, C, r, r); images in [-1, 1] nominal range, float32. ``super_resolve=False``
        leaves out ``image`` and the super-resolution network that makes it.

        ``coarse_mapped``: ``coarse_points(origins, dirs, deformer)`` computed beforehand (no
        ``perturb``); when it was made on another CUDA stream, ``coarse_ready`` is an event recorded
        there after it (and after the deformer's first call, which builds its grid): the render waits
        for it only once the tri-plane is synthesised, so the two overlap.
        """
        cfg = self.cfg
        batch, rays, _ = origins.shape
        res = int(round(rays**0.5))
        if res * res != rays or ws.shape[0] != batch:
            raise ValueError(
                f"origins {tuple(origins.shape)}, ws {tuple(ws.shape)}: expected a square ray grid (B, r*r, 3) "
                "and matching batch sizes"
            )
        perturb = self.training if perturb is None else perturb
        planes = self.planes(ws, noise_mode)
        if coarse_ready is not None:
            torch.cuda.current_stream(planes.device).wait_event(coarse_ready)
        out = maybe_compiled(render_rays, cfg.compile, origins)(
            self.field(planes, deformer), origins, dirs, cfg.depth_samples, cfg.importance_samples,
            cfg.ray_start, cfg.ray_end, perturb=perturb, density_bias=cfg.density_bias, coarse_mapped=coarse_mapped,
        )

        def to_image(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(batch, t.shape[-1], res, res)

        feature_image = to_image(out["features"])
        rgb = feature_image[:, :3]
        images = {
            "image_raw": rgb,
            "image_depth": to_image(out["depth"]),
            "image_alpha": to_image(out["alpha"]),
            "feature_image": feature_image,
        }
        if super_resolve:
            images["image"] = maybe_compiled(SuperResolution.forward, cfg.compile, rgb)(
                self.superresolution, rgb, feature_image, ws[:, -1], noise_mode)
        return images

    def coarse_points(self, origins: torch.Tensor, dirs: torch.Tensor, deformer: Deformer | None = None) -> torch.Tensor:
        """The coarse pass's sample points (B, R*S, 3) of unperturbed rays, through ``deformer``:
        ``render``'s ``coarse_mapped``. They depend on the rays and the mesh only, not on the tri-plane."""
        cfg = self.cfg
        depths = stratified_depths(origins.shape[0], origins.shape[1], cfg.depth_samples, cfg.ray_start, cfg.ray_end,
                                   False, origins.device)
        points = sample_points(origins, dirs, depths)
        return deformer(points) if deformer is not None else points

    def synthesis(
        self,
        ws: torch.Tensor,
        c: torch.Tensor,
        deformer: Deformer | None = None,
        neural_rendering_resolution: int | None = None,
        noise_mode: str = "random",
        perturb: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """ws and camera labels c (B, 25) -> images (see ``render``)."""
        from clipportrait.geometry.cameras import ray_bundle  # owned by the geometry package

        if c.ndim != 2 or c.shape[1] != 25:
            raise ValueError(f"c: expected EG3D camera labels (B, 25), got {tuple(c.shape)}")
        res = neural_rendering_resolution or self.cfg.neural_rendering_resolution
        origins, dirs = ray_bundle(c, res)
        return self.render(ws, origins, dirs, deformer, noise_mode, perturb)

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor,
        deformer: Deformer | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        neural_rendering_resolution: int | None = None,
        noise_mode: str = "random",
        update_emas: bool = False,
    ) -> dict[str, torch.Tensor]:
        ws = self.mapping(z, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        out = self.synthesis(ws, c, deformer, neural_rendering_resolution, noise_mode)
        out["ws"] = ws
        return out
