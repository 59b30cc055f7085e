# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 9. Fast samplers: the probability-flow ODE and high-order solvers
#
# Every diffusion SDE has a deterministic twin with the same marginals $q_t$, the **probability-flow ODE**
# (Song et al. 2021, eq. (13)): $dx = [f(t)x - \tfrac12 g(t)^2\nabla\log q_t(x)]\,dt$. For the VP (DDPM) process,
# in the variables $\bar x = x/\sqrt{\bar\alpha}$ and $\bar\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha} = e^{-\lambda}$
# ($\lambda = \tfrac12\log\mathrm{SNR}$) it is simply (DDIM eq. (14); Karras et al. 2022, eq. (4))
# $$\frac{d\bar x}{d\bar\sigma} = \hat\varepsilon(x, t).$$
# Sampling is solving this ODE from $t = T-1$ to $0$, and the cost is the number of network evaluations (**NFE**).
# The solver's order $p$ says how its error falls with the number of steps $n$: error $\propto n^{-p}$.
#
# * **Euler** in $\bar\sigma$ is deterministic DDIM (order 1). **Heun** (EDM's Alg. 1, order 2, two evaluations per
#   step) and classical **RK4** (order 4, four per step): `TutorialPFODEScheduler`.
# * **DPM-Solver++** (Lu et al. 2022, eq. (9)) writes the exact solution in $\lambda$ with the data prediction
#   $\hat x_0$, $x_t = \tfrac{\sigma_t}{\sigma_s} x_s + \sigma_t\int_{\lambda_s}^{\lambda_t} e^{\lambda}\hat x_0\,d\lambda$,
#   integrates the linear part exactly and approximates $\hat x_0$ by a polynomial through the last $k$
#   predictions: order $k$ at **one evaluation per step** (`TutorialDPMSolverPlusPlusScheduler`, `solver_order`
#   1-3; order 1 is DDIM again).
# * The reference: the adaptive Dormand–Prince 5(4) solver `solve_pf_ode` at a tight tolerance.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import training
from custom_pipelines import TutorialUnconditionalPipeline, sample_loop
from schedulers import (
    TutorialDDIMScheduler,
    TutorialDDPMScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    TutorialPFODEScheduler,
    solve_pf_ode,
    tune_timesteps,
)
from schedulers.gaussian_mixture import GaussianMixture
from training.data import load_digits_tensors
from training.metrics import digits_metrics
from training.sampling import sample_sharded

FAST = os.environ.get("TUTORIAL_FAST") == "1"
MODEL = Path(training.__file__).resolve().parent / "pretrained" / "digits-ddpm"


def sample(scheduler, model, x_T, num_inference_steps=None, timesteps=None):
    """The generic diffusers loop: one `model` call per entry of `scheduler.timesteps`. Returns (x, NFE)."""
    x = sample_loop(model, scheduler, x_T, num_inference_steps, timesteps=timesteps)
    return x, len(scheduler.timesteps)


# %% [markdown]
# ## The exact model and the reference solution
#
# The data are the 2-D ring of 8 Gaussians (`GaussianMixture.ring`), whose exact $\hat\varepsilon$ at every noise
# level is closed-form, so every error below is the solver's alone. All samplers start from the same 256 draws of
# $x_{T-1}$; the truth is the Dormand–Prince solution at `rtol = atol = 1e-10` from the same points.

# %%
ring = GaussianMixture.ring()
ddpm = TutorialDDPMScheduler()  # the linear schedule, T = 1000, ε-prediction
model = ring.model(ddpm.alpha_bar, "epsilon")
x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
reference = solve_pf_ode(model, ddpm, x_T, rtol=1e-10, atol=1e-10, max_evals=50_000)
print(f"reference: {reference.num_evals} evaluations ({reference.num_steps} steps, {reference.num_rejected} rejected)")


def error(x):
    """Mean Euclidean distance to the reference sample, per point."""
    return (x - reference.sample).norm(dim=1).mean().item()


