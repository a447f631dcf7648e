"""Data: the dataset format, the synthetic portrait world and the training DataModule."""

from .config import DataConfig, SyntheticConfig
from .datamodule import ConditioningSampler, PortraitDataModule, PortraitDataset, observation_vertices
from .format import REGION_IDS, DatasetError, Problem, check_dataset, read_index, write_dataset
from .synthetic import generate_synthetic

__all__ = [
    "DataConfig", "SyntheticConfig", "ConditioningSampler", "PortraitDataModule", "PortraitDataset",
    "observation_vertices", "REGION_IDS", "DatasetError", "Problem", "check_dataset", "read_index",
    "write_dataset", "generate_synthetic",
]
