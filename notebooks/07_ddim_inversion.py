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
# # 7. DDIM inversion and interpolation
#
# Deterministic DDIM ($\eta = 0$, Song, Meng & Ermon 2020, eq. (12)) maps $x_t$ to the next, less noisy level $t'$ by
# $$x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}}\,\hat\varepsilon,\qquad
# \hat x_0 = \frac{x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}},\quad
# \hat\varepsilon = \varepsilon_\theta(x_t, t).$$
# In the variables $\bar x = x/\sqrt{\bar\alpha}$ and $\bar\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha}$ this is one Euler
# step of the ODE $d\bar x/d\bar\sigma = \varepsilon_\theta$ (DDIM eq. (14)), so it can be **run backwards**: from a
# clean image $x_0$ walk the grid upwards to a noise $x_T$ that DDIM maps back to $x_0$ (DDIM Sec. 5.4, eq. (13)).
# The exact inverse would need $\hat\varepsilon$ at the unknown upper level; inversion reads it at the current level
# instead, $\hat\varepsilon = \varepsilon_\theta(x_{t'}, t)$, a first-order error that vanishes as the grid is refined.
#
# The library gives this as `TutorialDDIMScheduler.inverse_step` and, around a UNet, as
# `TutorialDDIMInversionPipeline` (`invert`, `__call__(latents=...)`, `interpolate` with `slerp`).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import training
from custom_pipelines import TutorialDDIMInversionPipeline, TutorialUnconditionalPipeline, slerp
from schedulers import TutorialDDIMScheduler
from schedulers.gaussian_mixture import GaussianMixture
from training.data import load_digits_tensors

FAST = os.environ.get("TUTORIAL_FAST") == "1"
MODEL = Path(training.__file__).resolve().parent / "pretrained" / "digits-ddpm"

# %% [markdown]
# ## With the exact model, inversion round-trips
#
# A Gaussian mixture has a closed-form $\varepsilon^*(x_t, t) = -\sqrt{1-\bar\alpha_t}\,\nabla\log q_t(x_t)$ at every
# level (`GaussianMixture.model`): a perfectly trained network. Wrapped behind the `UNet2DModel` interface the
# pipeline calls (`GaussianMixture.as_unet`), it lets us measure the error of inversion itself, with no training
# error mixed in. We invert 8 samples of a 16-dimensional mixture (viewed as 1×4×4 "images"), regenerate them with the same $N$, and record
# $\max|\hat x_0 - x_0|$.

# %%
mixture = GaussianMixture.random(dim=16, num_modes=3, seed=0)
exact_scheduler = TutorialDDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
exact_pipe = TutorialDDIMInversionPipeline(
    unet=mixture.as_unet(exact_scheduler.alpha_bar, (1, 4, 4)), scheduler=exact_scheduler
)
exact_pipe.set_progress_bar_config(disable=True)
x0_mix = mixture.sample(8, generator=torch.Generator().manual_seed(0)).reshape(8, 1, 4, 4)

exact_steps = [10, 20, 50, 100, 200, 500, 1000]
exact_errors = []
for n in exact_steps:
    z = exact_pipe.invert((x0_mix + 1) / 2, num_inference_steps=n).latents  # the pipeline takes images in [0, 1]
    out = exact_pipe(batch_size=8, latents=z, num_inference_steps=n, output_type="pt", return_trajectory=True)
    exact_errors.append((out.trajectory[-1] - x0_mix).abs().max().item())  # trajectory[-1]: x̂_0 before clamping
    print(f"N = {n:4d}: max |x̂_0 - x_0| = {exact_errors[-1]:.2e};  x_T mean {z.mean():+.3f}, std {z.std():.3f}")
exact_slope = np.polyfit(np.log(exact_steps), np.log(exact_errors), 1)[0]

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(exact_steps, exact_errors, "o-", label=f"inversion + DDIM (slope {exact_slope:.2f})")
ax.loglog(exact_steps, exact_errors[0] * exact_steps[0] / np.array(exact_steps), "k--", lw=0.8, label="1 / N")
ax.set_xlabel("N (inversion steps = generation steps)")
ax.set_ylabel(r"max $|\hat x_0 - x_0|$")
ax.set_title("exact ε: the round trip is first order in 1/N")
ax.legend()
plt.show()

# %% [markdown]
# The error falls like $1/N$: each inverse step makes a local error $O(\Delta\bar\sigma^2)$ by reading
# $\hat\varepsilon$ one level off, and $N$ of them add up to $O(1/N)$. At $N = 1000$ the round trip is accurate to a
# few thousandths on data of scale ≈ 0.5.
#
# ## Real digits with the shipped model
#
# Now the trained digits model (`training/pretrained/digits-ddpm`) and real held-out digits, never seen in
# training. One setting of the shipped scheduler must change: it has `clip_sample=True`, which clips $\hat x_0$ to
# $[-1, 1]$ inside every DDIM step. `inverse_step` never clips (clipping is not invertible), so a clipped
# regeneration follows a different map from the one that was inverted: every step at which some pixel of
# $\hat x_0$ leaves $[-1, 1]$ (frequent at high noise) pushes the trajectory off the ODE path, and these
# deviations *accumulate with more steps* instead of vanishing. We therefore regenerate with `clip_sample=False`,
# and show the clipped one for comparison.

