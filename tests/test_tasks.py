"""Smoke tests of the data tasks and the demo through the real entry point (run.py)."""

from __future__ import annotations

import json

import pytest

TINY = ["data.synthetic.num_images=8", "data.synthetic.resolution=32", "data.synthetic.workers=1",
        "print_config=false", "logger=none"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_demo_runs_every_stage_and_skips_them_on_rerun(run_cli, tmp_path):
    """experiment=demo at toy size runs data → check → geometry → generator → metrics, writes the
    index page with its images, records FID/KID with the protocol, and a rerun skips every stage."""
    args = ["experiment=demo", *TINY, "task.preview_samples=2", "task.fid_samples=4", "task.overlay_size=64",
            "deformation=none"]
    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    demo = tmp_path / "outputs" / "demo"
    index = (demo / "index.md").read_text()
    for stage in ("data", "check", "geometry", "generator", "metrics"):
        assert (demo / stage / "result.json").exists()
        assert f"## {stage}" in index
    for image in ("geometry/overlays.png", "geometry/mesh_renders.png", "generator/generator.png"):
        assert (demo / image).stat().st_size > 0 and image in index
    fid = json.loads((demo / "metrics" / "result.json").read_text())
    assert fid["fid"] == fid["fid"] and fid["fid"] >= 0  # finite, not NaN
    assert fid["protocol"]["feature_sha256"]

    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("done earlier, skipped") == 5
