"""GPU throughput (issue #14): our training script and pipelines against diffusers', ratios in one run.

On a GPU machine, from the repository root (one H200 is expected to take about 7 minutes; record the tables it
prints in benchmarks/RESULTS.md with the date and the GPU). diffusers' script is not part of its wheel: take it from
the v0.42.1 tag, and install torchvision, which it imports.

    url=https://raw.githubusercontent.com/huggingface/diffusers/v0.42.1/examples/unconditional_image_generation
    curl -L -o diffusers_train_unconditional.py $url/train_unconditional.py
    pip install torchvision
    python benchmarks/bench_training_gpu.py --diffusers_script diffusers_train_unconditional.py \\
        --output bench_training_gpu.json

    python benchmarks/bench_training_gpu.py --device cpu --quick    # the same path, tiny, on the CPU (the test suite)

Sections (each row runs in its own subprocess: a fresh CUDA context and a clean peak-memory count):

1. `train`: a generated folder of 2,048 64x64 RGB images, diffusers' default DDPM UNet (113.7 M parameters), batch
   64, bf16, 300 updates. Rows: diffusers (its real `examples/unconditional_image_generation/train_unconditional.py`
   run as-is with the same settings when `--diffusers_script PATH` is given, which needs torchvision; else the loop
   re-created in `benchmarks/bench_utils.py`, and the output says which), ours with its GPU defaults (`auto`: data on
   the device, channels-last, fused AdamW, SDPA attention), ours with `--torch_compile`, and with `--ablations` ours
   with each switch turned off. Both sides use diffusers' defaults for this UNet (lr 1e-4, 500 warm-up updates).
   Reported: images/s after `--warmup_updates` (compilation and cuDNN autotuning excluded; the window holds no
   epoch-end sampling or saving of diffusers' script, whose first epoch ends earlier), the ratio ours / diffusers,
   model-FLOP utilisation (forward + backward FLOPs per image counted with `torch.utils.flop_counter` on the meta
   device, x images/s, over the GPU's dense bf16 peak from `PEAK_TFLOPS` (spec sheets) or `--peak_tflops`), peak
   memory, and the loss at update 300 (mean of updates 291-300) on both sides.
2. `sample`: DDIM-50, batch 1024, the shipped digits UNet (`training/pretrained/digits-ddpm`) and the 64x64 default
   UNet (random weights): ours (`TutorialUnconditionalPipeline` + `TutorialDDIMScheduler`) against diffusers'
   `DDIMPipeline` + `DDIMScheduler` with the same config, in float32, float16 and bfloat16 (where DDIMPipeline
   fails: it converts its output to numpy, which has no bfloat16), and ours after
   `enable_fast_inference(compile=True)` in float16 on the 64x64 UNet. Seconds of one call after a warm-up call, `output_type="np"`.

`--quick` shrinks every size (32x32, a narrow UNet of the same architecture, a few updates, batch 2, 3 steps) and
skips the compiled rows (compiling on a CPU takes minutes); with `--device cpu` the subprocesses see no GPU.
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

SECTIONS = ("train", "sample")
# Dense bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s, by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "RTX 4090": 165.2}
# Ours with its GPU defaults, then each switch of issue #14 turned off (`--ablations`).
OURS_ROWS = {
    "ours": [],
    "ours+compile": ["--torch_compile"],
}
ABLATION_ROWS = {
    "ours-no-data-on-device": ["--data_on_device", "no"],
    "ours-no-channels-last": ["--channels_last", "no"],
    "ours-no-fused-adam": ["--adam_fused", "no"],
}


def sizes(quick: bool, device: str) -> dict:
    if quick:
        return dict(
            resolution=32, images=16, batch=4, steps=6, warmup=2, sample_batch=2, sample_steps=3, precision="no"
        )
    from bench_utils import FOLDER_RUN

    return dict(
        FOLDER_RUN, warmup=50, sample_batch=1024, sample_steps=50, precision="bf16" if device == "cuda" else "no"
    )


# ----------------------------------------------------------------------------------------------------------------
# Training rows (each in a child process)
# ----------------------------------------------------------------------------------------------------------------
def flops_per_image(config: dict, resolution: int) -> float:
    """Forward + backward FLOPs of the UNet for one image, counted by `torch.utils.flop_counter` on `meta`."""
    import torch
    from diffusers import UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        x = torch.randn(2, config["in_channels"], resolution, resolution)
        t = torch.randint(0, 1000, (2,))
    with FlopCounterMode(display=False) as counter:
        unet(x, t).sample.float().pow(2).mean().backward()
    return counter.get_total_flops() / 2


def run_diffusers_script(script: str, folder: str, config_path: str, s: dict, output_dir: str) -> dict:
    """diffusers' `train_unconditional.py`, run as-is in this process, stopped after `s["steps"]` updates.

    Its per-update `accelerator.log({"loss": loss.item(), ...})` is wrapped to record the loss and the clock (the
    `.item()` has synchronised the device), then to stop the script by an exception at the last update.
    """
    import importlib.util
    import runpy

    import accelerate
    import diffusers.utils
    import torch

    class Done(Exception):
        pass

    class NoTracker:  # stands in for the tensorboard writer where tensorboard is not installed (GPU images)
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    if importlib.util.find_spec("tensorboard") is None:  # the script refuses to start without a tracker package
        diffusers.utils.is_tensorboard_available = lambda: True
        accelerate.Accelerator.get_tracker = lambda self, name, unwrap=False: NoTracker()

    losses, times, real_log = [], [], accelerate.Accelerator.log

    def log(self, values, step=None, log_kwargs={}):  # noqa: B006 (accelerate's signature)
        if "loss" in values:
            losses.append(float(values["loss"]))
            times.append(time.perf_counter())
            if len(losses) >= s["steps"]:
                raise Done
        return real_log(self, values, step=step, log_kwargs=log_kwargs)

    argv = ["--train_data_dir", folder, "--resolution", str(s["resolution"]), "--center_crop"]
    argv += ["--model_config_name_or_path", config_path]
    argv += ["--train_batch_size", str(s["batch"]), "--mixed_precision", s["precision"], "--output_dir", output_dir]
    argv += ["--num_epochs", "1000", "--save_images_epochs", "1000", "--save_model_epochs", "1000"]
    argv += ["--ddpm_num_inference_steps", "1", "--eval_batch_size", "1", "--logger", "tensorboard"]
    accelerate.Accelerator.log, real_argv, sys.argv = log, sys.argv, [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except Done:
        pass
    finally:
        accelerate.Accelerator.log, sys.argv = real_log, real_argv
    cuda = torch.cuda.is_available()
    return {
        "losses": losses,
        "marks": {s["warmup"]: times[s["warmup"] - 1], s["steps"]: times[-1]},
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": "cuda" if cuda else "cpu",
    }


def train_row(row: str, s: dict, quick: bool, diffusers_script) -> dict:
    from bench_utils import diffusers_loop, folder_run_inputs, ours_loop, steady_images_per_s, window_mean

    with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{row}-") as work:
        folder, config, path = folder_run_inputs(s, work, quick)
        out = os.path.join(work, "out")
        if row == "diffusers" and diffusers_script:
            result, source = run_diffusers_script(diffusers_script, folder, path, s, out), "diffusers' script"
        elif row == "diffusers":
            result = diffusers_loop(folder, config, s["steps"], s["batch"], s["precision"], warmup_updates=s["warmup"])
            source = "re-created loop (benchmarks/bench_utils.py)"
        else:
            extra = ["--mixed_precision", s["precision"], *{**OURS_ROWS, **ABLATION_ROWS}[row]]
            result = ours_loop(folder, path, s["steps"], s["batch"], extra, out, warmup_updates=s["warmup"])
            source = "training/train_unconditional.py " + " ".join(extra)
    losses = result.pop("losses")
    return {
        "source": source,
        "images_per_s": steady_images_per_s(result, s["batch"]),
        "loss_at_end": window_mean(losses, s["steps"]),
        "peak_memory_gb": result.get("peak_memory_gb"),
        "device": result["device"],
        "flops_per_image": flops_per_image(config, s["resolution"]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Sampling rows (one child process)
# ----------------------------------------------------------------------------------------------------------------
def _sampling_unets(quick: bool):
    import torch
    from bench_utils import DIFFUSERS_DDPM_UNET, TINY_DDPM_UNET, unet_config
    from diffusers import UNet2DModel

    digits = os.path.join(ROOT, "training", "pretrained", "digits-ddpm")
    torch.manual_seed(0)
    size = 32 if quick else 64
    arch = TINY_DDPM_UNET if quick else DIFFUSERS_DDPM_UNET
    default = UNet2DModel.from_config(unet_config(arch, size))
    return {"digits": UNet2DModel.from_pretrained(digits, subfolder="unet"), f"default-{size}": default}


def _seconds(pipe, batch: int, steps: int, device: str) -> float:
    """Seconds of one call (after a warm-up call with the same batch: allocation, cuDNN autotuning, compilation)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=batch, num_inference_steps=min(steps, 2), output_type="np", generator=torch.manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe(batch_size=batch, num_inference_steps=steps, output_type="np", generator=torch.manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def sample_rows(s: dict, quick: bool) -> dict:
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler

    from custom_pipelines import TutorialUnconditionalPipeline
    from schedulers import TutorialDDIMScheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = TutorialDDIMScheduler.load_config(
        os.path.join(ROOT, "training", "pretrained", "digits-ddpm", "scheduler")
    )
    rows = {}
    for name, unet in _sampling_unets(quick).items():
        for dtype in ("float32", "float16", "bfloat16"):
            model = unet.to(device=device, dtype=getattr(torch, dtype)).eval()
            ours = TutorialUnconditionalPipeline(unet=model, scheduler=TutorialDDIMScheduler.from_config(config))
            theirs = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(config))
            t_ours = _seconds(ours, s["sample_batch"], s["sample_steps"], device)
            try:
                t_theirs = _seconds(theirs, s["sample_batch"], s["sample_steps"], device)
            except TypeError as err:  # DDIMPipeline returns numpy arrays, and numpy has no bfloat16
                t_theirs, rows["diffusers_failures"] = None, {**rows.get("diffusers_failures", {}), dtype: str(err)}
            rows[f"{name} {dtype}"] = {"ours_s": t_ours, "diffusers_s": t_theirs}
        if not quick and name != "digits":  # compiled in place (float16: DDIMPipeline cannot return bfloat16 images)
            model = unet.to(device=device, dtype=torch.float16).eval()
            ours = TutorialUnconditionalPipeline(unet=model, scheduler=TutorialDDIMScheduler.from_config(config))
            ours.enable_fast_inference(compile=True)
            t_ours = _seconds(ours, s["sample_batch"], s["sample_steps"], device)
            rows[f"{name} float16 compiled"] = {
                "ours_s": t_ours,
                "diffusers_s": rows[f"{name} float16"]["diffusers_s"],
            }
    return {"rows": rows, "device": device, "batch": s["sample_batch"], "steps": s["sample_steps"]}


