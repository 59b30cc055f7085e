"""What every scheduler of this project shares, discrete or continuous: the output of `step`, the β/ᾱ tables, the
checks of the config keys they all have, and diffusers' small helpers (`begin_index`, `step_index`,
`scale_model_input`, `__len__`).

A leaf: it imports only the math. Each `scheduling_tutorial_*.py` file imports it side by side with its base module
and the math (`from .tutorial_scheduler_common import TutorialSchedulerOutput`), so that diffusers' remote-code loader,
which copies only the siblings the named file imports in that form, ships it; the bases import the mixin from it.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers.utils import BaseOutput

from . import tutorial_math as tm


@dataclass
class TutorialSchedulerOutput(BaseOutput):
    """Output of a scheduler step.

    Args:
        prev_sample (`torch.Tensor`): x_{t'}, the sample at the grid's next (less noisy) timestep.
        pred_original_sample (`torch.Tensor`): x̂_0, the model's estimate of the clean sample (after clipping).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class TutorialSchedulerCommon:
    """Mixin under both bases (`TutorialDiscreteScheduler`, `TutorialContinuousScheduler`): the door for the config keys
    every scheduler has, the β/ᾱ tables, and what diffusers' pipelines read from any scheduler.

    A base calls `_check_common_config` first in its `_init_*` method, then its own checks, then `_init_tables`.
    """

    init_noise_sigma = 1.0  # x_T ~ N(0, I) for every variance-preserving schedule
    order = 1

    def _check_common_config(self, min_train_timesteps: int = 1) -> None:
        """Validate `num_train_timesteps`, `prediction_type` and the dynamic-thresholding keys at the door."""
        cfg = self.config
        tm.check_int("num_train_timesteps", cfg.num_train_timesteps, minimum=min_train_timesteps)
        tm.check_choice("prediction_type", cfg.prediction_type, tm.PREDICTION_TYPES)
        if cfg.thresholding and not 0 < cfg.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio={cfg.dynamic_thresholding_ratio!r} must lie in (0, 1].")
        if cfg.thresholding and not cfg.sample_max_value > 0:
            raise ValueError(
                f"sample_max_value={cfg.sample_max_value!r} must be > 0 (the largest threshold; below 1 it is the "
                "threshold itself)."
            )

    def _init_tables(self) -> None:
        """β_t from the config (rescaled to zero terminal SNR when asked), ᾱ_t in float64, diffusers' float32 tables."""
        cfg = self.config
        betas = tm.make_betas(
            cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.trained_betas
        )
        if cfg.rescale_betas_zero_snr:
            betas = tm.rescale_zero_terminal_snr(betas)
        # float64 ᾱ is the truth; the float32 tables are diffusers' compatibility attributes.
        self.alpha_bar = tm.alpha_bar_from_betas(betas)
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = self.alpha_bar.float()

    # ---- the position on the grid (written by the base's set_timesteps, set_begin_index and step) ------------------
    @property
    def begin_index(self) -> Optional[int]:
        """The entry of `timesteps` the sampling loop starts at (set by pipelines with `set_begin_index`)."""
        return self._begin_index

    @property
    def step_index(self) -> Optional[int]:
        """The entry of `timesteps` the next `step` serves (None before the first step, or after an off-grid one)."""
        return self._step_index

    # ---- diffusers' helpers ------------------------------------------------------------------------------------------
    def scale_model_input(
        self, sample: torch.Tensor, timestep: Union[float, torch.Tensor, None] = None
    ) -> torch.Tensor:
        """Identity: variance-preserving models take x_t as it is (kept for interchangeability with Euler & co.)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
