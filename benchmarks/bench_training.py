"""Training speed and quality: ours vs diffusers' `train_unconditional.py` loop (re-created here), same UNet and data.

    python benchmarks/bench_training.py                  # throughput + memory, 2 interleaved repeats
    python benchmarks/bench_training.py --pairs defaults # only ours (defaults) vs theirs (defaults)
    python benchmarks/bench_training.py --quality        # also time-to-quality (~15 min on 2 CPUs)
    python benchmarks/bench_training.py --quick          # 3 updates, the defaults pair once (the test suite)

"Theirs" re-creates the training loop of diffusers' examples/unconditional_image_generation/train_unconditional.py
(0.42.x) without torchvision: a `datasets.Dataset` whose transform decodes, resizes and normalises every image on
every access, `shuffle=True`, `DDPMScheduler.add_noise`, ε-prediction MSE, `accelerator.accumulate`, gradient
clipping, EMA every step, and that script's defaults (lr 1e-4, 500 warmup steps, cosine, AdamW β1 = 0.95,
EMA inv_gamma 1, power 3/4, max decay 0.9999, `--mixed_precision no`). "Ours" runs `training/train_unconditional.py`
with its defaults (`--mixed_precision auto`: bf16 autocast where the CPU has AVX512-BF16 or AMX, float32 elsewhere).
Both train the project's default UNet (16x16, 1 channel) on the training split of the built-in digits, batch 64.

Three pairs are compared, each repeated `--repeats` times with the runs interleaved (the machine is shared):
"defaults" (ours with its defaults vs theirs with its defaults, the headline), and the same precision on both sides,
"fp32" (both `--mixed_precision no`) and "bf16" (both `--mixed_precision bf16`; theirs casts the batch and noise to
bf16 as diffusers' script does). Besides wall-clock images/s, the CPU time of the process is reported: on a shared
machine it is the steadier measure of the work done.

Each measurement runs in its own subprocess (clean peak memory: ru_maxrss) on BENCH_THREADS torch threads (default
1: on a shared 2-core machine two intra-op threads under contention ran 6-10x slower for both sides). Throughput is
the wall time of the training loop, data loading included, start-up and evaluation excluded. Time-to-quality is the wall time until
the digits Fréchet distance of 256 EMA samples (DDIM, 50 steps; evaluation time excluded) falls below `--threshold`.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# What "theirs" is, printed first and written into the report: not diffusers' script, its loop re-created here.
THEIRS = (
    "theirs = diffusers' training loop re-created in this benchmark (`run_theirs`), from diffusers' "
    "examples/unconditional_image_generation/train_unconditional.py 0.42.x; not that script itself"
)


def run_report(mixed_precision: str, steps: int, train_seconds: float, cpu_seconds: float, reached, history) -> dict:
    """One side's measurements: throughput by wall clock and by CPU time (batch 64), time to quality, FD history."""
    return {
        "mixed_precision": mixed_precision,
        "cpu_seconds": cpu_seconds,
        "images_per_cpu_s": steps * 64 / cpu_seconds,
        "steps": steps,
        "images": steps * 64,
        "train_seconds": train_seconds,
        "images_per_s": steps * 64 / train_seconds,
        "time_to_quality_s": reached,
        "history": history,
    }


