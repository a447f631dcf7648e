"""Suite-wide settings: offline, quiet, one thread per xdist worker (2-core CI machine)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_cli(tmp_path):
    """Run `python run.py ...` in a subprocess with outputs under tmp_path; returns CompletedProcess."""
    import subprocess

    def _run(*args: str, timeout: float = 300, env: dict | None = None):
        full_env = {**os.environ, "PROJECT_ROOT": str(tmp_path), **(env or {})}
        return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return _run


def block_network(mp: pytest.MonkeyPatch) -> None:
    """Make any socket connection or subprocess (pip) attempt fail loudly: offline tests."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted in an offline test")

    import socket
    import subprocess

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(subprocess, "run", refuse)
    mp.setattr(subprocess, "Popen", refuse)


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    """A fresh asset cache, with sockets and subprocess (pip) blocked for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("asset-cache")
        mp.setenv("CLIPPORTRAIT_CACHE", str(cache))
        block_network(mp)
        yield cache
