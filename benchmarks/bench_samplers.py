"""Sampler accuracy on the exact Gaussian-mixture model and on trained networks: ours against diffusers 0.42.1.

    python benchmarks/bench_samplers.py [--batch 1000] [--nfe 5 10 20 50 100] [--quick]
        [--sections mixture trained] [--trained FOLDER ...] [--num_samples 512]

Problems: the 2-D ring and a 64-dimensional random mixture, each under the linear and the cosine
(squaredcos_cap_v2) schedule. Every scheduler is driven by the same exact network (`GaussianMixture.model`: the
closed-form ε of the mixture at ᾱ(t), λ linear between integer timesteps, which is also what diffusers' Euler/Heun
assume when they feed fractional timesteps) in the same generic diffusers loop, from the same x_T.

Metrics at each budget of model evaluations (NFE; a scheduler gets the largest `num_inference_steps` whose loop
makes at most that many evaluations):
- `err`: RMS per coordinate of (sample - reference), the reference being the PF-ODE solved by Dormand–Prince at
  rtol = atol = 1e-10 from t = T-1 to 0 followed by the denoising x̂_0 at t = 0 (deterministic samplers only);
- `ED`: the energy distance to fresh exact data samples, next to the energy distance between two independent exact
  sample sets of the same size (the noise floor).
For each diffusers scheduler the best of its variants (timestep_spacing linspace / leading / trailing, and Karras
sigmas where it has them) is reported at each NFE, which is the most favourable comparison for diffusers.

Trained networks (`--sections trained`): saved pipeline folders (default: the shipped `training/pretrained/digits-ddpm`;
add e.g. a v-prediction digits model trained with `training/train_unconditional.py --prediction_type v_prediction`).
Every scheduler is built with `from_config(saved scheduler config)` and nothing else, except the diffusers setups'
named options; the metric is the digits Fréchet distance (`training.evaluate.digits_metrics`, lower is better) of
`--num_samples` samples from the same x_T (seed 0), at 5, 10 and 20 model evaluations, and the RMS distance of each
sample to the network's own probability-flow ODE solution from the same x_T (Dormand-Prince, rtol = atol = 1e-5): the
exact answer for that network, which the digits FD does not reward (the ODE solution itself scores a worse FD than
some 10-step samplers).
"""

import argparse
import math
import platform
import time

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from custom_pipelines import sample_loop
from schedulers import TutorialDDPMScheduler
from schedulers.gaussian_mixture import GaussianMixture
from schedulers.scheduling_tutorial_dpmpp import TutorialDPMSolverPlusPlusScheduler, tune_timesteps
from schedulers.scheduling_tutorial_pf_ode import TutorialPFODEScheduler, solve_pf_ode
from schedulers.scheduling_tutorial_sde import TutorialScoreSDEScheduler
from schedulers.tutorial_likelihood import ode_log_likelihood, variational_bound

SPACINGS = ("linspace", "leading", "trailing")
TUNE_UP_TO_NFE = 20  # tuned placements are computed for budgets up to this (the search costs ~N² runs)


class Tuned:
    """A scheduler of ours whose grid is tuned per budget on calibration noise (`tune_timesteps`), not x_T."""

    def __init__(self, scheduler, model, calibration_noise):
        self.scheduler, self.model, self.noise = scheduler, model, calibration_noise
        self.grids = {}

    def grid(self, nfe):
        if nfe not in self.grids:
            self.grids[nfe] = tune_timesteps(self.scheduler, self.model, self.noise, nfe)
        return self.grids[nfe]


