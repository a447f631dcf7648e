"""``backbone.compile``: the torch.compile'd synthesis, render and super-resolution compute the eager
generator's function (values and gradients), with and without the deformation in front of the
lookup, and the switch is an execution setting (checkpoints load under any value)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipportrait.geometry.cameras import ray_bundle, sample_ffhq_like
from clipportrait.nn import build_generator, preset
from clipportrait.nn.config import build_discriminator
from clipportrait.nn.compiled import eager_region, wanted


def _pair(compile_mode: str, device: str = "cpu", **overrides):
    g_cfg, _ = preset("tiny", neural_rendering_resolution=16, depth_samples=6, importance_samples=6, **overrides)
    torch.manual_seed(0)
    eager = build_generator(g_cfg).to(device).train()
    compiled = build_generator(dataclasses.replace(g_cfg, compile=compile_mode)).to(device).train()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _render_and_grads(G, ws, origins, dirs, deformer=None):
    out = G.render(ws, origins, dirs, deformer, noise_mode="const", perturb=False)
    loss = out["image"].square().mean() + out["image_raw"].square().mean() + out["image_depth"].mean()
    grads = torch.autograd.grad(loss, list(G.parameters()), allow_unused=True)
    return {k: v.detach() for k, v in out.items()}, grads


def _deformer(batch: int, device: str):
    from clipportrait.geometry.deformation import SurfaceFieldDeformation
    from clipportrait.geometry.morphable.config import MorphableConfig, build_morphable

    head = build_morphable(MorphableConfig(target_faces_simplified=300)).to(device)
    params = head.sample_params(batch, generator=torch.Generator().manual_seed(3))
    obs = head.simplify(head(params.shape, params.expression, params.pose))
    canon = head.simplify(head.canonical_vertices(1))
    return SurfaceFieldDeformation(head.simplified_faces).to(device).bind(obs.to(device), canon.to(device))


def _assert_same_function(eager, reference, candidate, value_tol: float, grad_tol: float):
    """Values within ``value_tol`` and every gradient within ``grad_tol``, both relative to the
    reference's norm (the compiled graphs sum in another order)."""
    (out_e, grad_e), (out_c, grad_c) = reference, candidate
    for key in ("image", "image_raw", "image_depth"):
        err = float((out_c[key] - out_e[key]).norm() / out_e[key].norm())
        assert err < value_tol, (key, err)
    checked = 0
    for (name, _), a, b in zip(eager.named_parameters(), grad_c, grad_e):
        assert (a is None) == (b is None), name
        if b is not None and b.numel() > 1:  # scalars on CUDA sum over atomics (see test_nn_fused)
            checked += 1
            err = float((a - b).norm() / b.norm().clamp_min(1e-30))
            assert err < grad_tol, (name, err)
    assert checked > 30


def _deformed_images(eager, compiled, ws, origins, dirs, device: str) -> list[torch.Tensor]:
    """Unperturbed images with the deformation: eager, compiled, and eager with the ray origins moved by
    one part in 10^7 (about one float32 rounding step), the last measuring how much rounding alone
    changes a deformed render. Rendered as in training (gradients recorded), so the compiled synthesis
    and super-resolution graphs of the gradient check are reused rather than compiled again."""
    return [G.render(ws, o, dirs, _deformer(2, device), noise_mode="const", perturb=False)["image"].detach()
            for G, o in ((eager, origins), (compiled, origins), (eager, origins * (1 + 1e-7)))]


