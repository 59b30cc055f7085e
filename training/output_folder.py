"""The output folder of a training run: what the script owns there, and how an old run is replaced without loss.

The script owns only what it writes: checkpoints (and their temp folders, and branches set aside), the pipeline
folder's entries (and the staging folder of a pipeline save that was killed) (`model_index.json`, `unet/`, `scheduler/`, the pipeline code files, the model card `README.md`,
`samples/`), `logs/` (the `--logging_dir` inside the folder), `grids/`, `metrics.json` and `losses.jsonl`. Any other
file (a user's notes, data, scripts) is never moved or deleted.

`--overwrite_output_dir` replaces a previous run in three steps, so that a failure at any point loses nothing:
1. after every flag, the data and the model have been validated, the previous run's entries are moved into
   `.previous-run/` (renames: instant, nothing deleted);
2. the new run trains; if it fails before writing its first checkpoint, its entries are removed and the previous run
   is moved back (and a later start finds a `.previous-run/` left by a kill and moves it back first);
3. once the new run has written its first checkpoint, `.previous-run/` is deleted.
"""

import os
import re
import shutil
import socket
import tempfile
import uuid
from typing import List

from accelerate.utils import broadcast_object_list, gather_object

from training.errors import TrainingError

PREVIOUS_RUN = ".previous-run"
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
