"""TutorialUnconditionalPipeline: parity with hand-written sampling loops, every fitting scheduler, the arguments."""

import inspect
import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from custom_pipelines import TutorialUnconditionalPipeline, sample_loop
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler

SHAPE = (2, 3, 8, 8)
STEPS = 4
SEED = 3


def _pipe(unet, scheduler):
    pipe = TutorialUnconditionalPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _final_sample(pipe, **kwargs):
    """x_0 in model space (before mapping to [0, 1]), via the trajectory."""
    out = pipe(
        batch_size=SHAPE[0],
        generator=torch.Generator().manual_seed(SEED),
        num_inference_steps=STEPS,
        output_type="pt",
        return_trajectory=True,
        **kwargs,
    )
    return out.trajectory[-1], out


# ---- parity with hand-written loops: the math written out, not the scheduler's step -----------------------------
def test_euler_matches_hand_written_karras_euler(tiny_unet):
    """Euler (Karras et al. 2022, Alg. 1 without churn) on diffusers' σ grid: x ← x + (σ' - σ) ε̂(x/√(σ²+1), t)."""
    sched = EulerDiscreteScheduler()
    ours, _ = _final_sample(_pipe(tiny_unet, EulerDiscreteScheduler.from_config(sched.config)))

    sched.set_timesteps(STEPS)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED)) * sched.init_noise_sigma
    sigmas = sched.sigmas
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            eps = tiny_unet(x / math.sqrt(sigmas[i] ** 2 + 1), t).sample  # c_in = 1/√(σ²+1)
            x = x + (sigmas[i + 1] - sigmas[i]) * eps  # dx/dσ = (x - x̂_0)/σ = ε̂
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_heun_matches_hand_written_karras_heun(tiny_unet):
    """Heun (Karras et al. 2022, Alg. 1): two evaluations per step, Euler on the last (σ' = 0) step."""
    sched = HeunDiscreteScheduler()
    ours, out = _final_sample(_pipe(tiny_unet, HeunDiscreteScheduler.from_config(sched.config)))

    sched.set_timesteps(STEPS)
    sigmas = torch.unique_consecutive(sched.sigmas)  # σ_0 > ... > σ_{N-1} > 0
    ts = torch.unique_consecutive(sched.timesteps)
    assert len(sigmas) == STEPS + 1 and len(ts) == STEPS
    assert len(out.timesteps) == 2 * STEPS - 1  # the pipeline walked the interleaved grid: 2N - 1 evaluations

    def eps(x, sigma, t):
        return tiny_unet(x / math.sqrt(sigma**2 + 1), t).sample

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED)) * sched.init_noise_sigma
    with torch.no_grad():
        for i in range(STEPS):
            s, s_next = sigmas[i], sigmas[i + 1]
            d = eps(x, s, ts[i])
            x_euler = x + (s_next - s) * d
            if s_next == 0:
                x = x_euler
            else:
                x = x + (s_next - s) * (d + eps(x_euler, s_next, ts[i + 1])) / 2  # trapezoidal correction
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def _ours_and_hand_steps(unet, scheduler_cls):
    """Our pipeline's final sample with `scheduler_cls(clip_sample=False)`, and the steps (t, ᾱ_t, ᾱ_{t'}) of the same
    grid for a hand-written loop (ᾱ = 1 after the last step)."""
    sched = scheduler_cls(clip_sample=False)
    ours, _ = _final_sample(_pipe(unet, scheduler_cls.from_config(sched.config)))
    sched.set_timesteps(STEPS)
    ab, grid = sched.alpha_bar, sched.timesteps.tolist()
    steps = [(t, float(ab[t]), float(ab[t_prev]) if t_prev >= 0 else 1.0) for t, t_prev in zip(grid, grid[1:] + [-1])]
    return ours, steps


