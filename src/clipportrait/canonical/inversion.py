"""GAN inversion into the Stage-1 generator and the canonical re-render (paper sec. 3.3, eq. 6-10).

For a training image x with its camera c_cam and morphable parameters c_geo (from the dataset),

    w_x = argmin_w  LPIPS(V(S_G(w), c_cam, c_geo), x)  [+ pixel_weight * mean (render - x)^2]     (eq. 9)
    x_hat = V(S_G(w_x), c_n.cam, c_n.geo)                                                         (eq. 10)

V is the *EMA generator's* deformable render: its sample points go through the surface-field
deformation D bound to the image's observation mesh (eq. 4-5), as in training. Noise inputs are held
constant (``noise_mode="const"``) and ray samples are not jittered, so the objective is a
deterministic function of w.

The target's LPIPS features are computed once per batch (`metrics.lpips.lpips_features`), so a step
runs the LPIPS trunk on the render only; ``precision=bf16`` runs each step's render and LPIPS under
bfloat16 autocast on CUDA, while the reported final LPIPS is always computed in float32.

Coarse-to-fine (``coarse_fraction``): the first steps compare the neural render -- the tri-plane
render before super-resolution, which Stage 1's dual discriminator trains to look like the final
image downsampled -- with the image area-downsampled to the neural resolution, then the remaining
steps compare the final image. A coarse step skips super-resolution and runs LPIPS on 64x fewer
pixels at eg3d_512 (64^2 against 512^2): on an H100 at batch 32 under bf16 autocast, 92 ms against
210 ms for a step on the final image (benchmarks/bench_canonicalize.py).

Each batch's rays are fixed for the whole optimisation (unperturbed depths, cameras and meshes from
the dataset), so the coarse pass's sample points go through D once per batch, not once per step; only
the importance samples, which follow the tri-plane's density, are mapped at every step.

The optimiser follows the StyleGAN2 projector: Adam from the mean w, learning rate ramped up over
the first ``lr_rampup`` of the steps and down with a half cosine over the last ``lr_rampdown``.
Every image of a batch has its own w and the loss is a sum of per-image terms, and Adam acts
element-wise, so each image's trajectory does not depend on the rest of its batch.

The neutral condition of eq. 10 is the frontal camera on the default orbit (`geometry.cameras.
neutral_labels`) and the canonical mesh (beta = 0, psi = 0, jaw at the canonical angle). There the
observation mesh *is* the canonical mesh, and the surface field maps every point to itself
(`geometry.deformation`: "D is the identity when observation = canonical", fallback included), so
x_hat is rendered with the tri-plane sampled at the points themselves (``deformer=None``): the same
image, without a nearest-triangle search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from ..metrics.lpips import lpips_features, lpips_from_features
from ..nn.compiled import maybe_compiled
from .config import InversionConfig

if TYPE_CHECKING:  # heavy imports stay out of the task schema's import path
    from ..systems.stage1 import PreparedRays, Stage1GAN


def learning_rate(step: int, cfg: InversionConfig) -> float:
    """Adam's rate at ``step`` of ``cfg.steps``: peak * half-cosine ramp-down * linear ramp-up, over all
    the steps, or with ``cfg.coarse_restart`` over the coarse steps and again over the final-image steps."""
    first = cfg.coarse_steps if cfg.coarse_restart else 0
    if 0 < first < cfg.steps:
        return _ramped_rate(step, first, cfg) if step < first else _ramped_rate(step - first, cfg.steps - first, cfg)
    return _ramped_rate(step, cfg.steps, cfg)


def _ramped_rate(step: int, steps: int, cfg: InversionConfig) -> float:
    t = step / steps
    down = min(1.0, (1.0 - t) / cfg.lr_rampdown)
    down = 0.5 - 0.5 * math.cos(down * math.pi)
    up = min(1.0, t / cfg.lr_rampup) if cfg.lr_rampup > 0 else 1.0
    return cfg.lr * down * up


@torch.no_grad()
def mean_w(mapping: torch.nn.Module, cfg: InversionConfig) -> tuple[torch.Tensor, str]:
    """The starting w (w_dim,) and where it came from ("buffer" or "sampled"). ``auto`` takes the tracked
    w_avg only when it is within 10% of the sampled mean's norm from it (``tracked_mean_converged``): the
    buffer is a running mean from zero that stays far from the mean of w for the first few thousand
    training steps (``task=generate`` applies the same test to its truncation centre)."""
    from ..nn.mapping import sampled_mean_w, tracked_mean_converged

    buffer = getattr(mapping, "w_avg", None)
    if cfg.w_init == "buffer":
        if buffer is None:
            raise ValueError("inversion.w_init=buffer: the generator's mapping tracks no w_avg (w_avg_beta is None); "
                             "use w_init=sampled")
        return buffer.detach().float().clone(), "buffer"
    sampled = sampled_mean_w(mapping, cfg.w_avg_samples, cfg.seed)
    if cfg.w_init == "auto" and buffer is not None and bool(buffer.any()) and tracked_mean_converged(buffer, sampled):
        return buffer.detach().float().clone(), "buffer"
    return sampled, "sampled"


def neutral_condition(morphable, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """c_n.cam and c_n.geo of eq. 10: frontal camera on the default orbit, canonical morphable parameters."""
    from ..geometry.cameras import neutral_labels

    params = morphable.zero_params(batch)
    return {"camera": neutral_labels(batch, device=device), "shape": params.shape.to(device),
            "expression": params.expression.to(device), "pose": morphable.canonical_pose(batch).to(device),
            "flip": torch.zeros(batch, dtype=torch.bool, device=device)}


def image_distance(lpips: torch.nn.Module, image: torch.Tensor, pixels: torch.Tensor, features: list[torch.Tensor],
                   pixel_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (LPIPS, LPIPS + ``pixel_weight`` * mean squared error), both (B,) float32, of ``image``
    against target ``pixels`` with their LPIPS ``features`` (eq. 9), ``image`` area-downsampled to the
    target's size first. One function so that torch.compile fuses LPIPS's per-layer normalisations and
    squared differences and picks the convolutions' memory layout: eager, a step's LPIPS at 512^2 took
    134 of its 326 ms on an H100 at batch 32 (bf16), much of it elementwise float32 work and NCHW <-> NHWC
    transposes around the convolutions; compiled, the step took 238 ms."""
    size = pixels.shape[-1]
    if image.shape[-1] != size:
        image = F.interpolate(image, size=(size, size), mode="area")
    distance = lpips_from_features(lpips, lpips_features(lpips, image), features).float()
    if pixel_weight <= 0:
        return distance, distance
    return distance, distance + pixel_weight * (image.float() - pixels).square().flatten(1).mean(1)


