"""TutorialImg2ImgPipeline (SDEdit): noise an image to strength s with q(x_t | x_0), denoise with any scheduler.

Truths first (the exact Gaussian-mixture model: faithfulness falls and realism rises with s), then the loop's
contract with every scheduler (ours and diffusers'), then arguments.
"""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from custom_pipelines import TutorialImg2ImgPipeline
from schedulers import (
    TutorialDDIMScheduler,
    TutorialDDPMScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    TutorialPFODEScheduler,
    TutorialScoreSDEScheduler,
)
from schedulers.gaussian_mixture import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def ring_problem(num_points=64):
    """The 8-mode ring (radius 0.7, std 0.05) and inputs just off the data: ring modes pushed out to radius 0.875
    (3.5 standard deviations), a "painted" version of a real sample whose class is its mode."""
    gm = GaussianMixture.ring()
    modes = torch.randint(0, 8, (num_points,), generator=torch.Generator().manual_seed(5))
    return gm, gm.means[modes] * 1.25, modes


def seeded(pipe, image, strength: float, num_inference_steps: int):
    """The pipeline's output as tensors, generator seeded with 0."""
    return pipe(
        image,
        strength=strength,
        num_inference_steps=num_inference_steps,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("cls", [TutorialDDIMScheduler, TutorialDPMSolverPlusPlusScheduler])
def test_strength_trades_faithfulness_for_realism_with_the_exact_model(cls):
    """SDEdit Sec. 3 with a perfect model of the data: as s grows the output moves away from the input and forgets
    its class (its mode), from all kept at small s to chance (1/8) at s = 1, where it is a sample of the data."""
    gm, x_in, modes = ring_problem()
    scheduler = cls.from_config(TutorialDDPMScheduler(clip_sample=False).config)
    pipe = TutorialImg2ImgPipeline(unet=gm.as_unet(scheduler.alpha_bar, (2, 1, 1)), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    image = ((x_in + 1) / 2).reshape(-1, 2, 1, 1)
    moved, kept = [], []
    for strength in (0.05, 0.2, 0.4, 1.0):
        out = seeded(pipe, image, strength, num_inference_steps=40)
        x = (2 * out.images - 1).reshape(-1, 2).double()
        moved.append(float((x - x_in).norm(dim=1).mean()))
        kept.append(float((torch.cdist(x, gm.means).argmin(dim=1) == modes).double().mean()))
    assert moved == sorted(moved) and kept == sorted(kept, reverse=True), (moved, kept)
    assert kept[0] == 1.0 and kept[-1] < 0.35 and moved[0] < 0.15
    to_data = torch.cdist(x, gm.means).min(dim=1).values.mean()
    assert to_data < 0.1 < torch.cdist(x_in, gm.means).min(dim=1).values.mean()  # s = 1: on the data, unlike x_in


SCHEDULERS = {
    "ddpm": lambda: TutorialDDPMScheduler(),
    "ddim": lambda: TutorialDDIMScheduler(),
    "dpmpp": lambda: TutorialDPMSolverPlusPlusScheduler(),
    "pf_ode_heun": lambda: TutorialPFODEScheduler(solver="heun"),
    "sde_ve_langevin": lambda: TutorialScoreSDEScheduler(sde_type="ve", corrector="langevin"),
    "diffusers_ddim": lambda: DDIMScheduler(),
    "diffusers_euler": lambda: EulerDiscreteScheduler(),
}


@pytest.mark.parametrize("strength", [0.3, 1.0])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_any_scheduler_starts_part_way(tiny_unet, name, strength):
    scheduler = SCHEDULERS[name]()
    pipe = TutorialImg2ImgPipeline(unet=tiny_unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = tiny_unet.register_forward_hook(lambda module, args, out: calls.append(float(args[1])))
    try:
        image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        out = seeded(pipe, image, strength, num_inference_steps=10)
    finally:
        hook.remove()
    assert out.images.shape == (2, 3, 8, 8) and bool(torch.isfinite(out.images).all())
    begin = (10 - int(10 * strength)) * scheduler.order
    assert calls == scheduler.timesteps[begin:].tolist()
    assert pipe.scheduler is scheduler


def test_the_loop_is_add_noise_then_the_schedulers_steps(tiny_unet):
    """A hand-written SDEdit loop (diffusers' img2img idiom) gives the same images, with a stochastic scheduler."""
    scheduler = TutorialDDPMScheduler()
    pipe = TutorialImg2ImgPipeline(unet=tiny_unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = seeded(pipe, image, 0.45, num_inference_steps=20)

    g = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(20)
    timesteps = scheduler.timesteps[20 - 9 :]  # int(20 x 0.45) = 9 steps
    x = scheduler.add_noise(2 * image - 1, torch.randn(image.shape, generator=g), timesteps[:1])
    with torch.no_grad():
        for t in timesteps:
            x = scheduler.step(tiny_unet(x, t).sample, t, x, generator=g).prev_sample
    torch.testing.assert_close(got.images, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


def test_trajectory_and_given_noise(tiny_unet):
    pipe = TutorialImg2ImgPipeline(unet=tiny_unet, scheduler=TutorialDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    image, eps = torch.rand(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    out = pipe(image, strength=0.5, num_inference_steps=10, noise=eps, output_type="pt", return_trajectory=True)
    assert len(out.trajectory) == 5 + 1 and len(out.timesteps) == 5 and out.timesteps[0] == 400
    a = pipe.scheduler.alpha_bar[400]
    torch.testing.assert_close(out.trajectory[0], (a.sqrt() * (2 * image - 1) + (1 - a).sqrt() * eps).float())
    again = pipe(image, strength=0.5, num_inference_steps=10, noise=eps, output_type="pt")
    torch.testing.assert_close(again.images, out.images, rtol=0, atol=0)


def test_save_and_load(tiny_unet, tmp_path):
    pipe = TutorialImg2ImgPipeline(unet=tiny_unet, scheduler=TutorialDPMSolverPlusPlusScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = TutorialImg2ImgPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 8, 8)
    kwargs = dict(strength=0.7, num_inference_steps=6, output_type="pt")
    torch.testing.assert_close(
        loaded(image, generator=torch.Generator().manual_seed(0), **kwargs).images,
        pipe(image, generator=torch.Generator().manual_seed(0), **kwargs).images,
    )


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"strength": 0.0}, r"strength=0.0 must be a number in \(0, 1\]"),
        ({"strength": 1.5}, r"strength=1.5 must be a number in \(0, 1\]"),
        ({"strength": float("nan")}, r"strength=nan must be a number in \(0, 1\]"),
        ({"strength": True}, r"strength=True must be a number"),
        ({"strength": 0.05, "num_inference_steps": 10}, r"runs int\(0.05 x 10\) = 0 steps"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0 must be an integer >= 1"),
        ({"noise": torch.zeros(1, 3, 4, 4)}, r"noise has shape \(1, 3, 4, 4\); expected \(1, 3, 8, 8\)"),
        ({"output_type": "jpg"}, r"output_type='jpg' is not supported"),
    ],
)
def test_bad_arguments(tiny_unet, kwargs, pattern):
    pipe = TutorialImg2ImgPipeline(unet=tiny_unet, scheduler=TutorialDDIMScheduler())
    with pytest.raises(ValueError, match=pattern):
        pipe(torch.rand(1, 3, 8, 8), **kwargs)
