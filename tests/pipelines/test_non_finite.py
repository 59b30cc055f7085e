"""A NaN or ±inf in sampling raises `FloatingPointError` naming the step, whatever keeps x̂_0 in range (issue #11.6).

Before: a model output of +inf with `TutorialDDPMScheduler(clip_sample=True)` was clipped to x̂_0 = 1 and the
pipeline returned all-black images without a word. On an accelerator the check is deferred to the loop's last step
(no host synchronisation per step); `_defer_finite_check = True` runs that path on the CPU.
"""

import inspect

import pytest
import torch

from custom_pipelines import TutorialImg2ImgPipeline, TutorialUnconditionalPipeline
from schedulers import (
    TutorialDDIMScheduler,
    TutorialDDPMScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    TutorialPFODEScheduler,
    TutorialScoreSDEScheduler,
)

# Each way of keeping x̂_0 in range, with each scheduler whose config has it: the continuous schedulers have no
# `clip_sample` key (from_config carries it along unused), so such a case ran with nothing kept in range.
KEEP_IN_RANGE = [
    pytest.param(cls, keep, id=f"{cls.__name__}-{keep}")
    for cls in (
        TutorialDDPMScheduler,
        TutorialDDIMScheduler,
        TutorialDPMSolverPlusPlusScheduler,
        TutorialPFODEScheduler,
        TutorialScoreSDEScheduler,
    )
    for keep in ("clip_sample", "thresholding")
    if keep in cls().config
]


def poisoned(unet, at_call: int, value: float):
    """A forward hook that puts `value` into one entry of the UNet's output at its `at_call`-th call (0-based)."""
    calls = []

    def hook(module, args, output):
        if len(calls) == at_call:
            output.sample[0, 0, 0, 0] = value
        calls.append(1)
        return output

    return unet.register_forward_hook(hook), calls


@pytest.mark.parametrize("defer", [False, True], ids=["at-once", "deferred"])
@pytest.mark.parametrize("scheduler_cls, keep_in_range", KEEP_IN_RANGE)
def test_plus_inf_from_the_model_raises_naming_the_step(tiny_unet, scheduler_cls, keep_in_range, defer):
    scheduler = scheduler_cls.from_config(TutorialDDPMScheduler(**{keep_in_range: True}).config)
    # The option under test is one of this scheduler's own config keys, and on (from_config also keeps unknown keys)
    assert keep_in_range in inspect.signature(scheduler_cls.__init__).parameters
    assert scheduler.config[keep_in_range] is True
    pipe = TutorialUnconditionalPipeline(unet=tiny_unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe._defer_finite_check = defer
    handle, calls = poisoned(tiny_unet, at_call=1, value=float("inf"))
    try:
        with pytest.raises(
            FloatingPointError, match=r"after step 1 of \d+ \(timestep .*\); it first appeared in the model output"
        ):
            pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    # At once: the loop stops at the bad step. Deferred: it runs to its end and then names the first bad step.
    assert len(calls) == (len(scheduler.timesteps) if defer else 2)


def test_deferred_check_names_the_first_bad_step_and_passes_clean_loops(tiny_unet):
    pipe = TutorialImg2ImgPipeline(unet=tiny_unet, scheduler=TutorialDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe._defer_finite_check = True
    image = torch.rand(2, 3, 8, 8)
    clean = pipe(image, strength=0.8, num_inference_steps=10, output_type="pt").images
    assert bool(torch.isfinite(clean).all())
    handle, _ = poisoned(tiny_unet, at_call=3, value=float("nan"))
    try:
        with pytest.raises(FloatingPointError, match=r"after step 3 of 8 \(timestep 400\).*model output"):
            pipe(image, strength=0.8, num_inference_steps=10)
    finally:
        handle.remove()
    again = pipe(image, strength=0.8, num_inference_steps=10, output_type="pt").images  # the watch was reset
    assert bool(torch.isfinite(again).all())
