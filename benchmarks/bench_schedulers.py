"""Time `step()` and `set_timesteps()` of our schedulers against diffusers 0.42.1's, side by side in one run.

    python benchmarks/bench_schedulers.py [--repeats 7] [--threads 1] [--quick]

Per case: a full N-step sampling loop with a trivial model (the step is all that is timed beyond one tanh), batch 1
and 64 of 3x32x32. Timings interleave ours and theirs and report the median of `--repeats` rounds; ratio = ours /
diffusers (< 1: we are faster).
"""

import argparse
import platform
import statistics
import time
from functools import partial

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler

PAIRS = {
    "DDPM": (TutorialDDPMScheduler, DDPMScheduler, {}),
    "DDIM eta=0": (TutorialDDIMScheduler, DDIMScheduler, {"eta": 0.0}),
    "DDIM eta=1": (TutorialDDIMScheduler, DDIMScheduler, {"eta": 1.0}),
}


def time_loop(scheduler, batch, n_steps, step_kwargs):
    scheduler.set_timesteps(n_steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    eps = torch.tanh(x)  # a trivial, fixed "model output": the loop times the scheduler
    start = time.perf_counter()
    for t in scheduler.timesteps:
        x = scheduler.step(eps, t, x, generator=g, **step_kwargs).prev_sample
    return (time.perf_counter() - start) / n_steps


def time_set_timesteps(scheduler, n_steps, calls=200):
    start = time.perf_counter()
    for _ in range(calls):
        scheduler.set_timesteps(n_steps)
    return (time.perf_counter() - start) / calls


def time_set_timesteps_cold(make, n_steps, instances=20):
    """First call on fresh instances: what a one-off `set_timesteps` costs before any grid is cached."""
    fresh = [make() for _ in range(instances)]
    start = time.perf_counter()
    for scheduler in fresh:
        scheduler.set_timesteps(n_steps)
    return (time.perf_counter() - start) / instances


def time_cold_loop(make, n_steps, step_kwargs, instances=5):
    """set_timesteps on a fresh instance plus the whole N-step loop at batch 1: what one generation costs."""
    fresh = [make() for _ in range(instances)]
    x0 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eps = torch.tanh(x0)
    start = time.perf_counter()
    for scheduler in fresh:
        g = torch.Generator().manual_seed(0)
        scheduler.set_timesteps(n_steps)
        x = x0
        for t in scheduler.timesteps:
            x = scheduler.step(eps, t, x, generator=g, **step_kwargs).prev_sample
    return (time.perf_counter() - start) / instances


def median_pair(fn_ours, fn_theirs, repeats):
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(fn_ours())
        theirs.append(fn_theirs())
    return statistics.median(ours), statistics.median(theirs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (1 round of 5 steps)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 5
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'case':<40}{'ours (us)':>12}{'diffusers (us)':>16}{'ratio':>8}")
    rows = []
    for name, (ours_cls, ref_cls, kwargs) in PAIRS.items():
        for batch in (1, 64):
            ours, ref = ours_cls(), ref_cls()
            a, b = median_pair(
                partial(time_loop, ours, batch, args.steps, kwargs),
                partial(time_loop, ref, batch, args.steps, kwargs),
                args.repeats,
            )
            rows.append((f"step {name}, batch {batch}", a, b))
        ours, ref = ours_cls(), ref_cls()
        for n in (50, 1000):
            a, b = median_pair(partial(time_set_timesteps, ours, n), partial(time_set_timesteps, ref, n), args.repeats)
            rows.append((f"set_timesteps {name}, N={n}", a, b))
            a, b = median_pair(
                partial(time_set_timesteps_cold, ours_cls, n),
                partial(time_set_timesteps_cold, ref_cls, n),
                args.repeats,
            )
            rows.append((f"set_timesteps cold {name}, N={n}", a, b))
        a, b = median_pair(
            partial(time_cold_loop, ours_cls, args.steps, kwargs),
            partial(time_cold_loop, ref_cls, args.steps, kwargs),
            args.repeats,
        )
        rows.append((f"cold set_timesteps + {args.steps} steps {name}", a, b))
    for label, a, b in rows:
        print(f"{label:<40}{a * 1e6:>12.1f}{b * 1e6:>16.1f}{a / b:>8.2f}")
    return rows


if __name__ == "__main__":
    main()
