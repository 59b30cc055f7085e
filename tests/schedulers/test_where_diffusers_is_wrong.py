"""The cases where diffusers 0.42.1 is wrong; each test names the equation that decides and checks ours against it."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from custom_pipelines import sample_loop
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers import tutorial_math as tm

T = 1000


def ddim_eq12(x_t, eps, alpha_bar, alpha_bar_prev):
    """DDIM eq. (12) with η = 0: x_{τ_{i-1}} = √ᾱ_{τ_{i-1}} x̂_0 + √(1 - ᾱ_{τ_{i-1}}) ε̂, computed in float64."""
    x0 = (x_t - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    return math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev) * eps


@pytest.mark.parametrize("spacing,n", [("trailing", 7), ("trailing", 300), ("linspace", 10), ("linspace", 7)])
def test_ddim_steps_to_the_grids_own_next_timestep(spacing, n):
    """DDIM Sec. 4.2: sampling walks the sub-sequence τ, so step i goes from τ_i to τ_{i-1}, the grid's next element.

    diffusers goes to t - T//N instead, which is a different timestep whenever the grid's spacing is not T//N.
    """
    ours = TutorialDDIMScheduler(timestep_spacing=spacing, clip_sample=False)
    ref = DDIMScheduler(timestep_spacing=spacing, clip_sample=False)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    grid = ours.timesteps.tolist()
    assert ref.timesteps.tolist() == grid  # the same grid: only the step's target differs
    diffusers_prev = [t - T // n for t in grid]
    ours_prev = [ours.previous_timestep(t) for t in grid]
    assert ours_prev == grid[1:] + [-1]
    assert ours_prev != diffusers_prev  # diffusers' target is off the grid

    def table(scheduler, t):  # ᾱ_t of a scheduler's own table; ᾱ = 1 past the end (set_alpha_to_one)
        return 1.0 if t < 0 else float(getattr(scheduler, "alpha_bar", scheduler.alphas_cumprod)[t])

    x = torch.randn(3, 4, dtype=torch.float64)
    eps = torch.randn(3, 4, dtype=torch.float64)
    gaps = []
    for t, t_prev, t_diffusers in zip(grid, ours_prev, diffusers_prev):
        expected = ddim_eq12(x, eps, table(ours, t), table(ours, t_prev))
        got = ours.step(eps, t, x).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        # diffusers lands on eq. (12) at t - T//N, which is not the grid's next timestep (its square roots of ᾱ are
        # taken in float32: tolerance 1e-6)
        theirs = ref.step(eps, t, x).prev_sample
        expected_diffusers = ddim_eq12(x, eps, table(ref, t), table(ref, t_diffusers))
        torch.testing.assert_close(theirs, expected_diffusers, rtol=1e-6, atol=1e-6)
        gaps.append(float((theirs - got).abs().max()))
    assert max(gaps) > 1e-2  # and the two targets are visibly different points


def test_ddim_trailing_deterministic_sampling_ends_at_x0():
    """With the exact ε of a point mass at x_0 = c (ε* = (x_t - √ᾱ c)/√(1-ᾱ)), DDIM η = 0 must return exactly c.

    Eq. (12) with the true x̂_0 = c and the true ε lands on √ᾱ_{τ_{i-1}} c + √(1-ᾱ_{τ_{i-1}}) ε at every step,
    and on c at the last one (ᾱ = 1). diffusers' last step targets t = 0 (trailing, N = 7), not x_0.
    """
    c = 0.25
    for scheduler in (TutorialDDIMScheduler, DDIMScheduler):
        s = scheduler(timestep_spacing="trailing", clip_sample=False)
        s.set_timesteps(7)
        x = torch.randn(4, 16, dtype=torch.float64)
        ab = getattr(s, "alpha_bar", s.alphas_cumprod).double()  # each scheduler's own ᾱ table

        def exact_eps(x, t, ab=ab):  # the ε of the point mass at c, read from this scheduler's own table
            a = float(ab[int(t)])
            return (x - math.sqrt(a) * c) / math.sqrt(1 - a)

        x = sample_loop(exact_eps, s, x)
        err = (x - c).abs().max().item()
        if scheduler is TutorialDDIMScheduler:
            assert err < 1e-10
        else:
            assert err > 1e-3  # diffusers stops at ᾱ_0's level: x = √ᾱ_0 c + √(1-ᾱ_0) ε, not c


def test_fixed_large_log_is_finite_and_equals_fixed_large():
    """improved DDPM (arXiv:2102.09672) Sec. 3.1: the fixed-large log-variance is log β_t, so σ_t = exp(½ log β_t) = √β_t.

    diffusers passes log β_t (negative) to the square root and returns NaN on the first noisy step.
    """
    x = torch.randn(2, 3, 4, 4)
    eps = torch.randn(2, 3, 4, 4)
    results = {}
    for variance_type in ("fixed_large", "fixed_large_log"):
        s = TutorialDDPMScheduler(variance_type=variance_type)
        s.set_timesteps(10)
        t = s.timesteps[0]
        results[variance_type] = s.step(eps, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
        # The noise added is exactly √β_eff z with β_eff = 1 - ᾱ_t / ᾱ_{t'} (the respaced β).
        t_prev = s.previous_timestep(int(t))
        beta_eff = 1 - float(s.alpha_bar[int(t)] / s.alpha_bar[t_prev])
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        c0, ct, _ = tm.q_posterior_coefs(s.alpha_bar[int(t)], s.alpha_bar[t_prev])
        x0 = tm.eps_to_x0(x.double(), eps.double(), s.alpha_bar[int(t)]).clamp(-1, 1)
        expected = (c0 * x0 + ct * x.double() + math.sqrt(beta_eff) * z.double()).float()
        torch.testing.assert_close(results[variance_type], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["fixed_large_log"], results["fixed_large"], rtol=0, atol=1e-6)

    ref = DDPMScheduler(variance_type="fixed_large_log")
    ref.set_timesteps(10)
    out = ref.step(eps, ref.timesteps[0], x, generator=torch.Generator().manual_seed(3)).prev_sample
    assert torch.isnan(out).all()


@pytest.mark.parametrize("scheduler_cls", [TutorialDDPMScheduler, TutorialDDIMScheduler])
def test_zero_terminal_snr_with_epsilon_prediction_is_refused_at_construction(scheduler_cls):
    """Lin et al. 2023 (arXiv:2305.08891) Sec. 3.2: with ᾱ_T = 0, x_T = ε, so x̂_0 = (x_T - ε̂)/√ᾱ_T (DDPM eq. (15))
    is 0/0 and an ε-model cannot say anything about x_0. We refuse the pair at construction; diffusers accepts it and
    returns a non-finite first step without a word."""
    with pytest.raises(ValueError, match="rescale_betas_zero_snr.*prediction_type='epsilon'"):
        scheduler_cls(rescale_betas_zero_snr=True, prediction_type="epsilon")
    for ref_cls in (DDPMScheduler, DDIMScheduler):
        ref = ref_cls(rescale_betas_zero_snr=True, prediction_type="epsilon", timestep_spacing="trailing")
        ref.set_timesteps(10)
        x = torch.randn(1, 3, 4, 4)
        out = ref.step(x, ref.timesteps[0], x).prev_sample  # ε̂ = x_T, the best an ε-model can do at SNR 0
        assert not torch.isfinite(out).all()
    # With v-prediction (the paper's remedy) the first step is finite and x̂_0 = -v exactly (√ᾱ_T = 0, σ_T = 1).
    ours = scheduler_cls(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    assert ours.alpha_bar[-1] == 0
    ours.set_timesteps(10)
    x, v = torch.randn(1, 3, 4, 4), 0.5 * torch.randn(1, 3, 4, 4)
    out = ours.step(v, ours.timesteps[0], x)
    torch.testing.assert_close(out.pred_original_sample, (-v).clamp(-1, 1))
    assert torch.isfinite(out.prev_sample).all()


def test_trailing_grid_has_exactly_n_timesteps():
    """Lin et al. 2023 Table 2, trailing: {round(T - k T/N) - 1 : k = 0..N-1}, exactly N timesteps in [0, T-1].

    diffusers' np.arange(T, 0, -T/N) yields N + 1 points for some N (61, 103, 121, ...), the last being t = -1, which
    then indexes alphas_cumprod[-1] = ᾱ_{T-1}: the final "denoising" step re-noises to the noisiest level.
    """
    for n in (61, 103, 121):
        ours = TutorialDDPMScheduler(timestep_spacing="trailing")
        ours.set_timesteps(n)
        assert len(ours.timesteps) == n and int(ours.timesteps.min()) >= 0
        ref = DDPMScheduler(timestep_spacing="trailing")
        ref.set_timesteps(n)
        assert len(ref.timesteps) == n + 1 and int(ref.timesteps[-1]) == -1
        assert torch.equal(ours.timesteps, ref.timesteps[:n])


@pytest.mark.parametrize(
    "ours_cls, ref_cls", [(TutorialDDPMScheduler, DDPMScheduler), (TutorialDDIMScheduler, DDIMScheduler)]
)
def test_clipping_does_not_turn_inf_into_a_pixel(ours_cls, ref_cls):
    """x̂_0 = (x_t - σ ε̂)/√ᾱ (DDPM eq. (15)) with ε̂ = -inf is +inf: there is no x_0 to clip. diffusers clamps it to
    +1 and reports x̂_0 = 1; its DDPM then returns a finite, wrong sample (c_0 · 1 + c_t x_t: black or white images
    and no error). Ours keeps x̂_0, and so the sample, non-finite."""
    x = torch.zeros(1, 1, 2, 2)
    eps = torch.zeros(1, 1, 2, 2)
    eps[0, 0, 0, 0] = -float("inf")
    outs = {}
    for cls in (ref_cls, ours_cls):
        s = cls(clip_sample=True)
        s.set_timesteps(10)
        outs[cls] = s.step(eps, s.timesteps[-1], x, generator=torch.Generator().manual_seed(0))
    assert outs[ref_cls].pred_original_sample[0, 0, 0, 0] == 1.0
    assert not torch.isfinite(outs[ours_cls].pred_original_sample[0, 0, 0, 0])
    assert not torch.isfinite(outs[ours_cls].prev_sample[0, 0, 0, 0])
    if ref_cls is DDPMScheduler:
        assert bool(torch.isfinite(outs[ref_cls].prev_sample).all())
