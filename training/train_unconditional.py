"""Train a `UNet2DModel` denoiser with accelerate, and leave behind a self-contained pipeline folder.

    accelerate launch training/train_unconditional.py            # built-in digits, 16x16, a few minutes on 2 CPUs
    accelerate launch training/train_unconditional.py --num_class_embeds 10 --cond_drop_prob 0.1   # class-conditional
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train_unconditional.py  # gloo, CPU
    accelerate launch --multi_gpu --num_processes 8 training/train_unconditional.py --train_data_dir imgs \\
        --resolution 64 --model_config_name_or_path my_unet/               # several GPUs, a user's data and model

The flags of diffusers' `examples/unconditional_image_generation/train_unconditional.py` keep their names and
meanings; the rest are additions (seed, max_train_steps, v-prediction, min-SNR weighting, offset noise, zero
terminal SNR, our schedulers, class conditioning, periodic evaluation). The story is linear:
parse and resolve the settings -> validate data and model -> take over the output folder -> prepare -> loop -> save.

The loss is DDPM's simple objective (Ho et al. 2020, arXiv:2006.11239, eq. (14)) with the target of the chosen
parameterisation (`schedulers.tutorial_math.training_target`), optionally weighted by min-SNR-γ (Hang et al. 2023,
arXiv:2303.09556, eq. (9)). Every random draw of a training step (noise, timesteps, label dropout) comes from a
generator seeded by (seed, micro-batch index, process index), and the data order from (seed, epoch): a resumed run
repeats an uninterrupted one exactly.

Every tensor of the training state (model, optimizer state, EMA, noise-schedule table, loss buffer) lives on
`accelerator.device`; the loop reads numbers from the device only every `--logging_steps` updates and before a
checkpoint (where a non-finite loss stops the run before anything non-finite is saved).
"""

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

if __package__ in (None, ""):  # run as a script (`accelerate launch training/train_unconditional.py`)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers import tutorial_math as tm
from training import checkpoints as ckpt
from training import output_folder
from training.checkpoints import list_checkpoints, resolve_checkpoint  # noqa: F401  (part of this module's API)
from training.data import DIGITS_NUM_CLASSES, EpochSampler, build_dataset
from training.ema import EMA
from training.errors import TrainingError

logger = logging.getLogger("train_unconditional")

SCHEDULERS = {"ddpm": TutorialDDPMScheduler, "ddim": TutorialDDIMScheduler}
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
METRICS = "metrics.json"
LOSSES = "losses.jsonl"
GRIDS = "grids"  # sample grids over training; the pipeline's own `samples/` holds the final grid for the card
TRAINING_STATE = ckpt.STATE_FILE

# Defaults that depend on the model (`--learning_rate`, `--lr_warmup_steps`, `--ema_max_decay` left unset): the
# built-in small UNet (~0.65 M parameters) learns the digits in minutes at a high rate; a user's real-size UNet
# (e.g. diffusers' 113.7 M-parameter DDPM UNet) does not learn at that rate (measured: the loss stayed at 1.0) and
# gets the defaults of diffusers' train_unconditional.py. The resolved values go to metrics.json and the card.
PRESETS = {
    "small-unet": {"learning_rate": 2e-3, "lr_warmup_steps": 50, "ema_max_decay": 0.999},
    "diffusers": {"learning_rate": 1e-4, "lr_warmup_steps": 500, "ema_max_decay": 0.9999},
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
    "image_column",
    "label_column",
    "prediction_type",
    "ddpm_num_steps",
    "ddpm_beta_schedule",
    "rescale_betas_zero_snr",
    "train_scheduler",
    "num_class_embeds",
    "cond_drop_prob",
    "snr_gamma",
    "noise_offset",
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "use_ema",
)
NOT_RECORDED = ("hub_token", "local_rank", "resume_from_checkpoint", "overwrite_output_dir")  # never written out
# The loss must have fallen by then: the mean of updates (N - 49 .. N) below LOSS_PLATEAU_RATIO x that of 1 .. 10.
LOSS_PLATEAU_CHECK_UPDATE = 300
LOSS_PLATEAU_RATIO = 0.8


# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    p.add_argument("--dataloader_num_workers", type=int, default=0)
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
        "--train_scheduler",
        type=str,
        default="ddpm",
        choices=tuple(SCHEDULERS),
        help="Our scheduler whose add_noise defines q(x_t | x_0) during training.",
    )
    p.add_argument(
        "--validation_scheduler",
        type=str,
        default="ddim",
        choices=tuple(SCHEDULERS),
        help="Our scheduler used for validation samples and saved in the pipeline folder.",
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
        help="Peak learning rate; default 2e-3 with the built-in small UNet, 1e-4 (diffusers' default) with "
        "--model_config_name_or_path.",
    )
    p.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS)
    p.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=None,
        help="Linear warm-up updates; default 50 with the built-in small UNet, 500 with --model_config_name_or_path.",
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
    args = p.parse_args(argv)
    try:
        check_args(args)
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
    try:  # the schedulers own the zero-SNR × ε check (and every other config check): ask them.
        for kind in {args.train_scheduler, args.validation_scheduler}:
            make_scheduler(args, kind)
    except ValueError as err:
        raise ValueError(
            f"--prediction_type={args.prediction_type!r} with --rescale_betas_zero_snr: {err}"
            if args.rescale_betas_zero_snr
            else str(err)
        ) from err


def make_scheduler(args: argparse.Namespace, kind: str):
    return SCHEDULERS[kind](
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        rescale_betas_zero_snr=args.rescale_betas_zero_snr,
        timestep_spacing="trailing" if args.rescale_betas_zero_snr else "leading",
    )


