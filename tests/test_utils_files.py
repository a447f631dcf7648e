"""Atomic writes: results appear whole or not at all, with the permissions of an ordinary file."""

from __future__ import annotations

import os
import stat

import pytest

from clipportrait.utils.files import atomic_open, write_json_atomic


def test_atomic_write_gets_ordinary_permissions_and_leaves_no_temporaries(tmp_path):
    """A written file has mode 0666 minus the umask (not mkstemp's 0600), and a failed write leaves
    neither a partial target nor a temporary file behind."""
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
        os.umask(0o077)
        write_json_atomic(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o600
    finally:
        os.umask(old)
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "c.bin") as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
