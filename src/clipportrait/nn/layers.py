"""StyleGAN2 building blocks in pure PyTorch (no compiled extensions).

Equalised learning rate (weights stored at unit variance, scaled at run time), fused bias +
activation + clamp, FIR up/down-sampling (``upfirdn2d`` semantics of StyleGAN2: zero-insertion
upsampling, padding, true convolution with the filter, decimation) and modulated convolution with
demodulation. Everything is shape-static so ``torch.compile`` traces it without graph breaks.

On CUDA a fast path (``use_fast_path``) computes the same functions with fewer passes over memory:
channels_last activations (cuDNN's native layout), the FIR low-pass after a transposed conv folded
into the conv's kernel (cuDNN's depthwise convs transpose bf16 tensors twice, see
``fir_folded_transposed_weight``) and computed in polyphase form (``polyphase_conv_transpose2d``),
and the conv tail in place with the activation gain folded in. Inside graphs compiled for CUDA the
binomial FIR filters become box means that Inductor fuses (``box_filters_fuse``).
"""

from __future__ import annotations

import math

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
DEFAULT_FIR = (1.0, 3.0, 3.0, 1.0)


def fir_filter(taps: tuple[float, ...] = DEFAULT_FIR) -> torch.Tensor:
    """1-D FIR filter normalised to unit sum (applied separably along H and W)."""
    if len(taps) == 0:
        raise ValueError("taps: expected at least one filter tap, got an empty sequence")
    f = torch.as_tensor(taps, dtype=torch.float32)
    if float(f.sum()) == 0.0:
        raise ValueError(f"taps={taps}: filter taps must not sum to zero")
    return f / f.sum()


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor,
    up: int = 1,
    down: int = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample (zero insertion), pad, convolve with separable 1-D filter ``f``, then decimate.

    ``padding`` is (left, right, top, bottom) in pixels of the upsampled image; negative values
    crop. ``gain`` multiplies the 2-D result (use ``up**2`` after upsampling to keep the DC level).
    """
    if x.ndim != 4:
        raise ValueError(f"x: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if f.ndim != 1:
        raise ValueError(f"f: expected a 1-D separable filter, got shape {tuple(f.shape)}")
    if up < 1 or down < 1:
        raise ValueError(f"up={up}, down={down}: both must be >= 1")
    batch, channels, height, width = x.shape
    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    left, right, top, bottom = padding
    x = F.pad(x, [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)])
    x = x[:, :, max(-top, 0) : x.shape[2] - max(-bottom, 0), max(-left, 0) : x.shape[3] - max(-right, 0)]
    # conv2d correlates, so flip the filter to get a true convolution (matters for asymmetric taps).
    taps = f.flip(0).to(dtype=x.dtype, device=x.device) * math.sqrt(gain)
    if up == 1:
        # The discriminator's path (and the blur): R1 differentiates it twice, see _DepthwiseFir.
        if min(x.shape[-2:]) < taps.numel():
            raise ValueError(f"upfirdn2d: {tuple(x.shape[-2:])} pixels after padding, fewer than the "
                             f"{taps.numel()} filter taps")
        if taps.numel() <= _SEPARABLE_ABOVE:
            return _DepthwiseFir.apply(x, taps[:, None] * taps[None, :], (down, down))
        x = _DepthwiseFir.apply(x, taps[None, :], (1, down))
        return _DepthwiseFir.apply(x, taps[:, None], (down, 1))
    k = taps.numel()
    # Every channel is filtered alike: filter (B*C, 1, H, W) single-channel images.
    height, width = x.shape[-2:]
    x = x.reshape(batch * channels, 1, height, width)
    x = F.conv2d(x, taps.view(1, 1, 1, k), stride=(1, down))
    x = F.conv2d(x, taps.view(1, 1, k, 1), stride=(down, 1))
    return x.reshape(batch, channels, x.shape[-2], x.shape[-1])


_SEPARABLE_ABOVE = 8  # taps: up to this a k x k kernel in one pass (memory-bound), above it two 1-D passes


def _depthwise_weight(kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return kernel.to(dtype=x.dtype, device=x.device).expand(x.shape[1], 1, *kernel.shape).contiguous()


class _DepthwiseFir(torch.autograd.Function):
    """Valid correlation of every channel of x (B, C, H, W) with one 2-D ``kernel``, then decimation by
    ``stride``: a depthwise convolution. The map is linear in x, so its backward is its adjoint (a
    depthwise transposed convolution, ``_DepthwiseFirAdjoint``) whose backward is this map again:
    derivatives of any order (R1's double backward) cost one cuDNN call each. Autograd's own double
    backward of a depthwise conv loops over the channel groups (198 s per R1 call at eg3d_512 on an
    H100), and a sum of strided slices (what replaced it) made the filter most of D's time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
        ctx.kernel, ctx.stride, ctx.size = kernel, stride, tuple(x.shape[-2:])
        return F.conv2d(x, _depthwise_weight(kernel, x), stride=stride, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _DepthwiseFirAdjoint.apply(grad, ctx.kernel, ctx.stride, ctx.size), None, None


class _DepthwiseFirAdjoint(torch.autograd.Function):
    """The adjoint of ``_DepthwiseFir`` onto an input of spatial ``size``; its backward is that map."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, kernel: torch.Tensor, stride: tuple[int, int], size: tuple[int, int]):
        ctx.kernel, ctx.stride = kernel, stride
        if stride == (1, 1):
            # Without decimation the adjoint is a correlation of the fully padded grad with the flipped
            # kernel: cuDNN's depthwise forward kernel, 2.4x faster than its transposed one on an H100.
            kh, kw = kernel.shape
            padded = F.pad(grad, [kw - 1, kw - 1, kh - 1, kh - 1])
            return F.conv2d(padded, _depthwise_weight(kernel.flip(0, 1), grad), groups=grad.shape[1])
        extra = [size[i] - ((grad.shape[2 + i] - 1) * stride[i] + kernel.shape[i]) for i in range(2)]
        return F.conv_transpose2d(grad, _depthwise_weight(kernel, grad), stride=stride, groups=grad.shape[1],
                                  output_padding=tuple(extra))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _DepthwiseFir.apply(grad, ctx.kernel, ctx.stride), None, None, None


def binomial_order(taps) -> int | None:
    """n when ``taps`` are proportional to the binomial row C(n, 0..n) with n >= 1 ([1, 3, 3, 1] -> 3), else None."""
    taps = [float(t) for t in taps]
    n = len(taps) - 1
    if n < 1 or taps[0] == 0:
        return None
    row = [math.comb(n, k) for k in range(n + 1)]
    scale = taps[0] / row[0]
    return n if all(math.isclose(t, r * scale, rel_tol=1e-6, abs_tol=0.0) for t, r in zip(taps, row)) else None


def box_filters_fuse(x: torch.Tensor) -> bool:
    """Whether binomial FIR filters on ``x`` should run as box means (``box_fir2d``, ``box_upsample2d``):
    inside a graph that Inductor compiles for CUDA, where they fuse with the work around them (D
    fwd+bwd on 64 images at eg3d_512, H100: 254 -> 111 ms). Eagerly, the native avg_pool2d_backward
    kernel is slower than cuDNN's depthwise conv (555 vs 325 ms), and Inductor's CPU code generation
    takes minutes for the pooling backward (tiny D: 45 s -> 415 s), so both keep the convolutions."""
    return x.is_cuda and torch.compiler.is_compiling()


def box_fir2d(x: torch.Tensor, order: int, padding: tuple[int, int, int, int] = (0, 0, 0, 0),
              down: int = 1) -> torch.Tensor:
    """``upfirdn2d(x, binomial row of order n, down=down, padding=padding)`` as n 2x2 means.

    The binomial filter is [1/2, 1/2] convolved with itself n times, so its separable 2-D kernel is n
    successive 2x2 box averages, the last one taking the decimating stride. ``avg_pool2d`` and its
    backward are fused memory-bound kernels whose derivatives of any order are each other (R1's double
    backward), where cuDNN's depthwise convolution was ~55% of the discriminator's time on an H100.
    Zero padding of up to one pixel a side rides on each pass (zeros average to zeros, so spreading it
    over the passes pads the input); anything more, or asymmetric, is padded first.
    """
    if order < 1 or down not in (1, 2):
        raise ValueError(f"box_fir2d: order={order}, down={down}: expected order >= 1 and down 1 or 2")
    left, right, top, bottom = padding
    # Symmetric padding, at most one pixel a side per pass, goes to the passes; the rest is padded here.
    ph, pw = max(min(top, bottom), 0), max(min(left, right), 0)
    ph, pw = min(ph, order), min(pw, order)
    x = F.pad(x, [left - pw, right - pw, top - ph, bottom - ph]) if (left, right, top, bottom) != (pw, pw, ph, ph) else x
    for i in range(order):
        ih, iw = int(i < ph), int(i < pw)
        stride = down if i == order - 1 else 1
        x = F.avg_pool2d(x, 2, stride=stride, padding=(ih, iw), count_include_pad=True)
    return x


def box_upsample2d(x: torch.Tensor, order: int) -> torch.Tensor:
    """``upsample2d(x, binomial row of order n)`` (2x, DC gain 1) as a nearest-neighbour 2x upsample
    followed by n - 1 2x2 means: zero insertion then [1, 1] is the nearest upsample, and the other
    n - 1 factors of the binomial are box means. Inductor fuses it into one kernel, where the
    (B*C, 1, H, W) 1-D FIR convs took 37 ms each on cuDNN for the tri-plane image at batch 32."""
    if order < 1:
        raise ValueError(f"box_upsample2d: order={order}: expected >= 1")
    pad0, pad1 = (order + 2) // 2, (order - 1) // 2  # upsample2d's padding for order + 1 taps
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    return box_fir2d(x, order - 1, (pad0 - 1, pad1, pad0 - 1, pad1)) if order > 1 else x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """FIR upsampling by ``up``: output is exactly ``up`` times larger, DC gain 1."""
    k = f.numel()
    pad0, pad1 = (k + up - 1) // 2, (k - up) // 2
    return upfirdn2d(x, f, up=up, padding=(pad0, pad1, pad0, pad1), gain=up**2)


def downsample2d(x: torch.Tensor, f: torch.Tensor, down: int = 2) -> torch.Tensor:
    """FIR anti-aliased downsampling by ``down``: output is exactly ``down`` times smaller."""
    k = f.numel()
    pad0, pad1 = (k - down + 1) // 2, (k - down) // 2
    return upfirdn2d(x, f, down=down, padding=(pad0, pad1, pad0, pad1))


def bias_act(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "linear",
    gain: float = 1.0,
    clamp: float | None = None,
) -> torch.Tensor:
    """Add per-channel bias (dim 1), apply activation with its gain, scale, clamp to +-clamp*gain."""
    if bias is not None:
        shape = [1, -1] + [1] * (x.ndim - 2)
        x = x + bias.to(x.dtype).reshape(shape)
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE) * (LRELU_GAIN * gain)
    elif activation == "linear":
        x = x * gain if gain != 1.0 else x
    else:
        raise ValueError(f"activation={activation!r}: expected 'linear' or 'lrelu'")
    if clamp is not None:
        x = x.clamp(-clamp * gain, clamp * gain)
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the ops on floating ``x`` run in: autocast's when it is on for x's device, else x's own.
    Weights cast to it beforehand give the same numbers as autocast's own casts."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def frozen(module: nn.Module, dtype: torch.dtype, transforms: Callable[[torch.dtype], tuple]) -> tuple:
    """``transforms(dtype)``: tensors computed from ``module``'s weights alone (scaled and cast weights,
    folded up-sampling kernels, demodulation sums); the copies kept by ``freeze_weights`` instead when
    the module is frozen and no gradient is being recorded."""
    store = getattr(module, "_frozen_weights", None)
    if store is not None and not torch.is_grad_enabled() and dtype in store:
        return store[dtype]
    return transforms(dtype)


def freeze_weights(root: nn.Module, dtypes: tuple[torch.dtype, ...]) -> None:
    """Compute the weight transforms of every layer of ``root`` once, for each of ``dtypes``, and use
    them in later gradient-free calls instead of recomputing them per call (at batch 1 on an H100 they
    were ~1 ms of a 4.9 ms portrait: the FIR folds of the up-sampling convs and ~140 casts).

    For inference engines whose weights no longer change: the copies do not follow later updates of
    the parameters (``thaw_weights`` drops them). Calls that record gradients never use them."""
    with torch.no_grad():
        for module in root.modules():
            if callable(getattr(module, "weight_transforms", None)):
                module._frozen_weights = {d: tuple(t.detach() if t is not None else None
                                                   for t in module.weight_transforms(d)) for d in dtypes}


def thaw_weights(root: nn.Module) -> None:
    """Undo ``freeze_weights``: every call computes its weight transforms again."""
    for module in root.modules():
        module.__dict__.pop("_frozen_weights", None)


class FullyConnected(nn.Module):
    """Equalised-lr linear layer: weight ~ N(0, 1/lr_mul^2), scaled by lr_mul/sqrt(in) at run time."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features={in_features}, out_features={out_features}: both must be >= 1")
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / lr_multiplier)) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def weight_transforms(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scaled weight and bias in ``dtype`` (what ``freeze_weights`` keeps)."""
        w = (self.weight * self.weight_gain).to(dtype)
        return w, (self.bias * self.bias_gain).to(dtype) if self.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        w, b = frozen(self, dtype, self.weight_transforms)
        # The bias goes into F.linear (addmm) so inputs of any rank (..., in) work.
        return bias_act(F.linear(x, w, b), None, self.activation)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Equalised-lr conv with optional FIR downsampling, bias, activation and clamp (discriminator)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        down: int = 1,
        conv_clamp: float | None = None,
        resample_taps: tuple[float, ...] = DEFAULT_FIR,
    ) -> None:
        super().__init__()
        self.activation, self.down, self.conv_clamp = activation, down, conv_clamp
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.register_buffer("resample_filter", fir_filter(resample_taps), persistent=False)
        order = binomial_order(resample_taps)
        self.box_order = order if order is not None and down in (1, 2) else None

    def low_pass(self, x: torch.Tensor, padding: tuple[int, int, int, int], down: int) -> torch.Tensor:
        if self.box_order is not None and box_filters_fuse(x):
            return box_fir2d(x, self.box_order, padding, down)
        return upfirdn2d(x, self.resample_filter, down=down, padding=padding)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight * self.weight_gain
        k = self.resample_filter.numel()
        if self.down > 1:
            # Low-pass with the FIR filter, then a strided conv (StyleGAN2's downsampling conv).
            pad0 = self.padding + (k - self.down + 1) // 2
            pad1 = self.padding + (k - self.down) // 2
            if w.shape[-1] == 1:  # a 1x1 conv commutes with the decimation: filter only the kept pixels
                x = self.low_pass(x, (pad0, pad1, pad0, pad1), self.down)
                x = F.conv2d(x, w.to(x.dtype))
            else:
                x = self.low_pass(x, (pad0, pad1, pad0, pad1), 1)
                x = F.conv2d(x, w.to(x.dtype), stride=self.down)
        else:
            x = F.conv2d(x, w.to(x.dtype), padding=self.padding)
        return bias_act(x, self.bias, self.activation, gain=gain, clamp=self.conv_clamp)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"in={i}, out={o}, k={k}, down={self.down}, activation={self.activation}"


def use_fast_path(enabled: bool, x: torch.Tensor) -> bool:
    """Whether to take the CUDA fast path: enabled and x on CUDA (CPU keeps the reference path)."""
    return enabled and x.is_cuda


def transposed_conv_fir_padding(kernel_size: int, taps: int, up: int) -> tuple[int, int]:
    """Padding of the FIR low-pass that follows a stride-``up`` transposed conv (StyleGAN2), so the
    result is exactly ``up`` times the input size."""
    pad0 = (taps + up - 1) // 2 + kernel_size // 2 - (kernel_size - 1)
    pad1 = (taps - up) // 2 + kernel_size // 2 - (kernel_size - up)
    return pad0, pad1


def demodulation_sums(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(I, O) = sum_k w_oik^2 in ``dtype``: the weight-only factor of the demodulation coefficients."""
    return weight.to(dtype).square().sum(dim=(2, 3)).t()


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor,
                              sums: torch.Tensor | None = None) -> torch.Tensor:
    """(B, O) = 1 / sqrt(sum_ik (s_bi w_oik)^2 + 1e-8), in >= float32 for stability; ``sums``:
    ``demodulation_sums(weight)`` when already computed."""
    # sum_ik (s_i w_oik)^2 = (s^2) @ (sum_k w_oik^2)^T.
    dtype = torch.promote_types(styles.dtype, torch.float32)
    with torch.autocast(device_type=styles.device.type, enabled=False):
        sums = demodulation_sums(weight, dtype) if sums is None else sums.to(dtype)
        return (styles.to(dtype).square() @ sums + 1e-8).rsqrt()


