"""The training script's flags: parsed, validated at the door, and resolved once into frozen `Settings`.

Every flag of diffusers' `examples/unconditional_image_generation/train_unconditional.py` keeps its name and meaning.
`resolve_settings` turns the parsed flags into the one object the rest of the script reads: `auto` and the
model-dependent defaults (`PRESETS`) resolved, frozen, so that a value is followed down the call graph and never
written back.
"""

import argparse
import logging
import math
import os
from typing import Dict, List, Optional

from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers import tutorial_math as tm
from training.data import DATA_LOADINGS
from training.model import load_unet_config
from training.precision import MIXED_PRECISIONS, resolve_mixed_precision, uses_cpu

logger = logging.getLogger("train_unconditional")

DESCRIPTION = "Train a UNet2DModel denoiser with accelerate, and leave behind a self-contained pipeline folder."


SCHEDULERS = {"ddpm": TutorialDDPMScheduler, "ddim": TutorialDDIMScheduler}
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


# Defaults that depend on the model (`--learning_rate`, `--lr_warmup_steps`, `--ema_max_decay` left unset). One rate
# does not fit all: the digits preset (lr 2e-3) trains the built-in small UNet in minutes but left diffusers'
# 113.7 M-parameter DDPM UNet at loss 1.0 on a GPU, while diffusers' defaults (lr 1e-4, 500 warm-up updates) take a
# 3 M-parameter UNet only to 0.19 in 300 updates on a 32x32 folder (benchmarks/bench_defaults.py). So:
# - the built-in small UNet keeps its measured preset;
# - a user's UNet (`--model_config_name_or_path`) gets width-scaled defaults anchored at diffusers' default UNet
#   (widest block W0 = 512 channels), where they are exactly diffusers' values: Adam's learning rate ∝ 1 / width
#   (the μP rule for hidden layers, Yang et al. 2021, arXiv:2203.03466), the warm-up ∝ width.
PRESETS = {
    "small-unet": {"learning_rate": 2e-3, "lr_warmup_steps": 50, "ema_max_decay": 0.999},
    "width-scaled": {"learning_rate": 1e-4, "lr_warmup_steps": 500, "ema_max_decay": 0.9999},  # at W = W0
}
ANCHOR_WIDTH = 512  # widest block of diffusers' default DDPM UNet, where "width-scaled" equals diffusers' defaults
MAX_SCALED_LEARNING_RATE = 2e-3  # never above the small UNet's measured rate


def width_scaled_defaults(widest: int) -> Dict:
    """The `width-scaled` defaults for a UNet whose widest block has `widest` channels (see `PRESETS`)."""
    anchor = PRESETS["width-scaled"]
    return {
        "learning_rate": min(MAX_SCALED_LEARNING_RATE, anchor["learning_rate"] * ANCHOR_WIDTH / widest),
        "lr_warmup_steps": max(10, round(anchor["lr_warmup_steps"] * widest / ANCHOR_WIDTH)),
        "ema_max_decay": anchor["ema_max_decay"],
    }


# Flags that define the model, the objective or the data stream: a resume with any of them changed is refused.
# Every other flag (learning rate and its schedule, Adam's settings, steps, EMA decay, precision, logging) may
# change on resume; the change is applied and logged.
RUN_DEFINING_FLAGS = (
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "resolution",
    "center_crop",
    "random_flip",
    "num_channels",
    "max_train_samples",
    "streaming",
    "image_column",
    "label_column",
    "prediction_type",
    "ddpm_num_steps",
    "ddpm_beta_schedule",
    "rescale_betas_zero_snr",
    "num_class_embeds",
    "cond_drop_prob",
    "sr_factor",
    "sr_noise_level_max",
    "snr_gamma",
    "noise_offset",
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "use_ema",
    "vae",
)


