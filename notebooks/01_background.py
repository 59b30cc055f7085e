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
# # 1. Background: expectation, the reparameterization trick, KL divergence and the ELBO
#
# Four tools carry the whole diffusion tutorial. We check each one numerically: a closed form against a Monte Carlo
# estimate, an analytic gradient against autograd, and the evidence lower bound against the exact log-likelihood of
# a model where everything is Gaussian.

# %%
import math
import os

import matplotlib.pyplot as plt
import torch

from schedulers import tutorial_math as tm

FAST = os.environ.get("TUTORIAL_FAST") == "1"  # the test suite runs every notebook small
N = 20_000 if FAST else 1_000_000
g = torch.Generator().manual_seed(0)

# %% [markdown]
# ## Expectation and variance
#
# For $x \sim \mathcal N(\mu, \sigma^2)$: $\mathbb E[x] = \mu$, $\operatorname{Var}[x] = \mathbb E[x^2] - \mathbb E[x]^2
# = \sigma^2$. A Monte Carlo average of $N$ draws has standard error $\sigma/\sqrt N$.

# %%
mu, sigma = 1.5, 0.7
x = mu + sigma * torch.randn(N, generator=g, dtype=torch.float64)
mean_mc, var_mc = x.mean().item(), x.var().item()
stderr_mean = sigma / math.sqrt(N)
print(f"E[x]   Monte Carlo {mean_mc:.4f}  exact {mu}   (standard error {stderr_mean:.1e})")
print(f"Var[x] Monte Carlo {var_mc:.4f}  exact {sigma**2:.4f}")

# %% [markdown]
# ## The reparameterization trick
#
# We want $\nabla_{\mu,\sigma}\, \mathbb E_{x\sim\mathcal N(\mu,\sigma^2)}[f(x)]$. Writing $x = \mu + \sigma\varepsilon$
# with $\varepsilon \sim \mathcal N(0, 1)$ moves the parameters out of the distribution and into a differentiable
# function, so $\nabla \mathbb E[f(x)] = \mathbb E[\nabla f(\mu + \sigma \varepsilon)]$. This is exactly how diffusion
# training samples $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$ (`tm.q_sample`).
#
# For $f(x) = x^2$: $\mathbb E[x^2] = \mu^2 + \sigma^2$, so the exact gradient is $(2\mu,\ 2\sigma)$.

# %%
mu_p = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
sigma_p = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
eps = torch.randn(N, generator=g, dtype=torch.float64)
loss = ((mu_p + sigma_p * eps) ** 2).mean()
loss.backward()
grad_mc = (mu_p.grad.item(), sigma_p.grad.item())
grad_exact = (2 * mu, 2 * sigma)
print("reparameterized gradient", grad_mc, " exact", grad_exact)

# %% [markdown]
# ## Kullback–Leibler divergence
#
# $\mathrm{KL}(q\,\|\,p) = \mathbb E_q[\log q(x) - \log p(x)] \ge 0$. Between Gaussians it is closed-form,
# $$\mathrm{KL}(\mathcal N(\mu_1,\sigma_1^2)\,\|\,\mathcal N(\mu_2,\sigma_2^2)) = \tfrac12\Big[\log\tfrac{\sigma_2^2}{\sigma_1^2}
# + \tfrac{\sigma_1^2 + (\mu_1-\mu_2)^2}{\sigma_2^2} - 1\Big],$$
# which is `tm.gaussian_kl`, the function every term of the diffusion ELBO uses.


# %%
def log_normal(x, mean, var):
    return -0.5 * ((x - mean) ** 2 / var + math.log(2 * math.pi * var))


m1, v1, m2, v2 = 0.3, 0.5, -0.4, 1.7
xq = m1 + math.sqrt(v1) * torch.randn(N, generator=g, dtype=torch.float64)
log_ratio = log_normal(xq, m1, v1) - log_normal(xq, m2, v2)
kl_mc, kl_stderr = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(N)
kl_exact = tm.gaussian_kl(torch.tensor(m1), torch.tensor(v1), torch.tensor(m2), torch.tensor(v2)).item()
print(f"KL Monte Carlo {kl_mc:.4f} ± {kl_stderr:.4f}   closed form {kl_exact:.4f}")

# %% [markdown]
# ## The evidence lower bound
#
# A latent-variable model $z \sim \mathcal N(0, 1)$, $x \mid z \sim \mathcal N(a z, s^2)$ has everything in closed form:
# the evidence $p(x) = \mathcal N(x; 0, a^2 + s^2)$ and the posterior
# $p(z\mid x) = \mathcal N\big(\tfrac{a x}{a^2+s^2}, \tfrac{s^2}{a^2+s^2}\big)$. For any $q(z)$,
# $$\log p(x) = \underbrace{\mathbb E_q[\log p(x\mid z) + \log p(z) - \log q(z)]}_{\text{ELBO}(q)}
#   + \mathrm{KL}(q(z)\,\|\,p(z\mid x)),$$
# so the ELBO is a lower bound and the gap is exactly a KL. Diffusion models are trained on this bound, with
# $x_{1:T}$ as the latent variables and the forward process as $q$.

# %%
a, s2, x_obs = 1.3, 0.4, 0.9
log_evidence = log_normal(torch.tensor(x_obs, dtype=torch.float64), 0.0, a * a + s2).item()
post_mean, post_var = a * x_obs / (a * a + s2), s2 / (a * a + s2)


def elbo(q_mean, q_var, n=N):
    z = q_mean + math.sqrt(q_var) * torch.randn(n, generator=g, dtype=torch.float64)
    return (
        log_normal(torch.tensor(x_obs, dtype=torch.float64), a * z, s2)
        + log_normal(z, 0.0, 1.0)
        - log_normal(z, q_mean, q_var)
    ).mean()


q_means = torch.linspace(-1.0, 1.5, 11 if FAST else 26, dtype=torch.float64)
elbos = torch.stack([elbo(m.item(), 0.3) for m in q_means])
gaps = log_evidence - elbos
kls = tm.gaussian_kl(q_means, torch.tensor(0.3), torch.tensor(post_mean), torch.tensor(post_var))
elbo_at_posterior = elbo(post_mean, post_var).item()

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(q_means, elbos, "o-", label="ELBO(q), Monte Carlo")
ax.axhline(log_evidence, color="k", ls="--", label=r"$\log p(x)$")
ax.plot(q_means, log_evidence - kls, "-", alpha=0.6, label=r"$\log p(x) - \mathrm{KL}(q\|p(z|x))$")
ax.set_xlabel("mean of q(z) (variance 0.3)")
ax.legend()
plt.show()
print(f"log p(x) = {log_evidence:.4f};  ELBO at the exact posterior = {elbo_at_posterior:.4f}")

# %% [markdown]
# ## What we showed (asserted)

# %%
assert abs(mean_mc - mu) < 5 * stderr_mean
assert abs(var_mc - sigma**2) < 5 * sigma**2 * math.sqrt(2 / N)
assert all(abs(gm - ge) < 0.05 for gm, ge in zip(grad_mc, grad_exact))
assert abs(kl_mc - kl_exact) < 5 * kl_stderr
assert bool((elbos <= log_evidence + 1e-9).all())  # ELBO ≤ log p(x)
assert torch.allclose(gaps, kls, atol=0.05)  # the gap is the KL to the posterior
assert abs(elbo_at_posterior - log_evidence) < 1e-9  # equality when q is the exact posterior