def _assert_same_up_to_rounding(images, rigid):
    """With the deformation in front of the lookup, a sample point that moves by one rounding step can
    cross to another nearest triangle (and importance sampling and super-resolution spread that over a
    few pixels), so compiled and eager differ where eager differs from itself under a rounding-sized
    nudge of its inputs: the compiled difference must stay within a few times that (CPU, measured:
    compiled max 4.1e-4 / mean 6.0e-6; nudged eager 2.4e-3 / 5.3e-5), against the deformation's own
    effect."""
    eager, compiled, nudged = images
    diff, natural = (compiled - eager).abs(), (nudged - eager).abs()
    stats = {"compiled": (float(diff.max()), float(diff.mean())), "nudged": (float(natural.max()), float(natural.mean()))}
    assert float(diff.mean()) <= 4 * float(natural.mean()) + 1e-6, stats
    assert float(diff.max()) <= 4 * float(natural.max()) + 1e-3, stats
    # The deformation did act, by far more than rounding does (so a compiled render that lost it fails).
    assert float((eager - rigid).abs().mean()) > 10 * float(natural.mean()), stats  # CPU: 9.6e-4


@pytest.mark.slow(seconds=150)
def test_compiled_generator_equals_eager_values_and_gradients():
    """compile=always on the CPU: image, raw image and depth equal the eager generator's, and so does
    every parameter's gradient, through the compiled backward of all three pieces. With the
    deformation in front of the lookup (run eagerly between compiled graphs), the images agree up to
    the deformation's discrete nearest-triangle choice: a sample point that moves by one rounding step
    can cross to another triangle; super-resolution spreads such a ray over a few output pixels
    (max difference < 1e-3, mean < 2e-5, against > 1e-2 for the deformation's own effect). A rigid
    render after the deformable ones is the first one again."""
    eager, compiled = _pair("always")
    origins, dirs = ray_bundle(sample_ffhq_like(2, generator=torch.Generator().manual_seed(1)), 16)
    ws = eager.mapping(torch.randn(2, eager.cfg.z_dim)).detach()
    (out_e, grad_e), (out_c, grad_c) = [_render_and_grads(G, ws, origins, dirs) for G in (eager, compiled)]
    _assert_same_function(eager, (out_e, grad_e), (out_c, grad_c), value_tol=1e-5, grad_tol=1e-4)
    _assert_same_up_to_rounding(_deformed_images(eager, compiled, ws, origins, dirs, "cpu"), rigid=out_e["image"])
    # A rigid render after deformable ones: the compiled renderer must not replay the deformable graph
    # (it once did, and called the missing deformer: the deformer is not among a graph's guards).
    again, _ = _render_and_grads(compiled, ws, origins, dirs)
    assert torch.allclose(again["image"], out_c["image"], atol=1e-6), float((again["image"] - out_c["image"]).abs().max())


def test_compile_modes_choose_devices_and_reject_unknown_values():
    cpu = torch.zeros(1)
    assert not wanted("off", cpu) and not wanted("cuda", cpu) and wanted("always", cpu)
    with eager_region():
        assert not wanted("always", cpu)
    assert wanted("always", cpu)
    g_cfg, d_cfg = preset("tiny")
    with pytest.raises(ValueError, match=r"backbone.compile='yes'.*'off', 'cuda', 'always'"):
        dataclasses.replace(g_cfg, compile="yes").validate()
    with pytest.raises(ValueError, match=r"discriminator.compile='on'.*'off', 'cuda', 'always'"):
        build_discriminator(dataclasses.replace(d_cfg, compile="on"), g_cfg)


