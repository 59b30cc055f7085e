"""Super-resolution by a conditional diffusion model: SR3 (Saharia et al. 2021, arXiv:2104.07636).

A `UNet2DModel` with `in_channels = 2 C` is trained to denoise the high-resolution image x_t given the low-resolution
measurement y = A x_0 (A = the mean of each k × k block, `SuperResolution(k)` of tutorial_operators.py). The model
sees y as an image of the output's size, A⁺ y (nearest upsampling, which is A's pseudo-inverse: A A⁺ y = y), stacked
after x_t on the channel axis: the input is `cat([x_t, A⁺ y], dim=1)`, the convention of diffusers'
`LDMSuperResolutionPipeline` (SR3 eq. (5), f_θ(x̃, y_t, γ) with x̃ the upsampled input).

Noise conditioning augmentation (SR3 sec. 3 on cascades; Ho et al. 2021, arXiv:2106.15282, sec. 4.2; the Stable
Diffusion ×4 upscaler and DeepFloyd IF stage II do the same): during training the upsampled input is itself noised to
a random level s, √ᾱ_s A⁺y + √(1 − ᾱ_s) ε' (DDPM eq. (4) on the model's own training schedule), and s is given to the
UNet as its class label (`class_embed_type="timestep"`: s gets the sinusoidal embedding of a timestep, through its
own MLP, as IF stage II's UNet does). At sampling `noise_level` picks s: 0 trusts y almost exactly, larger values let
the model correct a y that is noisy or not exactly A x.

x_t alone goes through `scheduler.scale_model_input` before the concatenation (as `StableDiffusionUpscalePipeline`
does); `LDMSuperResolutionPipeline` scales the concatenation, which for σ-parameterised schedulers (Euler: divide by
√(σ² + 1)) would also shrink the conditioning image the model was trained to see at its own scale.

This file is shipped inside saved pipeline folders: it imports only torch, numpy, PIL, diffusers and its sibling
`tutorial_*.py` files.
"""

from typing import Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor

from .tutorial_operators import SuperResolution

# diffusers' remote-code loader copies only the sibling files this file imports, one level deep (DESIGN.md, "Loading
# facts"), so the files `TutorialPipelineBase` is built from are imported here too.
from .tutorial_pipeline_folder import MODEL_INDEX  # noqa: F401
from .tutorial_pipeline_loading import TutorialLoadingMixin  # noqa: F401
from .tutorial_pipeline_saving import TutorialSavingMixin  # noqa: F401
from .tutorial_pipeline_utils import ImageInput, TutorialPipelineBase, TutorialPipelineOutput

DEFAULT_NOISE_LEVEL = 20  # StableDiffusionUpscalePipeline's default


