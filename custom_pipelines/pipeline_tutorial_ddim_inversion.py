"""DDIM inversion (x_0 -> x_T) and spherical interpolation between inverted images.

Deterministic DDIM (η = 0, Song et al., arXiv:2010.02502, eq. (12)) is an Euler discretisation of the
probability-flow ODE, so it can be run backwards (eq. (13)): walking the grid upwards with the scheduler's
`inverse_step` maps an image to a noise x_T from which `__call__` regenerates it, up to the discretisation error
(ε̂ is read at the current, not the next, level). Interpolating two such x_T along the great circle (slerp, Shoemake
1985) keeps them on the typical shell |x_T| ≈ √D of N(0, I), where a straight line would not.

This file is shipped inside saved pipeline folders: it imports only torch, numpy, PIL, diffusers and its siblings.
"""

import inspect
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from diffusers.utils import BaseOutput

# diffusers' remote-code loader copies only the sibling files this file imports, one level deep (DESIGN.md, "Loading
# facts"), so the files `TutorialPipelineBase` is built from are imported here too.
from .pipeline_tutorial_unconditional import TutorialUnconditionalPipeline
from .tutorial_pipeline_folder import MODEL_INDEX  # noqa: F401
from .tutorial_pipeline_loading import TutorialLoadingMixin  # noqa: F401
from .tutorial_pipeline_saving import TutorialSavingMixin  # noqa: F401
from .tutorial_pipeline_utils import ImageInput, TutorialPipelineOutput


@dataclass
class TutorialInversionOutput(BaseOutput):
    """Output of `TutorialDDIMInversionPipeline.invert`.

    Args:
        latents (`torch.Tensor`): x_T, shape (B, C, H, W), to pass back as `latents=`.
        trajectory (`list[torch.Tensor]`, *optional*): x_0, then x_t after every inverse step (on the CPU).
    """

    latents: torch.Tensor
    trajectory: Optional[List[torch.Tensor]] = None


def slerp(z0: torch.Tensor, z1: torch.Tensor, fraction: float, parallel_tol: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation sin((1-f)θ)/sin θ · z0 + sin(fθ)/sin θ · z1, θ the angle between z0 and z1 per sample.

    Falls back to linear interpolation where z0 and z1 are (anti)parallel to `parallel_tol` (sin θ ≈ 0).

    Args:
        z0 (`torch.Tensor`): shape (B, ...).
        z1 (`torch.Tensor`): same shape as `z0`.
        fraction (`float`): f, the position along the arc: 0 gives z0 and 1 gives z1.
        parallel_tol (`float`, defaults to 1e-7): |sin θ| below which the two are taken as parallel.

    Returns:
        `torch.Tensor` of the shape of `z0`.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"slerp: z0 has shape {tuple(z0.shape)} but z1 has shape {tuple(z1.shape)}.")
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]
    sin = torch.sin(theta)
    linear = sin.abs() < parallel_tol
    safe_sin = torch.where(linear, torch.ones_like(sin), sin)
    w0 = torch.where(linear, 1 - fraction * torch.ones_like(sin), torch.sin((1 - fraction) * theta) / safe_sin)
    w1 = torch.where(linear, fraction * torch.ones_like(sin), torch.sin(fraction * theta) / safe_sin)
    return (w0 * a + w1 * b).reshape(z0.shape).to(z0.dtype)


