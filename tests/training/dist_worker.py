"""Run by `accelerate launch` in test_distributed.py and test_multinode.py: trains, then dumps what each rank holds.

Seams (no change to the script): `save_pipeline` is wrapped (it runs on every rank at the end) to dump the weights,
the EMA, sharded vs serial validation samples and where the rank sits (process index, local index, machine rank);
`diffusion_loss` to record the images of each micro-batch the rank trained on; `open` to record which files each
rank wrote. The dump goes to `$DIST_DUMP/rank<process_index>.pt`.
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
    seen.append(batch["images"].flatten(1).cpu().clone())  # (batch, pixels): the test finds each image's index
    return real_loss(model, noise_scheduler, batch, *args, **kwargs)


def dumping_save_pipeline(accelerator, model, ema, args, samples, card_text, vae=None):
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
            "process_index": accelerator.process_index,
            "local_process_index": accelerator.local_process_index,
            "is_main_process": accelerator.is_main_process,
            "machine_rank": int(os.environ.get("GROUP_RANK", "0")),  # torchrun's node rank (--machine_rank)
        },
        os.path.join(DUMP, f"rank{accelerator.process_index}.pt"),
    )
    return real_save_pipeline(accelerator, model, ema, args, samples, card_text)


builtins.open = recording_open
tu.diffusion_loss = recording_loss
tu.save_pipeline = dumping_save_pipeline
tu.main(sys.argv[1:])
