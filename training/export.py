"""What a run leaves behind: validation samples and grids, the pipeline folder with its model card, the metrics."""

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Dict, List, Optional

import torch
from diffusers import UNet2DModel

from training import super_resolution
from training.data import DIGITS_NUM_CLASSES
from training.ema import EMA
from training.output_folder import GRIDS, METRICS
from training.settings import make_scheduler, uses_digits

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def ema_weights(model, ema: Optional[EMA]):
    """Temporarily load the EMA weights into `model` (no-op without EMA)."""
    if ema is None:
        yield model
        return
    with ema.applied_to(model.parameters()):
        yield model


def make_pipeline(unet, args: argparse.Namespace, vae=None):
    from custom_pipelines import (
        TutorialClassConditionalPipeline,
        TutorialLatentPipeline,
        TutorialUnconditionalPipeline,
    )

    if vae is not None:
        return TutorialLatentPipeline(vae=vae, unet=unet, scheduler=make_scheduler(args, args.validation_scheduler))
    if super_resolution.is_super_resolution(args):
        return super_resolution.make_pipeline(unet, make_scheduler(args, args.validation_scheduler))
    pipeline_cls = TutorialClassConditionalPipeline if args.num_class_embeds else TutorialUnconditionalPipeline
    return pipeline_cls(unet=unet, scheduler=make_scheduler(args, args.validation_scheduler))


def validation_samples(
    accelerator, unet, args, num_samples: int, desc: Optional[str] = "validation samples", vae=None
) -> torch.Tensor:
    """`num_samples` samples in [-1, 1], sharded over processes and gathered (identical to a 1-process run).

    Args:
        accelerator (`Accelerator`): its processes share the sampling. unet (`UNet2DModel`): the denoiser.
        args (`Settings`): `validation_scheduler`, `ddpm_num_inference_steps`, `seed`, `guidance_scale`,
            `num_class_embeds`.
        num_samples (`int`): how many samples in all.
        desc (`str`, *optional*, defaults to `"validation samples"`): the progress bar's name (shown on the local
            main process); None: no bar.
        vae (`AutoencoderKL`, *optional*): the UNet samples its latents, decoded through it (`TutorialLatentPipeline`).

    Returns:
        `torch.Tensor`: (num_samples, C, H, W) in [-1, 1], on the CPU, on every process.
    """
    from training.sampling import sample_sharded

    scheduler = make_scheduler(args, args.validation_scheduler)
    labels = samples_labels(args, num_samples)
    if accelerator.is_local_main_process:
        logger.info(
            "validation: sampling %d images with %s, %d steps",
            num_samples,
            type(scheduler).__name__,
            args.ddpm_num_inference_steps,
        )
    return sample_sharded(
        unet,
        scheduler,
        num_samples,
        args.ddpm_num_inference_steps,
        seed=args.seed,
        accelerator=accelerator,
        class_labels=labels,
        guidance_scale=args.guidance_scale,
        desc=desc,
        vae=vae,
    )


def evaluate_now(accelerator, model, ema, args, state, writer, name: Optional[str] = None, vae=None):
    """Sample with the EMA weights, save a grid, and on the digits compute the metrics; returns (metrics, samples).

    The sampling shows a progress bar named `"validation samples (<name>)"` on the local main process.

    Args:
        accelerator (`Accelerator`): the run's. model (`torch.nn.Module`): the trained (possibly wrapped) UNet.
        ema (`EMA`, *optional*): its weights are sampled from, if any.
        args (`Settings`): the run's settings. state: the run's counters (`global_step`).
        writer: a TensorBoard writer, or None.
        name (`str`, *optional*): the grid's file name without `.png`; defaults to `step_<global_step>`.
        vae (`AutoencoderKL`, *optional*): a latent run's; the samples are decoded through it.

    Returns:
        `tuple`: (`dict` of metrics with `"step"`, `torch.Tensor` of samples in [-1, 1]).
    """
    from training.grids import save_grid
    from training.metrics import digits_metrics

    unet = accelerator.unwrap_model(model)
    was_training = unet.training
    unet.eval()
    name = name or f"step_{state.global_step:06d}"
    if super_resolution.is_super_resolution(args):  # restored held-out images, not samples
        scheduler = make_scheduler(args, args.validation_scheduler)
        with ema_weights(unet, ema):
            result = super_resolution.evaluate(accelerator, unet, args, scheduler, state, writer, name)
        unet.train(was_training)
        return result
    with ema_weights(unet, ema):
        n = args.eval_num_samples or args.eval_batch_size
        samples = validation_samples(accelerator, unet, args, n, desc=f"validation samples ({name})", vae=vae)
    unet.train(was_training)
    metrics = {"step": state.global_step}
    if accelerator.is_main_process:
        save_grid(samples[: args.eval_batch_size], os.path.join(args.output_dir, GRIDS, f"{name}.png"), scale=4)
        if writer is not None:
            writer.add_images("samples", (samples[:64] / 2 + 0.5).clamp(0, 1), state.global_step)
        if uses_digits(args) and len(samples) >= 2:
            labels = samples_labels(args, len(samples))
            metrics.update(digits_metrics(samples, class_labels=labels))
    return metrics, samples


