"""Run by `accelerate launch` in test_distributed.py: trains, then dumps what each rank holds for the test to compare.

Seams (no change to the script): `save_pipeline` is wrapped (it runs on every rank at the end) to dump the weights,
the EMA, and sharded vs serial validation samples; `diffusion_loss` to record which images each rank saw; `open`
to record which files each rank wrote.
"""

import builtins
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from training import train_unconditional as tu  # noqa: E402
from training.sampling import sample_sharded  # noqa: E402

DUMP = os.environ["DIST_DUMP"]
seen, written = [], []
real_open, real_loss, real_save_pipeline = builtins.open, tu.diffusion_loss, tu.save_pipeline


def recording_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        written.append(os.path.abspath(os.fspath(file)))
    return real_open(file, mode, *args, **kwargs)


def recording_loss(model, noise_scheduler, batch, *args, **kwargs):
    seen.append(batch["images"].flatten(1).sum(1).cpu())
    return real_loss(model, noise_scheduler, batch, *args, **kwargs)


def dumping_save_pipeline(accelerator, model, ema, args, samples, card_text):
    unet = accelerator.unwrap_model(model)
    with tu.ema_weights(unet, ema):
        sharded = tu.validation_samples(accelerator, unet, args, 10)  # every rank takes part
        serial = sample_sharded(
            unet, tu.make_scheduler(args, args.validation_scheduler), 10, args.ddpm_num_inference_steps, seed=args.seed
        )  # one process, all 10
    torch.save(
        {
            "weights": {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()},
            "ema": [p.detach().cpu().clone() for p in ema.shadow_params],
            "sharded": sharded,
            "serial": serial,
            "seen": seen,
            "written": list(written),
            "num_processes": accelerator.num_processes,
        },
        os.path.join(DUMP, f"rank{accelerator.process_index}.pt"),
    )
    return real_save_pipeline(accelerator, model, ema, args, samples, card_text)


builtins.open = recording_open
tu.diffusion_loss = recording_loss
tu.save_pipeline = dumping_save_pipeline
tu.main(sys.argv[1:])
