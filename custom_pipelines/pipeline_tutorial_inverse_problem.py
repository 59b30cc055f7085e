"""Restoring images from linear measurements y = A x_0 + σ_y n with an unconditional UNet2DModel (issue 22, item 2).

Four zero-shot methods, each a short function below, all on the same grid t_1 > ... > t_N (then x_0, ᾱ = 1) and the
same x̂_0 / ε̂ of the network:

- DDNM (Wang et al., arXiv:2212.00490): replace the range-space part of x̂_0 by A⁺y, then take DDIM's step from the
  corrected x̂_0; DDNM+ (its eqs. (17)-(19)) for σ_y > 0 scales the correction and the step's noise per singular value.
- DDRM (Kawar et al., arXiv:2201.11793): the variational sampler of its eqs. (7)-(8), coordinate-wise in the spectral
  space of A = U S Vᵀ, with its η (null space and noisier-than-y coordinates) and η_b (the rest).
- DPS (Chung et al., arXiv:2209.14687, Algorithm 1): the ancestral (or DDIM) step, then a gradient step on
  ‖y − A x̂_0(x_t)‖ taken through the network.
- ΠGDM (Song, Vahdat, Mardani, Kautz, "Pseudoinverse-guided diffusion models for inverse problems", ICLR 2023):
  p(y | x_t) ≈ N(A x̂_0, r_t² A Aᵀ + σ_y² I), r_t² = 1 − ᾱ_t; its gradient, a vector-Jacobian product of the
  (pseudo-inverse-weighted) residual, is added to the model's score and the DDIM step is taken with the result.

The scheduler gives the schedule (its ᾱ table, `alphas_cumprod`), the grid (`set_timesteps`) and the prediction type;
the methods take their own steps, so any variance-preserving scheduler serves (ours or diffusers' DDPM, DDIM,
DPM-Solver, ...), and its `step` is never called. DDIM's step (Song et al., arXiv:2010.02502, eqs. (12) and (16)) is
the common one: at η = 1 it is DDPM's ancestral step (its posterior q(x_{t-1} | x_t, x̂_0)).

This file is shipped inside saved pipeline folders: it imports only torch, numpy, PIL, diffusers and its sibling files.
"""

import math
import numbers
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

# diffusers' remote-code loader copies only the sibling files this file imports, one level deep (DESIGN.md, "Loading
# facts"), so the files `TutorialPipelineBase` is built from are imported here too. The operators are re-exported:
# where only diffusers is installed, `pipe.operators.Inpainting(mask)` builds one from the shipped copy.
from .tutorial_operators import (
    RCOND,
    Blur,
    Colorization,
    Denoising,
    Inpainting,
    LinearOperator,
    OperatorSVD,
    RandomProjection,
    SuperResolution,
)
from .tutorial_pipeline_folder import MODEL_INDEX  # noqa: F401
from .tutorial_pipeline_loading import TutorialLoadingMixin  # noqa: F401
from .tutorial_pipeline_saving import TutorialSavingMixin  # noqa: F401
from .tutorial_pipeline_utils import TutorialPipelineBase, TutorialPipelineOutput

METHODS = ("ddnm", "ddrm", "dps", "pigdm")
GRADIENT_METHODS = ("dps", "pigdm")  # they differentiate x̂_0(x_t) through the network
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# The papers' defaults: DDNM's and DDRM's released configs use η = 0.85 (DDRM: η_b = 1); DPS is ancestral (η = 1);
# ΠGDM samples with DDIM at η = 1. DPS' ζ' = 1 is its experiments' usual step; ΠGDM's 1 is the unscaled gradient.
DEFAULT_ETA = {"ddnm": 0.85, "ddrm": 0.85, "dps": 1.0, "pigdm": 1.0}
DEFAULT_GUIDANCE_SCALE = {"dps": 1.0, "pigdm": 1.0}
DEFAULT_ETA_B = 1.0


