"""The user cache for converted weights: one verified file per asset, written atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from ..utils.files import sha256_file
from .sources import AssetError


def cache_dir() -> Path:
    """$CLIPPORTRAIT_CACHE, else ~/.cache/clipportrait."""
    env = os.environ.get("CLIPPORTRAIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clipportrait"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and os.replace, so a
    killed process never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is meant to be shareable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify_cached(path: Path, expected_sha256: str, asset: str) -> None:
    """Raise AssetError naming the file and both hashes if ``path`` does not hash to the pin."""
    found = sha256_file(path)
    if found != expected_sha256:
        raise AssetError(
            f"cached asset {asset!r} at {path} has sha256 {found}, expected {expected_sha256}. "
            f"The file was modified or corrupted; delete it and run "
            f"`python -m clipportrait.assets resolve` to rebuild it from the verified sources."
        )


def ensure_cached(
    path: Path, expected_sha256: str, asset: str, build: Callable[[], bytes]
) -> Path:
    """Return ``path`` after verifying it; build it first (atomically) if it does not exist.

    A freshly built file must hash to the pin too: a different hash means the source archive or the
    conversion code changed, and silently caching different weights would change every metric.
    """
    if not path.exists():
        data = build()
        found = hashlib.sha256(data).hexdigest()
        if found != expected_sha256:
            raise AssetError(
                f"building cached asset {asset!r} for {path} produced sha256 {found}, expected "
                f"{expected_sha256}; the conversion is not reproducing the pinned weights "
                f"(changed source archive or conversion code). Nothing was written."
            )
        write_atomic(path, data)
    verify_cached(path, expected_sha256, asset)
    return path
