"""Saving a pipeline as a self-contained folder, its model card, and sharing it on the Hub.

`save_pretrained` writes a folder that loads anywhere diffusers 0.42.1 is installed (see DESIGN.md, "Loading facts").
diffusers records classes it does not know by module path and will not import them, so we copy the code in: the
pipeline's source file (and the files it imports relatively) to the folder root, and a non-diffusers scheduler's
source (with its sibling files) to `scheduler/`, and write list-form `model_index.json` entries
`["<file stem>", "<Class>"]` that `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` executes.

This file is shipped inside saved folders: it imports only torch, numpy, PIL, diffusers and huggingface_hub.
"""

import glob
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from typing import List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from .tutorial_pipeline_folder import (
    MODEL_CARD,
    MODEL_INDEX,
    SAMPLES_DIR,
    SAVE_STAGING_PREFIX,
    relative_import_closure,
    swap_in,
)

DEFAULT_NUM_INFERENCE_STEPS = 50
# diffusers' remote-code loader finds sibling files only through lines of these two forms
# (diffusers.utils.dynamic_modules_utils.get_relative_imports); `from . import x` is invisible to it.
_DETECTABLE_RELATIVE_IMPORT = (r"^\s*import\s+\.(\S+)\s*$", r"^\s*from\s+\.(\S+)\s+import")


class PipelineSaveError(OSError):
    """`save_pretrained` could not write into a pipeline folder: the message names the folder, the step and the cause
    (`__cause__`; `errno` is the cause's). A failure while writing leaves the folder exactly as it was."""

    def __init__(self, folder: str, step: str, cause: BaseException):
        if step == "swapping the save in":
            state = (
                "Some entries may already be the new save's, each one whole, and the folder still loads; save again."
            )
        else:
            state = "The folder is as it was before this save (an earlier save in it still loads)."
        super().__init__(
            f"Could not save the pipeline to {folder!r} ({step}): {type(cause).__name__}: {cause}. {state} "
            "The save's temporary folder is removed."
        )
        self.errno = getattr(cause, "errno", None)
        self.folder = folder


class TutorialSavingMixin:
    """`save_pretrained`, `save_code`, `model_card` and `push_to_hub` of the tutorial pipelines (a `DiffusionPipeline`
    mixin: it comes before `DiffusionPipeline` among the bases)."""

    _pipeline_tag = "unconditional-image-generation"
    _card_tags = ("diffusers", "diffusion-tutorial", "pytorch")
    _card_example_call = "batch_size=4, num_inference_steps={steps}"  # arguments of the model card's example

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
            push_to_hub (`bool`, defaults to `False`): then upload the files this save wrote, and nothing else of the
                folder (`HfApi.upload_folder` with `allow_patterns`); `token`, `private`, `commit_message`, `create_pr`
                may be passed in `kwargs`.
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

        Raises:
            `PipelineSaveError` (an `OSError`): writing failed (a full disk, a permission); the message names the folder,
                the step and the cause, the staging folder is removed and, if it failed while writing, the folder is
                exactly as it was.
        """
        save_directory = os.fspath(save_directory)
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is a file; pass a folder (created if missing).")
        if push_to_hub and repo_id is None:
            repo_id = os.path.basename(os.path.normpath(save_directory))
        written = self._write_and_swap_in(
            save_directory,
            dict(safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size),
            dict(num_inference_steps=num_inference_steps, extra_text=model_card_text, repo_id=repo_id),
            sample_images,
        )
        if push_to_hub:  # only what this save wrote: never a training run's checkpoints, logs or the user's files
            return _upload_folder(save_directory, repo_id, allow_patterns=[glob.escape(f) for f in written], **kwargs)
        return None

    def _write_and_swap_in(
        self, save_directory: str, diffusers_options: dict, card_options: dict, sample_images
    ) -> List[str]:
        """Write the whole save into a staging folder inside `save_directory`, then swap it in (`swap_in`).

        Returns the files the save wrote, relative to the folder, with `/` separators. Raises `PipelineSaveError`
        (an `OSError`) naming the folder, the step and the cause when writing fails; the staging folder is removed.
        """
        step = "preparing the folder"
        staging = None
        try:
            os.makedirs(save_directory, exist_ok=True)
            for name in os.listdir(save_directory):  # staging folders of saves that were killed
                if name.startswith(SAVE_STAGING_PREFIX):
                    shutil.rmtree(os.path.join(save_directory, name), ignore_errors=True)
            staging = tempfile.mkdtemp(prefix=SAVE_STAGING_PREFIX, dir=save_directory)
            step = "writing the save"
            super().save_pretrained(staging, **diffusers_options)
            self.save_code(staging)
            sample_files = _write_sample_images(sample_images, staging)
            card = self.model_card(sample_files=sample_files, **card_options)
            with open(os.path.join(staging, MODEL_CARD), "w", encoding="utf-8") as f:
                f.write(card)
            written = _files_under(staging)
            step = "swapping the save in"
            swap_in(staging, save_directory)
        except _write_errors() as err:
            raise PipelineSaveError(save_directory, step, err) from err
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return written

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
        index["_class_name"] = [ship_module(type(self), save_directory), type(self).__name__]
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
                    ship_module(type(component), os.path.join(save_directory, name)),
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


def _is_diffusers_class(klass: type) -> bool:
    return klass.__module__.split(".")[0] == "diffusers"


def detected_by_diffusers(path: str) -> List[str]:
    """The sibling modules diffusers' remote-code loader will fetch for `path` (it reads one level, by regex)."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    found = []
    for pattern in _DETECTABLE_RELATIVE_IMPORT:
        found += re.findall(pattern, content, flags=re.MULTILINE)
    return found


def ship_module(klass: type, target_dir: str) -> str:
    """Copy the source of `klass` and its sibling dependencies into `target_dir`; return the module stem to record.

    diffusers' remote-code loader copies only the siblings it finds by regex in the named file, one level deep (not the
    siblings of those siblings, and not `from . import x`). So the named file must itself import, as
    `from .name import ...`, every sibling it needs directly or indirectly; a file that does not is refused here, at
    save time, rather than failing to load for a user of the folder.
    """
    source = inspect.getsourcefile(klass)
    if source is None:
        raise ValueError(f"Cannot ship {klass.__name__}: its source file is unknown (defined interactively?).")
    files = relative_import_closure(os.path.abspath(source))
    needed = {os.path.splitext(os.path.basename(p))[0] for p in files[1:]}
    missing = sorted(needed - set(detected_by_diffusers(source)))
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


def _write_errors() -> tuple:
    """What a failed write raises: `OSError`, and safetensors' `SafetensorError` (its writer's I/O errors, e.g. a full
    disk, arrive as that type, not as `OSError`), when safetensors is loaded."""
    safetensors = sys.modules.get("safetensors")
    safetensor_error = getattr(safetensors, "SafetensorError", None)
    return (OSError,) if safetensor_error is None else (OSError, safetensor_error)


def _files_under(folder: str) -> List[str]:
    """Every file below `folder`, relative to it, with `/` separators (the paths they get in a Hub repository)."""
    return sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    )


def _upload_folder(
    folder: str, repo_id: str, token=None, private=None, commit_message=None, create_pr=False, allow_patterns=None
):
    """Create the repository if needed and upload `folder` to it as one commit (only `allow_patterns`, when given)."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload pipeline",
        create_pr=create_pr,
        allow_patterns=allow_patterns,
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
