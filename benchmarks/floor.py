"""Floors of the two open H100 speed targets (DESIGN.md sec. 8): the arithmetic a text -> portrait batch
and an inversion step must do, what their convolutions cost when each runs alone on the GPU, and where
the measured time goes.

    python -m benchmarks.floor --device cuda                  # eg3d_512: counts, convolution ceiling, profile
    python -m benchmarks.floor --device cpu --batch 1 --rate 989  # eg3d_512 counts on a CPU, floors at a rate
    python -m benchmarks.floor --small                        # tiny sizes on the CPU (checks the script)

Three parts, each written to the JSON record:

1. **Counts.** Floating-point operations (multiply-add = 2) of one portrait (mapping, T_G, tri-plane
   synthesis, render, super-resolution; the text tower apart) and of one inversion step per image (the
   coarse step on the neural render and the fine step on the final image, forward and backward with
   LPIPS-VGG), from ``torch.utils.flop_counter`` on an eager run at the benchmark's batch. Only
   matrix products and convolutions count; the deformation's nearest-triangle search, the tri-plane
   lookup and the compositing are memory- and ALU-bound and have no FLOP formula. The counts do not
   depend on the device or the precision (a CPU counts in float32 what a GPU runs in bf16). The floor
   column is the count at ``--rate`` TFLOP/s (on CUDA by default the measured bf16 matrix rate).
2. **Convolution ceiling** (CUDA). Every distinct convolution of those runs (forward and backward,
   same shapes, dtypes, memory formats and counts) is replayed alone on random data and timed with
   CUDA events (cuDNN autotuned): the sum is what the convolutions cost if nothing else ran and each
   ran at the speed cuDNN reaches on it alone. A large bf16 matrix product gives the chip's dense rate.
3. **Kernel profile** (CUDA). ``torch.profiler`` over the compiled, autocast batch: device time by
   kind of kernel (cuDNN convolutions, cuBLAS products, Inductor's fused kernels, the project's own
   Triton kernels, layout transposes, the rest) and the longest kernels.

Random weights and inputs throughout: none of these costs depends on them.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import common_args, device_description, set_cuda_math, time_fn

aten = torch.ops.aten
CONV_OPS = (aten.convolution.default, aten.convolution_backward.default)


@dataclass(frozen=True)
class ConvCall:
    """One convolution as dispatched: op (``forward`` or ``backward`` with its output mask), the
    tensors' shapes, dtype and memory format, and the non-tensor arguments."""

    op: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    channels_last: bool
    args: tuple


@dataclass
class Count:
    """What one run did: FLOPs in total and per aten op, and every convolution call."""

    flops: int = 0
    per_op: dict[str, int] = field(default_factory=dict)
    convs: Counter = field(default_factory=Counter)


