"""Restoring images (issue 22): the four training-free methods against the exact posterior and on held-out digits.

    python benchmarks/bench_inverse.py [--sections mixture digits timing] [--cases sr deblur] [--num_images 256]
        [--threads 1] [--json FILE] [--quick]

Sections:

- `mixture`: a Gaussian-mixture prior on (1, 4, 4) images, its exact network (`GaussianMixture.as_unet`) and its exact
  posterior (`posterior_given`), as in `tests/advanced/test_inverse_exact.py`: 2x super-resolution, inpainting of the
  right half and compressed sensing with 6 Gaussian measurements, σ_y = 0 and 0.05, two priors (N(μ, I), where some
  methods are exact as N → ∞, and four anisotropic modes, where none is). Each method restores the same y
  `--mixture_samples` times at N = 20, 50, 100 steps; the table gives the sliced Wasserstein distance (SW_2, 256
  directions) to as many exact posterior samples, the error ‖mean − E[x_0 | y]‖ at N = 100, and the noise floor (SW_2
  between two independent exact sets). Rows exact in the limit (the test's docstring says why) are also run at N = 200
  and "converge" when SW_2 falls from N = 20 to N = 200 and ends within 1.3x the floor.
- `digits`: the first `--num_images` held-out (test-split) digits at 16 px, the shipped unconditional
  `training/pretrained/digits-ddpm` (its DDIM scheduler, `clip_sample=True`) at each method's defaults (100 steps, the
  papers' η and guidance), one generator (seed 0) per call. Cases: `sr`, x4 super-resolution from 4x4 block means
  (`SuperResolution(4)`), noiseless, against PIL's bicubic upsampling of y and A⁺y (nearest), and the shipped SR3
  model `training/pretrained/digits-sr3` (DDIM-50, `noise_level=0`); `deblur`, a 9x9 Gaussian blur of std 2 px with
  zero padding (`Blur.gaussian(9, 2.0, padding="zero")`, so DDRM and DDNM+ have its SVD) and σ_y = 0.02 (model units),
  against the blurred y itself and the Tikhonov pseudo-inverse A⁺_ε y, ε = 1e-3. Columns: the digits classifier's
  accuracy against the true labels, the Fréchet distance of its features to the held-out digits'
  (`training.metrics.digits_metrics`), PSNR (`training.super_resolution.psnr`), all on the restored image clamped to
  [-1, 1], and the consistency ‖A x̂ − y‖ / ‖y‖ (model space) of the unclamped restoration, mean and max over images.
- `timing`: seconds per restored image of each method at its default step count, and of RePaint
  (`TutorialRePaintPipeline` with `TutorialDDPMScheduler`, its defaults: 250 steps, jump_length 10, jump_n_sample 10)
  on the same inpainting case (right half missing, noiseless), same batch, same torch threads; SR3's on x4 SR beside.

`--quick` runs every section and code path at toy sizes (8 digits, a few steps): the suite runs it so it cannot rot.
"""

import argparse
import inspect
import json
import os
import platform
import sys
import time

import diffusers
import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from custom_pipelines import (  # noqa: E402
    Blur,
    Inpainting,
    RandomProjection,
    SuperResolution,
    TutorialInverseProblemPipeline,
    TutorialRePaintPipeline,
    TutorialSuperResolutionPipeline,
)
from schedulers import TutorialDDPMScheduler  # noqa: E402
from schedulers.gaussian_mixture import GaussianMixture, sliced_wasserstein  # noqa: E402

DDPM_FOLDER = os.path.join(ROOT, "training", "pretrained", "digits-ddpm")
SR3_FOLDER = os.path.join(ROOT, "training", "pretrained", "digits-sr3")
METHODS = ("ddnm", "ddrm", "dps", "pigdm")

# ---- mixture ----------------------------------------------------------------------------------------------------
MIX_SHAPE, MIX_D, MIX_NOISY = (1, 4, 4), 16, 0.05
# (label, method, kwargs): the defaults, and the settings the exact-in-the-limit argument needs. DPS at ζ' = 0.3 as
# in the exact test (ζ' = 1 overshoots on these 16-dimensional images).
MIX_SETTINGS = (
    ("ddnm (η=0.85)", "ddnm", {}),
    ("ddnm η=1", "ddnm", dict(eta=1.0)),
    ("ddrm (η=0.85)", "ddrm", {}),
    ("ddrm η=0", "ddrm", dict(eta=0.0)),
    ("dps ζ'=0.3", "dps", dict(guidance_scale=0.3)),
    ("pigdm", "pigdm", {}),
)