# ---- the step every method shares ---------------------------------------------------------------------------------
def model_output_to_x0_eps(model_output, x, alpha_bar: float, prediction_type: str):
    """(x̂_0, ε̂) from the network's output at ᾱ: x_t = √ᾱ x̂_0 + √(1 − ᾱ) ε̂ in every parameterisation."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return (x - s * model_output) / a, model_output  # DDPM eq. (15)
    if prediction_type == "sample":
        return model_output, (x - a * model_output) / s
    return a * x - s * model_output, s * x + a * model_output  # v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho, 2202.00512)


def ddim_sigma(alpha_bar: float, alpha_bar_prev: float, eta: float) -> float:
    """σ = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s): DDIM eq. (16); η = 1 is DDPM's posterior standard deviation."""
    return eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))


def ddim_step(x0, eps, alpha_bar_prev: float, sigma: float, noise):
    """x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε̂ + σ z: DDIM eq. (12), a draw of q_σ(x_s | x_t, x̂_0)."""
    direction = math.sqrt(max(1.0 - alpha_bar_prev - sigma**2, 0.0))
    return math.sqrt(alpha_bar_prev) * x0 + direction * eps + sigma * noise


class Measurement:
    """y = A x_0 + σ_y n for one image shape, with what the methods read from it: y, A, A⁺ and, where needed, the
    spectral view (DDRM sec. 3): coefficients ȳ = S⁺ Uᵀ y over the n entries of `Vt`, the singular values s padded
    with zeros to n, and which coordinates are in A's range (s > RCOND · max s)."""

    def __init__(self, operator, y: torch.Tensor, sigma_y: float, svd: Optional[OperatorSVD]):
        self.operator, self.y, self.sigma_y, self.svd = operator, y, sigma_y, svd
        if svd is not None:
            s = svd.singulars().to(y)
            in_range = s > RCOND * s.abs().max()
            self.s = svd.add_zeros(s[None])[0]  # (n,)
            self.in_range = svd.add_zeros(in_range[None].to(y.dtype))[0] > 0
            s_safe = torch.where(self.in_range, self.s, torch.ones_like(self.s))
            self.s_safe = s_safe
            self.y_bar = torch.where(self.in_range, svd.add_zeros(svd.Ut(y)) / s_safe, torch.zeros_like(self.s))

    def residual(self, x0):
        return self.y - self.operator.A(x0)


# ---- the methods: one function each, x_t -> x_s on one step of the grid --------------------------------------------
def ddnm_step(m: Measurement, x, x0, alpha_bar: float, alpha_bar_prev: float, eta: float, noise):
    """DDNM (2212.00490): x̂_0 ← x̂_0 − A⁺(A x̂_0 − y), then q_σ(x_s | x_t, x̂_0); DDNM+ (eqs. (17)-(19)) when σ_y > 0.

    Returns (x_s, corrected x̂_0).
    """
    sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
    if m.sigma_y == 0:
        x0 = x0 - m.operator.A_pinv(m.operator.A(x0) - m.y)  # Algorithm 1: A x̂_0 = y, null space kept
        eps = (x - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)
        return ddim_step(x0, eps, alpha_bar_prev, sigma, noise), x0
    # DDNM+: x_s = a x̂_0 + b x_t + noise; the noise A⁺ brings into x̂_0 along v_i (σ_y/s_i) reaches x_s times a.
    direction = math.sqrt(max(1.0 - alpha_bar_prev - sigma**2, 0.0)) / math.sqrt(1.0 - alpha_bar)
    a = math.sqrt(alpha_bar_prev) - direction * math.sqrt(alpha_bar)  # the x̂_0 coefficient of μ_t (eq. (18))
    svd, spread = m.svd, a * m.sigma_y / m.s_safe  # a σ_y / s_i
    lam = torch.where(m.in_range, torch.clamp(sigma / spread, max=1.0), torch.zeros_like(spread))  # eq. (19): λ_t
    gamma = torch.where(m.in_range, (sigma**2 - (lam * spread) ** 2).clamp(min=0.0), torch.full_like(spread, sigma**2))
    x0_bar = svd.Vt(x0)
    x0 = svd.V(x0_bar - lam * (x0_bar - m.y_bar))  # eq. (17): x̂_0 − Σ_t A⁺(A x̂_0 − y), Σ_t = V diag(λ_t) Vᵀ
    x_prev = a * x0 + direction * x + svd.V(gamma.sqrt() * svd.Vt(noise))  # eq. (18): N(μ_t(x_t, x̂_0), Φ_t)
    return x_prev, x0


