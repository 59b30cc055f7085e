"""The output folder of a training run: what the script owns there, and how an old run is replaced without loss.

The script owns only what it writes: checkpoints (and their temp folders, and branches set aside), the pipeline
folder's entries (and the staging folder of a pipeline save that was killed) (`model_index.json`, `unet/`, `scheduler/`, the pipeline code files, the model card `README.md`,
`samples/`), `logs/` (the `--logging_dir` inside the folder), `grids/`, `metrics.json` and `losses.jsonl`. Any other
file (a user's notes, data, scripts) is never moved or deleted.

A run holds the folder: its main process keeps `.lock` (its process id, host and start time) `flock`ed from the start
to the end, and a second run into the same folder is refused before it touches anything. The kernel releases the lock
when the process dies, so the `.lock` of a killed run is taken over (with a warning). `.lock` is not "the folder is
not empty", is never set aside, and is removed on release.

`--overwrite_output_dir` replaces a previous run in three steps, so that a failure at any point loses nothing:
1. after every flag, the data and the model have been validated, the previous run's entries are moved into
   `.previous-run/` (renames: instant, nothing deleted);
2. the new run trains; if it fails before writing its first checkpoint, its entries are removed and the previous run
   is moved back (and a later start finds a `.previous-run/` left by a kill and moves it back first);
3. once the new run has written its first checkpoint, `.previous-run/` is deleted.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from typing import Iterator, List, Optional

from accelerate.utils import broadcast_object_list, gather_object

from training.errors import TrainingError

logger = logging.getLogger("train_unconditional")

PREVIOUS_RUN = ".previous-run"
LOCK = ".lock"  # held (flock) by the main process of the run writing into the folder
METRICS = "metrics.json"
LOSSES = "losses.jsonl"  # one row per update: {"step": ..., "loss": ...}
GRIDS = "grids"  # sample grids over training; the pipeline's own `samples/` holds the final grid for the card
OWNED_NAMES = (
    "model_index.json",
    "README.md",
    "unet",
    "scheduler",
    "samples",
    GRIDS,
    METRICS,
    METRICS + ".tmp",
    LOSSES,
    LOSSES + ".tmp",
    "abandoned",
    "students",  # training/distill.py: the student of every progressive round
    "config.json",  # training/train_autoencoder.py: the AutoencoderKL at the folder's root
    "diffusion_pytorch_model.safetensors",
)
OWNED_PATTERN = re.compile(
    r"^(checkpoint-\d+|\.tmp-checkpoint-\d+|\.tmp-pipeline-save-[\w.-]+|pipeline_tutorial_\w+\.py|tutorial_\w+\.py)$"
)


def check_output_dir(output_dir: str) -> None:
    """Refuse an `--output_dir` that is a file, lies under a file, or cannot be written, before anything is done."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise TrainingError(f"--output_dir={output_dir!r} is a file, not a folder.")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise TrainingError(f"--output_dir={output_dir!r} cannot be created: {existing!r} is a file.")
    try:  # the only reliable test (os.access says yes to root on a read-only file system)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise TrainingError(f"--output_dir={output_dir!r} is not writable: {err}.") from err


