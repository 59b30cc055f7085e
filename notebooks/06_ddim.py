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
# # 6. DDIM: the same marginals, a family of samplers
#
# DDPM's loss only ever sees the marginals $q(x_t\mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}x_0, (1-\bar\alpha_t)I)$,
# never the Markov chain that produced them. Song, Meng & Ermon (2021, "Denoising Diffusion Implicit Models") use that
# freedom: they build a family of **non-Markovian** forward processes, indexed by variances $\sigma_t$, that all have
# those marginals, so one trained network serves every member. Each member gives a sampler; one is deterministic and
# works with far fewer steps. This notebook checks the construction numerically, then runs the samplers on the shipped
# digits model, and ends with a pitfall of the deterministic sampler that the shipped configuration triggers.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import training
from custom_pipelines import TutorialUnconditionalPipeline
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers import tutorial_grids as grids
from schedulers import tutorial_math as tm
from training.data import load_digits_tensors
from training.grids import make_grid
from training.metrics import digits_metrics
from training.sampling import sample_sharded

FAST = os.environ.get("TUTORIAL_FAST") == "1"
SHIPPED = Path(training.__file__).resolve().parent / "pretrained" / "digits-ddpm"
T = 1000
alpha_bar = tm.alpha_bar_from_betas(tm.make_betas("linear", T))  # float64, the shipped model's schedule

# %% [markdown]
# ## (a) The non-Markovian forward process and the η family
#
# For any $\sigma \in \mathbb R^T_{\ge 0}$, define the forward process backwards in time (DDIM eq. (7)): start from
# $q_\sigma(x_T\mid x_0) = \mathcal N(\sqrt{\bar\alpha_T}x_0, (1-\bar\alpha_T)I)$ and for $t > 1$
# $$q_\sigma(x_{t-1}\mid x_t, x_0) = \mathcal N\Big(\sqrt{\bar\alpha_{t-1}}\,x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,
#   \frac{x_t - \sqrt{\bar\alpha_t}\,x_0}{\sqrt{1-\bar\alpha_t}},\ \sigma_t^2 I\Big).$$
# The fraction is the noise $\varepsilon$ that $x_t$ carries. Lemma 1 of the paper: for every $\sigma$ and every $t$,
# $q_\sigma(x_t\mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}x_0, (1-\bar\alpha_t)I)$, DDPM's marginals. The generative
# process replaces $x_0$ by the network's $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$
# (eq. (12)):
# $$x_{t-1} = \sqrt{\bar\alpha_{t-1}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,\hat\varepsilon
#   + \sigma_t z,\qquad z\sim\mathcal N(0, I).$$
#
# That is exactly `TutorialDDIMScheduler.step`. Handing it the *true* $x_0$ as a model output with
# `prediction_type="sample"` (and no clipping) makes the step the forward process $q_\sigma(x_{t-1}\mid x_t, x_0)$
# itself, so we can sample the whole family without writing a line of it. We take one real digit, many copies of
# $x_T$, and walk down all 1000 levels with $\sigma_t = \eta\,\tilde\sigma_t$ for three values of $\eta$ (the
# parameterisation of eq. (16), next cell).

# %%
images, _ = load_digits_tensors(resolution=16, split="train")
x0 = images[:1]
n_copies = 400 if FAST else 4000
etas = [0.0, 0.5, 1.0]
checked_t = [999, 700, 400, 100, 10, 0]  # levels at which we compare with q(x_t | x_0)
oracle = TutorialDDIMScheduler(prediction_type="sample", clip_sample=False)
oracle.set_timesteps(T)  # the full grid 999, 998, ..., 0

g = torch.Generator().manual_seed(0)
x_T_noise = torch.randn((n_copies, 1, 16, 16), generator=g)
family = {}
for eta in etas:
    x = tm.q_sample(x0.expand(n_copies, -1, -1, -1), x_T_noise, alpha_bar[T - 1]).float()  # x_T ~ q(x_T | x_0)
    at_level = {}
    # The loop written out (not `sample_loop`): it keeps x_t at the checked levels on the way down.
    for t in oracle.timesteps:
        if int(t) in checked_t:
            at_level[int(t)] = x
        x = oracle.step(x0.expand_as(x), t, x, eta=eta, generator=g).prev_sample  # q_σ(x_{t'} | x_t, x_0)
    family[eta] = at_level

