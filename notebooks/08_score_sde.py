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
# # 8. The score-based view: score matching and stochastic differential equations
#
# Song et al. (2021, "Score-Based Generative Modeling through SDEs", arXiv:2011.13456) put DDPM and score-matching
# models (NCSN) into one frame. The noisy marginal $q_t(x_t) = \int q(x_t\mid x_0)\,p(x_0)\,dx_0$ has a **score**
# $\nabla_x\log q_t$, and for $q(x_t\mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}x_0, (1-\bar\alpha_t)I)$ Tweedie's formula
# ties it to the best noise prediction:
# $$\nabla_x\log q_t(x_t) = -\frac{\mathbb E[\varepsilon\mid x_t]}{\sqrt{1-\bar\alpha_t}},$$
# so an ε-network is a score network up to the factor $-1/\sigma_t$ (`tm.eps_to_score`, `tm.score_to_eps`).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import training
from custom_pipelines import TutorialUnconditionalPipeline, sample_loop
from schedulers import TutorialDDPMScheduler, TutorialScoreSDEScheduler
from schedulers import tutorial_math as tm
from schedulers.gaussian_mixture import GaussianMixture
from schedulers.scheduling_tutorial_sde import sde_marginal

FAST = os.environ.get("TUTORIAL_FAST") == "1"
MODEL = Path(training.__file__).resolve().parent / "pretrained" / "digits-ddpm"

# %% [markdown]
# ## Score and ε, checked on a mixture
#
# A 1-D Gaussian mixture with unequal weights is our data; its diffused marginal, score and optimal ε are
# closed-form (`GaussianMixture`). Three routes to the score must agree: automatic differentiation of
# $\log q_t$, the closed form, and the optimal ε converted by `tm.eps_to_score`.

# %%
mixture = GaussianMixture(
    weights=torch.tensor([0.2, 0.5, 0.3]),
    means=torch.tensor([[-0.6], [0.05], [0.65]]),
    variances=torch.tensor([0.08, 0.12, 0.05]) ** 2,
)
ddpm = TutorialDDPMScheduler(clip_sample=False)  # linear β, T = 1000
alpha_bar = ddpm.alpha_bar[300]
x = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64)[:, None].requires_grad_(True)
score_autograd = torch.autograd.grad(mixture.log_prob(x, alpha_bar).sum(), x)[0]
score_closed = mixture.score(x.detach(), alpha_bar)
score_from_eps = tm.eps_to_score(mixture.eps(x.detach(), alpha_bar), alpha_bar)
score_error = max(
    (score_autograd - score_closed).abs().max().item(), (score_from_eps - score_closed).abs().max().item()
)
print(f"max difference between the three scores: {score_error:.1e}")

fig, axes = plt.subplots(1, 3, figsize=(12, 3))
grid = x.detach()[:, 0]
for ax, t in zip(axes, (0, 150, 400)):
    ab = ddpm.alpha_bar[t]
    ax.plot(grid, mixture.log_prob(x.detach(), ab).exp(), label=r"$q_t$")
    ax.plot(grid, mixture.score(x.detach(), ab)[:, 0] / 40, label=r"$\nabla\log q_t$ / 40")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(f"t = {t}, ᾱ = {ab:.3f}")
axes[0].legend()
plt.show()

# %% [markdown]
# The score points towards the modes; as $t$ grows the modes blur into one Gaussian and the score becomes the
# linear $-x/\sigma^2$ pull of $\mathcal N(0, I)$.
#
# ## Three SDEs
#
# The forward noising is the solution of an SDE $dx = f(t)x\,dt + g(t)\,dw$ (Song et al. eqs. (9), (11), (30)):
#
# * **VP** (variance preserving), $dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)}\,dw$. DDPM's chain
#   $x_t = \sqrt{1-\beta_t}\,x_{t-1} + \sqrt{\beta_t}\,z \approx (1-\tfrac12\beta_t)x_{t-1} + \sqrt{\beta_t}\,z$ is its
#   Euler–Maruyama discretisation, so the VP SDE is DDPM's **continuous limit**; its marginal is
#   $\mathcal N(\sqrt{\bar\alpha}x_0, (1-\bar\alpha)I)$.
# * **VE** (variance exploding, NCSN/SMLD), $dx = \sqrt{d\sigma^2/dt}\,dw$: marginal $\mathcal N(x_0, \sigma^2 I)$.
# * **sub-VP**, $dx = -\tfrac12\beta x\,dt + \sqrt{\beta(1-e^{-2\int\beta})}\,dw$: marginal
#   $\mathcal N(\sqrt{\bar\alpha}x_0, (1-\bar\alpha)^2 I)$, always below the VP variance.
#
# Any such SDE can be run backwards in time (Anderson 1982; Song et al. eq. (6)):
# $$dx = \big[f(t)x - g(t)^2\nabla_x\log q_t(x)\big]dt + g(t)\,d\bar w,$$
# which needs only the score. `TutorialScoreSDEScheduler` integrates it with Euler–Maruyama (the *predictor*),
# optionally followed by **Langevin corrector** steps $x \leftarrow x + \epsilon\nabla\log q_t + \sqrt{2\epsilon}z$
# that pull the sample back towards $q_t$ at the current level (predictor–corrector sampling, Alg. 1-5). A
# DDPM-trained ε-network drives all three: each SDE level is matched to the network's level of the same
# signal-to-noise ratio $\lambda$ (`sde_marginal`).

