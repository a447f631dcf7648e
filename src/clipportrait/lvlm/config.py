"""Typed config of the `lvlm` group: which CLIP model embeds images and text, and from which weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Where the weights come from:
#   pretrained  an open_clip pretrained tag (e.g. ViT-B-32 + "openai"), found in the user's usual
#               download cache; fetched only when HF_HUB_OFFLINE is not set
#   file        a local open_clip-compatible state dict (.pt/.bin/.safetensors) at `weights`
#   project     a model trained by `task=train_lvlm` at `weights` (+ its model card beside it)
#   random      freshly initialised weights (seeded): only where shapes matter, never for results
LVLM_KINDS = ("pretrained", "file", "project", "random")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class LVLMConfig:
    arch: str = "clipportrait-tiny"  # open_clip architecture name (project configs are registered on use)
    kind: str = "project"
    weights: Optional[str] = "${paths.output_dir}/lvlm/clipportrait-tiny.pt"  # file for kind=file|project
    pretrained_tag: Optional[str] = None  # kind=pretrained: open_clip tag, e.g. "openai", "laion2b_s34b_b79k"
    download_dir: Optional[str] = None  # kind=pretrained: open_clip/HF cache (None: the user's usual one)
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 256  # images/texts encoded per forward pass
    text_cache_dir: str = "${paths.cache_dir}/lvlm_text"  # on-disk text-embedding cache (model id, text)
    random_seed: int = 0  # kind=random: initialisation seed
