"""The probability-flow ODE solved adaptively: the reference every fast sampler is measured against.

Song et al., "Score-Based Generative Modeling through SDEs", arXiv:2011.13456, eq. (13), integrated in λ = ½ log SNR
(dx/dλ = σ² x - σ ε̂, σ² = 1 - ᾱ) with the Dormand–Prince 5(4) pair (Dormand & Prince 1980) and error control;
and `tune_timesteps`, which places a sampler's grid by the distance of its output to that reference.

A leaf beside the samplers: it imports only `tutorial_math.py` and `tutorial_grids.py`. The samplers
(`scheduling_tutorial_pf_ode.py`, `scheduling_tutorial_dpmpp.py`) do not need it to step; they re-export its names
where they were first defined, and the likelihoods (`tutorial_likelihood.py`) reuse `pf_ode_field` and
`dormand_prince`.
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .tutorial_grids import half_log_snr_at, timestep_at
from .tutorial_math import (
    alpha_bar_from_log_snr,
    check_int,
    half_log_snr,
    model_output_to_x0,
    model_output_to_x0_eps,
)


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
    check_int("max_evals", max_evals, minimum=7, reason="one Dormand–Prince step")


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


def describe_position(half_log_snr_table: torch.Tensor) -> Callable[[float], str]:
    """Formats a position λ of the adaptive solver for its error messages, with the model's timestep t(λ)."""

    def describe(half_log_snr: float) -> str:
        t = float(timestep_at(torch.tensor(half_log_snr, dtype=torch.float64), half_log_snr_table))
        return f"λ={half_log_snr:.4g} (t={t:.4g})"

    return describe


def pf_ode_field(
    model: Callable, alpha_bar: torch.Tensor, prediction_type: str, return_eps: bool = False
) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """The PF-ODE in λ for a VP model: dx/dλ = σ(λ)² x - σ(λ) ε̂(x, t(λ)), σ² = 1 - ᾱ = sigmoid(-2λ).

    Args:
        model (`Callable`): `model(x_t, t) -> output` with t a 0-d float64 tensor (possibly fractional).
        alpha_bar (`torch.Tensor`): the model's ᾱ table (float64), which defines t(λ).
        prediction_type (`str`): what the model predicts, one of `tutorial_math.PREDICTION_TYPES`.
        return_eps (`bool`, defaults to `False`): the field returns `(dx/dλ, ε̂)`, for callers that differentiate ε̂
            (the likelihood's divergence).

    Returns:
        `Callable`: `field(half_log_snr, x)`, the drift dx/dλ (and ε̂ when `return_eps`).
    """
    half_log_snr_table = half_log_snr(alpha_bar)

    def field(half_log_snr: float, x: torch.Tensor) -> torch.Tensor:
        t = timestep_at(torch.tensor(half_log_snr, dtype=torch.float64), half_log_snr_table)
        alpha_bar_t = alpha_bar_from_log_snr(2 * half_log_snr)
        _, eps = model_output_to_x0_eps(model(x, t), x, alpha_bar_t, prediction_type)
        sigma2 = 1.0 - alpha_bar_t
        drift = sigma2 * x - math.sqrt(sigma2) * eps
        return (drift, eps) if return_eps else drift

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
    half_log_snr_table = half_log_snr(scheduler.alpha_bar)
    start = float(half_log_snr_at(t_start, half_log_snr_table))
    end = float(half_log_snr_at(float(t_end), half_log_snr_table))
    field = pf_ode_field(model, scheduler.alpha_bar, scheduler.config.prediction_type)
    describe = describe_position(half_log_snr_table)
    solution = dormand_prince(field, sample, start, end, rtol, atol, max_evals, describe)
    if denoise:
        alpha_bar = alpha_bar_from_log_snr(2 * end)
        t = torch.tensor(float(t_end), dtype=torch.float64)
        solution.sample = model_output_to_x0(
            model(solution.sample, t), solution.sample, alpha_bar, scheduler.config.prediction_type
        )
        solution.num_evals += 1
    return solution


