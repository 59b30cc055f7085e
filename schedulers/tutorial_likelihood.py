"""Likelihoods of a diffusion model in bits/dim: the variational bound and the exact probability-flow-ODE value.

- Variational bound: DDPM (Ho et al. 2020, arXiv:2006.11239) eq. (5), L = L_T + Σ L_{t-1} + L_0, with the
  respacing of improved DDPM (Nichol & Dhariwal 2021, arXiv:2102.09672, App. B) and its discretized-Gaussian
  decoder (DDPM Sec. 3.3). Every KL term is `tutorial_math.gaussian_kl`.
- Exact likelihood: Song et al. 2021 (arXiv:2011.13456) App. D.2: the probability-flow ODE (`tutorial_ode.pf_ode_field`)
  with the instantaneous change of variables, d log p(x_λ) / dλ = -tr(∂f/∂x) (Chen et al. 2018, arXiv:1806.07366),
  the trace exact or by Hutchinson's estimator (Grathwohl et al. 2018, arXiv:1810.01367), and uniform dequantisation
  of 8-bit data; integrated by `tutorial_ode.dormand_prince`.

Plain functions beside the math: a model is any callable `model(x_t, t)` returning the network's output (ε, x_0 or v as
`prediction_type` says) at integer or fractional timesteps t; a schedule is any scheduler, ours or diffusers' (see
`schedule_of`). A leaf: it imports only `tutorial_math.py`, `tutorial_grids.py` and `tutorial_ode.py`. The pipelines
expose these functions as `pipe.variational_bound`, `pipe.variational_bound_dataset` and `pipe.log_likelihood`.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Tuple

import torch

from . import tutorial_grids as grids
from . import tutorial_math as tm
from .tutorial_ode import describe_position, dormand_prince, pf_ode_field

DECODERS = ("discretized", "gaussian")
TRACE_ESTIMATORS = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
# 8-bit data scaled to [-1, 1]: x = k / 127.5 - 1, bins of width 2/255 (DDPM Sec. 3.3).
BIN_HALF_WIDTH = 1.0 / 255.0


def schedule_of(scheduler) -> Tuple[torch.Tensor, str]:
    """The schedule the likelihoods read: the float64 ᾱ table and the prediction type of any scheduler.

    Args:
        scheduler: a scheduler of ours (its `alpha_bar` table is used as it is), or a diffusers scheduler, whose ᾱ is
            rebuilt in float64 from its config (the config keys are diffusers', so the table is the one our
            `TutorialDDPMScheduler.from_config` would build).

    Returns:
        `(alpha_bar, prediction_type)`: a float64 tensor of shape (T,) and one of `tutorial_math.PREDICTION_TYPES`.
    """
    config = getattr(scheduler, "config", None)
    if config is None or "num_train_timesteps" not in config:
        raise ValueError(
            f"schedule={type(scheduler).__name__} is not a scheduler; pass a scheduler of ours or a diffusers scheduler "
            "(an object with a `config` holding num_train_timesteps and the beta schedule)."
        )
    prediction_type = config.get("prediction_type", "epsilon")
    tm.check_choice("prediction_type", prediction_type, tm.PREDICTION_TYPES)
    alpha_bar = getattr(scheduler, "alpha_bar", None)
    if alpha_bar is None:
        betas = tm.make_betas(
            config.get("beta_schedule", "linear"),
            config["num_train_timesteps"],
            config.get("beta_start", 0.0001),
            config.get("beta_end", 0.02),
            config.get("trained_betas"),
        )
        if config.get("rescale_betas_zero_snr", False):
            betas = tm.rescale_zero_terminal_snr(betas)
        alpha_bar = tm.alpha_bar_from_betas(betas)
    return alpha_bar.to(torch.float64), prediction_type


def check_value_range(x: torch.Tensor, value_range: Optional[Tuple[float, float]], on_8bit_grid: bool) -> None:
    """Refuse data outside the model's value range (and, for 8-bit likelihoods, off the 8-bit grid)."""
    if value_range is not None:
        lo, hi = value_range
        x_min, x_max = float(x.min()), float(x.max())
        if x_min < lo - 1e-6 or x_max > hi + 1e-6:
            raise ValueError(
                f"x has values in [{x_min:.4g}, {x_max:.4g}], outside the model's value range value_range={value_range}; "
                "images must be scaled like the training data (x / 127.5 - 1 for 8-bit images)."
            )
    if on_8bit_grid:
        k = (x.to(torch.float64) + 1) * 127.5
        if float((k - k.round()).abs().max()) > 1e-3:
            raise ValueError(
                "x is not on the 8-bit grid k / 127.5 - 1 (k = 0..255) that the discretized decoder / dequantisation "
                "assume; pass 8-bit images scaled to [-1, 1], or use decoder='gaussian' / dequantize=False for "
                "continuous data."
            )