def samples_labels(args, n: int) -> Optional[torch.Tensor]:
    """The classes requested from a class-conditional model: 0, 1, ..., K-1, 0, 1, ... (None if unconditional)."""
    if not args.num_class_embeds:
        return None
    return torch.arange(n) % min(args.num_class_embeds, DIGITS_NUM_CLASSES)


def save_pipeline(accelerator, model, ema, args, samples: Optional[torch.Tensor], card_text: str, vae=None):
    """Write the self-contained pipeline folder (EMA weights in) to `output_dir` (main process only).

    Args:
        accelerator (`Accelerator`): the run's. model (`torch.nn.Module`): the trained (possibly wrapped) UNet.
        ema (`EMA`, *optional*): its weights are the ones saved, if any.
        args (`Settings`): the run's settings (`output_dir`, the validation scheduler, `ddpm_num_inference_steps`).
        samples (`torch.Tensor`, *optional*): samples in [-1, 1] for the model card's grid.
        card_text (`str`): the model card's training section.
        vae (`AutoencoderKL`, *optional*): a latent run's, saved in `vae/` (float32) with `TutorialLatentPipeline`.

    Returns:
        the saved pipeline on the main process, None on the others.
    """
    if not accelerator.is_main_process:
        return None
    logger.info("saving the pipeline folder to %s", args.output_dir)
    unet = accelerator.unwrap_model(model)
    with ema_weights(unet, ema):
        export = UNet2DModel.from_config(unet.config)
        export.load_state_dict({k: v.detach().float().cpu() for k, v in unet.state_dict().items()})
    export_vae = None
    if vae is not None:
        export_vae = type(vae).from_config(vae.config)
        export_vae.load_state_dict({k: v.detach().float().cpu() for k, v in vae.state_dict().items()})
    pipe = make_pipeline(export, args, export_vae)
    images = None if samples is None else [make_grid_image(samples, args)]
    pipe.save_pretrained(
        args.output_dir,
        num_inference_steps=args.ddpm_num_inference_steps,
        sample_images=images,
        model_card_text=card_text,
    )
    return pipe


def make_grid_image(samples: torch.Tensor, args):
    """The sample grid shown in the model card: the first `eval_batch_size` samples, enlarged 4x."""
    from training.grids import make_grid

    grid = make_grid(samples[: args.eval_batch_size], nrow=super_resolution.grid_rows(args))
    return grid.resize((grid.width * 4, grid.height * 4), resample=0)


def model_card_text(args, argv: Optional[List[str]], metrics: Dict) -> str:
    command = "accelerate launch training/train_unconditional.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        "## Training",
        "",
        "Trained with the diffusion-tutorial project's script:",
        "",
        "```bash",
        command.strip(),
        "```",
        "",
        f"Mixed precision on the training machine: `{args.mixed_precision}`.",
        "",
        f"Learning rate {args.learning_rate:g}, {args.lr_warmup_steps} warm-up updates, EMA max decay "
        f"{args.ema_max_decay:g} (`{args.preset}` defaults where not given).",
        "",
        *super_resolution.model_card_lines(args),
    ]
    if metrics:
        lines += ["## Metrics (digits classifier feature space)", ""]
        lines += [
            f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
            for k, v in metrics.items()
            if not isinstance(v, (list, dict))
        ]
    return "\n".join(lines)


def push(pipe, args, samples: torch.Tensor, card: str):
    """Upload the pipeline folder (model card and sample images included) to `--hub_model_id`."""
    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    return pipe.push_to_hub(
        repo_id,
        images=None if samples is None else [make_grid_image(samples, args)],
        token=args.hub_token,
        private=args.hub_private_repo or None,
        num_inference_steps=args.ddpm_num_inference_steps,
        model_card_text=card,
    )


def load_history(output_dir: str, up_to_step: Optional[int] = None) -> List[Dict]:
    path = os.path.join(output_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        history = json.load(f).get("history", [])
    return [h for h in history if up_to_step is None or h.get("step", 0) <= up_to_step]


def write_metrics(accelerator, args, state, history: List[Dict], final: Dict, interrupted: bool):
    if not accelerator.is_main_process:
        return
    out = {
        "global_step": state.global_step,
        "images_seen": state.images_seen,
        "interrupted": interrupted,
        "num_processes": accelerator.num_processes,
        "mixed_precision": args.mixed_precision,
        "learning_rate": args.learning_rate,
        "lr_warmup_steps": args.lr_warmup_steps,
        "ema_max_decay": args.ema_max_decay,
        "defaults": args.preset,
        "effective_batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "final": {k: v for k, v in final.items() if not k.startswith("_")},
        "history": history,
    }
    tmp = os.path.join(args.output_dir, METRICS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, os.path.join(args.output_dir, METRICS))
