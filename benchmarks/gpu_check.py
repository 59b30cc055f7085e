"""Everything a GPU user touches, in one command: train, checkpoint, resume, sample, evaluate; a table and JSON.

    python benchmarks/gpu_check.py --output gpu_check.json        # on a GPU machine, < 5 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick           # the same path, tiny, on the CPU (the test suite)

Sections (each runs in its own subprocess: a fresh CUDA context and a clean peak-memory count):

1. `digits`: `training/train_unconditional.py` with its defaults on the built-in digits for `--digits_steps` updates,
   stopped half-way with a checkpoint, resumed to the end (the resumed run must continue the loss record exactly
   where it stopped), exported, then sampled on the device (DDIM, 50 steps) and evaluated (digits Fréchet distance).
2. `folder-ours` and `folder-diffusers`: a generated 64x64 RGB image folder, diffusers' default DDPM UNet (113.7 M
   parameters), batch 64, bf16, 300 updates, with our script's defaults and with diffusers' training loop re-created
   in `benchmarks/bench_utils.py` (from diffusers' `train_unconditional.py` 0.42.x, not that script; the output says
   so) side by side: images/s, peak GPU memory, the loss at updates 50 and 300 (means of the 10 updates ending
   there), and the ratio ours / diffusers of the loss at 300.
3. `sampling`: the shipped pipelines (`training/pretrained/digits-ddpm`, `digits-cfg`) on the device in float32,
   float16 and bfloat16, DDIM-50, batch 256: seconds, finite.

`--quick` shrinks every size (a 32x32 folder (the UNet halves 5 times), a narrow UNet of the same architecture, a few updates, 2 samples);
with `--device cpu` the subprocesses see no GPU.
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SECTIONS = ("digits", "folder-ours", "folder-diffusers", "sampling")
# What `folder-diffusers` runs, printed first and written into the report: not diffusers' script, its loop re-created.
DIFFUSERS_SIDE = (
    "folder-diffusers = diffusers' training loop re-created in benchmarks/bench_utils.py (`diffusers_loop`), from "
    "diffusers' examples/unconditional_image_generation/train_unconditional.py 0.42.x; not that script itself"
)


def sizes(quick: bool, device: str) -> dict:
    if quick:
        return dict(
            digits_steps=4, samples=8, sample_steps=5, resolution=32, images=32, batch=4, steps=6, precision="no"
        )
    from bench_utils import FOLDER_RUN

    return dict(
        digits_steps=300, samples=512, sample_steps=50, **FOLDER_RUN, precision="bf16" if device == "cuda" else "no"
    )


# ----------------------------------------------------------------------------------------------------------------
# The sections (run in a child process)
# ----------------------------------------------------------------------------------------------------------------
def section_digits(s: dict, work: str) -> dict:
    import torch

    from custom_pipelines import TutorialUnconditionalPipeline
    from schedulers import TutorialDDIMScheduler
    from training import train_unconditional as tu
    from training.metrics import digits_metrics
    from training.sampling import sample_sharded

    out = os.path.join(work, "digits")
    half = s["digits_steps"] // 2
    argv = ["--output_dir", out, "--max_train_steps", str(s["digits_steps"]), "--logger", "none"]
    argv += ["--checkpointing_steps", str(half), "--eval_batch_size", "16", "--ddpm_num_inference_steps", "10"]
    t0 = time.perf_counter()
    first = tu.main(argv, should_stop=lambda step: step == half)
    resumed = tu.main(argv + ["--resume_from_checkpoint", "latest"])
    train_seconds = time.perf_counter() - t0
    with open(os.path.join(out, "losses.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = TutorialUnconditionalPipeline.from_pretrained(out).to(device)
    scheduler = TutorialDDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    t0 = time.perf_counter()
    samples = sample_sharded(pipe.unet.eval(), scheduler, s["samples"], s["sample_steps"], seed=0)
    sample_seconds = time.perf_counter() - t0
    metrics = digits_metrics(samples)
    return {
        "updates": resumed["global_step"],
        "stopped_at": first["global_step"],
        "resume_continued_exactly": steps == list(range(1, s["digits_steps"] + 1)),
        "train_seconds_incl_startup": train_seconds,
        "sample_seconds": sample_seconds,
        "frechet_distance": metrics["frechet_distance"],
        "samples": s["samples"],
        "device": device,
    }


def section_folder(s: dict, work: str, quick: bool, which: str) -> dict:
    from bench_utils import diffusers_loop, folder_run_inputs, ours_loop, window_mean

    folder, config, path = folder_run_inputs(s, work, quick)
    if which == "ours":
        extra = ["--mixed_precision", s["precision"]]
        result = ours_loop(folder, path, s["steps"], s["batch"], extra, os.path.join(work, "ours"))
    else:
        result = diffusers_loop(folder, config, s["steps"], s["batch"], s["precision"])
    losses = result.pop("losses")
    marks = sorted({min(50, s["steps"]), s["steps"]})
    result.update({f"loss_at_{m}": window_mean(losses, m) for m in marks})
    result["parameters_m"] = _parameters(config) / 1e6
    return result


def _parameters(config: dict) -> int:
    from diffusers import UNet2DModel

    return sum(
        p.numel() for p in UNet2DModel.from_config({k: v for k, v in config.items() if k[0] != "_"}).parameters()
    )


def section_sampling(s: dict) -> dict:
    import torch

    from custom_pipelines import TutorialClassConditionalPipeline, TutorialUnconditionalPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, steps = (2, 3) if s["samples"] <= 8 else (256, 50)
    rows = {}
    for name, cls in (
        ("digits-ddpm", TutorialUnconditionalPipeline),
        ("digits-cfg", TutorialClassConditionalPipeline),
    ):
        for dtype in ("float32", "float16", "bfloat16"):
            pipe = cls.from_pretrained(
                os.path.join(ROOT, "training", "pretrained", name), torch_dtype=getattr(torch, dtype)
            )
            pipe = pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            kwargs = {"class_labels": list(range(batch))} if name == "digits-cfg" else {"batch_size": batch}
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            images = pipe(num_inference_steps=steps, output_type="pt", generator=torch.manual_seed(0), **kwargs).images
            if device == "cuda":
                torch.cuda.synchronize()
            rows[f"{name} {dtype}"] = {
                "seconds": time.perf_counter() - t0,
                "finite": bool(torch.isfinite(images).all()),
                "batch": batch,
                "steps": steps,
            }
    return rows


def child(section: str, quick: bool, device: str) -> None:
    s = sizes(quick, device)
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{section}-") as work:
        if section == "digits":
            result = section_digits(s, work)
        elif section == "sampling":
            result = section_sampling(s)
        else:
            result = section_folder(s, work, quick, section.split("-")[1])
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per section, then the table
# ----------------------------------------------------------------------------------------------------------------
def run_section(section: str, quick: bool, device: str) -> dict:
    from bench_utils import run_child

    argv = ["--child", section, "--device", device] + (["--quick"] if quick else [])
    return run_child(os.path.abspath(__file__), argv, device)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="Tiny sizes (the test suite runs --device cpu --quick).")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--output", default=None, help="Also write the results as JSON here.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.quick, args.device)

    report = {"device": args.device, "quick": args.quick, "sizes": sizes(args.quick, args.device)}
    if "folder-diffusers" in args.sections:
        report["diffusers_side"] = DIFFUSERS_SIDE
        print(DIFFUSERS_SIDE, flush=True)
    for section in args.sections:
        report[section] = run_section(section, args.quick, args.device)
        print(f"[{section}] done in {report[section]['seconds_total']:.0f} s", flush=True)
    ours, theirs = report.get("folder-ours", {}), report.get("folder-diffusers", {})
    last = f"loss_at_{report['sizes']['steps']}"
    if last in ours and last in theirs:
        report["loss_ratio_at_end"] = ours[last] / theirs[last]
        report["throughput_ratio"] = ours["images_per_s"] / theirs["images_per_s"]

    print("\n| section | measure | value |\n|---|---|---|")
    for section in args.sections:
        result = report[section]
        if "error" in result:
            print(f"| {section} | error | {result['error'].strip().splitlines()[-1]} |")
            continue
        for key, value in result.items():
            if isinstance(value, dict):
                print(f"| {section} | {key} | " + ", ".join(f"{k} {fmt(v)}" for k, v in value.items()) + " |")
            else:
                print(f"| {section} | {key} | {fmt(value)} |")
    for key in ("loss_ratio_at_end", "throughput_ratio"):
        if key in report:
            print(f"| folder | {key} (ours / diffusers) | {report[key]:.3f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    failed = [s for s in args.sections if "error" in report[s]]
    if failed:
        print(f"sections that failed: {failed}", file=sys.stderr)
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
