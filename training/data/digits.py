"""The built-in digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16), nothing downloaded."""

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_NUM_CLASSES = 10
DIGITS_NUM_IMAGES = 1797
# The held-out split of the built-in digits: a fixed permutation, so the classifier, the training data and the
# evaluation agree on which digits were never trained on.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def digits_split_indices(split: str) -> np.ndarray:
    """Indices of the built-in digits in `split` ("train", "test" or "all"), from a fixed permutation."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r} is not supported; choose one of ('train', 'test', 'all').")
    n = DIGITS_NUM_IMAGES
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
