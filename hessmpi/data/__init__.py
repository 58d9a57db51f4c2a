"""Data: hessmpi's datasets, arrays and .npz files, tf.data streams, and the split of rows over ranks."""

from .datasets import DATASETS, Dataset, cache_dir, describe, keras_cache, load, read_idx
from .samples import Data, LocalShard, Stream, as_samples, load_npz
from .shard import ownership, shard_range

__all__ = ["DATASETS", "Data", "Dataset", "LocalShard", "Stream", "as_samples", "cache_dir", "describe",
           "keras_cache", "load", "load_npz", "ownership", "read_idx", "shard_range"]
