"""The small digits classifier the project trains and ships: the feature space of the digits metrics.

`python training/train_digits_classifier.py` writes its weights to `assets/digits_classifier.safetensors`;
`training/metrics.py` embeds samples with `DigitsClassifier.features`.
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F

from training.data import DIGITS_NUM_CLASSES

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CLASSIFIER_WEIGHTS = os.path.join(ASSETS, "digits_classifier.safetensors")
FEATURE_DIM = 64


class DigitsClassifier(torch.nn.Module):
    """An MLP on the digits' native 8x8 grid: any resolution is area-averaged to 8x8 first.

    Input: (B, 1, H, W) in [-1, 1]. `features` is the 64-d penultimate layer used by the Fréchet distance.
    """

    def __init__(self, hidden: int = 128, feature_dim: int = FEATURE_DIM, num_classes: int = DIGITS_NUM_CLASSES):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, feature_dim), torch.nn.SiLU()
        )
        self.head = torch.nn.Linear(feature_dim, num_classes)

    @staticmethod
    def to_grid(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected digits of shape (B, 1, H, W); got {tuple(x.shape)}.")
        x = x.float()
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="area")
        return x.flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.to_grid(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_CLASSIFIER: Optional[DigitsClassifier] = None


def load_classifier(path: str = CLASSIFIER_WEIGHTS) -> DigitsClassifier:
    """The shipped classifier (cached after the first call for the default path)."""
    global _CLASSIFIER
    if path == CLASSIFIER_WEIGHTS and _CLASSIFIER is not None:
        return _CLASSIFIER
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"digits classifier weights not found at {path!r}; run "
            "`python training/train_digits_classifier.py` to create them."
        )
    model = DigitsClassifier()
    model.load_state_dict(load_file(path))
    model.eval().requires_grad_(False)
    if path == CLASSIFIER_WEIGHTS:
        _CLASSIFIER = model
    return model
