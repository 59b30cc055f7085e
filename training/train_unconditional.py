"""Train a `UNet2DModel` denoiser with accelerate, and leave behind a self-contained pipeline folder.

    accelerate launch training/train_unconditional.py            # built-in digits, 16x16, a few minutes on 2 CPUs
    accelerate launch training/train_unconditional.py --num_class_embeds 10 --cond_drop_prob 0.1   # class-conditional
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train_unconditional.py  # gloo, CPU

The flags of diffusers' `examples/unconditional_image_generation/train_unconditional.py` keep their names and
meanings; the rest are additions (seed, max_train_steps, v-prediction, min-SNR weighting, offset noise, zero
terminal SNR, our schedulers, class conditioning, periodic evaluation). The story is linear:
parse args -> data -> model -> prepare -> loop -> save.

The loss is DDPM's simple objective (Ho et al. 2020, arXiv:2006.11239, eq. (14)) with the target of the chosen
parameterisation (`schedulers.tutorial_math.training_target`), optionally weighted by min-SNR-γ (Hang et al. 2023,
arXiv:2303.09556, eq. (9)). Every random draw of a training step (noise, timesteps, label dropout) comes from a
generator seeded by (seed, micro-batch index, process index), and the data order from (seed, epoch): a resumed run
repeats an uninterrupted one exactly.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script (`accelerate launch training/train_unconditional.py`)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers import tutorial_math as tm
from training.data import DIGITS_NUM_CLASSES, EpochSampler, build_dataset

logger = logging.getLogger("train_unconditional")

SCHEDULERS = {"ddpm": TutorialDDPMScheduler, "ddim": TutorialDDIMScheduler}
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE = "training_state.json"
METRICS = "metrics.json"
LOSSES = "losses.jsonl"
GRIDS = "grids"  # sample grids over training; the pipeline's own `samples/` holds the final grid for the card


class TrainingError(ValueError):
    """A problem the user can fix (a flag, a checkpoint, the data); the CLI prints it without a traceback."""


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
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS)
    p.add_argument("--lr_warmup_steps", type=int, default=50)
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
    p.add_argument("--ema_max_decay", type=float, default=0.999)
    # ---- precision, logging, outputs ----
    p.add_argument(
        "--mixed_precision",
        type=str,
        default="auto",
        choices=MIXED_PRECISIONS,
        help="'auto' (the default): bf16 autocast where the hardware computes bf16 natively (a CPU with "
        "AVX512-BF16 or AMX, a CUDA GPU with bf16), otherwise 'no' (float32). On CPU, attention stays in float32.",
    )
    p.add_argument("--logger", type=str, default="tensorboard", choices=("tensorboard", "wandb", "none"))
    p.add_argument("--logging_dir", type=str, default="logs")
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
    if not 0 <= args.cond_drop_prob < 1:
        raise ValueError(f"--cond_drop_prob={args.cond_drop_prob!r} must lie in [0, 1).")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise ValueError(f"--snr_gamma={args.snr_gamma!r} must be > 0.")
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
# 2. Model
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
    # One extra class index, `num_class_embeds`, is the "no label" class of classifier-free guidance.
    num_embeds = args.num_class_embeds + 1 if args.num_class_embeds else None
    if args.model_config_name_or_path is None:
        return UNet2DModel(**default_unet_config(args.resolution, channels, num_embeds))
    config = UNet2DModel.load_config(args.model_config_name_or_path)
    model = UNet2DModel.from_config(config)
    if model.config.in_channels != channels or model.config.sample_size != args.resolution:
        raise TrainingError(
            f"--model_config_name_or_path={args.model_config_name_or_path!r} has in_channels="
            f"{model.config.in_channels}, sample_size={model.config.sample_size}; the data has {channels} "
            f"channel(s) at --resolution={args.resolution}."
        )
    if num_embeds is not None and model.config.num_class_embeds != num_embeds:
        model = UNet2DModel.from_config(config, num_class_embeds=num_embeds)
    return model


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """`--mixed_precision auto` -> 'bf16' where bf16 is native (CPU: AVX512-BF16 or AMX; CUDA: bf16), else 'no'."""
    if requested != "auto":
        return requested
    if cpu or not torch.cuda.is_available():
        # torch.cpu's capability probes are private: a torch without them counts as "no native bf16"
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        native = any(probe() for probe in probes if probe is not None)
    else:
        native = torch.cuda.is_bf16_supported()
    return "bf16" if native else "no"


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
# 3. The loss of one micro-batch
# ----------------------------------------------------------------------------------------------------------------
def step_generator(seed: int, micro_step: int, process_index: int, device) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, micro-batch index, process)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + micro_step * 1_009 + process_index) % (2**63))
    return g


def diffusion_loss(model, noise_scheduler, batch: Dict, args: argparse.Namespace, g: torch.Generator):
    """DDPM's simple loss (eq. (14)) for any parameterisation, with optional min-SNR-γ weights and offset noise."""
    x0 = batch["images"]
    bsz = x0.shape[0]
    eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
    if args.noise_offset:  # offset noise: a per-channel constant shift of ε (Guttenberg 2023)
        eps = eps + args.noise_offset * torch.randn((bsz, x0.shape[1], 1, 1), generator=g, device=x0.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=g, device=x0.device)
    x_t = noise_scheduler.add_noise(x0, eps, t)  # DDPM eq. (4)
    alpha_bar = noise_scheduler.alpha_bar.to(x0.device)[t]
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
# 4. Checkpoints: atomic, rotated, validated
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


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoints (`checkpoint-<step>`), oldest first; `.tmp-*` folders of interrupted saves are ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: TrainState, total_limit: Optional[int]) -> str:
    """Write `checkpoint-<step>` atomically: save into a temporary folder, then rename (one filesystem operation).

    A run killed mid-save leaves only a `.tmp-checkpoint-*` folder behind; the previous checkpoint stays intact.
    After the rename, the oldest checkpoints beyond `total_limit` are deleted.
    """
    final = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{state.global_step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # model, optimizer, registered objects (LR schedule, EMA, TrainState), RNGs
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, TRAINING_STATE), "w") as f:
            json.dump({**state.state_dict(), "num_processes": accelerator.num_processes}, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(output_dir):  # leftovers of saves that were killed
            if name.startswith(".tmp-checkpoint-") and os.path.join(output_dir, name) != tmp:
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(resume: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint folder to resume from: `None`, `'latest'` (None when there is none yet) or a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = resume if os.path.isabs(resume) or os.path.exists(resume) else os.path.join(output_dir, resume)
    if not os.path.isdir(path):
        raise TrainingError(f"--resume_from_checkpoint={resume!r}: no checkpoint folder at {path!r}.")
    return path


def load_checkpoint(accelerator: Accelerator, path: str, state: TrainState) -> None:
    """Restore everything `save_checkpoint` wrote; a damaged folder raises `TrainingError` naming what is wrong."""
    meta = os.path.join(path, TRAINING_STATE)
    if not os.path.isfile(meta):
        raise TrainingError(f"checkpoint {path!r} is incomplete or corrupt: {TRAINING_STATE} is missing.")
    try:
        with open(meta) as f:
            saved = json.load(f)
        accelerator.load_state(path)
    except Exception as err:
        raise TrainingError(
            f"checkpoint {path!r} is corrupt and cannot be loaded: {type(err).__name__}: {err}"
        ) from err
    if saved.get("num_processes") != accelerator.num_processes:
        logger.warning(
            "checkpoint %s was written by %s process(es), resuming with %s: the data order differs.",
            path,
            saved.get("num_processes"),
            accelerator.num_processes,
        )
    if state.global_step != saved["global_step"]:
        raise TrainingError(
            f"checkpoint {path!r} is inconsistent: {TRAINING_STATE} says step "
            f"{saved['global_step']}, the saved state says {state.global_step}."
        )


# ----------------------------------------------------------------------------------------------------------------
# 5. Validation samples, the pipeline folder, metrics
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ema_weights(model, ema: Optional[EMAModel]):
    """Temporarily load the EMA weights into `model`."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())


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


def uses_digits(args) -> bool:
    return args.dataset_name in (None, "digits") and args.train_data_dir is None


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
    ]
    if metrics:
        lines += ["## Metrics (digits classifier feature space)", ""]
        lines += [
            f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
            for k, v in metrics.items()
            if not isinstance(v, (list, dict))
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 6. The story
# ----------------------------------------------------------------------------------------------------------------
def train(
    args: argparse.Namespace, should_stop: Callable[[int], bool] = lambda step: False, argv: Optional[List[str]] = None
) -> Dict:
    """Run the training described by `args`; `should_stop(global_step)` asks for a checkpoint-and-exit.

    Returns:
        `dict`: the final metrics (also written to `<output_dir>/metrics.json`), with `"interrupted"`.
    """
    # -- accelerator, output folder, logging
    if (
        os.path.isdir(args.output_dir)
        and os.listdir(args.output_dir)
        and not args.overwrite_output_dir
        and args.resume_from_checkpoint is None
    ):
        raise TrainingError(
            f"--output_dir={args.output_dir!r} exists and is not empty; pass --overwrite_output_dir "
            "or --resume_from_checkpoint latest."
        )
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    args.mixed_precision = resolve_mixed_precision(args.mixed_precision, cpu)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.WARNING)
    if accelerator.is_main_process:
        if args.overwrite_output_dir and args.resume_from_checkpoint is None and os.path.isdir(args.output_dir):
            shutil.rmtree(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    # -- data: decoded once, a deterministic order per (seed, epoch)
    channels = args.num_channels or (1 if uses_digits(args) else 3)
    try:
        dataset = build_dataset(
            args.dataset_name,
            args.train_data_dir,
            args.resolution,
            channels,
            args.center_crop,
            args.random_flip,
            args.dataset_config_name,
            args.cache_dir,
            args.skip_broken_images,
            args.seed,
            args.image_column,
            args.label_column,
        )
    except ValueError as err:
        raise TrainingError(str(err)) from err
    if dataset.num_skipped:
        logger.warning("skipped %d unreadable image file(s) (--skip_broken_images).", dataset.num_skipped)
    if args.max_train_samples is not None:
        dataset.images, dataset.labels = (
            dataset.images[: args.max_train_samples],
            (None if dataset.labels is None else dataset.labels[: args.max_train_samples]),
        )
    if args.num_class_embeds and dataset.labels is None:
        raise TrainingError("--num_class_embeds needs labels, and the dataset has no label column.")
    if len(dataset) < args.train_batch_size * accelerator.num_processes:
        raise TrainingError(
            f"the dataset has {len(dataset)} images, fewer than one global batch "
            f"(--train_batch_size={args.train_batch_size} x {accelerator.num_processes} processes)."
        )
    sampler = EpochSampler(len(dataset), seed=args.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )

    # -- model, noise schedule, optimizer, LR schedule, EMA
    torch.manual_seed(args.seed)
    model = build_model(args, channels)
    if args.mixed_precision != "no" and accelerator.device.type == "cpu":
        use_float32_attention(model)
    noise_scheduler = make_scheduler(args, args.train_scheduler)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    ema = None
    if args.use_ema:
        ema = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=model.config,
        )

    # -- prepare (DDP / device placement / autocast); the LR schedule is stepped once per update, by us
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    batches_per_epoch = len(dataloader)  # per process
    ga = args.gradient_accumulation_steps
    max_train_steps = args.max_train_steps or (args.num_epochs * batches_per_epoch) // ga
    if max_train_steps < 1:
        raise TrainingError(f"--num_epochs={args.num_epochs} gives no full update of {ga} batch(es).")
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
    )
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # -- resume
    resume_path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path, state)
        logger.info("resumed from %s at step %d", resume_path, state.global_step)
    elif args.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s yet: starting from scratch", args.output_dir)

    # -- trackers
    writer = None
    if args.logger != "none":
        accelerator.init_trackers(
            "train_unconditional",
            config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
        )
        if accelerator.is_main_process and args.logger == "tensorboard":
            writer = accelerator.get_tracker("tensorboard", unwrap=True)

    # -- the loop: micro-batches grouped into updates, epochs only set the data order
    global_batch = args.train_batch_size * accelerator.num_processes * ga
    logger.info(
        "%d images, %d update(s) of %d images (%d per process x %d process(es) x %d accumulation)",
        len(dataset),
        max_train_steps,
        global_batch,
        args.train_batch_size,
        accelerator.num_processes,
        ga,
    )
    metrics_history = load_history(args.output_dir) if resume_path else []
    progress = tqdm(
        total=max_train_steps, initial=state.global_step, disable=not accelerator.is_local_main_process, desc="train"
    )
    model.train()
    interrupted, loader = False, None
    tic, images_since = time.perf_counter(), 0
    while state.global_step < max_train_steps and not interrupted:
        epoch, skip = divmod(state.micro_step, batches_per_epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        # accelerate's loaders re-apply their own iteration count as the epoch on `iter`: set theirs, not only ours.
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        update_loss = 0.0
        for batch in loader:
            is_update = (state.micro_step + 1) % ga == 0
            g = step_generator(args.seed, state.micro_step, accelerator.process_index, batch["images"].device)
            with contextlib.nullcontext() if is_update else accelerator.no_sync(model):
                loss = diffusion_loss(model, noise_scheduler, batch, args, g)
                accelerator.backward(loss / ga)
            update_loss += loss.detach().float() / ga
            state.micro_step += 1
            if not is_update:
                continue

            # -- one optimizer update
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(accelerator.unwrap_model(model).parameters())
            state.global_step += 1
            state.images_seen += global_batch
            images_since += global_batch

            # -- logging: the loss averaged over processes
            mean_loss = accelerator.reduce(update_loss.reshape(1), reduction="mean").item()
            update_loss = 0.0
            elapsed = time.perf_counter() - tic
            logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "images_per_s": images_since / elapsed}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{logs['images_per_s']:.0f}")
            accelerator.log(logs, step=state.global_step)
            if accelerator.is_main_process:
                with open(os.path.join(args.output_dir, LOSSES), "a") as f:
                    f.write(json.dumps({"step": state.global_step, "loss": mean_loss}) + "\n")

            # -- periodic evaluation, checkpoints, stop requests
            if args.eval_every_steps and state.global_step % args.eval_every_steps == 0:
                metrics_history.append(evaluate_now(accelerator, model, ema, args, state, writer)[0])
                accelerator.log(
                    {f"eval/{k}": v for k, v in metrics_history[-1].items() if isinstance(v, float)},
                    step=state.global_step,
                )
                write_metrics(accelerator, args, state, metrics_history, {}, interrupted=False)
                tic, images_since = time.perf_counter(), 0
            stop = stop_requested(accelerator, should_stop(state.global_step))
            if state.global_step % args.checkpointing_steps == 0 or stop:
                save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)
            if stop:
                logger.info("stop requested: saved checkpoint-%d, exiting", state.global_step)
                interrupted = True
                break
            if state.global_step >= max_train_steps:
                break
        else:  # a full epoch ended: diffusers' per-epoch hooks
            if (epoch + 1) % args.save_images_epochs == 0 and not args.eval_every_steps:
                evaluate_now(accelerator, model, ema, args, state, writer, name=f"epoch_{epoch + 1:04d}")
            if (epoch + 1) % args.save_model_epochs == 0:
                save_pipeline(accelerator, model, ema, args, None, model_card_text(args, argv, {}))
    progress.close()

    # -- save: final samples and metrics, the pipeline folder (EMA weights), the Hub
    final = {}
    if not interrupted:
        if state.global_step % args.checkpointing_steps != 0:
            save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)
        final, samples = evaluate_now(accelerator, model, ema, args, state, writer, name="final")
        card = model_card_text(args, argv, final)
        pipe = save_pipeline(accelerator, model, ema, args, samples, card)
        if args.push_to_hub and accelerator.is_main_process:
            push(pipe, args, samples, card)
    write_metrics(accelerator, args, state, metrics_history, final, interrupted)
    # Tear down in order: every process done, DDP (which holds the process group) freed, then the group destroyed.
    accelerator.wait_for_everyone()
    del model, optimizer, dataloader, loader
    accelerator.free_memory()
    accelerator.end_training()
    return {**final, "interrupted": interrupted, "global_step": state.global_step}


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


def stop_requested(accelerator, local: bool) -> bool:
    """True when any process wants to stop (SIGTERM or `should_stop`): every process must agree to save."""
    flag = local or _SIGTERM_RECEIVED
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())


def load_history(output_dir: str) -> List[Dict]:
    path = os.path.join(output_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f).get("history", [])


def write_metrics(accelerator, args, state: TrainState, history: List[Dict], final: Dict, interrupted: bool):
    if not accelerator.is_main_process:
        return
    out = {
        "global_step": state.global_step,
        "images_seen": state.images_seen,
        "interrupted": interrupted,
        "num_processes": accelerator.num_processes,
        "mixed_precision": args.mixed_precision,
        "effective_batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "final": {k: v for k, v in final.items() if not k.startswith("_")},
        "history": history,
    }
    tmp = os.path.join(args.output_dir, METRICS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, os.path.join(args.output_dir, METRICS))


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
