"""DDIM inversion + regeneration with the exact Gaussian-mixture ε (no training noise), slerp, bad input."""

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from custom_pipelines import TutorialDDIMInversionPipeline, slerp
from schedulers import TutorialDDIMScheduler
from schedulers.gaussian_mixture import GaussianMixture

SHAPE = (1, 4, 4)  # D = 16


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(dim=16, num_modes=3, seed=0)


def _exact_pipe(mixture):
    sched = TutorialDDIMScheduler(clip_sample=False, beta_schedule="squaredcos_cap_v2")
    pipe = TutorialDDIMInversionPipeline(unet=mixture.as_unet(sched.alpha_bar, SHAPE), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_invert_then_regenerate_reconstructs_the_input(mixture):
    """Inversion reads ε̂ one level off, a first-order error: it must shrink as N grows, and be small at N = 200.

    Measured with this mixture (cosine schedule, 8 samples): max |x̂_0 - x_0| = 0.137 (N=10), 0.063 (N=50),
    0.020 (N=200), for data of scale ~0.5. Bounds below leave ~2x margin.
    """
    pipe = _exact_pipe(mixture)
    x0 = mixture.sample(8, generator=torch.Generator().manual_seed(0)).reshape(8, *SHAPE)
    errors = {}
    for n in (10, 50, 200):
        inv = pipe.invert((x0 + 1) / 2, num_inference_steps=n, return_trajectory=n == 200)
        out = pipe(batch_size=8, latents=inv.latents, num_inference_steps=n, output_type="pt", return_trajectory=True)
        errors[n] = (out.trajectory[-1] - x0).abs().max().item()
    assert errors[200] < 0.04 and errors[50] < 0.12
    assert errors[200] < errors[50] < errors[10]
    assert len(inv.trajectory) == 201
    torch.testing.assert_close(inv.trajectory[0], x0)
    # x_T of the exact model looks like N(0, I) noise, not like data
    assert 0.8 < inv.latents.std().item() < 1.2


def test_slerp_is_the_great_circle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(e0, e1, 0.5), torch.tensor([[1.0, 1.0]]) / math.sqrt(2))  # norm kept, not 1/√2
    torch.testing.assert_close(slerp(e0, e1, 1 / 3), torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]]))
    torch.testing.assert_close(slerp(e0, 2 * e0, 0.5), 1.5 * e0)  # parallel: falls back to lerp, no NaN


def test_interpolation_endpoints_are_the_regenerated_images(tiny_unet):
    pipe = TutorialDDIMInversionPipeline(unet=tiny_unet, scheduler=TutorialDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    path = pipe.interpolate(latents_a=za, latents_b=zb, num_points=3, num_inference_steps=3, output_type="pt").images
    for z, image in ((za, path[:1]), (zb, path[2:])):
        torch.testing.assert_close(image, pipe(latents=z, num_inference_steps=3, output_type="pt").images)
    assert path.shape == (3, 3, 8, 8)
    # with images: inverted first (here a random UNet, so only the plumbing and shapes are checked)
    images = torch.rand(1, 3, 8, 8, generator=g)
    out = pipe.interpolate(image_a=images, latents_b=zb, num_points=2, num_inference_steps=2, output_type="np")
    assert out.images.shape == (2, 8, 8, 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p.invert(torch.rand(1, 3, 4, 4)), r"image has shape \(1, 3, 4, 4\); expected \(1, 3, 8, 8\)"),
        (
            lambda p: p.interpolate(
                latents_a=torch.zeros(1, 3, 8, 8), latents_b=torch.zeros(1, 3, 8, 8), num_points=1
            ),
            "num_points=1",
        ),
        (
            lambda p: p.interpolate(
                image_a=torch.rand(1, 3, 8, 8), latents_a=torch.zeros(1, 3, 8, 8), latents_b=torch.zeros(1, 3, 8, 8)
            ),
            "exactly one of image_a and latents_a",
        ),
        (
            lambda p: p.interpolate(latents_a=torch.zeros(2, 3, 8, 8), latents_b=torch.zeros(1, 3, 8, 8)),
            r"latents_a has shape \(2, 3, 8, 8\)",
        ),
    ],
)
def test_bad_input(tiny_unet, call, match):
    pipe = TutorialDDIMInversionPipeline(unet=tiny_unet, scheduler=TutorialDDIMScheduler())
    with pytest.raises(ValueError, match=match):
        call(pipe)


def test_scheduler_without_inverse_step_is_refused(tiny_unet):
    pipe = TutorialDDIMInversionPipeline(unet=tiny_unet, scheduler=EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="scheduler=EulerDiscreteScheduler cannot be inverted"):
        pipe.invert(torch.rand(1, 3, 8, 8))
    # generation itself still works with any scheduler
    assert pipe(num_inference_steps=2, output_type="pt").images.shape == (1, 3, 8, 8)


def test_exact_unet_predicts_the_mixture_and_refuses_a_wrong_shape(mixture):
    sched = TutorialDDIMScheduler()
    unet = mixture.as_unet(sched.alpha_bar, SHAPE)
    x = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = mixture.eps(x.reshape(3, -1), sched.alpha_bar[400]).reshape(x.shape)
    assert torch.equal(unet(x, 400).sample, expected) and torch.equal(unet(x, 400, return_dict=False)[0], expected)
    assert (unet.config.in_channels, unet.config.sample_size, unet.dtype) == (1, 4, torch.float64)
    with pytest.raises(ValueError, match=r"sample_shape=\(1, 4, 5\) holds 20 values; the mixture has D = 16"):
        mixture.as_unet(sched.alpha_bar, (1, 4, 5))
    with pytest.raises(ValueError, match="must be square"):
        mixture.as_unet(sched.alpha_bar, (1, 2, 8))
