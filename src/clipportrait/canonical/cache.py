"""The canonicalisation cache (DESIGN.md section 6): a directory that Stage 2 reads its r_x from.

    <dir>/manifest.json       format version, what the embeddings depend on (the "identity": Stage-1
                              checkpoint sha256, LVLM model id, dataset content hash, embed mode,
                              config), the shard size and, per finished shard, its sha256 and rows
    <dir>/shard-00000.npz     rows [0, shard_size) of the dataset, in dataset order
    <dir>/shard-00001.npz     ...
    <dir>/report/             quality report of task=canonicalize (not read back)
    <dir>/.lock               locked (flock) by the one writer allowed at a time

Each shard holds ``names`` (n,), ``r`` (n,D) and ``r_flipped`` (n,D) CLIP embeddings (float32, of
the canonical render x_hat and its mirror, or of the raw image and its mirror), and for
``embed=canonical`` also ``w`` (n,w_dim) or (n,num_ws,w_dim), ``lpips`` and ``loss`` (n,) of the
inversion and, when renders are kept, ``inverted`` and ``canonical`` uint8 (n,s,s,3) images. D is
the same in every shard, and the embeddings and inversion results are finite (checked on write and read).

Writing is shard by shard: the shard goes to a temporary file that is renamed into place, then the
manifest (also replaced atomically) records its sha256. A run killed at any point leaves only whole
files; on restart every shard listed with a matching sha256 is kept and everything else is computed
again. A shard whose bytes no longer match the manifest is corrupt: the writer recomputes it (or
refuses, ``on_corrupt="error"``); the reader always refuses it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import UserError
from ..utils.files import atomic_open, sha256_file, write_json_atomic
from .config import ON_CORRUPT

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "clipportrait-canonical-cache"
MANIFEST = "manifest.json"
# Manifest keys that must be equal for a cache to be resumed (paths may differ: data moves).
IDENTITY_KEYS = ("format_version", "embed", "stage1_sha256", "lvlm_model_id", "dataset_hash", "num_items",
                 "shard_size", "config")
EMBEDDING_ARRAYS = ("names", "r", "r_flipped")
FINITE_ARRAYS = ("r", "r_flipped", "w", "lpips", "loss")
LOCK = ".lock"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_identity(*, embed: str, stage1_sha256: str | None, lvlm_model_id: str, dataset_hash: str, num_items: int,
                  shard_size: int, config: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields a cache is matched on (see ``IDENTITY_KEYS``)."""
    identity = {"format_version": FORMAT_VERSION, "embed": embed, "stage1_sha256": stage1_sha256,
                "lvlm_model_id": lvlm_model_id, "dataset_hash": dataset_hash, "num_items": int(num_items),
                "shard_size": int(shard_size), "config": config}
    # Through JSON once, so a fresh identity compares equal to one read back from disk.
    return json.loads(json.dumps(identity))


def _differences(old: dict[str, Any], new: dict[str, Any], old_is: str = "cache has",
                 new_is: str = "this run has") -> list[str]:
    return [f"{key}: {old_is} {old.get(key)!r}, {new_is} {new.get(key)!r}"
            for key in IDENTITY_KEYS if old.get(key) != new.get(key)]


def recorded_identity(cache: str | os.PathLike) -> dict[str, Any]:
    """The identity fields (``IDENTITY_KEYS``) of the cache directory ``cache``, for a checkpoint to record
    what it was trained on; {} for a ``.npz`` cache, which has no manifest."""
    if not Path(cache).is_dir():
        return {}
    manifest = read_manifest(cache)
    return json.loads(json.dumps({key: manifest.get(key) for key in IDENTITY_KEYS}))