# ----------------------------------------------------------------------------------------------------------------
# 2. Settings: the flags with every `auto` and model-dependent default resolved, once, frozen
# ----------------------------------------------------------------------------------------------------------------
class Settings(argparse.Namespace):
    """The run's settings: the parsed flags with `auto` and unset defaults resolved. Frozen: nothing writes back."""

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"Settings are frozen: {name!r} cannot be set after resolve_settings.")

    def __delattr__(self, name):
        raise AttributeError(f"Settings are frozen: {name!r} cannot be deleted.")


def uses_cpu() -> bool:
    """Whether accelerate will train on the CPU (`ACCELERATE_USE_CPU`, set by `accelerate launch --cpu`, or no GPU)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """`--mixed_precision`: 'auto' -> 'bf16' where bf16 is native (CPU: AVX512-BF16 or AMX; CUDA: bf16), else 'no'.

    An explicit choice the device cannot honour stops here: 'fp16' on a CPU (accelerate's float16 loss scaling is
    a GPU feature), 'bf16' on a GPU without bf16.
    """
    tm.check_choice("--mixed_precision", requested, MIXED_PRECISIONS)
    if cpu:
        if requested == "fp16":
            raise TrainingError(
                "--mixed_precision='fp16' needs a CUDA GPU (float16 training with loss scaling); this run is on "
                "the CPU: use --mixed_precision bf16, no or auto."
            )
        if requested != "auto":
            return requested
        # torch.cpu's capability probes are private: a torch without them counts as "no native bf16"
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return "bf16" if any(probe() for probe in probes if probe is not None) else "no"
    bf16 = torch.cuda.is_bf16_supported()
    if requested == "bf16" and not bf16:
        raise TrainingError(
            f"--mixed_precision='bf16' needs a GPU with bfloat16; {torch.cuda.get_device_name()} has none: use "
            "--mixed_precision fp16, no or auto."
        )
    if requested != "auto":
        return requested
    return "bf16" if bf16 else "no"


def uses_digits(args) -> bool:
    return args.dataset_name in (None, "digits") and args.train_data_dir is None


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Resolve `--mixed_precision auto`, the model-dependent defaults (`PRESETS`) and the channel count, once."""
    preset = "small-unet" if args.model_config_name_or_path is None else "diffusers"
    resolved = {name: value for name, value in PRESETS[preset].items() if getattr(args, name) is None}
    return Settings(
        **{
            **vars(args),
            **resolved,
            "preset": preset,
            "mixed_precision": resolve_mixed_precision(args.mixed_precision, uses_cpu()),
            "requested_mixed_precision": args.mixed_precision,
            "num_channels": args.num_channels or (1 if uses_digits(args) else 3),
        }
    )


def recorded_flags(settings: Settings) -> Dict:
    """The resolved settings written into checkpoints, metrics and trackers (no token, no launcher details)."""
    return {
        k: v
        for k, v in vars(settings).items()
        if k not in NOT_RECORDED and (v is None or isinstance(v, (int, float, str, bool)))
    }


# ----------------------------------------------------------------------------------------------------------------
# 3. Model
# ----------------------------------------------------------------------------------------------------------------
def default_unet_config(resolution: int, channels: int, num_class_embeds: Optional[int]) -> Dict:
    """The small default UNet: two resolution levels (three from 32x32 up), ~0.65M parameters at 16x16."""
    levels = 2 if resolution < 32 else 3
    widths = (32, 64, 64)[:levels]
    return dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


def build_model(args: argparse.Namespace, channels: int) -> UNet2DModel:
    """The UNet to train (the small default, or `--model_config_name_or_path`), checked against the data."""
    # One extra class index, `num_class_embeds`, is the "no label" class of classifier-free guidance.
    num_embeds = args.num_class_embeds + 1 if args.num_class_embeds else None
    if args.model_config_name_or_path is None:
        model = UNet2DModel(**default_unet_config(args.resolution, channels, num_embeds))
    else:
        try:
            config = UNet2DModel.load_config(args.model_config_name_or_path)
        except (OSError, ValueError) as err:
            raise TrainingError(f"--model_config_name_or_path={args.model_config_name_or_path!r}: {err}") from err
        model = UNet2DModel.from_config(config)
        if model.config.in_channels != channels or model.config.sample_size != args.resolution:
            raise TrainingError(
                f"--model_config_name_or_path={args.model_config_name_or_path!r} has in_channels="
                f"{model.config.in_channels}, sample_size={model.config.sample_size}; the data has {channels} "
                f"channel(s) at --resolution={args.resolution}."
            )
        if num_embeds is not None and model.config.num_class_embeds != num_embeds:
            model = UNet2DModel.from_config(config, num_class_embeds=num_embeds)
    check_resolution(model, args.resolution)
    return model


def check_resolution(model: UNet2DModel, resolution: int) -> None:
    """The UNet halves the image after every down block but the last: `--resolution` must divide by 2^(blocks-1)."""
    halvings = len(model.config.down_block_types) - 1
    factor = 2**halvings
    if resolution % factor:
        lower, upper = resolution // factor * factor, (resolution // factor + 1) * factor
        choices = f"{lower} or {upper}" if lower > 0 else f"{upper} or another multiple of {factor}"
        raise TrainingError(
            f"--resolution={resolution} is not supported by this UNet: it halves the image {halvings} time(s), so "
            f"the resolution must be a multiple of {factor}; use e.g. --resolution {choices}."
        )


class Float32AttnProcessor(AttnProcessor2_0):
    """diffusers' attention with autocast off and float32 inputs: used on CPU under mixed precision.

    PyTorch's CPU flash-attention backward is about 3x slower in bf16 than in float32 at the UNet's mid-block size
    (64 tokens, 8 heads), which cancels most of what bf16 convolutions gain; the attention is a few percent of the
    FLOPs, so it stays in float32 (also the more accurate choice).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return super().__call__(
                attn, hidden_states.float(), encoder_hidden_states, attention_mask, temb, *args, **kw
            )


def use_float32_attention(model: torch.nn.Module) -> int:
    """Give every attention layer of `model` the `Float32AttnProcessor`; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.set_processor(Float32AttnProcessor())
    return len(layers)


