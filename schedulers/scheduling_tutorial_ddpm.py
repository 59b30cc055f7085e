"""DDPM ancestral sampling: x_{t'} ~ p_θ(x_{t'} | x_t) = N(μ̃(x_t, x̂_0), σ_t² I).

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239 (Algorithm 2), with the respaced
grids and variance choices of Nichol & Dhariwal, arXiv:2102.09672.
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
from .tutorial_grids import TIMESTEP_SPACINGS  # noqa: F401  (shipped with this file: the base builds the grid with it)
from .tutorial_math import check_choice, model_output_to_x0, q_posterior_coefs
from .tutorial_scheduler_common import TutorialSchedulerOutput

# σ_t² choices of diffusers' DDPMScheduler, with the same meanings (see `_log_variance`).
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# diffusers clamps β̃ before taking its log (β̃ = 0 on the last step); we keep the same floor.
MIN_POSTERIOR_VARIANCE = 1e-20


class TutorialDDPMScheduler(TutorialDiscreteScheduler, SchedulerMixin, ConfigMixin):
    """DDPM ancestral sampler (Ho et al. 2020, Algorithm 2) on any respaced grid.

    Config keys and meanings are those of diffusers' `DDPMScheduler`, so `from_config` works in both directions.

    Args:
        num_train_timesteps (`int`, defaults to 1000): T.
        beta_start (`float`, defaults to 0.0001): β_1 of the linear-type schedules.
        beta_end (`float`, defaults to 0.02): β_T of the linear-type schedules.
        beta_schedule (`str`, defaults to `"linear"`): one of `linear`, `scaled_linear`, `squaredcos_cap_v2`,
            `sigmoid`, `laplace`.
        trained_betas (`list[float]`, *optional*): explicit β_t, overriding `beta_schedule`.
        variance_type (`str`, defaults to `"fixed_small"`): σ_t² of the reverse step. `fixed_small`: β̃_t (the
            posterior variance); `fixed_large`: β_t; `*_log`: the same, interpolated in log space; `learned`: the
            model outputs σ_t² in extra channels; `learned_range`: the model outputs v ∈ [-1, 1] and
            log σ_t² = ½(1+v) log β_t + ½(1-v) log β̃_t (improved DDPM eq. (15)).
        clip_sample (`bool`, defaults to `True`): clip x̂_0 to [-clip_sample_range, clip_sample_range].
        prediction_type (`str`, defaults to `"epsilon"`): what the model predicts: `epsilon`, `sample` or
            `v_prediction`.
        thresholding (`bool`, defaults to `False`): Imagen's dynamic thresholding of x̂_0 (wins over clipping).
        dynamic_thresholding_ratio (`float`, defaults to 0.995): the quantile of |x̂_0| used as the threshold.
        clip_sample_range (`float`, defaults to 1.0): the clipping bound.
        sample_max_value (`float`, defaults to 1.0): the largest threshold dynamic thresholding may use.
        timestep_spacing (`str`, defaults to `"leading"`): `leading`, `linspace` or `trailing` grid.
        steps_offset (`int`, defaults to 0): added to the `leading` grid.
        rescale_betas_zero_snr (`bool`, defaults to `False`): rescale to zero terminal SNR (needs a prediction type
            other than `epsilon`; see the README).
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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._init_schedule()
        self.variance_type = variance_type

    def _tabulate(self, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor) -> dict:
        # (c_0, c_t) of DDPM eq. (7), log β̃ (floored as diffusers does) and log β of the (respaced) step.
        coef_x0, coef_xt, posterior_variance = q_posterior_coefs(alpha_bar, alpha_bar_prev)
        return {
            "alpha_bar": alpha_bar.tolist(),
            "coef_x0": coef_x0.tolist(),
            "coef_xt": coef_xt.tolist(),
            "log_small": posterior_variance.clamp(min=MIN_POSTERIOR_VARIANCE).log().tolist(),
            "log_large": torch.log(1.0 - alpha_bar / alpha_bar_prev).tolist(),
        }

    def _log_variance(self, tables: dict, i: int, predicted_variance: Optional[torch.Tensor]):
        """log σ_t² of row i of `tables` as a float (fixed types) or a tensor (learned types)."""
        kind = self.variance_type
        if kind in ("fixed_small", "fixed_small_log"):
            return tables["log_small"][i]  # σ² = β̃_t, DDPM Sec. 3.2
        if kind in ("fixed_large", "fixed_large_log"):
            return tables["log_large"][i]  # σ² = β_t, DDPM Sec. 3.2 (diffusers' fixed_large_log is NaN)
        if kind == "learned":
            return torch.log(predicted_variance)  # the model outputs σ² itself (diffusers' meaning)
        frac = (predicted_variance + 1) / 2  # improved DDPM eq. (15)
        return frac * tables["log_large"][i] + (1 - frac) * tables["log_small"][i]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[TutorialSchedulerOutput, Tuple]:
        """Sample x_{t'} ~ p_θ(x_{t'} | x_t), t' the grid's next timestep (DDPM Algorithm 2, line 4).

        Args:
            model_output (`torch.Tensor`): the network's output at (x_t, t); with a learned variance type, twice the
                channels of `sample` (prediction first, variance second).
            timestep (`int`): t, an integer timestep: on the grid it steps to the grid's next timestep, off it to
                t - T//N (diffusers' rule; see the module docstring of `tutorial_discrete_base`).
            sample (`torch.Tensor`): x_t.
            generator (`torch.Generator`, *optional*): source of the step's noise z.
            return_dict (`bool`, defaults to `True`): return a `TutorialSchedulerOutput` rather than a tuple.

        Returns:
            `TutorialSchedulerOutput` or `(prev_sample, pred_original_sample)`.
        """
        tables, i, t, _, next_index = self._locate(timestep)
        learned = self.variance_type in LEARNED_VARIANCE_TYPES
        if learned:
            if model_output.shape[1:2] != (2 * sample.shape[1],):
                raise ValueError(
                    f"variance_type={self.variance_type!r} needs model_output with 2 x {sample.shape[1]} channels "
                    f"(prediction and variance); got shape {tuple(model_output.shape)} for a sample of shape "
                    f"{tuple(sample.shape)}."
                )
            self._check_shapes(model_output, sample, channels_factor=2)
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            self._check_shapes(model_output, sample)
            predicted_variance = None

        # 1. x̂_0 from the network's output (DDPM eq. (15) for ε; Salimans & Ho App. D for v), then clip.
        x0 = model_output_to_x0(model_output, sample, tables["alpha_bar"][i], self.config.prediction_type)
        x0 = self._keep_in_range(x0)

        # 2. Posterior mean μ̃_t(x_t, x̂_0) = c_0 x̂_0 + c_t x_t (DDPM eq. (7)).
        prev_sample = (sample * tables["coef_xt"][i]).add_(x0, alpha=tables["coef_x0"][i])

        # 3. Add σ_t z for t > 0 (Algorithm 2: z = 0 only at t = 0).
        if t > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            log_variance = self._log_variance(tables, i, predicted_variance)
            if torch.is_tensor(log_variance):
                prev_sample = prev_sample + torch.exp(0.5 * log_variance) * noise
            else:
                prev_sample.add_(noise, alpha=math.exp(0.5 * log_variance))

        self._step_index = next_index
        if not return_dict:
            return prev_sample, x0
        return TutorialSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
