"""Canonicalise a dataset into the cache: invert (eq. 9), re-render (eq. 10), embed, write shard by shard.

``embed="canonical"``: r = E_img(x_hat) of the canonical render; r_flipped = E_img of its mirror
image. The neutral camera is frontal and the canonical mesh is left-right symmetric, so the mirror
of x_hat stands for the canonical render of the flipped training copy (whose camera and mesh are
mirrored, `data.datamodule`).
``embed="raw"``: r = E_img(x) of the dataset image itself and r_flipped of its mirror; no inversion
(the "no canonicalisation" ablation of Fig. 4).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics.grids import _to_uint8
from .cache import CacheWriter
from .config import EMBED_MODES
from .inversion import Inverter

log = logging.getLogger(__name__)


@dataclass
class ShardStats:
    shard: int
    images: int
    seconds: float
    lpips_mean: float | None


def small_uint8(images: torch.Tensor, size: int) -> np.ndarray:
    """(B,3,H,W) in [-1, 1] -> (B,size,size,3) uint8 (antialiased resize) for the stored renders."""
    images = images.detach().float().clamp(-1, 1)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return _to_uint8(images).numpy()


def embed_pair(clip, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """CLIP embeddings of images in [-1, 1] and of their mirror images, float32 (B,D) each."""
    images = images.detach().float().clamp(-1, 1)
    with torch.no_grad():
        return clip.encode_images(images).cpu().numpy(), clip.encode_images(images.flip(-1)).cpu().numpy()


def compute_shard(dataset, positions: range, clip, embed: str, inverter: Inverter | None, batch_size: int,
                  render_size: int, oracle=None) -> dict[str, np.ndarray]:
    """The arrays of one shard: dataset items ``positions`` (unflipped copies), in that order."""
    parts: dict[str, list[np.ndarray]] = {}

    def add(key: str, value: np.ndarray) -> None:
        parts.setdefault(key, []).append(value)

    for start in range(positions.start, positions.stop, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, positions.stop))]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        add("names", np.array([dataset.index.names[int(i)] for i in batch["index"]]))
        if embed == "raw":
            r, r_flipped = embed_pair(clip, batch["image"])
        elif embed == "oracle":
            x_hat = oracle([dataset.index.names[int(i)] for i in batch["index"]])
            r, r_flipped = embed_pair(clip, x_hat)
            if render_size > 0:
                add("canonical", small_uint8(x_hat, min(render_size, x_hat.shape[-1])))
        else:
            cond = {k: batch[k] for k in ("camera", "shape", "expression", "pose", "flip")}
            result = inverter.invert(batch["image"], cond)
            x_hat = inverter.canonical(result.w)
            r, r_flipped = embed_pair(clip, x_hat)
            add("w", result.w.cpu().numpy())
            add("lpips", result.lpips.cpu().numpy())
            add("loss", result.loss.cpu().numpy())
            if render_size > 0:
                size = min(render_size, x_hat.shape[-1])  # never upsample the stored renders
                add("inverted", small_uint8(result.image, size))
                add("canonical", small_uint8(x_hat, size))
        add("r", r)
        add("r_flipped", r_flipped)
    return {k: np.concatenate(v) for k, v in parts.items()}


def canonicalize_dataset(dataset, clip, writer: CacheWriter, embed: str, inverter: Inverter | None = None,
                         batch_size: int = 8, render_size: int = 64,
                         on_shard: Callable[[ShardStats], None] | None = None, oracle=None) -> dict:
    """Compute every pending shard of ``writer`` and mark the cache complete. ``dataset`` is a
    `PortraitDataset` without flip augmentation, at the generator's resolution for ``canonical``."""
    if embed not in EMBED_MODES:
        raise ValueError(f"embed={embed!r}: expected one of {EMBED_MODES}")
    if embed == "canonical" and inverter is None:
        raise ValueError("embed='canonical' needs an Inverter (a Stage-1 checkpoint)")
    if embed == "oracle" and oracle is None:
        raise ValueError("embed='oracle' needs a SyntheticOracle (canonical.oracle)")
    if batch_size < 1 or render_size < 0:
        raise ValueError(f"batch_size={batch_size}, render_size={render_size}: expected >= 1 and >= 0")
    if dataset.flip:
        raise ValueError("canonicalise a dataset without flip augmentation (r_flipped covers the mirrored copies)")
    pending = writer.pending()
    reused = writer.num_shards - len(pending)
    if reused:
        log.info("canonicalisation cache %s: %d of %d shards already done", writer.directory, reused, writer.num_shards)
    start, images = time.perf_counter(), 0
    for shard in pending:
        t0 = time.perf_counter()
        positions = writer.rows(shard)
        arrays = compute_shard(dataset, positions, clip, embed, inverter, batch_size, render_size, oracle)
        writer.write(shard, arrays)
        images += len(positions)
        stats = ShardStats(shard, len(positions), time.perf_counter() - t0,
                           float(arrays["lpips"].mean()) if "lpips" in arrays else None)
        log.info("shard %d/%d: %d images in %.1f s%s", shard + 1, writer.num_shards, stats.images, stats.seconds,
                 "" if stats.lpips_mean is None else f", mean inversion LPIPS {stats.lpips_mean:.4f}")
        if on_shard is not None:
            on_shard(stats)
    writer.finish()
    seconds = time.perf_counter() - start
    return {"shards_computed": len(pending), "shards_reused": reused, "images_computed": images,
            "seconds": seconds, "images_per_s": images / seconds if images else None}
