"""Stage-1 networks: deformable tri-plane generator G and mesh-conditioned discriminator D."""

from clipportrait.nn.config import (
    PRESETS,
    BackboneConfig,
    DiscriminatorConfig,
    build_discriminator,
    build_generator,
    preset,
)

__all__ = ["PRESETS", "BackboneConfig", "DiscriminatorConfig", "build_discriminator", "build_generator", "preset"]