def _channels_last(t: torch.Tensor) -> bool:
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class ConvRecorder(TorchDispatchMode):
    """Records every convolution (forward and backward) that passes through the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV_OPS:
            if func is aten.convolution.default:
                tensors, rest, op = args[:2], args[2:], "forward"  # input, weight; bias, stride, ...
                bias = rest[0]
                rest = (None if bias is None else tuple(bias.shape),) + tuple(_plain(a) for a in rest[1:])
            else:
                tensors, op = args[:3], "backward"  # grad_output, input, weight; bias_sizes, stride, ...
                rest = tuple(_plain(a) for a in args[3:])
            self.calls[ConvCall(op, tuple(tuple(t.shape) for t in tensors), str(tensors[1].dtype).removeprefix("torch."),
                                _channels_last(tensors[1]), rest)] += 1
        return func(*args, **kwargs)


def _plain(a):
    return tuple(a) if isinstance(a, (list, tuple)) else a


def count(fn: Callable[[], object]) -> Count:
    """FLOPs and convolutions of one call of ``fn`` (run eagerly: compiled graphs hide their ops)."""
    from clipportrait.nn.compiled import eager_region

    # The counter is the inner mode: under inference_mode it sees composite ops (conv2d) first and
    # decomposes them, so the recorder (outer) sees the convolutions they are made of.
    with eager_region(), ConvRecorder() as recorder, FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return Count(int(counter.get_total_flops()), per_op, recorder.calls)


def conv_flops(call: ConvCall) -> int:
    """FLOPs of one recorded convolution (2 per multiply-add; a backward counts each output it makes)."""
    if call.op == "forward":  # args: bias shape, stride, padding, dilation, transposed, output_padding, groups
        x, w = call.shapes
        return _forward_flops(x, w, *call.args[1:7])
    grad, x, w = call.shapes
    stride, padding, dilation, transposed, output_padding, groups, mask = call.args[1:8]
    per_pass = _forward_flops(x, w, stride, padding, dilation, transposed, output_padding, groups)
    return per_pass * (int(mask[0]) + int(mask[1]))


def _forward_flops(x, w, stride, padding, dilation, transposed, output_padding, groups) -> int:
    spatial_in = x[2:]
    if transposed:  # weight (I, O/g, k, k): every input pixel meets the whole kernel once
        out_channels = w[1] * groups
        return 2 * x[0] * x[1] * out_channels // groups * _prod(w[2:]) * _prod(spatial_in)
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
           for size, k, s, p, d in zip(spatial_in, w[2:], stride, padding, dilation)]
    return 2 * x[0] * w[0] * w[1] * _prod(w[2:]) * _prod(out)


def _prod(xs) -> int:
    n = 1
    for v in xs:
        n *= int(v)
    return n


def is_reference_upconv(call: ConvCall) -> bool:
    """A stride-2 transposed 3x3 convolution: the reference path's up-sampling conv (before its FIR)."""
    stride, transposed = call.args[1], call.args[4]  # the same places in forward and backward arguments
    return bool(transposed) and tuple(stride) == (2, 2) and call.shapes[-1][-2:] == (3, 3)


def upconv_estimates(counted: Count, batch: int, cuda: bool) -> dict:
    """On a CPU (reference path: transposed 3x3 conv, then the FIR), the up-sampling convs' share and
    what the CUDA fast path makes of them: with [1, 3, 3, 1] folded in, 3x3 phase kernels (4x the
    multiply-adds); split (backbone.upconv_fir=split), 2x2 phases (16/9x). Forward and backward alike."""
    if cuda:
        return {}
    up = sum(conv_flops(c) * n for c, n in counted.convs.items() if is_reference_upconv(c)) / batch / 1e9
    total = counted.flops / batch / 1e9
    return {"reference_upconv_gflop_per_image": up, "fast_path_fold_gflop_per_image": total + 3 * up,
            "fast_path_split_gflop_per_image": total + 7 / 9 * up}


def replay(call: ConvCall, device: torch.device, runs: int = 20) -> float:
    """Median ms of ``call`` alone on random data (same shapes, dtype, memory format)."""
    dtype = getattr(torch, call.dtype)
    fmt = torch.channels_last if call.channels_last else torch.contiguous_format

    def rand(shape):
        t = torch.randn(shape, device=device, dtype=dtype)
        return t.contiguous(memory_format=fmt) if len(shape) == 4 else t

    tensors = [rand(s) for s in call.shapes]
    if call.op == "forward":
        bias = None if call.args[0] is None else rand(call.args[0])
        fn = lambda: aten.convolution.default(tensors[0], tensors[1], bias, *[list(a) if isinstance(a, tuple) else a  # noqa: E731
                                                                               for a in call.args[1:]])
    else:
        rest = [list(a) if isinstance(a, tuple) else a for a in call.args]
        fn = lambda: aten.convolution_backward.default(*tensors, *rest)  # noqa: E731
    return _median_ms(fn, device, runs)


