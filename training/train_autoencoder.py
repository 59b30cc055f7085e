"""Train the autoencoder of latent diffusion (a diffusers `AutoencoderKL`), step 1 of a latent diffusion model.

    accelerate launch training/train_autoencoder.py       # built-in digits, 32x32 -> 8x8x4 latents
    accelerate launch training/train_autoencoder.py --train_data_dir imgs --resolution 64 --num_channels 3 \\
        --downsample_factor 8 --block_out_channels 64,128,256,256 --output_dir outputs/my-vae

The story is `train_unconditional.py`'s, run unchanged (settings and data flags, the output folder and its lock,
atomic checkpoints and exact resume, SIGTERM and Ctrl-C, gloo, the loss log): this file adds the autoencoder's flags
and an `AutoencoderObjective`, the seam through which the story asks what to build, what loss to take and what to
leave behind. The autoencoder's pieces (its config, the loss, the latent statistics) are in `training/autoencoder.py`.

The objective is LDM's first stage (Rombach et al. 2022, arXiv:2112.10752, Sec. 3 and Appendix G) without its
perceptual (LPIPS) and adversarial terms: LPIPS needs VGG weights downloaded, and a patch discriminator is a second
training problem this first version leaves out. What remains is a reconstruction (`--reconstruction_loss` l1 or l2)
plus a small KL pull of q(z | x) towards N(0, I) (`--kl_weight`, LDM's 1e-6): small, so that the latents keep the
image's detail, and non-zero, so that their scale stays bounded.

What a run leaves in `--output_dir`: the `AutoencoderKL` itself at the root (config.json and the safetensors
weights, the EMA weights when `--use_ema`), so that `AutoencoderKL.from_pretrained(output_dir)` and
`train_unconditional.py --vae output_dir` (which also takes a pipeline folder with the VAE in `vae/`) read it;
`metrics.json`, a model card (README.md) that names the command, and `grids/final.png` (held-out images above their
reconstructions); `--push_to_hub` uploads the model, its card, the final metrics and the grid. Two measurements end
the run:

- `scaling_factor`: the training images (up to `--scaling_samples`) are encoded, a posterior sample z = μ + σ ε
  drawn for each (what a latent diffusion model is trained on), and the standard deviation of all their values
  measured; `scaling_factor = 1 / std` is written into the saved config, so that `scaling_factor * z` has unit
  variance, the scale the diffusion model's noise schedule assumes (Rombach et al., Sec. G; Stable Diffusion's
  0.18215). The log says so, with the value.
- reconstruction PSNR of D(μ(x)) on held-out data: the test split of the built-in digits; other data has no held-out
  split here, so the PSNR is that of the encoded training images, and is named so (`psnr_split`).
"""

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script (`accelerate launch training/train_autoencoder.py`)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import train_unconditional as story
from training.autoencoder import (
    DOWNSAMPLE_FACTORS,
    RECONSTRUCTION_LOSSES,
    TrainingAutoencoderKL,
    autoencoder_config,
    autoencoder_loss,
    combine_statistics,
    export_autoencoder,
    latent_statistics,
    reconstruct,
)
from training.export import ema_weights
from training.settings import RUN_DEFINING_FLAGS, Settings, build_parser, resolve_settings
from training.super_resolution import held_out, psnr

logger = logging.getLogger("train_unconditional")

DESCRIPTION = "Train a KL autoencoder (diffusers' AutoencoderKL) for latent diffusion; measure its scaling_factor."
NEVER = 10**9  # --save_images_epochs / --save_model_epochs: the story's per-epoch hooks sample a UNet; not here
# What --push_to_hub uploads: the model, its card and numbers (not checkpoints, logs or the loss record).
UPLOADED = ("config.json", "diffusion_pytorch_model.safetensors", "README.md", "metrics.json", "grids/final.png")
MAX_PSNR_TRAIN_IMAGES = 512  # off the digits: the PSNR is measured on at most this many encoded training images

# A resume with any of these changed is refused (besides the training script's own run-defining flags).
AUTOENCODER_DEFINING_FLAGS = (
    "latent_channels",
    "downsample_factor",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "kl_weight",
    "reconstruction_loss",
)
# Training flags that mean nothing here: refused when given, so that no one believes they acted.
NOT_FOR_AUTOENCODER = (
    "vae",
    "model_config_name_or_path",
    "num_class_embeds",
    "eval_every_steps",
    "snr_gamma",
    "sr_factor",
    "sr_noise_level_max",
    "sr_noise_level",
)


