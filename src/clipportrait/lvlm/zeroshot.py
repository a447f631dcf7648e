"""Zero-shot attribute classification with prompt ensembles (accuracy against chance)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .prompts import PROMPT_TEMPLATES, ZeroShotAttribute, class_prompts


def class_embeddings(embed_texts: Callable[[list[str]], torch.Tensor], attribute: ZeroShotAttribute,
                     templates: tuple[str, ...] = PROMPT_TEMPLATES) -> torch.Tensor:
    """(C,D) unit class embeddings: per value, the normalised mean of its prompts' unit embeddings."""
    per_class = [class_prompts(attribute.phrases[v], templates) for v in attribute.values]
    emb = embed_texts([p for prompts in per_class for p in prompts]).float()
    means = [chunk.mean(dim=0) for chunk in emb.split([len(p) for p in per_class])]
    return torch.nn.functional.normalize(torch.stack(means), dim=-1)


def zero_shot_accuracy(
    image_embeddings: torch.Tensor,
    labels: Sequence[dict],
    attributes: Sequence[ZeroShotAttribute],
    embed_texts: Callable[[list[str]], torch.Tensor],
    templates: tuple[str, ...] = PROMPT_TEMPLATES,
) -> dict[str, dict]:
    """Per attribute: accuracy of argmax cosine similarity over the vocabulary on the images it applies
    to, against chance (1/|vocabulary|) and the majority-class rate; ``labels[i]`` is image i's
    attribute dict. Attributes that apply to no image are left out."""
    if len(labels) != len(image_embeddings):
        raise ValueError(f"{len(labels)} label dicts for {len(image_embeddings)} image embeddings")
    results = {}
    for attribute in attributes:
        rows = [i for i, a in enumerate(labels) if attribute.applies(a)]
        if not rows:
            continue
        truth = torch.tensor([attribute.values.index(labels[i][attribute.name]) for i in rows])
        classes = class_embeddings(embed_texts, attribute, templates).to(image_embeddings.device)
        predicted = (image_embeddings[rows].float() @ classes.T).argmax(dim=1).cpu()  # any device in, CPU out
        counts = torch.bincount(truth, minlength=len(attribute.values))
        results[attribute.name] = {
            "accuracy": float((predicted == truth).float().mean()),
            "chance": 1.0 / len(attribute.values),
            "majority": float(counts.max()) / len(rows),
            "images": len(rows),
            "vocabulary": [str(v) for v in attribute.values],
        }
    return results
