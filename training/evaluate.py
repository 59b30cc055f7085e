"""Image quality on the built-in digits, in the feature space of a small classifier the project trains and ships.

    python training/evaluate.py PIPELINE_FOLDER --scheduler ddim --num_inference_steps 50 --num_samples 512

Metrics (all computed against the held-out test split of the digits, never trained on):

- `frechet_distance`: ‖μ_g - μ_r‖² + tr(Σ_g + Σ_r - 2 (Σ_g^½ Σ_r Σ_g^½)^½) between Gaussians fitted to classifier
  features of generated (g) and real (r) digits (the Fréchet distance of Heusel et al. 2017, arXiv:1706.08500,
  in a digits classifier's feature space instead of Inception's — the MNIST-community practice).
- `class_coverage`: the fraction of the 10 classes that receive at least a quarter of their fair share
  (n / 10) of the generated samples, as judged by the classifier; `class_histogram`: the counts.
- `mean_confidence`: mean max-softmax of the classifier on the samples (blurry or broken digits score low).
- `classifier_test_accuracy`: the classifier's accuracy on the real held-out digits (how far to trust the above).
- `conditional_accuracy` (class-conditional samples): how often the classifier agrees with the requested class.

The standard FID (Inception-v3 features) needs downloaded weights: users online can compute it with e.g.
`torchmetrics.image.fid.FrechetInceptionDistance` on the saved samples. It is not run here.
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.data import DIGITS_NUM_CLASSES, load_digits_tensors
from training.errors import TrainingError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CLASSIFIER_WEIGHTS = os.path.join(ASSETS, "digits_classifier.safetensors")
FEATURE_DIM = 64
COVERAGE_SHARE = 0.25  # a class is covered when it gets ≥ 25 % of its fair share n / 10


class EvaluationError(TrainingError):
    """A problem the user can fix (the folder, a flag); the CLI prints it on one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# The digits classifier
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Sampling, sharded over processes
# ----------------------------------------------------------------------------------------------------------------
def sample_generators(seed: int, indices: Sequence[int]) -> List[torch.Generator]:
    """One generator per sample index: a sample depends on its index only, not on the batch or process it is in."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


@torch.no_grad()
def sample_digits(
    unet,
    scheduler,
    generators: List[torch.Generator],
    num_inference_steps: int,
    class_labels: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Samples in [-1, 1] from `unet` with `scheduler`, one per generator.

    Unconditional UNets sample through `TutorialUnconditionalPipeline`; class-conditional ones (`class_labels`)
    through `TutorialClassConditionalPipeline` with classifier-free guidance at `guidance_scale`.
    """
    from custom_pipelines import TutorialClassConditionalPipeline, TutorialUnconditionalPipeline

    if class_labels is None:
        pipe = TutorialUnconditionalPipeline(unet=unet, scheduler=scheduler)
        kwargs = {"batch_size": len(generators)}
    else:
        pipe = TutorialClassConditionalPipeline(unet=unet, scheduler=scheduler)
        kwargs = {"class_labels": class_labels, "guidance_scale": guidance_scale}
    pipe.set_progress_bar_config(disable=True)
    images = pipe(generator=generators, num_inference_steps=num_inference_steps, output_type="pt", **kwargs).images
    return images * 2 - 1


