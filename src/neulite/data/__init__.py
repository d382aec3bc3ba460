"""Data sets, their partition among clients, and batch augmentation."""

from neulite.data.augment import random_crop_flip
from neulite.data.datasets import (
    DATASET_NAMES,
    DataFactory,
    DataSplits,
    TensorDataset,
    from_arrays,
    load_dataset,
    register_dataset,
    subsample,
)
from neulite.data.partition import SCHEMES, partition, train_val_split

__all__ = [
    "DATASET_NAMES",
    "SCHEMES",
    "DataFactory",
    "DataSplits",
    "TensorDataset",
    "from_arrays",
    "load_dataset",
    "partition",
    "random_crop_flip",
    "register_dataset",
    "subsample",
    "train_val_split",
]
