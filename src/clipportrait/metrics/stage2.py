"""Text-to-portrait evaluation of a Stage-2 model on the synthetic world (issue 8's metrics).

For every prompt of a closed set ("a photo of a person with red hair", ...), ``samples_per_prompt``
latents z are rendered under ONE conditioning (camera + morphable parameters drawn from the dataset
with a seed per prompt), so what differs between a prompt's samples is z alone. Measured:

- CLIP score: 100 max(cos(E_img(x), E_txt(prompt)), 0) with the given CLIP (backbone recorded);
- diversity: mean pairwise LPIPS among a prompt's samples (the distribution collapse of sec. 3.5
  shows up as a fall of this number: G ignores z once r is given);
- text-control accuracy: the prompt's colour read back by a `ColorProbe` calibrated on real images
  (the probe's own held-out accuracy on real images is the ceiling);
- geometry accuracy: silhouette IoU between the generated alpha and the morphable mesh.

At inference the text embedding replaces the image embedding (paper sec. 2); ``modality_offset``
(optional) is added to it before normalisation (the mean image-minus-text offset, see task=generate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lvlm.prompts import PROMPT_TEMPLATES, synthetic_attributes

COLOR_ATTRIBUTES = ("hair_color", "eye_color", "skin_tone")


@dataclass
class TextEvalConfig:
    attributes: list[str] = field(default_factory=lambda: list(COLOR_ATTRIBUTES))
    values_per_attribute: int = 4  # the first N values of each vocabulary (0: all)
    samples_per_prompt: int = 6
    alpha: float = 1.0
    truncation_psi: float = 1.0
    seed: int = 0
    batch_size: int = 16

    def validate(self) -> None:
        unknown = sorted(set(self.attributes) - set(COLOR_ATTRIBUTES))
        if unknown or not self.attributes:
            raise ValueError(f"text evaluation attributes={list(self.attributes)}: expected a non-empty subset of "
                             f"{COLOR_ATTRIBUTES}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt}: expected >= 2 (diversity needs pairs)")
        if self.values_per_attribute < 0 or self.batch_size < 1:
            raise ValueError(f"values_per_attribute={self.values_per_attribute}, batch_size={self.batch_size}: "
                             "expected >= 0 and >= 1")


def synthetic_prompts(attributes, values_per_attribute: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, attribute, value) for the colour attributes, phrased like the synthetic captions."""
    vocab = {a.name: a for a in synthetic_attributes()}
    out = []
    for name in attributes:
        values = vocab[name].values
        if values_per_attribute > 0:
            values = values[:values_per_attribute]
        phrase = {"hair_color": "with short {} hair", "eye_color": "with {} eyes", "skin_tone": "with {} skin"}[name]
        out += [(PROMPT_TEMPLATES[0].format(phrase.format(v)), name, str(v)) for v in values]
    return out


