"""The probability-flow ODE: fixed-step Euler / Heun / RK4 in the natural variable σ̄.

Song et al., "Score-Based Generative Modeling through SDEs", arXiv:2011.13456, eq. (13): the ODE
dx = [f(t) x - ½ g(t)² ∇ log q_t(x)] dt shares the marginals q_t of the diffusion. For the VP schedule, in the
variables x̄ = x / √ᾱ and σ̄ = √((1-ᾱ)/ᾱ) = e^{-λ} (DDIM eq. (14); Karras et al. 2022, arXiv:2206.00364, eq. (4))
it is simply

    dx̄ / dσ̄ = ε̂(x, t)                                                    (PF-ODE, natural form)

so Euler in σ̄ is deterministic DDIM, Heun in σ̄ is EDM's Algorithm 1, and RK4 is the classical 4-stage method. In λ
with the VP state itself, the same ODE reads dx/dλ = σ² x - σ ε̂ (σ² = 1 - ᾱ), which the adaptive Dormand–Prince
driver of `tutorial_ode.py` integrates (its interval [λ_{T-1}, λ_0] is bounded and the field smooth).

Time: the continuous schedule of `tutorial_continuous.py` (λ linear between integer timesteps, fractional
timesteps fed to the model); the grid runs from t = T-1 to t = 0, and the last model evaluation returns x̂_0.
"""

import math
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from .tutorial_continuous import TutorialContinuousScheduler
from .tutorial_grids import half_log_snr_at, timestep_at
from .tutorial_math import alpha_bar_from_log_snr, check_choice

# The adaptive solver, first defined here, lives in the leaf `tutorial_ode.py`; these names keep their old import path.
from .tutorial_ode import (  # noqa: F401  (re-exported)
    EvaluationBudgetExceeded,
    ODESolution,
    check_tolerances,
    dormand_prince,
    pf_ode_field,
    solve_pf_ode,
)
from .tutorial_scheduler_common import TutorialSchedulerOutput

# Butcher tableaus (nodes c in units of the step, stage matrix a, weights b) of the fixed-step solvers.
PF_ODE_SOLVERS = ("euler", "heun", "rk4")
_TABLEAUS = {
    "euler": ((0.0,), ((),), (1.0,)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),  # EDM Algorithm 1 (trapezoidal rule)
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}
SOLVER_ORDER = {"euler": 1, "heun": 2, "rk4": 4}


