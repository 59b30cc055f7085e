"""Train a `UNet2DModel` denoiser with accelerate, and leave behind a self-contained pipeline folder.

    accelerate launch training/train_unconditional.py            # built-in digits, 16x16, a few minutes on 2 CPUs
    accelerate launch training/train_unconditional.py --num_class_embeds 10 --cond_drop_prob 0.1   # class-conditional
    accelerate launch training/train_unconditional.py --conditioning super_resolution --sr_factor 4  # SR3, 4x4 -> 16
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 training/train_unconditional.py  # gloo, CPU
    accelerate launch --multi_gpu --num_processes 8 training/train_unconditional.py --train_data_dir imgs \\
        --resolution 64 --model_config_name_or_path my_unet/               # several GPUs, a user's data and model

The flags of diffusers' `examples/unconditional_image_generation/train_unconditional.py` keep their names and
meanings; the rest are additions (seed, max_train_steps, v-prediction, min-SNR weighting, offset noise, zero
terminal SNR, our schedulers, class conditioning, SR3 super-resolution, periodic evaluation). The story is linear:
parse and resolve the settings -> validate data and model -> take over the output folder -> prepare -> loop -> save.

The loss is DDPM's simple objective (Ho et al. 2020, arXiv:2006.11239, eq. (14)) with the target of the chosen
parameterisation (`schedulers.tutorial_math.training_target`), optionally weighted by min-SNR-γ (Hang et al. 2023,
arXiv:2303.09556, eq. (9)). Every random draw of a training step (noise, timesteps, label dropout) comes from a
generator seeded by (seed, micro-batch index, process index), and the data order from (seed, epoch): a resumed run
repeats an uninterrupted one exactly.

Every tensor of the training state (model, optimizer state, EMA, noise-schedule table, loss buffer) lives on
`accelerator.device`; the loop reads numbers from the device only every `--logging_steps` updates and before a
checkpoint (where a non-finite loss stops the run before anything non-finite is saved). On a GPU the throughput
switches default to on (`--data_on_device`, `--channels_last`, `--adam_fused`; `--torch_compile` is asked for): they
act in `training/training_run.py` and change no number of the run beyond a kernel's rounding.

Where things live: flags and their resolution in `settings.py`, the run's state and its preparation in
`training_run.py`, the loss record in `loss_log.py`, checkpoints in `checkpoints.py`, export and the model card in
`export.py`; this file is the story and the loss.
"""

import argparse
import contextlib
import logging
import os
import signal
import sys
from typing import Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script (`accelerate launch training/train_unconditional.py`)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list
from tqdm.auto import tqdm

from schedulers import tutorial_math as tm
from training import checkpoints as ckpt
from training import output_folder
from training.checkpoints import (  # noqa: F401  (this module's API since the split)
    check_resume_flags,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    truncate_records,
)
from training.errors import TrainingError
from training.export import (  # noqa: F401
    ema_weights,
    evaluate_now,
    load_history,
    model_card_text,
    push,
    save_pipeline,
    validation_samples,
    write_metrics,
)
from training.loss_log import LossLog
from training.model import build_model
from training.precision import resolve_mixed_precision, uses_cpu  # noqa: F401
from training.settings import (  # noqa: F401
    RUN_DEFINING_FLAGS,
    Settings,
    make_scheduler,
    parse_args,
    recorded_flags,
    resolve_settings,
)
from training.super_resolution import is_super_resolution, noisy_condition
from training.training_run import TrainingRun, load_training_data, max_train_steps, prepare_training

logger = logging.getLogger("train_unconditional")


