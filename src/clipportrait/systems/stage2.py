"""Stage 2: text conditioning of the deformable 3D GAN (paper sec. 3.4-3.5, appendix A-B).

Stage 2 starts from a Stage-1 checkpoint and a canonicalisation cache (r_x^ of every training image,
eq. 10) and adds two zero-initialised alignment networks (`nn.alignment`):

    w_r(alpha) = w + alpha T_G(w, r)                      (eq. 11)   G's style vector
    u = S_D(x, rdr),  v = M_D(c_cam)                      (eq. 12-13)
    v_r(alpha) = v + alpha T_D(v, r),  D = u . v_r       (eq. 14-15)

T_G lives in the generator as ``G.align`` and T_D in the discriminator as ``D.align``, so the EMA
generator, the per-phase gradient switches and the checkpoints carry them with no extra plumbing.

Training is Stage 1's loop (EG3D's four phases) with these changes:
- every sample gets alpha = 0 with probability ``regularizer.alpha_drop`` (paper 0.5) else 1; a fake
  and D's judgement of it share one alpha; reals draw their own (sec. 3.5, against eq. 16);
- reals are conditioned on their cached r (the flipped image's r for flipped items); fakes on the r
  of the dataset row their camera and morphable parameters are drawn from (`ConditioningSampler`);
- G's main phase adds R_r (eq. 19, estimated by eq. 20 or 22) and R_norm (eq. 21), both evaluated
  at alpha = 1 (the alignment network itself) on the phase's fakes;
- ``alignment.train`` chooses what trains: the alignment networks only, or also G and D;
- the blur fade-in and the EMA ramp-up continue from Stage 1's image count instead of restarting.

At step 0 Stage 2 renders exactly Stage 1's images for any alpha (T_G = T_D = 0).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..losses import g_nonsaturating
from ..losses.jacobian import jacobian_norm, norm_growth_penalty
from ..nn.alignment import AlignmentConfig, AlignmentNetwork
from .stage1 import (CHECKPOINT_KEY, Cond, Stage1Config, Stage1GAN, check_compatible, load_checkpoint_and_hash,
                     load_weights)

TRAINABLE = ("all", "alignment")


@dataclass
class Stage2Config(Stage1Config):
    """Stage 1's config plus the alignment networks and where Stage 2 started from."""

    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    train: str = "all"  # all: G, D, T_G, T_D | alignment: T_G and T_D only (Stage-1 weights frozen)
    stage1_images: int = 0  # images Stage 1 had trained on (blur and EMA ramp-up continue from there)
    stage1_checkpoint: str = ""  # provenance: the Stage-1 checkpoint file and its sha256
    stage1_sha256: str = ""
    clip_cache: str = ""  # provenance: the canonicalisation cache trained on (its manifest names the LVLM)
    clip_cache_identity: dict = field(default_factory=dict)  # that cache's manifest identity ({} for a .npz)

    ARCHITECTURE = Stage1Config.ARCHITECTURE + ("alignment",)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage2Config":
        base = Stage1Config.from_dict(data)
        extra = {"alignment": AlignmentConfig(**data.get("alignment", {}))}
        for key in ("train", "stage1_images", "stage1_checkpoint", "stage1_sha256", "clip_cache", "clip_cache_identity"):
            if key in data:
                extra[key] = data[key]
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Stage1Config)}, **extra)