# ----------------------------------------------------------------------------------------------------------------
# 4. The loss of one micro-batch
# ----------------------------------------------------------------------------------------------------------------
def step_generator(seed: int, micro_step: int, process_index: int, device) -> Optional[torch.Generator]:
    """The generator of one micro-batch: a pure function of (seed, micro-batch index, process).

    On torch's `meta` device (tensors without values, used by the device-placement tests) there is nothing to
    draw, and torch has no generator there: None.
    """
    if torch.device(device).type == "meta":
        return None
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + micro_step * 1_009 + process_index) % (2**63))
    return g


def diffusion_loss(
    model,
    noise_scheduler,
    batch: Dict,
    args: argparse.Namespace,
    g: Optional[torch.Generator],
    alpha_bar_table: Optional[torch.Tensor] = None,
):
    """DDPM's simple loss (eq. (14)) for any parameterisation, with optional min-SNR-γ weights and offset noise.

    `alpha_bar_table` is ᾱ on the batch's device (the training loop keeps one there); by default the scheduler's.
    """
    x0 = batch["images"]
    bsz = x0.shape[0]
    eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
    if args.noise_offset:  # offset noise: a per-channel constant shift of ε (Guttenberg 2023)
        eps = eps + args.noise_offset * torch.randn((bsz, x0.shape[1], 1, 1), generator=g, device=x0.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=g, device=x0.device)
    x_t = noise_scheduler.add_noise(x0, eps, t)  # DDPM eq. (4)
    table = noise_scheduler.alpha_bar.to(x0.device) if alpha_bar_table is None else alpha_bar_table
    alpha_bar = table[t]
    target = tm.training_target(x0, eps, alpha_bar, args.prediction_type).to(x0.dtype)

    class_labels = None
    if args.num_class_embeds:
        labels = batch["labels"]
        drop = torch.rand((bsz,), generator=g, device=x0.device) < args.cond_drop_prob
        class_labels = torch.where(drop, torch.full_like(labels, args.num_class_embeds), labels)
    model_output = model(x_t, t, class_labels=class_labels).sample

    per_sample = (model_output.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:
        # min-SNR-γ: w_t = min(SNR_t, γ) / SNR_t for ε, / (SNR_t + 1) for v, and min(SNR_t, γ) for x_0.
        snr_t = tm.snr(alpha_bar.double())
        clipped = snr_t.clamp(max=args.snr_gamma)
        weight = {"epsilon": clipped / snr_t, "v_prediction": clipped / (snr_t + 1), "sample": clipped}
        per_sample = per_sample * weight[args.prediction_type].float()
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------------------------
# 5. The training state, on accelerator.device, and one update
# ----------------------------------------------------------------------------------------------------------------
class TrainState:
    """The loop's position, saved in every checkpoint next to the model, optimizer, LR schedule, EMA and RNGs."""

    def __init__(self):
        self.global_step = 0  # optimizer updates done
        self.micro_step = 0  # micro-batches consumed (= global_step * gradient_accumulation_steps)
        self.images_seen = 0

    def state_dict(self) -> Dict:
        return {"global_step": self.global_step, "micro_step": self.micro_step, "images_seen": self.images_seen}

    def load_state_dict(self, state: Dict) -> None:
        self.global_step = int(state["global_step"])
        self.micro_step = int(state["micro_step"])
        self.images_seen = int(state["images_seen"])


class TrainingRun:
    """Everything one run trains and keeps: built by `prepare_training`, advanced by `micro_step` and `update`.

    Attributes:
        model, optimizer, dataloader: as returned by `accelerator.prepare` (the model may be DDP-wrapped).
        lr_scheduler: stepped once per update, by us. ema (`EMA` or None): on the model's device.
        noise_scheduler: our scheduler whose `add_noise` defines q(x_t | x_0). alpha_bar: its ᾱ table, on the device.
        update_loss: the loss of the update being accumulated, on the device. state (`TrainState`).
    """

    def __init__(self, settings, accelerator, model, optimizer, dataloader, lr_scheduler, ema, noise_scheduler):
        self.settings, self.accelerator = settings, accelerator
        self.model, self.optimizer, self.dataloader = model, optimizer, dataloader
        self.lr_scheduler, self.ema, self.noise_scheduler = lr_scheduler, ema, noise_scheduler
        self.alpha_bar = noise_scheduler.alpha_bar.to(accelerator.device)
        self.update_loss = torch.zeros((), device=accelerator.device)
        self.state = TrainState()

    @property
    def unwrapped(self) -> UNet2DModel:
        return self.accelerator.unwrap_model(self.model)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """Every tensor the run holds, by name (the device-placement tests check that all are on the device).

        The optimizer's per-parameter `step` counters are left out: torch keeps them on the CPU by design for
        non-capturable optimizers (they are host-side counters, not data of the computation).
        """
        found = {f"model.{n}": t for n, t in self.unwrapped.state_dict(keep_vars=True).items()}
        found.update({f"grad.{n}": p.grad for n, p in self.unwrapped.named_parameters() if p.grad is not None})
        for index, per_param in self.optimizer.state_dict()["state"].items():
            found.update({f"optimizer.{index}.{k}": v for k, v in per_param.items() if torch.is_tensor(v)})
        found = {k: v for k, v in found.items() if not k.endswith(".step")}
        if self.ema is not None:
            found.update({f"ema.{i}": s for i, s in enumerate(self.ema.shadow_params)})
        found["alpha_bar"] = self.alpha_bar
        found["update_loss"] = self.update_loss
        scheduler_tables = {k: v for k, v in vars(self.noise_scheduler).items() if torch.is_tensor(v) and k[0] == "_"}
        found.update({f"noise_scheduler.{k}": v for k, v in scheduler_tables.items()})  # its device caches
        return found


def prepare_training(settings: Settings, accelerator: Accelerator, model, dataloader) -> TrainingRun:
    """Optimizer, `accelerator.prepare`, then what follows the model onto its device: EMA, LR schedule, tables."""
    if settings.mixed_precision != "no" and accelerator.device.type == "cpu":
        use_float32_attention(model)
    # The optimizer is built on the parameters where they will live: a move that makes new parameter tensors (as
    # some devices' do) would otherwise leave it holding the old ones.
    model = model.to(accelerator.device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
    )
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    ema = None
    if settings.use_ema:  # created from the prepared model's parameters: on accelerator.device with them
        params = accelerator.unwrap_model(model).parameters()
        ema = EMA(params, settings.ema_max_decay, settings.ema_inv_gamma, settings.ema_power)
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=max_train_steps(settings, len(dataloader)),
    )
    noise_scheduler = make_scheduler(settings, settings.train_scheduler)
    return TrainingRun(settings, accelerator, model, optimizer, dataloader, lr_scheduler, ema, noise_scheduler)


