"""diffusers' implicit contract for DDPM and DDIM: what code written for diffusers does with a scheduler, ours does too.

A fresh scheduler steps on the full training grid; an integer timestep off the grid follows diffusers' rule
(t -> t - T//N); dynamic thresholding takes any sample_max_value > 0; step counts may be numpy or tensor integers.
Where diffusers' rule is wrong on our own grids (on-grid steps of linspace/trailing grids), test_where_diffusers_is_wrong
decides; here every comparison is one where diffusers is right.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from custom_pipelines import sample_loop
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers import tutorial_math as tm

T = 1000
PAIRS = [(TutorialDDPMScheduler, DDPMScheduler), (TutorialDDIMScheduler, DDIMScheduler)]


def ddim_eq12(x_t, eps, alpha_bar, alpha_bar_prev):
    """DDIM eq. (12), η = 0, in float64."""
    x0 = (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev) * eps


def shared_tables(ours, ref):
    """Give diffusers our ᾱ (rounded to float32 once) so that the comparison is of the algorithm (see parity tests)."""
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(ours._final_alpha_bar(), dtype=torch.float32)
    return ref


@pytest.mark.parametrize("cls", [TutorialDDPMScheduler, TutorialDDIMScheduler])
def test_a_fresh_scheduler_steps_on_the_full_training_grid(cls):
    """No set_timesteps: timesteps is T-1, ..., 0 and each step goes from t to t - 1, ending on x_0."""
    s = cls(clip_sample=False)
    assert torch.equal(s.timesteps, torch.arange(T - 1, -1, -1)) and s.num_inference_steps is None
    assert [s.previous_timestep(t) for t in (999, 500, 1, 0)] == [998, 499, 0, -1]
    x = torch.randn(2, 3, dtype=torch.float64)
    eps = torch.randn(2, 3, dtype=torch.float64)
    got = s.step(eps, 500, x, eta=0.0) if cls is TutorialDDIMScheduler else None
    if got is not None:  # DDIM η = 0 from 500 to 499 is eq. (12) with ᾱ_499
        expected = ddim_eq12(x, eps, float(s.alpha_bar[500]), float(s.alpha_bar[499]))
        torch.testing.assert_close(got.prev_sample, expected, rtol=1e-12, atol=1e-12)
    # A whole loop over the fresh grid is the loop after set_timesteps(T) (the same grid).
    fresh, explicit = cls(), cls()
    explicit.set_timesteps(T)
    outs = []
    for s in (fresh, explicit):
        g, x = torch.Generator().manual_seed(0), torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
        x = sample_loop(lambda x, t: torch.tanh(x), s, x, generator=g)
        outs.append(x)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_fresh_ddpm_loop_equals_diffusers_fresh_loop():
    """diffusers' DDPMScheduler steps without set_timesteps on T-1..0 (prev = t - 1); the sampled chains agree."""
    ours = TutorialDDPMScheduler(num_train_timesteps=50, beta_end=0.2)
    ref = shared_tables(ours, DDPMScheduler(num_train_timesteps=50, beta_end=0.2))
    outs = []
    for s in (ours, ref):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 4, 4, generator=g)
        x = sample_loop(lambda x, t: 0.5 * x, s, x, generator=g)
        outs.append(x)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("t", [1, 10, 49, 333, 998])
def test_off_grid_ddim_follows_diffusers_rule(spacing, t):
    """Off the grid diffusers' DDIM goes from t to t - T//N (x_0's ᾱ when negative); so do we, with eq. (12)."""
    n, eta = 50, 0.0
    ours = TutorialDDIMScheduler(timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=False)
    ours.set_timesteps(n)
    assert t not in ours.timesteps.tolist()
    t_prev = t - T // n
    assert ours.previous_timestep(t) == (t_prev if t_prev >= 0 else -1)
    x, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    alpha_bar_prev = (
        float(ours.alpha_bar[t_prev]) if t_prev >= 0 else float(ours.alpha_bar[0])
    )  # set_alpha_to_one=False
    expected = ddim_eq12(x, eps, float(ours.alpha_bar[t]), alpha_bar_prev)
    torch.testing.assert_close(ours.step(eps, t, x, eta).prev_sample, expected, rtol=1e-12, atol=1e-12)
    ref = shared_tables(ours, DDIMScheduler.from_config(ours.config))
    ref.set_timesteps(n)
    x32, eps32 = x.float(), eps.float()
    torch.testing.assert_close(ours.step(eps32, t, x32, eta).prev_sample, ref.step(eps32, t, x32, eta).prev_sample)


