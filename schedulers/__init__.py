"""The tutorial's math as diffusers schedulers: DDPM, DDIM, score-SDE, probability-flow ODE, DPM-Solver++."""

from . import tutorial_math
from .scheduling_tutorial_ddim import TutorialDDIMScheduler
from .scheduling_tutorial_ddpm import TutorialDDPMScheduler, TutorialSchedulerOutput
from .scheduling_tutorial_dpmpp import TutorialDPMSolverPlusPlusScheduler, tune_timesteps
from .scheduling_tutorial_pf_ode import EvaluationBudgetExceeded, TutorialPFODEScheduler, solve_pf_ode
from .scheduling_tutorial_sde import TutorialScoreSDEScheduler

__all__ = [
    "EvaluationBudgetExceeded",
    "TutorialDDIMScheduler",
    "TutorialDDPMScheduler",
    "TutorialDPMSolverPlusPlusScheduler",
    "TutorialPFODEScheduler",
    "TutorialSchedulerOutput",
    "TutorialScoreSDEScheduler",
    "solve_pf_ode",
    "tune_timesteps",
    "tutorial_math",
]
