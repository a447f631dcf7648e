"""Stage 2 (paper sec. 3.4-3.5, appendix A): the Jacobian estimators of eq. 20/22 against autograd,
R_norm (eq. 21) by hand, zero-initialised alignment (Stage 2 = Stage 1 at step 0), alpha-drop, what
trains, switching the regularisers off, and checkpoint kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipportrait.data.config import DataConfig, SyntheticConfig
from clipportrait.data.datamodule import ConditioningSampler, PortraitDataModule, PortraitDataset
from clipportrait.data.synthetic import generate_synthetic
from clipportrait.errors import UserError
from clipportrait.losses.jacobian import jacobian_norm_fd, jacobian_norm_jvp, norm_growth_penalty
from clipportrait.nn.alignment import AlignmentConfig, AlignmentNetwork
from clipportrait.systems.stage1 import CHECKPOINT_KEY, Stage1GAN
from clipportrait.systems.stage2 import Stage2GAN

from test_stage1 import RES, small_config

EMBED = 16


# ----------------------------------------------------------------------------- estimators


def small_net(m: int = 6, n: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(m, 12), torch.nn.Tanh(), torch.nn.Linear(12, n)).double()


def exact_frobenius(net, x: torch.Tensor) -> torch.Tensor:
    """|J|_F^2 per row from the full Jacobian (torch.autograd.functional.jacobian), float64."""
    return torch.stack([torch.autograd.functional.jacobian(net, row).square().sum() for row in x])


@pytest.mark.parametrize("estimator", ["finite_difference", "jvp"])
def test_jacobian_estimators_average_to_the_exact_frobenius_norm(estimator):
    """Eq. 20 (small sigma) and eq. 22, averaged over many samples, give |J|_F^2 within 2%."""
    net, x = small_net(), torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = exact_frobenius(net, x)
    repeats = 20000
    xs = x.repeat(repeats, 1)  # rows are independent: one estimate per copy, averaged per original row
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad() if estimator == "finite_difference" else torch.enable_grad():
        if estimator == "finite_difference":
            per_row = jacobian_norm_fd(net, xs, sigma=1e-4, samples=1, generator=gen)
        else:
            per_row = jacobian_norm_jvp(net, xs, samples=1, generator=gen)
    estimate = per_row.reshape(repeats, 3).mean(0)
    assert torch.allclose(estimate, exact, rtol=0.02), (estimate, exact)


def test_finite_difference_is_biased_at_large_sigma_and_exact_for_linear_maps():
    """For a linear f the finite difference equals |J eps|^2 / sigma^2 for any sigma (no Taylor remainder)."""
    lin = torch.nn.Linear(4, 3, bias=True).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    fd = jacobian_norm_fd(lin, x.repeat(20000, 1), sigma=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fd.reshape(20000, 5).mean(0), lin.weight.square().sum().expand(5), rtol=0.03)


def test_jacobian_estimators_are_differentiable():
    """R_r trains the network: both estimators back-propagate into every weight that shapes the Jacobian
    (the output bias does not: no or a zero gradient)."""
    net = small_net()
    x = torch.randn(4, 6, dtype=torch.float64)
    for value in (jacobian_norm_fd(net, x, 0.1, 2), jacobian_norm_jvp(net, x, 2)):
        net.zero_grad()
        value.sum().backward()
        assert all(p.grad.abs().sum() > 0 for p in (net[0].weight, net[0].bias, net[2].weight))
        bias = net[2].bias.grad
        assert bias is None or bias.abs().max() < 1e-9


def test_estimators_refuse_bad_settings():
    net, x = small_net(), torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma"):
        jacobian_norm_fd(net, x, sigma=0.0)
    with pytest.raises(ValueError, match="samples"):
        jacobian_norm_jvp(net, x, samples=0)


def test_norm_growth_penalty_by_hand():
    """R_norm (eq. 21) = (|w_r| - |w|)^2: |(3,4)| = 5 and |(6,8)| = 10 give 25; equal norms give 0."""
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    w_r = torch.tensor([[6.0, 8.0], [0.0, 1.0]])
    assert torch.allclose(norm_growth_penalty(w_r, w), torch.tensor([25.0, 0.0]))


def test_alignment_network_starts_at_zero_and_checks_shapes():
    net = AlignmentNetwork(8, EMBED, AlignmentConfig(hidden=16, blocks=2))
    x, r = torch.randn(3, 8), torch.randn(3, EMBED)
    assert torch.equal(net(x, r), torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"CLIP embedding: expected \(3, 16\)"):
        net(x, torch.randn(3, EMBED + 1))
    # After one gradient step on the output layer the map depends on r.
    net(x, r).sum().backward()
    with torch.no_grad():
        for p in net.output.parameters():
            p -= 0.1 * p.grad
    assert not torch.allclose(net(x, r), net(x, torch.randn(3, EMBED)))


# ----------------------------------------------------------------------------- the system


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic dataset with a CLIP-embedding cache (.npz of unit vectors) and a Stage-1 checkpoint."""
    root = tmp_path_factory.mktemp("s2")
    data = root / "syn"
    generate_synthetic(SyntheticConfig(num_images=12, resolution=RES, workers=1, contact_sheet=False, seed=5), data)
    names = PortraitDataset(data, flip=False).index.names
    emb = np.random.default_rng(0).normal(size=(len(names), EMBED)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.savez(root / "clip.npz", names=np.array(names), embeddings=emb, embeddings_flipped=emb[::-1].copy())
    torch.manual_seed(0)
    stage1 = Stage1GAN(small_config())
    ckpt = root / "stage1.ckpt"
    checkpoint = {"state_dict": stage1.state_dict()}
    stage1.on_save_checkpoint(checkpoint)
    checkpoint[CHECKPOINT_KEY]["images_seen"] = 40
    torch.save(checkpoint, ckpt)
    return {"data": data, "cache": root / "clip.npz", "ckpt": ckpt, "stage1": stage1, "root": root}


def stage2(world, train: str = "all", **regularizer) -> Stage2GAN:
    reg = small_config().regularizer
    for key, value in regularizer.items():
        setattr(reg, key, value)
    dataset = PortraitDataset(world["data"], flip=True, clip_cache=world["cache"])
    return Stage2GAN.from_stage1(world["ckpt"], alignment=AlignmentConfig(hidden=16, blocks=1, embed_dim=EMBED),
                                 train=train, overrides={"regularizer": reg.__dict__},
                                 conditioning=ConditioningSampler(dataset, seed=0))


def test_stage2_at_step_0_renders_exactly_stage1(world):
    """Zero-initialised T_G and T_D (sec. 3.4): with alpha = 1 the images and D's logits are Stage 1's."""
    s1, s2 = world["stage1"].eval(), stage2(world).eval()
    torch.manual_seed(3)
    z, cond = s2.fake_conditioning(3)
    cond["alpha"] = torch.ones(3)
    with torch.no_grad():
        a = s1.generate(z, cond, G=s1.G_ema, noise_mode="const", with_rdr=True)
        b = s2.generate(z, cond, G=s2.G_ema, noise_mode="const", with_rdr=True)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_raw"], b["image_raw"])
        assert torch.equal(s1.discriminate(a["image"], a["image_raw"], a["rdr"], cond),
                           s2.discriminate(a["image"], a["image_raw"], a["rdr"], cond))
    assert s2.cfg.stage1_images == 40 and s2.cfg.stage1_sha256


def test_alpha_is_dropped_with_the_configured_probability(world):
    torch.manual_seed(0)
    assert stage2(world, alpha_drop=0.0).draw_alpha(100).eq(1).all()
    assert stage2(world, alpha_drop=1.0).draw_alpha(100).eq(0).all()
    half = stage2(world, alpha_drop=0.5).draw_alpha(4000).mean().item()
    assert 0.46 < half < 0.54


def test_alpha_scales_the_alignment_direction(world):
    """w_r(alpha) = w + alpha T_G(w, r) (eq. 11): the change is linear in alpha; no embedding = Stage 1."""
    s2 = stage2(world)
    with torch.no_grad():
        for p in s2.G.align.output.parameters():
            p.normal_()
    z, cond = s2.fake_conditioning(2)
    ws = s2.G.mapping(z)
    w1 = s2.align_ws(ws, {**cond, "alpha": 1.0})
    w_half = s2.align_ws(ws, {**cond, "alpha": 0.5})
    assert torch.allclose(w_half - ws, 0.5 * (w1 - ws), atol=1e-6)
    assert torch.equal(s2.align_ws(ws, {"camera": cond["camera"]}), ws)
    with pytest.raises(UserError, match="needs a CLIP embedding"):
        s2.align_ws(ws, {"alpha": 1.0})


def _train(system, steps: int, world):
    dm = PortraitDataModule(DataConfig(kind="folder", path=str(world["data"]), resolution=RES, batch_size=4,
                                       num_workers=0, clip_cache=str(world["cache"])))
    dm.setup("fit")
    opt_g, opt_d = system.configure_optimizers()
    batches = iter(dm.train_dataloader())
    for _ in range(steps):
        system.train_step(next(batches), opt_g, opt_d)


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module) -> set[str]:
    """Top-level child names (``align``, ``backbone``, ``mapping`` ...) with a parameter that moved."""
    return {k.split(".")[0] for k, v in module.named_parameters() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("train", ["alignment", "all"])
def test_what_trains_is_configurable(world, train):
    """train=alignment moves T_G and T_D only, in G, D and G_ema (whose backbone stays Stage 1's EMA
    weights instead of drifting towards G's); train=all moves the backbones too."""
    s2 = stage2(world, train=train)
    with torch.no_grad():  # after Stage-1 training G_ema is not G
        for name, p in s2.G_ema.named_parameters():
            if not name.startswith("align."):
                p.add_(0.01 * torch.randn_like(p))
    before = {name: _snapshot(getattr(s2, name)) for name in ("G", "D", "G_ema")}
    torch.manual_seed(0)
    _train(s2, 2, world)
    moved = {name: _changed(before[name], getattr(s2, name)) for name in before}
    if train == "alignment":
        assert moved == {"G": {"align"}, "D": {"align"}, "G_ema": {"align"}}
    else:
        assert {"align", "backbone"} <= moved["G"] and {"align", "blocks"} <= moved["D"]
        assert {"align", "backbone"} <= moved["G_ema"]
    history = s2._history
    assert "reg/jacobian" in history and "reg/norm" in history


@pytest.mark.parametrize("estimator", ["finite_difference", "jvp"])
def test_regularisers_are_float32_under_autocast(world, estimator):
    """R_r and R_norm are computed in float32 inside bf16 autocast (Lightning's bf16-mixed): the same
    values as without autocast, where bf16 would make eq. 20's difference mostly rounding error."""
    s2 = stage2(world, jacobian_estimator=estimator)
    with torch.no_grad():
        for p in s2.G.align.output.parameters():
            p.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(0)
    w, r = torch.randn(4, s2.G.mapping.w_dim, generator=gen), torch.randn(4, EMBED, generator=gen)
    torch.manual_seed(1)
    plain = s2.alignment_regularizers(w, r)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = s2.alignment_regularizers(w.bfloat16(), r)
    assert plain.keys() == mixed.keys() == {"jacobian", "norm"}
    for key in plain:
        assert mixed[key].dtype == torch.float32
        assert torch.allclose(mixed[key], plain[key], rtol=1e-2), (key, mixed[key], plain[key])


def test_each_regulariser_switches_off_by_its_weight(world):
    torch.manual_seed(0)
    s2 = stage2(world, train="alignment", jacobian_weight=0.0, norm_weight=0.0)
    _train(s2, 1, world)
    assert "reg/jacobian" not in s2._history and "reg/norm" not in s2._history
    s2 = stage2(world, train="alignment", jacobian_estimator="jvp")
    _train(s2, 1, world)
    assert torch.isfinite(torch.stack(s2._history["reg/jacobian"])).all()


def test_stage2_needs_an_embedding_cache(world):
    dataset = PortraitDataset(world["data"], flip=False)
    s2 = Stage2GAN.from_stage1(world["ckpt"], alignment=AlignmentConfig(hidden=16, blocks=1, embed_dim=EMBED),
                               conditioning=ConditioningSampler(dataset, seed=0))
    with pytest.raises(UserError, match="data.clip_cache"):
        s2.fake_conditioning(2)


def test_checkpoint_kinds_are_told_apart(world, tmp_path):
    s2 = stage2(world)
    checkpoint = {"state_dict": s2.state_dict()}
    s2.on_save_checkpoint(checkpoint)
    path = tmp_path / "s2.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="holds a Stage2GAN"):
        Stage1GAN.from_checkpoint(path)
    with pytest.raises(UserError, match="starts from a Stage-1 checkpoint"):
        Stage2GAN.from_stage1(path, alignment=AlignmentConfig(embed_dim=EMBED))
    loaded = Stage2GAN.from_checkpoint(path)
    assert loaded.cfg.alignment.hidden == 16 and loaded.cfg.stage1_sha256 == s2.cfg.stage1_sha256
    for key, value in s2.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Another architecture is refused with the differing keys named.
    other = small_config()
    other.backbone.w_dim = other.backbone.w_dim * 2
    with pytest.raises(UserError, match="backbone.w_dim"):
        Stage2GAN.from_stage1(world["ckpt"], alignment=AlignmentConfig(embed_dim=EMBED), expect=other)


def test_embedding_collapse_measures_how_much_of_w_survives_t_g(world):
    """At step 0 (T_G = 0) w_r = w: retention 1 and the alpha = 1 images equal the alpha = 0 ones, so
    both diversities agree; a T_G that maps every w to one point per r (w_r = c(r), the collapse of
    sec. 3.5) gives retention 0 and zero image diversity at alpha = 1; a dataset without a cache is
    refused."""
    from clipportrait.metrics.lpips import build_lpips
    from clipportrait.metrics.stage2 import embedding_collapse

    system = stage2(world).eval()
    dataset = PortraitDataset(world["data"], flip=False, clip_cache=world["cache"])
    lpips = build_lpips("alex")
    start = embedding_collapse(system, dataset, rows=2, samples=3, lpips=lpips)
    assert start["w_retention"] == pytest.approx(1.0, abs=1e-6)
    assert start["diversity_alpha1"] == pytest.approx(start["diversity_alpha0"], abs=1e-6)
    assert start["diversity_alpha0"] > 0.01

    class Collapsing(torch.nn.Module):  # T_G(w, r) = 3 r_0 - w  =>  w_r = 3 r_0 in every channel
        def forward(self, w, r):
            return 3 * r[:, :1] - w

    system.G_ema.align = Collapsing()
    collapsed = embedding_collapse(system, dataset, rows=2, samples=3, lpips=lpips)
    assert collapsed["w_retention"] == pytest.approx(0.0, abs=1e-5)
    assert collapsed["diversity_alpha1"] < 1e-4 < collapsed["diversity_alpha0"]
    with pytest.raises(ValueError, match="no CLIP cache"):
        embedding_collapse(system, PortraitDataset(world["data"], flip=False), rows=1, samples=2)


def test_regularisers_train_t_g_and_not_the_mapping(world):
    """R_r and R_norm constrain how T_G derives w_r from w: their gradient reaches T_G's weights and
    not w (so not the mapping network that made w, which trains with train=all)."""
    s2 = stage2(world)
    with torch.no_grad():
        for p in s2.G.align.output.parameters():
            p.normal_(0, 0.5)
    w = torch.randn(3, s2.G.mapping.w_dim, requires_grad=True)
    terms = s2.alignment_regularizers(w, torch.randn(3, EMBED))
    sum(t.sum() for t in terms.values()).backward()
    assert w.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s2.G.align.input.parameters())
