"""Distil a trained diffusion model (the teacher) into a 1-, 2- and 4-step generator (the student).

    accelerate launch training/distill.py --method progressive    # the shipped digits-ddpm teacher, 64 -> 1 step
    accelerate launch training/distill.py --method consistency
    accelerate launch training/distill.py --teacher my_ddpm_folder --method consistency --output_dir runs/my-cd

The story is `train_unconditional.py`'s, run unchanged (settings, data paths, the output folder and its lock,
atomic checkpoints and exact resume, SIGTERM and Ctrl-C, gloo, the loss log): this file adds the flags and a
`DistillationObjective`, the seam through which the story asks what to build, what loss to take, what else to keep in
a checkpoint and what to leave behind.

Why it works: the probability-flow ODE (Song et al. 2021, arXiv:2011.13456, eq. (13)) maps each x_T to one x_0, a
deterministic function the teacher evaluates with many small steps (DDIM with η = 0 is its first-order solver). A
student can learn that function with fewer, larger steps:

- `--method progressive` (Salimans & Ho 2022, arXiv:2202.00512, Algorithm 2): rounds that halve the step count,
  `--start_steps` -> `--final_steps`. In each round one student DDIM step from t to t'' regresses onto two teacher DDIM
  steps t -> t' -> t'' (eq. (8): the x̃ for which one DDIM step from z_t lands on the teacher's z_t''); the student
  starts as the teacher, and becomes the next round's teacher.
- `--method consistency` (Song et al. 2023, arXiv:2303.01469, Algorithm 2): the student f_θ(x_t, t) must agree with
  an EMA target network f_θ⁻ at the point one teacher ODE step (DDIM, or DPM-Solver++(2S) with `--teacher_solver
  dpmpp_2s`, across `--skip_steps` timesteps) closer to the data; the boundary condition f_θ(x, 0) = x is built into the parameterisation.

The student predicts v (`--student_prediction_type`, default `v_prediction`; `sample` is x-prediction), never ε: a
1-step student reads x̂_0 at t = T - 1, where x̂_0 = (x_t - σ_t ε̂)/√ᾱ_t multiplies the network's error by 1/√ᾱ_T (156
for the linear schedule, T = 1000), while x̂_0 = √ᾱ_t x_t - σ_t v̂ does not amplify it (Salimans & Ho, Sec. 4). v
equals ε at low noise, so the student initialised from an ε-teacher starts right where the noise is low and learns the
rest; and v gives the consistency student its boundary condition for free (`schedulers/scheduling_tutorial_distilled`).

Data: the teacher's training data, through the same data flags and paths (default: the built-in digits). Both papers
noise real images: x_t then has exactly the marginal q(x_t) the teacher was trained on. The data-free alternative
(x_t from the teacher's own trajectories, starting from pure noise) needs a full teacher ODE solve per batch, many
times the cost of a training step, and inherits the teacher's errors in q(x_t).

What a run leaves: the usual pipeline folder (`TutorialUnconditionalPipeline` with a `TutorialDistilledScheduler`
whose config records the method and the step counts it was distilled for), so `pipe(num_inference_steps=1)` (or 2, 4)
needs no other argument; with `--method progressive` also `students/<N>-step/`, the student of each round. The model
card names the teacher and the method (and, progressive, the folders of the earlier rounds' students). `--push_to_hub`
uploads the folder and, progressive, every `students/<N>-step/` with it, in one commit: only what the saves wrote.
"""

import argparse
import bisect
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script (`accelerate launch training/distill.py`)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import UNet2DModel

from schedulers import TutorialDistilledScheduler
from schedulers import tutorial_grids as grids
from schedulers import tutorial_math as tm
from training import train_unconditional as story
from training.errors import TrainingError
from training.export import ema_weights, make_grid_image, push
from training.settings import RUN_DEFINING_FLAGS, Settings, build_parser, resolve_settings, uses_digits

logger = logging.getLogger("train_unconditional")

DESCRIPTION = "Distil a trained diffusion model into a 1-, 2- and 4-step generator (progressive or consistency)."
METHODS = ("progressive", "consistency")
STUDENT_PREDICTION_TYPES = ("v_prediction", "sample")  # never epsilon: see the module docstring
LOSS_TYPES = ("pseudo_huber", "l2")
TEACHER_SOLVERS = ("ddim", "dpmpp_2s")  # consistency: the teacher's ODE step across --skip_steps timesteps
DEFAULT_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", "digits-ddpm")
STUDENTS = "students"  # <output_dir>/students/<N>-step/: the student of each progressive round
# --save_images_epochs / --save_model_epochs resolve to this: the story's per-epoch hooks sample with the training
# script's DDIM, not the student's sampler; a distillation run samples and saves at round ends and at the end.
NEVER = 10**9