# --conditioning: what the UNet sees besides x_t. It changes the UNet's config (in_channels, class_embed_type), which a
# resume compares, so it is not in RUN_DEFINING_FLAGS; the super-resolution flags are None without it, so a checkpoint
# written before they existed still resumes.
CONDITIONINGS = ("none", "super_resolution")
SR_DEFAULTS = {"sr_factor": 4, "sr_noise_level_max": 100, "sr_noise_level": 20}  # with --conditioning super_resolution

SWITCH = ("auto", "yes", "no")  # the choices of the throughput switches; 'auto' resolves by device
SWITCHES = ("data_on_device", "channels_last", "adam_fused")  # resolved to booleans by `resolve_settings`
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

# Never written out. `train_scheduler` is deprecated and ignored (DDPM and DDIM share one add_noise): a checkpoint that
# recorded it still resumes, whatever the flag says now.
NOT_RECORDED = ("hub_token", "local_rank", "resume_from_checkpoint", "overwrite_output_dir", "train_scheduler")
TRAIN_SCHEDULER = "ddpm"  # whose add_noise gives q(x_t | x_0) during training; DDIM's is the same function

# What diffusers' flags that have nothing to switch on here do instead: logged once by `resolve_settings`.
XFORMERS_NOTE = (
    "--enable_xformers_memory_efficient_attention: xformers is not used; the UNet's attention already runs PyTorch's "
    "scaled_dot_product_attention (diffusers' AttnProcessor2_0, the default), which picks a memory-efficient or "
    "flash kernel by itself."
)
PRESERVE_PRECISION_NOTE = (
    "--preserve_input_precision: already how images are read: 16-bit images (PIL modes I;16, I) are scaled by 65535 "
    "into float32, never converted to 8-bit RGB, on the memory, workers and streaming paths; 8-bit images stay "
    "8-bit; --data_loading auto never reads a data cache (8 bits per pixel) under this flag."
)
TRAIN_SCHEDULER_NOTE = (
    "--train_scheduler is deprecated and ignored: DDPM and DDIM share q(x_t | x_0) (one add_noise), so both "
    "trained the same model; it no longer has to match on resume. Sampling uses --validation_scheduler."
)


