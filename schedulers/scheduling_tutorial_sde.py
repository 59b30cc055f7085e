"""Score-SDE sampling: reverse-time Euler–Maruyama predictor and Langevin corrector for VP, sub-VP and VE SDEs.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", arXiv:2011.13456:
reverse SDE eq. (6), VP / sub-VP / VE SDEs eqs. (9), (11), (30), predictor–corrector sampling Alg. 1-5.

Each SDE is written in its natural clock τ, in which the drift and diffusion are simplest:

    VP      τ = -log ᾱ = ∫β dt:  dx = -½ x dτ + dw                     x_τ | x_0 ~ N(√ᾱ x_0, (1-ᾱ) I)
    sub-VP  τ = -log ᾱ:          dx = -½ x dτ + √(1 - e^{-2τ}) dw      x_τ | x_0 ~ N(√ᾱ x_0, (1-ᾱ)² I)
    VE      τ = σ²:              dx = dw                                x_τ | x_0 ~ N(x_0, σ² I)

and one reverse Euler–Maruyama step from τ to τ - Δτ is x ← x + (c x + g² ∇log p) Δτ + g √Δτ z, with c = ½ (VP,
sub-VP) or 0 (VE). The VP SDE is the continuous limit of DDPM: its marginals are *exactly* the model's ᾱ(t)
(β(t) = -d log ᾱ/dt; for the linear schedule this is Song's β(t) = β_min + t (β_max - β_min) up to O(β²)).

Driving a VP-trained (DDPM) network. A marginal N(√ᾱ x_0, σ² I) is the VP marginal at the same
λ = log(√ᾱ/σ), scaled by c = √ᾱ / √ᾱ_VP(λ): p(x) = c^{-d} p_VP(x / c). So every grid point is a model λ (placed by
`step_placement` inside the model's range [λ_{T-1}, λ_0]) and the network is called at the fractional timestep t(λ)
of `tutorial_continuous.py` on `scale_model_input(x) = x / c`; then ∇log p(x) = -ε̂ / σ. sub-VP's ᾱ at a model λ
solves √ᾱ / (1 - ᾱ) = e^{λ}; VE's σ is e^{-λ} (σ ∈ [e^{-λ_0}, e^{-λ_{T-1}}], so VE starts at
`init_noise_sigma` = σ_max). The last entry of the grid (t = 0) returns the denoised x̂_0 (Song's "denoise").
"""

import math
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from .tutorial_continuous import TutorialContinuousScheduler
from .tutorial_grids import half_log_snr_at
from .tutorial_math import alpha_bar_from_log_snr, check_choice, check_int, entry_index, expand_to
from .tutorial_scheduler_common import TutorialSchedulerOutput

SDE_TYPES = ("vp", "subvp", "ve")
CORRECTORS = ("langevin", "none")


def sde_marginal(sde_type: str, half_log_snr: torch.Tensor):
    """(√ᾱ, σ, τ, g²) of the SDE's marginal at the model's λ: mean coefficient, std, natural clock, diffusion²."""
    half_log_snr = half_log_snr.to(torch.float64)
    if sde_type == "vp":
        alpha_bar = alpha_bar_from_log_snr(2 * half_log_snr)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), -torch.log(alpha_bar), torch.ones_like(half_log_snr)
    if sde_type == "subvp":
        r = torch.exp(half_log_snr)
        sqrt_alpha_bar = (torch.sqrt(1 + 4 * r * r) - 1) / (2 * r)  # root of r ᾱ + √ᾱ - r = 0 (√ᾱ/(1-ᾱ) = r)
        alpha_bar = sqrt_alpha_bar**2
        return sqrt_alpha_bar, 1 - alpha_bar, -torch.log(alpha_bar), 1 - alpha_bar**2  # g² = 1 - e^{-2τ}, eq. (11)
    sigma = torch.exp(-half_log_snr)  # "ve"
    return torch.ones_like(half_log_snr), sigma, sigma**2, torch.ones_like(half_log_snr)