class TutorialPFODEScheduler(TutorialContinuousScheduler, SchedulerMixin, ConfigMixin):
    """Fixed-step probability-flow-ODE sampler: Euler (= DDIM, η = 0), Heun (EDM) or RK4, in σ̄ = e^{-λ}.

    `set_timesteps(N)` builds N grid points t_0 = T-1 > ... > t_{N-1} = 0, i.e. N - 1 solver steps. Multi-stage
    methods repeat timesteps in `self.timesteps` (as diffusers' Heun does): a loop makes (N-1)·stages + 1 model
    evaluations, the last one the denoised x̂_0 at t = 0. `order` is the number of stages.

    Args:
        num_train_timesteps (`int`, defaults to 1000): T.
        beta_start (`float`, defaults to 0.0001): β_1 of the linear-type schedules.
        beta_end (`float`, defaults to 0.02): β_T of the linear-type schedules.
        beta_schedule (`str`, defaults to `"linear"`): one of `tutorial_math.BETA_SCHEDULES`.
        trained_betas (`list[float]`, *optional*): explicit β_t, overriding `beta_schedule`.
        prediction_type (`str`, defaults to `"epsilon"`): `epsilon`, `sample` or `v_prediction`.
        solver (`str`, defaults to `"heun"`): `euler`, `heun` or `rk4`.
        step_placement (`str`, defaults to `"karras"`): `logsnr`, `karras` or `time_uniform`.
        rho (`float`, defaults to 7.0): Karras' ρ.
        thresholding (`bool`, defaults to `False`): Imagen's dynamic thresholding of x̂_0.
        dynamic_thresholding_ratio (`float`, defaults to 0.995): its quantile.
        sample_max_value (`float`, defaults to 1.0): its largest threshold.
        timestep_spacing (`str`, defaults to `"linspace"`): accepted for config compatibility; unused.
        steps_offset (`int`, defaults to 0): accepted for config compatibility; unused.
        rescale_betas_zero_snr (`bool`, defaults to `False`): must be False.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        prediction_type: str = "epsilon",
        solver: str = "heun",
        step_placement: str = "karras",
        rho: float = 7.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("solver", solver, PF_ODE_SOLVERS)
        self._init_continuous_schedule()
        self.order = len(_TABLEAUS[solver][0])  # entries of `timesteps` per step, as diffusers' pipelines read it

    def _tabulate_grid(self, grid: torch.Tensor, half_log_snr: torch.Tensor, device) -> None:
        """The stage points between the grid's nodes and the (step, stage) of each entry; N points, N - 1 steps."""
        nodes = torch.tensor(_TABLEAUS[self.config.solver][0], dtype=torch.float64)
        sigma_bar = torch.exp(-half_log_snr)  # σ̄ = e^{-λ}, the natural variable
        # Stage s of step i sits at σ̄_i + c_s (σ̄_{i+1} - σ̄_i); the model is fed the timestep of that λ, and the
        # λ used is exactly the one that timestep has (the round trip t(λ) -> λ(t)). Nodes 0 and 1 are grid points.
        half_log_snr_stage = -torch.log(sigma_bar[:-1, None] + nodes * (sigma_bar[1:, None] - sigma_bar[:-1, None]))
        t_stage = timestep_at(half_log_snr_stage, self.half_log_snr)
        half_log_snr_stage = half_log_snr_at(t_stage, self.half_log_snr)
        for c, column in ((0.0, slice(None, -1)), (1.0, slice(1, None))):
            t_stage[:, nodes == c] = grid[column, None]
            half_log_snr_stage[:, nodes == c] = half_log_snr[column, None]
        # Entry j of the loop is stage j % S of step j // S; the last entry is the final denoising at t = 0.
        entry_t = torch.cat([t_stage.flatten(), grid.new_zeros(1)])
        entry_half_log_snr = torch.cat([half_log_snr_stage.flatten(), half_log_snr[-1:]])
        stages = nodes.numel()
        # ---- the one block of mutable state ----------------------------------------------------------------------
        self._use_entries(entry_t, list(range(0, entry_t.numel(), stages)), int(grid.numel()), device)
        self._entry_alpha_bar = alpha_bar_from_log_snr(2 * entry_half_log_snr).tolist()
        self._grid_sigma_bar = sigma_bar.tolist()
        self._grid_sqrt_alpha_bar = alpha_bar_from_log_snr(2 * half_log_snr).sqrt().tolist()
        self._slopes: List[torch.Tensor] = []
        self._xbar_start: Optional[torch.Tensor] = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[TutorialSchedulerOutput, Tuple]:
        """One stage of the Runge–Kutta step on dx̄/dσ̄ = ε̂; `prev_sample` is x at the next entry's timestep.

        Args:
            model_output (`torch.Tensor`): the network's output at (sample, timestep).
            timestep (`float`): the next entry of `self.timesteps`.
            sample (`torch.Tensor`): x at that timestep (the previous call's `prev_sample`).
            return_dict (`bool`, defaults to `True`): return a `TutorialSchedulerOutput` rather than a tuple.

        Returns:
            `TutorialSchedulerOutput` or `(prev_sample, pred_original_sample)`.
        """
        j, _ = self._walk(timestep)
        i, s = divmod(j, self.order)
        x0, eps = self._x0_eps(model_output, sample, self._entry_alpha_bar[j])
        if j == len(self._entry_alpha_bar) - 1:  # t = 0: Tweedie's x̂_0
            return (x0, x0) if not return_dict else TutorialSchedulerOutput(prev_sample=x0, pred_original_sample=x0)
        nodes, a, b = _TABLEAUS[self.config.solver]
        if s == 0:
            self._xbar_start = sample / self._grid_sqrt_alpha_bar[i]  # x̄_i = x_i / √ᾱ_i
            self._slopes = []
        self._slopes.append(eps)  # k_s = dx̄/dσ̄ = ε̂ (natural form of the PF-ODE)
        delta = self._grid_sigma_bar[i + 1] - self._grid_sigma_bar[i]
        if s + 1 < len(nodes):  # move to the next stage's point: x̄_i + Δ Σ_j a_{s+1,j} k_j
            weights, sqrt_alpha_bar_next = a[s + 1], math.sqrt(self._entry_alpha_bar[j + 1])
        else:  # complete the step: x̄_{i+1} = x̄_i + Δ Σ_j b_j k_j
            weights, sqrt_alpha_bar_next = b, self._grid_sqrt_alpha_bar[i + 1]
        xbar = self._xbar_start
        for w, k in zip(weights, self._slopes):
            if w != 0.0:
                xbar = xbar + (delta * w) * k
        prev_sample = sqrt_alpha_bar_next * xbar
        if not return_dict:
            return prev_sample, x0
        return TutorialSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
