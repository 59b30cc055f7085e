"""Train the small digits classifier whose feature space the evaluation uses, and write its weights.

    python training/train_digits_classifier.py        # ~10 s on 2 CPUs; writes training/assets/digits_classifier.safetensors

Trained on the training split of the built-in digits only (the held-out split measures it and is the evaluation's
reference set), at the resolutions the training script uses (8, 16, 32: each upsampled from 8x8 and area-averaged
back, as the classifier sees them), with light Gaussian pixel noise so that slightly imperfect samples still map
to sensible features. Deterministic: the same seed gives the same weights.
"""

import argparse
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.data import load_digits_tensors
from training.digits_classifier import CLASSIFIER_WEIGHTS, DigitsClassifier


def train_classifier(steps: int = 3000, lr: float = 3e-3, noise_std: float = 0.1, seed: int = 0) -> DigitsClassifier:
    """Full-batch AdamW on the training split at resolutions 8, 16 and 32, with pixel-noise augmentation."""
    torch.manual_seed(seed)
    xs, ys = zip(*(load_digits_tensors(r, "train") for r in (8, 16, 32)))
    x = torch.cat([DigitsClassifier.to_grid(t) for t in xs])  # the classifier's own 8x8 view
    y = torch.cat(ys)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        noisy = x + noise_std * torch.randn(x.shape, generator=g)
        loss = torch.nn.functional.cross_entropy(model.head(model.body(noisy)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def test_accuracy(model: DigitsClassifier, resolution: int = 16) -> float:
    x, y = load_digits_tensors(resolution, "test")
    return float((model(x).argmax(-1) == y).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=CLASSIFIER_WEIGHTS)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    model = train_classifier(args.steps, seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output)
    for r in (8, 16, 32):
        print(f"held-out accuracy at {r}x{r}: {test_accuracy(model, r):.4f}")
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