def mixture_operators():
    mask = torch.zeros(4, 4)
    mask[:, :2] = 1  # left half observed
    return {"sr x2": SuperResolution(2), "inpaint": Inpainting(mask), "cs m=6": RandomProjection(6, MIX_SHAPE, seed=0)}


def mixture_priors():
    return {
        "N(μ, I)": GaussianMixture(
            torch.ones(1),
            0.3 * torch.randn(1, MIX_D, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
            torch.ones(1),
        ),
        "four modes": GaussianMixture.random(dim=MIX_D, num_modes=4, seed=1),
    }


def exact_in_the_limit(prior: str, method: str, kwargs: dict, sigma_y: float) -> bool:
    """The cases of `tests/advanced/test_inverse_exact.py`'s docstring, for the N(μ, I) prior only."""
    if prior != "N(μ, I)":
        return False
    if method == "pigdm":
        return True
    if sigma_y > 0:
        return False
    return method == "ddnm" or (method == "ddrm" and kwargs.get("eta") == 0.0)


def _sw(a, b):
    return float(sliced_wasserstein(a, b, num_projections=256, generator=torch.Generator().manual_seed(9)))


def run_mixture(quick: bool, num_samples: int, report: dict):
    steps = (2, 4) if quick else (20, 50, 100)
    limit_steps = 8 if quick else 200
    print(f"\n## Exact mixture: SW_2 to {num_samples} exact posterior samples, (1, 4, 4) images")
    print("Rows marked * are exact in the limit N → ∞; they are also run at N = " + f"{limit_steps}.")
    ops = mixture_operators()
    scheduler = TutorialDDPMScheduler(timestep_spacing="trailing", clip_sample=False)  # t_1 = T − 1: x_T ~ N(0, I)
    rows = []
    tic = time.perf_counter()
    for prior_name, gm in mixture_priors().items():
        pipe = TutorialInverseProblemPipeline(unet=gm.as_unet(scheduler.alpha_bar, MIX_SHAPE), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        cols = " | ".join(f"SW N={n}" for n in steps)
        print(f"\n### prior {prior_name}\n")
        print(f"| operator | σ_y | method | {cols} | SW N={limit_steps} | mean err (N={steps[-1]}) | floor | prior's SW "
              "| exact in the limit | converges |")  # fmt: skip
        print("|---|---|---|" + "---|" * len(steps) + "---|---|---|---|---|---|")
        for op_name, op in ops.items():
            A = op.matrix(MIX_SHAPE)
            x = gm.sample(1, generator=torch.Generator().manual_seed(3)).reshape(1, *MIX_SHAPE)
            for sigma_y in (0.0, MIX_NOISY):
                clean = op.A(x)
                noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
                y = clean + sigma_y * noise
                posterior = gm.posterior_given(A, y.flatten(), sigma_y)
                g = torch.Generator().manual_seed(5)
                reference = posterior.sample(num_samples, generator=g)
                floor = _sw(reference, posterior.sample(num_samples, generator=g))
                from_prior = _sw(gm.sample(num_samples, generator=g), reference)
                for label, method, kwargs in MIX_SETTINGS:
                    exact = exact_in_the_limit(prior_name, method, kwargs, sigma_y)
                    sws, mean_err = {}, None
                    for n in steps + ((limit_steps,) if exact else ()):
                        out = pipe(
                            y.expand(num_samples, *y.shape[1:]),
                            op,
                            method=method,
                            num_inference_steps=n,
                            measurement_noise=sigma_y,
                            generator=torch.Generator().manual_seed(n),
                            output_type="pt",
                            return_trajectory=True,
                            **kwargs,
                        )
                        xs = out.trajectory[-1].reshape(num_samples, MIX_D)
                        sws[n] = _sw(xs, reference)
                        if n == steps[-1]:
                            mean_err = float((xs.mean(0) - posterior.mean).norm())
                    converges = exact and sws[limit_steps] < sws[steps[0]] and sws[limit_steps] <= 1.3 * floor
                    row = dict(prior=prior_name, operator=op_name, sigma_y=sigma_y, method=label,
                               sw={str(k): v for k, v in sws.items()}, mean_error=mean_err, floor=floor,
                               prior_sw=from_prior, exact_in_the_limit=exact,
                               converges=converges if exact else None)  # fmt: skip
                    rows.append(row)
                    limit = f"{sws[limit_steps]:.4f}" if exact else "-"
                    verdict = ("yes" if converges else "NO") if exact else "-"
                    print(f"| {op_name} | {sigma_y:g} | {label} | " + " | ".join(f"{sws[n]:.4f}" for n in steps)
                          + f" | {limit} | {mean_err:.4f} | {floor:.4f} | {from_prior:.4f} | {'*' if exact else ''} "
                          f"| {verdict} |")  # fmt: skip
    exact_rows = [r for r in rows if r["exact_in_the_limit"]]
    met = sum(bool(r["converges"]) for r in exact_rows)
    print(f"\nexact-in-the-limit rows that converge (SW_2 at N={limit_steps} ≤ 1.3 x floor, below N={steps[0]}): "
          f"{met}/{len(exact_rows)}: {'met' if met == len(exact_rows) else 'NOT met'}")  # fmt: skip
    print(f"mixture section: {time.perf_counter() - tic:.0f} s")
    report["mixture"] = rows


# ---- digits -------------------------------------------------------------------------------------------------------
DEBLUR_NOISE = 0.02  # σ_y in model units
TIKHONOV_EPS = 1e-3


def digits_cases():
    return {
        "sr": dict(
            title="x4 super-resolution from 4x4 block means, noiseless", operator=SuperResolution(4), sigma_y=0.0
        ),
        "deblur": dict(
            title=f"Gaussian deblurring (9x9, std 2 px, zero padding), σ_y = {DEBLUR_NOISE}",
            operator=Blur.gaussian(9, 2.0, padding="zero"),
            sigma_y=DEBLUR_NOISE,
        ),
    }


def bicubic(y: torch.Tensor, factor: int) -> torch.Tensor:
    """PIL's bicubic upsampling of each (1, h, w) image of y (model space, unclamped: bicubic may overshoot)."""
    out = []
    for img in y[:, 0].double().numpy():
        pil = Image.fromarray(img.astype(np.float32), mode="F")
        big = pil.resize((img.shape[1] * factor, img.shape[0] * factor), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(big, dtype=np.float32).copy()))
    return torch.stack(out)[:, None]


def score(restored, original, labels, operator, y) -> dict:
    """Accuracy, Fréchet distance, PSNR (clamped image) and consistency ‖A x̂ − y‖/‖y‖ (unclamped x̂)."""
    from training.digits_classifier import load_classifier
    from training.metrics import digits_metrics
    from training.super_resolution import psnr

    restored = restored.float()
    clamped = restored.clamp(-1, 1)
    with torch.no_grad():
        accuracy = float((load_classifier()(clamped).argmax(-1) == labels).float().mean())
    consistency = (operator.A(restored) - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)
    return dict(
        accuracy=accuracy,
        frechet_distance=digits_metrics(clamped)["frechet_distance"],
        psnr=psnr(clamped, original),
        consistency_mean=float(consistency.mean()),
        consistency_max=float(consistency.max()),
    )


def restore_training_free(pipe, y, operator, method, sigma_y, steps, batch):
    """The unclamped x_0 (model space) of `method` for every row of y, in batches, and the seconds it took."""
    chunks, tic = [], time.perf_counter()
    for start in range(0, len(y), batch):
        out = pipe(
            y[start : start + batch],
            operator,
            method=method,
            num_inference_steps=steps,
            measurement_noise=sigma_y,
            generator=torch.Generator().manual_seed(start),
            output_type="pt",
            return_trajectory=True,
        )
        chunks.append(out.trajectory[-1])
    return torch.cat(chunks), time.perf_counter() - tic


def restore_sr3(y, steps, batch):
    pipe = TutorialSuperResolutionPipeline.from_pretrained(SR3_FOLDER)
    pipe.set_progress_bar_config(disable=True)
    chunks, tic = [], time.perf_counter()
    for start in range(0, len(y), batch):
        out = pipe(
            (y[start : start + batch] + 1) / 2,
            noise_level=0,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(start),
            output_type="pt",
            return_trajectory=True,
        )
        chunks.append(out.trajectory[-1])
    return torch.cat(chunks), time.perf_counter() - tic


def run_digits(quick: bool, num_images: int, cases, report: dict):
    from training.data import load_digits_tensors

    steps = 3 if quick else None  # None: the pipeline's default (100)
    sr3_steps = 2 if quick else 50
    batch = 128
    original, labels = load_digits_tensors(16, "test")
    original, labels = original[:num_images], labels[:num_images]
    pipe = TutorialInverseProblemPipeline.from_pretrained(DDPM_FOLDER)
    pipe.set_progress_bar_config(disable=True)
    default_steps = (
        inspect.signature(TutorialInverseProblemPipeline.__call__).parameters["num_inference_steps"].default
    )
    n_steps = steps or default_steps
    ceiling = score(original, original, labels, SuperResolution(4), SuperResolution(4).A(original))
    report.setdefault("digits", {})
    for case in cases:
        spec = digits_cases()[case]
        operator, sigma_y = spec["operator"], spec["sigma_y"]
        clean = operator.A(original)
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1234))
        y = clean + sigma_y * noise
        print(f"\n## Held-out digits: {spec['title']} ({len(y)} images, digits-ddpm, {n_steps} steps)\n")
        print("| restoration | accuracy | Fréchet distance | PSNR (dB) | consistency mean | consistency max | s |")
        print("|---|---|---|---|---|---|---|")
        rows = {}

        def emit(name, restored, seconds=None, rows=rows, operator=operator, y=y):  # bound per case
            rows[name] = r = dict(score(restored, original, labels, operator, y), seconds=seconds)
            sec = "" if seconds is None else f"{seconds:.1f}"
            print(f"| {name} | {r['accuracy']:.3f} | {r['frechet_distance']:.2f} | {r['psnr']:.1f} | "
                  f"{r['consistency_mean']:.1e} | {r['consistency_max']:.1e} | {sec} |", flush=True)  # fmt: skip

        print(f"| originals (the ceiling) | {ceiling['accuracy']:.3f} | {ceiling['frechet_distance']:.2f} | - | - | - "
              "| |")  # fmt: skip
        if case == "sr":
            baseline = "bicubic (PIL)"
            emit(baseline, bicubic(y, operator.factor))
            emit("A⁺y (nearest)", operator.A_pinv(y))
        else:
            baseline = "blurred y"
            emit(baseline, y)
            emit(
                f"Tikhonov A⁺_ε y, ε={TIKHONOV_EPS:g}",
                Blur.gaussian(9, 2.0, eps=TIKHONOV_EPS, padding="zero").A_pinv(y),
            )
        for method in METHODS:
            restored, seconds = restore_training_free(pipe, y, operator, method, sigma_y, n_steps, batch)
            emit(method, restored, seconds)
        if case == "sr":
            restored, seconds = restore_sr3(y, sr3_steps, batch)
            emit(f"SR3 digits-sr3 (DDIM-{sr3_steps}, noise_level 0)", restored, seconds)

        print("\nGoals:")
        b = rows[baseline]
        for method in METHODS:
            r = rows[method]
            ok = r["accuracy"] > b["accuracy"] and r["frechet_distance"] < b["frechet_distance"]
            print(f"- {method} beats {baseline} on accuracy ({r['accuracy']:.3f} vs {b['accuracy']:.3f}) and Fréchet "
                  f"distance ({r['frechet_distance']:.2f} vs {b['frechet_distance']:.2f}): "
                  f"{'met' if ok else 'NOT met'}")  # fmt: skip
        if sigma_y == 0:
            c = rows["ddnm"]["consistency_max"]
            print(f"- DDNM's noiseless consistency max {c:.1e} <= 1e-4: {'met' if c <= 1e-4 else 'NOT met'}")
        if case == "sr":
            sr3 = rows[f"SR3 digits-sr3 (DDIM-{sr3_steps}, noise_level 0)"]
            best_acc = max(METHODS, key=lambda m: rows[m]["accuracy"])
            best_fd = min(METHODS, key=lambda m: rows[m]["frechet_distance"])
            best_psnr = max(METHODS, key=lambda m: rows[m]["psnr"])
            for metric, best, better in (("accuracy", best_acc, max), ("frechet_distance", best_fd, min),
                                         ("psnr", best_psnr, max)):  # fmt: skip
                ok = better(sr3[metric], rows[best][metric]) == sr3[metric]
                print(f"- SR3 at least matches the best training-free method on {metric} ({sr3[metric]:.3f} vs "
                      f"{best} {rows[best][metric]:.3f}): {'met' if ok else 'NOT met'}")  # fmt: skip
        report["digits"][case] = dict(title=spec["title"], num_images=len(y), steps=n_steps, rows=rows,
                                      ceiling=ceiling)  # fmt: skip


