"""Serving a portrait dataset (`data.format`) for training: dataset, conditioning sampler, DataModule.

Items of `PortraitDataset` (dict; a DataLoader batch stacks them, B = batch size, R = resolution):

    image           float32 (B,3,R,R)  RGB in [-1, 1]
    camera          float32 (B,25)     EG3D label; already mirrored for flipped items
    shape           float32 (B,100)    FLAME-size identity beta (never mirrored, see below)
    expression      float32 (B,50)     psi
    pose            float32 (B,6)      global/neck + jaw axis-angle
    flip            bool    (B,)       item is the x-flipped copy
    index           int64   (B,)       row of the image in the dataset (same for both copies)
    clip_embedding  float32 (B,D)      only when a CLIP cache is given

Flip augmentation (EG3D's xflip) doubles the dataset: item i >= N is image i - N mirrored. The image
and the camera are mirrored here (`geometry.cameras.mirror_labels`); FLAME-like parameters are not
closed under mirroring, so the mesh is mirrored after it is built: `observation_vertices` builds
vertices from the parameters and, for flipped items, applies the model's mirror (x -> -x plus the
left/right vertex permutation ``mirror_map``). The mirrored mesh under the mirrored camera renders
exactly onto the flipped image (tests check the silhouette overlap).

`ConditioningSampler` draws (camera, morphable parameters, flip, CLIP embedding) for fake images from
the dataset itself, as EG3D samples generator conditioning from the training labels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..geometry.cameras import mirror_labels
from ..geometry.head import observation_vertices  # noqa: F401  (part of this module's API)
from .config import DATA_KINDS, DataConfig
from .format import DatasetError, check_dataset, read_index
from .sampler import ResumableSampler

log = logging.getLogger(__name__)


def load_clip_cache(path: str | os.PathLike, names: list[str], dataset_path: str | os.PathLike | None = None,
                    stage1_checkpoint: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Embeddings (N,D) float32 for ``names`` from a cache ``.npz`` with arrays ``names`` (M,) and
    ``embeddings`` (M,D) (optionally ``embeddings_flipped`` (M,D), used for flipped items), or from a
    canonicalisation-cache directory of task=canonicalize (`canonical.cache`): that one is refused
    unless its manifest matches the dataset at ``dataset_path`` and, when given, ``stage1_checkpoint``."""
    path = Path(path)
    if path.is_dir():
        from ..canonical.cache import load_canonical_embeddings

        return load_canonical_embeddings(path, names, dataset_path=dataset_path, stage1_checkpoint=stage1_checkpoint)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise ValueError(f"CLIP cache {path}: unreadable ({type(exc).__name__}: {exc})") from None
    if "names" not in arrays or "embeddings" not in arrays:
        raise ValueError(f"CLIP cache {path}: expected arrays 'names' and 'embeddings', found {sorted(arrays)}")
    emb = arrays["embeddings"]
    if emb.ndim != 2 or emb.shape[0] != len(arrays["names"]):
        raise ValueError(f"CLIP cache {path}: 'embeddings' has shape {emb.shape}, expected ({len(arrays['names'])}, D)")
    row = {str(n): i for i, n in enumerate(arrays["names"])}
    missing = [n for n in names if n not in row]
    if missing:
        raise ValueError(f"CLIP cache {path}: no embedding for {len(missing)} images, e.g. {missing[:3]}")
    order = np.array([row[n] for n in names], dtype=np.int64)
    flipped = arrays.get("embeddings_flipped")
    if flipped is not None and flipped.shape != emb.shape:
        raise ValueError(f"CLIP cache {path}: 'embeddings_flipped' has shape {flipped.shape}, expected {emb.shape}")
    return emb[order].astype(np.float32), None if flipped is None else flipped[order].astype(np.float32)


def _by_row(emb: np.ndarray | None, rows: np.ndarray, size: int) -> np.ndarray | None:
    """(size,D) table holding ``emb`` (len(rows),D) at ``rows`` and NaN elsewhere."""
    if emb is None:
        return None
    table = np.full((size, emb.shape[1]), np.nan, np.float32)
    table[rows] = emb
    return table