def test_off_grid_ddim_with_noise_matches_diffusers():
    ours = TutorialDDIMScheduler(clip_sample=True)
    ref = shared_tables(ours, DDIMScheduler(clip_sample=True))
    for s in (ours, ref):
        s.set_timesteps(10)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in (7, 150, 999):
        a = ours.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(t)).prev_sample
        b = ref.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_off_grid_ddpm_steps_to_t_minus_stride():
    """DDPM off the grid: the posterior q(x_{t'} | x_t, x̂_0) with t' = t - T//N (DDPM eq. (7)), plus σ z (β̃)."""
    s = TutorialDDPMScheduler(clip_sample=False)
    s.set_timesteps(10)
    x, eps = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64)
    for t, t_prev in ((555, 455), (99, -1), (1, -1)):
        assert s.previous_timestep(t) == t_prev
        alpha_bar = s.alpha_bar[t]
        alpha_bar_prev = s.alpha_bar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        c0, ct, var = tm.q_posterior_coefs(alpha_bar, alpha_bar_prev)
        mean = c0 * tm.eps_to_x0(x, eps, alpha_bar) + ct * x
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        expected = mean + (var.clamp(min=1e-20).sqrt() * z if t > 0 else 0)
        got = s.step(eps, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        assert s.step_index is None  # off the grid there is no position on it


def test_on_grid_steps_still_use_the_grid_and_count_the_position():
    s = TutorialDDIMScheduler(timestep_spacing="linspace")
    s.set_timesteps(7)
    grid = s.timesteps.tolist()
    assert s.step_index is None and s.begin_index is None
    x = torch.randn(1, 1, 2, 2)
    for k, t in enumerate(grid):
        assert s.previous_timestep(t) == (grid[k + 1] if k + 1 < len(grid) else -1)  # the grid's, not t - T//N
        x = s.step(x * 0.1, t, x).prev_sample
        assert s.step_index == k + 1


@pytest.mark.parametrize("ours_cls, ref_cls", PAIRS, ids=["ddpm", "ddim"])
@pytest.mark.parametrize("max_value", [0.5, 0.9])
def test_thresholding_below_one_matches_diffusers(ours_cls, ref_cls, max_value):
    """sample_max_value < 1: s = clamp(q, 1, max_value) = max_value, so x̂_0 is clipped to ±max_value, then ÷ max_value."""
    config = dict(
        thresholding=True, sample_max_value=max_value, dynamic_thresholding_ratio=0.9, prediction_type="sample"
    )
    ours = ours_cls(**config)
    ref = shared_tables(ours, ref_cls(**config))
    for s in (ours, ref):
        s.set_timesteps(10)
    x, out = torch.randn(2, 3, 4, 4), 3 * torch.randn(2, 3, 4, 4)
    a = ours.step(out, 500, x, generator=torch.Generator().manual_seed(0))
    b = ref.step(out, 500, x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.pred_original_sample, out.clamp(-max_value, max_value) / max_value)
    torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample)
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [TutorialDDPMScheduler, TutorialDDIMScheduler])
def test_thresholding_refuses_a_threshold_that_is_not_positive(cls):
    with pytest.raises(ValueError, match=r"sample_max_value=0.0 must be > 0"):
        cls(thresholding=True, sample_max_value=0.0)


@pytest.mark.parametrize("cls", [TutorialDDPMScheduler, TutorialDDIMScheduler])
def test_add_noise_with_a_full_training_grid_start(cls):
    """diffusers' DDIM test idiom: add noise at timesteps[t_start] and step from there (img2img without pipeline)."""
    s = cls(clip_sample=False)
    s.set_timesteps(10)
    start = s.timesteps[8:]
    x0 = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    x = s.add_noise(x0, torch.zeros_like(x0), start[:1])
    for t in start:  # with ε = 0 everywhere the exact ε-model of the point mass x_0 = 0.5 returns x_0
        a = float(s.alpha_bar[int(t)])
        x = s.step((x - math.sqrt(a) * 0.5) / math.sqrt(1 - a), t, x, generator=torch.Generator()).prev_sample
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-6 if cls is TutorialDDPMScheduler else 1e-10)


@pytest.mark.parametrize("cls", [TutorialDDPMScheduler, TutorialDDIMScheduler])
def test_numpy_and_tensor_step_counts(cls):
    s = cls()
    s.set_timesteps(10)
    grid = s.timesteps.clone()
    for n in (np.int64(10), np.int32(10), torch.tensor(10), torch.tensor([10])):
        s.set_timesteps(7)
        s.set_timesteps(n)
        assert torch.equal(s.timesteps, grid) and s.num_inference_steps == 10 and type(s.num_inference_steps) is int
    for bad in (10.0, np.float64(10.0), torch.tensor(10.0), True, torch.tensor([10, 20])):
        with pytest.raises(ValueError, match=r"num_inference_steps=.* must be an integer in \[1, num_train_timesteps"):
            s.set_timesteps(bad)
