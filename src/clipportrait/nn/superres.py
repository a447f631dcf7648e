"""Super-resolution x_raw -> x in EG3D's hybrid design (SuperresolutionHybrid8XDC).

The raw RGB (first 3 feature channels) and the full feature image are resized bilinearly to
``input_resolution``; then each StyleGAN2 skip block doubles the resolution, modulated by the last
w of the backbone, and adds its toRGB output to the FIR-upsampled running image. So the output is
the (upsampled) raw image plus learned detail, which keeps the 3D-consistent raw render in charge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipportrait.nn.synthesis import SynthesisBlock


class SuperResolution(nn.Module):
    def __init__(
        self,
        in_channels: int,
        w_dim: int,
        input_resolution: int,
        channels: list[int],
        use_bf16: bool = True,
        conv_clamp: float | None = 256.0,
        antialias: bool = True,
        fast_path: bool = True,
        split_fir: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) == 0:
            raise ValueError("channels: expected at least one super-resolution block")
        self.input_resolution, self.antialias = input_resolution, antialias
        self.output_resolution = input_resolution * 2 ** len(channels)
        widths = [in_channels] + list(channels)
        self.blocks = nn.ModuleList(
            SynthesisBlock(a, b, w_dim, input_resolution * 2 ** (i + 1), img_channels=3,
                           use_bf16=use_bf16, conv_clamp=conv_clamp if use_bf16 else None, fast_path=fast_path,
                           split_fir=split_fir)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
        )

    def forward(self, rgb: torch.Tensor, features: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """rgb (B, 3, r, r), features (B, C, r, r), w (B, w_dim) -> image (B, 3, R_out, R_out)."""
        if w.ndim != 2:
            raise ValueError(f"w: expected (B, w_dim), got {tuple(w.shape)}")
        size = (self.input_resolution, self.input_resolution)
        if rgb.shape[-2:] != size:
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)
            features = F.interpolate(features, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)
        x, img = features, rgb
        for block in self.blocks:
            ws = w.unsqueeze(1).expand(-1, block.num_conv + block.num_torgb, -1)
            x, img = block(x, img, ws, noise_mode)
        return img