# A resume with any of these changed is refused (besides the training script's own run-defining flags).
DISTILL_DEFINING_FLAGS = (
    "teacher",
    "method",
    "start_steps",
    "final_steps",
    "steps_per_round",
    "student_prediction_type",
    "skip_steps",
    "teacher_solver",
    "target_ema_decay",
    "loss_type",
    "huber_c",
)
# Training flags that mean nothing here: refused when given, so that no one believes they acted.
NOT_FOR_DISTILLATION = (
    "model_config_name_or_path",
    "num_class_embeds",
    "eval_every_steps",
    "snr_gamma",
)


# ----------------------------------------------------------------------------------------------------------------
# Flags: the training script's parser, our flags added, distillation's defaults
# ----------------------------------------------------------------------------------------------------------------
def build_distill_parser() -> argparse.ArgumentParser:
    p = build_parser(DESCRIPTION)
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--teacher",
        type=str,
        default=DEFAULT_TEACHER,
        help="A saved pipeline folder (ours, or a diffusers DDPMPipeline folder: unet/ and scheduler/); default the "
        "shipped training/pretrained/digits-ddpm.",
    )
    g.add_argument("--method", type=str, default="progressive", choices=METHODS)
    g.add_argument(
        "--student_prediction_type",
        type=str,
        default="v_prediction",
        choices=STUDENT_PREDICTION_TYPES,
        help="What the student predicts (ε is unstable at high noise; see the module docstring).",
    )
    g.add_argument(
        "--sample_steps",
        type=str,
        default="1,2,4",
        help="Step counts the final student is evaluated at (comma-separated); consistency records them in the "
        "scheduler's config.",
    )
    g.add_argument(
        "--sample_timesteps",
        type=str,
        default=None,
        help="consistency: grids that replace the trailing grid of the same length when the student samples, "
        "';'-separated, each comma-separated and descending (e.g. '999,599;999,499,299,149'); recorded in the "
        "scheduler's config as distilled_timesteps, so the folder samples on them with no extra flags.",
    )
    g.add_argument("--start_steps", type=int, default=64, help="progressive: the teacher's DDIM steps in round 1.")
    g.add_argument("--final_steps", type=int, default=1, help="progressive: the last round's student steps.")
    g.add_argument(
        "--steps_per_round",
        type=str,
        default="300",
        help="progressive: optimizer updates per round, one number for every round or one per round, comma-separated "
        "(e.g. 1200,400,400,600: round 1 also turns the ε-teacher into a v-student).",
    )
    g.add_argument(
        "--skip_steps",
        type=int,
        default=20,
        help="consistency: k, the teacher's DDIM step goes from timestep t to t - k (x_0 below 0).",
    )
    g.add_argument(
        "--teacher_solver",
        type=str,
        default="ddim",
        choices=TEACHER_SOLVERS,
        help="consistency: the teacher's step from t to t - k: DDIM (one evaluation, first order) or DPM-Solver++(2S) "
        "(two evaluations, second order; the midpoint in log-SNR), which keeps a larger --skip_steps accurate.",
    )
    g.add_argument(
        "--target_ema_decay", type=float, default=0.95, help="consistency: μ of the target network θ⁻ ← μθ⁻ + (1-μ)θ."
    )
    g.add_argument("--loss_type", type=str, default="pseudo_huber", choices=LOSS_TYPES, help="consistency: d(x, y).")
    g.add_argument(
        "--huber_c",
        type=float,
        default=None,
        help="consistency: c of the pseudo-Huber loss √(‖x-y‖² + c²) - c; default 0.00054 √d (Song & Dhariwal 2023).",
    )
    # Distillation's defaults (fine-tuning a trained model, not training one): a constant, smaller learning rate.
    p.set_defaults(
        output_dir="outputs/digits-distilled",
        learning_rate=2e-4,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=20,
        ema_max_decay=0.999,
        max_train_steps=None,
        checkpointing_steps=500,
    )
    return p


def check_distill_args(args: argparse.Namespace) -> None:
    """Validate distillation's flags at the door (every message names the flag, its value and what is allowed)."""
    given = [name for name in NOT_FOR_DISTILLATION if getattr(args, name) is not None]
    if given:
        raise ValueError(f"--{given[0]}={getattr(args, given[0])!r} does not apply to distillation ({DESCRIPTION})")
    for name in ("start_steps", "final_steps", "skip_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)!r} must be >= 1.")
    parse_steps(args.sample_steps)
    if args.sample_timesteps is not None:
        if args.method != "consistency":
            raise ValueError(
                f"--sample_timesteps={args.sample_timesteps!r} applies to --method consistency only: a progressive "
                "student is distilled on the trailing grids and samples on them."
            )
        parse_grids(args.sample_timesteps)
    per_round = parse_steps(args.steps_per_round, "steps_per_round")
    if args.method == "progressive":
        ratio = args.start_steps // args.final_steps
        if args.start_steps % args.final_steps or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(
                f"--start_steps={args.start_steps} must be --final_steps={args.final_steps} times a power of 2 "
                "(>= 2): each round halves the step count."
            )
        if len(per_round) not in (1, round(math.log2(ratio))):
            raise ValueError(
                f"--steps_per_round={args.steps_per_round!r} must give one number, or one per round "
                f"({round(math.log2(ratio))} rounds from --start_steps={args.start_steps} to "
                f"--final_steps={args.final_steps})."
            )
        if args.max_train_steps is not None:
            raise ValueError(
                f"--max_train_steps={args.max_train_steps} does not apply to --method progressive: the run takes "
                "--steps_per_round updates per round."
            )
    if not 0.0 <= args.target_ema_decay < 1.0:
        raise ValueError(f"--target_ema_decay={args.target_ema_decay!r} must be in [0, 1).")
    if args.huber_c is not None and not (math.isfinite(args.huber_c) and args.huber_c > 0):
        raise ValueError(f"--huber_c={args.huber_c!r} must be a finite number > 0.")


