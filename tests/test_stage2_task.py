"""task=train_stage2 through the composed config: it trains from a Stage-1 checkpoint and a cache,
records the regularisers, resumes, and refuses bad inputs with messages that name them."""

from __future__ import annotations

import pytest

from chain import build_chain, compose
from clipportrait.errors import UserError
from clipportrait.systems.stage2 import Stage2GAN
from clipportrait.tasks import train_stage2
from clipportrait.tasks.base import RunContext


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return build_chain(tmp_path_factory.mktemp("chain"))


def test_train_stage2_writes_a_stage2_checkpoint_with_the_regularisers_logged(chain):
    assert chain["result"]["steps"] == 2
    system = Stage2GAN.from_checkpoint(chain["stage2"])
    assert system.cfg.alignment.hidden == 32 and system.cfg.alignment.embed_dim > 0
    assert system.cfg.stage1_checkpoint == chain["stage1"]
    train = [r for r in chain["metrics"] if r.get("event") == "train"]
    assert train and "reg/jacobian" in train[-1] and "reg/norm" in train[-1]


def test_train_stage2_resumes_and_refuses_bad_inputs(chain, tmp_path):
    root, args = chain["root"], chain["stage2_args"]
    resumed = train_stage2.run(compose(root, *args, f"task.resume={chain['stage2']}", "trainer.max_steps=3"),
                               RunContext(run_dir=tmp_path / "resumed"))
    assert resumed["steps"] == 3
    cases = {
        "data.clip_cache is not set": [a for a in args if not a.startswith("data.clip_cache")],
        "task.stage1 is not set": [a for a in args if not a.startswith("task.stage1")],
        "resume continues a Stage-2 run": [*args, f"task.resume={chain['stage1']}"],
        "task.train='frozen'": [*args, "task.train=frozen"],
        "regularizer.alpha_drop=1.5": [*args, "regularizer.alpha_drop=1.5"],
        "backbone.w_dim": [*args, "backbone.w_dim=32"],
        "Stage 2 starts from a Stage-1 checkpoint": [a for a in args if not a.startswith("task.stage1")]
        + [f"task.stage1={chain['stage2']}"],
        "task.train=alignment but the run": [*args, f"task.resume={chain['stage2']}", "task.train=alignment"],
    }
    for message, overrides in cases.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
            train_stage2.run(compose(root, *overrides), RunContext(run_dir=tmp_path / "bad"))


def test_text_evaluation_renders_each_prompt_under_one_conditioning(chain):
    """evaluate_text_control: (prompts, samples) images; at alpha = 0 a prompt's images are the
    unconditional ones (T_G ignored); every number is finite and diversity > 0 (z varies)."""
    import torch

    from clipportrait.data.datamodule import ConditioningSampler, PortraitDataset
    from clipportrait.lvlm import build_clip
    from clipportrait.metrics.lpips import build_lpips
    from clipportrait.metrics.stage2 import TextEvalConfig, evaluate_text_control

    cfg = compose(chain["root"], "task=train_stage2")
    system = Stage2GAN.from_checkpoint(chain["stage2"]).eval()
    dataset = PortraitDataset(cfg.data.path, resolution=32, flip=False, clip_cache=str(chain["cache"]))
    clip = build_clip(cfg.lvlm)
    settings = TextEvalConfig(attributes=["hair_color"], values_per_attribute=2, samples_per_prompt=3, alpha=0.0)
    result = evaluate_text_control(system, clip, dataset, settings, lpips=build_lpips("alex"))
    assert result["images"].shape == (2, 3, 3, 32, 32)
    assert result["diversity_lpips"] > 0 and 0 <= result["silhouette_iou"] <= 1 and result["clip_score"] >= 0
    row = ConditioningSampler(dataset, seed=0 * 7919 + 1).sample(1)
    cond = {k: v.expand(3, *v.shape[1:]) for k, v in row.items() if k != "clip_embedding"}
    z = torch.randn(3, system.cfg.backbone.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = system.generate(z, cond, G=system.G_ema, noise_mode="const")["image"].clamp(-1, 1)
    assert torch.allclose(result["images"][1], expected, atol=1e-6)
    # The CLIP score compares the images with the prompts' own embeddings, whatever T_G was fed: at
    # alpha = 0 a modality offset changes no image, so it changes no score.
    offset = torch.randn(clip.encode_text(["x"]).shape[1], generator=torch.Generator().manual_seed(2))
    shifted = evaluate_text_control(system, clip, dataset, settings, modality_offset=offset)
    assert torch.equal(shifted["images"], result["images"])
    assert shifted["clip_score"] == pytest.approx(result["clip_score"], rel=1e-6)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        evaluate_text_control(system, clip, dataset, TextEvalConfig(samples_per_prompt=1))


def test_evaluate_reads_a_stage2_checkpoint_with_its_recorded_cache(chain, tmp_path):
    """task=evaluate on a Stage-2 checkpoint: the fakes are conditioned on the cache the checkpoint
    recorded (alpha = 1); the record names the system, the cache and the checkpoint's step."""
    from clipportrait.tasks import evaluate

    cfg = compose(chain["root"], "task=evaluate", f"task.checkpoint={chain['stage2']}", "evaluation.fid_samples=4",
                  "evaluation.kid_subset_size=4", "evaluation.real_max=8", "evaluation.batch_size=4")
    ctx = RunContext(run_dir=tmp_path / "eval")
    result = evaluate.run(cfg, ctx)
    assert result["fid"] == result["fid"] and result["fid"] >= 0
    record = [r for r in ctx.metrics.read() if r["event"] == "evaluation"][-1]
    assert record["protocol"]["system"] == "Stage2GAN" and record["protocol"]["clip_cache"] == str(chain["cache"])
    # Recorded at the step the checkpoint was saved at (Stage 2 ran 2 steps), not at the loaded system's 0.
    assert record["step"] == 2 and record["protocol"]["step"] == 2 and record["kimg"] > 0


def test_resume_refuses_a_canonical_cache_of_another_stage1_checkpoint(chain, tmp_path):
    """task.resume checks the cache against the Stage-1 checkpoint the run started from (its recorded
    sha256), as a fresh start checks it against task.stage1."""
    import json
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(chain["cache"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.update(embed="canonical", stage1_sha256="0" * 64)  # as if inverted into another generator
    (cache / "manifest.json").write_text(json.dumps(manifest))
    args = [a for a in chain["stage2_args"] if not a.startswith("data.clip_cache")]
    with pytest.raises(UserError, match=r"another Stage-1 checkpoint.*the Stage-1 checkpoint of task\.resume="):
        train_stage2.run(compose(chain["root"], *args, f"data.clip_cache={cache}", f"task.resume={chain['stage2']}",
                                 "trainer.max_steps=3"), RunContext(run_dir=tmp_path / "resumed"))
    with pytest.raises(UserError, match=r"another Stage-1 checkpoint.*; task\.stage1=.* has sha256 [0-9a-f]{64}"):
        train_stage2.run(compose(chain["root"], *args, f"data.clip_cache={cache}"), RunContext(run_dir=tmp_path / "fresh"))
