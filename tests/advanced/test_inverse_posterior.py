"""The exact posterior of a linear measurement of Gaussian-mixture data: the truth restoration methods are checked by.

- Brute force: in 2-D, prior × likelihood integrated on a fine grid gives each component's posterior weight, mean and
  covariance, and the normalised density, which `GaussianMixture.posterior_given` matches to 1e-10 (and a formula
  without the σ_y² term does not).
- Monte Carlo in 16-D: importance-weighted prior samples have the posterior mean; the posterior's own samples have its
  mean and covariance; conditioning twice is conditioning once on both measurements.
- σ_y = 0: samples satisfy A x = y to rounding, the result is the σ_y → 0 limit of the noisy one, a redundant row of A
  changes nothing, and the exact score of the singular posterior is the gradient of its log-density at ᾱ < 1.
- `sliced_wasserstein`: 0 between equal empirical measures, the exact 1-D W_2 (a linear program) in 1-D, |δ|² / D for a
  shift δ, and it tells the posterior from the prior.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from schedulers.gaussian_mixture import GaussianMixture, sliced_wasserstein

GRID_STEP = (
    0.004  # 20 points per smallest standard deviation (0.02): the Riemann sum of a Gaussian is exact to ~e^-400
)
GRID_HALF_WIDTH = 1.3  # means in [-0.5, 0.5], standard deviations <= 0.1: 8 of them to the edge


def _measurement(gm, A, sigma_y, seed):
    g = torch.Generator().manual_seed(seed)
    x = gm.sample(1, generator=g)[0]
    return x, A @ x + sigma_y * torch.randn(A.shape[0], generator=g, dtype=torch.float64)


def _brute_force(gm, A, y, sigma_y):
    """Per component: ∫ π_k N(x; μ_k, diag s_k²) N(y; A x, σ_y²) dx and its first two moments, by a Riemann sum."""
    axis = torch.arange(-GRID_HALF_WIDTH, GRID_HALF_WIDTH + GRID_STEP / 2, GRID_STEP, dtype=torch.float64)
    x = torch.cartesian_prod(axis, axis)  # (N, 2)
    diff = x[None] - gm.means[:, None]  # (K, N, 2)
    log_prior = -0.5 * (diff**2 / gm.variances[:, None] + (2 * math.pi * gm.variances[:, None]).log()).sum(-1)
    residual = y - x @ A.T  # (N, m)
    log_lik = -0.5 * (residual**2 / sigma_y**2 + math.log(2 * math.pi * sigma_y**2)).sum(-1)
    joint = gm.weights[:, None] * (log_prior + log_lik).exp() * GRID_STEP**2  # (K, N)
    mass = joint.sum(1)
    means = joint @ x / mass[:, None]
    centred = x[None] - means[:, None]
    covariances = torch.einsum("kn,kni,knj->kij", joint, centred, centred) / mass[:, None, None]
    density = joint.sum(0) / mass.sum() / GRID_STEP**2
    return mass / mass.sum(), means, covariances, x, density


@pytest.mark.parametrize("row", [(1.0, 0.0), (0.6, 0.8)], ids=["first-axis", "oblique"])
def test_the_posterior_is_prior_times_likelihood_normalised(row):
    gm = GaussianMixture.random(dim=2, num_modes=4, seed=3)
    A = torch.tensor([row], dtype=torch.float64)
    sigma_y, y = 0.15, torch.tensor([-0.1], dtype=torch.float64)  # a y that leaves every component in play
    weights, means, covariances, grid, density = _brute_force(gm, A, y, sigma_y)
    assert weights.min() > 1e-3  # every component still matters: the weights are a real test
    posterior = gm.posterior_given(A, y, sigma_y)
    torch.testing.assert_close(posterior.weights, weights, rtol=0, atol=1e-10)
    torch.testing.assert_close(posterior.means, means, rtol=0, atol=1e-10)
    torch.testing.assert_close(posterior.covariances, covariances, rtol=0, atol=1e-10)
    torch.testing.assert_close(posterior.mean, weights @ means, rtol=0, atol=1e-10)
    exact = posterior.log_prob(grid).exp()
    assert (exact - density).abs().max() < 1e-10 * density.max()


def _importance_weighted(gm, A, y, sigma_y, n, seed):
    """Prior samples weighted by the likelihood N(y; A x, σ_y² I), self-normalised: their mean, its standard error."""
    x = gm.sample(n, generator=torch.Generator().manual_seed(seed))
    log_w = -0.5 * ((y - x @ A.T) ** 2).sum(1) / sigma_y**2
    w = torch.softmax(log_w, dim=0)
    mean = w @ x
    standard_error = (w[:, None] ** 2 * (x - mean) ** 2).sum(0).sqrt()  # the delta-method variance of the ratio
    return mean, standard_error, 1 / (w**2).sum()


def test_importance_weighted_prior_samples_have_the_posterior_mean():
    gm = GaussianMixture.random(dim=16, num_modes=4, seed=1)
    A = torch.randn(2, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 4
    sigma_y = 0.1
    _, y = _measurement(gm, A, sigma_y, seed=1)
    posterior = gm.posterior_given(A, y, sigma_y)
    mean, standard_error, effective = _importance_weighted(gm, A, y, sigma_y, n=200_000, seed=2)
    assert effective > 2_000
    assert ((mean - posterior.mean).abs() < 5 * standard_error).all()
    assert (posterior.mean - gm.mean).abs().max() > 20 * standard_error.max()  # the measurement moved the mean


def test_the_posterior_samples_have_its_moments_and_conditioning_composes():
    gm = GaussianMixture.random(dim=16, num_modes=4, seed=1)
    g = torch.Generator().manual_seed(6)
    A = torch.randn(3, 16, generator=g, dtype=torch.float64) / 4
    sigma_y = 0.05
    _, y = _measurement(gm, A, sigma_y, seed=3)
    posterior = gm.posterior_given(A, y, sigma_y)
    n = 100_000
    samples = posterior.sample(n, generator=g)
    outer = posterior.covariances + posterior.means[:, :, None] * posterior.means[:, None, :]
    covariance = torch.einsum("k,kij->ij", posterior.weights, outer) - posterior.mean[:, None] * posterior.mean
    assert ((samples.mean(0) - posterior.mean).abs() < 5 * (covariance.diagonal() / n).sqrt()).all()
    assert (samples.T.cov() - covariance).abs().max() < 0.05 * covariance.diagonal().max()
    # Bayes' rule twice: p(x | y_1, y_2) = p(x | y_1) conditioned on y_2, with the full covariances of p(x | y_1)
    twice = gm.posterior_given(A[:1], y[:1], sigma_y).posterior_given(A[1:], y[1:], sigma_y)
    torch.testing.assert_close(twice.weights, posterior.weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(twice.means, posterior.means, rtol=0, atol=1e-12)
    torch.testing.assert_close(twice.covariances, posterior.covariances, rtol=0, atol=1e-12)


def test_a_noiseless_measurement_is_kept_exactly_and_is_the_limit_of_noisy_ones():
    gm = GaussianMixture.random(dim=16, num_modes=4, seed=1)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(3, 16, generator=g, dtype=torch.float64) / 4
    _, y = _measurement(gm, A, 0.0, seed=4)
    posterior = gm.posterior_given(A, y, 0.0)
    samples = posterior.sample(10_000, generator=g)
    assert (samples @ A.T - y).abs().max() < 1e-13
    assert (posterior.means @ A.T - y).abs().max() < 1e-13
    errors = []
    for sigma_y in (1e-2, 1e-4, 1e-6):
        noisy = gm.posterior_given(A, y, sigma_y)
        errors.append(
            max(
                (noisy.weights - posterior.weights).abs().max().item(),
                (noisy.means - posterior.means).abs().max().item(),
                (noisy.covariances - posterior.covariances).abs().max().item(),
            )
        )
    assert errors[1] < 1e-3 * errors[0] and errors[2] < 1e-3 * errors[1] and errors[2] < 1e-8  # O(σ_y²)
    # a redundant row (rank-deficient A, S_k singular) measures nothing new: the pseudo-inverse gives the same answer
    redundant = torch.cat([A, A[:1] - 2 * A[2:]])
    same = gm.posterior_given(redundant, redundant @ posterior.means[0], 0.0)
    torch.testing.assert_close(same.weights, posterior.weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(same.means, posterior.means, rtol=0, atol=1e-12)
    torch.testing.assert_close(same.covariances, posterior.covariances, rtol=0, atol=1e-12)
    # the singular posterior's diffused marginals are proper: its exact score is the gradient of its log-density
    x = samples[:8] + 0.3 * torch.randn(8, 16, generator=g, dtype=torch.float64)
    x.requires_grad_(True)
    posterior.log_prob(x, 0.5).sum().backward()
    torch.testing.assert_close(posterior.score(x.detach(), 0.5), x.grad, rtol=0, atol=1e-10)


def test_a_full_covariance_mixture_with_diagonal_covariances_is_the_diagonal_one():
    gm = GaussianMixture.random(dim=8, num_modes=3, seed=2)
    full = GaussianMixture(gm.weights, gm.means, torch.diag_embed(gm.variances))
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for alpha_bar in (1.0, 0.4, torch.linspace(0.1, 0.9, 6, dtype=torch.float64)):
        torch.testing.assert_close(full.log_prob(x, alpha_bar), gm.log_prob(x, alpha_bar), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(full.score(x, alpha_bar), gm.score(x, alpha_bar), rtol=1e-12, atol=1e-12)


def _exact_w2_squared_1d(a, b):
    """W_2² between two 1-D empirical measures as the optimal-transport linear program, solved by scipy."""
    n, m = len(a), len(b)
    cost = (a[:, None] - b[None, :]) ** 2
    rows = np.kron(np.eye(n), np.ones(m))
    cols = np.kron(np.ones(n), np.eye(m))
    plan = linprog(
        cost.ravel(),
        A_eq=np.vstack([rows, cols]),
        b_eq=np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)]),
        bounds=(0, None),
        method="highs",
    )
    return plan.fun


def test_sliced_wasserstein_is_exact_in_1d_and_zero_between_equal_measures():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 1, generator=g, dtype=torch.float64)
    y = 0.5 + 2 * torch.randn(5, 1, generator=g, dtype=torch.float64)
    exact = _exact_w2_squared_1d(x[:, 0].numpy(), y[:, 0].numpy())
    assert abs(sliced_wasserstein(x, y, 3, g) ** 2 - exact) < 1e-12  # in 1-D every direction is ±1: SW_2 is W_2
    by_hand = 1 / 6 * 1**2 + 1 / 6 * 2**2 + 1 / 3 * 1**2  # quantiles {0, 1, 2} vs {0, 3} on (0, 1/3, 1/2, 2/3, 1]
    assert (
        abs(sliced_wasserstein(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[0.0], [3.0]]), 1) ** 2 - by_hand)
        < 1e-14
    )
    z = torch.randn(500, 6, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(z, z, 64, g) == 0
    assert sliced_wasserstein(z, torch.cat([z.flip(0), z]), 64, g) == 0  # the same empirical measure


def test_sliced_wasserstein_of_a_shift_is_its_length_over_root_d():
    g = torch.Generator().manual_seed(10)
    D = 16
    z = torch.randn(2_000, D, generator=g, dtype=torch.float64)
    delta = torch.linspace(-0.3, 0.5, D, dtype=torch.float64)
    # E_θ (δ·θ)² = |δ|² / D; over P directions D (θ·δ)² / |δ|² has relative standard deviation ≈ √(2 / P) = 2.2%
    sw = sliced_wasserstein(z, z + delta, 4_000, g)
    assert abs(sw**2 / (delta.norm() ** 2 / D) - 1) < 0.1
    # independent samples of N(0, I) and N(δ, I): the same, up to the finite-sample bias
    independent = sliced_wasserstein(z, torch.randn(2_000, D, generator=g, dtype=torch.float64) + delta, 4_000, g)
    assert abs(independent**2 / (delta.norm() ** 2 / D) - 1) < 0.2


def test_sliced_wasserstein_tells_the_posterior_from_the_prior():
    gm = GaussianMixture.random(dim=16, num_modes=4, seed=1)
    g = torch.Generator().manual_seed(11)
    A = torch.randn(2, 16, generator=g, dtype=torch.float64) / 4
    _, y = _measurement(gm, A, 0.05, seed=5)
    posterior = gm.posterior_given(A, y, 0.05)
    samples = posterior.sample(2_000, generator=g)
    to_itself = sliced_wasserstein(samples, posterior.sample(2_000, generator=g), 256, g)
    to_prior = sliced_wasserstein(samples, gm.sample(2_000, generator=g), 256, g)
    assert to_prior > 5 * to_itself


def test_bad_arguments_are_refused_by_name():
    gm = GaussianMixture.random(dim=4, num_modes=2, seed=0)
    A, y = torch.ones(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"A of shape \(2, 3\).*D = 4"):
        gm.posterior_given(torch.ones(2, 3), y, 0.1)
    with pytest.raises(ValueError, match=r"A of shape \(4,\)"):
        gm.posterior_given(torch.ones(4), y, 0.1)
    with pytest.raises(ValueError, match="A of shape .* finite"):
        gm.posterior_given(torch.full((2, 4), math.nan), y, 0.1)
    with pytest.raises(ValueError, match=r"y of shape \(3,\).*\(2,\)"):
        gm.posterior_given(A, torch.zeros(3), 0.1)
    for sigma_y in (-0.1, math.nan, math.inf, True, "0.1", None):
        with pytest.raises(ValueError, match=r"sigma_y=.* must be a finite real number >= 0"):
            gm.posterior_given(A, y, sigma_y)
    with pytest.raises(ValueError, match="y is not in the range of A"):
        gm.posterior_given(A, torch.tensor([0.0, 1.0]), 0.0)  # equal rows, unequal measurements
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), -torch.eye(2)[None])
    x = torch.zeros(3, 4)
    for bad in (0, 2.5, None):
        with pytest.raises(ValueError, match=r"num_projections=.* must be an integer >= 1"):
            sliced_wasserstein(x, x, bad)
    with pytest.raises(ValueError, match=r"x of shape \(3, 4\) and y of shape \(3, 5\)"):
        sliced_wasserstein(x, torch.zeros(3, 5), 8)
    with pytest.raises(ValueError, match="x and y must be finite"):
        sliced_wasserstein(x, torch.full((3, 4), math.nan), 8)
