"""CUDA graphs for fixed-shape inference (``task.cuda_graphs`` of task=generate).

At small batches, text -> portrait is bound by the host: a portrait is several hundred small kernels
(text tower, mapping, T_G, tri-plane synthesis, the deformation's grid build and search, volume
render, super-resolution), and launching them takes longer than running them. A CUDA graph records
the launches once and replays them with one call.

``GraphedFunction`` captures ``fn(*tensors) -> dict of tensors`` once per input signature (shapes,
dtypes, device, grad and autocast state): warm-up calls run eagerly on a side stream (they compile
what ``backbone.compile`` compiles and run every check of the eager path on the real shapes), then
one call is captured. A replay copies the inputs into the captured ones and returns copies of the
outputs, so results stay valid after the next call.

Checks that read device values back to the host (non-finite camera labels or morphable parameters)
cannot run inside a capture; they are skipped while capturing (``host_checks``) and the caller
checks every replay's inputs instead (``check_finite``).
"""

from __future__ import annotations

import os
import traceback
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def host_checks() -> bool:
    """Whether checks that synchronise with the host may run now (not inside a CUDA graph capture)."""
    return not capturing()


def check_finite(inputs: dict[str, torch.Tensor]) -> None:
    """UserError naming every floating-point input with non-finite values (one host sync when all are fine)."""
    floats = {k: v for k, v in inputs.items() if v.is_floating_point()}
    if not floats:
        return
    bad = torch.stack([~torch.isfinite(v).all() for v in floats.values()])
    if bool(bad.any()):
        names = [k for k, b in zip(floats, bad.tolist()) if b]
        raise UserError(f"non-finite values in {', '.join(names)}")


def _where(exc: BaseException) -> str:
    """' at file:line (function)' of the innermost frame of this package in ``exc``'s traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}clipportrait{os.sep}" in f.filename
              and not f.filename.endswith("cuda_graphs.py")]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""


class GraphCaptureError(RuntimeError):
    """The function could not be captured (it synchronises with the host or does something else a
    CUDA graph cannot hold); it still works when called directly."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: dict[str, torch.Tensor]


class GraphedFunction:
    """``fn`` replayed from CUDA graphs, one per input signature (see the module docstring).

    ``fn`` takes CUDA tensors only (everything else is bound in it) and returns a dict of tensors.
    At most ``max_graphs`` graphs are kept (each holds its own memory pool); the oldest goes first.
    A failed capture raises; callers fall back to calling ``fn`` directly."""

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], warmup: int = 2, max_graphs: int = 4) -> None:
        if warmup < 1 or max_graphs < 1:
            raise ValueError(f"warmup={warmup}, max_graphs={max_graphs}: expected >= 1 each")
        self.fn = fn
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    @staticmethod
    def signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
        device = inputs[0].device
        state = (torch.is_grad_enabled(), torch.is_autocast_enabled(device.type),
                 torch.get_autocast_dtype(device.type))
        return state + tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        device = inputs[0].device
        static = tuple(x.detach().clone() for x in inputs)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self.fn(*static)
        except Exception as exc:
            raise GraphCaptureError(f"capturing {getattr(self.fn, '__qualname__', self.fn)} failed{_where(exc)}: "
                                    f"{type(exc).__name__}: {exc}") from exc
        return _Captured(graph, static, outputs)

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if not inputs or not all(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
            raise ValueError("GraphedFunction: expected CUDA tensors as the only arguments")
        key = self.signature(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            entry = self._graphs[key] = self._capture(inputs)
        else:
            self._graphs.move_to_end(key)
        for static, x in zip(entry.inputs, inputs):
            static.copy_(x)
        entry.graph.replay()
        return {k: v.clone() for k, v in entry.outputs.items()}
