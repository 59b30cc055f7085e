"""Identities and exact answers the schedulers must reproduce, independent of any other implementation."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from custom_pipelines import sample_loop
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers import tutorial_math as tm
from schedulers.gaussian_mixture import GaussianMixture


@pytest.mark.parametrize("schedule", tm.BETA_SCHEDULES)
def test_schedules_are_valid_variances(schedule):
    betas = tm.make_betas(schedule, 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert bool((betas > 0).all() and (betas < 1).all())
    alpha_bar = tm.alpha_bar_from_betas(betas)
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all())  # ᾱ strictly decreasing: every step adds noise
    torch.testing.assert_close(tm.betas_from_alpha_bar(alpha_bar), betas, rtol=1e-9, atol=1e-12)


def test_cosine_schedule_follows_its_alpha_bar_function():
    """improved DDPM eq. (17): ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), wherever β is not capped."""
    alpha_bar = tm.alpha_bar_from_betas(tm.make_betas("squaredcos_cap_v2", 1000))
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    expected = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(alpha_bar[:990], expected[:990], rtol=1e-10, atol=1e-12)


def test_zero_terminal_snr_rescaling():
    """Lin et al. 2023 Alg. 1: √ᾱ_T becomes 0, √ᾱ_1 is kept, and √ᾱ_t is an affine map of the old one."""
    betas = tm.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    old = tm.alpha_bar_from_betas(betas).sqrt()
    new = tm.alpha_bar_from_betas(tm.rescale_zero_terminal_snr(betas)).sqrt()
    assert new[-1].abs() < 1e-12 and abs(new[0] - old[0]) < 1e-12
    affine = (old - old[-1]) * old[0] / (old[0] - old[-1])
    torch.testing.assert_close(new, affine, rtol=1e-9, atol=1e-12)
    assert tm.snr(new[-1:] ** 2).item() == 0.0


def test_forward_marginal_statistics_by_monte_carlo():
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1-ᾱ_t) I) (DDPM eq. (4)), checked against iterating the Markov chain of eq. (2)."""
    betas = tm.make_betas("linear", 1000)
    alpha_bar = tm.alpha_bar_from_betas(betas)
    n, t_end, x0 = 200_000, 300, 0.8
    g = torch.Generator().manual_seed(0)
    x = torch.full((n,), x0, dtype=torch.float64)
    for t in range(t_end):  # x_t = √(1-β_t) x_{t-1} + √β_t z
        x = (1 - betas[t]).sqrt() * x + betas[t].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    mean, std = tm.q_mean_std(torch.tensor([x0], dtype=torch.float64), alpha_bar[t_end - 1])
    var = float(std) ** 2
    # 5-sigma bounds of the sample mean and sample variance of n Gaussian draws.
    assert abs(x.mean().item() - mean.item()) < 5 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1))
    # q_sample draws from the same law.
    xs = tm.q_sample(
        torch.full((n, 1), x0, dtype=torch.float64),
        torch.randn(n, 1, generator=g, dtype=torch.float64),
        alpha_bar[t_end - 1],
    )
    assert abs(xs.mean().item() - mean.item()) < 5 * math.sqrt(var / n)
    assert abs(xs.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize("t,t_prev", [(1, 0), (500, 499), (999, 998), (700, 350), (120, 3)])
def test_posterior_equals_bayes_rule_numerically(t, t_prev):
    """q(x_{t'} | x_t, x_0) ∝ q(x_t | x_{t'}) q(x_{t'} | x_0) (DDPM eqs. (6)-(7)), integrated on a fine grid."""
    alpha_bar = tm.alpha_bar_from_betas(tm.make_betas("squaredcos_cap_v2", 1000))
    ab_t, ab_prev = alpha_bar[t].item(), alpha_bar[t_prev].item()
    beta = 1 - ab_t / ab_prev  # the (respaced) one-jump variance of q(x_t | x_{t'})
    for x0, xt in [(0.7, -0.2), (-1.0, 1.5)]:
        mu_prior, var_prior = math.sqrt(ab_prev) * x0, 1 - ab_prev
        half_width = 1 + 12 * math.sqrt(var_prior)  # covers both factors' mass; step ≤ 1.3e-5 << posterior std
        u = np.linspace(min(mu_prior, xt) - half_width, max(mu_prior, xt) + half_width, 2_000_001)
        log_w = -((xt - math.sqrt(1 - beta) * u) ** 2) / (2 * beta) - (u - mu_prior) ** 2 / (2 * var_prior)
        w = np.exp(log_w - log_w.max())
        mean_num = np.trapezoid(w * u, u) / np.trapezoid(w, u)
        var_num = np.trapezoid(w * (u - mean_num) ** 2, u) / np.trapezoid(w, u)
        mean, var = tm.q_posterior_mean_variance(
            torch.tensor([[x0]], dtype=torch.float64),
            torch.tensor([[xt]], dtype=torch.float64),
            torch.tensor(ab_t, dtype=torch.float64),
            torch.tensor(ab_prev, dtype=torch.float64),
        )
        assert mean.item() == pytest.approx(mean_num, rel=1e-6, abs=1e-9)
        assert var.item() == pytest.approx(var_num, rel=1e-5)


def test_parameterisation_round_trips_are_exact_to_rounding():
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64),
        torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64),
    )
    alpha_bar = torch.tensor([0.9999, 0.9, 0.5, 0.1, 1e-3, 4e-5], dtype=torch.float64)
    xt = tm.q_sample(x0, eps, alpha_bar)
    torch.testing.assert_close(tm.eps_to_x0(xt, eps, alpha_bar), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(tm.x0_to_eps(xt, x0, alpha_bar), eps, rtol=0, atol=1e-9)
    v = tm.velocity(x0, eps, alpha_bar)
    torch.testing.assert_close(tm.v_to_x0(xt, v, alpha_bar), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(tm.v_to_eps(xt, v, alpha_bar), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(tm.score_to_eps(tm.eps_to_score(eps, alpha_bar), alpha_bar), eps, rtol=0, atol=1e-12)
    for ptype, out in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
        got_x0, got_eps = tm.model_output_to_x0_eps(out, xt, alpha_bar, ptype)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9)
        torch.testing.assert_close(tm.training_target(x0, eps, alpha_bar, ptype), out)
    # float32 inputs stay float32 and agree to float32 rounding.
    got = tm.eps_to_x0(xt.float(), eps.float(), alpha_bar)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x0.float(), rtol=0, atol=2e-3)


def test_exact_mixture_score_matches_autograd_of_its_log_density():
    gm = GaussianMixture.random(dim=6, num_modes=3)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    for ab in (0.99, 0.3, 0.01):
        (grad,) = torch.autograd.grad(gm.log_prob(x, ab).sum(), x)
        torch.testing.assert_close(gm.score(x.detach(), ab), grad, rtol=1e-10, atol=1e-10)


def test_ddim_eta_one_on_the_full_grid_is_ddpm_fixed_small():
    """DDIM eq. (16): σ_t(η=1)² = (1-ᾱ_{t-1})/(1-ᾱ_t) · β_t = β̃_t, and then eq. (12) is DDPM's posterior step."""
    ddim = TutorialDDIMScheduler(clip_sample=False, beta_schedule="squaredcos_cap_v2")
    ddpm = TutorialDDPMScheduler(clip_sample=False, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small")
    ddim.set_timesteps(1000)
    ddpm.set_timesteps(1000)
    assert torch.equal(ddim.timesteps, torch.arange(999, -1, -1))
    x, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for t in ddim.timesteps.tolist()[:-1]:  # t = 0 has no noise in DDPM
        z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        ours = ddim.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        ddpm_mean = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample - math.sqrt(
            math.exp(ddpm._locate(t)[0]["log_small"][ddpm._locate(t)[1]])
        ) * torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        _, _, posterior_variance = tm.q_posterior_coefs(ddim.alpha_bar[t], ddim.alpha_bar[t - 1])
        expected = ddpm_mean + posterior_variance.sqrt() * z
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def pf_ode_reference(gm, x_start, alpha_bar_start):
    """Solve the probability-flow ODE from ᾱ_start to ᾱ = 1 to tight tolerance (scipy DOP853, rtol 1e-10).

    In DDIM's variables x̄ = x/√ᾱ and s = √((1-ᾱ)/ᾱ), eq. (14) reads dx̄/ds = ε*(x_t, ᾱ(s)); we integrate in log s
    from s_start to s = 1e-7 (the remaining O(1e-7) step to s = 0 is below float64 noise for this data).
    """
    shape = x_start.shape
    s_start = math.sqrt((1 - alpha_bar_start) / alpha_bar_start)

    def rhs(log_s, y):
        s = math.exp(log_s)
        ab = 1 / (1 + s * s)
        xbar = torch.from_numpy(y).reshape(shape)
        eps = gm.eps(xbar * math.sqrt(ab), ab)
        return (s * eps).reshape(-1).numpy()

    y0 = (x_start / math.sqrt(alpha_bar_start)).reshape(-1).numpy()
    sol = solve_ivp(rhs, (math.log(s_start), math.log(1e-7)), y0, method="DOP853", rtol=1e-10, atol=1e-10)
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


def test_ddim_eta_zero_converges_to_the_probability_flow_ode_at_first_order():
    """DDIM (η = 0) is Euler's method for eq. (14): error to the exact ODE solution shrinks like 1/N."""
    # Components wide enough (std 0.2-0.4) that N = 25..400 is already in Euler's asymptotic regime.
    g = torch.Generator().manual_seed(3)
    means = 0.6 * (2 * torch.rand(3, 8, generator=g, dtype=torch.float64) - 1)
    variances = 0.05 + 0.1 * torch.rand(3, 8, generator=g, dtype=torch.float64)
    gm = GaussianMixture(torch.tensor([1.0, 2.0, 1.5]), means, variances)
    ddim = TutorialDDIMScheduler(clip_sample=False, timestep_spacing="trailing", beta_schedule="linear")
    model = gm.model(ddim.alpha_bar, "epsilon")
    x_T = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = pf_ode_reference(gm, x_T, float(ddim.alpha_bar[999]))
    errors = []
    steps = (25, 50, 100, 200, 400)
    for n in steps:
        x = sample_loop(model, ddim, x_T, n)
        errors.append((x - reference).abs().max().item())
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert -1.3 < slope < -0.7, (slope, errors)
    assert errors[-1] < 2e-2  # measured 0.011 at N = 400


@pytest.mark.parametrize("prediction_type", tm.PREDICTION_TYPES)
def test_ddim_inversion_round_trip_with_the_exact_model(prediction_type):
    """Invert x_0 -> x_T with `inverse_step`, sample back with η = 0: x_0 is recovered; the error shrinks with N.

    Tolerance: with the exact score of the 16-dim mixture, max |error| < 0.01 at N = 1000 (measured 0.004).
    """
    gm = GaussianMixture.random(dim=16, num_modes=3)
    s = TutorialDDIMScheduler(clip_sample=False, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    model = gm.model(s.alpha_bar, prediction_type)
    x0 = gm.sample(8, torch.Generator().manual_seed(0))
    errors = []
    for n in (20, 100, 1000):
        s.set_timesteps(n)
        x = x0.clone()
        for t in reversed(s.timesteps):
            x = s.inverse_step(model(x, t), t, x).prev_sample
        x_T = x
        x = sample_loop(model, s, x_T)
        errors.append((x - x0).abs().max().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[-1] < 1e-2, errors
    # x_T is (close to) a standard Gaussian draw: the inversion reaches the prior.
    assert abs(x_T.std().item() - 1) < 0.15


def test_inverse_step_is_the_exact_inverse_of_a_deterministic_step():
    """Given the same ε̂, DDIM eq. (12) (η = 0) and its inverse compose to the identity."""
    s = TutorialDDIMScheduler(clip_sample=False, prediction_type="epsilon")
    s.set_timesteps(13)
    x_t, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    for t in s.timesteps:
        x_prev = s.step(eps, t, x_t).prev_sample
        back = s.inverse_step(eps, t, x_prev).prev_sample
        torch.testing.assert_close(back, x_t, rtol=1e-10, atol=1e-10)


def test_gaussian_kl_matches_monte_carlo_and_vanishes_at_equality():
    g = torch.Generator().manual_seed(0)
    m1, v1, m2, v2 = 0.3, 0.5, -0.4, 1.7
    x = m1 + math.sqrt(v1) * torch.randn(400_000, generator=g, dtype=torch.float64)
    log_q = -0.5 * ((x - m1) ** 2 / v1 + math.log(2 * math.pi * v1))
    log_p = -0.5 * ((x - m2) ** 2 / v2 + math.log(2 * math.pi * v2))
    mc = (log_q - log_p).mean().item()
    exact = tm.gaussian_kl(torch.tensor(m1), torch.tensor(v1), torch.tensor(m2), torch.tensor(v2)).item()
    assert exact == pytest.approx(mc, abs=5 * (log_q - log_p).std().item() / math.sqrt(x.numel()))
    assert tm.gaussian_kl(torch.tensor(0.2), torch.tensor(0.3), torch.tensor(0.2), torch.tensor(0.3)).item() == 0.0
