"""Distilled students against their teacher: digits Fréchet distance, class histogram, distance to the teacher's ODE.

    python benchmarks/bench_distill.py --progressive runs/digits-pd --consistency runs/digits-cd   # folders of distill.py
    python benchmarks/bench_distill.py --quick      # trains two tiny students itself (8 updates each), 32 samples

The teacher is a saved pipeline folder (default the shipped `training/pretrained/digits-ddpm`), sampled from the same
x_T (seed 0) with ours DPM-Solver++ (defaults), ours DDIM (trailing grid) and diffusers' UniPC at 1, 2, 4, 10 and 50
evaluations; "best" is the lowest Fréchet distance among them at each count. Each student is sampled with its saved
`TutorialDistilledScheduler` at 1, 2 and 4 steps (a progressive run's N-step round student at N steps, from
`students/<N>-step/`, and its final student at every N). `ode mse` is the mean squared distance per pixel between a
sample and the teacher's probability-flow ODE solution from the same x_T (Dormand–Prince, rtol = atol = 1e-4; the
consistency sampler re-noises between steps, so beyond 1 step it is not meant to follow that trajectory).
"""

import argparse
import os
import platform
import sys
import tempfile
import time

import diffusers
import torch
from diffusers import DDIMScheduler, UNet2DModel, UniPCMultistepScheduler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_samplers import loop  # noqa: E402

from schedulers import (  # noqa: E402
    TutorialDDIMScheduler,
    TutorialDDPMScheduler,
    TutorialDistilledScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    solve_pf_ode,
)

TEACHER = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "pretrained", "digits-ddpm"
)
COUNTS = (1, 2, 4, 10, 50)


def teacher_setups(cfg):
    return {
        "ours DPM-Solver++ (defaults)": lambda: TutorialDPMSolverPlusPlusScheduler.from_config(cfg),
        "ours DDIM (trailing)": lambda: TutorialDDIMScheduler.from_config(cfg, timestep_spacing="trailing"),
        "diffusers UniPC": lambda: UniPCMultistepScheduler.from_config(cfg),
    }


def scored(x, reference):
    from training.metrics import digits_metrics

    m = digits_metrics(x.clamp(-1, 1))
    return {
        "fd": m["frechet_distance"],
        "coverage": m["class_coverage"],
        "hist": m["class_histogram"],
        "ode_mse": float((x.clamp(-1, 1) - reference).pow(2).mean()),
    }


def load_unet(folder):
    return UNet2DModel.from_pretrained(folder, subfolder="unet").eval()


def as_model(unet):
    """`model(x, t)` -> the UNet's output, without gradients."""

    @torch.no_grad()
    def model(x, t):
        return unet(x, t).sample

    return model


def student_rows(label, folder, x_T, reference):
    """(label, N, scores) for a student folder at 1, 2, 4 steps, and a progressive run's round students at their N."""
    rows = []
    unet = load_unet(folder)
    scheduler = TutorialDistilledScheduler.from_pretrained(folder, subfolder="scheduler")

    model = as_model(unet)
    if scheduler.config.distillation == "progressive":
        for n in (1, 2, 4):
            sub = folder if n in scheduler.config.distilled_steps else os.path.join(folder, "students", f"{n}-step")
            if os.path.isdir(sub):
                x, _ = loop(scheduler, as_model(load_unet(sub)), x_T, n)
                rows.append((f"{label}: the {n}-step round's student", n, scored(x, reference)))
    for n in (1, 2, 4):
        x, _ = loop(scheduler, model, x_T, n)
        rows.append((f"{label}: final student", n, scored(x, reference)))
    return rows


def quick_students(work):
    """Two tiny distillation runs from the shipped teacher (8 updates each): the pipeline, not the numbers."""
    from training import distill

    common = ["--logger", "none", "--train_batch_size", "16", "--eval_batch_size", "4", "--eval_num_samples", "4"]
    distill.main(
        [
            *common,
            "--method",
            "progressive",
            "--start_steps",
            "8",
            "--steps_per_round",
            "3",
            "--output_dir",
            f"{work}/pd",
        ]
    )
    distill.main([*common, "--method", "consistency", "--max_train_steps", "8", "--output_dir", f"{work}/cd"])
    return f"{work}/pd", f"{work}/cd"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--progressive", default=None, help="a folder written by distill.py --method progressive")
    parser.add_argument("--consistency", default=None, help="a folder written by distill.py --method consistency")
    parser.add_argument("--num_samples", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="tiny students trained here, 32 samples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.machine()}, 1 thread")
    n = 32 if args.quick else args.num_samples
    work = tempfile.mkdtemp(prefix="bench-distill-") if args.quick else None
    if args.quick:
        args.progressive, args.consistency = quick_students(work)

    teacher = load_unet(args.teacher)
    cfg = DDIMScheduler.load_config(args.teacher, subfolder="scheduler")
    shape = (n, teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def model(x, t):
        return teacher(x, t).sample

    tic = time.time()
    tol = 1e-3 if args.quick else 1e-4
    reference = solve_pf_ode(model, TutorialDDPMScheduler.from_config(cfg), x_T, rtol=tol, atol=tol).sample.clamp(
        -1, 1
    )
    print(f"teacher {args.teacher}: ODE reference (Dormand-Prince, rtol=atol={tol:g}) in {time.time() - tic:.0f}s")

    print(f"\n## Teacher and students ({n} samples, x_T from seed 0): digits FD, class coverage, ODE mse")
    print("| model | sampler | evaluations | FD | coverage | ode mse | class histogram |")
    print("|---|---|---|---|---|---|---|")
    s = scored(reference, reference)  # what a student that learnt the ODE's map x_T -> x_0 exactly would score
    print(
        f"| teacher | PF-ODE, Dormand-Prince (the reference) | adaptive | {s['fd']:.1f} | {s['coverage']:.1f} | "
        f"0 | {s['hist']} |"
    )
    best = {}
    for label, make in teacher_setups(cfg).items():
        for count in COUNTS:
            try:
                x, evals = loop(make(), model, x_T, count)
            except ValueError as err:  # e.g. DPM-Solver++ needs >= 2 steps
                print(f"| teacher | {label} | {count} | - | - | - | {err} |")
                continue
            s = scored(x, reference)
            best[count] = min(best.get(count, float("inf")), s["fd"])
            print(
                f"| teacher | {label} | {evals} | {s['fd']:.1f} | {s['coverage']:.1f} | {s['ode_mse']:.4f} | {s['hist']} |"
            )
    students = []
    for label, folder in (("progressive", args.progressive), ("consistency", args.consistency)):
        if folder:
            for row_label, count, s in student_rows(label, folder, x_T, reference):
                students.append((row_label, count, s))
                print(
                    f"| {row_label} | TutorialDistilledScheduler | {count} | {s['fd']:.1f} | {s['coverage']:.1f} | "
                    f"{s['ode_mse']:.4f} | {s['hist']} |"
                )
    print("\nteacher's best FD per evaluation count: " + ", ".join(f"{c}: {best[c]:.1f}" for c in COUNTS))
    goals = {4: 1.0, 2: 1.3, 1: 2.0}  # student at N steps vs the teacher's best at 10 evaluations
    for row_label, count, s in students:
        limit = goals[count] * best[10]
        verdict = "met" if s["fd"] <= limit else "NOT met"
        print(
            f"{row_label} at {count} step(s): FD {s['fd']:.1f} vs goal <= {goals[count]:g} x {best[10]:.1f} = "
            f"{limit:.1f}: {verdict}; teacher's best at {count}: {best[count]:.1f}"
        )


if __name__ == "__main__":
    main()
