"""Parity with diffusers 0.42.1's DDPMScheduler and DDIMScheduler over a grid of configs, wherever diffusers is right.

Each case runs a full sampling loop for both schedulers with the same model, the same x_T and the same noise
(both draw it through `diffusers.utils.torch_utils.randn_tensor` from one seeded generator) and compares x_0.

Tolerance: diffusers builds ᾱ with a float32 cumprod (≤ 5e-7 absolute off the float64 truth, checked in
`test_alpha_bar_tables_agree`), so both loops are given the same float32 ᾱ table (ours, rounded once) and what is
left is float32 arithmetic rounding: ~6e-8 per operation, accumulated over up to 1000 steps and amplified by 1/√ᾱ_T
in x̂_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t at the first steps. Measured worst case 6e-5 relative; we assert 2e-4.
Cases diffusers gets wrong are in test_where_diffusers_is_wrong.py and excluded here.
"""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from custom_pipelines import sample_loop
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers import tutorial_grids as grids
from schedulers import tutorial_math as tm

T = 1000
STEP_COUNTS = (1, 7, 50, 128)  # 7 and 128 do not divide T = 1000
VARIANCE_TYPES_DIFFUSERS_GETS_RIGHT = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
RANGE_MODES = ("none", "clip", "threshold")
RTOL = 2e-4


def gaussian_model(alpha_bar_table, prediction_type, variance_channels=None, mean=0.3, var=0.25):
    """Exact network output for data x_0 ~ N(mean, var I): ε* = σ (x_t - √ᾱ mean)/(ᾱ var + 1 - ᾱ), as ε, x_0 or v.

    `variance_channels` appends the learned-variance channels: 'learned' gets a positive σ² (diffusers' meaning),
    'learned_range' a value in [-1, 1].
    """
    table = alpha_bar_table.to(torch.float64)

    def model(x, t):
        ab = float(table[int(t)])
        eps = (1 - ab) ** 0.5 * (x - ab**0.5 * mean) / (ab * var + 1 - ab)
        if prediction_type == "sample":
            out = tm.eps_to_x0(x, eps, ab)
        elif prediction_type == "v_prediction":
            out = tm.velocity(tm.eps_to_x0(x, eps, ab), eps, ab)
        else:
            out = eps
        if variance_channels == "learned":
            out = torch.cat([out, 0.5 * float(1 - ab) * (1 + torch.sigmoid(x))], dim=1)
        elif variance_channels == "learned_range":
            out = torch.cat([out, torch.tanh(x)], dim=1)
        return out

    return model


def run_loop(scheduler, num_inference_steps, model, seed=0, **step_kwargs):
    """The library's loop (`custom_pipelines.sample_loop`) from seeded noise, the same generator driving the steps."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 2, 4, 4, generator=generator)
    return sample_loop(model, scheduler, noise, num_inference_steps, generator=generator, **step_kwargs)


def assert_same(ours, ref, context):
    assert torch.isfinite(ref).all(), f"diffusers produced non-finite values for {context}"
    err = ((ours - ref).abs().max() / (1 + ref.abs().max())).item()
    assert err <= RTOL, f"relative difference {err:.2e} > {RTOL} for {context}"


def test_alpha_bar_tables_agree():
    """Our float64 ᾱ equals diffusers' float32 cumprod to its own rounding, for every schedule."""
    for schedule in tm.BETA_SCHEDULES:
        ours = TutorialDDPMScheduler(beta_schedule=schedule)
        ref = DDPMScheduler(beta_schedule=schedule)
        torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.alpha_bar, ref.alphas_cumprod.double(), rtol=0, atol=5e-7)