def matmul_rate(device: torch.device, n: int = 8192, runs: int = 20) -> float:
    """Dense bf16 TFLOP/s of an n x n x n product (cuBLAS): the chip's practical matrix rate."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (_median_ms(lambda: a @ b, device, runs) * 1e-3) / 1e12


def _median_ms(fn: Callable[[], object], device: torch.device, runs: int) -> float:
    return time_fn(fn, name="", batch=1, dtype="", device=device, warmup=3, runs=runs).median_ms


KINDS = (  # first match wins
    ("layout transposes", r"nchwToNhwc|nhwcToNchw|transpose_readWrite|convertTensor"),
    ("cuDNN convolutions", r"conv|xmma|cudnn|implicit_gemm|fprop|dgrad|wgrad|winograd|fft"),
    ("cuBLAS products", r"gemm|cutlass|nvjet|cublas|splitK"),
    ("project Triton (deformation, tri-plane)", r"^_(deform|refine|triplane|search|grid)"),
    ("Inductor fused", r"^triton_"),
    ("copies and fills", r"[Mm]emcpy|[Mm]emset|copy_kernel|fill_kernel"),
)


def kind_of(kernel: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, kernel):
            return kind
    return "other (eager elementwise, reductions, sorts)"


def profile(fn: Callable[[], object], device: torch.device, calls: int = 3) -> dict:
    """Device time per call by kind of kernel and the 15 longest kernels (``fn`` warmed up already)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize(device)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time / 1e3 / calls  # us -> ms per call
    kinds: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        kinds[kind_of(name)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {"device_ms": sum(per_kernel.values()), "kinds_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": [[name[:120], ms] for name, ms in top]}


def workloads(small: bool, device: torch.device, batch: int, precision: str, upconv_fir: str = "fold"):
    """(name, fn) of the portrait batch, the two inversion steps and (eg3d_512) the fine step with LPIPS
    at half the output size, each on ``batch`` images."""
    from benchmarks import bench_canonicalize, bench_generate
    from benchmarks.bench_generator import precision_context
    from clipportrait.canonical.config import InversionConfig
    from clipportrait.canonical.inversion import Inverter
    from clipportrait.geometry.cameras import sample_ffhq_like

    stage2 = bench_generate.build_system(small, 512, True, device, "cuda", upconv_fir)
    gen = torch.Generator().manual_seed(batch)
    params = stage2.geometry.morphable.sample_params(batch, generator=gen)
    cond = {"camera": sample_ffhq_like(batch, generator=gen).to(device), "shape": params.shape.to(device),
            "expression": params.expression.to(device), "pose": params.pose.to(device),
            "flip": torch.zeros(batch, dtype=torch.bool, device=device), "alpha": 1.0,
            "clip_embedding": torch.nn.functional.normalize(torch.randn(batch, 512, generator=gen), dim=1).to(device)}
    z = torch.randn(batch, stage2.cfg.backbone.z_dim, generator=gen).to(device)

    def portrait():
        with torch.inference_mode(), precision_context("bf16" if precision == "bf16" else "tf32", device):
            return stage2.generate(z, cond, G=stage2.G_ema, noise_mode="const", truncation_psi=0.7)["image"]

    name = "tiny" if small else "eg3d_512"
    stage1 = bench_canonicalize.build_system(name, True, device, "cuda", upconv_fir)
    inv_precision = "bf16" if precision == "bf16" and device.type == "cuda" else "fp32"
    cfg = InversionConfig(steps=200, w_avg_samples=1000, precision=inv_precision, coarse_fraction=0.5)
    inverter = Inverter(stage1, cfg, lpips=bench_canonicalize.random_lpips(device))
    images, icond = bench_canonicalize.random_batch(stage1, batch, device)
    state = inverter.start(images, icond)
    rows = [("portrait (text embedding given)", portrait),
            ("inversion coarse step", lambda: inverter.step(state, 10)),
            ("inversion fine step", lambda: inverter.step(state, 150))]
    half = stage1.cfg.backbone.img_resolution // 2  # the StyleGAN2 projector compares at 256^2
    if not small:
        cfg_half = InversionConfig(**{**cfg.__dict__, "lpips_resolution": half})
        inverter_half = Inverter(stage1, cfg_half, lpips=inverter.lpips)
        state_half = inverter_half.start(images, icond)
        rows.append((f"inversion fine step, LPIPS at {half}^2", lambda: inverter_half.step(state_half, 150)))
    return rows


def main(argv: list[str] | None = None) -> None:
    import json
    import time

    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--precision", default="bf16", choices=["bf16", "tf32"])
    p.add_argument("--no-profile", action="store_true", help="counts and convolution ceiling only")
    p.add_argument("--no-replay", action="store_true", help="skip the convolution ceiling (replaying every conv alone)")
    p.add_argument("--only", default="", help="run only the workloads whose name contains this text")
    p.add_argument("--rate", type=float, default=None,
                   help="TFLOP/s for the floor column (default on CUDA: a measured bf16 matrix product)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        set_cuda_math(tf32=True, autotune=True)
    batch = 2 if args.small else args.batch
    measured_rate = matmul_rate(device) if cuda else None
    rate = args.rate or measured_rate
    precision = args.precision if cuda else "tf32"  # same counts; CPU autocast would only be slower
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / \
        f"floor-{device.type}{'-small' if args.small else f'-b{batch}'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> None:  # after every row, so a run cut short keeps what it measured
        out.write_text(json.dumps({"device": device_description(device), "torch": torch.__version__,
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "precision": precision,
                                   "measured_bf16_matmul_tflops": measured_rate, "floor_rate_tflops": rate,
                                   "rows": rows}, indent=2))

    rows = []
    for name, fn in workloads(args.small, device, batch, precision, args.upconv_fir):
        if args.only not in name:
            continue
        counted = count(fn)
        row = {"name": name, "batch": batch, "gflop_per_image": counted.flops / batch / 1e9,
               "gflop_per_image_by_op": {op: n / batch / 1e9 for op, n in counted.per_op.items()},
               "conv_gflop_per_image": sum(conv_flops(c) * n for c, n in counted.convs.items()) / batch / 1e9,
               **upconv_estimates(counted, batch, cuda),
               "top_convs": [[c.op, c.shapes, n, conv_flops(c) * n / batch / 1e9]
                             for c, n in sorted(counted.convs.items(), key=lambda cn: -conv_flops(cn[0]) * cn[1])[:12]]}
        if rate:
            row["floor_ms"] = counted.flops / (rate * 1e12) * 1e3
        if cuda:
            if not args.no_replay:
                row["convs_alone_ms"] = sum(replay(c, device) * n for c, n in counted.convs.items())
            if not args.no_profile:
                fn()  # compiles, autotunes
                row["measured_ms"] = _median_ms(fn, device, 20)
                row["profile"] = profile(fn, device)
        rows.append(row)
        write(rows)
        print(f"{name}: {row['gflop_per_image']:.1f} GFLOP/image ({row['conv_gflop_per_image']:.1f} in convolutions)"
              + (f", measured {row['measured_ms']:.1f} ms" if "measured_ms" in row else ""), file=sys.stderr)
        for kernel, ms in row.get("profile", {}).get("top_kernels_ms", []):
            print(f"    {ms:8.2f} ms  {kernel}", file=sys.stderr)
    print(f"\nfloors at batch {batch} ({precision}) — {device_description(device)}, torch {torch.__version__}"
          + (f"; measured bf16 matmul {measured_rate:.0f} TFLOP/s" if measured_rate else "")
          + (f"; floor at {rate:.0f} TFLOP/s" if rate else ""))
    print(f"{'workload':34s} {'GFLOP/img':>9s} {'conv':>7s} {'floor ms':>9s} {'convs alone':>11s} {'measured':>9s}")
    for r in rows:
        fmt = lambda k: f"{r[k]:.1f}" if k in r else "-"  # noqa: E731
        print(f"{r['name']:34s} {r['gflop_per_image']:9.1f} {r['conv_gflop_per_image']:7.1f} "
              f"{fmt('floor_ms'):>9s} {fmt('convs_alone_ms'):>11s} {fmt('measured_ms'):>9s}")
        for kind, ms in r.get("profile", {}).get("kinds_ms", {}).items():
            print(f"    {kind:44s} {ms:8.2f} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