def ours(cfg, model, calibration_noise):
    """name -> (list of scheduler variants, deterministic?)."""
    dpm = TutorialDPMSolverPlusPlusScheduler
    ends = {"few_step_interior": False}  # the grid with both end points at every N
    logsnr = {"step_placement": "logsnr", **ends}  # tuning starts from the λ-uniform grid
    return {
        "ours DPM++ 2M tuned": (
            [Tuned(dpm.from_config(cfg, solver_order=2, **logsnr), model, calibration_noise)],
            True,
        ),
        "ours DPM++ 3M tuned": (
            [Tuned(dpm.from_config(cfg, solver_order=3, **logsnr), model, calibration_noise)],
            True,
        ),
        "ours DPM++ 2M (defaults)": ([dpm.from_config(cfg)], True),
        "ours DPM++ 2M defaults, no corrector": ([dpm.from_config(cfg, use_corrector=False)], True),
        "ours DPM++ 2M karras (before #21)": ([dpm.from_config(cfg, step_placement="karras")], True),
        "ours DPM++ 2M logsnr": ([dpm.from_config(cfg, solver_order=2, step_placement="logsnr", **ends)], True),
        "ours DPM++ 3M logsnr": ([dpm.from_config(cfg, solver_order=3, step_placement="logsnr", **ends)], True),
        "ours DPM++ 3M karras": ([dpm.from_config(cfg, solver_order=3, step_placement="karras", **ends)], True),
        "ours DPM++ 3M time_uniform": (
            [dpm.from_config(cfg, solver_order=3, step_placement="time_uniform", **ends)],
            True,
        ),
        "ours PF-ODE heun karras": ([TutorialPFODEScheduler.from_config(cfg, solver="heun")], True),
        "ours PF-ODE rk4 logsnr": (
            [TutorialPFODEScheduler.from_config(cfg, solver="rk4", step_placement="logsnr")],
            True,
        ),
        "ours SDE vp EM": ([TutorialScoreSDEScheduler.from_config(cfg)], False),
        "ours SDE vp PC (langevin)": ([TutorialScoreSDEScheduler.from_config(cfg, corrector="langevin")], False),
    }


def theirs(cfg):
    def variants(cls, karras=True, **kw):
        out = [cls.from_config(cfg, timestep_spacing=s, **kw) for s in SPACINGS]
        if karras:
            out.append(cls.from_config(cfg, use_karras_sigmas=True, **kw))
        return out

    return {
        "diffusers DDIM": (variants(DDIMScheduler, karras=False, clip_sample=False, set_alpha_to_one=True), True),
        "diffusers DPMSolverMultistep 2M": (variants(DPMSolverMultistepScheduler, solver_order=2), True),
        "diffusers DPMSolverMultistep 3M": (variants(DPMSolverMultistepScheduler, solver_order=3), True),
        "diffusers DPMSolverMultistep SDE": (
            variants(DPMSolverMultistepScheduler, solver_order=2, algorithm_type="sde-dpmsolver++"),
            False,
        ),
        "diffusers UniPC": (variants(UniPCMultistepScheduler), True),
        "diffusers Heun": (variants(HeunDiscreteScheduler), True),
        "diffusers Euler": (variants(EulerDiscreteScheduler), True),
        "diffusers DEIS": (variants(DEISMultistepScheduler), True),
        "diffusers PNDM": (variants(PNDMScheduler, karras=False, skip_prk_steps=True), True),
    }


def loop(scheduler, model, x_T, n, seed=0):
    """`sample_loop` on `n` steps (an int) or on the grid `n` (a list): (x, number of model evaluations)."""
    grid = {"timesteps": n} if isinstance(n, list) else {"num_inference_steps": n}
    x = sample_loop(model, scheduler, x_T, generator=torch.Generator().manual_seed(seed), **grid)
    return x, len(scheduler.timesteps)


def steps_for_budget(scheduler, nfe):
    """The largest num_inference_steps whose loop makes <= nfe model evaluations (None if none does)."""
    best = None
    for n in range(2, nfe + 2):
        try:
            scheduler.set_timesteps(n)
        except Exception:
            continue
        if len(scheduler.timesteps) <= nfe:
            best = n
    return best