def build_parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    """The training flags (diffusers' names, then ours); `training/distill.py` adds its own to the same parser."""
    p = argparse.ArgumentParser(description=description)
    # ---- data (diffusers' names) ----
    p.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="'digits' (the default: scikit-learn's bundled digits), a save_to_disk folder, or a "
        "datasets name for load_dataset.",
    )
    p.add_argument("--dataset_config_name", type=str, default=None)
    p.add_argument("--train_data_dir", type=str, default=None, help="A folder of image files (recursive).")
    p.add_argument("--cache_dir", type=str, default=None, help="datasets' cache directory.")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--center_crop", action="store_true", help="Center crop after resizing (default: random crop).")
    p.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    p.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="DataLoader worker processes per training process; default: from the CPU count on the workers path "
        "(cores shared by the local processes, one left for training, at most 8), 0 in memory, at most 2 on a cache.",
    )
    p.add_argument(
        "--data_loading",
        type=str,
        default="auto",
        choices=DATA_LOADINGS,
        help="Where the images are held: 'memory' (decoded once into RAM), 'workers' (decoded per batch in "
        "DataLoader workers), 'cache' (decoded once into a uint8 cache under --data_cache_dir, memory-mapped by "
        "every process, reused by later runs); 'auto': a cache built before, else RAM up to 256 MiB of pixels, "
        "else workers. The log says which path runs and why.",
    )
    p.add_argument(
        "--data_cache_dir",
        type=str,
        default=None,
        help="Where --data_loading cache keeps its caches (one folder per data and shaping flags; delete it to "
        "clear them); default $DIFFUSION_TUTORIAL_DATA_CACHE or ~/.cache/diffusion-tutorial/data.",
    )
    p.add_argument(
        "--streaming",
        action="store_true",
        help="Stream a datasets dataset (a Hub name, a folder of parquet/webdataset shards, or --train_data_dir) "
        "instead of indexing it: each process reads its own shards through a shuffle buffer; needs "
        "--max_train_steps.",
    )
    p.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="With --streaming: the size of the shuffle buffer of each process.",
    )
    # ---- data (additions) ----
    p.add_argument(
        "--num_channels",
        type=int,
        default=None,
        choices=(1, 3),
        help="1 (grayscale) or 3 (RGB); default 1 for the digits, 3 otherwise.",
    )
    p.add_argument("--max_train_samples", type=int, default=None, help="Keep only the first N training images.")
    p.add_argument(
        "--skip_broken_images",
        action="store_true",
        help="Skip unreadable image files (counted in the log) instead of stopping with an error.",
    )
    p.add_argument("--image_column", type=str, default=None)
    p.add_argument("--label_column", type=str, default=None)
    # ---- model and noise schedule ----
    p.add_argument(
        "--model_config_name_or_path",
        type=str,
        default=None,
        help="A UNet2DModel config (folder or config.json); default: a small UNet for the resolution.",
    )
    p.add_argument("--prediction_type", type=str, default="epsilon", choices=tm.PREDICTION_TYPES)
    p.add_argument("--ddpm_num_steps", type=int, default=1000, help="T, the number of training timesteps.")
    p.add_argument("--ddpm_num_inference_steps", type=int, default=50, help="Sampling steps for validation.")
    p.add_argument("--ddpm_beta_schedule", type=str, default="linear", choices=tm.BETA_SCHEDULES)
    p.add_argument(
        "--rescale_betas_zero_snr",
        action="store_true",
        help="Zero terminal SNR (Lin et al. 2023); needs --prediction_type v_prediction or sample.",
    )
    p.add_argument(
        "--validation_scheduler",
        type=str,
        default="ddim",
        choices=tuple(SCHEDULERS),
        help="Our scheduler used for validation samples and saved in the pipeline folder.",
    )
    p.add_argument(
        "--train_scheduler",
        type=str,
        default=None,
        choices=tuple(SCHEDULERS),
        help="Deprecated, ignored (a warning says so): DDPM and DDIM share q(x_t | x_0), so both trained one model.",
    )
    p.add_argument(
        "--num_class_embeds",
        type=int,
        default=None,
        help="Train class-conditionally on this many classes (index num_class_embeds = no label).",
    )
    p.add_argument(
        "--cond_drop_prob",
        type=float,
        default=0.1,
        help="With --num_class_embeds: probability of replacing a label by the null class (for CFG).",
    )
    p.add_argument("--guidance_scale", type=float, default=2.0, help="CFG scale of class-conditional samples.")
    p.add_argument(
        "--vae",
        type=str,
        default=None,
        help="Latent diffusion: an AutoencoderKL folder (or a folder with it in vae/); the UNet is trained on its "
        "latents scaled by the config's scaling_factor (shape from the VAE), samples are decoded through it, and the "
        "folder holds TutorialLatentPipeline.",
    )
    p.add_argument(
        "--conditioning",
        type=str,
        default="none",
        choices=CONDITIONINGS,
        help="'super_resolution': train SR3 (Saharia et al. 2021): the UNet sees x_t concatenated with the "
        "nearest-upsampled --sr_factor block average of the image, noised to a random level (noise conditioning "
        "augmentation); saved as TutorialSuperResolutionPipeline.",
    )
    p.add_argument(
        "--sr_factor",
        type=int,
        default=None,
        help=f"With --conditioning super_resolution: k, the low-resolution image is the mean of each k x k block; "
        f"must divide --resolution (default {SR_DEFAULTS['sr_factor']}).",
    )
    p.add_argument(
        "--sr_noise_level_max",
        type=int,
        default=None,
        help="With --conditioning super_resolution: the conditioning image is noised to a level s drawn uniformly "
        "from 0..N per example (a timestep of the training schedule; s is the UNet's class label); 0 turns the "
        f"augmentation off (default {SR_DEFAULTS['sr_noise_level_max']}).",
    )
    p.add_argument(
        "--sr_noise_level",
        type=int,
        default=None,
        help="With --conditioning super_resolution: the noise level s of validation samples, at most "
        f"--sr_noise_level_max (default {SR_DEFAULTS['sr_noise_level']}, or --sr_noise_level_max if smaller).",
    )
    # ---- optimisation ----
    p.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    p.add_argument("--eval_batch_size", type=int, default=64, help="Number of validation samples (all processes).")
    p.add_argument("--num_epochs", type=int, default=40)
    p.add_argument(
        "--max_train_steps", type=int, default=None, help="Total optimizer updates; overrides --num_epochs."
    )
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Peak learning rate; default 2e-3 with the built-in small UNet; with --model_config_name_or_path "
        "1e-4 x 512 / (widest block), which is diffusers' 1e-4 for its default UNet.",
    )
    p.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS)
    p.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=None,
        help="Linear warm-up updates; default 50 with the built-in small UNet; with --model_config_name_or_path "
        "500 x (widest block) / 512, which is diffusers' 500 for its default UNet.",
    )
    p.add_argument("--adam_beta1", type=float, default=0.95)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-6)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--snr_gamma", type=float, default=None, help="min-SNR-γ loss weighting (5.0 is typical).")
    p.add_argument("--noise_offset", type=float, default=0.0, help="Offset noise: ε += offset · N(0, 1) per channel.")
    p.add_argument("--seed", type=int, default=0)
    # ---- EMA ----
    p.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ema_inv_gamma", type=float, default=1.0)
    p.add_argument("--ema_power", type=float, default=3 / 4)
    p.add_argument(
        "--ema_max_decay",
        type=float,
        default=None,
        help="Largest EMA decay; default 0.999 with the built-in small UNet, 0.9999 with --model_config_name_or_path.",
    )
    # ---- precision, logging, outputs ----
    p.add_argument(
        "--mixed_precision",
        type=str,
        default="auto",
        choices=MIXED_PRECISIONS,
        help="'auto' (the default): bf16 autocast where the hardware computes bf16 natively (a CPU with "
        "AVX512-BF16 or AMX, a CUDA GPU with bf16), otherwise 'no' (float32). On CPU, attention stays in float32. "
        "'fp16' (with accelerate's loss scaling) needs a CUDA GPU; 'bf16' on a GPU needs one that has bf16.",
    )
    # ---- throughput (each 'auto' is on where it helps: on a GPU, off on the CPU) ----
    p.add_argument(
        "--data_on_device",
        type=str,
        default="auto",
        choices=SWITCH,
        help="Keep the decoded images on the accelerator and draw batches there (no DataLoader, no copy per step); "
        "'auto': on a GPU when the images are one tensor that fits in a quarter of the free memory.",
    )
    p.add_argument(
        "--channels_last",
        type=str,
        default="auto",
        choices=SWITCH,
        help="Channels-last memory format for the UNet (tensor-core convolutions); 'auto': on a GPU.",
    )
    p.add_argument(
        "--adam_fused",
        type=str,
        default="auto",
        choices=SWITCH,
        help="torch's fused AdamW kernel (one launch per update); 'auto': on a CUDA GPU.",
    )
    p.add_argument("--torch_compile", action="store_true", help="torch.compile the UNet's forward (slow first step).")
    p.add_argument("--torch_compile_mode", type=str, default="default", choices=COMPILE_MODES)
    p.add_argument("--logger", type=str, default="tensorboard", choices=("tensorboard", "wandb", "none"))
    p.add_argument("--logging_dir", type=str, default="logs")
    p.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Read the loss from the device, log it and check it is finite every N updates (and before every "
        "checkpoint); every update's loss is still recorded.",
    )
    p.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher; ignored (accelerate knows).")
    p.add_argument("--output_dir", type=str, default="outputs/digits-ddpm")
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--save_images_epochs", type=int, default=10)
    p.add_argument("--save_model_epochs", type=int, default=10)
    p.add_argument(
        "--eval_every_steps",
        type=int,
        default=None,
        help="Sample and compute the digits metrics every N updates (and at the end).",
    )
    p.add_argument(
        "--eval_num_samples", type=int, default=None, help="Samples for the digits metrics (default: eval_batch_size)."
    )
    # ---- checkpoints ----
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    # ---- the Hub ----
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_token", type=str, default=None)
    p.add_argument("--hub_model_id", type=str, default=None)
    p.add_argument("--hub_private_repo", action="store_true")
    # ---- diffusers' flags with nothing to switch on here (resolve_settings logs what happens instead) ----
    p.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Accepted for diffusers' command lines: attention already runs PyTorch's scaled_dot_product_attention.",
    )
    p.add_argument(
        "--preserve_input_precision",
        action="store_true",
        help="Accepted for diffusers' command lines: 16-bit images are always read at 16 bits (not with "
        "--data_loading cache, which holds 8 bits and is refused with this flag).",
    )
    return p


