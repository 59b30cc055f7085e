"""Few-step sampling of a distilled student: progressive distillation's DDIM and consistency models' multistep sampler.

Progressive distillation: Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models",
arXiv:2202.00512. Consistency models: Song, Dhariwal, Chen & Sutskever, "Consistency Models", arXiv:2303.01469.

Both students are v-prediction networks (the teacher may be ε-prediction). Read as an x_0-estimate,

    x̂_0 = f_θ(x_t, t) = √ᾱ_t x_t - √(1-ᾱ_t) v_θ(x_t, t)         (Salimans & Ho App. D)

is c_skip(t) x_t + c_out(t) F_θ with c_skip = √ᾱ_t, c_out = -√(1-ᾱ_t): EDM's consistency parameterisation with
σ_data = 1 written in variance-preserving coordinates (CM eq. (7): c_skip(σ) = σ_data² / (σ² + σ_data²) on x/√ᾱ).
At the data end (ᾱ = 1) c_skip = 1 and c_out = 0, so f_θ(x, 0) = x whatever the network says: the consistency
model's boundary condition (CM eq. (5)) holds by construction, and x̂_0 stays bounded at high noise, where the
ε-reading x̂_0 = (x_t - √(1-ᾱ_t) ε̂)/√ᾱ_t multiplies the network's error by 1/√ᾱ_T (156 for the linear schedule).

The grid is `trailing` (T/N·k - 1, k = N..1, diffusers' spacing), whose grids for N and 2N are nested (every
timestep of the N-step grid is on the 2N-step grid) when T/N is a power-of-two fraction of T: progressive
distillation halves the step count on exactly these grids. `distilled_steps` records the step counts the student was
trained for; the config is otherwise diffusers' `DDIMScheduler`'s, so `from_config` works both ways.
"""

import math
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from .tutorial_discrete_base import TutorialDiscreteScheduler
from .tutorial_grids import TIMESTEP_SPACINGS, validate_custom_timesteps  # noqa: F401  (TIMESTEP_SPACINGS: see below)
from .tutorial_math import check_choice, check_int, model_output_to_x0_eps
from .tutorial_scheduler_common import TutorialSchedulerOutput

# TIMESTEP_SPACINGS is imported for the shipped copy of this file: the base builds the grid with it.
DISTILLATIONS = ("progressive", "consistency")  # which sampler `step` runs; one per distillation method


