"""The noise-schedule math every sampler of this project shares, as pure tensor functions.

References: DDPM, Ho et al. 2020 (arXiv:2006.11239); DDIM, Song et al. 2020 (arXiv:2010.02502);
improved DDPM, Nichol & Dhariwal 2021 (arXiv:2102.09672); zero-terminal SNR, Lin et al. 2023
(arXiv:2305.08891); progressive distillation / v-parameterisation, Salimans & Ho 2022 (arXiv:2202.00512);
score SDE, Song et al. 2021 (arXiv:2011.13456); Imagen's dynamic thresholding, Saharia et al. 2022
(arXiv:2205.11487).

Glossary: one symbol, one spelling, everywhere in this repository.

    symbol              identifier          meaning
    β_t                 beta                per-step noise variance of q(x_t | x_{t-1})
    α_t = 1 - β_t       alpha               per-step signal retention (never ᾱ!)
    ᾱ_t = Π_s α_s       alpha_bar           cumulative signal retention; diffusers calls it ``alphas_cumprod``
    ᾱ_{t'}              alpha_bar_prev      ᾱ at the grid's next (less noisy) timestep t' < t
    √ᾱ_t                sqrt_alpha_bar      mean coefficient of q(x_t | x_0); DPM-Solver's and the score SDE's "α_t"
    σ_t = √(1 - ᾱ_t)    sigma               standard deviation of q(x_t | x_0)
    SNR_t = ᾱ/(1 - ᾱ)   snr                 signal-to-noise ratio
    log SNR_t           log_snr
    λ_t = ½ log SNR_t   half_log_snr        the "λ" of DPM-Solver = log(√ᾱ_t / σ_t); ᾱ = sigmoid(2λ)
    ε                   eps                 the standard Gaussian noise in x_t = √ᾱ_t x_0 + σ_t ε
    x̂_0                 x0                  (predicted) clean sample
    v = √ᾱ ε - σ x_0    v                   velocity (the v-prediction target, never an ODE's right-hand side)
    dx/dλ               drift               the right-hand side of the probability-flow ODE (`tutorial_ode.py`)
    ∇ log q_t(x_t)      score               = -ε / σ_t

Everything here is computed in float64 (schedules) and cast to the caller's dtype at the boundary.
Torch only: no diffusers, no pipelines, no training code. Where samplers evaluate the network (timestep grids,
continuous time for a discrete-time model) is the sister leaf `tutorial_grids.py`, built on these functions.
"""

import math
import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

# ----------------------------------------------------------------------------------------------------------------
# Allowed values. Dispatch and error messages both read these tuples (validate at the door).
# ----------------------------------------------------------------------------------------------------------------
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
# The schedules built from the endpoints beta_start and beta_end (the others are defined through ᾱ(t)).
ENDPOINT_BETA_SCHEDULES = ("linear", "scaled_linear", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# The cap on β_t for schedules defined through ᾱ(t) (improved DDPM, Sec. 3.2): keeps β_t < 1 near t = T.
MAX_BETA = 0.999


def check_choice(name: str, value, allowed: Sequence) -> None:
    """Raise `ValueError` naming the argument, its value and the allowed values unless `value in allowed`."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {tuple(allowed)}.")


def check_int(
    name: str, value, minimum: int = 1, maximum: Optional[int] = None, maximum_name: str = "", reason: str = ""
) -> int:
    """`value` as a Python int if it is an integer in [minimum, maximum]; else a `ValueError` naming the argument, its
    value and the allowed range.

    Any integer kind is accepted (an int, a numpy integer, a 0-d or one-element integer tensor, as pipelines pass);
    booleans, floats (even integral ones) and larger tensors are refused. There is no upper bound when `maximum` is
    None; `maximum_name` names where the upper bound comes from (e.g. "num_train_timesteps") and `reason` why the range
    is what it is, both in the message.
    """
    number = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    elif torch.is_tensor(value) and value.numel() == 1 and value.ndim <= 1:
        if not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            number = int(value)
    if number is not None and minimum <= number and (maximum is None or number <= maximum):
        return number
    if maximum is None:
        allowed = f">= {minimum}"
    else:
        allowed = f"in [{minimum}, {maximum_name + '=' if maximum_name else ''}{maximum}]"
    notes = ([reason] if reason else []) + ([] if number is not None else ["an int, a numpy integer or 0-d tensor"])
    why = f" ({'; '.join(notes)})" if notes else ""
    raise ValueError(f"{name}={value!r} must be an integer {allowed}{why}.")


def entry_index(timestep, timesteps: torch.Tensor) -> Optional[int]:
    """The index of `timestep` in `timesteps` when it is one of its entries (`for t in timesteps` yields 0-d views of
    it), found from the view's position in memory, not its value: a device tensor is not read. None otherwise.

    Reading a value on the host waits for the device; a sampling loop that did so at every step would wait for the
    GPU at every step. Only a `timesteps` that is not itself a view qualifies (a scheduler's own grid).
    """
    if not torch.is_tensor(timestep) or timestep.dim() != 0 or timestep._base is not timesteps or timesteps.dim() != 1:
        return None
    index, rest = divmod(timestep.storage_offset() - timesteps.storage_offset(), timesteps.stride(0))
    return index if rest == 0 and 0 <= index < len(timesteps) else None


def expand_to(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient against a batch `x` of shape (B, ...), cast to `x`'s dtype and device.

    `coef` is a scalar (0-d or a Python number) or has shape (B,) with B == x.shape[0]. Anything else raises,
    because silently broadcasting a (B,) vector against the last axis is the classic bug of this field.
    """
    coef = torch.as_tensor(coef, device=x.device)
    if coef.ndim > 1 or (coef.ndim == 1 and coef.shape[0] not in (1, x.shape[0])):
        raise ValueError(
            f"expand_to: coefficient of shape {tuple(coef.shape)} cannot broadcast against a batch of shape "
            f"{tuple(x.shape)}; expected a scalar or shape ({x.shape[0]},)."
        )
    coef = coef.to(x.dtype)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim)) if coef.ndim == 1 else coef


