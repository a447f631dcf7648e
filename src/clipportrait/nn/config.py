"""Flat, explicit configs for the Stage-1 networks, with presets and factories.

``eg3d_512`` reproduces EG3D's FFHQ-512 architecture without generator pose conditioning
(paper sec. 3.2 / appendix B); ``tiny`` trains on a 2-core CPU. Anything in between is a preset
with fields overridden (Hydra overrides the fields directly).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn


UPCONV_FIR = ("fold", "split")


@dataclass
class BackboneConfig:
    """Generator G: mapping M_G, tri-plane synthesis S_G, decoder, renderer V, super-resolution."""

    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 2
    mapping_lr_multiplier: float = 0.01
    w_avg_beta: float = 0.998
    # Tri-plane synthesis: 3 planes x triplane_channels at triplane_resolution^2.
    triplane_resolution: int = 256
    triplane_channels: int = 32
    channel_base: int = 32768
    channel_max: int = 512
    synthesis_bf16_res: int = 0  # highest-resolution synthesis blocks run in bf16 on CUDA (EG3D: fp32)
    conv_clamp: float | None = None
    # Decoder MLP: mean plane feature -> hidden -> (sigma, features); RGB = first 3 features.
    decoder_hidden: int = 64
    decoder_features: int = 32
    decoder_lr_multiplier: float = 1.0
    # Volume rendering (DESIGN sec. 4).
    neural_rendering_resolution: int = 64
    depth_samples: int = 48
    importance_samples: int = 48
    ray_start: float = 2.25
    ray_end: float = 3.3
    box_warp: float = 1.0
    density_bias: float = -1.0  # sigma = softplus(raw + density_bias)
    # Super-resolution (EG3D SuperresolutionHybrid8XDC): resize to sr_input_resolution, then one
    # 2x StyleGAN2 block per entry of sr_channels.
    img_resolution: int = 512
    sr_input_resolution: int = 128
    sr_channels: list[int] = field(default_factory=lambda: [256, 128])
    sr_bf16: bool = True
    sr_conv_clamp: float | None = 256.0
    sr_antialias: bool = True
    # CUDA fast path of the synthesis and super-resolution layers: channels_last convs, FIR folded
    # into the transposed conv, in-place conv tails (same function; CPU keeps the reference path).
    cuda_fast_path: bool = True
    # Up-sampling convs of the fast path inside graphs compiled for CUDA: "fold" puts the whole binomial
    # FIR into the conv's kernel (3x3 phases: 4x the transposed conv's multiply-adds); "split" folds only
    # its first [1, 1] factor (2x2 phases: 16/9) and runs the rest as box means that Inductor fuses with
    # the layer's tail (nn.layers.modulated_upconv_split). Same function; an execution setting.
    upconv_fir: str = "fold"
    # torch.compile of synthesis, rendering and super-resolution (nn/compiled.py): off | cuda | always.
    # An execution setting like cuda_fast_path: checkpoints load under any value.
    compile: str = "cuda"

    def validate(self) -> None:
        from clipportrait.nn.compiled import check_mode

        check_mode(self.compile)
        if self.upconv_fir not in UPCONV_FIR:
            raise ValueError(f"backbone.upconv_fir={self.upconv_fir!r}: expected one of {UPCONV_FIR}")
        if self.decoder_features < 3:
            raise ValueError(f"decoder_features={self.decoder_features}: need >= 3 (the first 3 are RGB)")
        sr_out = self.sr_input_resolution * 2 ** len(self.sr_channels)
        if sr_out != self.img_resolution:
            raise ValueError(
                f"img_resolution={self.img_resolution}: sr_input_resolution={self.sr_input_resolution} with "
                f"{len(self.sr_channels)} sr_channels blocks gives {sr_out}"
            )
        if self.depth_samples < 2 or self.importance_samples < 0:
            raise ValueError(
                f"depth_samples={self.depth_samples}, importance_samples={self.importance_samples}: "
                "expected >= 2 and >= 0"
            )
        if not self.ray_end > self.ray_start > 0:
            raise ValueError(f"ray_start={self.ray_start}, ray_end={self.ray_end}: expected 0 < start < end")


@dataclass
class DiscriminatorConfig:
    """Discriminator D: ResNet stem S_D on [image, upsampled raw, rdr] (eq. 12) and camera map M_D (eq. 13)."""

    channel_base: int = 32768
    channel_max: int = 512
    image_channels: int = 3
    rdr_channels: int = 4  # mesh render: world xyz + mask; 0 disables mesh conditioning
    c_dim: int = 25
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    cmap_dim: int = 0  # 0 -> channels of the 4x4 epilogue (EG3D default)
    mbstd_group_size: int = 4
    mbstd_channels: int = 1
    bf16_res: int = 4
    conv_clamp: float | None = 256.0
    c_noise: float = 0.0  # EG3D's disc_c_noise: camera label noise in units of the batch std
    compile: str = "cuda"  # torch.compile the stem after the blur: off | cuda | always (nn/compiled.py)


PRESETS: dict[str, tuple[BackboneConfig, DiscriminatorConfig]] = {
    "eg3d_512": (BackboneConfig(), DiscriminatorConfig()),
    "tiny": (
        BackboneConfig(
            z_dim=64, w_dim=64, mapping_layers=2,
            triplane_resolution=64, triplane_channels=16, channel_base=1024, channel_max=64,
            decoder_hidden=32, decoder_features=16,
            neural_rendering_resolution=32, depth_samples=16, importance_samples=16,
            img_resolution=64, sr_input_resolution=32, sr_channels=[32], sr_bf16=False,
        ),
        DiscriminatorConfig(channel_base=1024, channel_max=64, mapping_layers=2, bf16_res=0),
    ),
}


def preset(name: str, **overrides) -> tuple[BackboneConfig, DiscriminatorConfig]:
    """(backbone, discriminator) configs of a preset; ``overrides`` apply to the backbone fields,
    ``d_<field>`` to the discriminator's."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: expected one of {sorted(PRESETS)}")
    g_cfg, d_cfg = (dataclasses.replace(c) for c in PRESETS[name])
    g_cfg.sr_channels = list(g_cfg.sr_channels)
    g_fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    d_fields = {f.name for f in dataclasses.fields(DiscriminatorConfig)}
    for key, value in overrides.items():
        if key.startswith("d_") and key[2:] in d_fields:
            setattr(d_cfg, key[2:], value)
        elif key in g_fields:
            setattr(g_cfg, key, value)
        else:
            raise ValueError(f"override {key!r}: not a BackboneConfig field nor d_<DiscriminatorConfig field>")
    g_cfg.validate()
    return g_cfg, d_cfg


def build_generator(cfg: BackboneConfig) -> nn.Module:
    from clipportrait.nn.generator import TriplaneGenerator

    return TriplaneGenerator(cfg)


def build_discriminator(cfg: DiscriminatorConfig, backbone_cfg: BackboneConfig) -> nn.Module:
    from clipportrait.nn.discriminator import MeshConditionedDiscriminator

    return MeshConditionedDiscriminator(cfg, img_resolution=backbone_cfg.img_resolution)