# ----------------------------------------------------------------------------------------------------------------
# Flags: the training script's parser, our flags added, the autoencoder's defaults
# ----------------------------------------------------------------------------------------------------------------
def build_autoencoder_parser() -> argparse.ArgumentParser:
    p = build_parser(DESCRIPTION)
    g = p.add_argument_group("autoencoder")
    g.add_argument("--latent_channels", type=int, default=4, help="Channels of the latent z (4, as Stable Diffusion).")
    g.add_argument(
        "--downsample_factor",
        type=int,
        default=4,
        choices=DOWNSAMPLE_FACTORS,
        help="f, the latent is (resolution / f) on a side: log2(f) + 1 encoder and decoder blocks.",
    )
    g.add_argument(
        "--block_out_channels",
        type=str,
        default=None,
        help="Channels of each block, comma-separated, one per block (log2(f) + 1 of them); default the first of "
        "16,32,64,64.",
    )
    g.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per encoder block (decoder: +1).")
    g.add_argument(
        "--norm_num_groups", type=int, default=8, help="GroupNorm groups; must divide every --block_out_channels."
    )
    g.add_argument(
        "--kl_weight",
        type=float,
        default=1e-6,
        help="Weight of KL(q(z | x) || N(0, I)) against the reconstruction summed over pixels (LDM's 1e-6).",
    )
    g.add_argument("--reconstruction_loss", type=str, default="l1", choices=RECONSTRUCTION_LOSSES)
    g.add_argument(
        "--scaling_samples",
        type=int,
        default=4096,
        help="At the end, encode up to this many training images (whole batches) to measure the latents' std.",
    )
    # The autoencoder's defaults: 32x32 digits (8x8x4 latents) and the learning rate of the shipped digits-vae.
    p.set_defaults(
        output_dir="outputs/digits-vae",
        resolution=32,
        learning_rate=2e-3,
        lr_warmup_steps=50,
        ema_max_decay=0.999,
    )
    return p


def parse_block_out_channels(text: Optional[str], blocks: int, groups: int) -> Optional[tuple]:
    """`--block_out_channels` as a tuple of `blocks` ints, each a multiple of `groups`; None when not given."""
    if text is None:
        return None
    try:
        widths = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--block_out_channels={text!r} must be comma-separated integers, e.g. '32,64,64'.") from None
    if len(widths) != blocks or any(w < 1 or w % groups for w in widths):
        raise ValueError(
            f"--block_out_channels={text!r} must list {blocks} positive multiples of --norm_num_groups={groups} "
            f"(one per block: log2(--downsample_factor) + 1)."
        )
    return widths


def check_autoencoder_args(args: argparse.Namespace) -> None:
    """Validate the autoencoder's flags at the door (every message names the flag, its value and what is allowed)."""
    given = [name for name in NOT_FOR_AUTOENCODER if getattr(args, name) is not None]
    if given:
        raise ValueError(f"--{given[0]}={getattr(args, given[0])!r} does not apply to the autoencoder ({DESCRIPTION})")
    if args.conditioning != "none":
        raise ValueError(f"--conditioning={args.conditioning!r} does not apply to the autoencoder; leave it 'none'.")
    if args.noise_offset:
        raise ValueError(f"--noise_offset={args.noise_offset!r} does not apply to the autoencoder; leave it 0.")
    for name in ("latent_channels", "layers_per_block", "norm_num_groups", "scaling_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)!r} must be >= 1.")
    if not (math.isfinite(args.kl_weight) and args.kl_weight >= 0):
        raise ValueError(f"--kl_weight={args.kl_weight!r} must be a finite number >= 0.")
    f = args.downsample_factor
    if args.resolution % f:
        lower, upper = args.resolution // f * f, (args.resolution // f + 1) * f
        choices = f"{lower} or {upper}" if lower else str(upper)
        raise ValueError(
            f"--resolution={args.resolution} must be a multiple of --downsample_factor={f}; e.g. {choices}."
        )
    blocks = int(math.log2(f)) + 1
    widths = parse_block_out_channels(args.block_out_channels, blocks, args.norm_num_groups)
    default_widths = autoencoder_config(args.resolution, 1, 1, f)["block_out_channels"]
    bad = [w for w in widths or default_widths if w % args.norm_num_groups]
    if bad:
        raise ValueError(
            f"--norm_num_groups={args.norm_num_groups} must divide every block's channels "
            f"({','.join(map(str, widths or default_widths))})."
        )


def parse_autoencoder_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return story.parse_args(argv, parser=build_autoencoder_parser(), check=check_autoencoder_args)


