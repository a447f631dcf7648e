"""Resolvers for pretrained weights: local path, user cache, and the offline registry sources."""

from .sources import SOURCES, AssetError, sha256_file, sources_dir, verified_source

__all__ = ["SOURCES", "AssetError", "sha256_file", "sources_dir", "verified_source"]
