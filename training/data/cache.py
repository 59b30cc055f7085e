"""The uint8 cache: the resized images of a source, decoded once (in parallel) and memory-mapped by every process.

Layout of one cache, `<data_cache_dir>/<key>/`:

    pixels.u8     every image's uint8 (C, H, W) bytes, back to back
    index.npy     (N, 4) int64: byte offset, C, H, W of each image
    labels.npy    (N,) int64, when the source has labels
    meta.json     written last: the key's ingredients, N, the byte count, the index's sha256, skipped files

The key hashes the source's fingerprint (every file's path, size and mtime, or the dataset's fingerprint) and every
flag that shapes the pixels (resolution, channels, center crop, max_train_samples), so a changed flag or file gets a
new cache. A cache is built in a temporary folder beside its final place and renamed into it (one filesystem
operation): a kill, a full disk or a broken file leaves no half-written cache, and two runs building the same cache
at once both end with a complete one. Before it is read, a cache is checked against its meta.json (sizes, the index's
hash); one that fails (a truncated file, a missing meta.json) is removed and rebuilt, never read.
"""

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
import uuid
from typing import List, Optional

import numpy as np
import torch

from training.data.decode import decode_many

logger = logging.getLogger("train_unconditional")

CACHE_VERSION = 1
PIXELS, INDEX, LABELS, META = "pixels.u8", "index.npy", "labels.npy", "meta.json"


class DataCacheError(ValueError):
    """The data cache could not be built or read; the message says where and what to do."""


def default_cache_dir() -> str:
    """`$DIFFUSION_TUTORIAL_DATA_CACHE`, else `$XDG_CACHE_HOME/diffusion-tutorial/data` (`~/.cache/...`)."""
    if os.environ.get("DIFFUSION_TUTORIAL_DATA_CACHE"):
        return os.environ["DIFFUSION_TUTORIAL_DATA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusion-tutorial", "data")


def cache_key(source, resolution: int, channels: int, center_crop: bool) -> dict:
    """What a cache holds, as a dict whose hash names its folder (`cache_folder`)."""
    return {
        "version": CACHE_VERSION,
        "source": source.describe(),
        "fingerprint": source.fingerprint(),
        "num_items": len(source),  # --max_train_samples
        "resolution": resolution,
        "channels": channels,
        "center_crop": bool(center_crop),
    }


def cache_folder(cache_dir: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, f"{digest}-{key['resolution']}px")


class ImageCache:
    """A complete, checked cache: `read(i)` gives image i's uint8 (C, H, W) array from the memory map."""

    def __init__(self, folder: str, meta: dict, index: np.ndarray, labels: Optional[np.ndarray]):
        self.folder, self.meta, self.index, self.labels = folder, meta, index, labels
        self.num_skipped = len(meta.get("skipped", []))
        self._map = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # a DataLoader worker maps the file itself
        return {**self.__dict__, "_map": None}

    def _pixels(self) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(os.path.join(self.folder, PIXELS), dtype=np.uint8, mode="r")
        return self._map

    def read(self, i: int) -> np.ndarray:
        offset, c, h, w = (int(v) for v in self.index[i])
        return np.array(self._pixels()[offset : offset + c * h * w]).reshape(c, h, w)

    def as_tensor(self) -> Optional[torch.Tensor]:
        """Every image as one (N, C, R, R) uint8 tensor over the memory map (copy-on-write), when all are square."""
        shapes = self.index[:, 1:]
        if len(shapes) == 0 or (shapes != shapes[0]).any() or shapes[0, 1] != shapes[0, 2]:
            return None
        mapped = np.memmap(os.path.join(self.folder, PIXELS), dtype=np.uint8, mode="c")
        return torch.from_numpy(mapped.reshape(len(self.index), *(int(v) for v in shapes[0])))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def open_cache(folder: str, key: dict) -> Optional[ImageCache]:
    """The cache in `folder` if it is complete and matches `key`; None when there is none; raises when it is
    broken (`DataCacheError`)."""
    if not os.path.isdir(folder):
        return None
    try:
        with open(os.path.join(folder, META)) as f:
            meta = json.load(f)
        if meta.get("key") != key:
            raise ValueError("its meta.json is for other data")
        size = os.path.getsize(os.path.join(folder, PIXELS))
        if size != meta["nbytes"]:
            raise ValueError(f"{PIXELS} has {size} bytes, {meta['nbytes']} expected (truncated?)")
        with open(os.path.join(folder, INDEX), "rb") as f:
            index_bytes = f.read()  # read once: hashed, then parsed
        if hashlib.sha256(index_bytes).hexdigest() != meta["index_sha256"]:
            raise ValueError(f"{INDEX} does not match its hash")
        index = np.load(io.BytesIO(index_bytes), allow_pickle=False)
        labels = np.load(os.path.join(folder, LABELS), allow_pickle=False) if meta["labels"] else None
        if len(index) != meta["num_images"] or (labels is not None and len(labels) != len(index)):
            raise ValueError("its image or label count does not match meta.json")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataCacheError(f"the data cache {folder} is incomplete or corrupt: {err}") from err
    return ImageCache(folder, meta, index, labels)


def remove_folder(folder: str) -> None:
    """Remove a cache folder: renamed aside first (one operation), so no reader ever sees half of it."""
    aside = f"{folder}.removing-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and is someone else's
        return True
    return True


