"""Contrastive training of a small open_clip model on (image, caption) pairs of a portrait dataset.

The loss is open_clip's own `ClipLoss`: the batch estimate of the paper's eq. 1 (InfoNCE) in CLIP's
symmetric form, each image against the batch's captions and each caption against its images, with
the temperature learnt as ``logit_scale`` (eq. 1 writes one denominator over all pairs; the small
LVLM stands in for CLIP, so it trains as CLIP did); AdamW without weight decay on gains, biases
and the temperature (open_clip's recipe), linear warm-up then cosine decay. Each step draws a batch
of training images, one random caption of each, crops them at random and mirrors half of them
(captions do not mention left/right).
Images go through the same tensor preprocessing as `ClipEncoder` at inference, after random crops.

With ``captions="attributes_only"`` (the default) the interrogator-style nuisance phrases that the
synthetic captions end with ("..., striped blue background, sepia, photo id K3QX") are cut off before
training: a unique "photo id" in the text matched to the unique id patch in the image lets ClipLoss
fall by memorising images instead of learning attributes (held-out hair-colour accuracy 0.30 with
them vs 0.37 without at 300 steps, 0.52 at 600; see the commit message for the table).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .clip import ClipEncoder, Preprocess, preprocess_images


@dataclass
class ContrastiveTrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.2
    warmup_steps: int = 30
    val_fraction: float = 0.1  # held-out images: never trained on, used for zero-shot accuracy
    flip: bool = True  # mirror half of each batch
    crop_scale: float = 0.8  # random crops of side in [crop_scale, 1] x the image, resized back (1: off)
    log_every: int = 25  # steps between metrics.jsonl records
    seed: int = 0
    captions: str = "attributes_only"  # attributes_only: drop trailing nuisance phrases | dataset: as written


CAPTION_MODES = ("attributes_only", "dataset")


@dataclass
class CaptionPairs:
    """A dataset in memory: uint8 images (N,3,R,R), their captions and attribute labels."""

    names: list[str]
    images: torch.Tensor
    captions: list[list[str]]
    attributes: list[dict]
    sha256: str = ""  # of labels, attributes and image bytes, in dataset order

    def __len__(self) -> int:
        return len(self.names)


def load_caption_pairs(path: str | os.PathLike) -> CaptionPairs:
    """Every image of the dataset at ``path`` with its captions and attributes (``attributes.json``)."""
    from ..data.format import ATTRIBUTES_FILE, LABELS_FILE, DatasetError, check_dataset, decode_image, read_index

    problems = check_dataset(path, decode=False)
    if problems:
        raise DatasetError(f"dataset {path} has {len(problems)} problem(s); e.g.\n" +
                           "\n".join(f"  {p}" for p in problems[:10]) + "\nrun `python run.py task=check_data` for all")
    index = read_index(path)
    if index.attributes is None:
        raise DatasetError(f"dataset {path} has no {ATTRIBUTES_FILE}: train_lvlm needs captions per image "
                           f"(the synthetic datasets of task=make_synthetic have them)")
    digest = hashlib.sha256(index.files.read_bytes(LABELS_FILE))
    digest.update(index.files.read_bytes(ATTRIBUTES_FILE))
    images, captions, labels = [], [], []
    for name in index.names:
        item = index.attributes.get(name)
        if not item or not item.get("captions"):
            raise DatasetError(f"{index.files.root}/{ATTRIBUTES_FILE}: no captions for image {name!r}")
        data = index.files.read_bytes(name)
        digest.update(data)
        images.append(torch.tensor(decode_image(data, f"{index.files.root}/{name}")).permute(2, 0, 1))
        captions.append(list(item["captions"]))
        labels.append(dict(item["attributes"]))
    return CaptionPairs(list(index.names), torch.stack(images), captions, labels, digest.hexdigest())


def nuisance_phrase_set(nuisance: dict) -> set[str]:
    """Every phrase `data.synthetic.nuisance_phrases` can append for an image with these nuisances."""
    from ..data.synthetic import GRAIN_PHRASES

    pattern, colour = nuisance["background_pattern"], nuisance["background_color"]
    phrases = set(GRAIN_PHRASES) | {f"{colour} background" if pattern == "plain" else f"{pattern} {colour} background"}
    if nuisance.get("color_cast", "none") != "none":
        phrases.add(nuisance["color_cast"])
    if nuisance.get("photo_id"):
        phrases.add(f"photo id {nuisance['photo_id']}")
    return phrases


def strip_nuisance(caption: str, nuisance: dict) -> str:
    """``caption`` without the ", "-separated nuisance phrases at its end (the synthetic generator
    appends them after the attribute text); attribute parts such as ", gold glasses" stay."""
    phrases, parts = nuisance_phrase_set(nuisance), caption.split(", ")
    while len(parts) > 1 and parts[-1] in phrases:
        parts.pop()
    return ", ".join(parts)


def training_captions(pairs: CaptionPairs, mode: str) -> list[list[str]]:
    """The captions train_contrastive samples from: as written, or without nuisance phrases (images
    whose attributes carry no ``nuisance`` record, e.g. non-synthetic data, keep theirs)."""
    if mode not in CAPTION_MODES:
        raise ValueError(f"captions={mode!r}: expected one of {', '.join(CAPTION_MODES)}")
    if mode == "dataset":
        return pairs.captions
    return [[strip_nuisance(c, a["nuisance"]) for c in caps] if a.get("nuisance") else list(caps)
            for caps, a in zip(pairs.captions, pairs.attributes)]


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) image indices: a seeded permutation; at least one image on each side."""
    if count < 2:
        raise ValueError(f"need at least 2 images to hold some out, got {count}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a number strictly between 0 and 1")
    order = np.random.default_rng(seed).permutation(count)
    held = min(count - 1, max(1, round(val_fraction * count)))
    return np.sort(order[held:]), np.sort(order[:held])


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 in [-1,1] (the project's image convention)."""
    return images_uint8.float() / 127.5 - 1.0


def augment(images: torch.Tensor, crop_scale: float, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random square crops (side fraction ~ U(crop_scale, 1), anywhere inside the image) resampled
    to the input size, mirrored with probability 1/2 when ``flip``: one affine grid per image.
    Small data memorises (every synthetic image has a unique photo-id patch); this slows that down."""
    if not 0.0 < crop_scale <= 1.0:
        raise ValueError(f"crop_scale={crop_scale}: expected 0 < crop_scale <= 1")
    count = images.shape[0]
    side = crop_scale + (1.0 - crop_scale) * torch.rand(count, generator=generator)
    shift = (1.0 - side).unsqueeze(1) * (2.0 * torch.rand(count, 2, generator=generator) - 1.0)
    sign = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(count)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * sign, side
    theta[:, :, 2] = shift
    if crop_scale == 1.0 and not flip:
        return images
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only, not on gains, biases or the temperature."""
    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay}]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(encoder: ClipEncoder, pairs: CaptionPairs, rows: np.ndarray, embed_texts=None,
             caption_mode: str = "dataset") -> dict:
    """Held-out contrastive loss (first caption of each image as ``caption_mode`` gives it, batches of
    up to 256), image->caption top-1 retrieval over those captions, and zero-shot attribute accuracy."""
    from open_clip.loss import ClipLoss

    from .prompts import synthetic_attributes
    from .zeroshot import zero_shot_accuracy

    was_training = encoder.model.training
    encoder.model.eval()
    try:
        images = encoder.encode_images(to_unit_range(pairs.images[rows]))
        captions = training_captions(pairs, caption_mode)
        texts = encoder.encode_text([captions[i][0] for i in rows])
        scale = encoder.model.logit_scale.exp().float()
        losses = [float(ClipLoss()(a, b, scale)) for a, b in zip(images.split(256), texts.split(256)) if len(a) > 1]
        retrieval = float(((images @ texts.T).argmax(dim=1) == torch.arange(len(rows), device=images.device)).float().mean())
        zero_shot = zero_shot_accuracy(images, [pairs.attributes[i] for i in rows], synthetic_attributes(),
                                       embed_texts or encoder.encode_text)
    finally:
        encoder.model.train(was_training)
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"), "val_retrieval_top1": retrieval,
            "val_images": int(len(rows)), "zero_shot": zero_shot}


