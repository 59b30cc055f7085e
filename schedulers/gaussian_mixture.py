"""Gaussian-mixture data with an exact score at every noise level: the ground truth our samplers are tested against.

If x_0 ~ Σ_k π_k N(μ_k, diag(s_k²)), then under q(x_t | x_0) = N(√ᾱ x_0, (1-ᾱ) I) the noisy marginal is again a
mixture, Σ_k π_k N(√ᾱ μ_k, diag(ᾱ s_k² + 1 - ᾱ)), so log q_t, its score ∇ log q_t and the optimal ε-, x_0- and
v-predictions (Tweedie: ε* = -√(1-ᾱ) ∇ log q_t) are all closed-form. Everything is float64.
"""

import math
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch

from . import tutorial_grids as grids
from . import tutorial_math as tm


class GaussianMixture:
    """Σ_k π_k N(μ_k, diag(s_k²)) in D dimensions, with its exact diffused marginals.

    Args:
        weights (`torch.Tensor`): π, shape (K,), positive (normalised here).
        means (`torch.Tensor`): μ, shape (K, D).
        variances (`torch.Tensor`): s², shape (K, D) or (K,) (isotropic per component), positive.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K, D = self.means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64)
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if variances.ndim == 1:
            variances = variances[:, None].expand(K, D)
        if weights.shape != (K,) or variances.shape != (K, D):
            raise ValueError(f"weights must be ({K},) and variances ({K}, {D}) or ({K},) for means of shape {(K, D)}.")
        if not bool((weights > 0).all() and (variances > 0).all()):
            raise ValueError("weights and variances must be positive.")
        self.weights = weights / weights.sum()
        self.variances = variances.contiguous()
        self.dim = D

    # ---- presets ---------------------------------------------------------------------------------------------------
    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 0.7, std: float = 0.05) -> "GaussianMixture":
        """The 2-D ring of `num_modes` equal Gaussians, the field's favourite toy (inside [-1, 1]²)."""
        angle = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        return cls(torch.ones(num_modes), means, torch.full((num_modes,), std**2))

    @classmethod
    def random(cls, dim: int = 64, num_modes: int = 5, seed: int = 0, scale: float = 0.5) -> "GaussianMixture":
        """A random D-dimensional mixture with unequal weights and anisotropic diagonal covariances."""
        g = torch.Generator().manual_seed(seed)
        means = scale * (2 * torch.rand(num_modes, dim, generator=g, dtype=torch.float64) - 1)
        variances = (0.02 + 0.08 * torch.rand(num_modes, dim, generator=g, dtype=torch.float64)) ** 2
        weights = 0.5 + torch.rand(num_modes, generator=g, dtype=torch.float64)
        return cls(weights, means, variances)

    # ---- the data distribution -------------------------------------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n exact samples of x_0, shape (n, D)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.variances[k].sqrt() * z

    def _marginal(self, alpha_bar):
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
        if alpha_bar.ndim == 0:
            alpha_bar = alpha_bar[None]
        a = alpha_bar[:, None, None]  # (B or 1, 1, 1)
        mean = a.sqrt() * self.means  # (B, K, D)
        var = a * self.variances + (1 - a)  # (B, K, D)
        return mean, var

    def _component_terms(self, x: torch.Tensor, alpha_bar):
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        mean, var = self._marginal(alpha_bar)
        diff = x[:, None, :] - mean  # (B, K, D)
        log_comp = -0.5 * ((diff**2 / var) + var.log() + math.log(2 * math.pi)).sum(-1) + self.weights.log()
        return diff, var, log_comp

    def log_prob(self, x: torch.Tensor, alpha_bar=1.0) -> torch.Tensor:
        """log q_t(x) of the diffused marginal at ᾱ (ᾱ = 1: the data density), shape (B,)."""
        _, _, log_comp = self._component_terms(x, alpha_bar)
        return torch.logsumexp(log_comp, dim=1)

    def score(self, x: torch.Tensor, alpha_bar) -> torch.Tensor:
        """∇_x log q_t(x) at ᾱ (a float or one value per sample), same shape and dtype as x."""
        diff, var, log_comp = self._component_terms(x, alpha_bar)
        resp = torch.softmax(log_comp, dim=1)[:, :, None]  # posterior responsibility of each component
        return (-(resp * diff / var).sum(1)).reshape(x.shape).to(x.dtype)

    def eps(self, x: torch.Tensor, alpha_bar) -> torch.Tensor:
        """The optimal ε-prediction E[ε | x_t] = -√(1-ᾱ) ∇ log q_t(x_t) (Tweedie)."""
        return tm.score_to_eps(self.score(x, alpha_bar), torch.as_tensor(alpha_bar, dtype=torch.float64))

    def model(self, alpha_bar_table: torch.Tensor, prediction_type: str = "epsilon") -> Callable:
        """A stand-in for a perfectly trained network: `model(x_t, t) -> ε*, x_0* or v*`.

        At integer t it reads ᾱ_t from the table; at fractional t (continuous-time samplers) it uses the continuous
        schedule of `tutorial_grids.alpha_bar_at` (λ linear between integers), so it is exact for every t.

        Args:
            alpha_bar_table (`torch.Tensor`): ᾱ indexed by the integer timestep (a scheduler's `alpha_bar`).
            prediction_type (`str`): what the network predicts, one of `tutorial_math.PREDICTION_TYPES`.
        """
        tm.check_choice("prediction_type", prediction_type, tm.PREDICTION_TYPES)
        table = torch.as_tensor(alpha_bar_table, dtype=torch.float64)
        half_log_snr_table = tm.half_log_snr(table)

        def predict(x_t: torch.Tensor, t) -> torch.Tensor:
            t = torch.as_tensor(t, dtype=torch.float64)
            if bool((t == t.round()).all()):  # the table itself, bit for bit
                alpha_bar = table[t.long()] if t.ndim == 0 else table[t.long().flatten()]
            else:
                alpha_bar = tm.alpha_bar_from_log_snr(
                    2 * grids.half_log_snr_at(t.flatten() if t.ndim else t, half_log_snr_table)
                )
            if alpha_bar.ndim == 1 and alpha_bar.numel() == 1:
                alpha_bar = alpha_bar[0]
            eps = self.eps(x_t, alpha_bar)
            if prediction_type == "epsilon":
                return eps
            x0 = tm.eps_to_x0(x_t.to(torch.float64), eps.to(torch.float64), alpha_bar).to(x_t.dtype)
            if prediction_type == "sample":
                return x0
            return tm.velocity(x0, eps, alpha_bar)

        return predict

    def as_unet(
        self, alpha_bar_table: torch.Tensor, sample_shape: Sequence[int], prediction_type: str = "epsilon"
    ) -> "ExactMixtureUNet":
        """`model(...)` behind the calling convention of diffusers' `UNet2DModel`, for pipelines.

        Args:
            alpha_bar_table (`torch.Tensor`): ᾱ indexed by the integer timestep (a scheduler's `alpha_bar`).
            sample_shape (`tuple`): (channels, height, width) of one sample; their product must be the mixture's D.
            prediction_type (`str`): what the stand-in network predicts, one of `tutorial_math.PREDICTION_TYPES`.
        """
        return ExactMixtureUNet(self, alpha_bar_table, sample_shape, prediction_type)


