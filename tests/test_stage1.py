"""Stage-1 training system: losses against hand/autograd references, phase isolation, EMA,
schedules, non-finite guard, checkpoint compatibility, and exact resume after a kill."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from clipportrait.data.config import DataConfig, SyntheticConfig
from clipportrait.data.datamodule import PortraitDataModule
from clipportrait.data.synthetic import generate_synthetic
from clipportrait.errors import UserError
from clipportrait.geometry.deformation import DeformationConfig
from clipportrait.losses import RegularizerConfig, d_nonsaturating, density_regularization, g_nonsaturating, r1_penalty
from clipportrait.nn.config import preset
from clipportrait.nn.ema import ema_beta, update_ema
from clipportrait.systems.callbacks import KimgCheckpoint, crossed
from clipportrait.systems.stage1 import OptimConfig, Stage1Config, Stage1GAN, load_checkpoint
from clipportrait.utils.schedules import Constant, Linear, kimg_to_steps

RES = 32


def small_config(**changes) -> Stage1Config:
    g, d = preset("tiny", img_resolution=RES, sr_input_resolution=16, neural_rendering_resolution=16,
                  depth_samples=6, importance_samples=6, triplane_resolution=32, channel_max=32,
                  compile="off", d_compile="off")  # eager on GPUs too (compile: test_nn_compiled)
    cfg = Stage1Config(backbone=g, discriminator=d, deformation=DeformationConfig(enabled=False),
                       regularizer=RegularizerConfig(r1_interval=2, density_interval=2, density_points=64,
                                                     blur_fade_kimg=0.02),
                       optim=OptimConfig(ema_kimg=0.01), batch_size=4, max_steps=4)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("s1") / "syn"
    generate_synthetic(SyntheticConfig(num_images=12, resolution=RES, workers=1, contact_sheet=False, seed=3), path)
    return path


def datamodule(path, batch=4) -> PortraitDataModule:
    return PortraitDataModule(DataConfig(kind="folder", path=str(path), resolution=RES, batch_size=batch, num_workers=0))


# ----------------------------------------------------------------------------- losses


def test_nonsaturating_losses_match_their_formulas():
    real, fake = torch.tensor([0.3, -2.0]), torch.tensor([1.5, -0.1])
    assert torch.allclose(g_nonsaturating(fake), -torch.log(torch.sigmoid(fake)))
    expected = -torch.log(1 - torch.sigmoid(fake)) - torch.log(torch.sigmoid(real))
    assert torch.allclose(d_nonsaturating(real, fake), expected, atol=1e-6)


def test_r1_equals_the_analytic_gradient_norm():
    """For D(x, y) = sum(a*x^2) + sum(b*y), grad_x = 2 a x and grad_y = b, so R1 = sum (2ax)^2 + sum b^2."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    a, b = torch.randn(2, 4, 4, dtype=torch.float64), torch.randn(2, 2, 2, dtype=torch.float64)
    logits = (a * x * x).flatten(1).sum(1) + (b * y).flatten(1).sum(1)
    penalty = r1_penalty(logits, [x, y])
    expected = (2 * a * x).square().flatten(1).sum(1) + b.square().sum()
    assert torch.allclose(penalty, expected.detach())
    # ... and it is differentiable itself (D is trained on it): d/da of sum(4 a^2 x^2) = 8 a x^2.
    a_param = a.clone().requires_grad_(True)
    logits = (a_param * x * x).flatten(1).sum(1)
    r1_penalty(logits, [x]).sum().backward()
    assert torch.allclose(a_param.grad, (8 * a * x.detach() ** 2).sum(0))
    with pytest.raises(ValueError, match="does not require grad"):
        r1_penalty(logits, [x.detach()])


def test_density_regulariser_matches_hand_computation():
    """With a linear density sigma(p) = p . k, |sigma(x) - sigma(x + e)| = |e . k| exactly."""
    k = torch.tensor([0.5, -2.0, 1.0])
    term = density_regularization(lambda p: (p @ k)[..., None], batch=2, num_points=50, perturb=0.01, extent=1.0,
                                  generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    initial = torch.rand(2, 50, 3, generator=gen) * 2 - 1
    moved = initial + torch.randn(initial.shape, generator=gen) * 0.01
    assert initial.abs().max() <= 1
    assert torch.allclose(term, ((moved - initial) @ k).abs().mean())


def test_ema_update_and_beta_match_hand_computation():
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), ema.weight.fill_(3.0)
    update_ema(ema, model, beta=0.75)
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 1.0 + 0.75 * (3.0 - 1.0)))
    assert ema_beta(32, 10**9, ema_kimg=10, rampup=None) == pytest.approx(0.5 ** (32 / 10000))
    # Ramp-up: after 1000 images with rampup 0.05 the half-life is 50 images.
    assert ema_beta(32, 1000, ema_kimg=10, rampup=0.05) == pytest.approx(0.5 ** (32 / 50))


