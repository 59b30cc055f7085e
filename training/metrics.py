"""Image quality and likelihood metrics on the built-in digits, against the held-out test split (never trained on).

- `frechet_distance`: ‖μ_g - μ_r‖² + tr(Σ_g + Σ_r - 2 (Σ_g^½ Σ_r Σ_g^½)^½) between Gaussians fitted to classifier
  features of generated (g) and real (r) digits (the Fréchet distance of Heusel et al. 2017, arXiv:1706.08500,
  in a digits classifier's feature space instead of Inception's — the MNIST-community practice).
- `class_coverage`: the fraction of the 10 classes that receive at least a quarter of their fair share
  (n / 10) of the generated samples, as judged by the classifier; `class_histogram`: the counts.
- `mean_confidence`: mean max-softmax of the classifier on the samples (blurry or broken digits score low).
- `classifier_test_accuracy`: the classifier's accuracy on the real held-out digits (how far to trust the above).
- `conditional_accuracy` (class-conditional samples): how often the classifier agrees with the requested class.
- `likelihood_metrics`: the variational bound and the probability-flow ODE likelihood of held-out digits, bits/dim.

The standard FID (Inception-v3 features) needs downloaded weights: users online can compute it with e.g.
`torchmetrics.image.fid.FrechetInceptionDistance` on the saved samples. It is not run here.
"""

from typing import Dict, Optional

import numpy as np
import torch

from training.data import DIGITS_NUM_CLASSES, load_digits_tensors
from training.digits_classifier import load_classifier

COVERAGE_SHARE = 0.25  # a class is covered when it gets ≥ 25 % of its fair share n / 10


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. (6)).

    Args:
        feats_a (`torch.Tensor`): (N_a, D) features. feats_b (`torch.Tensor`): (N_b, D) features.

    Returns:
        `float`: ‖μ_a - μ_b‖² + tr(Σ_a) + tr(Σ_b) - 2 tr((Σ_a^½ Σ_b Σ_a^½)^½), computed in float64.
    """
    a, b = feats_a.double().cpu().numpy(), feats_b.double().cpu().numpy()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per set; got {a.shape[0]} and {b.shape[0]}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)  # tr((Σ_a^½ Σ_b Σ_a^½)^½) = tr((Σ_a Σ_b)^½)
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross)
    return float(max(value, 0.0))


_REFERENCE: Dict[int, torch.Tensor] = {}


def reference_features(resolution: int = 8) -> torch.Tensor:
    """Classifier features of the held-out real digits, at `resolution` (upsampled like the training data)."""
    if resolution not in _REFERENCE:
        images, _ = load_digits_tensors(resolution, "test")
        with torch.no_grad():
            _REFERENCE[resolution] = load_classifier().features(images)
    return _REFERENCE[resolution]


@torch.no_grad()
def digits_metrics(samples: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> Dict:
    """All digits metrics of `samples` ((N, 1, H, W) in [-1, 1]) against the held-out real digits.

    Args:
        samples (`torch.Tensor`): generated digits in [-1, 1].
        class_labels (`torch.Tensor`, *optional*): (N,) requested classes of class-conditional samples.

    Returns:
        `dict`: `frechet_distance`, `class_coverage`, `class_histogram`, `mean_confidence`,
        `classifier_test_accuracy`, `num_samples`, and `conditional_accuracy` when `class_labels` is given.
    """
    classifier = load_classifier()
    samples = samples.float().cpu()
    feats = classifier.features(samples)
    probs = classifier.head(feats).softmax(-1)
    pred = probs.argmax(-1)
    hist = torch.bincount(pred, minlength=DIGITS_NUM_CLASSES)
    fair = len(samples) / DIGITS_NUM_CLASSES
    real, real_labels = load_digits_tensors(samples.shape[-1], "test")
    out = {
        "num_samples": len(samples),
        "frechet_distance": frechet_distance(feats, reference_features(samples.shape[-1])),
        "class_coverage": int((hist >= COVERAGE_SHARE * fair).sum()) / DIGITS_NUM_CLASSES,
        "class_histogram": hist.tolist(),
        "mean_confidence": float(probs.max(-1).values.mean()),
        "classifier_test_accuracy": float((classifier(real).argmax(-1) == real_labels).float().mean()),
    }
    if class_labels is not None:
        out["conditional_accuracy"] = float((pred == class_labels.cpu()).float().mean())
    return out


def likelihood_metrics(pipe, num_images: int, vb_steps: int = 100, ode_tolerance: float = 1e-3, seed: int = 0) -> Dict:
    """The tutorial's two likelihoods of held-out digits under a saved model, in bits/dim.

    The held-out digits are quantised to 8 bits (the data a likelihood in bits/dim is defined on): the variational
    bound uses the discretized decoder (a bound on the discrete NLL), the ODE likelihood the uniform dequantisation
    (+7 bits/dim offset) with a Hutchinson trace and tolerance `ode_tolerance`.

    Args:
        pipe (`TutorialUnconditionalPipeline`): the model.
        num_images (`int`): how many held-out digits (≥ 1).
        vb_steps (`int`): grid size of the variational bound. ode_tolerance (`float`): rtol = atol of the ODE solver.
        seed (`int`): seed of the noise draws and probes.

    Returns:
        `dict`: `elbo_bits_per_dim`, `ode_bits_per_dim`, `ode_num_evals` and the settings.
    """
    if num_images < 1:
        raise ValueError(f"--likelihood_samples={num_images} must be >= 1 to compute likelihoods.")
    if not hasattr(pipe, "variational_bound"):
        raise ValueError(f"likelihoods are computed for unconditional pipelines, not {type(pipe).__name__}.")
    images, _ = load_digits_tensors(resolution=pipe.unet.config.sample_size, split="test")
    images = torch.round((images[:num_images] + 1) * 127.5) / 127.5 - 1  # 8-bit data in [-1, 1]
    vb = pipe.variational_bound(images, num_steps=vb_steps, generator=torch.Generator().manual_seed(seed))
    ode = pipe.log_likelihood(
        images,
        trace="hutchinson",
        dequantize=True,
        rtol=ode_tolerance,
        atol=ode_tolerance,
        generator=torch.Generator().manual_seed(seed),
    )
    return {
        "likelihood_num_images": int(images.shape[0]),
        "elbo_bits_per_dim": float(vb.bits_per_dim.mean()),
        "elbo_num_steps": vb_steps,
        "ode_bits_per_dim": float(ode.bits_per_dim.mean()),
        "ode_num_evals": int(ode.num_evals),
        "ode_tolerance": ode_tolerance,
    }
