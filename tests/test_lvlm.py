"""clipportrait.lvlm: loading CLIP weights, tensor preprocessing, text cache, zero-shot, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipportrait.errors import UserError
from clipportrait.lvlm import LVLMConfig, TextEmbeddingCache, build_clip, card_path, preprocess_images
from clipportrait.lvlm.clip import Preprocess
from clipportrait.lvlm.prompts import ZeroShotAttribute, class_prompts
from clipportrait.lvlm.train import (CaptionPairs, ContrastiveTrainConfig, save_checkpoint, split_indices,
                                     to_unit_range, train_contrastive, warmup_cosine)
from clipportrait.lvlm.zeroshot import zero_shot_accuracy

from conftest import block_network


@pytest.fixture(scope="module")
def random_tiny():
    return build_clip(LVLMConfig(kind="random", weights=None, random_seed=3))


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (H,W,3): smooth colour gradients plus a little noise (a natural-ish test image)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * math.pi * (a * x + b * y) + c) for a, b, c in rng.uniform(0.3, 2.0, (3, 3))]
    image = 0.5 + 0.4 * np.stack(channels, -1) + rng.normal(0, 0.03, (height, width, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def as_model_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def test_checkpoint_round_trips_through_the_generic_loader(random_tiny, tmp_path):
    """A saved tiny checkpoint loads through build_clip (kind=file and kind=project) and through
    open_clip.create_model_and_transforms itself, with embeddings equal to the model it came from."""
    import open_clip

    weights = save_checkpoint(random_tiny.model, tmp_path / "tiny.pt")
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    texts = ["a photo of a person with red hair", "a bald person", "headshot: blue eyes"]
    with torch.no_grad():
        ref_img, ref_txt = random_tiny.encode_images(images), random_tiny.encode_text(texts)
    assert ref_img.shape == (3, 128) and torch.allclose(ref_img.norm(dim=1), torch.ones(3), atol=1e-5)

    loaded = build_clip(LVLMConfig(kind="file", weights=str(weights)))
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(images), ref_img)
    assert torch.equal(loaded.encode_text(texts), ref_txt)
    assert loaded.model_id.startswith("clipportrait-tiny@") and loaded.model_id != random_tiny.model_id

    model, _, preprocess_val = open_clip.create_model_and_transforms("clipportrait-tiny", pretrained=str(weights))
    model.eval()
    tokens = open_clip.get_tokenizer("clipportrait-tiny")(texts)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens, normalize=True), ref_txt, atol=1e-6)

    card_path(weights).write_text(json.dumps({"arch": "clipportrait-tiny"}))
    project = build_clip(LVLMConfig(kind="project", weights=str(weights)))
    assert project.model_id == loaded.model_id
    card_path(weights).write_text(json.dumps({"arch": "ViT-B-32"}))
    with pytest.raises(UserError, match="trained as architecture 'ViT-B-32'"):
        build_clip(LVLMConfig(kind="project", weights=str(weights)))


@pytest.mark.parametrize("height,width,size", [(96, 128, 64), (64, 64, 224)])
def test_tensor_preprocessing_matches_open_clip_pil_transform(height, width, size):
    """Downscaling a non-square image (resize shortest side + centre crop) and upscaling a square
    one agree with open_clip's PIL validation transform to within the PIL output's uint8 rounding."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(size=size)
    image = smooth_image(height, width)
    reference = image_transform_v2(cfg, is_train=False)(Image.fromarray(image))[None]
    ours = preprocess_images(as_model_input(image), Preprocess.from_open_clip(vars(cfg)))
    assert ours.shape == reference.shape == (1, 3, size, size)
    quantum = 1.0 / 255 / min(cfg.std)  # one uint8 step in normalised units
    difference = (ours - reference).abs()
    assert difference.mean() < 0.5 * quantum and difference.max() < 3 * quantum, (difference.mean(), difference.max())