def parse_steps(text: str, flag: str = "sample_steps") -> List[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--{flag}={text!r} must be comma-separated integers, e.g. '1,2,4'.") from None
    if not steps or any(n < 1 for n in steps):
        raise ValueError(f"--{flag}={text!r}: list at least one number, every one >= 1.")
    return steps


def parse_grids(text: Optional[str]) -> Optional[List[List[int]]]:
    """`--sample_timesteps`: ';'-separated grids -> the scheduler's `distilled_timesteps` (checked by it)."""
    if text is None:
        return None
    grids = [parse_steps(part, "sample_timesteps") if part.strip() else [] for part in text.split(";")]
    try:
        TutorialDistilledScheduler(distilled_timesteps=grids)
    except ValueError as error:
        raise ValueError(f"--sample_timesteps={text!r}: {error}") from None
    return grids


def parse_distill_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return story.parse_args(argv, parser=build_distill_parser(), check=check_distill_args)


# ----------------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------------
TEACHER_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "clip_sample",
    "clip_sample_range",
)


def read_teacher(folder: str) -> Dict:
    """The teacher folder's UNet config and scheduler config, checked (before anything is trained)."""
    try:
        unet_config = dict(UNet2DModel.load_config(os.path.join(folder, "unet")))
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            scheduler_config = json.load(f)
    except (OSError, ValueError) as err:
        raise TrainingError(
            f"--teacher={folder!r} is not a pipeline folder with unet/ and scheduler/scheduler_config.json: {err}"
        ) from err
    if unet_config.get("num_class_embeds"):
        raise TrainingError(f"--teacher={folder!r} is class-conditional; distillation takes unconditional teachers.")
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in tm.PREDICTION_TYPES:
        raise TrainingError(
            f"--teacher={folder!r}: prediction_type={prediction_type!r} is not one of {tm.PREDICTION_TYPES}."
        )
    schedule = {k: scheduler_config[k] for k in TEACHER_SCHEDULE_KEYS if k in scheduler_config}
    return {"unet_config": unet_config, "schedule": schedule, "prediction_type": prediction_type}


def teacher_scheduler(teacher: Dict, **config) -> TutorialDistilledScheduler:
    """A `TutorialDistilledScheduler` with the teacher's noise schedule (β's, T, clipping) and `config` on top."""
    return TutorialDistilledScheduler(**{**teacher["schedule"], **config})


