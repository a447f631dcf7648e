"""Component config files agree with the code's presets, so `backbone=tiny` means the same network
whether it is built from Hydra or from Python."""

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from clipportrait.cli import CONF_DIR
from clipportrait.config import register_configs
from clipportrait.nn.config import PRESETS

register_configs()


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_backbone_and_discriminator_files_equal_presets(name):
    cfg = _compose([f"backbone={name}", f"discriminator={name}"])
    g_preset, d_preset = PRESETS[name]
    assert OmegaConf.to_container(cfg.backbone) == dataclasses.asdict(g_preset)
    assert OmegaConf.to_container(cfg.discriminator) == dataclasses.asdict(d_preset)


def test_component_nodes_are_typed():
    """Group nodes come out as the component dataclasses (so tasks get typed objects)."""
    from clipportrait.data.config import DataConfig
    from clipportrait.geometry.deformation import DeformationConfig
    from clipportrait.nn.config import BackboneConfig

    obj = OmegaConf.to_object(_compose(["task=info", "paths.root_dir=/tmp/x"]))
    assert isinstance(obj.backbone, BackboneConfig)
    assert isinstance(obj.data, DataConfig) and obj.data.path == "/tmp/x/data/synthetic"
    assert isinstance(obj.deformation, DeformationConfig)
