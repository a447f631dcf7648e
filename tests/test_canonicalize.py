"""Canonicalisation (paper sec. 3.3, eq. 9-10) and its cache: inversion recovers generated images, the
learning-rate schedule, per-image independence in a batch, the canonical render, the sharded cache
(resume after a kill without recomputation, corrupt shards, stale temporaries, manifest mismatches),
the raw-embedding ablation, the DataModule reader, and the task end to end with its report."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_stage1 import small_config

from clipportrait.canonical.cache import (CacheWriter, iter_shards, load_canonical_embeddings, make_identity,
                                          read_manifest)
from clipportrait.canonical.config import InversionConfig
from clipportrait.canonical.inversion import Inverter, learning_rate, mean_w, neutral_condition
from clipportrait.canonical.pipeline import canonicalize_dataset
from clipportrait.data.datamodule import PortraitDataset, load_clip_cache
from clipportrait.data.format import write_dataset
from clipportrait.errors import UserError
from clipportrait.geometry.cameras import sample_ffhq_like
from clipportrait.geometry.deformation import DeformationConfig
from clipportrait.lvlm import LVLMConfig, build_clip
from clipportrait.metrics.evaluation import dataset_content_hash
from clipportrait.metrics.lpips import build_lpips
from clipportrait.systems.stage1 import CHECKPOINT_KEY, Stage1GAN
from clipportrait.utils.files import sha256_file

RES = 32
NUM_IMAGES = 6


def _save_checkpoint(system: Stage1GAN, path) -> None:
    torch.save({"state_dict": system.state_dict(),
                CHECKPOINT_KEY: {"kind": "Stage1GAN", "config": system.cfg.as_dict(), "step": 0}}, path)


def _generated_dataset(system: Stage1GAN, path, count: int, seed: int):
    """Images the EMA generator renders from known z under random cameras and morphable parameters."""
    gen = torch.Generator().manual_seed(seed)
    params = system.geometry.morphable.sample_params(count, generator=gen)
    cond = {"camera": sample_ffhq_like(count, generator=gen), "shape": params.shape, "expression": params.expression,
            "pose": params.pose, "flip": torch.zeros(count, dtype=torch.bool)}
    z = torch.randn(count, system.cfg.backbone.z_dim, generator=gen)
    with torch.no_grad():
        images = system.generate(z, cond, G=system.G_ema, noise_mode="const")["image"]
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    names = {f"img{i:05d}.png": pixels[i] for i in range(count)}
    write_dataset(path, names, cond["camera"].numpy(), params.shape.numpy(), params.expression.numpy(),
                  params.pose.numpy())
    return path, system.G_ema.mapping(z)[:, 0].detach()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Stage-1 system (deformation off: the CPU search would dominate the suite), its checkpoint,
    a dataset it generated, LPIPS-VGG and a random-weights tiny CLIP (nothing is downloaded)."""
    root = tmp_path_factory.mktemp("canon")
    torch.manual_seed(0)
    system = Stage1GAN(small_config()).eval()
    checkpoint = root / "stage1.ckpt"
    _save_checkpoint(system, checkpoint)
    data, _ = _generated_dataset(system, root / "data", NUM_IMAGES, seed=1)
    return {"root": root, "system": system, "checkpoint": checkpoint, "data": data,
            "lpips": build_lpips("vgg"), "clip": build_clip(LVLMConfig(kind="random", weights=None, random_seed=3))}


def _inverter(world, **changes) -> Inverter:
    cfg = InversionConfig(w_avg_samples=2000, **changes)
    return Inverter(world["system"], cfg, lpips=world["lpips"])


def _batch(world, rows, data=None):
    dataset = PortraitDataset(world["data"] if data is None else data, resolution=RES)
    items = [dataset[i] for i in rows]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return batch["image"], {k: batch[k] for k in ("camera", "shape", "expression", "pose", "flip")}


def _writer(world, out, embed="canonical", shard_size=2, config=None, **kwargs) -> CacheWriter:
    identity = make_identity(embed=embed, stage1_sha256=sha256_file(world["checkpoint"]) if embed == "canonical" else None,
                             lvlm_model_id=world["clip"].model_id, dataset_hash=dataset_content_hash(world["data"]),
                             num_items=NUM_IMAGES, shard_size=shard_size, config=config or {"steps": 2})
    return CacheWriter(out, identity, {"note": "test"}, **kwargs)


class CountingInverter:
    """Wraps an Inverter, counts invert() calls, and can fail after a number of them (a kill)."""

    def __init__(self, inner: Inverter, fail_after: int | None = None):
        self.inner, self.calls, self.fail_after = inner, 0, fail_after

    def invert(self, images, cond):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        return self.inner.invert(images, cond)

    def canonical(self, w):
        return self.inner.canonical(w)


# ----------------------------------------------------------------------------- inversion (eq. 9-10)


