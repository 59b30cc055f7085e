"""Fixtures for the training tests: a tiny UNet config, tiny runs of the training script, a clean accelerate state."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "training" / "train_unconditional.py"

# The smallest UNet2DModel that trains on 8x8 digits: ~14k parameters, a step takes milliseconds.
TINY_UNET = {
    "_class_name": "UNet2DModel",
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_accelerate(monkeypatch):
    """Tiny ops are fastest on one thread on a shared 2-core machine; each run gets a fresh AcceleratorState.

    These tests mean the CPU (exact resume is bit-for-bit there): on a machine with a GPU, accelerate is told so.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(TINY_UNET))
    return str(path)


def tiny_args(tiny_config: str, output_dir, *extra) -> list:
    """argv of a seconds-long run: 8x8 digits, 64 images, batch 8, 5 DDIM sampling steps, 16 eval samples."""
    return [
        "--resolution",
        "8",
        "--model_config_name_or_path",
        tiny_config,
        "--max_train_samples",
        "64",
        "--train_batch_size",
        "8",
        "--eval_batch_size",
        "16",
        "--ddpm_num_inference_steps",
        "5",
        "--output_dir",
        str(output_dir),
        "--logger",
        "none",
        "--lr_warmup_steps",
        "2",
        *map(str, extra),
    ]


def read_losses(output_dir) -> dict:
    with open(os.path.join(output_dir, "losses.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows}


def subprocess_env(**extra) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        CUDA_VISIBLE_DEVICES="",  # training subprocesses of the tests run on the CPU, even where a GPU exists
        ACCELERATE_USE_CPU="1",
    )
    env.update(extra)
    return env


def run_script(args, timeout=240, env=None, launcher=None):
    cmd = (launcher or [sys.executable]) + [str(SCRIPT)] + list(map(str, args))
    return subprocess.run(cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def training_in_background(args, output_dir, own_session=False, timeout=120, script=SCRIPT):
    """The training script (or `script`, e.g. distill.py) in a subprocess, yielded once it has recorded its first
    update (or ended, or `timeout` passed); killed on the way out if it still runs. `own_session`: a process group of
    its own, as a terminal gives a job (`os.killpg(proc.pid, ...)` then reaches its DataLoader workers too)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=own_session,
    )
    try:
        deadline = time.time() + timeout
        while not (Path(output_dir) / "losses.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL) if own_session else proc.kill()
            proc.communicate()