fig, ax = plt.subplots(figsize=(4, 4))
ax.scatter(*reference.sample.T, s=4, label="PF-ODE reference")
ax.scatter(
    *sample(TutorialPFODEScheduler.from_config(ddpm.config, solver="euler"), model, x_T, 5)[0].T,
    s=4,
    label="DDIM, 5 NFE",
)
ax.set_aspect("equal")
ax.legend(loc="center")
plt.show()

# %% [markdown]
# ### DDIM is Euler in $\bar\sigma$
#
# On the same grid, `TutorialDDIMScheduler` at $\eta = 0$ (without clipping) and the PF-ODE scheduler's Euler solver
# give the same samples to rounding (DDIM eq. (14)); so does DPM-Solver++ of order 1.

# %%
grid = [999.0, 666.0, 333.0, 0.0]
x_ddim = sample(TutorialDDIMScheduler.from_config(ddpm.config, clip_sample=False), model, x_T, timesteps=grid)[0]
x_euler = sample(TutorialPFODEScheduler.from_config(ddpm.config, solver="euler"), model, x_T, timesteps=grid)[0]
x_dpm1 = sample(
    TutorialDPMSolverPlusPlusScheduler.from_config(ddpm.config, solver_order=1), model, x_T, timesteps=grid
)[0]
ddim_vs_euler = max((x_ddim - x_euler).abs().max().item(), (x_ddim - x_dpm1).abs().max().item())
print(f"max |DDIM - Euler|, |DDIM - DPM-Solver++(1)| = {ddim_vs_euler:.1e}")

# %% [markdown]
# ## Error against NFE: the orders
#
# All grids are uniform in $\lambda$ (`step_placement="logsnr"`). The slope of each line is fitted on its last three
# points, in steps $n$ (not NFE), where the asymptotic regime has set in.

# %%
solvers = {  # name: (scheduler, theoretical order, grid sizes N; steps n = N - 1)
    "DDIM (Euler)": (
        TutorialPFODEScheduler.from_config(ddpm.config, solver="euler", step_placement="logsnr"),
        1,
        [5, 10, 20, 40, 80],
    ),
    "Heun": (
        TutorialPFODEScheduler.from_config(ddpm.config, solver="heun", step_placement="logsnr"),
        2,
        [3, 5, 10, 20, 40, 80],
    ),
    "RK4": (
        TutorialPFODEScheduler.from_config(ddpm.config, solver="rk4", step_placement="logsnr"),
        4,
        [3, 5, 10, 20, 40],
    ),
    "DPM-Solver++ 2": (
        TutorialDPMSolverPlusPlusScheduler.from_config(
            ddpm.config, solver_order=2, step_placement="logsnr", few_step_interior=False
        ),
        2,
        [5, 10, 20, 40, 80],
    ),
    "DPM-Solver++ 3": (
        TutorialDPMSolverPlusPlusScheduler.from_config(
            ddpm.config, solver_order=3, step_placement="logsnr", few_step_interior=False
        ),
        3,
        [5, 10, 20, 40, 80, 160, 320],
    ),
}
curves, slopes = {}, {}
for name, (scheduler, order, sizes) in solvers.items():
    points = [(nfe, error(x)) for x, nfe in (sample(scheduler, model, x_T, n) for n in sizes)]
    curves[name] = points
    slopes[name] = -np.polyfit(np.log([n - 1 for n in sizes[-3:]]), np.log([e for _, e in points[-3:]]), 1)[0]
    print(f"{name:15s} order {order}: fitted {slopes[name]:.2f};  " + ", ".join(f"{e:.1e}@{n}" for n, e in points))
adaptive = [solve_pf_ode(model, ddpm, x_T, rtol=tol, atol=tol) for tol in (1e-3, 1e-4, 1e-5, 1e-6)]
print("adaptive RK45: " + ", ".join(f"{error(s.sample):.1e}@{s.num_evals}" for s in adaptive))

fig, ax = plt.subplots(figsize=(7, 4.5))
for name, points in curves.items():
    nfe, err = zip(*points)
    ax.loglog(nfe, err, "o-", label=f"{name} (slope {slopes[name]:.2f}, theory {solvers[name][1]})")
