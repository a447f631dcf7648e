"""Mesh-conditioned dual discriminator D (eq. 12-15).

    u = S_D(x, rdr)     (eq. 12) ResNet stem on [image, upsampled raw image, mesh render rdr]
    v = M_D(c_cam)      (eq. 13) camera label (25) -> condition vector
    D = <u, v> / sqrt(dim)   (eq. 15 with alpha = 0; the 1/sqrt(dim) is EG3D's projection scale)

Stage 2 replaces v by v + alpha T_D(v, r) (eq. 14): use ``stem`` and ``camera_embedding`` to get
u and v, modify v, then ``score(u, v)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipportrait.nn.compiled import check_mode, maybe_compiled
from clipportrait.nn.config import DiscriminatorConfig
from clipportrait.nn.layers import Conv2dLayer, FullyConnected, MinibatchStd, upfirdn2d
from clipportrait.nn.mapping import MappingNetwork
from clipportrait.nn.synthesis import block_autocast, channels_at


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """EG3D's fade-in blur: separable kernel 2^(-(k/sigma)^2), |k| <= floor(3 sigma), unit sum."""
    radius = math.floor(sigma * 3)
    if sigma <= 0 or radius == 0:
        return x
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32).div(sigma).square().neg().exp2()
    return upfirdn2d(x, taps / taps.sum(), padding=(radius, radius, radius, radius))


class DiscriminatorBlock(nn.Module):
    """ResNet block: [fromRGB] -> conv -> conv(down 2) plus a 1x1 down-sampling skip, scaled by sqrt(1/2)."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, img_channels: int,
                 use_bf16: bool, conv_clamp: float | None) -> None:
        super().__init__()
        self.use_bf16 = use_bf16
        self.fromrgb = (
            Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu", conv_clamp=conv_clamp)
            if in_channels == 0 else None
        )
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with block_autocast(self.use_bf16, x):
            if self.fromrgb is not None:
                x = self.fromrgb(x)
            y = self.skip(x, gain=math.sqrt(0.5))
            x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
            return y + x


class MeshConditionedDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig, img_resolution: int) -> None:
        super().__init__()
        log2 = int(math.log2(img_resolution)) if img_resolution > 0 else 0
        if img_resolution < 8 or 2**log2 != img_resolution:
            raise ValueError(f"img_resolution={img_resolution}: expected a power of two >= 8")
        if cfg.rdr_channels < 0:
            raise ValueError(f"rdr_channels={cfg.rdr_channels}: expected >= 0")
        check_mode(cfg.compile, "discriminator.compile")
        self.cfg, self.img_resolution = cfg, img_resolution
        self.in_channels = 2 * cfg.image_channels + cfg.rdr_channels
        ch = lambda res: channels_at(res, cfg.channel_base, cfg.channel_max)  # noqa: E731
        bf16_from = max(2 ** (log2 + 1 - cfg.bf16_res), 8) if cfg.bf16_res > 0 else img_resolution * 2
        self.blocks = nn.ModuleList()
        for res in (2**i for i in range(log2, 2, -1)):
            use_bf16 = res >= bf16_from
            self.blocks.append(DiscriminatorBlock(
                0 if res == img_resolution else ch(res), ch(res), ch(res // 2), self.in_channels,
                use_bf16, cfg.conv_clamp if use_bf16 else None,
            ))
        c4 = ch(4)
        self.cmap_dim = cfg.cmap_dim or c4
        self.mbstd = MinibatchStd(cfg.mbstd_group_size, cfg.mbstd_channels) if cfg.mbstd_group_size > 0 else None
        self.epilogue_conv = Conv2dLayer(c4 + (cfg.mbstd_channels if self.mbstd else 0), c4, 3, activation="lrelu")
        self.epilogue_fc = FullyConnected(c4 * 16, c4, activation="lrelu")
        self.epilogue_out = FullyConnected(c4, self.cmap_dim)
        self.camera_mapping = MappingNetwork(0, cfg.c_dim, self.cmap_dim, num_ws=0, num_layers=cfg.mapping_layers,
                                             lr_multiplier=cfg.mapping_lr_multiplier, w_avg_beta=None)

    def stem(self, img: torch.Tensor, raw: torch.Tensor, rdr: torch.Tensor | None, blur_sigma: float = 0.0) -> torch.Tensor:
        """u = S_D(x, rdr) (eq. 12): (B, cmap_dim), float32."""
        cfg, res = self.cfg, self.img_resolution
        if img.ndim != 4 or img.shape[1:] != (cfg.image_channels, res, res):
            raise ValueError(f"img: expected (B, {cfg.image_channels}, {res}, {res}), got {tuple(img.shape)}")
        if raw.ndim != 4 or raw.shape[:2] != img.shape[:2]:
            raise ValueError(f"raw: expected (B, {cfg.image_channels}, r, r) matching img, got {tuple(raw.shape)}")
        if cfg.rdr_channels > 0:
            if rdr is None or rdr.shape != (img.shape[0], cfg.rdr_channels, res, res):
                raise ValueError(
                    f"rdr: expected (B, {cfg.rdr_channels}, {res}, {res}), got {None if rdr is None else tuple(rdr.shape)}"
                )
        elif rdr is not None and rdr.shape[1] != 0:
            raise ValueError(f"rdr: this discriminator has rdr_channels=0 but got {tuple(rdr.shape)}")
        if raw.shape[-1] != res:
            raw = F.interpolate(raw.float(), size=(res, res), mode="bilinear", align_corners=False)
        img, raw = gaussian_blur(img.float(), blur_sigma), gaussian_blur(raw.float(), blur_sigma)
        parts = [img, raw] + ([rdr.float()] if cfg.rdr_channels > 0 else [])
        x = torch.cat(parts, dim=1)
        # The blur's sigma changes every step, so it stays outside the compiled graph. In the graph the
        # binomial low-passes are box means (Conv2dLayer.low_pass), so Inductor's channels_last layout
        # helps the convs without sending the filters to cuDNN's slow depthwise kernels.
        body = maybe_compiled(MeshConditionedDiscriminator.features, cfg.compile, x)
        return body(self, x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ResNet blocks and the epilogue on the concatenated, blurred inputs: u (B, cmap_dim)."""
        for block in self.blocks:
            x = block(x)
        x = x.float()
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.epilogue_conv(x)
        x = self.epilogue_fc(x.flatten(1))
        return self.epilogue_out(x)

    def camera_embedding(self, c: torch.Tensor) -> torch.Tensor:
        """v = M_D(c_cam) (eq. 13): (B, cmap_dim)."""
        if c.ndim != 2 or c.shape[1] != self.cfg.c_dim:
            raise ValueError(f"c: expected camera labels (B, {self.cfg.c_dim}), got {tuple(c.shape)}")
        if self.cfg.c_noise > 0 and self.training:
            c = c + torch.randn_like(c) * c.std(dim=0) * self.cfg.c_noise
        return self.camera_mapping(None, c)

    def score(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """D = <u, v> / sqrt(dim) (eq. 15): (B, 1)."""
        return (u * v).sum(dim=1, keepdim=True) * (1.0 / math.sqrt(self.cmap_dim))

    def forward(self, img: torch.Tensor, raw: torch.Tensor, rdr: torch.Tensor | None, c: torch.Tensor,
                blur_sigma: float = 0.0, return_uv: bool = False):
        u = self.stem(img, raw, rdr, blur_sigma)
        v = self.camera_embedding(c)
        logits = self.score(u, v)
        return (logits, u, v) if return_uv else logits
