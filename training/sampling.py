"""Sampling many digits from a UNet and a scheduler, sharded over processes, reproducible per sample index."""

from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm


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
    progress: Optional[tqdm] = None,
    vae=None,
) -> torch.Tensor:
    """Samples in [-1, 1] from `unet` with `scheduler`, one per generator.

    Unconditional UNets sample through `TutorialUnconditionalPipeline`; class-conditional ones (`class_labels`)
    through `TutorialClassConditionalPipeline` with classifier-free guidance at `guidance_scale`. The pipeline's own
    progress bar stays off: the caller's `progress` (if any) advances by one per entry of the timestep grid.

    Args:
        unet (`UNet2DModel`): the denoiser. scheduler (`SchedulerMixin`): the sampler.
        generators (`list[torch.Generator]`): one per sample; they alone decide the samples.
        num_inference_steps (`int`): N, passed to `scheduler.set_timesteps`.
        class_labels (`torch.Tensor`, *optional*): one class per sample, for class-conditional UNets.
        guidance_scale (`float`, defaults to 1.0): classifier-free guidance scale (class-conditional UNets only).
        progress (`tqdm`, *optional*): a progress bar updated after every scheduler step; it changes no sample.
        vae (`AutoencoderKL`, *optional*): `unet` denoises its scaled latents; they are decoded through it
            (`TutorialLatentPipeline`, unconditional UNets only).

    Returns:
        `torch.Tensor`: the samples, (len(generators), C, H, W) in [-1, 1].
    """
    from custom_pipelines import (
        TutorialClassConditionalPipeline,
        TutorialLatentPipeline,
        TutorialUnconditionalPipeline,
    )

    if vae is not None:
        pipe = TutorialLatentPipeline(vae=vae, unet=unet, scheduler=scheduler)
        kwargs = {"batch_size": len(generators)}
    elif class_labels is None:
        pipe = TutorialUnconditionalPipeline(unet=unet, scheduler=scheduler)
        kwargs = {"batch_size": len(generators)}
    else:
        pipe = TutorialClassConditionalPipeline(unet=unet, scheduler=scheduler)
        kwargs = {"class_labels": class_labels, "guidance_scale": guidance_scale}
    pipe.set_progress_bar_config(disable=True)
    if progress is not None:
        kwargs["callback_on_step_end"] = _advance(progress)
    images = pipe(generator=generators, num_inference_steps=num_inference_steps, output_type="pt", **kwargs).images
    return images * 2 - 1


def _advance(progress: tqdm):
    """A `callback_on_step_end` that advances `progress` by one step and leaves x_t as it is."""

    def callback(pipe, step_index, timestep, callback_kwargs):
        progress.update(1)
        return {}

    return callback


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
    desc: Optional[str] = None,
    vae=None,
) -> torch.Tensor:
    """`num_samples` samples, process r of W drawing indices r, r + W, ...; gathered in index order on every process.

    The result equals a single-process run's: each sample has its own generator (`sample_generators`).

    Args:
        unet (`UNet2DModel`): the denoiser. scheduler (`SchedulerMixin`): the sampler.
        num_samples (`int`): how many samples in all (over every process).
        num_inference_steps (`int`): N, passed to `scheduler.set_timesteps`.
        seed (`int`, defaults to 0): sample i uses the seed `seed * 1_000_003 + i`.
        accelerator (`Accelerator`, *optional*): shards the samples over its processes; None: this process alone.
        class_labels (`torch.Tensor`, *optional*): the class of each of the `num_samples` samples.
        guidance_scale (`float`, defaults to 1.0): classifier-free guidance scale (class-conditional UNets only).
        batch_size (`int`, defaults to 256): samples per pipeline call on each process.
        desc (`str`, *optional*): the name of the phase: with it, a tqdm progress bar of that name (on stderr, on the
            local main process only) counts the denoising steps of every chunk of this process; None: no bar.
        vae (`AutoencoderKL`, *optional*): decode the UNet's latents through it (see `sample_digits`).

    Returns:
        `torch.Tensor`: the samples in index order, (num_samples, C, H, W) in [-1, 1], on the CPU.
    """
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    per_process = -(-num_samples // world)
    indices = [rank + j * world for j in range(per_process)]  # the last ones may exceed num_samples: padding
    starts = range(0, per_process, batch_size)
    progress = None
    if desc is not None:
        scheduler.set_timesteps(num_inference_steps)  # the grid's length: multi-stage schedulers repeat entries
        show = accelerator is None or accelerator.is_local_main_process
        progress = tqdm(total=len(scheduler.timesteps) * len(starts), desc=desc, unit="step", disable=not show)
    chunks = []
    for start in starts:
        idx = indices[start : start + batch_size]
        labels = None if class_labels is None else class_labels[[i % num_samples for i in idx]]
        generators = sample_generators(seed, idx)
        chunks.append(
            sample_digits(
                unet, scheduler, generators, num_inference_steps, labels, guidance_scale, progress=progress, vae=vae
            ).float()
        )
    if progress is not None:
        progress.close()
    local = torch.cat(chunks)
    if world == 1:
        return local[:num_samples].cpu()
    gathered = accelerator.gather(local.to(accelerator.device).contiguous()).cpu()  # (world * per_process, ...)
    ordered = gathered.reshape(world, per_process, *local.shape[1:]).transpose(0, 1).reshape(-1, *local.shape[1:])
    return ordered[:num_samples]
