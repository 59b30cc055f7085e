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
# # 2. The forward process
#
# DDPM corrupts data with a fixed Markov chain (Ho et al. 2020, eq. (2)):
# $$q(x_t \mid x_{t-1}) = \mathcal N\big(\sqrt{1-\beta_t}\,x_{t-1},\ \beta_t I\big),\qquad t = 1..T.$$
# Because Gaussians compose, every marginal is closed-form (eq. (4)), with $\bar\alpha_t = \prod_{s\le t}(1-\beta_s)$:
# $$q(x_t \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t) I\big)
#   \quad\Longleftrightarrow\quad x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon .$$
# We check on real digits that jumping straight to $t$ with `tm.q_sample` gives the same distribution as running
# the chain step by step.

# %%
import math
import os

import matplotlib.pyplot as plt
import torch

from schedulers import TutorialDDPMScheduler
from schedulers import tutorial_math as tm
from training.data import load_digits_tensors

FAST = os.environ.get("TUTORIAL_FAST") == "1"
images, labels = load_digits_tensors(resolution=16, split="train")
x0 = images[:1].double()  # one digit, in [-1, 1]
betas = tm.make_betas("linear", 1000)  # DDPM's schedule: β from 1e-4 to 0.02
alpha_bar = tm.alpha_bar_from_betas(betas)
print(images.shape, f"ᾱ_1 = {alpha_bar[0]:.5f}, ᾱ_500 = {alpha_bar[499]:.4f}, ᾱ_1000 = {alpha_bar[-1]:.2e}")

# %% [markdown]
# ## Iterating the chain vs the closed form
#
# Take many copies of the same $x_0$, run $t$ steps of the chain, and compare the per-pixel mean and standard
# deviation with $\sqrt{\bar\alpha_t} x_0$ and $\sqrt{1-\bar\alpha_t}$.

# %%
n_copies = 200 if FAST else 4_000
g = torch.Generator().manual_seed(0)
checkpoints = [10, 100, 300, 1000]
chain = x0.repeat(n_copies, 1, 1, 1)
rows = []
for t in range(1, 1001):
    beta = betas[t - 1]
    chain = (1 - beta).sqrt() * chain + beta.sqrt() * torch.randn(chain.shape, generator=g, dtype=torch.float64)
    if t in checkpoints:
        closed = tm.q_sample(
            x0.repeat(n_copies, 1, 1, 1), torch.randn(chain.shape, generator=g, dtype=torch.float64), alpha_bar[t - 1]
        )
        mean_exact, std_exact = tm.q_mean_std(x0, alpha_bar[t - 1])
        err_chain = (chain.mean(0) - mean_exact[0]).abs().max().item()
        err_jump = (closed.mean(0) - mean_exact[0]).abs().max().item()
        rows.append(
            (t, err_chain, err_jump, chain.std(0).mean().item(), closed.std(0).mean().item(), std_exact.item())
        )
print(f"{'t':>5} {'|chain mean-exact|':>19} {'|jump mean-exact|':>18} {'chain std':>10} {'jump std':>9} {'exact':>7}")
for r in rows:
    print(f"{r[0]:>5} {r[1]:>19.4f} {r[2]:>18.4f} {r[3]:>10.4f} {r[4]:>9.4f} {r[5]:>7.4f}")

# %% [markdown]
# ## What a digit looks like along the way
#
# The scheduler's `add_noise` is the same formula; at $t = T$ almost nothing of $x_0$ is left
# ($\sqrt{\bar\alpha_T} \approx 0.006$), which is why sampling can start from pure noise.

# %%
scheduler = TutorialDDPMScheduler()
shown_t = [0, 50, 100, 200, 400, 600, 999]
eps = torch.randn((1, 1, 16, 16), generator=g)
noisy = [scheduler.add_noise(images[:1], eps, torch.tensor([t]))[0, 0] for t in shown_t]
fig, axes = plt.subplots(1, len(shown_t), figsize=(2 * len(shown_t), 2.3))
for ax, t, img in zip(axes, shown_t, noisy):
    ax.imshow(img, cmap="gray", vmin=-1.5, vmax=1.5)
    ax.set_title(f"t = {t}")
    ax.axis("off")
plt.show()

# %% [markdown]
# ## What we showed (asserted)

# %%
for t, err_chain, err_jump, std_chain, std_jump, std_exact in rows:
    bound = 5 * std_exact / math.sqrt(n_copies) * 2  # 5 standard errors, max over 256 pixels: ×2 margin
    assert err_chain < bound and err_jump < bound, (t, err_chain, err_jump, bound)
    assert abs(std_chain - std_exact) < 0.03 and abs(std_jump - std_exact) < 0.03
assert alpha_bar[-1].sqrt() < 0.01  # x_T carries < 1% of x_0
assert (noisy[0] - images[0, 0]).abs().max() < 5 * (1 - alpha_bar[0]).sqrt()  # t = 0: the digit, σ_1 = 0.01 noise