@pytest.mark.slow(seconds=34)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_compiled_discriminator_equals_eager_and_r1_runs_eagerly(device):
    """discriminator.compile (always on the CPU, cuda on a GPU): logits and the gradients of D's
    parameters and of its inputs equal the eager stem's (with the fade-in blur outside the graph; on
    CUDA the compiled graph filters with box means, eager with depthwise convs); R1, a double
    backward, runs inside eager_region and gives the eager penalty and its parameter gradients."""
    g_cfg, d_cfg = preset("tiny")
    torch.manual_seed(0)
    eager = build_discriminator(d_cfg, g_cfg).to(device)
    mode = "always" if device == "cpu" else "cuda"
    comp = build_discriminator(dataclasses.replace(d_cfg, compile=mode), g_cfg).to(device)
    comp.load_state_dict(eager.state_dict())
    res, nr = g_cfg.img_resolution, g_cfg.neural_rendering_resolution
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(4, 3, res, res, generator=gen), torch.randn(4, 3, nr, nr, generator=gen),
              torch.rand(4, 4, res, res, generator=gen), torch.randn(4, 25, generator=gen)]
    inputs = [t.to(device) for t in inputs]
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _check_compiled_discriminator(eager, comp, inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _check_compiled_discriminator(eager, comp, inputs):
    from clipportrait.losses.gan import r1_penalty
    from clipportrait.nn import compiled as compiled_module
    from clipportrait.nn.discriminator import MeshConditionedDiscriminator

    def run(D, r1: bool):
        img, raw = (t.clone().requires_grad_(True) for t in inputs[:2])
        logits = D(img, raw, inputs[2], inputs[3], blur_sigma=1.5)
        if r1:
            loss = r1_penalty(logits, [img, raw]).mean()
            # Parameters after u (the output layer's bias) do not reach the input gradient: None.
            return loss.detach(), torch.autograd.grad(loss, list(D.parameters()), allow_unused=True)
        grads = torch.autograd.grad(logits.square().sum(), [img, raw, *D.parameters()])
        return logits.detach(), grads

    (ref, ref_grads), (got, got_grads) = run(eager, False), run(comp, False)
    assert MeshConditionedDiscriminator.features in compiled_module._compiled
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(got_grads, ref_grads):
        assert float((a - b).norm() / b.norm().clamp_min(1e-30)) < 1e-4
    with eager_region():
        (ref, ref_grads), (got, got_grads) = run(eager, True), run(comp, True)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)  # the same eager code
    assert sum(g is not None for g in ref_grads) > 10
    spread = []
    for a, b in zip(got_grads, ref_grads):
        assert (a is None) == (b is None)
        if b is not None and b.is_cuda:
            spread.append(float((a - b).norm() / b.norm().clamp_min(1e-30)))
        elif b is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # On CUDA the same eager code is not bitwise repeatable: cuDNN's weight gradients sum with atomics
    # in no fixed order (an H100 run: 1.9e-6 of the norm for a bias whose entries are ~1e-7).
    assert not spread or max(spread) < 1e-5, sorted(spread)[-3:]


def test_compile_and_fast_path_are_execution_settings_not_architecture():
    """A checkpoint trained with one compile/fast-path setting loads under another; a real
    architecture change is still reported."""
    from clipportrait.systems.stage1 import Stage1Config, architecture_differences

    a = Stage1Config().as_dict()
    b = Stage1Config().as_dict()
    b["backbone"].update(compile="cuda", cuda_fast_path=False, upconv_fir="split")
    b["discriminator"]["compile"] = "always"
    assert architecture_differences(a, b) == []
    b["backbone"]["decoder_hidden"] = 32
    assert architecture_differences(a, b) == ["backbone.decoder_hidden: 64 != 32"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compile=cuda compiles CUDA work only")
@pytest.mark.parametrize("upconv_fir", ["fold", "split"])
def test_cuda_compiled_generator_equals_eager(upconv_fir):
    """compile=cuda on a GPU (float32, no TF32; fused Triton lookup and deformation inside the compiled
    render; the up-sampling FIR folded or, with upconv_fir=split, split into kernel and box means
    inside the graphs while eager keeps the fold): values and gradients of the eager generator; with
    the deformation, values up to its triangle ties."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager, compiled = _pair("cuda", "cuda", sr_bf16=False, upconv_fir=upconv_fir)
        origins, dirs = ray_bundle(sample_ffhq_like(2, generator=torch.Generator().manual_seed(1)).cuda(), 16)
        ws = eager.mapping(torch.randn(2, eager.cfg.z_dim, device="cuda")).detach()
        rigid = [_render_and_grads(G, ws, origins, dirs) for G in (eager, compiled)]
        deformed = _deformed_images(eager, compiled, ws, origins, dirs, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    _assert_same_function(eager, *rigid, value_tol=1e-4, grad_tol=1e-3)
    _assert_same_up_to_rounding(deformed, rigid=rigid[0][0]["image"])
