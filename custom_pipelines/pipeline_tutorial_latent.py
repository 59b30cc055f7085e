"""Latent diffusion (Rombach et al., arXiv:2112.10752): the denoiser runs on an autoencoder's latents, not on pixels.

An `AutoencoderKL` maps an image x ∈ [-1, 1]^(C×H×W) to a posterior q(z | x) on latents z of shape
(c, H/f, W/f), f = 2^(number of down blocks − 1), and decodes z back to an image. The UNet is trained on
z̃ = s (z − b) (LDM Sec. 4.3.2 and App. G: s = 1 / std(z) over the data, so that z̃ has roughly unit variance, which the
noise schedule assumes; b is the optional `shift_factor`, SD3's convention). Sampling is the unconditional loop in z̃
space; the result is decoded after undoing the scaling, x = D(z̃ / s + b). Forgetting to divide by s decodes latents
1/s times too small (≈ 5.5x for SD's s = 0.18215): washed-out, grey images.

SDEdit (arXiv:2108.01073) carries over by encoding: z̃_0 = s (E(x) − b) of the input image, noised to the strength's
level with the scheduler's forward marginal and denoised as in `TutorialImg2ImgPipeline`.

This file is shipped inside saved pipeline folders: it imports only torch, diffusers and its sibling
`tutorial_pipeline_*.py` files.
"""

import numbers
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DModel

# diffusers' remote-code loader copies only the sibling files this file imports, one level deep (DESIGN.md, "Loading
# facts"), so the files `TutorialPipelineBase` is built from are imported here too.
from .tutorial_pipeline_folder import MODEL_INDEX  # noqa: F401
from .tutorial_pipeline_loading import TutorialLoadingMixin  # noqa: F401
from .tutorial_pipeline_saving import TutorialSavingMixin  # noqa: F401
from .tutorial_pipeline_utils import OUTPUT_TYPES, ImageInput, TutorialPipelineBase, TutorialPipelineOutput

LATENT_OUTPUT_TYPES = OUTPUT_TYPES + ("latent",)  # "latent": the scaled latents z̃, not decoded (diffusers' name)


