"""Smoke tests of the data tasks and the demo through the real entry point (run.py)."""

from __future__ import annotations

import json

import pytest

TINY = ["data.synthetic.num_images=8", "data.synthetic.resolution=32", "data.synthetic.workers=1",
        "print_config=false", "logger=none"]


@pytest.mark.slow(seconds=20)
def test_make_synthetic_then_check_data_then_a_broken_copy(run_cli, tmp_path):
    """make_synthetic writes a dataset that check_data accepts; after an image is corrupted,
    check_data exits non-zero naming that image, and lists the problem in problems.json."""
    proc = run_cli("task=make_synthetic", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = tmp_path / "data" / "synthetic"
    assert (data / "dataset.json").exists() and (data / "morphable.npz").exists()
    proc = run_cli("task=check_data", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]

    name = json.loads((data / "dataset.json").read_text())["labels"][3][0]
    (data / name).write_bytes(b"not a png")
    proc = run_cli("task=check_data", *TINY)
    assert proc.returncode == 1
    assert name in proc.stderr and "problem" in proc.stderr
    reports = list(tmp_path.glob("outputs/runs/check_data/*/problems.json"))
    assert any(name in r.read_text() for r in reports)


@pytest.mark.slow(seconds=90)
def test_demo_runs_every_stage_and_skips_them_on_rerun(run_cli, tmp_path):
    """experiment=demo at toy size runs data → check → geometry → lvlm → stage1 (a few training steps with
    the surface-field deformation) → canonicalize (oracle) → stage2 → generate, writes the index page with
    its images, records FID/KID before and after training with the protocol, and a rerun skips every stage."""
    args = ["experiment=demo", *TINY, "task.preview_samples=2", "task.overlay_size=64", "task.stage1_steps=2",
            "task.stage1_grid_every_steps=0", "evaluation.fid_samples=4", "evaluation.kid_subset_size=4",
            "evaluation.real_max=8", "data.batch_size=2", "task.lvlm_steps=3", "task.stage2_steps=2",
            "task.text_eval_values=2", "task.text_eval_samples=2", "task.prompts=[a photo of a person with short red hair]"]
    proc = run_cli(*args, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    demo = tmp_path / "outputs" / "demo"
    index = (demo / "index.md").read_text()
    stages = ("data", "check", "geometry", "lvlm", "stage1", "canonicalize", "stage2", "generate")
    for stage in stages:
        assert (demo / stage / "result.json").exists()
        assert f"## {stage}" in index
    for image in ("geometry/overlays.png", "geometry/mesh_renders.png", "stage1/grid.png", "stage1/renders.png",
                  "stage2/prompts_alpha1.png", "generate/neutral_grid.png", "generate/smile_grid.png"):
        assert (demo / image).stat().st_size > 0 and image in index
    stage1 = json.loads((demo / "stage1" / "result.json").read_text())
    assert stage1["steps"] == 2 and stage1["deformation"] is True
    assert [step for step, _ in stage1["fid_curve"]] == [0, 2]
    assert all(fid == fid and fid >= 0 for _, fid in stage1["fid_curve"])  # finite, not NaN
    assert stage1["protocol"]["feature_sha256"] and (demo / "stage1" / "run" / "checkpoints" / "last.ckpt").exists()
    stage2 = json.loads((demo / "stage2" / "result.json").read_text())
    assert stage2["steps"] == 2 and set(stage2) >= {"alpha0", "alpha1", "fid_curve"}
    assert 0 <= stage2["alpha1"]["silhouette_iou"] <= 1 and stage2["alpha1"]["diversity_lpips"] >= 0
    canonical = json.loads((demo / "canonicalize" / "result.json").read_text())
    assert canonical["embed"] == "oracle"
    generated = json.loads((demo / "generate" / "result.json").read_text())
    assert generated["outputs"]["neutral"]["latency_ms"]["generation_per_image"] > 0

    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("done earlier, skipped") == len(stages)


def test_demo_reruns_a_stage_whose_inputs_changed_and_every_stage_after_it(tmp_path):
    """A rerun skips a finished stage only when its config inputs and the stages it reads are unchanged;
    a changed key reruns that stage and everything downstream of it (stale results are removed)."""
    from clipportrait.cli import compose_config
    from clipportrait.tasks.base import RunContext
    from clipportrait.tasks.demo import STAGES, Demo

    calls = []

    def fake(name):
        def fn(folder):
            calls.append(name)
            (folder / "written").write_text(str(len(calls)))
            return {"path": str(tmp_path / "data")} if name == "data" else {}
        return fn

    def run(*overrides):
        calls.clear()
        cfg = compose_config(["experiment=demo", f"paths.root_dir={tmp_path}", "logger=none", *overrides])
        demo = Demo(cfg, RunContext(run_dir=tmp_path / "run"))
        for name in STAGES:
            demo.stage(name, fake(name))
        return list(calls)

    assert run() == list(STAGES)
    assert run() == []
    prompts = "task.prompts=[a photo of a person with green eyes]"
    assert run(prompts) == ["generate"]
    assert run(prompts, "task.stage1_steps=3") == ["stage1", "canonicalize", "stage2", "generate"]
    assert run(prompts, "task.stage1_steps=3", "task.lvlm_steps=4") == ["lvlm", "canonicalize", "stage2", "generate"]
    assert run(prompts, "task.stage1_steps=3", "task.lvlm_steps=4", "regularizer.jacobian_weight=0") == [
        "stage2", "generate"]
    assert run(prompts, "task.stage1_steps=3", "task.lvlm_steps=4", "regularizer.jacobian_weight=0") == []
    assert run(prompts, "task.stage1_steps=3", "task.lvlm_steps=4", "regularizer.r1_gamma=2") == [
        "stage1", "canonicalize", "stage2", "generate"]
    assert run("task.force=true", prompts) == list(STAGES)


@pytest.mark.slow(seconds=25)
def test_stage1_regulariser_sweep(run_cli, tmp_path):
    """`-m task=train_stage1 experiment=demo regularizer.r1_gamma=0.5,1` runs one training job per value,
    each in its own run directory with its own config, checkpoint and FID record."""
    proc = run_cli("-m", "task=train_stage1", "experiment=demo", "regularizer.r1_gamma=0.5,1", *TINY, "debug=fast",
                   "deformation=none", "data.batch_size=2", "evaluation.fid_samples=4", "evaluation.kid_subset_size=4",
                   "evaluation.real_max=8", "task.grid_every_steps=0", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted((tmp_path / "outputs" / "multirun" / "train_stage1").glob("*/[0-9]"))
    assert len(jobs) == 2
    for job, gamma in zip(jobs, ("0.5", "1")):
        assert f"r1_gamma: {gamma}" in (job / "config_resolved.yaml").read_text()
        assert (job / "checkpoints" / "last.ckpt").exists()
        records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["event"] == "train"][-1] == 2
        assert sum(r["event"] == "evaluation" for r in records) == 1


def test_demo_refuses_text_metric_settings_before_any_stage(tmp_path):
    """task.text_eval_samples < 2 (diversity needs pairs) is refused naming the key, before any stage runs."""
    from clipportrait.cli import compose_config
    from clipportrait.errors import UserError
    from clipportrait.tasks import demo
    from clipportrait.tasks.base import RunContext

    cfg = compose_config(["experiment=demo", f"paths.root_dir={tmp_path}", "logger=none", "task.text_eval_samples=1"])
    with pytest.raises(UserError, match=r"task.text_eval_samples=1"):
        demo.run(cfg, RunContext(run_dir=tmp_path / "run"))
    assert not (tmp_path / "outputs").exists()
