"""The map-style training sets: one base for crops, flips and the [-1, 1] conversion; three ways to hold the pixels.

- `InMemoryImages`: every image decoded once into RAM (uint8; the built-in digits as floats). Fastest for small data.
- `DecodingImages`: nothing held; an item is decoded when a DataLoader worker asks for it (memory flat in the data).
- `CachedImages`: the uint8 cache (`cache.py`), memory-mapped: nothing decoded, nothing copied until read.

Randomness (the crop offset of a non-square image, the flip) is a pure function of `(seed, epoch, index)`, so every
path gives the same items, in every worker, process and resumed run.
"""

import logging
from typing import Optional

import numpy as np
import torch

from training.data.decode import BrokenImageError, decode_array, to_model_range

logger = logging.getLogger("train_unconditional")


class ImageSet(torch.utils.data.Dataset):
    """Items `{"images": (C, R, R) float in [-1, 1], "labels": int64}` of one epoch (`set_epoch`).

    Subclasses say where the pixels of item `index` come from (`pixels`); this base crops a non-square image at
    random, flips at random (with `random_flip`) and converts to [-1, 1] (unless the pixels are already there).

    Attributes:
        path (`str`): "memory", "workers" or "cache": which path holds the pixels (the training log says why).
        labels (`torch.Tensor` or None), resolution, random_flip, seed, num_skipped (broken files left out).
    """

    path = "memory"
    prescaled = False  # pixels already in [-1, 1] (the built-in digits)

    def __init__(self, labels, resolution: int, random_flip: bool, seed: int, num_skipped: int = 0):
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.resolution, self.random_flip, self.seed = resolution, random_flip, seed
        self.num_skipped, self.epoch = num_skipped, 0

    def __len__(self) -> int:
        raise NotImplementedError

    def pixels(self, index: int) -> torch.Tensor:
        """The stored pixels of item `index`: (C, H, W), shorter side `resolution`; uint8 or float."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, index: int, epoch: Optional[int] = None) -> torch.Generator:
        epoch = self.epoch if epoch is None else epoch
        return torch.Generator().manual_seed(hash((self.seed, epoch, index)) % (2**63))

    def flips(self, epoch: int) -> torch.Tensor:
        """Which images `__getitem__` flips in `epoch` (a bool tensor of length N), for images that need no crop."""
        return torch.tensor(
            [bool(torch.rand((), generator=self._generator(i, epoch)) < 0.5) for i in range(len(self))]
        )

    def _load(self, index: int):
        """(pixels, index of the label): the item itself, unless a subclass substitutes another."""
        return self.pixels(index), index

    def augment(self, x: torch.Tensor, index: int, epoch: Optional[int] = None) -> torch.Tensor:
        """Crop a non-square image and flip at random, from (seed, epoch, index) alone; then convert to [-1, 1]."""
        needs_crop = x.shape[-2] != self.resolution or x.shape[-1] != self.resolution
        g = self._generator(index, epoch) if (self.random_flip or needs_crop) else None
        if needs_crop:
            top = int(torch.randint(0, x.shape[-2] - self.resolution + 1, (1,), generator=g))
            left = int(torch.randint(0, x.shape[-1] - self.resolution + 1, (1,), generator=g))
            x = x[..., top : top + self.resolution, left : left + self.resolution]
        if self.random_flip and bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(-1)
        return x if self.prescaled else to_model_range(x)

    def __getitem__(self, index: int):
        x, label_index = self._load(index)
        item = {"images": self.augment(x, index)}
        if self.labels is not None:
            item["labels"] = self.labels[label_index]
        return item

    def device_images(self) -> Optional[torch.Tensor]:
        """All pixels as one (N, C, R, R) tensor for `--data_on_device` (uint8 where stored so), or None."""
        return None


class InMemoryImages(ImageSet):
    """Images decoded once and held in RAM: one (N, C, R, R) tensor, or a list of (C, R, W_i) / (C, H_i, R) tensors
    (non-square images, cropped at random every epoch). uint8 for 8-bit files; float32 in [0, 1] when any file has
    a higher bit depth; the built-in digits as float32 already in [-1, 1] (`prescaled`)."""

    def __init__(self, images, labels=None, resolution=16, random_flip=False, seed=0, num_skipped=0, prescaled=False):
        super().__init__(labels, resolution, random_flip, seed, num_skipped)
        self.images, self.prescaled = images, prescaled

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, index: int) -> torch.Tensor:
        return self.images[index]

    def device_images(self) -> Optional[torch.Tensor]:
        return self.images if torch.is_tensor(self.images) else None

    @classmethod
    def from_decoded(cls, decoded, source, channels, resolution, random_flip, seed) -> "InMemoryImages":
        """From `decode_many`'s `(index, array or None, name)` entries of `source`.

        Square uint8 images at `resolution` (the usual case with `--center_crop`) go straight into one preallocated
        (N, C, R, R) tensor: no list of arrays, no stacking copy, so the peak is the pixels themselves. Anything
        else (a random crop's longer side, a 16-bit file) falls back to `from_arrays`.
        """
        block = torch.empty((len(source), channels, resolution, resolution), dtype=torch.uint8)
        arrays, kept, skipped, packed = [], [], [], True
        for i, array, name in decoded:
            if array is None:
                skipped.append(name)
                continue
            if packed and array.dtype == np.uint8 and array.shape == (channels, resolution, resolution):
                block[len(kept)] = torch.from_numpy(array)
            else:
                if packed:  # the first image that does not fit: keep what was packed as arrays
                    arrays, packed = [block[j].numpy() for j in range(len(kept))], False
                arrays.append(array)
            kept.append(i)
        if not kept:
            raise BrokenImageError(f"no readable images: all {len(skipped)} in {source.describe()} were broken.")
        labels = None if source.labels is None else source.labels[kept]
        if packed:
            return cls(block[: len(kept)], labels, resolution, random_flip, seed, len(skipped))
        return cls.from_arrays(arrays, labels, resolution, random_flip, seed, len(skipped))

    @classmethod
    def from_arrays(cls, arrays, labels, resolution, random_flip, seed, num_skipped) -> "InMemoryImages":
        """From `image_to_array`'s outputs: stacked into one tensor when they are all square at `resolution`."""
        if any(a.dtype != np.uint8 for a in arrays):  # a high-bit-depth file: everything as float in [0, 1]
            arrays = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in arrays]
        tensors = [torch.from_numpy(a) for a in arrays]
        if all(t.shape[-2:] == (resolution, resolution) for t in tensors):
            tensors = torch.stack(tensors)
        return cls(tensors, labels, resolution, random_flip, seed, num_skipped)