rows = []
for eta in etas:
    for t, x_t in family[eta].items():
        mean, std = tm.q_mean_std(x0, alpha_bar[t])
        # the per-pixel error of the empirical mean in units of its standard error √(1-ᾱ_t)/√n: about N(0, 1)
        z = (x_t.mean(0, keepdim=True) - mean) / (std / n_copies**0.5)
        mean_z = z.pow(2).mean().sqrt().item()
        std_ratio = (x_t.std(0) / std).mean().item()
        corr = torch.corrcoef(torch.stack([(x_t - mean.float()).flatten(), x_T_noise.flatten()]))[0, 1].item()
        rows.append((eta, t, mean_z, std_ratio, corr))
        print(
            f"η = {eta:.1f}, t = {t:3d}: mean error / standard error (RMS over pixels) = {mean_z:.2f}, "
            f"std / √(1-ᾱ_t) = {std_ratio:.3f}, corr(x_t, x_T) = {corr:+.3f}"
        )

# %% [markdown]
# Every $\eta$ reproduces DDPM's marginal: the error of the empirical mean is the size of its standard error
# $\sqrt{1-\bar\alpha_t}/\sqrt n$ (a ratio near 1), and the standard deviation ratio is 1. What differs is the **joint** law: the last column is the correlation
# between the noise in $x_t$ and the noise in $x_T$. With $\eta = 0$ it is 1 at every $t$: given $x_0$, the whole path
# is a deterministic function of $x_T$. With $\eta = 1$ it follows the Markov chain's
# $\sqrt{\mathrm{SNR}_T/\mathrm{SNR}_t}$ (next plot), which goes to 0 as $t$ decreases: fresh noise replaces the old.

# %%
markov_corr = (tm.snr(alpha_bar[T - 1]) / tm.snr(alpha_bar)).sqrt()
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(T), markov_corr, "k--", lw=1, label=r"Markov chain: $\sqrt{\mathrm{SNR}_T/\mathrm{SNR}_t}$")
for eta in etas:
    ax.plot([r[1] for r in rows if r[0] == eta], [r[4] for r in rows if r[0] == eta], "o-", label=f"η = {eta}")
