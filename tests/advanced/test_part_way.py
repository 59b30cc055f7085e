"""Starting part-way down the grid (img2img, inpainting, SDEdit) with the continuous-time samplers.

diffusers' pipelines slice `timesteps[t_start * order:]` and call `set_begin_index(t_start * order)`; the walk over
`timesteps` must then begin at that entry, with the multistep history and the Runge–Kutta stages starting afresh.
What every scheduler must do is in tests/schedulers/test_contract.py; here is what only the walkers have.
"""

import math

import pytest
import torch

from schedulers import tutorial_grids as grids
from schedulers import tutorial_math as tm
from schedulers.scheduling_tutorial_dpmpp import TutorialDPMSolverPlusPlusScheduler
from schedulers.scheduling_tutorial_pf_ode import TutorialPFODEScheduler
from schedulers.scheduling_tutorial_sde import TutorialScoreSDEScheduler, sde_marginal

WALKERS = [
    (TutorialDPMSolverPlusPlusScheduler, {"solver_order": 3, "few_step_interior": False}),  # end points at every N
    (TutorialPFODEScheduler, {"solver": "rk4"}),
    (TutorialScoreSDEScheduler, {"corrector": "langevin", "n_corrector_steps": 2}),
]


def step_all(s, timesteps, x, **kwargs):
    for t in timesteps:
        x = s.step(torch.tanh(s.scale_model_input(x, t)) * 0.3, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("cls, kwargs", WALKERS, ids=lambda v: getattr(v, "__name__", ""))
def test_order_counts_the_entries_of_a_step(cls, kwargs):
    """`timesteps[t_start * order]` is the first entry of step t_start: every entry of a step shares its grid point
    (its first entry's timestep is the grid point's), and the final entry is t = 0."""
    s = cls(**kwargs)
    s.set_timesteps(6)
    assert len(s.timesteps) == 5 * s.order + 1 and float(s.timesteps[-1]) == 0.0
    if cls is TutorialScoreSDEScheduler:
        assert s.order == 3  # two correctors and the predictor per grid point
    for t_start in range(6):
        s.set_begin_index(t_start * s.order)  # every such entry is a step's first
    if s.order > 1:
        with pytest.raises(ValueError, match=r"begin_index=1 is not the first entry of a step.*order="):
            s.set_begin_index(1)


@pytest.mark.parametrize("cls, kwargs", WALKERS, ids=lambda v: getattr(v, "__name__", ""))
def test_set_begin_index_pins_where_the_loop_starts(cls, kwargs):
    s = cls(**kwargs)
    s.set_timesteps(5)
    k = 2 * s.order
    s.set_begin_index(k)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=rf"starting at set_begin_index\({k}\)"):
        s.step(x, s.timesteps[0], x)
    s.step(x, s.timesteps[k], x)
    assert s.step_index == k + 1
    with pytest.raises(ValueError, match="is not the next entry of scheduler.timesteps"):
        s.step(x, s.timesteps[k + 2 * s.order], x)  # skipping ahead mid-loop is refused
    for j in range(k + 1, k + s.order + 1):  # the loop goes on, to the second entry of the next step
        s.step(x, s.timesteps[j], x)
    s.step(x, s.timesteps[k], x)  # and a new loop from the same start is allowed at any time
    assert s.step_index == k + 1


@pytest.mark.parametrize("cls, kwargs", WALKERS, ids=lambda v: getattr(v, "__name__", ""))
def test_a_loop_starts_afresh_at_its_first_entry(cls, kwargs):
    """A part-way loop does not see the history of an earlier loop: the same part-way loop run after a full one
    (or on a fresh scheduler) gives the same sample."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    results = []
    for warm in (False, True):
        s = cls(**kwargs)
        s.set_timesteps(7)
        if warm:
            step_all(s, s.timesteps, x, **({"generator": torch.Generator()} if "generator" in kwargs else {}))
            s.set_timesteps(7)
        k = 3 * s.order
        s.set_begin_index(k)
        gen = {"generator": torch.Generator().manual_seed(1)} if cls is TutorialScoreSDEScheduler else {}
        results.append(step_all(s, s.timesteps[k:], x, **gen))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_dpmpp_part_way_first_step_is_first_order():
    """From its first entry the multistep method has one data prediction: the update is DPM-Solver++(1) = DDIM η = 0
    from λ_k to λ_{k+1} (DPM-Solver++ eq. (9) with x̂_0 constant): x_{k+1} = (σ_{k+1}/σ_k) x_k + α_{k+1}(1 - e^{-h}) x̂_0."""
    s = TutorialDPMSolverPlusPlusScheduler(solver_order=3, prediction_type="sample")
    s.set_timesteps(8)
    k = 4
    s.set_begin_index(k)
    x, x0 = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    half_log_snr = grids.half_log_snr_at(s.timesteps[k : k + 2], s.half_log_snr)
    sqrt_alpha_bar, sigma = torch.sigmoid(2 * half_log_snr).sqrt(), torch.sigmoid(-2 * half_log_snr).sqrt()
    h = float(half_log_snr[1] - half_log_snr[0])
    expected = float(sigma[1] / sigma[0]) * x + float(sqrt_alpha_bar[1]) * -math.expm1(-h) * x0
    torch.testing.assert_close(s.step(x0, s.timesteps[k], x).prev_sample, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_type", ["vp", "subvp", "ve"])
def test_score_sde_add_noise_is_the_sdes_own_marginal(sde_type):
    """img2img noises x_0 into the state the scheduler steps: α x_0 + σ ε with the SDE's (α, σ) at λ(t); for VE that
    is x_0 + σ ε with σ = e^{-λ}, for VP it is q(x_t | x_0) itself."""
    s = TutorialScoreSDEScheduler(sde_type=sde_type)
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 412.5, 999.0], dtype=torch.float64)
    sqrt_alpha_bar, sigma, _, _ = sde_marginal(sde_type, grids.half_log_snr_at(t, s.half_log_snr))
    torch.testing.assert_close(s.add_noise(x0, eps, t), sqrt_alpha_bar[:, None] * x0 + sigma[:, None] * eps)
    if sde_type == "ve":
        torch.testing.assert_close(sigma, torch.exp(-grids.half_log_snr_at(t, s.half_log_snr)))
    if sde_type == "vp":
        torch.testing.assert_close(s.add_noise(x0, eps, t), tm.q_sample(x0, eps, s.alpha_bar_at(t)))
