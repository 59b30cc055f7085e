"""Pieces the training benchmarks share: a generated image folder, UNet configs, and diffusers' training loop.

"diffusers' loop" re-creates the training loop of diffusers' `examples/unconditional_image_generation/
train_unconditional.py` (0.42.x) without torchvision: a `datasets.Dataset` of PIL images whose transform resizes,
center-crops and normalises every image on every access, `shuffle=True`, `DDPMScheduler.add_noise`, ε-prediction
MSE, `accelerator.accumulate`, gradient clipping at 1.0, AdamW (β1 = 0.95, weight decay 1e-6), a cosine schedule with
500 warm-up updates, an `EMAModel` moved to the device, the loss read every update (as the script logs it), and that
script's defaults (lr 1e-4, EMA max decay 0.9999).
"""

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# diffusers' train_unconditional.py builds this UNet when no --model_config_name_or_path is given (113.7 M parameters
# at 64x64 RGB).
DIFFUSERS_DDPM_UNET = {
    "layers_per_block": 2,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": [
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
# The same architecture, narrow (for `--quick` runs on a CPU): the same block types, widths / 16.
TINY_DDPM_UNET = {
    **DIFFUSERS_DDPM_UNET,
    "layers_per_block": 1,
    "block_out_channels": [8, 8, 16, 16, 32, 32],
    "norm_num_groups": 8,
}
# The folder run both GPU benchmarks time (gpu_check.py, bench_training_gpu.py), with diffusers' batch size for this UNet:
# 2,048 generated 64x64 images, batch 64, 300 updates.
FOLDER_RUN = dict(resolution=64, images=2048, batch=64, steps=300)
# A mid-size UNet for 32x32 on a CPU: 4 levels, attention at 8x8, ~9 M parameters.
MID_UNET = {
    "layers_per_block": 1,
    "block_out_channels": [64, 128, 128, 256],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
}

# A small UNet with attention at the lower level (~0.7 M parameters), where a pipeline's own overhead shows.
SMALL_ATTN_UNET = {
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}


def unet_config(arch: Dict, resolution: int, channels: int = 3) -> Dict:
    """A full `UNet2DModel` config.json dict for `arch` at `resolution`."""
    return {
        "_class_name": "UNet2DModel",
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        **arch,
    }


def write_shapes_folder(folder: str, num_images: int, resolution: int, seed: int = 0) -> str:
    """A folder of `num_images` RGB PNGs: coloured ellipses and boxes on smooth two-colour gradients.

    Structured like natural images at small scale (smooth regions, sharp edges), made without any download.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    ramp = np.linspace(0.0, 1.0, resolution, dtype=np.float32)
    for i in range(num_images):
        c0, c1 = rng.randint(0, 256, 3), rng.randint(0, 256, 3)
        direction = ramp[None, :, None] if rng.rand() < 0.5 else ramp[:, None, None]
        background = (c0 * (1 - direction) + c1 * direction).astype(np.uint8)
        background = np.broadcast_to(background, (resolution, resolution, 3)).copy()
        image = Image.fromarray(background)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x0, y0 = rng.randint(0, resolution - 4, 2)
            w, h = rng.randint(3, max(4, resolution // 2), 2)
            box = [int(x0), int(y0), int(min(resolution - 1, x0 + w)), int(min(resolution - 1, y0 + h))]
            fill = tuple(int(v) for v in rng.randint(0, 256, 3))
            (draw.ellipse if rng.rand() < 0.5 else draw.rectangle)(box, fill=fill)
        image.save(os.path.join(folder, f"{i:05d}.png"))
    return folder


def run_child(script: str, child_argv: List[str], device: str) -> Dict:
    """Run `python script *child_argv` in a fresh process (a fresh CUDA context and a clean peak-memory count; no GPU
    visible when `device` is `"cpu"`, any other value leaves the devices as they are), offline, from the repository
    root.

    Returns:
        The dict the child printed on its last `RESULT <json>` line, or `{"error": <end of its stderr>}` if it
        failed; both with `seconds_total`, the wall time of the process.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, script, *child_argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr[-4000:], "seconds_total": time.perf_counter() - t0}
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT ") :]), "seconds_total": time.perf_counter() - t0}


def folder_run_inputs(s: Dict, work: str, quick: bool) -> Tuple[str, Dict, str]:
    """The inputs of the folder run, written under `work`: the image folder, and diffusers' DDPM UNet config
    (`TINY_DDPM_UNET` if `quick`) at `s["resolution"]`.

    Returns:
        `(folder, config, config_path)`.
    """
    folder = write_shapes_folder(os.path.join(work, "images"), s["images"], s["resolution"])
    config = unet_config(TINY_DDPM_UNET if quick else DIFFUSERS_DDPM_UNET, s["resolution"])
    path = os.path.join(work, "unet_config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return folder, config, path


def diffusers_loop(
    folder: str,
    config: Dict,
    steps: int,
    batch_size: int,
    mixed_precision: str,
    seed: int = 0,
    learning_rate: float = 1e-4,
    warmup: int = 500,
    warmup_updates: int = 0,
) -> Dict:
    """Train `config` on the images of `folder` with diffusers' loop (module docstring).

    Returns:
        `dict`: `losses` (one per update), `seconds` (the loop, data loading in), `images_per_s`, `marks` (the
        clock at updates `warmup_updates` and `steps`, for `steady_images_per_s`), `peak_memory_gb` (CUDA, or None
        on the CPU), `device`.
    """
    import datasets
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    resolution = config["sample_size"]
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
    ds = datasets.Dataset.from_dict({"image": files}, features=datasets.Features({"image": datasets.Image()}))

    def transforms(examples):  # Resize(bilinear) + CenterCrop + ToTensor + Normalize([0.5], [0.5]), per access
        out = []
        for image in examples["image"]:
            image = image.convert("RGB").resize((resolution, resolution), Image.BILINEAR)
            out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1)
        return {"input": out}

    ds.set_transform(transforms)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    model = UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.95, 0.999), weight_decay=1e-6)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    ema.to(accelerator.device)
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses: List[float] = []
    times: List[float] = []  # after each update; the loss read with .item() has synchronised the device
    start = time.perf_counter()
    while len(losses) < steps:
        for batch in loader:
            clean = batch["input"].to(weight_dtype)
            loss = diffusers_step(clean, model, noise_scheduler, accelerator, optimizer, lr_scheduler, ema)
            losses.append(loss.detach().item())
            times.append(time.perf_counter())
            if len(losses) >= steps:
                break
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "losses": losses,
        "seconds": seconds,
        "images_per_s": steps * batch_size / seconds,
        "marks": {update: times[update - 1] for update in (warmup_updates, steps) if update >= 1},
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": str(accelerator.device),
    }


