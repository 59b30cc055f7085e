"""Bad input to the advanced samplers is refused at the door, with the argument, its value and what is allowed."""

import pytest
import torch
from advanced_helpers import Problem

from schedulers.gaussian_mixture import GaussianMixture
from schedulers.scheduling_tutorial_dpmpp import TutorialDPMSolverPlusPlusScheduler
from schedulers.scheduling_tutorial_pf_ode import EvaluationBudgetExceeded, TutorialPFODEScheduler, solve_pf_ode
from schedulers.scheduling_tutorial_sde import TutorialScoreSDEScheduler


@pytest.mark.parametrize("snr", [0.0, -0.1, float("nan")])
def test_snr_must_be_positive(snr):
    with pytest.raises(ValueError, match=r"snr=.* must be a finite number > 0"):
        TutorialScoreSDEScheduler(corrector="langevin", snr=snr)


@pytest.mark.parametrize(
    "cls, kwargs, pattern",
    [
        (
            TutorialDPMSolverPlusPlusScheduler,
            {"solver_order": 4},
            r"solver_order=4 is not supported; choose one of \(1, 2, 3\)",
        ),
        (
            TutorialDPMSolverPlusPlusScheduler,
            {"step_placement": "quadratic"},
            r"step_placement='quadratic' is not supported; choose one of \('logsnr', 'karras', 'time_uniform', 'auto'\)",
        ),
        (
            TutorialPFODEScheduler,
            {"solver": "rk45"},
            r"solver='rk45' is not supported; choose one of \('euler', 'heun', 'rk4'\)",
        ),
        (TutorialPFODEScheduler, {"step_placement": "leading"}, r"step_placement='leading' is not supported"),
        (
            TutorialScoreSDEScheduler,
            {"sde_type": "vpsde"},
            r"sde_type='vpsde' is not supported; choose one of \('vp', 'subvp', 've'\)",
        ),
        (TutorialScoreSDEScheduler, {"corrector": "ald"}, r"corrector='ald' is not supported"),
        (TutorialScoreSDEScheduler, {"n_corrector_steps": -1}, r"n_corrector_steps=-1 must be an integer >= 0"),
        (
            TutorialDPMSolverPlusPlusScheduler,
            {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
            r"rescale_betas_zero_snr=True is not supported",
        ),
        (TutorialPFODEScheduler, {"prediction_type": "score"}, r"prediction_type='score' is not supported"),
    ],
)
def test_unknown_choices(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


@pytest.mark.parametrize("rtol, atol", [(0.0, 1e-5), (1e-5, -1.0), (float("inf"), 1e-5)])
def test_tolerances_must_be_positive(rtol, atol):
    p = Problem(GaussianMixture.ring(), batch=4)
    with pytest.raises(ValueError, match=r"(rtol|atol)=.* must be a finite number > 0"):
        solve_pf_ode(p.model, p.ddpm, p.x_T, rtol=rtol, atol=atol)


def test_evaluation_budget_exceeded_says_where_it_got():
    p = Problem(GaussianMixture.ring(), batch=4)
    with pytest.raises(
        EvaluationBudgetExceeded, match=r"reached λ=.*\(t=.*\).* after \d+ model evaluations.*max_evals=40"
    ):
        solve_pf_ode(p.model, p.ddpm, p.x_T, rtol=1e-10, atol=1e-10, max_evals=40)
    with pytest.raises(ValueError, match=r"max_evals=3 must be an integer >= 7"):
        solve_pf_ode(p.model, p.ddpm, p.x_T, max_evals=3)
    with pytest.raises(ValueError, match=r"t_end=-1.0 must lie in \[0, 999\]"):
        solve_pf_ode(p.model, p.ddpm, p.x_T, t_end=-1.0)


def test_grid_and_loop_misuse():
    s = TutorialDPMSolverPlusPlusScheduler()
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"timestep=998.5 is not the next entry of scheduler.timesteps"):
        s.step(x, 998.5, x)  # a fresh scheduler walks the integer grid 999, ..., 0
    with pytest.raises(ValueError, match=r"num_inference_steps=1 must be an integer >= 2"):
        s.set_timesteps(1)
    with pytest.raises(ValueError, match="strictly descending from 999 to 0"):
        s.set_timesteps(timesteps=[999, 500, 600, 0])
    s.set_timesteps(4)
    with pytest.raises(ValueError, match=r"timestep=500.0 is not the next entry of scheduler.timesteps"):
        s.step(x, 500.0, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        s.step(torch.zeros(1, 3), s.timesteps[0], x)