# ----------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per row, then the tables
# ----------------------------------------------------------------------------------------------------------------
def child(row: str, quick: bool, device: str, diffusers_script) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", str(torch.get_num_threads()))))
    s = sizes(quick, device)
    result = sample_rows(s, quick) if row == "sample" else train_row(row, s, quick, diffusers_script)
    print("RESULT " + json.dumps(result))


def run_row(row: str, args) -> dict:
    from bench_utils import run_child

    argv = ["--child", row, "--device", args.device]
    argv += ["--quick"] if args.quick else []
    argv += ["--diffusers_script", args.diffusers_script] if args.diffusers_script else []
    return run_child(os.path.abspath(__file__), argv, args.device)


def peak_tflops(device: str, given) -> tuple:
    """(peak TFLOP/s, where it comes from) for MFU: `--peak_tflops`, else `PEAK_TFLOPS` by the GPU's name."""
    if given:
        return given, "--peak_tflops"
    if device != "cuda":
        return None, "no peak for a CPU: pass --peak_tflops"
    import torch

    name = torch.cuda.get_device_name()
    match = next((k for k in PEAK_TFLOPS if k in name), None)
    return (PEAK_TFLOPS[match], f"{name}: dense bf16 spec sheet") if match else (None, f"{name}: unknown peak")