# ----------------------------------------------------------------------------------------------------------------
# The objective: what the story trains
# ----------------------------------------------------------------------------------------------------------------
class DistillationObjective(story.DiffusionObjective):
    """The student (initialised from the teacher), its loss, the teacher or target network, the few-step folder."""

    tracker_name = "distill"
    run_defining_flags = RUN_DEFINING_FLAGS + DISTILL_DEFINING_FLAGS

    def __init__(self, argv: Optional[List[str]] = None):
        self.argv = sys.argv[1:] if argv is None else list(argv)  # for the model card's command line

    def resolve_settings(self, args: argparse.Namespace) -> Settings:
        """The training script's resolution, then what the teacher decides: its UNet (the student's architecture),
        resolution, channels and noise schedule; the student's prediction type; the number of updates."""
        self.teacher_info = read_teacher(args.teacher)
        unet_config = self.teacher_info["unet_config"]
        if args.resolution != unet_config["sample_size"]:
            raise TrainingError(
                f"--resolution={args.resolution} differs from the teacher's sample_size={unet_config['sample_size']}."
            )
        schedule = self.teacher_info["schedule"]
        rounds = round(math.log2(args.start_steps // args.final_steps)) if args.method == "progressive" else 0
        given = parse_steps(args.steps_per_round, "steps_per_round")
        per_round = given * rounds if len(given) == 1 else given
        round_ends = [sum(per_round[: r + 1]) for r in range(rounds)]  # global_step at the end of each round
        base = resolve_settings(argparse.Namespace(**{**vars(args), "validation_scheduler": "ddim"}))
        return Settings(
            **{
                **vars(base),
                "unet_config": unet_config,
                "preset": "distillation",
                "num_channels": unet_config["in_channels"],
                "prediction_type": args.student_prediction_type,
                "ddpm_num_steps": schedule.get("num_train_timesteps", 1000),
                "ddpm_beta_schedule": schedule.get("beta_schedule", "linear"),
                "rescale_betas_zero_snr": bool(schedule.get("rescale_betas_zero_snr", False)),
                "teacher_prediction_type": self.teacher_info["prediction_type"],
                "rounds": rounds,
                # one number stays an int, as checkpoints written before per-round budgets recorded it
                "steps_per_round": given[0] if len(set(given)) == 1 else args.steps_per_round,
                "round_ends": round_ends,
                "max_train_steps": round_ends[-1] if rounds else (args.max_train_steps or 2000),
                "ddpm_num_inference_steps": args.final_steps if rounds else min(parse_steps(args.sample_steps)),
                "save_images_epochs": NEVER,
                "save_model_epochs": NEVER,
            }
        )

    def build_model(self, settings: Settings) -> UNet2DModel:
        """The student: the teacher's architecture and weights (Salimans & Ho, Algorithm 2: η ← θ)."""
        student = story.build_model(settings, settings.num_channels)
        teacher = UNet2DModel.from_pretrained(os.path.join(settings.teacher, "unet"))
        student.load_state_dict(teacher.state_dict())
        return student

    def prepare(self, run) -> None:
        """The teacher (progressive) or target network (consistency) and the ᾱ table, on the student's device."""
        settings, device = run.settings, run.accelerator.device
        self.settings = settings
        self.scheduler = teacher_scheduler(self.teacher_info, prediction_type=settings.prediction_type)
        # ᾱ_t for t = 0..T-1, then ᾱ = 1 at index T, which t = -1 (x_0) picks: one table for every level.
        alpha_bar = torch.cat([self.scheduler.alpha_bar, self.scheduler.alpha_bar.new_ones(1)])
        self.alpha_bar = alpha_bar.float().to(device)
        frozen = UNet2DModel.from_config(run.unwrapped.config)
        frozen.load_state_dict(run.unwrapped.state_dict())  # the teacher, or θ⁻ = θ at the start
        self.frozen = frozen.to(device).requires_grad_(False).eval()
        if settings.mixed_precision != "no" and device.type == "cpu":
            from training.precision import use_float32_attention

            use_float32_attention(self.frozen)
        schedule = self.teacher_info["schedule"]
        self.clip_range = float(schedule.get("clip_sample_range", 1.0)) if schedule.get("clip_sample") else None
        self.teacher = None
        if settings.method == "consistency" and settings.teacher_solver == "dpmpp_2s":
            t_mid, alpha_bar_mid = lambda_midpoints(self.scheduler.alpha_bar, settings.skip_steps)
            self.t_mid, self.alpha_bar_mid = t_mid.float().to(device), alpha_bar_mid.float().to(device)
        if settings.method == "consistency":  # the frozen teacher beside the target network θ⁻
            teacher = UNet2DModel.from_pretrained(os.path.join(settings.teacher, "unet"))
            self.teacher = teacher.to(device).requires_grad_(False).eval()

    # -- checkpoints: the teacher of the current round, or the target network ------------------------------------
    def frozen_file(self) -> str:
        return "teacher.safetensors" if self.settings.method == "progressive" else "target.safetensors"

    def checkpoint_tensors(self, run) -> Dict[str, Dict[str, torch.Tensor]]:
        return {self.frozen_file(): self.frozen.state_dict()}

    def load_checkpoint(self, run, tensors) -> None:
        if self.frozen_file() not in tensors:
            raise TrainingError(f"the checkpoint has no {self.frozen_file()}: it was not written by this method.")
        self.frozen.load_state_dict(tensors[self.frozen_file()])

    # -- the losses ---------------------------------------------------------------------------------------------------
    def loss(self, run, batch: Dict, g: Optional[torch.Generator]) -> torch.Tensor:
        if self.settings.method == "progressive":
            return self.progressive_loss(run, batch, g)
        return self.consistency_loss(run, batch, g)

    def round_of(self, step: int) -> int:
        """The progressive round (0-based) that update number `step` + 1 belongs to."""
        return min(bisect.bisect_right(self.settings.round_ends, step), self.settings.rounds - 1)

    def student_steps(self, round_index: int) -> int:
        """N, the student's step count in round `round_index`: `start_steps` / 2^(round + 1)."""
        return self.settings.start_steps >> (round_index + 1)

    def student_folders(self) -> List[str]:
        """`students/<N>-step/` of every round but the last (whose student is the run's own folder), relative to
        `--output_dir` with `/` separators (the paths they get in a Hub repository): the folders the run saves."""
        return [f"{STUDENTS}/{self.student_steps(r)}-step/" for r in range(self.settings.rounds - 1)]

    def progressive_loss(self, run, batch: Dict, g) -> torch.Tensor:
        """Salimans & Ho, Algorithm 2: one student step t -> t'' regresses onto two teacher DDIM steps t -> t' -> t''."""
        settings, x0 = self.settings, batch["images"]
        r = self.round_of(run.state.global_step)
        n = self.student_steps(r)
        teacher_type = settings.teacher_prediction_type if r == 0 else settings.prediction_type
        t, t_mid, t_next = self.progressive_timesteps(n, x0.shape[0], g, x0.device)
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        z_t = q_sample(x0, eps, self.alpha_bar[t])  # eq. (4) of DDPM
        with torch.no_grad():
            target = progressive_target(
                self.frozen, z_t, t, t_mid, t_next, self.alpha_bar, teacher_type, self.clip_range
            )
        x0_hat = model_x0(run.model, z_t, t, self.alpha_bar, settings.prediction_type)
        # "SNR + 1" weighting (Salimans & Ho, Sec. 4): for a v-student exactly ‖v̂ - ṽ‖².
        weight = 1.0 + tm.snr(self.alpha_bar[t].double()).float()
        return (weight * (x0_hat.float() - target.float()).pow(2).mean(dim=(1, 2, 3))).mean()

    def progressive_timesteps(self, n: int, batch_size: int, g, device):
        """Per sample: t on the student's N-step grid, t' the teacher's grid point between, t'' = the student's next.

        The `trailing` grid with 2N steps holds the N-step grid at its even entries (see the scheduler's docstring).
        """
        T = self.settings.ddpm_num_steps
        teacher_grid = grids.spaced_timesteps(2 * n, T, "trailing")
        teacher_next = grids.successor_timesteps(teacher_grid)  # -1: x_0
        i = torch.randint(0, n, (batch_size,), generator=g, device=device)
        teacher_grid, teacher_next = teacher_grid.to(device), teacher_next.to(device)
        t = teacher_grid[2 * i]
        t_mid = teacher_grid[2 * i + 1]
        t_next = teacher_next[2 * i + 1]
        return t, t_mid, t_next

    def consistency_loss(self, run, batch: Dict, g) -> torch.Tensor:
        """Song et al. 2023, Algorithm 2: d(f_θ(x_{t+k}, t+k), f_θ⁻(x̂_t, t)) with x̂_t one teacher DDIM step from
        x_{t+k}; f at the data end is the identity (the boundary condition)."""
        settings, x0 = self.settings, batch["images"]
        T, k = settings.ddpm_num_steps, settings.skip_steps
        t_hi = torch.randint(min(k, T) - 1, T, (x0.shape[0],), generator=g, device=x0.device)
        t_lo = t_hi - k  # -1 and below: the data end
        t_lo = t_lo.clamp(min=-1)
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        z_hi = q_sample(x0, eps, self.alpha_bar[t_hi])
        student, target = consistency_pair(
            run.model,
            self.frozen,
            self.teacher,
            z_hi,
            t_hi,
            t_lo,
            self.alpha_bar,
            settings.teacher_prediction_type,
            settings.prediction_type,
            self.clip_range,
            midpoint=None if settings.teacher_solver == "ddim" else (self.t_mid[t_hi], self.alpha_bar_mid[t_hi]),
        )
        return consistency_distance(student, target, settings.loss_type, settings.huber_c)

    # -- after every update: the target network's EMA, or the next progressive round -----------------------------
    @torch.no_grad()
    def after_update(self, run) -> None:
        settings, step = self.settings, run.state.global_step
        if settings.method == "consistency":
            # θ⁻ ← stopgrad(μ θ⁻ + (1 - μ) θ) (Song et al. 2023, Algorithm 2)
            frozen = list(self.frozen.parameters())
            torch._foreach_lerp_(
                frozen, [p.detach() for p in run.unwrapped.parameters()], 1.0 - settings.target_ema_decay
            )
            return
        if step not in settings.round_ends[:-1]:  # the last round's student is the run's own folder (`finish`)
            return
        # A round ended: save its student, which becomes the next round's teacher and the next student's start.
        r = settings.round_ends.index(step)
        n = self.student_steps(r)
        with ema_weights(run.unwrapped, run.ema):
            self.frozen.load_state_dict(run.unwrapped.state_dict())
        if run.accelerator.is_main_process:
            folder = os.path.join(settings.output_dir, STUDENTS, f"{n}-step")  # one of `student_folders()`
            self.save_folder(self.frozen, folder, [n], None, self.card_text([n], {}, round_steps=n))
        logger.info("progressive round %d done: a %d-step student (saved to %s/%d-step)", r + 1, n, STUDENTS, n)
        # The next round starts from this student.
        run.unwrapped.load_state_dict(self.frozen.state_dict())
        if run.ema is not None:  # the EMA restarts its warm-up from the new start
            torch._foreach_copy_(run.ema.shadow_params, [p.detach() for p in run.unwrapped.parameters()])
            run.ema.optimization_step = 0
        optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
        optimizer.state.clear()  # Adam's moments belong to the previous round's problem

    # -- what the run leaves ----------------------------------------------------------------------------------------
    def distilled_scheduler(self, steps: List[int]) -> TutorialDistilledScheduler:
        return teacher_scheduler(
            self.teacher_info,
            prediction_type=self.settings.prediction_type,
            distillation=self.settings.method,
            distilled_steps=steps,
            distilled_timesteps=parse_grids(self.settings.sample_timesteps),
            clip_sample=True,
        )

    def save_folder(self, unet, folder: str, steps: List[int], samples, card: str):
        """A self-contained pipeline folder of `unet` with the distilled scheduler (main process only)."""
        from custom_pipelines import TutorialUnconditionalPipeline

        export = UNet2DModel.from_config(unet.config)
        export.load_state_dict({k: v.detach().float().cpu() for k, v in unet.state_dict().items()})
        pipe = TutorialUnconditionalPipeline(unet=export, scheduler=self.distilled_scheduler(steps))
        images = None if samples is None else [make_grid_image(samples, self.settings)]
        pipe.save_pretrained(folder, num_inference_steps=min(steps), sample_images=images, model_card_text=card)
        return pipe

    def card_text(self, steps: List[int], metrics: Dict, round_steps: Optional[int] = None) -> str:
        s = self.settings
        method = (
            f"progressive distillation (Salimans & Ho 2022, arXiv:2202.00512): {s.start_steps} teacher DDIM steps "
            f"halved in {s.rounds} round(s) of {s.steps_per_round} updates down to {s.final_steps}"
            if s.method == "progressive"
            else f"consistency distillation (Song et al. 2023, arXiv:2303.01469): teacher "
            f"{'DDIM' if s.teacher_solver == 'ddim' else 'DPM-Solver++(2S)'} step across {s.skip_steps} timesteps, EMA target μ = {s.target_ema_decay:g}, {s.loss_type} loss, "
            f"{s.max_train_steps} updates"
        )
        lines = [
            "## Distillation",
            "",
            f"- teacher: `{os.path.basename(os.path.normpath(s.teacher))}` ({s.teacher_prediction_type}-prediction)",
            f"- method: {method}",
            f"- student: {s.prediction_type}, sampled with `TutorialDistilledScheduler` in {', '.join(map(str, steps))}"
            " step(s): `pipe(num_inference_steps=N)`",
        ]
        if round_steps is not None:
            lines.append(
                f"- this folder: the student of the round that distilled {2 * round_steps} steps into {round_steps}; "
                f"the run's folder holds the final student and, in `{STUDENTS}/<N>-step/`, each earlier round's"
            )
        elif s.method == "progressive" and s.rounds > 1:
            lines.append(
                "- for N steps, sample the N-step student of an earlier round, a pipeline folder of its own (this "
                "folder's student is worse at N steps); `--push_to_hub` uploads them with this folder: "
                + ", ".join(f"`{folder}`" for folder in self.student_folders())
            )
        lines += ["", "```bash", "accelerate launch training/distill.py " + " ".join(self.argv), "```"]
        if metrics:
            lines += ["", "## Metrics (digits classifier feature space)", ""]
            lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items()]
        return "\n".join(lines)

    def finish(self, run, writer, argv) -> Dict:
        """Sample the student (EMA weights) at each `--sample_steps`, score them on the digits, save the folder."""
        from training.grids import save_grid
        from training.metrics import digits_metrics
        from training.sampling import sample_sharded

        settings, accelerator = self.settings, run.accelerator
        steps = [settings.final_steps] if settings.method == "progressive" else parse_steps(settings.sample_steps)
        unet = run.unwrapped
        unet.eval()
        final, samples_by_n = {"step": run.state.global_step}, {}
        with ema_weights(unet, run.ema):
            for n in parse_steps(settings.sample_steps):
                num = settings.eval_num_samples or settings.eval_batch_size
                samples_by_n[n] = sample_sharded(
                    unet, self.distilled_scheduler(steps), num, n, seed=settings.seed, accelerator=accelerator
                )
                if accelerator.is_main_process and uses_digits(settings) and num >= 2:
                    final.update(
                        {f"{k}@{n}": v for k, v in digits_metrics(samples_by_n[n]).items() if isinstance(v, float)}
                    )
            samples = samples_by_n[min(samples_by_n)]
            pipe = None
            if accelerator.is_main_process:
                for n, s in samples_by_n.items():
                    save_grid(
                        s[: settings.eval_batch_size],
                        os.path.join(settings.output_dir, "grids", f"final_{n}-step.png"),
                        scale=4,
                    )
                card = self.card_text(steps, final)
                pipe = self.save_folder(unet, settings.output_dir, steps, samples, card)
                students = self.student_folders() if settings.method == "progressive" else []
                if settings.push_to_hub and students:  # the folders the card points at go up with the folder
                    logger.info("pushing the pipeline folder and %s to the Hub", ", ".join(students))
                    push_with_students(pipe, settings, samples, card, students)
                elif settings.push_to_hub:
                    logger.info("pushing the pipeline folder to the Hub")
                    push(pipe, settings, samples, card)
        return final


def push_with_students(pipe, settings: Settings, samples, card: str, students: List[str]):
    """Upload the final folder and the `students` folders (`students/<N>-step/`) the run saved, in one commit.

    The final folder is saved anew in a staging folder, with the repository named in its card, as `export.push` does.
    Of each student folder only what its save wrote travels (`saved_entries`: `model_index.json`, the card, the code
    files and the folders of the components and samples, which a save replaces whole): never a file of the user's
    there, nor anything else of `--output_dir` (checkpoints, logs, grids, the loss record, a run set aside).

    Returns:
        The `CommitInfo` of `HfApi.upload_folder`.

    Raises:
        `TrainingError`: a student folder holds no save (the card would point at a missing folder); nothing is uploaded.
    """
    import huggingface_hub

    from custom_pipelines.tutorial_pipeline_folder import MODEL_INDEX, saved_entries

    repo_id = settings.hub_model_id or os.path.basename(os.path.normpath(settings.output_dir))
    with tempfile.TemporaryDirectory() as staging:
        pipe.save_pretrained(
            staging,
            num_inference_steps=settings.ddpm_num_inference_steps,
            sample_images=None if samples is None else [make_grid_image(samples, settings)],
            model_card_text=card,
            repo_id=repo_id,
        )
        for student in students:
            source = os.path.join(settings.output_dir, *student.strip("/").split("/"))
            entries = saved_entries(source)
            if MODEL_INDEX not in entries:
                raise TrainingError(
                    f"{source} holds no saved pipeline (no model_index.json), yet the model card points at "
                    f"{student}: nothing was uploaded. The final folder is saved in {settings.output_dir}."
                )
            target = os.path.join(staging, *student.strip("/").split("/"))
            os.makedirs(target)
            for name in entries:
                if os.path.isdir(os.path.join(source, name)):
                    shutil.copytree(os.path.join(source, name), os.path.join(target, name))
                else:
                    shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
        api = huggingface_hub.HfApi(token=settings.hub_token)
        repo_id = api.create_repo(repo_id, private=settings.hub_private_repo or None, exist_ok=True).repo_id
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            commit_message=f"Upload {type(pipe).__name__} and its students ({', '.join(students)})",
        )