ax.loglog([s.num_evals for s in adaptive], [error(s.sample) for s in adaptive], "k^:", label="adaptive RK45")
ax.set_xlabel("NFE (model evaluations)")
ax.set_ylabel("mean distance to the exact PF-ODE sample")
ax.set_title("2-D ring, exact ε, linear schedule")
ax.legend(fontsize=8)
plt.show()


def error_at(name, nfe):
    """Error of a solver at the largest NFE of its sweep that is <= nfe (None if even its smallest is larger)."""
    within = [(n, e) for n, e in curves[name] if n <= nfe]
    return max(within)[1] if within else None


for budget in (10, 20, 40):
    print(
        f"NFE ≤ {budget}: "
        + ", ".join(f"{name} {error_at(name, budget):.1e}" for name in curves if error_at(name, budget) is not None)
    )

# %% [markdown]
# The slopes match the theory (1, 2, 4, 2, 3). From about 20 NFE on, the multistep DPM-Solver++ wins at equal NFE:
# it gains order without paying extra evaluations per step, while Heun and RK4 spend 2 and 4 evaluations per step
# and need many steps before their order pays off (at 10 NFE Heun makes 4 steps and RK4 only 2). At very small budgets the asymptotic picture breaks down (the steps in $\lambda$ are huge), and
# *where* the few steps go matters as much as the order.
#
# ## Where to put the steps
#
# The same DPM-Solver++(2M) with 6 evaluations on different grids, each with both end points (`few_step_interior=False`;
# the section after the digits explains that option): uniform in $\lambda$ (`logsnr`), Karras et al.'s
# $\rho = 7$ spacing (`karras`), uniform in $t$ (`time_uniform`), and a grid **tuned** by `tune_timesteps` on 32
# calibration draws of noise (not the 256 test draws) against the adaptive reference.

# %%
placements = {}
for placement in ("logsnr", "karras", "time_uniform"):
    s = TutorialDPMSolverPlusPlusScheduler.from_config(
        ddpm.config, solver_order=2, step_placement=placement, few_step_interior=False
    )
    placements[placement] = error(sample(s, model, x_T, 6)[0])
s = TutorialDPMSolverPlusPlusScheduler.from_config(
    ddpm.config, solver_order=2, step_placement="logsnr", few_step_interior=False
)
calibration = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
tuned_grid = tune_timesteps(s, model, calibration, 6, sweeps=4 if FAST else 12)
placements["tuned"] = error(sample(s, model, x_T, timesteps=tuned_grid)[0])
for placement, err in placements.items():
    print(f"DPM-Solver++(2M), 6 NFE, {placement:12s}: error {err:.2e}")
print("tuned timesteps:", [round(t, 1) for t in tuned_grid])

# %% [markdown]
# ## On the shipped digits model: Fréchet distance against NFE
#
# With a trained network there is no exact answer, so we measure sample quality: the Fréchet distance in the
# features of the shipped digits classifier (`training.metrics.digits_metrics`, lower is better; real held-out
# digits score about 36 with 256 samples) for DDIM and DPM-Solver++ 2 and 3, all from the same per-sample noise
# (`sample_sharded`).
#
# The shipped scheduler config has `clip_sample=True`: DDIM clips $\hat x_0$ to $[-1, 1]$ at every step. That is a
# heuristic outside the ODE (it changes the vector field wherever $\hat x_0$ leaves the data range), so it would
# compare DDIM-with-clipping to solvers of the plain ODE. We turn it off (`clip_sample=False`); DPM-Solver++ is
# built from the same config with its `thresholding` off (its default).