def check_recorded_identity(cache: str | os.PathLike, recorded: dict[str, Any], what: str) -> None:
    """UserError when the cache directory ``cache`` is no longer the one ``what`` (a checkpoint) recorded
    with ``recorded_identity``, listing the fields that differ; nothing to check when either side has
    no identity (a .npz cache, a checkpoint from before identities were recorded)."""
    current = recorded_identity(cache) if recorded else {}
    if not current:
        return
    diffs = _differences(recorded, current, "the checkpoint recorded", "the cache has now")
    if diffs:
        raise UserError(f"canonicalisation cache {cache} is not the one {what} was trained on (rewritten since, or "
                        "another cache):\n  " + "\n  ".join(diffs) + "\n(point to the cache the checkpoint was trained on, or train Stage 2 on this one)")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the cache at ``directory``; UserError when it is missing or not one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"canonicalisation cache {directory}: no {MANIFEST} (not a cache written by "
                        f"task=canonicalize, or the run never finished its first shard)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"canonicalisation cache {directory}: {MANIFEST} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise UserError(f"canonicalisation cache {directory}: {MANIFEST} is not a {KIND} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"canonicalisation cache {directory}: format version {manifest.get('format_version')}, "
                        f"this code reads version {FORMAT_VERSION}; run task=canonicalize again")
    return manifest


def _content_problem(arrays: dict[str, np.ndarray], dim: int | None, first_row: int) -> str | None:
    """None when ``r`` and ``r_flipped`` are float32 (n, dim) (dim None: any width, the same for both)
    and every ``FINITE_ARRAYS`` member is finite, else what is wrong (naming dataset rows and images)."""
    for key in ("r", "r_flipped"):
        a = arrays[key]
        if a.dtype != np.float32 or a.ndim != 2 or a.shape[1] != (dim or a.shape[1]):
            return f"has {key!r} {a.dtype} {a.shape}, expected float32 (n, {dim or 'D'})"
        dim = a.shape[1]
    finite = {k: np.isfinite(arrays[k].reshape(len(arrays[k]), -1)).all(1) for k in FINITE_ARRAYS if k in arrays}
    bad = np.flatnonzero(~np.logical_and.reduce(list(finite.values())))
    if len(bad):
        keys = [k for k, ok in finite.items() if not ok.all()]
        return (f"has NaN/inf in {keys} at dataset rows {(bad[:10] + first_row).tolist()} "
                f"({arrays['names'][bad[:10]].tolist()}; a diverged inversion: try a lower task.inversion.lr)")
    return None


def _lock(directory: Path):
    """The open lock file of ``directory``, exclusively flock'ed (the lock goes with the descriptor):
    a second writer would delete this one's temporaries and overwrite its manifest."""
    f = open(directory / LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another canonicalize run is writing {directory} (it holds {directory / LOCK}); wait "
                        f"for it to end or use another task.out") from None
    return f


def _shard_ok(directory: Path, name: str, entry: dict[str, Any]) -> str | None:
    """None when the shard file matches its manifest entry, else what is wrong with it."""
    path = directory / name
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry.get("bytes"):
        return f"size {path.stat().st_size} bytes, manifest says {entry.get('bytes')} (truncated or rewritten)"
    actual = sha256_file(path)
    if actual != entry.get("sha256"):
        return f"sha256 {actual[:16]}..., manifest says {str(entry.get('sha256'))[:16]}... (corrupt)"
    return None