def test_schedules():
    fade = Linear(10.0, 0.0, duration=kimg_to_steps(0.2, 32))  # 200 images = 7 steps of 32
    assert kimg_to_steps(0.2, 32) == 7
    assert fade(0) == 10.0 and fade(7) == 0.0 and fade(100) == 0.0
    assert fade(3) == pytest.approx(10.0 * (1 - 3 / 7))
    assert Constant(2.5)(12345) == 2.5
    assert crossed(990, 1010, 1000) and not crossed(1000, 1990, 1000) and not crossed(0, 10**6, 0)


# ----------------------------------------------------------------------------- phases


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_g_phases_change_only_g_and_d_phases_only_d(dataset_path):
    torch.manual_seed(0)
    dm = datamodule(dataset_path)
    dm.setup()
    system = Stage1GAN(small_config(), conditioning=dm.conditioning)
    opt_g, opt_d = system.configure_optimizers()
    real = system.real_inputs(next(iter(dm.train_dataloader())))
    phases = [
        ("g_main", opt_g, system.G, lambda i: system.loss_g_main(4)),
        ("g_reg", opt_g, system.G, lambda i: system.loss_g_reg(4)),
        ("d_main", opt_d, system.D, lambda i: system.loss_d_main(real)),
        ("d_reg", opt_d, system.D, lambda i: system.loss_d_reg(real)),
    ]
    for name, opt, module, loss_fn in phases:
        g0, d0, e0 = _snapshot(system.G), _snapshot(system.D), _snapshot(system.G_ema)
        loss = system.run_phase(name, opt, module, loss_fn, chunks=1)
        assert loss is not None and torch.isfinite(loss), name
        assert _changed(g0, system.G) == (module is system.G), name
        assert _changed(d0, system.D) == (module is system.D), name
        assert not _changed(e0, system.G_ema), name


def test_gradient_accumulation_equals_one_big_batch(dataset_path):
    """run_phase with 2 micro-batches of 2 applies the update of one batch of 4 (R1 phase: it depends on
    the reals only; minibatch-std is off because it couples the samples of a group)."""
    dm = datamodule(dataset_path)
    dm.setup()
    cfg = small_config()
    cfg.discriminator.mbstd_group_size = 0
    torch.manual_seed(0)
    one = Stage1GAN(cfg, conditioning=dm.conditioning)
    two = copy.deepcopy(one)
    batch = next(iter(dm.train_dataloader()))
    halves = [{k: v[i * 2:(i + 1) * 2] for k, v in batch.items()} for i in range(2)]
    for system, parts in ((one, [batch]), (two, halves)):
        reals = [system.real_inputs(p) for p in parts]
        _, opt_d = system.configure_optimizers()
        system.run_phase("d_reg", opt_d, system.D, lambda i: system.loss_d_reg(reals[i]), chunks=len(parts))
    for a, b in zip(one.D.parameters(), two.D.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert _changed(_snapshot(Stage1GAN(cfg).D), one.D)


# ----------------------------------------------------------------------------- training runs


class _Kill(Callback):
    """Simulates a crash at the start of the step after step ``at`` (whose checkpoint was written)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.step_count == self.at:
            raise RuntimeError("simulated kill")


def _fit(path, cfg, run_dir, resume=None, kill_at=None, every_kimg=0.0):
    records = []
    L.seed_everything(0, verbose=False)
    system = Stage1GAN(cfg, metrics_log=records.append)
    callbacks = [KimgCheckpoint(run_dir, every_kimg=every_kimg, keep=0)]
    if kill_at is not None:
        callbacks.append(_Kill(kill_at))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=-1, logger=False, callbacks=callbacks,
                        log_every_n_steps=1, deterministic=True, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, use_distributed_sampler=False, default_root_dir=str(run_dir))
    try:
        trainer.fit(system, datamodule(path), ckpt_path=resume, weights_only=True)
    except RuntimeError as err:
        if "simulated kill" not in str(err):
            raise
    return [r for r in records if r.get("event") == "train"], system


@pytest.mark.slow(seconds=3)
def test_killed_run_resumes_exactly(dataset_path, tmp_path):
    """Kill after step 2 (checkpoint every 8 images = 2 steps), resume: steps 3-5 have the uninterrupted
    run's losses and schedules exactly, and the final weights (G, D, G_ema) are identical."""
    cfg = small_config(max_steps=5)
    full, full_system = _fit(dataset_path, cfg, tmp_path / "full")
    killed, _ = _fit(dataset_path, cfg, tmp_path / "killed", kill_at=2, every_kimg=0.008)
    assert [r["step"] for r in killed] == [1, 2]
    ckpt = tmp_path / "killed" / "step-00000002.ckpt"
    assert ckpt.exists() and not list((tmp_path / "killed").glob("*.tmp"))
    resumed, resumed_system = _fit(dataset_path, cfg, tmp_path / "resumed", resume=str(ckpt))
    assert [r["step"] for r in resumed] == [3, 4, 5]
    for a, b in zip(full[2:], resumed):
        assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}, (a, b)
    for name in ("G", "D", "G_ema"):
        for p, q in zip(getattr(full_system, name).state_dict().values(),
                        getattr(resumed_system, name).state_dict().values()):
            assert torch.equal(p, q), name