# %%
shipped = TutorialUnconditionalPipeline.from_pretrained(MODEL)
print(shipped.scheduler.config.clip_sample)  # True
pipe = TutorialDDIMInversionPipeline(
    unet=shipped.unet, scheduler=TutorialDDIMScheduler.from_config(shipped.scheduler.config, clip_sample=False)
)
clipped_pipe = TutorialDDIMInversionPipeline(unet=shipped.unet, scheduler=shipped.scheduler)
for p in (pipe, clipped_pipe):
    p.set_progress_bar_config(disable=True)

digits, labels = load_digits_tensors(16, "test")
x0 = digits[:16]
digit_steps = [10, 25, 50] if FAST else [10, 20, 50, 100, 200]
recon_rms, clipped_rms, latents = [], [], {}
with torch.no_grad():
    for n in digit_steps:
        z = pipe.invert((x0 + 1) / 2, num_inference_steps=n).latents
        rec = pipe(batch_size=16, latents=z, num_inference_steps=n, output_type="pt", return_trajectory=True)
        rec_clip = clipped_pipe(
            batch_size=16, latents=z, num_inference_steps=n, output_type="pt", return_trajectory=True
        )
        recon_rms.append((rec.trajectory[-1] - x0).pow(2).mean().sqrt().item())
        clipped_rms.append((rec_clip.trajectory[-1] - x0).pow(2).mean().sqrt().item())
        latents[n] = z
        print(f"N = {n:3d}: RMS reconstruction error {recon_rms[-1]:.3f} (clip_sample=True: {clipped_rms[-1]:.3f})")
digit_slope = np.polyfit(np.log(digit_steps), np.log(recon_rms), 1)[0]

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(digit_steps, recon_rms, "o-", label=f"clip_sample=False (slope {digit_slope:.2f})")
ax.loglog(digit_steps, clipped_rms, "s--", label="clip_sample=True")
ax.set_xlabel("N")
ax.set_ylabel(r"RMS $\hat x_0 - x_0$")
ax.set_title("real held-out digits, shipped model")
ax.legend()
plt.show()

fig, axes = plt.subplots(2, 8, figsize=(9, 2.6))
for k in range(8):
    axes[0, k].imshow(x0[k, 0], cmap="gray", vmin=-1, vmax=1)
    axes[1, k].imshow(rec.trajectory[-1][k, 0], cmap="gray", vmin=-1, vmax=1)
    for ax in axes[:, k]:
        ax.set_xticks([])
        ax.set_yticks([])
axes[0, 0].set_ylabel("real")
axes[1, 0].set_ylabel(f"N = {digit_steps[-1]}")
plt.show()

# %% [markdown]
# Without clipping the error falls close to $1/N$ as with the exact model (the trained network's own error adds
# little: the same network is used in both directions, so its mistakes largely cancel). With clipping the
# error does *not* shrink: more steps means more clipped steps. (At $N = 10$ clipping even looks better: keeping
# $\hat x_0$ in the data range masks part of the large inversion error. The advantage is gone by $N = 20$.)
#
# ## The inverted latents look like Gaussian noise
#
# If inversion reaches the prior, $x_T$ should look like a draw from $\mathcal N(0, I)$: mean 0, standard
# deviation 1, norm near $\sqrt D = 16$ for $D = 256$ pixels. Inversion gets there only as $N$ grows: reading
# $\hat\varepsilon$ one level too low under-estimates the noise each step adds, so coarse inversions give latents that
# are too small. The exact-model run above shows it without any training error: the std of $x_T$ is 0.41 at $N = 10$
# and 0.97 at $N = 1000$. The digits' latents also keep a trace of the dark background (a negative mean), which
# fades as $N$ grows.

# %%
z = latents[digit_steps[-1]]
latent_mean, latent_std = z.mean().item(), z.std().item()
for n in digit_steps:
    print(
        f"N = {n:3d}: latent mean {latents[n].mean():+.3f}, std {latents[n].std():.3f}, "
        f"mean norm {latents[n].flatten(1).norm(dim=1).mean():.2f} (√D = 16)"
    )
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1.3, 2]})
grid = np.linspace(-4, 4, 200)
ax1.hist(z.flatten().numpy(), bins=50, density=True, alpha=0.6, label=f"x_T, N = {digit_steps[-1]}")
ax1.plot(grid, np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi), "k", label="N(0, 1)")
ax1.legend()
ax1.set_title("pixel values of the inverted latents")
ax2.imshow(torch.cat(list(z[:8, 0]), dim=1), cmap="gray")
ax2.set_axis_off()
ax2.set_title("x_T of the first 8 digits")
plt.show()

