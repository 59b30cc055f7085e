"""The loss record of a training run: per-update losses kept on the device and read every `--logging_steps` updates.

Reading them is the training loop's only regular host synchronisation. A read checks that every loss is finite (a
non-finite one stops the run before anything non-finite is saved), writes `losses.jsonl`, the trackers and the
progress bar, and once warns when the loss has not fallen (`loss_plateau_warning`).
"""

import json
import logging
import math
import os
import time
from typing import List, Optional, Tuple

import torch

from training.errors import TrainingError
from training.output_folder import LOSSES
from training.settings import Settings

logger = logging.getLogger("train_unconditional")

# The loss must have fallen by then: the mean of updates (N - 49 .. N) below LOSS_PLATEAU_RATIO x that of 1 .. 10.
LOSS_PLATEAU_CHECK_UPDATE = 300
LOSS_PLATEAU_RATIO = 0.8


class LossLog:
    """Per-update losses kept on the device and read every `--logging_steps` updates (the loop's only regular host
    synchronisation): checked for finiteness, written to `losses.jsonl`, the trackers and the progress bar.

    Args:
        run (`TrainingRun`): the run whose losses these are (its accelerator, settings, LR schedule and EMA are read).
        progress (`tqdm`): the progress bar that shows the latest loss and images/s.
    """

    def __init__(self, run, progress):
        self.run, self.progress = run, progress
        self.pending: List[Tuple[int, torch.Tensor]] = []
        self.history: List[float] = []  # every update's loss in this process (for the plateau warning)
        self.plateau_checked = False
        self.last_checkpoint: Optional[str] = None  # named when the run diverges
        self.reset_clock()

    def reset_clock(self) -> None:
        self.tic, self.images = time.perf_counter(), 0

    def add(self, step: int, loss: torch.Tensor, images: int) -> None:
        self.pending.append((step, loss))
        self.images += images

    def read(self, accelerator) -> List[Tuple[int, float]]:
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

    def flush(self) -> None:
        """Read the pending losses, stop on a non-finite one (`check_losses`), log them, warn on a plateau."""
        run, accelerator, settings = self.run, self.run.accelerator, self.run.settings
        rows = self.read(accelerator)
        check_losses(rows, settings, self.last_checkpoint)
        if not rows:
            return
        elapsed = time.perf_counter() - self.tic
        rate = self.images / elapsed if elapsed > 0 else 0.0
        for step, loss in rows:
            accelerator.log({"loss": loss}, step=step)
        logs = {"lr": run.lr_scheduler.get_last_lr()[0], "images_per_s": rate}
        if run.ema is not None:
            logs["ema_decay"] = run.ema.last_decay
        accelerator.log(logs, step=rows[-1][0])
        self.progress.set_postfix(loss=f"{rows[-1][1]:.4f}", img_s=f"{rate:.0f}")
        if accelerator.is_main_process:
            with open(os.path.join(settings.output_dir, LOSSES), "a") as f:
                f.writelines(json.dumps({"step": s, "loss": v}) + "\n" for s, v in rows)
        if not self.plateau_checked and len(self.history) >= LOSS_PLATEAU_CHECK_UPDATE:
            self.plateau_checked = True
            warning = loss_plateau_warning(self.history, settings)
            if warning:
                logger.warning(warning)


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