# ----------------------------------------------------------------------------------------------------------------
# A sampler's grid tuned against that reference
# ----------------------------------------------------------------------------------------------------------------
def tune_timesteps(
    scheduler,
    model,
    calibration_noise: torch.Tensor,
    num_inference_steps: int,
    sweeps: int = 12,
    initial_step: float = 0.5,
    reference: Optional[torch.Tensor] = None,
    reference_tol: float = 1e-8,
) -> List[float]:
    """A tuned grid for `num_inference_steps` evaluations: minimise the distance to the exact PF-ODE sample.

    In the spirit of "Align Your Steps" (Sabour et al. 2024, arXiv:2404.14507), but with the most direct objective:
    the RMS distance, on a few calibration draws of x_{T-1}, between the sampler's output and the reference solution
    of the same ODE (the adaptive solver at `reference_tol`). The N - 1 λ-increments of the grid are the softmax of
    free parameters (so the grid stays ordered and keeps its endpoints); a compass search (each coordinate ±step,
    step halved when no move helps) starts from the scheduler's own placement. Pass the result to
    `set_timesteps(timesteps=...)` of a scheduler with the same config; evaluate on noise other than the calibration
    noise.

    Args:
        scheduler: the scheduler to tune (its config: order, prediction type, schedule).
        model (`Callable`): `model(x_t, t)`.
        calibration_noise (`torch.Tensor`): x_{T-1} draws, shape (B, ...).
        num_inference_steps (`int`): N ≥ 3.
        sweeps (`int`, defaults to 12): passes over the coordinates.
        initial_step (`float`, defaults to 0.5): initial change of a parameter (log-increment scale).
        reference (`torch.Tensor`, *optional*): the exact samples for `calibration_noise`, if already known.
        reference_tol (`float`, defaults to 1e-8): rtol = atol of the reference solve.

    Returns:
        `list[float]`: the tuned descending timesteps, T-1 first, 0 last.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 3:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 3 to tune.")
    if reference is None:
        reference = solve_pf_ode(model, scheduler, calibration_noise, reference_tol, reference_tol, 10**6).sample
    half_log_snr_table = scheduler.half_log_snr
    half_log_snr_min, half_log_snr_max = float(half_log_snr_table[-1]), float(half_log_snr_table[0])
    scheduler.set_timesteps(num_inference_steps)
    start = torch.tensor(scheduler._half_log_snr if hasattr(scheduler, "_half_log_snr") else [], dtype=torch.float64)
    if start.numel() != num_inference_steps:  # schedulers with stage points: start from the λ-uniform grid
        start = torch.linspace(half_log_snr_min, half_log_snr_max, num_inference_steps, dtype=torch.float64)
    theta = torch.log(start.diff())

    def grid_of(theta: torch.Tensor) -> List[float]:
        fractions = torch.cat([theta.new_zeros(1), torch.cumsum(torch.softmax(theta, 0), 0)])
        half_log_snr = half_log_snr_min + fractions * (half_log_snr_max - half_log_snr_min)
        t = timestep_at(half_log_snr.clamp(half_log_snr_min, half_log_snr_max), half_log_snr_table)
        t[0], t[-1] = half_log_snr_table.numel() - 1, 0.0
        return t.tolist()

    def loss(theta: torch.Tensor) -> float:
        grid = grid_of(theta)
        if any(b >= a for a, b in zip(grid, grid[1:])):
            return math.inf
        scheduler.set_timesteps(timesteps=grid)
        x = calibration_noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        value = float((x - reference).pow(2).mean().sqrt())
        return value if math.isfinite(value) else math.inf

    best, step = loss(theta), initial_step
    for _ in range(sweeps):
        improved = False
        for k in range(theta.numel()):
            for sign in (1.0, -1.0):
                trial = theta.clone()
                trial[k] += sign * step
                value = loss(trial)
                if value < best:
                    best, theta, improved = value, trial, True
                    break
        if not improved:
            step /= 2
    return grid_of(theta)