class DecodingImages(ImageSet):
    """Nothing held: item `index` is read and decoded from the source when asked (in a DataLoader worker).

    A broken file raises `BrokenImageError` naming it; with `skip_broken` it is replaced by the next readable item
    (the same one in every epoch and run) and a warning names it.
    """

    path = "workers"

    def __init__(self, source, channels, center_crop, resolution, random_flip, seed, skip_broken=False):
        super().__init__(source.labels, resolution, random_flip, seed)
        self.source, self.channels, self.center_crop, self.skip_broken = source, channels, center_crop, skip_broken

    def __len__(self) -> int:
        return len(self.source)

    def pixels(self, index: int) -> torch.Tensor:
        raw, name = self.source.item(index)
        return torch.from_numpy(decode_array(raw, name, self.resolution, self.channels, self.center_crop))

    def _load(self, index: int):
        for attempt in range(len(self.source)):
            i = (index + attempt) % len(self.source)
            try:
                return self.pixels(i), i
            except BrokenImageError as err:
                if not self.skip_broken:
                    raise
                logger.warning("skipped an unreadable image (--skip_broken_images), using the next one: %s", err)
        raise BrokenImageError(f"no readable image in {self.source.describe()}.")


class CachedImages(ImageSet):
    """The uint8 cache, memory-mapped on first use in each process (a DataLoader worker maps it itself)."""

    path = "cache"

    def __init__(self, cache, resolution, random_flip, seed):
        super().__init__(cache.labels, resolution, random_flip, seed, cache.num_skipped)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def pixels(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.cache.read(index))

    def device_images(self) -> Optional[torch.Tensor]:
        return self.cache.as_tensor()
