"""Likelihoods against the exact Gaussian-mixture density.

- ODE log-likelihood: with the exact trace it equals `GaussianMixture.log_prob(x, ᾱ_0)`, the exact density of the
  model's marginal at t = 0 where the data point is placed (Song et al.'s convention), to 1e-3 nats; Hutchinson's
  estimate is unbiased around it.
- Variational bound: its dataset average is ≥ the true average negative log-likelihood (cross-entropy ≥ entropy) and
  the gap shrinks as the number of steps grows.
"""

import math

import pytest
import torch
from advanced_helpers import Problem

from schedulers import TutorialDDPMScheduler
from schedulers.gaussian_mixture import GaussianMixture
from schedulers.tutorial_likelihood import (
    ode_log_likelihood,
    schedule_of,
    variational_bound,
    variational_bound_dataset,
)

ODE_TOLERANCE_NATS = 1e-3


@pytest.fixture(scope="module")
def ring():
    return Problem(GaussianMixture.ring(), batch=2)


@pytest.mark.parametrize("which", ["ring", "mixture8"])
def test_ode_log_likelihood_equals_the_exact_density(which, ring):
    problem = (
        ring
        if which == "ring"
        else Problem(GaussianMixture.random(dim=8, num_modes=3, seed=4), beta_schedule="squaredcos_cap_v2", batch=2)
    )
    x = problem.gmm.sample(16, torch.Generator().manual_seed(0))
    result = ode_log_likelihood(problem.model, problem.ddpm, x, rtol=1e-7, atol=1e-7)
    exact = problem.gmm.log_prob(x, problem.ddpm.alpha_bar[0])
    assert float((result.log_prob - exact).abs().max()) < ODE_TOLERANCE_NATS
    torch.testing.assert_close(result.bits_per_dim, -result.log_prob / (x.shape[1] * math.log(2)))
    assert result.num_evals > 7


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_trace_is_unbiased(ring, probe):
    """One point, 256 independent probes: the mean estimate is within 4 standard errors of the exact value."""
    x = ring.gmm.sample(1, torch.Generator().manual_seed(1)).expand(256, 2).contiguous()
    result = ode_log_likelihood(
        ring.model,
        ring.ddpm,
        x,
        trace="hutchinson",
        probe=probe,
        rtol=1e-6,
        atol=1e-6,
        generator=torch.Generator().manual_seed(2),
    )
    exact = float(ring.gmm.log_prob(x[:1], ring.ddpm.alpha_bar[0]))
    errors = result.log_prob - exact
    standard_error = float(errors.std()) / 16
    assert abs(float(errors.mean())) < 4 * standard_error + 1e-3, (float(errors.mean()), standard_error)
    assert float(errors.std()) > 0  # the probes really are random


def test_variational_bound_is_above_the_nll_and_tightens(ring):
    x = ring.gmm.sample(2000, torch.Generator().manual_seed(3))
    true_nll = float(-ring.gmm.log_prob(x).mean())
    gaps = []
    for num_steps in (50, 200, 1000):
        vb = variational_bound(
            ring.model,
            ring.ddpm,
            x,
            num_steps=num_steps,
            decoder="gaussian",
            generator=torch.Generator().manual_seed(4),
        )
        standard_error = float(vb.nats.std()) / math.sqrt(x.shape[0])
        gap = float(vb.nats.mean()) - true_nll
        assert gap > -3 * standard_error, (num_steps, gap, standard_error)
        gaps.append(gap)
        # the terms add up, and bits/dim is nats / (D ln 2)
        torch.testing.assert_close(vb.nats, vb.prior + vb.steps.sum(1) + vb.decoder)
        torch.testing.assert_close(vb.bits_per_dim, vb.nats / (2 * math.log(2)))
        assert vb.steps.shape == (2000, num_steps - 1) and int(vb.timesteps[0]) == 0 and int(vb.timesteps[-1]) == 999
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < gaps[1] / 3, gaps


