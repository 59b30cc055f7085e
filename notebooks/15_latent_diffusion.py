# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 15. Latent diffusion: compress first, then diffuse
#
# A pixel diffusion model spends most of its capacity, and all of its sampling steps, on a space where most of the
# numbers are redundant: neighbouring pixels are correlated and much of an image's detail is imperceptible. Latent
# diffusion (Rombach et al. 2022, arXiv:2112.10752) splits the work in two:
#
# 1. **perceptual compression**: an autoencoder, trained once, maps an image $x$ to a smaller latent $z = E(x)$ and
#    back, $x \approx D(z)$. It removes the detail that does not matter and keeps the rest;
# 2. **semantic generation**: a diffusion model learns the distribution of the latents. Sampling runs the whole
#    reverse process on $z$ and decodes once at the end, $x = D(z_0)$.
#
# Here the autoencoder is the project's `digits-vae` (a diffusers `AutoencoderKL`, trained by
# `training/train_autoencoder.py`): a $1 \times 32 \times 32$ digit becomes a $4 \times 8 \times 8$ latent, 4× fewer
# numbers and 16× fewer spatial positions. A UNet's cost is proportional to the positions it convolves over, so each
# denoising step costs about 16× less, and the decoder runs once per sample, not once per step. Stable Diffusion does
# the same with a $3 \times 512 \times 512 \to 4 \times 64 \times 64$ autoencoder.
#
# One detail decides whether this works: the **scale of the latents**. The noise schedule was designed for data of
# about unit variance; latents have whatever scale the autoencoder happened to learn, and LDM multiplies them by a
# `scaling_factor` $s = 1/\operatorname{std}(z)$ before the diffusion model sees them (LDM Sec. 4.3.2 and App. G).
# This notebook measures the autoencoder and its latents, shows what the scale does to the forward process, trains
# two latent models that differ only in $s$, and puts the shipped pixel and latent models side by side.

# %%
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

import training
from custom_pipelines import TutorialLatentPipeline, TutorialUnconditionalPipeline
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from training import train_unconditional
from training.autoencoder import reconstruct
from training.data import load_digits_tensors
from training.grids import make_grid
from training.metrics import digits_metrics
from training.model import default_unet_config
from training.sampling import sample_sharded
from training.super_resolution import psnr

FAST = os.environ.get("TUTORIAL_FAST") == "1"
TRAIN_STEPS = 6 if FAST else 600  # optimizer updates of 64 digits for each of the two runs of section 4
NUM_SAMPLES = 16 if FAST else 512  # samples per model for the digits metrics
SAMPLE_STEPS = 10 if FAST else 50  # DDIM steps, every model
TIMING_IMAGES = 8 if FAST else 64
PRETRAINED = Path(training.__file__).resolve().parent / "pretrained"
VAE, PIXEL, LATENT = PRETRAINED / "digits-vae", PRETRAINED / "digits-ddpm", PRETRAINED / "digits-ldm"
tic = time.perf_counter()

# %% [markdown]
# ## 1. The autoencoder: reconstructions and latents
#
# The encoder gives a Gaussian posterior $q(z \mid x) = \mathcal N(\mu(x), \operatorname{diag}\sigma^2(x))$; the
# decoder is trained to rebuild $x$ from samples of it, with a small KL penalty towards $\mathcal N(0, I)$ (LDM's
# "KL-reg", weight $10^{-6}$; the project's loss is in `training/autoencoder.py`). We reconstruct the held-out digits
# (never seen in training) from the posterior mode, $\hat x = D(\mu(x))$, and measure the PSNR. For scale: the same
# 256 numbers spent on a plain $16 \times 16$ thumbnail (average-pooled, then upsampled bilinearly) give the naive
# compression at equal size.

# %%
vae = AutoencoderKL.from_pretrained(VAE).eval()
held_out, held_out_labels = load_digits_tensors(resolution=32, split="test")
if FAST:
    held_out, held_out_labels = held_out[:64], held_out_labels[:64]
