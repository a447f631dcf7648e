"""Modality-gap correction: move text embeddings toward where the image embeddings live.

Stage 2 is trained on image embeddings r_x of the canonicalisation cache, but at inference a text
embedding r_t takes their place (paper sec. 2). CLIP's image and text embeddings occupy different
cones of the sphere (the "modality gap"), so T_G meets inputs unlike any it was trained on. The
correction estimates the gap as one constant vector,

    offset = mean_x r_x  -  mean_c E_T(c)

(mean image embedding of the cache minus the mean text embedding of the captions of the dataset the
cache was made from: the one its manifest names, checked by content hash), and feeds T_G
normalise(r_t + offset)  instead of r_t.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

MODES = ("none", "mean_offset")


def mean_cache_embedding(cache: str | Path) -> tuple[torch.Tensor, int]:
    """(mean (D,), count) of the image embeddings of a CLIP cache: a task=canonicalize directory
    (``r`` and ``r_flipped`` of every shard) or a ``.npz`` with ``embeddings`` [+ ``embeddings_flipped``]."""
    cache = Path(cache)
    total, count = None, 0

    def add(array: np.ndarray) -> None:
        nonlocal total, count
        array = np.asarray(array, dtype=np.float64)
        total = array.sum(0) if total is None else total + array.sum(0)
        count += array.shape[0]

    if cache.is_dir():
        from ..canonical.cache import iter_shards

        for shard in iter_shards(cache):
            add(shard["r"])
            add(shard["r_flipped"])
    elif cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                add(npz["embeddings"])
                if "embeddings_flipped" in npz.files:
                    add(npz["embeddings_flipped"])
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"CLIP cache {cache}: unreadable as a cache with 'embeddings' ({err})") from None
    else:
        raise UserError(f"CLIP cache {cache}: no such file or directory (modality_gap=mean_offset needs the cache the "
                        "checkpoint was trained on: set task.clip_cache)")
    if not count:
        raise UserError(f"CLIP cache {cache}: holds no embeddings")
    return torch.from_numpy(total / count).float(), count


def caption_dataset(cache: str | Path, data_path: str | Path) -> Path:
    """The dataset whose captions give the text mean: the one the image embeddings of ``cache`` were
    made from. A canonicalisation cache's manifest names it (path and content hash): that path when it
    is here, else ``data_path`` (data.path, a copy); either one found, and data.path whenever it exists,
    must hash to the manifest's dataset hash (UserError naming both otherwise). A ``.npz`` cache names
    no dataset: ``data_path`` is taken on trust."""
    cache, data_path = Path(cache), Path(data_path)
    if not cache.is_dir():
        return data_path
    from ..canonical.cache import read_manifest
    from ..data.format import DatasetError
    from ..metrics.evaluation import dataset_content_hash

    manifest = read_manifest(cache)
    expected, recorded = manifest.get("dataset_hash"), (manifest.get("dataset") or {}).get("path")
    found = [p for p in ([Path(recorded)] if recorded else []) + [data_path] if p.exists()]
    if not found:
        raise UserError(f"modality_gap=mean_offset takes its captions from the dataset CLIP cache {cache} was made "
                        f"from, {recorded}, which is not here, nor is data.path={data_path}: set data.path to that "
                        "dataset")
    for path in found:
        what = f"data.path={data_path}" if path == data_path else f"the cache's dataset {path}"
        try:
            actual = dataset_content_hash(path)
        except (OSError, DatasetError) as err:
            raise UserError(f"modality_gap=mean_offset: {what} is unreadable as a dataset ({err})") from None
        if actual != expected:
            raise UserError(f"modality_gap=mean_offset: {what} is not the dataset CLIP cache {cache} was made from "
                            f"({recorded}): its content hash is {actual}, the manifest's {expected}; set data.path "
                            "to that dataset (or run task=canonicalize on this one)")
    return found[0]


def dataset_captions(dataset_path: str | Path) -> list[str]:
    """Every caption of the dataset's attributes.json (data.synthetic.make_captions writes them)."""
    from ..data.format import DatasetError, read_index

    try:
        index = read_index(dataset_path)
    except (FileNotFoundError, DatasetError) as err:
        raise UserError(f"dataset {dataset_path}: no captions to estimate the modality gap from ({err})") from None
    if index.attributes is None:
        raise UserError(f"dataset {dataset_path}: no attributes.json, so no captions to estimate the modality gap "
                        "from (modality_gap=mean_offset needs the dataset's captions)")
    captions = [c for entry in index.attributes.values() for c in entry.get("captions", []) if str(c).strip()]
    if not captions:
        raise UserError(f"dataset {dataset_path}: attributes.json has no captions")
    return captions


@dataclass
class ModalityGap:
    """The offset of the module docstring and the facts it was estimated from."""

    offset: torch.Tensor  # (D,)
    images: int
    captions: int
    cache: str
    dataset: str

    @classmethod
    def estimate(cls, clip, cache: str | Path, data_path: str | Path) -> "ModalityGap":
        """The offset of ``cache``'s images and the captions of its dataset (``caption_dataset``)."""
        image_mean, images = mean_cache_embedding(cache)
        dataset_path = caption_dataset(cache, data_path)
        captions = dataset_captions(dataset_path)
        text_mean = clip.encode_text(captions).double().mean(0).float().cpu()
        if text_mean.shape != image_mean.shape:
            raise UserError(f"CLIP cache {cache} holds {image_mean.shape[0]}-d embeddings but the LVLM "
                            f"{clip.model_id} embeds text in {text_mean.shape[0]} dimensions: use the LVLM the cache "
                            "was made with")
        return cls(image_mean - text_mean, images, len(captions), str(cache), str(dataset_path))

    def to(self, device: torch.device | str) -> "ModalityGap":
        """The same correction with its offset on ``device`` (so ``apply`` copies nothing there)."""
        return replace(self, offset=self.offset.to(device))

    def apply(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """normalise(r_t + offset) for (B,D) text embeddings."""
        return F.normalize(text_embeddings + self.offset.to(text_embeddings), dim=-1)

    def summary(self) -> dict:
        return {"mode": "mean_offset", "offset_norm": float(self.offset.norm()), "images": self.images,
                "captions": self.captions, "cache": self.cache, "dataset": self.dataset}
