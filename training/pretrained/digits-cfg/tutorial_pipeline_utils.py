"""What every pipeline of this project shares: argument checks, the sampling-loop chores, and Hub packaging.

Packaging (see DESIGN.md, "Loading facts"): `save_pretrained` writes a folder that loads anywhere diffusers 0.42.1 is
installed. diffusers records classes it does not know by module path and will not import them, so we copy the code
in: the pipeline's source file (and the files it imports relatively, this one included) to the folder root, and a
non-diffusers scheduler's source (with its sibling files) to `scheduler/`, and write list-form `model_index.json`
entries `["<file stem>", "<Class>"]` that `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` executes.
With our package imported, `OurPipeline.from_pretrained(folder)` loads the same folder without running shipped code.

Saving into a folder that holds an earlier save: the new save is written to a staging folder inside it, then swapped
in entry by entry, `model_index.json` last (`_swap_in`), so that a failed or killed save leaves a folder that loads
(`save_pretrained` states the exact guarantee).

This file is shipped inside saved folders: it imports only torch, numpy, PIL, diffusers and huggingface_hub.
"""

import ast
import ctypes
import functools
import importlib
import inspect
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
ImageInput = Union[torch.Tensor, np.ndarray, PIL.Image.Image, List[PIL.Image.Image]]
MODEL_INDEX = "model_index.json"
MODEL_CARD = "README.md"
SAMPLES_DIR = "samples"
SAVE_STAGING_PREFIX = ".tmp-pipeline-save-"  # `save_pretrained` writes here first, inside the target folder
DEFAULT_NUM_INFERENCE_STEPS = 50
_SCHEDULER_PACKAGE = "schedulers"  # where this project's scheduler modules live when it is installed
# diffusers' remote-code loader finds sibling files only through lines of these two forms
# (diffusers.utils.dynamic_modules_utils.get_relative_imports); `from . import x` is invisible to it.
_DETECTABLE_RELATIVE_IMPORT = (r"^\s*import\s+\.(\S+)\s*$", r"^\s*from\s+\.(\S+)\s+import")


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