def test_nonfinite_loss_skips_the_step_and_aborts_after_a_limit(dataset_path, monkeypatch):
    dm = datamodule(dataset_path)
    dm.setup()
    records = []
    system = Stage1GAN(small_config(optim=OptimConfig(max_nonfinite=2)), conditioning=dm.conditioning,
                       metrics_log=records.append)
    opt_g, _ = system.configure_optimizers()
    before = _snapshot(system.G)
    bad = lambda i: system.loss_g_main(4) * float("nan")  # noqa: E731
    assert system.run_phase("g_main", opt_g, system.G, bad, chunks=1) is None
    assert not _changed(before, system.G)
    assert records[-1]["event"] == "nonfinite" and records[-1]["phase"] == "g_main"
    assert system.run_phase("g_main", opt_g, system.G, lambda i: system.loss_g_main(4), chunks=1) is not None
    assert system.nonfinite_in_row == 0  # a good step resets the count
    system.run_phase("g_main", opt_g, system.G, bad, chunks=1)
    with pytest.raises(UserError, match="2 non-finite losses in a row"):
        system.run_phase("g_main", opt_g, system.G, bad, chunks=1)


def test_checkpoint_of_another_architecture_is_refused(dataset_path, tmp_path):
    records, system = _fit(dataset_path, small_config(max_steps=1), tmp_path / "run")
    last = tmp_path / "run" / "last.ckpt"
    loaded = Stage1GAN.from_checkpoint(last)
    for p, q in zip(loaded.G_ema.parameters(), system.G_ema.parameters()):
        assert torch.equal(p, q)
    assert loaded.step_count == 0  # weights only; step and optimisers belong to resume
    other = small_config()
    other.backbone.decoder_hidden = 16
    with pytest.raises(UserError, match="backbone.decoder_hidden: 32 != 16"):
        from clipportrait.systems.stage1 import load_weights

        load_weights(Stage1GAN(other), load_checkpoint(last), str(last))
    # A pickle that runs code is not loaded (weights_only=True).
    evil = tmp_path / "evil.ckpt"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"clipportrait": Evil(), "state_dict": {}}, evil)
    with pytest.raises(UserError, match="cannot be read safely"):
        load_checkpoint(evil)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_checkpoint_hash_belongs_to_the_loaded_weights(tmp_path, monkeypatch):
    """load_checkpoint_and_hash returns the file's sha256 with its contents, and refuses a checkpoint that
    another process rewrites between the load and the hash (the recorded hash would name other weights)."""
    import hashlib
    import os

    import clipportrait.utils.files as files
    from clipportrait.systems.stage1 import CHECKPOINT_KEY, load_checkpoint_and_hash

    path = tmp_path / "a.ckpt"
    torch.save({CHECKPOINT_KEY: {"config": {}}, "state_dict": {"w": torch.arange(4.0)}}, path)
    checkpoint, digest = load_checkpoint_and_hash(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(checkpoint["state_dict"]["w"], torch.arange(4.0))

    original = files.sha256_file

    def rewritten_meanwhile(p):
        replacement = tmp_path / "b.ckpt"
        torch.save({CHECKPOINT_KEY: {"config": {}}, "state_dict": {"w": torch.ones(4)}}, replacement)
        os.replace(replacement, path)  # a training run saving its checkpoint atomically
        return original(p)

    monkeypatch.setattr(files, "sha256_file", rewritten_meanwhile)
    with pytest.raises(UserError, match=r"a.ckpt changed while it was being read"):
        load_checkpoint_and_hash(path)