class PortraitDataset(Dataset):
    """The dataset at ``path`` (folder or zip) as training items (see the module docstring).

    Refuses (DatasetError listing every problem) a dataset that `check_dataset` finds problems in,
    unless ``skip_bad``: then the items named by the problems are left out and logged; problems
    that concern the whole dataset are always fatal. Images whose size differs from ``resolution``
    are resampled (antialiased bilinear). ``verify_pixels=False`` checks image headers only
    (`check_dataset(decode=False)`), for large datasets.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int | None = None,
        flip: bool = False,
        clip_cache: str | os.PathLike | None = None,
        skip_bad: bool = False,
        verify_pixels: bool = True,
    ) -> None:
        if resolution is not None and resolution < 1:
            raise ValueError(f"resolution={resolution}: expected a positive integer or None")
        problems = check_dataset(path, decode=verify_pixels)
        fatal = [p for p in problems if p.name is None]
        if fatal or (problems and not skip_bad):
            hint = "" if fatal else "\n(set skip_bad=True to train on the other items)"
            raise DatasetError(
                f"dataset {path} has {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems) + hint
            )
        self.index = read_index(path)
        bad = {p.name for p in problems}
        if bad:
            log.warning("dataset %s: skipping %d bad item(s):\n%s", path, len(bad), "\n".join(f"  {p}" for p in problems))
        self.rows = np.array([i for i, n in enumerate(self.index.names) if n not in bad], dtype=np.int64)
        if len(self.rows) == 0:
            raise DatasetError(f"dataset {path}: no usable items left after skipping bad ones")
        self.path = Path(path)
        self.resolution = resolution
        self.flip = flip
        self.clip, self.clip_flipped = (None, None)
        if clip_cache is not None:
            # Usable rows only: a cache made with skip_bad has no embedding for the skipped images. The
            # tables stay indexed by dataset row; skipped rows are NaN and never served.
            loaded = load_clip_cache(clip_cache, [self.index.names[i] for i in self.rows], dataset_path=path)
            self.clip, self.clip_flipped = (_by_row(emb, self.rows, len(self.index.names)) for emb in loaded)

    @property
    def num_images(self) -> int:
        """Images used (without flipped copies)."""
        return len(self.rows)

    def __len__(self) -> int:
        return self.num_images * (2 if self.flip else 1)

    def _resolve(self, item: int) -> tuple[int, bool]:
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range for a dataset of {len(self)} items")
        return int(self.rows[item % self.num_images]), item >= self.num_images

    def metadata(self, item: int) -> dict[str, torch.Tensor]:
        """Everything of ``item`` except the image (cheap: no decoding)."""
        row, flipped = self._resolve(item)
        camera = torch.from_numpy(self.index.labels[row])
        if flipped:
            camera = mirror_labels(camera[None])[0]
        out = {
            "camera": camera,
            "shape": torch.from_numpy(self.index.shape[row]),
            "expression": torch.from_numpy(self.index.expression[row]),
            "pose": torch.from_numpy(self.index.pose[row]),
            "flip": torch.tensor(flipped),
            "index": torch.tensor(row, dtype=torch.int64),
        }
        if self.clip is not None:
            table = self.clip_flipped if (flipped and self.clip_flipped is not None) else self.clip
            out["clip_embedding"] = torch.from_numpy(table[row])
        return out

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        out = self.metadata(item)
        row, flipped = self._resolve(item)
        pixels = torch.from_numpy(self.index.read_image(row).copy()).permute(2, 0, 1).float()
        if self.resolution is not None and pixels.shape[-1] != self.resolution:
            pixels = F.interpolate(pixels[None], size=(self.resolution,) * 2, mode="bilinear", antialias=True)[0]
        if flipped:
            pixels = pixels.flip(-1)
        out["image"] = (pixels / 127.5 - 1.0).clamp(-1, 1)
        return out


class ConditioningSampler:
    """Draws conditioning for fake images from the dataset's own labels (uniformly over items,
    flipped copies included): camera, shape, expression, pose, flip and, when the dataset has a CLIP
    cache, clip_embedding. Reproducible for a seed; the tables live on ``device``."""

    def __init__(self, dataset: PortraitDataset, seed: int = 0, device: torch.device | str = "cpu") -> None:
        index, rows = dataset.index, dataset.rows
        copies = 2 if dataset.flip else 1
        camera = torch.from_numpy(index.labels[rows])
        tables = {
            "camera": torch.cat((camera, mirror_labels(camera))) if dataset.flip else camera,
            "shape": torch.from_numpy(index.shape[rows]).repeat(copies, 1),
            "expression": torch.from_numpy(index.expression[rows]).repeat(copies, 1),
            "pose": torch.from_numpy(index.pose[rows]).repeat(copies, 1),
            "flip": torch.arange(len(dataset)) >= len(rows),
        }
        if dataset.clip is not None:
            clip = torch.from_numpy(dataset.clip[rows])
            flipped = clip if dataset.clip_flipped is None else torch.from_numpy(dataset.clip_flipped[rows])
            tables["clip_embedding"] = torch.cat((clip, flipped)) if dataset.flip else clip
        self.tables = {k: v.to(device) for k, v in tables.items()}
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.tables["camera"])

    def to(self, device: torch.device | str) -> "ConditioningSampler":
        self.tables = {k: v.to(device) for k, v in self.tables.items()}
        return self

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        pick = torch.randint(len(self), (batch_size,), generator=self.generator)
        device = self.tables["camera"].device
        return {k: v[pick.to(device)] for k, v in self.tables.items()}


class PortraitDataModule(L.LightningDataModule):
    """Training data of `DataConfig`: generates the synthetic dataset when asked and missing
    (``prepare_data``, rank 0), serves an endless stream of shuffled batches (`ResumableSampler`:
    one shard per rank, a new seeded permutation per epoch), and exposes ``conditioning`` (a
    `ConditioningSampler` seeded per rank) for the fake images.

    ``resume_at(batches)`` makes the next ``train_dataloader`` continue after that many batches of
    this rank, so a resumed run sees exactly the items the uninterrupted run would have seen. Use
    ``Trainer(use_distributed_sampler=False)``: the sharding is done here.
    """

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        if cfg.kind not in DATA_KINDS:
            raise ValueError(f"data.kind={cfg.kind!r}: expected one of {DATA_KINDS}")
        for name in ("resolution", "batch_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"data.{name}={getattr(cfg, name)}: expected >= 1")
        if cfg.num_workers < 0:
            raise ValueError(f"data.num_workers={cfg.num_workers}: expected >= 0")
        self.cfg = cfg
        self.dataset: PortraitDataset | None = None
        self.conditioning: ConditioningSampler | None = None
        self.start_batch = 0

    def resume_at(self, batches: int) -> None:
        if batches < 0:
            raise ValueError(f"resume_at({batches}): expected >= 0 batches")
        self.start_batch = int(batches)

    @property
    def dataset_path(self) -> Path:
        path = Path(self.cfg.path)
        if self.cfg.kind == "synthetic" and self.cfg.synthetic.as_zip and path.suffix != ".zip":
            path = path.with_name(path.name + ".zip")
        return path

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def prepare_data(self) -> None:
        if self.cfg.kind == "synthetic":
            from .synthetic import generate_synthetic

            generate_synthetic(self.cfg.synthetic, self.cfg.path)
        elif not self.dataset_path.exists():
            raise FileNotFoundError(f"data.path={self.cfg.path}: no dataset there (data.kind={self.cfg.kind})")

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        cfg = self.cfg
        self.dataset = PortraitDataset(
            self.dataset_path, cfg.resolution, cfg.flip, cfg.clip_cache, cfg.skip_bad, cfg.verify_pixels
        )
        _, rank = self._rank()
        self.conditioning = ConditioningSampler(self.dataset, seed=cfg.seed + 1 + rank)

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            raise RuntimeError("PortraitDataModule.setup() must run before train_dataloader()")
        world, rank = self._rank()
        sampler = ResumableSampler(len(self.dataset), num_replicas=world, rank=rank, seed=self.cfg.seed,
                                   start=self.start_batch * self.cfg.batch_size)
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            # Its own generator: creating the loader's iterator must not draw from the global RNG,
            # or a resumed run would drift from the uninterrupted one.
            generator=torch.Generator().manual_seed(self.cfg.seed + rank),
            num_workers=self.cfg.num_workers,
            pin_memory=self.cfg.pin_memory,
            drop_last=True,
            persistent_workers=self.cfg.persistent_workers and self.cfg.num_workers > 0,
        )