class TutorialDDIMInversionPipeline(TutorialUnconditionalPipeline):
    """DDIM inversion of images to x_T, regeneration from x_T (`__call__` with `latents=`), and slerp interpolation.

    Needs a scheduler with `inverse_step` and a deterministic `step` at η = 0, such as this project's
    `TutorialDDIMScheduler`; the other methods of `TutorialUnconditionalPipeline` work with any scheduler.

    Args:
        unet (`UNet2DModel`): the denoiser.
        scheduler (`SchedulerMixin`): an invertible scheduler (`TutorialDDIMScheduler`).
    """

    _pipeline_tag = "image-to-image"
    _card_tags = TutorialUnconditionalPipeline._card_tags + ("ddim-inversion",)

    def check_invertible(self) -> None:
        sched = self.scheduler
        step_params = inspect.signature(sched.step).parameters
        if not callable(getattr(sched, "inverse_step", None)) or "eta" not in step_params:
            raise ValueError(
                f"scheduler={type(sched).__name__} cannot be inverted: DDIM inversion needs a deterministic scheduler "
                "with `inverse_step` and an `eta` argument to `step` (e.g. TutorialDDIMScheduler)."
            )

    @torch.no_grad()
    def invert(
        self,
        image: ImageInput,
        num_inference_steps: int = 50,
        return_trajectory: bool = False,
    ) -> TutorialInversionOutput:
        """Map images to x_T with deterministic DDIM run upwards (DDIM eq. (13)).

        Args:
            image (`torch.Tensor`, `np.ndarray` or PIL images): the images, in [0, 1] (values outside are kept).
            num_inference_steps (`int`, defaults to 50): N; regenerate with the same N.
            return_trajectory (`bool`, defaults to `False`): also return x_t at every level.

        Returns:
            `TutorialInversionOutput` with `latents` = x_T.
        """
        self.check_invertible()
        self.check_num_inference_steps(num_inference_steps)
        x = self.preprocess_images(image, "image")
        self.scheduler.set_timesteps(num_inference_steps)  # on the host (see TutorialUnconditionalPipeline)
        timesteps = self.scheduler.timesteps.flip(0)  # t_N < ... < t_1: upwards
        timesteps_on_device = timesteps.to(self._execution_device)
        trajectory = [x.cpu()] if return_trajectory else None
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_output = self.unet(self.scheduler.scale_model_input(x, t), timesteps_on_device[i]).sample
            x = self.scheduler.inverse_step(model_output, t, x).prev_sample
            self.check_finite(x, model_output, i, t, len(timesteps))
            if return_trajectory:
                trajectory.append(x.cpu())
        return TutorialInversionOutput(latents=x, trajectory=trajectory)

    @torch.no_grad()
    def interpolate(
        self,
        image_a: Optional[ImageInput] = None,
        image_b: Optional[ImageInput] = None,
        latents_a: Optional[torch.Tensor] = None,
        latents_b: Optional[torch.Tensor] = None,
        num_points: int = 5,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[TutorialPipelineOutput, tuple]:
        """Generate `num_points` images along the slerp between the x_T of two images (or two given x_T).

        Args:
            image_a, image_b (images, *optional*): one image each; inverted with `invert`.
            latents_a, latents_b (`torch.Tensor`, *optional*): x_T of shape (1, C, H, W) instead of the images.
            num_points (`int`, defaults to 5): ≥ 2 points, α = 0, 1/(n-1), ..., 1.
            num_inference_steps (`int`, defaults to 50): N for inversion and generation.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`.
            return_dict (`bool`, defaults to `True`): return a `TutorialPipelineOutput` rather than a tuple.

        Returns:
            `TutorialPipelineOutput` whose `images` are the `num_points` samples, from a to b.
        """
        self.check_invertible()
        self.check_output_type(output_type)
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
            raise ValueError(f"num_points={num_points!r} must be an integer >= 2.")
        ends = []
        for name, image, latents in (("a", image_a, latents_a), ("b", image_b, latents_b)):
            if (image is None) == (latents is None):
                raise ValueError(f"pass exactly one of image_{name} and latents_{name}.")
            z = self.invert(image, num_inference_steps).latents if latents is None else latents
            if tuple(z.shape) != self.sample_shape(1):
                raise ValueError(f"latents_{name} has shape {tuple(z.shape)}; expected {self.sample_shape(1)}.")
            ends.append(z.to(device=self._execution_device, dtype=self.unet.dtype))
        fractions = torch.linspace(0, 1, num_points).tolist()
        latents = torch.cat([slerp(ends[0], ends[1], f) for f in fractions])
        return self(
            batch_size=num_points,
            latents=latents / self.scheduler.init_noise_sigma,
            num_inference_steps=num_inference_steps,
            eta=0.0,
            output_type=output_type,
            return_dict=return_dict,
        )