def parse_args(
    argv: Optional[List[str]] = None, parser: Optional[argparse.ArgumentParser] = None, check=None
) -> argparse.Namespace:
    """Parse `argv` with `parser` (default `build_parser()`), then validate at the door: `check_args` and `check`
    (a script's own checks, e.g. distillation's); a `ValueError` becomes argparse's usage error naming the flag."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    try:
        check_args(args)
        if check is not None:
            check(args)
    except ValueError as err:
        p.error(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Validate at the door: every message names the flag, its value and what is allowed."""
    positive = (
        "resolution",
        "train_batch_size",
        "eval_batch_size",
        "num_epochs",
        "gradient_accumulation_steps",
        "ddpm_num_steps",
        "ddpm_num_inference_steps",
        "save_images_epochs",
        "save_model_epochs",
        "checkpointing_steps",
        "logging_steps",
        "shuffle_buffer_size",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)!r} must be >= 1.")
    for name in (
        "max_train_steps",
        "eval_every_steps",
        "checkpoints_total_limit",
        "max_train_samples",
        "num_class_embeds",
        "eval_num_samples",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)!r} must be >= 1 when given.")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers={args.dataloader_num_workers!r} must be >= 0.")
    if args.streaming:
        if uses_digits(args):
            raise ValueError("--streaming needs --dataset_name (a datasets name or folder) or --train_data_dir.")
        if args.max_train_steps is None:
            raise ValueError("--streaming needs --max_train_steps: a stream has no length to count epochs in.")
        if args.data_loading != "auto":
            raise ValueError(f"--data_loading={args.data_loading!r} does not apply to --streaming; leave it 'auto'.")
        if args.data_on_device == "yes":
            raise ValueError("--data_on_device='yes' needs the whole dataset at hand; a stream is read as it goes.")
    if args.lr_warmup_steps is not None and args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps={args.lr_warmup_steps!r} must be >= 0.")
    floats = {  # name: (low, high, low inclusive); every float flag must be finite
        "learning_rate": (0.0, math.inf, False),
        "adam_beta1": (0.0, 1.0, True),
        "adam_beta2": (0.0, 1.0, True),
        "adam_weight_decay": (0.0, math.inf, True),
        "adam_epsilon": (0.0, math.inf, True),
        "max_grad_norm": (0.0, math.inf, True),
        "noise_offset": (0.0, math.inf, True),
        "guidance_scale": (-math.inf, math.inf, True),
        "ema_inv_gamma": (0.0, math.inf, False),
        "ema_power": (0.0, math.inf, False),
        "ema_max_decay": (0.0, 1.0, True),
        "cond_drop_prob": (0.0, 1.0, True),
        "snr_gamma": (0.0, math.inf, False),
    }
    for name, (low, high, low_inclusive) in floats.items():
        value = getattr(args, name)
        if value is None:
            continue
        inside = (low <= value if low_inclusive else low < value) and value < high
        if not math.isfinite(value) or not inside:
            allowed = f"{'[' if low_inclusive else '('}{low:g}, {high:g})"
            raise ValueError(f"--{name}={value!r} must be a finite number in {allowed}.")
    if args.ddpm_num_inference_steps > args.ddpm_num_steps:
        raise ValueError(
            f"--ddpm_num_inference_steps={args.ddpm_num_inference_steps} must be <= "
            f"--ddpm_num_steps={args.ddpm_num_steps}."
        )
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("pass only one of --dataset_name and --train_data_dir.")
    check_super_resolution_args(args)
    if getattr(args, "vae", None) is not None and (args.num_class_embeds or args.conditioning != "none"):
        given = f"--num_class_embeds={args.num_class_embeds!r}" if args.num_class_embeds else "--conditioning"
        raise ValueError(
            f"--vae={args.vae!r} with {given}: latent training is unconditional (TutorialLatentPipeline); "
            "drop one of the two."
        )
    if args.preserve_input_precision and args.data_loading == "cache":
        raise ValueError(
            "--preserve_input_precision with --data_loading='cache': the cache holds 8 bits per pixel; "
            "use --data_loading workers or memory to keep 16-bit images at 16 bits."
        )
    try:  # the schedulers own the zero-SNR × ε check (and every other config check): ask them.
        for kind in {TRAIN_SCHEDULER, args.validation_scheduler}:
            make_scheduler(args, kind)
    except ValueError as err:
        raise ValueError(
            f"--prediction_type={args.prediction_type!r} with --rescale_betas_zero_snr: {err}"
            if args.rescale_betas_zero_snr
            else str(err)
        ) from err


