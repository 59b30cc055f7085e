"""The tutorial's math as diffusers schedulers: DDPM, DDIM, score-SDE, probability-flow ODE, DPM-Solver++.

Side by side, never stacked: each `scheduling_tutorial_*.py` file is one sampler and imports only its base module
(`tutorial_discrete_base.py` or `tutorial_continuous.py`), the math (`tutorial_math.py`, and `tutorial_grids.py` for
timestep grids) and leaf helpers (`tutorial_scheduler_common.py`, `tutorial_ode.py`), each as `from .name import ...`:
diffusers' remote-code loader copies exactly the siblings the named file imports in that form, one level deep, so a
shipped scheduler file names every file it needs. `tests/test_layering.py` and
`tests/pipelines/test_pipeline_saving_loading.py` check both.
"""

from . import tutorial_grids, tutorial_math
from .scheduling_tutorial_ddim import TutorialDDIMScheduler
from .scheduling_tutorial_ddpm import TutorialDDPMScheduler
from .scheduling_tutorial_distilled import TutorialDistilledScheduler
from .scheduling_tutorial_dpmpp import TutorialDPMSolverPlusPlusScheduler
from .scheduling_tutorial_pf_ode import TutorialPFODEScheduler
from .scheduling_tutorial_sde import TutorialScoreSDEScheduler
from .tutorial_ode import EvaluationBudgetExceeded, solve_pf_ode, tune_timesteps
from .tutorial_scheduler_common import TutorialSchedulerOutput

__all__ = [
    "EvaluationBudgetExceeded",
    "TutorialDDIMScheduler",
    "TutorialDDPMScheduler",
    "TutorialDPMSolverPlusPlusScheduler",
    "TutorialDistilledScheduler",
    "TutorialPFODEScheduler",
    "TutorialSchedulerOutput",
    "TutorialScoreSDEScheduler",
    "solve_pf_ode",
    "tune_timesteps",
    "tutorial_grids",
    "tutorial_math",
]