def ddrm_step(m: Measurement, x0, eps, alpha_bar_prev: float, eta: float, eta_b: float, noise):
    """DDRM (2201.11793) eq. (8), per spectral coordinate i, in variance-preserving form (its σ_t = √(1−ᾱ)/√ᾱ):
    the null space (s_i = 0) and the coordinates noisier than y take DDIM-like steps with η, the rest move to ȳ_i with
    η_b. Returns (x_s, x̂_0)."""
    svd, sy = m.svd, m.sigma_y
    sa, sd = math.sqrt(alpha_bar_prev), math.sqrt(1.0 - alpha_bar_prev)
    x0_bar, eps_bar, z = svd.Vt(x0), svd.Vt(eps), svd.Vt(noise)
    keep = math.sqrt(1.0 - eta**2) * sd
    null = sa * x0_bar + keep * eps_bar + eta * sd * z  # s_i = 0
    inv_noise = m.s / sy if sy > 0 else torch.zeros_like(m.s)  # s_i / σ_y
    after = sa * x0_bar + keep * inv_noise * (m.y_bar - x0_bar) + eta * sd * z  # σ_t < σ_y / s_i: y is noisier
    before_var = (sd**2 - (sa * sy * eta_b / m.s_safe) ** 2).clamp(min=0.0)
    before = sa * (eta_b * m.y_bar + (1 - eta_b) * x0_bar) + before_var.sqrt() * z  # σ_t ≥ σ_y / s_i
    is_before = m.in_range & (m.s * sd >= sy * sa)
    is_after = m.in_range & ~is_before
    return svd.V(torch.where(is_before, before, torch.where(is_after, after, null))), x0


def ddrm_init(m: Measurement, alpha_bar: float, noise):
    """DDRM eq. (7), x_T ~ p(x_T | y): ȳ_i + noise of variance σ_T² − σ_y²/s_i² where σ_T ≥ σ_y/s_i, else N(0, σ_T²)."""
    svd, sa, sd = m.svd, math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    z = svd.Vt(noise)
    informed = m.in_range & (m.s * sd >= m.sigma_y * sa)
    var = (sd**2 - (sa * m.sigma_y / m.s_safe) ** 2).clamp(min=0.0)
    return svd.V(torch.where(informed, sa * m.y_bar + var.sqrt() * z, sd * z))


def dps_step(m: Measurement, x, x0, eps, alpha_bar_prev: float, sigma: float, zeta: float, noise):
    """DPS (2209.14687) Algorithm 1: x'_s from the ancestral (DDIM) step, then x_s = x'_s − ζ_i ∇_{x_t}‖y − A x̂_0‖²
    with ζ_i = ζ'/‖y − A x̂_0‖ per sample, i.e. − 2ζ' ∇_{x_t}‖y − A x̂_0‖ (the authors' code steps ζ'∇‖·‖, half this).
    `x` requires grad and `x0` depends on it through the network. Returns (x_s, x̂_0)."""
    norms = m.residual(x0).flatten(1).norm(dim=1)
    (grad,) = torch.autograd.grad(norms.sum(), x)  # per sample: the samples do not interact
    x_prev = ddim_step(x0.detach(), eps.detach(), alpha_bar_prev, sigma, noise)
    return x_prev - 2 * zeta * grad, x0.detach()