class TutorialPipelineBase(DiffusionPipeline):
    """Shared machinery of the tutorial pipelines (not a pipeline itself: subclasses define `__init__`/`__call__`)."""

    _callback_tensor_inputs = ["latents"]
    _pipeline_tag = "unconditional-image-generation"
    _card_tags = ("diffusers", "diffusion-tutorial", "pytorch")
    _card_example_call = "batch_size=4, num_inference_steps={steps}"  # arguments of the model card's example
    # NaN/inf checks (`check_finite`): None = at once on the CPU, deferred to the loop's last step elsewhere (no host
    # synchronisation per step on a GPU); True/False force one way (the tests run the deferred path on the CPU).
    _defer_finite_check: Optional[bool] = None

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
        """
        defer = self._defer_finite_check
        if defer is None:
            defer = sample.device.type != "cpu"
        if not defer:
            if not bool(torch.isfinite(sample).all()):
                self._raise_non_finite(step_index, timestep, num_steps, bool(~torch.isfinite(model_output).all()))
            return
        if step_index == 0 or getattr(self, "_finite_watch", None) is None:
            self._finite_watch = {"first": torch.full((), -1, device=sample.device), "timesteps": []}
            self._finite_watch["model"] = torch.zeros((), dtype=torch.bool, device=sample.device)
        watch = self._finite_watch
        watch["timesteps"].append(timestep)
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
        expected = self.sample_shape(image.shape[0])
        if tuple(image.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(image.shape)}; expected {expected} for this UNet.")
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

    # ---- saving: a self-contained folder ----------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        push_to_hub: bool = False,
        num_inference_steps: Optional[int] = None,
        sample_images: Optional[Sequence] = None,
        model_card_text: Optional[str] = None,
        repo_id: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        **kwargs,
    ):
        """Write a self-contained pipeline folder: weights, configs, our code, list-form `model_index.json`, a card.

        The folder may hold an earlier save and files the pipeline does not own (a training run's checkpoints, logs,
        metrics, anything of the user's). What is guaranteed:

        - Everything is first written to a staging folder inside `save_directory`; an error or a kill while writing
          (where a save spends its time) leaves the earlier save and every other file exactly as they were.
        - Then the save's entries (`README.md`, the pipeline's code files, `unet/`, `scheduler/`, `samples/`) replace
          their namesakes one at a time, each in one atomic rename (a folder is exchanged with the old one by Linux'
          `renameat2(RENAME_EXCHANGE)`; where the system lacks it, the old folder is moved aside first and the entry
          is missing for that instant), and `model_index.json` is renamed in last: the commit. A kill during these few
          renames can leave some entries old and others new, each one whole, under the old `model_index.json`, which
          still finds every module it names (new component folders carry the old code files until the commit): the
          folder loads, with components from both saves, until it is saved again. After the commit it is the new save.
        - What the earlier save wrote and this one does not (an fp16 variant, sharded weights and their index, more
          samples, another pipeline's code) is gone when the save returns. Entries the pipeline does not own are never
          touched. One save at a time per folder: a save removes the staging folders of saves that were killed.

        Args:
            save_directory (`str` or `os.PathLike`): the folder (created if missing).
            safe_serialization (`bool`, defaults to `True`): UNet weights as safetensors.
            variant (`str`, *optional*): weights variant suffix, as in diffusers.
            push_to_hub (`bool`, defaults to `False`): also upload the folder with `push_to_hub` (then `repo_id` may be
                passed in `kwargs`; it defaults to the folder's name).
            num_inference_steps (`int`, *optional*): the number of sampling steps the model card recommends; defaults
                to the scheduler's last `set_timesteps` or 50.
            sample_images (`list`, *optional*): PIL images, an array (B, H, W, C) in [0, 1] or a tensor (B, C, H, W)
                in [0, 1], written to `samples/` and shown in the model card.
            model_card_text (`str`, *optional*): extra markdown appended to the model card.
            repo_id (`str`, *optional*): the Hub repository the folder is meant for, named in the model card's loading
                example (and the upload target when `push_to_hub=True`; defaults to the folder's name then).
            max_shard_size (`int` or `str`, *optional*): split weights larger than this into shards, as in diffusers.

        Returns:
            `None`, or the upload's `CommitInfo` when `push_to_hub=True`.
        """
        save_directory = os.fspath(save_directory)
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is a file; pass a folder (created if missing).")
        if push_to_hub and repo_id is None:
            repo_id = os.path.basename(os.path.normpath(save_directory))
        os.makedirs(save_directory, exist_ok=True)
        for name in os.listdir(save_directory):  # staging folders of saves that were killed
            if name.startswith(SAVE_STAGING_PREFIX):
                shutil.rmtree(os.path.join(save_directory, name), ignore_errors=True)
        staging = tempfile.mkdtemp(prefix=SAVE_STAGING_PREFIX, dir=save_directory)
        try:
            super().save_pretrained(
                staging, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
            )
            self.save_code(staging)
            sample_files = _write_sample_images(sample_images, staging)
            card = self.model_card(
                num_inference_steps, sample_files=sample_files, extra_text=model_card_text, repo_id=repo_id
            )
            with open(os.path.join(staging, MODEL_CARD), "w", encoding="utf-8") as f:
                f.write(card)
            _swap_in(staging, save_directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if push_to_hub:
            return _upload_folder(save_directory, repo_id, **kwargs)
        return None

    def save_code(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write the code part of a self-contained folder: our code files and a list-form `model_index.json`.

        The pipeline's source file and the files it imports relatively go to the folder root, a non-diffusers
        component's source (with its sibling files) to `<component>/`; `model_index.json` is diffusers' (`save_config`)
        with every entry in list form. Nothing else is written: weights, component configs and the model card are
        `save_pretrained`'s, which calls this after diffusers has saved the components. `training/export_shipped.py`
        calls it to regenerate the shipped folders' code without touching what training wrote.

        Args:
            save_directory (`str` or `os.PathLike`): the folder (created if missing).
        """
        save_directory = os.fspath(save_directory)
        self.save_config(save_directory)
        with open(os.path.join(save_directory, MODEL_INDEX), encoding="utf-8") as f:
            index = json.load(f)
        # The pipeline: its file and the files it imports relatively, at the root.
        index["_class_name"] = [_ship_module(type(self), save_directory), type(self).__name__]
        for name, entry in list(index.items()):
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
                continue
            component = getattr(self, name, None)
            if component is None:
                continue
            if _is_diffusers_class(type(component)):
                index[name] = ["diffusers", type(component).__name__]
            else:  # our scheduler (or any non-diffusers component): its code goes into <name>/
                index[name] = [
                    _ship_module(type(component), os.path.join(save_directory, name)),
                    type(component).__name__,
                ]
        with open(os.path.join(save_directory, MODEL_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

    def model_card(
        self,
        num_inference_steps: Optional[int] = None,
        sample_files: Sequence[str] = (),
        extra_text: Optional[str] = None,
        repo_id: Optional[str] = None,
    ) -> str:
        """The `README.md` of a saved folder: Hub metadata (YAML front matter), how to load, scheduler and steps."""
        steps = (
            num_inference_steps or getattr(self.scheduler, "num_inference_steps", None) or DEFAULT_NUM_INFERENCE_STEPS
        )
        cls_name, sched = type(self).__name__, self.scheduler
        sched_name = type(sched).__name__
        cfg = sched.config
        unet_cfg = self.unet.config
        num_params = sum(p.numel() for p in self.unet.parameters())
        tags = list(self._card_tags) + [self._pipeline_tag]
        front = ["---", "library_name: diffusers", "tags:"] + [f"- {t}" for t in tags]
        front += [f"pipeline_tag: {self._pipeline_tag}", "---", ""]
        size = unet_cfg.sample_size
        where = repo_id or "<this repo or folder>"
        lines = [
            f"# {cls_name}",
            "",
            f"A `UNet2DModel` ({num_params:,} parameters, {unet_cfg.in_channels} channel(s), {size}x{size} samples) "
            f"with the `{sched_name}` scheduler, packaged by the diffusion-tutorial project. The folder is "
            "self-contained: the pipeline and scheduler code ship with it.",
            "",
            "## How to load",
            "",
            "With only `diffusers` installed (runs the code shipped in this repository):",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{where}", trust_remote_code=True)',
            f"images = pipe({self._card_example_call.format(steps=steps)}).images",
            "```",
            "",
            "With the `diffusion-tutorial` package installed (no remote code):",
            "",
            "```python",
            f"from custom_pipelines import {cls_name}",
            "",
            f'pipe = {cls_name}.from_pretrained("{where}")',
            "```",
            "",
            "Any diffusers scheduler can be swapped in: "
            "`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.",
            "",
            "## Sampling setup",
            "",
            f"- scheduler: `{sched_name}` (`num_train_timesteps={cfg.get('num_train_timesteps')}`, "
            f"`beta_schedule={cfg.get('beta_schedule')!r}`, `prediction_type={cfg.get('prediction_type')!r}`)",
            f"- recommended `num_inference_steps`: {steps}",
            "",
        ]
        if sample_files:
            lines += ["## Samples", ""] + [f"![sample]({p})" for p in sample_files] + [""]
        if extra_text:
            lines += [extra_text.rstrip(), ""]
        return "\n".join(front + lines)

    # ---- sharing ----------------------------------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        images: Optional[Sequence] = None,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        num_inference_steps: Optional[int] = None,
        model_card_text: Optional[str] = None,
    ):
        """Upload exactly the folder `save_pretrained` writes (plus `samples/` when `images` are given).

        Args:
            repo_id (`str`): `"user/name"` on the Hub (created if missing).
            images (`list`, *optional*): sample images for `samples/` and the model card (see `save_pretrained`).
            commit_message (`str`, *optional*): defaults to `"Upload <PipelineClass>"`.
            private (`bool`, *optional*): visibility of a newly created repository.
            token (`str`, *optional*): Hub token; defaults to the logged-in one.
            create_pr (`bool`, defaults to `False`): open a pull request instead of committing.
            safe_serialization (`bool`, defaults to `True`): weights as safetensors.
            variant (`str`, *optional*): weights variant suffix.
            num_inference_steps (`int`, *optional*): steps recommended by the model card.
            model_card_text (`str`, *optional*): extra markdown for the model card.

        Returns:
            The `CommitInfo` returned by `huggingface_hub.HfApi.upload_folder`.
        """
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(
                tmp,
                safe_serialization=safe_serialization,
                variant=variant,
                num_inference_steps=num_inference_steps,
                sample_images=images,
                model_card_text=model_card_text,
                repo_id=repo_id,
            )
            return _upload_folder(
                tmp,
                repo_id,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                private=private,
                token=token,
                create_pr=create_pr,
            )

    # ---- loading without remote code --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load a pipeline folder (or Hub repo) into this class without executing code shipped inside it.

        Folders written by `save_pretrained` name our pipeline and scheduler files in `model_index.json`;
        diffusers would insist on `trust_remote_code=True` for them. Here each component is built from the class
        of the same name that is already imported (diffusers' own or this project's), so nothing from the folder runs.
        Folders of diffusers pipelines (e.g. a `DDPMPipeline` with `DDPMScheduler`) load too. With
        `trust_remote_code=True` or `custom_pipeline`, diffusers' own loader is used unchanged.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a local folder or a Hub repo id.
            kwargs: components to use instead of the saved ones (`unet=...`, `scheduler=...`); `torch_dtype`,
                `variant`, `use_safetensors` for the models; the download options `cache_dir`, `revision`, `token`,
                `local_files_only`.

        Returns:
            An instance of this class.
        """
        if kwargs.get("trust_remote_code") or kwargs.get("custom_pipeline") is not None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.pop("trust_remote_code", None)
        folder = _resolve_folder(pretrained_model_name_or_path, kwargs)
        index_path = os.path.join(folder, MODEL_INDEX)
        with open(index_path, encoding="utf-8") as f:
            try:
                index = json.load(f)
            except ValueError as err:
                raise ValueError(f"{index_path} is not valid JSON ({err}); the pipeline folder is damaged.") from err
        model_kwargs = {k: kwargs.pop(k) for k in ("torch_dtype", "variant", "use_safetensors") if k in kwargs}
        expected, _ = cls._get_signature_keys(cls)
        components = {}
        for name in expected:
            if name in kwargs:
                components[name] = kwargs.pop(name)
                continue
            entry = index.get(name)
            if entry is None or entry[0] is None:
                components[name] = None
                continue
            path = os.path.join(folder, name)
            if not os.path.isdir(path):  # else diffusers would take the path for a Hub repo id and try to download it
                raise ValueError(
                    f"{name}: {MODEL_INDEX} names {entry} but {path} is not a folder; the pipeline folder is incomplete."
                )
            component_cls = _find_class(entry[1], name, entry[0])
            load_kwargs = model_kwargs if issubclass(component_cls, ModelMixin) else {}
            components[name] = component_cls.from_pretrained(path, **load_kwargs)
        if kwargs:
            logger.warning(f"{cls.__name__}.from_pretrained ignores the arguments {sorted(kwargs)}.")
        pipe = cls(**components)
        pipe.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        return pipe


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _is_diffusers_class(klass: type) -> bool:
    return klass.__module__.split(".")[0] == "diffusers"


def _relative_imports(path: str) -> List[str]:
    """Sibling module names a file imports relatively (`from . import a`, `from .b import c`), as Python sees them."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names += [a.name for a in node.names] if node.module is None else [node.module.split(".")[0]]
    folder = os.path.dirname(path)
    return [n for n in dict.fromkeys(names) if os.path.isfile(os.path.join(folder, f"{n}.py"))]


def _relative_import_closure(path: str) -> List[str]:
    """The file itself and every sibling it needs, transitively, as absolute paths."""
    folder, todo, seen = os.path.dirname(path), [path], []
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += [os.path.join(folder, f"{n}.py") for n in _relative_imports(current)]
    return seen


def _detected_by_diffusers(path: str) -> List[str]:
    """The sibling modules diffusers' remote-code loader will fetch for `path` (it reads one level, by regex)."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    found = []
    for pattern in _DETECTABLE_RELATIVE_IMPORT:
        found += re.findall(pattern, content, flags=re.MULTILINE)
    return found


def _ship_module(klass: type, target_dir: str) -> str:
    """Copy the source of `klass` and its sibling dependencies into `target_dir`; return the module stem to record.

    diffusers' remote-code loader copies only the siblings it finds by regex in the named file, one level deep (not the
    siblings of those siblings, and not `from . import x`). So the named file must itself import, as
    `from .name import ...`, every sibling it needs directly or indirectly; a file that does not is refused here, at
    save time, rather than failing to load for a user of the folder.
    """
    source = inspect.getsourcefile(klass)
    if source is None:
        raise ValueError(f"Cannot ship {klass.__name__}: its source file is unknown (defined interactively?).")
    files = _relative_import_closure(os.path.abspath(source))
    needed = {os.path.splitext(os.path.basename(p))[0] for p in files[1:]}
    missing = sorted(needed - set(_detected_by_diffusers(source)))
    if missing:
        raise ValueError(
            f"Cannot ship {klass.__name__}: diffusers would not copy the sibling module(s) {missing} that "
            f"{os.path.basename(source)} needs ({source}). Import each of them in that file as "
            "`from .name import ...` (diffusers' loader sees only that form, and only in the named file)."
        )
    os.makedirs(target_dir, exist_ok=True)
    for path in files:
        shutil.copyfile(path, os.path.join(target_dir, os.path.basename(path)))
    return os.path.splitext(os.path.basename(source))[0]


def _all_subclasses(base: type) -> List[type]:
    out, todo = [], [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def _imported_classes(class_name: str) -> List[type]:
    return [
        c
        for base in (SchedulerMixin, ModelMixin)
        for c in _all_subclasses(base)
        if c.__name__ == class_name and not c.__module__.startswith("diffusers_modules")
    ]


def _find_class(class_name: str, component: str, module_stem: str = "") -> type:
    """The class called `class_name`: diffusers' own, else an imported one of ours (never a shipped copy), else the
    one in the installed module our package ships under that file name (`schedulers.<module_stem>`)."""
    import diffusers

    klass = getattr(diffusers, class_name, None)
    if isinstance(klass, type):
        return klass
    candidates = _imported_classes(class_name)
    if not candidates and module_stem:
        # Folders saved before the scheduler files named all their siblings record a loader `<stem>_entry` file.
        stem = module_stem[: -len("_entry")] if module_stem.endswith("_entry") else module_stem
        try:  # our package, when installed; where it is not, the error below says what to do
            importlib.import_module(f"{_SCHEDULER_PACKAGE}.{stem}")
        except ImportError:
            pass
        candidates = _imported_classes(class_name)
    if not candidates:
        raise ValueError(
            f"{component}: class {class_name!r} named in model_index.json is neither in diffusers nor imported. "
            "Import the package that defines it (e.g. `import schedulers`) or load with "
            "`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`."
        )
    return candidates[0]


def _resolve_folder(pretrained_model_name_or_path, kwargs: Dict) -> str:
    """A local folder as is; a Hub repo id through `huggingface_hub.snapshot_download` (cache, revision, token)."""
    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(path):
        return path
    import huggingface_hub

    options = {k: kwargs.pop(k) for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
    return huggingface_hub.snapshot_download(path, **options)


def _saved_entries(folder: str) -> List[str]:
    """The top-level entries an earlier save wrote into `folder`, read from its `model_index.json`.

    `model_index.json`, `README.md`, `samples/`, the folder of every component it names, and the pipeline's code
    file with the files it imports. Empty when there is no readable `model_index.json` (nothing is known to be ours).
    """
    try:
        with open(os.path.join(folder, MODEL_INDEX), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(index, dict):
        return []
    entries = [MODEL_INDEX, MODEL_CARD, SAMPLES_DIR]
    entries += [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    class_name = index.get("_class_name")
    if isinstance(class_name, list) and class_name and isinstance(class_name[0], str):
        code = os.path.join(folder, f"{class_name[0]}.py")
        if _is_plain_name(class_name[0]) and os.path.isfile(code):
            try:
                entries += [os.path.basename(p) for p in _relative_import_closure(code)]
            except (SyntaxError, ValueError, OSError):  # a damaged code file: only that file is known to be ours
                entries.append(os.path.basename(code))
    return [e for e in dict.fromkeys(entries) if _is_plain_name(e) and os.path.lexists(os.path.join(folder, e))]


def _is_plain_name(name: str) -> bool:
    """A name of an entry directly inside a folder (no separators, not `.` or `..`)."""
    return name not in ("", ".", "..") and "/" not in name and os.sep not in name


def _swap_in(staging: str, folder: str) -> None:
    """Replace the earlier save in `folder` by the complete save in `staging` (a folder inside it).

    1. Each entry of the new save except `model_index.json` replaces its namesake in one rename (`_replace`). The old
       `model_index.json` stays in place meanwhile, so every new component folder first receives the old one's code
       files that it lacks: whatever mix of old and new entries a kill leaves, every module it names exists.
    2. `model_index.json` is renamed in: the commit. The folder is now the new save.
    3. The old save's leftovers are removed: entries the new save does not have, and the code files of step 1.
    """
    new_entries = sorted(e for e in os.listdir(staging) if e != MODEL_INDEX)
    stale = [e for e in _saved_entries(folder) if e not in new_entries and e != MODEL_INDEX]
    borrowed = []  # old code files copied into new component folders, removed after the commit
    for name in new_entries:
        old, new = os.path.join(folder, name), os.path.join(staging, name)
        if os.path.isdir(old) and os.path.isdir(new) and not os.path.islink(old):
            for file in sorted(os.listdir(old)):
                if file.endswith(".py") and not os.path.exists(os.path.join(new, file)):
                    shutil.copyfile(os.path.join(old, file), os.path.join(new, file))
                    borrowed.append(os.path.join(old, file))
    trash = tempfile.mkdtemp(prefix="replaced-", dir=staging)  # removed with `staging`
    for name in new_entries:
        _replace(os.path.join(staging, name), os.path.join(folder, name), os.path.join(trash, name))
    os.replace(os.path.join(staging, MODEL_INDEX), os.path.join(folder, MODEL_INDEX))  # the commit
    for name in stale:
        os.rename(os.path.join(folder, name), os.path.join(trash, name))
    for path in borrowed:
        os.remove(path)


def _replace(new: str, target: str, aside: str) -> None:
    """Put `new` at `target` in one rename; a replaced folder ends up at `new` or `aside` (to be deleted)."""
    if not os.path.lexists(target) or (os.path.isfile(new) and not os.path.isdir(target)):
        os.replace(new, target)  # a file over a file, or into a free name: atomic everywhere
    elif not _exchange(new, target):  # a folder involved and no atomic swap here: two renames
        os.rename(target, aside)
        os.rename(new, target)


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux/glibc (macOS, Windows): no atomic exchange
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: str, b: str) -> bool:
    """Swap the paths `a` and `b` (files or folders) in one atomic step; False where the system cannot.

    Linux' `renameat2(..., RENAME_EXCHANGE)` (glibc >= 2.28, most local filesystems).
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _upload_folder(folder: str, repo_id: str, token=None, private=None, commit_message=None, create_pr=False):
    """Create the repository if needed and upload `folder` to it as one commit."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload pipeline",
        create_pr=create_pr,
    )


def _write_sample_images(images: Optional[Sequence], folder: str) -> List[str]:
    """Write sample images to `<folder>/samples/sample_XX.png`; return their paths relative to `folder`."""
    if images is None:
        return []
    if torch.is_tensor(images):
        images = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    if isinstance(images, np.ndarray):
        images = DiffusionPipeline.numpy_to_pil(images)
    os.makedirs(os.path.join(folder, SAMPLES_DIR), exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(
                f"images[{i}] is a {type(image).__name__}; expected PIL images, an array (B, H, W, C) in [0, 1] "
                "or a tensor (B, C, H, W) in [0, 1]."
            )
        rel = f"{SAMPLES_DIR}/sample_{i:02d}.png"
        image.save(os.path.join(folder, rel))
        paths.append(rel)
    return paths
