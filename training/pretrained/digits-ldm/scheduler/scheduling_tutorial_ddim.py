"""DDIM: the η-family of non-Markovian reverse steps, and its deterministic inverse (DDIM inversion).

Song, Meng & Ermon, "Denoising Diffusion Implicit Models", arXiv:2010.02502. η = 1 recovers DDPM's posterior
variance (eq. (16)); η = 0 is the deterministic sampler, an Euler step of the probability-flow ODE in the variables
(x/√ᾱ, σ/√ᾱ) (eq. (14)), which is what makes it invertible.
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
from .tutorial_math import eps_to_x0, model_output_to_x0_eps, q_posterior_coefs, x0_to_eps
from .tutorial_scheduler_common import TutorialSchedulerOutput


class TutorialDDIMScheduler(TutorialDiscreteScheduler, SchedulerMixin, ConfigMixin):
    """DDIM sampler (Song et al. 2020, eq. (12)) with η, plus `inverse_step` for DDIM inversion.

    Config keys and meanings are those of diffusers' `DDIMScheduler`, so `from_config` works in both directions. The
    difference: each step goes to the grid's own next timestep (looked up), never to `t - T // N`, which diffusers
    uses and which is wrong for `trailing` and `linspace` grids whose spacing is not T // N.

    Args:
        num_train_timesteps (`int`, defaults to 1000): T.
        beta_start (`float`, defaults to 0.0001): β_1 of the linear-type schedules.
        beta_end (`float`, defaults to 0.02): β_T of the linear-type schedules.
        beta_schedule (`str`, defaults to `"linear"`): one of `linear`, `scaled_linear`, `squaredcos_cap_v2`,
            `sigmoid`, `laplace`.
        trained_betas (`list[float]`, *optional*): explicit β_t, overriding `beta_schedule`.
        clip_sample (`bool`, defaults to `True`): clip x̂_0 to [-clip_sample_range, clip_sample_range].
        set_alpha_to_one (`bool`, defaults to `True`): ᾱ of the final level x_0 is 1; else ᾱ_0 of the schedule.
        steps_offset (`int`, defaults to 0): added to the `leading` grid.
        prediction_type (`str`, defaults to `"epsilon"`): `epsilon`, `sample` or `v_prediction`.
        thresholding (`bool`, defaults to `False`): Imagen's dynamic thresholding of x̂_0 (wins over clipping).
        dynamic_thresholding_ratio (`float`, defaults to 0.995): the quantile of |x̂_0| used as the threshold.
        clip_sample_range (`float`, defaults to 1.0): the clipping bound.
        sample_max_value (`float`, defaults to 1.0): the largest threshold dynamic thresholding may use.
        timestep_spacing (`str`, defaults to `"leading"`): `leading`, `linspace` or `trailing` grid.
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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_schedule()
        self.final_alpha_cumprod = torch.tensor(self._final_alpha_bar(), dtype=torch.float32)  # diffusers' name

    def _final_alpha_bar(self) -> float:
        # ᾱ of the level "x_0" that the last step lands on (DDIM App. C: ᾱ_0 := 1), or ᾱ of t = 0.
        return 1.0 if self.config.set_alpha_to_one else float(self.alpha_bar[0])

    def _tabulate(self, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor) -> dict:
        # ᾱ_t, ᾱ_{t'} and the DDPM posterior variance β̃ that η scales (DDIM eq. (16)).
        return {
            "alpha_bar": alpha_bar.tolist(),
            "alpha_bar_prev": alpha_bar_prev.tolist(),
            "posterior_variance": q_posterior_coefs(alpha_bar, alpha_bar_prev)[2].tolist(),
        }

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[TutorialSchedulerOutput, Tuple]:
        """Sample x_{t'} from q_σ(x_{t'} | x_t, x̂_0), t' the grid's next timestep (DDIM eq. (12)).

        Args:
            model_output (`torch.Tensor`): the network's output at (x_t, t).
            timestep (`int`): t, an integer timestep: on the grid it steps to the grid's next timestep, off it to
                t - T//N (diffusers' rule; see the module docstring of `tutorial_discrete_base`).
            sample (`torch.Tensor`): x_t.
            eta (`float`, defaults to 0.0): η ≥ 0; σ_t = η √β̃_t (eq. (16)). 0 is deterministic DDIM, 1 is DDPM.
            use_clipped_model_output (`bool`, defaults to `False`): re-derive ε̂ from the clipped x̂_0 (GLIDE).
            generator (`torch.Generator`, *optional*): source of the noise when η > 0.
            variance_noise (`torch.Tensor`, *optional*): the noise z itself, instead of drawing it.
            return_dict (`bool`, defaults to `True`): return a `TutorialSchedulerOutput` rather than a tuple.

        Returns:
            `TutorialSchedulerOutput` or `(prev_sample, pred_original_sample)`.
        """
        tables, i, _, _, next_index = self._locate(timestep)
        self._check_shapes(model_output, sample)
        if not eta >= 0:
            raise ValueError(f"eta={eta!r} must be >= 0 (0: deterministic DDIM, 1: DDPM's posterior variance).")
        if variance_noise is not None and generator is not None:
            raise ValueError("Pass at most one of generator and variance_noise to step().")
        alpha_bar, alpha_bar_prev = tables["alpha_bar"][i], tables["alpha_bar_prev"][i]

        # 1. x̂_0 and ε̂ from the network's output (DDIM eq. (9) and its v/x_0 analogues), then clip.
        x0, eps = model_output_to_x0_eps(model_output, sample, alpha_bar, self.config.prediction_type)
        x0 = self._keep_in_range(x0)
        if use_clipped_model_output:
            eps = x0_to_eps(sample, x0, alpha_bar)

        # 2. σ_t(η) = η √((1-ᾱ_{t'})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t'}) (DDIM eq. (16)).
        sigma_eta = eta * math.sqrt(tables["posterior_variance"][i])

        # 3. x_{t'} = √ᾱ_{t'} x̂_0 + √(1-ᾱ_{t'}-σ²) ε̂ + σ z (DDIM eq. (12)).
        direction = math.sqrt(max(1.0 - alpha_bar_prev - sigma_eta**2, 0.0))
        prev_sample = (eps * direction).add_(x0, alpha=math.sqrt(alpha_bar_prev))
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            elif variance_noise.shape != sample.shape:
                raise ValueError(
                    f"variance_noise has shape {tuple(variance_noise.shape)}; expected {tuple(sample.shape)}."
                )
            prev_sample.add_(variance_noise, alpha=sigma_eta)

        self._step_index = next_index
        if not return_dict:
            return prev_sample, x0
        return TutorialSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def inverse_step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[TutorialSchedulerOutput, Tuple]:
        """Move x_{t'} up to x_t deterministically, the inverse of `step(..., eta=0)` (DDIM inversion, eq. (13)).

        Walk the grid upwards: `for t in reversed(scheduler.timesteps)`, with `sample` at the level
        `previous_timestep(t)` (-1 is x_0) and `model_output` the network evaluated at (sample, t). Reading
        ε̂ = ε_θ(x_{t'}, t) instead of ε_θ(x_t, t) is the usual inversion approximation; its error vanishes as the
        grid is refined. Clipping is not applied: it would make the map non-invertible.

        Args:
            model_output (`torch.Tensor`): the network's output at (x_{t'}, t).
            timestep (`int`): t, the grid timestep to move to.
            sample (`torch.Tensor`): x_{t'}.
            return_dict (`bool`, defaults to `True`): return a `TutorialSchedulerOutput` rather than a tuple.

        Returns:
            `TutorialSchedulerOutput` with `prev_sample` = x_t (the noisier sample) and `pred_original_sample` = x̂_0.
        """
        tables, i, _, _, _ = self._locate(timestep)
        self._check_shapes(model_output, sample)
        alpha_bar, alpha_bar_prev = tables["alpha_bar"][i], tables["alpha_bar_prev"][i]
        # ε̂ read at the model's own time t, then x̂_0 from the current level t' so the map is eq. (12) run backwards.
        eps = model_output_to_x0_eps(model_output, sample, alpha_bar, self.config.prediction_type)[1]
        x0 = eps_to_x0(sample, eps, alpha_bar_prev)
        next_sample = math.sqrt(alpha_bar) * x0 + math.sqrt(1.0 - alpha_bar) * eps  # DDIM eq. (13), reversed
        if not return_dict:
            return next_sample, x0
        return TutorialSchedulerOutput(prev_sample=next_sample, pred_original_sample=x0)
