"""Images and normalisation: the dataset readers, normalisation presets and test images everyone uses."""

from micronet.data.datasets import (
    DATASETS,
    ImageSet,
    detect_layout,
    load_dataset,
    split_holdout,
    stratified_splits,
    test_images,
)
from micronet.data.device import host_to_device
from micronet.data.normalization import NORMALIZATIONS, Normalization, get_normalization

__all__ = [
    "DATASETS", "NORMALIZATIONS", "ImageSet", "Normalization", "detect_layout", "get_normalization",
    "host_to_device", "load_dataset", "split_holdout", "stratified_splits", "test_images",
]
