"""Unconditional generation, generic over schedulers: x_T ~ N(0, σ_init² I), then the scheduler's reverse steps.

The loop is the one every diffusers scheduler is written for (DDPM Algorithm 2, arXiv:2006.11239, when the scheduler
is DDPM): start from `init_noise_sigma`, feed the UNet `scale_model_input(x_t, t)`, and walk `scheduler.timesteps`
as given, so second-order schedulers (Heun, `order = 2`) get their two evaluations per step. The scheduler the user
passes is the one that runs: it is never replaced.

This file is shipped inside saved pipeline folders: it imports only torch, diffusers and its sibling
`tutorial_pipeline_*.py` files.
"""

import importlib
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch

# diffusers' remote-code loader copies only the sibling files this file imports, one level deep (DESIGN.md, "Loading
# facts"), so the files `TutorialPipelineBase` is built from are imported here too.
from .tutorial_pipeline_folder import MODEL_INDEX  # noqa: F401
from .tutorial_pipeline_loading import TutorialLoadingMixin  # noqa: F401
from .tutorial_pipeline_saving import TutorialSavingMixin  # noqa: F401
from .tutorial_pipeline_utils import TutorialPipelineBase, TutorialPipelineOutput


class TutorialUnconditionalPipeline(TutorialPipelineBase):
    """Sample images from a `UNet2DModel` with any scheduler (ours or diffusers').

    Args:
        unet (`UNet2DModel`): the denoiser; predicts what the scheduler's `prediction_type` says.
        scheduler (`SchedulerMixin`): any scheduler that fits a UNet2DModel (DDPM, DDIM, PNDM, DPM-Solver, Euler,
            Heun, UniPC, LMS, DEIS, and this project's `TutorialDDPMScheduler`/`TutorialDDIMScheduler`).
    """

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ("latents",),
        return_trajectory: bool = False,
    ) -> Union[TutorialPipelineOutput, tuple]:
        """Generate `batch_size` samples.

        Args:
            batch_size (`int`, defaults to 1): number of samples, ≥ 1.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per sample.
            latents (`torch.Tensor`, *optional*): z ~ N(0, I) of shape (batch_size, C, H, W); x_T = σ_init z.
            num_inference_steps (`int`, defaults to 50): N, passed to `scheduler.set_timesteps`.
            eta (`float`, defaults to 0.0): DDIM's η, passed only to schedulers whose `step` takes `eta`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (B, H, W, C) or `"pt"` (B, C, H, W).
            return_dict (`bool`, defaults to `True`): return a `TutorialPipelineOutput` rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, step_index, timestep, callback_kwargs) -> dict`
                called after every scheduler step (diffusers' protocol); a returned `"latents"` replaces x_t and must
                have its shape.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): what `callback_kwargs` holds.
            return_trajectory (`bool`, defaults to `False`): also return x_t and x̂_0 at every step.

        Returns:
            `TutorialPipelineOutput`, or `(images,)` / `(images, trajectory, pred_original_samples, timesteps)` when
            `return_dict=False`.
        """
        # 0. Validate at the door.
        self.check_batch_size(batch_size)
        self.check_num_inference_steps(num_inference_steps)
        self.check_output_type(output_type)
        self.check_generator(generator, batch_size)
        tensor_inputs = self.resolve_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_callback_inputs(tensor_inputs)

        # 1. The grid t_1 > ... > t_N (repeated entries for multi-stage schedulers such as Heun), kept on the host: the
        #    scheduler looks t up there without waiting for the device; the UNet reads a copy made on the device once.
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        timesteps_on_device = timesteps.to(self._execution_device)

        # 2. x_T = σ_init z.
        latents = self.prepare_latents(batch_size, generator, latents)
        step_kwargs = self.scheduler_step_kwargs(eta=eta, generator=generator)

        # 3. Reverse process: one network evaluation and one scheduler step per entry of the grid.
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

    # ---- likelihood: the tutorial's ELBO and the exact probability-flow-ODE likelihood --------------------------------
    def _unet_as_model(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The UNet as the likelihoods' `model(x_t, t)`: in the state's dtype, at integer or fractional t."""

        def model(x_t: torch.Tensor, t) -> torch.Tensor:
            t = torch.as_tensor(t, device=x_t.device)
            return self.unet(x_t.to(self.unet.dtype), t).sample.to(x_t.dtype)

        return model

    @torch.no_grad()
    def variational_bound(self, images: torch.Tensor, num_steps: Optional[int] = None, **kwargs):
        """The variational bound on -log p_θ(x_0) in bits/dim, with its terms (DDPM eq. (5); improved DDPM Sec. 3).

        Args:
            images (`torch.Tensor`): x_0 in [-1, 1], shape (B, C, H, W) (8-bit data for the default discretized
                decoder).
            num_steps (`int`, *optional*): respaced grid size K (all T steps if not given).
            **kwargs: `decoder`, `value_range`, `generator` of `schedulers.tutorial_likelihood.variational_bound`.

        Returns:
            `VariationalBound` (per-sample bits/dim and the prior, per-step KL and decoder terms).
        """
        images = images.to(self._execution_device)
        return _likelihood().variational_bound(
            self._unet_as_model(), self.scheduler, images, num_steps=num_steps, **kwargs
        )

    @torch.no_grad()
    def variational_bound_dataset(self, batches: Iterable[torch.Tensor], **kwargs):
        """`variational_bound` averaged over an iterable of image batches (the dataset-level ELBO in bits/dim)."""
        return _likelihood().variational_bound_dataset(self._unet_as_model(), self.scheduler, batches, **kwargs)

    def log_likelihood(self, images: torch.Tensor, **kwargs):
        """The exact log-likelihood through the probability-flow ODE (instantaneous change of variables), in bits/dim.

        Args:
            images (`torch.Tensor`): x in [-1, 1], shape (B, C, H, W).
            **kwargs: `trace` (`"exact"` or `"hutchinson"`), `probe`, `num_probes`, `rtol`, `atol`, `max_evals`,
                `dequantize` (8-bit images: +7 bits/dim offset), `generator` of
                `schedulers.tutorial_likelihood.ode_log_likelihood`.

        Returns:
            `ODELikelihood` (per-sample log-likelihood, bits/dim and the number of model evaluations).
        """
        images = images.to(self._execution_device)
        return _likelihood().ode_log_likelihood(self._unet_as_model(), self.scheduler, images, **kwargs)


# The likelihoods are plain functions beside the math, in `schedulers/tutorial_likelihood.py`; they take this
# pipeline's scheduler as it is (a diffusers scheduler's ᾱ is read from its config). The module is imported when a
# likelihood is first asked for, not at the top of this file: the file is shipped inside saved folders, which load where
# only diffusers is installed, and diffusers tells the user to `pip install` every top-level name an import line of a
# shipped file names (`schedulers` is not the name of this project's distribution). Likelihoods need this project.
LIKELIHOOD_MODULE = "schedulers.tutorial_likelihood"


def _likelihood():
    """The module `LIKELIHOOD_MODULE` (tests/test_layering.py reads this import like any other)."""
    return importlib.import_module(LIKELIHOOD_MODULE)
