"""The data seam of the training scripts: every source becomes one cached tensor of images in [-1, 1].

Three sources, one result (`ImageTensorDataset`):

- the built-in digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16), upsampled to
  the training resolution; nothing is downloaded;
- a local folder of image files (searched recursively);
- a `datasets` dataset: a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (loaded with
  `load_from_disk`, offline) or anything `load_dataset` accepts (a Hub name when online).

Images are decoded, converted, resized and cropped once, when the dataset is built; an epoch only indexes a
tensor (and flips, when asked). Randomness (flips, crops) is a pure function of `(seed, epoch, index)`, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Same tuple for dispatch and error messages.
DATA_SOURCES = ("digits", "image_folder", "datasets")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS_NUM_CLASSES = 10
# The held-out split of the built-in digits: a fixed permutation, so the classifier, the training data and the
# evaluation agree on which digits were never trained on.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
IMAGE_COLUMNS = ("image", "img", "images", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "class", "digit")


class BrokenImageError(ValueError):
    """An image file could not be decoded; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# The built-in digits
# ----------------------------------------------------------------------------------------------------------------
def digits_split_indices(split: str) -> np.ndarray:
    """Indices of the built-in digits in `split` ("train", "test" or "all"), from a fixed permutation."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r} is not supported; choose one of ('train', 'test', 'all').")
    n = 1797
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(round(DIGITS_TEST_FRACTION * n))
    if split == "all":
        return np.arange(n)
    return np.sort(perm[n_test:] if split == "train" else perm[:n_test])


def load_digits_tensors(resolution: int = 16, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """The built-in digits as a (N, 1, resolution, resolution) float tensor in [-1, 1] and their labels (N,).

    Args:
        resolution (`int`, defaults to 16): side of the square output; the 8x8 originals are upsampled bilinearly
            (or area-averaged when `resolution < 8`).
        split (`str`, defaults to `"train"`): `"train"` (80 %), `"test"` (the held-out 20 %) or `"all"`.

    Returns:
        `(images, labels)`: float32 images with ink = +1, background = -1; int64 labels 0..9.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} must be a positive integer.")
    digits = load_digits()
    idx = digits_split_indices(split)
    x = torch.from_numpy(digits.images[idx].astype(np.float32) / 16.0)[:, None]  # values 0..16 -> [0, 1]
    if resolution != 8:
        mode = "bilinear" if resolution > 8 else "area"
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        x = F.interpolate(x, size=(resolution, resolution), mode=mode, **kwargs)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    return x, torch.from_numpy(digits.target[idx]).long()


# ----------------------------------------------------------------------------------------------------------------
# Decoding images once
# ----------------------------------------------------------------------------------------------------------------
# Integer modes of more than 8 bits, by the largest value of their range (PNG's 16-bit grayscale opens as "I;16", or
# as "I" in older Pillow): scaled by that value, never clipped to 8 bits.
HIGH_BIT_DEPTH_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def pil_to_tensor(image: Image.Image, resolution: int, channels: int, center_crop: bool, name: str = "image"):
    """Convert, resize the shorter side to `resolution` and (center-)crop a PIL image; returns (C, H, W) in [-1, 1].

    8-bit images go through PIL's "L"/"RGB" conversion; 16-bit grayscale ("I;16", "I") is scaled by 65535 in
    floating point (PIL's own conversion to "L" would clip it). Without `center_crop` the longer side is kept (the
    crop is random and happens per epoch in the dataset). `name` names the image in errors.
    """
    if image.mode in HIGH_BIT_DEPTH_MODES:
        top = HIGH_BIT_DEPTH_MODES[image.mode]
        low, high = image.getextrema()
        if low < 0 or high > top:
            raise ValueError(
                f"image {name} has mode {image.mode!r} with values in [{low}, {high}], outside the 16-bit range "
                f"[0, {top}]; convert it to 8- or 16-bit first."
            )
        image, scale = image.convert("F"), float(top)
    elif image.mode == "F":
        raise ValueError(
            f"image {name} has mode 'F' (32-bit floating point), whose value range is unknown; convert it to "
            "an 8- or 16-bit image first."
        )
    else:
        image, scale = image.convert("L" if channels == 1 else "RGB"), 255.0
    w, h = image.size
    rescale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * rescale)), max(resolution, round(h * rescale))
    image = image.resize((new_w, new_h), resample=Image.BILINEAR)
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / scale
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[-1] != channels:  # a 16-bit grayscale image for a 3-channel model
        array = np.repeat(array, channels, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).clamp(0, 1) * 2 - 1


