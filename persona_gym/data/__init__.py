"""MovieLens data: typed, validated loaders, downloads with checksums, evaluation splits."""

from persona_gym.data.download import ChecksumError, default_data_dir, fetch
from persona_gym.data.movielens import (
    ML1M_OCCUPATIONS,
    ML100K_GENRES,
    DataValidationError,
    RatingsDataset,
    bundled_ml100k_dir,
    detect_format,
    load_dataset,
    load_folder,
    load_ml1m,
    load_ml100k,
    load_ml100k_bundled,
    normalize_title,
)
from persona_gym.data.splits import Split, protocol_split, random_split

__all__ = [
    "ML1M_OCCUPATIONS",
    "ML100K_GENRES",
    "ChecksumError",
    "DataValidationError",
    "RatingsDataset",
    "Split",
    "bundled_ml100k_dir",
    "default_data_dir",
    "detect_format",
    "fetch",
    "load_dataset",
    "load_folder",
    "load_ml1m",
    "load_ml100k",
    "load_ml100k_bundled",
    "normalize_title",
    "protocol_split",
    "random_split",
]
