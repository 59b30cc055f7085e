"""Stochastic samplers (reverse SDE Euler–Maruyama, predictor–corrector) sample the data distribution.

Truth: exact samples of the Gaussian mixture. The yardstick is the energy distance between two independent exact
sample sets of the same size (its sampling noise); a sampler passes when its own distance to the data is within
twice that, and a deliberately coarse run (9 steps) is far outside it, so the test can fail.
"""

import pytest
import torch
from advanced_helpers import Problem
from diffusers import DDPMScheduler

from custom_pipelines import sample_loop
from schedulers.gaussian_mixture import GaussianMixture
from schedulers.scheduling_tutorial_sde import TutorialScoreSDEScheduler

N_SAMPLES = 2000


def energy_distance(x, y):
    """Székely's energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic), 0 iff the laws agree."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


@pytest.fixture(scope="module", params=["ring", "mixture16"])
def setting(request):
    if request.param == "ring":
        problem = Problem(GaussianMixture.ring(), batch=N_SAMPLES, seed=3)
    else:
        problem = Problem(
            GaussianMixture.random(dim=16, num_modes=4, seed=1),
            beta_schedule="squaredcos_cap_v2",
            batch=N_SAMPLES,
            seed=3,
        )
    g = torch.Generator().manual_seed(1)
    data, data2 = problem.gmm.sample(N_SAMPLES, g), problem.gmm.sample(N_SAMPLES, g)
    return problem, data, energy_distance(data, data2)


@pytest.mark.parametrize("sde_type", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("corrector", ["none", "langevin"])
def test_sampler_matches_the_data_distribution(setting, sde_type, corrector):
    problem, data, baseline = setting
    s = TutorialScoreSDEScheduler.from_config(problem.ddpm.config, sde_type=sde_type, corrector=corrector)
    x = sample_loop(problem.model, s, problem.x_T, 200, generator=torch.Generator().manual_seed(2))
    assert x.shape == data.shape and bool(torch.isfinite(x).all())
    assert energy_distance(x, data) < 2 * baseline, (energy_distance(x, data), baseline)
    coarse = sample_loop(problem.model, s, problem.x_T, 9, generator=torch.Generator().manual_seed(2))
    assert energy_distance(coarse, data) > 5 * baseline


def test_loop_layout_and_scaling(setting):
    """Corrector entries repeat the timestep; VE starts at σ_max and hands the network x / c (c = 1/√ᾱ)."""
    problem, _, _ = setting
    s = TutorialScoreSDEScheduler.from_config(DDPMScheduler().config, corrector="langevin", n_corrector_steps=2)
    s.set_timesteps(5)
    assert len(s.timesteps) == 4 * 3 + 1 and s.timesteps[:3].tolist() == [999.0] * 3
    ve = TutorialScoreSDEScheduler.from_config(problem.ddpm.config, sde_type="ve")
    sigma_max = float(((1 - problem.ddpm.alpha_bar[-1]) / problem.ddpm.alpha_bar[-1]).sqrt())
    assert abs(ve.init_noise_sigma - sigma_max) < 1e-9 * sigma_max
    ve.set_timesteps(3)
    x = torch.ones(1, 2, dtype=torch.float64)
    torch.testing.assert_close(ve.scale_model_input(x, ve.timesteps[0]), x / (1 + sigma_max**2) ** 0.5)
    vp = TutorialScoreSDEScheduler.from_config(problem.ddpm.config)
    vp.set_timesteps(3)
    torch.testing.assert_close(vp.scale_model_input(x, vp.timesteps[1]), x)


def test_same_generator_same_samples(setting):
    problem, _, _ = setting
    s = TutorialScoreSDEScheduler.from_config(problem.ddpm.config, corrector="langevin")
    a = sample_loop(problem.model, s, problem.x_T[:8], 6, generator=torch.Generator().manual_seed(5))
    b = sample_loop(problem.model, s, problem.x_T[:8], 6, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
