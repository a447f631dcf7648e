"""Offline FID Inception: preprocessing, pinned pool features, torch-fidelity cross-check, FID/KID."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipportrait.assets import AssetError, resolve
from clipportrait.metrics.fid import (
    InceptionScoreUnavailable,
    build_fid_inception,
    build_image_metric,
    resize_bilinear_tf1,
)




@pytest.fixture(scope="module")
def inception(offline_cache):
    return build_fid_inception()


@pytest.fixture(scope="module")
def pip_features(inception):
    """Pool features of pip_images(64), computed once for the module."""
    with torch.no_grad():
        return inception(pip_images(64))


def pip_images(size: int = 64) -> torch.Tensor:
    """(4, 3, size, size) uint8 from images shipped in scikit-image and matplotlib."""
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    out = []
    for pixels in (data.astronaut(), data.chelsea(), data.coffee(), hopper):
        t = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float()
        side = min(t.shape[-2:])
        top, left = (t.shape[-2] - side) // 2, (t.shape[-1] - side) // 2
        square = t[..., top : top + side, left : left + side]
        out.append(F.interpolate(square, size=(size, size), mode="area").round().to(torch.uint8))
    return torch.cat(out)


def _brute_tf1_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False) by its definition: source = dst * in / out."""
    height, width = x.shape[-2:]
    ys, xs = np.arange(out_h) * (height / out_h), np.arange(out_w) * (width / out_w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    fy, fx = (ys - y0)[:, None], xs - x0
    top = x[..., y0, :][..., x0] * (1 - fx) + x[..., y0, :][..., x1] * fx
    bottom = x[..., y1, :][..., x0] * (1 - fx) + x[..., y1, :][..., x1] * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("in_hw", [(512, 384), (40, 50), (299, 299)])
def test_tf1_resize_matches_definition_and_torch_fidelity(in_hw):
    """Our grid_sample resize equals TF1's bilinear formula (float64, brute force) to 1e-9, and
    torch-fidelity's TF1 emulation within float32 noise, for down-, up- and same-size."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.rand(2, 3, *in_hw, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 255
    ours = resize_bilinear_tf1(x, (299, 299))
    assert torch.allclose(ours, torch.from_numpy(_brute_tf1_resize(x.numpy(), 299, 299)), atol=1e-9)
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
    assert (resize_bilinear_tf1(x.float(), (299, 299)) - theirs).abs().max() < 0.05


def test_float_images_are_quantised_like_stylegan(inception):
    """[-1, 1] floats map to uint8 as floor(clamp(x * 127.5 + 128)), hand-computed values."""
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    expected = torch.tensor([0, 0, 64, 128, 191, 255, 255, 255], dtype=torch.uint8)
    assert torch.equal(inception.quantise(x)[0, 0, 0], expected)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        inception(torch.zeros(1, 1, 8, 8))


# Pool features (first four dims and the sum over all 2048) of 64x64 pip-shipped images.
PINNED_FEATURES = [
    [0.5575, 0.15184, 0.18157, 0.01922, 739.46545],  # astronaut
    [0.29205, 0.56138, 0.61759, 0.09417, 452.75458],  # chelsea
]


def test_pool_features_are_pinned_and_float_input_agrees(inception, pip_features):
    """2048-d pool features of pip-shipped images reproduce pinned values, and the same image
    given as [-1, 1] floats (exactly representable levels) gives identical features."""
    feats = pip_features[:2]
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and (feats >= 0).all()
    summary = torch.cat([feats[:, :4], feats.sum(1, keepdim=True)], 1)
    assert torch.allclose(summary, torch.tensor(PINNED_FEATURES), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        feats_float = inception(pip_images(64)[:1].float() / 127.5 - 1)
    assert torch.allclose(feats_float, feats[:1], atol=1e-6)


def _torch_fidelity_state_from_script(monkeypatch) -> dict[str, torch.Tensor]:
    """torch-fidelity's InceptionV3 state dict filled, conv by conv in forward order, from the
    TorchScript (TF BatchNorm has no scale: gamma = 1)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # Build torch-fidelity's module without its weight download, only to get names and shapes.
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    skeleton = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    scripted = torch.jit.load(str(resolve("fid-inception")))
    script_convs = [m for _, m in scripted.named_modules() if hasattr(m, "beta")]
    fidelity_convs = [(n, m) for n, m in skeleton.named_modules() if isinstance(m, fe.BasicConv2d)]
    assert len(script_convs) == len(fidelity_convs) == 94
    state = skeleton.state_dict()
    for (name, module), conv in zip(fidelity_convs, script_convs):
        assert module.conv.weight.shape == conv.weight.shape, name
        state[f"{name}.conv.weight"] = conv.weight.detach().clone()
        state[f"{name}.bn.weight"] = torch.ones_like(conv.beta)
        state[f"{name}.bn.bias"] = conv.beta.detach().clone()
        state[f"{name}.bn.running_mean"] = conv.mean.detach().clone()
        state[f"{name}.bn.running_var"] = conv.var.detach().clone()
    return state


def test_matches_torch_fidelity_implementation_via_user_weights_path(inception, tmp_path, monkeypatch):
    """The same weights in torch-fidelity's layout, loaded through the ordinary local-file path
    (weights=<.pth>, torch-fidelity's own resize and scaling), give the same pool features: this
    checks our input convention (0..255, TF1 resize, (x-128)/128) against an independent code base."""
    path = tmp_path / "weights-inception-2015-12-05-test.pth"
    torch.save(_torch_fidelity_state_from_script(monkeypatch), path)
    theirs = build_fid_inception(weights=path)
    images = pip_images(size=128)[2:3]
    with torch.no_grad():
        assert torch.allclose(theirs(images), inception(images), atol=2e-4)


def test_fid_of_a_set_with_itself_is_zero_and_kid_matches_hand_mmd(inception, pip_features):
    """torchmetrics FID/KID with our 2048-d features: FID(A, A) ~ 0, and KID over one subset of
    all samples equals the unbiased MMD^2 with kernel (x.y/2048 + 1)^3 computed by hand (float64).
    (One FID compute only: its 2048x2048 eigen-decomposition takes ~9 s on one core.)"""
    from torchmetrics.image import FrechetInceptionDistance, KernelInceptionDistance

    set_a = pip_images(64)
    set_b = set_a.flip(-2)  # upside-down copies: same colours, different content statistics
    with torch.no_grad():
        feats_a, feats_b = pip_features, inception(set_b)

    class Replay(torch.nn.Module):
        """Replays the features computed above so each metric does not re-run the Inception."""

        num_features = 2048

        def forward(self, batch):
            return feats_a if batch is set_a else feats_b

    fid = FrechetInceptionDistance(feature=Replay())
    fid.update(set_a, real=True)
    fid.update(set_a, real=False)
    assert abs(fid.compute().item()) < 1e-2

    kid = KernelInceptionDistance(feature=Replay(), subset_size=len(set_a), subsets=1)
    kid.update(set_a, real=True)
    kid.update(set_b, real=False)
    a, b = feats_a.double(), feats_b.double()
    m = len(a)

    def kernel(x, y):
        return (x @ y.T / 2048 + 1) ** 3

    off_diagonal = 1 - torch.eye(m, dtype=torch.float64)
    mmd2 = ((kernel(a, a) * off_diagonal).sum() + (kernel(b, b) * off_diagonal).sum()) / (m * (m - 1))
    mmd2 = mmd2 - 2 * kernel(a, b).mean()
    assert kid.compute()[0].item() == pytest.approx(mmd2.item(), rel=1e-4, abs=1e-6)


def test_metric_builders_and_inception_score_refusal(offline_cache, inception):
    """build_image_metric gives FID/KID that accept raw images; Inception Score is refused with an
    error that says the head is missing; unknown kinds are named."""
    fid = build_image_metric("fid")
    assert fid.inception.num_features == 2048
    fid.update(pip_images(32)[:2], real=True)  # end-to-end through torchmetrics with raw uint8
    assert fid.real_features_num_samples.item() == 2
    with pytest.raises(InceptionScoreUnavailable, match="no classifier head"):
        build_image_metric("is")
    with pytest.raises(ValueError, match="kind='lpips'"):
        build_image_metric("lpips")


def test_bad_weights_paths_are_named(offline_cache, tmp_path):
    """Missing file, non-Inception TorchScript and a non-state-dict file each get a clear AssetError."""
    with pytest.raises(AssetError, match="missing.pt does not exist"):
        build_fid_inception(weights=tmp_path / "missing.pt")
    scripted = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(AssetError, match="not NVIDIA's Inception layout"):
        build_fid_inception(weights=scripted)
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    with pytest.raises(AssetError, match="not torch-fidelity's Inception state dict"):
        build_fid_inception(weights=plain)
