"""`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine: two processes talking over gloo.

On a machine without GPUs, accelerate 1.15 needs `ACCELERATE_USE_CPU=1` next to `--multi_gpu` (without it each
process trains alone; `--cpu --multi_gpu` is refused). `--main_process_port 0` picks a free port.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from training.data import load_digits_tensors

from .conftest import ROOT, read_losses, subprocess_env, tiny_args

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")


def dataset_indices(batches, images: torch.Tensor) -> list:
    """The row of `images` (N, C, H, W) that each image of the recorded micro-batches is (no flips: exact match)."""
    seen = torch.cat(batches)
    match = (seen[:, None, :] == images.flatten(1)[None]).all(-1)
    assert match.sum(1).eq(1).all(), "an image the rank trained on is not exactly one image of the dataset"
    return match.int().argmax(1).tolist()


def assert_each_image_once(rank0_batches, rank1_batches, n: int) -> None:
    """One epoch of two ranks: disjoint images that together are each of the first `n` training images once."""
    data, _ = load_digits_tensors(8, "train")
    assert len(data[:n].flatten(1).unique(dim=0)) == n  # the digits' first n images are distinct: indices are exact
    i0, i1 = dataset_indices(rank0_batches, data[:n]), dataset_indices(rank1_batches, data[:n])
    assert not set(i0) & set(i1), "the two ranks trained on the same image in one epoch"
    assert sorted(i0 + i1) == list(range(n)), "an image was skipped or repeated in the epoch"


def test_two_cpu_processes_stay_in_sync_and_only_rank_0_writes(tmp_path, tiny_config):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    argv = tiny_args(
        tiny_config, out, "--max_train_steps", 4, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 2
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        WORKER,
        *argv,
    ]
    res = subprocess.run(
        cmd,
        cwd=ROOT,
        # The processes must use gloo on the CPU even on a machine with GPUs: hide them.
        env=subprocess_env(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", DIST_DUMP=str(dump)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["num_processes"] == r1["num_processes"] == 2

    # Gradients were averaged: the weights and the EMA are identical on both ranks (and trained).
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    assert all(torch.equal(a, b) for a, b in zip(r0["ema"], r1["ema"]))

    assert (r0["process_index"], r1["process_index"]) == (0, 1)
    assert (r0["local_process_index"], r1["local_process_index"]) == (0, 1)

    # 8 micro-batches of 8 per rank: two epochs of 4 per rank. In each epoch the ranks saw disjoint images and
    # together every one of the 64 exactly once.
    assert len(r0["seen"]) == len(r1["seen"]) == 8
    for epoch in range(2):
        assert_each_image_once(r0["seen"][4 * epoch : 4 * epoch + 4], r1["seen"][4 * epoch : 4 * epoch + 4], 64)

    # The effective batch: 8 per process x 2 processes x 2 accumulation steps = 32 images per update.
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["effective_batch_size"] == 32 and metrics["images_seen"] == 4 * 32
    assert sorted(read_losses(out)) == [1, 2, 3, 4]

    # Sampling for evaluation is sharded and gathered: the same samples as one process drawing all of them.
    torch.testing.assert_close(r0["sharded"], r0["serial"], atol=1e-5, rtol=0)
    torch.testing.assert_close(r1["sharded"], r0["serial"], atol=1e-5, rtol=0)

    # Only the main process writes files (Python-level writes recorded on rank 1: none in the output folder but its
    # own random states, random_states_1.json, in each checkpoint).
    rank1_files = [p for p in r1["written"] if p.startswith(str(out))]
    assert all(os.path.basename(p) == "random_states_1.json" for p in rank1_files)
    assert sorted(os.listdir(out / "checkpoint-4")) == sorted(os.listdir(out / "checkpoint-2"))
    assert {"random_states_0.json", "random_states_1.json", "model.safetensors"} <= set(
        os.listdir(out / "checkpoint-4")
    )
    assert [os.path.basename(p) for p in sorted(os.listdir(out)) if p.startswith("checkpoint-")] == [
        "checkpoint-2",
        "checkpoint-4",
    ]


@pytest.mark.parametrize("data_loading", ["workers", "cache"])
def test_two_processes_on_the_workers_and_cache_paths_see_each_image_once_per_epoch(
    tmp_path, tiny_config, data_loading
):
    """A folder of images on the paths for large data: with the cache, rank 0 builds it while rank 1 waits; with
    workers, each rank decodes its share in 2 DataLoader workers. Either way one epoch covers each image once."""
    import numpy as np
    from PIL import Image

    from training.data import build_dataset

    folder, out, dump, cache = tmp_path / "imgs", tmp_path / "run", tmp_path / "dump", tmp_path / "cache"
    folder.mkdir()
    dump.mkdir()
    rng = np.random.RandomState(3)
    for i in range(32):
        Image.fromarray(rng.randint(0, 255, (10, 12), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    flags = ["--train_data_dir", folder, "--num_channels", 1, "--center_crop", "--max_train_samples", 32]
    flags += ["--data_loading", data_loading, "--data_cache_dir", cache, "--dataloader_num_workers", 2]
    argv = tiny_args(tiny_config, out, "--max_train_steps", 4, "--checkpointing_steps", 100, *flags)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    res = subprocess.run(
        [*cmd, WORKER, *map(str, argv)],
        cwd=ROOT,
        env=subprocess_env(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", DIST_DUMP=str(dump)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"data path: {data_loading}" in res.stderr
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    ds = build_dataset(train_data_dir=str(folder), resolution=8, channels=1, center_crop=True, data_loading="memory")
    images = torch.stack([ds[i]["images"] for i in range(len(ds))])
    assert len(images.flatten(1).unique(dim=0)) == 32
    assert len(r0["seen"]) == len(r1["seen"]) == 4  # 2 micro-batches of 8 per rank and epoch, 2 epochs
    for epoch in range(2):
        i0 = dataset_indices(r0["seen"][2 * epoch : 2 * epoch + 2], images)
        i1 = dataset_indices(r1["seen"][2 * epoch : 2 * epoch + 2], images)
        assert not set(i0) & set(i1) and sorted(i0 + i1) == list(range(32))
    if data_loading == "cache":  # built once, by one process, and nothing half-written beside it
        assert len([n for n in os.listdir(cache) if not n.startswith(".")]) == 1
        assert res.stderr.count("building the data cache") == 1