def test_learning_rate_schedule_matches_hand_values():
    """StyleGAN2-projector schedule: linear ramp-up over 5 % of the steps, half-cosine ramp-down over the last 25 %."""
    cfg = InversionConfig(steps=100, lr=0.1, lr_rampup=0.05, lr_rampdown=0.25)
    assert learning_rate(0, cfg) == 0.0
    assert learning_rate(2, cfg) == pytest.approx(0.1 * 0.4)
    assert learning_rate(50, cfg) == pytest.approx(0.1)
    assert learning_rate(90, cfg) == pytest.approx(0.1 * (0.5 - 0.5 * math.cos(0.4 * math.pi)))
    assert learning_rate(99, cfg) == pytest.approx(0.1 * (0.5 - 0.5 * math.cos(0.04 * math.pi)))
    assert learning_rate(0, InversionConfig(steps=10, lr_rampup=0.0)) == pytest.approx(0.1)
    # coarse_restart: 80 coarse steps, then the same schedule again over the last 20.
    restart = InversionConfig(steps=100, lr=0.1, lr_rampup=0.05, lr_rampdown=0.25, coarse_fraction=0.8,
                              coarse_restart=True)
    assert learning_rate(2, restart) == pytest.approx(0.1 * 2 / 4)  # ramp-up over 5 % of 80 = 4 steps
    assert learning_rate(79, restart) == pytest.approx(0.1 * (0.5 - 0.5 * math.cos(1 / 20 * math.pi)))
    assert learning_rate(80, restart) == 0.0
    assert learning_rate(90, restart) == pytest.approx(0.1)
    assert learning_rate(99, restart) == pytest.approx(0.1 * (0.5 - 0.5 * math.cos(0.2 * math.pi)))
    assert learning_rate(90, dataclasses.replace(restart, coarse_restart=False)) == learning_rate(90, cfg)
    with pytest.raises(ValueError, match="inversion.space='z'"):
        InversionConfig(space="z").validate()


def test_inversion_of_generated_images_reduces_lpips_by_a_large_factor(world):
    """Images the generator made from known w, inverted from the mean w with the deformable render under
    their own camera and mesh: the final LPIPS is at least 3x below the LPIPS of the starting w, for the
    batch mean and for every image; the reported LPIPS is that of the returned w."""
    inverter = _inverter(world, steps=30)
    images, cond = _batch(world, range(4))
    start = inverter.w_start.expand(4, -1)
    deformer = inverter.system.geometry.deformer(inverter.system.geometry.observation(cond))
    with torch.no_grad():
        before, _ = inverter.objective(inverter.render(start, cond, deformer), images)
    result = inverter.invert(images, cond)
    assert result.w.shape == (4, world["system"].cfg.backbone.w_dim)
    assert result.history[-1] < result.history[1]
    assert before.mean() >= 3 * result.lpips.mean(), (before, result.lpips)
    assert (result.lpips < before / 2).all(), (before, result.lpips)
    with torch.no_grad():
        again, _ = inverter.objective(inverter.render(result.w, cond, deformer), images)
    assert torch.allclose(again, result.lpips, atol=1e-6)