@torch.no_grad()
def evaluate_text_control(system, clip, dataset, settings: TextEvalConfig, lpips: torch.nn.Module | None = None,
                          probes: dict | None = None, device: torch.device | str = "cpu",
                          modality_offset: torch.Tensor | None = None) -> dict:
    """The numbers of the module docstring for a Stage-2 ``system`` (EMA generator, constant noise).
    ``probes``: attribute -> fitted `ColorProbe` (accuracy is skipped for attributes without one);
    ``lpips``: module of `metrics.lpips.build_lpips` (diversity is skipped without it). Returns the
    means, per-attribute values, the protocol, and ``images`` (P, n, 3, R, R) on the CPU."""
    from ..data.datamodule import ConditioningSampler
    from .control import silhouette_iou, text_control_accuracy
    from .text import clip_score, diversity

    settings.validate()
    device = torch.device(device)
    prompts = synthetic_prompts(settings.attributes, settings.values_per_attribute)
    n = settings.samples_per_prompt
    # The CLIP score compares each image with its prompt's own text embedding; only T_G's input is
    # gap-corrected (scoring against the corrected vector would compare images with image-like vectors).
    prompt_texts = clip.encode_text([p for p, _, _ in prompts]).float().to(device)
    texts = prompt_texts
    if modality_offset is not None:
        texts = torch.nn.functional.normalize(prompt_texts + modality_offset.to(device), dim=1)
    all_images, all_alpha, conds = [], [], []
    for k in range(len(prompts)):
        sampler = ConditioningSampler(dataset, seed=settings.seed * 7919 + k, device=device)
        row = sampler.sample(1)
        cond = {key: value.expand(n, *value.shape[1:]).to(device) for key, value in row.items()}
        cond["clip_embedding"] = texts[k:k + 1].expand(n, -1)
        cond["alpha"] = torch.full((n,), float(settings.alpha), device=device)
        z = torch.randn(n, system.cfg.backbone.z_dim, generator=torch.Generator().manual_seed(settings.seed * 104729 + k))
        images, alphas = [], []
        for start in range(0, n, settings.batch_size):
            part = {key: value[start:start + settings.batch_size] for key, value in cond.items()}
            out = system.generate(z[start:start + settings.batch_size].to(device), part, G=system.G_ema,
                                  noise_mode="const", truncation_psi=settings.truncation_psi)
            images.append(out["image"].float().clamp(-1, 1))
            alphas.append(out["image_alpha"].float())
        all_images.append(torch.cat(images))
        all_alpha.append(torch.cat(alphas))
        conds.append(cond)
    images = torch.stack(all_images)  # (P, n, 3, R, R)
    flat = images.flatten(0, 1)
    cond_all = {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    result: dict = {"prompts": [p for p, _, _ in prompts], "per_attribute": {}}
    scores = clip_score(clip, flat, prompt_texts.repeat_interleave(n, dim=0))
    result["clip_score"] = scores["clip_score"]
    result["clip_backbone"] = scores["backbone"]
    iou = silhouette_iou(torch.cat(all_alpha), cond_all, system.geometry.morphable)
    result["silhouette_iou"] = iou["silhouette_iou"]
    if lpips is not None:
        groups = torch.arange(len(prompts)).repeat_interleave(n)
        div = diversity(flat.to(device), groups.tolist(), lpips.to(device))
        result["diversity_lpips"] = div["diversity"]
    for attribute in settings.attributes:
        rows = [k for k, (_, a, _) in enumerate(prompts) if a == attribute]
        per = {"prompts": len(rows)}
        if probes and attribute in probes:
            # Only the values the probe was calibrated on can be read back (a small dataset may lack some).
            unknown = [prompts[k][2] for k in rows if prompts[k][2] not in probes[attribute].classes]
            rows = [k for k in rows if prompts[k][2] in probes[attribute].classes]
            per["values_without_probe_class"] = unknown
        if probes and attribute in probes and rows:
            idx = torch.tensor([k * n + j for k in rows for j in range(n)])
            sub = {key: value[idx.to(value.device)] for key, value in cond_all.items()}
            acc = text_control_accuracy(probes[attribute], flat[idx], sub,
                                        [prompts[k][2] for k in rows for _ in range(n)])
            per.update(accuracy=acc["accuracy"], ceiling=acc["ceiling"], chance=acc["chance"],
                       unmeasured=acc["num_unmeasured"])
        result["per_attribute"][attribute] = per
    accuracies = [v["accuracy"] for v in result["per_attribute"].values() if "accuracy" in v and v["accuracy"] == v["accuracy"]]
    if accuracies:
        result["text_control_accuracy"] = sum(accuracies) / len(accuracies)
    result["protocol"] = {"samples_per_prompt": n, "alpha": settings.alpha, "truncation_psi": settings.truncation_psi,
                          "seed": settings.seed, "conditioning": "one dataset row per prompt, z varies",
                          "modality_offset": modality_offset is not None, "clip": clip.model_id}
    result["images"] = images.cpu()
    return result


@torch.no_grad()
def embedding_collapse(system, dataset, rows: int = 16, samples: int = 8, lpips: torch.nn.Module | None = None,
                       seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 16) -> dict:
    """The distribution collapse of sec. 3.5 measured at image embeddings the model trained on.

    For ``rows`` dataset rows drawn with ``seed`` (each with its cached r_x-hat, camera and morphable
    parameters; ``dataset`` must carry a CLIP cache), ``samples`` latents z are mapped to w (EMA
    mapping, psi = 1) and aligned, w_r = w + T_G(w, r) (eq. 11, alpha = 1). Returned:

    - ``w_retention``: mean over rows of mean pairwise ||w_r(z_i) - w_r(z_j)|| / ||w(z_i) - w(z_j)||
      (the same z pairs). 1 while T_G adds a function of r only (zero-initialised T_G at step 0);
      0 when w_r no longer depends on z, i.e. p(x | r) is a delta: the collapse itself, in W;
    - ``diversity_alpha1`` / ``diversity_alpha0`` (with ``lpips``): mean pairwise LPIPS among a row's
      images at alpha = 1 and at alpha = 0 (the unconditioned generator, same z, camera and mesh).
    """
    from itertools import combinations

    from ..data.datamodule import ConditioningSampler
    from .text import diversity

    if dataset.clip is None:
        raise ValueError("embedding_collapse: the dataset carries no CLIP cache (PortraitDataset(clip_cache=...))")
    if rows < 1 or samples < 2:
        raise ValueError(f"rows={rows}, samples={samples}: expected rows >= 1 and samples >= 2 (pairs are compared)")
    device = torch.device(device)
    G = system.G_ema
    sampler = ConditioningSampler(dataset, seed=seed, device=device)
    table = sampler.sample(rows)
    gen = torch.Generator().manual_seed(seed * 104729 + 1)
    pairs = torch.tensor(list(combinations(range(samples), 2)))
    ratios, images = [], {1.0: [], 0.0: []}
    for k in range(rows):
        z = torch.randn(samples, system.cfg.backbone.z_dim, generator=gen).to(device)
        w = G.mapping(z)[:, 0].float()
        r = table["clip_embedding"][k:k + 1].expand(samples, -1).to(device)
        w_r = w + G.align(w, r)
        spread = (w[pairs[:, 0]] - w[pairs[:, 1]]).norm(dim=1).mean()
        ratios.append(float((w_r[pairs[:, 0]] - w_r[pairs[:, 1]]).norm(dim=1).mean() / spread))
        if lpips is None:
            continue
        cond = {key: value[k:k + 1].expand(samples, *value.shape[1:]) for key, value in table.items()}
        for alpha in images:
            cond["alpha"] = torch.full((samples,), alpha, device=device)
            out = [system.generate(z[s:s + batch_size], {key: v[s:s + batch_size] for key, v in cond.items()},
                                   G=G, noise_mode="const")["image"].float().clamp(-1, 1)
                   for s in range(0, samples, batch_size)]
            images[alpha].append(torch.cat(out))
    result = {"w_retention": sum(ratios) / rows, "w_retention_per_row": ratios,
              "protocol": {"rows": rows, "samples": samples, "seed": seed, "alpha": 1.0, "truncation_psi": 1.0,
                           "conditioning": "cached image embedding, camera and mesh of one dataset row; z varies"}}
    if lpips is not None:
        groups = torch.arange(rows).repeat_interleave(samples).tolist()
        for alpha, name in ((1.0, "diversity_alpha1"), (0.0, "diversity_alpha0")):
            result[name] = diversity(torch.cat(images[alpha]).to(device), groups, lpips.to(device))["diversity"]
    return result
