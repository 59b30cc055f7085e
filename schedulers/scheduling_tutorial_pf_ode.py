"""The probability-flow ODE: fixed-step Euler / Heun / RK4 in the natural variable σ̄, and an adaptive RK45 driver.

Song et al., "Score-Based Generative Modeling through SDEs", arXiv:2011.13456, eq. (13): the ODE
dx = [f(t) x - ½ g(t)² ∇ log q_t(x)] dt shares the marginals q_t of the diffusion. For the VP schedule, in the
variables x̄ = x / √ᾱ and σ̄ = √((1-ᾱ)/ᾱ) = e^{-λ} (DDIM eq. (14); Karras et al. 2022, arXiv:2206.00364, eq. (4))
it is simply

    dx̄ / dσ̄ = ε̂(x, t)                                                    (PF-ODE, natural form)

so Euler in σ̄ is deterministic DDIM, Heun in σ̄ is EDM's Algorithm 1, and RK4 is the classical 4-stage method. In λ
with the VP state itself, the same ODE reads dx/dλ = σ² x - σ ε̂ (σ² = 1 - ᾱ), which the adaptive driver integrates
(its interval [λ_{T-1}, λ_0] is bounded and the field smooth).

Time: the continuous schedule of `tutorial_continuous.py` (λ linear between integer timesteps, fractional
timesteps fed to the model); the grid runs from t = T-1 to t = 0, and the last model evaluation returns x̂_0.
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from . import tutorial_math as tm
from .scheduling_tutorial_ddpm import TutorialSchedulerOutput
from .tutorial_continuous import TutorialContinuousScheduler

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
        tm.check_choice("solver", solver, PF_ODE_SOLVERS)
        tm.check_choice("step_placement", step_placement, tm.STEP_PLACEMENTS)
        if not rho > 0:
            raise ValueError(f"rho={rho!r} must be > 0.")
        self._init_continuous_schedule()
        self.order = len(_TABLEAUS[solver][0])  # entries of `timesteps` per step, as diffusers' pipelines read it

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[float]] = None,
    ) -> None:
        """Build the grid, the stage points between its nodes and the (step, stage) of every entry, once.

        Args:
            num_inference_steps (`int`, *optional*): N ≥ 2 grid points (N - 1 steps).
            device (`str` or `torch.device`, *optional*): where `self.timesteps` lives.
            timesteps (`list[float]`, *optional*): a custom grid, strictly descending from T-1 to 0.
        """
        grid, lam = self._grid_from(num_inference_steps, timesteps, self.config.rho)
        nodes = torch.tensor(_TABLEAUS[self.config.solver][0], dtype=torch.float64)
        sigma_bar = torch.exp(-lam)  # σ̄ = e^{-λ}, the natural variable
        # Stage s of step i sits at σ̄_i + c_s (σ̄_{i+1} - σ̄_i); the model is fed the timestep of that λ, and the
        # λ used is exactly the one that timestep has (the round trip t(λ) -> λ(t)). Nodes 0 and 1 are grid points.
        lam_stage = -torch.log(sigma_bar[:-1, None] + nodes * (sigma_bar[1:, None] - sigma_bar[:-1, None]))
        t_stage = tm.timestep_at(lam_stage, self.half_log_snr)
        lam_stage = tm.half_log_snr_at(t_stage, self.half_log_snr)
        for c, column in ((0.0, slice(None, -1)), (1.0, slice(1, None))):
            t_stage[:, nodes == c] = grid[column, None]
            lam_stage[:, nodes == c] = lam[column, None]
        # Entry j of the loop is stage j % S of step j // S; the last entry is the final denoising at t = 0.
        entry_t = torch.cat([t_stage.flatten(), grid.new_zeros(1)])
        entry_lam = torch.cat([lam_stage.flatten(), lam[-1:]])
        stages = nodes.numel()
        # ---- the one block of mutable state ----------------------------------------------------------------------
        self._use_entries(entry_t, list(range(0, entry_t.numel(), stages)), int(grid.numel()), device)
        self._entry_alpha_bar = torch.sigmoid(2 * entry_lam).tolist()
        self._grid_sigma_bar = sigma_bar.tolist()
        self._grid_alpha = torch.sigmoid(2 * lam).sqrt().tolist()
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
            self._xbar_start = sample / self._grid_alpha[i]  # x̄_i = x_i / √ᾱ_i
            self._slopes = []
        self._slopes.append(eps)  # k_s = dx̄/dσ̄ = ε̂ (natural form of the PF-ODE)
        delta = self._grid_sigma_bar[i + 1] - self._grid_sigma_bar[i]
        if s + 1 < len(nodes):  # move to the next stage's point: x̄_i + Δ Σ_j a_{s+1,j} k_j
            weights, alpha_next = a[s + 1], math.sqrt(self._entry_alpha_bar[j + 1])
        else:  # complete the step: x̄_{i+1} = x̄_i + Δ Σ_j b_j k_j
            weights, alpha_next = b, self._grid_alpha[i + 1]
        xbar = self._xbar_start
        for w, k in zip(weights, self._slopes):
            if w != 0.0:
                xbar = xbar + (delta * w) * k
        prev_sample = alpha_next * xbar
        if not return_dict:
            return prev_sample, x0
        return TutorialSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


# ----------------------------------------------------------------------------------------------------------------
# Adaptive driver: Dormand–Prince 5(4) with error control
# ----------------------------------------------------------------------------------------------------------------
class EvaluationBudgetExceeded(RuntimeError):
    """The adaptive solver needed more model evaluations than `max_evals` allowed."""


@dataclass
class ODESolution:
    """What the adaptive driver returns.

    Args:
        sample (`torch.Tensor`): the state at the end of the interval (x̂_0 when `denoise=True`).
        num_evals (`int`): model evaluations used, rejected steps and the final denoising included.
        num_steps (`int`): accepted steps.
        num_rejected (`int`): rejected steps.
    """

    sample: torch.Tensor
    num_evals: int
    num_steps: int
    num_rejected: int


# Dormand & Prince (1980), RK5(4)7FM: nodes, stage matrix, 5th-order weights and (5th - 4th)-order error weights.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = _DP_A[6] + (0.0,)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B, _DP_B4))


def check_tolerances(rtol: float, atol: float, max_evals: int) -> None:
    """Validate the adaptive solver's settings at the door."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name}={value!r} must be a finite number > 0.")
    if not isinstance(max_evals, int) or isinstance(max_evals, bool) or max_evals < 7:
        raise ValueError(f"max_evals={max_evals!r} must be an integer >= 7 (one Dormand–Prince step).")


