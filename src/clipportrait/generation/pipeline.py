"""Text -> portrait: CLIP text embedding, optional modality-gap correction, Stage-2 EMA generator.

At inference the text embedding r_t takes the place of the image embedding r_x that Stage 2 was
trained on (paper sec. 2): w_r(alpha) = w + alpha T_G(w, r_t) (eq. 11), then Stage 1's synthesis
with the mesh of the requested morphable parameters and the requested camera. Latencies are
measured per call (host clock around the work, with a CUDA synchronise on both sides on GPU) and
reported per prompt (text encoding) and per image (generation).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..errors import UserError
from .modality_gap import ModalityGap


@dataclass
class LatencyMeter:
    """Accumulated wall time (ms) and item counts per named stage."""

    totals_ms: dict[str, float] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def measure(self, name: str, items: int, device: torch.device) -> Iterator[None]:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(device)
        self.totals_ms[name] = self.totals_ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3
        self.items[name] = self.items.get(name, 0) + int(items)

    def per_item_ms(self) -> dict[str, float]:
        return {name: self.totals_ms[name] / max(self.items[name], 1) for name in self.totals_ms}


def latent(seed: int, z_dim: int) -> torch.Tensor:
    """z (z_dim,) of a seed, drawn on the CPU so a seed gives the same portrait on every device."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(int(seed)))


class TextToPortrait:
    """A Stage-2 system (its EMA generator) driven by a CLIP text encoder; see the module docstring."""

    def __init__(self, system, clip, gap: ModalityGap | None = None, truncation_psi: float = 1.0) -> None:
        width = int(system.cfg.alignment.embed_dim)
        if clip.embed_dim != width:
            raise UserError(f"lvlm {clip.model_id} embeds text in {clip.embed_dim} dimensions, but the checkpoint's "
                            f"alignment network T_G takes {width}-d embeddings: use the LVLM the checkpoint's "
                            "canonicalisation cache was made with (lvlm=...)")
        self.system = system
        self.clip = clip
        self.gap = gap
        self.truncation_psi = float(truncation_psi)
        self.latency = LatencyMeter()

    @property
    def device(self) -> torch.device:
        return next(self.system.G_ema.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(P,D) embeddings fed to T_G: E_T(prompt), corrected by the modality gap when one is set."""
        with self.latency.measure("text_encoding", len(prompts), self.clip.device):
            embeddings = self.clip.encode_text(list(prompts))
            if self.gap is not None:
                embeddings = self.gap.apply(embeddings)
        return embeddings.to(self.device)

    @torch.no_grad()
    def render(self, seeds: Sequence[int], cond: dict[str, torch.Tensor], embedding: torch.Tensor | None,
               alpha: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """Portraits for ``seeds`` (B) under ``cond`` (camera + morphable parameters, B rows) and text
        ``embedding`` ((B,D), or None with alpha 0: the unconditional Stage-1 portrait)."""
        z = torch.stack([latent(s, self.system.cfg.backbone.z_dim) for s in seeds]).to(self.device)
        cond = {k: v.to(self.device) for k, v in cond.items()}
        if embedding is not None:
            cond["clip_embedding"] = embedding.to(self.device)
        cond["alpha"] = alpha
        with self.latency.measure("generation", len(seeds), self.device):
            out = self.system.generate(z, cond, G=self.system.G_ema, noise_mode="const",
                                       truncation_psi=self.truncation_psi)
        return out