# ----------------------------------------------------------------------------------------------------------------
# The objective: what the story trains
# ----------------------------------------------------------------------------------------------------------------
class AutoencoderObjective(story.DiffusionObjective):
    """An `AutoencoderKL` from the flags, LDM's reconstruction + KL loss, and the measured `scaling_factor`."""

    tracker_name = "train_autoencoder"
    run_defining_flags = RUN_DEFINING_FLAGS + AUTOENCODER_DEFINING_FLAGS

    def __init__(self, argv: Optional[List[str]] = None):
        self.argv = sys.argv[1:] if argv is None else list(argv)  # for the model card's command line

    def resolve_settings(self, args: argparse.Namespace) -> Settings:
        """The training script's resolution, then the autoencoder's config (read once) and the per-epoch hooks off."""
        base = resolve_settings(args)
        blocks = int(math.log2(args.downsample_factor)) + 1
        vae_config = autoencoder_config(
            args.resolution,
            base.num_channels,
            args.latent_channels,
            args.downsample_factor,
            parse_block_out_channels(args.block_out_channels, blocks, args.norm_num_groups),
            args.layers_per_block,
            args.norm_num_groups,
        )
        return Settings(
            **{
                **vars(base),
                "vae_config": vae_config,
                "preset": "autoencoder",
                "save_images_epochs": NEVER,
                "save_model_epochs": NEVER,
            }
        )

    def build_model(self, settings: Settings) -> TrainingAutoencoderKL:
        return TrainingAutoencoderKL(**settings.vae_config)

    def loss(self, run, batch: Dict, g: Optional[torch.Generator]) -> torch.Tensor:
        s = run.settings
        return autoencoder_loss(run.model, batch["images"], g, s.reconstruction_loss, s.kl_weight)

    # -- what the run leaves ----------------------------------------------------------------------------------------
    def latent_scale(self, run, vae) -> Dict:
        """Encode up to `--scaling_samples` training images (whole batches in epoch 0's order, or a stream's next
        ones; every process its share) and measure their latents; returns `combine_statistics` with the number of
        images, and the images kept for an off-digits PSNR."""
        settings, accelerator = run.settings, run.accelerator
        global_batch = settings.train_batch_size * accelerator.num_processes
        num_batches = max(1, settings.scaling_samples // global_batch)
        if not settings.streaming:
            num_batches = min(num_batches, len(run.batches))
        kept = []

        def images():
            for batch in itertools.islice(run.batches.epoch(0), num_batches):
                if sum(len(k) for k in kept) < MAX_PSNR_TRAIN_IMAGES:
                    kept.append(batch["images"])
                yield batch["images"]

        sums = latent_statistics(vae, images(), seed=settings.seed * 1_000_003 + accelerator.process_index)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        stats = combine_statistics(sums)
        config = vae.config
        per_image = config.latent_channels * (settings.resolution // settings.downsample_factor) ** 2
        stats["num_images_encoded"] = stats["num_latent_values"] // per_image
        return stats, torch.cat(kept)[:MAX_PSNR_TRAIN_IMAGES]

    def card_text(self, final: Dict) -> str:
        s, c = self.settings, self.settings.vae_config
        side = s.resolution // s.downsample_factor
        return "\n".join(
            [
                "---",
                "library_name: diffusers",
                "tags:",
                "- autoencoder-kl",
                "- latent-diffusion",
                "- diffusion-tutorial",
                "---",
                "",
                "# AutoencoderKL (latent diffusion, step 1)",
                "",
                f"A KL autoencoder for {s.num_channels}-channel images at {s.resolution}x{s.resolution}: latents of "
                f"{c['latent_channels']}x{side}x{side} (downsampling {s.downsample_factor}), block channels "
                f"{list(c['block_out_channels'])}, {c['layers_per_block']} ResNet layer(s) per block.",
                "",
                "```python",
                "from diffusers import AutoencoderKL",
                "vae = AutoencoderKL.from_pretrained(folder)",
                "z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor   # x in [-1, 1]",
                "x_hat = vae.decode(z / vae.config.scaling_factor).sample",
                "```",
                "",
                "## Training",
                "",
                "Trained with the diffusion-tutorial project's script:",
                "",
                "```bash",
                ("accelerate launch training/train_autoencoder.py " + " ".join(self.argv)).strip(),
                "```",
                "",
                f"Loss: {s.reconstruction_loss} reconstruction + {s.kl_weight:g} x KL(q(z|x) || N(0, I)) (LDM's "
                f"first stage without the perceptual and adversarial terms); {final['step']} updates of "
                f"{s.train_batch_size} images, learning rate {s.learning_rate:g}, EMA max decay {s.ema_max_decay:g} "
                f"({'EMA weights' if s.use_ema else 'no EMA'} saved), mixed precision `{s.mixed_precision}`.",
                "",
                "## scaling_factor",
                "",
                f"`scaling_factor = 1 / std = {final['scaling_factor']:.6g}`: the standard deviation "
                f"{final['latent_std']:.6g} of {final['num_latent_values']} latent values, posterior samples "
                f"z = mu + sigma * eps (`latent_dist.sample()`) of {final['num_images_encoded']} training images "
                f"(mean {final['latent_mean']:.4g}; the std of the mode alone is {final['latent_std_of_mode']:.6g}). "
                "Multiplying by it gives the latents unit variance, the scale a diffusion model's noise schedule "
                "assumes.",
                "",
                "## Metrics",
                "",
                f"- reconstruction PSNR of D(mu(x)) on {final['psnr_split']}: {final['psnr']:.2f} dB",
            ]
        )

    @torch.no_grad()
    def finish(self, run, writer, argv) -> Dict:
        """With the EMA weights: measure the latents' std on the training data, write `scaling_factor = 1 / std`,
        measure the held-out PSNR, save the `AutoencoderKL` with its model card; returns the metrics."""
        from training.grids import save_grid

        settings, accelerator = run.settings, run.accelerator
        self.settings = settings
        vae = run.unwrapped
        vae.eval()
        final = {"step": run.state.global_step}
        with ema_weights(vae, run.ema):
            stats, train_images = self.latent_scale(run, vae)
            scaling_factor = 1.0 / stats["latent_std"]
            final.update(stats, scaling_factor=scaling_factor)
            if not accelerator.is_main_process:
                return final
            original, _ = held_out(settings, 10**9)
            if original is None:  # no held-out split off the digits
                original = train_images
                split = f"{len(original)} training images (no held-out split off the digits)"
            else:
                split = f"the digits test split ({len(original)} held-out images)"
            original = original.to(accelerator.device)
            restored = reconstruct(vae, original)
            final.update(psnr=psnr(restored, original), psnr_split=split)
            export = export_autoencoder(vae, scaling_factor)
        logger.info(
            "scaling_factor = 1 / std = 1 / %.5f = %.5f, written into %s (the std of %d latent values: posterior "
            "samples of %d training images)",
            stats["latent_std"],
            scaling_factor,
            os.path.join(settings.output_dir, "config.json"),
            stats["num_latent_values"],
            stats["num_images_encoded"],
        )
        logger.info("reconstruction PSNR on %s: %.2f dB", split, final["psnr"])
        if writer is not None:
            writer.add_scalar("final/psnr", final["psnr"], run.state.global_step)
        pairs = torch.cat([original[:16], restored[:16]]).cpu()
        save_grid(pairs, os.path.join(settings.output_dir, "grids", "final.png"), nrow=min(16, len(original)), scale=4)
        export.save_pretrained(settings.output_dir)
        with open(os.path.join(settings.output_dir, "README.md"), "w") as f:
            f.write(self.card_text(final) + "\n")
        if settings.push_to_hub:
            logger.info("pushing the autoencoder folder to the Hub")
            push_autoencoder(settings, final)
        return final


def push_autoencoder(settings: Settings, final: Dict) -> str:
    """Upload `UPLOADED` of the output folder to `--hub_model_id` (default: the folder's name); returns the repo id.

    `metrics.json` is written by the story after `finish`: the uploaded copy holds the final metrics alone.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=settings.hub_token)
    repo_id = settings.hub_model_id or os.path.basename(os.path.normpath(settings.output_dir))
    repo_id = api.create_repo(repo_id, private=settings.hub_private_repo or None, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as staging:
        for name in UPLOADED:
            source = os.path.join(settings.output_dir, name)
            if name == "metrics.json":
                with open(os.path.join(staging, name), "w") as f:
                    json.dump({"final": final}, f, indent=2)
            elif os.path.exists(source):
                os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
                shutil.copyfile(source, os.path.join(staging, name))
        api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message="Upload AutoencoderKL")
    return repo_id


def main(argv: Optional[List[str]] = None, should_stop=lambda step: False) -> Dict:
    """Parse `argv` and train the autoencoder; SIGTERM or Ctrl-C saves a checkpoint (the training script's `main`)."""
    return story.main(argv, should_stop, parse=parse_autoencoder_args, objective=AutoencoderObjective(argv))


if __name__ == "__main__":
    story.run_cli("train_autoencoder.py", main)
