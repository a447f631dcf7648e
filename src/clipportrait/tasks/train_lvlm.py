"""task=train_lvlm — train the project's small open_clip model (``lvlm.arch``) contrastively on the
(image, caption) pairs of a dataset and save it where ``lvlm.weights`` points (DESIGN.md section 5).

Writes ``task.out`` (an open_clip-compatible state dict: ``open_clip.create_model_and_transforms(
arch, pretrained=<file>)`` loads it) and its model card ``<stem>.card.json`` (architecture and open_clip
config, training config, dataset path and hash, steps, losses, held-out zero-shot attribute accuracy
against chance). Zero-shot accuracy also goes to ``metrics.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lvlm.train import ContrastiveTrainConfig
from .base import RunContext, TaskConfig, ensure_dataset

DESCRIPTION = "train the small CLIP (open_clip, ClipLoss) on dataset captions; zero-shot attribute accuracy"


@dataclass
class Schema(ContrastiveTrainConfig, TaskConfig):
    name: str = "train_lvlm"
    data_path: str = "${data.path}"  # dataset with attributes.json captions; synthetic: generated if missing
    out: str = "${lvlm.weights}"  # checkpoint file; the model card goes beside it


def run(cfg, ctx: RunContext) -> dict:
    import logging
    import time
    from dataclasses import asdict, fields

    import open_clip
    import torch
    from open_clip.factory import get_model_config

    from ..errors import UserError
    from ..lvlm.clip import ClipEncoder, card_path, file_sha256, quiet_open_clip
    from ..lvlm.models import PROJECT_ARCHS, register_project_models
    from ..lvlm.train import (CAPTION_MODES, evaluate, load_caption_pairs, save_checkpoint, split_indices,
                              train_contrastive)
    from ..utils.console import console
    from ..utils.files import write_json_atomic

    task, lvlm = cfg.task, cfg.lvlm
    if not task.out:
        raise UserError("task.out (default: lvlm.weights) is not set: where should the trained checkpoint go?")
    if task.captions not in CAPTION_MODES:
        raise UserError(f"task.captions={task.captions!r}: expected one of {', '.join(CAPTION_MODES)}")
    register_project_models()
    if lvlm.arch not in PROJECT_ARCHS:
        raise UserError(f"lvlm.arch={lvlm.arch!r}: train_lvlm trains the project's small architectures "
                        f"({', '.join(PROJECT_ARCHS)}); real CLIP weights are loaded with lvlm.kind=pretrained|file")
    data_path = ensure_dataset(cfg, task.data_path)
    try:
        pairs = load_caption_pairs(data_path)
        train_rows, val_rows = split_indices(len(pairs), task.val_fraction, task.seed)
    except ValueError as exc:  # DatasetError included
        raise UserError(str(exc)) from exc

    torch.manual_seed(task.seed)
    with quiet_open_clip(logging.ERROR):  # "initialized randomly" is the point here
        model = open_clip.create_model(lvlm.arch, pretrained=None, device=lvlm.device)
        tokenizer = open_clip.get_tokenizer(lvlm.arch)
    train_cfg = ContrastiveTrainConfig(**{f.name: getattr(task, f.name) for f in fields(ContrastiveTrainConfig)})
    console.print(f"train_lvlm: {lvlm.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) "
                  f"on {len(train_rows)} images of {data_path} ({len(val_rows)} held out), {task.steps} steps")
    start = time.time()
    history = train_contrastive(model, tokenizer, pairs, train_rows, train_cfg,
                                log=lambda r: ctx.metrics.write({"event": "train_lvlm/step", **r}))
    train_seconds = time.time() - start

    out = save_checkpoint(model, task.out)
    model_id = f"{lvlm.arch}@{file_sha256(out)[:16]}"  # what build_clip will call these weights
    encoder = ClipEncoder(model, tokenizer, lvlm.arch, model_id, lvlm.batch_size)
    metrics = evaluate(encoder, pairs, val_rows, caption_mode=task.captions)
    card = {
        "arch": lvlm.arch,
        "model_id": model_id,
        "open_clip_version": open_clip.__version__,
        "model_cfg": get_model_config(lvlm.arch),
        "preprocess": encoder.model.visual.preprocess_cfg,
        "train": asdict(train_cfg),
        "data": {"path": str(data_path), "sha256": pairs.sha256, "images": len(pairs),
                 "train_images": len(train_rows), "held_out_images": len(val_rows),
                 "resolution": int(pairs.images.shape[-1])},
        "steps": task.steps,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": history[-1]["loss"],
        **metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(card_path(out), card)
    ctx.metrics.write({"event": "train_lvlm/zero_shot", "model_id": model_id, "data_sha256": pairs.sha256,
                       "templates": "lvlm.prompts.PROMPT_TEMPLATES (class embedding = mean of unit prompt embeddings)",
                       **metrics})

    rows = [f"  {name:12s} {r['accuracy']:.3f}  (chance {r['chance']:.3f}, majority {r['majority']:.3f}, "
            f"{r['images']} images)" for name, r in metrics["zero_shot"].items()]
    console.print(f"saved {out} ({model_id}) after {task.steps} steps in {train_seconds:.0f} s; held-out loss "
                  f"{metrics['val_loss']:.3f}, caption retrieval top-1 {metrics['val_retrieval_top1']:.3f}\n"
                  "zero-shot attribute accuracy on held-out images:\n" + "\n".join(rows))
    result = {"checkpoint": str(out), "card": str(card_path(out)), "model_id": model_id,
              "train_seconds": train_seconds, "final_train_loss": history[-1]["loss"], "val_loss": metrics["val_loss"],
              "val_retrieval_top1": metrics["val_retrieval_top1"]}
    result.update({f"zero_shot_{name}": r["accuracy"] for name, r in metrics["zero_shot"].items()})
    return result
