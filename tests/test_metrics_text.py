"""CLIP score and prompt diversity: hand computations, the project's tiny open_clip, brute force."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipportrait.lvlm import LVLMConfig, build_clip
from clipportrait.metrics.lpips import build_lpips
from clipportrait.metrics.text import clip_score, diversity


class MeanColourEncoder:
    """A fake CLIP: an image embeds as its unit mean colour, a text as a fixed unit vector."""

    model_id, arch = "fake@mean-colour", "fake"
    TEXTS = {"red": (1.0, 1.0, 0.0), "anti-red": (-1.0, 0.0, 0.0), "blue": (0.0, 0.0, 2.0)}

    def encode_images(self, images):
        return F.normalize(images.mean((2, 3)), dim=-1)

    def encode_text(self, texts):
        return F.normalize(torch.tensor([self.TEXTS[t] for t in texts]), dim=-1)


def _flat(rgb, size=8):
    return torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, size, size)


def test_clip_score_matches_hand_computation_with_a_fake_encoder():
    """Mean colours (0.5,0,0), (0.5,0,0), (0,0.3,0.4): cosines with "red" (1,1,0)/sqrt2, "anti-red"
    (-1,0,0) and "blue" (0,0,1) are 1/sqrt2, -1 (clipped to 0) and 0.8, so the scores are
    70.71, 0, 80; mean 50.24, sample std sqrt(((70.71-m)^2+m^2+(80-m)^2)/2)."""
    images = torch.cat([_flat((0.5, 0.0, 0.0)), _flat((0.5, 0.0, 0.0)), _flat((0.0, 0.3, 0.4))])
    out = clip_score(MeanColourEncoder(), images, ["red", "anti-red", "blue"])
    expected = [100 / math.sqrt(2), 0.0, 80.0]
    assert out["per_image"] == pytest.approx(expected, abs=1e-4)
    mean = sum(expected) / 3
    assert out["clip_score"] == pytest.approx(mean, abs=1e-4)
    assert out["clip_score_std"] == pytest.approx(math.sqrt(sum((e - mean) ** 2 for e in expected) / 2), abs=1e-4)
    assert (out["backbone"], out["arch"], out["num_images"]) == ("fake@mean-colour", "fake", 3)
    # Precomputed, unnormalised text embeddings give the same scores.
    embedded = clip_score(MeanColourEncoder(), images, torch.tensor([[3.0, 3.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]))
    assert embedded["per_image"] == pytest.approx(expected, abs=1e-4) and embedded["text_source"] == "embeddings"


def test_clip_score_with_the_project_tiny_open_clip():
    """On the random-weight clipportrait-tiny, the score equals 100*max(cos,0) computed in float64
    from open_clip's own encode_image/encode_text on the model's preprocessing, and names the model."""
    clip = build_clip(LVLMConfig(arch="clipportrait-tiny", kind="random", weights=None, random_seed=5))
    images = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    texts = ["a person with red hair", "blue eyes", "a bald head", "dark skin"]
    out = clip_score(clip, images, texts)
    with torch.no_grad():
        img = clip.model.encode_image(clip.preprocess_images(images)).double()
        txt = clip.model.encode_text(clip.tokenizer(texts)).double()
    cos = F.cosine_similarity(img, txt, dim=-1)
    assert out["per_image"] == pytest.approx((100 * cos.clamp_min(0)).tolist(), abs=1e-3)
    assert out["backbone"] == clip.model_id and out["arch"] == "clipportrait-tiny"
    embedded = clip_score(clip, images, clip.encode_text(texts))
    assert embedded["clip_score"] == pytest.approx(out["clip_score"], abs=1e-5)


def test_clip_score_refuses_mismatched_inputs():
    images = torch.cat([_flat((0.5, 0.0, 0.0))] * 2)
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        clip_score(MeanColourEncoder(), images, ["red"])
    with pytest.raises(ValueError, match=r"expected \(2, D\)"):
        clip_score(MeanColourEncoder(), images, torch.ones(3, 3))
    with pytest.raises(TypeError, match="one string"):
        clip_score(MeanColourEncoder(), images, "red")


@pytest.fixture(scope="module")
def lpips_alex(offline_cache):
    return build_lpips("alex")


def _random_images(count, seed, size=32):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_diversity_of_identical_samples_is_zero(lpips_alex):
    """Every group holding copies of one image scores 0."""
    base = _random_images(2, 0)
    images = torch.cat([base[:1]] * 3 + [base[1:]] * 2)
    out = diversity(images, ["a", "a", "a", "b", "b"], lpips_alex)
    assert out["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert out["num_pairs"] == 3 + 1 and out["pairs_per_group"] == {"a": 3, "b": 1}


def test_diversity_matches_a_brute_force_double_loop_and_respects_groups(lpips_alex):
    """Mean over groups of the mean LPIPS over i<j pairs, computed one pair at a time, equals the
    batched result; shuffling the images together with their ids changes nothing, while moving an
    image to another group changes the per-group values; singletons are listed and skipped."""
    images = _random_images(7, 1)
    ids = [0, 1, 0, 2, 1, 0, 3]  # groups of 3, 2, 1, 1
    out = diversity(images, torch.tensor(ids), lpips_alex, batch_size=2)
    per_group = {}
    with torch.no_grad():
        for gid in set(ids):
            rows = [k for k, g in enumerate(ids) if g == gid]
            values = [float(lpips_alex(images[i:i + 1], images[j:j + 1])) for a, i in enumerate(rows) for j in rows[a + 1:]]
            if values:
                per_group[gid] = sum(values) / len(values)
    assert out["per_group"] == pytest.approx(per_group, abs=1e-6)
    assert out["diversity"] == pytest.approx(sum(per_group.values()) / len(per_group), abs=1e-6)
    assert sorted(out["singletons"]) == [2, 3] and out["num_groups"] == 2 and out["num_pairs"] == 4
    order = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    shuffled = diversity(images[order], [ids[k] for k in order], lpips_alex)
    assert shuffled["per_group"] == pytest.approx(out["per_group"], abs=1e-6)
    moved = diversity(images, [0, 1, 0, 2, 1, 1, 3], lpips_alex)
    assert moved["per_group"][0] != pytest.approx(out["per_group"][0], abs=1e-4)
    with pytest.raises(ValueError, match="no group has two images"):
        diversity(images[:2], ["x", "y"], lpips_alex)
    with pytest.raises(ValueError, match="3 ids for 7 images"):
        diversity(images, ids[:3], lpips_alex)
