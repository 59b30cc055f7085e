"""The contract parts only our discrete schedulers have: diffusers' DDPM/DDIM keys and defaults, zero-terminal-SNR
configs, `previous_timestep`, and add_noise against the ᾱ table. The contract of all five is test_contract.py."""

import inspect

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler

from .conftest import SHARED_CONFIG

OUR_SCHEDULERS = [TutorialDDPMScheduler, TutorialDDIMScheduler]
DIFFUSERS_COUNTERPARTS = [DDPMScheduler, DDIMScheduler]
# The contract's shared keys and those only the discrete schedulers have, all with values other than the defaults.
DISCRETE_CONFIG = dict(SHARED_CONFIG, clip_sample=False, clip_sample_range=2.0, rescale_betas_zero_snr=True)


@pytest.fixture(params=OUR_SCHEDULERS, ids=lambda c: c.__name__)
def scheduler_cls(request):
    return request.param


@pytest.mark.parametrize("counterpart", DIFFUSERS_COUNTERPARTS, ids=lambda c: c.__name__)
def test_config_has_every_key_of_the_diffusers_counterpart(counterpart):
    """Both directions of from_config need the key names; ours is a superset of diffusers' own for its class."""
    ours = {DDPMScheduler: TutorialDDPMScheduler, DDIMScheduler: TutorialDDIMScheduler}[counterpart]
    theirs = set(inspect.signature(counterpart.__init__).parameters) - {"self"}
    assert theirs <= set(inspect.signature(ours.__init__).parameters)
    defaults = {k: v.default for k, v in inspect.signature(counterpart.__init__).parameters.items() if k != "self"}
    for key, value in defaults.items():
        assert ours().config[key] == value, key


@pytest.mark.parametrize("counterpart", DIFFUSERS_COUNTERPARTS, ids=lambda c: c.__name__)
def test_from_config_both_ways_keeps_the_discrete_only_keys(scheduler_cls, counterpart):
    """test_contract.py round-trips the keys all five schedulers share; the discrete ones also carry `clip_sample`,
    `clip_sample_range` and `rescale_betas_zero_snr` both ways, and agree on the zero-terminal-SNR ᾱ table."""
    ours = scheduler_cls.from_config(counterpart.from_config(DISCRETE_CONFIG).config)
    back = counterpart.from_config(ours.config)
    assert {k: (ours.config[k], back.config[k]) for k in DISCRETE_CONFIG} == {
        k: (v, v) for k, v in DISCRETE_CONFIG.items()
    }
    torch.testing.assert_close(
        ours.alphas_cumprod, counterpart(**DISCRETE_CONFIG).alphas_cumprod, rtol=1e-4, atol=1e-6
    )


def test_timesteps_and_previous_timestep(scheduler_cls):
    s = scheduler_cls(timestep_spacing="linspace")
    s.set_timesteps(7, device="cpu")
    grid = s.timesteps.tolist()
    assert grid == sorted(grid, reverse=True) and len(grid) == 7 and grid[0] == 999 and grid[-1] == 0
    assert [s.previous_timestep(t) for t in grid] == grid[1:] + [-1]
    assert s.previous_timestep(torch.tensor(grid[0])).item() == grid[1]
    s.set_timesteps(timesteps=[900, 500, 20])
    assert s.timesteps.tolist() == [900, 500, 20] and s.previous_timestep(500) == 20 and s.num_inference_steps == 3
    s.set_timesteps(7)  # grids are cached per N: switching back restores the whole state
    assert s.timesteps.tolist() == grid and s.num_inference_steps == 7 and not s.custom_timesteps
    assert [s.previous_timestep(t) for t in grid] == grid[1:] + [-1]


def test_add_noise_is_q_sample(scheduler_cls):
    s = scheduler_cls()
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 250, 999])
    expected = s.alpha_bar[t].sqrt().view(3, 1, 1, 1) * x0 + (1 - s.alpha_bar[t]).sqrt().view(3, 1, 1, 1) * eps
    torch.testing.assert_close(s.add_noise(x0, eps, t), expected.float())
    v = s.get_velocity(x0, eps, t)
    expected_v = s.alpha_bar[t].sqrt().view(3, 1, 1, 1) * eps - (1 - s.alpha_bar[t]).sqrt().view(3, 1, 1, 1) * x0
    torch.testing.assert_close(v, expected_v.float())