def sample_sharded(
    unet,
    scheduler,
    num_samples: int,
    num_inference_steps: int,
    seed: int = 0,
    accelerator=None,
    class_labels: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    batch_size: int = 256,
) -> torch.Tensor:
    """`num_samples` samples, process r of W drawing indices r, r + W, ...; gathered in index order on every process.

    The result equals a single-process run's: each sample has its own generator (`sample_generators`).
    """
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    per_process = -(-num_samples // world)
    indices = [rank + j * world for j in range(per_process)]  # the last ones may exceed num_samples: padding
    chunks = []
    for start in range(0, per_process, batch_size):
        idx = indices[start : start + batch_size]
        labels = None if class_labels is None else class_labels[[i % num_samples for i in idx]]
        chunks.append(
            sample_digits(
                unet, scheduler, sample_generators(seed, idx), num_inference_steps, labels, guidance_scale
            ).float()
        )
    local = torch.cat(chunks)
    if world == 1:
        return local[:num_samples].cpu()
    gathered = accelerator.gather(local.to(accelerator.device).contiguous()).cpu()  # (world * per_process, ...)
    ordered = gathered.reshape(world, per_process, *local.shape[1:]).transpose(0, 1).reshape(-1, *local.shape[1:])
    return ordered[:num_samples]


# ----------------------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------------------
def make_grid(samples: torch.Tensor, nrow: Optional[int] = None, pad: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image."""
    n, c, h, w = samples.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    x = (samples.float().cpu() / 2 + 0.5).clamp(0, 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[
            i
        ]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[:, :, 0] if c == 1 else array)


def save_grid(samples: torch.Tensor, path: str, nrow: Optional[int] = None, scale: int = 1) -> str:
    """Write `make_grid(samples)` to `path` (parents created), optionally enlarged `scale` times."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image = make_grid(samples, nrow)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# CLI: evaluate any saved pipeline folder with any scheduler and number of steps
# ----------------------------------------------------------------------------------------------------------------
SCHEDULER_CHOICES = ("saved", "ddpm", "ddim", "diffusers-ddpm", "diffusers-ddim", "dpm-solver", "euler")


def load_scheduler(kind: str, saved):
    """The scheduler to sample with: the folder's own, ours, or a diffusers one built from the saved config."""
    import diffusers

    from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler

    classes = {
        "ddpm": TutorialDDPMScheduler,
        "ddim": TutorialDDIMScheduler,
        "diffusers-ddpm": diffusers.DDPMScheduler,
        "diffusers-ddim": diffusers.DDIMScheduler,
        "dpm-solver": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
    }
    if kind == "saved":
        return saved
    if kind not in classes:
        raise EvaluationError(f"--scheduler={kind!r} is not supported; choose one of {SCHEDULER_CHOICES}.")
    return classes[kind].from_config(saved.config)


def evaluate_folder(
    folder: str,
    scheduler: str = "saved",
    num_inference_steps: int = 50,
    num_samples: int = 512,
    seed: int = 0,
    guidance_scale: float = 2.0,
    grid_path: Optional[str] = None,
    likelihood_samples: int = 0,
    elbo_steps: int = 100,
    ode_tolerance: float = 1e-3,
) -> Dict:
    """Sample from a saved pipeline folder and compute `digits_metrics` (and, if asked, `likelihood_metrics`).

    Args:
        folder (`str`): a folder written by `TutorialUnconditionalPipeline.save_pretrained`.
        scheduler (`str`): one of `SCHEDULER_CHOICES`; `"saved"` uses the folder's scheduler.
        num_inference_steps (`int`): sampling steps. num_samples (`int`): samples to draw.
        seed (`int`): sample i uses seed `seed * 1_000_003 + i`.
        guidance_scale (`float`): CFG scale for class-conditional UNets.
        grid_path (`str`, *optional*): also write the first 64 samples as a grid there.
        likelihood_samples (`int`): with N > 0, also `likelihood_metrics` of N held-out digits (`elbo_steps`,
            `ode_tolerance`).

    Returns:
        `dict`: the metrics plus `scheduler`, `num_inference_steps`, `seconds`.

    Raises:
        `EvaluationError`, before anything is sampled: a number out of range, a folder without `model_index.json`,
        `unet/` or `scheduler/`, a damaged JSON file (named), or a UNet that is not 1-channel.
    """
    import time

    from custom_pipelines import TutorialClassConditionalPipeline

    # 0. Validate at the door: the flags, then the folder, then the model, all before sampling.
    for flag, value, low in (
        ("--num_samples", num_samples, 2),
        ("--num_inference_steps", num_inference_steps, 1),
        ("--likelihood_samples", likelihood_samples, 0),
    ):
        if value < low:
            raise EvaluationError(f"{flag}={value} must be >= {low}.")
    index = _read_model_index(folder)
    class_name = index.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    conditional = class_name == TutorialClassConditionalPipeline.__name__
    if conditional and likelihood_samples:
        raise EvaluationError(
            f"--likelihood_samples={likelihood_samples}: likelihoods are computed for unconditional pipelines, and "
            f"{folder!r} holds a {class_name}; pass --likelihood_samples 0."
        )
    pipe = _load_pipeline(folder, conditional)
    channels = pipe.unet.config.in_channels
    if channels != 1:
        raise EvaluationError(
            f"{folder!r}: the UNet has in_channels={channels}; the digits metrics compare samples with the 1-channel "
            "(grayscale) digits, so they need a 1-channel model."
        )
    sched = load_scheduler(scheduler, pipe.scheduler)
    labels = None
    if pipe.unet.config.num_class_embeds:
        labels = torch.arange(num_samples) % min(pipe.unet.config.num_class_embeds - 1, DIGITS_NUM_CLASSES)
    tic = time.perf_counter()
    samples = sample_sharded(
        pipe.unet.eval(),
        sched,
        num_samples,
        num_inference_steps,
        seed,
        class_labels=labels,
        guidance_scale=guidance_scale,
    )
    seconds = time.perf_counter() - tic
    if grid_path:
        save_grid(samples[:64], grid_path, scale=4)
    metrics = {
        "scheduler": type(sched).__name__,
        "num_inference_steps": num_inference_steps,
        "seconds": seconds,
        **digits_metrics(samples, labels),
    }
    if likelihood_samples:
        metrics.update(likelihood_metrics(pipe, likelihood_samples, elbo_steps, ode_tolerance, seed))
    return metrics


def _read_model_index(folder: str) -> Dict:
    """The folder's `model_index.json`, after checking that the folders `unet/` and `scheduler/` it needs exist."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise EvaluationError(f"{folder!r} is not a pipeline folder (no model_index.json).")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except ValueError as err:
        raise EvaluationError(
            f"{index_path} is not a valid JSON file ({err}); the pipeline folder is damaged."
        ) from err
    if not isinstance(index, dict):
        raise EvaluationError(f"{index_path} holds a {type(index).__name__}, not the JSON object of a pipeline.")
    for name in ("unet", "scheduler"):
        if not os.path.isdir(os.path.join(folder, name)):
            raise EvaluationError(
                f"{folder!r} has no {name}/ folder; evaluate.py needs a pipeline folder written by save_pretrained "
                "(model_index.json, unet/, scheduler/)."
            )
    return index


def _load_pipeline(folder: str, conditional: bool):
    """The saved pipeline (our class, no remote code); a damaged file is named in an `EvaluationError`."""
    from custom_pipelines import TutorialClassConditionalPipeline, TutorialUnconditionalPipeline

    pipeline_cls = TutorialClassConditionalPipeline if conditional else TutorialUnconditionalPipeline
    try:
        return pipeline_cls.from_pretrained(folder)
    except (OSError, ValueError) as err:  # diffusers names the file: "the config file at '...' is not a valid JSON"
        raise EvaluationError(f"cannot load the pipeline in {folder!r}: {' '.join(str(err).split())}") from err


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


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description="Digits metrics of a saved pipeline folder.")
    p.add_argument("folder")
    p.add_argument("--scheduler", default="saved", choices=SCHEDULER_CHOICES)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--num_samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--grid", default=None, help="Write a PNG grid of the samples here.")
    p.add_argument("--output", default=None, help="Write the metrics as JSON here.")
    p.add_argument(
        "--likelihood_samples",
        type=int,
        default=0,
        help="Also report the variational bound and the ODE likelihood (bits/dim) of this many held-out "
        "digits (0: skip).",
    )
    p.add_argument("--elbo_steps", type=int, default=100, help="Grid size of the variational bound.")
    p.add_argument("--ode_tolerance", type=float, default=1e-3, help="rtol = atol of the ODE likelihood solver.")
    args = p.parse_args(argv)
    try:
        metrics = evaluate_folder(
            args.folder,
            args.scheduler,
            args.num_inference_steps,
            args.num_samples,
            args.seed,
            args.guidance_scale,
            args.grid,
            args.likelihood_samples,
            args.elbo_steps,
            args.ode_tolerance,
        )
    except ValueError as err:  # EvaluationError, or a pipeline's check of an argument
        print(f"evaluate.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from err
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return metrics


if __name__ == "__main__":
    main()