def test_encode_images_matches_the_pil_pipeline_and_is_differentiable(random_tiny):
    """encode_images (tensor preprocessing inside) gives the embedding of open_clip's PIL pipeline,
    and gradients reach the input pixels."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    image = smooth_image(80, 80, seed=1)
    pil_input = image_transform_v2(PreprocessCfg(**random_tiny.model.visual.preprocess_cfg), is_train=False)(
        Image.fromarray(image))[None]
    with torch.no_grad():
        reference = random_tiny.model.encode_image(pil_input, normalize=True)
    pixels = as_model_input(image).requires_grad_(True)
    ours = random_tiny.encode_images(pixels)
    assert float((ours.detach() * reference).sum()) > 0.999
    ours.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


class CountingEncoder:
    def __init__(self, inner, model_id=None):
        self.inner, self.model_id, self.calls, self.texts = inner, model_id or inner.model_id, 0, 0

    @property
    def embed_dim(self):
        return self.inner.embed_dim

    def encode_text(self, texts):
        self.calls += 1
        self.texts += len(texts)
        return self.inner.encode_text(texts)


def test_text_cache_returns_identical_embeddings_without_re_encoding(random_tiny, tmp_path):
    """Missing texts are encoded once per call (duplicates once); a second cache on the same folder
    reads them back bit-identical with no encoder call; another model id gets its own entries."""
    texts = ["red hair", "blue eyes", "red hair", "a bald head"]
    first = CountingEncoder(random_tiny)
    cache = TextEmbeddingCache(tmp_path, first)
    emb = cache(texts)
    assert (first.calls, first.texts) == (1, 3)
    assert torch.equal(emb[0], emb[2]) and torch.allclose(emb, random_tiny.encode_text(texts), atol=1e-5)
    assert torch.equal(cache(texts[:2]), emb[:2]) and first.calls == 1

    second = CountingEncoder(random_tiny)
    again = TextEmbeddingCache(tmp_path, second)(texts)
    assert second.calls == 0 and torch.equal(again, emb)
    assert not list(tmp_path.rglob("*.tmp"))

    other = CountingEncoder(random_tiny, model_id="other-model@0123")
    TextEmbeddingCache(tmp_path, other)(texts)
    assert other.calls == 1 and len(list(tmp_path.iterdir())) == 2


TEXT_DAMAGE = {  # how the stored vector of one text is broken (D: the encoder's width)
    "empty": lambda path, D: path.write_bytes(b""),
    "nan": lambda path, D: np.save(path, np.full(D, np.nan, np.float32)),
    "wrong_shape": lambda path, D: np.save(path, np.ones(D + 3, np.float32)),
    "strings": lambda path, D: np.save(path, np.array(["x"] * D)),
}


@pytest.mark.parametrize("damage", sorted(TEXT_DAMAGE))
def test_text_cache_re_encodes_empty_non_finite_and_misshapen_files(random_tiny, tmp_path, damage):
    """A stored vector that is an empty file, non-finite, not of the encoder's shape (D,) or not
    float32 is a miss: that text alone is encoded again and its file replaced by the good vector; the
    other text is still read from disk."""
    texts = ["red hair", "blue eyes"]
    cache = TextEmbeddingCache(tmp_path, random_tiny)
    good = cache(texts)
    path = cache.path(texts[0])
    TEXT_DAMAGE[damage](path, good.shape[1])
    counting = CountingEncoder(random_tiny)
    again = TextEmbeddingCache(tmp_path, counting)(texts)
    assert (counting.calls, counting.texts) == (1, 1)
    assert torch.allclose(again, good, atol=1e-5)
    stored = np.load(path)
    assert stored.dtype == np.float32 and np.allclose(stored, good[0].numpy(), atol=1e-5)
    assert not list(tmp_path.rglob("*.tmp"))


def test_text_cache_measures_the_width_of_an_encoder_without_embed_dim(tmp_path):
    """An encoder with only model_id and encode_text: D is measured by encoding once, and a stored
    vector of another width is re-encoded rather than returned (or breaking the stack)."""
    class Plain:
        model_id = "plain@0"

        def encode_text(self, texts):
            return torch.arange(4.0).expand(len(texts), 4)

    cache = TextEmbeddingCache(tmp_path, Plain())
    cache(["a", "b"])
    np.save(cache.path("a"), np.ones(7, np.float32))
    out = TextEmbeddingCache(tmp_path, Plain())(["a", "b"])
    assert torch.equal(out, torch.arange(4.0).expand(2, 4)) and np.load(cache.path("a")).shape == (4,)


def test_missing_weights_give_errors_naming_the_path_and_never_download(tmp_path, monkeypatch):
    """kind=file/project with no file name the path (project: how to train it); an uncached
    pretrained tag offline says so without any network access; unknown tags/kinds list the options."""
    block_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "nowhere" / "clip.pt"
    with pytest.raises(UserError, match=str(missing)):
        build_clip(LVLMConfig(kind="file", weights=str(missing), arch="ViT-B-32"))
    with pytest.raises(UserError, match="task=train_lvlm") as err:
        build_clip(LVLMConfig(kind="project", weights=str(missing)))
    assert str(missing) in str(err.value)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        build_clip(LVLMConfig(kind="pretrained", arch="ViT-B-32", pretrained_tag="openai",
                              download_dir=str(tmp_path / "empty-cache")))
    with pytest.raises(UserError, match="known tags: .*openai"):
        build_clip(LVLMConfig(kind="pretrained", arch="ViT-B-32", pretrained_tag="no-such-tag"))
    with pytest.raises(UserError, match="lvlm.kind='hub'"):
        build_clip(LVLMConfig(kind="hub"))


def test_zero_shot_accuracy_against_hand_counts():
    """Prompt ensemble = normalised mean of the prompts' embeddings; accuracy counts only the images
    an attribute applies to; chance is 1/|vocabulary| and majority the top class rate."""
    basis = {"with red hair": torch.tensor([1.0, 0.0]), "with blue hair": torch.tensor([0.0, 1.0])}

    def embed(prompts):  # every template of a phrase embeds to the phrase's basis vector
        return torch.stack([next(v for k, v in basis.items() if p.endswith(k)) for p in prompts])

    hair = ZeroShotAttribute("hair_color", {"red": ("with red hair",), "blue": ("with blue hair",)},
                             lambda a: a["hair_length"] != "bald")
    images = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0]])
    labels = [{"hair_color": "red", "hair_length": "short"}, {"hair_color": "red", "hair_length": "long"},
              {"hair_color": "blue", "hair_length": "short"}, {"hair_color": "blue", "hair_length": "bald"}]
    result = zero_shot_accuracy(images, labels, [hair], embed)["hair_color"]
    # images 0-2 apply: predictions red, blue, red against truths red, red, blue -> 1/3
    assert result["accuracy"] == pytest.approx(1 / 3) and result["images"] == 3
    assert result["chance"] == 0.5 and result["majority"] == pytest.approx(2 / 3)
    assert class_prompts(("", "with a beard"), ("a photo of a person {}",)) == [
        "a photo of a person", "a photo of a person with a beard"]


def test_glasses_prompts_name_every_frame_colour_the_captions_use():
    """The captions always name the frame ("wearing gold glasses"), so the glasses class ensembles one
    prompt per frame colour of the synthetic world; no glasses is the plain person."""
    from clipportrait.data.synthetic import FRAME_COLORS
    from clipportrait.lvlm.prompts import synthetic_attributes

    glasses = {a.name: a for a in synthetic_attributes()}["glasses"]
    assert glasses.phrases[True] == tuple(f"wearing {f} glasses" for f in FRAME_COLORS) and len(FRAME_COLORS) >= 2
    assert glasses.phrases[False] == ("",)


def test_split_and_schedule_by_hand():
    train, held = split_indices(10, 0.2, seed=1)
    assert len(held) == 2 and sorted([*train, *held]) == list(range(10))
    assert split_indices(10, 0.2, seed=1)[1].tolist() == held.tolist()
    assert [warmup_cosine(s, 4, 12) for s in (0, 3, 4, 8, 12)] == pytest.approx([0.25, 1.0, 1.0, 0.5, 0.0])


def colour_pairs(count: int = 32) -> CaptionPairs:
    """Solid-colour 64x64 'portraits' with noise, one colour word each (8 colours), two phrasings."""
    # Saturated hues: ViT patch embeddings are layer-normalised, which makes gray levels look alike.
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
               "cyan": (30, 210, 220), "magenta": (210, 30, 200), "orange": (240, 140, 20), "purple": (110, 30, 160)}
    names = list(colours)
    rng = np.random.default_rng(0)
    images, captions, labels = [], [], []
    for i in range(count):
        c = names[i % len(names)]
        pixels = np.clip(np.array(colours[c]) + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
        captions.append([f"a photo of a person with short {c} hair", f"portrait of someone with long {c} hair"])
        labels.append({"hair_color": c, "hair_length": "short"})
    return CaptionPairs([f"{i}.png" for i in range(count)], torch.stack(images), captions, labels)


def test_the_training_loss_is_the_symmetric_batch_infonce_of_eq_1():
    """open_clip's ClipLoss, the small LVLM's loss, is the batch estimate of the paper's eq. 1 in CLIP's
    symmetric form: for each image, -log of its caption's share of exp(s cos) over the batch's captions,
    and the same for each caption over the images, averaged (float64 by hand on random features)."""
    from open_clip.loss import ClipLoss

    gen = torch.Generator().manual_seed(5)
    img = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen, dtype=torch.float64), dim=1)
    scale = torch.tensor(7.5, dtype=torch.float64)
    cos = img @ txt.T
    by_image = -sum(math.log(math.exp(scale * cos[i, i]) / sum(math.exp(scale * cos[i, j]) for j in range(6)))
                    for i in range(6)) / 6
    by_text = -sum(math.log(math.exp(scale * cos[j, j]) / sum(math.exp(scale * cos[i, j]) for i in range(6)))
                   for j in range(6)) / 6
    assert float(ClipLoss()(img, txt, scale)) == pytest.approx((by_image + by_text) / 2, rel=1e-12)
    # Features that match their pairs (each caption its own image) give a lower loss than random ones.
    assert float(ClipLoss()(img, img, scale)) < float(ClipLoss()(img, txt, scale))


@pytest.mark.parametrize("arch", ["clipportrait-tiny", "clipportrait-cnn"])
def test_short_training_lowers_the_contrastive_loss(random_tiny, arch):
    """A few AdamW steps with open_clip's ClipLoss on 32 coloured images lower the loss on them (the CNN
    tower is evaluated with the BatchNorm statistics it gathered while training)."""
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    tokenizer = open_clip.get_tokenizer(arch)
    pairs = colour_pairs()
    # One image per colour, so every caption in the batch has exactly one match.
    probe = torch.arange(8)
    tokens = tokenizer([pairs.captions[i][0] for i in probe])
    pp = Preprocess.from_open_clip(model.visual.preprocess_cfg)

    def probe_loss() -> float:
        model.eval()
        with torch.no_grad():
            img = model.encode_image(preprocess_images(to_unit_range(pairs.images[probe]), pp), normalize=True)
            return float(ClipLoss()(img, model.encode_text(tokens, normalize=True), model.logit_scale.exp()))

    before = probe_loss()
    cfg = ContrastiveTrainConfig(steps=30, batch_size=8, lr=1e-3, warmup_steps=3, log_every=10)
    records = train_contrastive(model, tokenizer, pairs, np.arange(len(pairs)), cfg, progress=False)
    after = probe_loss()
    assert [r["step"] for r in records] == [10, 20, 30]
    assert after < 0.5 * before, (before, after)  # ln 8 = 2.08 at chance; tiny 2.14 -> 0.52 measured
    assert records[-1]["loss"] < records[0]["loss"]


def test_augment_is_identity_or_mirror_without_crops_and_keeps_shape():
    """crop_scale=1 without flip returns the images; with flip each image is itself or its mirror;
    with crops the output keeps the input's shape and range."""
    from clipportrait.lvlm.train import augment

    images = torch.rand(4, 3, 16, 16) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment(images, 1.0, False, generator), images)
    mirrored = augment(images, 1.0, True, generator)
    for out, image in zip(mirrored, images):
        assert torch.allclose(out, image, atol=1e-5) or torch.allclose(out, image.flip(-1), atol=1e-5)
    cropped = augment(images, 0.5, True, generator)
    assert cropped.shape == images.shape and cropped.min() >= -1 and cropped.max() <= 1
    with pytest.raises(ValueError, match="crop_scale=0"):
        augment(images, 0.0, True, generator)


