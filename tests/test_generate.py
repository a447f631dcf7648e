"""task=generate on a toy Stage-2 checkpoint (tests/chain.py): every output with its shape, the
alpha = 0 path equal to Stage 1's unconditional render, camera presets and expression presets that
do what their names say, the modality-gap offset against a hand computation, and every validation
error naming the key, the value and what was expected."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from chain import build_chain, compose
from clipportrait.errors import UserError
from clipportrait.generation.modality_gap import ModalityGap
from clipportrait.generation.morphable import EXPRESSION_PRESETS, preset_parameters, resolve_morphable
from clipportrait.generation.pipeline import TextToPortrait, latent
from clipportrait.generation.prompts import gather_prompts, token_count, validate_prompts
from clipportrait.generation.views import CAMERA_PRESETS, labels_yaw_pitch, resolve_view, view_labels
from clipportrait.geometry.cameras import neutral_labels
from clipportrait.systems.stage2 import Stage2GAN
from clipportrait.tasks import generate
from clipportrait.tasks.base import RunContext

PROMPTS = ["a person with long red hair", "a person with blue eyes and dark skin"]
SEEDS = [0, 5]
SWEEP = [0.0, 0.5, 1.0]
FRAMES = 4


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return build_chain(tmp_path_factory.mktemp("chain"))


def generate_args(chain, *extra: str) -> list[str]:
    prompts = ",".join(f"'{p}'" for p in PROMPTS)
    return ["task=generate", f"task.checkpoint={chain['stage2']}", f"task.prompts=[{prompts}]",
            f"task.seeds=[{','.join(map(str, SEEDS))}]", f"task.alpha_sweep=[{','.join(map(str, SWEEP))}]",
            f"task.turntable_frames={FRAMES}", *extra]


@pytest.fixture(scope="module")
def generated(chain, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("generate")
    result = generate.run(compose(chain["root"], *generate_args(chain, "task.modality_gap=mean_offset")),
                          RunContext(run_dir=run_dir))
    return run_dir, result


@pytest.fixture(scope="module")
def system(chain):
    return Stage2GAN.from_checkpoint(chain["stage2"]).eval()


@pytest.fixture(scope="module")
def deforming(chain):
    """The chain's Stage-2 system with the surface-field deformation on (it adds no weights): without it
    the morphable parameters change nothing in the render, so a test could not see them."""
    from clipportrait.systems.stage1 import CHECKPOINT_KEY, load_checkpoint

    checkpoint = load_checkpoint(chain["stage2"])
    deformed = Stage2GAN.from_config_dict(checkpoint[CHECKPOINT_KEY]["config"], {"deformation": {"enabled": True}})
    deformed.load_state_dict(checkpoint["state_dict"])
    return deformed.eval()


def other_morphables(chain, model) -> list:
    """Two morphable choices for SEEDS unlike each other: dataset rows (one per seed, rows unlike each
    other) and explicit expression and shape vectors."""
    return [resolve_morphable(model, SEEDS, "from_dataset", dataset_path=str(chain["root"] / "syn")),
            resolve_morphable(model, SEEDS, expression_vector=[0.8] * model.n_expr, shape_vector=[0.5] * model.n_shape)]


def test_explicit_morphable_vectors_are_checked(system, caplog):
    """An explicit expression or shape vector with a non-finite value is refused naming the key and the
    index; one with coefficients beyond 3 standard deviations is used, with a warning naming the key."""
    import logging

    model = system.geometry.morphable
    values = [0.1] * model.n_expr
    values[4] = float("nan")
    with pytest.raises(UserError, match=r"task.expression_vector: non-finite value at index 4"):
        resolve_morphable(model, SEEDS, expression_vector=values)
    far = [0.0] * model.n_shape
    far[7] = -4.5
    with caplog.at_level(logging.WARNING, logger="clipportrait.generation.morphable"):
        choice = resolve_morphable(model, SEEDS, shape_vector=far)
    assert float(choice.shape[0, 7]) == -4.5
    assert "task.shape_vector: 1 coefficient(s) beyond +-3 standard deviations (index 7: -4.5)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clipportrait.generation.morphable"):
        resolve_morphable(model, SEEDS, shape_vector=[2.9] * model.n_shape)
    assert "standard deviations" not in caplog.text


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_writes_every_output_with_the_right_shape(chain, generated):
    run_dir, result = generated
    R, r, P, S = 32, 16, len(PROMPTS), len(SEEDS)  # tests/chain.py: 32^2 images, 16^2 neural render
    assert png(run_dir / "grid.png").shape == (P * R, S * R, 3)  # rows prompts, columns seeds
    depth = png(run_dir / "depth.png")
    assert depth.shape == (P * r, S * r) and depth.max() > depth.min()
    assert len(result["alpha_sweep"]) == P and len(result["turntable"]) == P
    for path in result["alpha_sweep"]:
        assert png(path).shape == (S * R, len(SWEEP) * R, 3)  # rows seeds, columns alpha
    import imageio.v2 as imageio

    for path in result["turntable"]:
        with imageio.get_reader(path) as reader:
            frames = [frame for frame in reader]
        assert len(frames) == FRAMES and frames[0].shape == (R, S * R, 3)
    record = json.loads((run_dir / "generate.json").read_text())
    protocol = record["protocol"]
    assert protocol["prompts"] == PROMPTS and protocol["seeds"] == SEEDS and protocol["alpha_sweep"] == SWEEP
    assert protocol["lvlm"]["check"] == "matched"  # the cache's manifest names the same random-weight CLIP
    assert protocol["checkpoint"]["clip_cache"] == str(chain["cache"])
    assert len(protocol["checkpoint"]["sha256"]) == 64
    assert protocol["camera"] == {"preset": "frontal", "yaw_deg": 0.0, "pitch_deg": 0.0}
    assert protocol["modality_gap"]["mode"] == "mean_offset" and protocol["modality_gap"]["offset_norm"] > 0
    # psi = 0.7 on a two-step checkpoint: its tracked w_avg is far from the mean w, the sampled mean is used
    assert protocol["truncation_psi"] == 0.7
    assert protocol["truncation_centre"]["centre"].startswith("sampled mean")
    latency = record["latency_ms"]
    # grid + alpha sweep + turntable frames, every one of them for each prompt and seed
    assert latency["images_generated"] == P * S * (1 + len(SWEEP) + FRAMES)
    # one encode call (a first call), many renders of one batch size: the first one reported apart
    assert latency["text_encoding_per_prompt"] is None and latency["text_encoding_first_call_per_prompt"] > 0
    assert latency["generation_per_image"] > 0 and latency["generation_first_call_per_image"] > 0


def test_alpha_zero_is_the_unconditional_stage1_portrait(chain, generated, system):
    """At alpha = 0, T_G is ignored (eq. 11): the render equals Stage 1's w -> synthesis path for any
    prompt, while alpha = 1 moves it (the two training steps made T_G non-zero)."""
    run_dir, result = generated
    R = 32
    sweeps = [png(path) for path in result["alpha_sweep"]]
    assert np.array_equal(sweeps[0][:, :R], sweeps[1][:, :R])  # alpha = 0 column: same for both prompts
    assert not np.array_equal(sweeps[0][:, -R:], sweeps[1][:, -R:])  # alpha = 1 column: the prompt matters

    from clipportrait.lvlm import build_clip

    cfg = compose(chain["root"], *generate_args(chain))
    engine = TextToPortrait(system, build_clip(cfg.lvlm), truncation_psi=0.7)
    text = engine.encode(PROMPTS[:1]).expand(len(SEEDS), -1)
    cond = {"camera": neutral_labels(len(SEEDS)), **resolve_morphable(system.geometry.morphable, SEEDS).rows([0, 1])}
    at_zero = engine.render(SEEDS, cond, text, 0.0)["image"]
    at_one = engine.render(SEEDS, cond, text, 1.0)["image"]
    with torch.no_grad():
        z = torch.stack([latent(s, system.cfg.backbone.z_dim) for s in SEEDS])
        ws = system.G_ema.mapping(z, truncation_psi=0.7)  # Stage 1: no alignment network
        stage1 = system.synthesize(ws, cond, G=system.G_ema, noise_mode="const")["image"]
    assert torch.equal(at_zero, stage1)
    assert (at_one - stage1).abs().max() > 1e-4


def test_the_cuda_graph_switch_changes_nothing_on_a_cpu(chain, deforming):
    """task.cuda_graphs applies to CUDA only: on a CPU the engine computes exactly what it does without,
    call after call with other morphable parameters (which change the render: the deformation is on)."""
    from clipportrait.lvlm import build_clip

    clip = build_clip(compose(chain["root"], *generate_args(chain)).lvlm)
    plain, switched = (TextToPortrait(deforming, clip, truncation_psi=0.7, cuda_graphs=g) for g in (False, True))
    images = []
    for morph in other_morphables(chain, deforming.geometry.morphable):
        cond = {"camera": view_labels(20.0, 0.0).expand(2, -1), **morph.rows([0, 1])}
        a = plain.render(SEEDS, cond, plain.encode(PROMPTS), 0.5)["image"]
        b = switched.render(SEEDS, cond, switched.encode(PROMPTS), 0.5)["image"]
        assert torch.equal(a, b) and not switched.graphs_used()
        # prompt -> portrait in one call: the same embeddings and images as encode, then render
        one_call = switched.portraits(PROMPTS, SEEDS, cond, 0.5)
        assert torch.equal(one_call["image"], a) and torch.equal(one_call["embedding"], plain.encode(PROMPTS))
        images.append(a)
    assert (images[0] - images[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one prompt per seed"):
        plain.portraits(PROMPTS[:1], SEEDS, cond, 0.5)
    with pytest.raises(UserError, match="alpha > 0 needs a CLIP embedding"):
        plain.render(SEEDS, cond, None, 0.5)


def test_the_engine_refuses_row_counts_unlike_the_seeds(chain, system):
    """Every conditioning input, alpha and the text embedding of a render need one row per seed: another
    count is refused up front naming the input and both counts (not deep inside the render)."""
    from clipportrait.lvlm import build_clip

    engine = TextToPortrait(system, build_clip(compose(chain["root"], *generate_args(chain)).lvlm), truncation_psi=0.7)
    text = engine.encode(PROMPTS)
    morph = resolve_morphable(system.geometry.morphable, SEEDS)
    cond = {"camera": neutral_labels(2), **morph.rows([0, 1])}
    wrong = {"conditioning camera: 1 rows for 2 seeds": ({**cond, "camera": neutral_labels(1)}, text, 1.0),
             "conditioning expression: 1 rows for 2 seeds": ({**cond, "expression": cond["expression"][:1]}, text, 1.0),
             "conditioning flip: 3 rows for 2 seeds": ({**cond, "flip": torch.zeros(3, dtype=torch.bool)}, text, 1.0),
             "alpha: 3 values for 2 seeds": (cond, text, torch.ones(3)),
             "embedding: 1 rows for 2 seeds": (cond, text[:1], 1.0)}
    for message, (bad_cond, embedding, alpha) in wrong.items():
        with pytest.raises(ValueError, match=_literal(message)):
            engine.render(SEEDS, bad_cond, embedding, alpha)
    with pytest.raises(ValueError, match=_literal("conditioning camera: 1 rows for 2 seeds")):
        engine.portraits(PROMPTS, SEEDS, {**cond, "camera": neutral_labels(1)}, 1.0)
    assert engine.render(SEEDS, cond, text, torch.tensor([1.0, 0.5]))["image"].shape[0] == 2  # one alpha per seed


def test_latency_reports_first_calls_apart(chain, system):
    """The first call of an input signature (batch size) holds CUDA-graph capture, warm-up runs or
    torch.compile's compilation: it is counted under <stage>_first_call, and the stage's per-image
    latency covers the later (warm) calls only. Here the first render is made 1 s slower."""
    from clipportrait.lvlm import build_clip

    engine = TextToPortrait(system, build_clip(compose(chain["root"], *generate_args(chain)).lvlm), truncation_psi=0.7)
    graphed = engine._graphs["portrait"]
    plain, calls = graphed.fn, []

    def slow_first(*inputs):  # stands in for a capture or a compilation
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return plain(*inputs)

    graphed.fn = slow_first
    text = engine.encode(PROMPTS)
    engine.encode(PROMPTS[::-1])
    cond = {"camera": neutral_labels(2), **resolve_morphable(system.geometry.morphable, SEEDS).rows([0, 1])}
    for _ in range(3):  # batch 2: one first call, two warm ones
        engine.render(SEEDS, cond, text, 1.0)
    engine.render(SEEDS[:1], {k: v[:1] for k, v in cond.items()}, text[:1], 1.0)  # batch 1: a first call
    assert engine.latency.items == {"text_encoding_first_call": 2, "text_encoding": 2,
                                    "generation_first_call": 3, "generation": 4}
    latency = engine.latency.per_item_ms()
    assert latency["generation_first_call"] > 1000 / 3 and latency["generation"] < 250


def test_a_text_copy_is_the_text_tower_alone_in_its_own_dtype(chain):
    """ClipEncoder.text_copy: the model without its image tower, cast, detached from later weight
    changes; its embeddings match the model's to the cast's precision (the engine's bf16 text tower)."""
    from clipportrait.lvlm import build_clip

    clip = build_clip(compose(chain["root"], *generate_args(chain)).lvlm)
    tokens = clip.tokenize(PROMPTS)
    copied = clip.text_copy(torch.bfloat16)
    assert copied.visual is None and clip.model.visual is not None
    assert {p.dtype for p in copied.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in clip.model.parameters()} == {torch.float32}
    full, cast = clip.encode_tokens(tokens), clip.encode_tokens(tokens, model=copied)
    assert cast.dtype == torch.float32 and 0 < (cast - full).abs().max() < 3e-2
    with torch.no_grad():
        next(clip.model.parameters()).add_(1.0)
    assert torch.equal(clip.encode_tokens(tokens, model=copied), cast)


def test_changing_truncation_or_gap_drops_captured_graphs(chain, deforming):
    """A CUDA graph holds the truncation psi and modality-gap offset it was captured with, so setting
    either on an engine drops every captured graph (the next call captures again, as a first call) and
    the engine computes with the new value."""
    from clipportrait.generation.modality_gap import ModalityGap
    from clipportrait.lvlm import build_clip

    clip = build_clip(compose(chain["root"], *generate_args(chain)).lvlm)
    engine = TextToPortrait(deforming, clip, truncation_psi=0.7, cuda_graphs=True)
    morph = other_morphables(chain, deforming.geometry.morphable)[0]
    cond = {"camera": view_labels(0.0, 0.0).expand(2, -1), **morph.rows([0, 1])}
    before = engine.render(SEEDS, cond, engine.encode(PROMPTS), 1.0)["image"]
    offset = torch.zeros(clip.embed_dim)
    offset[0] = 0.5
    for name, value in (("truncation_psi", 1.0), ("gap", ModalityGap(offset, 1, 1, "cache", "data"))):
        for graphed in engine._graphs.values():  # stand-ins for captured graphs (none capture on a CPU)
            graphed._graphs[("captured",)] = object()
        engine._seen.add(("portrait", "signature"))
        setattr(engine, name, value)
        assert all(len(g) == 0 for g in engine._graphs.values()) and not engine._seen, name
    after = engine.render(SEEDS, cond, engine.encode(PROMPTS), 1.0)["image"]
    assert engine.truncation_psi == 1.0 and (after - before).abs().max() > 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_equal_the_eager_engine(chain, deforming):
    """With cuda_graphs, text encoding and generation (apart, or prompt -> portrait as one graph) are
    replayed from graphs captured at the first call of a batch size; later calls with other prompts,
    seeds, cameras, expression and shape vectors and alpha give what the eager engine gives (the
    deformation is on, so the morphable inputs change the render: a replay of the first call's would
    show), and a non-finite input is refused (a host one before a replay, a device one by the graph's
    own check)."""
    import copy

    from clipportrait.lvlm import build_clip

    gpu = copy.deepcopy(deforming).cuda()
    clip = build_clip(compose(chain["root"], *generate_args(chain)).lvlm)
    clip.model.cuda()
    eager, graphed = (TextToPortrait(gpu, clip, truncation_psi=0.7, cuda_graphs=g) for g in (False, True))
    morphs = other_morphables(chain, gpu.geometry.morphable)
    cases = [(PROMPTS, SEEDS, 0.0, morphs[0], 1.0), (PROMPTS[::-1], [7, 11], 30.0, morphs[1], 0.4)]
    for prompts, seeds, yaw, morph, alpha in cases:
        text_e, text_g = eager.encode(prompts), graphed.encode(prompts)
        assert torch.allclose(text_g, text_e, atol=1e-6)
        cond = {"camera": view_labels(yaw, 5.0).expand(2, -1), **morph.rows([0, 1])}
        a, b = eager.render(seeds, cond, text_e, alpha), graphed.render(seeds, cond, text_g, alpha)
        c = graphed.portraits(prompts, seeds, cond, alpha)  # text tower and generator in one graph
        assert torch.allclose(c["embedding"], text_e, atol=1e-6)
        for key in ("image", "image_depth", "image_alpha"):
            assert torch.allclose(a[key], b[key], atol=1e-5), key
            assert torch.allclose(a[key], c[key], atol=1e-5), key
    stale = eager.render(seeds, {**cond, **morphs[0].rows([0, 1])}, text_e, alpha)  # the first call's morphable
    assert (stale["image"] - a["image"]).abs().max() > 1e-3  # ... which the checks above would have caught
    assert graphed.graphs_used() and graphed.graph_failure is None
    assert [len(graphed._graphs[k]) for k in ("portrait", "text", "prompt_portrait")] == [1, 1, 1]
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the text tower on the engine's bf16 copy, autocast off
        text_bf16 = graphed.encode(prompts)
    direct = clip.encode_tokens(clip.tokenize(prompts).cuda(), model=graphed._text_bf16)
    assert torch.allclose(text_bf16, direct, atol=1e-6) and 0 < (text_bf16 - text_e).abs().max() < 3e-2
    eager.truncation_psi = graphed.truncation_psi = 1.0  # the captured graphs held 0.7: captured again
    a, b = eager.render(seeds, cond, text_e, alpha), graphed.render(seeds, cond, text_g, alpha)
    assert torch.allclose(a["image"], b["image"], atol=1e-5) and len(graphed._graphs["portrait"]) == 1
    bad = {**cond, "camera": cond["camera"].clone()}
    bad["camera"][1, 3] = float("nan")
    with pytest.raises(UserError, match="camera"):
        graphed.render(seeds, bad, text_g, 1.0)
    bad_text = text_g.clone()  # a device input: checked inside the graph
    bad_text[0, 0] = float("inf")
    with pytest.raises(UserError, match="embedding"):
        graphed.render(seeds, cond, bad_text, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 generation runs on CUDA")
def test_bf16_generation_on_cuda_records_its_precision_and_stays_close(chain, tmp_path):
    """task.precision=bf16 on CUDA: the same outputs as float32 to bf16's precision, recorded as bf16."""
    runs = {}
    for precision in ("float32", "bf16"):
        run_dir = tmp_path / precision
        generate.run(compose(chain["root"], *generate_args(chain, "task.device=cuda", "task.turntable=false",
                                                           f"task.precision={precision}")), RunContext(run_dir=run_dir))
        assert json.loads((run_dir / "generate.json").read_text())["protocol"]["precision"] == precision
        runs[precision] = png(run_dir / "grid.png").astype(np.float64)
    difference = np.abs(runs["bf16"] - runs["float32"])
    assert 0 < difference.mean() < 8 and np.array_equal(runs["bf16"].shape, runs["float32"].shape)


def test_camera_presets_round_trip_through_the_labels():
    for name, (yaw, pitch) in CAMERA_PRESETS.items():
        view = resolve_view(name)
        got_yaw, got_pitch = labels_yaw_pitch(view_labels(view.yaw_deg, view.pitch_deg))
        assert abs(float(got_yaw) - yaw) < 1e-3 and abs(float(got_pitch) - pitch) < 1e-3, name
    assert torch.allclose(view_labels(0.0, 0.0), neutral_labels(1))
    # "left" puts the camera toward world +x (the subject's left), "up" raises it (+y): by hand,
    # the camera centre is pivot + 2.7 (cos p sin y, sin p, cos p cos y).
    left, up = view_labels(30.0, 0.0)[0], view_labels(0.0, 20.0)[0]
    assert math.isclose(float(left[3]), 2.7 * math.sin(math.radians(30)), abs_tol=1e-5)
    assert math.isclose(float(up[7]), 2.7 * math.sin(math.radians(20)), abs_tol=1e-5)
    custom = resolve_view("left", yaw_deg=-12.5, pitch_deg=7.0)
    assert (custom.name, custom.yaw_deg, custom.pitch_deg) == ("custom", -12.5, 7.0)
    yaws, pitches = labels_yaw_pitch(view_labels(torch.tensor([-40.0, 10.0]), torch.tensor([5.0, -15.0])))
    assert torch.allclose(yaws, torch.tensor([-40.0, 10.0], dtype=yaws.dtype), atol=1e-3)
    assert torch.allclose(pitches, torch.tensor([5.0, -15.0], dtype=pitches.dtype), atol=1e-3)


def test_expression_presets_change_the_mesh_as_named(system):
    model = system.geometry.morphable

    def landmarks(name: str) -> torch.Tensor:
        expression, pose = preset_parameters(model, name)
        with torch.no_grad():
            return model.landmarks(model(torch.zeros(1, model.n_shape), expression[None], pose[None]))[0]

    neutral = landmarks("neutral")
    lip_gap = lambda lm: float((lm[66] - lm[62]).norm())  # noqa: E731  inner lips, iBUG 62 (upper) / 66 (lower)
    corners_y = lambda lm: float(lm[[48, 54], 1].mean())  # noqa: E731  mouth corners, world y up
    brows_y = lambda lm: float(lm[17:27, 1].mean())  # noqa: E731
    open_mouth, smile, brows, frown = (landmarks(n) for n in ("open_mouth", "smile", "raised_brows", "frown"))
    assert lip_gap(open_mouth) > lip_gap(neutral) + 0.01  # world units (head ~0.5 tall): a visibly open jaw
    assert corners_y(smile) > corners_y(neutral) + 1e-3 and corners_y(frown) < corners_y(neutral) - 1e-3
    assert brows_y(brows) > brows_y(neutral) + 1e-3
    assert abs(brows_y(smile) - brows_y(neutral)) < 1e-4  # a smile leaves the brows alone
    assert torch.equal(preset_parameters(model, "neutral")[0], torch.zeros(model.n_expr))

    # A model without named modes (FLAME) gets the jaw-only presets and a clear error for the rest.
    unnamed = SimpleNamespace(n_expr=50, n_pose=6, n_shape=100)
    with pytest.raises(UserError, match="presets usable with it: neutral, open_mouth"):
        preset_parameters(unnamed, "smile")
    with pytest.raises(UserError, match="unknown expression preset; known: " + ", ".join(EXPRESSION_PRESETS)):
        preset_parameters(model, "wink")


def test_from_dataset_uses_one_dataset_row_per_seed(chain, system):
    from clipportrait.data.format import read_index

    index = read_index(chain["root"] / "syn")
    choice = resolve_morphable(system.geometry.morphable, [3, 4, 3], "from_dataset",
                               dataset_path=str(chain["root"] / "syn"))
    rows = choice.description["rows"]
    assert rows[0] == rows[2]  # a seed always draws the same row
    for k, row in enumerate(rows):
        assert np.array_equal(choice.shape[k].numpy(), index.shape[row])
        assert np.array_equal(choice.expression[k].numpy(), index.expression[row])
        assert np.array_equal(choice.pose[k].numpy(), index.pose[row])
    jaw = resolve_morphable(system.geometry.morphable, [0], "smile", jaw=0.2)
    assert float(jaw.pose[0, 3]) == pytest.approx(0.2)


def test_modality_gap_offset_matches_a_hand_computation(chain):
    from clipportrait.canonical.cache import load_canonical_embeddings
    from clipportrait.data.format import read_index
    from clipportrait.lvlm import build_clip

    cfg = compose(chain["root"], *generate_args(chain))
    clip = build_clip(cfg.lvlm)
    gap = ModalityGap.estimate(clip, chain["cache"], chain["root"] / "syn")
    index = read_index(chain["root"] / "syn")
    r, r_flipped = load_canonical_embeddings(chain["cache"], index.names)
    image_mean = np.concatenate([r, r_flipped]).astype(np.float64).mean(0)
    captions = [c for name in index.names for c in index.attributes[name]["captions"]]
    text_mean = np.stack([clip.encode_text([c])[0].double().numpy() for c in captions]).mean(0)
    assert gap.captions == len(captions) and gap.images == 2 * len(index.names)
    assert np.allclose(gap.offset.numpy(), image_mean - text_mean, atol=1e-5)
    text = clip.encode_text(PROMPTS)
    corrected = gap.apply(text)
    by_hand = text.double() + torch.from_numpy(image_mean - text_mean)
    assert torch.allclose(corrected.double(), by_hand / by_hand.norm(dim=-1, keepdim=True), atol=1e-5)


def test_modality_gap_takes_the_captions_of_the_caches_dataset(chain, tmp_path):
    """The text mean comes from the captions of the dataset the cache was made from (its manifest's
    path) even where data.path does not exist; a data.path holding another dataset (another content
    hash) is refused naming both; with the cache's dataset gone, a copy at data.path serves; with
    neither, a UserError says so."""
    from clipportrait.lvlm import build_clip

    clip = build_clip(compose(chain["root"], *generate_args(chain)).lvlm)
    syn, cache = chain["root"] / "syn", chain["cache"]
    expected = ModalityGap.estimate(clip, cache, syn)
    default = ModalityGap.estimate(clip, cache, tmp_path / "no_dataset")
    assert default.dataset == str(syn) and torch.equal(default.offset, expected.offset)
    other = tmp_path / "other"
    shutil.copytree(syn, other)
    image = sorted((other / "images").iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0")  # other image bytes: another dataset
    with pytest.raises(UserError, match=_literal(f"data.path={other} is not the dataset CLIP cache {cache} was made "
                                                 f"from ({syn})")):
        ModalityGap.estimate(clip, cache, other)
    moved = tmp_path / "cache"  # the cache of a dataset that is not here (made on another machine)
    shutil.copytree(cache, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["dataset"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(syn, tmp_path / "copy")
    copied = ModalityGap.estimate(clip, moved, tmp_path / "copy")
    assert copied.dataset == str(tmp_path / "copy") and torch.equal(copied.offset, expected.offset)
    with pytest.raises(UserError, match=_literal(f"{tmp_path / 'gone'}, which is not here, nor is data.path=")):
        ModalityGap.estimate(clip, moved, tmp_path / "no_dataset")


def test_prompts_file_and_token_limits(tmp_path, chain):
    from clipportrait.lvlm import build_clip

    tokenizer = build_clip(compose(chain["root"], *generate_args(chain)).lvlm).tokenizer
    limit = tokenizer.context_length  # 40 for clipportrait-tiny
    assert token_count(tokenizer, "red " * (limit - 2)) == limit  # one BPE token per word + start + end
    validate_prompts(gather_prompts(["red " * (limit - 2)], None), tokenizer)  # exactly at the limit: accepted
    with pytest.raises(UserError, match=rf"task.prompts\[1\]=.*{limit + 1} tokens, more than .* context length {limit}"):
        validate_prompts(gather_prompts(["fine", "red " * (limit - 1)], None), tokenizer)
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\na person with red hair\n\n   \n  a person with green eyes  \n")
    prompts = gather_prompts(["first"], str(path))
    assert [p.text for p in prompts] == ["first", "a person with red hair", "a person with green eyes"]
    assert prompts[2].source == f"task.prompts_file={path} line 5"


def test_prompts_that_clean_to_no_tokens_are_refused(chain):
    """open_clip unescapes HTML entities and drops whitespace: "&nbsp;" or "&#32;&#32;" leave the start
    and end tokens alone and embed like the empty prompt; they are refused naming the prompt."""
    from clipportrait.lvlm import build_clip

    tokenizer = build_clip(compose(chain["root"], *generate_args(chain)).lvlm).tokenizer
    assert validate_prompts(gather_prompts(["a"], None), tokenizer) == ["a"]  # one token: fine
    for text in ("&nbsp;", "&#32;&#32;"):
        with pytest.raises(UserError, match=_literal(f"task.prompts[1]={text!r}: no tokens once the tokenizer has "
                                                     "cleaned it")):
            validate_prompts(gather_prompts(["fine", text], None), tokenizer)


def test_a_prompts_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """A prompts file saved as UTF-8 with a byte-order mark: the mark does not stick to the first line, so
    a first comment line stays a comment and a first prompt keeps its own text."""
    from clipportrait.generation.prompts import read_prompts_file

    path = tmp_path / "prompts.txt"
    path.write_bytes("# my prompts\na person with red hair\n".encode("utf-8-sig"))
    assert [(p.text, p.source) for p in read_prompts_file(path)] == [("a person with red hair",
                                                                       f"task.prompts_file={path} line 2")]
    path.write_bytes("a person with red hair\n".encode("utf-8-sig"))
    assert [p.text for p in read_prompts_file(path)] == ["a person with red hair"]


def test_generate_and_evaluate_open_checkpoints_with_this_machines_flame_files(chain, tmp_path, monkeypatch):
    """FLAME's files cannot travel inside a checkpoint: task=generate and task=evaluate both hand this
    machine's morphable.flame_path and flame_landmarks_path to open_for_inference."""
    from clipportrait.systems import bundle
    from clipportrait.tasks import evaluate

    class Opened(Exception):
        pass

    seen = []

    def record(path, **kwargs):
        seen.append(kwargs.get("overrides"))
        raise Opened

    monkeypatch.setattr(bundle, "open_for_inference", record)
    flame = {"flame_path": "/elsewhere/flame2023.pkl", "flame_landmarks_path": "/elsewhere/landmarks.npy"}
    machine = [f"morphable.{k}={v}" for k, v in flame.items()]
    for task, args in ((generate, generate_args(chain, "task.turntable=false")),
                       (evaluate, ["task=evaluate", f"task.checkpoint={chain['stage2']}"])):
        with pytest.raises(Opened):
            task.run(compose(chain["root"], *args, *machine), RunContext(run_dir=tmp_path / task.__name__))
    assert [o["morphable"] for o in seen] == [flame, flame]


def test_a_cache_rewritten_since_training_is_refused_by_generate_and_evaluate(chain, system, tmp_path):
    """The Stage-2 checkpoint records its canonicalisation cache's manifest identity; generate and evaluate
    refuse a cache (the recorded one, or task.clip_cache / data.clip_cache) whose identity differs, listing
    the fields, and accept a moved copy of the same cache."""
    from clipportrait.canonical.cache import recorded_identity
    from clipportrait.tasks import evaluate

    assert system.cfg.clip_cache_identity == recorded_identity(chain["cache"]) != {}
    moved = tmp_path / "moved"
    shutil.copytree(chain["cache"], moved)
    generate.run(compose(chain["root"], *generate_args(chain, f"task.clip_cache={moved}", "task.turntable=false")),
                 RunContext(run_dir=tmp_path / "ok"))
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["dataset_hash"] = "f" * 64  # as if embedded from another dataset
    (moved / "manifest.json").write_text(json.dumps(manifest))
    expected = _literal("dataset_hash: the checkpoint recorded")
    with pytest.raises(UserError, match=expected):
        generate.run(compose(chain["root"], *generate_args(chain, f"task.clip_cache={moved}")),
                     RunContext(run_dir=tmp_path / "gen"))
    with pytest.raises(UserError, match=expected):
        evaluate.run(compose(chain["root"], "task=evaluate", f"task.checkpoint={chain['stage2']}",
                             f"data.clip_cache={moved}"), RunContext(run_dir=tmp_path / "eval"))


BAD_INPUTS = {
    "task.prompts[1]: empty prompt": ["task.prompts=['a person','  ']"],
    "tokens, more than the tokenizer's context length 40": ["task.prompts=['" + "red " * 45 + "']"],
    "no prompts": ["task.prompts=[]"],
    "task.prompts_file=/nonexistent/p.txt: no such file": ["task.prompts_file=/nonexistent/p.txt"],
    "task.alpha=1.5: expected a value in [0, 1]": ["task.alpha=1.5"],
    "task.alpha_sweep[1]=-0.5: expected a value in [0, 1]": ["task.alpha_sweep=[0,-0.5]"],
    "task.camera='sideways': unknown camera preset; known: frontal, left, right": ["task.camera=sideways"],
    "task.pitch=95.0: expected degrees in [-80, 80]": ["task.pitch=95"],
    "task.expression='wink': unknown expression preset; known: neutral, open_mouth, smile": ["task.expression=wink"],
    "task.expression_vector has 3 values: expected 50": ["task.expression_vector=[1,2,3]"],
    "task.shape_vector has 2 values: expected 100": ["task.shape_vector=[1,2]"],
    "task.jaw=2.0: expected radians": ["task.jaw=2.0"],
    "task.truncation_psi=1.5: expected a value in [0, 1]": ["task.truncation_psi=1.5"],
    "task.seeds=[]: expected at least one seed": ["task.seeds=[]"],
    "task.seeds[0]=-1: expected an integer": ["task.seeds=[-1]"],
    "task.modality_gap='median': expected one of none, mean_offset": ["task.modality_gap=median"],
    "task.turntable_frames=1: expected >= 2": ["task.turntable_frames=1"],
    "task.compile='yes': expected one of off, cuda, always": ["task.compile=yes"],
    "task.precision='fp8': expected one of float32, bf16": ["task.precision=fp8"],
    "task.precision=bf16 needs a CUDA device (this run's device is cpu)": ["task.precision=bf16", "task.device=cpu"],
    "is not the LVLM the checkpoint was trained with": ["lvlm.random_seed=4"],
}


def test_generate_refuses_bad_inputs_naming_them(chain, tmp_path):
    root = chain["root"]
    for message, overrides in BAD_INPUTS.items():
        with pytest.raises(UserError, match=_literal(message)):
            generate.run(compose(root, *generate_args(chain), *overrides), RunContext(run_dir=tmp_path / "bad"))
    # Extrapolation is allowed when asked for (validation only: no rendering needed).
    cfg = compose(root, *generate_args(chain, "task.alpha=1.5", "task.allow_alpha_extrapolation=true"))
    assert generate.validate(cfg.task)["alpha"] == 1.5
    # A Stage-1 checkpoint is refused by name.
    with pytest.raises(UserError, match="holds a Stage1GAN"):
        generate.run(compose(root, *generate_args(chain), f"task.checkpoint={chain['stage1']}"),
                     RunContext(run_dir=tmp_path / "bad"))
    assert not (tmp_path / "bad" / "generate.json").exists()


def test_generate_without_an_mp4_encoder_stops_before_rendering(chain, monkeypatch):
    """Turntables are written last: without imageio's FFMPEG plugin, task=generate stops in validation,
    naming the package and task.turntable, instead of after every grid and sweep is rendered."""
    import importlib.util

    from clipportrait.generation import writers

    assert writers.video_encoder_missing() is None  # imageio-ffmpeg is part of the environment
    plain = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else plain(name, *a))
    assert "pip install imageio[ffmpeg]" in writers.video_encoder_missing()
    root = chain["root"]
    with pytest.raises(UserError, match=_literal("task.turntable=true writes MP4 videos, but imageio's FFMPEG plugin")):
        generate.validate(compose(root, *generate_args(chain)).task)
    assert generate.validate(compose(root, *generate_args(chain, "task.turntable=false")).task)["seeds"]


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_depth_maps_and_video_frames_by_hand(tmp_path):
    from clipportrait.generation.writers import depth_to_gray, write_video

    depth = torch.tensor([[[[2.5, 3.0], [2.7, 3.3]]]])
    alpha = torch.tensor([[[[1.0, 0.9], [0.8, 0.1]]]])
    # foreground depths 2.5 (near) .. 3.0 (far) -> 255 .. 40; 2.7 -> 40 + 215 * 0.3 / 0.5 = 169; background 0
    assert depth_to_gray(depth, alpha).tolist() == [[[255, 40], [169, 0]]]
    frames = [np.full((40, 24, 3), 20 * k, np.uint8) for k in range(5)]
    import imageio.v2 as imageio

    with imageio.get_reader(write_video(tmp_path / "v.mp4", frames, fps=5)) as reader:
        read = [frame for frame in reader]
    assert len(read) == 5 and read[0].shape == (48, 32, 3)  # padded to the 16-pixel macro-blocks, not resized
    assert abs(float(read[3][:40, :24].mean()) - 60) < 3 and float(read[3][40:].max()) < 3


def test_export_bundle_generates_what_the_checkpoint_generates(chain, tmp_path):
    """task=export writes a bundle smaller than the checkpoint (EMA generator only); task=generate reads
    it and renders the checkpoint's exact images, recording the bundle's hash and source; a Stage-1
    bundle evaluates like its checkpoint (same EMA images)."""
    from clipportrait.systems.bundle import open_for_inference
    from clipportrait.tasks import export

    result = export.run(compose(chain["root"], "task=export", f"task.checkpoint={chain['stage2']}"),
                        RunContext(run_dir=tmp_path / "export"))
    bundle = Path(result["bundle"])
    assert bundle == Path(chain["stage2"]).with_suffix(".bundle") and result["kind"] == "Stage2GAN"
    assert result["bundle_mb"] < 0.5 * result["checkpoint_mb"]
    runs = {}
    for name, source in (("ckpt", chain["stage2"]), ("bundle", bundle)):
        runs[name] = tmp_path / name
        generate.run(compose(chain["root"], *generate_args(chain, f"task.checkpoint={source}", "task.turntable=false")),
                     RunContext(run_dir=runs[name]))
    for image in ("grid.png", "depth.png"):
        assert np.array_equal(png(runs["ckpt"] / image), png(runs["bundle"] / image)), image
    record = json.loads((runs["bundle"] / "generate.json").read_text())["protocol"]["checkpoint"]
    assert record["source"]["checkpoint"] == str(chain["stage2"]) and len(record["bundle_weights_sha256"]) == 64

    out = tmp_path / "stage1.bundle"
    export.run(compose(chain["root"], "task=export", f"task.checkpoint={chain['stage1']}", f"task.out={out}"),
               RunContext(run_dir=tmp_path / "export1"))
    (a, meta_a), (b, meta_b) = open_for_inference(chain["stage1"]), open_for_inference(out)
    assert meta_a["kind"] == meta_b["kind"] == "Stage1GAN" and meta_a["step"] == meta_b["step"] > 0
    z = torch.randn(2, a.cfg.backbone.z_dim, generator=torch.Generator().manual_seed(0))
    params = a.geometry.morphable.sample_params(2, generator=torch.Generator().manual_seed(1))
    cond = {"camera": view_labels(0.0, 0.0).expand(2, -1), "shape": params.shape, "expression": params.expression,
            "pose": params.pose, "flip": torch.zeros(2, dtype=torch.bool)}
    torch.testing.assert_close(b.generate_images(z, cond), a.generate_images(z, cond), atol=0, rtol=0)


def test_bundles_refuse_corruption_mismatch_and_training(chain, tmp_path):
    """A bundle whose weights changed, or whose config no longer fits its weights, is refused naming
    the file; training and canonicalisation refuse a bundle and say what they need instead."""
    from clipportrait.systems.bundle import export_bundle, load_bundle
    from clipportrait.systems.stage1 import load_checkpoint

    bundle = tmp_path / "b"
    export_bundle(chain["stage2"], bundle)
    with pytest.raises(UserError, match="is an inference bundle"):
        load_checkpoint(bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["config"]["backbone"]["decoder_hidden"] += 8
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit its config"):
        load_bundle(bundle)
    export_bundle(chain["stage2"], bundle)
    weights = bundle / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="weights.safetensors does not match the sha256"):
        load_bundle(bundle)
    (bundle / "bundle.json").write_text("{}")
    with pytest.raises(UserError, match="is not a clipportrait-inference-bundle"):
        load_bundle(bundle)
