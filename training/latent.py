"""Latent diffusion training (`--vae PATH`): the UNet learns the scaled latents of a frozen `AutoencoderKL`.

Each batch x ∈ [-1, 1] is encoded on the accelerator as it arrives, z ~ q(z | x) (a posterior sample drawn from the
micro-batch's generator, so a resume repeats it), and scaled, z̃ = s (z − b) with s = `scaling_factor` and b =
`shift_factor` of the VAE's config (LDM, arXiv:2112.10752, Sec. 4.3.2 and App. G: s = 1 / std(z) gives z̃ unit
variance, which the noise schedule assumes). DDPM's loss is then taken on z̃ exactly as on pixels. The UNet's shape
comes from the VAE (in/out channels = latent_channels, sample_size = --resolution / f, f = 2^(down blocks − 1)); the
saved folder holds `TutorialLatentPipeline` with the VAE in `vae/`, and validation samples are decoded before the
digits metrics see them.

Why a posterior sample and not its mode: the decoder was trained on samples of q(z | x) (the KL-regularised
autoencoder's objective), so samples are the latents it decodes well, and LDM and diffusers' latent training scripts
train on them; the sampling noise is small (the posterior's σ) and acts as augmentation. The price: an encoded
dataset cannot be cached once, so the latents are computed per batch (the VAE's forward is cheaper than the UNet's
forward and backward at these sizes).
"""

import contextlib
import logging
import math
import os
from typing import Dict, Optional

import torch
from diffusers import AutoencoderKL, UNet2DModel

from training import train_unconditional as story
from training.errors import TrainingError
from training.model import check_resolution, default_unet_config
from training.settings import Settings

logger = logging.getLogger("train_unconditional")

VAE_SUBFOLDER = "vae"  # a pipeline or train_autoencoder.py folder may keep the VAE here rather than at its root
SCALED_STD_RANGE = (0.5, 2.0)  # std(z̃) = s · std(z) outside this: the scaling factor is off by more than 2x
MEASURED_BATCHES = 4  # micro-batches of this process over which std(z) is measured once, at the start of a run


def find_vae_folder(path: str) -> str:
    """The folder of the `AutoencoderKL` that `--vae PATH` names: PATH itself, or PATH/vae (a pipeline's layout)."""
    for folder in (path, os.path.join(path, VAE_SUBFOLDER)):
        config = os.path.join(folder, "config.json")
        if os.path.isfile(config):
            try:
                class_name = AutoencoderKL.load_config(folder).get("_class_name")
            except (OSError, ValueError) as err:
                raise TrainingError(f"--vae={path!r}: {config} cannot be read: {err}") from err
            if class_name == "AutoencoderKL":
                return folder
    raise TrainingError(
        f"--vae={path!r} holds no AutoencoderKL: expected a config.json with _class_name 'AutoencoderKL' in the "
        f"folder or in its {VAE_SUBFOLDER}/ subfolder (an AutoencoderKL.save_pretrained folder or a pipeline folder)."
    )


