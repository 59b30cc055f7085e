"""Gaussian-mixture data with an exact score at every noise level: the ground truth our samplers are tested against.

If x_0 ~ Σ_k π_k N(μ_k, diag(s_k²)), then under q(x_t | x_0) = N(√ᾱ x_0, (1-ᾱ) I) the noisy marginal is again a
mixture, Σ_k π_k N(√ᾱ μ_k, diag(ᾱ s_k² + 1 - ᾱ)), so log q_t, its score ∇ log q_t and the optimal ε-, x_0- and
v-predictions (Tweedie: ε* = -√(1-ᾱ) ∇ log q_t) are all closed-form. Everything is float64.

A component may also have a full covariance Σ_k (the posterior of a linear measurement has one): in its eigenbasis,
Σ_k = U_k diag(λ_k) U_kᵀ, the marginal covariance ᾱ Σ_k + (1-ᾱ) I = U_k diag(ᾱ λ_k + 1 - ᾱ) U_kᵀ is diagonal again,
so the same formulas hold in each component's rotated coordinates. `posterior_given` is the exact p(x_0 | y) of
y = A x_0 + σ_y n (the truth for restoration methods), and `sliced_wasserstein` compares two sample sets.
"""

import math
import numbers
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch

from . import tutorial_grids as grids
from . import tutorial_math as tm


