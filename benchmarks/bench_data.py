"""Data paths at scale (issue 20): peak memory and time to the first update, ours vs diffusers' example script.

    python benchmarks/bench_data.py                       # 1k, 4k, 16k JPEGs at 128 and 256 px (~10 min, 2 CPUs)
    python benchmarks/bench_data.py --sizes 1000 --resolutions 128   # one configuration
    python benchmarks/bench_data.py --quick               # 48 and 96 JPEGs at 32 px, side by side (the suite)
    python benchmarks/bench_data.py --json data.json      # also write every measurement

For every (number of images, resolution) a folder of generated JPEGs (smooth random images, 10 % larger than the
resolution and 4:3 or 3:4, quality 90) is written once under `--work_dir` and reused by later runs. Every path then
runs in a fresh process, one after the other (`--jobs 1`), on the same folder (in the page cache after its generation):

- `diffusers`: the data path of diffusers' `examples/unconditional_image_generation/train_unconditional.py`
  without torchvision: `load_dataset("imagefolder", data_dir=..., cache_dir=<empty>)`, `set_transform` with its
  Resize (shorter side, bilinear) + CenterCrop + RandomHorizontalFlip + ToTensor + Normalize([0.5], [0.5]),
  `DataLoader(shuffle=True, num_workers=--num_workers)`, then one update of diffusers' loop (`bench_utils`);
- ours, `training/train_unconditional.py`'s own functions (`parse_args`, `resolve_settings`, `load_training_data`,
  `build_model`, `prepare_training`, the first batch, `micro_step` + `update`), with `--data_loading` set to
  `memory` (decoded uint8 in RAM), `workers` (decoded per batch in DataLoader workers), `cache` on an empty
  `--data_cache_dir` (`cache-first`: the cache is built) and `cache` again on the built cache (`cache-rerun`).

Both sides: `--center_crop --random_flip`, batch `--batch_size`, `--num_workers` DataLoader workers, float32, the same
small UNet (no attention, so the model does not dominate; its size is printed), BENCH_THREADS torch threads (1).

Columns, per path:
- `peak MB`: the larger of the process's own peak RSS (ru_maxrss) and the peak of the proportional set size (PSS)
  summed over the process and its live subprocesses (DataLoader workers, cache builders), sampled every 20 ms. PSS
  splits a page shared by a forked worker and its parent between them, so workers are not counted twice.
- `self MB` / `subproc MB`: ru_maxrss of the process (RUSAGE_SELF) and of its largest finished subprocess
  (RUSAGE_CHILDREN: a worker or cache builder; that counts the pages it shares with the parent, so it is not added).
- `first update s`: from after the library imports (the same for every path; `imports s` is shown apart) to the end
  of the first update: loading the data (decoding, building the cache), the model, preparing, the first batch, one
  micro-step and one update. `first batch s` stops at the first batch (before the update); `data s` at the end of
  `load_training_data` (ours) or `load_dataset` (diffusers).
- `items/s/worker`: one process reading `--decode_items` items of the path's own dataset in random order,
  `dataset[i]` (what a worker does per item): decoding and resizing JPEGs for `workers` and diffusers, reading
  the uint8 cache for `cache-*`, indexing a tensor for `memory`. Measured after the first update.

The goals of issue 20, checked at the end for `workers` and `cache-*` (`memory` keeps the images in RAM by design):
RSS and start-up flat in the number of images (their growth per image from the smallest to the largest size under
10 % of today's slope: the old in-memory path, measured in the issue on 4,000 256x256 JPEGs at 7.9 GB peak and
24.6 s to build, i.e. 1.98 MB and 6.2 ms per image, scaled by the pixel count at other resolutions); peak RSS at most
diffusers' plus the model (its float32 weights); the cache rerun's first update in at most 0.2x the first run's;
items/s per worker at least diffusers' for `workers`, and far above it (we check >= 5x) from the uint8 cache.
Until `--data_loading` exists, every "ours" path runs today's in-memory path (marked "flag missing").
"""

import argparse
import concurrent.futures
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