def modulated_conv_core(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, up: int = 1) -> torch.Tensor:
    """conv(x * s) (stride-``up`` transposed conv when ``up > 1``, before its FIR low-pass), no demodulation.

    1x1 kernels fold the styles into per-sample weights and use one batched matmul instead (no
    pass over x for the modulation), in whichever memory format x has.
    """
    batch, in_channels, height, width = x.shape
    if weight.shape[-1] == 1 and weight.shape[-2] == 1 and up == 1:
        per_sample = weight[:, :, 0, 0].to(x.dtype).unsqueeze(0) * styles.to(x.dtype).unsqueeze(1)  # (B, O, I)
        out_channels = per_sample.shape[1]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = torch.bmm(x.permute(0, 2, 3, 1).reshape(batch, height * width, in_channels), per_sample.transpose(1, 2))
            return y.reshape(batch, height, width, out_channels).permute(0, 3, 1, 2)
        return torch.bmm(per_sample, x.reshape(batch, in_channels, height * width)).reshape(
            batch, out_channels, height, width)
    x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
    if up > 1:
        # StyleGAN2's order: transposed conv (stride `up`, 1/up^2 of the FLOPs of a conv at the
        # output resolution), then the FIR low-pass with gain up^2 (see modulated_conv2d).
        return F.conv_transpose2d(x, weight.transpose(0, 1).to(compute_dtype(x)), stride=up)
    return F.conv2d(x, weight.to(compute_dtype(x)), padding=weight.shape[-1] // 2)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    up: int = 1,
    resample_filter: torch.Tensor | None = None,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution, computed as conv(x * s) * d (the batched, non-grouped form).

    Per sample b: w'_{oik} = s_{bi} w_{oik}; with demodulation w''_{oik} = w'_{oik} / sqrt(sum_ik
    w'^2_{oik} + 1e-8). Scaling the input by s and the output by the demodulation coefficient is
    the same linear map and lets every sample share one ordinary (cuDNN) convolution.
    """
    if x.ndim != 4 or styles.ndim != 2 or styles.shape != (x.shape[0], x.shape[1]):
        raise ValueError(
            f"x {tuple(x.shape)} / styles {tuple(styles.shape)}: expected x (B, I, H, W) and styles (B, I)"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)}: expected {x.shape[1]} input channels")
    if up > 1 and resample_filter is None:
        raise ValueError("resample_filter: required when up > 1")
    x = modulated_conv_core(x, weight, styles, up)
    if up > 1:
        pad0, pad1 = transposed_conv_fir_padding(weight.shape[-1], resample_filter.numel(), up)
        x = upfirdn2d(x, resample_filter, padding=(pad0, pad1, pad0, pad1), gain=up**2)
    if demodulate:
        x = x * demodulation_coefficients(weight, styles).to(x.dtype).reshape(x.shape[0], -1, 1, 1)
    return x


def fir_folded_transposed_weight(weight: torch.Tensor, f: torch.Tensor, up: int) -> torch.Tensor:
    """(O, I, k, k) -> (O, I, k+t-1, k+t-1): the conv kernel fully convolved with the separable
    t-tap FIR filter (gain up^2), so one stride-``up`` transposed conv with it equals the transposed
    conv with ``weight`` followed by the FIR low-pass (composition of linear filters). It costs
    ((k+t-1)/k)^2 the conv FLOPs but removes a depthwise pass, which is far slower on the GPU."""
    out_ch, in_ch, k, _ = weight.shape
    t = f.numel()
    taps = f.to(weight.dtype) * up  # sqrt(up^2) per dimension
    kernel = (taps[:, None] * taps[None, :]).flip(0, 1).reshape(1, 1, t, t)  # conv2d correlates: flip
    full = F.conv2d(weight.reshape(out_ch * in_ch, 1, k, k), kernel, padding=t - 1)
    return full.reshape(out_ch, in_ch, k + t - 1, k + t - 1)


def polyphase_conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, up: int, crop: tuple[int, int]) -> torch.Tensor:
    """``conv_transpose2d(x, weight.transpose(0, 1), stride=up)`` with ``crop`` = (first, last) outputs
    dropped on each side, as one ordinary convolution and a pixel shuffle.

    Output phase (a, b) of a stride-``up`` transposed conv is a plain correlation of x with the
    sub-kernel weight[..., a::up, b::up] flipped, so the up^2 phases are the output channels of one
    conv with (O * up^2, I, M, M) weights (M = ceil(k / up)) and ``pixel_shuffle`` interleaves them.
    The FLOPs are the same, but the weight gradient is an ordinary conv's: cuDNN's for the transposed
    6x6 stride-2 kernel of the 512^2 super-resolution layer took 178 ms at batch 32 on an H100.
    """
    return polyphase_conv(x, polyphase_weight(weight, up).to(compute_dtype(x)), weight.shape[-1], up, crop)


def polyphase_weight(weight: torch.Tensor, up: int) -> torch.Tensor:
    """(O, I, k, k) transposed-conv kernel -> (O * up^2, I, M, M) phase kernels of one ordinary conv
    (M = ceil(k / up), see ``polyphase_conv_transpose2d``)."""
    out_ch, in_ch, k, _ = weight.shape
    m = -(-k // up)
    if m * up != k:  # zero taps at the far end: same full output, longer by m*up - k
        weight = F.pad(weight, [0, m * up - k, 0, m * up - k])
    phases = weight.reshape(out_ch, in_ch, m, up, m, up).flip(2, 4).permute(0, 3, 5, 1, 2, 4)
    return phases.reshape(out_ch * up * up, in_ch, m, m)


def polyphase_conv(x: torch.Tensor, phases: torch.Tensor, k: int, up: int, crop: tuple[int, int]) -> torch.Tensor:
    """The stride-``up`` transposed conv of a k x k kernel from its ``polyphase_weight``, cropped by ``crop``."""
    m = phases.shape[-1]
    first, last = crop[0], crop[1] + m * up - k
    if first == last and first % up == 0 and first // up <= m - 1:
        # The cropped rows are whole phase rows: pad the conv less instead of computing them.
        return F.pixel_shuffle(F.conv2d(x, phases, padding=m - 1 - first // up), up)
    y = F.pixel_shuffle(F.conv2d(x, phases, padding=m - 1), up)
    return F.pad(y, [-first, -last, -first, -last])  # negative pads crop (positive ones pad zeros)


def folded_upconv_phases(weight: torch.Tensor, resample_filter: torch.Tensor, up: int = 2) -> torch.Tensor:
    """The phase kernels (``polyphase_weight``) of the up-sampling conv with the FIR folded in."""
    return polyphase_weight(fir_folded_transposed_weight(weight, resample_filter, up), up)


def modulated_upconv_folded(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, resample_filter: torch.Tensor, up: int = 2,
    phases: torch.Tensor | None = None,
) -> torch.Tensor:
    """``modulated_conv2d(..., demodulate=False, up=up)`` as one transposed conv with the FIR folded
    into its kernel, computed in polyphase form; the output is exactly ``up`` times the input size.
    ``phases``: ``folded_upconv_phases(weight, resample_filter, up)`` when already computed."""
    k, t = weight.shape[-1], resample_filter.numel()
    pad0, pad1 = transposed_conv_fir_padding(k, t, up)
    start = t - 1 - pad0  # first output of the full (uncropped) convolution that is kept
    end = k + t - 1 - up - start  # outputs dropped at the far end
    if phases is None:
        phases = folded_upconv_phases(weight, resample_filter, up)
    x = x * styles.to(x.dtype).reshape(x.shape[0], -1, 1, 1)
    return polyphase_conv(x, phases.to(compute_dtype(x)), k + t - 1, up, (start, end))


def split_upconv_phases(weight: torch.Tensor, up: int = 2) -> torch.Tensor:
    """The phase kernels (``polyphase_weight``) of the up-sampling conv with only the first [1, 1]
    factor of a binomial FIR folded in (``modulated_upconv_split``): a k x k kernel becomes (k+1) x
    (k+1), whose 2x2 phases (k = 3) cost what the 3x3 kernel's own padded phases do."""
    if up != 2:
        raise ValueError(f"split_upconv_phases: up={up}: the binomial split is for 2x up-sampling")
    half = torch.full((2,), 0.5, dtype=weight.dtype, device=weight.device)  # x up = [1, 1]
    return polyphase_weight(fir_folded_transposed_weight(weight, half, up), up)


def modulated_upconv_split(x: torch.Tensor, styles: torch.Tensor, phases: torch.Tensor, kernel_size: int,
                           order: int) -> torch.Tensor:
    """``modulated_upconv_folded`` for a binomial FIR of ``order`` n >= 2 (n + 1 taps, [1, 3, 3, 1]: 3)
    with the filter split in two: its first [1, 1] factor (the zero-insertion's nearest-neighbour
    part, gain 2 a dimension) folded into the conv's kernel (``split_upconv_phases`` of the k x k
    ``kernel_size`` weight), the other n - 1 factors applied after the conv as 2x2 box means
    (``box_fir2d``). Both orders compute the transposed conv followed by the FIR (linear filters
    commute). Folding the whole FIR makes a (k + n) x (k + n) kernel: for 3x3 and [1, 3, 3, 1], 3x3
    phases, 4x the transposed conv's multiply-adds, against 16/9 for the 2x2 phases here; the box
    means are memory-bound passes that Inductor fuses with the layer's tail (``box_filters_fuse``)."""
    k, t, up = kernel_size, order + 1, 2
    x = x * styles.to(x.dtype).reshape(x.shape[0], -1, 1, 1)
    y = polyphase_conv(x, phases.to(compute_dtype(x)), k + 1, up, (0, 0))  # the whole transposed conv
    # The kept window of the full output convolved with the remaining n taps (see modulated_upconv_folded):
    # it starts at `start` of that full convolution, i.e. (n - 1) - start pixels of zero padding.
    start = t - 1 - transposed_conv_fir_padding(k, t, up)[0]
    first = order - 1 - start
    last = order - k - first
    return box_fir2d(y, order - 1, (first, last, first, last))


def synthesis_layer_tail(
    x: torch.Tensor,
    dcoefs: torch.Tensor,
    noise: torch.Tensor | None,
    noise_strength: torch.Tensor,
    bias: torch.Tensor,
    gain: float = 1.0,
    clamp: float | None = None,
) -> torch.Tensor:
    """Demodulation by ``dcoefs`` (B, O), noise * strength, bias, leaky ReLU (gain sqrt(2) * gain)
    and clamp: the same as ``x * d``, ``+ noise * strength`` and ``bias_act(.., "lrelu", gain, clamp)``
    in three or four passes instead of seven, since lrelu(z) * a = lrelu(z * a) for a > 0 lets
    the activation gain go into d, strength and bias. ``x`` (a fresh conv output) is overwritten."""
    act_gain = LRELU_GAIN * gain
    batch, channels = x.shape[:2]
    scale = (dcoefs * act_gain).to(x.dtype).reshape(batch, channels, 1, 1)
    shift = (bias * act_gain).to(x.dtype).reshape(1, channels, 1, 1)
    x = torch.addcmul(shift, x, scale)
    if noise is not None:
        x = x.add_(noise.to(x.dtype) * (noise_strength * act_gain).to(x.dtype))
    x = F.leaky_relu_(x, LRELU_SLOPE)  # backward needs only its output, which nothing below overwrites
    if clamp is not None:
        bound = clamp * gain
        x = x.clamp_(-bound, bound) if not torch.is_grad_enabled() else x.clamp(-bound, bound)
    return x


def torgb_tail(
    y: torch.Tensor,
    bias: torch.Tensor,
    clamp: float | None,
    img: torch.Tensor | None,
    resample_filter: torch.Tensor,
    box_order: int | None = None,
) -> torch.Tensor:
    """Skip architecture: bias (+ clamp) of the toRGB output, in float32, added to the 2x
    FIR-upsampled running image (``img`` None for the first block). ``box_order``: the filter's
    ``binomial_order``, which lets a compiled graph upsample with ``box_upsample2d``."""
    y = bias_act(y, bias, "linear", clamp=clamp).float()
    if img is None:
        return y
    if box_order is not None and box_filters_fuse(img):
        return box_upsample2d(img.float(), box_order) + y  # fused by Inductor (see box_upsample2d)
    return upsample2d(img.float(), resample_filter) + y


class MinibatchStd(nn.Module):
    """Appends the across-group standard deviation of features as extra channels (StyleGAN2 D)."""

    def __init__(self, group_size: int, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g != 0:
            raise ValueError(f"batch size {n}: must be divisible by the minibatch-std group size {g}")
        f = self.num_channels
        y = x.float().reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()
        y = y.mean(dim=(2, 3, 4)).reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y.to(x.dtype)], dim=1)
