"""Sharp edges of a real run (issue 21): Ctrl-C, two runs in one folder, a full disk while checkpointing."""

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from safetensors import SafetensorError

from training import checkpoints as ckpt
from training import output_folder
from training import train_unconditional as tu

from .conftest import read_losses, tiny_args, training_in_background


def _snapshot(folder) -> dict:
    """Every file under `folder` (relative path -> bytes), to show that nothing was touched."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


# ----------------------------------------------------------------------------------------------------------------
# 1. Ctrl-C: the first finishes the update, saves a checkpoint, says where, exits 130; a second aborts at once
# ----------------------------------------------------------------------------------------------------------------
def test_ctrl_c_saves_a_checkpoint_says_where_and_exits_130(tmp_path, tiny_config):
    out = tmp_path / "run"
    argv = tiny_args(tiny_config, out, "--max_train_steps", 100000, "--checkpointing_steps", 100000)
    with training_in_background(argv, out) as proc:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        # While it trains, the folder is held: a second run into it is refused, naming the holder.
        with open(out / output_folder.LOCK) as f:
            assert json.load(f)["pid"] == proc.pid
        with pytest.raises(tu.TrainingError, match=rf"in use by another training run \(process {proc.pid} on"):
            tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--resume_from_checkpoint", "latest"))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    (checkpoint,) = tu.list_checkpoints(out)
    step = ckpt.checkpoint_step(checkpoint)
    assert 1 <= step < 100000 and max(read_losses(out)) == step
    assert f"Ctrl-C (SIGINT): saved {checkpoint} at update {step}" in err, err[-2000:]
    assert "--resume_from_checkpoint latest" in err and not (out / output_folder.LOCK).exists()
    with open(out / "metrics.json") as f:
        assert json.load(f)["interrupted"] is True
    resumed = tu.main(
        argv[:-4]
        + ["--max_train_steps", str(step + 1), "--checkpointing_steps", "1000", "--resume_from_checkpoint", "latest"]
    )
    assert resumed["global_step"] == step + 1 and sorted(read_losses(out))[-1] == step + 1


def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "run"
    real_update, seen = tu.update, {}

    def update_then_two_ctrl_c(run):
        loss = real_update(run)
        if run.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here: a first Ctrl-C only asks for a stop
            seen["after_first"] = tu._STOP_SIGNAL
            start = time.monotonic()
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(10)
            finally:
                seen["abort_s"] = time.monotonic() - start
        return loss

    monkeypatch.setattr(tu, "update", update_then_two_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        tu.main(tiny_args(tiny_config, out, "--max_train_steps", 8, "--checkpointing_steps", 4))
    assert seen["after_first"] == signal.SIGINT and seen["abort_s"] < 1.0
    assert tu.list_checkpoints(out) == []  # aborted in update 3: no stop, no checkpoint
    assert signal.getsignal(signal.SIGINT) is handler and not (out / output_folder.LOCK).exists()


# ----------------------------------------------------------------------------------------------------------------
# 2. One run per --output_dir: a held folder is refused at the door; a dead holder's lock is taken over
# ----------------------------------------------------------------------------------------------------------------
def test_a_run_into_a_held_folder_is_refused_before_touching_anything(tmp_path, tiny_config):
    out = tmp_path / "run"
    tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--checkpointing_steps", 2))
    before = _snapshot(out)
    lock = output_folder.lock_output_dir(str(out))  # another live run (this process) holds it
    try:
        with pytest.raises(tu.TrainingError, match=rf"in use by another training run \(process {os.getpid()} on") as e:
            tu.main(tiny_args(tiny_config, out, "--max_train_steps", 4, "--overwrite_output_dir"))
        assert f"--output_dir={str(out)!r}" in str(e.value)
        after = _snapshot(out)
        assert json.loads(after.pop(output_folder.LOCK))["pid"] == os.getpid() and after == before
    finally:
        lock.release()
    assert _snapshot(out) == before


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path, tiny_config, caplog):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    holder = {"pid": dead_pid, "host": socket.gethostname(), "started": "2024-01-01 00:00:00"}
    (out / output_folder.LOCK).write_text(json.dumps(holder))  # left by a kill -9: no process holds its flock
    with caplog.at_level(logging.WARNING, logger="train_unconditional"):
        result = tu.main(tiny_args(tiny_config, out, "--max_train_steps", 1))
    assert result["global_step"] == 1 and tu.list_checkpoints(out)
    assert any(
        "taking over the lock" in r.getMessage() and f"process {dead_pid} on" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert not (out / output_folder.LOCK).exists()  # released at the end


# ----------------------------------------------------------------------------------------------------------------
# 3. A full disk while checkpointing: a clear error, no half-written folder, the earlier checkpoints intact
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        # what safetensors 0.8 raises when the disk fills under save_file
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ],
    ids=["OSError", "SafetensorError"],
)
def test_a_full_disk_while_checkpointing_is_a_clear_error_and_loses_nothing(tmp_path, tiny_config, monkeypatch, error):
    out = tmp_path / "run"
    real_save_file, kept = ckpt.save_file, {}

    def save_file_on_a_full_disk(tensors, path):
        if f"{ckpt.TMP_PREFIX}4" in path and path.endswith(ckpt.OPTIMIZER_FILE):  # model.safetensors is written
            kept.update(_snapshot(out / "checkpoint-2"))
            raise error
        return real_save_file(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", save_file_on_a_full_disk)
    argv = tiny_args(tiny_config, out, "--max_train_steps", 6, "--checkpointing_steps", 2)
    with pytest.raises(tu.TrainingError, match="No space left on device") as e:
        tu.main(argv)
    assert os.path.join(out, f"{ckpt.TMP_PREFIX}4", ckpt.OPTIMIZER_FILE) in str(e.value)
    assert not [n for n in os.listdir(out) if n.startswith(ckpt.TMP_PREFIX)]
    assert [os.path.basename(p) for p in tu.list_checkpoints(out)] == ["checkpoint-2"]
    assert kept and _snapshot(out / "checkpoint-2") == kept
    assert ckpt.read_checkpoint(str(out / "checkpoint-2"))[0]["global_step"] == 2

    monkeypatch.setattr(ckpt, "save_file", real_save_file)  # space freed: the run continues from checkpoint-2
    resumed = tu.main(
        argv[:-4] + ["--max_train_steps", "3", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest"]
    )
    assert resumed["global_step"] == 3