# ----------------------------------------------------------------------------------------------------------------
# The math of the targets: pure functions of a frozen network (tested against hand computations)
# ----------------------------------------------------------------------------------------------------------------
def q_sample(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. (4)) with one ᾱ per sample, in x_0's dtype."""
    return tm.q_sample(x0, eps, alpha_bar).to(x0.dtype)


def model_x0(model, z: torch.Tensor, t: torch.Tensor, alpha_bar_table: torch.Tensor, prediction_type: str):
    """x̂_0 = f(z_t, t) of a network predicting `prediction_type`; t = -1 (the data end, ᾱ = 1) gives z itself.

    For v and ε the identity at ᾱ = 1 holds by the algebra (x̂_0 = √ᾱ z - √(1-ᾱ) v̂); the network is still evaluated
    there (at t = 0) so that the batch stays one call, and its output is multiplied by σ = 0.
    """
    out = model(z, t.clamp(min=0)).sample
    x0 = tm.model_output_to_x0(out, z, alpha_bar_table[t].double(), prediction_type).to(z.dtype)
    return torch.where((t < 0).view(-1, *([1] * (z.dim() - 1))), z, x0)


def ddim_step(model, z, t, t_next, alpha_bar_table, prediction_type: str, clip_range: Optional[float]):
    """One deterministic DDIM step z_t -> z_{t'} per sample (DDIM eq. (12), η = 0), as `TutorialDDIMScheduler.step`:
    x̂_0 clipped to ±`clip_range` when given, ε̂ the network's own."""
    out = model(z, t).sample
    alpha_bar = alpha_bar_table[t].double()
    x0, eps = tm.model_output_to_x0_eps(out, z, alpha_bar, prediction_type)
    if clip_range is not None:
        x0 = tm.clip_x0(x0, clip_range)
    alpha_bar_next = alpha_bar_table[t_next].double()
    return (tm.expand_to(alpha_bar_next.sqrt(), z) * x0 + tm.expand_to((1 - alpha_bar_next).sqrt(), z) * eps).to(
        z.dtype
    )


