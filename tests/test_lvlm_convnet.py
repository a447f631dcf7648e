"""clipportrait.lvlm.convnet: the plain CNN image tower and the clipportrait-cnn open_clip config."""

from __future__ import annotations

import json

import pytest
import torch

from clipportrait.lvlm import LVLMConfig, build_clip, card_path
from clipportrait.lvlm.convnet import PortraitConvNet
from clipportrait.lvlm.models import register_project_models
from clipportrait.lvlm.train import save_checkpoint


def test_trunk_keeps_full_resolution_in_its_first_conv_and_pools_by_the_mean():
    """The stem conv has stride 1 (thin frames are seen at 64x64), four stride-2 stages leave 4x4 maps of
    16 x width channels, and forward is the spatial mean of those maps (then the head when it has one)."""
    torch.manual_seed(0)
    net = PortraitConvNet(width=4).eval()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].stride == (1, 1) and [c.stride[0] for c in convs].count(2) == 4
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        maps = net.forward_features(x)
        assert maps.shape == (3, 64, 4, 4) and net.num_features == 64
        assert torch.allclose(net(x), maps.double().mean(dim=(2, 3)).float(), atol=1e-6)
        net.reset_classifier(5)
        assert torch.allclose(net(x), net.head(maps.mean(dim=(2, 3))), atol=1e-6) and net(x).shape == (3, 5)
        net.reset_classifier(0, global_pool="")
        assert torch.equal(net(x), maps)


def test_trunk_rejects_what_it_cannot_do():
    """Unsupported pooling, a head without pooling, and pretrained weights are errors that say why."""
    net = PortraitConvNet(width=2)
    with pytest.raises(ValueError, match="global_pool='max'"):
        net.reset_classifier(0, global_pool="max")
    with pytest.raises(ValueError, match="needs pooled features"):
        net.reset_classifier(3, global_pool="")
    with pytest.raises(ValueError, match="width=0"):
        PortraitConvNet(width=0)
    import timm

    register_project_models()
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("clipportrait_convnet_w8", pretrained=True)


def test_open_clip_builds_the_cnn_config_and_its_checkpoint_round_trips(tmp_path):
    """open_clip builds clipportrait-cnn with the project trunk inside its timm tower; a saved checkpoint
    (BatchNorm running statistics included) loads through build_clip and open_clip's own loader with
    identical embeddings."""
    import open_clip

    register_project_models()
    torch.manual_seed(1)
    model = open_clip.create_model("clipportrait-cnn")
    assert isinstance(model.visual.trunk, PortraitConvNet)
    model.train()
    with torch.no_grad():  # move the BatchNorm statistics away from their initial values
        model.encode_image(torch.randn(8, 3, 64, 64) * 2 + 0.5)
    model.eval()
    assert any("running_mean" in k for k in model.state_dict())
    weights = save_checkpoint(model, tmp_path / "cnn.pt")
    card_path(weights).write_text(json.dumps({"arch": "clipportrait-cnn"}))
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    texts = ["a photo of a person wearing gold glasses", "headshot of a person with a beard"]
    tokens = open_clip.get_tokenizer("clipportrait-cnn")(texts)
    pp_model = build_clip(LVLMConfig(kind="project", arch="clipportrait-cnn", weights=str(weights)))
    assert pp_model.model_id.startswith("clipportrait-cnn@") and pp_model.embed_dim == 128
    with torch.no_grad():
        reference = pp_model.encode_images(images)
        reloaded, _, _ = open_clip.create_model_and_transforms("clipportrait-cnn", pretrained=str(weights))
        reloaded.eval()
        assert torch.allclose(reloaded.encode_text(tokens, normalize=True), model.encode_text(tokens, normalize=True))
        for name, tensor in model.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor), name
    again = build_clip(LVLMConfig(kind="file", arch="clipportrait-cnn", weights=str(weights)))
    with torch.no_grad():
        assert torch.equal(again.encode_images(images), reference)
