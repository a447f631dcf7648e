"""task=export — the lean inference bundle of a training checkpoint (DESIGN sec. 6).

    python run.py task=export task.checkpoint=<run>/checkpoints/last.ckpt            # -> <run>/checkpoints/last.bundle/
    python run.py task=export task.checkpoint=<ckpt> task.out=/models/portraits-v1

The bundle holds the EMA generator (Stage 2: with T_G) as safetensors and the resolved config as JSON
(``systems/bundle.py``): no discriminator, optimiser or RNG state, no pickle. ``task=generate`` and
``task=evaluate`` read it wherever they read a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import RunContext, TaskConfig

DESCRIPTION = "a Stage-1/2 checkpoint -> lean inference bundle (EMA generator as safetensors + config JSON)"


@dataclass
class Schema(TaskConfig):
    name: str = "export"
    checkpoint: str = "???"  # a training checkpoint of task=train_stage1 or task=train_stage2
    out: str = ""  # the bundle directory; empty: <checkpoint without .ckpt>.bundle beside it


def run(cfg, ctx: RunContext) -> dict:
    from pathlib import Path

    from ..errors import UserError
    from ..systems.bundle import export_bundle
    from ..utils.console import console

    t = cfg.task
    if t.checkpoint in (None, "", "???"):
        raise UserError("task.checkpoint is not set: a checkpoint of task=train_stage1 or task=train_stage2")
    source = Path(t.checkpoint)
    out = Path(t.out) if t.out else source.with_suffix(".bundle")
    if out.resolve() == source.resolve():
        raise UserError(f"task.out={t.out!r}: the bundle directory cannot be the checkpoint itself")
    info = export_bundle(source, out)
    weights = out / "weights.safetensors"
    sizes = {"checkpoint_mb": source.stat().st_size / 2**20, "bundle_mb": weights.stat().st_size / 2**20}
    console.print(f"[green]bundle[/green] {out}: {info['kind']} at step {info['step']}, {info['tensors']} tensors, "
                  f"{sizes['bundle_mb']:.1f} MB (checkpoint {sizes['checkpoint_mb']:.1f} MB)")
    return {"bundle": str(out), "kind": info["kind"], "step": info["step"], **sizes}
