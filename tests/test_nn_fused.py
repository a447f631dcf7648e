"""The CUDA fast path of the generator (``cuda_fast_path``): its pieces (FIR folded into the
transposed conv, in-place conv tail, 1x1 modulated conv as a matmul, toRGB tail) equal the
reference path, checked on CPU in float64; on a GPU (skipped otherwise) the channels_last fast-path
generator equals the reference one in values and gradients."""

from __future__ import annotations

import pytest
import torch

from clipportrait.geometry.cameras import ray_bundle, sample_ffhq_like
from clipportrait.nn import build_generator, preset
from clipportrait.nn.layers import (
    bias_act,
    demodulation_coefficients,
    fir_filter,
    modulated_conv2d,
    modulated_conv_core,
    binomial_order,
    modulated_upconv_folded,
    modulated_upconv_split,
    polyphase_conv_transpose2d,
    split_upconv_phases,
    synthesis_layer_tail,
    torgb_tail,
    upsample2d,
)
from clipportrait.nn.synthesis import SynthesisBlock


@pytest.mark.parametrize("taps,kernel", [((1.0, 3.0, 3.0, 1.0), 3), ((1.0, 4.0, 2.0, 0.5), 3), ((1.0, 2.0, 1.0), 3),
                                          ((1.0, 3.0, 3.0, 1.0), 1)])
def test_fir_folded_upconv_equals_transposed_conv_then_fir(taps, kernel):
    """One transposed conv with the FIR folded into its kernel equals modulated_conv2d's transposed
    conv + FIR low-pass (gain 4), asymmetric filters and odd tap counts included, same 2x size."""
    torch.manual_seed(0)
    f = torch.tensor(taps, dtype=torch.float64)
    f = f / f.sum()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    weight = torch.randn(3, 4, kernel, kernel, dtype=torch.float64)
    styles = torch.randn(2, 4, dtype=torch.float64)
    want = modulated_conv2d(x, weight, styles, demodulate=False, up=2, resample_filter=f)
    got = modulated_upconv_folded(x, weight, styles, f, up=2)
    assert got.shape == want.shape == (2, 3, 10, 10)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("taps", [(1.0, 2.0, 1.0), (1.0, 3.0, 3.0, 1.0), (1.0, 4.0, 6.0, 4.0, 1.0),
                                  (1.0, 5.0, 10.0, 10.0, 5.0, 1.0)])
@pytest.mark.parametrize("kernel", [1, 3])
def test_split_fir_upconv_equals_transposed_conv_then_fir(taps, kernel):
    """backbone.upconv_fir=split: the binomial FIR's first [1, 1] factor folded into the kernel and the
    rest as box means equals modulated_conv2d's transposed conv + FIR low-pass (gain 4), same 2x size,
    in values and in the gradients of the input, the weight and the styles (float64); for 3x3 kernels
    its phase kernels are 2x2, where the whole fold of [1, 3, 3, 1] makes 3x3 ones."""
    torch.manual_seed(0)
    f = fir_filter(taps).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 4, kernel, kernel, dtype=torch.float64, requires_grad=True)
    styles = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    want = modulated_conv2d(x, weight, styles, demodulate=False, up=2, resample_filter=f)
    phases = split_upconv_phases(weight)
    got = modulated_upconv_split(x, styles, phases, kernel, binomial_order(taps))
    assert got.shape == want.shape == (2, 3, 10, 12)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    if kernel == 3:
        assert phases.shape[-2:] == (2, 2)
    probe = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * probe).sum(), (x, weight, styles)),
                    torch.autograd.grad((want * probe).sum(), (x, weight, styles))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_upconv_fir_setting_is_checked():
    with pytest.raises(ValueError, match="backbone.upconv_fir='both'"):
        preset("tiny", upconv_fir="both")