@pytest.mark.parametrize("beta_schedule", tm.BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", tm.PREDICTION_TYPES)
def test_ddpm_sampling_loop_matches_diffusers(beta_schedule, prediction_type):
    grid = itertools.product(VARIANCE_TYPES_DIFFUSERS_GETS_RIGHT, grids.TIMESTEP_SPACINGS, RANGE_MODES, STEP_COUNTS)
    for variance_type, spacing, range_mode, n in grid:
        ours = TutorialDDPMScheduler(
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            variance_type=variance_type,
            timestep_spacing=spacing,
            steps_offset=1 if spacing == "leading" and n > 1 else 0,
            clip_sample=range_mode == "clip",
            thresholding=range_mode == "threshold",
            dynamic_thresholding_ratio=0.9,
            sample_max_value=1.5,
        )
        ref = DDPMScheduler.from_config(ours.config)  # from_config, ours -> diffusers
        ref.alphas_cumprod = ours.alphas_cumprod.clone()
        learned = variance_type if variance_type.startswith("learned") else None
        model = gaussian_model(ours.alpha_bar, prediction_type, learned)
        context = (beta_schedule, prediction_type, variance_type, spacing, range_mode, n)
        assert_same(run_loop(ours, n, model), run_loop(ref, n, model), context)


@pytest.mark.parametrize("beta_schedule", tm.BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", tm.PREDICTION_TYPES)
def test_ddim_sampling_loop_matches_diffusers(beta_schedule, prediction_type):
    """diffusers steps to t - T//N: right for `leading`, for `trailing` when N divides T, for `linspace` when N = 1."""
    for spacing, n, eta, range_mode in itertools.product(
        grids.TIMESTEP_SPACINGS, STEP_COUNTS, (0.0, 0.5, 1.0), RANGE_MODES + ("clip_and_reuse",)
    ):
        if (spacing == "trailing" and T % n) or (spacing == "linspace" and n > 1):
            continue
        config = dict(
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            timestep_spacing=spacing,
            steps_offset=1 if spacing == "leading" and n > 1 else 0,
            set_alpha_to_one=n != 7,
            clip_sample=range_mode.startswith("clip"),
            thresholding=range_mode == "threshold",
            dynamic_thresholding_ratio=0.9,
            sample_max_value=1.5,
        )
        ours = TutorialDDIMScheduler(**config)
        if beta_schedule in ("sigmoid", "laplace"):  # diffusers' DDIM lacks these two schedules: hand it our betas
            ref = DDIMScheduler(**{**config, "beta_schedule": "linear", "trained_betas": ours.betas.tolist()})
        else:
            ref = DDIMScheduler.from_config(ours.config)
        ref.alphas_cumprod = ours.alphas_cumprod.clone()
        ref.final_alpha_cumprod = torch.tensor(ours._final_alpha_bar(), dtype=torch.float32)
        model = gaussian_model(ours.alpha_bar, prediction_type)
        kwargs = dict(eta=eta, use_clipped_model_output=range_mode == "clip_and_reuse")
        context = (beta_schedule, prediction_type, spacing, n, eta, range_mode)
        assert_same(run_loop(ours, n, model, **kwargs), run_loop(ref, n, model, **kwargs), context)


@pytest.mark.parametrize("scheduler_pair", ["ddpm", "ddim"])
def test_full_1000_step_loop_matches_diffusers(scheduler_pair):
    for beta_schedule, prediction_type in [("linear", "epsilon"), ("squaredcos_cap_v2", "v_prediction")]:
        if scheduler_pair == "ddpm":
            ours = TutorialDDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
            ref = DDPMScheduler.from_config(ours.config)
            kwargs = {}
        else:
            ours = TutorialDDIMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
            ref = DDIMScheduler.from_config(ours.config)
            kwargs = {"eta": 0.5}
        ref.alphas_cumprod = ours.alphas_cumprod.clone()
        model = gaussian_model(ours.alpha_bar, prediction_type)
        context = (scheduler_pair, beta_schedule, prediction_type, 1000)
        assert_same(run_loop(ours, 1000, model, **kwargs), run_loop(ref, 1000, model, **kwargs), context)


def test_timestep_grids_match_diffusers_for_every_step_count():
    """Same grid as diffusers for all N in 1..T, except diffusers' extra t = -1 (test_where_diffusers_is_wrong)."""
    for spacing in grids.TIMESTEP_SPACINGS:
        ref = DDPMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        for n in range(1, T):
            ref.set_timesteps(n)
            ours = grids.spaced_timesteps(n, T, spacing, 1 if spacing == "leading" else 0)
            assert torch.equal(ours, ref.timesteps[:n]), (spacing, n)


def test_add_noise_and_velocity_match_diffusers():
    ours, ref = (
        TutorialDDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
    )
    x0, noise = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    t = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)