def check_super_resolution_args(args: argparse.Namespace) -> None:
    """The flags of `--conditioning super_resolution`: given only with it, and in range."""
    given = [name for name in SR_DEFAULTS if getattr(args, name) is not None]
    if args.conditioning != "super_resolution":
        if given:
            raise ValueError(
                f"--{given[0]}={getattr(args, given[0])!r} applies only with --conditioning super_resolution "
                f"(now --conditioning={args.conditioning!r})."
            )
        return
    if args.num_class_embeds is not None:
        raise ValueError(
            f"--num_class_embeds={args.num_class_embeds!r} with --conditioning super_resolution: the UNet's class "
            "label carries the noise level of the low-resolution image; choose one of the two."
        )
    factor, resolution = resolved_sr(args, "sr_factor"), args.resolution
    if factor < 2 or resolution % factor:
        divisors = [k for k in range(2, resolution + 1) if resolution % k == 0]
        raise ValueError(
            f"--sr_factor={factor!r} must divide --resolution={resolution} and be >= 2; allowed: {divisors}."
        )
    level_max = resolved_sr(args, "sr_noise_level_max")
    if not 0 <= level_max < args.ddpm_num_steps:
        raise ValueError(
            f"--sr_noise_level_max={level_max!r} must be a timestep in [0, {args.ddpm_num_steps - 1}] "
            f"(--ddpm_num_steps={args.ddpm_num_steps})."
        )
    level = resolved_sr(args, "sr_noise_level")
    if not 0 <= level <= level_max:
        raise ValueError(
            f"--sr_noise_level={level!r} must be in [0, {level_max}]: the levels the model is trained on "
            "(--sr_noise_level_max)."
        )