OURS_PATHS = ("memory", "workers", "cache-first", "cache-rerun")
PATHS = ("diffusers", *OURS_PATHS)
FLAT_PATHS = ("workers", "cache-rerun")  # start-up flat in N: cache-first builds the cache, which must grow with N
BOUNDED_PATHS = ("workers", "cache-first", "cache-rerun")  # RSS at most diffusers' plus the model, flat in N
# Today's slope (issue 20: the old in-memory path on 4,000 JPEGs at 256x256): bytes and seconds per image.
TODAY_RSS_PER_IMAGE = 7.9e9 / 4000
TODAY_SECONDS_PER_IMAGE = 24.6 / 4000
TODAY_RESOLUTION = 256
FLAT_FRACTION = 0.1
RERUN_FRACTION = 0.2
CACHE_DECODE_FACTOR = 5.0  # our reading of "far above" diffusers' items/s
# The UNet both sides train: tiny and without attention (47 k parameters), so that the one update, the same on every
# path, stays small next to the data: at 256 px and batch 8 about 2 s and 0.6 GB of activations on one CPU thread.
DATA_UNET = {
    "layers_per_block": 1,
    "block_out_channels": [4, 8, 8, 16],
    "norm_num_groups": 4,
    "down_block_types": ["DownBlock2D"] * 4,
    "up_block_types": ["UpBlock2D"] * 4,
}


# ----------------------------------------------------------------------------------------------------------------
# The generated JPEG folders
# ----------------------------------------------------------------------------------------------------------------
def jpeg_size(index: int, resolution: int):
    """(width, height) of image `index`: shorter side 1.1x the resolution, 4:3 for even indices, 3:4 for odd."""
    short, long = round(1.1 * resolution), round(1.1 * resolution * 4 / 3)
    return (long, short) if index % 2 == 0 else (short, long)