def lambda_midpoints(alpha_bar: torch.Tensor, k: int):
    """For every t = 0..T-1, the fractional timestep r and its ᾱ_r halfway in λ = ½ log SNR between t and t - k
    (timestep 0 where t - k < 0): the midpoints of `dpmpp_2s_step` across k timesteps, tabulated once.

    Args:
        alpha_bar (`torch.Tensor`): ᾱ_0..ᾱ_{T-1}, float64.
        k (`int`): the skip, --skip_steps.

    Returns:
        `(torch.Tensor, torch.Tensor)`: r and ᾱ_r, float64, one per t.
    """
    table = tm.half_log_snr(alpha_bar.double())
    t = torch.arange(table.numel())
    lam_mid = 0.5 * (table[t] + table[(t - k).clamp(min=0)])
    return grids.timestep_at(lam_mid, table), torch.sigmoid(2.0 * lam_mid)  # ᾱ = sigmoid(2λ)


def dpmpp_2s_step(model, z, t, t_next, t_mid, alpha_bar_mid, alpha_bar_table, prediction_type: str, clip_range):
    """One DPM-Solver++(2S) step z_t -> z_{t''} per sample (Lu et al. 2022, arXiv:2211.01095, Algorithm 1 with
    r = ½): a DDIM step to the λ-midpoint u (level r), then the step from z_t with u's x̂_0. In α = √ᾱ, σ = √(1-ᾱ):

        u = (σ_r/σ_t) z_t + (α_r - α_t σ_r/σ_t) D_t,     z_t'' = (σ_t''/σ_t) z_t + (α_t'' - α_t σ_t''/σ_t) D_r

    (e^{-h} = α_t σ_t'' / (σ_t α_t''), so no λ is infinite at the data end: t'' = -1 gives z_t'' = D_r).
    """
    alpha_bar = alpha_bar_table[t].double()
    x0 = tm.model_output_to_x0(model(z, t).sample, z, alpha_bar, prediction_type)
    if clip_range is not None:
        x0 = tm.clip_x0(x0, clip_range)
    a_t, s_t = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    a_r, s_r = alpha_bar_mid.double().sqrt(), (1 - alpha_bar_mid.double()).sqrt()
    u = tm.expand_to(s_r / s_t, z) * z.double() + tm.expand_to(a_r - a_t * s_r / s_t, z) * x0
    x0_mid = tm.model_output_to_x0(model(u.to(z.dtype), t_mid).sample, u, alpha_bar_mid.double(), prediction_type)
    if clip_range is not None:
        x0_mid = tm.clip_x0(x0_mid, clip_range)
    alpha_bar_next = alpha_bar_table[t_next].double()
    a_n, s_n = alpha_bar_next.sqrt(), (1 - alpha_bar_next).sqrt()
    z_next = tm.expand_to(s_n / s_t, z) * z.double() + tm.expand_to(a_n - a_t * s_n / s_t, z) * x0_mid
    return z_next.to(z.dtype)


