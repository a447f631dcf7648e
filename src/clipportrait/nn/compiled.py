"""Optional ``torch.compile`` of the generator's three heavy pieces (``backbone.compile``).

Inductor fuses the elementwise work around the convolutions and the volume renderer (modulation,
demodulation, noise, bias, activation, clamp; the compositing arithmetic) into few kernels. On an
H100 at eg3d_512, batch 32, this took the tri-plane backbone from 42.8 to 30.6 ms (bf16 blocks: 19.8),
super-resolution from 54.5 to 23.3 ms and the rigid render from 19.8 to 13.0 ms (README, benchmarks).

The pieces are compiled once per process as plain functions taking the module as an argument, so
every generator (G, its EMA copy, a Stage-2 generator) shares one compiled cache and nothing is
attached to the modules (state dicts, deep copies and pickles are unchanged). Shapes are static:
a new batch size compiles again (about a minute at eg3d_512) instead of tracing a dynamic graph.

The discriminator's stem compiles the same way (``discriminator.compile``), except inside
``eager_region`` (R1 differentiates it twice). On an H100 at eg3d_512 its forward and backward on 64
images went from 335 to 254 ms, and to 111 ms once its binomial low-passes became box means inside
the graph (``nn.layers.box_filters_fuse``).

Modes: ``off`` (eager everywhere), ``cuda`` (compile for CUDA tensors, eager on CPUs, where a
compile costs more than a small job saves), ``always`` (also on CPUs: the tests use it to check
that the compiled functions equal the eager ones).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch

COMPILE_MODES = ("off", "cuda", "always")
# G, its EMA copy, train/eval, grad/no-grad and a second batch size each compile their own entry.
RECOMPILE_LIMIT = 32

_compiled: dict[Callable, Callable] = {}


def check_mode(mode: str, key: str = "backbone.compile") -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"{key}={mode!r}: expected one of {COMPILE_MODES}")


_eager = threading.local()


def wanted(mode: str, x: torch.Tensor) -> bool:
    """Whether ``mode`` compiles work on ``x``'s device (never inside ``eager_region``)."""
    check_mode(mode)
    if getattr(_eager, "depth", 0):
        return False
    return mode == "always" or (mode == "cuda" and x.is_cuda)


@contextlib.contextmanager
def eager_region():
    """Run everything eagerly inside: for graphs that are differentiated twice (R1's gradient
    penalty), which compiled autograd functions do not support."""
    _eager.depth = getattr(_eager, "depth", 0) + 1
    try:
        yield
    finally:
        _eager.depth -= 1


def maybe_compiled(fn: Callable, mode: str, x: torch.Tensor, options: dict | None = None) -> Callable:
    """``fn`` compiled by torch.compile (one per process, with Inductor ``options``) when ``mode`` asks
    for ``x``'s device, else ``fn``."""
    if not wanted(mode, x):
        return fn
    if fn not in _compiled:
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        _compiled[fn] = torch.compile(fn, dynamic=False, options=options)
    return _compiled[fn]


def eager_only(fn: Callable) -> Callable:
    """``fn`` run eagerly inside a compiled region (a graph break around it): the deformation's grid
    build and Triton search size their work on the host, which a traced graph cannot."""
    return torch.compiler.disable(fn)
