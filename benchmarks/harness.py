"""Shared timing harness: warm-up, then the median of >= 20 timed runs.

On CUDA each run is timed with CUDA events (device time between two events on the current
stream); on CPU with time.perf_counter. Results are printed as a table and appended as JSON
(device name, torch version, dtype, batch, every timing) so the README table can be regenerated.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Timing:
    name: str
    batch: int
    dtype: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    items_per_s: float  # batch / median
    peak_mem_gib: float | None = None
    extra: dict = field(default_factory=dict)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_fn(
    fn: Callable[[], object],
    *,
    name: str,
    batch: int,
    dtype: str,
    device: torch.device,
    warmup: int = 5,
    runs: int = 20,
    extra: dict | None = None,
) -> Timing:
    """Time ``fn`` (which must do all its work on ``device``): warm-up, then ``runs`` timed calls."""
    if runs < 20:
        raise ValueError(f"runs={runs}: the project's benchmarks report medians of at least 20 runs")
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    times.sort()
    med = statistics.median(times)
    q = lambda p: times[min(len(times) - 1, int(round(p * (len(times) - 1))))]  # noqa: E731
    return Timing(name, batch, dtype, med, q(0.1), q(0.9), runs, batch / (med / 1e3), peak, extra or {})


def time_variant(results: list[Timing], label: str, fn: Callable[[], object], *, batch: int, dtype: str,
                 device: torch.device, warmup: int, runs: int, extra: dict) -> None:
    """`time_fn` one benchmark variant into ``results``. The first call (cuDNN autotuning, the
    channels_last algorithm search, compilation) is timed apart as extra["first_call_s"]. A failing
    variant (OOM, graph capture) is printed and skipped so that it does not hide the others."""
    import sys
    import traceback

    try:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        extra = {**extra, "first_call_s": round(time.perf_counter() - start, 2)}
        results.append(time_fn(fn, name=label, batch=batch, dtype=dtype, device=device, warmup=warmup, runs=runs,
                               extra=extra))
    except Exception as exc:
        traceback.print_exc()
        print(f"{label}: failed ({type(exc).__name__}: {exc})", file=sys.stderr)


def report(results: list[Timing], *, title: str, device: torch.device, out: str | Path | None) -> None:
    """Print a fixed-width table and write JSON with the environment next to the numbers."""
    header = f"{'benchmark':48s} {'batch':>5s} {'dtype':>9s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'items/s':>10s} {'peak GiB':>8s}"
    print(f"\n{title} — {device_description(device)}, torch {torch.__version__}")
    print(header)
    print("-" * len(header))
    for r in results:
        peak = f"{r.peak_mem_gib:8.2f}" if r.peak_mem_gib is not None else f"{'-':>8s}"
        print(f"{r.name:48s} {r.batch:5d} {r.dtype:>9s} {r.median_ms:10.3f} {r.p10_ms:8.3f} {r.p90_ms:8.3f} {r.items_per_s:10.1f} {peak}")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "title": title,
            "device": device_description(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "results": [asdict(r) for r in results],
        }
        out.write_text(json.dumps(record, indent=2))
        print(f"wrote {out}")


def set_cuda_math(tf32: bool = True, autotune: bool = False) -> None:
    """TF32 matmuls/convolutions on or off, and cuDNN autotuning (no effect without CUDA)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = autotune


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/<name>-<device>.json)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--small", action="store_true", help="tiny sizes, to check the script itself on a CPU")
    from clipportrait.nn.compiled import COMPILE_MODES
    from clipportrait.nn.config import UPCONV_FIR, BackboneConfig

    p.add_argument("--compile", default=BackboneConfig.compile, choices=COMPILE_MODES,
                   help="backbone.compile (and discriminator.compile where a D runs): torch.compile the heavy "
                        "pieces; default as in the configs; 'off' for eager")
    p.add_argument("--upconv-fir", default=BackboneConfig.upconv_fir, choices=UPCONV_FIR,
                   help="backbone.upconv_fir: the up-sampling convs' FIR folded into the kernel or split "
                        "into kernel and box means (compiled CUDA graphs only)")
    return p
