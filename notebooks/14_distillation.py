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
# # 14. From 1,000 steps to 1: progressive and consistency distillation
#
# A diffusion model samples by solving an equation in many small steps; a *distilled* student takes a few large ones.
# This notebook shows why that is possible at all, and does it twice, on a 1-D Gaussian mixture whose exact model
# stands in for a perfectly trained teacher (so every error we see is the student's):
#
# * **progressive distillation** (Salimans & Ho 2022, arXiv:2202.00512): one student step learns two teacher steps;
#   repeat, halving the step count each round;
# * **consistency distillation** (Song et al. 2023, arXiv:2303.01469): the student learns to map *every* point of a
#   trajectory to the trajectory's end.
#
# Both use the functions of `training/distill.py` (`progressive_target`, `consistency_pair`, `model_x0`), the same
# ones the script trains the digits students with, and sample with `TutorialDistilledScheduler`.
#
# **Why it works: the probability-flow ODE.** The reverse SDE that DDPM samples has a deterministic twin with the same
# marginals (Song et al. 2021, arXiv:2011.13456, eq. (13)),
# $$\frac{dx}{dt} = f(t)\,x - \tfrac12 g(t)^2\,\nabla_x \log p_t(x),$$
# so each noise $x_T$ is carried to exactly one $x_0$: sampling is a *function* $x_T \mapsto x_0$. DDIM with $\eta = 0$
# is its first-order solver. The teacher needs many steps because the trajectories bend; a student can learn the same
# function with fewer, larger steps, because there is one right answer for each input to regress onto.

# %%
import math
import os
import time
from types import SimpleNamespace

import matplotlib.pyplot as plt
import torch

from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler, TutorialDistilledScheduler, solve_pf_ode
from schedulers import tutorial_grids as grids
from schedulers import tutorial_math as tm
from schedulers.gaussian_mixture import GaussianMixture
from training.distill import consistency_distance, consistency_pair, lambda_midpoints, model_x0, progressive_target

FAST = os.environ.get("TUTORIAL_FAST") == "1"
torch.manual_seed(0)
tic = time.time()

# %% [markdown]
# ## The teacher: an exact model of a three-mode mixture
#
# $p(x_0)$ has modes at −0.6, 0.1 and 0.7. `gmm.model` returns the exact $\varepsilon(x_t, t)$ on the linear schedule
# ($T = 1000$); `solve_pf_ode` integrates the probability-flow ODE with it to tolerance $10^{-7}$. Below, the exact
# trajectories from 12 noises, and what a few DDIM steps of the *same exact model* make of 4,000 noises: with one step
# every sample is $\hat x_0(x_T) \approx \mathbb E[x_0]$; the modes only appear as the step count grows.

# %%
gmm = GaussianMixture(
    torch.tensor([0.3, 0.3, 0.4]), torch.tensor([[-0.6], [0.1], [0.7]]), torch.tensor([0.02, 0.01, 0.02])
)
ddpm = TutorialDDPMScheduler(clip_sample=False)
T = ddpm.config.num_train_timesteps
table = torch.cat([ddpm.alpha_bar, ddpm.alpha_bar.new_ones(1)])  # ᾱ_t, t = 0..T-1, then ᾱ = 1 at t = -1 (x_0)
exact = gmm.model(ddpm.alpha_bar, "epsilon")
teacher = gmm.as_unet(ddpm.alpha_bar, (1, 1, 1), "epsilon")  # the same model behind UNet2DModel's calling convention


def trajectory(x_T, levels):
    """The exact PF-ODE solution at each of `levels` (decreasing timesteps), starting at t = T - 1."""
    points, x, t = [x_T], x_T, T - 1
    for t_next in levels:
        x = solve_pf_ode(exact, ddpm, x, 1e-7, 1e-7, t_start=t, t_end=t_next, denoise=False).sample
        points.append(x)
        t = t_next
    return torch.stack(points)


