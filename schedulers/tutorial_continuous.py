"""Continuous time for a discrete-time model: the log-SNR between integer timesteps, step placements, a base class.

A DDPM-trained network knows ᾱ_t only at the integer timesteps t = 0..T-1 of its table. The samplers of the
score-SDE / probability-flow-ODE family (Song et al. 2021, arXiv:2011.13456; DPM-Solver, Lu et al. 2022,
arXiv:2206.00927) need a continuous ᾱ(t). Our definition, used by every file that imports this module:

    λ(t) = ½ log SNR(t) is linear in t between consecutive integers (the table's λ_i at integer t = i),
    ᾱ(t) = sigmoid(2 λ(t)),  t ∈ [0, T-1],  and the model is fed the fractional timestep t itself.

This is exactly diffusers' Euler/Heun convention (`_sigma_to_t` interpolates t linearly in log σ̄, and log σ̄ = -λ), so
a network already sees such fractional timesteps there. At integer t it is the table itself, so an exact model of the
table (`GaussianMixture.model`) is also exact for the continuous schedule once it reads ᾱ through `grids.alpha_bar_at`
(see `GaussianMixture.model`). The probability-flow ODE only depends on t through λ, so the kinks of λ(t) at integers
never reach the solvers: they integrate in λ (or σ̄ = e^{-λ}), where everything is smooth.

The sampled interval is t ∈ [0, T-1]: x_{T-1} ~ N(0, I) at the start, and the last model evaluation, at t = 0,
returns the denoised x̂_0 (Tweedie's mean, the DDIM step to ᾱ = 1). The reference "exact" sample of a PF-ODE
sampler is therefore x̂_0(Φ_{T-1→0}(x_{T-1}), 0), Φ the exact ODE flow.

The functions of that definition (`half_log_snr_at`, `timestep_at`, `alpha_bar_at`, `placement_half_log_snrs`,
`check_custom_grid`) live in `tutorial_grids.py`; this file holds the state the continuous samplers share.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import tutorial_grids as grids
from . import tutorial_math as tm
from .tutorial_scheduler_common import TutorialSchedulerCommon


# ----------------------------------------------------------------------------------------------------------------
# What the continuous-time schedulers share
# ----------------------------------------------------------------------------------------------------------------
class TutorialContinuousScheduler(TutorialSchedulerCommon):
    """Mixin: the ᾱ/λ tables, a walk over `self.timesteps` (which may repeat a timestep), and diffusers' helpers.

    Subclasses derive from `SchedulerMixin` and `ConfigMixin`, call `_init_continuous_schedule` in their
    `@register_to_config` `__init__`, and in `_tabulate_grid` call `_use_entries` with the loop's entries. A sampling
    loop calls `step` once per entry of `self.timesteps`, in order, from a step's first entry (entry 0, the entry
    `set_begin_index` names, or the first entry of any step, found by its timestep); `self.step_index` is the entry the
    next `step` serves. A fresh scheduler walks the full training grid T-1, ..., 0 (built on first use).
    """

    def _init_continuous_schedule(self) -> None:
        """Check the config (the shared keys, `step_placement`, `rho`), then build the ᾱ and λ tables."""
        cfg = self.config
        self._check_common_config(min_train_timesteps=2)
        if cfg.rescale_betas_zero_snr:
            raise ValueError(
                "rescale_betas_zero_snr=True is not supported by the continuous-time samplers: λ_{T-1} = -∞ leaves no "
                "finite interval to integrate the probability-flow ODE over; allowed: (False,)."
            )
        tm.check_choice("step_placement", cfg.step_placement, grids.STEP_PLACEMENTS)
        if not cfg.rho > 0:
            raise ValueError(f"rho={cfg.rho!r} must be > 0.")
        self._init_tables()
        self.half_log_snr = tm.half_log_snr(self.alpha_bar)
        if not bool((self.half_log_snr[1:] < self.half_log_snr[:-1]).all()):
            raise ValueError("the schedule's log-SNR must strictly decrease in t (every β_t > 0).")
        # ---- mutable state: the grid (built by set_timesteps, or on first use for a fresh scheduler) --------------
        self.num_inference_steps: Optional[int] = None
        self._timesteps: Optional[torch.Tensor] = None
        self._entry_t: Optional[List[float]] = None
        self._begin_index: Optional[int] = None
        self._step_index: Optional[int] = None

    @property
    def timesteps(self) -> torch.Tensor:
        """The loop's entries, one `step` each (a multi-stage or corrector step repeats its timestep)."""
        if self._timesteps is None:
            self._ensure_grid()
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value: torch.Tensor) -> None:
        self._timesteps = value

    def _ensure_grid(self) -> None:
        """A fresh scheduler (no `set_timesteps` yet) walks the full training grid T-1, ..., 0, as diffusers' do.

        Built on first use, not at construction: `from_config` followed by `set_timesteps` never pays for it.
        """
        if self._entry_t is None:
            T = self.config.num_train_timesteps
            self.set_timesteps(timesteps=torch.arange(T - 1, -1, -1, dtype=torch.float64))
            self.num_inference_steps = None

    def _use_entries(self, timesteps: torch.Tensor, starts: List[int], num_inference_steps: int, device) -> None:
        """Record the loop's entries (`timesteps`, float64) and which of them may begin a loop (`starts`)."""
        # ---- mutable state shared by every continuous scheduler: the grid and the position on it ----------------
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps if device is None else timesteps.to(device)
        self._entry_t = timesteps.tolist()
        self._starts = starts
        self._start_of = {}  # timestep -> the first entry with it that begins a step
        for j in reversed(starts):
            self._start_of[self._entry_t[j]] = j
        self._begin_index = None
        self._step_index = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the sampling loop at entry `begin_index` of `timesteps` (img2img, inpainting, SDEdit).

        diffusers' pipelines call it after `set_timesteps` with `t_start * scheduler.order`, which is the first entry
        of step `t_start` here too (a multi-stage or corrector step has `order` entries). The loop's first `step` must
        then be at `timesteps[begin_index]`; a multistep solver starts from an empty history there.

        Args:
            begin_index (`int`, defaults to 0): the first entry of a step, in [0, len(timesteps) - 1].
        """
        self._ensure_grid()
        n = len(self._entry_t)
        k = tm.check_int("begin_index", begin_index, 0, n - 1, "len(timesteps) - 1")
        if k not in self._starts:
            shown = self._starts[:6]
            raise ValueError(
                f"begin_index={k} is not the first entry of a step of scheduler.timesteps; allowed: {shown}"
                f"{'...' if len(self._starts) > 6 else ''} (multiples of order={self.order}, and {n - 1})."
            )
        self._begin_index = k
        self._step_index = None

    def _walk(self, timestep) -> Tuple[int, bool]:
        """(the entry of `self.timesteps` this `step` serves, whether it begins a loop); advances `step_index`."""
        j = self._step_index
        entries = self._entry_t
        if entries is None:
            self._ensure_grid()
            entries = self._entry_t
        i = tm.entry_index(timestep, self.timesteps)  # an entry of self.timesteps: its value from the host list
        t = entries[i] if i is not None and len(entries) == len(self.timesteps) else float(timestep)
        if j is not None and j < len(entries) and t == entries[j]:
            self._step_index = j + 1
            return j, False
        begin = self._begin_index
        start = self._start_of.get(t) if begin is None else (begin if t == entries[begin] else None)
        if start is None:
            expected = entries[j] if j is not None and j < len(entries) else entries[begin or 0]
            where = f"set_begin_index({begin})" if begin is not None else "the first entry of any step"
            raise ValueError(
                f"timestep={t} is not the next entry of scheduler.timesteps (expected {expected}); call step once per "
                f"entry of scheduler.timesteps, in order, starting at {where}."
            )
        self._step_index = start + 1
        return start, True

    # ---- the continuous schedule -----------------------------------------------------------------------------------
    def alpha_bar_at(self, t) -> torch.Tensor:
        """ᾱ(t) for fractional t, the continuous schedule of this module (λ linear between integers)."""
        return tm.alpha_bar_from_log_snr(2 * grids.half_log_snr_at(t, self.half_log_snr))

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[float]] = None,
    ) -> None:
        """Choose the grid the sampler visits (before sampling) and tabulate, once, what its `step` reads there.

        The grid runs from t = T-1 down to t = 0, placed by the config's `step_placement`; the sampler's
        `_tabulate_grid` turns it into the loop's entries (`self.timesteps`, one `step` each: a multi-stage or
        corrector step repeats its timestep) and the coefficients of every point.

        Args:
            num_inference_steps (`int`, *optional*): N ≥ 2 grid points. Exactly one of `num_inference_steps` and
                `timesteps` is given.
            device (`str` or `torch.device`, *optional*): where `self.timesteps` lives.
            timesteps (`list[float]`, *optional*): a custom (tuned) grid, strictly descending from T-1 to 0.
        """
        grid, half_log_snr = self._grid_from(num_inference_steps, timesteps)  # validated at the door
        self._tabulate_grid(grid, half_log_snr, device)

    def _tabulate_grid(self, grid: torch.Tensor, half_log_snr: torch.Tensor, device) -> None:
        """Write the one block of mutable state for this grid (its λ values given): `_use_entries`, then the tables."""
        raise NotImplementedError

    def _grid_from(self, num_inference_steps, timesteps):
        """The descending float64 timestep grid from T-1 to 0 and its λ values (validated at the door)."""
        T = self.config.num_train_timesteps
        grids.check_steps_or_timesteps(num_inference_steps, timesteps)
        if timesteps is not None:
            grid = grids.check_custom_grid(timesteps, T)
            return grid, grids.half_log_snr_at(grid, self.half_log_snr)
        num_inference_steps = tm.check_int("num_inference_steps", num_inference_steps, minimum=2)
        if self.config.step_placement == "time_uniform":  # exact timesteps, no round trip through λ
            grid = torch.linspace(T - 1, 0, num_inference_steps, dtype=torch.float64)
            return grid, grids.half_log_snr_at(grid, self.half_log_snr)
        half_log_snr = grids.placement_half_log_snrs(
            num_inference_steps, self.half_log_snr, self.config.step_placement, self.config.rho
        )
        grid = grids.timestep_at(half_log_snr, self.half_log_snr)
        grid[0], grid[-1] = T - 1, 0.0
        return grid, half_log_snr

    def _x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor, alpha_bar: float):
        if tuple(model_output.shape) != tuple(sample.shape):
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}."
            )
        x0, eps = tm.model_output_to_x0_eps(model_output, sample, float(alpha_bar), self.config.prediction_type)
        if self.config.thresholding:
            x0 = tm.dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            eps = tm.x0_to_eps(sample, x0, float(alpha_bar))
        return x0, eps

    # ---- diffusers' helpers ------------------------------------------------------------------------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Sample from q(x_t | x_0) = N(√ᾱ(t) x_0, (1 - ᾱ(t)) I) (DDPM eq. (4)), t possibly fractional.

        Args:
            original_samples (`torch.Tensor`): x_0, shape (B, ...).
            noise (`torch.Tensor`): ε ~ N(0, I), same shape.
            timesteps (`torch.Tensor`): t per sample, shape (B,), or a scalar.

        Returns:
            `torch.Tensor`: x_t.
        """
        alpha_bar = self.alpha_bar_at(torch.as_tensor(timesteps).cpu()).to(original_samples.device)
        return tm.q_sample(original_samples, noise, alpha_bar)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target v = √ᾱ(t) ε - √(1 - ᾱ(t)) x_0 (Salimans & Ho 2022); `sample` is x_0."""
        alpha_bar = self.alpha_bar_at(torch.as_tensor(timesteps).cpu()).to(sample.device)
        return tm.velocity(sample, noise, alpha_bar)
