"""Sampling wall time of our pipelines against diffusers 0.42.1's DDIMPipeline and DDPMPipeline, in one run.

    python benchmarks/bench_pipelines.py [--steps 50] [--batch 4] [--size 32] [--repeats 5] [--skip-compile] [--quick]

Same small random UNet2DModel, same number of steps, output_type="np" for all. Timings interleave the cases and
report the minimum over `--repeats` rounds (the least disturbed run: the machine is shared). Reported per case:
- wall time and ratio = ours / diffusers (< 1: we are faster);
- overhead = time of the same pipeline with a zero-cost stand-in UNet / pipeline time: what the loop, the
  scheduler and the post-processing cost beyond the network (measured directly, so machine noise does not swamp
  it); also (pipeline time - time of the UNet calls alone) / pipeline time, the indirect estimate.
Then whether `channels_last` and `torch.compile` speed up the UNet on this machine.
"""

import argparse
import platform
import time
from types import SimpleNamespace

import diffusers
import torch
from bench_utils import SMALL_ATTN_UNET, unet_config
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from custom_pipelines import TutorialUnconditionalPipeline
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler


def make_unet(size: int) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel.from_config(unet_config(SMALL_ATTN_UNET, size)).eval()


class NullUNet(torch.nn.Module):
    """Stands in for the UNet at zero cost (same config, output 0): what remains is the pipeline's own time."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.config = unet.config
        self.register_buffer("anchor", torch.zeros(()))

    @property
    def dtype(self):
        return self.anchor.dtype

    @property
    def device(self):
        return self.anchor.device

    def forward(self, x, t, **kwargs):
        return SimpleNamespace(sample=torch.zeros_like(x))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def unet_alone(unet, batch, size, steps):
    """The floor: the same `steps` UNet calls on the same shapes, nothing else."""
    x = torch.randn(batch, 3, size, size)
    ts = torch.linspace(999, 0, steps).long()

    def run():
        with torch.no_grad():
            for t in ts:
                unet(x, t)

    return run


def pipeline_case(pipe, batch, steps, **kwargs):
    pipe.set_progress_bar_config(disable=True)

    def run():
        pipe(
            batch_size=batch,
            num_inference_steps=steps,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )

    return run


def best_times(cases, repeats):
    for run in cases.values():  # warm-up
        run()
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            samples[name].append(timed(run))
    return {name: min(v) for name, v in samples.items()}


def unet_settings(args) -> None:
    """channels_last and torch.compile on the UNet alone (the pipeline adds nothing to these): a table of speed-ups."""
    b, n = args.batch, args.steps
    unet = make_unet(args.size)
    print("\n| UNet setting | wall s for the UNet calls | speed-up |")
    print("|---|---|---|")
    variants = {"default (contiguous, eager)": unet}
    cl = make_unet(args.size).to(memory_format=torch.channels_last)
    variants["channels_last"] = cl
    if not args.skip_compile:
        try:
            compiled = torch.compile(make_unet(args.size))
            unet_alone(compiled, b, args.size, 2)()  # compile outside the timing
            variants["torch.compile"] = compiled
        except Exception as err:  # no compiler toolchain: report, do not fail
            print(f"| torch.compile | failed: {type(err).__name__}: {str(err)[:80]} | - |")
    runs = {name: unet_alone(m, b, args.size, n) for name, m in variants.items()}
    vt = best_times(runs, args.repeats)
    base = vt["default (contiguous, eager)"]
    for name, t in vt.items():
        print(f"| {name} | {t:.3f} | {base / t:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true", help="skip the torch.compile measurement")
    parser.add_argument(
        "--quick", action="store_true", help="a seconds-long smoke run (3 steps, batch 1, 16x16, no compile)"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.size, args.repeats, args.skip_compile = 3, 1, 16, 1, True
    torch.manual_seed(0)

    unet = make_unet(args.size)
    b, n = args.batch, args.steps
    ddim_cfg = dict(clip_sample=False)

    def pipeline_cases(model) -> dict:
        """Our pipeline with our and diffusers' schedulers, and diffusers' own pipelines, all around `model`."""
        return {
            "ours + TutorialDDIMScheduler": pipeline_case(
                TutorialUnconditionalPipeline(unet=model, scheduler=TutorialDDIMScheduler(**ddim_cfg)), b, n
            ),
            "ours + diffusers DDIMScheduler": pipeline_case(
                TutorialUnconditionalPipeline(unet=model, scheduler=DDIMScheduler(**ddim_cfg)), b, n
            ),
            "diffusers DDIMPipeline": pipeline_case(
                DDIMPipeline(unet=model, scheduler=DDIMScheduler(**ddim_cfg)), b, n
            ),
            "ours + TutorialDDPMScheduler": pipeline_case(
                TutorialUnconditionalPipeline(unet=model, scheduler=TutorialDDPMScheduler()), b, n
            ),
            "ours + diffusers DDPMScheduler": pipeline_case(
                TutorialUnconditionalPipeline(unet=model, scheduler=DDPMScheduler()), b, n
            ),
            "diffusers DDPMPipeline": pipeline_case(DDPMPipeline(unet=model, scheduler=DDPMScheduler()), b, n),
        }

    cases = {"UNet calls alone": unet_alone(unet, b, args.size, n), **pipeline_cases(unet)}
    loop_only = pipeline_cases(NullUNet(unet))
    times = best_times(cases, args.repeats)
    loop_times = best_times(loop_only, 3 * args.repeats)
    floor = times["UNet calls alone"]

    print(
        f"# Pipeline benchmark: torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"UNet2DModel {sum(p.numel() for p in unet.parameters()):,} params, batch {b} x 3 x {args.size} x "
        f"{args.size}, {n} steps, best of {args.repeats}\n"
    )
    print(
        "| case | wall s | pipeline alone s (null UNet) | overhead = alone / wall | (wall - UNet calls) / wall "
        "| wall ratio vs diffusers | pipeline-alone ratio vs diffusers |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, t in times.items():
        if name == "UNet calls alone":
            print(f"| {name} | {t:.3f} | - | - | - | - | - |")
            continue
        ref = "diffusers DDIMPipeline" if "DDIM" in name else "diffusers DDPMPipeline"
        alone = loop_times[name]
        ratio = f"{t / times[ref]:.3f} | {alone / loop_times[ref]:.3f}" if ref != name else "- | -"
        print(f"| {name} | {t:.3f} | {alone:.4f} | {100 * alone / t:.2f}% | {100 * (t - floor) / t:+.2f}% | {ratio} |")

    unet_settings(args)


if __name__ == "__main__":
    main()