def vae_downsample_factor(vae_config) -> int:
    """f = 2^(len(block_out_channels) − 1): an `AutoencoderKL` halves the image in every down block but the last."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def scale_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """z̃ = s (z − b): the space the UNet is trained and sampled in (LDM App. G; b = `shift_factor`, 0 if unset)."""
    shift = vae_config.get("shift_factor") or 0.0
    return (z - shift) * vae_config.scaling_factor


def unscale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """z = z̃ / s + b: what the decoder takes (the inverse of `scale_latents`)."""
    shift = vae_config.get("shift_factor") or 0.0
    return latents / vae_config.scaling_factor + shift


class TutorialLatentPipeline(TutorialPipelineBase):
    """Sample images through an autoencoder's latent space with any scheduler; SDEdit with `image=` and `strength=`.

    Args:
        vae (`AutoencoderKL`): the frozen autoencoder; `vae.config.scaling_factor` is s of z̃ = s (z − b).
        unet (`UNet2DModel`): the denoiser of the scaled latents z̃; in_channels = `vae.config.latent_channels`,
            sample_size = `vae.config.sample_size` / f.
        scheduler (`SchedulerMixin`): any scheduler (ours or diffusers'); `add_noise` is needed for SDEdit only.
    """

    model_cpu_offload_seq = "unet->vae"
    _card_tags = TutorialPipelineBase._card_tags + ("latent-diffusion",)

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__(unet=unet, scheduler=scheduler)
        self.register_modules(vae=vae)
        self.check_components()

    # ---- argument checks (validate at the door) -----------------------------------------------------------------
    def check_components(self) -> None:
        """The UNet must denoise the VAE's latents: in_channels = latent_channels (out_channels that or twice it,
        for a learned variance) and sample_size · f = the VAE's sample_size."""
        vae_cfg, unet_cfg = self.vae.config, self.unet.config
        factor, latent_channels = vae_downsample_factor(vae_cfg), vae_cfg.latent_channels
        vae_size = vae_cfg.sample_size if isinstance(vae_cfg.sample_size, int) else tuple(vae_cfg.sample_size)
        unet_size = unet_cfg.sample_size if isinstance(unet_cfg.sample_size, int) else tuple(unet_cfg.sample_size)
        latent_size = vae_size // factor if isinstance(vae_size, int) else tuple(s // factor for s in vae_size)
        problems = []
        if unet_cfg.in_channels != latent_channels:
            problems.append(f"in_channels={unet_cfg.in_channels} (the latents have {latent_channels})")
        if unet_cfg.out_channels not in (latent_channels, 2 * latent_channels):
            problems.append(
                f"out_channels={unet_cfg.out_channels} (expected {latent_channels} or {2 * latent_channels})"
            )
        if unet_size != latent_size:
            problems.append(f"sample_size={unet_size!r} (the latents are {latent_size!r} = {vae_size!r} / {factor})")
        if problems:
            raise ValueError(
                f"The UNet does not fit the VAE's latents: {'; '.join(problems)}. The VAE (latent_channels="
                f"{latent_channels}, sample_size={vae_size!r}, {len(vae_cfg.block_out_channels)} down blocks: "
                f"downsampling x{factor}) makes latents of {latent_channels} channel(s) at {latent_size!r}."
            )
        if not vae_cfg.scaling_factor:
            raise ValueError(f"vae.config.scaling_factor={vae_cfg.scaling_factor!r} must be a non-zero number.")

    @staticmethod
    def check_output_type(output_type: str) -> None:
        if output_type not in LATENT_OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; choose one of {LATENT_OUTPUT_TYPES}.")

    @staticmethod
    def check_strength(strength: float, num_inference_steps: int) -> None:
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
            raise ValueError(f"strength={strength!r} must be a number in (0, 1] (1: start from the noisiest level).")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(
                f"strength={strength} with num_inference_steps={num_inference_steps} runs int({strength} x "
                f"{num_inference_steps}) = 0 steps; raise strength or num_inference_steps so that their product is "
                ">= 1."
            )

    # ---- between images and latents -------------------------------------------------------------------------------
    def image_shape(self, batch_size: int) -> Tuple[int, ...]:
        """(B, C, H, W) of the images: the VAE's channels at the latents' size times f."""
        factor = vae_downsample_factor(self.vae.config)
        _, _, h, w = self.sample_shape(batch_size)
        return (batch_size, self.vae.config.in_channels, h * factor, w * factor)

    def encode_images(self, x0: torch.Tensor, generator=None, sample_posterior: bool = True) -> torch.Tensor:
        """z̃_0 = s (z − b), z ~ q(z | x_0) (`sample_posterior`, as the UNet was trained) or its mode."""
        posterior = self.vae.encode(x0.to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return scale_latents(z, self.vae.config).to(self.unet.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """x = D(z̃ / s + b), in [-1, 1] (not clamped)."""
        return self.vae.decode(unscale_latents(latents, self.vae.config).to(self.vae.dtype)).sample

    @staticmethod
    def check_decoded(images: torch.Tensor, latents: torch.Tensor, num_steps: int) -> None:
        """Raise `FloatingPointError` when the decoded images hold a NaN or ±inf (the loop checked only the latents).

        Postprocessing would hide it: the clamp to [0, 1] makes +inf a white pixel and a NaN becomes 0 in a PIL image.
        One host read per call, after the decoder (none per step); the culprit is looked up only on the error path.
        """
        if bool((~torch.isfinite(images)).any()):
            culprit = (
                "the VAE's decoder" if bool(torch.isfinite(latents).all()) else "the latents given to the decoder"
            )
            raise FloatingPointError(
                f"Non-finite value (NaN or inf) in the images decoded after step {num_steps - 1} of {num_steps}; it "
                f"first appeared in {culprit} (a float16 VAE can overflow: decode in float32)."
            )

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The last ⌊sN⌋ steps of `scheduler.timesteps` (as `TutorialImg2ImgPipeline.get_timesteps`)."""
        run = min(int(num_inference_steps * strength), num_inference_steps)
        begin = (num_inference_steps - run) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(begin)
        return self.scheduler.timesteps[begin:]

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        image: Optional[ImageInput] = None,
        strength: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ("latents",),
        return_trajectory: bool = False,
    ) -> Union[TutorialPipelineOutput, tuple]:
        """Generate `batch_size` images in latent space, or SDEdit `image`, and decode them.

        Args:
            batch_size (`int`, defaults to 1): number of samples, ≥ 1 (with `image`: its batch size).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per sample.
            latents (`torch.Tensor`, *optional*): z ~ N(0, I) of the latents' shape (batch_size, c, H/f, W/f);
                x_T = σ_init z. With `image`: the noise ε that SDEdit adds.
            num_inference_steps (`int`, defaults to 50): N, passed to `scheduler.set_timesteps`.
            eta (`float`, defaults to 0.0): DDIM's η, passed only to schedulers whose `step` takes `eta`.
            image (`torch.Tensor`, `np.ndarray` or PIL images, *optional*): SDEdit's inputs, in [0, 1], of the VAE's
                image shape; encoded (a posterior sample), noised to `strength` and denoised.
            strength (`float`, defaults to 1.0): with `image`, s ∈ (0, 1]; the last ⌊s·N⌋ of N steps run.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (B, H, W, C), `"pt"` (B, C, H, W) or
                `"latent"` (the scaled latents z̃, not decoded).
            return_dict (`bool`, defaults to `True`): return a `TutorialPipelineOutput` rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, step_index, timestep, callback_kwargs) -> dict`
                after every scheduler step (diffusers' protocol); a returned `"latents"` replaces z̃_t.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): what `callback_kwargs` holds.
            return_trajectory (`bool`, defaults to `False`): also return z̃_t and its x̂_0 at every step (latent space).

        Returns:
            `TutorialPipelineOutput`, or `(images,)` / `(images, trajectory, pred_original_samples, timesteps)` when
            `return_dict=False`.
        """
        # 0. Validate at the door.
        self.check_components()
        self.check_num_inference_steps(num_inference_steps)
        self.check_output_type(output_type)
        x0 = None
        if image is not None:
            self.check_strength(strength, num_inference_steps)
            x0 = self.preprocess_images(image, "image")
            batch_size = x0.shape[0]
        elif strength != 1.0:
            raise ValueError(f"strength={strength!r} applies only with image=...; leave it 1.0 to sample from noise.")
        self.check_batch_size(batch_size)
        self.check_generator(generator, batch_size)
        tensor_inputs = self.resolve_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_callback_inputs(tensor_inputs)

        # 1. The grid (on the host, see TutorialUnconditionalPipeline); SDEdit walks its last ⌊sN⌋ steps.
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps if x0 is None else self.get_timesteps(num_inference_steps, strength)
        timesteps_on_device = timesteps.to(self._execution_device)

        # 2. z̃_T = σ_init z; SDEdit: z̃_{t_s} = √ᾱ z̃_0 + √(1-ᾱ) ε (DDPM eq. (4)) with z̃_0 = s (E(x_0) − b).
        if x0 is None:
            latents = self.prepare_latents(batch_size, generator, latents)
        else:
            noise = self.prepare_latents(batch_size, generator, latents) / self.scheduler.init_noise_sigma
            z0 = self.encode_images(x0, generator)
            latents = self.scheduler.add_noise(z0, noise, timesteps_on_device[:1].repeat(batch_size))
        step_kwargs = self.scheduler_step_kwargs(eta=eta, generator=generator)

        # 3. Reverse process in latent space: one network evaluation and one scheduler step per entry of the grid.
        latents, trajectory, pred_x0s = self.denoise(
            latents,
            timesteps,
            timesteps_on_device,
            step_kwargs,
            callback_on_step_end,
            tensor_inputs,
            return_trajectory,
        )

        # 4. z̃_0 -> x = D(z̃_0 / s + b) ∈ [-1, 1] -> images; a NaN/inf from the decoder raises (`check_decoded`).
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents)
            self.check_decoded(decoded, latents, len(timesteps))
            images = self.postprocess(decoded, output_type)
        self.maybe_free_model_hooks()
        return self.pipeline_output(images, trajectory, pred_x0s, timesteps, return_trajectory, return_dict)

    def model_card(self, num_inference_steps=None, sample_files=(), extra_text=None, repo_id=None) -> str:
        """The saved folder's `README.md` (see `TutorialSavingMixin.model_card`), with the autoencoder's facts."""
        cfg = self.vae.config
        factor = vae_downsample_factor(cfg)
        vae_text = (
            f"## Latent space\n\nThe UNet denoises the latents of the `AutoencoderKL` in `vae/` ({cfg.latent_channels} "
            f"channel(s), downsampling x{factor}), scaled by `scaling_factor={cfg.scaling_factor:g}`"
            + (f" after subtracting `shift_factor={cfg.shift_factor:g}`" if cfg.get("shift_factor") else "")
            + "; the pipeline undoes the scaling before decoding."
        )
        extra = vae_text if extra_text is None else vae_text + "\n\n" + extra_text
        return super().model_card(num_inference_steps, sample_files, extra, repo_id)
