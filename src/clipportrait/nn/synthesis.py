"""StyleGAN2 synthesis network S_G (eq. 7): w -> tri-plane features, skip architecture.

Blocks whose resolution is at least ``bf16_resolution`` run under bf16 autocast on CUDA (the
StyleGAN2 ``num_fp16_res`` idea, with bf16 so no loss scaling is needed); on CPU they stay float32
unless the caller opens an autocast context itself.

With ``fast_path`` (the default) CUDA tensors take ``layers``' fast path: channels_last activations
(cuDNN's native layout: no NCHW<->NHWC transposes around each conv), the FIR low-pass folded into
the up-sampling conv, and in-place conv tails. It computes the same function as the reference path.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from clipportrait.nn.layers import (
    DEFAULT_FIR,
    FullyConnected,
    bias_act,
    binomial_order,
    compute_dtype,
    demodulation_coefficients,
    demodulation_sums,
    fir_filter,
    box_filters_fuse,
    folded_upconv_phases,
    frozen,
    modulated_conv2d,
    modulated_conv_core,
    modulated_upconv_folded,
    modulated_upconv_split,
    split_upconv_phases,
    synthesis_layer_tail,
    torgb_tail,
    use_fast_path,
)

NOISE_MODES = ("random", "const", "none")


def block_autocast(enabled: bool, x: torch.Tensor):
    """bf16 autocast for a low-precision block, only on CUDA (CPU bf16 convs are slow)."""
    if enabled and x.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (+ optional 2x FIR upsampling), per-pixel noise, bias, leaky ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        up: int = 1,
        conv_clamp: float | None = None,
        resample_taps: tuple[float, ...] = DEFAULT_FIR,
        fast_path: bool = True,
        split_fir: bool = False,
    ) -> None:
        super().__init__()
        self.resolution, self.up, self.conv_clamp, self.fast_path = resolution, up, conv_clamp, fast_path
        # ``split_fir`` (backbone.upconv_fir=split): the up-sampling conv's binomial FIR of this order is
        # split between kernel and box means where box filters fuse (``modulated_upconv_split``).
        order = binomial_order(resample_taps) if up == 2 else None
        self.split_order = order if split_fir and order is not None and order >= 2 else None
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("resample_filter", fir_filter(resample_taps), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", gain: float = 1.0) -> torch.Tensor:
        styles = self.affine(w)
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode={noise_mode!r}: expected one of {NOISE_MODES}")
        if use_fast_path(self.fast_path, x):
            x = x.contiguous(memory_format=torch.channels_last)
            split = self.split_order is not None and box_filters_fuse(x)
            kernel, sums, split_kernel = frozen(self, compute_dtype(x), lambda d: self.weight_transforms(d, split))
            if split:
                x = modulated_upconv_split(x, styles, split_kernel, self.weight.shape[-1], self.split_order)
            elif self.up > 1:
                x = modulated_upconv_folded(x, self.weight, styles, self.resample_filter, self.up, phases=kernel)
            else:
                x = modulated_conv_core(x, kernel, styles)
            return synthesis_layer_tail(x, demodulation_coefficients(self.weight, styles, sums),
                                        self._noise(x, noise_mode), self.noise_strength, self.bias, gain,
                                        self.conv_clamp)
        x = modulated_conv2d(x, self.weight, styles, demodulate=True, up=self.up, resample_filter=self.resample_filter)
        noise = self._noise(x, noise_mode)
        if noise is not None:
            x = x + noise.to(x.dtype) * self.noise_strength.to(x.dtype)
        return bias_act(x, self.bias, "lrelu", gain=gain, clamp=self.conv_clamp)

    def weight_transforms(self, dtype: torch.dtype, split: bool | None = None) -> tuple:
        """The fast path's conv kernels in ``dtype`` and the demodulation sums (what ``freeze_weights``
        keeps): (kernel, sums, split kernel). When up-sampling, the kernel is the FIR-folded phase
        kernels (None when ``split``) and the split kernel ``split_upconv_phases`` (None unless
        ``split``, or the layer splits its FIR and ``split`` is None, as freezing asks). Computed at
        the weights' own precision (the FIR fold is a convolution, which autocast would run in bf16),
        so frozen or per call they are the same numbers."""
        sums = demodulation_sums(self.weight)
        if self.up == 1:
            return self.weight.to(dtype), sums, None
        want_split = self.split_order is not None and split is not False
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            kernel = None if split else folded_upconv_phases(self.weight, self.resample_filter, self.up).to(dtype)
            split_kernel = split_upconv_phases(self.weight, self.up).to(dtype) if want_split else None
        return kernel, sums, split_kernel

    def _noise(self, x: torch.Tensor, noise_mode: str) -> torch.Tensor | None:
        """Per-pixel noise (B, 1, R, R) / (R, R), or None, for the conv output ``x``."""
        if noise_mode == "random":
            return torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
        return self.noise_const if noise_mode == "const" else None


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation (the skip-architecture output branch)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp  # applied with the bias by SynthesisBlock (torgb_tail)
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Modulated 1x1 conv output before bias and clamp (``torgb_tail`` applies them)."""
        styles = self.affine(w) * self.weight_gain
        return modulated_conv_core(x, self.weight, styles)


