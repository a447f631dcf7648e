"""FID / KID of a generator under EG3D's ``fid50k_full`` protocol.

The paper (Sec. 5, "Metrics") reports FID [15] and KID [3] of random samples whose 3DMM coefficients
are "the given 3DMM coefficients associated with the samples"; EG3D's ``fid50k_full`` fixes the rest:

- real side: Inception pool features of EVERY image of the training set, without x-flips (optionally
  only the first ``max_items``), cached on disk as `RealStatistics`;
- fake side: ``num_fakes`` (50k) images, z ~ N(0, I), conditioning (camera label + shape, expression,
  pose, clip embedding) drawn uniformly from the dataset's own items (`ConditioningSampler`'s tables);
- features: the offline FID Inception with StyleGAN's preprocessing (`metrics.fid`);
- FID = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) and KID = unbiased MMD^2 with the kernel
  (x.y / d + 1)^3 averaged over random subsets, both computed by torchmetrics from the features.

Determinism and DDP: fake item i uses z and a conditioning row drawn from a generator seeded by
(seed, i) (`item_latents`), and rank r of W makes items r, r+W, ... (`shard_items`). The features of
all ranks are gathered back into item order before FID/KID are computed, so 1 or N ranks give the
same fakes, the same feature matrices and therefore the same numbers (KID subsets are drawn from a
generator seeded by ``seed``). The real features are computed the same way, sharded over ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from ..data.datamodule import ConditioningSampler, PortraitDataset
from ..data.format import DatasetIndex, read_index
from ..utils.console import progress
from ..utils.files import atomic_open

log = logging.getLogger(__name__)
T = TypeVar("T")

STATS_FORMAT = 1  # bump when the cached file layout or the real-image pipeline changes
STATS_DIR = "fid_stats"
_UPDATE_CHUNK = 8192  # rows per torchmetrics update: bounds the float64 (rows, D) temporaries


# --------------------------------------------------------------------------------------------------
# Feature extractor and generator interfaces


@dataclass(frozen=True)
class FeatureExtractor:
    """A feature network and the facts the protocol record needs about it.

    ``network`` maps images (B,3,H,W), uint8 0..255 or float in [-1, 1], to (B, D) features.
    """

    network: nn.Module
    sha256: str  # of the weights file: part of the real-statistics cache key
    name: str
    resize: str


def fid_feature_extractor(device: torch.device | str | None = None, weights: str | Path | None = None) -> FeatureExtractor:
    """The FID Inception of `metrics.fid` (offline asset unless ``weights`` is given) with its hash."""
    from ..assets.resolvers import ASSETS
    from .fid import build_fid_inception

    network = build_fid_inception(device, weights)
    if weights is None:
        sha256 = ASSETS["fid-inception"].sha256
    else:
        with open(weights, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    name = "FID Inception-v3 (TF 2015-12-05 weights), 2048-d pool features"
    return FeatureExtractor(network, sha256, name, f"{network.resize} bilinear to 299")


class Generate(Protocol):
    """What the evaluation calls: ``generate(z (B, z_dim), cond) -> images (B,3,R,R) in [-1, 1]``.

    ``cond`` holds the keys of `ConditioningSampler.sample` (camera, shape, expression, pose, flip and
    clip_embedding when the dataset has one), on the evaluation device. The caller binds the
    generator, its EMA weights and noise mode; the call runs under ``torch.no_grad``.
    """

    z_dim: int

    def __call__(self, z: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor: ...


@dataclass
class BoundGenerator:
    """A plain function plus its latent size, satisfying `Generate`."""

    fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
    z_dim: int

    def __call__(self, z: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(z, cond)


def check_generated(images: object, batch: int, what: str = "generate") -> torch.Tensor:
    """``images`` if it is a finite floating (batch, 3, H, W) tensor; ValueError naming the fault."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what} returned {type(images).__name__}; expected a tensor (B,3,R,R) in [-1, 1]")
    if images.ndim != 4 or images.shape[0] != batch or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"{what} returned {images.dtype} {tuple(images.shape)}; expected floating ({batch}, 3, R, R) in [-1, 1]"
        )
    bad = (~torch.isfinite(images)).flatten(1).any(1)
    if bool(bad.any()):
        raise ValueError(f"{what} returned non-finite values in {int(bad.sum())} of {batch} images")
    return images