def consistency_pair(
    student,
    target,
    teacher,
    z_hi,
    t_hi,
    t_lo,
    alpha_bar_table,
    teacher_type: str,
    student_type: str,
    clip_range=None,
    midpoint=None,
):
    """(f_θ(x_{t+k}, t+k), f_θ⁻(x̂_t, t)) of Song et al. 2023, Algorithm 2: x̂_t is one teacher ODE step from x_{t+k},
    DDIM (first order), or DPM-Solver++(2S) when `midpoint` = (r, ᾱ_r) per sample is given (`lambda_midpoints`);
    f at t = -1 (the data end) is the identity. The second is a constant."""
    with torch.no_grad():
        if midpoint is None:
            z_lo = ddim_step(teacher, z_hi, t_hi, t_lo, alpha_bar_table, teacher_type, clip_range)
        else:
            z_lo = dpmpp_2s_step(teacher, z_hi, t_hi, t_lo, *midpoint, alpha_bar_table, teacher_type, clip_range)
        target_x0 = model_x0(target, z_lo, t_lo, alpha_bar_table, student_type)
    return model_x0(student, z_hi, t_hi, alpha_bar_table, student_type), target_x0


def consistency_distance(x: torch.Tensor, y: torch.Tensor, loss_type: str, huber_c: Optional[float] = None):
    """d(x, y) averaged over the batch: `l2` is the mean squared difference; `pseudo_huber` is √(‖x-y‖² + c²) - c with
    c = 0.00054 √d by default (Song & Dhariwal 2023, arXiv:2310.14189, Sec. 3.3), d the dimension of one sample."""
    diff = (x.float() - y.float()).flatten(1)
    if loss_type == "l2":
        return diff.pow(2).mean(dim=1).mean()
    c = huber_c or 0.00054 * math.sqrt(diff.shape[1])
    return (torch.sqrt(diff.pow(2).sum(dim=1) + c * c) - c).mean()


