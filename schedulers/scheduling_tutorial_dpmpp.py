"""DPM-Solver++ multistep: an exponential integrator of the probability-flow ODE in λ = ½ log SNR, orders 1-3.

Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095
(and DPM-Solver, arXiv:2206.00927). With DPM-Solver's α = √ᾱ (our `sqrt_alpha_bar`), σ = √(1-ᾱ) and the data
prediction x̂_0(x, λ), the PF-ODE has the exact solution (DPM-Solver++ eq. (9))

    x_t = (σ_t / σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^{λ} x̂_0(x_λ, λ) dλ.

Expanding x̂_0 in a Taylor series in λ around λ_s (step h = λ_t - λ_s) and integrating each power exactly gives

    x_t = (σ_t/σ_s) x_s + α_t [ φ_1 x̂_0 + (h - φ_1) x̂_0' + (h²/2 - h + φ_1) x̂_0'' ],   φ_1 = 1 - e^{-h},

and the multistep method of order k estimates the derivatives x̂_0', x̂_0'' by divided differences of the last k
data predictions (the "taylor" form of the multistep updates; DPM-Solver++(2M) uses the same first difference).
Order 1 is DDIM. The first steps use the order the history allows (1, then 2).

Time: this module's continuous schedule (see `tutorial_continuous.py`): λ linear between integer timesteps, the
model fed fractional timesteps; the grid runs from t = T-1 to t = 0 and the last entry (t = 0) returns x̂_0.

Few steps (N < `FEW_STEPS` evaluations, `few_step_interior=True`): on a trained network both end points of that
grid waste an evaluation. At t = T-1 the network's prediction is at its worst and the first step is the largest; at
t = 0 the evaluation only returns x̂_0 ≈ x_0. So the N evaluations go to the N interior points of the placement's
N + 2-point grid: the loop starts from x ~ N(0, I) at the first of them (ᾱ there is ~1e-4, the same approximation
as diffusers' "leading" spacing), and the last update is the first-order step to σ = 0, which returns x̂_0 of the
last evaluation (diffusers' `final_sigmas_type="zero"` with `lower_order_final`). Measured on the shipped digits
network in notebook 09 and `benchmarks/bench_samplers.py`. From `FEW_STEPS` on, the end points come back, so the
convergence order on an exact model is untouched.

Corrector (`use_corrector`): after each update the next evaluation, at the predicted x_{t_{i+1}}, is spent twice, as
UniPC's UniC does (Zhao et al. 2023, arXiv:2302.04867, Sec. 3.2): it is the predictor's next data prediction, and it
is the newest point of the interpolating polynomial of a corrector that redoes the update t_i -> t_{i+1} with the
same φ-integrals, now through x̂_0 at t_{i+1}, t_i and t_{i-1} (a quadratic: one order more than 2M). The next update
starts from the corrected sample. No extra model evaluation; the last x̂_0 is taken at the corrected sample with
the last evaluation's ε.

Placement (`step_placement="auto"`, the default) depends on the number N of evaluations, measured on both an exact
model (the Gaussian mixtures) and the shipped digits network (`benchmarks/bench_samplers.py`, `benchmarks/RESULTS.md`):

- N < `CORRECTED_STEPS` (10): the interior of Karras et al. 2022's eq. (5) grid (ρ = 7), no corrector: the best
  few-step choice on trained networks;
- `CORRECTED_STEPS` ≤ N < `FEW_STEPS` (15): the interior of a Karras grid with ρ = `AUTO_MID_RHO` (15) that starts
  at λ ≥ `AUTO_MID_START` (-4: σ/α ≈ 55), with the corrector;
- N ≥ `FEW_STEPS`: both end points, the first step from t = T-1 straight to λ = `AUTO_FULL_START` (-4.25:
  σ/α ≈ 70) when the schedule starts below it, then uniform in λ, with the corrector.

Where σ/α is large, x̂_0 is close to the data mean whatever x is, the exponential integrator is nearly exact, and
one step covers that stretch (cosine schedules start at λ ≈ -10, so a λ-uniform grid spends a third of its steps
there). The jump must not reach far, though: an ε-predicting network's x̂_0 = (x - σ ε̂)/α at the first point carries
its ε error times σ/α, and the step to λ' weighs that x̂_0 by α'(1 - e^{-(λ'-λ)}), so the error reaches x_{λ'} about
e^{λ'-λ} - 1 times over. An exact model has no such error (on the mixtures a jump to -3.5 is slightly better); the
shipped digits network does: at 20 evaluations its distance to its own PF-ODE solution is 0.044 with the jump to
-3.5, 0.0126 with -4.25 (diffusers' best 0.021). These constants were chosen by a scan on the benchmark's four
mixture problems and the digits network, so they are fitted to them; the other placements are the plain
DPM-Solver++ unless `use_corrector=True`.
"""

