"""Typed configs of the data group: what to read (`DataConfig`) and how to synthesise the embedded
default dataset (`SyntheticConfig`). Both are plain dataclasses so Hydra's ConfigStore can type-check
overrides (``data.batch_size=16``) before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DATA_KINDS = ("synthetic", "folder", "ffhq")


@dataclass
class SyntheticConfig:
    """Recipe of the synthetic portrait world (DESIGN.md section 5).

    Appearance attributes are sampled per image; each nuisance switch turns one image-level nuisance
    factor on (it is then drawn per image and may also appear in captions as an interrogator-style
    phrase when ``nuisance_captions`` is set).
    """

    num_images: int = 2000
    resolution: int = 128
    seed: int = 0
    render_batch: int = 16  # images rasterised together
    workers: int = 2  # rendering processes (one thread each); the output bytes do not depend on it
    supersample: int = 2  # render at supersample*resolution and box-filter down (anti-aliasing)
    captions_per_image: int = 4
    nuisance_captions: bool = True  # append phrases such as "shot on film, grainy, blue tint"
    background_pattern: bool = True
    color_cast: bool = True
    noise_grain: bool = True
    photo_id_patch: bool = True
    hair_lengths: list[str] = field(default_factory=lambda: ["bald", "short", "medium", "long"])  # drawn uniformly
    glasses_prob: float = 0.25
    beard_prob: float = 0.25
    shape_std: float = 1.0  # identity coefficients ~ N(0, shape_std^2) in the model's units
    expression_std: float = 0.6
    jaw_open_max: float = 0.25  # radians; jaw pitch ~ U(0, jaw_open_max)
    yaw_std: float = 0.3  # FFHQ-like camera sampling (geometry.cameras.sample_ffhq_like)
    pitch_std: float = 0.15
    write_masks: bool = True
    as_zip: bool = False  # write an uncompressed zip instead of a folder
    contact_sheet: bool = True


@dataclass
class DataConfig:
    """Where the training images come from and how they are served.

    kind: ``synthetic`` (generated into ``path`` by ``prepare_data`` when missing, from
    ``synthetic``), ``folder`` (an existing dataset folder or zip in the format of
    ``clipportrait.data.format``), ``ffhq`` (same format, produced by the preprocessing task).
    """

    kind: str = "synthetic"
    path: str = "${paths.data_dir}/synthetic"
    resolution: int = 128
    batch_size: int = 8
    num_workers: int = 2
    flip: bool = True  # x-flip augmentation: doubles the dataset with mirrored copies
    skip_bad: bool = False  # train on the good items of a dataset with problems (logged) instead of refusing
    verify_pixels: bool = True  # decode every image when checking the dataset (False: headers only, faster)
    clip_cache: Optional[str] = None  # .npz with `names` and `embeddings`, or a task=canonicalize cache directory
    seed: int = 0  # shuffling seed (DistributedSampler) and conditioning-sampler seed
    pin_memory: bool = False
    persistent_workers: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