ax.set_xlabel("t")
ax.set_ylabel(r"corr($x_t$, $x_T$ | $x_0$)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ### η = 1 is DDPM, η = 0 is deterministic
#
# DDIM parameterises the family by one number (eq. (16)):
# $$\sigma_t(\eta) = \eta\,\sqrt{\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}}\,\sqrt{1-\frac{\bar\alpha_t}{\bar\alpha_{t-1}}}.$$
# At $\eta = 1$, $\sigma_t^2$ is DDPM's posterior variance $\tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$
# (notebook 3), and $q_\sigma(x_{t-1}\mid x_t,x_0)$ is then DDPM's posterior: the forward process is Markovian again
# and the sampler is DDPM's. On a shorter grid $t \to t'$ the same formula holds with $\bar\alpha_{t'}$ in place of
# $\bar\alpha_{t-1}$. We build the $\sigma$ table in float64 from eq. (16) and compare it with
# `tm.q_posterior_coefs`, on the full grid and on a 50-step grid.

# %%
for steps in (T, 50):
    grid = grids.spaced_timesteps(steps, T)
    prev = grids.successor_timesteps(grid)
    ab = alpha_bar[grid]
    ab_prev = torch.where(prev >= 0, alpha_bar[prev.clamp(min=0)], torch.ones((), dtype=torch.float64))  # ᾱ_{-1} = 1
    sigma_eta1 = ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()  # DDIM eq. (16), η = 1
    beta_tilde = tm.q_posterior_coefs(ab, ab_prev)[2]  # DDPM eq. (7)
    inner = beta_tilde > 0  # the last step lands on x_0 (ᾱ = 1), where both are exactly 0
    rel_err = ((sigma_eta1 - beta_tilde.sqrt())[inner].abs() / beta_tilde[inner].sqrt()).max().item()
    print(
        f"{steps:4d}-step grid: σ_t(η=1) vs √β̃_t, max relative difference {rel_err:.1e} (dtype {sigma_eta1.dtype}); "
        f"last step σ = {sigma_eta1[-1]:.0f}, √β̃ = {beta_tilde[-1].sqrt():.0f}"
    )

# %% [markdown]
# At $\eta = 0$ the step has no noise term: the sampler maps $x_T$ to $x_0$ deterministically (DDIM, the "implicit"
# model). With the shipped network, two runs from the same $x_T$ with different random generators coincide at
# $\eta = 0$ and differ at $\eta = 1$.

# %%
pipe = TutorialUnconditionalPipeline.from_pretrained(SHIPPED)
pipe.set_progress_bar_config(disable=True)
unet = pipe.unet.eval()
config = pipe.scheduler.config
pipe.scheduler = TutorialDDIMScheduler.from_config(config)
latents = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
repeat_gap = {}
for eta in (0.0, 1.0):
    a, b = (
        pipe(
            batch_size=4,
            latents=latents,
            num_inference_steps=20,
            eta=eta,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
        ).images
        for seed in (1, 2)
    )
    repeat_gap[eta] = (a - b).abs().max().item()
    print(f"η = {eta}: max |run 1 - run 2| = {repeat_gap[eta]:.3f}")

# %% [markdown]
# ## (b) The pitfall first: clipping $\hat x_0$ breaks deterministic DDIM at many steps
#
# The shipped scheduler config has `clip_sample=True` (diffusers' default): every step clips $\hat x_0$ to $[-1, 1]$
# before using it. For DDPM this is harmless. For DDIM with $\eta = 0$ it is not, and it gets *worse with more steps*.
# The update
# $$x_{t'} = \sqrt{\bar\alpha_{t'}}\,\mathrm{clip}(\hat x_0) + \sqrt{1-\bar\alpha_{t'}}\,\hat\varepsilon$$
# keeps the unclipped $\hat\varepsilon$, so where $\hat x_0$ overshoots (the digits' background sits exactly at $-1$,
# and the network's estimate regularly goes past it) the new $x_{t'}$ is no longer on the deterministic trajectory the
# network describes (the probability-flow ODE, of which DDIM is an Euler discretisation, eq. (14)): it is pulled
# towards the inside of $[-1, 1]$. Every step adds such a pull; with $\eta = 0$ there is no fresh noise to wash it
# out, so the bias accumulates with the number of steps. DDPM injects fresh noise at every step, which hides it.
#
# We sample the same $x_T$ (sample $i$ has its own seed) with DDIM at several step counts, clipping on and off, and
# look at three things: the Fréchet distance of `digits_metrics`; the share of saturated pixels ($|x| > 0.99$; a real
# digit's background is exactly $-1$); and, because the sampler is deterministic, how far each clipped sample is
# from the unclipped one from the same $x_T$.

# %%
NUM_SAMPLES = 16 if FAST else 64
CLIP_STEPS = [10, 50, 100] if FAST else [10, 50, 200]
STEPS = [10, 50, 100] if FAST else [10, 50, 100, 1000]
schedulers = {
    "DDIM, clip on": TutorialDDIMScheduler.from_config(config, clip_sample=True),
    "DDIM, clip off": TutorialDDIMScheduler.from_config(config, clip_sample=False),
    "DDPM, clip off": TutorialDDPMScheduler.from_config(config, clip_sample=False),
}
samples = {}
for name, n_steps in [("DDIM, clip on", n) for n in CLIP_STEPS] + [
    ("DDIM, clip off", n) for n in sorted(set(CLIP_STEPS) | set(STEPS))
]:
    samples[name, n_steps] = sample_sharded(unet, schedulers[name], NUM_SAMPLES, n_steps, seed=0)


def saturated(x):
    return (x.abs() > 0.99).float().mean().item()


real, _ = load_digits_tensors(resolution=16, split="train")  # the metric's reference is the held-out split
real_fd, real_saturated = digits_metrics(real[:NUM_SAMPLES])["frechet_distance"], saturated(real)
fd = {key: digits_metrics(x)["frechet_distance"] for key, x in samples.items()}
drift = {n: (samples["DDIM, clip on", n] - samples["DDIM, clip off", n]).abs().mean().item() for n in CLIP_STEPS}
print(
    f"{NUM_SAMPLES} samples; real digits: Fréchet distance {real_fd:.0f} (the floor at this n), "
    f"{100 * real_saturated:.0f}% saturated pixels"
)
for n in CLIP_STEPS:
    print(
        f"DDIM-{n:<4d} Fréchet distance clip on {fd['DDIM, clip on', n]:6.0f} / off {fd['DDIM, clip off', n]:4.0f};"
        f"  saturated on {100 * saturated(samples['DDIM, clip on', n]):4.1f}% / off "
        f"{100 * saturated(samples['DDIM, clip off', n]):4.1f}%;  mean |on - off| {drift[n]:.3f}"
    )
lo, hi = CLIP_STEPS[1], CLIP_STEPS[-1]
converged = {
    clip: (samples[f"DDIM, clip {clip}", lo] - samples[f"DDIM, clip {clip}", hi]).abs().mean().item()
    for clip in ("on", "off")
}
print(f"mean |DDIM-{lo} - DDIM-{hi}|: clip off {converged['off']:.3f}, clip on {converged['on']:.3f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for clip in ("on", "off"):
    axes[0].plot(CLIP_STEPS, [fd[f"DDIM, clip {clip}", n] for n in CLIP_STEPS], "o-", label=f"clip {clip}")
    axes[1].plot(
        CLIP_STEPS, [100 * saturated(samples[f"DDIM, clip {clip}", n]) for n in CLIP_STEPS], "o-", label=f"clip {clip}"
    )
axes[0].axhline(real_fd, color="k", ls=":", label="real digits")
axes[1].axhline(100 * real_saturated, color="k", ls=":", label="real digits")
axes[2].plot(CLIP_STEPS, [drift[n] for n in CLIP_STEPS], "o-", color="C3")
for ax, title in zip(axes, ["Fréchet distance", "% saturated pixels", "mean |clip on - clip off|, same $x_T$"]):
    ax.set_xscale("log")
    ax.set_xlabel("DDIM steps (η = 0)")
    ax.set_title(title)
axes[0].legend()
plt.show()

fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
for ax, clip in zip(axes, ("on", "off")):
    ax.imshow(make_grid(samples[f"DDIM, clip {clip}", hi][:36], nrow=6), cmap="gray")
    ax.set_title(f"DDIM-{hi}, clip {clip}")
    ax.axis("off")
plt.show()

# %% [markdown]
# Without clipping, DDIM converges as the grid is refined: the 50-step and the many-step samples from the same $x_T$
# nearly coincide, as the discretisation of one ODE should. With clipping, the samples walk away from the unclipped
# ones, more the more steps are taken, and lose contrast: hardly any pixel reaches $\pm 1$, where most of a real
# digit sits (its background is exactly $-1$). Clipping is not useless, though: without it a few samples keep a
# speckle of unremoved noise (right grid), and at 10–50 steps the two settings score about the same. In a
# separate, larger measurement (128 samples, seed 0; not run here) the Fréchet distance of clipped DDIM went from 54
# at 50 steps to 182 at 200 steps, and to about 1070 at 1000 steps (64 samples), while unclipped DDIM gave 65 and 60.
# diffusers' `DDIMScheduler` gives the same samples up to float32 rounding (next cell), so this is a property of DDIM with clipping, not a
# bug of this implementation. The simple fix for $\eta = 0$ is `clip_sample=False`.

# %%
from diffusers import DDIMScheduler  # noqa: E402  (only for this comparison)

theirs = sample_sharded(unet, DDIMScheduler.from_config(config), NUM_SAMPLES, CLIP_STEPS[1], seed=0)
diffusers_gap = (theirs - samples["DDIM, clip on", CLIP_STEPS[1]]).abs().max().item()
print(f"diffusers DDIMScheduler vs ours, DDIM-{CLIP_STEPS[1]} with clipping: max |difference| = {diffusers_gap:.1e}")

# %% [markdown]
# ## (c) DDIM vs DDPM at 1000, 100, 50 and 10 steps
#
# A fair comparison therefore uses `clip_sample=False` for both samplers: same network, same schedule, same $x_T$,
# only the update differs. DDPM on a grid of $N < T$ steps uses the respaced posterior ($\eta = 1$ on that grid);
# DDIM uses $\eta = 0$.

# %%
for n in STEPS:
    samples["DDPM, clip off", n] = sample_sharded(unet, schedulers["DDPM, clip off"], NUM_SAMPLES, n, seed=0)
    fd["DDPM, clip off", n] = digits_metrics(samples["DDPM, clip off", n])["frechet_distance"]
for n in STEPS:
    print(f"{n:5d} steps: Fréchet distance DDIM {fd['DDIM, clip off', n]:6.0f}, DDPM {fd['DDPM, clip off', n]:6.0f}")

fig, ax = plt.subplots(figsize=(5, 3))
for name in ("DDIM, clip off", "DDPM, clip off"):
    ax.plot(STEPS, [fd[name, n] for n in STEPS], "o-", label=name.split(",")[0])
ax.axhline(real_fd, color="k", ls=":", label="real digits")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("steps")
ax.set_ylabel("Fréchet distance")
ax.legend()
plt.show()

fig, axes = plt.subplots(2, len(STEPS), figsize=(2.6 * len(STEPS), 5.6))
for row, name in zip(axes, ("DDIM, clip off", "DDPM, clip off")):
    for ax, n in zip(row, STEPS):
        ax.imshow(make_grid(samples[name, n][:16], nrow=4), cmap="gray")
        ax.set_title(f"{name.split(',')[0]}-{n}")
        ax.axis("off")
plt.show()

# %% [markdown]
# In the full run (64 samples) DDIM scores 58–66 at every step count from 10 to 1000, DDPM 97 at 10 steps, 54–103 at
# 50–100 and 62 at 1000; real digits score 79 at this sample size. With 64 samples the Fréchet distance moves by tens
# from one sample set to the next, so only large gaps count: DDIM at 10 steps is as good as at 1000, DDPM at 10 steps
# is clearly worse (blurrier digits), and at 1000 steps the two agree. The grids show the other difference: DDIM
# turns one $x_T$ into nearly the same image at every step count, because every grid discretises the same ODE, while
# DDPM draws fresh noise at each step and gives a different digit for each $N$. That determinism is also what makes
# DDIM invertible (DDIM inversion, later in the tutorial).
#
# ## What we showed (asserted)

# %%
for eta, t, mean_z, std_ratio, _ in rows:  # every member of the family has DDPM's marginals
    assert mean_z < 1.5 and abs(std_ratio - 1) < 0.05, (eta, t)
assert all(abs(r[4] - 1) < 1e-3 for r in rows if r[0] == 0.0)  # η = 0: x_t is a function of x_T (and x_0)
assert all(abs(r[4] - markov_corr[r[1]].item()) < 0.1 for r in rows if r[0] == 1.0)  # η = 1: the Markov chain's
assert rel_err < 1e-12  # σ_t(η = 1) = √β̃_t in float64
assert repeat_gap[0.0] < 1e-5 and repeat_gap[1.0] > 0.1  # η = 0 is deterministic, η = 1 is not
assert all(x.shape == (NUM_SAMPLES, 1, 16, 16) for x in samples.values())
# clipping with η = 0: the drift from the unclipped trajectory grows with the number of steps...
assert drift[CLIP_STEPS[0]] < drift[CLIP_STEPS[1]] < drift[CLIP_STEPS[2]] and drift[CLIP_STEPS[2]] > 1.5 * drift[10]
assert converged["on"] > 5 * converged["off"]  # ...unclipped DDIM converges as the grid is refined, clipped does not
assert saturated(samples["DDIM, clip on", hi]) < 0.5 * saturated(samples["DDIM, clip off", hi])  # the digits fade
assert diffusers_gap < 1e-4  # diffusers' DDIMScheduler does the same (to float32 rounding)
few = [n for n in STEPS if n < 1000]  # below 1000 steps DDIM beats DDPM
assert sum(fd["DDIM, clip off", n] for n in few) < 0.85 * sum(fd["DDPM, clip off", n] for n in few)
assert fd["DDIM, clip off", 50] < 2 * real_fd  # DDIM-50 is close to the floor of real digits at this n
