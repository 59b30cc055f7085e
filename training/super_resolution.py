"""SR3 training and evaluation (`--conditioning super_resolution`; Saharia et al. 2021, arXiv:2104.07636).

The measurement is the one the training-free restoration methods see: y = A x_0 with A = `SuperResolution(k)` of
`custom_pipelines/tutorial_operators.py`, the mean of each k × k block. The UNet's second input is A⁺ y, nearest
upsampling, because it is A's pseudo-inverse: A A⁺ y = y exactly, the values stay in [-1, 1], and nothing is invented
between samples (bicubic overshoots on 4 × 4 digits and is not A⁺; the UNet can learn any interpolation it needs).

Noise conditioning augmentation (Ho et al. 2021, arXiv:2106.15282, sec. 4.2; the Stable Diffusion ×4 upscaler and
DeepFloyd IF stage II): each example's A⁺ y is noised to a level s ~ U{0, ..., `--sr_noise_level_max`},
√ᾱ_s A⁺y + √(1 − ᾱ_s) ε' (DDPM eq. (4) on the training schedule), and s is the UNet's class label
(`class_embed_type="timestep"`, IF stage II's choice: any integer level is embedded like a timestep, no table of
levels to outgrow). Sampling fixes s (`--sr_noise_level`, the pipeline's `noise_level`).

Evaluation on the built-in digits: the first N held-out (test-split) digits are degraded, restored, and scored: PSNR
against the original, consistency ‖A x̂ − y‖ (RMS, in [0, 1] pixel units), the digits classifier's accuracy on the
restored images against the true labels and the Fréchet distance of their features to the held-out digits'. The same
numbers for A⁺ y itself (nearest upsampling) say what the model adds. The grid shows rows of A⁺ y | sample | original.
"""

import logging
import os
from typing import Dict, Optional, Tuple

import torch

from custom_pipelines.tutorial_operators import SuperResolution
from schedulers import tutorial_math as tm

logger = logging.getLogger("train_unconditional")

GRID_EXAMPLES = 8  # rows of the grid: A⁺ y | sample | original
SAMPLE_BATCH = 256  # images per pipeline call on each process


def unet_overrides(channels: int) -> Dict:
    """The UNet2DModel config entries of an SR3 UNet: x_t and A⁺ y in, x_t's parameterisation out, s as a label."""
    return {"in_channels": 2 * channels, "out_channels": channels, "class_embed_type": "timestep"}