@torch.no_grad()
def sample(model, scheduler, x_T, n, generator=None):
    """`n` steps of `scheduler` from x_T with `model(x, t)` (a UNet-like module)."""
    scheduler.set_timesteps(n)
    x = x_T
    for t in scheduler.timesteps:
        kwargs = {"generator": generator} if isinstance(scheduler, TutorialDistilledScheduler) else {"eta": 0.0}
        x = scheduler.step(model(x, t.expand(x.shape[0])).sample, t, x, **kwargs).prev_sample
    return x


def w1(a, b):
    """Wasserstein-1 distance between two 1-D samples of equal size (sorted matching)."""
    return float((a.flatten().sort().values - b.flatten().sort().values).abs().mean())


n_points = 1000 if FAST else 4000
x_T = torch.randn(n_points, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
truth = gmm.sample(n_points, generator=torch.Generator().manual_seed(2)).view(-1, 1, 1, 1)
levels = list(range(T - 50, -1, -50)) + [0]
paths = trajectory(x_T[:12], levels[:-1] + [0])
ode_end = solve_pf_ode(exact, ddpm, x_T, 1e-7, 1e-7).sample  # the function x_T -> x_0 that students learn
ddim = TutorialDDIMScheduler(timestep_spacing="trailing", clip_sample=False)
teacher_w1 = {n: w1(sample(teacher, ddim, x_T, n), truth) for n in (1, 2, 4, 16, 64)}
noise_floor = w1(gmm.sample(n_points, generator=torch.Generator().manual_seed(3)), truth)

fig, (ax_path, ax_w1) = plt.subplots(1, 2, figsize=(11, 3.6))
ts = [T - 1] + levels[:-1] + [0]
ax_path.plot(ts, paths[:, :, 0, 0, 0].numpy(), color="C0", lw=1)
ax_path.invert_xaxis()
ax_path.set_xlabel("t (T - 1 = noise, 0 = data)")
ax_path.set_ylabel("x_t")
ax_path.set_title("exact PF-ODE trajectories: one x_0 per x_T")
ax_w1.semilogx(list(teacher_w1), list(teacher_w1.values()), "o-", label="exact teacher, DDIM (η = 0)")
ax_w1.axhline(noise_floor, color="gray", ls=":", label="two samples of the truth (floor)")
ax_w1.set_xlabel("model evaluations")
ax_w1.set_ylabel("W1 to the truth")
ax_w1.legend(fontsize=8)
plt.tight_layout()
plt.show()
print({n: round(v, 3) for n, v in teacher_w1.items()}, "floor", round(noise_floor, 3))

# %% [markdown]
# ## The student: the teacher plus a small network, predicting v
#
# The student predicts $v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\,x_0$ and reads it as
# $\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,\hat v$ (Salimans & Ho, App. D). Not ε: a 1-step
# student reads $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$ at $t = T - 1$, where
# $1/\sqrt{\bar\alpha_{T-1}} \approx 156$ multiplies every error of the network. Algorithm 2 starts the student as a
# copy of the teacher; here the student is the exact teacher's $v$ plus a small MLP whose last layer starts at zero,
# so it too starts as the teacher and learns only what the few-step jumps need (the digits students start from the
# teacher's weights).


# %%
class Student(torch.nn.Module):
    """v(x_t, t) = the exact teacher's v + a small MLP (zero at the start), with UNet2DModel's calling convention."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 1),
        )  # fmt: skip
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t):
        t = torch.as_tensor(t).expand(x.shape[0])
        s = t.double()[:, None] / T
        h = torch.cat([x.flatten(1), torch.sin(math.pi * s), torch.cos(math.pi * s)], dim=1).float()
        return SimpleNamespace(sample=exact_v(x, t) + self.net(h).double().view(x.shape))


exact_v = gmm.model(ddpm.alpha_bar, "v_prediction")


def adam_steps(student, loss_fn, steps, lr=2e-3):
    """`steps` Adam updates of `student` on `loss_fn()`, the learning rate decaying linearly to 0."""
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
    return loss.item()


# %% [markdown]
# ## Progressive distillation: one round by hand
#
# Salimans & Ho, Algorithm 2. The teacher runs DDIM on a grid of $2N$ steps; the student will run DDIM on a grid of
# $N$ steps, every second point of the teacher's (the `trailing` grids are nested). For a training point
# $z_t = \sqrt{\bar\alpha_t}\,x_0 + \sigma_t\varepsilon$ on the student's grid, the teacher takes two DDIM steps
# $t \to t' \to t''$ and lands on $z_{t''}$. The student's target is the $\tilde x$ for which **one** DDIM step from
# $z_t$ lands there (eq. (8), with $\alpha = \sqrt{\bar\alpha}$, $\sigma = \sqrt{1 - \bar\alpha}$):
# $$\tilde x = \frac{z_{t''} - (\sigma_{t''}/\sigma_t)\,z_t}{\alpha_{t''} - (\sigma_{t''}/\sigma_t)\,\alpha_t},$$
# and the loss is $(1 + \mathrm{SNR}_t)\,\|\hat x_0 - \tilde x\|^2$ ("SNR + 1" weighting, which for a v-student is
# exactly $\|\hat v - \tilde v\|^2$). The student starts as the teacher; after the round it becomes the teacher and
# the step count halves again. Here: $N = 32 \to 16 \to \dots \to 1$ from a 64-step exact teacher (six rounds).


# %%
def progressive_round(teacher_net, teacher_type, n, steps, batch=256):
    """Distil `teacher_net`'s 2n DDIM steps into a fresh copy of the student's weights at n steps."""
    grid = grids.spaced_timesteps(2 * n, T, "trailing")
    grid_next = grids.successor_timesteps(grid)  # -1 after the last: x_0

    def loss_fn():
        x0 = gmm.sample(batch).view(batch, 1, 1, 1)
        i = torch.randint(0, n, (batch,))
        t, t_mid, t_next = grid[2 * i], grid[2 * i + 1], grid_next[2 * i + 1]
        z_t = tm.q_sample(x0, torch.randn_like(x0), table[t])
        with torch.no_grad():
            target = progressive_target(teacher_net, z_t, t, t_mid, t_next, table, teacher_type)
        x0_hat = model_x0(student, z_t, t, table, "v_prediction")
        weight = tm.expand_to(1.0 + tm.snr(table[t]), x0_hat)
        return (weight * (x0_hat - target).pow(2)).mean()

    return adam_steps(student, loss_fn, steps)


round_steps = 200 if FAST else 500
student = Student()

students, current, current_type = {}, teacher, "epsilon"
for n in (32, 16, 8, 4, 2, 1):
    progressive_round(current, current_type, n, round_steps)
    students[n] = Student()
    students[n].load_state_dict(student.state_dict())
    current, current_type = students[n].requires_grad_(False), "v_prediction"

distilled = TutorialDistilledScheduler(clip_sample=False, distillation="progressive")
progressive_w1 = {n: w1(sample(students[n], distilled, x_T, n), truth) for n in (1, 2, 4)}
progressive_ode = {
    n: float((sample(students[n], distilled, x_T, n) - ode_end).pow(2).mean().sqrt()) for n in (1, 2, 4)
}
print("progressive students, W1 to the truth:", {n: round(v, 3) for n, v in progressive_w1.items()})
print("RMS distance to the exact ODE end point from the same x_T:", {n: round(v, 3) for n, v in progressive_ode.items()})

# %% [markdown]
# ## Consistency distillation: every point of a trajectory maps to its end
#
# A consistency function $f(x_t, t)$ returns the end point $x_0$ of the PF-ODE trajectory through $x_t$; it is
# *constant along each trajectory* (the consistency property, CM eq. (3)) and the identity at the data end (the
# boundary condition, eq. (5)). Our $v$-parameterisation gives the boundary condition for free:
# $\hat x_0 = \sqrt{\bar\alpha}\,x - \sqrt{1-\bar\alpha}\,\hat v = x$ at $\bar\alpha = 1$.
#
# Training (Algorithm 2) never solves an ODE to the end: it draws $x_{t+k}$, takes **one** teacher ODE step to
# $\hat x_t$, and asks the student at $x_{t+k}$ to agree with an EMA copy of itself (the target network
# $f_{\theta^-}$) at $\hat x_t$: $d\big(f_\theta(x_{t+k}, t+k),\, f_{\theta^-}(\hat x_t, t)\big)$. Agreement propagates
# from the boundary, where $f$ is known, up the trajectory. The teacher's step here is DPM-Solver++(2S)
# (`lambda_midpoints`, `--teacher_solver dpmpp_2s`), accurate across $k = 100$ timesteps.
#
# Sampling (Algorithm 1): $x_0 \approx f(x_T, T)$ in one step; for more steps, re-noise that estimate to a lower level
# $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}}\,z$ with fresh $z$ and apply $f$ again.

# %%
k, mu = 100, 0.9
cm_student, cm_target = Student(), Student()
cm_target.load_state_dict(cm_student.state_dict())
cm_target.requires_grad_(False)
t_mid_table, alpha_bar_mid_table = lambda_midpoints(ddpm.alpha_bar, k)
optimizer = torch.optim.Adam(cm_student.parameters(), lr=1e-3)
for _ in range(1000 if FAST else 4000):
    x0 = gmm.sample(256).view(256, 1, 1, 1)
    t_hi = torch.randint(k - 1, T, (256,))
    z_hi = tm.q_sample(x0, torch.randn_like(x0), table[t_hi])
    midpoint = (t_mid_table[t_hi], alpha_bar_mid_table[t_hi])
    pair = consistency_pair(
        cm_student, cm_target, teacher, z_hi, t_hi, t_hi - k, table, "epsilon", "v_prediction", None, midpoint
    )
    loss = consistency_distance(*pair, "l2")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # θ⁻ ← μ θ⁻ + (1 - μ) θ
        torch._foreach_lerp_(list(cm_target.parameters()), list(cm_student.parameters()), 1 - mu)

# The consistency property on exact trajectories: f (student) vs the denoiser E[x_0 | x_t] (the teacher's x̂_0).
probe = trajectory(x_T[:256], levels[:-1] + [0])
f_error, denoiser_error = [], []
with torch.no_grad():
    for t, z in zip(ts[:-1], probe[:-1]):
        at = torch.full((z.shape[0],), t)
        f_error.append(float((model_x0(cm_student, z, at, table, "v_prediction") - probe[-1]).pow(2).mean().sqrt()))
        denoiser_error.append(float((model_x0(teacher, z, at, table, "epsilon") - probe[-1]).pow(2).mean().sqrt()))
consistency = TutorialDistilledScheduler(clip_sample=False, distillation="consistency")
g = torch.Generator().manual_seed(4)
consistency_w1 = {n: w1(sample(cm_student, consistency, x_T, n, g), truth) for n in (1, 2, 4)}
print("consistency student, W1 to the truth:", {n: round(v, 3) for n, v in consistency_w1.items()})

fig, ax = plt.subplots(figsize=(7, 3.4))
ax.plot(ts[:-1], denoiser_error, "o-", label="denoiser E[x_0 | x_t] (the teacher's x̂_0)")
ax.plot(ts[:-1], f_error, "s-", label="consistency student f(x_t, t)")
ax.invert_xaxis()
ax.set_xlabel("t along exact trajectories")
ax.set_ylabel("RMS distance to the trajectory's end")
ax.set_title("the consistency property: f is (nearly) constant along a trajectory")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Teacher and students side by side
#
# Left: the exact teacher's trajectories (the ODE solved to $10^{-7}$) and the paths of the progressive students
# from the same $x_T$ at 4, 2 and 1 steps: straight jumps between grid points that land where the curves end. Right:
# the samples at 1, 2 and 4 steps, against the exact density, for the exact teacher with DDIM and for both students.

# %%
fig, (ax_path, ax_hist) = plt.subplots(1, 2, figsize=(12, 3.8))
few = x_T[:6]
ax_path.plot(ts, trajectory(few, levels[:-1] + [0])[:, :, 0, 0, 0].numpy(), color="C0", lw=1, alpha=0.6)
for n, color in ((4, "C1"), (2, "C2"), (1, "C3")):
    distilled.set_timesteps(n)
    x, xs = few, [few]
    for t in distilled.timesteps:
        with torch.no_grad():
            x = distilled.step(students[n](x, t.expand(6)).sample, t, x).prev_sample
        xs.append(x)
    grid_t = distilled.timesteps.tolist() + [0]
    ax_path.plot(grid_t, torch.stack(xs)[:, :, 0, 0, 0].numpy(), "o--", color=color, lw=1, ms=3)
    ax_path.plot([], [], "o--", color=color, label=f"progressive student, {n} step(s)")
ax_path.plot([], [], color="C0", label="teacher: exact PF-ODE")
ax_path.invert_xaxis()
ax_path.set_xlabel("t")
ax_path.set_ylabel("x_t")
ax_path.legend(fontsize=7)

xs_grid = torch.linspace(-1.2, 1.3, 400, dtype=torch.float64)
density = gmm.log_prob(xs_grid.view(-1, 1)).exp()
ax_hist.plot(xs_grid, density, color="k", lw=1.5, label="exact p(x_0)")
for label, x in (
    ("teacher DDIM, 4 steps", sample(teacher, ddim, x_T, 4)),
    ("progressive, 1 step", sample(students[1], distilled, x_T, 1)),
    ("progressive, 4 steps", sample(students[4], distilled, x_T, 4)),
    ("consistency, 2 steps", sample(cm_student, consistency, x_T, 2, torch.Generator().manual_seed(5))),
):
    ax_hist.hist(x.flatten().numpy(), bins=80, range=(-1.2, 1.3), density=True, histtype="step", label=label)
ax_hist.set_xlabel("x_0")
ax_hist.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# Measured at full size (4,000 samples; W1 to the truth, whose sampling floor is 0.005): the exact teacher's DDIM
# needs many steps (0.47 at 1 step, 0.26 at 4, 0.072 at 16, 0.027 at 64). The progressive students, distilled from
# the 64-step teacher, reach 0.056 at 1, 2 and 4 steps alike: 8x better than the teacher at 1 step and better than
# its DDIM-16, and they follow the ODE's own map (RMS 0.07 from the exact end point of the same $x_T$). They do not
# reach the 64-step teacher they came from: the error is the same at every step count, so it entered in the first
# rounds and was handed down; a wider network and longer rounds shrink it. The consistency student is as good (0.058
# in one step) and slightly better with 2–4 steps (0.051, 0.053), where each re-noising step lets it correct the
# previous jump. On the digits the teacher is a trained network; the students, the budget and the measured Fréchet
# distances are in the README ("Distillation: 1, 2 and 4 steps") and `benchmarks/RESULTS.md`.

# %% [markdown]
# ## What we showed (asserted)

# %%
print(f"notebook ran in {time.time() - tic:.0f} s")
print("W1 to the truth: teacher DDIM", teacher_w1, "progressive", progressive_w1, "consistency", consistency_w1)
# The exact teacher needs many DDIM steps; at 1 step it collapses the modes.
w1_by_steps = list(teacher_w1.values())
assert w1_by_steps == sorted(w1_by_steps, reverse=True) and teacher_w1[1] > 5 * teacher_w1[64]
# Progressive students: each far better than the teacher at its step count, the 1-step within reach of DDIM-16.
assert all(progressive_w1[n] < 0.5 * teacher_w1[n] for n in (1, 2, 4)), (progressive_w1, teacher_w1)
assert progressive_w1[1] < teacher_w1[16]
# and they follow the ODE's map x_T -> x_0, not just the distribution.
assert progressive_ode[1] < 0.1
# Consistency: f stays near the trajectory's end where the denoiser does not, and few steps beat the teacher.
assert all(f < d for f, d in zip(f_error[:-2], denoiser_error[:-2])) and f_error[0] < 0.5 * denoiser_error[0]
assert min(consistency_w1[2], consistency_w1[4]) < 0.5 * teacher_w1[2]
# The boundary condition holds by construction: f(x, data end) = x for any network.
x = torch.randn(5, 1, 1, 1, dtype=torch.float64)
assert torch.equal(model_x0(cm_student, x, torch.full((5,), -1), table, "v_prediction"), x)
