"""Image-to-image by SDEdit (Meng et al., arXiv:2108.01073, Algorithm 1) with a `UNet2DModel` and any scheduler.

Noise the input x_0 up to a level t_s with the forward marginal, x_{t_s} = √ᾱ_{t_s} x_0 + √(1-ᾱ_{t_s}) ε (DDPM
eq. (4), `scheduler.add_noise`), then run the scheduler's reverse steps from t_s down to 0. The strength s ∈ (0, 1]
says how far up: of the N steps of `set_timesteps(N)` the last ⌊sN⌋ run (diffusers' `get_timesteps`, so s means the
same here as in `StableDiffusionImg2ImgPipeline`). Small s keeps the sample close to the input (faithful); large s lets
the model's prior take over (realistic); at s = 1 only √ᾱ_{T-1} x_0 is left of the input. SDEdit's point (Sec. 3):
x_{t_s} is close to a noisy real image in distribution once σ_{t_s} swamps the input's departure from the data.

This file is shipped inside saved pipeline folders: it imports only torch, diffusers and its sibling
`tutorial_pipeline_*.py` files.
"""

import numbers
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

# diffusers' remote-code loader copies only the sibling files this file imports, one level deep (DESIGN.md, "Loading
# facts"), so the files `TutorialPipelineBase` is built from are imported here too.
from .tutorial_pipeline_folder import MODEL_INDEX  # noqa: F401
from .tutorial_pipeline_loading import TutorialLoadingMixin  # noqa: F401
from .tutorial_pipeline_saving import TutorialSavingMixin  # noqa: F401
from .tutorial_pipeline_utils import ImageInput, TutorialPipelineBase, TutorialPipelineOutput


class TutorialImg2ImgPipeline(TutorialPipelineBase):
    """SDEdit: turn images into samples of the model that keep their layout, with any scheduler.

    Args:
        unet (`UNet2DModel`): the unconditional denoiser.
        scheduler (`SchedulerMixin`): any scheduler with `add_noise` (this project's five, or diffusers' DDPM, DDIM,
            DPM-Solver, Euler, Heun, UniPC, ...). Schedulers that can start part-way through `set_begin_index` are
            told where the loop begins, as diffusers' img2img pipelines do.
    """

    _pipeline_tag = "image-to-image"
    _card_tags = TutorialPipelineBase._card_tags + ("img2img", "sdedit")
    _card_example_call = "image=image, strength=0.5, num_inference_steps={steps}"

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

    def get_timesteps(self, num_inference_steps: int, strength: float) -> Tuple[torch.Tensor, int]:
        """The entries of `scheduler.timesteps` the loop walks for strength s, and the first one's index.

        Of N steps the last ⌊sN⌋ run: the loop starts at step t_start = N - ⌊sN⌋, i.e. at entry t_start · order
        (a multi-stage step has `order` entries), and the scheduler is told so with `set_begin_index`.
        """
        run = min(int(num_inference_steps * strength), num_inference_steps)
        begin = (num_inference_steps - run) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(begin)
        return self.scheduler.timesteps[begin:], begin

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        strength: float = 0.5,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        noise: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ("latents",),
        return_trajectory: bool = False,
    ) -> Union[TutorialPipelineOutput, tuple]:
        """Noise `image` to strength s and denoise it.

        Args:
            image (`torch.Tensor`, `np.ndarray` or PIL images): the inputs, in [0, 1], shaped as the UNet's samples
                ((B, C, H, W) tensor, (B, H, W, C) array, or PIL images).
            strength (`float`, defaults to 0.5): s ∈ (0, 1]; the last ⌊s·N⌋ of N steps run.
            num_inference_steps (`int`, defaults to 50): N, passed to `scheduler.set_timesteps`.
            eta (`float`, defaults to 0.0): DDIM's η, passed only to schedulers whose `step` takes `eta`.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): for ε and the scheduler's noise.
            noise (`torch.Tensor`, *optional*): ε ~ N(0, I) of the image's shape, instead of drawing it.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (B, H, W, C) or `"pt"` (B, C, H, W).
            return_dict (`bool`, defaults to `True`): return a `TutorialPipelineOutput` rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, step_index, timestep, callback_kwargs) -> dict`
                after every scheduler step (diffusers' protocol); a returned `"latents"` replaces x_t.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): what `callback_kwargs` holds.
            return_trajectory (`bool`, defaults to `False`): also return x_t (from x_{t_s} on) and x̂_0 at every step.

        Returns:
            `TutorialPipelineOutput`, or `(images,)` / `(images, trajectory, pred_original_samples, timesteps)` when
            `return_dict=False`.
        """
        # 0. Validate at the door.
        self.check_num_inference_steps(num_inference_steps)
        self.check_strength(strength, num_inference_steps)
        self.check_output_type(output_type)
        x0 = self.preprocess_images(image, "image")
        batch_size = x0.shape[0]
        self.check_generator(generator, batch_size)
        tensor_inputs = self.resolve_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_callback_inputs(tensor_inputs)
        if noise is not None and (not torch.is_tensor(noise) or tuple(noise.shape) != tuple(x0.shape)):
            got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
            raise ValueError(f"noise has shape {got}; expected {tuple(x0.shape)}, the shape of the images.")

        # 1. The grid, and where strength s starts the loop on it.
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps)  # on the host (see TutorialUnconditionalPipeline)
        timesteps, _ = self.get_timesteps(num_inference_steps, strength)
        timesteps_on_device = timesteps.to(device)

        # 2. x_{t_s} = √ᾱ x_0 + √(1-ᾱ) ε (DDPM eq. (4); the scheduler's own marginal for non-VP schedulers).
        if noise is None:
            noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        latents = self.scheduler.add_noise(
            x0, noise.to(device=device, dtype=x0.dtype), timesteps_on_device[:1].repeat(batch_size)
        )
        step_kwargs = self.scheduler_step_kwargs(eta=eta, generator=generator)

        # 3. Reverse process from t_s: one network evaluation and one scheduler step per remaining entry.
        latents, trajectory, pred_x0s = self.denoise(
            latents,
            timesteps,
            timesteps_on_device,
            step_kwargs,
            callback_on_step_end,
            tensor_inputs,
            return_trajectory,
        )

        # 4. [-1, 1] -> images.
        images = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return self.pipeline_output(images, trajectory, pred_x0s, timesteps, return_trajectory, return_dict)