def _decode(source, name: str) -> Image.Image:
    """Open and fully decode an image (a path or a PIL image); a broken file raises `BrokenImageError` naming it."""
    try:
        image = Image.open(source) if isinstance(source, (str, os.PathLike)) else source
        if isinstance(image, dict):  # datasets' undecoded Image feature: {"bytes": ..., "path": ...}
            import io

            image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
        image.load()
        return image
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BrokenImageError(f"cannot read image {name}: {type(err).__name__}: {err}") from err


def decode_images(
    sources: Sequence, names: Sequence[str], resolution: int, channels: int, center_crop: bool, skip_broken: bool
) -> Tuple[List[torch.Tensor], List[int], List[str]]:
    """Decode every image once. Returns (tensors, indices kept, names skipped)."""
    tensors, kept, skipped = [], [], []
    for i, (source, name) in enumerate(zip(sources, names)):
        try:
            tensors.append(pil_to_tensor(_decode(source, name), resolution, channels, center_crop, name))
            kept.append(i)
        except BrokenImageError:
            if not skip_broken:
                raise
            skipped.append(name)
    return tensors, kept, skipped


def list_image_files(folder: str) -> List[str]:
    """Every file with an image extension under `folder` (recursively), sorted."""
    if not os.path.isdir(folder):
        raise ValueError(f"--train_data_dir={folder!r} is not a directory.")
    files = sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(folder)
        for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise ValueError(f"--train_data_dir={folder!r} contains no image files (looked for {IMAGE_EXTENSIONS}).")
    return files


def _pick_column(columns: Sequence[str], wanted: Optional[str], candidates: Sequence[str], what: str):
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{what}={wanted!r} is not a column of the dataset; columns: {tuple(columns)}.")
        return wanted
    return next((c for c in candidates if c in columns), None)


def load_datasets_images(
    name_or_path: str,
    config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    split: str = "train",
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
):
    """Load a `datasets` split: `load_from_disk` for a local `save_to_disk` folder, `load_dataset` otherwise.

    Returns:
        `(images, names, labels)`: undecoded images (PIL or dicts), their names for error messages, labels or `None`.
    """
    import datasets

    if os.path.isdir(name_or_path) and (
        os.path.exists(os.path.join(name_or_path, "dataset_dict.json"))
        or os.path.exists(os.path.join(name_or_path, "state.json"))
    ):
        ds = datasets.load_from_disk(name_or_path)
    else:
        ds = datasets.load_dataset(name_or_path, config_name, cache_dir=cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"split={split!r} is not in dataset {name_or_path!r}; splits: {tuple(ds.keys())}.")
        ds = ds[split]
    image_col = _pick_column(ds.column_names, image_column, IMAGE_COLUMNS, "image_column")
    if image_col is None:
        raise ValueError(
            f"dataset {name_or_path!r} has no image column among {IMAGE_COLUMNS}; columns: {tuple(ds.column_names)}."
        )
    label_col = _pick_column(ds.column_names, label_column, LABEL_COLUMNS, "label_column")
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # decode ourselves: a broken file is named
    images = ds[image_col]
    names = []
    for i, im in enumerate(images):
        path = im.get("path") if isinstance(im, dict) else None
        names.append(f"{name_or_path}[{i}]" + (f" ({path})" if path else ""))
    labels = ds[label_col] if label_col is not None else None
    return images, names, labels