class GaussianMixture:
    """Σ_k π_k N(μ_k, Σ_k) in D dimensions, with its exact diffused marginals.

    Args:
        weights (`torch.Tensor`): π, shape (K,), positive (normalised here).
        means (`torch.Tensor`): μ, shape (K, D).
        variances (`torch.Tensor`): the covariances Σ_k: shape (K, D) for diag(s_k²) or (K,) for s_k² I, positive; or
            shape (K, D, D) for full covariances, symmetric positive semi-definite. A singular Σ_k (a posterior given a
            noiseless measurement) has no density at ᾱ = 1, so `log_prob` and `score` need ᾱ < 1 there; sampling and
            every ᾱ < 1 are exact.

    Attributes:
        variances (`torch.Tensor`): (K, D), the per-coordinate variances diag(Σ_k).
        basis, spectrum (`torch.Tensor`): U_k (K, D, D) and λ_k (K, D) with Σ_k = U_k diag(λ_k) U_kᵀ; `basis` is None
            for diagonal covariances (then λ_k = `variances`).
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K, D = self.means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64)
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if variances.ndim == 1:
            variances = variances[:, None].expand(K, D)
        if weights.shape != (K,) or variances.shape not in ((K, D), (K, D, D)):
            raise ValueError(
                f"weights must be ({K},) and variances ({K}, {D}), ({K},) or ({K}, {D}, {D}) for means of shape "
                f"{(K, D)}."
            )
        self.basis = None  # U_k, (K, D, D): the eigenvectors of full covariances; None when they are diagonal
        if variances.ndim == 3:
            if not bool(torch.isfinite(variances).all()):
                raise ValueError("variances (full covariances) must be finite.")
            variances = 0.5 * (variances + variances.transpose(1, 2))
            spectrum, self.basis = torch.linalg.eigh(variances)  # Σ_k = U_k diag(λ_k) U_kᵀ
            # λ within rounding of 0 (numpy's matrix_rank tolerance, D · eps · max λ) is 0: a singular Σ_k stays so.
            tol = D * torch.finfo(torch.float64).eps * spectrum.abs().amax(dim=1, keepdim=True)
            if bool((spectrum < -tol).any()):
                raise ValueError(
                    f"variances must be positive semi-definite; an eigenvalue is {spectrum.min().item():.3g}."
                )
            self.spectrum = torch.where(spectrum < tol, torch.zeros_like(spectrum), spectrum)
            variances = variances.diagonal(dim1=1, dim2=2)
        elif not bool((variances > 0).all()):
            raise ValueError("weights and variances must be positive.")
        if not bool((weights > 0).all()):
            raise ValueError("weights and variances must be positive.")
        self.weights = weights / weights.sum()
        self.variances = variances.contiguous()
        if self.basis is None:
            self.spectrum = self.variances  # λ_k: the variances along each component's own axes
        self.dim = D

    @property
    def covariances(self) -> torch.Tensor:
        """Σ_k = U_k diag(λ_k) U_kᵀ, shape (K, D, D) (built on request: diagonal mixtures never store it)."""
        if self.basis is None:
            return torch.diag_embed(self.variances)
        return self.basis @ (self.spectrum[:, :, None] * self.basis.transpose(1, 2))

    @property
    def mean(self) -> torch.Tensor:
        """E[x_0] = Σ_k π_k μ_k, shape (D,)."""
        return self.weights @ self.means

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
        z = self.spectrum[k].sqrt() * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        if self.basis is not None:
            z = torch.einsum("nde,ne->nd", self.basis[k], z)  # x = μ_k + U_k diag(√λ_k) z
        return self.means[k] + z

    # ---- the posterior of a linear measurement ----------------------------------------------------------------------
    def posterior_given(self, A: torch.Tensor, y: torch.Tensor, sigma_y: float) -> "GaussianMixture":
        """The exact posterior p(x_0 | y) of y = A x_0 + σ_y n, n ~ N(0, I): again a Gaussian mixture.

        Each component conditions like a Gaussian (Bishop, PRML Sec. 2.3.3, eqs. (2.113)-(2.117), in the covariance
        form that eqs. (2.81)-(2.82) give for the joint Gaussian of (x_0, y): the Kalman measurement update), and the
        weights are Bayes' rule on the component label:

            S_k = A Σ_k Aᵀ + σ_y² I,   G_k = Σ_k Aᵀ S_k⁻¹,
            μ̃_k = μ_k + G_k (y - A μ_k),   Σ̃_k = Σ_k - G_k A Σ_k,   w̃_k ∝ π_k N(y; A μ_k, S_k).

        The covariance form needs no σ_y⁻², so σ_y = 0 (a noiseless measurement) is the same formula: S_k⁻¹ is then
        the pseudo-inverse and N(y; A μ_k, S_k) the density on the range of A (a rank-deficient A is fine when y is in
        its range), Σ̃_k is singular and every sample satisfies A x_0 = y to rounding. Weights are kept in log space.

        Args:
            A (`torch.Tensor`): the measurement matrix, shape (m, D), finite.
            y (`torch.Tensor`): one measurement, shape (m,), finite.
            sigma_y (`float`): the noise standard deviation σ_y >= 0.

        Returns:
            `GaussianMixture`: Σ_k w̃_k N(μ̃_k, Σ̃_k) with full covariances (its `mean` is the posterior mean
            Σ_k w̃_k μ̃_k, its `sample`, `log_prob` and `score` are exact); components whose weight underflows to 0 in
            float64 carry no mass and are dropped.
        """
        A = torch.as_tensor(A, dtype=torch.float64)
        if A.ndim != 2 or A.shape[0] < 1 or A.shape[1] != self.dim or not bool(torch.isfinite(A).all()):
            raise ValueError(
                f"A of shape {tuple(A.shape)} must be a finite (m, D) matrix with m >= 1 and D = {self.dim}, the "
                "mixture's dimension."
            )
        m = A.shape[0]
        y = torch.as_tensor(y, dtype=torch.float64)
        if y.shape != (m,) or not bool(torch.isfinite(y).all()):
            raise ValueError(f"y of shape {tuple(y.shape)} must be finite of shape ({m},), one row of A each.")
        if isinstance(sigma_y, bool) or not isinstance(sigma_y, numbers.Real) or not 0 <= float(sigma_y) < math.inf:
            raise ValueError(f"sigma_y={sigma_y!r} must be a finite real number >= 0.")
        sigma_y = float(sigma_y)

        cov = self.covariances  # Σ_k, (K, D, D)
        cov_At = cov @ A.T  # Σ_k Aᵀ, (K, D, m)
        S = A @ cov_At + sigma_y**2 * torch.eye(m, dtype=torch.float64)  # PRML (2.115): Cov[y | k]
        S = 0.5 * (S + S.transpose(1, 2))
        s, V = torch.linalg.eigh(S)
        if sigma_y > 0:
            kept = torch.ones_like(s, dtype=torch.bool)
        else:  # S_k⁺: eigenvalues within rounding of 0 (numpy's matrix_rank tolerance) are the null space of Aᵀ
            kept = s > m * torch.finfo(torch.float64).eps * s.abs().amax(dim=1, keepdim=True)
        inv_s = torch.where(kept, 1 / torch.where(kept, s, torch.ones_like(s)), torch.zeros_like(s))
        residual = y - self.means @ A.T  # y - A μ_k, (K, m)
        r = torch.einsum("kij,ki->kj", V, residual)  # Vᵀ (y - A μ_k)
        if sigma_y == 0:  # y - A μ_k must lie in range(S_k) = range(A), up to a relative 1e-8 of rounding
            off_range = (r * ~kept).norm(dim=1)
            scale = residual.norm(dim=1) + y.norm() + s.amax(dim=1).sqrt()
            if bool((off_range > 1e-8 * scale).any()):
                raise ValueError("y is not in the range of A, so sigma_y=0 is impossible; give sigma_y > 0.")
        rank = kept.sum(dim=1).to(torch.float64)
        log_det = torch.where(kept, s, torch.ones_like(s)).log().sum(1)  # the (pseudo-)determinant of S_k
        # PRML (2.115): log N(y; A μ_k, S_k), on the range of S_k
        log_lik = -0.5 * ((r**2 * inv_s).sum(1) + log_det + rank * math.log(2 * math.pi))
        log_w = self.weights.log() + log_lik
        weights = (log_w - torch.logsumexp(log_w, dim=0)).exp()  # w̃_k ∝ π_k N(y; A μ_k, S_k)
        gain = cov_At @ (V * inv_s[:, None, :]) @ V.transpose(1, 2)  # G_k = Σ_k Aᵀ S_k⁻¹ (Kalman gain)
        means = self.means + torch.einsum("kdm,km->kd", gain, residual)  # PRML (2.81): μ̃_k = μ_k + G_k (y - A μ_k)
        covariances = cov - gain @ cov_At.transpose(1, 2)  # PRML (2.82): Σ̃_k = Σ_k - G_k A Σ_k
        alive = weights > 0
        return GaussianMixture(weights[alive], means[alive], covariances[alive])

    def _marginal(self, alpha_bar):
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
        if alpha_bar.ndim == 0:
            alpha_bar = alpha_bar[None]
        a = alpha_bar[:, None, None]  # (B or 1, 1, 1)
        mean = a.sqrt() * self.means  # (B, K, D)
        var = a * self.spectrum + (1 - a)  # (B, K, D), along each component's axes
        return mean, var

    def _component_terms(self, x: torch.Tensor, alpha_bar):
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        mean, var = self._marginal(alpha_bar)
        diff = x[:, None, :] - mean  # (B, K, D)
        if self.basis is not None:
            diff = torch.einsum("bkd,kde->bke", diff, self.basis)  # U_kᵀ (x - √ᾱ μ_k)
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
        pull = resp * diff / var
        if self.basis is not None:
            pull = torch.einsum("kde,bke->bkd", self.basis, pull)  # back from each component's axes: U_k (...)
        return (-pull.sum(1)).reshape(x.shape).to(x.dtype)

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


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The sliced Wasserstein-2 distance between the empirical measures of two sample sets.

    SW_2(x, y)² = E_θ W_2(θᵀx, θᵀy)² over directions θ uniform on the sphere (Rabin et al. 2011; Bonneel et al.
    2015), the expectation estimated with `num_projections` random directions and each 1-D W_2 computed exactly: in
    1-D the optimal coupling is monotone, W_2² = ∫_0^1 (F⁻¹(u) - G⁻¹(u))² du (Villani 2003, ch. 2), and both empirical
    quantile functions are constant between the levels i/n and j/n', so sample counts may differ. For a shift,
    y = x + δ, SW_2² = |δ|² / D.

    Args:
        x (`torch.Tensor`): n samples, shape (n, D).
        y (`torch.Tensor`): n' samples, shape (n', D).
        num_projections (`int`): how many random directions θ.
        generator (`torch.Generator`, *optional*): draws the directions.

    Returns:
        `torch.Tensor`: SW_2, a float64 scalar (its square is the mean over directions of the squared 1-D W_2).
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(x.shape[0], y.shape[0]) < 1:
        raise ValueError(
            f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)} must be (n, D) and (n', D) sample sets with "
            "the same D and n, n' >= 1."
        )
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x and y must be finite.")
    num_projections = tm.check_int("num_projections", num_projections)
    n, n_y = x.shape[0], y.shape[0]
    # the levels where either empirical quantile function jumps, and the index each takes on the interval below
    steps = [torch.arange(1, count + 1, dtype=torch.float64) / count for count in (n, n_y)]
    levels = torch.unique(torch.cat(steps))
    width = torch.diff(levels, prepend=levels.new_zeros(1))
    middle = levels - width / 2
    index_x = (middle * n).long().clamp(max=n - 1)
    index_y = (middle * n_y).long().clamp(max=n_y - 1)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)  # uniform on the sphere
    squared = []
    for chunk in theta.split(max(1, 2**22 // max(n, n_y)), dim=1):  # memory: at most 2²² projected values a chunk
        x_sorted = (x @ chunk).sort(dim=0).values
        y_sorted = (y @ chunk).sort(dim=0).values
        squared.append((width[:, None] * (x_sorted[index_x] - y_sorted[index_y]) ** 2).sum(0))  # W_2² per θ
    return torch.cat(squared).mean().sqrt()
