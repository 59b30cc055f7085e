"""The generic sampling loop every diffusers scheduler is written for, as one function the tutorial and tests call.

A pipeline runs the same loop with its chores around it (batching, callbacks, progress bar, NaN checks, images out);
`sample_loop` is the loop alone, for any model that maps (x_t, t) to the scheduler's `prediction_type`: a UNet, an
exact Gaussian-mixture model, a guided combination of two.
"""

import inspect
from typing import Callable, Optional, Sequence

import torch
from diffusers import SchedulerMixin


def sample_loop(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    num_inference_steps: Optional[int] = None,
    timesteps: Optional[Sequence] = None,
    generator: Optional[torch.Generator] = None,
    **step_kwargs,
) -> torch.Tensor:
    """Sample from p_θ(x_0) by walking the scheduler's grid from x_T = σ_init z (DDPM Algorithm 2 for DDPM).

    For every entry t of `scheduler.timesteps` (a second-order scheduler lists a step's evaluations as entries):
    x ← `scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample`. The number of model
    evaluations is `len(scheduler.timesteps)` afterwards.

    Args:
        model (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`): (x_t, t) -> the model output the scheduler
            expects (ε, x_0 or v by its `prediction_type`). For a `UNet2DModel` pass `lambda x, t: unet(x, t).sample`.
        scheduler (`SchedulerMixin`): any scheduler, ours or diffusers'.
        noise (`torch.Tensor`): z ~ N(0, I); the loop starts from `z * scheduler.init_noise_sigma`.
        num_inference_steps (`int`, *optional*): passed to `scheduler.set_timesteps`.
        timesteps (`Sequence`, *optional*): a custom grid, passed to `scheduler.set_timesteps(timesteps=...)`. With
            neither this nor `num_inference_steps`, `set_timesteps` is not called and the scheduler's current grid
            is walked (a fresh scheduler's is the full training grid).
        generator (`torch.Generator`, *optional*): the noise of stochastic steps, passed to `scheduler.step` when its
            signature has a `generator` parameter.
        step_kwargs: further keyword arguments of `scheduler.step` (e.g. `eta` for DDIM).

    Returns:
        `torch.Tensor`: the sample x_0, of the shape of `noise`.
    """
    if num_inference_steps is not None or timesteps is not None:
        grid = {} if timesteps is None else {"timesteps": timesteps}
        scheduler.set_timesteps(num_inference_steps, **grid)
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x
