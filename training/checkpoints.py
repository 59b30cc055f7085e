"""Training checkpoints: code-free, atomic, rotated, and always on the run's current branch.

A checkpoint is a folder `checkpoint-<update>` that holds only data formats that cannot run code when read:

    training_state.json        the loop position, the flags that define the run, the optimizer's hyperparameters,
                               the LR schedule, the EMA step, the loss scaler
    model.safetensors          the model's weights (unwrapped from DDP)
    optimizer.safetensors      the optimizer's per-parameter tensors ("<param index>.<name>", e.g. Adam's moments)
    ema.safetensors            the EMA shadow weights, by position
    teacher.safetensors        progressive distillation (training/distill.py): the current round's teacher
    target.safetensors         consistency distillation: the EMA target network
    random_states_<rank>.json  each process's Python, NumPy, torch CPU and CUDA generator states

Reading a checkpoint refuses any other file (a pickle such as an older `custom_checkpoint_0.pkl`, `optimizer.bin`)
with an error that names it: nothing is unpickled, ever. Tensors are read on the CPU and copied into the training
state, which lives on `accelerator.device` (so a checkpoint written on a GPU resumes on a CPU and back).

Writing is atomic: every process writes into `.tmp-checkpoint-<update>`, then the main process renames the folder
(one filesystem operation). A kill at any moment leaves the previous checkpoints intact. A write that fails (a full
disk: `OSError`, or safetensors' `SafetensorError` wrapping one) on any process stops every process with a
`TrainingError` naming the file and the cause, after the half-written temp folder is removed. Rotation
(`--checkpoints_total_limit`) deletes the oldest checkpoints of the current branch; resuming from an older
checkpoint first moves the later ones (an abandoned branch) aside into `abandoned/`, so "latest" is always the newest
checkpoint of the run that is going on.
"""

import json
import logging
import os
import random
import re
import shutil
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from accelerate.utils import gather_object
from diffusers import UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.errors import TrainingError
from training.output_folder import LOSSES
from training.settings import RUN_DEFINING_FLAGS, recorded_flags

logger = logging.getLogger("train_unconditional")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
ABANDONED = "abandoned"
STATE_FILE = "training_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EMA_FILE = "ema.safetensors"
RNG_FILE = "random_states_{}.json"
# Every file a checkpoint may hold: the same tuple decides what is written, what is read and what is refused.
ALLOWED_FILES = re.compile(
    r"^(training_state\.json|model\.safetensors|optimizer\.safetensors|ema\.safetensors|"
    r"teacher\.safetensors|target\.safetensors|random_states_\d+\.json)$"
)
FORMAT_VERSION = 2
# Keys of an optimizer's param group that choose its kernel, not its math: taken from the running optimizer on resume.
OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


# ----------------------------------------------------------------------------------------------------------------
# Finding checkpoints, and the current branch
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_step(path: str) -> Optional[int]:
    """The update number of a `checkpoint-<update>` folder, or None for any other name."""
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoints (`checkpoint-<update>`) in `output_dir`, oldest first; temp folders are ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = [(step, name) for name in os.listdir(output_dir) if (step := checkpoint_step(name)) is not None]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


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


def set_aside_later_checkpoints(output_dir: str, step: int) -> Optional[str]:
    """Move the checkpoints after update `step` (a branch the resumed run abandons) into `abandoned/<time>/`.

    Returns:
        The folder they were moved to, or None when there were none.
    """
    later = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step]
    if not later:
        return None
    dest = os.path.join(output_dir, ABANDONED, time.strftime("%Y%m%d-%H%M%S") + f"-resumed-at-{step}")
    while os.path.exists(dest):
        dest += "+"
    os.makedirs(dest)
    for path in later:
        os.replace(path, os.path.join(dest, os.path.basename(path)))
    return dest


