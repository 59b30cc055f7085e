"""What every pipeline of this project shares: argument checks and the sampling loop's chores.

`TutorialPipelineBase` is a `DiffusionPipeline` that also saves itself as a self-contained folder
(`TutorialSavingMixin`, tutorial_pipeline_saving.py) and loads such folders without remote code
(`TutorialLoadingMixin`, tutorial_pipeline_loading.py).

This file is shipped inside saved folders: it imports only torch, numpy, PIL, diffusers and its sibling files.
"""

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, SchedulerMixin, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .tutorial_pipeline_loading import TutorialLoadingMixin
from .tutorial_pipeline_saving import TutorialSavingMixin

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
ImageInput = Union[torch.Tensor, np.ndarray, PIL.Image.Image, List[PIL.Image.Image]]


@dataclass
class TutorialPipelineOutput(BaseOutput):
    """Output of this project's image pipelines.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the samples mapped from [-1, 1] to [0, 1];
            PIL images, an array of shape (B, H, W, C), or a tensor of shape (B, C, H, W), by `output_type`.
        trajectory (`list[torch.Tensor]`, *optional*): with `return_trajectory=True`, x_t before the first step and
            after every scheduler step (len(timesteps) + 1 tensors, on the CPU, in model space [-1, 1]).
        pred_original_samples (`list[torch.Tensor | None]`, *optional*): the scheduler's x̂_0 at every step
            (`None` where a scheduler does not report it, e.g. DPM-Solver).
        timesteps (`list`, *optional*): the timestep of every step, the same length as `pred_original_samples`.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    trajectory: Optional[List[torch.Tensor]] = None
    pred_original_samples: Optional[List[Optional[torch.Tensor]]] = None
    timesteps: Optional[List[Any]] = None


class TutorialPipelineBase(TutorialLoadingMixin, TutorialSavingMixin, DiffusionPipeline):
    """Shared machinery of the tutorial pipelines: the components (a `UNet2DModel` and any scheduler), argument checks
    and the loop's chores. Not a pipeline itself: each subclass defines `__call__`.

    Saving (`save_pretrained`, `save_code`, `model_card`, `push_to_hub`) comes from `TutorialSavingMixin`, loading
    without remote code (`from_pretrained`) from `TutorialLoadingMixin`.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]
    # NaN/inf checks (`check_finite`): None = at once on the CPU, deferred to the loop's last step elsewhere (no host
    # synchronisation per step on a GPU); True/False force one way (the tests run the deferred path on the CPU).
    _defer_finite_check: Optional[bool] = None

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    # ---- argument checks (validate at the door) -----------------------------------------------------------------
    @staticmethod
    def check_output_type(output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; choose one of {OUTPUT_TYPES}.")

    @staticmethod
    def check_batch_size(batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")

    @staticmethod
    def check_num_inference_steps(num_inference_steps: int) -> None:
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1.")

    @staticmethod
    def check_generator(generator, batch_size: int) -> None:
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but batch_size={batch_size}; pass one generator "
                "or a list of exactly batch_size generators."
            )

    def check_callback_inputs(self, callback_on_step_end_tensor_inputs: Sequence[str]) -> None:
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs={list(callback_on_step_end_tensor_inputs)!r} contains {unknown}; "
                f"allowed: {self._callback_tensor_inputs}."
            )

    # ---- the loop's chores -----------------------------------------------------------------------------------------
    def sample_shape(self, batch_size: int) -> Tuple[int, ...]:
        """(B, C, H, W) of the UNet's input."""
        size = self.unet.config.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels) + hw

    def image_shape(self, batch_size: int) -> Tuple[int, ...]:
        """(B, C, H, W) of the images the pipeline takes and returns: the UNet's input here; a latent pipeline's
        autoencoder changes it."""
        return self.sample_shape(batch_size)

    def prepare_latents(
        self,
        batch_size: int,
        generator: Union[torch.Generator, List[torch.Generator], None],
        latents: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """x_T = σ_init z with z ~ N(0, I) (`latents` is z when given), σ_init the scheduler's `init_noise_sigma`.

        1 for variance-preserving schedulers (DDPM/DDIM), σ_max-ish for the σ-parameterised ones (Euler, Heun, LMS).
        """
        shape = self.sample_shape(batch_size)
        device, dtype = self._execution_device, self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if not torch.is_tensor(latents) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(f"latents has shape {got}; expected {shape} (batch_size, in_channels, H, W).")
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def scheduler_step_kwargs(self, eta: float = 0.0, generator=None) -> Dict[str, Any]:
        """Keyword arguments for `scheduler.step` that its signature names: `eta` and `generator` only if it has them."""
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        elif eta:
            logger.warning(f"eta={eta} is ignored: {type(self.scheduler).__name__}.step has no eta parameter.")
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def check_finite(
        self, sample: torch.Tensor, model_output: torch.Tensor, step_index: int, timestep, num_steps: int
    ):
        """Raise `FloatingPointError` naming the step at which a NaN or ±inf first appeared in the sample.

        On the CPU the step is checked at once. On an accelerator nothing is read back per step: whether the sample
        (and the model output) is finite is folded into two device tensors, the first bad step and its culprit, and
        read once at the loop's last step (`step_index == num_steps - 1`). Our schedulers never turn a non-finite
        model output into a finite sample (clipping and thresholding keep NaN/inf), so a check of the sample suffices.
        A loop may check only some of its steps (RePaint checks its down-steps, numbered among all its moves): the
        timestep is kept by `step_index`, so the one named is the one passed with that index.
        """
        defer = self._defer_finite_check
        if defer is None:
            defer = sample.device.type != "cpu"
        if not defer:
            if not bool(torch.isfinite(sample).all()):
                self._raise_non_finite(step_index, timestep, num_steps, bool(~torch.isfinite(model_output).all()))
            return
        if step_index == 0 or getattr(self, "_finite_watch", None) is None:
            self._finite_watch = {"first": torch.full((), -1, device=sample.device), "timesteps": {}}
            self._finite_watch["model"] = torch.zeros((), dtype=torch.bool, device=sample.device)
        watch = self._finite_watch
        watch["timesteps"][step_index] = timestep
        newly = ~torch.isfinite(sample).all() & (watch["first"] < 0)
        watch["first"] = torch.where(newly, step_index, watch["first"])
        watch["model"] = torch.where(newly, ~torch.isfinite(model_output).all(), watch["model"])
        if step_index == num_steps - 1:
            self._finite_watch = None
            first = int(watch["first"])  # the one host synchronisation of the loop
            if first >= 0:
                self._raise_non_finite(first, watch["timesteps"][first], num_steps, bool(watch["model"]))

    @staticmethod
    def _raise_non_finite(step_index: int, timestep, num_steps: int, model_output_bad: bool):
        culprit = "the model output" if model_output_bad else "the scheduler step"
        raise FloatingPointError(
            f"Non-finite value (NaN or inf) in the sample after step {step_index} of {num_steps} "
            f"(timestep {timestep.item() if torch.is_tensor(timestep) and timestep.numel() == 1 else timestep}); "
            f"it first appeared in {culprit}."
        )

    def finish_step(
        self,
        step_index: int,
        timestep,
        timesteps: Sequence,
        step_output,
        model_output: torch.Tensor,
        trajectory: Optional[List[torch.Tensor]],
        pred_x0s: List[Optional[torch.Tensor]],
        callback,
        tensor_inputs: Sequence[str],
        local_vars: Dict,
    ) -> torch.Tensor:
        """The chores after scheduler step `step_index` of the grid `timesteps`; returns x_t for the next step.

        `check_finite` on the new x_t, `record_step` when a trajectory is kept (`trajectory` is not None), and the
        callback (`run_callback`, with the caller's `locals()` and the new x_t as `latents`), whose `latents` replace
        x_t.
        """
        latents = step_output.prev_sample
        self.check_finite(latents, model_output, step_index, timestep, len(timesteps))
        if trajectory is not None:
            self.record_step(trajectory, pred_x0s, latents, step_output)
        if callback is not None:
            outputs = self.run_callback(
                callback, step_index, timestep, tensor_inputs, {**local_vars, "latents": latents}
            )
            latents = outputs.pop("latents", latents)
        return latents

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: Sequence,
        timesteps_on_device: torch.Tensor,
        step_kwargs: Dict,
        callback,
        tensor_inputs: Sequence[str],
        return_trajectory: bool,
    ) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]], List[Optional[torch.Tensor]]]:
        """The reverse process over `timesteps` (the host's grid; the UNet reads `timesteps_on_device`): one network
        evaluation and one scheduler step per entry, each followed by `finish_step`.

        Returns:
            `(latents, trajectory, pred_x0s)`: the last x_t, and x_t (starting with the given one) and x̂_0 at every
            step when `return_trajectory` (else `None` and an empty list).
        """
        trajectory = [latents.cpu()] if return_trajectory else None
        pred_x0s: List[Optional[torch.Tensor]] = []
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            model_output = self.unet(model_input, timesteps_on_device[i]).sample
            out = self.scheduler.step(model_output, t, latents, **step_kwargs)
            latents = self.finish_step(
                i, t, timesteps, out, model_output, trajectory, pred_x0s, callback, tensor_inputs, locals()
            )
        return latents, trajectory, pred_x0s

    @staticmethod
    def record_step(trajectory: List[torch.Tensor], pred_x0s: List[Optional[torch.Tensor]], latents, step_output):
        """Append x_t and the step's x̂_0 (None for schedulers that do not report one) to a trajectory, on CPU."""
        trajectory.append(latents.cpu())
        x0 = getattr(step_output, "pred_original_sample", None)
        pred_x0s.append(x0.cpu() if x0 is not None else None)

    @staticmethod
    def pipeline_output(images, trajectory, pred_x0s, timesteps, return_trajectory: bool, return_dict: bool):
        """`TutorialPipelineOutput`, or the tuple `(images,)` / `(images, trajectory, pred_x0s, timesteps)`."""
        timestep_list = [t.item() if torch.is_tensor(t) else t for t in timesteps] if return_trajectory else None
        if not return_dict:
            return (images, trajectory, pred_x0s, timestep_list) if return_trajectory else (images,)
        return TutorialPipelineOutput(
            images=images,
            trajectory=trajectory,
            pred_original_samples=pred_x0s if return_trajectory else None,
            timesteps=timestep_list,
        )

    def run_callback(self, callback, step_index: int, timestep, tensor_inputs: Sequence[str], local_vars: Dict):
        """diffusers' `callback_on_step_end(pipe, i, t, callback_kwargs) -> dict` protocol; returns the dict.

        What comes back is checked before the loop uses it: a dict (or None), whose `"latents"`, if any, is a tensor of
        x_t's shape (it replaces x_t for the next step).
        """
        callback_kwargs = {k: local_vars[k] for k in tensor_inputs}
        outputs = callback(self, step_index, timestep, callback_kwargs)
        if outputs is None:
            return {}
        if not isinstance(outputs, dict):
            raise ValueError(
                f"callback_on_step_end returned a {type(outputs).__name__} at step {step_index}; it must return a dict "
                "(e.g. {'latents': new_x_t}) or None."
            )
        if "latents" in outputs:
            latents, expected = outputs["latents"], tuple(local_vars["latents"].shape)
            if not torch.is_tensor(latents):
                got = f"that are a {type(latents).__name__}, not a tensor,"
            elif tuple(latents.shape) != expected:
                got = f"of shape {tuple(latents.shape)}"
            else:
                return outputs
            raise ValueError(
                f"callback_on_step_end returned latents {got} at step {step_index}; they replace x_t, so they must be "
                f"a tensor of x_t's shape {expected} (batch_size, in_channels, H, W)."
            )
        return outputs

    @staticmethod
    def resolve_callback_inputs(callback, tensor_inputs: Sequence[str]) -> Sequence[str]:
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            return callback.tensor_inputs
        return tensor_inputs

    def preprocess_images(self, image: ImageInput, name: str = "image") -> torch.Tensor:
        """Images in [0, 1] (a (B, C, H, W) tensor, a (B, H, W, C) array or PIL images) -> x_0 = 2 image - 1.

        Values outside [0, 1] are kept (no clamping), so data in model space round-trips exactly.
        """
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, list):
            image = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in image])
            image = image[..., None] if image.ndim == 3 else image
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
        if not torch.is_tensor(image) or image.ndim != 4:
            raise ValueError(
                f"{name} must be PIL images, an array (B, H, W, C) or a tensor (B, C, H, W); got {type(image).__name__}"
                f"{' of shape ' + str(tuple(image.shape)) if torch.is_tensor(image) else ''}."
            )
        expected = self.image_shape(image.shape[0])
        if tuple(image.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(image.shape)}; expected {expected} for this pipeline.")
        return (2 * image - 1).to(device=self._execution_device, dtype=self.unet.dtype)

    def postprocess(self, sample: torch.Tensor, output_type: str):
        """Map x_0 ∈ [-1, 1] to images in [0, 1]: a (B, C, H, W) tensor, a (B, H, W, C) array, or PIL images."""
        image = (sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(image) if output_type == "pil" else image

    # ---- speed ----------------------------------------------------------------------------------------------------
    def enable_fast_inference(self, channels_last: bool = True, compile: bool = False):
        """Switch the UNet to the faster settings measured on CPU (benchmarks/bench_pipelines.py).

        Args:
            channels_last (`bool`, defaults to `True`): store the UNet's weights in channels-last memory format
                (the same numbers up to float32 rounding, ~10% faster convolutions on CPU).
            compile (`bool`, defaults to `False`): `torch.compile` the UNet's forward in place (~20% faster per call
                on CPU, but the first call compiles for minutes; worth it for long sampling runs only).

        Returns:
            The pipeline itself.
        """
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet.compile()
        return self
