"""What every discrete-time (t ∈ {0, ..., T-1}) scheduler of this project shares: the schedule, the grid, the door.

Not a sampler: `scheduling_tutorial_ddpm.py` and `scheduling_tutorial_ddim.py` each add one `step` to this.
The math itself lives in `tutorial_math.py` (the grids' spacings in `tutorial_grids.py`); this file only holds state
(what `set_timesteps` writes) and checks.

Which step a timestep t takes (diffusers' implicit contract, kept so that code written for diffusers runs):

- t on the current grid: to the grid's next timestep (looked up; -1 means x_0). This is where we differ from
  diffusers' DDIM, which goes to t - T//N even on `linspace` and `trailing` grids whose spacing is not T//N.
- t off the grid, an integer in [0, T-1]: diffusers' rule, to t - T//N (x_0 when that is negative), N the number of
  grid points. A fresh scheduler (no `set_timesteps` yet) has the full training grid T-1, ..., 0, so it steps from t
  to t - 1, as diffusers' DDPM does.
"""

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from . import tutorial_grids as grids
from . import tutorial_math as tm
from .tutorial_scheduler_common import TutorialSchedulerCommon


class TutorialDiscreteScheduler(TutorialSchedulerCommon):
    """Mixin holding the β/ᾱ tables, the timestep grid and the argument checks of our discrete schedulers.

    Subclasses also derive from diffusers' `SchedulerMixin` and `ConfigMixin` and call `_init_schedule` from their
    `@register_to_config` `__init__`.
    """

    def _init_schedule(self) -> None:
        cfg = self.config
        self._check_common_config()
        tm.check_choice("timestep_spacing", cfg.timestep_spacing, grids.TIMESTEP_SPACINGS)
        if cfg.clip_sample and not cfg.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range={cfg.clip_sample_range!r} must be > 0.")
        tm.check_int("steps_offset", cfg.steps_offset, minimum=0)
        if cfg.rescale_betas_zero_snr and cfg.prediction_type == "epsilon":
            # With ᾱ_T = 0, x_T = ε exactly, so an ε-prediction carries no information about x_0 and
            # x̂_0 = (x_T - ε̂) / √ᾱ_T (DDPM eq. (15)) is 0/0. Lin et al. 2023 (Sec. 3.2) pair zero terminal SNR
            # with v-prediction; diffusers accepts this pair and returns a non-finite first step.
            raise ValueError(
                "rescale_betas_zero_snr=True with prediction_type='epsilon' is not supported: at the terminal step "
                "ᾱ_T = 0 and x̂_0 = (x_T - √(1-ᾱ_T) ε̂) / √ᾱ_T is undefined. Use prediction_type='v_prediction' "
                "or 'sample' (allowed with rescale_betas_zero_snr=True: ('sample', 'v_prediction'))."
            )

        self._init_tables()
        self._sqrt_alpha_bar = self.alpha_bar.sqrt()
        self._sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()

        # ---- mutable state: written by set_timesteps (the grid), set_begin_index and step (the position) ----------
        self._grid_cache = {}  # grid entries per distinct grid, valid while the config object is the same
        self._cached_config = self._internal_dict
        self._use_grid(self._fresh_grid(), device=None)

    # ---- the grid ------------------------------------------------------------------------------------------------
    def _final_alpha_bar(self) -> float:
        """ᾱ of the level -1 that the last step lands on (x_0): 1 unless a subclass says otherwise."""
        return 1.0

    def _fresh_grid(self) -> dict:
        """The grid of a scheduler before any `set_timesteps`: every training timestep T-1, ..., 0 (diffusers')."""
        T = self.config.num_train_timesteps
        return self._grid_entry(torch.arange(T - 1, -1, -1, dtype=torch.int64), None, custom=False)

    def _grid_entry(self, grid: torch.Tensor, num_inference_steps: Optional[int], custom: bool) -> dict:
        """A grid and what `step` needs about it; the per-step tables (`state`) are built by the first `step`."""
        return {
            "timesteps": grid,
            "num_inference_steps": num_inference_steps,
            "custom_timesteps": custom,
            "stride": self.config.num_train_timesteps // int(grid.numel()),  # diffusers' T // N, for off-grid t
            "state": None,
        }

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[int]] = None,
    ) -> None:
        """Choose the grid of timesteps the sampler visits (before sampling).

        Cheap: the grid is built once per distinct N (a few microseconds) and the per-step coefficients are
        tabulated by the first `step` on it; both are cached, so coming back to an N costs a dictionary lookup.

        Args:
            num_inference_steps (`int`, *optional*): N, the number of steps, in [1, num_train_timesteps]; spaced by
                the config's `timestep_spacing`. Any integer type (a numpy integer, a 0-d tensor) is accepted.
                Exactly one of `num_inference_steps` and `timesteps` is given.
            device (`str` or `torch.device`, *optional*): where `self.timesteps` lives.
            timesteps (`list[int]`, *optional*): a custom strictly descending grid inside [0, num_train_timesteps).
        """
        if (num_inference_steps is None) == (timesteps is None):
            grids.check_steps_or_timesteps(num_inference_steps, timesteps)
        T = self.config.num_train_timesteps
        if timesteps is None:
            n = num_inference_steps
            if type(n) is not int:
                n = tm.check_int("num_inference_steps", n, 1, T, "num_train_timesteps")
            key = n
        else:
            key = ("custom", tuple(timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps))
        if self._internal_dict is not self._cached_config:  # the config was replaced (diffusers' pipelines do)
            self._grid_cache, self._cached_config = {}, self._internal_dict
        entry = self._grid_cache.get(key)
        if entry is None:
            if timesteps is None:
                spacing, offset = self.config.timestep_spacing, self.config.steps_offset
                if spacing == "leading" and 1 <= n <= T and (n - 1) * (T // n) + offset >= T:  # the grid's first t
                    raise ValueError(
                        f"steps_offset={offset} pushes the 'leading' grid past t = {T - 1} at "
                        f"num_inference_steps={n}; lower steps_offset or num_inference_steps."
                    )
                entry = self._grid_entry(self._spaced_grid(n), n, custom=False)
            else:
                grid = grids.validate_custom_timesteps(timesteps, T)
                entry = self._grid_entry(grid, int(grid.numel()), custom=True)
            self._grid_cache[key] = entry
        self._use_grid(entry, device)

    def _spaced_grid(self, n: int) -> torch.Tensor:
        """The grid of `set_timesteps(n)`: n timesteps spaced by the config's `timestep_spacing`."""
        return grids.spaced_timesteps(
            n, self.config.num_train_timesteps, self.config.timestep_spacing, self.config.steps_offset
        )

    def _use_grid(self, entry: dict, device) -> None:
        # ---- the one block of mutable state ----------------------------------------------------------------------
        grid = entry["timesteps"]
        self.timesteps = grid if device is None else grid.to(device)
        self.num_inference_steps = entry["num_inference_steps"]  # None for the fresh grid, as in diffusers
        self.custom_timesteps = entry["custom_timesteps"]
        self._grid = entry
        self._state = entry["state"]  # None until the first step on this grid tabulates it
        self._begin_index = None
        self._step_index = None

    def _grid_state(self) -> dict:
        """The successor of every grid timestep and the per-step coefficient tables, built once per grid."""
        entry = self._grid
        if entry["state"] is None:
            grid = entry["timesteps"]
            prev = grids.successor_timesteps(grid)
            # ᾱ of each step's target level; index -1 (x_0) picks the appended final ᾱ.
            alpha_bar_ext = torch.cat([self.alpha_bar, self.alpha_bar.new_tensor([self._final_alpha_bar()])])
            entry["state"] = {
                "index_of": {t: i for i, t in enumerate(grid.tolist())},
                "prev": prev.tolist(),
                "tables": self._tabulate(self.alpha_bar[grid], alpha_bar_ext[prev]),
            }
        self._state = entry["state"]
        return self._state

    def _tabulate(self, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor) -> dict:
        """Per-step coefficient tables (lists of Python floats) a subclass's `step` reads; float64 in, once."""
        return {}

    # ---- where a timestep steps to --------------------------------------------------------------------------------
    def _as_timestep(self, timestep) -> int:
        """`timestep` as a Python int in [0, T-1]; a non-integral value (900.7) or one outside the range raises."""
        T = self.config.num_train_timesteps
        value = timestep
        if torch.is_tensor(timestep):
            if timestep.numel() != 1:
                raise ValueError(
                    f"timestep has shape {tuple(timestep.shape)}; step takes one timestep (a scalar) for the batch."
                )
            value = timestep.item()
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            t = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            t = int(value)
        else:
            raise ValueError(
                f"timestep={value!r} is not an integer; {type(self).__name__} steps at the integer timesteps "
                f"0..{T - 1} (use TutorialPFODEScheduler or TutorialDPMSolverPlusPlusScheduler for continuous time)."
            )
        if not 0 <= t < T:
            raise ValueError(f"timestep={t} is outside [0, num_train_timesteps - 1 = {T - 1}].")
        return t

    def _locate(self, timestep) -> Tuple[dict, int, int, int, Optional[int]]:
        """(tables, row, t, t', step_index after the step) for a step from `timestep`; the door of every `step`.

        On the grid: the grid's own successor t' and the cached tables. Off the grid: diffusers' t' = t - T//N (x_0
        when negative) and a one-row table computed for it.
        """
        grid = self._grid["timesteps"]  # the host copy of the grid set last
        if type(timestep) is int:
            t = timestep
        elif (entry := tm.entry_index(timestep, self.timesteps)) is not None and len(grid) == len(self.timesteps):
            t = int(grid[entry])  # an entry of self.timesteps, read from the host copy (a device tensor is not read)
        elif torch.is_tensor(timestep) and not timestep.is_floating_point() and timestep.numel() == 1:
            t = int(timestep)  # an entry of self.timesteps: the common case, checked by the lookup below
        else:
            t = self._as_timestep(timestep)
        state = self._state or self._grid_state()
        i = state["index_of"].get(t)
        if i is not None:
            return state["tables"], i, t, state["prev"][i], i + 1
        t = self._as_timestep(t)  # an int off the grid: still inside [0, T-1]
        t_prev = t - self._grid["stride"]
        if t_prev < 0:
            t_prev, alpha_bar_prev = -1, self._final_alpha_bar()
        else:
            alpha_bar_prev = float(self.alpha_bar[t_prev])
        tables = self._tabulate(self.alpha_bar[t : t + 1], self.alpha_bar.new_tensor([alpha_bar_prev]))
        return tables, 0, t, t_prev, None

    def previous_timestep(self, timestep: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
        """The timestep a step from `timestep` moves to (-1 means x_0): the grid's next entry, or t - T//N off it."""
        prev = self._locate(timestep)[3]
        return torch.tensor(prev) if torch.is_tensor(timestep) else prev

    # ---- starting part-way down the grid (img2img, inpainting, SDEdit) ---------------------------------------------
    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the sampling loop at entry `begin_index` of `timesteps`, as diffusers' img2img pipelines do.

        A discrete scheduler looks each timestep up, so starting part-way needs nothing more than stepping from
        `timesteps[begin_index]`; the index is validated and kept for code that reads `begin_index`.

        Args:
            begin_index (`int`, defaults to 0): an entry of `timesteps`, in [0, len(timesteps) - 1].
        """
        n = len(self.timesteps)
        self._begin_index = tm.check_int("begin_index", begin_index, 0, n - 1, "len(timesteps) - 1")

    @staticmethod
    def _check_shapes(model_output: torch.Tensor, sample: torch.Tensor, channels_factor: int = 1) -> None:
        expected = (sample.shape[0], sample.shape[1] * channels_factor) + tuple(sample.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}; "
                f"expected model_output of shape {expected}."
            )

    def _keep_in_range(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen) or clipping of x̂_0 to [-clip_sample_range, clip_sample_range].

        Neither turns a NaN or ±inf into a finite value (see `tm.clip_x0`): a broken model output stays visible.
        """
        if self.config.thresholding:
            return tm.dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        if self.config.clip_sample:
            return tm.clip_x0(x0, self.config.clip_sample_range)
        return x0

    # ------------------------------------------------------------------------------------------------------------
    def _coefs_at(self, timesteps, like: torch.Tensor):
        """(√ᾱ_t, √(1-ᾱ_t)) broadcast against `like`, for integer t in [0, T-1] (checked: no silent wrap of -1)."""
        T = self.config.num_train_timesteps
        timesteps = torch.as_tensor(timesteps, device=like.device)
        if timesteps.is_floating_point():
            whole = timesteps == timesteps.round()
        else:
            whole = None
        inside = (timesteps >= 0) & (timesteps < T)
        if timesteps.device.type != "cpu":  # checked on the device: no host synchronisation in a training loop
            ok = inside if whole is None else inside & whole
            torch._assert_async(ok.all(), f"add_noise: timesteps must be integers in [0, {T - 1}]")
        elif not bool(inside.all()) or (whole is not None and not bool(whole.all())):
            shown = timesteps.flatten()[:8].tolist()
            raise ValueError(
                f"timesteps={shown}{'...' if timesteps.numel() > 8 else ''} must be integers in "
                f"[0, num_train_timesteps - 1 = {T - 1}] (one per sample, or one for the batch)."
            )
        timesteps = timesteps.long()
        if self._sqrt_alpha_bar.device != like.device:
            self._sqrt_alpha_bar = self._sqrt_alpha_bar.to(like.device)
            self._sqrt_one_minus_alpha_bar = self._sqrt_one_minus_alpha_bar.to(like.device)
        a = tm.expand_to(self._sqrt_alpha_bar[timesteps.flatten()], like)
        s = tm.expand_to(self._sqrt_one_minus_alpha_bar[timesteps.flatten()], like)
        return a, s

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Sample from q(x_t | x_0): √ᾱ_t x_0 + √(1 - ᾱ_t) ε (DDPM eq. (4)).

        Args:
            original_samples (`torch.Tensor`): x_0, shape (B, ...).
            noise (`torch.Tensor`): ε ~ N(0, I), same shape.
            timesteps (`torch.IntTensor`): t per sample, shape (B,), or one t for the batch; integers in [0, T-1].

        Returns:
            `torch.Tensor`: x_t, in `original_samples`' dtype.
        """
        a, s = self._coefs_at(timesteps, original_samples)
        return a * original_samples + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho 2022); `sample` is x_0."""
        a, s = self._coefs_at(timesteps, sample)
        return a * noise - s * sample
