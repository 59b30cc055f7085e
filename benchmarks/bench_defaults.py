"""Do the training script's defaults learn on a user's model and data? Ours vs diffusers' loop (re-created), on a CPU.

    python benchmarks/bench_defaults.py            # 32x32 RGB folder, mid-size UNet (3.0 M), batch 16, 300 updates
    python benchmarks/bench_defaults.py --quick    # the same path, tiny (the test suite runs it)

`training/train_unconditional.py` picks its learning-rate defaults from the model: the built-in small UNet gets the
digits preset (lr 2e-3, 50 warm-up updates); a `--model_config_name_or_path` UNet whose widest block has W channels
gets width-scaled defaults (lr 1e-4 x 512 / W, 500 x W / 512 warm-up updates: diffusers' own values for its default
UNet, W = 512). Here W = 128: lr 4e-4, 125 warm-up updates. Three runs train the same UNet on the same generated
image folder (`bench_utils`):

- `ours`: our script with its defaults (only the data, the model config, the batch size and the steps given);
- `ours-small-preset`: our script with the small UNet's preset forced (`--learning_rate 2e-3 --lr_warmup_steps 50`),
  the defaults every model got before, for comparison;
- `diffusers`: diffusers' training loop with its defaults (lr 1e-4, 500 warm-up updates), re-created in
  `benchmarks/bench_utils.py` from diffusers' `train_unconditional.py` (0.42.x); the output says so.

It prints the loss (mean of the 10 updates ending there) at updates 50, 100, 200 and the last, the ratio ours /
diffusers, and whether ours got below `--target` (0.1). Each run is a subprocess on BENCH_THREADS torch threads.
"""

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

RUNS = ("ours", "ours-small-preset", "diffusers")
# What the `diffusers` run is, printed first and written into the report: not diffusers' script, its loop re-created.
DIFFUSERS_SIDE = (
    "diffusers = diffusers' training loop re-created in benchmarks/bench_utils.py (`diffusers_loop`), from diffusers' "
    "examples/unconditional_image_generation/train_unconditional.py 0.42.x; not that script itself"
)


def child(which: str, steps: int, batch: int, quick: bool) -> None:
    import torch
    from bench_utils import MID_UNET, TINY_DDPM_UNET, diffusers_loop, ours_loop, unet_config, write_shapes_folder

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    resolution = 32
    arch = TINY_DDPM_UNET if quick else {**MID_UNET, "block_out_channels": [32, 64, 64, 128]}
    with tempfile.TemporaryDirectory(prefix="bench-defaults-") as work:
        folder = write_shapes_folder(os.path.join(work, "images"), 16 if quick else 512, resolution)
        config = unet_config(arch, resolution)
        path = os.path.join(work, "unet.json")
        with open(path, "w") as f:
            json.dump(config, f)
        if which == "diffusers":
            result = diffusers_loop(folder, config, steps, batch, "no")
        else:
            extra = ["--mixed_precision", "no"]
            if which == "ours-small-preset":
                extra += ["--learning_rate", "2e-3", "--lr_warmup_steps", "50"]
            result = ours_loop(folder, path, steps, batch, extra, os.path.join(work, "out"))
    print("RESULT " + json.dumps(result))


def measure(which: str, steps: int, batch: int, quick: bool) -> dict:
    """One run in its own process, on the CPU."""
    from bench_utils import run_child

    argv = ["--child", which, "--steps", str(steps), "--batch", str(batch)] + (["--quick"] if quick else [])
    result = run_child(os.path.abspath(__file__), argv, device="cpu")
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def main(argv=None) -> dict:
    from bench_utils import window_mean

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--target", type=float, default=0.1, help="The loss ours must get below by the last update.")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.steps == 300:
        args.steps, args.batch = 4, 4
    if args.child:
        return child(args.child, args.steps, args.batch, args.quick)

    marks = sorted({m for m in (50, 100, 200, args.steps) if m <= args.steps})
    report = {"steps": args.steps, "batch": args.batch, "diffusers_side": DIFFUSERS_SIDE, "runs": {}}
    if "diffusers" in args.runs:
        print(DIFFUSERS_SIDE)
    print(f"| run | lr | {' | '.join(f'loss @ {m}' for m in marks)} | images/s |")
    print("|---|---|" + "---|" * len(marks) + "---|")
    for which in args.runs:
        result = measure(which, args.steps, args.batch, args.quick)
        result["loss_at"] = {m: window_mean(result["losses"], m) for m in marks}
        report["runs"][which] = result
        lr = result.get("learning_rate", 1e-4)
        cells = " | ".join(f"{result['loss_at'][m]:.4f}" for m in marks)
        print(f"| {which} | {lr:g} | {cells} | {result['images_per_s']:.1f} |", flush=True)
    runs = report["runs"]
    if "ours" in runs and "diffusers" in runs:
        report["loss_ratio_at_end"] = runs["ours"]["loss_at"][args.steps] / runs["diffusers"]["loss_at"][args.steps]
        print(f"loss at update {args.steps}, ours / diffusers: {report['loss_ratio_at_end']:.3f}")
    if "ours" in runs:
        report["ours_reached_target"] = runs["ours"]["loss_at"][args.steps] < args.target
        print(f"ours below {args.target} by update {args.steps}: {report['ours_reached_target']}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