def print_train_table(report: dict, rows: list, peak) -> None:
    base = report["train"].get("diffusers", {})
    print("\n| train row | images/s | ours / diffusers | MFU | peak GB | loss at end |\n|---|---|---|---|---|---|")
    for row in rows:
        r = report["train"][row]
        if "error" in r:
            print(f"| {row} | error: {r['error'].strip().splitlines()[-1]} | | | | |")
            continue
        ratio = r["images_per_s"] / base["images_per_s"] if "images_per_s" in base else None
        r["ratio"] = ratio
        r["mfu"] = r["images_per_s"] * r["flops_per_image"] / (peak * 1e12) if peak else None
        cells = [f"{r['images_per_s']:.1f}", f"{ratio:.2f}" if ratio else "-"]
        cells += [f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"]
        cells += [f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] else "-", f"{r['loss_at_end']:.4f}"]
        print(f"| {row} | " + " | ".join(cells) + " |")
    for row in rows:
        print(f"  {row}: {report['train'][row].get('source', '')}")
    flops = next((r["flops_per_image"] for r in report["train"].values() if "flops_per_image" in r), None)
    if flops:
        print(f"FLOPs per image, forward + backward (torch.utils.flop_counter): {flops / 1e9:.2f} GFLOP")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="Tiny sizes (the test suite runs --device cpu --quick).")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--ablations", action="store_true", help="Also ours with each throughput switch off.")
    p.add_argument(
        "--diffusers_script",
        default=None,
        help="diffusers' examples/unconditional_image_generation/train_unconditional.py (needs torchvision); "
        "without it, the re-created loop of benchmarks/bench_utils.py stands in.",
    )
    p.add_argument("--peak_tflops", type=float, default=None, help="The device's peak TFLOP/s for MFU.")
    p.add_argument("--output", default=None, help="Also write the results as JSON here.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.quick, args.device, args.diffusers_script)

    report = {"device": args.device, "quick": args.quick, "sizes": sizes(args.quick, args.device), "train": {}}
    report["diffusers_source"] = args.diffusers_script or "re-created loop (benchmarks/bench_utils.py)"
    print(f"diffusers side: {report['diffusers_source']}", flush=True)
    rows = []
    if "train" in args.sections:
        rows = ["diffusers", "ours"] + ([] if args.quick else ["ours+compile"])
        rows += list(ABLATION_ROWS) if args.ablations else []
        for row in rows:
            report["train"][row] = run_row(row, args)
            print(f"[train {row}] done in {report['train'][row]['seconds_total']:.0f} s", flush=True)
    if "sample" in args.sections:
        report["sample"] = run_row("sample", args)
        print(f"[sample] done in {report['sample']['seconds_total']:.0f} s", flush=True)

    peak, peak_source = peak_tflops(args.device, args.peak_tflops)
    report["peak_tflops"], report["peak_source"] = peak, peak_source
    if rows:
        print_train_table(report, rows, peak)
        print(f"MFU peak: {peak} TFLOP/s ({peak_source}); diffusers side: {report['diffusers_source']}")
    sample = report.get("sample", {})
    if "rows" in sample:
        print(f"\n| sample ({sample['batch']} x DDIM-{sample['steps']}) | ours s | diffusers s | ours / diffusers |")
        print("|---|---|---|---|")
        for name, r in sample["rows"].items():
            if name == "diffusers_failures":
                continue
            theirs = r["diffusers_s"]
            cells = [f"{theirs:.3f}", f"{r['ours_s'] / theirs:.2f}"] if theirs else ["fails", "-"]
            print(f"| {name} | {r['ours_s']:.3f} | " + " | ".join(cells) + " |")
        for dtype, err in sample["rows"].get("diffusers_failures", {}).items():
            print(f"  diffusers' DDIMPipeline in {dtype}: {err}")
    elif "error" in sample:
        print(f"sample: error: {sample['error'].strip().splitlines()[-1]}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    failed = [r for r in rows if "error" in report["train"][r]] + (["sample"] if "error" in sample else [])
    if failed:
        print(f"rows that failed: {failed}", file=sys.stderr)
        for r in failed:
            print((report["train"].get(r) or sample)["error"][-2000:], file=sys.stderr)
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