# ----------------------------------------------------------------------------------------------------------------
# β schedules and ᾱ
# ----------------------------------------------------------------------------------------------------------------
def cosine_alpha_bar(t: float) -> float:
    """ᾱ(t) of the cosine schedule, improved DDPM eq. (17) with s = 0.008 (normalised so ᾱ(0) ≈ 1)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def laplace_alpha_bar(t: float) -> float:
    """ᾱ(t) of the Laplace schedule (Hang et al. 2024, arXiv:2407.03297), as diffusers defines it.

    The log-SNR is Laplace-distributed around 0: log SNR(t) = -½ sign(½ - t) log(1 - 2|½ - t| + 1e-6). diffusers'
    value is the square root of SNR/(1 + SNR); we keep that definition so configs mean the same thing.
    """
    log_snr_t = -0.5 * math.copysign(1.0, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr_t = math.exp(log_snr_t)
    return math.sqrt(snr_t / (1 + snr_t))


def betas_from_alpha_bar_fn(
    num_train_timesteps: int, alpha_bar_fn: Callable[[float], float], max_beta: float = MAX_BETA
) -> torch.Tensor:
    """β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta): discretise a continuous ᾱ(t) (improved DDPM eq. (16))."""
    T = num_train_timesteps
    betas = [min(1 - alpha_bar_fn((i + 1) / T) / alpha_bar_fn(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas: Optional[Union[Sequence[float], torch.Tensor]] = None,
) -> torch.Tensor:
    """The forward-process variances β_1..β_T of q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I) (DDPM eq. (2)).

    Args:
        beta_schedule (`str`): one of `BETA_SCHEDULES`; ignored when `trained_betas` is given.
            `linear` is DDPM Sec. 4 (β from `beta_start` to `beta_end`); `scaled_linear` is linear in √β (latent
            diffusion); `squaredcos_cap_v2` is the cosine schedule of improved DDPM eq. (17); `sigmoid` is GeoDiff's
            sigmoid(linspace(-6, 6)) rescaled to [beta_start, beta_end]; `laplace` is the Laplace log-SNR schedule.
        num_train_timesteps (`int`): T.
        beta_start, beta_end (`float`): endpoints of the linear, scaled_linear and sigmoid schedules.
        trained_betas (sequence of `float`, *optional*): explicit β_t, length T, each in (0, 1).

    Returns:
        `torch.Tensor`: float64 tensor of shape (T,).
    """
    T = check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
        if betas.numel() != T:
            raise ValueError(
                f"trained_betas has length {betas.numel()} but num_train_timesteps={T}; give exactly one β per step."
            )
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"trained_betas must lie in the open interval (0, 1); got min={betas.min().item():g}, "
                f"max={betas.max().item():g}."
            )
        return betas
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule in ENDPOINT_BETA_SCHEDULES:
        check_beta_endpoints(beta_schedule, beta_start, beta_end)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_from_alpha_bar_fn(T, cosine_alpha_bar)
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    return betas_from_alpha_bar_fn(T, laplace_alpha_bar)  # "laplace"


def check_beta_endpoints(beta_schedule: str, beta_start: float, beta_end: float) -> None:
    """The endpoints of a `linear`/`scaled_linear`/`sigmoid` schedule are variances of one step: 0 < start ≤ end < 1.

    β_t ≥ 1 makes ᾱ_t ≤ 0 and every √ᾱ_t non-finite (or ᾱ negative further on); β_t ≤ 0 is no noise at all.
    """
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
            raise ValueError(
                f"{name}={value!r} must be a number in the open interval (0, 1) for beta_schedule={beta_schedule!r} "
                f"(allowed: 0 < beta_start <= beta_end < 1)."
            )
    if beta_start > beta_end:
        raise ValueError(
            f"beta_start={beta_start!r} > beta_end={beta_end!r}: the {beta_schedule!r} schedule increases from "
            "beta_start to beta_end (allowed: 0 < beta_start <= beta_end < 1)."
        )


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 - β_s) (DDPM eq. (4) notation), in float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def betas_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Invert `alpha_bar_from_betas`: β_1 = 1 - ᾱ_1, β_t = 1 - ᾱ_t / ᾱ_{t-1}."""
    alpha_bar = alpha_bar.to(torch.float64)
    alpha = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alpha


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ_t so that √ᾱ_T = 0 while √ᾱ_1 is unchanged (Lin et al. 2023, Algorithm 1).

    The result has SNR_T = 0: x_T is pure noise, as the sampler assumes when it starts from N(0, I).
    """
    sqrt_ab = alpha_bar_from_betas(betas).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return betas_from_alpha_bar(sqrt_ab**2)


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """SNR_t = ᾱ_t / (1 - ᾱ_t), the signal-to-noise ratio of q(x_t | x_0) (Kingma et al. 2021, eq. (1))."""
    return alpha_bar / (1.0 - alpha_bar)


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log SNR_t = log ᾱ_t - log(1 - ᾱ_t)."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def half_log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """λ_t = ½ log SNR_t = log(√ᾱ_t / σ_t), the time variable of DPM-Solver (Lu et al. 2022, Sec. 3.1)."""
    return 0.5 * log_snr(alpha_bar)


def alpha_bar_from_log_snr(log_snr_t: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    """Invert `log_snr`: ᾱ = sigmoid(log SNR); with λ = ½ log SNR, ᾱ = sigmoid(2λ). A Python float gives a float."""
    if isinstance(log_snr_t, float):
        return 1.0 / (1.0 + math.exp(-log_snr_t))
    return torch.sigmoid(log_snr_t)


# ----------------------------------------------------------------------------------------------------------------
# The forward process q(x_t | x_0) and the posterior q(x_{t'} | x_t, x_0)
# ----------------------------------------------------------------------------------------------------------------
def q_mean_std(x0: torch.Tensor, alpha_bar: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean √ᾱ_t x_0 and standard deviation σ_t = √(1 - ᾱ_t) of q(x_t | x_0) (DDPM eq. (4))."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return expand_to(alpha_bar.sqrt(), x0) * x0, expand_to((1.0 - alpha_bar).sqrt(), x0)


def q_sample(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Sample from q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, ε ~ N(0, I) (DDPM eq. (4), reparameterised)."""
    mean, std = q_mean_std(x0, alpha_bar)
    return mean + std * eps