def test_lpips_from_cached_features_equals_the_lpips_module(world):
    """Inversion compares each step's render with target features computed once: the split form
    (features of each image, then heads on their difference) equals lpips.LPIPS(x, y) per image."""
    from clipportrait.metrics.lpips import lpips_features, lpips_from_features

    model = world["lpips"]
    gen = torch.Generator().manual_seed(5)
    x, y = (torch.rand(3, 3, 40, 40, generator=gen) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        split = lpips_from_features(model, lpips_features(model, x), lpips_features(model, y))
        whole = model(x, y).flatten()
    assert split.shape == (3,)
    assert torch.allclose(split, whole, rtol=1e-5, atol=1e-7), (split, whole)
    assert not torch.allclose(split, lpips_from_features(model, lpips_features(model, x), lpips_features(model, x)))
    with pytest.raises(ValueError, match="LPIPS layers"):
        lpips_from_features(model, lpips_features(model, x)[:2], lpips_features(model, y)[:2])


def test_steps_use_the_cached_target_features_and_bf16_is_cuda_only(world):
    """Each step's loss equals LPIPS(render of the w the step started from, target) computed by the
    LPIPS module from scratch; precision=bf16 is refused off CUDA, and an unknown precision by name."""
    inverter = _inverter(world, steps=3, lr_rampup=0.0, pixel_weight=0.25)
    images, cond = _batch(world, [0, 1])
    state = inverter.start(images, cond)
    for step in range(3):
        w = state.w.detach().clone()
        with torch.no_grad():
            render = inverter.render(w, cond, state.deformer)
            expected = world["lpips"](render, images).flatten() + 0.25 * (render - images).square().flatten(1).mean(1)
        got = inverter.step(state, step)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (step, got, expected)
        assert not torch.equal(state.w, w)  # the step moved w
    with pytest.raises(ValueError, match="inversion.precision='fp16'"):
        InversionConfig(precision="fp16").validate()
    with pytest.raises(ValueError, match="bf16 needs a CUDA device"):
        _inverter(world, steps=1, precision="bf16").invert(images[:1], {k: v[:1] for k, v in cond.items()})


@pytest.mark.slow(seconds=50)
def test_compiled_step_distance_equals_the_eager_one_with_its_gradient(world, monkeypatch):
    """With the generator's compile setting asking for it (``always`` on the CPU), a step's distance is
    the torch.compile'd `image_distance`; its LPIPS, total loss and gradient w.r.t. the render equal the
    eager function's (the render, at twice the size, area-downsampled inside). LPIPS-Alex with random
    weights: the same code path as VGG, compiled in half the time."""
    import lpips

    net = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False).eval().requires_grad_(False)
    inverter = Inverter(world["system"], InversionConfig(steps=1, w_avg_samples=200, pixel_weight=0.25), lpips=net)
    images, _ = _batch(world, [0, 1])
    render = torch.nn.functional.interpolate(images.flip(-1) * 0.8, scale_factor=2.0).requires_grad_(True)
    target = inverter.target(images, 0)
    results = {}
    for mode in ("off", "always"):
        monkeypatch.setattr(inverter.G.cfg, "compile", mode)
        distance, loss = inverter.distance(render, target)
        (grad,) = torch.autograd.grad(loss.sum(), render)
        results[mode] = distance.detach(), loss.detach(), grad
    for eager, compiled in zip(results["off"], results["always"]):
        assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-6), (compiled, eager)
    assert not torch.allclose(results["off"][1], results["off"][0])  # the pixel term is in the loss
    assert results["off"][2].abs().sum() > 0


@pytest.mark.parametrize("coarse_resolution", [0, 24])
def test_coarse_steps_compare_the_neural_render_without_super_resolution(world, monkeypatch, coarse_resolution):
    """coarse_fraction=0.5 of 4 steps: steps 0-1 return LPIPS (+ pixel term) of the neural render at the
    coarse resolution (0: the generator's, 16 here) against the image area-downsampled to it, and never
    run super-resolution; steps 2-3 return the final image's loss, as without coarse steps."""
    from clipportrait.nn.superres import SuperResolution

    calls = []
    forward = SuperResolution.forward
    monkeypatch.setattr(SuperResolution, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    inverter = _inverter(world, steps=4, lr_rampup=0.0, pixel_weight=0.25, coarse_fraction=0.5,
                         coarse_resolution=coarse_resolution)
    assert inverter.cfg.coarse_steps == 2
    images, cond = _batch(world, [0, 1])
    state = inverter.start(images, cond)
    size = coarse_resolution or 16
    for step in range(4):
        w = state.w.detach().clone()
        coarse = step < 2
        with torch.no_grad():
            out = inverter.G.synthesis(inverter.broadcast(w), cond["camera"], noise_mode="const", perturb=False,
                                       neural_rendering_resolution=size if coarse else None)
            render = out["image_raw"] if coarse else out["image"]
            target = torch.nn.functional.interpolate(images, size=(size, size), mode="area") if coarse else images
            expected = world["lpips"](render, target).flatten() + 0.25 * (render - target).square().flatten(1).mean(1)
        calls.clear()
        got = inverter.step(state, step)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (step, got, expected)
        assert bool(calls) != coarse, (step, calls)


def test_coarse_pass_points_go_through_the_deformation_once_per_batch(world, monkeypatch):
    """The rays of a batch are fixed, so only each step's importance samples are mapped by D; the
    coarse pass's points were mapped when the batch started. A step's loss equals the render that maps
    every point itself (``Inverter.render``)."""
    inverter = _inverter(world, steps=3, lr_rampup=0.0)
    images, cond = _batch(world, [0, 1])
    seen = []

    def deformer(points):  # a fixed, non-trivial warp standing in for D
        seen.append(points.shape[1])
        return points * torch.tensor([1.05, 0.95, 1.0]) + 0.01

    monkeypatch.setattr(inverter.system.geometry, "deformer", lambda obs: deformer)
    state = inverter.start(images, cond)
    cfg = inverter.G.cfg
    assert seen == [16 * 16 * cfg.depth_samples]
    for step in range(3):
        w = state.w.detach().clone()
        with torch.no_grad():
            expected, _ = inverter.distance(inverter.render(w, cond, deformer), state.fine.target)
        seen.clear()
        got = inverter.step(state, step)
        assert seen == [16 * 16 * cfg.importance_samples]
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (step, got, expected)


def test_coarse_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="inversion.coarse_fraction=1.5"):
        InversionConfig(coarse_fraction=1.5).validate()
    with pytest.raises(ValueError, match="inversion.coarse_resolution=-1"):
        InversionConfig(coarse_resolution=-1).validate()
    assert InversionConfig(steps=200, coarse_fraction=0.85).coarse_steps == 170


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast inversion runs on CUDA")
def test_bf16_inversion_on_cuda_still_recovers_generated_images(tmp_path):
    """precision=bf16 (the steps under autocast): the final float32 LPIPS is at least 3x below the
    starting w's, as in float32 (own small world with LPIPS-Alex, the lighter asset to carry to a GPU)."""
    torch.manual_seed(0)
    system = Stage1GAN(small_config()).eval().cuda()
    data, _ = _generated_dataset(system.cpu(), tmp_path / "data", 4, seed=1)
    system.cuda()
    dataset = PortraitDataset(data, resolution=RES)
    items = [dataset[i] for i in range(4)]
    batch = {k: torch.stack([it[k] for it in items]).cuda() for k in items[0]}
    images, cond = batch["image"], {k: batch[k] for k in ("camera", "shape", "expression", "pose", "flip")}
    inverter = Inverter(system, InversionConfig(steps=30, w_avg_samples=2000, precision="bf16"),
                        lpips=build_lpips("alex", device="cuda"))
    with torch.no_grad():
        before, _ = inverter.objective(inverter.render(inverter.w_start.expand(4, -1), cond, None), images)
    result = inverter.invert(images, cond)
    assert result.lpips.dtype == torch.float32
    assert before.mean() >= 3 * result.lpips.mean(), (before, result.lpips)


