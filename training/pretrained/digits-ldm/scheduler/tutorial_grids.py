"""Where samplers evaluate the network: timestep grids, and continuous time for a discrete-time model.

Pure functions beside `tutorial_math.py`, on which they stand (it is the only module they import):

- discrete grids, N integer timesteps out of 0..T-1: diffusers' `leading`, `linspace` and `trailing` spacings (the
  respacing of improved DDPM, Nichol & Dhariwal 2021, arXiv:2102.09672, App. B; names as in Lin et al. 2023,
  arXiv:2305.08891, Table 2), each timestep's successor, and the check of a user's custom grid;
- continuous time: λ(t) = ½ log SNR(t) linear between integer timesteps, ᾱ(t) = sigmoid(2 λ(t)) and its inverse
  t(λ) (the definition and its reasons are in `tutorial_continuous.py`), and where a continuous-time sampler puts its
  grid points (uniform in λ, Karras et al. 2022, arXiv:2206.00364, eq. (5), or uniform in t).

Schedules in float64 (numpy for the discrete spacings, a few microseconds per call), as in `tutorial_math.py`.
"""

import math
from typing import Sequence

import numpy as np
import torch

from .tutorial_math import alpha_bar_from_log_snr, check_choice, check_int, half_log_snr

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


# ----------------------------------------------------------------------------------------------------------------
# Timestep grids (the respacing of improved DDPM, App. B; names as in Lin et al. 2023, Table 2)
# ----------------------------------------------------------------------------------------------------------------
def spaced_timesteps(
    num_inference_steps: int, num_train_timesteps: int, timestep_spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """The N timesteps (descending, int64) a sampler visits out of 0..T-1.

    `leading`: k·⌊T/N⌋ + steps_offset; `trailing`: round(T - k·T/N) - 1; `linspace`: round(linspace(0, T-1, N)).
    Built with numpy in float64 (a few microseconds: pipelines call this on every request).
    """
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    T = num_train_timesteps
    N = check_int("num_inference_steps", num_inference_steps, 1, T, maximum_name="num_train_timesteps")
    if timestep_spacing == "leading":
        grid = np.arange((N - 1) * (T // N) + steps_offset, steps_offset - 1, -(T // N), dtype=np.int64)
    elif timestep_spacing == "trailing":
        # numpy.arange(T, 0, -T/N) as in diffusers, so that exact .5 ties round the same way, but only its first N
        # points: for some N (61, 103, 121, ...) the arange has N + 1, the last one rounding to t = -1.
        grid = np.rint(np.arange(T, 0, -T / N)[:N]).astype(np.int64)
        grid -= 1
    else:  # linspace: k (T-1)/(N-1), the last point exactly T-1 (numpy.linspace's arithmetic), rounded half to even
        k = np.arange(N, dtype=np.float64)
        if N > 1:
            k *= (T - 1) / (N - 1)
            k[-1] = T - 1.0
        grid = np.rint(k[::-1]).astype(np.int64)
    return torch.from_numpy(grid)


def successor_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """For a descending grid t_0 > t_1 > ... > t_{N-1}, the timestep each step moves to: t_{i+1}, and -1 (x_0) last."""
    return torch.cat([timesteps[1:], timesteps.new_tensor([-1])])


def check_steps_or_timesteps(num_inference_steps, timesteps) -> None:
    """`set_timesteps` takes exactly one of a step count and a custom grid; raise `ValueError` otherwise."""
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError(
            "set_timesteps: pass exactly one of num_inference_steps and timesteps "
            f"(got num_inference_steps={num_inference_steps!r}, timesteps={timesteps!r})."
        )


def validate_custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> torch.Tensor:
    """Check a user-given grid: integers, strictly descending, inside [0, T-1]; return it as int64."""
    grid = torch.as_tensor(list(timesteps) if not torch.is_tensor(timesteps) else timesteps)
    if grid.ndim != 1 or grid.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D list of integers; got {timesteps!r}.")
    if grid.is_floating_point() and not bool((grid == grid.round()).all()):
        raise ValueError(f"timesteps must be integers; got {grid.tolist()}.")
    grid = grid.to(torch.int64)
    if bool((grid[1:] >= grid[:-1]).any()):
        raise ValueError(f"timesteps must be strictly descending; got {grid.tolist()}.")
    if grid[0] >= num_train_timesteps or grid[-1] < 0:
        raise ValueError(
            f"timesteps must lie in [0, num_train_timesteps - 1 = {num_train_timesteps - 1}]; got {grid.tolist()}."
        )
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Continuous time for a discrete-time model: λ(t) linear between integer timesteps (see tutorial_continuous.py),
# ᾱ(t) = sigmoid(2 λ(t)), and where a continuous-time sampler puts its grid points
# ----------------------------------------------------------------------------------------------------------------
# Where the sampler's grid points go: uniform in λ (DPM-Solver's "logSNR"), Karras et al. 2022 eq. (5) in σ̄ = e^{-λ}
# with exponent ρ, or uniform in the model's timestep t. `auto` lets the sampler choose by step count: here (a full
# grid) it is uniform in λ; DPM-Solver++ places its few-step interior grid by Karras' eq. (5) under it.
STEP_PLACEMENTS = ("logsnr", "karras", "time_uniform", "auto")


def half_log_snr_at(t, half_log_snr_table: torch.Tensor) -> torch.Tensor:
    """λ(t) for fractional t ∈ [0, T-1]: linear interpolation of the table λ_i = ½ log SNR_i between integers.

    Args:
        t (`float` or `torch.Tensor`): timesteps on the model's scale.
        half_log_snr_table (`torch.Tensor`): λ_0..λ_{T-1}, float64, strictly decreasing.

    Returns:
        `torch.Tensor`: λ(t), float64, the shape of `t`.
    """
    table = half_log_snr_table
    t = torch.as_tensor(t, dtype=torch.float64, device=table.device)
    last = table.numel() - 1
    if bool((t < -1e-9).any() or (t > last + 1e-9).any()):
        raise ValueError(f"timestep(s) {t.flatten()[:4].tolist()} outside the model's range [0, {last}].")
    t = t.clamp(0, last)
    i = t.floor().clamp(max=max(last - 1, 0)).long()
    w = t - i
    return table[i] * (1 - w) + table[(i + 1).clamp(max=last)] * w


def timestep_at(half_log_snr: torch.Tensor, half_log_snr_table: torch.Tensor) -> torch.Tensor:
    """The inverse of `half_log_snr_at`: the fractional timestep t with λ(t) = `half_log_snr`.

    Raises `ValueError` if λ is outside [λ_{T-1}, λ_0], the range the model was trained on.
    """
    table = half_log_snr_table
    half_log_snr = torch.as_tensor(half_log_snr, dtype=torch.float64, device=table.device)
    lo, hi = float(table[-1]), float(table[0])
    span = 1e-9 * (1 + abs(lo) + abs(hi))
    if bool((half_log_snr < lo - span).any() or (half_log_snr > hi + span).any()):
        raise ValueError(
            f"half log-SNR value(s) {half_log_snr.flatten()[:4].tolist()} outside the model's range [{lo}, {hi}]."
        )
    ascending = table.flip(0)  # ascending[k] = λ_{T-1-k}
    half_log_snr = half_log_snr.clamp(lo, hi)
    k = (torch.searchsorted(ascending, half_log_snr.flatten(), right=True) - 1).clamp(0, table.numel() - 2)
    frac = (half_log_snr.flatten() - ascending[k]) / (ascending[k + 1] - ascending[k])
    return (table.numel() - 1 - (k + frac)).reshape(half_log_snr.shape)


def alpha_bar_at(t, alpha_bar_table: torch.Tensor) -> torch.Tensor:
    """ᾱ(t) = sigmoid(2 λ(t)) for fractional t (the continuous schedule of this module); float64."""
    table = torch.as_tensor(alpha_bar_table, dtype=torch.float64)
    return alpha_bar_from_log_snr(2 * half_log_snr_at(t, half_log_snr(table)))


def karras_half_log_snrs(num_points: int, lowest: float, highest: float, rho: float) -> torch.Tensor:
    """λ of Karras et al. 2022's eq. (5) grid from `lowest` to `highest`, `num_points` of them, exact end points:
    σ̄_i = (σ̄_max^{1/ρ} + i/(N-1) (σ̄_min^{1/ρ} - σ̄_max^{1/ρ}))^ρ with σ̄ = e^{-λ}."""
    u = torch.linspace(0, 1, num_points, dtype=torch.float64)
    s_max, s_min = math.exp(-lowest / rho), math.exp(-highest / rho)
    half_log_snr = -rho * torch.log(s_max + u * (s_min - s_max))
    half_log_snr[0], half_log_snr[-1] = lowest, highest  # exact endpoints, free of rounding
    return half_log_snr


def placement_half_log_snrs(
    num_points: int, half_log_snr_table: torch.Tensor, step_placement: str = "logsnr", rho: float = 7.0
) -> torch.Tensor:
    """The λ values of a sampler grid from t = T-1 (first, λ smallest) to t = 0 (last), `num_points` of them.

    Args:
        num_points (`int`): grid size N ≥ 2 (N - 1 solver steps).
        half_log_snr_table (`torch.Tensor`): the model's λ table.
        step_placement (`str`): one of `STEP_PLACEMENTS` (`auto` is uniform in λ for a full grid).
        rho (`float`): Karras et al. 2022's ρ (eq. (5)); only for `karras`.

    Returns:
        `torch.Tensor`: float64, strictly increasing λ.
    """
    check_choice("step_placement", step_placement, STEP_PLACEMENTS)
    half_log_snr_max, half_log_snr_min = float(half_log_snr_table[0]), float(half_log_snr_table[-1])
    u = torch.linspace(0, 1, num_points, dtype=torch.float64)
    if step_placement in ("logsnr", "auto"):
        return half_log_snr_min + u * (half_log_snr_max - half_log_snr_min)
    if step_placement == "karras":
        return karras_half_log_snrs(num_points, half_log_snr_min, half_log_snr_max, rho)
    t = (half_log_snr_table.numel() - 1) * (1 - u)  # time_uniform
    return half_log_snr_at(t, half_log_snr_table)


def check_custom_grid(timesteps: Sequence[float], num_train_timesteps: int) -> torch.Tensor:
    """A user-given (e.g. tuned) grid: strictly descending floats from T-1 to 0 inclusive; returned as float64."""
    grid = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    T = num_train_timesteps
    if grid.numel() < 2 or bool((grid[1:] >= grid[:-1]).any()) or float(grid[0]) != T - 1 or float(grid[-1]) != 0:
        raise ValueError(
            f"timesteps={grid.tolist()[:8]}... must be strictly descending from {T - 1} to 0 inclusive "
            "(the sampled interval), with at least 2 points."
        )
    return grid