def noisy_condition(
    x0: torch.Tensor, factor: int, level_max: int, alpha_bar_table: torch.Tensor, g: Optional[torch.Generator]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The UNet's conditioning input for a training batch, and each example's noise level s (its class label).

    Args:
        x0 (`torch.Tensor`): the high-resolution batch in [-1, 1], (B, C, H, W).
        factor (`int`): k of `SuperResolution(k)`. level_max (`int`): s is drawn from 0..level_max.
        alpha_bar_table (`torch.Tensor`): ᾱ of the training schedule, on `x0`'s device.
        g (`torch.Generator`, *optional*): the micro-batch's generator (after the noise and timestep draws).

    Returns:
        `(condition, levels)`: √ᾱ_s A⁺(A x_0) + √(1 − ᾱ_s) ε' of x0's shape and dtype, and s of shape (B,).
    """
    operator = SuperResolution(factor)
    upsampled = operator.A_pinv(operator.A(x0))  # A⁺ y, y = A x_0 (DDNM eq. (9))
    levels = torch.randint(0, level_max + 1, (x0.shape[0],), generator=g, device=x0.device)
    eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
    return tm.q_sample(upsampled, eps, alpha_bar_table[levels]).to(x0.dtype), levels  # DDPM eq. (4) at s


def make_pipeline(unet, scheduler):
    from custom_pipelines import TutorialSuperResolutionPipeline

    return TutorialSuperResolutionPipeline(unet=unet, scheduler=scheduler)


@torch.no_grad()
def restore_sharded(
    unet, scheduler, y: torch.Tensor, num_inference_steps: int, noise_level: int, seed: int = 0, accelerator=None
) -> torch.Tensor:
    """Samples x̂ ~ p_θ(x | y) for every row of `y`, process r of W taking rows r, r + W, ...; gathered in order.

    Row i uses the generator of `training.sampling.sample_generators(seed, [i])`, so the result equals a
    one-process run's.

    Args:
        unet (`UNet2DModel`): the SR3 denoiser. scheduler (`SchedulerMixin`): the sampler.
        y (`torch.Tensor`): low-resolution images in [-1, 1], (N, C, h, w), on the CPU.
        num_inference_steps (`int`): N of `set_timesteps`. noise_level (`int`): s of the conditioning image.
        seed (`int`): see above. accelerator (`Accelerator`, *optional*): shards the rows over its processes.

    Returns:
        `torch.Tensor`: (N, C, H, W) in [-1, 1], on the CPU, on every process.
    """
    from training.sampling import sample_generators

    n = y.shape[0]
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    per_process = -(-n // world)
    indices = [rank + j * world for j in range(per_process)]  # the last ones may exceed n: padding
    pipe = make_pipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for start in range(0, per_process, SAMPLE_BATCH):
        idx = indices[start : start + SAMPLE_BATCH]
        low_res = (y[[i % n for i in idx]] + 1) / 2
        images = pipe(
            low_res.to(unet.device),
            num_inference_steps=num_inference_steps,
            noise_level=noise_level,
            generator=sample_generators(seed, idx),
            output_type="pt",
        ).images
        chunks.append(images.float() * 2 - 1)
    local = torch.cat(chunks)
    if world == 1:
        return local[:n].cpu()
    gathered = accelerator.gather(local.to(accelerator.device).contiguous()).cpu()
    ordered = gathered.reshape(world, per_process, *local.shape[1:]).transpose(0, 1).reshape(-1, *local.shape[1:])
    return ordered[:n]


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE) with both in [0, 1] (inputs in [-1, 1]); a perfect image counts 100 dB."""
    mse = ((x.float() - reference.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def restoration_metrics(restored: torch.Tensor, original: torch.Tensor, labels: Optional[torch.Tensor], factor: int):
    """PSNR, consistency and, for 1-channel digits with labels, the digits classifier's accuracy and Fréchet distance.

    Args:
        restored, original (`torch.Tensor`): (N, C, H, W) in [-1, 1]. labels (`torch.Tensor`, *optional*): (N,).
        factor (`int`): k of the measurement y = A x (block means).

    Returns:
        `dict`: `psnr`, `consistency_rmse` (‖A x̂ − y‖ as an RMS in [0, 1] units) and, with labels,
        `restored_accuracy`, `frechet_distance`, `mean_confidence`, `class_coverage`.
    """
    operator = SuperResolution(factor)
    y = operator.A(original.float())
    out = {
        "psnr": psnr(restored, original),
        "consistency_rmse": float(((operator.A(restored.float()) - y) / 2).pow(2).mean().sqrt()),
    }
    if labels is not None and restored.shape[1] == 1 and len(restored) >= 2:
        from training.digits_classifier import load_classifier
        from training.metrics import digits_metrics

        digits = digits_metrics(restored)
        out["restored_accuracy"] = float((load_classifier()(restored.float()).argmax(-1) == labels).float().mean())
        out.update({k: digits[k] for k in ("frechet_distance", "mean_confidence", "class_coverage")})
    return out


def held_out(settings, n: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The first `n` held-out digits at `--resolution` and their labels; (None, None) off the built-in digits."""
    from training.data import load_digits_tensors
    from training.settings import uses_digits

    if not uses_digits(settings):
        return None, None
    images, labels = load_digits_tensors(settings.resolution, "test")
    images = images.expand(-1, settings.num_channels, -1, -1)
    return images[:n].contiguous(), labels[:n]


def evaluate(accelerator, unet, settings, scheduler, state, writer, name: str):
    """Restore held-out digits from their ×k block means; save the grid, compute `restoration_metrics`.

    Returns:
        `tuple`: (`dict` of metrics with `"step"`, the grid's images (rows of A⁺ y | sample | original, in [-1, 1]),
        or None off the built-in digits, where no held-out images exist and the evaluation is skipped).
    """
    from training.grids import save_grid
    from training.output_folder import GRIDS

    metrics = {"step": state.global_step}
    n = settings.eval_num_samples or settings.eval_batch_size
    original, labels = held_out(settings, n)
    if original is None:
        if accelerator.is_main_process:
            logger.info("super-resolution evaluation skipped: it restores held-out images, which only the digits have")
        return metrics, None
    operator = SuperResolution(settings.sr_factor)
    y = operator.A(original)
    if accelerator.is_local_main_process:
        logger.info(
            "validation (%s): restoring %d held-out digits from %dx%d with %s, %d steps, noise level %d",
            name,
            len(y),
            y.shape[-2],
            y.shape[-1],
            type(scheduler).__name__,
            settings.ddpm_num_inference_steps,
            settings.sr_noise_level,
        )
    restored = restore_sharded(
        unet, scheduler, y, settings.ddpm_num_inference_steps, settings.sr_noise_level, settings.seed, accelerator
    )
    rows = min(GRID_EXAMPLES, len(y))
    grid = torch.stack([operator.A_pinv(y[:rows]), restored[:rows], original[:rows]], dim=1).flatten(0, 1)
    if accelerator.is_main_process:
        save_grid(grid, os.path.join(settings.output_dir, GRIDS, f"{name}.png"), nrow=3, scale=4)
        if writer is not None:
            writer.add_images("super_resolution", (grid / 2 + 0.5).clamp(0, 1), state.global_step)
        metrics.update(restoration_metrics(restored, original, labels, settings.sr_factor))
        baseline = restoration_metrics(operator.A_pinv(y), original, labels, settings.sr_factor)
        metrics.update(
            {f"upsampled_{k.replace('restored_', '')}": v for k, v in baseline.items() if k != "consistency_rmse"}
        )
        metrics["num_samples"] = len(y)
        metrics["noise_level"] = settings.sr_noise_level
    return metrics, grid


def is_super_resolution(settings) -> bool:
    """Whether the run trains SR3 (settings of other scripts, without `conditioning`, do not)."""
    return getattr(settings, "conditioning", "none") == "super_resolution"


def grid_rows(settings) -> Optional[int]:
    """Images per row of the model card's grid: 3 (A⁺ y | sample | original) for SR3, else the default square."""
    return 3 if is_super_resolution(settings) else None


def model_card_lines(settings) -> list:
    """What the model card says about an SR3 model: the measurement, the noise levels, how to call it."""
    if not is_super_resolution(settings):
        return []
    k, size = settings.sr_factor, settings.resolution
    return [
        f"Super-resolution (SR3) x{k}: {size // k}x{size // k} -> {size}x{size}. The low-resolution input is the "
        f"mean of each {k}x{k} block (`SuperResolution({k})` of `tutorial_operators.py`), in [0, 1]; trained with "
        f"noise levels 0..{settings.sr_noise_level_max} on the upsampled input, evaluated at "
        f"`noise_level={settings.sr_noise_level}`.",
        "",
    ]
