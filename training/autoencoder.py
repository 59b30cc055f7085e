"""The KL autoencoder of latent diffusion (Rombach et al. 2022, arXiv:2112.10752): its shape, loss and measurements.

In: images in [-1, 1]. Out: a diffusers `AutoencoderKL` whose encoder gives q(z | x) = N(μ(x), diag σ²(x)) and whose
decoder maps z back to an image, trained by `training/train_autoencoder.py`. Here are the pieces that script and a
latent-diffusion script share, importing nothing from either: the architecture from a few numbers
(`autoencoder_config`), the loss (`autoencoder_loss`), the latents' statistics that give `scaling_factor`
(`latent_statistics`). A latent-diffusion run reads the saved folder with `training.latent.find_vae_folder`.
"""

import math
from typing import Dict, Iterable, Optional, Sequence

import torch
from diffusers import AutoencoderKL

DOWNSAMPLE_FACTORS = (1, 2, 4, 8)  # 2^(number of down blocks - 1): AutoencoderKL halves after every block but the last
RECONSTRUCTION_LOSSES = ("l1", "l2")
DEFAULT_WIDTHS = (16, 32, 64, 64)  # block_out_channels of the first blocks, shallow to deep


def autoencoder_config(
    resolution: int,
    channels: int,
    latent_channels: int,
    downsample_factor: int,
    block_out_channels: Optional[Sequence[int]] = None,
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
) -> Dict:
    """An `AutoencoderKL` config for `channels`-channel images at `resolution`, latents (`latent_channels`,
    resolution / `downsample_factor`, resolution / `downsample_factor`).

    `scaling_factor` is 1.0 until it is measured (`latent_statistics`); `mid_block_add_attention` keeps diffusers'
    default (one self-attention layer at the latent resolution).
    """
    blocks = int(math.log2(downsample_factor)) + 1
    widths = tuple(block_out_channels or DEFAULT_WIDTHS[:blocks])
    return dict(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=resolution,
        scaling_factor=1.0,
    )


class TrainingAutoencoderKL(AutoencoderKL):
    """`AutoencoderKL` whose forward returns what the loss needs: (reconstruction, μ, log σ²) of a posterior sample.

    The loss must run through `forward` (a DDP-wrapped model synchronises gradients only for what its forward
    computed), and diffusers' forward returns the reconstruction alone. Same weights and config as `AutoencoderKL`;
    the saved folder holds a plain `AutoencoderKL` (`export_autoencoder`).
    """

    def forward(self, sample: torch.Tensor, generator: Optional[torch.Generator] = None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator)  # z = μ + σ ε, the reparameterisation (Kingma & Welling 2014)
        return self.decode(z).sample, posterior.mean, posterior.logvar


def autoencoder_loss(model, x: torch.Tensor, g: Optional[torch.Generator], reconstruction: str, kl_weight: float):
    """LDM's first-stage loss without the perceptual and adversarial terms, per pixel:

        ( Σ_pixels |x - D(z)|^p  +  kl_weight · KL(q(z | x) ‖ N(0, I)) ) / (C · H · W),   z ~ q(z | x),

    averaged over the batch (p = 1 for `l1`, 2 for `l2`). Dividing by the pixel count keeps `kl_weight` the weight
    of LDM's configs (1e-6, relative to the reconstruction summed over pixels) while the loss stays O(1).
    KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² - 1 - log σ²) per latent coordinate (Kingma & Welling 2014, Appendix B).
    """
    decoded, mean, logvar = model(x, generator=g)
    diff = decoded.float() - x.float()
    rec = diff.abs() if reconstruction == "l1" else diff.pow(2)
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    pixels = x[0].numel()
    return (rec.sum(dim=(1, 2, 3)) + kl_weight * kl).mean() / pixels


def export_autoencoder(model: AutoencoderKL, scaling_factor: Optional[float] = None) -> AutoencoderKL:
    """A plain `AutoencoderKL` on the CPU in float32 with `model`'s config and weights, `scaling_factor` written into
    its config when given."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    if scaling_factor is not None:
        vae.register_to_config(scaling_factor=float(scaling_factor))
    return vae.eval()


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, batches: Iterable[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """Sums over every latent coordinate of `batches`, encoded by `vae` (float64, on the batches' device): the count,
    Σz, Σz² of posterior samples z = μ + σ ε (ε from a generator seeded with `seed`), and Σμ, Σμ², Σσ² (the
    sample's variance is Var μ + E σ², a check).

    Samples, not the mode: a latent diffusion model is trained on `latent_dist.sample()` (diffusers'
    train_text_to_image, and Stable Diffusion's 0.18215 = 1 / std was measured on samples). `combine_statistics`
    turns the sums (added over processes) into the mean and the standard deviation.
    """
    sums = None
    g = None
    for x in batches:
        if g is None and x.device.type != "meta":
            g = torch.Generator(device=x.device).manual_seed(seed)
        posterior = vae.encode(x.to(vae.dtype)).latent_dist
        z = posterior.sample(generator=g).double()
        mean, var = posterior.mean.double(), posterior.var.double()
        part = torch.stack(
            [z.new_tensor(z.numel()), z.sum(), z.pow(2).sum(), mean.sum(), mean.pow(2).sum(), var.sum()]
        )
        sums = part if sums is None else sums + part
    return sums


def combine_statistics(sums: torch.Tensor) -> Dict[str, float]:
    """The latents' mean and (population) standard deviation from `latent_statistics`' sums; also the std expected
    from the posterior's moments, √(E μ² - (E μ)² + E σ²), and the std of the mode μ alone."""
    n, s1, s2, m1, m2, v = sums.double().cpu().tolist()
    mean = s1 / n
    return {
        "num_latent_values": int(n),
        "latent_mean": mean,
        "latent_std": math.sqrt(max(s2 / n - mean * mean, 0.0)),
        "latent_std_expected": math.sqrt(max(m2 / n - (m1 / n) ** 2 + v / n, 0.0)),
        "latent_std_of_mode": math.sqrt(max(m2 / n - (m1 / n) ** 2, 0.0)),
    }


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """D(μ(x)): the decoder applied to the posterior mode, clamped to [-1, 1] (the deterministic reconstruction)."""
    out = [vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) for x in images.split(batch_size)]
    return torch.cat(out)