class Stage2GAN(Stage1GAN):
    def __init__(self, cfg: Stage2Config, conditioning=None, metrics_log: Callable[[dict], None] | None = None):
        if cfg.train not in TRAINABLE:
            raise UserError(f"alignment train={cfg.train!r}: expected one of {', '.join(TRAINABLE)}")
        if cfg.alignment.embed_dim < 1:
            raise UserError("alignment.embed_dim is not set: it is the CLIP embedding width of the canonicalisation "
                            "cache (task=train_stage2 reads it from the cache)")
        super().__init__(cfg, conditioning, metrics_log)
        self.G.align = AlignmentNetwork(self.G.mapping.w_dim, cfg.alignment.embed_dim, cfg.alignment)  # T_G, eq. 11
        self.D.align = AlignmentNetwork(self.D.cmap_dim, cfg.alignment.embed_dim, cfg.alignment)  # T_D, eq. 14
        self.G_ema.align = copy.deepcopy(self.G.align).eval().requires_grad_(False)

    @staticmethod
    def config_class() -> type:
        return Stage2Config

    @property
    def images_before(self) -> int:
        return int(self.cfg.stage1_images)

    # ------------------------------------------------------------------ conditioning
    def draw_alpha(self, batch: int) -> torch.Tensor:
        """(B,) alpha per sample: 0 with probability regularizer.alpha_drop, else 1 (sec. 3.5)."""
        keep = torch.rand(batch, device=self.device) >= self.cfg.regularizer.alpha_drop
        return keep.float()

    def fake_conditioning(self, batch: int) -> tuple[torch.Tensor, Cond]:
        z, cond = super().fake_conditioning(batch)
        if "clip_embedding" not in cond:
            raise UserError("Stage 2 needs CLIP embeddings for the training data: set data.clip_cache to the "
                            "canonicalisation cache of task=canonicalize")
        cond["alpha"] = self.draw_alpha(batch)
        return z, cond

    def real_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        if "clip_embedding" not in batch:
            raise UserError("Stage 2 needs CLIP embeddings for the training data: set data.clip_cache to the "
                            "canonicalisation cache of task=canonicalize")
        real = super().real_inputs(batch)
        real["cond"]["clip_embedding"] = batch["clip_embedding"]
        real["cond"]["alpha"] = self.draw_alpha(batch["image"].shape[0])
        return real

    @staticmethod
    def alpha_of(cond: Cond, batch: int, device: torch.device) -> torch.Tensor | None:
        """(B,1) alpha of a conditioning: cond["alpha"] (a number or (B,)), 1 when absent; None when
        there is no CLIP embedding (unconditional: alpha must then be 0 or absent)."""
        alpha = cond.get("alpha")
        if "clip_embedding" not in cond:
            if alpha is not None and bool(torch.as_tensor(alpha).ne(0).any()):
                raise UserError("alpha > 0 needs a CLIP embedding in the conditioning (cond['clip_embedding'])")
            return None
        if alpha is None:
            return torch.ones(batch, 1, device=device)
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=device)
        return alpha.expand(batch).reshape(batch, 1) if alpha.ndim == 0 else alpha.reshape(batch, 1)

    # ------------------------------------------------------------------ the hooks of Stage 1
    def align_ws(self, ws: torch.Tensor, cond: Cond, G=None) -> torch.Tensor:
        """w_r(alpha) = w + alpha T_G(w, r) (eq. 11), broadcast over the ws copies."""
        G = self.G if G is None else G
        alpha = self.alpha_of(cond, ws.shape[0], ws.device)
        if alpha is None:
            return ws
        delta = G.align(ws[:, 0], cond["clip_embedding"].to(ws.device))
        return ws + (alpha * delta)[:, None, :]

    def mapping(self, z: torch.Tensor, cond: Cond, G=None, update_emas: bool = False, truncation_psi: float = 1.0):
        """w_r(alpha) of eq. 11. Truncation (psi < 1) acts on the unconditional w before alignment, so
        T_G sees the kind of w it was trained on and alpha keeps its meaning."""
        G = self.G if G is None else G
        ws = G.mapping(z, truncation_psi=truncation_psi, update_emas=update_emas)
        return self.align_ws(ws, cond, G)

    def discriminate(self, image: torch.Tensor, raw: torch.Tensor, rdr: torch.Tensor | None, cond: Cond,
                     blur_sigma: float = 0.0) -> torch.Tensor:
        """D = u . v_r(alpha) (eq. 12-15)."""
        u = self.D.stem(image, raw, rdr, blur_sigma)
        v = self.D.camera_embedding(cond["camera"])
        alpha = self.alpha_of(cond, v.shape[0], v.device)
        if alpha is not None:
            v = v + alpha * self.D.align(v, cond["clip_embedding"].to(v.device))
        return self.D.score(u, v)

    # ------------------------------------------------------------------ G main with R_r and R_norm
    def alignment_regularizers(self, w: torch.Tensor, r: torch.Tensor, G=None) -> dict[str, torch.Tensor]:
        """Per-sample R_r (eq. 19; estimator eq. 20 or 22) and R_norm (eq. 21) of T_G at alpha = 1.
        R_r is taken with respect to r as T_G sees it, r_n = r / rms(r) (= sqrt(D) r for a unit-norm CLIP
        embedding of width D), so it is about |d w_r / d r|_F^2 / D in eq. 19's terms. Both constrain how
        T_G derives w_r from w: w is detached, so they train T_G and not the mapping that made w."""
        G = self.G if G is None else G
        reg = self.cfg.regularizer
        align = G.align
        w = w.detach().float()
        w_n, r_n = align.normalize(w), align.normalize(r).detach()
        out = {}
        # float32 like T_G's own forward: under bf16 autocast eq. 20's difference f(r + eps) - f(r)
        # is mostly rounding error (2-3x the exact norm on a test network).
        with torch.autocast(device_type=w.device.type, enabled=False):
            delta = align.delta(w_n, r_n)
            if reg.jacobian_weight > 0:
                # d w_r / d r = d T_G / d r (w does not depend on r)
                out["jacobian"] = jacobian_norm(lambda x: align.delta(w_n, x), r_n, reg.jacobian_estimator,
                                                reg.jacobian_sigma, reg.jacobian_samples, fx=delta)
            if reg.norm_weight > 0:
                out["norm"] = norm_growth_penalty(w + delta, w)
        return out

    def loss_g_main(self, batch: int) -> torch.Tensor:
        reg = self.cfg.regularizer
        z, cond = self.fake_conditioning(batch)
        ws = self.G.mapping(z)
        fake = self.synthesize(self.align_ws(ws, cond), cond, with_rdr=True)
        logits = self.discriminate(fake["image"], fake["image_raw"], fake["rdr"], cond, self.blur_sigma())
        self._record("g/logits_fake", logits.mean())
        loss = g_nonsaturating(logits).mean()
        terms = self.alignment_regularizers(ws[:, 0], cond["clip_embedding"])
        weights = {"jacobian": reg.jacobian_weight, "norm": reg.norm_weight}
        for name, values in terms.items():
            self._record(f"reg/{name}", values.mean())
            loss = loss + weights[name] * values.mean()
        return loss

    # ------------------------------------------------------------------ what trains
    def _frozen_backbone(self) -> bool:
        return self.cfg.train == "alignment"

    def set_trainable(self, module: torch.nn.Module | None) -> None:
        super().set_trainable(module)
        if self._frozen_backbone():
            for net in (self.G, self.D):
                net.requires_grad_(False)
                net.align.requires_grad_(module is None or module is net)

    def ema_prefixes(self) -> tuple[str, ...] | None:
        """With the backbone frozen G_ema follows T_G only: its backbone stays Stage 1's EMA weights
        (following G's would pull it towards Stage 1's raw weights)."""
        return ("align.",) if self._frozen_backbone() else None

    def trained_parameters(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        return list(module.align.parameters()) if self._frozen_backbone() else list(module.parameters())

    # ------------------------------------------------------------------ building from Stage 1
    @classmethod
    def from_stage1(cls, path: str | Path, *, alignment: AlignmentConfig, train: str = "all",
                    overrides: dict[str, Any] | None = None, expect: Stage1Config | None = None,
                    conditioning=None, metrics_log: Callable[[dict], None] | None = None) -> "Stage2GAN":
        """A Stage-2 system whose G, D and G_ema are a Stage-1 checkpoint's and whose T_G, T_D are zero.

        ``overrides`` replaces non-architecture fields of the checkpoint's config (regularizer, optim,
        batch_size, max_steps, seed); ``expect``, when given, must agree with the checkpoint on the
        architecture (a clear error lists the differences)."""
        checkpoint, digest = load_checkpoint_and_hash(path)
        meta = checkpoint[CHECKPOINT_KEY]
        if meta.get("kind", "Stage1GAN") != "Stage1GAN":
            raise UserError(f"checkpoint {path} holds a {meta.get('kind')}: Stage 2 starts from a Stage-1 checkpoint "
                            "(task=train_stage1); to continue a Stage-2 run use task.resume")
        if expect is not None:
            check_compatible(meta, expect, "start Stage 2", f"Stage-1 checkpoint {path}")
        data = dict(meta["config"])
        for key, value in (overrides or {}).items():
            if key in Stage1Config.ARCHITECTURE:
                raise ValueError(f"from_stage1 override {key!r}: the architecture comes from the checkpoint")
            data[key] = value
        base = Stage1Config.from_dict(data)
        cfg = Stage2Config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Stage1Config)},
                           alignment=alignment, train=train, stage1_images=int(meta.get("images_seen", 0)),
                           stage1_checkpoint=str(path), stage1_sha256=digest)
        system = cls(cfg, conditioning=conditioning, metrics_log=metrics_log)
        load_weights(system, checkpoint, str(path), new_modules=("align",))
        return system
