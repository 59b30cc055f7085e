"""Digits metrics of a saved pipeline folder, sampled with any scheduler and number of steps (the command line).

    python training/evaluate.py PIPELINE_FOLDER --scheduler ddim --num_inference_steps 50 --num_samples 512

The metrics are `training.metrics.digits_metrics` (Fréchet distance in the shipped digits classifier's feature space,
class coverage, confidence) and, with `--likelihood_samples N`, `training.metrics.likelihood_metrics`. Samples come
from `training.sampling.sample_sharded`; `--grid` draws them with `training.grids.save_grid`.
"""

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional

import diffusers
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import schedulers
from training.data import DIGITS_NUM_CLASSES
from training.errors import TrainingError
from training.grids import save_grid
from training.metrics import digits_metrics, likelihood_metrics
from training.sampling import sample_sharded

logger = logging.getLogger(__name__)


class EvaluationError(TrainingError):
    """A problem the user can fix (the folder, a flag); the CLI prints it on one line, without a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# CLI: evaluate any saved pipeline folder with any scheduler and number of steps
# ----------------------------------------------------------------------------------------------------------------
# --scheduler NAME: every scheduler of ours, and diffusers' best-known ones for comparison, each built with
# `from_config(<the folder's scheduler config>)`; "saved" samples with the folder's own scheduler.
OUR_SCHEDULERS = (
    ("ddpm", schedulers.TutorialDDPMScheduler),
    ("ddim", schedulers.TutorialDDIMScheduler),
    ("pf-ode", schedulers.TutorialPFODEScheduler),
    ("score-sde", schedulers.TutorialScoreSDEScheduler),
    ("dpm-solver++", schedulers.TutorialDPMSolverPlusPlusScheduler),
    ("distilled", schedulers.TutorialDistilledScheduler),
)
SCHEDULERS = OUR_SCHEDULERS + (
    ("diffusers-ddpm", diffusers.DDPMScheduler),
    ("diffusers-ddim", diffusers.DDIMScheduler),
    ("dpm-solver", diffusers.DPMSolverMultistepScheduler),
    ("euler", diffusers.EulerDiscreteScheduler),
)
SCHEDULER_CHOICES = ("saved",) + tuple(name for name, _ in SCHEDULERS)


def check_scheduler_choice(kind: str) -> None:
    """Raise `EvaluationError` unless `kind` is one of `SCHEDULER_CHOICES`."""
    if kind not in SCHEDULER_CHOICES:
        raise EvaluationError(f"--scheduler={kind!r} is not supported; choose one of {SCHEDULER_CHOICES}.")


def load_scheduler(kind: str, saved):
    """The scheduler to sample with: the folder's own (`"saved"`), or one of `SCHEDULERS` built from its config.

    Args:
        kind (`str`): one of `SCHEDULER_CHOICES`.
        saved (`SchedulerMixin`): the folder's scheduler; its config configures the others.

    Returns:
        `SchedulerMixin`: `saved` itself, or a new scheduler built with `from_config(saved.config)`.
    """
    check_scheduler_choice(kind)
    if kind == "saved":
        return saved
    return dict(SCHEDULERS)[kind].from_config(saved.config)


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
    noise_level: int = 20,
    sr_factor: int = 4,
) -> Dict:
    """Sample from a saved pipeline folder and compute `digits_metrics` (and, if asked, `likelihood_metrics`).

    A super-resolution (SR3) folder restores the first `num_samples` held-out digits from their `sr_factor` block
    means at `noise_level` instead, and reports `training.super_resolution.restoration_metrics`.

    Args:
        folder (`str`): a folder written by `TutorialUnconditionalPipeline.save_pretrained` (or the class-conditional
            or latent pipeline's: a latent folder's samples are decoded through its VAE before they are scored).
        scheduler (`str`): one of `SCHEDULER_CHOICES`; `"saved"` uses the folder's scheduler.
        num_inference_steps (`int`): sampling steps. num_samples (`int`): samples to draw.
        seed (`int`): sample i uses seed `seed * 1_000_003 + i`.
        guidance_scale (`float`): CFG scale for class-conditional UNets.
        grid_path (`str`, *optional*): also write the first 64 samples as a grid there.
        likelihood_samples (`int`): with N > 0, also `likelihood_metrics` of N held-out digits (`elbo_steps`,
            `ode_tolerance`).

    Returns:
        `dict`: the metrics plus `scheduler`, `num_inference_steps`, `seconds`.

    Each phase is logged as it starts (`logging`, INFO); the sampling shows a progress bar named
    `"evaluation samples"` on stderr that counts the denoising steps.

    Raises:
        `EvaluationError`, before anything is sampled: a number out of range, a folder without `model_index.json`,
        `unet/` or `scheduler/`, a damaged JSON file (named), a model that does not make 1-channel images (the UNet,
        or a latent folder's VAE), or likelihoods asked of a class-conditional or latent folder.
    """
    import time

    # 0. Validate at the door: the flags, then the folder, then the model, all before sampling.
    check_scheduler_choice(scheduler)
    for flag, value, low in (
        ("--num_samples", num_samples, 2),
        ("--num_inference_steps", num_inference_steps, 1),
        ("--likelihood_samples", likelihood_samples, 0),
    ):
        if value < low:
            raise EvaluationError(f"{flag}={value} must be >= {low}.")
    if _class_name(_read_model_index(folder)) == "TutorialSuperResolutionPipeline":
        return _evaluate_super_resolution(
            folder, scheduler, num_inference_steps, num_samples, seed, noise_level, sr_factor
        )
    pipe = _load_checked_pipeline(folder, likelihood_samples)
    sched = load_scheduler(scheduler, pipe.scheduler)
    labels = None
    if pipe.unet.config.num_class_embeds:
        labels = torch.arange(num_samples) % min(pipe.unet.config.num_class_embeds - 1, DIGITS_NUM_CLASSES)
    logger.info(
        "evaluation: sampling %d images from %s with %s, %d steps",
        num_samples,
        folder,
        type(sched).__name__,
        num_inference_steps,
    )
    tic = time.perf_counter()
    samples = sample_sharded(
        pipe.unet.eval(),
        sched,
        num_samples,
        num_inference_steps,
        seed,
        class_labels=labels,
        guidance_scale=guidance_scale,
        desc="evaluation samples",
        vae=getattr(pipe, "vae", None),
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
        logger.info(
            "evaluation: likelihoods of %d held-out digits (variational bound with %d steps, ODE with tolerance %g)",
            likelihood_samples,
            elbo_steps,
            ode_tolerance,
        )
        metrics.update(likelihood_metrics(pipe, likelihood_samples, elbo_steps, ode_tolerance, seed))
    return metrics


def _class_name(index: Dict) -> Optional[str]:
    class_name = index.get("_class_name")
    return class_name[-1] if isinstance(class_name, list) else class_name


def _evaluate_super_resolution(folder, scheduler, num_inference_steps, num_samples, seed, noise_level, sr_factor):
    """`evaluate_folder` for an SR3 folder: restore held-out digits from their block means, score the restorations."""
    import time

    from custom_pipelines import SuperResolution, TutorialSuperResolutionPipeline
    from training.data import load_digits_tensors
    from training.super_resolution import restoration_metrics, restore_sharded

    try:
        pipe = TutorialSuperResolutionPipeline.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise EvaluationError(f"cannot load the pipeline in {folder!r}: {' '.join(str(err).split())}") from err
    size = pipe.unet.config.sample_size
    if pipe.unet.config.out_channels != 1 or size % sr_factor:
        raise EvaluationError(
            f"--sr_factor={sr_factor} with {folder!r}: the digits metrics need a 1-channel UNet whose sample_size "
            f"(now {size}, {pipe.unet.config.out_channels} channel(s)) the factor divides."
        )
    sched = load_scheduler(scheduler, pipe.scheduler)
    original, labels = load_digits_tensors(size, "test")
    original, labels = original[:num_samples], labels[:num_samples]
    y = SuperResolution(sr_factor).A(original)
    logger.info(
        "evaluation: restoring %d held-out digits from %dx%d with %s, %d steps, noise level %d",
        len(y),
        y.shape[-2],
        y.shape[-1],
        type(sched).__name__,
        num_inference_steps,
        noise_level,
    )
    tic = time.perf_counter()
    restored = restore_sharded(pipe.unet.eval(), sched, y, num_inference_steps, noise_level, seed)
    return {
        "scheduler": type(sched).__name__,
        "num_inference_steps": num_inference_steps,
        "noise_level": noise_level,
        "sr_factor": sr_factor,
        "seconds": time.perf_counter() - tic,
        **restoration_metrics(restored, original, labels, sr_factor),
    }


def _load_checked_pipeline(folder: str, likelihood_samples: int):
    """The folder's pipeline, after checking the folder, that likelihoods are asked of pixel-space unconditional ones
    only, and that the model makes 1-channel digits (the UNet, or a latent folder's VAE decoder); every problem an
    `EvaluationError`."""
    from custom_pipelines import TutorialClassConditionalPipeline, TutorialLatentPipeline

    class_name = _class_name(_read_model_index(folder))
    if (
        class_name in (TutorialClassConditionalPipeline.__name__, TutorialLatentPipeline.__name__)
        and likelihood_samples
    ):
        raise EvaluationError(
            f"--likelihood_samples={likelihood_samples}: likelihoods are computed for pixel-space unconditional "
            f"pipelines, and {folder!r} holds a {class_name}; pass --likelihood_samples 0."
        )
    pipe = _load_pipeline(folder, class_name)
    if isinstance(pipe, TutorialLatentPipeline):
        made_by, channels = "the VAE decodes to out_channels", pipe.vae.config.out_channels
    else:
        made_by, channels = "the UNet has in_channels", pipe.unet.config.in_channels
    if channels != 1:
        raise EvaluationError(
            f"{folder!r}: {made_by}={channels}; the digits metrics compare samples with the 1-channel (grayscale) "
            "digits, so they need a 1-channel model."
        )
    return pipe


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


def _load_pipeline(folder: str, class_name: Optional[str]):
    """The saved pipeline (our class, no remote code); a damaged file is named in an `EvaluationError`."""
    from custom_pipelines import (
        TutorialClassConditionalPipeline,
        TutorialLatentPipeline,
        TutorialUnconditionalPipeline,
    )

    pipeline_cls = {
        TutorialClassConditionalPipeline.__name__: TutorialClassConditionalPipeline,
        TutorialLatentPipeline.__name__: TutorialLatentPipeline,
    }.get(class_name, TutorialUnconditionalPipeline)
    try:
        return pipeline_cls.from_pretrained(folder)
    except (OSError, ValueError) as err:  # diffusers names the file: "the config file at '...' is not a valid JSON"
        raise EvaluationError(f"cannot load the pipeline in {folder!r}: {' '.join(str(err).split())}") from err


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description="Digits metrics of a saved pipeline folder.")
    p.add_argument("folder")
    p.add_argument(
        "--scheduler",
        default="saved",
        choices=SCHEDULER_CHOICES,
        help="'saved' (the folder's own), one of ours ("
        + ", ".join(name for name, _ in OUR_SCHEDULERS)
        + ") or a diffusers "
        "one; all built from the folder's scheduler config.",
    )
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--num_samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    sr = p.add_argument_group("super-resolution", "SR3 folders: held-out digits restored from their block means.")
    sr.add_argument("--noise_level", type=int, default=20, help="Noise level of the upsampled conditioning image.")
    sr.add_argument("--sr_factor", type=int, default=4, help="k: the input is the mean of each k x k block.")
    p.add_argument("--grid", default=None, help="Write a PNG grid of the samples here.")
    p.add_argument("--output", default=None, help="Write the metrics as JSON here.")
    likelihood = p.add_argument_group("likelihood", "The variational bound and the ODE likelihood, in bits/dim.")
    likelihood.add_argument("--likelihood_samples", type=int, default=0, help="Held-out digits to score (0: skip).")
    likelihood.add_argument("--elbo_steps", type=int, default=100, help="Grid size of the variational bound.")
    likelihood.add_argument("--ode_tolerance", type=float, default=1e-3, help="rtol = atol of the ODE solver.")
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
            args.noise_level,
            args.sr_factor,
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
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main()