# --------------------------------------------------------------------------------------------------
# Ranks, items and per-item randomness


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_items(num_items: int, rank: int, world_size: int) -> range:
    """Items of ``rank``: r, r + W, r + 2W, ... below ``num_items`` (every item on exactly one rank)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    if num_items < 0:
        raise ValueError(f"num_items={num_items}: expected >= 0")
    return range(rank, num_items, world_size)


def item_seed(seed: int, item: int) -> int:
    """A well-mixed 63-bit seed for (seed, item); numpy's SeedSequence hashes the pair."""
    if seed < 0 or item < 0:
        raise ValueError(f"seed={seed}, item={item}: expected non-negative integers")
    return int(np.random.SeedSequence([seed, item]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def item_latents(items: Iterable[int], z_dim: int, num_conditions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z (n, z_dim) float32 and conditioning rows (n,) int64 of ``items``; item i's values depend only
    on (seed, i), so they are the same whichever rank or batch draws them."""
    if z_dim < 1 or num_conditions < 1:
        raise ValueError(f"z_dim={z_dim}, num_conditions={num_conditions}: expected >= 1")
    zs, rows = [], []
    for item in items:
        g = torch.Generator().manual_seed(item_seed(seed, item))
        zs.append(torch.randn(z_dim, generator=g))
        rows.append(torch.randint(num_conditions, (1,), generator=g))
    if not zs:
        return torch.empty(0, z_dim), torch.empty(0, dtype=torch.int64)
    return torch.stack(zs), torch.cat(rows)


def gather_in_item_order(local: torch.Tensor, num_items: int) -> torch.Tensor:
    """Rows of all ranks (rank r holds items r, r+W, ... in order) as one (num_items, ...) tensor in
    item order, on every rank. Identity without an initialised process group."""
    rank, world = rank_and_world()
    expected = len(shard_items(num_items, rank, world))
    if local.shape[0] != expected:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows; expected {expected} of {num_items} items")
    if world == 1:
        return local
    per_rank = math.ceil(num_items / world)
    padded = local.new_zeros(per_rank, *local.shape[1:])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    out = local.new_empty(num_items, *local.shape[1:])
    for r, part in enumerate(parts):
        out[r::world] = part[: len(shard_items(num_items, r, world))]
    return out


def _all_ranks_true(flag: bool, device: torch.device) -> bool:
    rank, world = rank_and_world()
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _from_rank0(value: str, device: torch.device) -> str:
    rank, world = rank_and_world()
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, device=device)
    return box[0]


def _bar(items: Iterable[T], description: str, total: int, show: bool) -> Iterator[T]:
    return progress(items, description, total=total) if show else iter(items)


# --------------------------------------------------------------------------------------------------
# Dataset identity


def _index_content_hash(index: DatasetIndex, show_progress: bool = False) -> str:
    h = hashlib.sha256(b"clipportrait-dataset-content-v1\0")
    h.update(json.dumps(index.names).encode("utf-8") + b"\0")
    for key, array in (("labels", index.labels), ("shape", index.shape), ("expression", index.expression), ("pose", index.pose)):
        data = np.ascontiguousarray(array, dtype="<f4")
        h.update(f"{key}{data.shape}".encode("ascii"))
        h.update(data.tobytes())
    # Raw file bytes, length-prefixed so file boundaries are part of the hash; no decoding.
    for name in _bar(index.names, "hashing dataset", len(index.names), show_progress):
        data = index.files.read_bytes(name)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _stat_signature(index: DatasetIndex) -> str:
    """What the content hash depends on, by file metadata only: size, modification and change times and
    inode of the zip, or of the label/parameter files and every listed image of a folder."""
    from ..data.format import LABELS_FILE, MORPHABLE_FILE

    files = index.files
    h = hashlib.sha256(b"clipportrait-dataset-stat-v1\0")
    paths = [files.root] if files.is_zip else [files.root / n for n in (LABELS_FILE, MORPHABLE_FILE, *index.names)]
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            h.update(f"{path.name}\0missing\0".encode())
            continue
        name = path.relative_to(files.root) if path != files.root else ""
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0".encode())
    return h.hexdigest()


def index_content_hash(index: DatasetIndex, show_progress: bool = False) -> str:
    """`dataset_content_hash` of a read index, remembered per dataset path in the asset cache
    ($CLIPPORTRAIT_CACHE/dataset_hashes) together with the files' sizes, times and inodes:
    reading every image again is skipped while none of them changed (a large dataset's full read
    took minutes on each cache load)."""
    from ..assets.cache import cache_dir
    from ..utils.files import atomic_open

    memo = cache_dir() / "dataset_hashes" / f"{hashlib.sha256(str(index.files.root.resolve()).encode()).hexdigest()}.json"
    stat = _stat_signature(index)
    try:
        stored = json.loads(memo.read_text())
        if stored.get("stat") == stat and isinstance(stored.get("hash"), str):
            return stored["hash"]
    except (OSError, ValueError):
        pass  # absent or unreadable: recompute
    digest = _index_content_hash(index, show_progress)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(memo, "w") as f:
            json.dump({"path": str(index.files.root.resolve()), "stat": stat, "hash": digest}, f)
    except OSError as err:  # a read-only cache costs a rehash next time, nothing else
        log.warning("could not remember the dataset hash in %s: %s", memo, err)
    return digest


def dataset_content_hash(path: str | Path, show_progress: bool = False) -> str:
    """sha256 over the dataset's names, camera labels, morphable arrays and the bytes of every image
    listed (folder or zip); independent of file times and of the container (same for folder and zip).
    Remembered while the files' sizes and times stay the same (`index_content_hash`)."""
    return index_content_hash(read_index(path), show_progress)


# --------------------------------------------------------------------------------------------------
# Real statistics


@dataclass(frozen=True)
class StatsKey:
    """Everything the real features depend on; a cached file is used only when its key is equal."""

    dataset_hash: str
    extractor_sha256: str
    resolution: int
    max_items: int | None
    format: int = STATS_FORMAT

    def as_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode("utf-8")).hexdigest()


@dataclass
class RealStatistics:
    """Inception features (N, D) of the first N real images of a dataset (all of them unless
    ``max_items``), in dataset order, no flips; with the extractor that made them."""

    key: StatsKey
    features: torch.Tensor = field(repr=False)  # (N, D) float32 on CPU
    extractor: FeatureExtractor = field(repr=False)
    source: str  # "computed" or "cache"
    path: Path | None

    @property
    def num_items(self) -> int:
        return int(self.features.shape[0])

    @staticmethod
    def cache_path(cache_dir: str | Path, key: StatsKey) -> Path:
        return Path(cache_dir) / STATS_DIR / f"{key.digest()}.pt"

    @classmethod
    def load_or_compute(
        cls,
        dataset: PortraitDataset,
        extractor: FeatureExtractor,
        cache_dir: str | Path | None,
        *,
        max_items: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        show_progress: bool = True,
    ) -> "RealStatistics":
        """Features of the real images, from ``cache_dir/fid_stats/<key digest>.pt`` when a file with
        an equal key is there, else computed (sharded over DDP ranks) and saved atomically by rank 0.
        ``cache_dir=None`` computes without caching. Images are served by ``dataset`` (its
        ``resolution`` resampling applies; its flip setting does not: unflipped items only)."""
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items={max_items}: expected None (all images) or >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        device = torch.device(device)
        rank, _ = rank_and_world()
        num_items = dataset.num_images if max_items is None else min(max_items, dataset.num_images)
        # Rank 0 hashes the dataset; the others trust it (it is the same dataset on every rank).
        dataset_hash = _from_rank0(index_content_hash(dataset.index, show_progress) if rank == 0 else "", device)
        resolution = dataset.resolution or int(dataset.index.read_image(int(dataset.rows[0])).shape[0])
        key = StatsKey(dataset_hash, extractor.sha256, resolution, max_items)
        path = None if cache_dir is None else cls.cache_path(cache_dir, key)
        cached = None if path is None else _load_cached(path, key, num_items)
        # Every rank must take the same branch: compute involves collectives.
        if _all_ranks_true(cached is not None, device):
            return cls(key, cached, extractor, "cache", path)
        features = _real_features(dataset, extractor, num_items, batch_size, num_workers, device, show_progress and rank == 0)
        if path is not None and rank == 0:
            with atomic_open(path, "wb") as f:
                torch.save({"key": key.as_dict(), "features": features}, f)
            log.info("saved real statistics of %d images to %s", num_items, path)
        return cls(key, features, extractor, "computed", path)


def _load_cached(path: Path, key: StatsKey, num_items: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: recompute rather than fail
        log.warning("ignoring unreadable real-statistics cache %s (%s: %s)", path, type(err).__name__, err)
        return None
    if not isinstance(blob, dict) or blob.get("key") != key.as_dict():
        found = blob.get("key") if isinstance(blob, dict) else type(blob).__name__
        log.warning("ignoring real-statistics cache %s: key %s, expected %s", path, found, key.as_dict())
        return None
    features = blob.get("features")
    if not (isinstance(features, torch.Tensor) and features.ndim == 2 and features.shape[0] == num_items):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        log.warning("ignoring real-statistics cache %s: features %s, expected (%d, D)", path, shape, num_items)
        return None
    return features.float()


def _real_features(
    dataset: PortraitDataset,
    extractor: FeatureExtractor,
    num_items: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    show_progress: bool,
) -> torch.Tensor:
    from torch.utils.data import DataLoader, Subset

    rank, world = rank_and_world()
    if num_items < world:
        raise ValueError(f"{num_items} real images cannot be shared by {world} ranks")
    mine = list(shard_items(num_items, rank, world))  # items < num_images are the unflipped copies
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=num_workers, shuffle=False)
    parts = []
    with torch.no_grad():
        for batch in _bar(loader, "real features", len(loader), show_progress):
            parts.append(extractor.network(batch["image"].to(device)).float())
    return gather_in_item_order(torch.cat(parts), num_items).cpu()


# --------------------------------------------------------------------------------------------------
# FID / KID


class _GivenFeatures(nn.Module):
    """torchmetrics ``feature`` module for features computed elsewhere: returns its (N, D) input."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # torchmetrics reads this instead of a dummy forward

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features of shape {tuple(features.shape)}; expected (N, {self.num_features})")
        return features


def fid_kid_from_features(
    real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int, kid_subsets: int, seed: int
) -> tuple[float, float, float]:
    """(FID, KID mean, KID std) of two feature matrices with torchmetrics; KID subsets are drawn
    from the CPU generator seeded by ``seed`` (the global RNG is left as it was)."""
    from torchmetrics.image import FrechetInceptionDistance, KernelInceptionDistance

    dim = real.shape[1]
    # Features are already identical on every rank: no torchmetrics sync.
    fid = FrechetInceptionDistance(feature=_GivenFeatures(dim), sync_on_compute=False).to(real.device)
    with warnings.catch_warnings():
        # Its "will save all extracted features" notice: keeping them is the point (KID subsets).
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=_GivenFeatures(dim), subset_size=kid_subset_size, subsets=kid_subsets, sync_on_compute=False
        ).to(real.device)
    for features, is_real in ((real, True), (fake, False)):
        for start in range(0, features.shape[0], _UPDATE_CHUNK):
            chunk = features[start : start + _UPDATE_CHUNK]
            fid.update(chunk, real=is_real)
            kid.update(chunk, real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return float(fid.compute()), float(kid_mean), float(kid_std)


def evaluate_fid_kid(
    generate: Generate,
    sampler: ConditioningSampler,
    stats: RealStatistics,
    num_fakes: int,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    *,
    show_progress: bool = True,
) -> dict:
    """FID and KID of ``num_fakes`` generated images against ``stats`` (module docstring: protocol,
    determinism, DDP). Returns ``{"fid", "kid", "kid_std", "seconds", "protocol": {...}}``; the
    protocol lists sample counts, sampling, extractor and hash, resize, KID subsets, dataset hash,
    seed and ``warnings`` (e.g. a clamped KID subset size)."""
    if num_fakes < 2:
        raise ValueError(f"num_fakes={num_fakes}: FID needs at least 2 generated images")
    if batch_size < 1 or kid_subset_size < 2 or kid_subsets < 1:
        raise ValueError(
            f"batch_size={batch_size}, kid_subset_size={kid_subset_size}, kid_subsets={kid_subsets}: "
            "expected batch_size >= 1, kid_subset_size >= 2, kid_subsets >= 1"
        )
    z_dim = getattr(generate, "z_dim", None)
    if not isinstance(z_dim, int) or z_dim < 1:
        raise ValueError(f"generate.z_dim={z_dim!r}: expected a positive int (wrap a function with BoundGenerator)")
    if stats.num_items < 2:
        raise ValueError(f"real statistics hold {stats.num_items} image(s); FID needs at least 2")
    started = time.perf_counter()
    device = torch.device(device)
    rank, world = rank_and_world()
    if num_fakes < world:
        raise ValueError(f"num_fakes={num_fakes} cannot be shared by {world} ranks")
    mine = shard_items(num_fakes, rank, world)
    batches = range(0, len(mine), batch_size)
    parts, fake_resolution = [], None
    with torch.no_grad():
        for start in _bar(batches, f"fakes (rank {rank})", len(batches), show_progress and rank == 0):
            chunk = mine[start : start + batch_size]
            z, rows = item_latents(chunk, z_dim, len(sampler), seed)
            cond = {k: v[rows.to(v.device)].to(device) for k, v in sampler.tables.items()}
            images = check_generated(generate(z.to(device), cond), len(chunk))
            fake_resolution = int(images.shape[-1])
            parts.append(stats.extractor.network(images).float())
    fake = gather_in_item_order(torch.cat(parts), num_fakes)
    real = stats.features.to(device)

    notes: list[str] = []
    subset = min(kid_subset_size, stats.num_items, num_fakes)
    if subset < kid_subset_size:
        notes.append(
            f"kid_subset_size {kid_subset_size} clamped to {subset} "
            f"(only {stats.num_items} real and {num_fakes} generated images)"
        )
    if fake_resolution != stats.key.resolution:
        notes.append(f"generated images are {fake_resolution} px, real images {stats.key.resolution} px")
    for message in notes:
        log.warning("FID/KID: %s", message)
    fid, kid, kid_std = fid_kid_from_features(real, fake, subset, kid_subsets, seed)

    flips = bool(sampler.tables["flip"].any())
    return {
        "fid": fid,
        "kid": kid,
        "kid_std": kid_std,
        "seconds": round(time.perf_counter() - started, 3),
        "protocol": {
            "name": "EG3D fid50k_full" if num_fakes == 50_000 and stats.key.max_items is None else "fid_full-style",
            "num_real": stats.num_items,
            "real_images": "all images of the dataset, no x-flips"
            if stats.key.max_items is None
            else f"first {stats.num_items} images of the dataset, no x-flips",
            "num_fakes": num_fakes,
            "conditioning": "camera label, shape, expression, pose"
            + (", clip_embedding" if "clip_embedding" in sampler.tables else "")
            + f" of a dataset item drawn uniformly ({len(sampler)} items"
            + (", x-flipped copies included)" if flips else ")"),
            "latent": f"z ~ N(0, I) of dim {z_dim}, per item seeded by (seed, item index)",
            "feature_extractor": stats.extractor.name,
            "feature_sha256": stats.extractor.sha256,
            "resize": stats.extractor.resize,
            "resolution_real": stats.key.resolution,
            "resolution_fake": fake_resolution,
            "kid_subset_size": subset,
            "kid_subsets": kid_subsets,
            "dataset_hash": stats.key.dataset_hash,
            "seed": seed,
            "world_size": world,
            "warnings": notes,
        },
    }