def rotate(output_dir: str, total_limit: Optional[int], keep: str) -> None:
    """Delete the oldest checkpoints of the current branch beyond `total_limit` (never `keep`), and save leftovers."""
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            if os.path.abspath(old) != os.path.abspath(keep):
                shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(output_dir):  # leftovers of saves that were killed
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Random states as JSON
# ----------------------------------------------------------------------------------------------------------------
def rng_state() -> Dict:
    """This process's generator states (Python, NumPy, torch CPU, every CUDA device) as JSON-able lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        saved = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(saved[: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------------------------
# The optimizer as tensors + JSON
# ----------------------------------------------------------------------------------------------------------------
def split_optimizer_state(state_dict: Dict) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """An optimizer `state_dict()` as (tensors by "<param index>.<name>", JSON-able hyperparameters)."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def join_optimizer_state(tensors: Dict[str, torch.Tensor], meta: Dict) -> Dict:
    """The inverse of `split_optimizer_state`: a `state_dict()` for `optimizer.load_state_dict`."""
    state: Dict[int, Dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------------------------
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    tensors: Dict[str, Dict[str, torch.Tensor]],
    state: Dict,
    total_limit: Optional[int] = None,
    process_state: Optional[Dict] = None,
) -> str:
    """Write `checkpoint-<step>` atomically (every process takes part; only the main process writes shared files).

    Args:
        accelerator (`accelerate.Accelerator`): for the process index and the barriers.
        output_dir (`str`): the run's folder.
        step (`int`): the update number.
        tensors (`dict`): file name -> {name: tensor}, e.g. {"model.safetensors": model.state_dict()}.
        state (`dict`): the JSON-able training state (`training_state.json`).
        total_limit (`int`, *optional*): keep at most this many checkpoints of the current branch.
        process_state (`dict`, *optional*): this process's own JSON-able state (a stream's position), written with
            its random states.

    Returns:
        `str`: the checkpoint folder.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}{step}")
    failure, path = None, tmp
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as err:
            failure = _failure(path, err)
    accelerator.wait_for_everyone()
    try:
        path = os.path.join(tmp, RNG_FILE.format(accelerator.process_index))
        _write_json(path, {**rng_state(), "data": process_state})
        if accelerator.is_main_process:
            for name, named in tensors.items():
                if not ALLOWED_FILES.match(name):
                    raise ValueError(f"{name!r} is not a checkpoint file name ({ALLOWED_FILES.pattern}).")
                path = os.path.join(tmp, name)
                save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, path)
                _fsync(path)
            path = os.path.join(tmp, STATE_FILE)
            _write_json(path, {**state, "format": FORMAT_VERSION})
    except (OSError, SafetensorError) as err:  # a full disk, a quota, an I/O error
        failure = failure or _failure(path, err)
    _raise_if_any_failed(accelerator, output_dir, step, tmp, failure)
    if accelerator.is_main_process:
        try:
            path = final
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(output_dir)
            rotate(output_dir, total_limit, keep=final)
        except OSError as err:
            failure = _failure(path, err)
    _raise_if_any_failed(accelerator, output_dir, step, tmp, failure)  # also the barrier after the rename
    return final


def _failure(path: str, err: BaseException) -> str:
    return f"{path!r}: {type(err).__name__}: {err}"


def _raise_if_any_failed(accelerator, output_dir: str, step: int, tmp: str, failure: Optional[str]) -> None:
    """Every process learns whether any process failed to write its part (one gather, which is also a barrier), and
    all raise together: none is left waiting at a barrier for a process that has stopped. The main process removes
    the half-written temp folder first; the earlier checkpoints were never touched."""
    failures = [failure] if accelerator.num_processes == 1 else gather_object([failure])
    failures = [f for f in failures if f is not None]
    if not failures:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    earlier = [os.path.basename(p) for p in list_checkpoints(output_dir)]
    raise TrainingError(
        f"could not write checkpoint-{step}: {failures[0]}. The half-written {os.path.basename(tmp)} was removed; "
        f"the earlier checkpoints are intact ({', '.join(earlier) or 'none yet'}). Free space (or fix the cause) and "
        "continue with --resume_from_checkpoint latest."
    )


def read_checkpoint(
    path: str, process_index: int = 0
) -> Tuple[Dict, Dict[str, Dict[str, torch.Tensor]], Optional[Dict]]:
    """Read a checkpoint folder on the CPU, refusing anything that is not one of its JSON or safetensors files.

    Returns:
        `(state, tensors, rng)`: the training state, file name -> tensors, and this process's random states
        (None when the checkpoint was written by fewer processes).
    """
    names = sorted(os.listdir(path))
    foreign = [n for n in names if not ALLOWED_FILES.match(n)]
    if foreign:
        raise TrainingError(
            f"checkpoint {path!r} holds {foreign[0]!r}, which is not one of a checkpoint's JSON or safetensors "
            "files; it is refused, since a pickle can run code when loaded (checkpoints of this version hold "
            "only training_state.json, *.safetensors and random_states_<rank>.json)."
        )
    if STATE_FILE not in names:
        raise TrainingError(f"checkpoint {path!r} is incomplete or corrupt: {STATE_FILE} is missing.")
    current = STATE_FILE
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        tensors = {}
        for name in names:
            if name.endswith(".safetensors"):
                current = name
                tensors[name] = load_file(os.path.join(path, name), device="cpu")
        rng = None
        current = RNG_FILE.format(process_index)
        if current in names:
            with open(os.path.join(path, current)) as f:
                rng = json.load(f)
    except Exception as err:
        raise TrainingError(
            f"checkpoint {path!r} is corrupt and cannot be loaded ({current}): {type(err).__name__}: {err}"
        ) from err
    return state, tensors, rng


# ----------------------------------------------------------------------------------------------------------------
# A training run's checkpoints: what is saved, what must match on resume, how the state is restored
# ----------------------------------------------------------------------------------------------------------------
def unet_config_of(model: UNet2DModel) -> Dict:
    """The model's config as JSON data, without diffusers' bookkeeping keys (`_class_name`, versions)."""
    return {k: v for k, v in json.loads(json.dumps(dict(model.config))).items() if not k.startswith("_")}


def all_finite(tensors: List[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (one host synchronisation)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def save_checkpoint(run, output_dir: str) -> str:
    """Write `checkpoint-<update>` of `run` (every process calls this); refuses non-finite weights."""
    accelerator, unet = run.accelerator, run.unwrapped
    weights = list(unet.parameters()) + ([] if run.ema is None else run.ema.shadow_params)
    if not all_finite(weights):
        raise TrainingError(
            f"the weights are not finite at update {run.state.global_step}: training diverged; nothing was saved. "
            f"Lower --learning_rate (now {run.settings.learning_rate:g})."
        )
    optimizer_tensors, optimizer_meta = split_optimizer_state(run.optimizer.state_dict())
    tensors = {MODEL_FILE: unet.state_dict(), OPTIMIZER_FILE: optimizer_tensors}
    if run.ema is not None:
        tensors[EMA_FILE] = run.ema.tensors()
    if run.objective is not None:  # distillation's teacher or target network (training/distill.py)
        tensors.update(run.objective.checkpoint_tensors(run))
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
    return write_checkpoint(
        accelerator,
        output_dir,
        run.state.global_step,
        tensors,
        state,
        run.settings.checkpoints_total_limit,
        process_state=run.batches.state_dict(),
    )


def check_resume_flags(
    path: str, saved: Dict, settings, model: UNet2DModel, run_defining=RUN_DEFINING_FLAGS
) -> List[str]:
    """Refuse a resume whose run-defining flags (`run_defining`) differ from the checkpoint's; returns the other
    changed flags."""
    flags = saved.get("flags")
    if flags is None or "unet_config" not in saved:
        raise TrainingError(f"checkpoint {path!r} records no flags (written by an older version); it cannot resume.")
    now = recorded_flags(settings)
    refused = [
        f"--{name}: {flags.get(name)!r} in the checkpoint, {now.get(name)!r} now"
        for name in run_defining
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
    ignore = set(run_defining) | {"output_dir"}
    return [
        f"--{name}: {flags.get(name)!r} -> {now[name]!r}"
        for name in sorted(now)
        if name not in ignore and name in flags and flags[name] != now[name]
    ]


def load_checkpoint(run, path: str, saved: Tuple[Dict, Dict, Optional[Dict]]) -> None:
    """Restore `run` from a checkpoint read by `checkpoints.read_checkpoint`; values are copied into tensors that
    stay on `accelerator.device`. The current flags' optimizer settings and learning-rate schedule are applied."""
    state, tensors, rng = saved
    settings = run.settings
    try:
        run.unwrapped.load_state_dict(tensors[MODEL_FILE])
        saved_optimizer = join_optimizer_state(tensors[OPTIMIZER_FILE], state["optimizer"])
        for saved_group, group in zip(saved_optimizer["param_groups"], run.optimizer.param_groups):
            # the kernel choice is this run's (--adam_fused), not the writer's: torch reads it while loading
            saved_group.update({k: group[k] for k in OPTIMIZER_IMPLEMENTATION if k in group})
        run.optimizer.load_state_dict(saved_optimizer)
        run.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if run.ema is not None:
            run.ema.load(tensors[EMA_FILE], state["ema"])
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
        set_rng_state(rng)
        if rng.get("data"):
            run.batches.load_state_dict(rng["data"])
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