def diffusers_step(clean, model, noise_scheduler, accelerator, optimizer, lr_scheduler, ema):
    """One update of diffusers' train_unconditional.py loop on a batch `clean` in [-1, 1]; returns the loss.

    As that script: noise and timesteps drawn in the batch's dtype, ε-prediction MSE in float32 under
    `accelerator.accumulate`, gradients clipped at 1.0, the EMA stepped after the update.
    """
    import torch
    import torch.nn.functional as F

    noise = torch.randn(clean.shape, dtype=clean.dtype, device=clean.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device).long()
    noisy = noise_scheduler.add_noise(clean, noise, t)
    with accelerator.accumulate(model):
        loss = F.mse_loss(model(noisy, t).sample.float(), noise.float())
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    if accelerator.sync_gradients:
        ema.step(model.parameters())
    return loss


def ours_loop(
    folder: str,
    config_path: str,
    steps: int,
    batch_size: int,
    extra: List[str],
    output_dir: str,
    warmup_updates: int = 0,
) -> Dict:
    """Train with `training/train_unconditional.py` (its defaults plus `extra`), timed like `diffusers_loop`.

    The clock starts at the first micro-batch and stops where the final checkpoint starts (start-up, the final
    evaluation and export excluded, as in `diffusers_loop`); `marks` holds it at updates `warmup_updates` and
    `steps`, read after synchronising the device (the loop itself does not wait for it).
    """
    import torch

    from training import train_unconditional as tu

    clock = {"marks": {}}
    real_micro_step, real_save, real_update = tu.micro_step, tu.save_checkpoint, tu.update

    def marked_update(run):
        loss = real_update(run)
        if run.state.global_step in (warmup_updates, steps):
            if run.accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            clock["marks"][run.state.global_step] = time.perf_counter()
        return loss

    def timed_micro_step(run, *args, **kwargs):
        if "start" not in clock:
            clock["start"] = time.perf_counter()
            clock["device"] = str(run.accelerator.device)
            if run.accelerator.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        return real_micro_step(run, *args, **kwargs)

    def timed_save(run, *args, **kwargs):
        if run.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
            clock.setdefault("peak", torch.cuda.max_memory_allocated() / 2**30)
        clock.setdefault("end", time.perf_counter())
        return real_save(run, *args, **kwargs)

    tu.micro_step, tu.save_checkpoint, tu.update = timed_micro_step, timed_save, marked_update
    try:
        resolution = json.load(open(config_path))["sample_size"]
        argv = ["--train_data_dir", folder, "--resolution", str(resolution)]
        argv += ["--model_config_name_or_path", config_path]
        argv += ["--train_batch_size", str(batch_size), "--max_train_steps", str(steps), "--checkpointing_steps"]
        argv += [str(steps), "--output_dir", output_dir, "--logger", "none", "--eval_batch_size", "4"]
        argv += ["--ddpm_num_inference_steps", "5", *extra]
        tu.main(argv)
    finally:
        tu.micro_step, tu.save_checkpoint, tu.update = real_micro_step, real_save, real_update
    with open(os.path.join(output_dir, "losses.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(output_dir, "metrics.json")) as f:
        metrics = json.load(f)
    seconds = clock["end"] - clock["start"]
    return {
        "losses": [r["loss"] for r in sorted(rows, key=lambda r: r["step"])],
        "seconds": seconds,
        "images_per_s": steps * batch_size / seconds,
        "marks": clock["marks"],
        "peak_memory_gb": clock.get("peak"),
        "device": clock["device"],
        "learning_rate": metrics["learning_rate"],
        "mixed_precision": metrics["mixed_precision"],
    }


def window_mean(losses: List[float], update: int, width: int = 10) -> float:
    """The mean loss of updates `update - width + 1 .. update` (1-based): one update's loss is too noisy to compare."""
    window = losses[max(0, update - width) : update]
    return sum(window) / len(window)


def steady_images_per_s(result: Dict, batch_size: int) -> float:
    """Images/s between the two `marks` of a loop's result (after its warm-up: compilation, cuDNN's autotuning)."""
    (first, t0), (last, t1) = sorted((int(k), v) for k, v in result["marks"].items())
    return (last - first) * batch_size / (t1 - t0)
