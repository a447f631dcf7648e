"""Project architectures registered with open_clip, so `open_clip.create_model_and_transforms(name)`
builds them like any built-in model.

`clipportrait-tiny` (model_configs/clipportrait-tiny.json): a ViT with 16x16 patches on 64x64 input
(16 tokens, 4 layers, width 128) and a 3-layer width-128 text transformer on open_clip's default BPE
tokenizer (its vocabulary ships inside the open_clip wheel, so nothing is downloaded), joint
embedding dimension 128. Small enough to train contrastively on the synthetic world on 2 CPU cores
in a few minutes.

`clipportrait-cnn` (model_configs/clipportrait-cnn.json): the same joint space (128) with a plain
CNN image tower (`convnet.PortraitConvNet`, width 8, registered with timm and wrapped by open_clip's
TimmModel: avg pool + linear projection) and a 3-layer width-64 text transformer with 32-token
context (the attribute-only captions are at most 24 tokens). Learns the synthetic attributes faster
per CPU second than the ViT (`lvlm=cnn`).
"""

from __future__ import annotations

from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
PROJECT_ARCHS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))


def register_project_models() -> None:
    """Make the project architectures known to open_clip (idempotent)."""
    import open_clip

    from . import convnet  # noqa: F401  registers the timm trunks that project configs name

    if not all(name in open_clip.list_models() for name in PROJECT_ARCHS):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