# ----------------------------------------------------------------------------------------------------------------
# Theirs: diffusers' train_unconditional.py loop, re-created
# ----------------------------------------------------------------------------------------------------------------
def run_theirs(steps: int, eval_every: int, threshold: float, seed: int = 0, precision: str = "default") -> dict:
    import datasets
    import numpy as np
    import torch
    from accelerate import Accelerator
    from bench_utils import diffusers_step
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from PIL import Image
    from sklearn.datasets import load_digits

    from training.data import digits_split_indices
    from training.model import default_unet_config

    torch.manual_seed(seed)
    digits = load_digits()
    idx = digits_split_indices("train")
    pil = [Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)) for i in idx]  # 8x8 PNG-like inputs
    ds = datasets.Dataset.from_dict({"image": pil}, features=datasets.Features({"image": datasets.Image()}))

    def transforms(examples):  # Resize(bilinear) + CenterCrop + ToTensor + Normalize([0.5], [0.5]), per access
        out = []
        for image in examples["image"]:
            image = image.convert("L").resize((16, 16), Image.BILINEAR)
            out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None] * 2 - 1)
        return {"input": out}

    ds.set_transform(transforms)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
    mixed_precision = "no" if precision == "default" else precision  # diffusers' default: --mixed_precision no
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision=mixed_precision)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    model = UNet2DModel(**default_unet_config(16, 1, None))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)

    step, eval_seconds, reached = 0, 0.0, None
    history = []
    start, cpu_start = time.perf_counter(), time.process_time()  # the loop, data loading in, evaluation out
    while step < steps:
        for batch in loader:
            diffusers_step(
                batch["input"].to(weight_dtype), model, noise_scheduler, accelerator, optimizer, lr_scheduler, ema
            )
            step += 1
            if eval_every and step % eval_every == 0:
                t0 = time.perf_counter()
                fd = _fd_of_ema(accelerator.unwrap_model(model), ema, noise_scheduler.config)
                eval_seconds += time.perf_counter() - t0
                train_seconds = time.perf_counter() - start - eval_seconds
                history.append({"step": step, "train_seconds": train_seconds, "frechet_distance": fd})
                if reached is None and fd < threshold:
                    reached = train_seconds
                    break
            if step >= steps:
                break
        if reached is not None:
            break
    train_seconds = time.perf_counter() - start - eval_seconds
    cpu_seconds = time.process_time() - cpu_start
    return run_report(mixed_precision, step, train_seconds, cpu_seconds, reached, history)


def _fd_of_ema(unet, ema, scheduler_config) -> float:
    import torch

    from schedulers import TutorialDDIMScheduler
    from training.metrics import digits_metrics
    from training.sampling import sample_sharded

    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    with torch.no_grad():
        samples = sample_sharded(unet, TutorialDDIMScheduler.from_config(scheduler_config), 256, 50, seed=0)
    unet.train()
    ema.restore(unet.parameters())
    return digits_metrics(samples)["frechet_distance"]


# ----------------------------------------------------------------------------------------------------------------
# Ours: the project's script, defaults
# ----------------------------------------------------------------------------------------------------------------
def run_ours(steps: int, eval_every: int, threshold: float, seed: int = 0, precision: str = "default") -> dict:
    from training import train_unconditional as tu

    out = tempfile.mkdtemp(prefix="bench-ours-")
    argv = [
        "--output_dir",
        out,
        "--max_train_steps",
        str(steps),
        "--logger",
        "none",
        "--seed",
        str(seed),
        "--checkpointing_steps",
        "100000",
        "--eval_num_samples",
        "256",
        "--eval_batch_size",
        "64",
    ]
    if eval_every:
        argv += ["--eval_every_steps", str(eval_every)]
    if precision != "default":
        argv += ["--mixed_precision", precision]
    state = {"reached": None, "start": None, "cpu_start": None}
    resolved = [None]
    eval_seconds, end = [0.0], [None]
    real_evaluate, real_loss = tu.evaluate_now, tu.diffusion_loss

    def timed_loss(*args, **kwargs):  # the clock starts at the first step, as theirs does (start-up excluded)
        if state["start"] is None:
            state["start"], state["cpu_start"] = time.perf_counter(), time.process_time()
            resolved[0] = args[3].mixed_precision
        return real_loss(*args, **kwargs)

    def timed_evaluate(*args, **kwargs):
        t0 = time.perf_counter()
        metrics, samples = real_evaluate(*args, **kwargs)
        if end[0] is None:  # evaluations inside the loop are excluded; the final one is after the clock stops
            eval_seconds[0] += time.perf_counter() - t0
        fd = metrics.get("frechet_distance")
        if fd is not None and state["reached"] is None and fd < threshold and "name" not in kwargs:
            state["reached"] = time.perf_counter() - state["start"] - eval_seconds[0]
        return metrics, samples

    tu.evaluate_now, tu.diffusion_loss = timed_evaluate, timed_loss
    stop = (lambda step: state["reached"] is not None) if eval_every else (lambda step: False)
    real_save = tu.save_checkpoint

    def clocked_save(*args, **kwargs):  # the loop ends where the final checkpoint starts
        end[0] = end[0] or (time.perf_counter(), time.process_time())
        return real_save(*args, **kwargs)

    tu.save_checkpoint = clocked_save
    result = tu.main(argv, should_stop=stop)
    total = end[0][0] - state["start"] - eval_seconds[0]
    cpu_seconds = end[0][1] - state["cpu_start"]  # with --quality this includes evaluation CPU time
    with open(os.path.join(out, "metrics.json")) as f:
        history = json.load(f)["history"]
    step = result["global_step"]
    history = [{"step": h["step"], "frechet_distance": h["frechet_distance"]} for h in history]
    return run_report(resolved[0], step, total, cpu_seconds, state["reached"], history)