def check_shared_output_dir(accelerator, output_dir: str) -> None:
    """Refuse a run of several processes that do not all see the same `--output_dir` (one shared filesystem).

    Every process writes its random states into the checkpoint folder that the main process creates, and reads the
    checkpoint back on resume: on separate disks one node would crash at the first checkpoint while the others hang,
    or resume alone. The main process writes a marker with a fresh name, every process looks for that name in its own
    `--output_dir`, and all raise together if any could not see it. Every process runs the same two collectives (a
    broadcast, a gather); a single process runs none. Leaves the folder as it found it.
    """
    if accelerator.num_processes == 1:
        return
    name, created = [None], False
    if accelerator.is_main_process:
        created = not os.path.isdir(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        name[0] = f".shared-check-{uuid.uuid4().hex}"
        open(os.path.join(output_dir, name[0]), "w").close()
    marker = os.path.join(output_dir, broadcast_object_list(name)[0])  # in this process's --output_dir
    seen = gather_object([(accelerator.process_index, socket.gethostname(), os.path.exists(marker))])
    if accelerator.is_main_process:  # every process has looked: the gather waited for all of them
        os.remove(marker)
        if created:
            os.rmdir(output_dir)
    blind = [f"process {rank} on {host}" for rank, host, found in seen if not found]
    if blind:
        raise TrainingError(
            f"--output_dir={output_dir!r} is not the same folder on every node: {', '.join(blind)} could not see a "
            "file the main process wrote there. With several machines, --output_dir must be on a filesystem shared "
            "by every node (e.g. NFS); nothing was written."
        )


class OutputDirLock:
    """The `flock` a run holds on `<output_dir>/.lock`; `release()` removes the file, then lets go."""

    def __init__(self, fd: int, path: str, created_dir: Optional[str]):
        self.fd, self.path, self.created_dir = fd, path, created_dir

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # while still held: a run waiting for the lock re-checks which file it locked
        os.close(self.fd)
        self.fd = -1
        if self.created_dir is not None:  # a run that wrote nothing leaves no folder behind
            with contextlib.suppress(OSError):
                os.rmdir(self.created_dir)


def _holder(fd: int) -> dict:
    """What a `.lock` says about its holder ({} when it is empty or unreadable)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    return (
        f"process {holder.get('pid', '(unknown)')} on {holder.get('host', '(unknown host)')}, "
        f"started {holder.get('started', '(unknown)')}"
    )


def lock_output_dir(output_dir: str) -> OutputDirLock:
    """Take `<output_dir>/.lock` for this process (creating the folder), or refuse: another run is writing there.

    Raises:
        `TrainingError`: naming the folder and the holder's process id, when another live process holds the lock.
    """
    created = None if os.path.isdir(output_dir) else os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise TrainingError(
                f"--output_dir={output_dir!r} is in use by another training run ({_describe(holder)}; lock file "
                f"{path!r}): two runs in one folder would interleave their checkpoints. Wait for it to end, stop it "
                "(Ctrl-C or SIGTERM saves a checkpoint), or choose another --output_dir. Nothing was changed."
            ) from None
        except OSError as err:  # a filesystem without flock: run unlocked rather than not at all
            os.close(fd)
            logger.warning(
                "--output_dir=%r cannot be locked (%s): a second run into it would not be refused.", output_dir, err
            )
            return OutputDirLock(-1, path, None)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder released it (and removed the file) between our open and our flock: take the new one
    previous = _holder(fd)
    if previous:  # a holder that released the lock removes the file: this one's holder died holding it
        logger.warning(
            "--output_dir=%r: taking over the lock of a run that ended without releasing it (%s; killed or crashed).",
            output_dir,
            _describe(previous),
        )
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return OutputDirLock(fd, path, created)


@contextlib.contextmanager
def held_by_this_run(accelerator, output_dir: str) -> Iterator[None]:
    """Hold `--output_dir` for the run: the main process takes the lock, and every process raises if it could not."""
    lock, refusal = None, [None]
    if accelerator.is_main_process:
        try:
            lock = lock_output_dir(output_dir)
        except TrainingError as err:
            refusal[0] = str(err)
    if accelerator.num_processes > 1:  # every process raises, or none
        refusal = broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise TrainingError(refusal[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def is_empty(output_dir: str) -> bool:
    """Whether `output_dir` is missing or holds nothing but the run's own `.lock`."""
    return not os.path.isdir(output_dir) or all(name == LOCK for name in os.listdir(output_dir))


def owned_entries(output_dir: str, logging_dir: str) -> List[str]:
    """Names directly inside `output_dir` that the training script wrote (see the module docstring)."""
    if not os.path.isdir(output_dir):
        return []
    names = set(OWNED_NAMES)
    logs = os.path.normpath(logging_dir)
    if not os.path.isabs(logs) and not logs.startswith(".."):
        names.add(logs.split(os.sep)[0])
    return sorted(n for n in os.listdir(output_dir) if n in names or OWNED_PATTERN.match(n))


def set_aside_previous_run(output_dir: str, logging_dir: str) -> List[str]:
    """Move the previous run's entries into `<output_dir>/.previous-run/`; returns the names moved."""
    names = owned_entries(output_dir, logging_dir)
    if not names:
        return []
    aside = os.path.join(output_dir, PREVIOUS_RUN)
    os.makedirs(aside)
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
    return names


def restore_previous_run(output_dir: str, logging_dir: str) -> bool:
    """Put a run set aside back in place of the new run's entries; returns whether there was one."""
    aside = os.path.join(output_dir, PREVIOUS_RUN)
    if not os.path.isdir(aside):
        return False
    for name in owned_entries(output_dir, logging_dir):
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for name in os.listdir(aside):
        os.replace(os.path.join(aside, name), os.path.join(output_dir, name))
    os.rmdir(aside)
    return True


def discard_previous_run(output_dir: str) -> None:
    """Delete the run set aside (called once the new run has written its first checkpoint)."""
    shutil.rmtree(os.path.join(output_dir, PREVIOUS_RUN), ignore_errors=True)