def progressive_target(teacher, z_t, t, t_mid, t_next, alpha_bar_table, prediction_type: str, clip_range=None):
    """x̃ of Salimans & Ho, Algorithm 2: two teacher DDIM steps t -> t' -> t'', then the x̃ for which one DDIM step
    from z_t lands on z_t'':  x̃ = (z_t'' - (σ_t''/σ_t) z_t) / (α_t'' - (σ_t''/σ_t) α_t)  (α = √ᾱ, σ = √(1-ᾱ))."""
    z_mid = ddim_step(teacher, z_t, t, t_mid, alpha_bar_table, prediction_type, clip_range)
    z_next = ddim_step(teacher, z_mid, t_mid, t_next, alpha_bar_table, prediction_type, clip_range)
    a_t, a_n = alpha_bar_table[t].double(), alpha_bar_table[t_next].double()
    ratio = ((1 - a_n) / (1 - a_t)).sqrt()  # σ_t'' / σ_t
    numer = z_next.double() - tm.expand_to(ratio, z_t) * z_t.double()
    return (numer / tm.expand_to(a_n.sqrt() - ratio * a_t.sqrt(), z_t)).to(z_t.dtype)


def main(argv: Optional[List[str]] = None, should_stop=lambda step: False) -> Dict:
    """Parse `argv` and distil; SIGTERM or Ctrl-C saves a checkpoint (the training script's `main`)."""
    return story.main(argv, should_stop, parse=parse_distill_args, objective=DistillationObjective(argv))


if __name__ == "__main__":
    story.run_cli("distill.py", main)