def test_tutorial_ddim_matches_hand_written_ddim(tiny_unet):
    """DDIM eq. (12) with η = 0: x_{t'} = √ᾱ_{t'} x̂_0 + √(1-ᾱ_{t'}) ε̂, x̂_0 = (x_t - √(1-ᾱ_t) ε̂)/√ᾱ_t."""
    ours, steps = _ours_and_hand_steps(tiny_unet, TutorialDDIMScheduler)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        for t, a, a_prev in steps:
            e = tiny_unet(x, t).sample
            x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_tutorial_ddpm_matches_hand_written_ancestral_sampling(tiny_unet):
    """DDPM Algorithm 2 on a respaced grid: x_{t'} = μ̃(x_t, x̂_0) + √β̃ z, z drawn from the same generator."""
    ours, steps = _ours_and_hand_steps(tiny_unet, TutorialDDPMScheduler)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(SHAPE, generator=g)
    with torch.no_grad():
        for t, a, a_prev in steps:
            beta = 1 - a / a_prev
            x0 = (x - math.sqrt(1 - a) * tiny_unet(x, t).sample) / math.sqrt(a)
            mean = (
                math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(a / a_prev) * (1 - a_prev) / (1 - a) * x
            )  # eq. (7)
            if t > 0:
                x = mean + math.sqrt(beta * (1 - a_prev) / (1 - a)) * torch.randn(SHAPE, generator=g)
            else:
                x = mean
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_diffusers_ddpm_pipeline_gets_euler_wrong(tiny_unet):
    """The reason this pipeline exists: DDPMPipeline skips init_noise_sigma and scale_model_input. Its output is
    exactly that wrong loop, x_T ~ N(0, I) (not σ_max² I) and ε̂(x, t) (not ε̂(x/√(σ²+1), t)), written out here;
    ours is the right one (test_euler_matches_hand_written_karras_euler), and the two are far apart."""
    sched = EulerDiscreteScheduler()
    ours, _ = _final_sample(_pipe(tiny_unet, EulerDiscreteScheduler.from_config(sched.config)))
    euler = EulerDiscreteScheduler.from_config(sched.config)
    euler_step, last = euler.step, []
    euler.step = lambda *args, **kwargs: last.append(euler_step(*args, **kwargs)) or last[-1]  # keep x_0 unclamped
    theirs = DDPMPipeline(unet=tiny_unet, scheduler=euler)
    theirs.set_progress_bar_config(disable=True)
    img = theirs(
        batch_size=SHAPE[0], generator=torch.Generator().manual_seed(SEED), num_inference_steps=STEPS, output_type="np"
    ).images

    sched.set_timesteps(STEPS)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))  # no init_noise_sigma
    sigmas = sched.sigmas
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x = x + (sigmas[i + 1] - sigmas[i]) * tiny_unet(x, t).sample  # no c_in = 1/√(σ²+1)
    torch.testing.assert_close(last[-1].prev_sample, x, atol=1e-5, rtol=1e-5)
    wrong_img = ((x / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()  # DDPMPipeline's mapping to [0, 1]
    np.testing.assert_allclose(img, wrong_img, rtol=0, atol=1e-5)

    ours_img = ((ours / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert np.abs(img - ours_img).max() > 0.05


# ---- every scheduler that fits a UNet2DModel ------------------------------------------------------------------------
ALL_SCHEDULERS = [
    DDPMScheduler,
    DDIMScheduler,
    PNDMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
    LMSDiscreteScheduler,
    DEISMultistepScheduler,
    TutorialDDPMScheduler,
    TutorialDDIMScheduler,
]


def _generic_reference_loop(unet, scheduler, eta=0.0):
    """The loop every diffusers scheduler documents, written out once, with the generator threaded through.

    Spelled out on purpose: it is the contract that the pipeline and the library's `sample_loop` are checked against.
    """
    g = torch.Generator().manual_seed(SEED)
    params = inspect.signature(scheduler.step).parameters
    kwargs = {k: v for k, v in (("eta", eta), ("generator", g)) if k in params}
    scheduler.set_timesteps(STEPS)
    x = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("scheduler_cls", ALL_SCHEDULERS, ids=lambda c: c.__name__)
def test_every_scheduler_matches_the_reference_loop(tiny_unet, scheduler_cls):
    scheduler = scheduler_cls()
    pipe = _pipe(tiny_unet, scheduler)
    ours, out = _final_sample(pipe)
    assert pipe.scheduler is scheduler  # never swapped
    ref = _generic_reference_loop(tiny_unet, scheduler_cls.from_config(scheduler.config))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(SHAPE, generator=g)
    with torch.no_grad():
        library = sample_loop(
            lambda x, t: tiny_unet(x, t).sample, scheduler_cls.from_config(scheduler.config), noise, STEPS, generator=g
        )
    torch.testing.assert_close(library, ref, atol=1e-6, rtol=1e-6)
    assert len(out.trajectory) == len(scheduler.timesteps) + 1 == len(out.pred_original_samples) + 1


# ---- the arguments --------------------------------------------------------------------------------------------------
def test_trajectory_holds_x_t_and_x0_per_step(tiny_unet):
    sched = TutorialDDIMScheduler(clip_sample=False)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = _pipe(tiny_unet, sched)(
        batch_size=2, latents=z, num_inference_steps=STEPS, output_type="pt", return_trajectory=True
    )
    assert len(out.trajectory) == STEPS + 1 and len(out.pred_original_samples) == STEPS
    torch.testing.assert_close(out.trajectory[0], z)  # x_T (σ_init = 1)
    # the last DDIM step lands on ᾱ = 1, where x_{t'} = x̂_0
    torch.testing.assert_close(out.trajectory[-1], out.pred_original_samples[-1])
    torch.testing.assert_close(out.images, (out.trajectory[-1] / 2 + 0.5).clamp(0, 1))
    assert out.timesteps == sched.timesteps.tolist()
    # DPM-Solver reports no x̂_0: None entries, not an error
    out = _pipe(tiny_unet, DPMSolverMultistepScheduler())(
        batch_size=2, num_inference_steps=STEPS, output_type="pt", return_trajectory=True
    )
    assert out.pred_original_samples == [None] * STEPS


def test_generator_list_gives_per_sample_reproducibility(tiny_unet):
    pipe = _pipe(tiny_unet, TutorialDDIMScheduler())
    both = pipe(
        batch_size=2,
        generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
        num_inference_steps=STEPS,
        output_type="pt",
    ).images
    for k, s in enumerate((5, 6)):
        one = pipe(
            batch_size=1, generator=torch.Generator().manual_seed(s), num_inference_steps=STEPS, output_type="pt"
        ).images
        torch.testing.assert_close(both[k : k + 1], one, atol=1e-5, rtol=1e-5)


def test_latents_are_x_T_in_units_of_init_noise_sigma(tiny_unet):
    pipe = _pipe(tiny_unet, EulerDiscreteScheduler())
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))
    with_latents = pipe(batch_size=2, latents=z, num_inference_steps=STEPS, output_type="pt", return_trajectory=True)
    torch.testing.assert_close(with_latents.trajectory[0], z * pipe.scheduler.init_noise_sigma)
    with_generator, _ = _final_sample(pipe)
    torch.testing.assert_close(with_latents.trajectory[-1], with_generator)


def test_eta_reaches_ddim_and_is_ignored_elsewhere(tiny_unet, caplog):
    pipe = _pipe(tiny_unet, TutorialDDIMScheduler())
    eta0, _ = _final_sample(pipe, eta=0.0)
    eta1, _ = _final_sample(pipe, eta=1.0)
    assert (eta0 - eta1).abs().max() > 1e-3
    ref = _generic_reference_loop(tiny_unet, TutorialDDIMScheduler(), eta=1.0)
    torch.testing.assert_close(eta1, ref, atol=1e-5, rtol=1e-5)
    euler = _pipe(tiny_unet, EulerDiscreteScheduler())
    torch.testing.assert_close(_final_sample(euler, eta=0.5)[0], _final_sample(euler)[0])


def test_output_types_agree(tiny_unet):
    pipe = _pipe(tiny_unet, TutorialDDIMScheduler())
    kw = dict(batch_size=2, num_inference_steps=2)
    pt = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    np_ = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    pil = pipe(generator=torch.Generator().manual_seed(0), output_type="pil", **kw).images
    assert pt.shape == (2, 3, 8, 8) and np_.shape == (2, 8, 8, 3) and isinstance(np_, np.ndarray)
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pil[1]), (np_[1] * 255).round(), atol=1)
    (tup,) = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False, **kw)
    torch.testing.assert_close(tup, pt)