def max_train_steps(settings: Settings, batches_per_epoch: int) -> int:
    """`--max_train_steps`, or the updates in `--num_epochs` epochs of `batches_per_epoch` (per process)."""
    steps = (
        settings.max_train_steps or (settings.num_epochs * batches_per_epoch) // settings.gradient_accumulation_steps
    )
    if steps < 1:
        raise TrainingError(
            f"--num_epochs={settings.num_epochs} gives no full update of "
            f"{settings.gradient_accumulation_steps} batch(es)."
        )
    return steps


def micro_step(run: TrainingRun, batch: Dict, is_update: bool) -> None:
    """Forward and backward of one micro-batch; its loss joins `run.update_loss` (on the device, not read)."""
    settings, accelerator = run.settings, run.accelerator
    ga = settings.gradient_accumulation_steps
    g = step_generator(settings.seed, run.state.micro_step, accelerator.process_index, batch["images"].device)
    with contextlib.nullcontext() if is_update else accelerator.no_sync(run.model):
        loss = diffusion_loss(run.model, run.noise_scheduler, batch, settings, g, run.alpha_bar)
        accelerator.backward(loss / ga)
    run.update_loss += loss.detach().float() / ga
    run.state.micro_step += 1


def update(run: TrainingRun) -> torch.Tensor:
    """One optimizer update: clip, step, LR schedule, EMA. Returns the update's loss (a device tensor)."""
    settings, accelerator = run.settings, run.accelerator
    if settings.max_grad_norm:
        accelerator.clip_grad_norm_(run.model.parameters(), settings.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.unwrapped.parameters())
    loss, run.update_loss = run.update_loss, torch.zeros((), device=accelerator.device)
    run.state.global_step += 1
    run.state.images_seen += (
        settings.train_batch_size * accelerator.num_processes * settings.gradient_accumulation_steps
    )
    return loss


class LossLog:
    """Per-update losses kept on the device; `flush` reads them all at once (the loop's only regular host sync)."""

    def __init__(self):
        self.pending: List[Tuple[int, torch.Tensor]] = []
        self.history: List[float] = []  # every update's loss so far in this process (for the plateau warning)

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def flush(self, accelerator) -> List[Tuple[int, float]]:
        """The pending (update, loss) pairs, averaged over processes, as Python floats."""
        if not self.pending:
            return []
        values = torch.stack([loss for _, loss in self.pending])
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        rows = list(zip([step for step, _ in self.pending], values.tolist()))
        self.pending = []
        self.history.extend(v for _, v in rows)
        return rows


def check_losses(rows: List[Tuple[int, float]], settings: Settings, last_checkpoint: Optional[str]) -> None:
    """Stop at the first non-finite loss, naming the update and `--learning_rate`; nothing after it is saved."""
    for step, loss in rows:
        if not math.isfinite(loss):
            kept = (
                f"the last good checkpoint is {last_checkpoint!r}" if last_checkpoint else "no checkpoint was written"
            )
            raise TrainingError(
                f"the loss is {loss} at update {step}: training diverged and stopped before saving anything "
                f"non-finite ({kept}). Lower --learning_rate (now {settings.learning_rate:g}), or check the data "
                f"and --max_grad_norm (now {settings.max_grad_norm:g})."
            )


def loss_plateau_warning(history: List[float], settings: Settings) -> Optional[str]:
    """A warning when the loss has not fallen after `LOSS_PLATEAU_CHECK_UPDATE` updates (None when it has)."""
    n = LOSS_PLATEAU_CHECK_UPDATE
    if len(history) < n:
        return None
    first, recent = sum(history[:10]) / 10, sum(history[n - 50 : n]) / 50
    if recent < LOSS_PLATEAU_RATIO * first:
        return None
    return (
        f"the loss has not fallen in {n} updates (mean {first:.4f} over updates 1-10, {recent:.4f} over "
        f"{n - 49}-{n}): the model is not learning. Try another --learning_rate (now {settings.learning_rate:g}; "
        "1e-4 suits most real-size UNets) and check --lr_warmup_steps and the data."
    )


# ----------------------------------------------------------------------------------------------------------------
# 6. Checkpoints of a run (the format: training/checkpoints.py)
# ----------------------------------------------------------------------------------------------------------------
def unet_config_of(model: UNet2DModel) -> Dict:
    """The model's config as JSON data, without diffusers' bookkeeping keys (`_class_name`, versions)."""
    return {k: v for k, v in json.loads(json.dumps(dict(model.config))).items() if not k.startswith("_")}


