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
# # 3. The reverse process: the posterior, and why the network predicts ε
#
# Running the chain backwards needs $q(x_{t-1}\mid x_t)$, which depends on the unknown data distribution. Conditioned
# on $x_0$, though, it is Gaussian (Ho et al. 2020, eqs. (6)–(7)):
# $$q(x_{t-1}\mid x_t, x_0) = \mathcal N\big(\tilde\mu_t(x_t, x_0),\ \tilde\beta_t I\big),\quad
# \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}x_0 + \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}x_t,
# \quad \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t .$$
# The model $p_\theta(x_{t-1}\mid x_t) = \mathcal N(\mu_\theta(x_t, t), \sigma_t^2 I)$ is trained to match it.

# %%
import math
import os

import matplotlib.pyplot as plt
import torch

from schedulers import tutorial_math as tm

FAST = os.environ.get("TUTORIAL_FAST") == "1"
betas = tm.make_betas("linear", 1000)
alpha_bar = tm.alpha_bar_from_betas(betas)
alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])

# %% [markdown]
# ## The posterior by Bayes' rule, checked by sampling
#
# Draw $x_0$, then $x_{t-1} \sim q(x_{t-1}\mid x_0)$ and $x_t \sim q(x_t \mid x_{t-1})$. Among pairs whose $x_t$ lands
# near a fixed value, the empirical mean and variance of $x_{t-1}$ approach $\tilde\mu_t$ and $\tilde\beta_t$.

# %%
g = torch.Generator().manual_seed(0)
n = 400_000 if FAST else 4_000_000
t, x0_value, xt_value, window = 300, 0.5, 0.2, 0.01
x0 = torch.full((n,), x0_value, dtype=torch.float64)
x_prev = tm.q_sample(x0, torch.randn(n, generator=g, dtype=torch.float64), alpha_bar[t - 2])  # x_{t-1}
x_t = (1 - betas[t - 1]).sqrt() * x_prev + betas[t - 1].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
near = (x_t - xt_value).abs() < window
mean, var = tm.q_posterior_mean_variance(
    x0[:1], torch.tensor([xt_value], dtype=torch.float64), alpha_bar[t - 1], alpha_bar[t - 2]
)
empirical_mean, empirical_var = x_prev[near].mean().item(), x_prev[near].var().item()
print(f"{int(near.sum())} samples near x_t = {xt_value}")
print(f"posterior mean: empirical {empirical_mean:.4f}, closed form {mean.item():.4f}")
print(f"posterior var : empirical {empirical_var:.3e}, closed form {var.item():.3e}  (β_t = {betas[t - 1]:.3e})")

# %% [markdown]
# ## From the posterior mean to ε-prediction
#
# Substituting $x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}$ (`tm.eps_to_x0`) into
# $\tilde\mu_t$ gives (eq. (11))
# $$\tilde\mu_t = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,\varepsilon\Big),$$
# so predicting the noise is predicting the mean. With $\sigma_t^2$ fixed, the KL term of the ELBO becomes a
# weighted noise regression:
# $$\mathrm{KL}\big(q(x_{t-1}\mid x_t,x_0)\,\|\,p_\theta(x_{t-1}\mid x_t)\big) = \frac{\|\tilde\mu_t - \mu_\theta\|^2}{2\sigma_t^2}
#  = \frac{\beta_t^2}{2\sigma_t^2\alpha_t(1-\bar\alpha_t)}\,\|\varepsilon - \varepsilon_\theta\|^2 .$$
# Ho et al. drop the weight (the "simple" loss); the check below confirms the identity with `tm.gaussian_kl`.

# %%
x0 = torch.randn(64, dtype=torch.float64, generator=g)
eps = torch.randn(64, dtype=torch.float64, generator=g)
eps_theta = eps + 0.1 * torch.randn(64, dtype=torch.float64, generator=g)  # an imperfect network
t = 500
ab, ab_prev, beta = alpha_bar[t - 1], alpha_bar[t - 2], betas[t - 1]
x_t = tm.q_sample(x0, eps, ab)
mu_tilde, beta_tilde = tm.q_posterior_mean_variance(x0, x_t, ab, ab_prev)
mu_eps_form = (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()
mu_theta = tm.q_posterior_mean_variance(tm.eps_to_x0(x_t, eps_theta, ab), x_t, ab, ab_prev)[0]
kl = tm.gaussian_kl(mu_tilde, beta_tilde, mu_theta, beta_tilde).sum()
weighted_mse = beta**2 / (2 * beta_tilde * (1 - beta) * (1 - ab)) * ((eps - eps_theta) ** 2).sum()
print(f"KL = {kl:.6f}; weighted ε-MSE = {weighted_mse:.6f}")

# %% [markdown]
# ## How much the ELBO weights each step
#
# The weight $\beta_t^2/(2\tilde\beta_t\alpha_t(1-\bar\alpha_t))$ is largest at small $t$: the true bound concentrates
# on imperceptible detail, one reason the unweighted loss gives better samples.

# %%
weights = betas[1:] ** 2 / (
    2 * (1 - alpha_bar_prev[1:]) / (1 - alpha_bar[1:]) * betas[1:] * (1 - betas[1:]) * (1 - alpha_bar[1:])
)
fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(range(2, 1001), weights)
ax.set_xlabel("t")
ax.set_ylabel("ELBO weight on ‖ε − ε_θ‖²")
plt.show()

# %% [markdown]
# ## What we showed (asserted)

# %%
assert abs(empirical_mean - mean.item()) < 5 * math.sqrt(var.item() / int(near.sum())) + 2e-3
assert abs(empirical_var / var.item() - 1) < 0.1
torch.testing.assert_close(mu_tilde, mu_eps_form, rtol=1e-10, atol=1e-10)
assert abs(kl.item() - weighted_mse.item()) < 1e-9 * max(1.0, kl.item())
assert weights[0] > 50 * weights.median()  # the bound's weight piles up on the first steps
