"""Generator G and discriminator D (clipportrait.nn): shapes, deformation hook, gradients,
EG3D parameter counts, bf16 stability, super-resolution and D's u/v factorisation (eq. 12-15)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from clipportrait.geometry.cameras import neutral_labels, ray_bundle, sample_ffhq_like
from clipportrait.nn import BackboneConfig, DiscriminatorConfig, build_discriminator, build_generator, preset
from clipportrait.nn.discriminator import gaussian_blur
from clipportrait.nn.layers import fir_filter, upsample2d


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    g_cfg, d_cfg = preset("tiny")
    return g_cfg, d_cfg, build_generator(g_cfg).eval(), build_discriminator(d_cfg, g_cfg)


def _labels(batch: int) -> torch.Tensor:
    return sample_ffhq_like(batch, generator=torch.Generator().manual_seed(1))


def test_generator_and_discriminator_output_shapes_and_dtypes(tiny):
    """G returns image (B,3,64,64), image_raw (B,3,32,32), depth/alpha (B,1,32,32) and features
    (B,16,32,32), all finite float32 with depth inside [ray_start, ray_end + spacing] and alpha in
    [0, 1]; D returns logits (B,1) and, with return_uv, u and v of cmap_dim."""
    g_cfg, d_cfg, G, D = tiny
    out = G(torch.randn(2, g_cfg.z_dim), _labels(2), noise_mode="const")
    r, res = g_cfg.neural_rendering_resolution, g_cfg.img_resolution
    want = {"image": (2, 3, res, res), "image_raw": (2, 3, r, r), "image_depth": (2, 1, r, r),
            "image_alpha": (2, 1, r, r), "feature_image": (2, g_cfg.decoder_features, r, r),
            "ws": (2, G.num_ws, g_cfg.w_dim)}
    for key, shape in want.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all(), key
    spacing = (g_cfg.ray_end - g_cfg.ray_start) / (g_cfg.depth_samples - 1)
    assert out["image_depth"].min() >= g_cfg.ray_start and out["image_depth"].max() <= g_cfg.ray_end + spacing
    assert 0 <= out["image_alpha"].min() and out["image_alpha"].max() <= 1
    torch.testing.assert_close(out["image_raw"], out["feature_image"][:, :3])
    rdr = torch.rand(2, d_cfg.rdr_channels, res, res)
    logits, u, v = D(out["image"], out["image_raw"], rdr, _labels(2), return_uv=True)
    assert logits.shape == (2, 1) and u.shape == v.shape == (2, D.cmap_dim)


def test_generator_has_no_pose_conditioning(tiny):
    """M_G takes z only (paper sec. 3.2): there is no camera embedding and the tri-plane for a
    fixed w does not depend on the camera label."""
    g_cfg, _, G, _ = tiny
    assert G.mapping.embed is None and G.mapping.c_dim == 0
    ws = G.mapping(torch.randn(1, g_cfg.z_dim))
    torch.testing.assert_close(G.planes(ws, "const"), G.planes(ws, "const"))


def test_identity_deformer_matches_no_deformer_and_translation_matches_shifted_rays(tiny):
    """Every sample point goes through the deformer (eq. 4): the identity gives the very same
    render; D(x) = x + t gives the render of rays whose origins are shifted by t."""
    g_cfg, _, G, _ = tiny
    torch.manual_seed(3)
    ws = G.mapping(torch.randn(2, g_cfg.z_dim))
    origins, dirs = ray_bundle(_labels(2), g_cfg.neural_rendering_resolution)
    plain = G.render(ws, origins, dirs, None, noise_mode="const", perturb=False)
    seen = []

    def identity(p):
        seen.append(p.shape[1])
        return p.clone()

    ident = G.render(ws, origins, dirs, identity, noise_mode="const", perturb=False)
    for key in plain:
        torch.testing.assert_close(ident[key], plain[key], atol=0, rtol=0)
    rays = origins.shape[1]
    assert seen == [rays * g_cfg.depth_samples, rays * g_cfg.importance_samples]  # coarse and importance
    shift = torch.tensor([0.05, -0.03, 0.02])
    moved = G.render(ws, origins, dirs, lambda p: p + shift, noise_mode="const", perturb=False)
    shifted = G.render(ws, origins + shift, dirs, None, noise_mode="const", perturb=False)
    for key in ("image_raw", "image_depth", "image_alpha"):
        torch.testing.assert_close(moved[key], shifted[key], atol=1e-4, rtol=1e-4)
    assert (moved["image_raw"] - plain["image_raw"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="deformer"):
        G.render(ws, origins, dirs, lambda p: p[:, :10], noise_mode="const", perturb=False)


def test_coarse_points_mapped_beforehand_give_the_same_render(tiny):
    """The coarse pass's points mapped ahead of the render (``coarse_points``, what an inference render
    queues beside the tri-plane synthesis) give the very render of mapping them inside it; the
    deformer then sees only the importance pass. Perturbed depths or a wrong shape are refused."""
    g_cfg, _, G, _ = tiny
    torch.manual_seed(4)
    ws = G.mapping(torch.randn(2, g_cfg.z_dim))
    origins, dirs = ray_bundle(_labels(2), g_cfg.neural_rendering_resolution)
    shift = torch.tensor([0.05, -0.03, 0.02])
    seen = []

    def deformer(p):
        seen.append(p.shape[1])
        return p * 0.9 + shift

    inside = G.render(ws, origins, dirs, deformer, noise_mode="const", perturb=False)
    coarse = G.coarse_points(origins, dirs, deformer)
    seen.clear()
    ahead = G.render(ws, origins, dirs, deformer, noise_mode="const", perturb=False, coarse_mapped=coarse)
    for key in inside:
        torch.testing.assert_close(ahead[key], inside[key], atol=0, rtol=0)
    assert seen == [origins.shape[1] * g_cfg.importance_samples]
    with pytest.raises(ValueError, match="coarse_mapped"):
        G.render(ws, origins, dirs, deformer, noise_mode="const", perturb=True, coarse_mapped=coarse)
    with pytest.raises(ValueError, match="coarse_mapped"):
        G.render(ws, origins, dirs, deformer, noise_mode="const", perturb=False, coarse_mapped=coarse[:, 1:])


def test_surface_field_deformation_with_equal_meshes_is_identity(tiny):
    """Bound to the procedural head's simplified mesh with observation == canonical, the real
    SurfaceFieldDeformation (eq. 5) leaves the render unchanged (to float tolerance)."""
    import functools

    from clipportrait.geometry.deformation import SurfaceFieldDeformation
    from clipportrait.geometry.morphable.config import MorphableConfig, build_morphable

    g_cfg, _, G, _ = tiny
    head = build_morphable(MorphableConfig(target_faces_simplified=300))
    verts = head.simplify(head.canonical_vertices(1))
    deformation = SurfaceFieldDeformation(head.simplified_faces)
    deformer = functools.partial(deformation, obs_verts=verts, canon_verts=verts)
    ws = G.mapping(torch.randn(1, g_cfg.z_dim))
    origins, dirs = ray_bundle(neutral_labels(1), 16)
    plain = G.render(ws, origins, dirs, None, noise_mode="const", perturb=False)
    deformed = G.render(ws, origins, dirs, deformer, noise_mode="const", perturb=False)
    torch.testing.assert_close(deformed["image_raw"], plain["image_raw"], atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_parameter_of_g_and_d(tiny):
    """A non-saturating loss through D(G(z)) gives every G and D parameter a finite, non-zero
    gradient (nothing is disconnected: mapping, tri-plane synthesis incl. noise strengths,
    decoder, super-resolution, D stem, epilogue and camera mapping M_D)."""
    g_cfg, d_cfg, G, D = tiny
    G.train()
    try:
        torch.manual_seed(4)
        out = G(torch.randn(2, g_cfg.z_dim), _labels(2))
        rdr = torch.rand(2, d_cfg.rdr_channels, g_cfg.img_resolution, g_cfg.img_resolution)
        loss = torch.nn.functional.softplus(-D(out["image"], out["image_raw"], rdr, _labels(2))).sum()
        G.zero_grad(set_to_none=True)
        D.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        G.eval()
    for net_name, net in (("G", G), ("D", D)):
        for name, p in net.named_parameters():
            assert p.grad is not None, f"{net_name}.{name} got no gradient"
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{net_name}.{name}"


def _fc(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def _conv(i: int, o: int, k: int, bias: bool = True) -> int:
    return i * o * k * k + (o if bias else 0)


def _eg3d_generator_params() -> int:
    """EG3D FFHQ-512 generator (TriPlaneGenerator) counted layer by layer from its architecture,
    without the mapping's camera embedding (no generator pose conditioning)."""
    w = 512
    ch = lambda res: min(32768 // res, 512)  # noqa: E731
    synth_layer = lambda i, o: _fc(w, i) + _conv(i, o, 3) + 1  # noqa: E731  affine, weight+bias, noise strength
    torgb = lambda i, o: _fc(w, i) + _conv(i, o, 1)  # noqa: E731
    n = 2 * _fc(512, 512)  # mapping: 2 layers z(512) -> 512 -> 512
    for res in (4, 8, 16, 32, 64, 128, 256):  # StyleGAN2 backbone, 96 = 3 x 32 tri-plane channels
        if res == 4:
            n += ch(4) * 4 * 4 + synth_layer(ch(4), ch(4)) + torgb(ch(4), 96)
        else:
            n += synth_layer(ch(res // 2), ch(res)) + synth_layer(ch(res), ch(res)) + torgb(ch(res), 96)
    n += _fc(32, 64) + _fc(64, 1 + 32)  # OSGDecoder
    for i, o in ((32, 256), (256, 128)):  # SuperresolutionHybrid8XDC blocks at 256 and 512
        n += synth_layer(i, o) + synth_layer(o, o) + torgb(o, 3)
    return n


def _eg3d_discriminator_params(img_channels: int) -> int:
    """EG3D DualDiscriminator (ResNet, 512^2, cmap 512, mbstd 1 channel, 8-layer c mapping)."""
    ch = lambda res: min(32768 // res, 512)  # noqa: E731
    n = _conv(img_channels, ch(512), 1)  # fromRGB
    for res in (512, 256, 128, 64, 32, 16, 8):
        n += _conv(ch(res), ch(res), 3) + _conv(ch(res), ch(res // 2), 3) + _conv(ch(res), ch(res // 2), 1, bias=False)
    n += _conv(ch(4) + 1, ch(4), 3) + _fc(ch(4) * 16, ch(4)) + _fc(ch(4), 512)  # epilogue
    n += _fc(25, 512) + 8 * _fc(512, 512)  # mapping of the 25-d camera label
    return n


def test_eg3d_512_parameter_counts_match_eg3d():
    """eg3d_512 G and D parameter counts are within 5% of EG3D's architecture counted by hand
    (G: ~29.6M without pose conditioning; D with [img, raw] = 6 channels vs ours 6 + 4 rdr)."""
    g_cfg, d_cfg = preset("eg3d_512")
    G = build_generator(g_cfg)
    D = build_discriminator(d_cfg, g_cfg)
    ours_g = sum(p.numel() for p in G.parameters())
    ours_d = sum(p.numel() for p in D.parameters())
    ref_g, ref_d = _eg3d_generator_params(), _eg3d_discriminator_params(6)
    print(f"params: G ours {ours_g:,} EG3D {ref_g:,}; D ours {ours_d:,} EG3D {ref_d:,}")
    assert abs(ours_g - ref_g) / ref_g < 0.05
    assert abs(ours_d - ref_d) / ref_d < 0.05
    assert G.num_ws == 14 and G.cfg.triplane_resolution == 256 and G.cfg.triplane_channels == 32


def test_bf16_autocast_on_cpu_has_no_nans_and_small_error(tiny):
    """Under CPU bf16 autocast the tiny G and D produce finite outputs close to float32 ones
    (mapping, compositing and demodulation stay float32; truncation works with bf16 around)."""
    g_cfg, d_cfg, G, D = tiny
    torch.manual_seed(5)
    z, c = torch.randn(2, g_cfg.z_dim), _labels(2)
    ref = G(z, c, noise_mode="const", truncation_psi=0.7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = G(z, c, noise_mode="const", truncation_psi=0.7)
        assert out["ws"].dtype == torch.float32
        rdr = torch.rand(2, d_cfg.rdr_channels, g_cfg.img_resolution, g_cfg.img_resolution)
        logits = D(out["image"], out["image_raw"], rdr, c)
    for key in ("image", "image_raw", "image_depth", "image_alpha"):
        assert torch.isfinite(out[key]).all(), key
        assert (out[key].float() - ref[key]).abs().mean() < 0.05, key
    assert torch.isfinite(logits).all()


def test_superresolution_without_learned_detail_is_fir_upsampled_raw(tiny):
    """With the SR toRGB weights and biases zeroed, the output is the raw image FIR-upsampled by
    2 per block (EG3D's hybrid design: learned detail is added to the upsampled raw render)."""
    g_cfg, _, G, _ = tiny
    sr = G.superresolution
    saved = {k: v.clone() for k, v in sr.state_dict().items()}
    try:
        with torch.no_grad():
            for block in sr.blocks:
                block.torgb.weight.zero_()
                block.torgb.bias.zero_()
        r = g_cfg.neural_rendering_resolution
        rgb, feats = torch.randn(2, 3, r, r), torch.randn(2, g_cfg.decoder_features, r, r)
        out = sr(rgb, feats, torch.randn(2, g_cfg.w_dim), noise_mode="const")
        torch.testing.assert_close(out, upsample2d(rgb, fir_filter()))
    finally:
        sr.load_state_dict(saved)


def test_discriminator_uv_factorisation_and_rdr_options(tiny):
    """D = <u, v> / sqrt(cmap_dim) (eq. 15) with u from the stem only (eq. 12) and v from the
    camera only (eq. 13); rdr_channels=0 works without a render; a wrong rdr shape is rejected."""
    g_cfg, d_cfg, _, D = tiny
    res = g_cfg.img_resolution
    img, raw = torch.randn(4, 3, res, res), torch.randn(4, 3, 32, 32)
    rdr, c = torch.rand(4, 4, res, res), _labels(4)
    logits, u, v = D(img, raw, rdr, c, return_uv=True)
    torch.testing.assert_close(logits, (u * v).sum(1, keepdim=True) / math.sqrt(D.cmap_dim))
    torch.testing.assert_close(D.stem(img, raw, rdr), u)
    torch.testing.assert_close(D.camera_embedding(_labels(4).flip(0)), v.flip(0))
    assert (D.stem(img, raw, torch.zeros_like(rdr)) - u).abs().max() > 0  # the mesh render matters
    with pytest.raises(ValueError, match="rdr"):
        D(img, raw, rdr[:, :3], c)
    d0 = build_discriminator(DiscriminatorConfig(**{**vars(d_cfg), "rdr_channels": 0}), g_cfg)
    assert d0(img, raw, None, c).shape == (4, 1)


def test_gaussian_blur_kernel_and_blur_changes_d_input():
    """The fade-in blur uses taps 2^(-(k/sigma)^2) for |k| <= 3 sigma normalised to 1: a delta
    image becomes the outer product of those taps; sigma=0 is the identity."""
    x = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    x[0, 0, 7, 7] = 1
    sigma = 1.5
    k = torch.arange(-4, 5, dtype=torch.float64)
    taps = torch.exp2(-(k / sigma) ** 2)
    taps = taps / taps.sum()
    got = gaussian_blur(x, sigma)
    torch.testing.assert_close(got[0, 0, 3:12, 3:12], taps[:, None] * taps[None, :])
    assert gaussian_blur(x, 0.0) is x


def test_configs_are_structured_and_validated():
    """Configs load as OmegaConf structured configs (Hydra); overrides apply per field; an
    inconsistent super-resolution chain or unknown override key raises a ValueError naming it."""
    g_cfg, d_cfg = preset("tiny", depth_samples=8, d_rdr_channels=0)
    assert g_cfg.depth_samples == 8 and d_cfg.rdr_channels == 0
    assert preset("tiny")[0].depth_samples == 16  # presets are not mutated
    schema = OmegaConf.structured(BackboneConfig)
    assert OmegaConf.to_object(OmegaConf.merge(schema, {"sr_channels": [64]})).sr_channels == [64]
    OmegaConf.structured(DiscriminatorConfig)
    with pytest.raises(ValueError, match="img_resolution"):
        preset("tiny", img_resolution=128)
    with pytest.raises(ValueError, match="not_a_field"):
        preset("tiny", not_a_field=1)
    with pytest.raises(ValueError, match="preset"):
        preset("eg3d_1024")


def test_render_and_discriminator_trace_as_single_graphs():
    """torch.compile(fullgraph=True) traces mapping + render (with importance sampling) and D
    without graph breaks: no data-dependent Python control flow or host syncs in the hot paths."""
    g_cfg, d_cfg = preset("tiny", neural_rendering_resolution=8, depth_samples=4, importance_samples=4)
    torch.manual_seed(0)
    G, D = build_generator(g_cfg).eval(), build_discriminator(d_cfg, g_cfg)
    origins, dirs = ray_bundle(_labels(2), 8)
    z = torch.randn(2, g_cfg.z_dim)
    render = torch.compile(lambda z, o, d: G.render(G.mapping(z), o, d, perturb=True)["image"],
                           backend="eager", fullgraph=True)
    image = render(z, origins, dirs)
    assert image.shape == (2, 3, 64, 64)
    disc = torch.compile(D, backend="eager", fullgraph=True)
    assert disc(image, torch.randn(2, 3, 8, 8), torch.rand(2, 4, 64, 64), _labels(2)).shape == (2, 1)