class TutorialSuperResolutionPipeline(TutorialPipelineBase):
    """Upsample low-resolution images with a conditional `UNet2DModel` (SR3) and any scheduler (ours or diffusers').

    Args:
        unet (`UNet2DModel`): the denoiser of x_t given A⁺ y: `in_channels = 2 C` (x_t first, then the upsampled
            low-resolution image), `out_channels = C`, `class_embed_type="timestep"` (the noise level of the
            conditioning image is its class label).
        scheduler (`SchedulerMixin`): any scheduler that fits a UNet2DModel and holds its training schedule's ᾱ
            (`alpha_bar` or diffusers' `alphas_cumprod`), which also noises the conditioning image.
    """

    _pipeline_tag = "image-to-image"
    _card_tags = TutorialPipelineBase._card_tags + ("super-resolution", "sr3")
    _card_example_call = "image=low_res_images, noise_level=20, num_inference_steps={steps}"

    def sample_shape(self, batch_size: int):
        """(B, C, H, W) of x_t: the UNet's input holds x_t and the conditioning image, C channels each."""
        size = self.unet.config.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels // 2) + hw

    def check_unet(self) -> None:
        """The UNet takes x_t and A⁺ y (in_channels = 2 · out_channels) and a noise level (a class embedding)."""
        config = self.unet.config
        if config.in_channels != 2 * config.out_channels or config.class_embed_type != "timestep":
            raise ValueError(
                f"unet has in_channels={config.in_channels}, out_channels={config.out_channels}, class_embed_type="
                f"{config.class_embed_type!r}; a super-resolution UNet needs in_channels = 2 * out_channels (x_t, then "
                "the upsampled low-resolution image) and class_embed_type='timestep' (the noise level)."
            )

    def preprocess_low_res(self, image: ImageInput) -> torch.Tensor:
        """Low-resolution images in [0, 1] (PIL, a (B, h, w, C) array or a (B, C, h, w) tensor) -> y in [-1, 1].

        Checked at the door: C channels, a size h × w that a whole factor k takes to the UNet's sample size
        (k h = H and k w = W), finite values.
        """
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, list) and image and all(isinstance(im, PIL.Image.Image) for im in image):
            image = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in image])
            image = image[..., None] if image.ndim == 3 else image
        if isinstance(image, np.ndarray) and image.ndim == 4:
            image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(0, 3, 1, 2)
        if not torch.is_tensor(image) or image.ndim != 4 or not image.is_floating_point():
            got = f"a tensor of shape {tuple(image.shape)}" if torch.is_tensor(image) else type(image).__name__
            raise ValueError(
                "image must be PIL images, a float array (B, h, w, C) or a float tensor (B, C, h, w) in [0, 1]; "
                f"got {got}."
            )
        _, channels, H, W = self.sample_shape(1)
        b, c, h, w = image.shape
        if c != channels or H % h or W % w or H // h != W // w:
            raise ValueError(
                f"image has shape {tuple(image.shape)}; this UNet makes ({channels}, {H}, {W}) images, so the "
                f"low-resolution image must be (B, {channels}, h, w) with h = {H} / k and w = {W} / k for one whole "
                "factor k (e.g. 4 x 4 for a x4 model at 16 x 16)."
            )
        if not bool(torch.isfinite(image).all()):
            raise ValueError("image has non-finite entries (nan or inf); allowed: finite values in [0, 1].")
        return (2 * image - 1).to(device=self._execution_device, dtype=self.unet.dtype)

    def alpha_bar_at(self, noise_level: int) -> float:
        """ᾱ_s of the scheduler's training schedule (float64 `alpha_bar` when it has one, else `alphas_cumprod`)."""
        table = getattr(self.scheduler, "alpha_bar", None)
        table = table if table is not None else getattr(self.scheduler, "alphas_cumprod", None)
        if table is None:
            raise ValueError(
                f"scheduler={type(self.scheduler).__name__} has no alpha_bar or alphas_cumprod table; the noise level "
                "of the conditioning image is a timestep of the model's training schedule, read from that table."
            )
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level < len(table):
            raise ValueError(
                f"noise_level={noise_level!r} must be an integer in [0, {len(table) - 1}] (a timestep of the "
                "training schedule; the model card says which levels the model was trained on)."
            )
        return float(table[noise_level])

    def condition(self, y: torch.Tensor, noise_level: int, generator) -> torch.Tensor:
        """The UNet's conditioning image: √ᾱ_s A⁺y + √(1 − ᾱ_s) ε' (DDPM eq. (4) at s = `noise_level`)."""
        factor = self.sample_shape(1)[-1] // y.shape[-1]
        upsampled = SuperResolution(factor).A_pinv(y)  # nearest upsampling = A⁺ (DDNM eq. (9))
        alpha_bar = self.alpha_bar_at(noise_level)
        noise = randn_tensor(upsampled.shape, generator=generator, device=upsampled.device, dtype=upsampled.dtype)
        return alpha_bar**0.5 * upsampled + (1 - alpha_bar) ** 0.5 * noise

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int = 50,
        noise_level: int = DEFAULT_NOISE_LEVEL,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ("latents",),
        return_trajectory: bool = False,
    ) -> Union[TutorialPipelineOutput, tuple]:
        """Sample x_0 ~ p_θ(x_0 | y) for each low-resolution image y (SR3 Algorithm 2 when the scheduler is DDPM).

        Args:
            image (`PIL.Image.Image`, `list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the low-resolution
                images in [0, 1], (B, C, h, w) as a tensor or (B, h, w, C) as an array, with k h = k w = the UNet's
                sample size for a whole factor k.
            num_inference_steps (`int`, defaults to 50): N, passed to `scheduler.set_timesteps`.
            noise_level (`int`, defaults to 20): s, the noise put on the upsampled conditioning image (a timestep of
                the training schedule); use a level the model was trained on (its model card says which).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per image; it
                draws the conditioning noise first, then x_T.
            latents (`torch.Tensor`, *optional*): z ~ N(0, I) of shape (B, C, H, W); x_T = σ_init z.
            eta, output_type, return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs,
            return_trajectory: as in `TutorialUnconditionalPipeline.__call__`.

        Returns:
            `TutorialPipelineOutput` with the high-resolution images, or a tuple when `return_dict=False`.
        """
        # 0. Validate at the door.
        self.check_unet()
        y = self.preprocess_low_res(image)
        batch_size = y.shape[0]
        self.alpha_bar_at(noise_level)
        self.check_num_inference_steps(num_inference_steps)
        self.check_output_type(output_type)
        self.check_generator(generator, batch_size)
        tensor_inputs = self.resolve_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_callback_inputs(tensor_inputs)

        # 1. The grid on the host, a copy on the device for the UNet (see TutorialUnconditionalPipeline); the noise
        #    level as one class label per image.
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        timesteps_on_device = timesteps.to(self._execution_device)
        noise_levels = torch.full((batch_size,), noise_level, device=self._execution_device, dtype=torch.long)

        # 2. The conditioning image √ᾱ_s A⁺y + √(1 − ᾱ_s) ε', then x_T = σ_init z.
        cond = self.condition(y, noise_level, generator)
        latents = self.prepare_latents(batch_size, generator, latents)
        step_kwargs = self.scheduler_step_kwargs(eta=eta, generator=generator)
        trajectory = [latents.cpu()] if return_trajectory else None
        pred_x0s: List[Optional[torch.Tensor]] = []

        # 3. Reverse process: the UNet sees cat([scaled x_t, conditioning image]) (LDMSuperResolutionPipeline's order).
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([self.scheduler.scale_model_input(latents, t), cond], dim=1)
            model_output = self.unet(model_input, timesteps_on_device[i], class_labels=noise_levels).sample
            out = self.scheduler.step(model_output, t, latents, **step_kwargs)
            latents = self.finish_step(
                i, t, timesteps, out, model_output, trajectory, pred_x0s, callback_on_step_end, tensor_inputs, locals()
            )

        # 4. [-1, 1] -> images.
        images = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return self.pipeline_output(images, trajectory, pred_x0s, timesteps, return_trajectory, return_dict)
