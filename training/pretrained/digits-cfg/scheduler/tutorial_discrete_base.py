"""What every discrete-time (t ∈ {0, ..., T-1}) scheduler of this project shares: the schedule, the grid, the door.

Not a sampler: `scheduling_tutorial_ddpm.py` and `scheduling_tutorial_ddim.py` each add one `step` to this.
The math itself lives in `tutorial_math.py`; this file only holds state (what `set_timesteps` writes) and checks.
"""

from typing import Dict, List, Optional, Sequence, Union

import torch

from . import tutorial_math as tm


class TutorialDiscreteScheduler:
    """Mixin holding the β/ᾱ tables, the timestep grid and the argument checks of our discrete schedulers.

    Subclasses also derive from diffusers' `SchedulerMixin` and `ConfigMixin` and call `_init_schedule` from their
    `@register_to_config` `__init__`.
    """

    init_noise_sigma = 1.0  # x_T ~ N(0, I) for every variance-preserving schedule
    order = 1

    def _init_schedule(self) -> None:
        cfg = self.config
        if not isinstance(cfg.num_train_timesteps, int) or cfg.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={cfg.num_train_timesteps!r} must be a positive integer.")
        tm.check_choice("prediction_type", cfg.prediction_type, tm.PREDICTION_TYPES)
        tm.check_choice("timestep_spacing", cfg.timestep_spacing, tm.TIMESTEP_SPACINGS)
        if cfg.thresholding and not 0 < cfg.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio={cfg.dynamic_thresholding_ratio!r} must lie in (0, 1].")
        if cfg.thresholding and not cfg.sample_max_value >= 1:
            raise ValueError(f"sample_max_value={cfg.sample_max_value!r} must be >= 1 (the threshold floor).")
        if cfg.clip_sample and not cfg.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range={cfg.clip_sample_range!r} must be > 0.")
        if not isinstance(cfg.steps_offset, int) or cfg.steps_offset < 0:
            raise ValueError(f"steps_offset={cfg.steps_offset!r} must be a non-negative integer.")
        if cfg.rescale_betas_zero_snr and cfg.prediction_type == "epsilon":
            # With ᾱ_T = 0, x_T = ε exactly, so an ε-prediction carries no information about x_0 and
            # x̂_0 = (x_T - ε̂) / √ᾱ_T (DDPM eq. (15)) is 0/0. Lin et al. 2023 (Sec. 3.2) pair zero terminal SNR
            # with v-prediction; diffusers accepts this pair and returns a non-finite first step.
            raise ValueError(
                "rescale_betas_zero_snr=True with prediction_type='epsilon' is not supported: at the terminal step "
                "ᾱ_T = 0 and x̂_0 = (x_T - √(1-ᾱ_T) ε̂) / √ᾱ_T is undefined. Use prediction_type='v_prediction' "
                "or 'sample' (allowed with rescale_betas_zero_snr=True: ('sample', 'v_prediction'))."
            )

        betas = tm.make_betas(
            cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.trained_betas
        )
        if cfg.rescale_betas_zero_snr:
            betas = tm.rescale_zero_terminal_snr(betas)
        # float64 tables are the truth; the float32 ones are diffusers' compatibility attributes.
        self.alpha_bar = tm.alpha_bar_from_betas(betas)
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = self.alpha_bar.float()
        self._sqrt_alpha_bar = self.alpha_bar.sqrt()
        self._sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()

        # ---- mutable state: written only by set_timesteps ----------------------------------------------------
        self.num_inference_steps: Optional[int] = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._prev_timesteps: Optional[List[int]] = None  # grid successor of each step, -1 for x_0
        self._index_of: List[int] = []  # timestep -> position in the grid (-1: not on it)
        self._tables: Dict[str, List[float]] = {}  # per-step coefficients, see `_tabulate`
        self._grid_cache: Dict[tuple, dict] = {}  # set_timesteps results per distinct grid (config is frozen)

    # ------------------------------------------------------------------------------------------------------------
    def _final_alpha_bar(self) -> float:
        """ᾱ of the level -1 that the last step lands on (x_0): 1 unless a subclass says otherwise."""
        return 1.0

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[int]] = None,
    ) -> None:
        """Build the grid of timesteps the sampler visits, and its successor table, once (before sampling).

        Args:
            num_inference_steps (`int`, *optional*): N, the number of steps, in [1, num_train_timesteps]; spaced by
                the config's `timestep_spacing`. Exactly one of `num_inference_steps` and `timesteps` is given.
            device (`str` or `torch.device`, *optional*): where `self.timesteps` lives.
            timesteps (`list[int]`, *optional*): a custom strictly descending grid inside [0, num_train_timesteps).
        """
        tm.check_steps_or_timesteps(num_inference_steps, timesteps)
        custom = None if timesteps is None else tuple(timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)
        key = (num_inference_steps, custom)
        state = self._grid_cache.get(key)
        if state is None:
            state = self._build_grid_state(num_inference_steps, timesteps)
            self._grid_cache[key] = state
        # ---- the one block of mutable state ----------------------------------------------------------------------
        grid = state["timesteps"]
        self.timesteps = grid.to(device) if device is not None else grid
        self.num_inference_steps = state["num_inference_steps"]
        self.custom_timesteps = state["custom_timesteps"]
        self._prev_timesteps = state["prev_timesteps"]
        self._index_of = state["index_of"]
        self._tables = state["tables"]

    def _build_grid_state(self, num_inference_steps: Optional[int], timesteps: Optional[Sequence[int]]) -> dict:
        """The grid, its successors and the per-step coefficient tables, computed once per distinct grid."""
        T = self.config.num_train_timesteps
        if timesteps is not None:
            grid = tm.validate_custom_timesteps(timesteps, T)
        else:
            grid = tm.spaced_timesteps(num_inference_steps, T, self.config.timestep_spacing, self.config.steps_offset)
            if int(grid[0]) >= T:
                raise ValueError(
                    f"steps_offset={self.config.steps_offset} pushes the 'leading' grid past t = {T - 1} at "
                    f"num_inference_steps={num_inference_steps}; lower steps_offset or num_inference_steps."
                )
        prev = tm.successor_timesteps(grid)
        # ᾱ of each step's target level; index -1 (x_0) picks the appended final ᾱ.
        alpha_bar_ext = torch.cat([self.alpha_bar, self.alpha_bar.new_tensor([self._final_alpha_bar()])])
        index_of = [-1] * T
        for i, t in enumerate(grid.tolist()):
            index_of[t] = i
        return {
            "timesteps": grid,
            "num_inference_steps": int(grid.numel()),
            "custom_timesteps": timesteps is not None,
            "prev_timesteps": prev.tolist(),
            "index_of": index_of,
            "tables": self._tabulate(self.alpha_bar[grid], alpha_bar_ext[prev]),
        }

    def _tabulate(self, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor) -> dict:
        """Per-step coefficient tables (lists of Python floats) a subclass's `step` reads; float64 in, once."""
        return {}

    def _step_index(self, timestep: Union[int, torch.Tensor]) -> int:
        """Position of `timestep` in the grid; the door every `step` passes through."""
        if self._prev_timesteps is None:
            raise ValueError(
                f"{type(self).__name__}.step was called before set_timesteps; call "
                "scheduler.set_timesteps(num_inference_steps) first."
            )
        t = int(timestep)
        index = self._index_of[t] if 0 <= t < len(self._index_of) else -1
        if index < 0:
            raise ValueError(f"timestep={t} is not on the grid set by set_timesteps: {self.timesteps.tolist()}.")
        return index

    def previous_timestep(self, timestep: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
        """The grid timestep a step from `timestep` moves to (-1 means x_0). Looked up, never recomputed."""
        prev = self._prev_timesteps[self._step_index(timestep)]
        return torch.tensor(prev) if torch.is_tensor(timestep) else prev

    @staticmethod
    def _check_shapes(model_output: torch.Tensor, sample: torch.Tensor, channels_factor: int = 1) -> None:
        expected = (sample.shape[0], sample.shape[1] * channels_factor) + tuple(sample.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}; "
                f"expected model_output of shape {expected}."
            )

    def _keep_in_range(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen) or clipping of x̂_0 to [-clip_sample_range, clip_sample_range]."""
        if self.config.thresholding:
            return tm.dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        if self.config.clip_sample:
            return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    # ------------------------------------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """Identity: variance-preserving models take x_t as it is (kept for interchangeability with Euler & co.)."""
        return sample

    def _coefs_at(self, timesteps: torch.Tensor, like: torch.Tensor):
        if self._sqrt_alpha_bar.device != like.device:  # the tables follow the data, once; t never leaves it
            self._sqrt_alpha_bar = self._sqrt_alpha_bar.to(like.device)
            self._sqrt_one_minus_alpha_bar = self._sqrt_one_minus_alpha_bar.to(like.device)
        timesteps = torch.as_tensor(timesteps, device=like.device).flatten().long()
        a = tm.expand_to(self._sqrt_alpha_bar[timesteps], like)
        s = tm.expand_to(self._sqrt_one_minus_alpha_bar[timesteps], like)
        return a, s

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Sample from q(x_t | x_0): √ᾱ_t x_0 + √(1 - ᾱ_t) ε (DDPM eq. (4)).

        Args:
            original_samples (`torch.Tensor`): x_0, shape (B, ...).
            noise (`torch.Tensor`): ε ~ N(0, I), same shape.
            timesteps (`torch.IntTensor`): t per sample, shape (B,) or a scalar.

        Returns:
            `torch.Tensor`: x_t, in `original_samples`' dtype.
        """
        a, s = self._coefs_at(timesteps, original_samples)
        return a * original_samples + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho 2022); `sample` is x_0."""
        a, s = self._coefs_at(timesteps, sample)
        return a * noise - s * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
