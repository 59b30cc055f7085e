"""Data at any scale: the three map-style paths (memory, workers, cache) give the same items; the cache is built
once, atomically, checked before it is read, and rebuilt when stale; failures name the file and leave nothing
half-written; training resumes exactly on every path."""

import errno
import json
import logging
import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from training import data
from training import train_unconditional as tu
from training.data import build as data_build
from training.data import cache as data_cache

from .conftest import read_losses, tiny_args

PATHS = ("memory", "workers", "cache")


def _write_folder(folder, n=12, gray=True, fmt="png", seed=0):
    """`n` non-square images (some portrait, some landscape) of 8-bit gray or RGB."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        h, w = (10, 13) if i % 2 else (14, 9)
        shape = (h, w) if gray else (h, w, 3)
        Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8)).save(folder / f"img_{i:03d}.{fmt}")
    return folder


def _build(folder, tmp_path, data_loading, **kwargs):
    kwargs = {"resolution": 8, "channels": 1, "random_flip": True, "seed": 5, **kwargs}
    return data.build_dataset(
        train_data_dir=str(folder), data_loading=data_loading, data_cache_dir=str(tmp_path / "cache"), **kwargs
    )


def _epoch(ds, epoch):
    ds.set_epoch(epoch)
    return torch.stack([ds[i]["images"] for i in range(len(ds))])


# ----------------------------------------------------------------------------------------------------------------
# One set of items, whatever holds the pixels
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("center_crop", [False, True])
def test_every_path_gives_the_same_items_in_every_epoch(tmp_path, center_crop):
    folder = _write_folder(tmp_path / "imgs", fmt="jpg")
    sets = {p: _build(folder, tmp_path, p, center_crop=center_crop) for p in PATHS}
    assert {p: ds.path for p, ds in sets.items()} == {p: p for p in PATHS}
    for epoch in (0, 3):
        reference = _epoch(sets["memory"], epoch)
        assert reference.shape == (12, 1, 8, 8) and reference.dtype == torch.float32
        assert reference.min() >= -1 and reference.max() <= 1
        for p in ("workers", "cache"):
            assert torch.equal(_epoch(sets[p], epoch), reference), p
    assert not torch.equal(_epoch(sets["memory"], 0), _epoch(sets["memory"], 3))  # flips and crops move


def test_items_are_the_same_through_a_dataloader_with_workers(tmp_path):
    folder = _write_folder(tmp_path / "imgs")
    for p in ("workers", "cache"):
        ds = _build(folder, tmp_path, p)
        ds.set_epoch(2)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)  # workers get the epoch on iter()
        assert torch.equal(torch.cat([b["images"] for b in loader]), _epoch(_build(folder, tmp_path, "memory"), 2))


def test_max_train_samples_cuts_before_anything_is_decoded(tmp_path, monkeypatch):
    from training.data import decode, image_sets

    folder = _write_folder(tmp_path / "imgs", n=10)
    decoded = []
    original = decode.decode_array

    def counting(source, name, *args):
        decoded.append(os.path.basename(name))
        return original(source, name, *args)

    monkeypatch.setattr(decode, "decode_array", counting)
    monkeypatch.setattr(image_sets, "decode_array", counting)
    for p in PATHS:
        decoded.clear()
        ds = _build(folder, tmp_path / p, p, max_train_samples=3)
        assert len(ds) == 3
        assert decoded == ([] if p == "workers" else ["img_000.png", "img_001.png", "img_002.png"]), p
    ds = _build(folder, tmp_path, "workers")
    decoded.clear()
    _ = ds[7]
    assert decoded == ["img_007.png"]  # the workers path decodes an item when it is asked for, and only it


def test_auto_holds_small_data_in_ram_decodes_large_data_per_batch_and_reuses_a_built_cache(tmp_path, monkeypatch):
    folder = _write_folder(tmp_path / "imgs")
    small = _build(folder, tmp_path, "auto")
    assert small.path == "memory" and "held in RAM" in small.reason and small.num_workers == 0
    monkeypatch.setattr(data_build, "MEMORY_PATH_MAX_BYTES", 100)
    large = _build(folder, tmp_path, "auto")
    assert large.path == "workers" and "DataLoader workers" in large.reason and large.num_workers >= 1
    assert "--data_loading cache" in large.reason
    _build(folder, tmp_path, "cache")
    again = _build(folder, tmp_path, "auto")
    assert again.path == "cache" and "built before" in again.reason
    assert _build(folder, tmp_path, "auto", eight_bit_ok=False).path == "workers"  # --preserve_input_precision
    digits = data.build_dataset(data_loading="auto")
    assert digits.path == "memory" and "digits" in digits.reason


def test_the_memory_path_holds_uint8_and_data_on_device_keeps_it_uint8(tmp_path):
    folder = _write_folder(tmp_path / "imgs", n=16)
    ds = _build(folder, tmp_path, "memory", center_crop=True)
    assert ds.images.dtype == torch.uint8 and ds.images.nbytes == 16 * 64  # 1 byte a pixel, not 4
    cached = _build(folder, tmp_path, "cache", center_crop=True)
    for source in (ds, cached):
        batches = data.DeviceBatches(source, 4, 1, 0, torch.device("cpu"), seed=5)
        assert batches.images.dtype == torch.uint8
        sampler = data.EpochSampler(len(source), seed=5)
        sampler.set_epoch(1)
        source.set_epoch(1)
        loader = torch.utils.data.DataLoader(source, batch_size=4, sampler=sampler, drop_last=True)
        for on_device, from_loader in zip(batches.epoch(1), loader):
            assert torch.equal(on_device["images"], from_loader["images"])


# ----------------------------------------------------------------------------------------------------------------
# The cache: keyed, checked, rebuilt, atomic
# ----------------------------------------------------------------------------------------------------------------
def _cache_folders(tmp_path):
    root = tmp_path / "cache"
    return sorted(p for p in os.listdir(root)) if root.exists() else []


def test_the_cache_is_built_once_and_rebuilt_when_a_shaping_flag_or_a_file_changes(tmp_path, caplog):
    folder = _write_folder(tmp_path / "imgs")
    first = _build(folder, tmp_path, "cache")
    assert len(_cache_folders(tmp_path)) == 1
    meta = json.loads((tmp_path / "cache" / _cache_folders(tmp_path)[0] / "meta.json").read_text())
    assert meta["num_images"] == 12 and meta["key"]["resolution"] == 8
    _build(folder, tmp_path, "cache")
    assert len(_cache_folders(tmp_path)) == 1  # reused
    _build(folder, tmp_path, "cache", resolution=4)
    _build(folder, tmp_path, "cache", center_crop=True)
    _build(folder, tmp_path, "cache", max_train_samples=5)
    assert len(_cache_folders(tmp_path)) == 4  # every shaping flag has its own cache
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(folder / "img_000.png")  # a file changes
    os.utime(folder / "img_000.png", ns=(1, 1))
    changed = _build(folder, tmp_path, "cache")
    assert len(_cache_folders(tmp_path)) == 5
    assert not torch.equal(_epoch(changed, 0)[0], _epoch(first, 0)[0])


@pytest.mark.parametrize("damage", ["truncate", "no_meta", "index"])
def test_a_partial_or_corrupt_cache_is_rebuilt_never_read(tmp_path, caplog, damage):
    folder = _write_folder(tmp_path / "imgs")
    reference = _epoch(_build(folder, tmp_path, "memory"), 0)
    _build(folder, tmp_path, "cache")
    (name,) = _cache_folders(tmp_path)
    built = tmp_path / "cache" / name
    if damage == "truncate":
        with open(built / "pixels.u8", "r+b") as f:
            f.truncate(os.path.getsize(built / "pixels.u8") - 10)
    elif damage == "no_meta":
        os.remove(built / "meta.json")
        os.makedirs(built, exist_ok=True)
    else:
        index = np.load(built / "index.npy")
        index[3, 0] += 1
        np.save(built / "index.npy", index)
    rebuilt = _build(folder, tmp_path, "cache")
    assert torch.equal(_epoch(rebuilt, 0), reference)
    assert "incomplete or corrupt" in caplog.text and "building it again" in caplog.text


def _build_in_a_process(folder, cache_dir, queue):
    try:
        ds = data.build_dataset(
            train_data_dir=folder,
            resolution=8,
            channels=1,
            data_loading="cache",
            data_cache_dir=cache_dir,
            num_workers=1,
            seed=5,
        )
        queue.put(("ok", torch.stack([ds[i]["images"] for i in range(len(ds))]).numpy()))
    except Exception as err:  # reported to the test
        queue.put(("error", repr(err)))


def test_two_runs_building_one_cache_at_once_leave_a_correct_cache(tmp_path):
    folder = _write_folder(tmp_path / "imgs", n=40)
    reference = _epoch(_build(folder, tmp_path, "memory", random_flip=False), 0).numpy()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    runs = [ctx.Process(target=_build_in_a_process, args=(str(folder), str(tmp_path / "cache"), queue)) for _ in "ab"]
    for run in runs:
        run.start()
    results = [queue.get(timeout=120) for _ in runs]
    for run in runs:
        run.join(timeout=60)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert all(np.array_equal(r[1], reference) for r in results)
    assert len(_cache_folders(tmp_path)) == 1  # one cache, no temporary folder left behind
    assert np.array_equal(_epoch(_build(folder, tmp_path, "cache", random_flip=False), 0).numpy(), reference)


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_while_building_stops_with_an_error_and_leaves_no_cache_behind(tmp_path, monkeypatch):
    folder = _write_folder(tmp_path / "imgs")
    monkeypatch.setattr(data_cache, "open", lambda path, mode="r": _FullDisk(open(path, mode), 200), raising=False)
    with pytest.raises(data.DataCacheError, match="No space left on device.*nothing was left behind"):
        _build(folder, tmp_path, "cache")
    assert _cache_folders(tmp_path) == []
    monkeypatch.undo()
    # Known too little space up front: refused before writing anything, naming the folder and the way out.
    monkeypatch.setattr(data_cache.shutil, "disk_usage", lambda path: type("U", (), {"free": 100})())
    with pytest.raises(data.DataCacheError, match="needs about .* GB free.*--data_cache_dir"):
        _build(folder, tmp_path, "cache")
    assert _cache_folders(tmp_path) == []


def test_a_build_that_was_killed_leaves_a_temporary_folder_that_the_next_build_removes(tmp_path):
    import socket
    import subprocess
    import sys

    folder = _write_folder(tmp_path / "imgs")
    source = data.open_source(train_data_dir=str(folder))
    final = data_cache.cache_folder(str(tmp_path / "cache"), data_cache.cache_key(source, 8, 1, False))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = f"{final}.tmp-{socket.gethostname()}-{int(dead.stdout)}-0badc0de"
    running = f"{final}.tmp-{socket.gethostname()}-{os.getpid()}-0123abcd"
    for path in (killed, running):
        os.makedirs(path)
        (open(os.path.join(path, "pixels.u8"), "wb")).close()
    built = _build(folder, tmp_path, "cache")
    assert len(built) == 12 and not os.path.exists(killed) and os.path.exists(running)  # a live build is kept


def test_processes_that_wait_for_the_builder_get_its_cache_or_its_error(tmp_path):
    folder = _write_folder(tmp_path / "imgs")
    source = data.open_source(train_data_dir=str(folder))
    key = data_cache.cache_key(source, 8, 1, False)
    marker = str(tmp_path / "cache" / ".failed-run1")
    got = {}

    def wait():
        got["cache"] = data_cache.ensure_cache(source, key, str(tmp_path / "cache"), False, 1, False, marker, 0.05)

    waiter = threading.Thread(target=wait)
    waiter.start()
    data_cache.ensure_cache(source, key, str(tmp_path / "cache"), False, 1, True, marker)
    waiter.join(timeout=30)
    assert len(got["cache"]) == 12
    # A builder that fails writes the marker; a waiter stops with its message instead of waiting for ever.
    (folder / "zz_broken.png").write_bytes(b"not an image")
    source = data.open_source(train_data_dir=str(folder))
    key = data_cache.cache_key(source, 8, 1, False)
    with pytest.raises(data.BrokenImageError, match="zz_broken.png"):
        data_cache.ensure_cache(source, key, str(tmp_path / "cache"), False, 1, True, marker + "2")
    with pytest.raises(data.DataCacheError, match="building the data cache failed.*zz_broken.png"):
        data_cache.ensure_cache(source, key, str(tmp_path / "cache"), False, 1, False, marker + "2", 0.05)


# ----------------------------------------------------------------------------------------------------------------
# Broken files, in workers and in the cache build
# ----------------------------------------------------------------------------------------------------------------
def test_a_broken_file_inside_a_dataloader_worker_is_named(tmp_path, tiny_config):
    folder = _write_folder(tmp_path / "imgs", n=16)
    (folder / "img_007.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    argv = tiny_args(
        tiny_config,
        tmp_path / "run",
        "--train_data_dir",
        folder,
        "--num_channels",
        1,
        "--data_loading",
        "workers",
        "--dataloader_num_workers",
        2,
        "--max_train_steps",
        4,
    )
    with pytest.raises(tu.TrainingError, match=r"cannot read image .*img_007\.png.*--skip_broken_images"):
        tu.main(argv)
    # With --skip_broken_images the file is replaced by the next one (the same in every epoch) and named in the log.
    ds = _build(folder, tmp_path, "workers", skip_broken_images=True)
    assert torch.equal(ds[7]["images"], ds[8]["images"]) or ds.random_flip
    result = tu.main(argv + ["--skip_broken_images", "--overwrite_output_dir"])
    assert result["global_step"] == 4


def test_a_broken_file_stops_the_cache_build_naming_it_or_is_skipped_and_counted(tmp_path):
    folder = _write_folder(tmp_path / "imgs")
    (folder / "img_004.png").write_bytes(b"garbage")
    with pytest.raises(data.BrokenImageError, match="img_004.png"):
        _build(folder, tmp_path, "cache", num_workers=2)
    assert _cache_folders(tmp_path) == []
    ds = _build(folder, tmp_path, "cache", skip_broken_images=True, num_workers=2)
    assert len(ds) == 11 and ds.num_skipped == 1


# ----------------------------------------------------------------------------------------------------------------
# Training on each path: the log says which, and resume is exact
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["workers", "cache"])
def test_resume_is_exact_on_the_workers_and_cache_paths_with_workers(tmp_path, tiny_config, path, caplog):
    caplog.set_level(logging.INFO, logger="train_unconditional")
    folder = _write_folder(tmp_path / "imgs", n=32)
    common = [
        "--train_data_dir",
        folder,
        "--num_channels",
        1,
        "--data_loading",
        path,
        "--data_cache_dir",
        tmp_path / "cache",
        "--dataloader_num_workers",
        2,
        "--random_flip",
        "--max_train_samples",
        32,
        "--max_train_steps",
        6,
        "--checkpointing_steps",
        100,
        "--seed",
        2,
    ]
    full = tu.main(tiny_args(tiny_config, tmp_path / "full", *common))
    assert full["global_step"] == 6 and f"data path: {path}" in caplog.text and "2 DataLoader worker(s)" in caplog.text
    cut = tu.main(tiny_args(tiny_config, tmp_path / "cut", *common), should_stop=lambda step: step == 3)
    assert cut["interrupted"] and cut["global_step"] == 3  # 4 batches of 8 a pass: the stop is mid-epoch
    tu.main(tiny_args(tiny_config, tmp_path / "cut", *common, "--resume_from_checkpoint", "latest"))
    losses = read_losses(tmp_path / "cut")
    assert sorted(losses) == list(range(1, 7)) and losses == read_losses(tmp_path / "full")


def test_ctrl_c_in_a_terminal_on_the_workers_path_saves_a_checkpoint_and_exits_130(tmp_path, tiny_config):
    """A terminal's Ctrl-C reaches the whole process group, DataLoader workers included: they must outlive it so
    that the run can finish its update and save."""
    import signal
    import time

    from .conftest import training_in_background

    folder = _write_folder(tmp_path / "imgs", n=200)  # 25 batches an epoch: more than the workers prefetch
    out = tmp_path / "run"
    argv = tiny_args(
        tiny_config,
        out,
        "--train_data_dir",
        folder,
        "--num_channels",
        1,
        "--data_loading",
        "workers",
        "--dataloader_num_workers",
        2,
        "--max_train_samples",
        200,
        "--max_train_steps",
        100000,
        "--checkpointing_steps",
        100000,
        "--logging_steps",
        1,
    )
    with training_in_background(argv, out, own_session=True) as proc:
        time.sleep(1.0)  # a few epochs: the workers of the current one are alive
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "exited unexpectedly" not in err and len(tu.list_checkpoints(out)) == 1, err[-3000:]