# %%
shipped = TutorialUnconditionalPipeline.from_pretrained(MODEL)
cfg = shipped.scheduler.config
digit_samplers = {
    "DDIM": TutorialDDIMScheduler.from_config(cfg, clip_sample=False),
    "DPM-Solver++ 2, λ-uniform with end points": TutorialDPMSolverPlusPlusScheduler.from_config(
        cfg, solver_order=2, step_placement="logsnr", few_step_interior=False
    ),
    "DPM-Solver++ 3, λ-uniform with end points": TutorialDPMSolverPlusPlusScheduler.from_config(
        cfg, solver_order=3, step_placement="logsnr", few_step_interior=False
    ),
    "DPM-Solver++ 2 (defaults)": TutorialDPMSolverPlusPlusScheduler.from_config(cfg),
}
num_samples = 32 if FAST else 256
digit_nfes = [5, 10] if FAST else [5, 10, 20]
real, _ = load_digits_tensors(16, "train")
real_fd = digits_metrics(real[:num_samples])["frechet_distance"]
fd = {}
with torch.no_grad():
    for name, scheduler in digit_samplers.items():
        fd[name] = []
        for nfe in digit_nfes:
            x = sample_sharded(shipped.unet, scheduler, num_samples, nfe, seed=0)
            fd[name].append(digits_metrics(x)["frechet_distance"])
            if nfe == digit_nfes[-1]:
                last_samples = x
        print(f"{name:15s}: " + ", ".join(f"FD {v:.1f} @ {n} NFE" for n, v in zip(digit_nfes, fd[name])))
