"""Loading a saved pipeline folder (or Hub repo) with this project's classes, without running code shipped inside it.

This file is shipped inside saved folders: it imports only diffusers and huggingface_hub.
"""

import importlib
import json
import os
from typing import Dict, List, Union

from diffusers import ModelMixin, SchedulerMixin
from diffusers.utils import logging

from .tutorial_pipeline_folder import MODEL_INDEX

logger = logging.get_logger(__name__)

_SCHEDULER_PACKAGE = "schedulers"  # where this project's scheduler modules live when it is installed


class TutorialLoadingMixin:
    """`from_pretrained` of the tutorial pipelines (a `DiffusionPipeline` mixin: it comes before `DiffusionPipeline`
    among the bases)."""

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
            component_cls = find_class(entry[1], name, entry[0])
            load_kwargs = model_kwargs if issubclass(component_cls, ModelMixin) else {}
            components[name] = component_cls.from_pretrained(path, **load_kwargs)
        if kwargs:
            logger.warning(f"{cls.__name__}.from_pretrained ignores the arguments {sorted(kwargs)}.")
        pipe = cls(**components)
        pipe.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        return pipe


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


def find_class(class_name: str, component: str, module_stem: str = "") -> type:
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