# %% [markdown]
# ## Interpolation: slerp, not a straight line
#
# Two latents $z_a, z_b$ of the typical set of $\mathcal N(0, I_D)$ have norms $\approx\sqrt D$ and are nearly
# orthogonal. The straight line $(1-\alpha) z_a + \alpha z_b$ has norm $\approx\sqrt{(1-\alpha)^2 + \alpha^2}\,\sqrt D$,
# only $\sqrt{D/2}$ at the midpoint: a point the model never saw at $t = T$ (a latent far too "quiet"; with large
# image models such midpoints decode to washed-out, blurry images). Spherical interpolation (Shoemake 1985; `slerp`) walks the great circle,
# $$\mathrm{slerp}(z_a, z_b; \alpha) = \frac{\sin((1-\alpha)\theta)}{\sin\theta} z_a + \frac{\sin(\alpha\theta)}{\sin\theta} z_b,
# \qquad \cos\theta = \frac{\langle z_a, z_b\rangle}{\|z_a\|\|z_b\|},$$
# and keeps the norm. (Inverted digits are not quite independent draws: the two latents below share a trace of the
# common dark background, $\cos\theta \approx 0.2$, so the straight line's dip is a little shallower than
# $1/\sqrt2$.) `pipe.interpolate` decodes points along the slerp between two latents (given two images, it inverts
# them first); we decode the straight line with the same pipeline for comparison.

# %%
n_interp = 25 if FAST else 50
num_points = 5 if FAST else 9
index_a, index_b = int((labels == 0).nonzero()[0]), int((labels == 7).nonzero()[0])
with torch.no_grad():
    z_a = pipe.invert((digits[index_a : index_a + 1] + 1) / 2, num_inference_steps=n_interp).latents
    z_b = pipe.invert((digits[index_b : index_b + 1] + 1) / 2, num_inference_steps=n_interp).latents
    path_slerp = pipe.interpolate(
        latents_a=z_a, latents_b=z_b, num_points=num_points, num_inference_steps=n_interp, output_type="pt"
    ).images
    alphas = torch.linspace(0, 1, num_points).tolist()
    z_line = torch.cat([(1 - a) * z_a + a * z_b for a in alphas])
    path_line = pipe(batch_size=num_points, latents=z_line, num_inference_steps=n_interp, output_type="pt").images

fine = np.linspace(0, 1, 101)
norm_slerp = np.array([slerp(z_a, z_b, a).norm().item() for a in fine])
norm_line = np.array([((1 - a) * z_a + a * z_b).norm().item() for a in fine])
angle = torch.arccos(torch.nn.functional.cosine_similarity(z_a.flatten(1), z_b.flatten(1))).item()
print(
    f"|z_a| = {z_a.norm():.2f}, |z_b| = {z_b.norm():.2f}, angle {np.degrees(angle):.0f}°; "
    f"midpoint norm: slerp {norm_slerp[50]:.2f}, straight line {norm_line[50]:.2f}"
)

fig = plt.figure(figsize=(11, 4))
for row, (name, path) in enumerate((("slerp", path_slerp), ("linear", path_line))):
    for k in range(num_points):
        ax = fig.add_subplot(2, num_points + 3, row * (num_points + 3) + k + 1)
        ax.imshow(path[k, 0], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if k == 0:
            ax.set_ylabel(name)
ax = fig.add_subplot(1, num_points + 3, (num_points + 2, num_points + 3))
ax.plot(fine, norm_slerp, label="slerp")
ax.plot(fine, norm_line, label="linear")
ax.axhline(16, color="k", lw=0.8, ls=":", label=r"$\sqrt{D}$")
ax.set_xlabel(r"$\alpha$")
ax.set_title("‖z(α)‖")
ax.legend()
plt.show()

# %% [markdown]
# The norm plot is the difference: slerp stays on the shell of its endpoints, the straight line dips by about 20%.
# On this small digits model the two decoded rows look almost alike (it turns even the quieter midpoint latents into
# clean digits), and on both paths the switch from one digit to the other happens late, around α ≈ 0.8.
#
# ## What we showed (asserted)

# %%
assert all(b < a for a, b in zip(exact_errors, exact_errors[1:])), exact_errors  # the round trip converges
assert exact_errors[-1] < 1e-2 and -1.3 < exact_slope < -0.7, (exact_errors, exact_slope)  # first order, small
assert all(b < a for a, b in zip(recon_rms, recon_rms[1:])) and recon_rms[-1] < 0.06, recon_rms  # real digits
assert clipped_rms[-1] > 2 * recon_rms[-1]  # per-step clipping drifts off the path that was inverted
assert abs(latent_mean) < 0.2 and 0.7 < latent_std < 1.15, (latent_mean, latent_std)  # latents look like N(0, I)
assert abs(latents[digit_steps[-1]].std().item() - 1) < abs(latents[digit_steps[0]].std().item() - 1)
ends = sorted([z_a.norm().item(), z_b.norm().item()])
assert ends[0] * 0.999 < norm_slerp.min() and norm_slerp.max() < ends[1] * 1.001  # slerp keeps the norm
assert norm_line[50] < 0.9 * norm_slerp[50]  # the straight line cuts through the low-norm interior