class TutorialScoreSDEScheduler(TutorialContinuousScheduler, SchedulerMixin, ConfigMixin):
    """Predictor–corrector sampler of the reverse VP / sub-VP / VE SDE (Song et al. 2021, Alg. 1-5).

    `set_timesteps(N)` builds N grid points from t = T-1 to t = 0. At each of the first N - 1 points the loop makes
    `n_corrector_steps` Langevin corrector evaluations and one Euler–Maruyama predictor evaluation (the timestep is
    repeated in `self.timesteps`); the last point returns x̂_0. Model evaluations: (N-1)(1 + n_corrector_steps) + 1.

    Args:
        num_train_timesteps (`int`, defaults to 1000): T.
        beta_start (`float`, defaults to 0.0001): β_1 of the linear-type schedules.
        beta_end (`float`, defaults to 0.02): β_T of the linear-type schedules.
        beta_schedule (`str`, defaults to `"linear"`): one of `tutorial_math.BETA_SCHEDULES`.
        trained_betas (`list[float]`, *optional*): explicit β_t, overriding `beta_schedule`.
        prediction_type (`str`, defaults to `"epsilon"`): what the (VP, DDPM-trained) network predicts.
        sde_type (`str`, defaults to `"vp"`): `vp`, `subvp` or `ve`.
        corrector (`str`, defaults to `"none"`): `langevin` (Song Alg. 4/5) or `none` (predictor only).
        snr (`float`, defaults to 0.16): the corrector's target signal-to-noise ratio r (Alg. 4/5), > 0.
        n_corrector_steps (`int`, defaults to 1): corrector steps per grid point when `corrector="langevin"`.
        step_placement (`str`, defaults to `"time_uniform"`): `logsnr`, `karras` or `time_uniform` (Song's
            uniform t for VP).
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
        sde_type: str = "vp",
        corrector: str = "none",
        snr: float = 0.16,
        n_corrector_steps: int = 1,
        step_placement: str = "time_uniform",
        rho: float = 7.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("sde_type", sde_type, SDE_TYPES)
        check_choice("corrector", corrector, CORRECTORS)
        if not (isinstance(snr, (int, float)) and snr > 0 and math.isfinite(snr)):
            raise ValueError(f"snr={snr!r} must be a finite number > 0 (Song et al. use 0.075-0.17).")
        check_int("n_corrector_steps", n_corrector_steps, minimum=0)
        self._init_continuous_schedule()
        _, sigma, _, _ = sde_marginal(sde_type, self.half_log_snr[-1:])
        self.init_noise_sigma = float(sigma[0])  # std of x_{T-1}: ~1 for VP / sub-VP, σ_max for VE
        # Entries of `timesteps` per grid point (correctors, then the predictor): what diffusers' pipelines read as
        # `order` when they start part-way, `timesteps[t_start * order:]`.
        self.order = 1 + (n_corrector_steps if corrector == "langevin" else 0)

    def _tabulate_grid(self, grid: torch.Tensor, half_log_snr: torch.Tensor, device) -> None:
        """Each grid point's SDE coefficients, and the (grid point, role) of every loop entry."""
        sqrt_alpha_bar, sigma, tau, g2 = sde_marginal(self.config.sde_type, half_log_snr)
        alpha_bar_vp = alpha_bar_from_log_snr(2 * half_log_snr)
        # Song's corrector step size uses α_i = 1 - β_i of the discrete VP chain (Alg. 5); 1 for VE (Alg. 4).
        if self.config.sde_type == "ve":
            langevin_alpha = torch.ones_like(half_log_snr)
        else:
            langevin_alpha = (alpha_bar_vp / self.alpha_bar_at((grid - 1).clamp(min=0))).clamp(max=1.0)
            langevin_alpha[-1] = float(self.alpha_bar[0])
        # Entry j: grid point j // order, a corrector while j % order < order - 1, else the predictor; the last entry
        # (t = 0) returns x̂_0.
        entries = torch.cat([grid[:-1].repeat_interleave(self.order), grid[-1:]])
        # ---- the one block of mutable state ----------------------------------------------------------------------
        self._use_entries(entries, list(range(0, entries.numel(), self.order)), int(grid.numel()), device)
        self._alpha_bar_vp = alpha_bar_vp.tolist()
        self._scale = (sqrt_alpha_bar / alpha_bar_vp.sqrt()).tolist()  # c: x_VP = x / c
        self._sigma = sigma.tolist()
        self._tau = tau.tolist()
        self._g2 = g2.tolist()
        self._langevin_alpha = langevin_alpha.tolist()
        self._grid_index = dict(zip(grid.tolist(), range(grid.numel())))

    def scale_model_input(self, sample: torch.Tensor, timestep: Union[float, torch.Tensor, None] = None):
        """x / c: the VP state with the same λ, what the DDPM-trained network expects (identity for VP)."""
        if timestep is None or self.config.sde_type == "vp":
            return sample
        return sample / self._scale[self._grid_point(timestep)]

    def _grid_point(self, timestep: Union[float, torch.Tensor]) -> int:
        """The grid point of `timestep`: an entry of `self.timesteps` by its position (as `step` finds it: a device
        tensor is not read), any other timestep (a number, a host tensor) by its value."""
        self._ensure_grid()
        j = entry_index(timestep, self.timesteps)
        if j is not None and len(self._entry_t) == len(self.timesteps):
            return j // self.order  # entry j serves grid point j // order (the last entry: the last point)
        i = self._grid_index.get(float(timestep))
        if i is None:
            raise ValueError(f"timestep={float(timestep)} is not on the grid set by set_timesteps.")
        return i

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Sample from this SDE's marginal at t: α(λ(t)) x_0 + σ(λ(t)) ε (the perturbation kernel of the SDE).

        The state this scheduler steps is in the SDE's own scale (VE: x_0 + σ ε), so img2img and inpainting noise an
        image with this, not with the VP q(x_t | x_0) (which it equals for `sde_type="vp"`).

        Args:
            original_samples (`torch.Tensor`): x_0, shape (B, ...).
            noise (`torch.Tensor`): ε ~ N(0, I), same shape.
            timesteps (`torch.Tensor`): t per sample, shape (B,), or a scalar, in [0, T-1] (fractional allowed).

        Returns:
            `torch.Tensor`: x_t in the SDE's scale.
        """
        half_log_snr = half_log_snr_at(torch.as_tensor(timesteps).cpu(), self.half_log_snr)
        sqrt_alpha_bar, sigma, _, _ = sde_marginal(self.config.sde_type, half_log_snr)
        x = original_samples
        return expand_to(sqrt_alpha_bar.to(x.device), x) * x + expand_to(sigma.to(x.device), x) * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[TutorialSchedulerOutput, Tuple]:
        """One Langevin corrector step (Alg. 4/5), one reverse Euler–Maruyama step (eq. (6)), or the final x̂_0.

        Args:
            model_output (`torch.Tensor`): the network's output at (`scale_model_input(sample, t)`, t).
            timestep (`float`): the next entry of `self.timesteps` (or the first entry of a grid point to start at).
            sample (`torch.Tensor`): x in the SDE's own scale.
            generator (`torch.Generator`, *optional*): source of the Gaussian noise z.
            return_dict (`bool`, defaults to `True`): return a `TutorialSchedulerOutput` rather than a tuple.

        Returns:
            `TutorialSchedulerOutput` (`prev_sample` is the new x; `pred_original_sample` is x̂_0) or a tuple.
        """
        j, _ = self._walk(timestep)
        i, r = divmod(j, self.order)
        role = "denoise" if j == len(self._entry_t) - 1 else ("corrector" if r < self.order - 1 else "predictor")
        c = self._scale[i]
        x0, eps = self._x0_eps(model_output, sample / c, self._alpha_bar_vp[i])
        if role == "denoise":
            return (x0, x0) if not return_dict else TutorialSchedulerOutput(prev_sample=x0, pred_original_sample=x0)
        score = -eps / self._sigma[i]  # ∇log p(x) = (1/c) ∇log p_VP(x/c) = -ε̂ / σ
        z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        if role == "corrector":
            # Song Alg. 4/5: ε = 2 α (r ‖z‖ / ‖∇log p‖)², x ← x + ε ∇log p + √(2ε) z. As in Song et al.'s code the
            # norms are batch means of per-sample norms: a per-sample ratio explodes where a sample's score ≈ 0.
            z_norm = z.reshape(z.shape[0], -1).norm(dim=1).mean()
            score_norm = score.reshape(score.shape[0], -1).norm(dim=1).mean().clamp(min=1e-30)
            step_size = 2 * self._langevin_alpha[i] * (self.config.snr * z_norm / score_norm) ** 2  # on the device
            prev_sample = sample + step_size * score + torch.sqrt(2 * step_size) * z
        else:
            # Reverse-SDE Euler–Maruyama in the natural clock τ (eq. (6)): x ← x + (c_f x + g² ∇log p) Δτ + g √Δτ z.
            d_tau = self._tau[i] - self._tau[i + 1]
            drift_coef = 0.0 if self.config.sde_type == "ve" else 0.5
            g2 = self._g2[i]
            prev_sample = sample + (drift_coef * sample + g2 * score) * d_tau + math.sqrt(g2 * d_tau) * z
        if not return_dict:
            return prev_sample, x0
        return TutorialSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