def resolved_sr(args: argparse.Namespace, name: str) -> Optional[int]:
    """A super-resolution flag as given, else its default (`SR_DEFAULTS`); None without --conditioning
    super_resolution. An unset --sr_noise_level is capped at --sr_noise_level_max."""
    if args.conditioning != "super_resolution":
        return None
    value = getattr(args, name)
    if value is not None:
        return value
    if name == "sr_noise_level":
        return min(SR_DEFAULTS[name], resolved_sr(args, "sr_noise_level_max"))
    return SR_DEFAULTS[name]


def make_scheduler(args: argparse.Namespace, kind: str):
    """The run's noise scheduler (training and the saved folder's). Latent runs (`--vae`) do not clip x̂_0 to
    [-1, 1]: scaled latents have unit variance, not a range (about 3 in 10 lie outside it for the digits VAE), and
    clipping them ruins the samples (notebook 15: digits FD 99 -> 730)."""
    return SCHEDULERS[kind](
        clip_sample=getattr(args, "vae", None) is None,
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        rescale_betas_zero_snr=args.rescale_betas_zero_snr,
        timestep_spacing="trailing" if args.rescale_betas_zero_snr else "leading",
    )


class Settings(argparse.Namespace):
    """The run's settings: the parsed flags with `auto` and unset defaults resolved. Frozen: nothing writes back."""

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"Settings are frozen: {name!r} cannot be set after resolve_settings.")

    def __delattr__(self, name):
        raise AttributeError(f"Settings are frozen: {name!r} cannot be deleted.")