def energy_distance(x, y):
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def run_problem(name, gmm, beta_schedule, batch, nfes):
    ddpm = TutorialDDPMScheduler(beta_schedule=beta_schedule)
    model = gmm.model(ddpm.alpha_bar, "epsilon")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(batch, gmm.dim, generator=g, dtype=torch.float64)
    t0 = time.time()
    reference = solve_pf_ode(model, ddpm, x_T, rtol=1e-10, atol=1e-10, max_evals=200000)
    data, data2 = gmm.sample(batch, g), gmm.sample(batch, g)
    floor = energy_distance(data, data2)
    print(f"\n## {name}, {beta_schedule} schedule (D = {gmm.dim}, {batch} samples)")
    print(
        f"reference: Dormand-Prince rtol=atol=1e-10, {reference.num_evals} evaluations, {time.time() - t0:.1f}s; "
        f"energy distance between two exact sample sets (floor): {floor:.2e}; "
        f"ED(reference, data) = {energy_distance(reference.sample, data):.2e}"
    )
    calibration_noise = torch.randn(200, gmm.dim, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    rows, failures = {}, []
    for label, (variants, deterministic) in {
        **ours(ddpm.config, model, calibration_noise),
        **theirs(ddpm.config),
    }.items():
        row = {}
        t_label = time.time()
        for nfe in nfes:
            best = None
            for s in variants:
                if isinstance(s, Tuned):
                    if nfe > TUNE_UP_TO_NFE:
                        continue
                    s, n = s.scheduler, s.grid(nfe)
                else:
                    n = steps_for_budget(s, nfe)
                if n is None:
                    continue
                try:
                    x, evals = loop(s, model, x_T, n)
                except Exception as error:  # a diffusers variant that breaks at this N (reported, not hidden)
                    failures.append(
                        f"{label} {dict(s.config).get('timestep_spacing')} karras="
                        f"{dict(s.config).get('use_karras_sigmas')} N={n}: {type(error).__name__}: {error}"
                    )
                    continue
                if not bool(torch.isfinite(x).all()):
                    failures.append(f"{label} {dict(s.config).get('timestep_spacing')} N={n}: non-finite output")
                    continue
                err = float((x - reference.sample).pow(2).mean().sqrt()) if deterministic else float("nan")
                ed = energy_distance(x, data)
                key = err if deterministic else ed
                if best is None or key < best[0]:
                    best = (key, err, ed, evals)
            row[nfe] = best
        rows[label] = (row, deterministic)
        if label.endswith("tuned"):
            print(f"(tuning {label} for NFE <= {TUNE_UP_TO_NFE}: {time.time() - t_label:.1f}s)")
    header = (
        f"{'sampler':36s}"
        + "".join(f"{'err@' + str(n):>11s}" for n in nfes)
        + "".join(f"{'ED@' + str(n):>10s}" for n in nfes)
    )
    print(header)
    for label, (row, deterministic) in rows.items():
        errs = "".join(f"{row[n][1]:11.2e}" if row[n] and deterministic else f"{'-':>11s}" for n in nfes)
        eds = "".join(f"{row[n][2]:10.2e}" if row[n] else f"{'-':>10s}" for n in nfes)
        print(f"{label:36s}{errs}{eds}")
    for failure in failures:
        print("variant failed:", failure)
    verdicts = []
    for n in nfes:
        best_ours = min((r[n][1], lbl) for lbl, (r, d) in rows.items() if d and lbl.startswith("ours") and r[n])
        best_theirs = min((r[n][1], lbl) for lbl, (r, d) in rows.items() if d and lbl.startswith("diffusers") and r[n])
        untuned = min(
            (r[n][1], lbl)
            for lbl, (r, d) in rows.items()
            if d and lbl.startswith("ours") and not lbl.endswith("tuned") and r[n]
        )
        ratio, ratio_untuned = best_ours[0] / best_theirs[0], untuned[0] / best_theirs[0]
        ratio_default = rows["ours DPM++ 2M (defaults)"][0][n][1] / best_theirs[0]
        verdicts.append((n, ratio, ratio_untuned, ratio_default))
        print(
            f"NFE {n:3d}: best ours {best_ours[1]} {best_ours[0]:.2e}; best diffusers {best_theirs[1]} "
            f"{best_theirs[0]:.2e}; ratio {ratio:.3f} (best untuned ours {untuned[1]}: ratio {ratio_untuned:.3f}; "
            f"ours DPM++ 2M (defaults): ratio {ratio_default:.3f})"
        )
    return verdicts


def likelihood_accuracy(name, gmm, beta_schedule, n_points=32):
    """ODE log-likelihood and variational bound against the exact mixture density (nats and bits/dim)."""
    ddpm = TutorialDDPMScheduler(beta_schedule=beta_schedule)
    model = gmm.model(ddpm.alpha_bar, "epsilon")
    g = torch.Generator().manual_seed(9)
    x = gmm.sample(n_points, g)
    exact_t0 = gmm.log_prob(x, ddpm.alpha_bar[0])
    print(f"\n## Likelihood accuracy: {name}, {beta_schedule} schedule (D = {gmm.dim}, {n_points} points)")
    for trace, tol in (("exact", 1e-5), ("exact", 1e-7), ("hutchinson", 1e-5)):
        t0 = time.time()
        r = ode_log_likelihood(model, ddpm, x, trace=trace, rtol=tol, atol=tol, generator=g)
        err = r.log_prob - exact_t0
        print(
            f"ODE {trace:10s} rtol=atol={tol:g}: |error| max {float(err.abs().max()):.2e} nats, mean error "
            f"{float(err.mean()):+.2e} nats ({float(err.mean()) / (gmm.dim * math.log(2)):+.2e} bits/dim), "
            f"{r.num_evals} evaluations, {time.time() - t0:.1f}s"
        )
    data = gmm.sample(2000, g)
    nll = float(-gmm.log_prob(data).mean())
    for k in (10, 100, 1000):
        vb = variational_bound(model, ddpm, data, num_steps=k, decoder="gaussian", generator=g)
        se = float(vb.nats.std()) / math.sqrt(data.shape[0])
        print(
            f"variational bound, {k:4d} steps: {float(vb.nats.mean()):9.4f} nats (± {se:.3f}) vs exact NLL "
            f"{nll:.4f}: gap {float(vb.nats.mean()) - nll:+.4f} nats "
            f"({(float(vb.nats.mean()) - nll) / (gmm.dim * math.log(2)):+.4f} bits/dim)"
        )


def trained_setups(cfg):
    """name -> a fresh scheduler built from the saved config (ours with nothing else; diffusers' named setups)."""
    dpm = TutorialDPMSolverPlusPlusScheduler
    return {
        "ours DPM++ 2M (defaults)": lambda: dpm.from_config(cfg),
        "ours DPM++ 2M defaults, no corrector": lambda: dpm.from_config(cfg, use_corrector=False),
        "ours DPM++ 2M karras (before #21)": lambda: dpm.from_config(cfg, step_placement="karras"),
        "ours DPM++ 2M logsnr, end points (before #15)": lambda: dpm.from_config(
            cfg, step_placement="logsnr", few_step_interior=False
        ),
        "ours DPM++ 3M (defaults otherwise)": lambda: dpm.from_config(cfg, solver_order=3),
        "diffusers DPM++ 2M (default)": lambda: DPMSolverMultistepScheduler.from_config(cfg),
        "diffusers DPM++ 2M Karras": lambda: DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
        "diffusers UniPC": lambda: UniPCMultistepScheduler.from_config(cfg),
        "diffusers DDIM trailing": lambda: DDIMScheduler.from_config(cfg, timestep_spacing="trailing"),
        "diffusers Euler Karras": lambda: EulerDiscreteScheduler.from_config(cfg, use_karras_sigmas=True),
    }


def run_trained(folder, num_samples, nfes, ode_tol=1e-5):
    """Digits Fréchet distance of each setup at each budget on the network saved in `folder`, and its RMS distance to
    the network's own PF-ODE solution from the same x_T (Dormand-Prince at rtol = atol = `ode_tol`): the exact answer
    a deterministic sampler of this network should reach. Returns the FD rows."""
    from training.evaluate import digits_metrics  # training code: only this section needs it

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    cfg = DDIMScheduler.load_config(folder, subfolder="scheduler")
    shape = (num_samples, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def model(x, t):
        return unet(x, t).sample

    tic = time.time()
    reference = solve_pf_ode(model, TutorialDDPMScheduler.from_config(cfg), x_T, rtol=ode_tol, atol=ode_tol)
    reference_fd = digits_metrics(reference.sample.clamp(-1, 1))["frechet_distance"]
    print(
        f"\n## Trained network {folder} ({cfg['prediction_type']}, {num_samples} samples, seed 0): digits FD, and RMS "
        f"distance to the network's PF-ODE solution (Dormand-Prince, rtol=atol={ode_tol:g}, {reference.num_evals} "
        f"evaluations, {time.time() - tic:.0f}s; its FD {reference_fd:.1f})"
    )
    print("| sampler | " + " | ".join(f"FD@{n}" for n in nfes) + " | " + " | ".join(f"rms@{n}" for n in nfes) + " |")
    print("|---|" + "---|" * (2 * len(nfes)))
    rows, rms = {}, {}
    for label, make in trained_setups(cfg).items():
        row, dist = {}, {}
        for nfe in nfes:
            x, evals = loop(make(), model, x_T, nfe)
            if evals != nfe:
                raise RuntimeError(f"{label} made {evals} evaluations for num_inference_steps={nfe}")
            row[nfe] = digits_metrics(x.clamp(-1, 1))["frechet_distance"]
            dist[nfe] = float((x - reference.sample).pow(2).mean().sqrt())
        rows[label], rms[label] = row, dist
        cells = [f"{row[n]:.1f}" for n in nfes] + [f"{dist[n]:.4f}" for n in nfes]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    for n in nfes:
        ours_default = rows["ours DPM++ 2M (defaults)"][n]
        best, best_label = min((r[n], lbl) for lbl, r in rows.items() if lbl.startswith("diffusers"))
        verdict = "met" if ours_default <= best else "NOT met"
        print(
            f"{n:3d} evaluations: ours (defaults) {ours_default:.2f}; best diffusers {best_label} {best:.2f}: {verdict}"
        )
        ours_rms = rms["ours DPM++ 2M (defaults)"][n]
        best, best_label = min((r[n], lbl) for lbl, r in rms.items() if lbl.startswith("diffusers"))
        print(
            f"{n:3d} evaluations, distance to the PF-ODE solution: ours (defaults) {ours_rms:.4f}; best diffusers "
            f"{best_label} {best:.4f}: ratio {ours_rms / best:.2f}"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--quick", action="store_true", help="ring + linear only; 32 samples of a trained network")
    parser.add_argument("--sections", nargs="+", choices=("mixture", "trained"), default=["mixture", "trained"])
    parser.add_argument("--trained", nargs="+", default=["training/pretrained/digits-ddpm"], help="pipeline folders")
    parser.add_argument("--num_samples", type=int, default=512, help="samples per trained-network setup")
    args = parser.parse_args()
    torch.set_num_threads(1)  # thousands of small evaluations: one thread avoids intra-op overhead
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.machine()}, 1 thread")
    if "trained" in args.sections:
        for folder in args.trained:
            run_trained(folder, 32 if args.quick else args.num_samples, [5, 10, 20], 1e-3 if args.quick else 1e-5)
    if "mixture" not in args.sections:
        return
    problems = [("2-D ring", GaussianMixture.ring()), ("64-D mixture", GaussianMixture.random(dim=64, num_modes=5))]
    schedules = ["linear", "squaredcos_cap_v2"]
    if args.quick:
        problems, schedules = problems[:1], schedules[:1]
    for name, gmm in problems:
        for schedule in schedules:
            likelihood_accuracy(name, gmm, schedule)
    summary = []
    for name, gmm in problems:
        for schedule in schedules:
            for n, ratio, ratio_untuned, ratio_default in run_problem(name, gmm, schedule, args.batch, args.nfe):
                summary.append((name, schedule, n, ratio, ratio_untuned, ratio_default))
    print("\n## Target: at 10 and 20 NFE, best ours and our defaults <= 0.5 x best diffusers (ratio <= 0.5)")
    for name, schedule, n, ratio, ratio_untuned, ratio_default in summary:
        if n in (10, 20):
            print(
                f"{name:14s} {schedule:18s} NFE {n:3d}: ratio {ratio:.3f} {'met' if ratio <= 0.5 else 'NOT met'}"
                f"   (untuned placements only: {ratio_untuned:.3f} {'met' if ratio_untuned <= 0.5 else 'NOT met'};"
                f" DPM++ 2M defaults: {ratio_default:.3f} {'met' if ratio_default <= 0.5 else 'NOT met'})"
            )
    assert all(math.isfinite(r) for _, _, _, r, _, _ in summary)


if __name__ == "__main__":
    main()
