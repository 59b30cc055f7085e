"""The data seam of the training scripts: a source goes in, a dataset of training items comes out.

In: the built-in digits (scikit-learn's bundled 8x8 digits, nothing downloaded), a local folder of image files, or a
`datasets` dataset (a `save_to_disk` folder offline, anything `load_dataset` accepts online, or a stream). Out: items
`{"images": (C, R, R) float in [-1, 1], "labels": int64}` whose randomness (crop, flip) is a pure function of
`(seed, epoch, index)`, so every path, worker, process and resumed run sees the same batches. Memory and start-up do
not grow with the data: small data is decoded once into RAM (`memory`), large data is decoded per batch in DataLoader
workers (`workers`) or read from a uint8 cache built once and memory-mapped by every process (`cache`), and a
`datasets` stream is read shard by shard (`streaming`).

    sources.py     what a source holds, listed without decoding (files; a memory-mapped Arrow table)
    decode.py      one image: decode, convert, resize, crop -> uint8 (C, H, W); many, in parallel
    image_sets.py  the map-style datasets of the three paths, sharing crops, flips and the [-1, 1] conversion
    cache.py       the uint8 cache: built once, atomically, checked before it is read
    streaming.py   `datasets` streaming: shards split over processes, a shuffle buffer, resumable
    build.py       which path runs, and why (`build_dataset`)
    batches.py     the epoch order (`EpochSampler`) and batches drawn on the device (`DeviceBatches`)
    digits.py      the built-in digits
"""

from training.data.batches import DeviceBatches, EpochSampler
from training.data.build import (
    DATA_LOADINGS,
    DATA_SOURCES,
    MEMORY_PATH_MAX_BYTES,
    build_dataset,
    choose_path,
    default_num_workers,
    open_source,
)
from training.data.cache import DataCacheError, default_cache_dir
from training.data.decode import (
    HIGH_BIT_DEPTH_MODES,
    BrokenImageError,
    decode_array,
    image_to_array,
    open_image,
    pil_to_tensor,
    to_model_range,
)
from training.data.digits import (
    DIGITS_NUM_CLASSES,
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    digits_split_indices,
    load_digits_tensors,
)
from training.data.image_sets import CachedImages, DecodingImages, ImageSet, InMemoryImages
from training.data.sources import IMAGE_COLUMNS, IMAGE_EXTENSIONS, LABEL_COLUMNS, list_image_files

__all__ = [
    "BrokenImageError",
    "CachedImages",
    "DATA_LOADINGS",
    "DATA_SOURCES",
    "DIGITS_NUM_CLASSES",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "DataCacheError",
    "DecodingImages",
    "DeviceBatches",
    "EpochSampler",
    "HIGH_BIT_DEPTH_MODES",
    "IMAGE_COLUMNS",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "InMemoryImages",
    "LABEL_COLUMNS",
    "MEMORY_PATH_MAX_BYTES",
    "build_dataset",
    "choose_path",
    "decode_array",
    "default_cache_dir",
    "default_num_workers",
    "digits_split_indices",
    "image_to_array",
    "list_image_files",
    "load_digits_tensors",
    "open_image",
    "open_source",
    "pil_to_tensor",
    "to_model_range",
]
