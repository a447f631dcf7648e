"""On-disk cache of text embeddings keyed by (model id, text).

Layout: ``<directory>/<model id, made filename-safe>/<sha256(text)>.npy``, one float32 (D,) vector per
text, each written atomically (`utils.files.atomic_open`), so concurrent runs and killed runs never
leave a partial file; a lookup that finds no file, an unreadable one, or a vector that is not a finite
float32 (D,) of the encoder encodes the text again and replaces the file.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..utils.files import atomic_open


def _safe(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", model_id)


class TextEmbeddingCache:
    """Text embeddings of ``encoder`` (anything with ``model_id`` and ``encode_text(list[str])``;
    ``embed_dim`` when it has one, else one text is encoded to measure D), read from disk when present,
    encoded (in one batch per call) and stored otherwise."""

    def __init__(self, directory: str | os.PathLike, encoder) -> None:
        self.encoder = encoder
        self.folder = Path(directory) / _safe(encoder.model_id)
        self._memory: dict[str, torch.Tensor] = {}
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """D of the encoder's vectors: a stored vector of another shape is stale or damaged."""
        if self._dim is None:
            dim = getattr(self.encoder, "embed_dim", None)
            self._dim = int(dim) if dim is not None else int(self.encoder.encode_text([""]).shape[-1])
        return self._dim

    def path(self, text: str) -> Path:
        return self.folder / f"{hashlib.sha256(text.encode('utf-8')).hexdigest()}.npy"

    def _load(self, text: str) -> torch.Tensor | None:
        path = self.path(text)
        if not path.is_file():
            return None
        try:
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # unreadable (EOFError: empty file): encode again and overwrite
            return None
        if vector.dtype != np.float32 or vector.shape != (self.dim,) or not np.isfinite(vector).all():
            return None
        return torch.from_numpy(vector)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) float32 embeddings, in order."""
        if isinstance(texts, str):
            raise TypeError("TextEmbeddingCache expects a list of strings, got one string")
        missing = []
        for text in dict.fromkeys(texts):
            if text not in self._memory:
                found = self._load(text)
                if found is None:
                    missing.append(text)
                else:
                    self._memory[text] = found
        if missing:
            encoded = self.encoder.encode_text(missing).detach().float().cpu()
            for text, vector in zip(missing, encoded):
                with atomic_open(self.path(text), "wb") as f:
                    np.save(f, vector.numpy())
                self._memory[text] = vector
        if not texts:
            return torch.zeros(0, 0)
        return torch.stack([self._memory[t] for t in texts])
