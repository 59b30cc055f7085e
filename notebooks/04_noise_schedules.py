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
# # 4. Noise schedules
#
# The forward process is fixed by the sequence $\beta_1..\beta_T$, or equivalently by $\bar\alpha_t$, or by the
# signal-to-noise ratio $\mathrm{SNR}_t = \bar\alpha_t/(1-\bar\alpha_t)$. We compare the schedules the library ships
# (`tm.BETA_SCHEDULES`): DDPM's **linear** β, the **cosine** schedule of improved DDPM
# ($\bar\alpha_t = f(t)/f(0)$, $f(t) = \cos^2\!\big(\tfrac{t/T+s}{1+s}\tfrac\pi2\big)$), GeoDiff's **sigmoid**, the
# latent-diffusion **scaled_linear**, and **laplace** (a log-SNR concentrated around 0).

# %%
import os

import matplotlib.pyplot as plt
import torch

from schedulers import TutorialDDPMScheduler
from schedulers import tutorial_math as tm
from training.data import load_digits_tensors

FAST = os.environ.get("TUTORIAL_FAST") == "1"
T = 1000
schedules = {name: TutorialDDPMScheduler(beta_schedule=name) for name in tm.BETA_SCHEDULES}
alpha_bars = {name: s.alpha_bar for name, s in schedules.items()}

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
for name, ab in alpha_bars.items():
    ax1.plot(ab, label=name)
    ax2.plot(tm.log_snr(ab), label=name)
ax1.set_title(r"$\bar\alpha_t$")
ax2.set_title(r"$\log \mathrm{SNR}_t$")
for ax in (ax1, ax2):
    ax.set_xlabel("t")
ax1.legend()
plt.show()

# %% [markdown]
# ## What a digit looks like at each t, schedule by schedule
#
# Same digit, same noise; only $\bar\alpha_t$ differs. The linear schedule destroys the digit by $t \approx 400$;
# the cosine one keeps it recognisable much longer, spending more steps at useful noise levels.

# %%
images, _ = load_digits_tensors(resolution=16, split="train")
digit = images[:1]
eps = torch.randn(digit.shape, generator=torch.Generator().manual_seed(0))
shown_t = [0, 100, 250, 400, 600, 800, 999]
names = ["linear", "squaredcos_cap_v2", "sigmoid"]
fig, axes = plt.subplots(len(names), len(shown_t), figsize=(1.6 * len(shown_t), 1.8 * len(names)))
for row, name in zip(axes, names):
    for ax, t in zip(row, shown_t):
        ax.imshow(schedules[name].add_noise(digit, eps, torch.tensor([t]))[0, 0], cmap="gray", vmin=-1.5, vmax=1.5)
        ax.set_xticks([])
        ax.set_yticks([])
        if name == names[0]:
            ax.set_title(f"t = {t}")
    row[0].set_ylabel(name.replace("squaredcos_cap_v2", "cosine"))
plt.show()

# %% [markdown]
# ## Where each schedule crosses SNR = 1
#
# The step at which signal and noise have equal power tells how the schedule shares its steps between coarse
# structure (low SNR) and fine detail (high SNR).

# %%
crossing = {name: int((tm.snr(ab) < 1).nonzero()[0]) for name, ab in alpha_bars.items()}
for name, t in crossing.items():
    print(f"{name:>18}: SNR < 1 from t = {t}; ᾱ_1 = {alpha_bars[name][0]:.4f}, ᾱ_T = {alpha_bars[name][-1]:.2e}")

# %% [markdown]
# ## What we showed (asserted)

# %%
for name, ab in alpha_bars.items():
    assert bool((ab[1:] < ab[:-1]).all()), name  # every step adds noise
    # starts at the data, ends (almost) at pure noise; laplace's ᾱ spans only [0.03, 0.98] (its log-SNR is capped)
    assert (ab[0] > 0.99 and ab[-1] < 0.01) or (name == "laplace" and ab[0] > 0.97 and ab[-1] < 0.04), name
assert crossing["squaredcos_cap_v2"] > crossing["linear"]  # cosine keeps signal longer
assert alpha_bars["squaredcos_cap_v2"][T // 2] > 2 * alpha_bars["linear"][T // 2]