def train_contrastive(
    model: torch.nn.Module,
    tokenizer,
    pairs: CaptionPairs,
    train_rows: np.ndarray,
    cfg: ContrastiveTrainConfig,
    log: Optional[Callable[[dict], None]] = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` in place on ``pairs[train_rows]``; returns the logged records (step, loss, lr)."""
    from open_clip.loss import ClipLoss
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if cfg.steps < 1 or cfg.batch_size < 2:
        raise ValueError(f"steps={cfg.steps}, batch_size={cfg.batch_size}: expected steps >= 1 and batch_size >= 2")
    if len(train_rows) < 2:
        raise ValueError(f"{len(train_rows)} training image(s): a contrastive batch needs at least 2")
    pp = Preprocess.from_open_clip(model.visual.preprocess_cfg)
    device = next(model.parameters()).device
    # Tokenise every caption once; caption k of image i is row offsets[i] + k.
    captions = training_captions(pairs, cfg.captions)
    tokens = tokenizer([c for caps in captions for c in caps])
    offsets = np.cumsum([0] + [len(c) for c in captions])
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, len(train_rows))
    # The fused kernel: the foreach AdamW spent 76 of ~550 ms per CPU step on the 6.3 M-entry token table.
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.steps))
    loss_fn = ClipLoss()
    rows = torch.as_tensor(train_rows)
    order, cursor, records, running = rows[torch.randperm(len(rows), generator=generator)], 0, [], []
    model.train()
    start = time.time()
    with Progress(TextColumn("train_lvlm"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                  TimeRemainingColumn(), transient=True, disable=not progress) as bar:
        task = bar.add_task("steps", total=cfg.steps, loss="-")
        for step in range(cfg.steps):
            if cursor + batch > len(order):  # a new epoch: reshuffle
                order, cursor = rows[torch.randperm(len(rows), generator=generator)], 0
            idx = order[cursor:cursor + batch]
            cursor += batch
            images = augment(to_unit_range(pairs.images[idx]), cfg.crop_scale, cfg.flip, generator)
            pick = torch.tensor([int(offsets[i]) + int(torch.randint(len(captions[i]), (1,), generator=generator))
                                 for i in idx.tolist()])
            image_features = model.encode_image(preprocess_images(images, pp).to(device), normalize=True)
            text_features = model.encode_text(tokens[pick].to(device), normalize=True)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # open_clip's cap on the temperature (logits at most 100x cosine)
                model.logit_scale.clamp_(0, math.log(100))
            running.append(loss.item())
            bar.update(task, advance=1, loss=f"{running[-1]:.3f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                record = {"step": step + 1, "loss": float(np.mean(running)), "lr": schedule.get_last_lr()[0],
                          "logit_scale": model.logit_scale.exp().item(), "seconds": round(time.time() - start, 2)}
                running = []
                records.append(record)
                if log is not None:
                    log(record)
    model.eval()
    return records


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """The model's state dict as a plain ``torch.save`` file (what open_clip's loader reads), atomically."""
    from ..utils.files import atomic_open

    path = Path(path)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    with atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())
    return path
