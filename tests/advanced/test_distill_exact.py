"""Distillation's targets on a Gaussian mixture, whose exact model stands in for a perfectly trained teacher.

- progressive: the student's target x̃ equals the one computed by hand from two steps of our DDIM scheduler, and one
  student DDIM step towards x̃ lands exactly where the two teacher steps did (Salimans & Ho, Algorithm 2);
- the consistency teacher's DPM-Solver++(2S) step across k timesteps is second order: closer to the exact PF-ODE than
  the DDIM step, its one-step error shrinking about 8x per halving of k (DDIM's about 4x);
- consistency: a small student distilled from the exact model maps points of exact PF-ODE trajectories close to the
  trajectory's end point, much closer than the denoiser E[x_0 | x_t] it would be without the consistency property.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler, TutorialDistilledScheduler, solve_pf_ode
from schedulers import tutorial_math as tm
from schedulers.gaussian_mixture import GaussianMixture
from training.distill import (
    consistency_distance,
    consistency_pair,
    ddim_step,
    dpmpp_2s_step,
    lambda_midpoints,
    model_x0,
    progressive_target,
)


def _table(scheduler):
    """ᾱ for t = 0..T-1, then 1 at index T, which t = -1 (x_0) picks: the table distillation indexes."""
    return torch.cat([scheduler.alpha_bar, scheduler.alpha_bar.new_ones(1)])


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("student_steps", [1, 2, 4])
def test_progressive_target_is_two_teacher_ddim_steps_by_hand(student_steps, clip_sample):
    gmm = GaussianMixture.random(dim=4, num_modes=3, seed=2)
    ddim = TutorialDDIMScheduler(timestep_spacing="trailing", clip_sample=clip_sample)
    teacher = gmm.as_unet(ddim.alpha_bar, (1, 2, 2), "epsilon")
    ddim.set_timesteps(2 * student_steps)  # the teacher's grid: the student's grid at its even entries
    grid = ddim.timesteps.tolist() + [-1]
    z0 = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    table = _table(ddim)
    for i in range(student_steps):
        t, t_mid, t_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        z_t = z0 if i == 0 else tm.q_sample(z0, torch.zeros_like(z0), table[t])  # any point at level t
        # By hand: two steps of our DDIM scheduler (η = 0), then x̃ from Algorithm 2.
        z = z_t
        for s in (t, t_mid):
            z = ddim.step(teacher(z, s).sample, s, z, eta=0.0).prev_sample
        a_t, a_n = table[t].item(), table[t_next].item()
        ratio = math.sqrt((1 - a_n) / (1 - a_t))
        by_hand = (z - ratio * z_t) / (math.sqrt(a_n) - ratio * math.sqrt(a_t))

        batch = torch.full((3,), t)
        ours = progressive_target(
            teacher,
            z_t,
            batch,
            torch.full((3,), t_mid),
            torch.full((3,), t_next),
            table,
            "epsilon",
            1.0 if clip_sample else None,
        )
        torch.testing.assert_close(ours, by_hand, rtol=1e-10, atol=1e-10)

        # One student step with x̂_0 = x̃ (the v that reads as x̃) lands on the teacher's two-step result.
        student = TutorialDistilledScheduler(clip_sample=False)
        student.set_timesteps(student_steps)
        assert student.timesteps[i] == t
        v = (math.sqrt(a_t) * z_t - ours) / math.sqrt(1 - a_t)  # x̂_0 = √ᾱ z - σ v  =>  v = (√ᾱ z - x̃) / σ
        landed = student.step(v, t, z_t).prev_sample
        torch.testing.assert_close(landed, z, rtol=1e-8, atol=1e-8)


def test_dpmpp_2s_teacher_step_is_second_order_on_the_exact_ode():
    # The exact mixture model as teacher; the truth is the PF-ODE from t to t - k by Dormand–Prince at 1e-9.
    gmm = GaussianMixture.random(dim=4, num_modes=3, seed=5)
    ddpm = TutorialDDPMScheduler(clip_sample=False)
    table = _table(ddpm)
    teacher = gmm.as_unet(ddpm.alpha_bar, (1, 2, 2), "epsilon")
    exact = gmm.model(ddpm.alpha_bar, "epsilon")
    t = 700
    z = tm.q_sample(gmm.sample(16).view(16, 1, 2, 2), torch.randn(16, 1, 2, 2, dtype=torch.float64), table[t])
    batch = torch.full((16,), t)
    errors = {}
    for k in (200, 100, 50):
        truth = solve_pf_ode(exact, ddpm, z, 1e-9, 1e-9, t_start=t, t_end=t - k, denoise=False).sample
        t_mid, alpha_bar_mid = lambda_midpoints(ddpm.alpha_bar, k)
        second = dpmpp_2s_step(
            teacher, z, batch, batch - k, t_mid[batch], alpha_bar_mid[batch], table, "epsilon", None
        )
        first = ddim_step(teacher, z, batch, batch - k, table, "epsilon", None)
        errors[k] = ((second - truth).pow(2).mean().sqrt(), (first - truth).pow(2).mean().sqrt())
        assert errors[k][0] < 0.35 * errors[k][1], (k, errors[k])  # measured 0.30, 0.16, 0.09
    # One step's (local) error is O(k^3) for a second-order method, O(k^2) for a first-order one: halving k divides
    # it by about 8 and 4 (measured 12, 10 and 7, 5: the mixture's curvature adds a little at large k).
    for big, small in ((200, 100), (100, 50)):
        second_ratio, first_ratio = errors[big][0] / errors[small][0], errors[big][1] / errors[small][1]
        assert second_ratio > 7.0 and second_ratio > 1.4 * first_ratio, (big, errors)
    # The midpoint is halfway in λ, and the step to the data end (t - k < 0) is x̂_0 at that midpoint.
    lam = tm.half_log_snr(ddpm.alpha_bar)
    t_mid, alpha_bar_mid = lambda_midpoints(ddpm.alpha_bar, 100)
    torch.testing.assert_close(tm.half_log_snr(alpha_bar_mid[500]), 0.5 * (lam[500] + lam[400]))
    assert 400 < t_mid[500] < 500 and t_mid[50] < 50
    small = torch.full((16,), 50)
    end = dpmpp_2s_step(teacher, z, small, small * 0 - 1, t_mid[small], alpha_bar_mid[small], table, "epsilon", None)
    assert torch.isfinite(end).all()


class _MLP(torch.nn.Module):
    """A small v-predicting student for 1-D data: input (x_t, features of t)."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, width), torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 1),
        )  # fmt: skip

    def forward(self, x, t):
        s = t.double()[:, None] / 1000
        h = torch.cat([x.flatten(1), torch.sin(math.pi * s), torch.cos(math.pi * s)], dim=1).float()
        return SimpleNamespace(sample=self.net(h).double().view(x.shape))


