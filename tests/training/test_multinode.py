"""Past one machine: two `accelerate launch --num_machines 2` launchers, one per simulated node, on this machine.

Each launcher is what one node of a cluster runs (`--machine_rank 0` on the node at `--main_process_ip`, `1` on the
other); here both nodes are 127.0.0.1 and talk over gloo on the CPU (`ACCELERATE_USE_CPU=1`, as in
test_distributed.py). `--num_processes` is the total over the nodes: one process per node here.

The supported layout is a shared `--output_dir` (one folder that every node sees, as on a shared filesystem): only the
global main process writes the pipeline, metrics and checkpoints, but every process writes its own random states
(`random_states_<rank>.json`) into the checkpoint folder that the main process created, and on resume every process
reads the checkpoint back. So the test gives both nodes one output folder, and each its own dump folder (its local
disk).

Nodes that do not share `--output_dir` are refused at the start, by every process together.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

from .conftest import ROOT, read_losses, subprocess_env, tiny_args
from .test_distributed import WORKER, assert_each_image_once

TIMEOUT_S = 240


def free_port() -> int:
    """A port free on 127.0.0.1 now (bound to port 0, then closed) for the main node's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_node(machine_rank: int, port: int, argv: list, dump, log) -> subprocess.Popen:
    """`accelerate launch` as node `machine_rank` of 2 runs it (one process per node), in its own process group."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(machine_rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        WORKER,
        *argv,
    ]
    env = subprocess_env(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", DIST_DUMP=str(dump))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs, timeout: float, fail_fast: bool = True) -> list:
    """Return codes of `procs`; past `timeout` seconds (or, with `fail_fast`, once one fails) the rest are killed."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or (fail_fast and any(p.poll() not in (None, 0) for p in procs)):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher and the worker it started
                p.wait()
    return [p.returncode for p in procs]


def test_two_simulated_nodes_read_disjoint_data_and_stay_in_sync(tmp_path, tiny_config):
    out = tmp_path / "run"  # shared by both nodes
    dumps = [tmp_path / "node0", tmp_path / "node1"]
    for d in dumps:
        d.mkdir()
    # 64 images, 8 per process x 2 processes: 4 updates are exactly one epoch. The DataLoader path (accelerate
    # shards it by process index; test_distributed.py covers the images kept on the device).
    argv = tiny_args(tiny_config, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--data_on_device", "no")
    port = free_port()
    logs = [open(tmp_path / f"node{r}.log", "w") for r in (0, 1)]
    try:
        procs = [launch_node(r, port, argv, dumps[r], logs[r]) for r in (0, 1)]
        codes = wait_all(procs, TIMEOUT_S)
    finally:
        for f in logs:
            f.close()
    text = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], f"node 0: {text[0][-2000:]}\nnode 1: {text[1][-2000:]}"

    # Each node holds one process: global indices 0 and 1, each the local main process of its node.
    r0, r1 = (torch.load(dumps[r] / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["num_processes"] == r1["num_processes"] == 2
    assert (r0["process_index"], r1["process_index"]) == (0, 1)
    assert (r0["machine_rank"], r1["machine_rank"]) == (0, 1)
    assert r0["local_process_index"] == r1["local_process_index"] == 0
    assert r0["is_main_process"] and not r1["is_main_process"]
    assert all("8 per process x 2 process(es)" in t for t in text)

    # Gradients were averaged across the nodes: identical weights and EMA on both.
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    assert all(torch.equal(a, b) for a, b in zip(r0["ema"], r1["ema"]))

    # One epoch (4 micro-batches of 8 per process): disjoint images, together each of the 64 exactly once.
    assert len(r0["seen"]) == len(r1["seen"]) == 4
    assert_each_image_once(r0["seen"], r1["seen"], 64)

    # Only the global main process wrote to the shared folder; node 1's process wrote only its random states.
    rank1_files = [p for p in r1["written"] if p.startswith(str(out))]
    assert rank1_files and all(os.path.basename(p) == "random_states_1.json" for p in rank1_files)
    for name in ("checkpoint-2", "checkpoint-4"):
        assert {"random_states_0.json", "random_states_1.json", "model.safetensors"} <= set(os.listdir(out / name))
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["num_processes"] == 2 and metrics["effective_batch_size"] == 16
    assert sorted(read_losses(out)) == [1, 2, 3, 4]


def test_nodes_without_a_shared_output_dir_all_stop_at_the_start(tmp_path, tiny_config):
    # Each node its own --output_dir (separate disks): before the guard, node 1 died at the first checkpoint writing
    # its random states into a folder only node 0 had, and node 0 hung. Now both stop before training, on their own.
    outs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    port = free_port()
    logs = [open(tmp_path / f"node{r}.log", "w") for r in (0, 1)]
    try:
        argvs = [tiny_args(tiny_config, outs[r], "--max_train_steps", 2, "--checkpointing_steps", 1) for r in (0, 1)]
        procs = [launch_node(r, port, argvs[r], tmp_path, logs[r]) for r in (0, 1)]
        codes = wait_all(procs, TIMEOUT_S, fail_fast=False)
    finally:
        for f in logs:
            f.close()
    text = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    # Both exited by themselves (a hang is killed at the timeout: -9), each raising the TrainingError that names node 1.
    assert all(c not in (0, -signal.SIGKILL) for c in codes), (
        f"{codes}\nnode 0: {text[0][-2000:]}\nnode 1: {text[1][-2000:]}"
    )
    for t in text:
        assert "TrainingError" in t and "filesystem shared by every node" in t, t[-3000:]
        assert "process 1 on" in t and "--output_dir=" in t
    assert not outs[0].exists() and not outs[1].exists()  # no checkpoint, no marker: nothing written