import math
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from .tutorial_continuous import TutorialContinuousScheduler
from .tutorial_grids import karras_half_log_snrs, timestep_at
from .tutorial_math import alpha_bar_from_log_snr, check_choice, dynamic_threshold

# `tune_timesteps`, first defined here, lives in the leaf `tutorial_ode.py`; it keeps its old import path.
from .tutorial_ode import tune_timesteps  # noqa: F401  (re-exported)
from .tutorial_scheduler_common import TutorialSchedulerOutput

SOLVER_ORDERS = (1, 2, 3)
FEW_STEPS = 15  # below this many evaluations the grid keeps only its interior points (module docstring)
# `step_placement="auto"` (module docstring): the corrector from this many evaluations on, and the grids' constants.
CORRECTED_STEPS = 10
AUTO_FEW_RHO = 7.0  # Karras' ρ of the interior grid below CORRECTED_STEPS
AUTO_MID_RHO, AUTO_MID_START = 15.0, -4.0  # CORRECTED_STEPS <= N < FEW_STEPS: Karras' ρ, and the first λ
AUTO_FULL_START = -4.25  # N >= FEW_STEPS: the λ the first step goes to, then uniform in λ


class TutorialDPMSolverPlusPlusScheduler(TutorialContinuousScheduler, SchedulerMixin, ConfigMixin):
    """DPM-Solver++ multistep sampler (Lu et al. 2022b, Alg. 2 generalised to order 3), deterministic.

    `set_timesteps(N)` builds N grid points from t = T-1 to t = 0; a sampling loop makes N model evaluations: N - 1
    multistep updates and, at t = 0, the final denoised x̂_0. With N < `FEW_STEPS` (and `few_step_interior`) the N
    points are the interior of the placement's N + 2-point grid and the last evaluation returns x̂_0 (module
    docstring). Config keys shared with DDPM/DDIM keep diffusers' names
    and meanings, so `TutorialDPMSolverPlusPlusScheduler.from_config(ddpm.config)` works.

    Args:
        num_train_timesteps (`int`, defaults to 1000): T.
        beta_start (`float`, defaults to 0.0001): β_1 of the linear-type schedules.
        beta_end (`float`, defaults to 0.02): β_T of the linear-type schedules.
        beta_schedule (`str`, defaults to `"linear"`): one of `tutorial_math.BETA_SCHEDULES`.
        trained_betas (`list[float]`, *optional*): explicit β_t, overriding `beta_schedule`.
        prediction_type (`str`, defaults to `"epsilon"`): `epsilon`, `sample` or `v_prediction`.
        solver_order (`int`, defaults to 2): 1 (DDIM), 2 (DPM-Solver++(2M)) or 3 (3M).
        step_placement (`str`, defaults to `"auto"`): `logsnr` (uniform in λ), `karras` (Karras et al. 2022
            eq. (5), exponent `rho`), `time_uniform` (uniform in t) or `auto`: `karras` for the few-step interior
            grid (the best few-step choice measured on trained networks), `logsnr` for every grid with both end
            points (the most accurate on the exact PF-ODE; `benchmarks/RESULTS.md`). A tuned grid can be passed to
            `set_timesteps(timesteps=...)`.
        rho (`float`, defaults to 7.0): Karras' ρ.
        thresholding (`bool`, defaults to `False`): Imagen's dynamic thresholding of x̂_0.
        dynamic_thresholding_ratio (`float`, defaults to 0.995): its quantile.
        sample_max_value (`float`, defaults to 1.0): its largest threshold.
        timestep_spacing (`str`, defaults to `"linspace"`): accepted for config compatibility; the grid is set by
            `step_placement`.
        steps_offset (`int`, defaults to 0): accepted for config compatibility; unused.
        rescale_betas_zero_snr (`bool`, defaults to `False`): must be False (λ_{T-1} = -∞ has no finite ODE interval).
        few_step_interior (`bool`, defaults to `True`): below `FEW_STEPS` evaluations, evaluate only the interior
            points of the grid and end with the step to σ = 0 (module docstring).
        use_corrector (`bool`, *optional*): the UniC-style corrector (module docstring). `None` (the default): on
            with `step_placement="auto"` on every grid of `CORRECTED_STEPS` evaluations or more, off otherwise.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        prediction_type: str = "epsilon",
        solver_order: int = 2,
        step_placement: str = "auto",
        rho: float = 7.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        few_step_interior: bool = True,
        use_corrector: Optional[bool] = None,
    ):
        check_choice("solver_order", solver_order, SOLVER_ORDERS)
        check_choice("use_corrector", use_corrector, (None, True, False))
        self._init_continuous_schedule()

    def _grid_from(self, num_inference_steps, timesteps):
        """The placement's grid, or below `FEW_STEPS` evaluations (with `few_step_interior`) its N + 2-point grid's
        interior: N points = N model evaluations; `auto` depends on N (module docstring)."""
        grid, half_log_snr = super()._grid_from(num_inference_steps, timesteps)  # validated at the door
        n = grid.numel()
        if timesteps is not None:
            return grid, half_log_snr
        auto, interior = self.config.step_placement == "auto", self.config.few_step_interior and n < FEW_STEPS
        if auto:
            lowest, highest = float(self.half_log_snr[-1]), float(self.half_log_snr[0])
            if interior and n < CORRECTED_STEPS:
                half_log_snr = karras_half_log_snrs(n + 2, lowest, highest, AUTO_FEW_RHO)
            elif interior:
                half_log_snr = _with_first_jump(n + 2, lowest, highest, AUTO_MID_START, AUTO_MID_RHO)
            else:
                half_log_snr = _with_first_jump(n, lowest, highest, AUTO_FULL_START, None)
            grid = timestep_at(half_log_snr, self.half_log_snr)
            grid[0], grid[-1] = self.config.num_train_timesteps - 1, 0.0
        elif interior:
            grid, half_log_snr = super()._grid_from(n + 2, None)
        if interior:
            grid, half_log_snr = grid[1:-1].clone(), half_log_snr[1:-1].clone()
        return grid, half_log_snr

    def _corrects(self) -> bool:
        """Whether `step` runs the corrector on the current grid (`use_corrector`, or `auto`'s rule)."""
        if self.config.use_corrector is not None:
            return self.config.use_corrector
        return self.config.step_placement == "auto" and len(self._half_log_snr) >= CORRECTED_STEPS

    def _tabulate_grid(self, grid: torch.Tensor, half_log_snr: torch.Tensor, device) -> None:
        """The λ, α, σ values of every grid point t_0 > ... > t_{N-1}, each a model evaluation and a possible start."""
        alpha_bar = alpha_bar_from_log_snr(2 * half_log_snr)
        # ---- the one block of mutable state ----------------------------------------------------------------------
        self._use_entries(grid, list(range(grid.numel())), int(grid.numel()), device)  # every grid point may start
        self._half_log_snr = half_log_snr.tolist()
        self._sqrt_alpha_bar = alpha_bar.sqrt().tolist()
        self._sigma = (1 - alpha_bar).sqrt().tolist()
        self._alpha_bar = alpha_bar.tolist()
        self._history: List[Tuple[float, torch.Tensor]] = []
        self._last_update: Optional[Tuple[int, torch.Tensor]] = None  # (i, x_{t_i}) of the last update

    def _derivatives(self, half_log_snr_s: float, order: int):
        """x̂_0' and x̂_0'' at λ_s from divided differences of the last `order` data predictions (Newton form)."""
        (l0, m0), zero = self._history[-1], None
        if order == 1:
            return zero, zero
        l1, m1 = self._history[-2]
        f01 = (m0 - m1) / (l0 - l1)
        if order == 2:
            return f01, zero
        l2, m2 = self._history[-3]
        f12 = (m1 - m2) / (l1 - l2)
        f012 = (f01 - f12) / (l0 - l2)
        # p(λ) = m0 + f01 (λ-λ0) + f012 (λ-λ0)(λ-λ1):  p'(λ0) = f01 + f012 (λ0-λ1),  p'' = 2 f012.
        return f01 + (l0 - l1) * f012, 2 * f012

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[TutorialSchedulerOutput, Tuple]:
        """One multistep update x_{t_i} -> x_{t_{i+1}} (DPM-Solver++ eq. (9), Taylor-integrated), or x̂_0 at t = 0.

        Args:
            model_output (`torch.Tensor`): the network's output at (x_{t_i}, t_i).
            timestep (`float`): t_i, the next entry of `self.timesteps` (or the entry a loop starts at: 0, the one
                `set_begin_index` names, or any grid point; the history then starts empty).
            sample (`torch.Tensor`): x_{t_i}.
            return_dict (`bool`, defaults to `True`): return a `TutorialSchedulerOutput` rather than a tuple.

        Returns:
            `TutorialSchedulerOutput` or `(prev_sample, pred_original_sample)`.
        """
        i, starts = self._walk(timestep)
        if starts:
            self._history, self._last_update = [], None
        last = i == len(self._half_log_snr) - 1
        # 1. The data prediction x̂_0 at λ_i (DPM-Solver++ Sec. 4).
        x0, eps = self._x0_eps(model_output, sample, self._alpha_bar[i])
        # 2. The corrector: redo the last update through x̂_0 at λ_i too (module docstring); x̂_0 stays the model's.
        if self._last_update is not None and self._corrects():
            s, sample_s = self._last_update
            points = [self._history[-1], (self._half_log_snr[i], x0)] + self._history[-2::-1][:1]
            sample = self._update(sample_s, s, i, points[0][1], *_newton_derivatives(points))
            if last:  # x̂_0 at the corrected sample, with this evaluation's ε
                x0 = (sample - self._sigma[i] * eps) / self._sqrt_alpha_bar[i]
                if self.config.thresholding:
                    x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        # Last entry: the step to σ = 0 returns Tweedie's x̂_0 (DDIM's step to ᾱ = 1).
        if last:
            return (x0, x0) if not return_dict else TutorialSchedulerOutput(prev_sample=x0, pred_original_sample=x0)
        self._history = (self._history + [(self._half_log_snr[i], x0)])[-max(self.config.solver_order, 2) :]
        # 3. The exponential-integrator update with φ-coefficients integrated exactly (module docstring).
        order = min(self.config.solver_order, len(self._history))
        prev_sample = self._update(sample, i, i + 1, x0, *self._derivatives(self._half_log_snr[i], order))
        self._last_update = (i, sample)
        if not return_dict:
            return prev_sample, x0
        return TutorialSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _update(self, sample, s: int, t: int, x0, d1, d2) -> torch.Tensor:
        """x_{t} from x_{s} with the Taylor-integrated exponential integrator: x̂_0 = `x0` + `d1` (λ-λ_s) + `d2`
        (λ-λ_s)²/2 on [λ_s, λ_t] (module docstring); `d1`, `d2` may be None (zero)."""
        h = self._half_log_snr[t] - self._half_log_snr[s]
        phi1 = -math.expm1(-h)  # ∫_0^h e^{-(h-u)} du
        c1 = h - phi1  # ∫_0^h e^{-(h-u)} u du
        c2 = 0.5 * h * h - h + phi1  # ∫_0^h e^{-(h-u)} u²/2 du
        sqrt_alpha_bar_t = self._sqrt_alpha_bar[t]
        out = (self._sigma[t] / self._sigma[s]) * sample + (sqrt_alpha_bar_t * phi1) * x0
        if d1 is not None:
            out = out + (sqrt_alpha_bar_t * c1) * d1
        if d2 is not None:
            out = out + (sqrt_alpha_bar_t * c2) * d2
        return out


def _with_first_jump(num_points: int, lowest: float, highest: float, start: float, rho: Optional[float]):
    """`num_points` λ values: `lowest`, then from `start` (when above `lowest`) to `highest` by Karras' ρ (None:
    uniform in λ). The first step crosses the near-pure-noise stretch [lowest, start] in one (module docstring)."""
    if lowest >= start:
        start, num_rest = lowest, num_points
    else:
        num_rest = num_points - 1
    if rho is None:
        rest = start + torch.linspace(0, 1, num_rest, dtype=torch.float64) * (highest - start)
        rest[-1] = highest
    else:
        rest = karras_half_log_snrs(num_rest, start, highest, rho)
    if num_rest == num_points:
        return rest
    return torch.cat([torch.tensor([lowest], dtype=torch.float64), rest])


def _newton_derivatives(points):
    """(p', p'') at the first point's λ of the polynomial through `points` [(λ, x̂_0), ...] (2 or 3 of them)."""
    (l0, m0), (l1, m1) = points[0], points[1]
    f01 = (m0 - m1) / (l0 - l1)
    if len(points) == 2:
        return f01, None
    l2, m2 = points[2]
    f012 = (f01 - (m1 - m2) / (l1 - l2)) / (l0 - l2)
    return f01 + (l0 - l1) * f012, 2 * f012