class ExactMixtureUNet(torch.nn.Module):
    """A perfectly trained "UNet" for mixture data: `unet(x_t, t).sample` is the exact prediction, in float64.

    Pipelines read `config.in_channels`, `config.sample_size`, `dtype` and `device` from their UNet; this module has
    all four, so every pipeline of the project can sample or invert mixture data with no training noise.
    """

    def __init__(self, mixture: GaussianMixture, alpha_bar_table, sample_shape: Sequence[int], prediction_type: str):
        super().__init__()
        channels, height, width = (int(n) for n in sample_shape)
        if channels * height * width != mixture.dim:
            raise ValueError(
                f"sample_shape={tuple(sample_shape)} holds {channels * height * width} values; "
                f"the mixture has D = {mixture.dim}."
            )
        if height != width:
            raise ValueError(f"sample_shape={tuple(sample_shape)} must be square, like UNet2DModel's sample_size.")
        self.predict = mixture.model(alpha_bar_table, prediction_type)
        self.config = SimpleNamespace(
            in_channels=channels, out_channels=channels, sample_size=height, num_class_embeds=None
        )
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))  # carries dtype and device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        out = self.predict(sample.reshape(sample.shape[0], -1), timestep).reshape(sample.shape)
        return SimpleNamespace(sample=out) if return_dict else (out,)