def remove_stale_builds(folder: str) -> List[str]:
    """Remove the temporary folders of builds of this cache that were killed (a process of this machine that is
    gone); returns their names. A build still running, or one of another machine, is left alone."""
    parent, base = os.path.dirname(folder), os.path.basename(folder)
    prefix, removed = f"{base}.tmp-{socket.gethostname()}-", []
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        pid = name[len(prefix) :].split("-")[0] if name.startswith(prefix) else ""
        if (pid.isdigit() and not _alive(int(pid))) or name.startswith(f"{base}.removing-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    return removed


def _check_free_space(cache_dir: str, needed: int) -> None:
    free = shutil.disk_usage(cache_dir).free
    if needed * 1.05 > free:
        raise DataCacheError(
            f"the data cache needs about {needed / 1e9:.2f} GB and {cache_dir} has {free / 1e9:.2f} GB free: free "
            "some space, pass --data_cache_dir on a larger disk, or --data_loading workers (no cache)."
        )


def build_cache(source, key: dict, folder: str, skip_broken: bool, num_workers: int, disable_progress=False):
    """Decode `source` into a new cache at `folder`: in a temporary folder, renamed into place when complete.

    A broken file stops the build with `BrokenImageError` naming it (or is skipped with `skip_broken`); a full disk
    stops it with `DataCacheError`; in every case the temporary folder is removed.
    """
    cache_dir = os.path.dirname(folder)
    os.makedirs(cache_dir, exist_ok=True)
    r, c = key["resolution"], key["channels"]
    _check_free_space(cache_dir, len(source) * c * r * r)
    tmp = f"{folder}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    offsets, kept, skipped, quantised, offset = [], [], [], 0, 0
    start = time.time()
    try:
        with open(os.path.join(tmp, PIXELS), "wb") as f:
            decoded = decode_many(
                source, r, c, key["center_crop"], skip_broken, num_workers, "data cache", disable_progress
            )
            for i, array, name in decoded:
                if array is None:
                    skipped.append(name)
                    continue
                if array.dtype != np.uint8:  # a 16-bit file: the cache holds 8 bits
                    array, quantised = np.round(array * 255).astype(np.uint8), quantised + 1
                f.write(array.tobytes())
                offsets.append((offset, *array.shape))
                kept.append(i)
                offset += array.size
            f.flush()
            os.fsync(f.fileno())
        if not kept:
            raise DataCacheError(f"no readable images: all {len(skipped)} in {source.describe()} were broken.")
        np.save(os.path.join(tmp, INDEX), np.asarray(offsets, dtype=np.int64).reshape(-1, 4))
        if source.labels is not None:
            np.save(os.path.join(tmp, LABELS), np.asarray(source.labels, dtype=np.int64)[kept])
        meta = {
            "key": key,
            "num_images": len(kept),
            "nbytes": offset,
            "index_sha256": _sha256(os.path.join(tmp, INDEX)),
            "labels": source.labels is not None,
            "skipped": skipped,
            "quantised_16bit": quantised,
            "build_seconds": round(time.time() - start, 2),
        }
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, folder)
        except OSError as err:  # another run finished the same cache first: keep theirs
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            logger.info("another run built the same data cache first: using %s", folder)
    except OSError as err:
        raise DataCacheError(
            f"writing the data cache in {cache_dir} failed ({err}); nothing was left behind. Free some space, pass "
            "--data_cache_dir on a larger disk, or --data_loading workers (no cache)."
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if quantised:
        logger.warning(
            "the data cache holds %d 16-bit image(s) at 8 bits (--data_loading workers keeps 16).", quantised
        )
    if skipped:
        logger.warning("skipped %d unreadable image file(s) (--skip_broken_images).", len(skipped))
    logger.info(
        "built the data cache %s: %d images, %.2f GB, in %.1f s", folder, len(kept), offset / 1e9, time.time() - start
    )


def ensure_cache(
    source,
    key: dict,
    cache_dir: str,
    skip_broken: bool,
    num_workers: int,
    builder: bool,
    failure_marker: Optional[str] = None,
    poll_seconds: float = 0.5,
) -> ImageCache:
    """The cache for `key`, built when missing or broken by the `builder` process while the others wait for it.

    The waiting is by polling the file system, not a collective call: a build may take longer than a collective's
    timeout. When the builder fails it writes `failure_marker` (a path unique to this run), which ends the wait of
    the others with its message.
    """
    folder = cache_folder(cache_dir, key)
    if builder:
        try:
            try:
                cache = open_cache(folder, key)
            except DataCacheError as err:
                logger.warning("%s: removing it and building it again.", err)
                remove_folder(folder)
                cache = None
            if cache is None:
                for name in remove_stale_builds(folder):
                    logger.info("removed %s, left behind by a build that was killed", name)
                logger.info(
                    "building the data cache %s (%d images of %s, once)", folder, len(source), source.describe()
                )
                build_cache(source, key, folder, skip_broken, num_workers)
                cache = open_cache(folder, key)
            else:
                logger.info("reading the data cache %s (built before)", folder)
            return cache
        except BaseException as err:
            if failure_marker is not None:
                os.makedirs(os.path.dirname(failure_marker), exist_ok=True)
                with open(failure_marker, "w") as f:
                    f.write(f"{type(err).__name__}: {err}")
            raise
    waited = 0.0
    while True:
        if os.path.exists(os.path.join(folder, META)):
            return open_cache(folder, key)
        if failure_marker is not None and os.path.exists(failure_marker):
            with open(failure_marker) as f:
                raise DataCacheError(f"the process building the data cache failed: {f.read()}")
        time.sleep(poll_seconds)
        waited += poll_seconds
        if waited % 60 < poll_seconds:
            logger.info("waiting for the data cache %s to be built by another process (%.0f s)", folder, waited)