class CacheWriter:
    """Writes the shards of one cache; resumes a cache of the same identity in ``directory``.

    A cache of another identity is refused (UserError listing the differences) unless
    ``overwrite``: then its shards and manifest are removed and the cache starts empty.
    Holds the directory's lock until ``finish``/``close`` (or the end of a ``with`` block): a second
    writer on the same directory meanwhile is a UserError.
    """

    _lock = None  # the open lock file; class default so close() works on a half-built writer

    def __init__(self, directory: str | os.PathLike, identity: dict[str, Any], info: dict[str, Any],
                 on_corrupt: str = "recompute", overwrite: bool = False) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r}: expected one of {ON_CORRUPT}")
        if identity["shard_size"] < 1 or identity["num_items"] < 1:
            raise ValueError(f"shard_size={identity['shard_size']}, num_items={identity['num_items']}: expected >= 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.on_corrupt = on_corrupt
        self._lock = _lock(self.directory)
        try:
            self._open(info, overwrite)
        except BaseException:
            self.close()
            raise

    def _open(self, info: dict[str, Any], overwrite: bool) -> None:
        identity = self.identity
        self._remove_stale_temporaries()
        manifest_path = self.directory / MANIFEST
        if manifest_path.exists():
            old = read_manifest(self.directory)
            diffs = _differences(old, identity)
            if diffs and not overwrite:
                raise UserError(f"canonicalisation cache {self.directory} was made from other inputs:\n  "
                                + "\n  ".join(diffs) + "\nuse another task.out, or task.overwrite=true to replace it")
            if diffs:
                log.warning("overwriting canonicalisation cache %s (%s)", self.directory, "; ".join(diffs))
                for name in old.get("shards", {}):
                    (self.directory / name).unlink(missing_ok=True)
                old = {}
        else:
            old = {}
        self.manifest = {"kind": KIND, **identity, **info, "num_shards": self.num_shards,
                         "shards": dict(old.get("shards", {})), "complete": False,
                         "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S"))}
        self._save_manifest()

    def close(self) -> None:
        """Release the directory lock (again: no-op)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a writer dropped unclosed (its run failed) lets go of the lock too
        self.close()

    @property
    def num_shards(self) -> int:
        return -(-self.identity["num_items"] // self.identity["shard_size"])

    def rows(self, shard: int) -> range:
        """Dataset positions (0..num_items-1) of ``shard``."""
        size = self.identity["shard_size"]
        return range(shard * size, min((shard + 1) * size, self.identity["num_items"]))

    def _remove_stale_temporaries(self) -> None:
        # Left by a run killed inside a write (atomic_open names them .<target>.<random>.tmp).
        for tmp in self.directory.glob(".*.tmp"):
            log.info("removing %s, left by an interrupted write", tmp)
            tmp.unlink(missing_ok=True)

    def pending(self) -> list[int]:
        """Shards still to compute: never written, or written and no longer matching the manifest."""
        todo = []
        for shard in range(self.num_shards):
            name = shard_name(shard)
            entry = self.manifest["shards"].get(name)
            if entry is None:
                todo.append(shard)
                continue
            problem = _shard_ok(self.directory, name, entry)
            if problem is None:
                continue
            if self.on_corrupt == "error":
                raise UserError(f"canonicalisation cache {self.directory}: {name} is {problem}; rerun with "
                                f"task.on_corrupt=recompute to compute it again")
            log.warning("canonicalisation cache %s: %s is %s; computing it again", self.directory, name, problem)
            del self.manifest["shards"][name]
            todo.append(shard)
        return todo

    def write(self, shard: int, arrays: dict[str, np.ndarray]) -> None:
        """Store ``arrays`` as ``shard`` (atomically), then record it in the manifest. Embeddings of
        another dtype, rank or width than the other shards', or non-finite values, are a UserError."""
        if self._lock is None:
            raise RuntimeError(f"canonicalisation cache {self.directory}: the writer is closed")
        rows = self.rows(shard)
        missing = [k for k in EMBEDDING_ARRAYS if k not in arrays]
        if missing:
            raise ValueError(f"shard {shard}: arrays {missing} are missing (have {sorted(arrays)})")
        wrong = {k: v.shape for k, v in arrays.items() if v.shape[0] != len(rows)}
        if wrong:
            raise ValueError(f"shard {shard}: expected {len(rows)} rows in every array, got {wrong}")
        name = shard_name(shard)
        dim = next((e["dim"] for e in self.manifest["shards"].values() if "dim" in e), None)
        problem = _content_problem(arrays, dim, rows.start)
        if problem is not None:
            raise UserError(f"canonicalisation cache {self.directory}: not writing {name}, it {problem}")
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        with atomic_open(self.directory / name, "wb") as f:
            f.write(data)
        self.manifest["shards"][name] = {"sha256": sha256_bytes(data), "bytes": len(data), "first": rows.start,
                                         "rows": len(rows), "dim": int(arrays["r"].shape[1])}
        self._save_manifest()

    def finish(self) -> None:
        done = set(self.manifest["shards"])
        missing = [shard_name(k) for k in range(self.num_shards) if shard_name(k) not in done]
        if missing:
            raise RuntimeError(f"canonicalisation cache {self.directory}: shards {missing[:3]} were never written")
        self.manifest["complete"] = True
        self.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._save_manifest()
        self.close()

    def _save_manifest(self) -> None:
        self.manifest["shards"] = dict(sorted(self.manifest["shards"].items()))
        write_json_atomic(self.directory / MANIFEST, self.manifest)


