"""Our five schedulers inside diffusers' own Stable Diffusion pipelines: txt2img, img2img (any strength), inpainting.

The components are tiny and random (a 2-block `UNet2DConditionModel`, a 2-block `AutoencoderKL`), built here; the
prompt is given as `prompt_embeds`, so no text encoder or tokenizer is needed and nothing is downloaded. What is
checked: every scheduler runs every pipeline to finite images, starting part-way for img2img and inpainting
(diffusers' `get_timesteps` + `set_begin_index`), and our DDPM/DDIM give diffusers' DDPMScheduler/DDIMScheduler's
images in the same pipeline (both are right there: the SD config uses `leading` spacing).
"""

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from schedulers import (
    TutorialDDIMScheduler,
    TutorialDDPMScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    TutorialPFODEScheduler,
    TutorialScoreSDEScheduler,
)

# Stable Diffusion v1's scheduler config (what `pipe.scheduler.config` holds for a real checkpoint).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
OURS = {
    "ddpm": TutorialDDPMScheduler,
    "ddim": TutorialDDIMScheduler,
    "dpmpp": TutorialDPMSolverPlusPlusScheduler,
    "pf_ode": TutorialPFODEScheduler,
    "sde": TutorialScoreSDEScheduler,
}
THEIRS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
SIZE = 16  # image side; the latents are 8 x 8

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


@pytest.fixture(scope="module")
def components():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
    ).eval()
    vae = AutoencoderKL(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    absent = dict.fromkeys(("text_encoder", "tokenizer", "safety_checker", "feature_extractor"))  # None each
    return dict(unet=unet, vae=vae, requires_safety_checker=False, **absent)


def inputs(kind: str, strength: float = 0.6) -> dict:
    g = torch.Generator().manual_seed(7)
    embeds = torch.randn(1, 3, 8, generator=g)
    args = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), guidance_scale=2.0)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g)
    if kind == "img2img":
        args.update(image=image, strength=strength)
    elif kind == "inpaint":
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., SIZE // 2 :, :] = 1  # repaint the lower half
        args.update(image=image, mask_image=mask, strength=strength, height=SIZE, width=SIZE)
    else:
        args.update(height=SIZE, width=SIZE)
    return args


PIPELINES = {
    "txt2img": StableDiffusionPipeline,
    "img2img": StableDiffusionImg2ImgPipeline,
    "inpaint": StableDiffusionInpaintPipeline,
}


def generate(components, kind, scheduler, num_inference_steps=5, eta=0.0, **overrides):
    pipe = PIPELINES[kind](scheduler=scheduler, **components)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: calls.append(float(args[1])))
    try:
        images = pipe(
            num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            eta=eta,
            **{**inputs(kind), **overrides},
        ).images
    finally:
        hook.remove()
    return images, calls


@pytest.mark.parametrize("kind", list(PIPELINES))
@pytest.mark.parametrize("name", list(OURS))
def test_every_scheduler_runs_every_stable_diffusion_pipeline(components, kind, name):
    scheduler = OURS[name].from_config(DDIMScheduler(**SD_SCHEDULER_CONFIG).config)
    images, calls = generate(components, kind, scheduler)
    assert images.shape == (1, 3, SIZE, SIZE) and bool(torch.isfinite(images).all())
    # The pipeline walked the tail of scheduler.timesteps that diffusers' get_timesteps chose, once per entry.
    n = 5 if kind == "txt2img" else int(5 * 0.6)
    expected = scheduler.timesteps[(5 - n) * scheduler.order :].tolist()
    assert calls == expected
    assert scheduler.step_index == len(scheduler.timesteps)


@pytest.mark.parametrize("strength", [0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("name", ["dpmpp", "pf_ode", "sde"])
def test_img2img_at_any_strength(components, name, strength):
    """The three schedulers that could not start part-way (issue #13) do it at every strength."""
    scheduler = OURS[name].from_config(DDIMScheduler(**SD_SCHEDULER_CONFIG).config)
    images, calls = generate(components, "img2img", scheduler, num_inference_steps=10, strength=strength)
    assert bool(torch.isfinite(images).all())
    t_start = 10 - int(10 * strength)
    assert scheduler.begin_index == t_start * scheduler.order
    assert calls == scheduler.timesteps[t_start * scheduler.order :].tolist()


@pytest.mark.parametrize("kind", list(PIPELINES))
@pytest.mark.parametrize("name", list(THEIRS))
def test_ddpm_and_ddim_give_diffusers_images(components, kind, name):
    """Same pipeline, same seed: our DDPM/DDIM and diffusers' give the same images (float32 rounding of ᾱ apart)."""
    config = DDIMScheduler(**SD_SCHEDULER_CONFIG).config
    ours, _ = generate(components, kind, OURS[name].from_config(config), eta=0.5)
    theirs, _ = generate(components, kind, THEIRS[name].from_config(config), eta=0.5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