# %%
half_log_snr = tm.half_log_snr(ddpm.alpha_bar)  # λ_t = ½ log SNR_t of the network's timesteps
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
for sde_type in ("vp", "subvp", "ve"):
    sqrt_alpha_bar, std, _, _ = sde_marginal(sde_type, half_log_snr)
    ax1.plot(sqrt_alpha_bar, label=sde_type)
    ax2.semilogy(std, label=sde_type)
ax1.set_title("mean coefficient of x_0 at the network's timestep t")
ax2.set_title("standard deviation of the noise")
for ax in (ax1, ax2):
    ax.set_xlabel("t")
ax1.legend()
plt.show()

# %% [markdown]
# ## Sampling the mixture with the reverse SDE
#
# With the exact score (`mixture.model(...)`, a perfect ε-network), the only errors left are the sampler's. We draw
# samples with the reverse VP SDE and compare them with the truth: a histogram against the exact density, the
# mixture weights (each sample assigned to its nearest mean), mean and variance, and the 1-D Wasserstein distance
# $W_1$ to an equally large set of exact samples, next to $W_1$ between two exact sets (the sampling-noise floor).

# %%
n_samples = 4_000 if FAST else 40_000
model = mixture.model(ddpm.alpha_bar, "epsilon")
data = mixture.sample(n_samples, torch.Generator().manual_seed(1))
data2 = mixture.sample(n_samples, torch.Generator().manual_seed(2))
x_T = torch.randn(n_samples, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
true_mean = (mixture.weights * mixture.means[:, 0]).sum().item()
true_var = (mixture.weights * (mixture.variances[:, 0] + mixture.means[:, 0] ** 2)).sum().item() - true_mean**2


def sample(scheduler, num_inference_steps, seed=0):
    """The generic diffusers loop over `scheduler.timesteps` (corrector entries included): (x, NFE)."""
    x = sample_loop(model, scheduler, x_T, num_inference_steps, generator=torch.Generator().manual_seed(seed))
    return x, len(scheduler.timesteps)


def wasserstein_1d(a, b):
    """W_1 between two equally large 1-D sample sets: the mean gap between sorted samples."""
    return (a.flatten().sort().values - b.flatten().sort().values).abs().mean().item()


def weights_of(samples):
    nearest = (samples - mixture.means[:, 0]).abs().argmin(dim=1)
    return torch.bincount(nearest, minlength=3).double() / len(samples)


floor = wasserstein_1d(data, data2)
vp_pc = TutorialScoreSDEScheduler.from_config(ddpm.config, sde_type="vp", corrector="langevin")
n_fine = 200 if FAST else 500
x_pc, nfe_pc = sample(vp_pc, n_fine)
pc_weights = weights_of(x_pc)
print(
    f"VP predictor-corrector, {n_fine} steps ({nfe_pc} NFE): W1 = {wasserstein_1d(x_pc, data):.4f} (floor {floor:.4f})"
)
print(
    f"weights {pc_weights.numpy().round(3)} (truth {mixture.weights.numpy().round(3)}); "
    f"mean {x_pc.mean():.4f} (truth {true_mean:.4f}); variance {x_pc.var():.4f} (truth {true_var:.4f})"
)

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.hist(x_pc.flatten().numpy(), bins=120, range=(-1.2, 1.2), density=True, alpha=0.5, label="reverse VP SDE (PC)")
ax.plot(grid, mixture.log_prob(grid[:, None]).exp(), "k", lw=1, label="exact density")
ax.legend()
plt.show()

# %% [markdown]
# ## Steps, corrector, and the three SDEs
#
# The reverse SDE is integrated with a first-order scheme, so coarse grids sample the wrong distribution. We sweep
# the number of grid points $N$ for the predictor alone (Euler–Maruyama) and with one Langevin corrector step per
# point (twice the NFE), and add DDPM's own ancestral sampler (`TutorialDDPMScheduler` on the same number of
# timesteps) as the discrete counterpart of the VP SDE.

# %%
steps = [10, 20, 50, 200] if FAST else [10, 20, 50, 100, 200, 500]
samplers = {
    "VP, Euler–Maruyama": TutorialScoreSDEScheduler.from_config(ddpm.config, sde_type="vp"),
    "VP, predictor–corrector": vp_pc,
    "DDPM ancestral": TutorialDDPMScheduler.from_config(ddpm.config),
}
sweep = {}
for name, scheduler in samplers.items():
    sweep[name] = [(nfe, wasserstein_1d(x, data)) for x, nfe in (sample(scheduler, n) for n in steps)]
    print(f"{name:24s} " + ", ".join(f"{w:.3f}@{nfe}" for nfe, w in sweep[name]))
by_type = {}
for sde_type in ("vp", "subvp", "ve"):
    for corrector in ("none", "langevin"):
        s = TutorialScoreSDEScheduler.from_config(ddpm.config, sde_type=sde_type, corrector=corrector)
        by_type[sde_type, corrector] = wasserstein_1d(sample(s, n_fine // 2)[0], data)
        print(f"{sde_type:6s} corrector={corrector:9s} N = {n_fine // 2}: W1 = {by_type[sde_type, corrector]:.4f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for name, points in sweep.items():
    ax1.loglog(steps, [w for _, w in points], "o-", label=name)
    ax2.loglog(*zip(*points), "o-", label=name)
for ax, label in ((ax1, "grid points N"), (ax2, "NFE")):
    ax.axhline(floor, color="k", ls=":", label="two exact sample sets")
    ax.set_xlabel(label)
    ax.set_ylabel("$W_1$ to the data")
ax1.legend(fontsize=8)
plt.show()

# %% [markdown]
# The error falls with $N$ until it meets the sampling-noise floor (below it, differences between samplers are noise:
# $W_1$ is measured against one finite exact sample set). Here the Langevin corrector buys almost nothing
# per grid point and costs twice the evaluations: with the exact score the predictor already lands close to $q_t$ at
# every level, so there is little for the corrector to repair. It earns its keep when the predictor is poor (few
# steps with an imperfect score, or the VE SDE on images, where Song et al. report its largest gains). DDPM's ancestral
# sampler behaves like the VP Euler–Maruyama scheme, as the continuous-limit argument says. All three SDEs, with and
# without the corrector, sample the same distribution once the grid is fine.
#
# ## The shipped digits model through the VP SDE
#
# `TutorialScoreSDEScheduler.from_config` reads the DDPM/DDIM config of the shipped pipeline, and the pipeline takes
# any scheduler: the same network samples digits as a score model.

# %%
shipped = TutorialUnconditionalPipeline.from_pretrained(MODEL)
shipped.scheduler = TutorialScoreSDEScheduler.from_config(
    shipped.scheduler.config, sde_type="vp", corrector="langevin"
)
shipped.set_progress_bar_config(disable=True)
with torch.no_grad():
    digits = shipped(
        batch_size=16,
        num_inference_steps=25 if FAST else 100,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
fig, ax = plt.subplots(figsize=(8, 1.2))
ax.imshow(torch.cat(list(digits[:, 0]), dim=1), cmap="gray", vmin=0, vmax=1)
ax.set_axis_off()
plt.show()

# %% [markdown]
# ## What we showed (asserted)

# %%
assert score_error < 1e-8  # autograd of log q_t, the closed form and -ε*/σ are the same score
final = {name: points[-1][1] for name, points in sweep.items()}
assert all(w < 3 * floor + 2e-3 for w in final.values()), (final, floor)  # fine grids sample the data
assert all(points[0][1] > 3 * points[-1][1] for points in sweep.values())  # coarse grids do not
assert (pc_weights - mixture.weights).abs().max() < 0.03  # mixture weights recovered
assert abs(x_pc.mean().item() - true_mean) < 0.02 and abs(x_pc.var().item() / true_var - 1) < 0.05
assert all(w < 3 * floor + 5e-3 for w in by_type.values()), by_type  # VP, sub-VP and VE all work
assert digits.shape == (16, 1, 16, 16) and bool(torch.isfinite(digits).all())
