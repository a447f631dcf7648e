"""CUDA graphs for fixed-shape inference (``task.cuda_graphs`` of task=generate).

At small batches, text -> portrait is bound by the host: a portrait is several hundred small kernels
(text tower, mapping, T_G, tri-plane synthesis, the deformation's grid build and search, volume
render, super-resolution), and launching them takes longer than running them. A CUDA graph records
the launches once and replays them with one call.

``GraphedFunction`` captures ``fn(*tensors) -> dict of tensors`` once per input signature (shapes,
dtypes, devices, grad and autocast state): warm-up calls run eagerly on a side stream (they compile
what ``backbone.compile`` compiles and run every check of the eager path on the real shapes), then
one call is captured. A replay copies the inputs into the captured ones and returns copies of the
outputs, so results stay valid after the next call. Inputs may live on the host: they are packed into
one pinned staging buffer and go over in one copy that does not block the host (a plain host-to-device copy waits for
all queued GPU work, which would serialise the host's preparation of a call with the previous one).

Checks that read device values back to the host (non-finite camera labels or morphable parameters)
cannot run inside a capture; they are skipped while capturing (``host_checks``). With
``check_finite=True`` every replay's floating-point inputs are checked instead: host inputs on the
host before the copy, device inputs inside the graph, read once the replay is done.
"""

from __future__ import annotations

import os
import traceback
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import numpy as np
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
    bad = [k for k, v in floats.items() if v.device.type == "cpu" and not _finite_on_host(v)]
    for device in {v.device for v in floats.values() if v.device.type != "cpu"}:  # inputs may be spread out
        names = [k for k, v in floats.items() if v.device == device]
        flags = torch.stack([~torch.isfinite(floats[k]).all() for k in names]).tolist()
        bad += [k for k, flag in zip(names, flags) if flag]
    if bad:
        _refuse([k for k in floats if k in bad])


def _finite_on_host(x: torch.Tensor) -> bool:
    """Whether a CPU tensor is all finite: through numpy where it can (a few microseconds: this runs
    before every replay of a small batch)."""
    if x.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())


def _refuse(names: list[str]) -> None:
    raise UserError(f"non-finite values in {', '.join(names)}")


_NONFINITE = "__nonfinite__"  # the captured graph's extra output: one flag per checked device input


def _where(exc: BaseException) -> str:
    """' at file:line (function)' of the innermost frame of this package in ``exc``'s traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}clipportrait{os.sep}" in f.filename
              and not f.filename.endswith("cuda_graphs.py")]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""


def _restore_random_state(device: torch.device) -> None:
    """After a failed capture, capture one trivial graph: a capture that ends in an error leaves CUDA's
    default generator marked as capturing (every later random draw on the device then fails with
    "Offset increment outside graph capture"), and the next capture that ends cleanly clears it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.empty(1, device=device).fill_(0.0)