def test_each_image_of_a_batch_is_optimised_independently_and_w_plus_has_a_w_per_layer(world):
    """Per-image losses and element-wise Adam: inverting [a, b] gives the w that inverting a alone gives."""
    inverter = _inverter(world, steps=4, pixel_weight=0.5)
    images, cond = _batch(world, [0, 1])
    both = inverter.invert(images, cond)
    alone = inverter.invert(images[:1], {k: v[:1] for k, v in cond.items()})
    assert torch.allclose(both.w[:1], alone.w, atol=1e-5)
    assert not torch.allclose(both.w[0], inverter.w_start)
    plus = _inverter(world, steps=2, space="w_plus").invert(images, cond)
    assert plus.w.shape == (2, world["system"].G_ema.num_ws, world["system"].cfg.backbone.w_dim)
    assert not torch.allclose(plus.w[:, 0], plus.w[:, -1])  # the layers move apart


def test_mean_w_is_the_mean_of_mapped_latents(world):
    """w_init=sampled: the float64 mean of G_ema's mapping over the seeded z; auto falls back to it when
    the tracked w_avg buffer was never updated (all zeros) or is still far from the mean (a briefly
    trained model), and uses the buffer once it is within 10% of the mean; w_init=buffer always does."""
    mapping = world["system"].G_ema.mapping
    cfg = InversionConfig(w_avg_samples=300, seed=5)
    w, source = mean_w(mapping, cfg)
    z = torch.randn(300, mapping.z_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = mapping(z)[:, 0].double().mean(0).float()
    assert source == "sampled" and torch.allclose(w, reference, atol=1e-6)
    saved = mapping.w_avg.clone()
    try:
        near = reference + 0.05 * reference.norm() * F.normalize(torch.ones_like(reference), dim=0)
        far = reference + 0.2 * reference.norm() * F.normalize(torch.ones_like(reference), dim=0)
        for buffer, w_init, expected in ((near, "auto", "buffer"), (far, "auto", "sampled"), (far, "buffer", "buffer")):
            mapping.w_avg.copy_(buffer)
            w, source = mean_w(mapping, InversionConfig(w_avg_samples=300, seed=5, w_init=w_init))
            assert source == expected, (w_init, expected)
            assert torch.equal(w, buffer) if expected == "buffer" else torch.allclose(w, reference, atol=1e-6)
    finally:
        mapping.w_avg.copy_(saved)


def test_objective_renders_through_the_image_mesh_and_x_hat_through_the_identity(world, tmp_path):
    """Surface field on (the same weights): images made at known w under their own meshes are reproduced
    by the objective's render at that w (LPIPS only from 8-bit quantisation and clipping) and not when the field is
    bound to the other image's mesh; x_hat (eq. 10, no deformer) equals the render with the field bound
    to the canonical mesh under the frontal camera, and differs from a posed render."""
    system = Stage1GAN(small_config(deformation=DeformationConfig(enabled=True, backend="torch"))).eval()
    system.load_state_dict(world["system"].state_dict())
    data, w_true = _generated_dataset(system, tmp_path / "deformed", 2, seed=4)
    inverter = Inverter(system, InversionConfig(steps=1, w_avg_samples=200), lpips=world["lpips"])
    images, cond = _batch(world, [0, 1], data)
    swapped = {k: (v.roll(1, 0) if k in ("shape", "expression", "pose") else v) for k, v in cond.items()}
    geometry = system.geometry
    with torch.no_grad():  # clamped: the stored targets are clipped to [-1, 1], random-weight renders are not
        own, _ = inverter.objective(
            inverter.render(w_true, cond, geometry.deformer(geometry.observation(cond))).clamp(-1, 1), images)
        other, _ = inverter.objective(
            inverter.render(w_true, cond, geometry.deformer(geometry.observation(swapped))).clamp(-1, 1), images)
    assert (own < 0.02).all() and (other > 2 * own).all(), (own, other)

    x_hat = inverter.canonical(w_true)
    neutral = neutral_condition(geometry.morphable, 2, torch.device("cpu"))
    assert torch.allclose(neutral["camera"][:, 3], torch.zeros(2)) and (neutral["camera"][:, 11] > 0).all()  # +z axis
    with torch.no_grad():
        reference = inverter.render(w_true, neutral, geometry.deformer(geometry.observation(neutral)))
        posed = inverter.render(w_true, cond, geometry.deformer(geometry.observation(cond)))
    assert torch.allclose(x_hat, reference, atol=1e-4)
    assert (posed - x_hat).abs().mean() > 1e-2


# ----------------------------------------------------------------------------- cache


def test_killed_run_resumes_without_recomputing_finished_shards(world, tmp_path):
    """3 shards of 2 images; a kill while computing shard 2 leaves shards 0-1 finished and no partial
    file; the rerun computes only shard 2 and the cache equals an uninterrupted run's. Stored r is
    E_img of the canonical render of the stored w."""
    dataset = PortraitDataset(world["data"], resolution=RES)
    clip = world["clip"]
    killed = CountingInverter(_inverter(world, steps=2), fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        canonicalize_dataset(dataset, clip, _writer(world, tmp_path / "cache"), "canonical", killed, batch_size=2)
    manifest = read_manifest(tmp_path / "cache")
    assert sorted(manifest["shards"]) == ["shard-00000.npz", "shard-00001.npz"] and not manifest["complete"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock", "manifest.json", "shard-00000.npz",
                                                                      "shard-00001.npz"]
    with pytest.raises(UserError, match="incomplete"):
        load_canonical_embeddings(tmp_path / "cache", dataset.index.names)

    resumed = CountingInverter(_inverter(world, steps=2))
    stats = canonicalize_dataset(dataset, clip, _writer(world, tmp_path / "cache"), "canonical", resumed, batch_size=2)
    assert resumed.calls == 1 and stats["shards_reused"] == 2 and stats["shards_computed"] == 1
    full = CountingInverter(_inverter(world, steps=2))
    canonicalize_dataset(dataset, clip, _writer(world, tmp_path / "full"), "canonical", full, batch_size=2)
    assert full.calls == 3
    a = load_canonical_embeddings(tmp_path / "cache", dataset.index.names)
    b = load_canonical_embeddings(tmp_path / "full", dataset.index.names)
    assert np.allclose(a[0], b[0], atol=1e-6) and np.allclose(a[1], b[1], atol=1e-6)

    with np.load(tmp_path / "cache" / "shard-00002.npz") as shard:
        names, w, r, r_flipped, lpips = (shard[k] for k in ("names", "w", "r", "r_flipped", "lpips"))
        assert shard["canonical"].shape == (2, RES, RES, 3) and shard["canonical"].dtype == np.uint8
    assert list(names) == dataset.index.names[4:6] and lpips.shape == (2,)
    x_hat = full.canonical(torch.from_numpy(w))
    with torch.no_grad():
        assert np.allclose(r, clip.encode_images(x_hat.clamp(-1, 1)).numpy(), atol=1e-5)
        assert np.allclose(r_flipped, clip.encode_images(x_hat.clamp(-1, 1).flip(-1)).numpy(), atol=1e-5)


def test_corrupt_truncated_and_unrecorded_shards_are_detected(world, tmp_path, monkeypatch):
    """A shard whose bytes changed, a truncated shard, and a shard written just before a kill (not yet
    in the manifest) are recomputed by the writer, one inversion each; the reader refuses a corrupt one;
    on_corrupt=error refuses too; a stale temporary file from a kill inside a write is removed."""
    dataset = PortraitDataset(world["data"], resolution=RES)
    out = tmp_path / "cache"
    canonicalize_dataset(dataset, world["clip"], _writer(world, out, embed="raw"), "raw", batch_size=2, render_size=0)
    shard = out / "shard-00001.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard-00001.npz is sha256 .* \(corrupt\)"):
        load_canonical_embeddings(out, dataset.index.names)
    with pytest.raises(UserError, match="shard-00001.npz is sha256"):
        _writer(world, out, embed="raw", on_corrupt="error").pending()
    (out / "shard-00002.npz").write_bytes((out / "shard-00002.npz").read_bytes()[:100])
    (out / ".shard-00000.npz.x1y2.tmp").write_bytes(b"half")
    writer = _writer(world, out, embed="raw")
    assert not (out / ".shard-00000.npz.x1y2.tmp").exists()
    assert writer.pending() == [1, 2]

    # A kill between the shard rename and the manifest update: the file exists, the manifest lacks it.
    calls = []
    original = CacheWriter._save_manifest

    def save_then_die(self):
        if len(self.manifest["shards"]) == 3 and not calls:
            calls.append(1)
            raise KeyboardInterrupt("simulated kill")
        original(self)

    monkeypatch.setattr(CacheWriter, "_save_manifest", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        canonicalize_dataset(dataset, world["clip"], writer, "raw", batch_size=2, render_size=0)
    monkeypatch.setattr(CacheWriter, "_save_manifest", original)
    writer.close()  # a real kill ends the process, and the lock with it
    again = _writer(world, out, embed="raw")
    assert again.pending() == [2]
    canonicalize_dataset(dataset, world["clip"], again, "raw", batch_size=2, render_size=0)
    r, _ = load_canonical_embeddings(out, dataset.index.names)
    with torch.no_grad():
        assert np.allclose(r, world["clip"].encode_images(_batch(world, range(NUM_IMAGES))[0]).numpy(), atol=1e-5)


def test_raw_embedding_skips_inversion(world, tmp_path, monkeypatch):
    """embed=raw (Fig. 4 ablation): no inversion runs; r is E_img of the dataset image, r_flipped of its mirror."""
    monkeypatch.setattr(Inverter, "invert", lambda *a, **k: pytest.fail("raw embedding must not invert"))
    dataset = PortraitDataset(world["data"], resolution=RES)
    canonicalize_dataset(dataset, world["clip"], _writer(world, tmp_path / "raw", embed="raw", shard_size=4), "raw",
                         batch_size=3)
    with np.load(tmp_path / "raw" / "shard-00000.npz") as shard:
        assert sorted(shard.files) == ["names", "r", "r_flipped"]
    r, r_flipped = load_canonical_embeddings(tmp_path / "raw", dataset.index.names)
    images = _batch(world, range(NUM_IMAGES))[0]
    with torch.no_grad():
        assert np.allclose(r, world["clip"].encode_images(images).numpy(), atol=1e-5)
        assert np.allclose(r_flipped, world["clip"].encode_images(images.flip(-1)).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="needs an Inverter"):
        canonicalize_dataset(dataset, world["clip"], _writer(world, tmp_path / "c"), "canonical")


def test_datamodule_reads_a_matching_cache_and_refuses_other_datasets_and_checkpoints(world, tmp_path):
    """data.clip_cache=<dir>: items carry r (flipped copies r_flipped); a cache of another dataset or,
    when the caller names one, another Stage-1 checkpoint is refused naming both hashes; a writer with
    other inputs refuses the directory unless overwrite."""
    out = tmp_path / "cache"
    dataset = PortraitDataset(world["data"], resolution=RES)
    canonicalize_dataset(dataset, world["clip"], _writer(world, out, embed="raw", shard_size=4), "raw", batch_size=6)
    served = PortraitDataset(world["data"], resolution=RES, flip=True, clip_cache=str(out))
    r, r_flipped = load_canonical_embeddings(out, served.index.names)
    assert np.array_equal(served[1]["clip_embedding"].numpy(), r[1])
    assert np.array_equal(served[NUM_IMAGES + 1]["clip_embedding"].numpy(), r_flipped[1])

    other, _ = _generated_dataset(world["system"], tmp_path / "other", 2, seed=9)
    expected, actual = dataset_content_hash(world["data"]), dataset_content_hash(other)
    with pytest.raises(UserError, match=f"dataset content hash {expected}.*hashes to {actual}"):
        PortraitDataset(other, resolution=RES, clip_cache=str(out))

    canonical = tmp_path / "canonical"
    canonicalize_dataset(dataset, world["clip"], _writer(world, canonical, shard_size=6), "canonical",
                         _inverter(world, steps=1), batch_size=6, render_size=0)
    load_clip_cache(canonical, dataset.index.names, world["data"], stage1_checkpoint=world["checkpoint"])
    retrained = tmp_path / "retrained.ckpt"
    system = Stage1GAN(world["system"].cfg)
    _save_checkpoint(system, retrained)
    with pytest.raises(UserError, match=f"sha256 {sha256_file(world['checkpoint'])}.* has {sha256_file(retrained)}"):
        load_clip_cache(canonical, dataset.index.names, world["data"], stage1_checkpoint=retrained)

    with pytest.raises(UserError, match=r"shard_size: cache has 4, this run has 2"):
        _writer(world, out, embed="raw", shard_size=2)
    assert _writer(world, out, embed="raw", shard_size=2, overwrite=True).pending() == [0, 1, 2]
    assert not (out / "shard-00000.npz").exists()


def test_cache_made_with_skip_bad_is_served_to_the_skip_bad_dataset(world, tmp_path):
    """data.skip_bad=true on both sides: canonicalize leaves the corrupt image out of the cache, and the
    Stage-2 dataset (which skips it too) reads that cache and serves every usable image its own r, and
    its flipped copy its own r_flipped."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "img00002.png").write_bytes(b"not a png")
    dataset = PortraitDataset(data, resolution=RES, skip_bad=True)
    identity = make_identity(embed="raw", stage1_sha256=None, lvlm_model_id=world["clip"].model_id,
                             dataset_hash=dataset_content_hash(data), num_items=dataset.num_images, shard_size=2,
                             config={})
    canonicalize_dataset(dataset, world["clip"], CacheWriter(tmp_path / "cache", identity, {}), "raw", batch_size=5)
    cached = {}
    for arrays in iter_shards(tmp_path / "cache"):
        cached.update({str(n): (r, rf) for n, r, rf in zip(arrays["names"], arrays["r"], arrays["r_flipped"])})
    assert "img00002.png" not in cached and len(cached) == NUM_IMAGES - 1
    served = PortraitDataset(data, resolution=RES, flip=True, skip_bad=True, clip_cache=str(tmp_path / "cache"))
    for item in range(len(served)):
        meta = served.metadata(item)
        r, r_flipped = cached[served.index.names[int(meta["index"])]]
        assert np.array_equal(meta["clip_embedding"].numpy(), r_flipped if meta["flip"] else r), item


def _shard(index: int, width: int = 4) -> dict[str, np.ndarray]:
    """Well-formed arrays of shard ``index`` (2 rows, embeddings of ``width``) of a cache of img00000.png..."""
    return {"names": np.array([f"img{2 * index + i:05d}.png" for i in range(2)]),
            "r": np.full((2, width), index, np.float32), "r_flipped": np.full((2, width), -index, np.float32),
            "w": np.zeros((2, 3), np.float32), "lpips": np.zeros(2, np.float32)}


def _nonfinite(key: str, row: int, value: float):
    def damage(arrays):
        arrays[key] = arrays[key].copy()
        arrays[key][row, ...] = value
    return damage


SHARD_DAMAGE = {  # how shard 1 (dataset rows 2-3) is broken -> what the error must say
    "nan_r": (_nonfinite("r", 1, np.nan), r"NaN/inf in \['r'\] at dataset rows \[3\] \(\['img00003.png'\]"),
    "inf_r_flipped": (_nonfinite("r_flipped", 0, np.inf),
                      r"NaN/inf in \['r_flipped'\] at dataset rows \[2\] \(\['img00002.png'\]"),
    "nan_w": (_nonfinite("w", 1, np.nan), r"NaN/inf in \['w'\] at dataset rows \[3\]"),
    "nan_lpips": (_nonfinite("lpips", 0, np.nan), r"NaN/inf in \['lpips'\] at dataset rows \[2\]"),
    "float16": (lambda a: a.update(r=a["r"].astype(np.float16)), r"'r' float16 \(2, 4\), expected float32 \(n, 4\)"),
    "rank3": (lambda a: a.update(r_flipped=a["r_flipped"][..., None]), r"'r_flipped' float32 \(2, 4, 1\)"),
    "width": (lambda a: a.update(r=np.ones((2, 5), np.float32), r_flipped=np.ones((2, 5), np.float32)),
              r"'r' float32 \(2, 5\), expected float32 \(n, 4\)"),
}


@pytest.mark.parametrize("damage", sorted(SHARD_DAMAGE))
def test_writer_refuses_a_shard_with_non_finite_or_malformed_embeddings(world, tmp_path, damage):
    """A diverged inversion (NaN/inf in r, r_flipped, w or lpips), float16 or 3-D embeddings, or a width
    other than the cache's other shards' are refused (UserError naming the shard and, for non-finite
    values, the dataset rows and images); nothing of that shard is stored, and a good one is then accepted."""
    broken, message = SHARD_DAMAGE[damage]
    arrays = _shard(1)
    broken(arrays)
    with _writer(world, tmp_path / "cache") as writer:
        writer.write(0, _shard(0))
        with pytest.raises(UserError, match=r"shard-00001.npz, it has " + message):
            writer.write(1, arrays)
        assert not (tmp_path / "cache" / "shard-00001.npz").exists()
        assert list(read_manifest(tmp_path / "cache")["shards"]) == ["shard-00000.npz"]
        writer.write(1, _shard(1))


@pytest.mark.parametrize("damage", ["nan_r", "width", "rank3"])
def test_reader_refuses_a_shard_with_non_finite_or_malformed_embeddings(world, tmp_path, damage):
    """A shard whose embeddings are non-finite, of another rank, or of another width than the first
    shard's (as code without the writer's checks could store, sha256 recorded) is a UserError naming
    that shard's file, not a bare numpy error."""
    out = tmp_path / "cache"
    with _writer(world, out) as writer:
        for shard in range(3):
            writer.write(shard, _shard(shard))
        writer.finish()
    arrays = _shard(1)
    SHARD_DAMAGE[damage][0](arrays)
    name = "shard-00001.npz"
    np.savez(out / name, **arrays)
    manifest = read_manifest(out)
    manifest["shards"][name].update(sha256=sha256_file(out / name), bytes=(out / name).stat().st_size)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"{out / name} has {SHARD_DAMAGE[damage][1]}.*task.out={out}"):
        load_canonical_embeddings(out, [f"img{i:05d}.png" for i in range(NUM_IMAGES)])