def all_finite(tensors: List[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (one host synchronisation)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def save_checkpoint(run: TrainingRun, output_dir: str) -> str:
    """Write `checkpoint-<update>` of `run` (every process calls this); refuses non-finite weights."""
    accelerator, unet = run.accelerator, run.unwrapped
    weights = list(unet.parameters()) + ([] if run.ema is None else run.ema.shadow_params)
    if not all_finite(weights):
        raise TrainingError(
            f"the weights are not finite at update {run.state.global_step}: training diverged; nothing was saved. "
            f"Lower --learning_rate (now {run.settings.learning_rate:g})."
        )
    optimizer_tensors, optimizer_meta = ckpt.split_optimizer_state(run.optimizer.state_dict())
    tensors = {ckpt.MODEL_FILE: unet.state_dict(), ckpt.OPTIMIZER_FILE: optimizer_tensors}
    if run.ema is not None:
        tensors[ckpt.EMA_FILE] = run.ema.tensors()
    scaler = getattr(accelerator, "scaler", None)
    state = {
        **run.state.state_dict(),
        "num_processes": accelerator.num_processes,
        "flags": recorded_flags(run.settings),
        "unet_config": unet_config_of(unet),
        "optimizer": optimizer_meta,
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "ema": None if run.ema is None else run.ema.state(),
        "grad_scaler": None if scaler is None else scaler.state_dict(),
    }
    return ckpt.write_checkpoint(
        accelerator, output_dir, run.state.global_step, tensors, state, run.settings.checkpoints_total_limit
    )


def check_resume_flags(path: str, saved: Dict, settings: Settings, model: UNet2DModel) -> List[str]:
    """Refuse a resume whose run-defining flags differ from the checkpoint's; returns the other changed flags."""
    flags = saved.get("flags")
    if flags is None or "unet_config" not in saved:
        raise TrainingError(f"checkpoint {path!r} records no flags (written by an older version); it cannot resume.")
    now = recorded_flags(settings)
    refused = [
        f"--{name}: {flags.get(name)!r} in the checkpoint, {now.get(name)!r} now"
        for name in RUN_DEFINING_FLAGS
        if flags.get(name) != now.get(name)
    ]
    config = unet_config_of(model)
    differing = sorted(
        k for k in set(config) | set(saved["unet_config"]) if config.get(k) != saved["unet_config"].get(k)
    )
    if differing:
        refused.append(f"the UNet (--model_config_name_or_path) differs in {', '.join(differing)}")
    if refused:
        raise TrainingError(
            f"cannot resume from {path!r}: these change the model, the objective or the data, and differ from the "
            f"checkpoint: {'; '.join(refused)}. Resume with the checkpoint's values, or train a new run in another "
            "--output_dir."
        )
    ignore = set(RUN_DEFINING_FLAGS) | {"output_dir"}
    return [
        f"--{name}: {flags.get(name)!r} -> {now[name]!r}"
        for name in sorted(now)
        if name not in ignore and name in flags and flags[name] != now[name]
    ]


def load_checkpoint(run: TrainingRun, path: str, saved: Tuple[Dict, Dict, Optional[Dict]]) -> None:
    """Restore `run` from a checkpoint read by `checkpoints.read_checkpoint`; values are copied into tensors that
    stay on `accelerator.device`. The current flags' optimizer settings and learning-rate schedule are applied."""
    state, tensors, rng = saved
    settings = run.settings
    try:
        run.unwrapped.load_state_dict(tensors[ckpt.MODEL_FILE])
        run.optimizer.load_state_dict(ckpt.join_optimizer_state(tensors[ckpt.OPTIMIZER_FILE], state["optimizer"]))
        run.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if run.ema is not None:
            run.ema.load(tensors[ckpt.EMA_FILE], state["ema"])
        scaler = getattr(run.accelerator, "scaler", None)
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        run.state.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise TrainingError(
            f"checkpoint {path!r} is corrupt and cannot be loaded: {type(err).__name__}: {err}"
        ) from err
    # The optimizer's hyperparameters and the LR schedule follow the current flags (unchanged flags: same values).
    for group in run.optimizer.param_groups:
        group.update(
            betas=(settings.adam_beta1, settings.adam_beta2),
            eps=settings.adam_epsilon,
            weight_decay=settings.adam_weight_decay,
            initial_lr=settings.learning_rate,
        )
    scheduler = run.lr_scheduler
    scheduler.base_lrs = [settings.learning_rate for _ in run.optimizer.param_groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(run.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    if rng is not None:
        ckpt.set_rng_state(rng)
    if state.get("num_processes") != run.accelerator.num_processes:
        logger.warning(
            "checkpoint %s was written by %s process(es), resuming with %s: the data order differs.",
            path,
            state.get("num_processes"),
            run.accelerator.num_processes,
        )


def truncate_records(output_dir: str, step: int, aside: Optional[str]) -> None:
    """Drop the loss rows and metrics after update `step` (a resume continues from there); keep them in `aside`."""
    path = os.path.join(output_dir, LOSSES)
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    keep = [r for r in rows if json.loads(r)["step"] <= step]
    if aside is not None and len(keep) < len(rows):
        with open(os.path.join(aside, LOSSES), "w") as f:
            f.writelines(r for r in rows if json.loads(r)["step"] > step)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# 7. Validation samples, the pipeline folder, metrics
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ema_weights(model, ema: Optional[EMA]):
    """Temporarily load the EMA weights into `model` (no-op without EMA)."""
    if ema is None:
        yield model
        return
    with ema.applied_to(model.parameters()):
        yield model


def make_pipeline(unet, args: argparse.Namespace):
    from custom_pipelines import TutorialClassConditionalPipeline, TutorialUnconditionalPipeline

    pipeline_cls = TutorialClassConditionalPipeline if args.num_class_embeds else TutorialUnconditionalPipeline
    return pipeline_cls(unet=unet, scheduler=make_scheduler(args, args.validation_scheduler))


def validation_samples(accelerator, unet, args, num_samples: int) -> torch.Tensor:
    """`num_samples` samples in [-1, 1], sharded over processes and gathered (identical to a 1-process run)."""
    from training.evaluate import sample_sharded

    scheduler = make_scheduler(args, args.validation_scheduler)
    labels = samples_labels(args, num_samples)
    return sample_sharded(
        unet,
        scheduler,
        num_samples,
        args.ddpm_num_inference_steps,
        seed=args.seed,
        accelerator=accelerator,
        class_labels=labels,
        guidance_scale=args.guidance_scale,
    )


def evaluate_now(accelerator, model, ema, args, state: TrainState, writer, name: Optional[str] = None):
    """Sample with the EMA weights, save a grid, and on the digits compute the metrics; returns (metrics, samples)."""
    from training.evaluate import digits_metrics, save_grid

    unet = accelerator.unwrap_model(model)
    was_training = unet.training
    unet.eval()
    with ema_weights(unet, ema):
        n = args.eval_num_samples or args.eval_batch_size
        samples = validation_samples(accelerator, unet, args, n)
    unet.train(was_training)
    metrics = {"step": state.global_step}
    if accelerator.is_main_process:
        name = name or f"step_{state.global_step:06d}"
        save_grid(samples[: args.eval_batch_size], os.path.join(args.output_dir, GRIDS, f"{name}.png"), scale=4)
        if writer is not None:
            writer.add_images("samples", (samples[:64] / 2 + 0.5).clamp(0, 1), state.global_step)
        if uses_digits(args) and len(samples) >= 2:
            labels = samples_labels(args, len(samples))
            metrics.update(digits_metrics(samples, class_labels=labels))
    return metrics, samples


def samples_labels(args, n: int) -> Optional[torch.Tensor]:
    """The classes requested from a class-conditional model: 0, 1, ..., K-1, 0, 1, ... (None if unconditional)."""
    if not args.num_class_embeds:
        return None
    return torch.arange(n) % min(args.num_class_embeds, DIGITS_NUM_CLASSES)


def save_pipeline(accelerator, model, ema, args, samples: Optional[torch.Tensor], card_text: str):
    """Write the self-contained pipeline folder (EMA weights in) to `output_dir` (main process only)."""
    if not accelerator.is_main_process:
        return None
    unet = accelerator.unwrap_model(model)
    with ema_weights(unet, ema):
        export = UNet2DModel.from_config(unet.config)
        export.load_state_dict({k: v.detach().float().cpu() for k, v in unet.state_dict().items()})
    pipe = make_pipeline(export, args)
    images = None if samples is None else [make_grid_image(samples, args)]
    pipe.save_pretrained(
        args.output_dir,
        num_inference_steps=args.ddpm_num_inference_steps,
        sample_images=images,
        model_card_text=card_text,
    )
    return pipe


def make_grid_image(samples: torch.Tensor, args):
    """The sample grid shown in the model card: the first `eval_batch_size` samples, enlarged 4x."""
    from training.evaluate import make_grid

    grid = make_grid(samples[: args.eval_batch_size])
    return grid.resize((grid.width * 4, grid.height * 4), resample=0)


def model_card_text(args, argv: Optional[List[str]], metrics: Dict) -> str:
    command = "accelerate launch training/train_unconditional.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        "## Training",
        "",
        "Trained with the diffusion-tutorial project's script:",
        "",
        "```bash",
        command.strip(),
        "```",
        "",
        f"Mixed precision on the training machine: `{args.mixed_precision}`.",
        "",
        f"Learning rate {args.learning_rate:g}, {args.lr_warmup_steps} warm-up updates, EMA max decay "
        f"{args.ema_max_decay:g} (`{args.preset}` defaults where not given).",
        "",
    ]
    if metrics:
        lines += ["## Metrics (digits classifier feature space)", ""]
        lines += [
            f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
            for k, v in metrics.items()
            if not isinstance(v, (list, dict))
        ]
    return "\n".join(lines)


def push(pipe, args, samples: torch.Tensor, card: str):
    """Upload the pipeline folder (model card and sample images included) to `--hub_model_id`."""
    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    return pipe.push_to_hub(
        repo_id,
        images=[make_grid_image(samples, args)],
        token=args.hub_token,
        private=args.hub_private_repo or None,
        num_inference_steps=args.ddpm_num_inference_steps,
        model_card_text=card,
    )


def load_history(output_dir: str, up_to_step: Optional[int] = None) -> List[Dict]:
    path = os.path.join(output_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        history = json.load(f).get("history", [])
    return [h for h in history if up_to_step is None or h.get("step", 0) <= up_to_step]


def write_metrics(accelerator, args, state: TrainState, history: List[Dict], final: Dict, interrupted: bool):
    if not accelerator.is_main_process:
        return
    out = {
        "global_step": state.global_step,
        "images_seen": state.images_seen,
        "interrupted": interrupted,
        "num_processes": accelerator.num_processes,
        "mixed_precision": args.mixed_precision,
        "learning_rate": args.learning_rate,
        "lr_warmup_steps": args.lr_warmup_steps,
        "ema_max_decay": args.ema_max_decay,
        "defaults": args.preset,
        "effective_batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "final": {k: v for k, v in final.items() if not k.startswith("_")},
        "history": history,
    }
    tmp = os.path.join(args.output_dir, METRICS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, os.path.join(args.output_dir, METRICS))


# ----------------------------------------------------------------------------------------------------------------
# 8. The story
# ----------------------------------------------------------------------------------------------------------------
def train(
    args: argparse.Namespace, should_stop: Callable[[int], bool] = lambda step: False, argv: Optional[List[str]] = None
) -> Dict:
    """Run the training described by `args`; `should_stop(global_step)` asks for a checkpoint-and-exit.

    Returns:
        `dict`: the final metrics (also written to `<output_dir>/metrics.json`), with `"interrupted"`.
    """
    # -- settings and accelerator; a replacement of a previous run that was killed half-way is undone first
    settings = resolve_settings(args)
    output_folder.check_output_dir(settings.output_dir)
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        log_with=None if settings.logger == "none" else settings.logger,
        project_config=ProjectConfiguration(
            project_dir=settings.output_dir, logging_dir=os.path.join(settings.output_dir, settings.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.WARNING)
    if accelerator.is_main_process and output_folder.restore_previous_run(settings.output_dir, settings.logging_dir):
        logger.warning(
            "%s: restored the run that an interrupted --overwrite_output_dir had set aside.", args.output_dir
        )
    accelerator.wait_for_everyone()
    if (
        os.path.isdir(settings.output_dir)
        and os.listdir(settings.output_dir)
        and not settings.overwrite_output_dir
        and settings.resume_from_checkpoint is None
    ):
        raise TrainingError(
            f"--output_dir={settings.output_dir!r} exists and is not empty; pass --overwrite_output_dir "
            "or --resume_from_checkpoint latest."
        )

    # -- data, model and checkpoint: all validated before the output folder is touched
    dataset = load_training_data(settings, accelerator)
    torch.manual_seed(settings.seed)
    model = build_model(settings, settings.num_channels)
    resume_path = resolve_checkpoint(settings.resume_from_checkpoint, settings.output_dir)
    saved, changed = None, []
    if resume_path is not None:
        saved = ckpt.read_checkpoint(resume_path, accelerator.process_index)
        changed = check_resume_flags(resume_path, saved[0], settings, model)

    # -- the output folder: the previous run set aside (overwrite) or its abandoned branch moved aside (resume)
    set_aside = False
    if accelerator.is_main_process:
        if settings.overwrite_output_dir and resume_path is None:
            set_aside = bool(output_folder.set_aside_previous_run(settings.output_dir, settings.logging_dir))
        os.makedirs(settings.output_dir, exist_ok=True)
        if resume_path is not None:
            step = saved[0]["global_step"]
            aside = ckpt.set_aside_later_checkpoints(settings.output_dir, step)
            if aside:
                logger.warning("resuming at update %d: the later checkpoints were moved to %s", step, aside)
            truncate_records(settings.output_dir, step, aside)
    accelerator.wait_for_everyone()
    try:
        return run_training(settings, accelerator, dataset, model, resume_path, saved, changed, should_stop, argv)
    except BaseException:
        if set_aside and accelerator.is_main_process and not list_checkpoints(settings.output_dir):
            output_folder.restore_previous_run(settings.output_dir, settings.logging_dir)
            logger.warning("the new run failed before its first checkpoint: the previous run was put back.")
        raise


def load_training_data(settings: Settings, accelerator: Accelerator):
    """The training set, decoded once (errors in the data are `TrainingError`s naming the file or flag)."""
    try:
        dataset = build_dataset(
            settings.dataset_name,
            settings.train_data_dir,
            settings.resolution,
            settings.num_channels,
            settings.center_crop,
            settings.random_flip,
            settings.dataset_config_name,
            settings.cache_dir,
            settings.skip_broken_images,
            settings.seed,
            settings.image_column,
            settings.label_column,
        )
    except ValueError as err:
        raise TrainingError(str(err)) from err
    if dataset.num_skipped:
        logger.warning("skipped %d unreadable image file(s) (--skip_broken_images).", dataset.num_skipped)
    if settings.max_train_samples is not None:
        dataset.images, dataset.labels = (
            dataset.images[: settings.max_train_samples],
            (None if dataset.labels is None else dataset.labels[: settings.max_train_samples]),
        )
    if settings.num_class_embeds and dataset.labels is None:
        raise TrainingError("--num_class_embeds needs labels, and the dataset has no label column.")
    if len(dataset) < settings.train_batch_size * accelerator.num_processes:
        raise TrainingError(
            f"the dataset has {len(dataset)} images, fewer than one global batch "
            f"(--train_batch_size={settings.train_batch_size} x {accelerator.num_processes} processes)."
        )
    return dataset


def run_training(settings, accelerator, dataset, model, resume_path, saved, changed, should_stop, argv) -> Dict:
    """Prepare, resume, loop over updates, save: `train`'s second half, once the output folder is ours."""
    sampler = EpochSampler(len(dataset), seed=settings.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.train_batch_size,
        sampler=sampler,
        num_workers=settings.dataloader_num_workers,
        drop_last=True,
    )
    run = prepare_training(settings, accelerator, model, dataloader)
    state, ga = run.state, settings.gradient_accumulation_steps
    batches_per_epoch = len(run.dataloader)  # per process
    total_steps = max_train_steps(settings, batches_per_epoch)
    if resume_path is not None:
        load_checkpoint(run, resume_path, saved)
        logger.info("resumed from %s at update %d", resume_path, state.global_step)
        if changed:
            logger.warning("resuming with changed flags (applied): %s", "; ".join(changed))
    elif settings.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s yet: starting from scratch", settings.output_dir)

    writer = None
    if settings.logger != "none":
        accelerator.init_trackers("train_unconditional", config=recorded_flags(settings))
        if accelerator.is_main_process and settings.logger == "tensorboard":
            writer = accelerator.get_tracker("tensorboard", unwrap=True)

    global_batch = settings.train_batch_size * accelerator.num_processes * ga
    logger.info(
        "%d images, %d update(s) of %d images (%d per process x %d process(es) x %d accumulation); lr %g (%s defaults)",
        len(dataset),
        total_steps,
        global_batch,
        settings.train_batch_size,
        accelerator.num_processes,
        ga,
        settings.learning_rate,
        settings.preset,
    )
    metrics_history = load_history(settings.output_dir, state.global_step) if resume_path else []
    last_checkpoint = resume_path
    losses, plateau_checked = LossLog(), False
    progress = tqdm(
        total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process, desc="train"
    )
    tic, images_since = time.perf_counter(), 0

    def flush() -> None:
        """Read the pending losses (one host sync), stop on a non-finite one, log them."""
        nonlocal plateau_checked, tic, images_since
        rows = losses.flush(accelerator)
        check_losses(rows, settings, last_checkpoint)
        if not rows:
            return
        elapsed = time.perf_counter() - tic
        rate = images_since / elapsed if elapsed > 0 else 0.0
        for step, loss in rows:
            accelerator.log({"loss": loss}, step=step)
        logs = {"lr": run.lr_scheduler.get_last_lr()[0], "images_per_s": rate}
        if run.ema is not None:
            logs["ema_decay"] = run.ema.last_decay
        accelerator.log(logs, step=rows[-1][0])
        progress.set_postfix(loss=f"{rows[-1][1]:.4f}", img_s=f"{rate:.0f}")
        if accelerator.is_main_process:
            with open(os.path.join(settings.output_dir, LOSSES), "a") as f:
                f.writelines(json.dumps({"step": s, "loss": v}) + "\n" for s, v in rows)
        if not plateau_checked and len(losses.history) >= LOSS_PLATEAU_CHECK_UPDATE:
            plateau_checked = True
            warning = loss_plateau_warning(losses.history, settings)
            if warning:
                logger.warning(warning)

    run.model.train()
    interrupted, loader = False, None
    while state.global_step < total_steps and not interrupted:
        epoch, skip = divmod(state.micro_step, batches_per_epoch)
        loader = accelerator.skip_first_batches(run.dataloader, skip) if skip else run.dataloader
        # accelerate's loaders re-apply their own iteration count as the epoch on `iter`: set theirs, not only ours.
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            is_update = (state.micro_step + 1) % ga == 0
            micro_step(run, batch, is_update)
            if not is_update:
                continue
            losses.add(state.global_step + 1, update(run))
            images_since += global_batch
            progress.update(1)
            step = state.global_step

            # -- the loss is read every --logging_steps updates and before anything is evaluated or saved
            evaluate = bool(settings.eval_every_steps) and step % settings.eval_every_steps == 0
            due = step % settings.logging_steps == 0 or step >= total_steps
            stop = stop_requested(accelerator, should_stop(step), sync=due)
            checkpoint = step % settings.checkpointing_steps == 0 or stop
            if due or evaluate or checkpoint:
                flush()
            if evaluate:
                metrics_history.append(evaluate_now(accelerator, run.model, run.ema, settings, state, writer)[0])
                accelerator.log(
                    {f"eval/{k}": v for k, v in metrics_history[-1].items() if isinstance(v, float)}, step=step
                )
                write_metrics(accelerator, settings, state, metrics_history, {}, interrupted=False)
                tic, images_since = time.perf_counter(), 0
            if checkpoint:
                last_checkpoint = save_checkpoint(run, settings.output_dir)
                discard_previous_run(accelerator, settings)
            if stop:
                logger.info("stop requested: saved checkpoint-%d, exiting", step)
                interrupted = True
                break
            if step >= total_steps:
                break
        else:  # a full epoch ended: diffusers' per-epoch hooks
            if (epoch + 1) % settings.save_images_epochs == 0 and not settings.eval_every_steps:
                flush()
                evaluate_now(accelerator, run.model, run.ema, settings, state, writer, name=f"epoch_{epoch + 1:04d}")
            if (epoch + 1) % settings.save_model_epochs == 0:
                flush()
                save_pipeline(accelerator, run.model, run.ema, settings, None, model_card_text(settings, argv, {}))
    flush()
    progress.close()

    # -- save: final samples and metrics, the pipeline folder (EMA weights), the Hub
    final = {}
    if not interrupted:
        if state.global_step % settings.checkpointing_steps != 0:
            save_checkpoint(run, settings.output_dir)
            discard_previous_run(accelerator, settings)
        final, samples = evaluate_now(accelerator, run.model, run.ema, settings, state, writer, name="final")
        card = model_card_text(settings, argv, final)
        pipe = save_pipeline(accelerator, run.model, run.ema, settings, samples, card)
        if settings.push_to_hub and accelerator.is_main_process:
            push(pipe, settings, samples, card)
    write_metrics(accelerator, settings, state, metrics_history, final, interrupted)
    # Tear down in order: every process done, DDP (which holds the process group) freed, then the group destroyed.
    accelerator.wait_for_everyone()
    run.model = run.optimizer = run.dataloader = model = dataloader = loader = None
    accelerator.free_memory()
    accelerator.end_training()
    return {**final, "interrupted": interrupted, "global_step": state.global_step}


def discard_previous_run(accelerator, settings: Settings) -> None:
    """The new run has a checkpoint: the run that `--overwrite_output_dir` set aside can go."""
    if accelerator.is_main_process:
        output_folder.discard_previous_run(settings.output_dir)


def stop_requested(accelerator, local: bool, sync: bool = True) -> bool:
    """True when any process wants to stop (SIGTERM or `should_stop`): every process must agree to save.

    With several processes the flags are combined only when `sync` (every `--logging_steps` updates): that is a
    collective operation, which the hot loop does not wait for at every update.
    """
    flag = local or _SIGTERM_RECEIVED
    if accelerator.num_processes == 1:
        return flag
    if not sync:
        return False
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())


_SIGTERM_RECEIVED = False


def _on_sigterm(signum, frame):
    global _SIGTERM_RECEIVED
    _SIGTERM_RECEIVED = True


def main(argv: Optional[List[str]] = None, should_stop: Callable[[int], bool] = lambda step: False) -> Dict:
    """Parse `argv` (default `sys.argv[1:]`) and train; SIGTERM saves a checkpoint and returns cleanly."""
    global _SIGTERM_RECEIVED
    _SIGTERM_RECEIVED = False
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _in_main_thread() else None
    try:
        return train(args, should_stop, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    try:
        main()
    except TrainingError as err:
        print(f"train_unconditional.py: error: {err}", file=sys.stderr)
        sys.exit(2)