def uses_digits(args) -> bool:
    return args.dataset_name in (None, "digits") and args.train_data_dir is None


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Resolve `auto` values, the model-dependent defaults (`PRESETS`) and the channel count, once.

    The user's UNet config (`--model_config_name_or_path`) is read here, once, and kept as `unet_config` (None for
    the built-in small UNet); the throughput switches (`SWITCH`) become booleans, on where the run is on a GPU.
    """
    cpu = uses_cpu()
    unet_config = None if args.model_config_name_or_path is None else load_unet_config(args.model_config_name_or_path)
    if unet_config is None:
        preset, defaults = "small-unet", PRESETS["small-unet"]
    else:
        preset, defaults = "width-scaled", width_scaled_defaults(widest_block(unet_config))
    resolved = {name: value for name, value in defaults.items() if getattr(args, name) is None}
    if int(os.environ.get("LOCAL_RANK", "0")) <= 0:  # once per machine; warnings: logging is not configured yet
        for given, note in (
            (args.train_scheduler is not None, TRAIN_SCHEDULER_NOTE),
            (args.enable_xformers_memory_efficient_attention, XFORMERS_NOTE),
            (args.preserve_input_precision, PRESERVE_PRECISION_NOTE),
        ):
            if given:
                logger.warning(note)
    switches = {name: getattr(args, name) == "yes" or (getattr(args, name) == "auto" and not cpu) for name in SWITCHES}
    return Settings(
        **{
            **vars(args),
            **resolved,
            **switches,
            "train_scheduler": TRAIN_SCHEDULER,
            "requested_data_on_device": args.data_on_device,
            "unet_config": unet_config,
            "preset": preset,
            "mixed_precision": resolve_mixed_precision(args.mixed_precision, cpu),
            "requested_mixed_precision": args.mixed_precision,
            "num_channels": args.num_channels or (1 if uses_digits(args) else 3),
            **{name: resolved_sr(args, name) for name in SR_DEFAULTS},
        }
    )


def widest_block(unet_config: Dict) -> int:
    """The widest `block_out_channels` of a UNet2DModel config."""
    return max(unet_config.get("block_out_channels", (224, 448, 672, 896)))  # UNet2DModel's default when unset


def recorded_flags(settings: Settings) -> Dict:
    """The resolved settings written into checkpoints, metrics and trackers (no token, no launcher details)."""
    return {
        k: v
        for k, v in vars(settings).items()
        if k not in NOT_RECORDED and (v is None or isinstance(v, (int, float, str, bool)))
    }