def test_second_writer_on_a_directory_is_refused_until_the_first_ends(world, tmp_path):
    """While a writer holds a cache directory another one is refused (UserError naming the directory)
    and leaves the first's in-flight temporary alone; the lock is free again after close(), after
    finish(), at the end of a with block, and after __init__ itself refused the directory."""
    out = tmp_path / "cache"
    first = _writer(world, out, embed="raw")
    (out / ".shard-00000.npz.inflight.tmp").write_bytes(b"half")
    with pytest.raises(UserError, match=f"another canonicalize run is writing {out}"):
        _writer(world, out, embed="raw")
    assert (out / ".shard-00000.npz.inflight.tmp").exists()
    first.close()
    with pytest.raises(RuntimeError, match="closed"):
        first.write(0, _shard(0))
    with _writer(world, out, embed="raw"):
        with pytest.raises(UserError, match="another canonicalize run"):
            _writer(world, out, embed="raw")
    finished = _writer(world, out, embed="raw")
    canonicalize_dataset(PortraitDataset(world["data"], resolution=RES), world["clip"], finished, "raw", batch_size=6)
    with pytest.raises(UserError, match="shard_size: cache has 2, this run has 3") as refused:
        _writer(world, out, embed="raw", shard_size=3)
    # ``finished`` is alive, and ``refused`` keeps the refused writer's frame: both let go of the lock.
    _writer(world, out, embed="raw").close()
    assert finished is not None and refused is not None