def pigdm_step(m: Measurement, x, x0, alpha_bar: float, alpha_bar_prev: float, sigma: float, scale: float, noise):
    """ΠGDM (Song et al., ICLR 2023, sec. 3): g = (∂x̂_0/∂x_t)ᵀ Aᵀ (r_t² A Aᵀ + σ_y² I)⁻¹ (y − A x̂_0) ≈ ∇ log p(y | x_t),
    r_t² = 1 − ᾱ_t (its choice for unit-variance data); noiseless, Aᵀ(r_t² A Aᵀ)⁻¹ = A⁺ / r_t² (its pseudo-inverse
    guidance). The guided score ∇ log p(x_t) + w g enters the DDIM step through Tweedie's x̂_0 = (x_t + (1 − ᾱ_t)
    score)/√ᾱ_t. `x` requires grad and `x0` depends on it through the network. Returns (x_s, guided x̂_0)."""
    r2 = 1.0 - alpha_bar
    residual = m.residual(x0).detach()
    if m.sigma_y == 0:
        weighted = m.operator.A_pinv(residual) / r2
    else:  # Aᵀ (r² A Aᵀ + σ_y² I)⁻¹ = V Sᵀ diag(1 / (r² s² + σ_y²)) Uᵀ
        svd = m.svd
        weighted = svd.V(m.s / (r2 * m.s**2 + m.sigma_y**2) * svd.add_zeros(svd.Ut(residual)))
    (g,) = torch.autograd.grad(x0, x, grad_outputs=weighted)  # the vector-Jacobian product
    score = -(x.detach() - math.sqrt(alpha_bar) * x0.detach()) / r2 + scale * g  # ∇ log p(x_t) + w g
    x0 = (x.detach() + r2 * score) / math.sqrt(alpha_bar)
    eps = -math.sqrt(r2) * score
    return ddim_step(x0, eps, alpha_bar_prev, sigma, noise), x0


