"""StyleGAN2 layers (clipportrait.nn.layers / mapping) against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

from clipportrait.nn.layers import (
    Conv2dLayer,
    FullyConnected,
    MinibatchStd,
    bias_act,
    binomial_order,
    box_fir2d,
    box_upsample2d,
    downsample2d,
    fir_filter,
    modulated_conv2d,
    upfirdn2d,
    upsample2d,
)
from clipportrait.nn.mapping import MappingNetwork


def _ref_upfirdn_1d(x: np.ndarray, h: np.ndarray, up: int, down: int, p0: int, p1: int) -> np.ndarray:
    """scipy's upfirdn (full convolution) along the last axis, re-indexed to StyleGAN2's padding."""
    n, k = x.shape[-1], len(h)
    full = scipy.signal.upfirdn(h, x, up=up, down=1, axis=-1)  # ((n-1)*up + k) samples
    out_len = (n * up + p0 + p1 - k) // down + 1
    margin = 4 * (abs(p0) + abs(p1) + k + up)
    ext = np.pad(full, [(0, 0)] * (x.ndim - 1) + [(margin, margin)])
    idx = margin + (k - 1 - p0) + np.arange(out_len) * down
    return ext[..., idx]


def _ref_upfirdn2d(x: np.ndarray, h: np.ndarray, up: int, down: int, pad: tuple[int, int, int, int], gain: float):
    left, right, top, bottom = pad
    y = _ref_upfirdn_1d(x, h, up, down, left, right)
    y = _ref_upfirdn_1d(np.swapaxes(y, -1, -2), h, up, down, top, bottom)
    return np.swapaxes(y, -1, -2) * gain


@pytest.mark.parametrize(
    "up,down,pad",
    [(1, 1, (1, 2, 0, 3)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)), (3, 2, (3, -1, 0, 2)), (1, 1, (-1, 0, 2, -2))],
)
def test_upfirdn2d_matches_scipy_with_asymmetric_filter(up, down, pad):
    """upfirdn2d == scipy.signal.upfirdn applied separably, for up/down/pad/crop combinations;
    an asymmetric filter catches a missing flip (correlation instead of convolution)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 9))
    h = np.array([0.1, 0.5, 0.3, 0.1])
    got = upfirdn2d(torch.tensor(x, dtype=torch.float64), torch.tensor(h), up=up, down=down, padding=pad, gain=up**2)
    want = _ref_upfirdn2d(x, h, up, down, pad, up**2)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