def child(which: str, steps: int, eval_every: int, threshold: float, precision: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    result = (run_ours if which == "ours" else run_theirs)(steps, eval_every, threshold, precision=precision)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def measure(which: str, steps: int, eval_every: int, threshold: float, precision: str = "default") -> dict:
    """One side's run in its own process (a clean peak-memory count)."""
    from bench_utils import run_child

    argv = ["--child", which, "--steps", str(steps), "--eval_every", str(eval_every), "--threshold", str(threshold)]
    result = run_child(os.path.abspath(__file__), argv + ["--precision", precision], device="any")
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


# The --mixed_precision each side runs with, per comparison ("default": the script's own default).
PAIRS = {
    "defaults": {"theirs": "default", "ours": "default"},
    "fp32": {"theirs": "no", "ours": "no"},
    "bf16": {"theirs": "bf16", "ours": "bf16"},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="Updates of 64 images for the throughput run.")
    p.add_argument("--quality", action="store_true", help="Also measure time-to-quality (slow).")
    p.add_argument("--quality_steps", type=int, default=2000, help="Give up after this many updates.")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--threshold", type=float, default=100.0, help="Fréchet distance that counts as 'digits'.")
    p.add_argument("--output", default=None, help="Also write the full report (with histories) as JSON here.")
    p.add_argument("--repeats", type=int, default=2, help="Interleaved repeats of every pair.")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=tuple(PAIRS), help="Which comparisons to run.")
    p.add_argument(
        "--quick", action="store_true", help="A few updates, one repeat, the defaults pair (for the tests)."
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="default", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeats, args.pairs, args.quality = 3, 1, ["defaults"], False
    if args.child:
        return child(args.child, args.steps, args.eval_every, args.threshold, args.precision)

    report = {"theirs": THEIRS, "runs": [], "pairs": {}}
    print(THEIRS, flush=True)
    for r in range(args.repeats):  # interleaved: ours and theirs of every pair share the machine's weather
        for pair in args.pairs:
            for which in ("theirs", "ours"):
                run = measure(which, args.steps, 0, args.threshold, PAIRS[pair][which])
                run.update(which=which, pair=pair, repeat=r)
                report["runs"].append(run)
                print(
                    f"[{pair:8s} #{r}] {which:6s} ({run['mixed_precision']:4s}) {run['images_per_s']:7.1f} images/s "
                    f"{run['images_per_cpu_s']:7.1f} images/CPU-s  peak RSS {run['peak_rss_mb']:6.0f} MB",
                    flush=True,
                )
    for pair in args.pairs:
        runs = {w: [x for x in report["runs"] if x["pair"] == pair and x["which"] == w] for w in ("theirs", "ours")}
        wall = [o["images_per_s"] / t["images_per_s"] for o, t in zip(runs["ours"], runs["theirs"])]
        cpu = [o["images_per_cpu_s"] / t["images_per_cpu_s"] for o, t in zip(runs["ours"], runs["theirs"])]
        mean = {w: sum(x["images_per_s"] for x in runs[w]) / len(runs[w]) for w in runs}
        report["pairs"][pair] = {
            "wall_ratios": wall,
            "cpu_ratios": cpu,
            "ratio_of_means": mean["ours"] / mean["theirs"],
        }
        print(
            f"{pair:8s} throughput ratio ours / theirs: {mean['ours'] / mean['theirs']:.2f} "
            f"(per repeat, wall: {', '.join(f'{x:.2f}' for x in wall)}; CPU time: {', '.join(f'{x:.2f}' for x in cpu)})"
        )
    if "defaults" in report["pairs"]:
        report["throughput_ratio"] = report["pairs"]["defaults"]["ratio_of_means"]
    if args.quality:
        for which in ("theirs", "ours"):
            q = measure(which, args.quality_steps, args.eval_every, args.threshold)
            report[f"{which}_quality"] = q
            print(
                f"{which:6s} time to Fréchet distance < {args.threshold}: {q['time_to_quality_s']} s "
                f"(history: {[(h['step'], round(h['frechet_distance'], 1)) for h in q['history']]})"
            )
        t_ours, t_theirs = report["ours_quality"]["time_to_quality_s"], report["theirs_quality"]["time_to_quality_s"]
        if t_ours and t_theirs:
            print(f"time-to-quality ratio ours / theirs: {t_ours / t_theirs:.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