class TutorialInverseProblemPipeline(TutorialPipelineBase):
    """Restore images from a linear measurement y = A x_0 + σ_y n with an unconditional `UNet2DModel` (zero-shot).

    `method` picks DDNM (DDNM+ when σ_y > 0), DDRM, DPS or ΠGDM; `operator` is a `LinearOperator` of this project
    (`Denoising`, `Inpainting`, `Colorization`, `SuperResolution`, `Blur`, `RandomProjection`, also reachable as
    `pipe.operators.<Name>` where only diffusers is installed).

    Args:
        unet (`UNet2DModel`): the unconditional denoiser, trained on images in [-1, 1].
        scheduler (`SchedulerMixin`): a variance-preserving scheduler with an ᾱ table (`alphas_cumprod`) and
            `init_noise_sigma` = 1 (ours or diffusers' DDPM, DDIM, DPM-Solver, UniPC, ...); it gives the ᾱ table, the
            grid and the prediction type (`epsilon`, `sample` or `v_prediction`), and its `clip_sample` is applied to
            the network's x̂_0. Its `step` is not called: each method takes its own.
    """

    _pipeline_tag = "image-to-image"
    _card_tags = TutorialPipelineBase._card_tags + ("inverse-problems", "ddnm", "ddrm", "dps", "pigdm")
    _card_example_call = "measurement=y, operator=operator, method='ddnm', num_inference_steps={steps}"
    operators = SimpleNamespace(
        LinearOperator=LinearOperator,
        Denoising=Denoising,
        Inpainting=Inpainting,
        Colorization=Colorization,
        SuperResolution=SuperResolution,
        Blur=Blur,
        RandomProjection=RandomProjection,
    )

    # ---- the door --------------------------------------------------------------------------------------------------
    def check_scheduler(self, method: str) -> str:
        """Refuse a scheduler the methods cannot take their steps on; return its prediction type."""
        sched, config = self.scheduler, self.scheduler.config
        name = type(sched).__name__
        table = getattr(sched, "alpha_bar", None)
        table = table if table is not None else getattr(sched, "alphas_cumprod", None)
        sigma_init = getattr(sched, "init_noise_sigma", None)
        sde_type = config.get("sde_type", "vp")
        reason = None
        if table is None:
            reason = "it has no ᾱ table (alphas_cumprod)"
        elif sde_type != "vp":
            reason = f"it samples the {sde_type!r} SDE, not the variance-preserving process (sde_type='vp')"
        elif sigma_init is None or abs(float(sigma_init) - 1.0) > 1e-3:
            reason = f"its init_noise_sigma={float(sigma_init or 0.0):.4g} says it works in a σ-scaled space, not VP"
        elif config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            reason = f"prediction_type={config.get('prediction_type')!r} is not one of {PREDICTION_TYPES}"
        elif config.get("thresholding", False):
            reason = "thresholding=True (dynamic thresholding) would break A x̂_0 = y; allowed: thresholding=False"
        if reason is not None:
            raise ValueError(
                f"scheduler={name} cannot serve method={method!r}: {reason}. Allowed: a variance-preserving scheduler "
                "with an ᾱ table and init_noise_sigma = 1 (TutorialDDPMScheduler, TutorialDDIMScheduler, DDPMScheduler, "
                "DDIMScheduler, DPMSolverMultistepScheduler, ...)."
            )
        return config.get("prediction_type", "epsilon")

    def check_measurement(self, measurement, operator, method: str, sigma_y: float) -> Measurement:
        """Check y against the operator and the UNet's images; build the `Measurement` (with the SVD where needed)."""
        for attr in ("A", "A_pinv", "measurement_shape"):
            if not callable(getattr(operator, attr, None)):
                raise ValueError(
                    f"operator={type(operator).__name__} has no {attr}(); allowed: a LinearOperator (Denoising, "
                    "Inpainting, Colorization, SuperResolution, Blur, RandomProjection)."
                )
        image_shape = self.sample_shape(1)[1:]
        try:
            measurement_shape = tuple(operator.measurement_shape(image_shape))
        except ValueError as err:
            raise ValueError(
                f"operator={type(operator).__name__} does not apply to this UNet's images (C, H, W) = {image_shape}: "
                f"{err}"
            ) from err
        if not torch.is_tensor(measurement) or not measurement.is_floating_point() or measurement.ndim < 2:
            got = (
                f"shape {tuple(measurement.shape)}, dtype {measurement.dtype}"
                if torch.is_tensor(measurement)
                else type(measurement).__name__
            )
            raise ValueError(
                f"measurement must be a floating tensor (B, *{measurement_shape}) in the model's range [-1, 1]; got "
                f"{got}."
            )
        if tuple(measurement.shape[1:]) != measurement_shape or measurement.shape[0] < 1:
            raise ValueError(
                f"measurement has shape {tuple(measurement.shape)}; operator={type(operator).__name__} on this UNet's "
                f"images (C, H, W) = {image_shape} measures (B, *{measurement_shape})."
            )
        if not bool(torch.isfinite(measurement).all()):  # one host read, at the door
            raise ValueError("measurement has non-finite entries (nan or inf); allowed: a finite measurement.")
        needs_svd = method == "ddrm" or (sigma_y > 0 and method in ("ddnm", "pigdm"))
        svd = None
        if needs_svd:
            try:
                svd = operator.svd(image_shape)
            except NotImplementedError as err:
                noisy = "" if method == "ddrm" else f" with measurement_noise={sigma_y!r} > 0"
                raise ValueError(
                    f"operator={type(operator).__name__} cannot serve method={method!r}{noisy}: it needs the SVD of A "
                    f"({err}). Allowed: an operator with svd(), or method='dps'"
                    + ("" if method == "ddrm" else ", or measurement_noise=0")
                    + "."
                ) from err
        y = measurement.to(device=self._execution_device, dtype=self.unet.dtype)
        return Measurement(operator, y, sigma_y, svd)

    @staticmethod
    def check_arguments(method, measurement_noise, eta, eta_b, guidance_scale) -> Tuple[float, float, float, float]:
        """Validate the method and its numbers; return (σ_y, η, η_b, guidance scale) with the defaults filled in."""
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported; choose one of {METHODS}.")

        def number(name, value, low, high=math.inf, low_open=False):
            bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            if bad or value < low or value > high or (low_open and value == low):
                bound = f"> {low}" if low_open else f">= {low}"
                allowed = f"in [{low}, {high}]" if high < math.inf else f"a finite number {bound}"
                raise ValueError(f"{name}={value!r} must be {allowed}.")
            return float(value)

        sigma_y = number("measurement_noise", measurement_noise, 0.0)
        eta = number("eta", DEFAULT_ETA[method] if eta is None else eta, 0.0, 1.0)
        if method == "ddnm" and sigma_y > 0 and eta == 0:
            raise ValueError(
                "eta=0 with measurement_noise > 0 is not supported by method='ddnm': DDNM+ bounds its correction by the "
                "step's noise (eq. (19)), which is 0 at eta=0; allowed: 0 < eta <= 1."
            )
        if eta_b is not None and method != "ddrm":
            raise ValueError(f"eta_b={eta_b!r} is DDRM's; method={method!r} does not use it (pass eta_b=None).")
        eta_b = number("eta_b", DEFAULT_ETA_B if eta_b is None else eta_b, 0.0, 1.0)
        if guidance_scale is not None and method not in GRADIENT_METHODS:
            raise ValueError(
                f"guidance_scale={guidance_scale!r} is the step size of {GRADIENT_METHODS}; method={method!r} does not "
                "use it (pass guidance_scale=None)."
            )
        default = DEFAULT_GUIDANCE_SCALE.get(method, 0.0)
        scale = number("guidance_scale", default if guidance_scale is None else guidance_scale, 0.0)
        return sigma_y, eta, eta_b, scale

    # ---- the grid ----------------------------------------------------------------------------------------------------
    def _grid(self, num_inference_steps: int) -> Tuple[List[float], List[float]]:
        """The distinct timesteps t_1 > ... > t_N of `set_timesteps` (a multi-stage scheduler repeats each) and ᾱ at
        each, read on the host: integer t from the ᾱ table, fractional t from the scheduler's `alpha_bar_at`."""
        self.scheduler.set_timesteps(num_inference_steps)
        grid: List[float] = []
        for t in self.scheduler.timesteps.tolist():  # on the host (see TutorialUnconditionalPipeline)
            if not grid or t != grid[-1]:
                grid.append(float(t))
        table = getattr(self.scheduler, "alpha_bar", None)
        table = table if table is not None else self.scheduler.alphas_cumprod
        alpha_bars = []
        for t in grid:
            if t == int(t):
                alpha_bars.append(float(table[int(t)]))
            elif callable(getattr(self.scheduler, "alpha_bar_at", None)):
                alpha_bars.append(float(self.scheduler.alpha_bar_at(torch.tensor(t, dtype=torch.float64))))
            else:
                raise ValueError(
                    f"scheduler={type(self.scheduler).__name__} made a fractional timestep {t} and has no alpha_bar_at "
                    "to give its ᾱ; allowed: schedulers with integer timesteps or alpha_bar_at."
                )
        return grid, alpha_bars

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        operator,
        method: str = "ddnm",
        num_inference_steps: int = 100,
        measurement_noise: float = 0.0,
        eta: Optional[float] = None,
        eta_b: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ("latents",),
        return_trajectory: bool = False,
    ) -> Union[TutorialPipelineOutput, tuple]:
        """Sample x_0 given y = A x_0 + σ_y n, one restoration per measurement.

        Args:
            measurement (`torch.Tensor`): y, shape (B, *operator.measurement_shape((C, H, W))) for the UNet's images,
                in the model's range: x_0 ∈ [-1, 1] (an image in [0, 1] is 2 · image − 1), so
                `y = operator.A(2 * image - 1) + sigma_y * noise`. Finite.
            operator (`LinearOperator`): A, with `A`, `A_pinv` and (for DDRM, and DDNM+ / ΠGDM when σ_y > 0) `svd`.
            method (`str`, defaults to `"ddnm"`): one of `METHODS`: `"ddnm"`, `"ddrm"`, `"dps"`, `"pigdm"`.
            num_inference_steps (`int`, defaults to 100): N, passed to `scheduler.set_timesteps`.
            measurement_noise (`float`, defaults to 0.0): σ_y ≥ 0, the standard deviation of y's noise in model units
                (twice that of [0, 1] images).
            eta (`float`, *optional*): in [0, 1]; DDIM's η for DDNM, DPS and ΠGDM (1 = ancestral), DDRM's η for DDRM.
                Defaults to the paper's: 0.85 (DDNM, DDRM), 1.0 (DPS, ΠGDM).
            eta_b (`float`, *optional*): DDRM's η_b in [0, 1] (defaults to 1.0); DDRM only.
            guidance_scale (`float`, *optional*): ≥ 0; DPS' ζ' (defaults to 1.0) or ΠGDM's weight w on its gradient
                (defaults to 1.0, the unscaled Bayes term). DPS and ΠGDM only.
            generator (`torch.Generator` or a list, *optional*): one generator, or one per measurement.
            latents (`torch.Tensor`, *optional*): z ~ N(0, I) of shape (B, C, H, W), the starting noise.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (B, H, W, C) or `"pt"` (B, C, H, W), in [0, 1].
            return_dict (`bool`, defaults to `True`): return a `TutorialPipelineOutput` rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, step_index, timestep, callback_kwargs) -> dict`
                after every step (diffusers' protocol); a returned `"latents"` replaces x_t.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): what `callback_kwargs` holds.
            return_trajectory (`bool`, defaults to `False`): also return x_t and the method's x̂_0 at every step (the
                last x_t is the restored x_0 in model space, unclipped).

        Returns:
            `TutorialPipelineOutput`, or `(images,)` / `(images, trajectory, pred_original_samples, timesteps)` when
            `return_dict=False`.
        """
        # 0. Validate at the door.
        sigma_y, eta, eta_b, scale = self.check_arguments(method, measurement_noise, eta, eta_b, guidance_scale)
        prediction_type = self.check_scheduler(method)
        self.check_num_inference_steps(num_inference_steps)
        self.check_output_type(output_type)
        m = self.check_measurement(measurement, operator, method, sigma_y)
        batch_size = m.y.shape[0]
        self.check_generator(generator, batch_size)
        tensor_inputs = self.resolve_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_callback_inputs(tensor_inputs)
        clip = (
            self.scheduler.config.get("clip_sample_range", 1.0) if self.scheduler.config.get("clip_sample") else None
        )

        # 1. The grid t_1 > ... > t_N, then x_0 (ᾱ = 1); its ᾱ on the host, the timesteps on the device once.
        grid, alpha_bars = self._grid(num_inference_steps)
        device = self._execution_device
        timesteps_on_device = torch.tensor(grid, dtype=self.scheduler.timesteps.dtype).to(device)
        alpha_bars_prev = alpha_bars[1:] + [1.0]

        # 2. x_T: z ~ N(0, I), or DDRM's p(x_T | y).
        latents = self.prepare_latents(batch_size, generator, latents)
        if method == "ddrm":
            latents = ddrm_init(m, alpha_bars[0], latents)
        trajectory = [latents.cpu()] if return_trajectory else None
        pred_x0s: List[Optional[torch.Tensor]] = []

        def noise():
            return randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)

        # 3. One network evaluation and one method step per grid point.
        for i, t in enumerate(self.progress_bar(grid)):
            alpha_bar, alpha_bar_prev = alpha_bars[i], alpha_bars_prev[i]
            sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
            with torch.enable_grad() if method in GRADIENT_METHODS else torch.no_grad():
                x = latents.detach().requires_grad_(method in GRADIENT_METHODS)
                model_output = self.unet(x, timesteps_on_device[i : i + 1]).sample
                x0, eps = model_output_to_x0_eps(model_output, x, alpha_bar, prediction_type)
                if clip is not None:
                    x0 = x0.clamp(-clip, clip)
                    eps = (x - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)
                if method == "ddnm":
                    x_prev, x0 = ddnm_step(m, x, x0, alpha_bar, alpha_bar_prev, eta, noise())
                elif method == "ddrm":
                    x_prev, x0 = ddrm_step(m, x0, eps, alpha_bar_prev, eta, eta_b, noise())
                elif method == "dps":
                    x_prev, x0 = dps_step(m, x, x0, eps, alpha_bar_prev, sigma, scale, noise())
                else:
                    x_prev, x0 = pigdm_step(m, x, x0, alpha_bar, alpha_bar_prev, sigma, scale, noise())
            out = DDIMSchedulerOutput(prev_sample=x_prev.detach(), pred_original_sample=x0.detach())
            latents = self.finish_step(
                i, t, grid, out, model_output.detach(), trajectory, pred_x0s, callback_on_step_end, tensor_inputs,
                locals(),
            )  # fmt: skip

        # 4. [-1, 1] -> images.
        images = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return self.pipeline_output(images, trajectory, pred_x0s, grid, return_trajectory, return_dict)