@dataclass
class Inversion:
    """Result of one batch: ``w`` (B, w_dim) in W or (B, num_ws, w_dim) in W+, per-image final
    ``lpips`` and ``loss`` (LPIPS + pixel term) of that w, its render ``image`` (B,3,H,W) under the
    image's own condition, and the per-step mean loss ``history`` (steps,): of the neural render
    during coarse steps, of the final image after."""

    w: torch.Tensor
    lpips: torch.Tensor
    loss: torch.Tensor
    image: torch.Tensor
    history: torch.Tensor


@dataclass
class Target:
    """The images the objective compares against: their pixels at the compared size and their LPIPS
    features, computed once per batch instead of once per step."""

    pixels: torch.Tensor
    features: list[torch.Tensor]


@dataclass
class Stage:
    """What a step compares: the batch's rays at one neural resolution with D bound to its meshes and
    the coarse pass's points already mapped (``Stage1GAN.prepare_rays``: none of it depends on w),
    whether the render is super-resolved (the final image) or not (the neural render, coarse steps),
    and the target it is compared with."""

    rays: "PreparedRays"
    super_resolve: bool
    target: Target


@dataclass
class InversionState:
    """What one batch's optimisation carries between steps: ``fine`` is the final image's stage and
    ``coarse`` the neural render's (None without coarse steps)."""

    w: torch.Tensor
    optimizer: torch.optim.Optimizer
    fine: Stage
    coarse: Stage | None
    cond: dict[str, torch.Tensor]

    @property
    def deformer(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """D bound to the batch's observation meshes."""
        return self.fine.rays.deformer


class Inverter:
    """Inverts batches of images into the EMA generator of a Stage-1 system (eq. 9) and re-renders
    them canonically (eq. 10). ``lpips``: a ready LPIPS module (built from ``cfg.lpips_net`` when None)."""

    def __init__(self, system: "Stage1GAN", cfg: InversionConfig, lpips: torch.nn.Module | None = None) -> None:
        cfg.validate()
        self.system = system
        self.G = system.G_ema.eval().requires_grad_(False)
        self.cfg = cfg
        self.device = next(self.G.parameters()).device
        if lpips is None:
            from ..metrics.lpips import build_lpips

            lpips = build_lpips(cfg.lpips_net, device=self.device)
        self.lpips = lpips.eval().requires_grad_(False)
        self.w_start, self.w_start_source = mean_w(self.G.mapping, cfg)
        self.w_start = self.w_start.to(self.device)

    @property
    def resolution(self) -> int:
        return int(self.G.cfg.img_resolution)

    def broadcast(self, w: torch.Tensor) -> torch.Tensor:
        """ws (B, num_ws, w_dim) of optimised w (W: (B, w_dim) repeated; W+: as is)."""
        return w.unsqueeze(1).expand(-1, self.G.num_ws, -1) if w.ndim == 2 else w

    def render(self, w: torch.Tensor, cond: dict[str, torch.Tensor], deformer) -> torch.Tensor:
        out = self.G.synthesis(self.broadcast(w), cond["camera"], deformer=deformer, noise_mode="const", perturb=False)
        return out["image"]

    def render_stage(self, w: torch.Tensor, stage: Stage) -> torch.Tensor:
        """The image a step compares: the final image, or the neural render of a coarse stage."""
        rays = stage.rays
        out = self.G.render(self.broadcast(w), rays.origins, rays.dirs, rays.deformer, noise_mode="const",
                            perturb=False, coarse_mapped=rays.coarse_mapped, super_resolve=stage.super_resolve)
        return out["image" if stage.super_resolve else "image_raw"]

    def autocast(self, enabled: bool = True):
        """The precision of each step's render and LPIPS (``cfg.precision``); float32 when not ``enabled``."""
        enabled = enabled and self.cfg.precision == "bf16"
        if enabled and self.device.type != "cuda":
            raise ValueError(f"inversion.precision=bf16 needs a CUDA device, the generator is on {self.device}")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def target(self, images: torch.Tensor, size: int, step_precision: bool = True) -> Target:
        """``images`` (B,3,R,R) as a `Target` compared at ``size`` (area downsampling; 0 or >= R: as is),
        its features in the steps' precision (``step_precision``) or in float32."""
        if size and size < images.shape[-1]:
            images = F.interpolate(images, size=(size, size), mode="area")
        with torch.no_grad(), self.autocast(step_precision):
            features = lpips_features(self.lpips, images)
        return Target(images, features)

    def distance(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (LPIPS, total loss), both (B,), of ``image`` against ``target`` at the target's
        size: eq. 9's distance plus the optional pixel term. Compiled with the generator's
        ``backbone.compile`` setting (`image_distance`)."""
        fn = maybe_compiled(image_distance, self.G.cfg.compile, image)
        return fn(self.lpips, image, target.pixels, target.features, self.cfg.pixel_weight)

    def objective(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (LPIPS, total loss), both (B,), of the final image against ``target`` images at the
        generator's output size, compared at ``cfg.lpips_resolution`` (eq. 9)."""
        return self.distance(image, self.target(target, self.cfg.lpips_resolution))

    def start(self, images: torch.Tensor, cond: dict[str, torch.Tensor]) -> InversionState:
        """The optimisation state for ``images`` (B,3,R,R) in [-1, 1] at the generator's output size R
        under ``cond`` (camera, shape, expression, pose, flip): w at the mean w, Adam, the bound D."""
        res = self.resolution
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (res, res):
            raise ValueError(f"images: expected (B,3,{res},{res}) at the generator's output size, got {tuple(images.shape)}")
        batch = images.shape[0]
        cond = {k: v.to(self.device) for k, v in cond.items()}
        start = self.w_start.expand(batch, -1)
        if self.cfg.space == "w_plus":
            start = start.unsqueeze(1).expand(-1, self.G.num_ws, -1)
        w = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=self.cfg.lr, betas=tuple(self.cfg.betas))
        images = images.to(self.device, torch.float32)
        neural = self.G.cfg.neural_rendering_resolution
        with torch.no_grad():
            fine_rays = self.system.prepare_rays(cond, G=self.G)
            fine = Stage(fine_rays, True, self.target(images, self.cfg.lpips_resolution))
            coarse = None
            if self.cfg.coarse_steps:
                size = self.cfg.coarse_resolution or neural
                rays = fine_rays if size == neural else self.system.prepare_rays(cond, G=self.G, resolution=size)
                coarse = Stage(rays, False, self.target(images, size))
        return InversionState(w, optimizer, fine, coarse, cond)

    def step(self, state: InversionState, step: int) -> torch.Tensor:
        """One Adam step of eq. 9 at the scheduled rate, on the neural render for the first
        ``cfg.coarse_steps`` steps; returns the per-image loss before the step."""
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.cfg)
        stage = state.coarse if step < self.cfg.coarse_steps else state.fine
        with self.autocast():
            _, loss = self.distance(self.render_stage(state.w, stage), stage.target)
        state.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        state.optimizer.step()
        return loss.detach()

    def invert(self, images: torch.Tensor, cond: dict[str, torch.Tensor]) -> Inversion:
        """Optimise w for ``images`` under ``cond`` for ``cfg.steps`` steps (eq. 9), see ``start``."""
        state = self.start(images, cond)
        history = torch.stack([self.step(state, step).mean() for step in range(self.cfg.steps)]).cpu()
        with torch.no_grad():  # the reported numbers belong to the w that is returned (float32, final image)
            image = self.render_stage(state.w, state.fine)
            target = state.fine.target
            if self.cfg.precision != "fp32":
                target = self.target(images.to(self.device, torch.float32), self.cfg.lpips_resolution, False)
            distance, loss = self.distance(image, target)
        return Inversion(state.w.detach(), distance, loss, image, history)

    @torch.no_grad()
    def canonical(self, w: torch.Tensor) -> torch.Tensor:
        """x_hat of eq. 10 (B,3,R,R): the render of ``w`` under the neutral camera and canonical geometry
        (identity deformation, see the module docstring)."""
        cond = neutral_condition(self.system.geometry.morphable, w.shape[0], self.device)
        return self.render(w.to(self.device), cond, deformer=None)