def write_jpeg(job) -> None:
    """One smooth random RGB image (three octaves of bicubically upsampled noise) saved as a quality-90 JPEG."""
    import numpy as np
    from PIL import Image

    path, index, resolution, seed = job
    w, h = jpeg_size(index, resolution)
    rng = np.random.default_rng((seed, index))
    pixels = np.zeros((h, w, 3), dtype=np.float32)
    for cells, weight in ((3, 0.6), (12, 0.3), (48, 0.1)):
        grid = rng.integers(0, 256, (max(2, cells * h // w), max(2, cells * w // h), 3), dtype=np.uint8)
        pixels += weight * np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def jpeg_folder(work_dir: str, num_images: int, resolution: int, seed: int = 0) -> str:
    """The folder of `num_images` generated JPEGs at `resolution`, written in parallel once and reused."""
    import multiprocessing

    folder = os.path.join(work_dir, f"jpeg-{num_images}-{resolution}")
    marker = folder + ".done"  # written last: a folder without it is incomplete
    if os.path.exists(marker):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    jobs = [(os.path.join(folder, f"{i:06d}.jpg"), i, resolution, seed) for i in range(num_images)]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(write_jpeg, jobs, chunksize=64):
            pass
    with open(marker, "w") as f:
        json.dump({"images": num_images, "resolution": resolution, "seed": seed}, f)
    print(f"generated {num_images} JPEGs at {resolution} px in {time.perf_counter() - t0:.1f} s: {folder}", flush=True)
    return folder


def unet_config_file(work_dir: str, resolution: int) -> str:
    from bench_utils import unet_config

    path = os.path.join(work_dir, f"unet-{resolution}.json")
    with open(path, "w") as f:
        json.dump(unet_config(DATA_UNET, resolution), f)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Measuring inside a child
# ----------------------------------------------------------------------------------------------------------------
def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return 0


class TreeMemory:
    """The peak PSS of this process plus its live subprocesses, sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.me, self.interval, self.peak_kb = psutil.Process(), interval, 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stopped.is_set():
            try:
                pids = [self.me.pid] + [c.pid for c in self.me.children(recursive=True)]
            except Exception:  # a child ending while it is listed
                pids = [self.me.pid]
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(pid) for pid in pids))
            self.stopped.wait(self.interval)

    def stop(self) -> float:
        """Stop sampling; returns the peak in MB."""
        self.stopped.set()
        self.thread.join()
        return self.peak_kb / 1024


def close(batches) -> None:
    """End the DataLoader's iterator: its workers exit and are joined (into RUSAGE_CHILDREN)."""
    if hasattr(batches, "close"):
        batches.close()


def memory_report(tree: TreeMemory) -> dict:
    """Peak memory after the first update (the subprocesses that ended are in RUSAGE_CHILDREN)."""
    import gc

    gc.collect()
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    tree_mb = tree.stop()
    return {"peak_mb": max(self_mb, tree_mb), "self_mb": self_mb, "subproc_mb": children_mb, "tree_pss_mb": tree_mb}


def items_per_s(dataset, count: int, seed: int = 0) -> float:
    """`dataset[i]` for `count` indices in random order, in this process: items per second of one worker."""
    import random

    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    order = order[:count]
    t0 = time.perf_counter()
    for i in order:
        dataset[i]
    return len(order) / (time.perf_counter() - t0)


def our_argv(spec: dict, flags: bool) -> list:
    argv = ["--train_data_dir", spec["folder"], "--resolution", str(spec["resolution"]), "--center_crop"]
    argv += ["--random_flip", "--model_config_name_or_path", spec["config"], "--output_dir", spec["output_dir"]]
    argv += ["--train_batch_size", str(spec["batch_size"]), "--max_train_steps", "1", "--logger", "none"]
    argv += ["--mixed_precision", "no", "--dataloader_num_workers", str(spec["num_workers"])]
    if flags:
        mode = spec["path"].split("-")[0]
        argv += ["--data_loading", mode] + (["--data_cache_dir", spec["cache_dir"]] if mode == "cache" else [])
    return argv


def knows_data_loading(parse_args) -> bool:
    """Whether the training script has `--data_loading` (until it does, every path is today's in-memory one)."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parse_args(["--data_loading", "memory"])
        return True
    except SystemExit:
        return False


def memory_path_gb(spec: dict, flags: bool) -> float:
    """The RAM the in-memory path needs for the images: uint8, or (today) float32 twice (the list, then the stack)."""
    n, r = spec["num_images"], spec["resolution"]
    return n * 3 * r * r * (1 if flags else 8) / 1e9


def child_ours(spec: dict) -> dict:
    t_imports = time.perf_counter()
    import logging

    import torch
    from accelerate import Accelerator

    from training.model import build_model
    from training.settings import parse_args, resolve_settings
    from training.train_unconditional import DiffusionObjective, micro_step, update
    from training.training_run import load_training_data, prepare_training

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    imports_s = time.perf_counter() - t_imports
    flags = knows_data_loading(parse_args)
    need_gb = memory_path_gb(spec, flags)
    if (spec["path"] == "memory" or not flags) and need_gb > spec["memory_limit_gb"]:
        return {"skipped": f"would need {need_gb:.1f} GB", "flags": flags}
    said = []  # the "data path: ..." line the script logs

    class Said(logging.Handler):
        def emit(self, record):
            if "data path:" in record.getMessage():
                said.append(record.getMessage())

    log = logging.getLogger("train_unconditional")
    log.setLevel(logging.INFO)
    log.addHandler(Said())

    tree = TreeMemory()
    t0 = time.perf_counter()
    settings = resolve_settings(parse_args(our_argv(spec, flags)))
    accelerator = Accelerator(cpu=True, mixed_precision=settings.mixed_precision)
    dataset = load_training_data(settings, accelerator)
    data_s = time.perf_counter() - t0
    torch.manual_seed(settings.seed)
    model = build_model(settings, settings.num_channels)
    run = prepare_training(settings, accelerator, model, dataset)
    run.objective = DiffusionObjective()  # as the script's story does (run_training) before the loop
    run.objective.prepare(run)
    run.model.train()
    batches = run.batches.epoch(0)
    batch = next(batches)
    batch_s = time.perf_counter() - t0
    micro_step(run, batch, is_update=True)
    loss = float(update(run))
    timings = {"imports_s": imports_s, "first_update_s": time.perf_counter() - t0, "data_s": data_s}
    close(batches)
    return {
        **result(tree, timings, batch_s, loss, model, dataset, spec),
        "flags": flags,
        "data_path": said[-1] if said else None,
    }


def child_diffusers(spec: dict) -> dict:
    t_imports = time.perf_counter()
    import datasets
    import numpy as np
    import torch
    from accelerate import Accelerator
    from bench_utils import diffusers_step
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from PIL import Image

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    imports_s = time.perf_counter() - t_imports
    resolution = spec["resolution"]

    def augmentations(image):
        """torchvision's Resize(resolution, BILINEAR), CenterCrop, RandomHorizontalFlip, ToTensor, Normalize(0.5)."""
        w, h = image.size
        if w <= h:
            size = (resolution, int(resolution * h / w))
        else:
            size = (int(resolution * w / h), resolution)
        image = image.resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - resolution) / 2.0)), int(round((size[1] - resolution) / 2.0))
        image = image.crop((left, top, left + resolution, top + resolution))
        if torch.rand(1) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (x - 0.5) / 0.5

    def transform_images(examples):  # as diffusers' script
        return {"input": [augmentations(image.convert("RGB")) for image in examples["image"]]}

    tree = TreeMemory()
    t0 = time.perf_counter()
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=spec["folder"], cache_dir=spec["datasets_cache"], split="train"
    )
    data_s = time.perf_counter() - t0
    dataset.set_transform(transform_images)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=spec["batch_size"], shuffle=True, num_workers=spec["num_workers"]
    )
    config = json.load(open(spec["config"]))
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model = UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=len(loader))
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    ema.to(accelerator.device)
    model.train()
    batches = iter(loader)
    batch = next(batches)
    batch_s = time.perf_counter() - t0
    loss = diffusers_step(batch["input"], model, noise_scheduler, accelerator, optimizer, lr_scheduler, ema)
    loss = loss.item()
    timings = {"imports_s": imports_s, "first_update_s": time.perf_counter() - t0, "data_s": data_s}
    close(batches)
    return result(tree, timings, batch_s, loss, model, dataset, spec)


