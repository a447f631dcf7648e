"""Read-only access to a dataset stored as a folder or as an uncompressed zip.

The zip is opened lazily and re-opened whenever the process id changes, so one `DatasetFiles`
object can be handed to DataLoader workers (forked or spawned) without sharing a file handle
between processes: a `zipfile.ZipFile` shared across a fork would interleave seeks of different
workers on the same file descriptor and return corrupt bytes.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path, PurePosixPath


class DatasetFiles:
    """Files of a dataset rooted at ``root`` (a directory or a ``.zip``), addressed by relative POSIX paths."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"dataset path {self.root} does not exist")
        self.is_zip = self.root.is_file()
        if self.is_zip and not zipfile.is_zipfile(self.root):
            raise ValueError(f"dataset path {self.root}: expected a directory or a zip file")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self._zip_names: set[str] | None = None

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            # A handle inherited through fork belongs to the parent: drop it without closing it.
            self._zip = zipfile.ZipFile(self.root, "r")
            self._zip_pid = os.getpid()
        return self._zip

    def names(self) -> set[str]:
        """All file paths (relative, POSIX) of the dataset."""
        if self.is_zip:
            if self._zip_names is None:
                self._zip_names = {n for n in self._archive().namelist() if not n.endswith("/")}
            return self._zip_names
        return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}

    def exists(self, relpath: str) -> bool:
        if self.is_zip:
            return relpath in self.names()
        return (self.root / relpath).is_file()

    def read_bytes(self, relpath: str) -> bytes:
        """Bytes of ``relpath``; FileNotFoundError naming the dataset and the path when absent."""
        if PurePosixPath(relpath).is_absolute() or ".." in PurePosixPath(relpath).parts:
            raise ValueError(f"{relpath!r}: dataset paths must be relative and stay inside {self.root}")
        if self.is_zip:
            try:
                return self._archive().read(relpath)
            except KeyError:
                raise FileNotFoundError(f"{self.root}: no file {relpath!r} in the zip") from None
        path = self.root / relpath
        if not path.is_file():
            raise FileNotFoundError(f"{self.root}: no file {relpath!r}")
        return path.read_bytes()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = None
        state["_zip_pid"] = None
        return state