@pytest.mark.parametrize("kernel", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("up", [2, 3])
@pytest.mark.parametrize("crop", [(0, 0), (1, 1), (2, 2), (3, 1), (0, 2)])
def test_polyphase_transposed_conv_equals_conv_transpose2d(kernel, up, crop):
    """One conv with up^2 phase kernels + pixel shuffle equals the stride-``up`` transposed conv,
    cropped by (first, last) on each side, for kernels shorter/longer than the stride, odd and even."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    w = torch.randn(4, 3, kernel, kernel, dtype=torch.float64)
    full = torch.nn.functional.conv_transpose2d(x, w.transpose(0, 1), stride=up)
    h, wd = full.shape[-2:]
    want = full[..., crop[0] : h - crop[1], crop[0] : wd - crop[1]]
    got = polyphase_conv_transpose2d(x, w, up, crop)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_1x1_modulated_conv_is_a_per_sample_matmul(channels_last):
    """1x1 kernels fold the styles into per-sample weights (batched matmul); the result equals the
    explicit per-sample conv and keeps the memory format of x."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, styles = torch.randn(7, 5, 1, 1, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    got = modulated_conv_core(x, weight, styles)
    want = torch.cat([torch.nn.functional.conv2d(x[b : b + 1], weight * styles[b].reshape(1, 5, 1, 1))
                      for b in range(3)])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(modulated_conv2d(x, weight, styles, demodulate=False), want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("up,noise,clamp", [(1, "random", None), (2, "random", 0.7), (2, None, None), (1, "const", 0.5)])
def test_fast_synthesis_layer_equals_reference_path(up, noise, clamp):
    """Fast-path conv (folded FIR for up=2) + in-place synthesis_layer_tail (gain folded into the
    demodulation, noise and bias) equals modulated_conv2d + noise + bias_act, in values and in the
    gradients of every input, in float64."""
    torch.manual_seed(0)
    f = fir_filter().double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    styles = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    strength = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    size = 6 * up
    noise_t = {"random": torch.randn(2, 1, size, size, dtype=torch.float64),
               "const": torch.randn(size, size, dtype=torch.float64), None: None}[noise]

    def reference():
        y = modulated_conv2d(x, weight, styles, demodulate=True, up=up, resample_filter=f)
        if noise_t is not None:
            y = y + noise_t * strength
        return bias_act(y, bias, "lrelu", gain=1.5, clamp=clamp)

    def fast():
        y = modulated_upconv_folded(x, weight, styles, f, up) if up > 1 else modulated_conv_core(x, weight, styles)
        return synthesis_layer_tail(y, demodulation_coefficients(weight, styles), noise_t, strength, bias,
                                    gain=1.5, clamp=clamp)

    want, got = reference(), fast()
    assert got.shape == (2, 5, size, size)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    if clamp is not None:
        assert float(want.detach().abs().max()) == pytest.approx(clamp * 1.5)  # the clamp is active in this case
    probe = torch.randn_like(want)
    leaves = [x, weight, styles, bias, strength]
    used = slice(None) if noise_t is not None else slice(0, 4)  # strength is unused without noise
    g_want = torch.autograd.grad((want * probe).sum(), leaves[used])
    g_got = torch.autograd.grad((got * probe).sum(), leaves[used])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_torgb_tail_is_bias_clamp_plus_upsampled_skip():
    """torgb_tail = bias_act(y, bias, clamp) in float32 + FIR-upsampled running image (or y alone)."""
    torch.manual_seed(0)
    f = fir_filter()
    y, bias, img = torch.randn(2, 3, 8, 8) * 3, torch.randn(3), torch.randn(2, 3, 4, 4)
    want = upsample2d(img, f) + bias_act(y, bias, "linear", clamp=2.0)
    torch.testing.assert_close(torgb_tail(y, bias, 2.0, img, f), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torgb_tail(y, bias, None, None, f), bias_act(y, bias, "linear"))


def test_fast_path_flag_keeps_the_cpu_path():
    """On CPU the fast-path flag changes nothing: blocks built with and without it agree."""
    torch.manual_seed(0)
    a = SynthesisBlock(8, 6, 16, 8, img_channels=3, fast_path=True)
    b = SynthesisBlock(8, 6, 16, 8, img_channels=3, fast_path=False)
    b.load_state_dict(a.state_dict())
    x, img, ws = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 16)
    for got, want in zip(a(x, img, ws, "const"), b(x, img, ws, "const")):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("upconv_fir", ["fold", "split"])
def test_fast_path_generator_forced_on_cpu_equals_reference(monkeypatch, upconv_fir):
    """The whole fast path (channels_last, FIR upconv folded or split into kernel and box means, in-place
    tails, 1x1 matmul toRGB), forced on CPU in float64, renders the reference image and gives the
    reference gradients for every parameter of the synthesis, decoder and super-resolution (the
    running image is float32)."""
    import clipportrait.nn.synthesis as synthesis

    monkeypatch.setattr(synthesis, "use_fast_path", lambda enabled, x: enabled)
    splits = []
    monkeypatch.setattr(synthesis, "modulated_upconv_split",
                        lambda *a, **k: splits.append(1) or modulated_upconv_split(*a, **k))
    if upconv_fir == "split":  # as inside a graph compiled for CUDA
        monkeypatch.setattr(synthesis, "box_filters_fuse", lambda x: True)
    torch.manual_seed(0)
    g_cfg, _ = preset("tiny", neural_rendering_resolution=16, depth_samples=6, importance_samples=6,
                      upconv_fir=upconv_fir)
    fast = build_generator(g_cfg).double().train()
    g_cfg.cuda_fast_path = False
    slow = build_generator(g_cfg).double().train()
    slow.load_state_dict(fast.state_dict())
    origins, dirs = ray_bundle(sample_ffhq_like(2, generator=torch.Generator().manual_seed(1)), 16)
    ws = fast.mapping(torch.randn(2, g_cfg.z_dim)).double().detach()
    outs, grads = [], []
    for G in (fast, slow):
        torch.manual_seed(2)  # the same random noise for both
        out = G.render(ws, origins.double(), dirs.double(), noise_mode="random", perturb=False)
        loss = out["image"].square().mean() + out["image_raw"].square().mean()
        grads.append(torch.autograd.grad(loss, list(G.parameters()), allow_unused=True))
        outs.append({k: v.detach() for k, v in out.items()})
    for key in ("image", "image_raw", "image_depth"):
        torch.testing.assert_close(outs[0][key], outs[1][key], atol=1e-5, rtol=1e-5)
    checked = 0
    for (name, _), a, b in zip(fast.named_parameters(), *grads):
        assert (a is None) == (b is None), name
        if b is not None:
            checked += 1
            assert float((a - b).norm() / b.norm().clamp_min(1e-30)) < 1e-5, name
    assert checked > 40
    assert bool(splits) == (upconv_fir == "split")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path runs on CUDA only")
@pytest.mark.parametrize("sr_bf16", [False, True])
def test_cuda_fast_path_generator_equals_reference_values_and_gradients(sr_bf16):
    """On CUDA (full float32, no TF32), the channels_last fast-path generator (with the fused Triton
    tri-plane lookup) renders the same image, raw image, depth and features as the eager one from the
    same weights and rays, with the same gradients, at a small eg3d_512-shaped config; with bf16
    super-resolution the image and the tensor gradients get bf16 tolerances (scalar gradients are
    checked by the float32 variant)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        g_cfg, _ = preset("eg3d_512", triplane_resolution=64, neural_rendering_resolution=32, depth_samples=12,
                          importance_samples=12, img_resolution=128, sr_input_resolution=32, sr_channels=[64, 32],
                          sr_bf16=sr_bf16, compile="off")  # the fast path itself (compile: test_nn_compiled)
        torch.manual_seed(0)
        fast = build_generator(g_cfg).cuda().train()
        g_cfg.cuda_fast_path = False
        slow = build_generator(g_cfg).cuda().train()
        slow.load_state_dict(fast.state_dict())
        c = sample_ffhq_like(3, generator=torch.Generator().manual_seed(1)).cuda()
        origins, dirs = ray_bundle(c, 32)
        ws = fast.mapping(torch.randn(3, g_cfg.z_dim, device="cuda")).detach()  # same ws for both
        outs, grads = [], []
        for G in (fast, slow):
            out = G.render(ws, origins, dirs, noise_mode="const", perturb=False)
            loss = out["image"].square().mean() + out["image_raw"].square().mean() + out["image_depth"].mean()
            grads.append(torch.autograd.grad(loss, list(G.parameters()), allow_unused=True))
            outs.append(out)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    image_tol, grad_tol = (2e-2, 5e-2) if sr_bf16 else (1e-4, 1e-3)
    for key in ("image", "image_raw", "image_depth", "feature_image"):
        ref = outs[1][key].float()
        err = float((outs[0][key].detach().float() - ref.detach()).norm() / ref.detach().norm())
        assert err < (image_tol if key == "image" else 1e-4), (key, err)
    for (name, _), a, b in zip(fast.named_parameters(), *grads):
        assert (a is None) == (b is None), name
        if b is not None:
            err = float((a - b).norm() / b.norm().clamp_min(1e-12))
            if a.numel() == 1:
                # A scalar gradient (noise_strength) is one sum over every pixel of its layer, where
                # cancellation magnifies rounding. In float32 it is checked at 1% (0.1% measured with
                # the lookup's atomic adds); downstream of bf16 blocks the atomic adds' run-to-run order
                # alone moved one by 6-18% on an H100, so the bf16 variant checks tensors only.
                if sr_bf16:
                    continue
                assert err < 1e-2, (name, err)
                continue
            assert err < grad_tol, (name, err)


@pytest.mark.parametrize("precision,upconv_fir", [("float64", "fold"), ("bf16-autocast", "fold"), ("float64", "split")])
def test_frozen_weights_give_the_same_render_and_are_only_used_without_gradients(monkeypatch, precision, upconv_fir):
    """``freeze_weights`` (inference engines): the fast path forced on CPU renders exactly the same
    images from the frozen weight transforms (folded up-sampling kernels, casts, demodulation sums,
    scaled linear weights) as from per-call ones, in float64 and under bf16 autocast; calls that record
    gradients ignore the frozen copies, which do not follow later weight changes until ``thaw_weights``."""
    import clipportrait.nn.synthesis as synthesis
    from clipportrait.nn.layers import freeze_weights, thaw_weights

    monkeypatch.setattr(synthesis, "use_fast_path", lambda enabled, x: enabled)
    if upconv_fir == "split":
        monkeypatch.setattr(synthesis, "box_filters_fuse", lambda x: True)
    torch.manual_seed(0)
    g_cfg, _ = preset("tiny", neural_rendering_resolution=8, depth_samples=4, importance_samples=4,
                      upconv_fir=upconv_fir)
    G = build_generator(g_cfg).eval()
    dtype = torch.float64 if precision == "float64" else torch.float32
    G = G.to(dtype)
    origins, dirs = ray_bundle(sample_ffhq_like(2, generator=torch.Generator().manual_seed(1)), 8)
    origins, dirs = origins.to(dtype), dirs.to(dtype)
    ws = G.mapping(torch.randn(2, g_cfg.z_dim, dtype=dtype)).detach()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float64")

    def render(grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad), amp:
            return G.render(ws, origins, dirs, noise_mode="const", perturb=False)["image"].detach()

    reference = render()
    freeze_weights(G, (dtype, torch.bfloat16))
    frozen_layers = [m for m in G.modules() if hasattr(m, "_frozen_weights")]
    assert any(isinstance(m, synthesis.SynthesisLayer) and m.up > 1 for m in frozen_layers)
    assert torch.equal(render(), reference)
    layer = next(m for m in frozen_layers if isinstance(m, synthesis.SynthesisLayer) and m.up > 1)
    assert (layer._frozen_weights[dtype][2] is not None) == (upconv_fir == "split")  # the split kernel
    with torch.no_grad():
        layer.weight.mul_(1.5)
    assert torch.equal(render(), reference)  # the frozen copies are what no-grad calls use
    changed = render(grad=True)
    assert not torch.equal(changed, reference)
    thaw_weights(G)
    assert not any(hasattr(m, "_frozen_weights") for m in G.modules())
    assert torch.equal(render(), changed)