# ----------------------------------------------------------------------------------------------------------------
# The variational bound
# ----------------------------------------------------------------------------------------------------------------
def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log P(x) per sample for 8-bit data under N(mean, std²) integrated over each bin (DDPM Sec. 3.3).

    The bin of x is [x - 1/255, x + 1/255], extended to -∞ at x = -1 and +∞ at x = 1.
    """
    normal = torch.distributions.Normal(mean.to(torch.float64), std)
    x = x.to(torch.float64)
    cdf_hi = torch.where(x > 1 - 1e-6, torch.ones_like(x), normal.cdf(x + BIN_HALF_WIDTH))
    cdf_lo = torch.where(x < -1 + 1e-6, torch.zeros_like(x), normal.cdf(x - BIN_HALF_WIDTH))
    # Far in a tail the difference underflows; there the density times the bin width is accurate.
    mass = (cdf_hi - cdf_lo).clamp(min=1e-300)
    log_mass = torch.where(mass > 1e-12, mass.log(), normal.log_prob(x) + math.log(2 * BIN_HALF_WIDTH))
    return log_mass.reshape(x.shape[0], -1).sum(1)


@dataclass
class VariationalBound:
    """The bound -log p(x_0) ≤ L_T + Σ_k L_k + L_0 per sample (DDPM eq. (5)), in nats and bits/dim.

    Args:
        bits_per_dim (`torch.Tensor`): (B,), the whole bound in bits per dimension.
        nats (`torch.Tensor`): (B,), the whole bound in nats.
        prior (`torch.Tensor`): (B,), L_T = KL(q(x_T | x_0) || N(0, I)).
        steps (`torch.Tensor`): (B, K-1), L_k = KL(q(x_{t_{k-1}} | x_{t_k}, x_0) || p(x_{t_{k-1}} | x_{t_k})),
            column k for the step from `timesteps[k+1]` to `timesteps[k]`.
        decoder (`torch.Tensor`): (B,), L_0 = -log p(x_0 | x_{t_1}).
        timesteps (`torch.Tensor`): the ascending grid t_1 = 0 < ... < t_K = T-1.
    """

    bits_per_dim: torch.Tensor
    nats: torch.Tensor
    prior: torch.Tensor
    steps: torch.Tensor
    decoder: torch.Tensor
    timesteps: torch.Tensor


@torch.no_grad()
def variational_bound(
    model: Callable,
    schedule,
    x0: torch.Tensor,
    num_steps: Optional[int] = None,
    decoder: str = "discretized",
    value_range: Optional[Tuple[float, float]] = (-1.0, 1.0),
    generator: Optional[torch.Generator] = None,
) -> VariationalBound:
    """The variational bound on -log p_θ(x_0) of the (respaced) DDPM reverse process, per sample, with its terms.

    Each KL term uses its own draw x_t ~ q(x_t | x_0) (a one-sample, unbiased Monte-Carlo estimate; improved DDPM
    Sec. 3). The reverse steps use the posterior variance β̃ (DDPM's σ_t² = β̃_t) and the mean of
    q(x_{t'} | x_t, x̂_0) (`tutorial_math.q_posterior_mean_variance`), so each L_k = c_0² ‖x_0 - x̂_0‖² / (2 β̃).
    The decoder at t_1 = 0 is N(x̂_0, 1 - ᾱ_0) (DDPM's σ_1² = β_1), discretized to 8-bit bins or continuous.

    Args:
        model (`Callable`): `model(x_t, t)` with t a (B,) int64 tensor.
        schedule: a scheduler, ours or diffusers' (`schedule_of`).
        x0 (`torch.Tensor`): data, shape (B, ...).
        num_steps (`int`, *optional*): K grid points t_1 = 0 < ... < t_K = T-1 (improved DDPM respacing); all T if
            not given.
        decoder (`str`, defaults to `"discretized"`): `discretized` (8-bit data, a probability) or `gaussian`
            (continuous data, a density).
        value_range (`tuple`, *optional*, defaults to `(-1, 1)`): refuse data outside it; None to skip.
        generator (`torch.Generator`, *optional*): for the noise draws.

    Returns:
        `VariationalBound`.
    """
    tm.check_choice("decoder", decoder, DECODERS)
    alpha_bar, prediction_type = schedule_of(schedule)
    check_value_range(x0, value_range, on_8bit_grid=decoder == "discretized")
    T = alpha_bar.numel()
    K = T if num_steps is None else tm.check_int("num_steps", num_steps, 2, T)
    grid = torch.linspace(0, T - 1, K, dtype=torch.float64).round().long()
    B, D = x0.shape[0], x0[0].numel()

    def draw_x_t(t: int) -> torch.Tensor:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return tm.q_sample(x0, eps, alpha_bar[t])

    def predict_x0(x_t: torch.Tensor, t: int) -> torch.Tensor:
        out = model(x_t, torch.full((B,), t, dtype=torch.int64, device=x0.device))
        return tm.model_output_to_x0(out, x_t, float(alpha_bar[t]), prediction_type)

    def per_sample(kl: torch.Tensor) -> torch.Tensor:
        return kl.reshape(B, -1).sum(1)

    # L_T = KL(q(x_T | x_0) || N(0, I)) (DDPM eq. (5)), in float64.
    mean_T, std_T = tm.q_mean_std(x0.to(torch.float64), alpha_bar[grid[-1]])
    prior = per_sample(tm.gaussian_kl(mean_T, std_T**2, 0.0, 1.0))
    steps = torch.zeros(B, K - 1, dtype=torch.float64, device=x0.device)
    for k in range(1, K):
        t, t_prev = int(grid[k]), int(grid[k - 1])
        x_t = draw_x_t(t)
        x0_hat = predict_x0(x_t, t)
        # L_k = KL(q(x_{t'} | x_t, x_0) || p_θ(x_{t'} | x_t)): both Gaussians have variance β̃ (DDPM eq. (7)).
        mean_q, var = tm.q_posterior_mean_variance(x0, x_t, alpha_bar[t], alpha_bar[t_prev])
        mean_p, _ = tm.q_posterior_mean_variance(x0_hat, x_t, alpha_bar[t], alpha_bar[t_prev])
        steps[:, k - 1] = per_sample(tm.gaussian_kl(mean_q.to(torch.float64), var, mean_p.to(torch.float64), var))
    t1 = int(grid[0])
    x_t1 = draw_x_t(t1)
    mean = predict_x0(x_t1, t1)
    std = math.sqrt(1.0 - float(alpha_bar[t1]))
    if decoder == "discretized":
        decoder_nll = -discretized_gaussian_log_likelihood(x0, mean, std)
    else:
        decoder_nll = -torch.distributions.Normal(mean.to(torch.float64), std).log_prob(x0.to(torch.float64))
        decoder_nll = decoder_nll.reshape(B, -1).sum(1)
    nats = prior + steps.sum(1) + decoder_nll
    return VariationalBound(nats / (D * math.log(2)), nats, prior, steps, decoder_nll, grid)


@dataclass
class DatasetBound:
    """Dataset averages of `VariationalBound` (per-term breakdown in bits/dim; `steps` per grid step).

    `steps_bits_per_dim[k]` is the step from `timesteps[k+1]` to `timesteps[k]`, as in `VariationalBound`.
    """

    bits_per_dim: float
    prior_bits_per_dim: float
    steps_bits_per_dim: torch.Tensor
    decoder_bits_per_dim: float
    num_samples: int
    timesteps: torch.Tensor
    per_sample_bits_per_dim: torch.Tensor = field(repr=False)


def variational_bound_dataset(model: Callable, schedule, batches: Iterable[torch.Tensor], **kwargs) -> DatasetBound:
    """Average `variational_bound` over a dataset given as an iterable of batches (kwargs are passed on)."""
    totals, prior, steps, dec, n, D, grid = [], 0.0, None, 0.0, 0, None, None
    for x0 in batches:
        vb = variational_bound(model, schedule, x0, **kwargs)
        D = x0[0].numel()
        totals.append(vb.bits_per_dim)
        prior += float(vb.prior.sum())
        dec += float(vb.decoder.sum())
        steps = vb.steps.sum(0) if steps is None else steps + vb.steps.sum(0)
        n, grid = n + x0.shape[0], vb.timesteps
    if n == 0:
        raise ValueError("batches is empty.")
    to_bpd = 1.0 / (n * D * math.log(2))
    per_sample = torch.cat(totals)
    return DatasetBound(float(per_sample.mean()), prior * to_bpd, steps * to_bpd, dec * to_bpd, n, grid, per_sample)


# ----------------------------------------------------------------------------------------------------------------
# The exact likelihood through the probability-flow ODE
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ODELikelihood:
    """log p(x) from the probability-flow ODE.

    Args:
        log_prob (`torch.Tensor`): (B,) log-density in nats of the (dequantised) data at t = t_start.
        bits_per_dim (`torch.Tensor`): (B,) -log_prob / (D ln 2), plus the dequantisation offset when dequantised
            (then an upper bound on the 8-bit model's bits/dim).
        prior_log_prob (`torch.Tensor`): (B,) log N(x_T; 0, I) at the end of the flow.
        num_evals (`int`): model evaluations (each computes a trace).
    """

    log_prob: torch.Tensor
    bits_per_dim: torch.Tensor
    prior_log_prob: torch.Tensor
    num_evals: int


@torch.no_grad()
def ode_log_likelihood(
    model: Callable,
    schedule,
    x: torch.Tensor,
    trace: str = "exact",
    probe: str = "rademacher",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_evals: int = 20000,
    dequantize: bool = False,
    t_start: float = 0.0,
    value_range: Optional[Tuple[float, float]] = (-1.0, 1.0),
    generator: Optional[torch.Generator] = None,
) -> ODELikelihood:
    """log p_{t_start}(x) by integrating the PF-ODE with the instantaneous change of variables (Song et al. 2021).

    In λ = ½ log SNR the ODE is dx/dλ = f = σ² x - σ ε̂(x, t(λ)), and along it d log p / dλ = -tr(∂f/∂x) with
    tr(∂f/∂x) = D σ² - σ tr(∂ε̂/∂x). Integrating from λ(t_start) to λ(T-1) gives
    log p_{t_start}(x) = log N(x_{T-1}; 0, I) + ∫ tr(∂f/∂x) dλ. The data point is taken as the state at t_start
    (Song et al. use t = 1e-5); the comparable exact density is that of the model's marginal at t_start.

    Args:
        model (`Callable`): `model(x_t, t)`, differentiable in x_t; t is a 0-d float64 tensor.
        schedule: a scheduler, ours or diffusers' (`schedule_of`).
        x (`torch.Tensor`): data, shape (B, ...), in the model's dtype (the ODE state keeps it; float64 for
            reference-quality values).
        trace (`str`, defaults to `"exact"`): `exact` (D vector-Jacobian products per evaluation; small D) or
            `hutchinson` (E[vᵀ (∂ε̂/∂x) v], the probes fixed for the whole solve).
        probe (`str`, defaults to `"rademacher"`): `rademacher` or `gaussian` probes v.
        num_probes (`int`, defaults to 1): probes averaged per evaluation (Hutchinson only).
        rtol, atol (`float`): tolerances of the adaptive solver, > 0.
        max_evals (`int`, defaults to 20000): evaluation budget of the solver.
        dequantize (`bool`, defaults to `False`): x holds 8-bit images k / 127.5 - 1; evaluate the density at
            uniformly dequantised points (k + u) / 128 - 1, u ~ U[0, 1), and add the offset log2(128) = 7 bits/dim
            (Song et al. 2021, App. D.2), which gives an upper bound on the discrete model's bits/dim.
        t_start (`float`, defaults to 0.0): the timestep the data is placed at.
        value_range (`tuple`, *optional*, defaults to `(-1, 1)`): refuse data outside it; None to skip.
        generator (`torch.Generator`, *optional*): for probes and dequantisation noise.

    Returns:
        `ODELikelihood`.
    """
    tm.check_choice("trace", trace, TRACE_ESTIMATORS)
    tm.check_choice("probe", probe, PROBES)
    tm.check_int("num_probes", num_probes, minimum=1)
    alpha_bar, prediction_type = schedule_of(schedule)
    check_value_range(x, value_range, on_8bit_grid=dequantize)
    half_log_snr_table = tm.half_log_snr(alpha_bar)
    T = alpha_bar.numel()
    if not 0 <= t_start < T - 1:
        raise ValueError(f"t_start={t_start!r} must lie in [0, {T - 1}).")
    B, D = x.shape[0], x[0].numel()
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor scaled to the model's range; got dtype {x.dtype}.")
    offset_bits = 0.0
    if dequantize:
        k = ((x + 1) * 127.5).round()
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = (k + u) / 128.0 - 1.0
        offset_bits = math.log2(128.0)
    probes = None
    if trace == "hutchinson":
        probes = _draw_probes(probe, (num_probes,) + tuple(x.shape), x, generator)
    field = _augmented_field(pf_ode_field(model, alpha_bar, prediction_type, return_eps=True), x.shape, probes)

    # Integrate (x, ∫ tr ∂f/∂x) from λ(t_start) to λ(T-1).
    start = float(grids.half_log_snr_at(float(t_start), half_log_snr_table))
    end = float(half_log_snr_table[-1])
    state0 = torch.cat([x.reshape(B, -1), torch.zeros(B, 1, dtype=x.dtype, device=x.device)], dim=1)
    describe = describe_position(half_log_snr_table)
    solution = dormand_prince(field, state0, start, end, rtol, atol, max_evals, describe)

    # log p_{t_start}(x) = log N(x_{T-1}; 0, I) + ∫ tr(∂f/∂x) dλ.
    x_T, integral = solution.sample[:, :D], solution.sample[:, D]
    prior = -0.5 * (x_T.pow(2).sum(1) + D * math.log(2 * math.pi))
    log_prob = prior + integral
    bpd = -log_prob / (D * math.log(2)) + offset_bits
    return ODELikelihood(log_prob, bpd, prior, solution.num_evals)


def _draw_probes(probe: str, size: Tuple[int, ...], like: torch.Tensor, generator) -> torch.Tensor:
    """Hutchinson's probes v, fixed for the whole solve: ±1 (Rademacher) or N(0, I), in `like`'s dtype and device."""
    if probe == "rademacher":
        return torch.randint(0, 2, size, generator=generator, device=like.device).to(like.dtype) * 2 - 1
    return torch.randn(size, generator=generator, dtype=like.dtype, device=like.device)


def _trace_of_jacobian(eps: torch.Tensor, x_in: torch.Tensor, probes: Optional[torch.Tensor]) -> torch.Tensor:
    """tr(∂ε̂/∂x) per sample: D vector-Jacobian products (exact, `probes` None), or Hutchinson's E[vᵀ (∂ε̂/∂x) v]."""
    B, D = x_in.shape[0], x_in[0].numel()
    tr = torch.zeros(B, dtype=x_in.dtype, device=x_in.device)
    if probes is None:
        flat = eps.reshape(B, -1)
        for d in range(D):
            grad = torch.autograd.grad(flat[:, d].sum(), x_in, retain_graph=d < D - 1)[0]
            tr = tr + grad.reshape(B, -1)[:, d]
        return tr
    num_probes = probes.shape[0]
    for p in range(num_probes):
        v = probes[p]
        vjp = torch.autograd.grad(eps, x_in, v, retain_graph=p < num_probes - 1)[0]
        tr = tr + (vjp * v).reshape(B, -1).sum(1) / num_probes
    return tr


def _augmented_field(drift_and_eps: Callable, shape: torch.Size, probes: Optional[torch.Tensor]) -> Callable:
    """The augmented ODE in λ for the state (x, running integral), flattened to (B, D + 1).

    Args:
        drift_and_eps (`Callable`): `pf_ode_field(..., return_eps=True)`, giving (f, ε̂) at (λ, x).
        shape (`torch.Size`): the shape of x, (B, ...).
        probes (`torch.Tensor`, *optional*): Hutchinson's probes; None for the exact trace.

    Returns:
        `field(half_log_snr, state)` -> (dx/dλ = f, d(∫ tr ∂f/∂x)/dλ), shape (B, D + 1).
    """
    B, D = shape[0], math.prod(shape[1:])

    def field(half_log_snr: float, state: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = state[:, :D].reshape(shape).detach().requires_grad_(True)
            drift, eps = drift_and_eps(half_log_snr, x_in)
            tr = _trace_of_jacobian(eps, x_in, probes)
        sigma2 = 1.0 - tm.alpha_bar_from_log_snr(2 * half_log_snr)
        divergence = D * sigma2 - math.sqrt(sigma2) * tr  # tr(∂f/∂x) = D σ² - σ tr(∂ε̂/∂x)
        return torch.cat([drift.detach().reshape(B, -1), divergence[:, None]], dim=1)

    return field
