"""`make demo`: train on the built-in digits with the default settings, then compare samplers on the result.

    python training/demo.py                         # train (a few minutes on 2 CPUs), then sample and evaluate
    python training/demo.py --model training/pretrained/digits-ddpm   # skip training: use the shipped model

Writes to `--output_dir` (default `demo_output/`): the trained pipeline folder (`model/`), one sample grid per
sampler (DDPM with 1000 steps, DDIM with 50 and with 10 steps; the same initial noise x_T for all three),
`comparison.png` (the three grids side by side), and `metrics.json` (the digits metrics of each sampler and the
time it took).
"""

import argparse
import json
import logging
import os
import sys
import time

import torch
from PIL import Image, ImageDraw

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from training.grids import make_grid
from training.metrics import digits_metrics
from training.sampling import sample_sharded

SAMPLERS = (
    ("ddpm-1000", TutorialDDPMScheduler, 1000),
    ("ddim-50", TutorialDDIMScheduler, 50),
    ("ddim-10", TutorialDDIMScheduler, 10),
)

logger = logging.getLogger(__name__)


def comparison_image(grids, titles, scale: int = 3) -> Image.Image:
    """The grids side by side, enlarged `scale` times, each with its title above it."""
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST).convert("RGB") for g in grids]
    pad, title_h = 8, 18
    width = sum(g.width for g in grids) + pad * (len(grids) + 1)
    height = max(g.height for g in grids) + title_h + 2 * pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for grid, title in zip(grids, titles):
        draw.text((x, pad // 2), title, fill="black")
        canvas.paste(grid, (x, title_h + pad))
        x += grid.width + pad
    return canvas


def main(argv=None):
    """`make demo`: train (unless `--model`), then sample with each of `SAMPLERS`, evaluate and draw.

    Each phase is logged as it starts (`logging`, INFO), and each sampler's sampling shows a progress bar on stderr
    named after it (`"demo: ddpm-1000"`) that counts the denoising steps.

    Args:
        argv (`list[str]`, *optional*): the command line without the program name; defaults to `sys.argv[1:]`.

    Returns:
        `dict`: per sampler its `seconds` and `digits_metrics`, and `train_seconds` when it trained.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--model", default=None, help="A pipeline folder to sample from instead of training one.")
    p.add_argument("--num_samples", type=int, default=100, help="Samples per sampler (grids and metrics).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_args", default="", help="Extra flags for train_unconditional.py, as one string.")
    args = p.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    report = {}

    # 1. Train with the defaults (or take a given folder).
    model_dir = args.model
    if model_dir is None:
        from training import train_unconditional

        model_dir = os.path.join(args.output_dir, "model")
        logger.info("demo: training a model into %s", model_dir)
        tic = time.perf_counter()
        train_unconditional.main(["--output_dir", model_dir, "--overwrite_output_dir", *args.train_args.split()])
        report["train_seconds"] = time.perf_counter() - tic
        print(f"trained in {report['train_seconds']:.0f} s -> {model_dir}")

    # 2. Sample with each sampler from the same x_T (sample i always uses seed i), evaluate, draw.
    from custom_pipelines import TutorialUnconditionalPipeline

    pipe = TutorialUnconditionalPipeline.from_pretrained(model_dir)
    unet = pipe.unet.eval()
    grids, titles = [], []
    for name, scheduler_cls, steps in SAMPLERS:
        scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        logger.info("demo: sampling %d images with %s, %d steps", args.num_samples, scheduler_cls.__name__, steps)
        tic = time.perf_counter()
        samples = sample_sharded(unet, scheduler, args.num_samples, steps, seed=args.seed, desc=f"demo: {name}")
        seconds = time.perf_counter() - tic
        metrics = digits_metrics(samples)
        report[name] = {"seconds": seconds, **metrics}
        grid = make_grid(samples[:64])
        grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(
            os.path.join(args.output_dir, f"{name}.png")
        )
        grids.append(grid)
        titles.append(f"{name}: FD {metrics['frechet_distance']:.1f}")
        print(
            f"{name:10s} {seconds:6.1f} s  Fréchet distance {metrics['frechet_distance']:8.2f}  "
            f"coverage {metrics['class_coverage']:.1f}  confidence {metrics['mean_confidence']:.2f}"
        )

    # 3. The comparison image and the metrics.
    comparison_image(grids, titles).save(os.path.join(args.output_dir, "comparison.png"))
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output_dir}/comparison.png, {args.output_dir}/metrics.json")
    return report


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.set_grad_enabled(False)
    main()
