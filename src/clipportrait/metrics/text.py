"""Text-side quality metrics of Stage 2 (paper sec. 3.4-3.5, sec. 5 "Metrics"; issue 8).

- `clip_score`: how well each generated image matches its prompt, 100 * max(cos(E_I(x), E_T(t)), 0)
  with the CLIP backbone recorded, since scores from different backbones are not comparable.
- `diversity`: mean pairwise LPIPS among samples that share one prompt, averaged over prompts; the
  collapse that the Jacobian regulariser R_r (eq. 19-20) prevents shows up as a low value.

Both are plain functions over tensors so training callbacks and `task=generate` share them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import combinations

import torch
import torch.nn.functional as F


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor (B,3,H,W) in [-1,1], got {images.dtype} {tuple(images.shape)}")


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = values.double()
    return float(values.mean()), float(values.std(unbiased=True)) if len(values) > 1 else 0.0


@torch.no_grad()
def clip_score(clip, images: torch.Tensor, texts_or_embeddings: Sequence[str] | torch.Tensor) -> dict:
    """CLIP score of ``images`` (B,3,H,W) in [-1,1] against their prompts.

    ``clip``: a `clipportrait.lvlm.clip.ClipEncoder` (or anything with its ``encode_images``,
    ``encode_text``, ``model_id`` and ``arch``). ``texts_or_embeddings``: B prompts, or (B,D) text
    embeddings computed earlier by the same backbone (normalised here). Per image
    100 * max(cos, 0); the mean and the sample standard deviation over images.
    """
    _check_images(images)
    batch = images.shape[0]
    if batch == 0:
        raise ValueError("images: empty batch; a CLIP score needs at least one image")
    if isinstance(texts_or_embeddings, torch.Tensor):
        text = texts_or_embeddings.detach().float()
        if text.ndim != 2 or text.shape[0] != batch:
            raise ValueError(f"text embeddings: expected ({batch}, D), got {tuple(text.shape)}")
        source = "embeddings"
    else:
        if isinstance(texts_or_embeddings, str):
            raise TypeError("texts_or_embeddings: expected a list of B prompts, got one string")
        texts = list(texts_or_embeddings)
        if len(texts) != batch:
            raise ValueError(f"texts: {len(texts)} prompts for {batch} images")
        text = clip.encode_text(texts).float()
        source = "texts"
    image = clip.encode_images(images).float()
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"text embeddings have D={text.shape[1]}, but {clip.model_id} embeds images in D={image.shape[1]}")
    cosine = (F.normalize(image, dim=-1) * F.normalize(text.to(image.device), dim=-1)).sum(-1)
    per_image = 100.0 * cosine.clamp_min(0.0)
    mean, std = _mean_std(per_image)
    return {"clip_score": mean, "clip_score_std": std, "per_image": per_image.cpu().tolist(), "num_images": batch,
            "backbone": clip.model_id, "arch": clip.arch, "text_source": source}


@torch.no_grad()
def diversity(images: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor, lpips: torch.nn.Module,
              batch_size: int = 64) -> dict:
    """Mean pairwise LPIPS among images that share a group (one prompt), averaged over groups.

    ``images`` (B,3,H,W) in [-1,1]; ``group_ids`` one hashable per image (prompt text or index);
    ``lpips``: the module of `clipportrait.metrics.lpips.build_lpips`. Each unordered pair within a
    group counts once; groups with a single image have no pairs and are listed in ``singletons``.
    Returns the average over groups of the per-group means, the per-group means, the pair counts
    and the LPIPS trunk used.
    """
    _check_images(images)
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if len(ids) != images.shape[0]:
        raise ValueError(f"group_ids: {len(ids)} ids for {images.shape[0]} images")
    members: dict[Hashable, list[int]] = {}
    for k, gid in enumerate(ids):
        members.setdefault(gid, []).append(k)
    pairs = [(i, j, gid) for gid, rows in members.items() for i, j in combinations(rows, 2)]
    if not pairs:
        raise ValueError(f"diversity: no group has two images ({len(members)} groups of one); "
                         f"draw several seeds per prompt")
    device = next(lpips.parameters()).device
    distances = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        first = images[[i for i, _, _ in chunk]].to(device)
        second = images[[j for _, j, _ in chunk]].to(device)
        distances.append(lpips(first, second).flatten().double().cpu())
    distance = torch.cat(distances)
    per_group: dict[Hashable, float] = {}
    pair_counts: dict[Hashable, int] = {}
    for gid in members:
        sel = torch.tensor([g == gid for _, _, g in pairs])
        if sel.any():
            per_group[gid] = float(distance[sel].mean())
            pair_counts[gid] = int(sel.sum())
    values = torch.tensor(list(per_group.values()), dtype=torch.float64)
    mean, std = _mean_std(values)
    return {"diversity": mean, "diversity_std_over_groups": std, "per_group": per_group,
            "pairs_per_group": pair_counts, "num_pairs": len(pairs), "num_groups": len(per_group),
            "singletons": [gid for gid, rows in members.items() if len(rows) == 1],
            "lpips_net": getattr(lpips, "pnet_type", type(lpips).__name__)}
