"""The oracle canonicaliser (task.embed=oracle): each synthetic item re-rendered with its own
appearance and nuisances under the neutral camera and the canonical mesh (eq. 10's x_hat, exactly)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from clipportrait.canonical.oracle import SyntheticOracle
from clipportrait.data.config import SyntheticConfig
from clipportrait.data.synthetic import PortraitRenderer, default_model, generate_synthetic, sample_item
from clipportrait.errors import UserError

RES = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle") / "syn"
    cfg = SyntheticConfig(num_images=4, resolution=RES, workers=1, contact_sheet=False, seed=11)
    return generate_synthetic(cfg, path), cfg


def test_oracle_renders_each_item_canonically(data):
    path, cfg = data
    model = default_model()
    oracle = SyntheticOracle(path, model, RES)
    images = oracle(["images/000002.png", "images/000000.png"])
    assert images.shape == (2, 3, RES, RES) and images.min() >= -1 and images.max() <= 1
    # Reference: the item of index 2 drawn by hand, camera and geometry set to the canonical ones.
    item = sample_item(cfg, 2)
    pose = np.zeros(6, np.float32)
    pose[3] = float(model.canonical_jaw_angle)
    canonical = dataclasses.replace(item, yaw=0.0, pitch=0.0, shape=np.zeros(100, np.float32),
                                    expression=np.zeros(50, np.float32), pose=pose)
    reference, _, labels = PortraitRenderer(model, RES, cfg.supersample).render([canonical])
    expected = torch.from_numpy(reference[0]).permute(2, 0, 1).float() / 127.5 - 1.0
    # Batched rasterisation rounds a few pixels differently: at most one uint8 level apart.
    assert (images[0] - expected).abs().max() <= 1.01 / 127.5
    # The posed dataset image of the same item is another picture (camera, identity, expression).
    posed, _, _ = PortraitRenderer(model, RES, cfg.supersample).render([item])
    assert np.abs(posed[0].astype(int) - reference[0].astype(int)).mean() > 2


def test_oracle_refuses_data_it_cannot_reproduce(data, tmp_path):
    path, _ = data
    oracle = SyntheticOracle(path, default_model(), RES)
    with pytest.raises(UserError, match="not named like a synthetic item"):
        oracle(["photos/a.png"])
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "dataset.json").write_text('{"labels": []}')
    with pytest.raises(UserError, match="needs a synthetic dataset"):
        SyntheticOracle(plain, default_model(), RES)