class TutorialDistilledScheduler(TutorialDiscreteScheduler, SchedulerMixin, ConfigMixin):
    """Sampler of a distilled student: DDIM with η = 0 (progressive) or the consistency multistep sampler.

    `distillation="progressive"`: x_{t'} = √ᾱ_{t'} x̂_0 + √(1-ᾱ_{t'}) ε̂ (DDIM eq. (12), η = 0), the sampler the
    student was distilled into (Salimans & Ho, Algorithm 2). `distillation="consistency"`: x_{t'} = √ᾱ_{t'} x̂_0 +
    √(1-ᾱ_{t'}) z with fresh z ~ N(0, I) (CM Algorithm 1): each step jumps to the trajectory's end and re-noises.
    The last step of either returns x̂_0.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, clip_sample, set_alpha_to_one,
            steps_offset, thresholding, dynamic_thresholding_ratio, clip_sample_range, sample_max_value,
            rescale_betas_zero_snr: as in `TutorialDDIMScheduler` (diffusers' `DDIMScheduler` keys).
        prediction_type (`str`, defaults to `"v_prediction"`): what the student's network predicts.
        timestep_spacing (`str`, defaults to `"trailing"`): the grid the student was distilled on.
        distillation (`str`, defaults to `"progressive"`): one of `DISTILLATIONS`.
        distilled_steps (`list[int]`, defaults to `[1, 2, 4]`): the step counts the student was trained for (the
            model card recommends the smallest); any other N in [1, T] still samples.
        distilled_timesteps (`list[list[int]]`, *optional*): grids that replace the `timestep_spacing` grid of the
            same length, e.g. `[[999, 599], [999, 499, 299, 149]]`: `set_timesteps(2)` then visits 999 and 599. A
            consistency model samples at any times (CM Sec. 6 chose them by a search on FID); with N steps the
            spaced grid is rarely the best. Each grid strictly descending in [0, num_train_timesteps), one per N.
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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "v_prediction",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "trailing",
        rescale_betas_zero_snr: bool = False,
        distillation: str = "progressive",
        distilled_steps: Optional[List[int]] = None,
        distilled_timesteps: Optional[List[List[int]]] = None,
    ):
        check_choice("distillation", distillation, DISTILLATIONS)
        for n in distilled_steps or []:
            check_int("distilled_steps", n, 1, num_train_timesteps, "num_train_timesteps")
        if distilled_steps is None:
            self.register_to_config(distilled_steps=[1, 2, 4])
        lengths = []
        for grid in distilled_timesteps or []:
            try:
                lengths.append(int(validate_custom_timesteps(grid, num_train_timesteps).numel()))
            except (TypeError, ValueError) as error:
                raise ValueError(f"distilled_timesteps: the grid {grid!r} is not valid: {error}") from None
        if len(set(lengths)) != len(lengths):
            raise ValueError(
                f"distilled_timesteps={distilled_timesteps!r} gives two grids of the same length; give at most one "
                "grid per step count."
            )
        self._init_schedule()
        self.final_alpha_cumprod = torch.tensor(self._final_alpha_bar(), dtype=torch.float32)  # diffusers' name

    def _spaced_grid(self, n: int) -> torch.Tensor:
        """`set_timesteps(n)`'s grid: the `distilled_timesteps` grid of length n, else the spaced one."""
        for grid in self.config.distilled_timesteps or []:
            if len(grid) == n:
                return validate_custom_timesteps(grid, self.config.num_train_timesteps)
        return super()._spaced_grid(n)

    def _final_alpha_bar(self) -> float:
        # ᾱ of the level "x_0" that the last step lands on (DDIM App. C: ᾱ_0 := 1), or ᾱ of t = 0.
        return 1.0 if self.config.set_alpha_to_one else float(self.alpha_bar[0])

    def _tabulate(self, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor) -> dict:
        return {"alpha_bar": alpha_bar.tolist(), "alpha_bar_prev": alpha_bar_prev.tolist()}

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[TutorialSchedulerOutput, Tuple]:
        """Move x_t to x_{t'}, t' the grid's next timestep, through the student's x̂_0 = f_θ(x_t, t).

        Args:
            model_output (`torch.Tensor`): the student's output at (x_t, t).
            timestep (`int`): t, an integer timestep (on the grid: to its next entry; off it: diffusers' t - T//N).
            sample (`torch.Tensor`): x_t.
            generator (`torch.Generator`, *optional*): source of the consistency sampler's re-noising z.
            variance_noise (`torch.Tensor`, *optional*): that z itself, instead of drawing it.
            return_dict (`bool`, defaults to `True`): return a `TutorialSchedulerOutput` rather than a tuple.

        Returns:
            `TutorialSchedulerOutput` or `(prev_sample, pred_original_sample)`.
        """
        tables, i, _, t_prev, next_index = self._locate(timestep)
        self._check_shapes(model_output, sample)
        if variance_noise is not None and generator is not None:
            raise ValueError("Pass at most one of generator and variance_noise to step().")
        if variance_noise is not None and variance_noise.shape != sample.shape:
            raise ValueError(
                f"variance_noise has shape {tuple(variance_noise.shape)}; expected {tuple(sample.shape)}."
            )
        alpha_bar, alpha_bar_prev = tables["alpha_bar"][i], tables["alpha_bar_prev"][i]

        # 1. x̂_0 = f_θ(x_t, t) with the boundary condition built in (module docstring), and ε̂ (DDIM eq. (9)).
        x0, eps = model_output_to_x0_eps(model_output, sample, alpha_bar, self.config.prediction_type)
        x0 = self._keep_in_range(x0)

        # 2. The direction to x_{t'}: the student's ε̂ (DDIM eq. (12), η = 0) or fresh noise (CM Algorithm 1).
        if self.config.distillation == "consistency" and t_prev >= 0:
            eps = variance_noise
            if eps is None:
                eps = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)

        # 3. x_{t'} = √ᾱ_{t'} x̂_0 + √(1-ᾱ_{t'}) · direction.
        prev_sample = (eps * math.sqrt(1.0 - alpha_bar_prev)).add_(x0, alpha=math.sqrt(alpha_bar_prev))
        self._step_index = next_index
        if not return_dict:
            return prev_sample, x0
        return TutorialSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
