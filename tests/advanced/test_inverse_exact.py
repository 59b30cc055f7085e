"""The restoration methods against the exact posterior of Gaussian-mixture data (issue 22, item 3).

`ExactMixtureUNet` is a perfectly trained network for mixture data, and `GaussianMixture.posterior_given` is the exact
p(x_0 | y) of y = A x_0 + σ_y n, so each method's samples are compared with exact posterior samples: the sliced
Wasserstein distance (SW_2) and the error of the posterior mean, as the step count N grows. The noise floor is the SW_2
between two independent sets of exact posterior samples of the same size. Images are (1, 4, 4) (D = 16); the operators
are 2x super-resolution, inpainting of the right half and compressed sensing with 6 Gaussian measurements.

Which methods are exact in the limit N → ∞, and why:

- DDNM, noiseless: when the prior makes A's range and null-space coordinates independent (any isotropic Gaussian, any
  product prior in the V basis of A = U S Vᵀ). Its range part is A⁺y exactly at the end; the null-space part of x̂_0
  depends on x_t's null-space part only, so it runs the unconditional DDIM chain, which converges to the prior's
  null-space marginal = the posterior's.
- DDRM at η = 0, noiseless: the same argument (its null-space step is DDIM's at η = 0, its range coordinates are ȳ).
  At the paper's η = 0.85 its null-space noise σ_s η does not shrink with the step, and it does not converge even here.
- ΠGDM, noiseless and noisy: when p(x_0 | x_t) is Gaussian with covariance r_t² I = (1 − ᾱ_t) I, i.e. a prior
  N(μ, I): its likelihood N(A x̂_0, r_t² A Aᵀ + σ_y² I) is then p(y | x_t) itself and the guided score is the exact
  conditional score.
- None of the four is exact for a multimodal prior whose modes couple range and null space: x̂_0 = E[x_0 | x_t] is not
  E[x_0 | x_t, y], and DPS' and ΠGDM's Gaussian likelihoods are approximations. There the tests check that each method
  is much closer to the posterior than the prior is, that noiseless DDNM and DDRM keep A x = y, and that DDNM's error
  on super-resolution stays far above the noise floor at N = 300 (it is biased, not slow).
"""

import math

import pytest
import torch

from custom_pipelines import Inpainting, RandomProjection, SuperResolution, TutorialInverseProblemPipeline
from schedulers import TutorialDDPMScheduler
from schedulers.gaussian_mixture import GaussianMixture, sliced_wasserstein

SHAPE = (1, 4, 4)
D = 16
NUM_SAMPLES = 2000
NOISY = 0.05  # σ_y in model units


def _operators():
    mask = torch.zeros(4, 4)
    mask[:, :2] = 1  # left half observed
    return {"sr": SuperResolution(2), "inpaint": Inpainting(mask), "cs": RandomProjection(6, SHAPE, seed=0)}