recon = reconstruct(vae, held_out)
thumbnail = F.interpolate(F.avg_pool2d(held_out, 2), scale_factor=2, mode="bilinear", align_corners=False)
psnr_vae, psnr_thumbnail = psnr(recon, held_out), psnr(thumbnail, held_out)
with torch.no_grad():
    posterior = vae.encode(held_out[:8]).latent_dist
print(f"{len(held_out)} held-out digits, {tuple(held_out.shape[1:])} -> latents {tuple(posterior.mean.shape[1:])}")
print(f"PSNR of D(mu(x)): {psnr_vae:.1f} dB; a 16x16 thumbnail (the same 256 numbers): {psnr_thumbnail:.1f} dB")

fig, axes = plt.subplots(7, 8, figsize=(8, 7.4))
rows = [("original", held_out[:8, 0]), ("D(μ(x))", recon[:8, 0]), ("|error| ×4", 4 * (recon - held_out)[:8, 0].abs())]
rows += [(f"μ, channel {c}", posterior.mean[:, c]) for c in range(4)]
for r, (label, images) in enumerate(rows):
    for ax, image in zip(axes[r], images):
        kwargs = {"cmap": "gray", "vmin": -1, "vmax": 1} if r < 2 else {"cmap": "gray" if r == 2 else "RdBu_r"}
        if r == 2:
            kwargs.update(vmin=0, vmax=2)
        ax.imshow(image, **kwargs)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[r][0].set_ylabel(label, fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The reconstructions are hard to tell from the originals (over 40 dB at full size; the thumbnail, which spends the
# same 256 numbers on pixels, loses the strokes' edges). The four latent channels are not images of the digit: each
# is an $8 \times 8$ map that still follows the digit's layout (the encoder is convolutional, so a latent position
# describes its $4 \times 4$ patch), with its own offset and contrast. Their values are far from unit scale, as the
# next section measures.
#
# ## 2. Latent statistics and the scaling factor
#
# We encode the training digits, draw one posterior sample per digit (what a latent diffusion model is trained on),
# and measure the mean and standard deviation of every channel and of all values together.

# %%
train_digits, _ = load_digits_tensors(resolution=32, split="train")
if FAST:
    train_digits = train_digits[:256]
with torch.no_grad():
    train_posterior = vae.encode(train_digits).latent_dist
    z = train_posterior.sample(generator=torch.Generator().manual_seed(0))
s = vae.config.scaling_factor
std = z.std().item()
print(f"{len(train_digits)} training digits -> {z.numel():,} latent values")
print("channel      mean     std   (after scaling by s: mean, std)")
for c in range(z.shape[1]):
    zc = z[:, c]
    print(f"   {c}     {zc.mean():7.3f} {zc.std():7.3f}        {s * zc.mean():6.3f} {s * zc.std():6.3f}")
print(f" all     {z.mean():7.3f} {std:7.3f}        {s * z.mean():6.3f} {s * std:6.3f}")
print(f"posterior sigma(x), mean over values: {train_posterior.std.mean():.4f} (the latents are nearly deterministic)")
print(f"1 / std = {1 / std:.5f}; the VAE's config: scaling_factor = {s:.5f}; s * std = {s * std:.3f}")
outside = (s * z).abs().gt(1).float().mean().item()
print(f"scaled latents outside [-1, 1]: {outside:.1%}")

# %% [markdown]
# Two facts stand out. The raw latents have a standard deviation near 4.7, and the posterior's own $\sigma(x)$ is tiny:
# with a KL weight of $10^{-6}$ nothing pulls the latents towards unit scale, so their scale is an accident of training
# (a different run of the same autoencoder would pick another). And the channels differ in offset and spread; one
# scalar $s$ normalises them only on average (SDXL's and SD3's autoencoders also ship per-channel or shift terms,
# `latents_mean`/`latents_std` and `shift_factor`).
#
# `train_autoencoder.py` measures $s = 1/\operatorname{std}(z)$ on the training data when it saves the VAE; the config
# holds 0.2149 and our measurement agrees. Stable Diffusion's famous 0.18215 is the same recipe applied to *its*
# autoencoder (1/std of its latents on a batch of training images); it is a property of that VAE, not a constant of
# latent diffusion. On this VAE it happens to land close (s · std ≈ 0.85).
#
# Note also the last line: more than a quarter of the scaled latents lie outside $[-1, 1]$. Pixel samplers clip their
# estimate $\hat x_0$ to $[-1, 1]$ (`clip_sample`), which is right for pixels and wrong for latents; section 3 shows
# what it does.
#
# ### Why unit variance: the forward process on scaled latents
#
# The diffusion model sees $\tilde z = s z$ and the forward process $q(\tilde z_t \mid \tilde z_0) =
# \mathcal N(\sqrt{\bar\alpha_t}\,\tilde z_0, (1 - \bar\alpha_t) I)$. Its signal-to-noise ratio is
# $$\mathrm{SNR}(t) = \frac{\bar\alpha_t\, s^2 \operatorname{Var}(z)}{1 - \bar\alpha_t},$$
# so the scale multiplies the SNR by $(s \cdot \operatorname{std})^2$ at *every* $t$: on a log-SNR plot the whole
# schedule shifts by $2 \log(s \cdot \operatorname{std})$. With $s = 1$ here that is a factor of about 22: the schedule
# was built to end at pure noise and to spend its middle steps on the noise levels where the image's layout is
# decided; shifted, it ends with more of the data left in $\tilde z_T$ than the sampler's prior
# $\tilde z_T \sim \mathcal N(0, I)$ assumes, and fewer steps are spent at low SNR. Below: the SNR curves of our
# linear schedule for three scales, and the signal still present at $t = T$ for ours and for Stable Diffusion's
# schedule (`scaled_linear`, $\beta$ from 0.00085 to 0.012, whose $\bar\alpha_T = 0.0047$ leaves far more), measured
# by noising the actual training latents: $\operatorname{corr}(\tilde z_T, \tilde z_0)$ is 0 for a perfect prior.

# %%
scales = {"s = 1 (no scaling)": 1.0, f"s = 1/std = {1 / std:.4f}": 1 / std, "s = 0.18215 (SD's)": 0.18215}
schedules = {
    "ours: linear, β 1e-4..0.02": TutorialDDPMScheduler(beta_schedule="linear"),
    "SD: scaled_linear, β 0.00085..0.012": TutorialDDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ),
}
eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
at_T = {}  # (schedule, scale) -> facts of z̃_T
for sched_name, sched in schedules.items():
    alpha_bar = sched.alpha_bar.double()
    for name, scale in scales.items():
        z0 = scale * z
        z_T = alpha_bar[-1].sqrt() * z0 + (1 - alpha_bar[-1]).sqrt() * eps
        snr = alpha_bar / (1 - alpha_bar) * (scale * std) ** 2
        at_T[sched_name, name] = {
            "signal_std": float(alpha_bar[-1].sqrt() * z0.std()),
            "corr": float(torch.corrcoef(torch.stack([z_T.flatten(), z0.flatten()]))[0, 1]),
            "std_z_T": float(z_T.std()),
            "t_snr_1": int((snr < 1).nonzero()[0]),
            "log_snr": snr.log(),
        }
print(f"{'schedule':>36} {'scale':>22}   signal std at T   corr(z_T, z_0)   std(z_T)   SNR = 1 at t")
for (sched_name, name), v in at_T.items():
    print(
        f"{sched_name:>36} {name:>22}   {v['signal_std']:15.4f}   {v['corr']:14.4f}   {v['std_z_T']:8.3f}   "
        f"{v['t_snr_1']:12d}"
    )

ours = next(iter(schedules))
fig, (ax_snr, ax_hist) = plt.subplots(1, 2, figsize=(11, 3.6))
for name in scales:
    ax_snr.plot(at_T[ours, name]["log_snr"], label=name)
ax_snr.axhline(0, color="gray", ls=":", lw=1)
ax_snr.set_xlabel("t")
ax_snr.set_ylabel("log SNR(t)")
ax_snr.set_title("linear schedule on the scaled latents")
ax_snr.legend(fontsize=8)
for c in range(z.shape[1]):
    ax_hist.hist((s * z[:, c]).flatten().numpy(), bins=80, range=(-3.5, 3.5), histtype="step", label=f"channel {c}")
ax_hist.axvline(-1, color="gray", ls=":")
ax_hist.axvline(1, color="gray", ls=":")
ax_hist.set_xlabel("scaled latent s·z (dotted: the clip range of pixel samplers)")
ax_hist.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# With the measured scale the SNR crosses 1 near $t = 260$, as for pixels of unit scale; unscaled, not before
# $t \approx 550$: more than half of the training steps see latents in which the signal dominates. At $t = T$, our
# linear schedule is forgiving: even unscaled, $\tilde z_T$ keeps only a correlation of 0.03 with the data, against
# 0.006 when scaled, a mismatch the sampler hardly notices. Stable Diffusion's schedule ends far less noisy, and there
# an unscaled latent would start the sampler from the wrong prior outright ($\tilde z_T$ keeps a correlation of 0.3
# with the data and a std 5 % above 1), which is why the scale factor is part of every latent diffusion checkpoint.
#
# ## 3. Train with a wrong scale, and see
#
# Two runs of `training/train_unconditional.py --vae`, identical in every flag and seed. The only difference is the
# VAE folder: a temporary copy of `digits-vae` whose `config.json` says `scaling_factor: 1.0`, and the shipped one
# (the measured $1/\operatorname{std}$). The script measures the latents' std over its first batches and warns when
# $s \cdot \operatorname{std}$ is outside $[0.5, 2]$; it trains anyway, which is what we want to see.

# %%
workdir = tempfile.TemporaryDirectory(prefix="latent-scale-")  # removed once the pipelines are loaded
unscaled_vae = Path(workdir.name) / "vae-scale-1"
shutil.copytree(VAE, unscaled_vae)
config = json.loads((unscaled_vae / "config.json").read_text())
(unscaled_vae / "config.json").write_text(json.dumps({**config, "scaling_factor": 1.0}, indent=2))

runs, warnings_logged, train_seconds = {}, {}, {}
for name, vae_folder in (("s = 1", unscaled_vae), ("s = 1/std", VAE)):
    output_dir = Path(workdir.name) / name.replace(" ", "").replace("/", "-")
    argv = [
        "--resolution", "32",
        "--vae", str(vae_folder),
        "--output_dir", str(output_dir),
        "--max_train_steps", str(TRAIN_STEPS),
        "--lr_warmup_steps", str(max(1, TRAIN_STEPS // 10)),
        "--seed", "0",
        "--logger", "none",
        "--eval_batch_size", "8",
        "--ddpm_num_inference_steps", "5",
        "--save_images_epochs", "1000000",
        "--save_model_epochs", "1000000",
        "--checkpointing_steps", "1000000",
    ]  # fmt: skip
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()) as log:  # keep the script's log lines, drop its progress bar
        final = train_unconditional.main(argv)
    train_seconds[name] = time.perf_counter() - start
    warnings_logged[name] = [  # "<date> <time> WARNING train_unconditional: <message>"
        line.split(" WARNING ", 1)[1].split(": ", 1)[1] for line in log.getvalue().splitlines() if " WARNING " in line
    ]
    losses = [json.loads(line)["loss"] for line in (output_dir / "losses.jsonl").read_text().splitlines()]
    runs[name] = {"pipe": TutorialLatentPipeline.from_pretrained(output_dir), "losses": losses, "final": final}
    print(f"{name}: {final['global_step']} updates in {train_seconds[name]:.0f} s; script warnings:")
    print("\n".join("  " + w.replace(workdir.name, "<workdir>") for w in warnings_logged[name]) or "  none")
workdir.cleanup()
window = min(50, TRAIN_STEPS)
for name, run in runs.items():
    print(f"{name}: loss over the last {window} updates {sum(run['losses'][-window:]) / window:.3f}")

# %% [markdown]
# The two losses are not comparable: the same $\varepsilon$-prediction loss is a different task on a different
# effective schedule (at high SNR, finding small noise in a large signal is harder, so the unscaled run's loss is
# higher). The samples are what count. We sample both with DDIM, the same steps and seeds, twice: with `clip_sample`
# off (right for latents, and what `train_unconditional.py --vae` saves in the folder's scheduler config) and on (the
# pixel default, which any scheduler built without that config carries; DDIM then clips $\hat{\tilde z}_0$ to
# $[-1, 1]$ at every step).


# %%
def sample_latent(pipe, clip, n=NUM_SAMPLES, seed=0):
    """n decoded samples in [-1, 1]: DDIM with SAMPLE_STEPS steps, `clip_sample` as given, sample i seeded by i."""
    scheduler = TutorialDDIMScheduler.from_config(pipe.scheduler.config, clip_sample=clip)
    return sample_sharded(pipe.unet.eval(), scheduler, n, SAMPLE_STEPS, seed=seed, vae=pipe.vae)


scale_samples = {(name, clip): sample_latent(runs[name]["pipe"], clip) for name in runs for clip in (False, True)}
scale_metrics = {key: digits_metrics(x) for key, x in scale_samples.items()}
print(f"{NUM_SAMPLES} samples each, DDIM-{SAMPLE_STEPS}, {TRAIN_STEPS} updates per run")
for (name, clip), m in scale_metrics.items():
    print(
        f"{name:>9}, clip_sample={str(clip):5}: Fréchet distance {m['frechet_distance']:7.1f}, classes covered "
        f"{m['class_coverage']:.1f}, histogram {m['class_histogram']}"
    )
fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
for ax, ((name, clip), x) in zip(axes, scale_samples.items()):
    ax.imshow(make_grid(x[:36], nrow=6), cmap="gray")
    ax.set_title(f"{name}, clip_sample={clip}\nFD {scale_metrics[name, clip]['frechet_distance']:.0f}", fontsize=9)
    ax.axis("off")
plt.show()

# %% [markdown]
# What the full-size runs (600 updates each, one to two and a half minutes per run on one shared core) show, honestly:
#
# * **Without clipping, the wrong scale makes no difference we can measure at this length.** In the committed run
#   (seed 0) the unscaled model's Fréchet distance is 148 against 99 for the scaled one; the same two runs with
#   `--seed 1` gave 129 against 131. Both models are early in training (the shipped pixel model below reaches about
#   45), and the seed moves the numbers by more than the scale does. The SNR argument says why: a shifted schedule is
#   a *different* schedule, not an inconsistent one (training and sampling share it), and on our linear schedule the
#   prior at $t = T$ is nearly right either way. What the wrong scale does is move more than half of the steps to
#   high SNR; that costs more on a schedule that ends less noisy (Stable Diffusion's, above) and on larger images,
#   where the low-SNR steps decide more (Chen 2023, arXiv:2301.10972, scales the *input* on purpose, by a factor
#   below 1, to shift the schedule the other way).
# * **With the pixel default `clip_sample=True`, the scale decides everything.** Unscaled latents have std ≈ 4.7;
#   clipping every $\hat{\tilde z}_0$ to $[-1, 1]$ destroys them: every sample decodes to the same grey texture,
#   which the classifier files under one class. Scaled latents survive better, but more than a quarter of their
#   values lie outside $[-1, 1]$ and the clipped samples are still several times worse (in Fréchet distance) than
#   unclipped ones, with both seeds. A latent pipeline must sample with `clip_sample=False` (Stable Diffusion's
#   scheduler config sets it so, and so does the folder `train_unconditional.py --vae` writes): the scale factor and
#   the sampler's settings are one decision.
#
# ## 4. Pixel and latent models side by side
#
# The shipped pixel model `digits-ddpm` works at 16×16 (a 0.65M-parameter UNet); the shipped latent model
# `digits-ldm` generates 32×32 digits through `digits-vae`, with a UNet of the same default shape on the 4×8×8
# latents. Both sample with DDIM at the same steps and seeds, the pixel model with `clip_sample` as trained (its
# pixel range), the latent model without clipping. The time per image includes the decoder for the latent model.
# A pixel model at 32×32 is the fair comparison for speed; we do not ship one, so we time one step of the
# training script's default UNet at 32×32 (three levels, as it builds for that size) and multiply by the steps.

# %%
pixel = TutorialUnconditionalPipeline.from_pretrained(PIXEL)
latent = TutorialLatentPipeline.from_pretrained(LATENT)
pixel_scheduler = TutorialDDIMScheduler.from_config(pixel.scheduler.config)
side = {
    "pixel, 16 px": sample_sharded(pixel.unet.eval(), pixel_scheduler, NUM_SAMPLES, SAMPLE_STEPS, seed=0),
    "latent, 32 px": sample_latent(latent, clip=False),
}
side_metrics = {name: digits_metrics(x) for name, x in side.items()}


def seconds_per_image(fn, repeats=2):
    """Best of `repeats` passes over TIMING_IMAGES images (the CPUs are shared: the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) / TIMING_IMAGES)
    return best


sampler_ms = {
    "pixel, 16 px": seconds_per_image(
        lambda: sample_sharded(pixel.unet, pixel_scheduler, TIMING_IMAGES, SAMPLE_STEPS, seed=1)
    ),
    "latent, 32 px": seconds_per_image(lambda: sample_latent(latent, False, TIMING_IMAGES, seed=1)),
}
sampler_ms = {name: 1000 * seconds for name, seconds in sampler_ms.items()}

# One network evaluation per image: time (batch of TIMING_IMAGES) and FLOPs (FlopCounterMode, multiply-add = 2).
nets = {
    "latent UNet, 4x8x8": latent.unet.eval(),
    "pixel UNet, 1x16x16": pixel.unet.eval(),
    "pixel UNet, 1x32x32 (default, untrained)": UNet2DModel(**default_unet_config(32, 1, None)).eval(),
}
step = {}
for name, net in nets.items():
    x = torch.randn(TIMING_IMAGES, net.config.in_channels, net.config.sample_size, net.config.sample_size)
    t = torch.full((TIMING_IMAGES,), 500)
    with torch.no_grad():
        net(x, t)  # warm-up
        with FlopCounterMode(display=False) as counter:
            net(x[:1], t[:1])
        ms = 1000 * seconds_per_image(lambda net=net, x=x, t=t: net(x, t), repeats=3)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    step[name] = {"ms": ms, "mflops": counter.get_total_flops() / 1e6, "params_m": params}
with torch.no_grad(), FlopCounterMode(display=False) as counter:
    latent.vae.decode(torch.randn(1, 4, 8, 8))
decode_mflops = counter.get_total_flops() / 1e6

print(f"{NUM_SAMPLES} samples each, DDIM-{SAMPLE_STEPS}")
for name, m in side_metrics.items():
    print(
        f"{name:>14}: Fréchet distance {m['frechet_distance']:7.1f}, classes covered {m['class_coverage']:.1f}, "
        f"mean confidence {m['mean_confidence']:.2f}, sampling {sampler_ms[name]:.1f} ms/image"
    )
print("\none network evaluation per image:")
for name, v in step.items():
    print(f"{name:>42}: {v['params_m']:.2f}M parameters, {v['mflops']:6.1f} MFLOP, {v['ms']:6.2f} ms")
print(f"{'VAE decoder, once per sample':>42}: {decode_mflops:6.1f} MFLOP")
pixel32 = step["pixel UNet, 1x32x32 (default, untrained)"]
latent_step = step["latent UNet, 4x8x8"]
pixel32_ms = SAMPLE_STEPS * pixel32["ms"]
flop_ratio = SAMPLE_STEPS * pixel32["mflops"] / (SAMPLE_STEPS * latent_step["mflops"] + decode_mflops)
print(
    f"\nat 32x32 and DDIM-{SAMPLE_STEPS}: pixel ≈ {pixel32_ms:.0f} ms/image (steps x one evaluation), latent "
    f"{sampler_ms['latent, 32 px']:.0f} ms/image measured: {pixel32_ms / sampler_ms['latent, 32 px']:.1f}x faster; "
    f"FLOPs {flop_ratio:.1f}x fewer"
)

fig, axes = plt.subplots(1, 2, figsize=(10, 5))
for ax, (name, x) in zip(axes, side.items()):
    ax.imshow(make_grid(x[:64], nrow=8), cmap="gray")
    ax.set_title(f"{name}: FD {side_metrics[name]['frechet_distance']:.0f}, {sampler_ms[name]:.0f} ms/image")
    ax.axis("off")
plt.show()

# %% [markdown]
# The latent UNet does about 16× less work per step than a pixel UNet at the same output size (8×8 positions instead
# of 32×32; the 32-px default even adds a third level), and the decoder's one pass costs about as much as four latent
# steps, so at 32×32 the latent sampler is about ten times faster, and with the shipped UNets it is faster even than
# the 16-px pixel model. Quality is another matter: it depends on how long each UNet was trained (each folder's
# README says; `benchmarks/bench_latent.py` compares latent and pixel training at the same compute budget). The
# Fréchet distances are each taken at the sample's own size (16 or 32 px) against the held-out digits at that size,
# so compare them as a rough guide only.
#
# ## What we showed (asserted)

# %%
print(f"notebook ran in {time.perf_counter() - tic:.0f} s")
# 1. The autoencoder reconstructs held-out digits well, better than a thumbnail of the same size.
assert psnr_vae > 30 and psnr_vae > psnr_thumbnail + 5, (psnr_vae, psnr_thumbnail)
# 2. The raw latents are far from unit scale; the config's scaling factor brings them to it, and it is 1/std.
assert std > 2 and 0.8 <= s * std <= 1.25, (std, s)
assert outside > 0.1  # a pixel sampler's clip range [-1, 1] cuts a good part of the scaled latents
# The wrong scale shifts the whole schedule: more signal left at t = T, SNR = 1 reached much later.
linear_1, linear_s = at_T[ours, "s = 1 (no scaling)"], at_T[ours, f"s = 1/std = {1 / std:.4f}"]
assert linear_1["signal_std"] > 4 * linear_s["signal_std"] and linear_1["corr"] > 3 * abs(linear_s["corr"])
assert linear_1["t_snr_1"] > linear_s["t_snr_1"] + 200
sd_1 = at_T["SD: scaled_linear, β 0.00085..0.012", "s = 1 (no scaling)"]
assert sd_1["corr"] > 0.2 and sd_1["std_z_T"] > 1.03  # SD's schedule: an unscaled z_T is not N(0, I)
# 3. The script warns about the unscaled VAE and not about the measured one; both runs trained.
assert any("scaling_factor" in w for w in warnings_logged["s = 1"]) and not warnings_logged["s = 1/std"]
assert all(run["final"]["global_step"] == TRAIN_STEPS for run in runs.values())
assert not torch.equal(scale_samples["s = 1", False], scale_samples["s = 1/std", False])  # two different models
if not FAST:
    fd = {key: m["frechet_distance"] for key, m in scale_metrics.items()}
    # Clipping latent estimates to [-1, 1] wrecks the unscaled model (it collapses) and hurts the scaled one.
    assert scale_metrics["s = 1", True]["class_coverage"] <= 0.3 and fd["s = 1", True] > 3 * fd["s = 1", False]
    assert fd["s = 1/std", True] > 2 * fd["s = 1/std", False]
    assert scale_metrics["s = 1/std", False]["class_coverage"] == 1.0  # the scaled model draws every class
    assert side_metrics["pixel, 16 px"]["class_coverage"] == side_metrics["latent, 32 px"]["class_coverage"] == 1.0
# 4. Latent sampling is much cheaper than pixel sampling at the same size and steps.
assert flop_ratio > 10 and pixel32_ms > 3 * sampler_ms["latent, 32 px"]
assert latent_step["ms"] < pixel32["ms"] / 3
