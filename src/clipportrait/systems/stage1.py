"""Stage 1: the deformable 3D GAN (paper sec. 3.1-3.2, appendix B) as a Lightning system.

One training step runs EG3D's four phases, each a small method that returns its loss:

    G main  non-saturating loss of D on fakes                            every step
    G reg   density regularisation (EG3D), weight x interval             every density_interval steps
    D main  non-saturating loss on reals and fakes                      every step
    D reg   lazy R1 on reals (image and raw image), gamma/2 x interval   every r1_interval steps

then the EMA generator is updated. Fakes are conditioned like reals: camera and morphable parameters
drawn from the dataset (`ConditioningSampler`); the generator has no pose conditioning (paper sec.
3.2); every sample point is deformed to canonical space by D (eq. 4-5) bound to the fake's mesh; the
discriminator sees [image, upsampled raw image, mesh render] and the camera (eq. 12-15).

`mapping` and `discriminate` are the hooks Stage 2 overrides (eq. 11 and 14).

Optimisation is manual. Under several processes gradients are averaged by hand after each phase
(`systems.distributed`), as EG3D does. A non-finite loss skips its phase and is logged;
``max_nonfinite`` in a row stop the run. Checkpoints carry everything an exact resume needs:
optimisers, EMA, step counter (schedules are functions of it), RNG states, conditioning-sampler state;
the data position follows from the step.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..geometry.deformation import DeformationConfig
from ..geometry.head import HeadGeometry
from ..geometry.morphable.config import MorphableConfig, build_morphable
from ..losses import RegularizerConfig, d_nonsaturating, density_regularization, g_nonsaturating, r1_penalty
from ..nn.compiled import eager_region
from ..nn.config import BackboneConfig, DiscriminatorConfig, build_discriminator, build_generator
from ..nn.ema import ema_beta, update_ema
from ..utils.schedules import Linear, kimg_to_steps
from .distributed import all_finite, all_reduce_gradients, mean_over_ranks, world

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "clipportrait"
BUNDLE_META = "bundle.json"  # marks an inference bundle directory (systems/bundle.py)


@dataclass
class PreparedRays:
    """``Stage1GAN.prepare_rays``: what a render takes from its conditioning alone."""

    obs: torch.Tensor  # observation vertices (B, V, 3)
    origins: torch.Tensor  # camera rays (B, r*r, 3)
    dirs: torch.Tensor
    deformer: Callable[[torch.Tensor], torch.Tensor] | None  # D of eq. 4 bound to the meshes
    coarse_mapped: torch.Tensor  # the coarse pass's points through the deformer (B, r*r*S, 3)
    ready: torch.cuda.Event | None = None  # recorded after the work when it was queued on another stream


@dataclass
class OptimConfig:
    """Adam for G and D (paper appendix B: lr 0.001 for both, EG3D's betas (0, 0.99))."""

    g_lr: float = 0.001
    d_lr: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    eps: float = 1e-8
    accumulate: int = 1  # micro-batches per step: each phase splits the batch and steps once
    ema_kimg: float = 10.0  # EMA half-life in thousands of images (EG3D: batch * 10 / 32)
    ema_rampup: Optional[float] = 0.05
    max_nonfinite: int = 10  # this many non-finite losses in a row abort the run
    mesh_render_resolution: int = 0  # rasterise rdr at this size and upsample (0: D's resolution)

    def validate(self) -> None:
        if not (self.g_lr > 0 and self.d_lr > 0):
            raise ValueError(f"optim g_lr={self.g_lr}, d_lr={self.d_lr}: expected > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim betas={list(self.betas)}: expected two values in [0, 1)")
        if self.accumulate < 1 or self.max_nonfinite < 1:
            raise ValueError(f"optim accumulate={self.accumulate}, max_nonfinite={self.max_nonfinite}: expected >= 1")
        if self.ema_kimg < 0:
            raise ValueError(f"optim ema_kimg={self.ema_kimg}: expected >= 0")


@dataclass
class Stage1Config:
    """Everything that defines a Stage-1 model and its training (checkpoints store it)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    deformation: DeformationConfig = field(default_factory=DeformationConfig)
    morphable: MorphableConfig = field(default_factory=MorphableConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 8  # per rank, per step
    max_steps: int = 100
    seed: int = 0

    # Groups that fix the architecture: a checkpoint must agree on these to be loaded.
    ARCHITECTURE = ("backbone", "discriminator", "deformation", "morphable")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage1Config":
        kinds = {"backbone": BackboneConfig, "discriminator": DiscriminatorConfig, "deformation": DeformationConfig,
                 "morphable": MorphableConfig, "regularizer": RegularizerConfig, "optim": OptimConfig}
        out = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            out[f.name] = kinds[f.name](**data[f.name]) if f.name in kinds else data[f.name]
        return cls(**out)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Fields of the architecture groups that choose how the same function is computed.
EXECUTION_SETTINGS = {("deformation", "backend"), ("deformation", "cpu_search"), ("deformation", "pair_chunk"),
                      ("deformation", "grid_capacity"), ("backbone", "cuda_fast_path"), ("backbone", "compile"),
                      ("backbone", "upconv_fir"),
                      ("discriminator", "compile")}


def architecture_differences(a: dict[str, Any], b: dict[str, Any],
                             groups: tuple[str, ...] = Stage1Config.ARCHITECTURE) -> list[str]:
    """``group.key: a != b`` for every architecture field of ``groups`` that differs between two config dicts."""
    diffs = []
    for group in groups:
        ga, gb = a.get(group, {}), b.get(group, {})
        for key in sorted(set(ga) | set(gb)):
            if (group, key) in EXECUTION_SETTINGS:
                continue  # how the model runs, not what it is
            if ga.get(key) != gb.get(key):
                diffs.append(f"{group}.{key}: {ga.get(key)!r} != {gb.get(key)!r}")
    return diffs


Cond = dict[str, torch.Tensor]


class Stage1GAN(L.LightningModule):
    def __init__(self, cfg: Stage1Config, conditioning=None, metrics_log: Callable[[dict], None] | None = None):
        super().__init__()
        cfg.regularizer.validate()
        cfg.optim.validate()
        if cfg.batch_size % cfg.optim.accumulate:
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by optim.accumulate={cfg.optim.accumulate}")
        self.automatic_optimization = False
        self.cfg = cfg
        self.G = build_generator(cfg.backbone)
        self.D = build_discriminator(cfg.discriminator, cfg.backbone)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        # Kept out of the state dict (FLAME's licence forbids redistributing it inside checkpoints);
        # rebuilt from the config, moved with the module by `_apply`.
        self.__dict__["geometry"] = HeadGeometry(build_morphable(cfg.morphable), cfg.deformation,
                                                 cfg.optim.mesh_render_resolution)
        self.conditioning = conditioning  # ConditioningSampler; taken from the datamodule when None
        self.metrics_log = metrics_log
        self.step_count = 0
        self.nonfinite_in_row = 0
        self._pending_rng: dict | None = None
        self._history: dict[str, list[torch.Tensor]] = {}

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.geometry._apply(fn, recurse)
        return self

    # ------------------------------------------------------------------ sizes and schedules
    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * world()[0]

    @property
    def images_seen(self) -> int:
        return self.step_count * self.global_batch

    @property
    def images_before(self) -> int:
        """Images trained on before this system's first step (0 here; Stage 2 continues Stage 1)."""
        return 0

    def blur_sigma(self, step: int | None = None) -> float:
        reg = self.cfg.regularizer
        fade = Linear(reg.blur_init_sigma, 0.0, kimg_to_steps(reg.blur_fade_kimg, self.global_batch))
        step = self.step_count if step is None else step
        return fade(step + self.images_before / self.global_batch)

    # ------------------------------------------------------------------ model pieces (Stage-2 hooks)
    def mapping(self, z: torch.Tensor, cond: Cond, G=None, update_emas: bool = False, truncation_psi: float = 1.0):
        """w of eq. 6 (Stage 2 adds alpha T_G(w, r), eq. 11)."""
        G = self.G if G is None else G
        return G.mapping(z, truncation_psi=truncation_psi, update_emas=update_emas)

    def discriminate(self, image: torch.Tensor, raw: torch.Tensor, rdr: torch.Tensor | None, cond: Cond,
                     blur_sigma: float = 0.0) -> torch.Tensor:
        """D = u . v (eq. 12, 13, 15 with alpha = 0; Stage 2 adds T_D, eq. 14)."""
        return self.D(image, raw, rdr, cond["camera"], blur_sigma=blur_sigma)

    def generate(self, z: torch.Tensor, cond: Cond, G=None, update_emas: bool = False, noise_mode: str = "random",
                 truncation_psi: float = 1.0, with_rdr: bool = False,
                 rays: PreparedRays | None = None) -> dict[str, torch.Tensor]:
        """Render fakes for latents z under the conditioning ``cond`` (camera + morphable parameters);
        ``rays``: see ``synthesize``."""
        G = self.G if G is None else G
        ws = self.mapping(z, cond, G=G, update_emas=update_emas, truncation_psi=truncation_psi)
        return self.synthesize(ws, cond, G=G, noise_mode=noise_mode, with_rdr=with_rdr, rays=rays)

    def synthesize(self, ws: torch.Tensor, cond: Cond, G=None, noise_mode: str = "random",
                   with_rdr: bool = False, rays: PreparedRays | None = None) -> dict[str, torch.Tensor]:
        """Render style vectors ``ws`` (B, num_ws, w_dim) under ``cond``: tri-plane, deformation to the
        canonical space of each sample's mesh (eq. 4-5), volume rendering (eq. 3), super-resolution.
        ``rays``: ``prepare_rays(cond)``, made beforehand (inference: unperturbed depths)."""
        G = self.G if G is None else G
        if rays is None:
            obs = self.geometry.observation(cond)
            out = G.synthesis(ws, cond["camera"], deformer=self.geometry.deformer(obs), noise_mode=noise_mode)
        else:
            obs = rays.obs
            out = G.render(ws, rays.origins, rays.dirs, rays.deformer, noise_mode, perturb=False,
                           coarse_mapped=rays.coarse_mapped, coarse_ready=rays.ready)
        out["ws"] = ws
        if with_rdr:
            out["rdr"] = self.mesh_render(obs, cond["camera"])
        return out

    def prepare_rays(self, cond: Cond, G=None, stream: torch.cuda.Stream | None = None,
                     resolution: int | None = None) -> PreparedRays:
        """The part of an inference render that needs the conditioning but not w: observation meshes,
        camera rays (``resolution``^2, default G's neural rendering resolution), the deformation bound to
        the meshes (its grid built) and the coarse pass's points mapped to canonical space (unperturbed
        depths). With ``stream`` (CUDA) the work is queued there
        after what the current stream has queued, and ``ready`` marks its end: it then runs beside the
        mapping and the tri-plane synthesis, which leave a small batch's GPU mostly idle."""
        from ..geometry.cameras import ray_bundle  # owned by the geometry package

        G = self.G if G is None else G
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))
            with torch.cuda.stream(stream):
                rays = self.prepare_rays(cond, G, resolution=resolution)
                rays.ready = torch.cuda.Event()
                rays.ready.record(stream)
            return rays
        obs = self.geometry.observation(cond)
        deformer = self.geometry.deformer(obs)
        origins, dirs = ray_bundle(cond["camera"], resolution or G.cfg.neural_rendering_resolution)
        return PreparedRays(obs, origins, dirs, deformer, G.coarse_points(origins, dirs, deformer))

    @torch.no_grad()
    def generate_images(self, z: torch.Tensor, cond: Cond, truncation_psi: float = 1.0) -> torch.Tensor:
        """EMA generator images in [-1, 1] for evaluation and sample grids (constant noise)."""
        return self.generate(z, cond, G=self.G_ema, noise_mode="const", truncation_psi=truncation_psi)["image"]

    def mesh_render(self, obs_verts: torch.Tensor, camera: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.discriminator.rdr_channels == 0:
            return None
        return self.geometry.mesh_render(obs_verts, camera, self.cfg.backbone.img_resolution)

    def real_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """D's inputs for a real batch: the image, its downsampled raw twin (EG3D), the mesh render."""
        image = batch["image"]
        size = self.cfg.backbone.img_resolution
        if image.shape[-1] != size:
            raise UserError(f"real images are {image.shape[-1]}^2 but backbone.img_resolution={size}: "
                            f"set data.resolution={size}")
        nr = self.cfg.backbone.neural_rendering_resolution
        raw = F.interpolate(image, size=(nr, nr), mode="bilinear", align_corners=False, antialias=True)
        cond = {k: batch[k] for k in ("camera", "shape", "expression", "pose", "flip")}
        with torch.no_grad():
            rdr = self.mesh_render(self.geometry.observation(cond), cond["camera"])
        return {"image": image, "raw": raw, "rdr": rdr, "cond": cond}

    def fake_conditioning(self, batch: int) -> tuple[torch.Tensor, Cond]:
        if self.conditioning is None:
            raise RuntimeError("Stage1GAN.conditioning is not set (a ConditioningSampler of the training data)")
        cond = {k: v.to(self.device) for k, v in self.conditioning.sample(batch).items()}
        z = torch.randn(batch, self.cfg.backbone.z_dim, device=self.device)
        return z, cond

    # ------------------------------------------------------------------ the four phases (losses)
    def loss_g_main(self, batch: int) -> torch.Tensor:
        z, cond = self.fake_conditioning(batch)
        fake = self.generate(z, cond, with_rdr=True)
        logits = self.discriminate(fake["image"], fake["image_raw"], fake["rdr"], cond, self.blur_sigma())
        self._record("g/logits_fake", logits.mean())
        return g_nonsaturating(logits).mean()

    def loss_g_reg(self, batch: int) -> torch.Tensor:
        reg = self.cfg.regularizer
        z, cond = self.fake_conditioning(batch)
        ws = self.mapping(z, cond)
        planes = self.G.planes(ws)
        field_fn = self.G.field(planes)  # canonical space: see losses/density.py
        term = density_regularization(lambda pts: field_fn(pts)[1], batch, reg.density_points, reg.density_perturb,
                                      reg.density_extent, device=self.device)
        return term * reg.density_weight

    def loss_d_main(self, real: dict[str, Any]) -> torch.Tensor:
        batch = real["image"].shape[0]
        z, cond = self.fake_conditioning(batch)
        with torch.no_grad():
            fake = self.generate(z, cond, update_emas=True, with_rdr=True)
        sigma = self.blur_sigma()
        fake_logits = self.discriminate(fake["image"], fake["image_raw"], fake["rdr"], cond, sigma)
        real_logits = self.discriminate(real["image"], real["raw"], real["rdr"], real["cond"], sigma)
        self._record("d/logits_fake", fake_logits.mean())
        self._record("d/logits_real", real_logits.mean())
        return d_nonsaturating(real_logits, fake_logits).mean()

    def loss_d_reg(self, real: dict[str, Any]) -> torch.Tensor:
        image = real["image"].detach().requires_grad_(True)
        raw = real["raw"].detach().requires_grad_(True)
        with eager_region():  # differentiated twice: no compiled graphs
            logits = self.discriminate(image, raw, real["rdr"], real["cond"], self.blur_sigma())
            penalty = r1_penalty(logits, [image, raw])
        self._record("d/r1_penalty", penalty.mean())
        return penalty.mean() * (self.cfg.regularizer.r1_gamma / 2)

    # ------------------------------------------------------------------ running a phase
    def run_phase(self, name: str, optimizer, module: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor],
                  chunks: int, gain: float = 1.0) -> torch.Tensor | None:
        """Zero grads, back-propagate ``loss_fn(i) * gain / chunks`` for each micro-batch i, average
        gradients over ranks, step ``optimizer``. Only ``module`` trains during the phase. Returns the
        mean loss, or None when the loss was non-finite on some rank (the step is skipped)."""
        self.set_trainable(module)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i in range(chunks):
            loss = loss_fn(i)
            if not all_finite(loss):
                self._nonfinite(name)
                optimizer.zero_grad(set_to_none=True)
                return None
            self._backward(loss * (gain / chunks))
            total = total + loss.detach() / chunks
        all_reduce_gradients(module.parameters())
        optimizer.step()
        self.nonfinite_in_row = 0
        self._record(f"loss/{name}", total)
        return total

    def set_trainable(self, module: torch.nn.Module | None) -> None:
        """Gradients only for ``module`` (G or D) during its phase; None: for both (between phases)."""
        self.G.requires_grad_(module is None or module is self.G)
        self.D.requires_grad_(module is None or module is self.D)

    def _backward(self, loss: torch.Tensor) -> None:
        if self._trainer is None:  # a phase run by hand (tests, scripts)
            loss.backward()
        else:
            self.manual_backward(loss)

    def _nonfinite(self, phase: str) -> None:
        self.nonfinite_in_row += 1
        message = f"non-finite loss in phase {phase} at step {self.step_count}: step skipped " \
                  f"({self.nonfinite_in_row} in a row, limit {self.cfg.optim.max_nonfinite})"
        log.warning(message)
        self._write({"event": "nonfinite", "phase": phase, "step": self.step_count, "in_row": self.nonfinite_in_row})
        if self.nonfinite_in_row >= self.cfg.optim.max_nonfinite:
            raise UserError(f"training diverged: {self.nonfinite_in_row} non-finite losses in a row (last in phase "
                            f"{phase} at step {self.step_count}); lower the learning rates, raise "
                            f"regularizer.r1_gamma, or resume from an earlier checkpoint")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.train_step(batch, *self.optimizers())
        if self.step_count >= self.cfg.max_steps:
            self.trainer.should_stop = True

    def train_step(self, batch: dict[str, torch.Tensor], opt_g, opt_d) -> None:
        """One training step on a real batch: the four phases on their schedule, then the EMA update.
        Runs with or without a Trainer (the benchmark calls it with plain optimisers)."""
        cfg, reg = self.cfg, self.cfg.regularizer
        chunks = cfg.optim.accumulate
        micro = batch["image"].shape[0] // chunks
        reals = [self.real_inputs({k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}) for i in range(chunks)]
        step = self.step_count

        self.run_phase("g_main", opt_g, self.G, lambda i: self.loss_g_main(micro), chunks)
        if reg.density_weight > 0 and step % reg.density_interval == 0:
            self.run_phase("g_reg", opt_g, self.G, lambda i: self.loss_g_reg(micro), chunks, gain=reg.density_interval)
        self.run_phase("d_main", opt_d, self.D, lambda i: self.loss_d_main(reals[i]), chunks)
        if reg.r1_gamma > 0 and step % reg.r1_interval == 0:
            self.run_phase("d_reg", opt_d, self.D, lambda i: self.loss_d_reg(reals[i]), chunks, gain=reg.r1_interval)
        self.set_trainable(None)

        self.step_count += 1
        beta = ema_beta(self.global_batch, self.images_before + self.images_seen, cfg.optim.ema_kimg,
                        cfg.optim.ema_rampup)
        update_ema(self.G_ema, self.G, beta, self.ema_prefixes())
        self._record("schedule/blur_sigma", torch.tensor(self.blur_sigma(step), device=self.device))
        self._record("schedule/ema_beta", torch.tensor(beta, device=self.device))

    def ema_prefixes(self) -> tuple[str, ...] | None:
        """Names of the G parameters G_ema follows (None: all of them)."""
        return None

    # ------------------------------------------------------------------ logging
    def _record(self, key: str, value: torch.Tensor) -> None:
        self._history.setdefault(key, []).append(value.detach().float().reshape(()))

    def _write(self, record: dict) -> None:
        if self.metrics_log is not None and world()[1] == 0:
            self.metrics_log(record)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = max(int(self.trainer.log_every_n_steps), 1)
        if self.step_count % every and self.step_count < self.cfg.max_steps:
            return
        keys = sorted(self._history)
        if not keys:
            return
        # One all-reduce of the means over the steps since the last log (identical on every rank).
        means = mean_over_ranks(torch.stack([torch.stack(self._history[k]).mean() for k in keys])).tolist()
        self._history.clear()
        values = dict(zip(keys, means))
        values["progress/kimg"] = self.images_seen / 1000
        self.log_dict(values, on_step=True, prog_bar=False, rank_zero_only=True)
        self._write({"event": "train", "step": self.step_count, "kimg": self.images_seen / 1000, **values})

    # ------------------------------------------------------------------ optimisers, lifecycle
    def trained_parameters(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters of G or D that its optimiser updates (all of them in Stage 1)."""
        return list(module.parameters())

    def configure_optimizers(self):
        opt, reg = self.cfg.optim, self.cfg.regularizer

        def adam(params, lr: float, interval: int, enabled: bool):
            # Lazy regularisation (StyleGAN2): the regulariser runs every `interval` steps, so lr and
            # betas are rescaled to keep the effective optimiser the same as with a regulariser every step.
            ratio = interval / (interval + 1) if enabled else 1.0
            betas = tuple(b**ratio for b in opt.betas)
            return torch.optim.Adam(params, lr=lr * ratio, betas=betas, eps=opt.eps)

        return (adam(self.trained_parameters(self.G), opt.g_lr, reg.density_interval, reg.density_weight > 0),
                adam(self.trained_parameters(self.D), opt.d_lr, reg.r1_interval, reg.r1_gamma > 0))

    def setup(self, stage: str) -> None:
        if self.conditioning is None and self.trainer is not None and self.trainer.datamodule is not None:
            self.conditioning = self.trainer.datamodule.conditioning

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng, self.device)
            self._pending_rng = None
        else:
            # Fresh run: a different random stream on every rank (z, noise), one seed per rank.
            _, rank = world()
            seed = self.cfg.seed * 1_000_003 + rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "kind": type(self).__name__,
            "config": self.cfg.as_dict(),
            "step": self.step_count,
            "images_seen": self.images_seen,
            "nonfinite_in_row": self.nonfinite_in_row,
            "rng": _get_rng_state(self.device),
            "conditioning_rng": None if self.conditioning is None else self.conditioning.generator.get_state(),
            "world_size": world()[0],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise UserError("checkpoint has no clipportrait metadata: not a checkpoint of this project")
        check_compatible(meta, self.cfg, "resume")
        self.step_count = int(meta["step"])
        self.nonfinite_in_row = int(meta["nonfinite_in_row"])
        if meta.get("world_size", 1) != world()[0]:
            log.warning("resuming a %d-process run on %d processes: the data order and random streams differ "
                        "from the uninterrupted run", meta.get("world_size", 1), world()[0])
        self._pending_rng = meta["rng"]
        if self.trainer is not None and self.trainer.datamodule is not None:
            self.trainer.datamodule.resume_at(self.step_count)
        if meta.get("conditioning_rng") is not None:
            self._pending_conditioning_rng = meta["conditioning_rng"]
        self._restore_conditioning_rng()

    def _restore_conditioning_rng(self) -> None:
        state = getattr(self, "_pending_conditioning_rng", None)
        if state is not None and self.conditioning is not None:
            self.conditioning.generator.set_state(state)
            self._pending_conditioning_rng = None

    def on_fit_start(self) -> None:
        self._restore_conditioning_rng()

    # ------------------------------------------------------------------ loading for inference
    @staticmethod
    def config_class() -> type:
        return Stage1Config

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu",
                        overrides: dict[str, dict] | None = None,
                        checkpoint: dict[str, Any] | None = None) -> "Stage1GAN":
        """A system with the weights of a checkpoint of this project (loaded with weights_only=True).
        ``overrides`` replaces config groups, e.g. {"morphable": {"flame_path": ...}} on another machine;
        ``checkpoint``: ``load_checkpoint(path)`` when the caller has already read it."""
        checkpoint = load_checkpoint(path, map_location) if checkpoint is None else checkpoint
        kind = checkpoint[CHECKPOINT_KEY].get("kind", "Stage1GAN")
        if kind != cls.__name__:
            raise UserError(f"checkpoint {path} holds a {kind}, not a {cls.__name__}: load it with {kind}.from_checkpoint "
                            f"(task=generate and task=evaluate pick the right one)")
        system = cls.from_config_dict(checkpoint[CHECKPOINT_KEY]["config"], overrides)
        load_weights(system, checkpoint, str(path))
        return system.to(map_location)

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], overrides: dict[str, dict] | None = None) -> "Stage1GAN":
        """A freshly initialised system of a saved config (``overrides`` replace fields of its groups)."""
        data = dict(data)
        for group, values in (overrides or {}).items():
            data[group] = {**data.get(group, {}), **values}
        return cls(cls.config_class().from_dict(data))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if (path / BUNDLE_META).is_file():
        raise UserError(f"{path} is an inference bundle (the EMA generator only): generate and evaluate read it; "
                        "training and canonicalisation need the training checkpoint (.ckpt) it was exported from")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise UserError(f"checkpoint {path} cannot be read safely (weights_only=True): {err}") from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise UserError(f"checkpoint {path} is not a clipportrait training checkpoint (no '{CHECKPOINT_KEY}' metadata)")
    return checkpoint


def load_checkpoint_and_hash(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], str]:
    """``load_checkpoint`` and the file's sha256, for records that name the weights by hash (a
    canonicalisation manifest, a Stage-2 checkpoint's provenance). The file must be the same one
    (device, inode, size, modification time) before the load and after the hash: a checkpoint replaced
    or rewritten between the two reads (a training run saving meanwhile) is refused, so the hash is that
    of the weights that were loaded."""
    from ..utils.files import sha256_file

    def identity() -> tuple[int, int, int, int] | None:
        try:
            st = Path(path).stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    before = identity()
    checkpoint = load_checkpoint(path, map_location)
    digest = sha256_file(Path(path))
    if identity() != before:
        raise UserError(f"checkpoint {path} changed while it was being read (another process wrote or replaced "
                        "it); run again once it is no longer being written")
    return checkpoint, digest


def check_compatible(meta: dict[str, Any], cfg: Stage1Config, what: str, source: str = "the checkpoint",
                     groups: tuple[str, ...] | None = None) -> None:
    groups = type(cfg).ARCHITECTURE if groups is None else groups
    diffs = architecture_differences(meta["config"], cfg.as_dict(), groups)
    if diffs:
        raise UserError(f"cannot {what} from {source}: it was trained with another architecture:\n  "
                        + "\n  ".join(diffs) + "\n(use the same backbone/discriminator/deformation/morphable settings)")


def load_weights(system: Stage1GAN, checkpoint: dict[str, Any], source: str, new_modules: tuple[str, ...] = ()) -> None:
    """G, D and G_ema weights of a checkpoint into ``system`` (optimiser state and step are not touched).
    Weights under ``new_modules`` (e.g. "align": Stage 2's T_G/T_D) may be absent from the checkpoint;
    they keep their initial values. The checkpoint must match ``system``'s Stage-1 architecture."""
    check_compatible(checkpoint[CHECKPOINT_KEY], system.cfg, "load weights", source, Stage1Config.ARCHITECTURE)
    state = checkpoint["state_dict"]
    missing, unexpected = system.load_state_dict(state, strict=False)
    wanted = [k for k in missing if k.split(".")[0] in ("G", "D", "G_ema") and k.split(".")[1] not in new_modules]
    if wanted or unexpected:
        raise UserError(f"checkpoint {source}: missing weights {wanted[:5]}, unexpected {list(unexpected)[:5]}")


def _get_rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