def q_posterior_coefs(
    alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients of q(x_{t'} | x_t, x_0) = N(c_0 x_0 + c_t x_t, σ̃² I) for any t' < t (DDPM eqs. (6)-(7)).

    With the effective step variance β = 1 - ᾱ_t / ᾱ_{t'} (β_t itself on the full grid, the respaced β of
    improved DDPM App. B otherwise):
        c_0 = √ᾱ_{t'} β / (1 - ᾱ_t),   c_t = √(1 - β) (1 - ᾱ_{t'}) / (1 - ᾱ_t),   σ̃² = (1 - ᾱ_{t'}) β / (1 - ᾱ_t).

    Returns:
        `(c_0, c_t, posterior_variance)` as float64 tensors.
    """
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    alpha_bar_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    beta = 1.0 - alpha_bar / alpha_bar_prev
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar)  # DDPM eq. (7), first term
    coef_xt = (1.0 - beta).sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)  # DDPM eq. (7), second term
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta  # DDPM eq. (7), β̃_t
    return coef_x0, coef_xt, variance


def q_posterior_mean_variance(
    x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean μ̃(x_t, x_0) and variance β̃ of the posterior q(x_{t'} | x_t, x_0) (DDPM eqs. (6)-(7)).

    Returns:
        `(mean, variance)`; the mean has `x_t`'s dtype, the variance is float64 with the shape of `alpha_bar`.
    """
    coef_x0, coef_xt, variance = q_posterior_coefs(alpha_bar, alpha_bar_prev)
    return expand_to(coef_x0, x0) * x0 + expand_to(coef_xt, x_t) * x_t, variance


def gaussian_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, the closed form behind every term of the ELBO (DDPM eq. (5)).

    KL = ½ [log(var2/var1) + (var1 + (mean1 - mean2)²)/var2 - 1]. Arguments broadcast; sum over dimensions yourself.
    """
    mean1, var1, mean2, var2 = (torch.as_tensor(a) for a in (mean1, var1, mean2, var2))
    return 0.5 * (torch.log(var2) - torch.log(var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Parameterisations: ε, x_0, v and the score, all from x_t = √ᾱ x_0 + σ ε
# ----------------------------------------------------------------------------------------------------------------
def _sqrt_pair(alpha_bar, x: torch.Tensor):
    """(√ᾱ, √(1-ᾱ)) ready to multiply `x`: Python floats for a float ᾱ (a sampler's step), else broadcast tensors."""
    if isinstance(alpha_bar, float):
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return expand_to(alpha_bar.sqrt(), x), expand_to((1.0 - alpha_bar).sqrt(), x)


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t (DDPM eq. (15); DDIM eq. (9))."""
    a, s = _sqrt_pair(alpha_bar, x_t)
    if isinstance(a, float):  # a sampler's step: x_t - s ε in one kernel, then ÷ a in place
        return torch.sub(x_t, eps, alpha=s).div_(a)
    return (x_t - s * eps) / a


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_t - √ᾱ_t x̂_0) / √(1 - ᾱ_t), the inverse of `eps_to_x0`."""
    a, s = _sqrt_pair(alpha_bar, x_t)
    return (x_t - a * x0) / s


def velocity(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
    a, s = _sqrt_pair(alpha_bar, x0)
    return a * eps - s * x0


def v_to_x0(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂_0 = √ᾱ_t x_t - √(1 - ᾱ_t) v (Salimans & Ho 2022, App. D)."""
    a, s = _sqrt_pair(alpha_bar, x_t)
    return a * x_t - s * v


def v_to_eps(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε̂ = √(1 - ᾱ_t) x_t + √ᾱ_t v (Salimans & Ho 2022, App. D)."""
    a, s = _sqrt_pair(alpha_bar, x_t)
    return s * x_t + a * v


def eps_to_score(eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """∇_x log q_t(x) = -ε / √(1 - ᾱ_t) (Song et al. 2021, eq. (19) with the VP marginal; Tweedie)."""
    _, s = _sqrt_pair(alpha_bar, eps)
    return -eps / s


def score_to_eps(score: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε = -√(1 - ᾱ_t) ∇_x log q_t(x), the inverse of `eps_to_score`."""
    _, s = _sqrt_pair(alpha_bar, score)
    return -s * score


def model_output_to_x0_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read a network's output as (x̂_0, ε̂) whatever it predicts (`prediction_type` in `PREDICTION_TYPES`)."""
    if prediction_type == "epsilon":
        return eps_to_x0(x_t, model_output, alpha_bar), model_output
    if prediction_type == "sample":
        return model_output, x0_to_eps(x_t, model_output, alpha_bar)
    if prediction_type == "v_prediction":
        return v_to_x0(x_t, model_output, alpha_bar), v_to_eps(x_t, model_output, alpha_bar)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    raise AssertionError("unreachable")


def model_output_to_x0(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str):
    """x̂_0 alone from a network's output (see `model_output_to_x0_eps`)."""
    if prediction_type == "epsilon":
        return eps_to_x0(x_t, model_output, alpha_bar)
    if prediction_type == "v_prediction":
        return v_to_x0(x_t, model_output, alpha_bar)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return model_output


def training_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """What a network trained with `prediction_type` regresses onto at x_t = √ᾱ x_0 + σ ε: ε, x_0 or v."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return velocity(x0, eps, alpha_bar)


# ----------------------------------------------------------------------------------------------------------------
# Keeping x̂_0 in the data range. Neither may turn a NaN or ±inf into a plausible pixel: clamping +inf to the bound
# would hide a broken model output (all-black images, no error), so both add 0 · x̂_0, which is exactly 0 where x̂_0
# is finite and NaN where it is not (one fused elementwise kernel, no host synchronisation).
# ----------------------------------------------------------------------------------------------------------------
def clip_x0(x0: torch.Tensor, bound: float) -> torch.Tensor:
    """Clip x̂_0 to [-bound, bound] (DDPM's sampler code); NaN and ±inf entries stay non-finite (as NaN)."""
    return x0.clamp(-bound, bound).add_(x0, alpha=0)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3), per sample.

    s = clamp(quantile_ratio(|x̂_0|), 1, max_value); x̂_0 ← clamp(x̂_0, -s, s) / s. With `max_value` < 1 the clamp
    yields s = `max_value` (torch's clamp when min > max, as in diffusers): x̂_0 is clipped to ±max_value and
    stretched to ±1. NaN and ±inf entries stay non-finite (see `clip_x0`).
    """
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile is not implemented for half precision
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype).add_(x0, alpha=0)