def downsample_factor(vae_config: Dict) -> int:
    """f = 2^(len(block_out_channels) − 1): an AutoencoderKL halves the image in every down block but the last."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def resolve_latent_settings(settings: Settings) -> Settings:
    """`settings` with the VAE's facts added, checked against the data at the door: `vae_folder`, `vae_config`,
    `latent_channels`, `latent_size` (= --resolution / f)."""
    folder = find_vae_folder(settings.vae)
    config = dict(AutoencoderKL.from_config(AutoencoderKL.load_config(folder)).config)  # defaults filled in
    factor, size = downsample_factor(config), config["sample_size"]
    if config["in_channels"] != settings.num_channels:
        raise TrainingError(
            f"--vae={settings.vae!r} encodes {config['in_channels']}-channel images; the data has "
            f"{settings.num_channels} (--num_channels)."
        )
    if settings.resolution != size or settings.resolution % factor:
        raise TrainingError(
            f"--resolution={settings.resolution} does not fit --vae={settings.vae!r}: it was built for "
            f"sample_size={size} and downsamples x{factor}; pass --resolution {size}."
        )
    return Settings(
        **{
            **vars(settings),
            "vae_folder": folder,
            "vae_config": config,
            "latent_channels": config["latent_channels"],
            "latent_size": settings.resolution // factor,
        }
    )


def build_latent_unet(settings: Settings) -> UNet2DModel:
    """The UNet of the latents: the small default at the latents' size, or the user's config if its shape fits."""
    channels, size = settings.latent_channels, settings.latent_size
    if settings.unet_config is None:
        model = UNet2DModel(**default_unet_config(size, channels, None))
    else:
        model = UNet2DModel.from_config(settings.unet_config)
        cfg = model.config
        if cfg.in_channels != channels or cfg.out_channels not in (channels, 2 * channels) or cfg.sample_size != size:
            raise TrainingError(
                f"--model_config_name_or_path={settings.model_config_name_or_path!r} has in_channels="
                f"{cfg.in_channels}, out_channels={cfg.out_channels}, sample_size={cfg.sample_size}; --vae="
                f"{settings.vae!r} makes latents of {channels} channel(s) at {size}x{size} (--resolution "
                f"{settings.resolution} / {downsample_factor(settings.vae_config)})."
            )
    check_resolution(model, size)
    return model


class LatentStd:
    """std(z) over the first `MEASURED_BATCHES` micro-batches, summed on the device and read once."""

    def __init__(self):
        self.sums, self.batches, self.value = None, 0, None

    def add(self, z: torch.Tensor) -> bool:
        """Fold in a batch; True once the measurement is complete (then `value` holds std(z))."""
        z = z.detach().double()
        sums = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(z.numel(), dtype=torch.float64, device=z.device)])
        self.sums = sums if self.sums is None else self.sums + sums
        self.batches += 1
        if self.batches < MEASURED_BATCHES:
            return False
        total, total_sq, n = self.sums.tolist()  # the one host read of the measurement
        self.value = math.sqrt(max(total_sq / n - (total / n) ** 2, 0.0))
        return True


def scaling_factor_warning(vae_config: Dict, raw_config: Dict, std: float) -> Optional[str]:
    """The warning for a scaling factor s with s · std(z) outside `SCALED_STD_RANGE`, naming 1 / std(z); else None."""
    s = vae_config["scaling_factor"]
    if SCALED_STD_RANGE[0] <= s * std <= SCALED_STD_RANGE[1]:
        return None
    if "scaling_factor" not in raw_config:
        origin = "no scaling_factor in its config (diffusers' default"
    elif s == 0.18215:
        origin = "Stable Diffusion's default scaling_factor"
    else:
        origin = "scaling_factor"
    low, high = SCALED_STD_RANGE
    return (
        f"--vae: the latents' std measured over the first {MEASURED_BATCHES} batches is {std:.4g}; with {origin}"
        f"{')' if origin.startswith('no ') else ''} {s:g} the UNet sees latents of std {s * std:.3g}, outside "
        f"[{low:g}, {high:g}] (the noise schedule assumes about 1). Set scaling_factor = 1 / std = {1 / std:.4g} in "
        "the VAE's config.json (train_autoencoder.py writes it)."
    )


class LatentDiffusionObjective(story.DiffusionObjective):
    """DDPM's loss on the scaled latents of a frozen VAE; the folder holds `TutorialLatentPipeline` (see the module)."""

    trains_on_latents = True

    def __init__(self):
        self.vae = None
        self.latent_std = LatentStd()
        self.scaling_warning: Optional[str] = None  # what was logged, for the tests

    def resolve_settings(self, args) -> Settings:
        return resolve_latent_settings(story.resolve_settings(args))

    def build_model(self, settings: Settings) -> UNet2DModel:
        return build_latent_unet(settings)

    def prepare(self, run) -> None:
        """The VAE, frozen, in eval mode, in float32 on `accelerator.device` (bf16 runs encode under autocast)."""
        vae = AutoencoderKL.from_pretrained(run.settings.vae_folder, torch_dtype=torch.float32)
        vae.requires_grad_(False)
        self.vae = vae.eval().to(run.accelerator.device)
        self.raw_config = AutoencoderKL.load_config(run.settings.vae_folder)

    def encode(self, run, images: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
        """z̃ = s (z − b), z ~ q(z | x) drawn from `g`; float32. The VAE runs in float32, or bf16 autocast in a bf16 run
        (fp16 is not used: Stable Diffusion's VAE overflows in fp16)."""
        bf16 = run.settings.mixed_precision == "bf16"
        with torch.no_grad(), run.accelerator.autocast() if bf16 else contextlib.nullcontext():
            z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample(generator=g).float()
        if self.latent_std.value is None and z.device.type != "meta" and self.latent_std.add(z):
            self.scaling_warning = scaling_factor_warning(
                run.settings.vae_config, self.raw_config, self.latent_std.value
            )
            if self.scaling_warning and run.accelerator.is_main_process:
                logger.warning(self.scaling_warning)
        cfg = run.settings.vae_config
        return (z - (cfg.get("shift_factor") or 0.0)) * cfg["scaling_factor"]

    def loss(self, run, batch: Dict, g: Optional[torch.Generator]) -> torch.Tensor:
        latents = self.encode(run, batch["images"], g)
        return story.diffusion_loss(
            run.model, run.noise_scheduler, {**batch, "images": latents}, run.settings, g, run.alpha_bar
        )