# ----------------------------------------------------------------------------------------------------------------
# The loss of one micro-batch
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
    model_input = x_t
    if is_super_resolution(args):  # SR3: x_t, then the noised A⁺ y; the noise level is the label
        cond, class_labels = noisy_condition(x0, args.sr_factor, args.sr_noise_level_max, table, g)
        model_input = torch.cat([x_t, cond], dim=1)
    model_output = model(model_input, t, class_labels=class_labels).sample

    per_sample = (model_output.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:
        # min-SNR-γ: w_t = min(SNR_t, γ) / SNR_t for ε, / (SNR_t + 1) for v, and min(SNR_t, γ) for x_0.
        snr_t = tm.snr(alpha_bar.double())
        clipped = snr_t.clamp(max=args.snr_gamma)
        weight = {"epsilon": clipped / snr_t, "v_prediction": clipped / (snr_t + 1), "sample": clipped}
        per_sample = per_sample * weight[args.prediction_type].float()
    return per_sample.mean()


class DiffusionObjective:
    """What the story trains and leaves behind: a UNet from the flags, DDPM's loss, the EMA weights as a pipeline folder.

    The one seam of the story (`train`): `training/distill.py` passes its own objective (a teacher, a distillation
    loss, extra checkpoint tensors, a few-step pipeline folder) and reuses everything else unchanged: settings, data
    paths, the output folder, checkpoints and exact resume, signals, the loss log. Methods are called in this order:
    `resolve_settings` (once), `build_model`, `prepare` (after `prepare_training`), `load_checkpoint` (on resume),
    then `loss` per micro-batch, `after_update` per update, `checkpoint_tensors` per checkpoint, `finish` at the end.
    """

    tracker_name = "train_unconditional"  # the trackers' project name
    run_defining_flags = RUN_DEFINING_FLAGS  # a resume with one of these changed is refused
    vae = None  # the frozen AutoencoderKL samples are decoded through (`training/latent.py`); None: pixel space
    trains_on_latents = False  # `--vae` is refused unless the objective encodes the batches (LatentDiffusionObjective)

    def resolve_settings(self, args: argparse.Namespace) -> Settings:
        return resolve_settings(args)

    def build_model(self, settings: Settings):
        return build_model(settings, settings.num_channels)

    def prepare(self, run: TrainingRun) -> None:
        """Place what the objective holds besides the model on `run.accelerator.device` (nothing here)."""

    def load_checkpoint(self, run: TrainingRun, tensors: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Restore the objective's own tensors from a checkpoint's files (none here)."""

    def loss(self, run: TrainingRun, batch: Dict, g: Optional[torch.Generator]) -> torch.Tensor:
        return diffusion_loss(run.model, run.noise_scheduler, batch, run.settings, g, run.alpha_bar)

    def after_update(self, run: TrainingRun) -> None:
        """Called after every update (optimizer, EMA, `run.state` counted), before its checkpoint (nothing here)."""

    def checkpoint_tensors(self, run: TrainingRun) -> Dict[str, Dict[str, torch.Tensor]]:
        """The objective's own checkpoint files, file name -> tensors (none here)."""
        return {}

    def finish(self, run: TrainingRun, writer, argv: Optional[List[str]]) -> Dict:
        """The final evaluation (EMA weights), the pipeline folder with its model card, the Hub; returns the metrics."""
        settings, accelerator = run.settings, run.accelerator
        logger.info("final evaluation at update %d", run.state.global_step)
        final, samples = evaluate_now(
            accelerator, run.model, run.ema, settings, run.state, writer, name="final", vae=self.vae
        )
        card = model_card_text(settings, argv, final)
        pipe = save_pipeline(accelerator, run.model, run.ema, settings, samples, card, vae=self.vae)
        if settings.push_to_hub and accelerator.is_main_process:
            logger.info("pushing the pipeline folder to the Hub")
            push(pipe, settings, samples, card)
        return final


# ----------------------------------------------------------------------------------------------------------------
# One update
# ----------------------------------------------------------------------------------------------------------------
def micro_step(run: TrainingRun, batch: Dict, is_update: bool) -> None:
    """Forward and backward of one micro-batch; its loss joins `run.update_loss` (on the device, not read)."""
    settings, accelerator = run.settings, run.accelerator
    ga = settings.gradient_accumulation_steps
    g = step_generator(settings.seed, run.state.micro_step, accelerator.process_index, batch["images"].device)
    with contextlib.nullcontext() if is_update else accelerator.no_sync(run.model):
        loss = run.objective.loss(run, batch, g)
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
    run.objective.after_update(run)
    return loss


# ----------------------------------------------------------------------------------------------------------------
# The story
# ----------------------------------------------------------------------------------------------------------------
def default_objective(args: argparse.Namespace) -> DiffusionObjective:
    """DDPM's objective on pixels, or on a VAE's latents with `--vae` (`training/latent.py`)."""
    if getattr(args, "vae", None):
        from training.latent import LatentDiffusionObjective

        return LatentDiffusionObjective()
    return DiffusionObjective()


def train(
    args: argparse.Namespace,
    should_stop: Callable[[int], bool] = lambda step: False,
    argv: Optional[List[str]] = None,
    objective: Optional[DiffusionObjective] = None,
) -> Dict:
    """Run the training described by `args`; `should_stop(global_step)` asks for a checkpoint-and-exit.

    `objective` (default `DiffusionObjective()`) is what is trained and saved; `training/distill.py` passes its own.

    Returns:
        `dict`: the final metrics (also written to `<output_dir>/metrics.json`), with `"interrupted"`.
    """
    # -- settings and accelerator; the output folder is held by this run until it ends
    objective = objective or default_objective(args)
    if getattr(args, "vae", None) and not objective.trains_on_latents:
        raise TrainingError(f"--vae={args.vae!r}: {type(objective).__name__} does not train on latents.")
    settings = objective.resolve_settings(args)
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
    with output_folder.held_by_this_run(accelerator, settings.output_dir):  # a second run into the folder stops here
        return take_over_and_run(settings, accelerator, should_stop, argv, objective)


def take_over_and_run(settings: Settings, accelerator, should_stop, argv, objective: DiffusionObjective) -> Dict:
    """Validate, take over the output folder (undoing a killed replacement first), then run: `train` once the folder
    is held by this run."""
    if accelerator.is_main_process and output_folder.restore_previous_run(settings.output_dir, settings.logging_dir):
        logger.warning(
            "%s: restored the run that an interrupted --overwrite_output_dir had set aside.", settings.output_dir
        )
    accelerator.wait_for_everyone()
    output_folder.check_shared_output_dir(accelerator, settings.output_dir)
    not_empty = not output_folder.is_empty(settings.output_dir)
    not_empty = broadcast_object_list([not_empty])[0]  # the main process decides, so every process raises or none
    if not_empty and not settings.overwrite_output_dir and settings.resume_from_checkpoint is None:
        raise TrainingError(
            f"--output_dir={settings.output_dir!r} exists and is not empty; pass --overwrite_output_dir "
            "or --resume_from_checkpoint latest."
        )

    # -- data, model and checkpoint: all validated before the output folder is touched
    dataset = load_training_data(settings, accelerator)
    torch.manual_seed(settings.seed)
    model = objective.build_model(settings)
    resume_path = resolve_checkpoint(settings.resume_from_checkpoint, settings.output_dir)
    saved, changed = None, []
    if resume_path is not None:
        saved = ckpt.read_checkpoint(resume_path, accelerator.process_index)
        changed = check_resume_flags(resume_path, saved[0], settings, model, objective.run_defining_flags)

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
        return run_training(
            settings, accelerator, dataset, model, resume_path, saved, changed, should_stop, argv, objective
        )
    except BaseException:
        if set_aside and accelerator.is_main_process and not list_checkpoints(settings.output_dir):
            output_folder.restore_previous_run(settings.output_dir, settings.logging_dir)
            logger.warning("the new run failed before its first checkpoint: the previous run was put back.")
        raise


def run_training(
    settings, accelerator, dataset, model, resume_path, saved, changed, should_stop, argv, objective
) -> Dict:
    """Prepare, resume, loop over updates, save: `train`'s second half, once the output folder is ours."""
    run = prepare_training(settings, accelerator, model, dataset)
    run.objective = objective
    objective.prepare(run)
    total_steps = max_train_steps(settings, len(run.batches))
    if resume_path is not None:
        load_checkpoint(run, resume_path, saved)
        objective.load_checkpoint(run, saved[1])
        logger.info("resumed from %s at update %d", resume_path, run.state.global_step)
        if changed:
            logger.warning("resuming with changed flags (applied): %s", "; ".join(changed))
    elif settings.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s yet: starting from scratch", settings.output_dir)
    writer = None
    if settings.logger != "none":
        accelerator.init_trackers(objective.tracker_name, config=recorded_flags(settings))
        if accelerator.is_main_process and settings.logger == "tensorboard":
            writer = accelerator.get_tracker("tensorboard", unwrap=True)
    logger.info(
        "%s images, %d update(s) of %d images (%d per process x %d process(es) x %d accumulation); lr %g (%s defaults)",
        "streamed" if settings.streaming else len(dataset),
        total_steps,
        settings.train_batch_size * accelerator.num_processes * settings.gradient_accumulation_steps,
        settings.train_batch_size,
        accelerator.num_processes,
        settings.gradient_accumulation_steps,
        settings.learning_rate,
        settings.preset,
    )
    history = load_history(settings.output_dir, run.state.global_step) if resume_path else []
    progress = tqdm(
        total=total_steps, initial=run.state.global_step, disable=not accelerator.is_local_main_process, desc="train"
    )
    losses = LossLog(run, progress)
    losses.last_checkpoint = resume_path
    interrupted = train_loop(run, total_steps, losses, history, writer, should_stop, argv)
    progress.close()

    # -- save: final samples and metrics, the pipeline folder (EMA weights), the Hub
    final = {}
    if not interrupted:
        if run.state.global_step % settings.checkpointing_steps != 0:
            logger.info("final checkpoint: saving checkpoint-%d", run.state.global_step)
            save_checkpoint(run, settings.output_dir)
            discard_previous_run(accelerator, settings)
        final = objective.finish(run, writer, argv)
    write_metrics(accelerator, settings, run.state, history, final, interrupted)
    # Tear down in order: every process done, DDP (which holds the process group) freed, then the group destroyed.
    accelerator.wait_for_everyone()
    state = run.state
    run.model = run.optimizer = run.batches = model = None
    accelerator.free_memory()
    accelerator.end_training()
    return {**final, "interrupted": interrupted, "global_step": state.global_step}


def train_loop(
    run: TrainingRun, total_steps: int, losses: LossLog, history: List[Dict], writer, should_stop, argv
) -> bool:
    """Micro-batches grouped into updates until `total_steps`; epochs only set the data order. Returns whether a
    stop was requested (SIGTERM, Ctrl-C or `should_stop`), after which a checkpoint has been saved."""
    settings, accelerator, state = run.settings, run.accelerator, run.state
    ga, batches_per_epoch = settings.gradient_accumulation_steps, len(run.batches)
    global_batch = settings.train_batch_size * accelerator.num_processes * ga
    run.model.train()
    while state.global_step < total_steps:
        epoch, skip = divmod(state.micro_step, batches_per_epoch)
        for batch in run.batches.epoch(epoch, skip):
            is_update = (state.micro_step + 1) % ga == 0
            micro_step(run, batch, is_update)
            if not is_update:
                continue
            losses.add(state.global_step + 1, update(run), global_batch)
            losses.progress.update(1)
            step = state.global_step

            # -- the loss is read every --logging_steps updates and before anything is evaluated or saved
            evaluate = bool(settings.eval_every_steps) and step % settings.eval_every_steps == 0
            due = step % settings.logging_steps == 0 or step >= total_steps
            stop = stop_requested(accelerator, should_stop(step), sync=due)
            checkpoint = step % settings.checkpointing_steps == 0 or stop
            if due or evaluate or checkpoint:
                losses.flush()
            if evaluate:
                history.append(
                    evaluate_now(accelerator, run.model, run.ema, settings, state, writer, vae=run.objective.vae)[0]
                )
                accelerator.log({f"eval/{k}": v for k, v in history[-1].items() if isinstance(v, float)}, step=step)
                write_metrics(accelerator, settings, state, history, {}, interrupted=False)
                losses.reset_clock()
            if checkpoint:
                losses.last_checkpoint = save_checkpoint(run, settings.output_dir)
                discard_previous_run(accelerator, settings)
            if stop:
                logger.info(
                    "%s: saved %s at update %d; continue with --resume_from_checkpoint latest (same --output_dir)",
                    _stop_reason(),
                    losses.last_checkpoint,
                    step,
                )
                return True
            if step >= total_steps:
                break
        else:  # a full epoch ended: diffusers' per-epoch hooks
            if (epoch + 1) % settings.save_images_epochs == 0 and not settings.eval_every_steps:
                losses.flush()
                name = f"epoch_{epoch + 1:04d}"
                evaluate_now(
                    accelerator, run.model, run.ema, settings, state, writer, name=name, vae=run.objective.vae
                )
            if (epoch + 1) % settings.save_model_epochs == 0:
                losses.flush()
                card = model_card_text(settings, argv, {})
                save_pipeline(accelerator, run.model, run.ema, settings, None, card, vae=run.objective.vae)
    losses.flush()
    return False


def discard_previous_run(accelerator, settings: Settings) -> None:
    """The new run has a checkpoint: the run that `--overwrite_output_dir` set aside can go."""
    if accelerator.is_main_process:
        output_folder.discard_previous_run(settings.output_dir)


def stop_requested(accelerator, local: bool, sync: bool = True) -> bool:
    """True when any process wants to stop (SIGTERM, Ctrl-C or `should_stop`): every process must agree to save.

    With several processes the flags are combined only when `sync` (every `--logging_steps` updates): that is a
    collective operation, which the hot loop does not wait for at every update.
    """
    flag = local or _STOP_SIGNAL is not None
    if accelerator.num_processes == 1:
        return flag
    if not sync:
        return False
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum").item())


# The signal that asked this process to stop (SIGTERM or SIGINT), None until one came; `__main__` derives the exit
# code from it. Only the process that installed the handlers acts: a forked child (a DataLoader worker) ignores them.
_STOP_SIGNAL: Optional[int] = None
_HANDLER_PID: Optional[int] = None
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _on_stop_signal(signum, frame):
    """SIGTERM or a first Ctrl-C: finish the update, save a checkpoint, exit. A second Ctrl-C aborts at once."""
    global _STOP_SIGNAL
    if os.getpid() != _HANDLER_PID:
        return
    if signum == signal.SIGINT and _STOP_SIGNAL is not None:
        raise KeyboardInterrupt
    _STOP_SIGNAL = _STOP_SIGNAL or signum
    if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":  # os.write: no buffered stream in a handler
        os.write(
            sys.stderr.fileno(),
            b"\nCtrl-C: finishing the current update, then saving a checkpoint and exiting "
            b"(press Ctrl-C again to abort at once, without a checkpoint).\n",
        )


def _stop_reason() -> str:
    return {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}.get(_STOP_SIGNAL, "stop requested")


def main(
    argv: Optional[List[str]] = None,
    should_stop: Callable[[int], bool] = lambda step: False,
    parse: Callable[[Optional[List[str]]], argparse.Namespace] = parse_args,
    objective: Optional[DiffusionObjective] = None,
) -> Dict:
    """Parse `argv` (default `sys.argv[1:]`) with `parse` and train `objective`; SIGTERM or a first Ctrl-C saves a
    checkpoint and returns cleanly (`"interrupted": True`); a second Ctrl-C raises `KeyboardInterrupt` at once."""
    global _STOP_SIGNAL, _HANDLER_PID
    _STOP_SIGNAL, _HANDLER_PID = None, os.getpid()
    args = parse(argv)
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS} if _in_main_thread() else {}
    try:
        return train(args, should_stop, argv, objective)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_cli(prog: str, run_main: Callable[[], Dict] = main) -> None:
    """The command line's exit codes: 2 with a one-line message for a `TrainingError`, 130 after a Ctrl-C (the
    run saved a checkpoint but did not finish), 0 otherwise."""
    try:
        metrics = run_main()
    except TrainingError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    if metrics["interrupted"] and _STOP_SIGNAL == signal.SIGINT:
        sys.exit(128 + signal.SIGINT)  # 130, as a shell reports a program stopped by Ctrl-C: the run did not finish


if __name__ == "__main__":
    run_cli("train_unconditional.py")
