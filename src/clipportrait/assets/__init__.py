"""Resolvers for pretrained weights: local path, user cache, and the offline registry sources."""

from .cache import cache_dir
from .resolvers import ASSETS, AssetStatus, asset_status, cached_path, resolve
from .safe_pickle import load_numpy_pickle
from .sources import SOURCES, AssetError, sha256_file, sources_dir, verified_source

__all__ = [
    "ASSETS",
    "SOURCES",
    "AssetError",
    "AssetStatus",
    "asset_status",
    "cache_dir",
    "cached_path",
    "load_numpy_pickle",
    "resolve",
    "sha256_file",
    "sources_dir",
    "verified_source",
]