def result(tree, timings: dict, batch_s: float, loss: float, model, dataset, spec: dict) -> dict:
    """One child's measurements: the memory report (read before the decode timing), the timings, the model's size
    and the items/s per worker of `dataset`."""
    return {
        **memory_report(tree),
        **timings,
        "first_batch_s": batch_s,
        "loss": loss,
        "parameters": sum(p.numel() for p in model.parameters()),
        "items_per_s": items_per_s(dataset, spec["decode_items"]),
    }


def child(spec: dict) -> None:
    result = (child_diffusers if spec["path"] == "diffusers" else child_ours)(spec)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The parent: configurations, runs, table, goals
# ----------------------------------------------------------------------------------------------------------------
def measure(spec: dict) -> dict:
    from bench_utils import run_child

    result = run_child(os.path.abspath(__file__), ["--child", json.dumps(spec)], device="cpu")
    return {"path": spec["path"], "num_images": spec["num_images"], "resolution": spec["resolution"], **result}


def run_config(args, num_images: int, resolution: int) -> list:
    folder = jpeg_folder(args.work_dir, num_images, resolution)
    cache_dir = os.path.join(args.work_dir, f"cache-{num_images}-{resolution}")
    shutil.rmtree(cache_dir, ignore_errors=True)  # the first cache run starts from nothing
    scratch = tempfile.mkdtemp(prefix="bench-data-", dir=args.work_dir)
    base = {
        "folder": folder,
        "num_images": num_images,
        "resolution": resolution,
        "config": unet_config_file(args.work_dir, resolution),
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "decode_items": min(num_images, args.decode_items),
        "memory_limit_gb": args.memory_limit_gb,
        "cache_dir": cache_dir,
    }
    rows = []
    try:
        for path in PATHS:
            spec = dict(base, path=path, output_dir=os.path.join(scratch, f"out-{path}"))
            spec["datasets_cache"] = tempfile.mkdtemp(prefix="datasets-", dir=scratch)  # diffusers' first run
            row = measure(spec)
            rows.append(row)
            print(row_line(row), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


HEADER = (
    f"{'images':>7s} {'px':>4s} {'path':12s} {'peak MB':>8s} {'self MB':>8s} {'subproc MB':>10s} "
    f"{'first update s':>14s} {'first batch s':>13s} {'data s':>7s} {'imports s':>9s} {'items/s/worker':>14s}  data path"
)


def row_line(row: dict) -> str:
    head = f"{row['num_images']:7d} {row['resolution']:4d} {row['path']:12s}"
    if "error" in row:
        return f"{head} FAILED: {row['error'].strip().splitlines()[-1] if row['error'].strip() else '?'}"
    if "skipped" in row:
        return f"{head} skipped ({row['skipped']})"
    said = row.get("data_path") or ("" if row["path"] == "diffusers" else "(no 'data path:' line logged)")
    said = said.split("data path: ", 1)[-1][:60]
    if row["path"] != "diffusers" and not row.get("flags", True):
        said = "flag missing: today's in-memory path"
    return (
        f"{head} {row['peak_mb']:8.0f} {row['self_mb']:8.0f} {row['subproc_mb']:10.0f} {row['first_update_s']:14.2f} "
        f"{row['first_batch_s']:13.2f} {row['data_s']:7.2f} {row['imports_s']:9.2f} {row['items_per_s']:14.0f}  {said}"
    )


def find(rows: list, path: str, n: int, r: int):
    row = next((x for x in rows if (x["path"], x["num_images"], x["resolution"]) == (path, n, r)), None)
    return row if row is not None and "peak_mb" in row else None


def check_goals(rows: list, sizes: list, resolutions: list) -> dict:
    """Every goal of issue 20 that the measured rows decide, as {name: {"holds": bool, "detail": str}}."""
    goals = {}
    model_mb = {
        r: next((x["parameters"] * 4 / 2**20 for x in rows if "parameters" in x and x["resolution"] == r), 0)
        for r in resolutions
    }
    for r in resolutions:
        scale = (r / TODAY_RESOLUTION) ** 2
        lo, hi = min(sizes), max(sizes)
        for path in BOUNDED_PATHS if len(sizes) > 1 else ():
            a, b = find(rows, path, lo, r), find(rows, path, hi, r)
            if a and b:
                slope = (b["peak_mb"] - a["peak_mb"]) * 2**20 / (hi - lo)
                limit = FLAT_FRACTION * TODAY_RSS_PER_IMAGE * scale
                goals[f"RSS flat in N, {path} @ {r} px"] = {
                    "holds": slope < limit,
                    "detail": f"{slope / 1e3:.1f} kB/image ({lo}->{hi}) vs < {limit / 1e3:.0f} kB/image",
                }
        for path in FLAT_PATHS if len(sizes) > 1 else ():
            a, b = find(rows, path, lo, r), find(rows, path, hi, r)
            if a and b:
                slope = (b["first_update_s"] - a["first_update_s"]) / (hi - lo)
                limit = FLAT_FRACTION * TODAY_SECONDS_PER_IMAGE * scale
                goals[f"start-up flat in N, {path} @ {r} px"] = {
                    "holds": slope < limit,
                    "detail": f"{slope * 1e3:.3f} ms/image ({lo}->{hi}) vs < {limit * 1e3:.3f} ms/image",
                }
        for n in sizes:
            theirs = find(rows, "diffusers", n, r)
            for path in BOUNDED_PATHS:
                ours = find(rows, path, n, r)
                if theirs and ours:
                    limit = theirs["peak_mb"] + model_mb[r]
                    goals[f"RSS <= diffusers' + model, {path} @ {n}x{r}"] = {
                        "holds": ours["peak_mb"] <= limit,
                        "detail": f"{ours['peak_mb']:.0f} MB vs <= {theirs['peak_mb']:.0f} + {model_mb[r]:.1f} MB",
                    }
            first, rerun = find(rows, "cache-first", n, r), find(rows, "cache-rerun", n, r)
            if first and rerun:
                ratio = rerun["first_update_s"] / first["first_update_s"]
                goals[f"cache rerun <= {RERUN_FRACTION}x first run @ {n}x{r}"] = {
                    "holds": ratio <= RERUN_FRACTION,
                    "detail": f"{rerun['first_update_s']:.2f} s / {first['first_update_s']:.2f} s = {ratio:.2f} "
                    f"(to the first batch: {rerun['first_batch_s'] / first['first_batch_s']:.2f})",
                }
            for path, factor in (("workers", 1.0), ("cache-rerun", CACHE_DECODE_FACTOR)):
                ours = find(rows, path, n, r)
                if theirs and ours:
                    ratio = ours["items_per_s"] / theirs["items_per_s"]
                    goals[f"items/s/worker >= {factor:g}x diffusers', {path} @ {n}x{r}"] = {
                        "holds": ratio >= factor,
                        "detail": f"{ours['items_per_s']:.0f} / {theirs['items_per_s']:.0f} = {ratio:.2f}",
                    }
    return goals


def print_ratios(rows: list, sizes: list, resolutions: list) -> None:
    print("\nours / diffusers (peak MB, first update s, items/s/worker):")
    for r in resolutions:
        for n in sizes:
            theirs = find(rows, "diffusers", n, r)
            if theirs is None:
                continue
            cells = []
            for path in OURS_PATHS:
                ours = find(rows, path, n, r)
                if ours is not None:
                    cells.append(
                        f"{path} {ours['peak_mb'] / theirs['peak_mb']:.2f} "
                        f"{ours['first_update_s'] / theirs['first_update_s']:.2f} "
                        f"{ours['items_per_s'] / theirs['items_per_s']:.1f}"
                    )
            print(f"  {n:6d} x {r:3d} px: " + "; ".join(cells))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="Numbers of JPEGs.")
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 256], help="Training resolutions.")
    p.add_argument("--batch_size", type=int, default=8, help="Images per batch (diffusers' default is 16).")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of every path.")
    p.add_argument("--decode_items", type=int, default=256, help="Items read for items/s/worker.")
    p.add_argument("--memory_limit_gb", type=float, default=12.0, help="Skip an in-memory run needing more.")
    p.add_argument(
        "--work_dir",
        default=os.path.join(tempfile.gettempdir(), "bench_data"),
        help="Where the generated JPEG folders (kept, reused by later runs) and the caches live.",
    )
    p.add_argument("--keep_cache", action="store_true", help="Keep each built cache (default: removed after use).")
    p.add_argument(
        "--jobs", type=int, default=1, help="Configurations measured side by side (1 for numbers; --quick uses 2)."
    )
    p.add_argument("--json", default=None, help="Also write every measurement and the goals as JSON here.")
    p.add_argument("--quick", action="store_true", help="48 and 96 JPEGs at 32 px, every path once (for the tests).")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        args.sizes, args.resolutions, args.decode_items, args.jobs = [48, 96], [32], 48, 2
    os.makedirs(args.work_dir, exist_ok=True)

    t0 = time.perf_counter()
    rows = []
    print(HEADER, flush=True)
    configs = [(n, r) for r in args.resolutions for n in args.sizes]
    for n, r in configs:  # generated before any run is timed
        jpeg_folder(args.work_dir, n, r)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each run is a subprocess
        for config_rows in pool.map(lambda config: run_config(args, *config), configs):
            rows += config_rows
    parameters = next((x["parameters"] for x in rows if "parameters" in x), None)
    if parameters is not None:
        print(
            f"\nmodel: UNet2DModel {DATA_UNET['block_out_channels']}, {parameters / 1e6:.2f} M parameters, "
            f"{parameters * 4 / 2**20:.1f} MB of float32 weights; batch {args.batch_size}, "
            f"{args.num_workers} workers, {os.environ.get('BENCH_THREADS', '1')} torch thread(s)"
        )
    print_ratios(rows, args.sizes, args.resolutions)
    goals = check_goals(rows, args.sizes, args.resolutions)
    print("\ngoals of issue 20" + (" (--quick: sizes too small for them to mean anything):" if args.quick else ":"))
    for name, goal in goals.items():
        print(f"  [{'ok' if goal['holds'] else 'NO'}] {name}: {goal['detail']}")
    print(f"\n{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            report = {"rows": rows, "goals": goals, "parameters": parameters, "unet": DATA_UNET, "args": vars(args)}
            json.dump(report, f, indent=2)
    failed = [row for row in rows if "error" in row]
    if failed:
        for row in failed:
            print(
                f"\n{row['path']} @ {row['num_images']}x{row['resolution']} failed:\n{row['error']}", file=sys.stderr
            )
        sys.exit(1)


if __name__ == "__main__":
    main()
