"""Which path holds the training images, and why: the one decision of the data seam (`build_dataset`).

- `memory`: small data (the built-in digits; image files whose uint8 pixels take at most `MEMORY_PATH_MAX_BYTES`),
  decoded once, in parallel, before the first update; an epoch only indexes RAM.
- `cache`: a uint8 cache built before (or asked for with `--data_loading cache`), memory-mapped: start-up reads
  only its index, memory holds only what a batch touches.
- `workers`: everything else: images decoded per batch in DataLoader workers; start-up and memory flat in the data.
"""

import os
from typing import Optional

from training.data import cache as data_cache
from training.data.decode import decode_many
from training.data.digits import load_digits_tensors
from training.data.image_sets import CachedImages, DecodingImages, InMemoryImages
from training.data.sources import FolderSource, open_datasets_source

DATA_SOURCES = ("digits", "image_folder", "datasets")
DATA_LOADINGS = ("auto", "memory", "workers", "cache")  # --data_loading: dispatch and error messages
# `--data_loading auto` holds image files in RAM up to this many bytes of uint8 pixels per process.
MEMORY_PATH_MAX_BYTES = 256 * 2**20
# Non-square images keep their longer side until the random crop of each epoch: about this much more pixels.
UNCROPPED_FACTOR = 4 / 3


def open_source(
    dataset_name=None,
    train_data_dir=None,
    dataset_config_name=None,
    cache_dir=None,
    image_column=None,
    label_column=None,
    max_train_samples: Optional[int] = None,
):
    """The source named by the flags (None for the built-in digits), cut to `max_train_samples` before decoding."""
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError(f"pass only one of --dataset_name={dataset_name!r} and --train_data_dir={train_data_dir!r}.")
    if dataset_name in (None, "digits") and train_data_dir is None:
        return None
    if train_data_dir is not None:
        source = FolderSource(train_data_dir)
    else:
        source = open_datasets_source(
            dataset_name, dataset_config_name, cache_dir, "train", image_column, label_column
        )
    return source if max_train_samples is None else source.head(max_train_samples)


def pixel_bytes(num_images: int, channels: int, resolution: int, center_crop: bool) -> int:
    """About how many bytes the uint8 pixels of `num_images` images take (more without a center crop)."""
    return int(num_images * channels * resolution * resolution * (1 if center_crop else UNCROPPED_FACTOR))