# ----------------------------------------------------------------------------------------------------------------
# The dataset every source ends in
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ImageTensorDataset(torch.utils.data.Dataset):
    """Images decoded once, in [-1, 1], with optional labels, random crop and random horizontal flip.

    `images` is one (N, C, H, W) tensor, or a list of (C, H_i, W_i) tensors whose shorter side is `resolution`
    (then each item is randomly cropped to `resolution`). Randomness depends only on (seed, epoch, index).
    """

    images: object
    labels: Optional[torch.Tensor] = None
    resolution: int = 16
    random_flip: bool = False
    seed: int = 0
    num_skipped: int = 0
    epoch: int = 0

    def __len__(self) -> int:
        return len(self.images)

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

    def __getitem__(self, index: int):
        x = self.images[index]
        needs_crop = x.shape[-2] != self.resolution or x.shape[-1] != self.resolution
        g = self._generator(index) if (self.random_flip or needs_crop) else None
        if needs_crop:
            top = int(torch.randint(0, x.shape[-2] - self.resolution + 1, (1,), generator=g))
            left = int(torch.randint(0, x.shape[-1] - self.resolution + 1, (1,), generator=g))
            x = x[..., top : top + self.resolution, left : left + self.resolution]
        if self.random_flip and bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(-1)
        item = {"images": x}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


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
) -> ImageTensorDataset:
    """Build the training set from the flags of `train_unconditional.py`; the built-in digits when neither is given.

    Args:
        dataset_name (`str`, *optional*): `"digits"` for the built-in digits, a `save_to_disk` folder, or a name for
            `datasets.load_dataset`.
        train_data_dir (`str`, *optional*): a folder of image files (searched recursively).
        resolution (`int`, defaults to 16): side of the square training images.
        channels (`int`, defaults to 1): 1 (grayscale) or 3 (RGB); the built-in digits are always 1 channel.
        center_crop (`bool`): crop the center after resizing (else a random crop per epoch).
        random_flip (`bool`): flip horizontally with probability 1/2 per epoch.
        skip_broken_images (`bool`): skip unreadable files (counted in `num_skipped`) instead of raising.
        seed (`int`): seed of crops and flips.

    Returns:
        `ImageTensorDataset`.
    """
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError(f"pass only one of --dataset_name={dataset_name!r} and --train_data_dir={train_data_dir!r}.")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is not supported; choose one of (1, 3).")
    if dataset_name in (None, "digits") and train_data_dir is None:
        if channels != 1:
            raise ValueError(f"the built-in digits have 1 channel; got channels={channels!r}.")
        images, labels = load_digits_tensors(resolution, "train")
        return ImageTensorDataset(images, labels, resolution, random_flip, seed)

    if train_data_dir is not None:
        files = list_image_files(train_data_dir)
        sources, names, labels = files, files, None
    else:
        sources, names, labels = load_datasets_images(
            dataset_name, dataset_config_name, cache_dir, image_column=image_column, label_column=label_column
        )
    tensors, kept, skipped = decode_images(sources, names, resolution, channels, center_crop, skip_broken_images)
    if not tensors:
        raise ValueError(f"no readable images: all {len(skipped)} were broken.")
    if all(t.shape[-2:] == (resolution, resolution) for t in tensors):
        tensors = torch.stack(tensors)
    if labels is not None:
        labels = torch.as_tensor([labels[i] for i in kept], dtype=torch.long)
    return ImageTensorDataset(tensors, labels, resolution, random_flip, seed, num_skipped=len(skipped))


class EpochSampler(torch.utils.data.Sampler):
    """A shuffling sampler whose order is a pure function of (seed, epoch): identical on every process and after a
    resume, which is what makes `--resume_from_checkpoint` exact."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class DeviceBatches:
    """The training batches drawn on the device from images kept there (`--data_on_device`): no DataLoader.

    The same batches as a `DataLoader(dataset, batch_size, sampler=EpochSampler(N, seed), drop_last=True)` that
    accelerate shards over `num_processes`: accelerate gives process p the batches p, p + n, p + 2n, ... of the
    epoch's order, that is rows [p B, (p + 1) B) of every global batch of n B images, which is what `epoch` yields.
    Flips are the dataset's own (a function of (seed, epoch, index)). An epoch's order and flips are copied to the
    device once; within the epoch nothing is read back from it.

    Args:
        dataset (`ImageTensorDataset`): images as one (N, C, H, W) tensor (no per-epoch crops).
        batch_size (`int`): images per process and batch.
        num_processes (`int`), process_index (`int`): this process's shard.
        device (`torch.device`): where the images are kept and the batches made.
        seed (`int`): the seed of the `EpochSampler` order.
    """

    def __init__(self, dataset, batch_size: int, num_processes: int, process_index: int, device, seed: int):
        if not torch.is_tensor(dataset.images):
            raise ValueError("DeviceBatches needs the images as one tensor (all of the training resolution).")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.images = dataset.images.to(device)
        self.labels = None if dataset.labels is None else dataset.labels.to(device)

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.num_processes)

    def tensors(self):
        """The tensors kept on the device, by name."""
        found = {"data.images": self.images}
        if self.labels is not None:
            found["data.labels"] = self.labels
        return found

    def epoch(self, epoch: int, skip: int = 0):
        """The batches of `epoch` for this process, from its `skip`-th on; each a dict like the DataLoader's."""
        device = self.images.device
        sampler = EpochSampler(len(self.dataset), seed=self.seed)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long).to(device)
        flips = self.dataset.flips(epoch).to(device) if self.dataset.random_flip else None
        b, n, p = self.batch_size, self.num_processes, self.process_index
        for k in range(skip, len(self)):
            index = order[(k * n + p) * b : (k * n + p + 1) * b]
            x = self.images[index]
            if flips is not None:
                x = torch.where(flips[index].view(-1, 1, 1, 1), x.flip(-1), x)
            yield {"images": x} if self.labels is None else {"images": x, "labels": self.labels[index]}