class SynthesisBlock(nn.Module):
    """One resolution level: [const | 2x-up conv] -> conv -> toRGB, RGB skip via FIR upsampling.

    ``in_channels == 0`` makes the first block, which starts from a learned constant.
    Consumes ``num_conv + num_torgb`` rows of ws (B, n, w_dim).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        use_bf16: bool = False,
        conv_clamp: float | None = None,
        resample_taps: tuple[float, ...] = DEFAULT_FIR,
        fast_path: bool = True,
        split_fir: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.resolution, self.use_bf16 = in_channels, resolution, use_bf16
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            self.conv0 = None
        else:
            self.const = None
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2,
                                        conv_clamp=conv_clamp, resample_taps=resample_taps, fast_path=fast_path,
                                        split_fir=split_fir)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution,
                                    conv_clamp=conv_clamp, resample_taps=resample_taps, fast_path=fast_path)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1
        self.register_buffer("resample_filter", fir_filter(resample_taps), persistent=False)
        self.box_order = binomial_order(resample_taps)

    def forward(
        self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str = "random"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if ws.ndim != 3 or ws.shape[1] != self.num_conv + self.num_torgb:
            raise ValueError(f"ws: expected (B, {self.num_conv + self.num_torgb}, w_dim), got {tuple(ws.shape)}")
        with block_autocast(self.use_bf16, ws):
            if self.const is not None:
                x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
                x = self.conv1(x, ws[:, 0], noise_mode)
            else:
                if x is None or x.shape[1] != self.in_channels or x.shape[-1] * 2 != self.resolution:
                    raise ValueError(
                        f"x: expected (B, {self.in_channels}, {self.resolution // 2}, {self.resolution // 2}), "
                        f"got {None if x is None else tuple(x.shape)}"
                    )
                x = self.conv0(x, ws[:, 0], noise_mode)
                x = self.conv1(x, ws[:, 1], noise_mode)
            y = self.torgb(x, ws[:, self.num_conv])
        # Outside autocast: the running image stays float32.
        img = torgb_tail(y, self.torgb.bias, self.torgb.conv_clamp, img, self.resample_filter, self.box_order)
        return x, img


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """StyleGAN2's channel schedule: min(channel_base / resolution, channel_max)."""
    return min(channel_base // resolution, channel_max)


class SynthesisNetwork(nn.Module):
    """4x4 constant -> ``resolution`` image with ``img_channels`` channels (the tri-plane for S_G)."""

    def __init__(
        self,
        w_dim: int,
        resolution: int,
        img_channels: int,
        channel_base: int,
        channel_max: int,
        num_bf16_res: int = 0,
        conv_clamp: float | None = None,
        fast_path: bool = True,
        split_fir: bool = False,
    ) -> None:
        super().__init__()
        log2 = int(math.log2(resolution)) if resolution > 0 else 0
        if resolution < 4 or 2**log2 != resolution:
            raise ValueError(f"resolution={resolution}: expected a power of two >= 4")
        self.resolution, self.img_channels = resolution, img_channels
        resolutions = [2**i for i in range(2, log2 + 1)]
        bf16_from = max(2 ** (log2 + 1 - num_bf16_res), 8) if num_bf16_res > 0 else resolution * 2
        self.blocks = nn.ModuleList()
        for res in resolutions:
            in_ch = channels_at(res // 2, channel_base, channel_max) if res > 4 else 0
            out_ch = channels_at(res, channel_base, channel_max)
            self.blocks.append(
                SynthesisBlock(in_ch, out_ch, w_dim, res, img_channels, use_bf16=res >= bf16_from, conv_clamp=conv_clamp,
                               fast_path=fast_path, split_fir=split_fir)
            )
        # Consecutive blocks share one w: block k's toRGB w is block k+1's first conv w.
        self.num_ws = sum(b.num_conv for b in self.blocks) + self.blocks[-1].num_torgb

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws: expected (B, {self.num_ws}, w_dim), got {tuple(ws.shape)}")
        x = img = None
        w_idx = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + block.num_torgb], noise_mode)
            w_idx += block.num_conv
        return img
