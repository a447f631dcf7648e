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


def pytest_collection_modifyitems(config, items):
    """Under xdist's ``worksteal`` each worker first gets one contiguous share of the collection and
    idle workers steal from the tail of another's queue, so a long test that starts last decides the
    wall time. Deal the slow tests (``@pytest.mark.slow(seconds=...)``, 20 s when unsaid) longest first
    to the lightest share and put each share's slow tests at its head: every worker starts on its long
    tests and the short ones are what gets stolen at the end. Only the order changes."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers < 2:
        return

    def seconds(item) -> float:
        marker = item.get_closest_marker("slow")
        return marker.kwargs.get("seconds", 20.0) if marker else 0.0

    slow = sorted((item for item in items if seconds(item)), key=seconds, reverse=True)
    fast = [item for item in items if not seconds(item)]
    shares: list[list] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for item in slow:
        k = loads.index(min(loads))
        shares[k].append(item)
        loads[k] += seconds(item)
    # worksteal hands worker k the slice [k*n//w, (k+1)*n//w) of the collection.
    sizes = [(k + 1) * len(items) // workers - k * len(items) // workers for k in range(workers)]
    ordered = []
    for share, size in zip(shares, sizes):
        take = max(0, size - len(share))
        ordered += share + fast[:take]
        fast = fast[take:]
    items[:] = ordered + fast


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
