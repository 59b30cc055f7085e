"""A NaN or ±inf in sampling raises `FloatingPointError` naming the step, whatever keeps x̂_0 in range (issue #11.6).

Before: a model output of +inf with `TutorialDDPMScheduler(clip_sample=True)` was clipped to x̂_0 = 1 and the
pipeline returned all-black images without a word. On an accelerator the check is deferred to the loop's last step
(no host synchronisation per step); `_defer_finite_check = True` runs that path on the CPU. The latent pipeline also
checks what its VAE decodes (issue #25): a NaN from the decoder became a black pixel, +inf a white one, silently.
"""

import inspect
import re

import pytest
import torch

from custom_pipelines import TutorialImg2ImgPipeline, TutorialLatentPipeline, TutorialUnconditionalPipeline
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


def poisoned(module, at_call: int, value: float):
    """A forward hook that puts `value` into one entry of the output (a tensor, or its `.sample`: the UNet's) of
    `module` at its `at_call`-th call (0-based)."""
    calls = []

    def hook(module, args, output):
        if len(calls) == at_call:
            (output.sample if hasattr(output, "sample") else output)[0, 0, 0, 0] = value
        calls.append(1)
        return output

    return module.register_forward_hook(hook), calls


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


# ---- the latent pipeline (issue #25): a NaN/inf from its UNet, and from its VAE's decoder ------------------------------
@pytest.fixture
def latent_pipe(vae_factory, unet_factory):
    pipe = TutorialLatentPipeline(
        vae=vae_factory(), unet=unet_factory(sample_size=4, in_channels=2, seed=1), scheduler=TutorialDDIMScheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Generation runs the 4 steps 750 ... 0; SDEdit at strength 0.75 the last 3 (500, 250, 0) from the encoded image.
LATENT_CALLS = {
    "generate": dict(batch_size=2, num_inference_steps=4),
    "sdedit": dict(image=torch.rand(2, 1, 8, 8), strength=0.75, num_inference_steps=4),
}


@pytest.mark.parametrize("defer", [False, True], ids=["at-once", "deferred"])
@pytest.mark.parametrize("call, num_steps, timestep", [("generate", 4, 500), ("sdedit", 3, 250)])
def test_nan_from_the_latent_unet_raises_naming_the_step_before_decoding(
    latent_pipe, call, num_steps, timestep, defer
):
    latent_pipe._defer_finite_check = defer
    handle, calls = poisoned(latent_pipe.unet, at_call=1, value=float("nan"))
    decoded = []
    decoder_handle = latent_pipe.vae.decoder.register_forward_hook(lambda *args: decoded.append(1))
    try:
        with pytest.raises(
            FloatingPointError,
            match=re.escape(
                f"after step 1 of {num_steps} (timestep {timestep}); it first appeared in the model output"
            ),
        ):
            latent_pipe(**LATENT_CALLS[call], generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
        decoder_handle.remove()
    assert len(calls) == (num_steps if defer else 2)
    assert not decoded  # the loop raised: nothing reached the decoder


@pytest.mark.parametrize("call", LATENT_CALLS)
@pytest.mark.parametrize(
    "value, output_type", [(float("nan"), "pil"), (float("inf"), "pt")], ids=["nan-pil", "inf-pt"]
)
def test_nan_or_inf_from_the_vae_decoder_raises(latent_pipe, call, value, output_type):
    # Before: NaN became a black PIL pixel and +inf a white one (the clamp to [0, 1]), with no error.
    latent_pipe._defer_finite_check = True  # the loop's deferred check runs, finds nothing; then the decoded images'
    kwargs = dict(LATENT_CALLS[call], generator=torch.Generator().manual_seed(0))
    num_steps = 4 if call == "generate" else 3
    handle, decoded = poisoned(latent_pipe.vae.decoder, at_call=0, value=value)
    try:
        with pytest.raises(
            FloatingPointError,
            match=f"decoded after step {num_steps - 1} of {num_steps}; it first appeared in the VAE's decoder",
        ):
            latent_pipe(**kwargs, output_type=output_type)
        assert len(decoded) == 1
        latents = latent_pipe(**kwargs, output_type="latent").images  # not decoded: nothing to check
        assert len(decoded) == 1 and bool(torch.isfinite(latents).all())
    finally:
        handle.remove()
    clean = latent_pipe(**kwargs, output_type="pt").images
    assert bool(torch.isfinite(clean).all())


def test_non_finite_latents_from_a_last_step_callback_are_named_as_the_decoders_input(latent_pipe):
    # The loop checks x_t before the callback: latents a callback returns at the last step reach the decoder unchecked.
    def poison(pipe, i, t, kwargs):
        return {"latents": torch.full_like(kwargs["latents"], float("nan"))} if i == 3 else {}

    with pytest.raises(FloatingPointError, match="it first appeared in the latents given to the decoder"):
        latent_pipe(**LATENT_CALLS["generate"], callback_on_step_end=poison)