def dormand_prince(
    func: Callable[[float, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    s0: float,
    s1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_evals: int = 10000,
    describe: Callable[[float], str] = lambda s: f"s={s:.6g}",
) -> ODESolution:
    """Integrate dy/ds = func(s, y) from s0 to s1 with the adaptive Dormand–Prince 5(4) pair (FSAL, local extrapolation).

    The error of a step is the RMS over each sample's entries of e / (atol + rtol max(|y|, |y_new|)), maximised over
    the batch (first axis); a step is accepted when it is ≤ 1, and h ← h · clip(0.9 err^{-1/5}, 0.2, 5).

    Args:
        func (`Callable`): the vector field; each call is one model evaluation.
        y0 (`torch.Tensor`): the initial state, shape (B, ...).
        s0, s1 (`float`): the interval (either direction).
        rtol, atol (`float`): tolerances, > 0.
        max_evals (`int`): evaluation budget; exceeding it raises `EvaluationBudgetExceeded`.
        describe (`Callable`): formats a position for the error message (e.g. also as a timestep).

    Returns:
        `ODESolution` with `sample` = y(s1).
    """
    check_tolerances(rtol, atol, max_evals)
    direction = 1.0 if s1 >= s0 else -1.0
    span = abs(s1 - s0)
    s, y = float(s0), y0
    k1 = func(s, y)
    nfe, steps, rejected = 1, 0, 0
    scale0 = atol + rtol * y.abs()
    d0 = float((y / scale0).pow(2).mean().sqrt())
    d1 = float((k1 / scale0).pow(2).mean().sqrt())
    h = min(span, 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-3 * span)
    while direction * (s1 - s) > 1e-12 * max(1.0, span):
        h = min(h, abs(s1 - s))
        if nfe + 6 > max_evals:
            raise EvaluationBudgetExceeded(
                f"the adaptive solver reached {describe(s)} of the interval [{describe(s0)}, {describe(s1)}] after "
                f"{nfe} model evaluations ({steps} accepted, {rejected} rejected steps, last step size {h:.3g}); "
                f"max_evals={max_evals} is exhausted. Raise max_evals or loosen rtol={rtol:g} / atol={atol:g}."
            )
        hs = direction * h
        ks = [k1]
        for c, row in zip(_DP_C[1:], _DP_A[1:]):
            y_stage = y
            for w, k in zip(row, ks):
                if w != 0.0:
                    y_stage = y_stage + (hs * w) * k
            ks.append(func(s + c * hs, y_stage))
        nfe += 6
        y_new = y_stage  # the last stage is evaluated at the 5th-order solution (FSAL)
        err = sum((hs * w) * k for w, k in zip(_DP_E, ks) if w != 0.0)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = float((err / scale).pow(2).reshape(err.shape[0], -1).mean(1).sqrt().max())
        if err_norm <= 1.0:
            s, y, k1 = s + hs, y_new, ks[-1]
            steps += 1
        else:
            rejected += 1
        h = h * min(5.0, max(0.2, 0.9 * (err_norm + 1e-16) ** -0.2))
    return ODESolution(sample=y, num_evals=nfe, num_steps=steps, num_rejected=rejected)


def pf_ode_field(model: Callable, scheduler) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """The PF-ODE in λ for a VP model: dx/dλ = σ(λ)² x - σ(λ) ε̂(x, t(λ)), σ² = 1 - ᾱ = sigmoid(-2λ).

    Args:
        model (`Callable`): `model(x_t, t) -> output` with t a 0-d float64 tensor (possibly fractional).
        scheduler: any scheduler of ours with `alpha_bar` and `config.prediction_type`.
    """
    lam_table = tm.half_log_snr(scheduler.alpha_bar)
    prediction_type = scheduler.config.prediction_type

    def field(lam: float, x: torch.Tensor) -> torch.Tensor:
        t = tm.timestep_at(torch.tensor(lam, dtype=torch.float64), lam_table)
        alpha_bar = 1.0 / (1.0 + math.exp(-2 * lam))
        _, eps = tm.model_output_to_x0_eps(model(x, t), x, alpha_bar, prediction_type)
        sigma2 = 1.0 - alpha_bar
        return sigma2 * x - math.sqrt(sigma2) * eps

    return field


def solve_pf_ode(
    model: Callable,
    scheduler,
    sample: torch.Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_evals: int = 10000,
    t_start: Optional[float] = None,
    t_end: float = 0.0,
    denoise: bool = True,
) -> ODESolution:
    """Solve the probability-flow ODE from t_start to t_end adaptively (reference-quality sampling or encoding).

    Args:
        model (`Callable`): `model(x_t, t)`, the network (ε-, x_0- or v-prediction as `scheduler.config` says).
        scheduler: a scheduler of ours (its `alpha_bar` table and `prediction_type` define the ODE).
        sample (`torch.Tensor`): x at t_start (e.g. `randn` for sampling).
        rtol, atol (`float`): tolerances of the Dormand–Prince error control, > 0.
        max_evals (`int`): evaluation budget; exceeding it raises `EvaluationBudgetExceeded` saying where it got.
        t_start (`float`, *optional*): defaults to T-1. Either direction is allowed (t_end > t_start encodes).
        t_end (`float`, defaults to 0.0): where to stop.
        denoise (`bool`, defaults to `True`): finish with one more evaluation returning x̂_0 at t_end.

    Returns:
        `ODESolution` (`num_evals` counts every model evaluation).
    """
    T = scheduler.config.num_train_timesteps
    t_start = float(T - 1 if t_start is None else t_start)
    for name, value in (("t_start", t_start), ("t_end", float(t_end))):
        if not 0 <= value <= T - 1:
            raise ValueError(f"{name}={value!r} must lie in [0, {T - 1}] (the model's timesteps).")
    lam_table = tm.half_log_snr(scheduler.alpha_bar)
    lam0 = float(tm.half_log_snr_at(t_start, lam_table))
    lam1 = float(tm.half_log_snr_at(float(t_end), lam_table))

    def describe(lam: float) -> str:
        return f"λ={lam:.4g} (t={float(tm.timestep_at(torch.tensor(lam, dtype=torch.float64), lam_table)):.4g})"

    solution = dormand_prince(pf_ode_field(model, scheduler), sample, lam0, lam1, rtol, atol, max_evals, describe)
    if denoise:
        alpha_bar = 1.0 / (1.0 + math.exp(-2 * lam1))
        t = torch.tensor(float(t_end), dtype=torch.float64)
        solution.sample = tm.model_output_to_x0(
            model(solution.sample, t), solution.sample, alpha_bar, scheduler.config.prediction_type
        )
        solution.num_evals += 1
    return solution