def _packed_buffers(host: list[torch.Tensor], device: torch.device):
    """One pinned host buffer and one device buffer of bytes holding all ``host`` tensors, each at a
    16-byte aligned offset, and per tensor its (pinned, device) views: a replay's host inputs then
    travel in one copy instead of one each. (None, []) without host tensors."""
    if not host:
        return None, []
    sizes = [x.numel() * x.element_size() for x in host]
    offsets = [sum(-(-n // 16) * 16 for n in sizes[:i]) for i in range(len(sizes))]
    total = max(offsets[-1] + sizes[-1], 1)
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(total, dtype=torch.uint8, device=device)
    views = [tuple(buf[o:o + n].view(x.dtype).view(x.shape) for buf in (pinned, on_device))
             for x, o, n in zip(host, offsets, sizes)]
    return (pinned, on_device), views


class GraphCaptureError(RuntimeError):
    """The function could not be captured (it synchronises with the host or does something else a
    CUDA graph cannot hold); it still works when called directly."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: dict[str, torch.Tensor]
    staging: tuple[torch.Tensor | None, ...]  # views of ``packed[0]`` for the inputs given on the host
    packed: tuple[torch.Tensor, torch.Tensor] | None  # pinned host bytes -> device bytes: one copy per replay
    checked: tuple[int, ...]  # device inputs whose finiteness the graph reports
    copied: torch.cuda.Event  # the last replay's host-to-device copies are done: staging is free


class GraphedFunction:
    """``fn`` replayed from CUDA graphs, one per input signature (see the module docstring).

    ``fn`` takes tensors only (everything else is bound in it) and returns a dict of tensors; it runs
    on ``device`` (default: that of the first CUDA input). At most ``max_graphs`` graphs are kept (each
    holds its own memory pool); the oldest goes first. A failed capture raises; callers fall back to
    calling ``fn`` directly. ``check_finite``: refuse non-finite floating-point inputs (UserError naming
    them, from ``names`` given to the call)."""

    def __init__(self, fn: Callable[..., dict[str, torch.Tensor]], warmup: int = 2, max_graphs: int = 4,
                 device: torch.device | str | None = None, check_finite: bool = False) -> None:
        if warmup < 1 or max_graphs < 1:
            raise ValueError(f"warmup={warmup}, max_graphs={max_graphs}: expected >= 1 each")
        self.fn = fn
        self.warmup = int(warmup)
        self.max_graphs = int(max_graphs)
        self.device = torch.device(device) if device is not None else None
        self.check_finite = bool(check_finite)
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.last_captured = False  # whether the last call captured (a new signature, or one evicted since)

    @staticmethod
    def signature(inputs: tuple[torch.Tensor, ...], device: torch.device) -> tuple:
        state = (torch.is_grad_enabled(), torch.is_autocast_enabled(device.type),
                 torch.get_autocast_dtype(device.type), device)
        return state + tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every captured graph: the next call of each signature captures again. For when something
        ``fn`` reads outside its tensor arguments (a Python setting, a replaced tensor) has changed, which
        a replay would not see."""
        self._graphs.clear()

    def _capture(self, inputs: tuple[torch.Tensor, ...], device: torch.device) -> _Captured:
        packed, views = _packed_buffers([x for x in inputs if not x.is_cuda], device)
        hosted = iter(views)
        static, staging = [], []
        for x in inputs:
            pinned, on_device = next(hosted) if not x.is_cuda else (None, x.detach().to(device, copy=True))
            if pinned is not None:
                on_device.copy_(x)
            static.append(on_device)
            staging.append(pinned)
        static, staging = tuple(static), tuple(staging)
        checked = tuple(i for i, x in enumerate(inputs) if x.is_cuda and x.is_floating_point()) \
            if self.check_finite else ()

        def body(*args: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.fn(*args)
            if checked:
                out = {**out, _NONFINITE: torch.stack([~torch.isfinite(args[i]).all() for i in checked])}
            return out

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                body(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = body(*static)
        except Exception as exc:
            _restore_random_state(device)
            raise GraphCaptureError(f"capturing {getattr(self.fn, '__qualname__', self.fn)} failed{_where(exc)}: "
                                    f"{type(exc).__name__}: {exc}") from exc
        return _Captured(graph, static, outputs, staging, packed, checked, torch.cuda.Event())

    def __call__(self, *inputs: torch.Tensor, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        device = self.device or next((x.device for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda), None)
        if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs) or device is None or device.type != "cuda":
            raise ValueError("GraphedFunction: expected tensors as the only arguments, and CUDA tensors among "
                             "them or a CUDA device")
        names = tuple(names) if names is not None else tuple(f"input {i}" for i in range(len(inputs)))
        if self.check_finite:  # host inputs: checked before anything is copied or run
            check_finite({n: x for n, x in zip(names, inputs) if not x.is_cuda})
        key = self.signature(inputs, device)
        entry = self._graphs.get(key)
        self.last_captured = entry is None
        if entry is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            entry = self._graphs[key] = self._capture(inputs, device)
        else:
            self._graphs.move_to_end(key)
        entry.copied.synchronize()  # the previous replay's copies have left the staging buffers
        for static, staging, x in zip(entry.inputs, entry.staging, inputs):
            (static if staging is None else staging).copy_(x)
        if entry.packed is not None:
            entry.packed[1].copy_(entry.packed[0], non_blocking=True)
        entry.copied.record()
        entry.graph.replay()
        outputs = {k: v.clone() for k, v in entry.outputs.items() if k != _NONFINITE}  # queued behind the replay
        if entry.checked:
            flags = entry.outputs[_NONFINITE].tolist()  # waits for the replay
            if any(flags):
                _refuse([names[i] for i, flag in zip(entry.checked, flags) if flag])
        return outputs
