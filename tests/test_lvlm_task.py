"""task=train_lvlm through the real entry point (run.py), on a tiny synthetic dataset."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow(seconds=8)
def test_train_lvlm_generates_data_trains_saves_a_loadable_checkpoint_and_reports_zero_shot(run_cli, tmp_path):
    """With no dataset at data.path, train_lvlm renders one, trains a few steps, writes the checkpoint
    and its card (data hash, steps, per-attribute accuracy vs chance), logs zero-shot accuracy to
    metrics.jsonl, and build_clip loads the checkpoint as lvlm.kind=project."""
    weights = tmp_path / "lvlm" / "tiny.pt"
    proc = run_cli("task=train_lvlm", "data.synthetic.num_images=12", "data.synthetic.resolution=32",
                   "data.synthetic.workers=1", "print_config=false", "logger=none", "task.steps=3",
                   "task.batch_size=4", "task.val_fraction=0.25", f"lvlm.weights={weights}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "data" / "synthetic" / "attributes.json").exists()
    card = json.loads((tmp_path / "lvlm" / "tiny.card.json").read_text())
    assert card["arch"] == "clipportrait-tiny" and card["steps"] == 3 and len(card["data"]["sha256"]) == 64
    assert card["data"]["held_out_images"] == 3 and card["data"]["train_images"] == 9
    hair = card["zero_shot"]["hair_length"]
    assert 0.0 <= hair["accuracy"] <= 1.0 and hair["chance"] == 0.25
    records = [json.loads(line) for path in tmp_path.glob("outputs/runs/train_lvlm/*/metrics.jsonl")
               for line in path.read_text().splitlines()]
    zero_shot = [r for r in records if r.get("event") == "train_lvlm/zero_shot"]
    assert len(zero_shot) == 1 and zero_shot[0]["model_id"] == card["model_id"]
    assert [r["step"] for r in records if r.get("event") == "train_lvlm/step"] == [3]

    from clipportrait.lvlm import LVLMConfig, build_clip

    encoder = build_clip(LVLMConfig(kind="project", weights=str(weights)))
    assert encoder.model_id == card["model_id"]
