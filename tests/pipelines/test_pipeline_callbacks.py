"""`callback_on_step_end` in every pipeline that takes it: what the callback returns is checked as it comes back
(issue 11.10), so latents of another shape never reach the UNet or the scheduler."""

import inspect

import pytest
import torch
from diffusers import AutoencoderKL

import custom_pipelines
from custom_pipelines import (
    Inpainting,
    TutorialClassConditionalPipeline,
    TutorialDDIMInversionPipeline,
    TutorialImg2ImgPipeline,
    TutorialInverseProblemPipeline,
    TutorialLatentPipeline,
    TutorialPipelineBase,
    TutorialSuperResolutionPipeline,
    TutorialUnconditionalPipeline,
)
from schedulers import TutorialDDIMScheduler

# Each pipeline that takes callbacks, with what its UNet needs and the call's own arguments.
CALLBACK_PIPELINES = {
    TutorialUnconditionalPipeline: ({}, dict(batch_size=2)),
    TutorialDDIMInversionPipeline: ({}, dict(batch_size=2)),
    TutorialClassConditionalPipeline: (dict(num_class_embeds=3), dict(class_labels=[0, 1], guidance_scale=2.0)),
    TutorialImg2ImgPipeline: (
        {},
        dict(image=torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), strength=1.0),
    ),
    TutorialSuperResolutionPipeline: (
        dict(in_channels=6, out_channels=3, class_embed_type="timestep"),
        dict(image=torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))),
    ),
    # One known pixel, measured as 0 (mid-grey): zero latents stay the output after DDNM's projection.
    TutorialInverseProblemPipeline: (
        {},
        dict(
            measurement=torch.zeros(2, 3), operator=Inpainting(torch.eye(8)[0:1].T @ torch.eye(8)[0:1]), method="ddnm"
        ),
    ),
    TutorialLatentPipeline: ({}, dict(batch_size=2)),
}


def _components(pipeline_cls) -> dict:
    """Components besides the UNet and the scheduler: the latent pipeline's VAE (3 x 8x8 latents, f = 1)."""
    if pipeline_cls is not TutorialLatentPipeline:
        return {}
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,), latent_channels=3, norm_num_groups=8, sample_size=8, layers_per_block=1
    ).eval()
    return {"vae": vae}


def _images_of_zero_latents(pipe) -> torch.Tensor:
    """What x_0 = 0 in model space becomes: 0.5 everywhere, or the decoded zero latents of a latent pipeline."""
    if isinstance(pipe, TutorialLatentPipeline):
        return pipe.postprocess(pipe.decode_latents(torch.zeros(2, 3, 8, 8)), "pt")
    return torch.full((2, 3, 8, 8), 0.5)


def test_every_pipeline_that_takes_callbacks_is_checked_here():
    takes_callbacks = {
        cls
        for cls in vars(custom_pipelines).values()
        if isinstance(cls, type)
        and issubclass(cls, TutorialPipelineBase)
        and "callback_on_step_end" in inspect.signature(cls.__call__).parameters
    }
    assert takes_callbacks == set(CALLBACK_PIPELINES)


@pytest.mark.parametrize("pipeline_cls", list(CALLBACK_PIPELINES), ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "returned, match",
    [
        (
            lambda x: {"latents": x[:, :, :4, :4]},
            r"callback_on_step_end returned latents of shape \(2, 3, 4, 4\) at step 1; .*shape \(2, 3, 8, 8\)",
        ),
        (lambda x: {"latents": x[:1]}, r"returned latents of shape \(1, 3, 8, 8\) at step 1"),
        (lambda x: {"latents": x.numpy()}, r"returned latents that are a ndarray, not a tensor, at step 1"),
        (lambda x: x, r"callback_on_step_end returned a Tensor at step 1; it must return a dict .* or None"),
    ],
    ids=["smaller_image", "smaller_batch", "not_a_tensor", "not_a_dict"],
)
def test_callback_returning_latents_of_another_shape_is_refused(pipeline_cls, returned, match, unet_factory):
    unet_config, call_kwargs = CALLBACK_PIPELINES[pipeline_cls]
    pipe = pipeline_cls(
        unet=unet_factory(**unet_config), scheduler=TutorialDDIMScheduler(), **_components(pipeline_cls)
    )
    pipe.set_progress_bar_config(disable=True)
    steps = []

    def callback(p, i, t, kwargs):
        steps.append(i)
        return returned(kwargs["latents"]) if i == 1 else {}

    with pytest.raises(ValueError, match=match):
        pipe(num_inference_steps=3, callback_on_step_end=callback, **call_kwargs)
    assert steps == [0, 1]  # refused as it came back, before another UNet call


@pytest.mark.parametrize("pipeline_cls", list(CALLBACK_PIPELINES), ids=lambda c: c.__name__)
def test_callback_may_return_none_or_replace_latents_of_the_same_shape(pipeline_cls, unet_factory):
    unet_config, call_kwargs = CALLBACK_PIPELINES[pipeline_cls]
    pipe = pipeline_cls(
        unet=unet_factory(**unet_config), scheduler=TutorialDDIMScheduler(), **_components(pipeline_cls)
    )
    pipe.set_progress_bar_config(disable=True)

    def callback(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else None

    images = pipe(num_inference_steps=3, callback_on_step_end=callback, output_type="pt", **call_kwargs).images
    with torch.no_grad():
        torch.testing.assert_close(images, _images_of_zero_latents(pipe))  # x_0 = 0 in [-1, 1] -> 0.5