OPERATORS = _operators()
PRIORS = {
    # N(μ, I): range and null space independent, p(x_0 | x_t) Gaussian with covariance (1 − ᾱ_t) I
    "unit_gaussian": GaussianMixture(
        torch.ones(1),
        0.3 * torch.randn(1, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
        torch.ones(1),
    ),
    # 4 anisotropic modes with unequal weights (std 0.02-0.1): the measurement picks a mode, coupling range and null
    "four_modes": GaussianMixture.random(dim=D, num_modes=4, seed=1),
}


def _sw(a, b):
    return float(sliced_wasserstein(a, b, num_projections=256, generator=torch.Generator().manual_seed(9)))


_PROBLEMS = {}


def problem(prior: str, op: str, sigma_y: float):
    """y from one prior sample, the exact posterior, its samples and the noise floor (cached per module)."""
    key = (prior, op, sigma_y)
    if key not in _PROBLEMS:
        gm, operator = PRIORS[prior], OPERATORS[op]
        A = operator.matrix(SHAPE)
        x = gm.sample(1, generator=torch.Generator().manual_seed(3)).reshape(1, *SHAPE)
        clean = operator.A(x)
        y = clean + sigma_y * torch.randn(clean.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        posterior = gm.posterior_given(A, y.flatten(), sigma_y)
        g = torch.Generator().manual_seed(5)
        reference = posterior.sample(NUM_SAMPLES, generator=g)
        floor = _sw(reference, posterior.sample(NUM_SAMPLES, generator=g))
        from_prior = _sw(gm.sample(NUM_SAMPLES, generator=g), reference)
        trace = float(torch.einsum("k,kii->", posterior.weights, posterior.covariances))  # E tr Cov[x_0 | y, k]
        _PROBLEMS[key] = dict(gm=gm, A=A, y=y, posterior=posterior, reference=reference, floor=floor,
                              from_prior=from_prior, mean_tolerance=4 * math.sqrt(trace / NUM_SAMPLES))  # fmt: skip
    return _PROBLEMS[key]


def restore(prior: str, op: str, sigma_y: float, method: str, steps: int, **kwargs):
    """NUM_SAMPLES restorations of the problem's y (model space, unclipped) and their distances to the posterior."""
    p = problem(prior, op, sigma_y)
    scheduler = TutorialDDPMScheduler(timestep_spacing="trailing", clip_sample=False)  # t_1 = T - 1: x_T ~ N(0, I)
    pipe = TutorialInverseProblemPipeline(unet=p["gm"].as_unet(scheduler.alpha_bar, SHAPE), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        p["y"].expand(NUM_SAMPLES, *p["y"].shape[1:]),
        OPERATORS[op],
        method=method,
        num_inference_steps=steps,
        measurement_noise=sigma_y,
        generator=torch.Generator().manual_seed(steps),
        output_type="pt",
        return_trajectory=True,
        **kwargs,
    )
    x = out.trajectory[-1].reshape(NUM_SAMPLES, D)
    return dict(
        sw=_sw(x, p["reference"]),
        mean_error=float((x.mean(0) - p["posterior"].mean).norm()),
        consistency=float(((x @ p["A"].T - p["y"].flatten()).norm(dim=1) / p["y"].norm()).max()),
    )


# (method, kwargs, σ_y): the cases exact in the limit for the unit Gaussian prior (module docstring)
EXACT_IN_THE_LIMIT = [
    ("ddnm", dict(eta=1.0), 0.0),
    ("ddrm", dict(eta=0.0), 0.0),
    ("pigdm", {}, 0.0),
    ("pigdm", {}, NOISY),
]


@pytest.mark.parametrize("op", list(OPERATORS))
@pytest.mark.parametrize(
    "method, kwargs, sigma_y", EXACT_IN_THE_LIMIT, ids=[f"{m}-sigma_y={s}" for m, _, s in EXACT_IN_THE_LIMIT]
)
def test_a_method_exact_in_the_limit_converges_to_the_posterior(op, method, kwargs, sigma_y):
    p = problem("unit_gaussian", op, sigma_y)
    few = restore("unit_gaussian", op, sigma_y, method, 10, **kwargs)
    many = restore("unit_gaussian", op, sigma_y, method, 200, **kwargs)
    print(
        f"{method} {op} σ_y={sigma_y}: SW_2 {few['sw']:.4f} (N=10) -> {many['sw']:.4f} (N=200), floor {p['floor']:.4f}"
    )
    assert few["sw"] > 1.5 * many["sw"]  # the step count matters, so the comparison below is a real one
    assert many["sw"] < 1.3 * p["floor"]  # at the noise floor of NUM_SAMPLES exact samples
    assert many["mean_error"] < p["mean_tolerance"]  # 4 standard errors of the posterior mean
    if sigma_y == 0:
        assert many["consistency"] < 1e-12  # A x = y (float64)


@pytest.mark.parametrize("sigma_y", [0.0, NOISY])
@pytest.mark.parametrize("op", list(OPERATORS))
def test_every_method_is_much_closer_to_a_multimodal_posterior_than_the_prior_is(op, sigma_y):
    p = problem("four_modes", op, sigma_y)
    prior_mean_error = float((p["gm"].mean - p["posterior"].mean).norm())
    for method, kwargs in (("ddnm", {}), ("ddrm", {}), ("pigdm", {}), ("dps", dict(guidance_scale=0.3))):
        r = restore("four_modes", op, sigma_y, method, 100, **kwargs)
        print(f"{method} {op} σ_y={sigma_y}: SW_2 {r['sw']:.4f} vs the prior's {p['from_prior']:.4f}")
        assert r["sw"] < 0.65 * p["from_prior"], method
        assert r["mean_error"] < 0.65 * prior_mean_error, method
        if sigma_y == 0 and method in ("ddnm", "ddrm"):
            assert r["consistency"] < 1e-12, method  # both end on A⁺y in A's range


def test_ddnm_is_biased_on_a_multimodal_posterior_not_slow():
    """With modes that couple range and null space, DDNM's error does not shrink with N (module docstring)."""
    p = problem("four_modes", "sr", 0.0)
    errors = [restore("four_modes", "sr", 0.0, "ddnm", steps, eta=1.0)["sw"] for steps in (30, 300)]
    assert min(errors) > 10 * p["floor"] and errors[1] > 0.8 * errors[0]