def default_num_workers(path: str, local_processes: int = 1) -> int:
    """DataLoader workers per process when `--dataloader_num_workers` is not given: the CPU cores shared by the
    local processes, one left for each training process (at least 1, at most 8) on the workers path; 0 in memory;
    at most 2 on the cache (reading a memory map costs little)."""
    if path == "memory":
        return 0
    share = max(1, min(8, (os.cpu_count() or 1) // max(1, local_processes) - 1))
    return share if path == "workers" else min(2, share)


def choose_path(requested: str, source, cache_dir: str, key: Optional[dict], channels, resolution, center_crop):
    """`(path, reason)` for `--data_loading requested`; `auto` prefers a cache built before, then RAM if small.

    `key` is the data's `cache.cache_key` (which hashes every file's size and time) when `auto` may read a cache, None
    when it may not (`--preserve_input_precision`: a cache holds 8 bits) or when the path is given explicitly.
    """
    if requested not in DATA_LOADINGS:
        raise ValueError(f"--data_loading={requested!r} is not supported; choose one of {DATA_LOADINGS}.")
    if source is None:
        return "memory", "the built-in digits are small: decoded once and held in RAM"
    size = pixel_bytes(len(source), channels, resolution, center_crop)
    described = f"{len(source)} images, about {size / 1e6:.0f} MB of uint8 pixels"
    if requested != "auto":
        return requested, f"--data_loading {requested} ({described})"
    if key is not None:
        folder = data_cache.cache_folder(cache_dir, key)
        if os.path.exists(os.path.join(folder, data_cache.META)):
            return "cache", f"a data cache of this data was built before ({folder})"
    if size <= MEMORY_PATH_MAX_BYTES:
        return "memory", f"{described}: at most {MEMORY_PATH_MAX_BYTES // 2**20} MiB, held in RAM"
    return "workers", (
        f"{described}: more than {MEMORY_PATH_MAX_BYTES // 2**20} MiB, decoded per batch in DataLoader workers "
        "(--data_loading cache decodes them once into a uint8 cache that later runs reuse)"
    )


def build_dataset(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    resolution: int = 16,
    channels: int = 1,
    center_crop: bool = False,
    random_flip: bool = False,
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    skip_broken_images: bool = False,
    seed: int = 0,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    max_train_samples: Optional[int] = None,
    data_loading: str = "auto",
    data_cache_dir: Optional[str] = None,
    num_workers: Optional[int] = None,
    local_processes: int = 1,
    eight_bit_ok: bool = True,
    builder: bool = True,
    failure_marker: Optional[str] = None,
):
    """Build the training set from the flags of `train_unconditional.py`; the built-in digits when neither is given.

    Args:
        dataset_name (`str`, *optional*): `"digits"` for the built-in digits, a `save_to_disk` folder, or a name for
            `datasets.load_dataset`.
        train_data_dir (`str`, *optional*): a folder of image files (searched recursively).
        resolution (`int`, defaults to 16): side of the square training images.
        channels (`int`, defaults to 1): 1 (grayscale) or 3 (RGB); the built-in digits are always 1 channel.
        center_crop (`bool`): crop the center after resizing (else a random crop per epoch).
        random_flip (`bool`): flip horizontally with probability 1/2 per epoch.
        skip_broken_images (`bool`): skip unreadable files (counted, or replaced and named on the workers path)
            instead of raising `BrokenImageError`.
        seed (`int`): seed of crops and flips.
        max_train_samples (`int`, *optional*): keep the first N items, cut before anything is decoded.
        data_loading (`str`, defaults to `"auto"`): one of `DATA_LOADINGS` (see `choose_path`).
        data_cache_dir (`str`, *optional*): where the uint8 caches live (default `cache.default_cache_dir()`).
        num_workers (`int`, *optional*): processes that decode (default `default_num_workers`).
        local_processes (`int`): training processes on this machine (they share its cores).
        eight_bit_ok (`bool`, defaults to True): whether `auto` may read a cache (8 bits per channel); False with
            `--preserve_input_precision`.
        builder (`bool`): whether this process builds a missing cache (the local main one); the others wait.
        failure_marker (`str`, *optional*): the file a failed builder writes, which ends the others' wait.

    Returns:
        An `ImageSet` (`InMemoryImages`, `DecodingImages` or `CachedImages`) with `path`, `reason` and
        `num_workers` (the DataLoader workers it wants) set.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is not supported; choose one of (1, 3).")
    source = open_source(
        dataset_name, train_data_dir, dataset_config_name, cache_dir, image_column, label_column, max_train_samples
    )
    data_cache_dir = data_cache_dir or data_cache.default_cache_dir()
    key = None  # computed once, and only where a cache may be read: it stats every file
    if source is not None and (data_loading == "cache" or (data_loading == "auto" and eight_bit_ok)):
        key = data_cache.cache_key(source, resolution, channels, center_crop)
    path, reason = choose_path(data_loading, source, data_cache_dir, key, channels, resolution, center_crop)
    workers = default_num_workers(path, local_processes) if num_workers is None else num_workers
    if source is None:
        if channels != 1:
            raise ValueError(f"the built-in digits have 1 channel; got channels={channels!r}.")
        images, labels = load_digits_tensors(resolution, "train")
        if max_train_samples is not None:
            images, labels = images[:max_train_samples], labels[:max_train_samples]
        dataset = InMemoryImages(images, labels, resolution, random_flip, seed, prescaled=True)
    elif path == "memory":
        decoded = decode_many(
            source,
            resolution,
            channels,
            center_crop,
            skip_broken_images,
            workers or max(1, (os.cpu_count() or 1) // max(1, local_processes)),  # every local process decodes
            "decoding images",
            disable=not builder,
        )
        dataset = InMemoryImages.from_decoded(decoded, source, channels, resolution, random_flip, seed)
    elif path == "workers":
        dataset = DecodingImages(source, channels, center_crop, resolution, random_flip, seed, skip_broken_images)
    else:
        cache = data_cache.ensure_cache(
            source, key, data_cache_dir, skip_broken_images, max(1, os.cpu_count() or 1), builder, failure_marker
        )
        dataset = CachedImages(cache, resolution, random_flip, seed)
    dataset.reason, dataset.num_workers = reason, workers
    return dataset
