"""Lean inference bundles (DESIGN sec. 6): what generation and evaluation need from a training
checkpoint, without the discriminator, the training generator, optimiser states or RNG states.

A bundle is a directory:

    weights.safetensors   the EMA generator's tensors (G_ema.*, Stage 2's T_G included), no pickle
    bundle.json           format and version, system kind, the resolved config, step and image count,
                          the source checkpoint's path and sha256, and the weights file's sha256

``open_for_inference`` opens a bundle or a training checkpoint alike, so ``task=generate`` and
``task=evaluate`` take either. A bundle-loaded system holds the EMA weights in both G and G_ema; its
discriminator is freshly initialised and it cannot resume training (``load_checkpoint`` says so).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..utils.files import sha256_file, write_json_atomic
from .stage1 import BUNDLE_META, CHECKPOINT_KEY, Stage1GAN, load_checkpoint

BUNDLE_FORMAT = "clipportrait-inference-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = BUNDLE_META
_EMA = "G_ema."


def system_classes() -> dict[str, type[Stage1GAN]]:
    from .stage2 import Stage2GAN

    return {"Stage1GAN": Stage1GAN, "Stage2GAN": Stage2GAN}


def is_bundle(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def export_bundle(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write the bundle of a training checkpoint into ``out_dir`` (created; files replaced atomically,
    the metadata last, so a directory with ``bundle.json`` always has matching weights). Returns the
    metadata written."""
    from safetensors.torch import save_file

    checkpoint_path, out = Path(checkpoint_path), Path(out_dir)
    checkpoint = load_checkpoint(checkpoint_path)
    meta = checkpoint[CHECKPOINT_KEY]
    kind = meta.get("kind", "Stage1GAN")
    if kind not in system_classes():
        raise UserError(f"checkpoint {checkpoint_path} holds a {kind}: bundles are made of Stage1GAN and Stage2GAN checkpoints")
    tensors = {k[len(_EMA):]: v.detach().cpu().contiguous() for k, v in checkpoint["state_dict"].items()
               if k.startswith(_EMA)}
    if not tensors:
        raise UserError(f"checkpoint {checkpoint_path} has no EMA generator weights ({_EMA}*)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={"format": BUNDLE_FORMAT, "kind": kind})
        os.replace(tmp, out / WEIGHTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    info = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "kind": kind,
        "config": meta["config"],
        "step": int(meta.get("step", 0)),
        "images_seen": int(meta.get("images_seen", 0)),
        "source": {"checkpoint": str(checkpoint_path), "sha256": sha256_file(checkpoint_path)},
        "weights_sha256": sha256_file(out / WEIGHTS_FILE),
        "tensors": len(tensors),
    }
    write_json_atomic(out / META_FILE, info)
    return info


def read_bundle_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        info = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"bundle {path}: {META_FILE} cannot be read ({err})") from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise UserError(f"bundle {path}: {META_FILE} is not a {BUNDLE_FORMAT} description")
    if info.get("version") != BUNDLE_VERSION:
        raise UserError(f"bundle {path}: version {info.get('version')!r}, this clipportrait reads version {BUNDLE_VERSION}")
    if info.get("kind") not in system_classes():
        raise UserError(f"bundle {path}: kind {info.get('kind')!r}, expected one of {', '.join(system_classes())}")
    return info


def load_bundle(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                overrides: dict[str, dict] | None = None,
                kinds: tuple[str, ...] = ("Stage1GAN", "Stage2GAN")) -> tuple[Stage1GAN, dict[str, Any]]:
    """(system, metadata) of a bundle holding one of ``kinds``; the weights file must have the sha256
    recorded with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    info = read_bundle_meta(path)
    if info["kind"] not in kinds:
        raise UserError(f"bundle {path} holds a {info['kind']}: expected {' or '.join(kinds)}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"bundle {path}: {WEIGHTS_FILE} is missing")
    if sha256_file(weights) != info.get("weights_sha256"):
        raise UserError(f"bundle {path}: {WEIGHTS_FILE} does not match the sha256 in {META_FILE} "
                        "(a corrupt or replaced file): export the bundle again")
    cls = system_classes()[info["kind"]]
    system = cls.from_config_dict(dict(info["config"]), overrides)
    try:
        tensors = load_file(str(weights), device="cpu")
    except SafetensorError as err:
        raise UserError(f"bundle {path}: {WEIGHTS_FILE} cannot be read ({err})") from None
    own = system.G_ema.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    reshaped = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(tensors))
                if tensors[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        raise UserError(f"bundle {path}: its weights do not fit its config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}, other shapes {reshaped[:5]}")
    system.G_ema.load_state_dict(tensors)
    system.G.load_state_dict(system.G_ema.state_dict())
    return system.to(map_location), info


def open_for_inference(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                       overrides: dict[str, dict] | None = None,
                       kinds: tuple[str, ...] = ("Stage1GAN", "Stage2GAN")) -> tuple[Stage1GAN, dict[str, Any]]:
    """(system in eval mode, metadata with kind/step/images_seen) of a bundle or a training checkpoint."""
    if is_bundle(path):
        system, info = load_bundle(path, map_location, overrides, kinds)
        return system.eval(), info
    checkpoint = load_checkpoint(path, map_location)
    meta = checkpoint[CHECKPOINT_KEY]
    kind = meta.get("kind", "Stage1GAN")
    if kind not in kinds:
        raise UserError(f"checkpoint {path} holds a {kind}: expected {' or '.join(kinds)}")
    system = system_classes()[kind].from_checkpoint(path, map_location=map_location, overrides=overrides,
                                                     checkpoint=checkpoint)
    info = {"kind": kind, "step": int(meta.get("step", 0)), "images_seen": int(meta.get("images_seen", 0))}
    return system.eval(), info
