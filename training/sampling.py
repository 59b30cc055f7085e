"""Sampling many digits from a UNet and a scheduler, sharded over processes, reproducible per sample index."""

from typing import List, Optional, Sequence

import torch


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