print(f"real training digits ({num_samples}): FD {real_fd:.1f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.4, 1]})
for name, values in fd.items():
    ax1.semilogy(digit_nfes, values, "o-", label=name)
ax1.axhline(real_fd, color="k", ls=":", label="real digits")
ax1.set_xlabel("NFE")
ax1.set_ylabel("Fréchet distance (classifier features)")
ax1.legend()
ax2.imshow(torch.cat([torch.cat(list(last_samples[r * 8 : r * 8 + 8, 0]), dim=1) for r in range(4)]), cmap="gray")
ax2.set_title(f"DPM-Solver++ 2 (defaults), {digit_nfes[-1]} NFE")
ax2.set_axis_off()
plt.show()

# %% [markdown]
# With 256 samples (real training digits score 36): DPM-Solver++(2M) at 10 NFE reaches FD ≈ 37, the level of real
# digits, where DDIM needs more than 20 NFE (58 at 10, 49 at 20). Order 3 is less robust on the trained network:
# at 10 NFE it is no better than DDIM (≈ 60), at 20 it is close to order 2 (42 vs 40). At 5 NFE both break down:
# uniform-in-λ steps of $h \approx 2.4$ make the multistep polynomial extrapolate the network's $\hat x_0$ far outside
# where it was fitted (FD in the hundreds to thousands). The library's DPM-Solver++ has no "lower order final step"
# safeguard, which diffusers' `DPMSolverMultistepScheduler` uses below 15 steps; a tuned grid (above) is the other
# remedy. The exact-model sweep shows the same thing in miniature: high order pays off only once the steps are small
# enough. (Those numbers are for the λ-uniform grid with both end points, the library's default before the next
# section; the defaults row is the grid that section arrives at.)
#
# ## Few steps on a trained network: where the error comes from
#
# With 5 evaluations, the grid from $t = T-1$ to $t = 0$ spends two of them badly. The **first** evaluation, at
# $t = T-1$, is where the network's $\hat x_0$ is worst (it sees almost pure noise) and, uniform in $\lambda$, the
# first step is as large as any ($h \approx 2.4$). The **last** evaluation, at $t = 0$, only returns
# $\hat x_0 \approx x_0$: it buys nothing, so 5 evaluations make 4 steps. diffusers' multistep schedulers instead end
# with a **first-order step to $\sigma = 0$** (`final_sigmas_type="zero"`, `lower_order_final`), which returns the
# last evaluation's $\hat x_0$ without evaluating at $t = 0$.
#
# We measure each choice against a many-step reference on the trained network itself: the probability-flow ODE
# solved from the same $x_{T-1}$ with 400 DPM-Solver++ steps, through every grid point. The per-step error is the RMS
# distance of the sampler's $x_{t_i}$ to the reference $x(t_i)$; the last column is the final sample against the
# reference's $\hat x_0$ at $t = 0$. `few_step_interior=True` (the default below 15 evaluations) evaluates the $N$
# interior points of the placement's $N + 2$-point grid and ends with the step to $\sigma = 0$.

# %%
torch.set_num_threads(1)  # hundreds of evaluations on a tiny batch: one thread avoids intra-op overhead
unet = shipped.unet.eval()


@torch.no_grad()
def digits_model(x, t):
    return unet(x, t).sample


n_ref = 8 if FAST else 64
x_ref = torch.randn(n_ref, 1, 16, 16, generator=torch.Generator().manual_seed(0))
few_step = {
    "λ-uniform, end points (before)": dict(step_placement="logsnr", few_step_interior=False),
    "Karras, end points": dict(step_placement="karras", few_step_interior=False),
    "λ-uniform, interior + step to σ=0": dict(step_placement="logsnr", few_step_interior=True),
    "Karras, interior + step to σ=0 (defaults)": dict(),
}
grids = {}
for name, options in few_step.items():
    s = TutorialDPMSolverPlusPlusScheduler.from_config(cfg, **options)
    s.set_timesteps(5)
    grids[name] = s.timesteps.tolist()

# The reference trajectory: one DPM-Solver++(2M) run on a dense λ-uniform grid (400 points; 100 when FAST) that also passes
# through every grid point above, so x(t_i) is read off where each sampler lands.
dense = TutorialDPMSolverPlusPlusScheduler.from_config(cfg, step_placement="logsnr", few_step_interior=False)
dense.set_timesteps(100 if FAST else 400)
points = sorted({round(t, 9) for t in dense.timesteps.tolist() + sum(grids.values(), [])}, reverse=True)
dense.set_timesteps(timesteps=points)
x, exact_at = x_ref, {}
for i, t in enumerate(dense.timesteps):
    x = dense.step(digits_model(x, t), t, x).prev_sample
    exact_at[points[min(i + 1, len(points) - 1)]] = x
reference_end = x  # x̂_0 at t = 0

per_step, final_error = {}, {}
for name, options in few_step.items():
    s = TutorialDPMSolverPlusPlusScheduler.from_config(cfg, **options)
    s.set_timesteps(5)
    x, errors = x_ref, []
    for i, t in enumerate(s.timesteps):
        x = s.step(digits_model(x, t), t, x).prev_sample
        if i + 1 < len(s.timesteps):
            t_next = round(float(s.timesteps[i + 1]), 9)
            errors.append((t_next, float((x - exact_at[t_next]).pow(2).mean().sqrt())))
    per_step[name], final_error[name] = errors, float((x - reference_end).pow(2).mean().sqrt())
    steps_text = ", ".join(f"{e:.3f} @ t={t:.0f}" for t, e in errors)
    print(f"{name:42s} steps: {steps_text};  final {final_error[name]:.3f}")

# %% [markdown]
# **Integer or fractional timesteps?** Our continuous-time samplers feed the network fractional $t$; diffusers'
# multistep schedulers round to integers. A network trained on integers could be worse in between. We measure it
# directly: noise held-out digits to fractional $t$ with `add_noise` (the continuous schedule) and compare the
# denoising error of $\hat x_0$ when the network is told $t$ or $\mathrm{round}(t)$.

# %%
digits, _ = load_digits_tensors(16, "test")
digits = digits[:n_ref]
noise = torch.randn(digits.shape, generator=torch.Generator().manual_seed(2))
t_fractional = torch.tensor([37.5, 150.5, 400.5, 700.5], dtype=torch.float64)
denoising = []
for t in t_fractional:
    x_t = s.add_noise(digits, noise, t.repeat(n_ref))
    alpha_bar = float(s.alpha_bar_at(t))
    err = []
    for fed in (t, t.round()):
        eps = digits_model(x_t, fed)
        x0 = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
        err.append(float((x0 - digits).pow(2).mean().sqrt()))
    denoising.append(err)
    print(f"t = {float(t):6.1f}: x̂_0 error fed t {err[0]:.4f}, fed round(t) {err[1]:.4f}")

# %% [markdown]
# What the numbers show: on the grid with both end points the error after the first step from $t = T-1$ is already
# several times that of the other grids, and the large multistep steps towards $t = 0$ multiply it; Karras' spacing
# takes a smaller first step. Skipping both end points (the first interior point has $\bar\alpha \approx 10^{-4}$,
# so $x \sim \mathcal N(0, I)$ is still an excellent start) and ending with the step to $\sigma = 0$ cuts the final
# error several-fold. In RMS distance to the ODE the λ-uniform and Karras interior grids are close; in Fréchet
# distance Karras' is the better (the benchmark below), so it is the default. Feeding fractional or rounded timesteps
# makes no measurable difference: the network is smooth in $t$.
# The benchmark (`benchmarks/bench_samplers.py`, table in `benchmarks/RESULTS.md`) shows the resulting defaults at
# least as good as the best of diffusers' DPM-Solver++, UniPC, DDIM and Euler setups at 5, 10 and 20 evaluations.
#
# ## From 10 evaluations: a corrector, and one step across pure noise
#
# Each model evaluation can be spent twice (UniPC's corrector, Zhao et al. 2023): the evaluation at the predicted
# $x_{t_{i+1}}$ is the next step's data prediction, and it is also a third point for the polynomial through which the
# step $t_i \to t_{i+1}$ is redone, one order higher, before the next step starts. No extra evaluation. And where
# $\sigma/\alpha$ is above about 70 (λ below -4.25), $\hat x_0$ barely depends on $x$, so the exponential integrator
# crosses that stretch in one step; the linear schedule starts at λ ≈ -5, the cosine one at λ ≈ -10. (Not further: a
# trained ε-network's $\hat x_0$ there carries its error times $\sigma/\alpha$, and a longer first step passes more of
# it on.) The default (`step_placement="auto"`) therefore uses the few-step Karras grid alone below 10 evaluations,
# where it won on the digits network, and from 10 on adds the corrector (and, from 15 on, the first jump to λ = -4.25
# with the rest uniform in λ). On the ring:

# %%
corrected_errors = {}
for n in (10, 20):
    for name, options in (("defaults", {}), ("same grid, no corrector", {"use_corrector": False})):
        s = TutorialDPMSolverPlusPlusScheduler.from_config(ddpm.config, **options)
        corrected_errors[name, n] = error(sample(s, model, x_T, n)[0])
        print(f"DPM-Solver++(2M) {name:24s} {n} NFE: error {corrected_errors[name, n]:.2e}")

# %% [markdown]
#
# ## What we showed (asserted)

# %%
assert ddim_vs_euler < 1e-10  # DDIM is the Euler method of the PF-ODE in σ̄
for name, (_, order, _) in solvers.items():
    assert abs(slopes[name] - order) < 0.4, (name, slopes[name], order)  # each solver converges at its order
assert error_at("DPM-Solver++ 3", 20) < error_at("DDIM (Euler)", 20) / 3  # higher order beats Euler at equal NFE
assert error_at("DPM-Solver++ 3", 40) < error_at("DDIM (Euler)", 40) / 10
assert error_at("RK4", 40) < error_at("DDIM (Euler)", 40) / 2
assert error(adaptive[-1].sample) < error(adaptive[0].sample) / 100  # the adaptive solver follows its tolerance
assert placements["tuned"] < placements["logsnr"] / 2  # tuning the grid pays at 6 NFE
assert fd["DDIM"][-1] < fd["DDIM"][0]  # more steps, better digits
before, default = "DPM-Solver++ 2, λ-uniform with end points", "DPM-Solver++ 2 (defaults)"
assert fd[before][1] < 1.5 * fd["DDIM"][1]  # at 10 NFE DPM-Solver++ is at least competitive
assert fd[default][0] < fd[before][0] / 3  # at 5 NFE the few-step grid fixes the breakdown
old, new = "λ-uniform, end points (before)", "Karras, interior + step to σ=0 (defaults)"
assert final_error[new] < final_error[old] / 2  # ... and its samples are closer to the ODE's
assert per_step[old][0][1] > per_step[new][0][1]  # the first step from t = T-1 is the costly one
for n in (10, 20):  # the corrector at least halves the error, at no extra evaluation
    assert corrected_errors["defaults", n] < corrected_errors["same grid, no corrector", n] / 2
for err_fed_t, err_fed_round in denoising:  # fractional timesteps cost nothing measurable
    assert abs(err_fed_t - err_fed_round) < 0.05 * err_fed_round