# ---- timing -------------------------------------------------------------------------------------------------------
def run_timing(quick: bool, batch: int, report: dict):
    from custom_pipelines.pipeline_tutorial_repaint import repaint_levels
    from training.data import load_digits_tensors

    x = load_digits_tensors(16, "test")[0][:batch]
    mask = torch.ones(16, 16)
    mask[:, 8:] = 0  # the right half is missing
    operator = Inpainting(mask)
    y = operator.A(x)
    pipe = TutorialInverseProblemPipeline.from_pretrained(DDPM_FOLDER)
    pipe.set_progress_bar_config(disable=True)
    repaint = TutorialRePaintPipeline(
        unet=pipe.unet, scheduler=TutorialDDPMScheduler.from_config(pipe.scheduler.config)
    )
    repaint.set_progress_bar_config(disable=True)
    steps = 3 if quick else 100
    rp = dict(num_inference_steps=6, jump_length=2, jump_n_sample=2) if quick else {}
    rp_args = {**dict(num_inference_steps=250, jump_length=10, jump_n_sample=10), **rp}
    levels = repaint_levels(**rp_args)
    rp_evals = sum(b < a for a, b in zip(levels[:-1], levels[1:]))  # one network evaluation per reverse step
    with torch.no_grad():
        pipe.unet(x, torch.tensor([10]))  # warm-up
    print(f"\n## Time per restored image: inpainting (right half missing, noiseless), batch {batch}, "
          f"{torch.get_num_threads()} torch thread(s)\n")  # fmt: skip
    print("| method | steps | network evaluations | s / image | ratio to RePaint |")
    print("|---|---|---|---|---|")
    rows = {}
    for method in METHODS:
        tic = time.perf_counter()
        pipe(y, operator, method=method, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
             output_type="pt")  # fmt: skip
        rows[method] = dict(steps=steps, evaluations=steps, seconds_per_image=(time.perf_counter() - tic) / batch)
    tic = time.perf_counter()
    repaint((x + 1) / 2, mask, generator=torch.Generator().manual_seed(0), output_type="pt", **rp_args)
    rows["RePaint"] = dict(steps=rp_args["num_inference_steps"], evaluations=rp_evals,
                           seconds_per_image=(time.perf_counter() - tic) / batch)  # fmt: skip
    sr3 = TutorialSuperResolutionPipeline.from_pretrained(SR3_FOLDER)
    sr3.set_progress_bar_config(disable=True)
    sr3_steps = 2 if quick else 50
    low = (SuperResolution(4).A(x) + 1) / 2
    tic = time.perf_counter()
    sr3(
        low, noise_level=0, num_inference_steps=sr3_steps, generator=torch.Generator().manual_seed(0), output_type="pt"
    )
    rows["SR3 (x4 SR, not inpainting)"] = dict(steps=sr3_steps, evaluations=sr3_steps,
                                               seconds_per_image=(time.perf_counter() - tic) / batch)  # fmt: skip
    base = rows["RePaint"]["seconds_per_image"]
    for name, r in rows.items():
        gradient = " (network + its gradient)" if name in ("dps", "pigdm") else ""
        print(f"| {name} | {r['steps']} | {r['evaluations']}{gradient} | {r['seconds_per_image']:.3f} | "
              f"{r['seconds_per_image'] / base:.3f} |")  # fmt: skip
    report["timing"] = dict(batch=batch, threads=torch.get_num_threads(), rows=rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=["mixture", "digits", "timing"],
                        choices=["mixture", "digits", "timing"])  # fmt: skip
    parser.add_argument("--cases", nargs="+", default=["sr", "deblur"], choices=["sr", "deblur"])
    parser.add_argument("--num_images", type=int, default=256, help="held-out digits restored per case (<= 359)")
    parser.add_argument("--mixture_samples", type=int, default=2000)
    parser.add_argument("--timing_batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--quick", action="store_true", help="toy sizes: every section and code path, not the numbers")
    args = parser.parse_args()
    if not 2 <= args.num_images <= 359:
        parser.error(f"--num_images={args.num_images} must be in [2, 359] (the held-out digits).")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores")  # fmt: skip
    report = dict(args=vars(args))
    tic = time.perf_counter()
    if "mixture" in args.sections:
        run_mixture(args.quick, 200 if args.quick else args.mixture_samples, report)
    if "digits" in args.sections:
        run_digits(args.quick, 8 if args.quick else args.num_images, args.cases, report)
    if "timing" in args.sections:
        run_timing(args.quick, 2 if args.quick else args.timing_batch, report)
    print(f"\ntotal {time.perf_counter() - tic:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)


if __name__ == "__main__":
    main()
