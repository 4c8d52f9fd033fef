"""Images and normalisation: the dataset readers, normalisation presets and test images everyone uses."""

from micronet.data.datasets import (
    DATASETS,
    ImageSet,
    dataset_stats,
    detect_layout,
    holdout_amount,
    load_dataset,
    split_holdout,
    stratified_splits,
    subsample,
    test_images,
    training_split,
)
from micronet.data.device import host_to_device
from micronet.data.normalization import (
    NORMALIZATIONS,
    TRAIN_STATS,
    Normalization,
    get_normalization,
    normalization_from_record,
    normalization_record,
    train_stats,
)

__all__ = [
    "DATASETS", "NORMALIZATIONS", "TRAIN_STATS", "ImageSet", "Normalization", "dataset_stats", "detect_layout",
    "get_normalization", "holdout_amount", "host_to_device", "load_dataset", "normalization_from_record",
    "normalization_record",
    "split_holdout", "stratified_splits", "subsample", "test_images", "train_stats", "training_split",
]