# ----------------------------------------------------------------------------- the task


def test_task_writes_cache_report_and_metrics(world, tmp_path):
    """task=canonicalize through the composed config: manifest with checkpoint sha256, LVLM id, dataset
    hash and config; report (histogram, worst/best grids, per-image LPIPS sorted worst first); summary
    numbers in the result and metrics.jsonl; a second run reuses every shard."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from clipportrait.cli import CONF_DIR
    from clipportrait.config import register_configs
    from clipportrait.tasks import canonicalize
    from clipportrait.tasks.base import RunContext

    register_configs()
    out = tmp_path / "cache"
    overrides = ["task=canonicalize", f"task.checkpoint={world['checkpoint']}", f"data.path={world['data']}",
                 f"task.out={out}", "lvlm=random", "lvlm.random_seed=3", "task.inversion.steps=3",
                 "task.inversion.w_avg_samples=500", "task.shard_size=4", "task.batch_size=4", "task.report_cases=3",
                 "task.render_size=16", f"paths.root_dir={tmp_path}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    ctx = RunContext(run_dir=tmp_path / "run")
    result = canonicalize.run(cfg, ctx)
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["num_shards"] == 2 and manifest["embed"] == "canonical"
    assert manifest["stage1_sha256"] == sha256_file(world["checkpoint"])
    assert manifest["lvlm_model_id"] == world["clip"].model_id
    assert manifest["dataset_hash"] == dataset_content_hash(world["data"])
    assert manifest["config"]["inversion"]["steps"] == 3 and manifest["config"]["resolution"] == RES
    for name in ("lpips_histogram.png", "worst.png", "best.png", "per_image.json"):
        assert (out / "report" / name).stat().st_size > 0, name
    per_image = json.loads((out / "report" / "per_image.json").read_text())["lpips"]
    values = list(per_image.values())
    assert len(values) == NUM_IMAGES and values == sorted(values, reverse=True)
    assert result["lpips_mean"] == pytest.approx(np.mean(values)) and result["lpips_max"] == values[0]
    summary = [r for r in ctx.metrics.read() if r["event"] == "canonicalize/summary"]
    assert len(summary) == 1 and summary[0]["lpips_median"] == pytest.approx(np.median(values))
    assert [r["shard"] for r in ctx.metrics.read() if r["event"] == "canonicalize/shard"] == [0, 1]
    with np.load(out / "shard-00000.npz") as shard:  # renders stored at task.render_size
        assert shard["inverted"].shape == shard["canonical"].shape == (4, 16, 16, 3)
    again = canonicalize.run(cfg, RunContext(run_dir=tmp_path / "run2"))
    assert again["shards_reused"] == 2 and again["shards_computed"] == 0
