"""Synthetic portrait generator: determinism, resumability, ground truth consistent with pixels."""

import copy
import json

import numpy as np
import pytest
import torch

from clipportrait.data.config import SyntheticConfig
from clipportrait.data.format import REGION_IDS, check_dataset, read_index
from clipportrait.data.synthetic import PortraitRenderer, default_model, generate_synthetic, sample_item
from clipportrait.geometry.morphable import ProceduralHead


def _cfg(**kw):
    base = dict(num_images=6, resolution=32, render_batch=4, seed=3, captions_per_image=3, workers=1)
    base.update(kw)
    return SyntheticConfig(**base)


def _all_bytes(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_synthetic(_cfg(), tmp_path_factory.mktemp("syn") / "ds")


def test_dataset_is_valid_with_captions_and_masks(dataset):
    """The generated dataset passes check_dataset, has masks and per-image attributes with the
    requested number of captions that mention the sampled hair colour or baldness."""
    assert check_dataset(dataset) == []
    index = read_index(dataset)
    assert len(index) == 6 and index.has_masks
    assert (dataset / "contact_sheet.png").is_file()
    for name in index.names:
        item = index.attributes[name]
        assert len(item["captions"]) == 3
        a = item["attributes"]
        word = "bald" if a["hair_length"] == "bald" else a["hair_color"]
        assert any(word in c for c in item["captions"])


def test_deterministic_bytes(dataset, tmp_path):
    """Same config -> byte-identical files; another seed -> different images; two worker
    processes -> the bytes of one."""
    again = generate_synthetic(_cfg(), tmp_path / "again")
    assert _all_bytes(dataset) == _all_bytes(again)
    other = generate_synthetic(_cfg(seed=4), tmp_path / "other")
    parallel = generate_synthetic(_cfg(render_batch=2, workers=2), tmp_path / "parallel")
    serial = generate_synthetic(_cfg(render_batch=2), tmp_path / "serial")
    assert _all_bytes(parallel) == _all_bytes(serial)
    assert (dataset / "images/000000.png").read_bytes() != (other / "images/000000.png").read_bytes()


def test_killed_run_leaves_nothing_and_resumes(dataset, tmp_path, monkeypatch):
    """A run killed after its first batch leaves no dataset at the output path (check_dataset
    refuses it); a rerun finishes it with exactly the bytes of an uninterrupted run."""
    calls = {"n": 0}
    original = PortraitRenderer.render

    def dying_render(self, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, items)

    monkeypatch.setattr(PortraitRenderer, "render", dying_render)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(_cfg(), tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and check_dataset(tmp_path / "ds")
    monkeypatch.setattr(PortraitRenderer, "render", original)
    resumed = generate_synthetic(_cfg(), tmp_path / "ds")
    assert _all_bytes(resumed) == _all_bytes(dataset)


def test_existing_dataset_with_other_config_refused(dataset):
    """Asking for a dataset at a path that holds one made with another config or another head model
    is an error; the same config and head reuse it."""
    with pytest.raises(FileExistsError, match="another config"):
        generate_synthetic(_cfg(glasses_prob=0.9), dataset)
    with pytest.raises(FileExistsError, match="head model"):
        generate_synthetic(_cfg(), dataset, model=ProceduralHead(canonical_jaw_angle=0.2))
    assert generate_synthetic(_cfg(), dataset) == dataset  # same config: reused as is


def test_head_identity_survives_float_rounding_across_machines(dataset):
    """A dataset rendered on another machine, whose float buffers of the same head differ in the last
    bits (1e-7 relative was seen between the CPU and the GPU machine), is still the same head: the
    exact fingerprint differs, the signature matches. A different head (a changed float buffer or
    face list) is not."""

    from clipportrait.data.synthetic import RECIPE_FILE, model_fingerprint, same_head
    from clipportrait.data.zipfs import DatasetFiles

    recipe = json.loads(DatasetFiles(dataset).read_bytes(RECIPE_FILE))
    model = default_model()
    assert same_head(recipe, model)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        rounded.v_template.mul_(1 + 1e-7)
    assert model_fingerprint(rounded) != recipe["model"]
    assert same_head(recipe, rounded)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.v_template.mul_(1.01)
    assert not same_head(recipe, other)
    faces = copy.deepcopy(model)
    faces.faces = faces.faces.flip(-1)
    assert not same_head(recipe, faces)
    assert not same_head({"model": "0" * 64}, rounded)  # an old recipe without a signature: exact only


def test_bad_config_rejected(tmp_path):
    """Invalid config values are errors naming the field."""
    with pytest.raises(ValueError, match="hair_lengths"):
        generate_synthetic(_cfg(hair_lengths=["purple"]), tmp_path / "x")
    with pytest.raises(ValueError, match="resolution"):
        generate_synthetic(_cfg(resolution=4), tmp_path / "x")


def test_nuisance_captions_switch():
    """With nuisance captions on, some captions carry nuisance phrases (background, photo id);
    with every nuisance switched off no caption mentions them."""
    on = [c for i in range(10) for c in sample_item(_cfg(), i).captions]
    assert any("background" in c for c in on) and any("photo id" in c for c in on)
    off_cfg = _cfg(nuisance_captions=False)
    off = [c for i in range(10) for c in sample_item(off_cfg, i).captions]
    assert not any("background" in c or "photo id" in c or "tint" in c for c in off)


def test_masks_are_where_the_attributes_are():
    """Without anti-aliasing (one sample per pixel, so each mask pixel is the region of exactly the
    surface that coloured it): changing only the hair colour changes pixels only inside the
    hair/brow/beard masks, and red hair is red there; changing only the eye colour changes pixels
    only inside the eye mask."""
    cfg = _cfg(resolution=64, background_pattern=False, color_cast=False, noise_grain=False, photo_id_patch=False)
    renderer = PortraitRenderer(default_model(), 64, 1)
    base = sample_item(cfg, 0)
    base.attributes.update(hair_length="long", hair_color="red", eye_color="brown", beard=False, glasses=False)
    base.yaw = 0.0
    blue_hair = copy.deepcopy(base)
    blue_hair.attributes["hair_color"] = "blue"
    blue_eyes = copy.deepcopy(base)
    blue_eyes.attributes["eye_color"] = "blue"
    images, masks, _ = renderer.render([base, blue_hair, blue_eyes])
    images = images.astype(int)
    hair = np.isin(masks[0], [REGION_IDS["hair"], REGION_IDS["brows"], REGION_IDS["beard"]])
    # Items of one batch may differ by a level or two from float rounding (batched matmuls).
    changed = np.abs(images[0] - images[1]).sum(-1) > 6
    assert hair.sum() > 100 and changed.sum() > 0.8 * (masks[0] == REGION_IDS["hair"]).sum()
    assert not (changed & ~hair).any()
    red = images[0][masks[0] == REGION_IDS["hair"]].mean(0)
    assert red[0] > 1.5 * red[2]
    eyes = masks[0] == REGION_IDS["eyes"]
    changed_eyes = np.abs(images[0] - images[2]).sum(-1) > 6
    assert eyes.sum() > 4 and changed_eyes.any()
    assert not (changed_eyes & ~eyes).any()


def test_attribute_json_records_ground_truth(dataset):
    """attributes.json stores the sampled attributes and nuisances of each image as sample_item
    draws them (so ground truth can be regenerated and checked)."""
    items = json.loads((dataset / "attributes.json").read_text())["items"]
    spec = sample_item(_cfg(), 4)
    stored = items["images/000004.png"]
    assert stored["captions"] == spec.captions
    assert stored["attributes"]["nuisance"] == spec.nuisance
    assert {k: v for k, v in stored["attributes"].items() if k != "nuisance"} == spec.attributes


def test_large_batches_split_by_pixel_budget(monkeypatch):
    """A batch above the raster pixel budget is rendered in groups: bit-identical to rendering each
    group as its own batch, in the original order."""
    import clipportrait.data.synthetic as synthetic

    renderer = PortraitRenderer(default_model(), 16, 1)
    items = [sample_item(_cfg(resolution=16), i) for i in range(5)]
    monkeypatch.setattr(synthetic, "MAX_RASTER_PIXELS", 2 * 16 * 16)
    images, masks, labels = renderer.render(items)
    assert images.shape == (5, 16, 16, 3) and masks.shape == (5, 16, 16) and labels.shape == (5, 25)
    monkeypatch.setattr(synthetic, "MAX_RASTER_PIXELS", 2**22)
    alone = [renderer.render(items[i : i + 2]) for i in (0, 2, 4)]
    assert np.array_equal(images, np.concatenate([a[0] for a in alone]))
    assert np.array_equal(masks, np.concatenate([a[1] for a in alone]))
    assert torch.equal(labels, torch.cat([a[2] for a in alone]))