def iter_shards(directory: str | os.PathLike, manifest: dict[str, Any] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of every shard in order, each checked against the manifest (UserError if it fails)."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    if not manifest.get("complete"):
        done = len(manifest.get("shards", {}))
        raise UserError(f"canonicalisation cache {directory} is incomplete ({done} of {manifest.get('num_shards')} "
                        f"shards): run task=canonicalize with task.out={directory} again to finish it")
    for shard in range(manifest["num_shards"]):
        name = shard_name(shard)
        entry = manifest["shards"].get(name)
        problem = "not in the manifest" if entry is None else _shard_ok(directory, name, entry)
        if problem is not None:
            raise UserError(f"canonicalisation cache {directory}: {name} is {problem}; run task=canonicalize with "
                            f"task.out={directory} again to recompute it")
        with np.load(directory / name, allow_pickle=False) as npz:
            yield {k: npz[k] for k in npz.files}


def load_canonical_embeddings(directory: str | os.PathLike, names: list[str], *,
                              dataset_path: str | os.PathLike | None = None, dataset_hash: str | None = None,
                              stage1_checkpoint: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(r, r_flipped), each (N,D) float32, for ``names`` from the cache at ``directory``.

    The cache must be complete, every shard must match its sha256, and it must have been made from
    this dataset (``dataset_hash``, or the content hash of ``dataset_path``) and, when given, from
    the Stage-1 checkpoint ``stage1_checkpoint``; any mismatch is a UserError naming both hashes.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if dataset_hash is None and dataset_path is not None:
        from ..metrics.evaluation import dataset_content_hash

        dataset_hash = dataset_content_hash(dataset_path)
    if dataset_hash is not None and manifest.get("dataset_hash") != dataset_hash:
        where = f" at {dataset_path}" if dataset_path is not None else ""
        raise UserError(f"canonicalisation cache {directory} was made from another dataset: its manifest has "
                        f"dataset content hash {manifest.get('dataset_hash')}, the dataset{where} hashes to "
                        f"{dataset_hash}; run task=canonicalize on this dataset")
    if stage1_checkpoint is not None and manifest.get("embed") == "canonical":
        actual = sha256_file(Path(stage1_checkpoint))
        if manifest.get("stage1_sha256") != actual:
            raise UserError(f"canonicalisation cache {directory} was made with another Stage-1 checkpoint: its "
                            f"manifest has sha256 {manifest.get('stage1_sha256')}, {stage1_checkpoint} has {actual}; "
                            f"run task=canonicalize with this checkpoint")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in EMBEDDING_ARRAYS}
    for shard, arrays in enumerate(iter_shards(directory, manifest)):
        dim = parts["r"][0].shape[1] if parts["r"] else None
        problem = _content_problem(arrays, dim, shard * manifest["shard_size"])
        if problem is not None:
            raise UserError(f"canonicalisation cache {directory / shard_name(shard)} {problem}; delete it and run "
                            f"task=canonicalize with task.out={directory} again to recompute it")
        for key in EMBEDDING_ARRAYS:
            parts[key].append(arrays[key])
    cached_names = np.concatenate(parts["names"])
    r, r_flipped = np.concatenate(parts["r"]), np.concatenate(parts["r_flipped"])
    row = {str(n): i for i, n in enumerate(cached_names)}
    missing = [n for n in names if n not in row]
    if missing:
        raise UserError(f"canonicalisation cache {directory}: no embedding for {len(missing)} images, e.g. {missing[:3]}")
    order = np.array([row[n] for n in names], dtype=np.int64)
    return r[order].astype(np.float32), r_flipped[order].astype(np.float32)