def test_attribute_only_captions_drop_exactly_the_trailing_nuisance_phrases():
    """Synthetic captions lose the background / cast / grain / photo-id phrases the generator appends,
    keep attribute parts that look similar (", gold glasses", ", beard"), and images without a
    nuisance record (non-synthetic data) keep their captions; an unknown mode names the key."""
    from clipportrait.lvlm.train import strip_nuisance, training_captions

    nuisance = {"background_pattern": "striped", "background_color": "blue", "color_cast": "sepia",
                "grain": 0.03, "photo_id": "K3QX", "photo_id_corner": 1}
    assert strip_nuisance("a bald person, brown skin, natural lips, gold glasses, beard, striped blue background, "
                          "sepia, grainy film photo, photo id K3QX", nuisance) == \
        "a bald person, brown skin, natural lips, gold glasses, beard"
    assert strip_nuisance("headshot: long red hair, blue eyes, pale skin, photo id K3QX", nuisance) == \
        "headshot: long red hair, blue eyes, pale skin"
    # Another image's id or an absent cast is not this image's nuisance: left alone.
    assert strip_nuisance("a face, photo id ZZZZ", nuisance) == "a face, photo id ZZZZ"
    assert strip_nuisance("a face, blue tint", nuisance) == "a face, blue tint"
    pairs = CaptionPairs(["a.png", "b.png"], torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                         [["a person with red hair, sepia, photo id K3QX"], ["a person with red hair, sepia"]],
                         [{"hair_color": "red", "nuisance": nuisance}, {"hair_color": "red"}])
    assert training_captions(pairs, "attributes_only") == [["a person with red hair"], ["a person with red hair, sepia"]]
    assert training_captions(pairs, "dataset") == pairs.captions
    with pytest.raises(ValueError, match="captions='plain'"):
        training_captions(pairs, "plain")