def test_dataset_average_and_breakdown(ring):
    x = ring.gmm.sample(64, torch.Generator().manual_seed(5))
    kwargs = dict(num_steps=20, decoder="gaussian")
    whole = variational_bound(ring.model, ring.ddpm, x, generator=torch.Generator().manual_seed(6), **kwargs)
    g = torch.Generator().manual_seed(6)
    avg = variational_bound_dataset(ring.model, ring.ddpm, [x], generator=g, **kwargs)
    assert avg.num_samples == 64
    assert abs(avg.bits_per_dim - float(whole.bits_per_dim.mean())) < 1e-9
    total = avg.prior_bits_per_dim + float(avg.steps_bits_per_dim.sum()) + avg.decoder_bits_per_dim
    assert abs(total - avg.bits_per_dim) < 1e-9
    split = variational_bound_dataset(
        ring.model, ring.ddpm, [x[:40], x[40:]], generator=torch.Generator().manual_seed(6), **kwargs
    )
    assert split.num_samples == 64 and split.steps_bits_per_dim.shape == (19,)
    assert torch.equal(split.timesteps, whole.timesteps)  # step k runs from timesteps[k + 1] to timesteps[k]


def test_8bit_images_discretized_and_dequantized(ring):
    """On 8-bit data: the discretized bound and the dequantised ODE value are both ≥ the exact discrete NLL."""
    g = torch.Generator().manual_seed(7)
    x = ((ring.gmm.sample(500, g) + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    # Exact probability of each 8-bit bin under the (diagonal) mixture: Σ_k π_k Π_d P(bin_d | k).
    lo, hi = x - 1 / 255, x + 1 / 255
    normal = torch.distributions.Normal(ring.gmm.means[None], ring.gmm.variances[None].sqrt())
    bin_mass = normal.cdf(hi[:, None]) - normal.cdf(lo[:, None])  # (B, K, D)
    true_bpd = -torch.log((ring.gmm.weights * bin_mass.prod(-1)).sum(1)) / (2 * math.log(2))
    vb = variational_bound(ring.model, ring.ddpm, x, num_steps=1000, generator=g)
    assert float(vb.bits_per_dim.mean()) > float(true_bpd.mean()) - 3 * float(vb.bits_per_dim.std()) / math.sqrt(500)
    # Dequantised ODE bits/dim is an upper bound in expectation (Jensen) and, for a smooth density, nearly tight:
    # measured 6.2685 vs exact 6.2699 on these 64 points (standard error of the difference 0.008).
    ode = ode_log_likelihood(ring.model, ring.ddpm, x[:64], dequantize=True, rtol=1e-6, atol=1e-6, generator=g)
    assert abs(float(ode.bits_per_dim.mean()) - float(true_bpd[:64].mean())) < 0.05


def test_images_outside_the_value_range_are_refused(ring):
    x = torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"outside the model's value range value_range=\(-1.0, 1.0\)"):
        ode_log_likelihood(ring.model, ring.ddpm, x)
    with pytest.raises(ValueError, match="outside the model's value range"):
        variational_bound(ring.model, ring.ddpm, x * 2, decoder="gaussian")
    with pytest.raises(ValueError, match="not on the 8-bit grid"):
        variational_bound(ring.model, ring.ddpm, torch.tensor([[0.5, 0.1234]]))
    with pytest.raises(ValueError, match="not on the 8-bit grid"):
        ode_log_likelihood(ring.model, ring.ddpm, torch.tensor([[0.5, 0.1234]]), dequantize=True)
    with pytest.raises(ValueError, match=r"trace='approx' is not supported; choose one of \('exact', 'hutchinson'\)"):
        ode_log_likelihood(ring.model, ring.ddpm, x / 2, trace="approx")
    with pytest.raises(ValueError, match=r"probe='uniform' is not supported"):
        ode_log_likelihood(ring.model, ring.ddpm, x / 2, trace="hutchinson", probe="uniform")
    with pytest.raises(ValueError, match=r"rtol=0.0 must be a finite number > 0"):
        ode_log_likelihood(ring.model, ring.ddpm, x / 2, rtol=0.0)
    with pytest.raises(ValueError, match=r"num_steps=1 must be an integer in \[2, 1000\]"):
        variational_bound(ring.model, ring.ddpm, x / 2, num_steps=1, decoder="gaussian")


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
        {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    ],
)
def test_the_schedule_of_a_diffusers_scheduler_is_our_float64_table(config):
    """The likelihoods read a diffusers scheduler through its config: the same float64 ᾱ our DDPM builds."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    ours = TutorialDDPMScheduler(**config)
    for theirs in (DDIMScheduler(**config), EulerDiscreteScheduler.from_config(DDIMScheduler(**config).config)):
        alpha_bar, prediction_type = schedule_of(theirs)
        assert alpha_bar.dtype == torch.float64 and prediction_type == ours.config.prediction_type
        torch.testing.assert_close(alpha_bar, ours.alpha_bar, rtol=0, atol=0)
    with pytest.raises(ValueError, match="is not a scheduler"):
        schedule_of(object())