def test_callback_on_step_end_sees_every_step_and_can_replace_latents(tiny_unet):
    pipe = _pipe(tiny_unet, HeunDiscreteScheduler())
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe
        seen.append((i, float(t), kwargs["latents"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == len(p.scheduler.timesteps) - 1 else {}

    out = pipe(batch_size=2, num_inference_steps=STEPS, output_type="pt", callback_on_step_end=callback)
    assert [s[0] for s in seen] == list(range(2 * STEPS - 1))
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    torch.testing.assert_close(out.images, torch.full((2, 3, 8, 8), 0.5))  # zeros in [-1, 1] -> 0.5


def test_non_finite_value_names_the_step(tiny_unet):
    pipe = _pipe(tiny_unet, TutorialDDIMScheduler())
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            output.sample[0, 0, 0, 0] = float("nan")
        return output

    handle = tiny_unet.register_forward_hook(poison)
    try:
        with pytest.raises(FloatingPointError, match=r"after step 2 of 4 .*model output"):
            pipe(batch_size=2, num_inference_steps=STEPS)
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output_type="jpg"), "output_type='jpg'.*'pil', 'np', 'pt'"),
        (dict(batch_size=0), "batch_size=0"),
        (
            dict(batch_size=2, latents=torch.zeros(1, 3, 8, 8)),
            r"latents has shape \(1, 3, 8, 8\); expected \(2, 3, 8, 8\)",
        ),
        (dict(batch_size=2, latents=torch.zeros(2, 3, 4, 4)), "latents has shape"),
        (dict(batch_size=3, generator=[torch.Generator()] * 2), "generator is a list of 2"),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(tiny_unet, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _pipe(tiny_unet, TutorialDDIMScheduler())(num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


def test_channels_last_gives_the_same_samples(unet_factory):
    pipe = _pipe(unet_factory(), TutorialDDIMScheduler())
    default, _ = _final_sample(pipe)
    assert pipe.enable_fast_inference(channels_last=True) is pipe
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast, _ = _final_sample(pipe)
    torch.testing.assert_close(fast, default, atol=1e-4, rtol=1e-4)  # another conv kernel: float32 rounding