@pytest.mark.parametrize("taps", [(1.0, 3.0, 3.0, 1.0), (1.0, 2.0, 5.0, 2.0, 1.0, 3.0, 1.0, 2.0, 1.0, 4.0)])
@pytest.mark.parametrize("down", [1, 2])
def test_fir_without_upsampling_has_exact_first_and_second_derivatives(taps, down):
    """The up=1 path (the discriminator's low-pass and blur, differentiated twice by R1) is a linear
    map whose backward is its adjoint and whose double backward is the map again: gradcheck and
    gradgradcheck in float64 for a short (one 2-D kernel) and a long asymmetric (two 1-D passes)
    filter, with and without decimation, with padding and cropping."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 13, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(taps, dtype=torch.float64)
    f = lambda x: upfirdn2d(x, h, down=down, padding=(2, 1, 3, -1), gain=2.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    with pytest.raises(ValueError, match="fewer than the"):
        upfirdn2d(torch.zeros(1, 1, 5, 3), torch.ones(4) / 4)


@pytest.mark.parametrize("taps", [(1.0, 1.0), (1.0, 2.0, 1.0), (1.0, 3.0, 3.0, 1.0), (1.0, 4.0, 6.0, 4.0, 1.0)])
@pytest.mark.parametrize("down", [1, 2])
@pytest.mark.parametrize("pad", [(0, 0, 0, 0), (1, 1, 1, 1), (2, 2, 2, 2), (5, 5, 4, 4), (2, 1, 3, 0), (-1, 2, 1, -1)])
def test_binomial_fir_as_box_means_matches_scipy(taps, down, pad):
    """box_fir2d (n successive 2x2 means, the last strided; the discriminator's low-pass for binomial
    taps) equals the scipy upfirdn reference of the binomial filter of order n, for symmetric,
    larger-than-n, asymmetric and cropping pads; it is linear with exact first and second derivatives."""
    order = binomial_order(taps)
    assert order == len(taps) - 1
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 11, 12))
    h = np.array(taps) / sum(taps)
    got = box_fir2d(torch.tensor(x), order, pad, down)
    want = _ref_upfirdn2d(x, h, 1, down, pad, 1.0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    xt = torch.tensor(x[:1, :2, :7, :8], requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: box_fir2d(t, order, pad, down), (xt,))


@pytest.mark.parametrize("taps", [(1.0, 1.0), (1.0, 2.0, 1.0), (1.0, 3.0, 3.0, 1.0), (1.0, 4.0, 6.0, 4.0, 1.0)])
def test_binomial_upsample_as_nearest_then_box_means_matches_scipy(taps):
    """box_upsample2d (nearest 2x, then n - 1 2x2 means; the skip image's upsampling inside compiled
    graphs) equals upsample2d's zero-insertion + FIR reference from scipy, same 2x size, borders included."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 6))
    h = np.array(taps) / sum(taps)
    k = len(taps)
    want = _ref_upfirdn2d(x, h, 2, 1, ((k + 1) // 2, (k - 2) // 2) * 2, 4.0)
    got = box_upsample2d(torch.tensor(x), binomial_order(taps))
    assert got.shape == want.shape == (2, 3, 14, 12)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_binomial_order_recognises_only_binomial_rows():
    """[1,3,3,1] and its multiples are order 3; a non-binomial, single-tap or zero-led row is not."""
    assert binomial_order((1.0, 3.0, 3.0, 1.0)) == 3 and binomial_order((0.125, 0.375, 0.375, 0.125)) == 3
    assert binomial_order((2.0, 2.0)) == 1
    for taps in [(1.0, 3.0, 3.0, 2.0), (1.0,), (0.0, 1.0), (1.0, 2.0, 5.0, 2.0, 1.0)]:
        assert binomial_order(taps) is None
    assert Conv2dLayer(2, 2, 3, down=2).box_order == 3
    assert Conv2dLayer(2, 2, 3, down=2, resample_taps=(1.0, 2.0, 5.0, 2.0, 1.0)).box_order is None


def test_upsample_and_downsample_match_scipy_and_keep_dc():
    """upsample2d / downsample2d with [1,3,3,1] give the scipy reference, exact 2x sizes, and map a
    constant image to the same constant away from the borders (unit DC gain)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 8, 8))
    f = fir_filter()
    h = f.double().numpy()
    up = upsample2d(torch.tensor(x), f.double())
    np.testing.assert_allclose(up.numpy(), _ref_upfirdn2d(x, h, 2, 1, (2, 1, 2, 1), 4.0), atol=1e-12)
    assert up.shape[-2:] == (16, 16)
    down = downsample2d(torch.tensor(x), f.double())
    np.testing.assert_allclose(down.numpy(), _ref_upfirdn2d(x, h, 1, 2, (1, 1, 1, 1), 1.0), atol=1e-12)
    assert down.shape[-2:] == (4, 4)
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(upsample2d(ones, f.double())[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12, dtype=torch.float64))
    assert torch.allclose(downsample2d(ones, f.double())[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("demodulate,up", [(True, 1), (False, 1), (True, 2)])
def test_modulated_conv_equals_per_sample_loop(demodulate, up):
    """Batched modulated conv == explicit loop: per sample, scale weights by styles, demodulate
    by the L2 norm over (in, kh, kw), convolve; with up=2, a stride-2 transposed conv then the
    FIR filter (gain 4) cropped to exactly 2H, which away from the border equals FIR upsampling
    followed by a conv with the spatially flipped kernel."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    styles = torch.randn(3, 4, dtype=torch.float64)
    f = fir_filter().double()
    got = modulated_conv2d(x, weight, styles, demodulate=demodulate, up=up, resample_filter=f)
    rows = []
    for b in range(3):
        w = weight * styles[b].reshape(1, 4, 1, 1)
        if demodulate:
            w = w / torch.sqrt((w**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        xb = x[b : b + 1]
        if up > 1:
            rows.append(upfirdn2d(F.conv_transpose2d(xb, w.transpose(0, 1), stride=2), f, padding=(1, 1, 1, 1), gain=4))
            interior = F.conv2d(upsample2d(xb, f), w.flip(2, 3), padding=1)
            torch.testing.assert_close(rows[-1][..., 3:-3, 3:-3], interior[..., 3:-3, 3:-3], atol=1e-10, rtol=1e-10)
        else:
            rows.append(F.conv2d(xb, w, padding=1))
    torch.testing.assert_close(got, torch.cat(rows), atol=1e-10, rtol=1e-10)
    assert got.shape[-1] == 6 * up


def test_modulated_conv_rejects_mismatched_styles():
    """A styles tensor with the wrong channel count raises a ValueError naming x/styles."""
    with pytest.raises(ValueError, match="styles"):
        modulated_conv2d(torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3), torch.randn(2, 3))


@pytest.mark.parametrize("taps", [(1.0, 3.0, 3.0, 1.0), (1.0, 2.0, 5.0, 2.0)])
def test_downsampling_conv_equals_conv_then_fir_downsample_in_interior(taps):
    """Conv2dLayer(down=2) (FIR low-pass then strided conv) equals a stride-1 conv followed by FIR
    downsampling wherever neither touches the zero border; the output is exactly half size. Binomial
    taps take the box-mean path, others the depthwise convolution."""
    torch.manual_seed(0)
    layer = Conv2dLayer(3, 4, 3, bias=False, down=2, resample_taps=taps).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    got = layer(x)
    assert got.shape == (2, 4, 8, 8)
    w = layer.weight.double() * layer.weight_gain
    ref = downsample2d(F.conv2d(x, w, padding=1), fir_filter(taps).double())
    torch.testing.assert_close(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-10, rtol=1e-10)


def test_downsampling_1x1_conv_equals_conv_then_fir_downsample_everywhere():
    """The 1x1 skip conv with down=2 (decimating FIR, then the conv on the kept pixels) equals the 1x1
    conv at full resolution followed by FIR downsampling, borders included (no conv padding)."""
    torch.manual_seed(0)
    layer = Conv2dLayer(3, 4, 1, bias=False, down=2).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    got = layer(x)
    w = layer.weight.double() * layer.weight_gain
    torch.testing.assert_close(got, downsample2d(F.conv2d(x, w), fir_filter().double()), atol=1e-12, rtol=1e-12)


def test_equalised_lr_linear_and_bias_act():
    """FullyConnected uses weight * lr_mul / sqrt(in) and bias * lr_mul; lrelu gain is sqrt(2)
    with slope 0.2; clamp limits to +-clamp*gain."""
    fc = FullyConnected(8, 3, activation="lrelu", lr_multiplier=0.01, bias_init=0.5)
    x = torch.randn(5, 8)
    lin = x @ (fc.weight * 0.01 / math.sqrt(8)).t() + fc.bias * 0.01
    torch.testing.assert_close(fc(x), torch.where(lin > 0, lin, 0.2 * lin) * math.sqrt(2))
    assert torch.allclose(fc.bias * 0.01, torch.full((3,), 0.5))
    y = bias_act(torch.tensor([[-10.0, 10.0]]), torch.tensor([0.0, 1.0]), "linear", gain=2.0, clamp=3.0)
    assert y.tolist() == [[-6.0, 6.0]]
    with pytest.raises(ValueError, match="activation"):
        bias_act(torch.zeros(1, 1), None, "relu6")


def test_minibatch_std_matches_brute_force():
    """MinibatchStd appends, per group member, the mean over (C/F, H, W) of the population std
    across the group of G samples taken at stride N/G (StyleGAN2's grouping)."""
    torch.manual_seed(0)
    x = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    out = MinibatchStd(group_size=4, num_channels=2)(x)
    assert out.shape == (8, 8, 3, 3)
    for n in range(8):
        members = [n % 2 + 2 * g for g in range(4)]  # reshape(G, -1, ...) groups samples at stride N/G
        group = x[members]
        for f in range(2):
            std = group[:, 3 * f : 3 * f + 3].std(dim=0, unbiased=False)
            want = torch.sqrt(std**2 + 1e-8).mean()
            assert torch.allclose(out[n, 6 + f], torch.full((3, 3), float(want), dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible"):
        MinibatchStd(4)(torch.randn(6, 2, 2, 2))


def test_mapping_truncation_and_w_avg_tracking():
    """update_emas lerps w_avg toward the batch mean with beta; truncation psi=0 returns w_avg on
    the first `cutoff` ws and leaves the rest; shape errors name z."""
    torch.manual_seed(0)
    net = MappingNetwork(z_dim=6, c_dim=0, w_dim=5, num_ws=4, num_layers=2, w_avg_beta=0.9)
    z = torch.randn(7, 6)
    ws = net(z, update_emas=True)
    assert ws.shape == (7, 4, 5)
    torch.testing.assert_close(net.w_avg, ws[:, 0].mean(0) * 0.1)
    trunc = net(z, truncation_psi=0.0, truncation_cutoff=2)
    torch.testing.assert_close(trunc[:, :2], net.w_avg.expand(7, 2, 5))
    torch.testing.assert_close(trunc[:, 2:], ws[:, 2:])
    half = net(z, truncation_psi=0.5)
    torch.testing.assert_close(half, net.w_avg + 0.5 * (ws - net.w_avg))
    with pytest.raises(ValueError, match="z: expected"):
        net(torch.randn(7, 5))


def test_truncation_centre_is_the_sampled_mean_until_w_avg_has_converged():
    """settle_truncation_centre keeps a tracked w_avg close to the mean of sampled w and replaces one that
    is far from it (a briefly trained model's running mean, which starts at zero); the sampled mean is
    the float64 average of the mapped latents."""
    from clipportrait.nn.mapping import sampled_mean_w, settle_truncation_centre

    torch.manual_seed(0)
    net = MappingNetwork(z_dim=6, c_dim=0, w_dim=5, num_ws=4, num_layers=2, w_avg_beta=0.998)
    gen = torch.Generator().manual_seed(3)
    z = torch.cat([torch.randn(min(4096, 5000 - s), 6, generator=gen) for s in range(0, 5000, 4096)])
    with torch.no_grad():
        torch.testing.assert_close(sampled_mean_w(net, 5000, seed=3), net(z)[:, 0].double().mean(0).float())
        mean = sampled_mean_w(net, 5000, seed=0)
        record = settle_truncation_centre(net, samples=5000)  # w_avg is still its initial zeros
        assert record["centre"].startswith("sampled mean") and torch.equal(net.w_avg, mean)
        close = mean * 1.05
        net.w_avg.copy_(close)
        assert settle_truncation_centre(net, samples=5000)["centre"] == "tracked w_avg"
        assert torch.equal(net.w_avg, close)