def test_consistency_student_maps_trajectory_points_to_the_ode_end_point():
    # Two 1-D modes; the student is distilled on t in [0, 400] (10 intervals of k = 40 timesteps) with the exact
    # model as teacher, the EMA target network and the l2 loss: distillation.py's consistency_pair and
    # consistency_distance, in a plain loop. The truth is the PF-ODE solved by Dormand–Prince to 1e-8.
    torch.manual_seed(0)
    gmm = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-0.6], [0.6]]), torch.tensor([0.04, 0.04]))
    ddpm = TutorialDDPMScheduler(clip_sample=False)
    table = _table(ddpm)
    teacher = gmm.as_unet(ddpm.alpha_bar, (1, 1, 1), "epsilon")
    student, target = _MLP(), _MLP()
    target.load_state_dict(student.state_dict())
    target.requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    k, t_max, batch = 40, 400, 256
    for _ in range(1500):
        x0 = gmm.sample(batch).view(batch, 1, 1, 1)
        t_hi = torch.randint(k - 1, t_max + 1, (batch,))
        z_hi = tm.q_sample(x0, torch.randn_like(x0), table[t_hi])
        pair = consistency_pair(student, target, teacher, z_hi, t_hi, t_hi - k, table, "epsilon", "v_prediction")
        loss = consistency_distance(*pair, "l2")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # θ⁻ ← μ θ⁻ + (1 - μ) θ, μ = 0.9
            torch._foreach_lerp_(list(target.parameters()), list(student.parameters()), 0.1)

    exact = gmm.model(ddpm.alpha_bar, "epsilon")
    x_start = tm.q_sample(
        gmm.sample(64).view(64, 1, 1, 1), torch.randn(64, 1, 1, 1, dtype=torch.float64), table[t_max]
    )
    end = solve_pf_ode(exact, ddpm, x_start, rtol=1e-8, atol=1e-8, t_start=t_max).sample
    for t in (t_max, 300, 200):
        z_t = solve_pf_ode(exact, ddpm, x_start, 1e-8, 1e-8, t_start=t_max, t_end=t, denoise=False).sample
        at_t = torch.full((64,), t)
        with torch.no_grad():
            f = model_x0(student, z_t, at_t, table, "v_prediction")
            denoiser = model_x0(teacher, z_t, at_t, table, "epsilon")  # E[x_0 | x_t]: not the ODE's end point
        error, denoiser_error = (f - end).pow(2).mean().sqrt(), (denoiser - end).pow(2).mean().sqrt()
        assert error < 0.4 * denoiser_error and error < 0.15, (t, float(error), float(denoiser_error))
    # The boundary condition holds by construction: f(x, -1) = x for any network.
    x = torch.randn(5, 1, 1, 1, dtype=torch.float64)
    assert torch.equal(model_x0(student, x, torch.full((5,), -1), table, "v_prediction"), x)
