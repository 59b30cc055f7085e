"""Loading a saved pipeline folder (or Hub repo) with this project's classes, without running code shipped inside it.

Each component's class is resolved by the module its `model_index.json` entry names, never by its bare name: diffusers'
for `"diffusers"`, this project's installed module for a shipped file's name (`schedulers.<file>`,
`custom_pipelines.<file>`), and an already imported module for a full module path. The components themselves are
loaded by diffusers (`<Class>.from_pretrained(<folder>/<component>, ...)`), which receives the model options.

This file is shipped inside saved folders: it imports only diffusers and huggingface_hub.
"""

import importlib
import json
import os
import sys
from typing import Dict, Union

from diffusers import ModelMixin

from .tutorial_pipeline_folder import MODEL_INDEX

# Where this project's modules live when it is installed, in the order a shipped file's name is looked up.
_DIFFUSERS = "diffusers"
_SCHEDULERS = "schedulers"
_PIPELINES = "custom_pipelines"
_OUR_PACKAGES = (_SCHEDULERS, _PIPELINES)
# Options diffusers' `ModelMixin.from_pretrained` takes, passed to every model loaded from the folder (the UNet).
MODEL_OPTIONS = (
    "torch_dtype",
    "dtype",
    "variant",
    "use_safetensors",
    "device_map",
    "max_memory",
    "offload_folder",
    "offload_state_dict",
    "low_cpu_mem_usage",
    "disable_mmap",
)
# Options of the download of a Hub repo (`huggingface_hub.snapshot_download`); nothing to do for a local folder.
DOWNLOAD_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "force_download")


class TutorialLoadingMixin:
    """`from_pretrained` of the tutorial pipelines (a `DiffusionPipeline` mixin: it comes before `DiffusionPipeline`
    among the bases)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load a pipeline folder (or Hub repo) into this class without executing code shipped inside it.

        Folders written by `save_pretrained` name our pipeline and scheduler files in `model_index.json`;
        diffusers would insist on `trust_remote_code=True` for them. Here each component's class is resolved by its
        module (`find_class`: diffusers' own, or this project's installed module of the shipped file's name), so
        nothing from the folder runs, and diffusers loads it. Folders of diffusers pipelines (e.g. a `DDPMPipeline`
        with `DDPMScheduler`) load too. With `trust_remote_code=True` or `custom_pipeline`, diffusers' own loader is
        used unchanged.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a local folder or a Hub repo id.
            kwargs: components to use instead of the saved ones (`unet=...`, `scheduler=...`); the options of
                diffusers' `ModelMixin.from_pretrained` for the models loaded from the folder (`torch_dtype`,
                `variant`, `use_safetensors`, `device_map`, `low_cpu_mem_usage`, `max_memory`, `offload_folder`,
                `offload_state_dict`, `disable_mmap`); the download options `cache_dir`, `revision`, `token`,
                `local_files_only`, `force_download`.

        Returns:
            An instance of this class.

        Raises:
            `ValueError`: for an argument this loader cannot honour (it is named), and for a folder that is damaged or
                names a class that cannot be resolved by its module.
        """
        if kwargs.get("trust_remote_code") or kwargs.get("custom_pipeline") is not None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("custom_pipeline", None)
        download_options = {k: kwargs.pop(k) for k in DOWNLOAD_OPTIONS if k in kwargs}
        model_options = {k: kwargs.pop(k) for k in MODEL_OPTIONS if k in kwargs}
        expected, _ = cls._get_signature_keys(cls)
        passed = {k: kwargs.pop(k) for k in expected if k in kwargs}
        if kwargs:
            raise ValueError(
                f"{cls.__name__}.from_pretrained cannot honour the argument(s) {sorted(kwargs)}: it takes the "
                f"components {sorted(expected)}, the model options {list(MODEL_OPTIONS)} and the download options "
                f"{list(DOWNLOAD_OPTIONS)}. For everything else diffusers' loader offers, pass trust_remote_code=True "
                "(it then runs the code shipped in the folder)."
            )
        folder = _resolve_folder(pretrained_model_name_or_path, download_options)
        index_path = os.path.join(folder, MODEL_INDEX)
        with open(index_path, encoding="utf-8") as f:
            try:
                index = json.load(f)
            except ValueError as err:
                raise ValueError(f"{index_path} is not valid JSON ({err}); the pipeline folder is damaged.") from err
        components, models_loaded = dict(passed), []
        for name in expected:
            if name in components:
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
            if issubclass(component_cls, ModelMixin):
                components[name] = component_cls.from_pretrained(path, **model_options)
                models_loaded.append(name)
            else:
                components[name] = component_cls.from_pretrained(path)
        if model_options and not models_loaded:
            raise ValueError(
                f"{cls.__name__}.from_pretrained cannot honour {sorted(model_options)}: they apply to the models it "
                f"loads from the folder, and it loads none (passed: {sorted(passed)})."
            )
        pipe = cls(**components)
        pipe.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        return pipe


def find_class(class_name: str, component: str, module: str) -> type:
    """The class a `model_index.json` entry `[module, class_name]` names, resolved by its module, never by name alone.

    - `"diffusers"`: diffusers' own class.
    - a shipped file's name (`"scheduling_tutorial_ddim"`, how our folders record the code they carry): the module of
      that name in this project's installed packages (`schedulers.<name>`, else `custom_pipelines.<name>`), imported
      if needed. Never the copy inside the folder.
    - a full module path (how diffusers records a class it does not know): one of this project's modules (imported if
      needed) or a module that is already imported (diffusers' rule: the caller imports it).

    Raises:
        `ValueError`: naming the component, the module and the class, when the module or the class is not found.
    """
    # Folders saved before the scheduler files named all their siblings record a loader `<name>_entry` file.
    stem = module[: -len("_entry")] if module.endswith("_entry") else module
    top = stem.split(".")[0]
    if top == "diffusers":
        candidates = [stem]
    elif "." not in stem:  # a shipped file's name
        candidates = [f"{package}.{stem}" for package in _OUR_PACKAGES]
    elif top == "diffusers_modules":  # a remote-code module diffusers made of a shipped file: ours under its name
        candidates = [f"{package}.{stem.rsplit('.', 1)[-1]}" for package in _OUR_PACKAGES]
    else:
        candidates = [stem]
    for name in candidates:
        found = _import_module(name)
        if found is None:
            continue
        klass = getattr(found, class_name, None)
        if isinstance(klass, type) and hasattr(klass, "from_pretrained"):
            return klass
    raise ValueError(
        f"{component}: class {class_name!r} of module {module!r} named in {MODEL_INDEX} is not found in "
        f"{' or '.join(candidates)}. Install or import the package that defines it (this project's classes live in "
        f"{' and '.join(_OUR_PACKAGES)}), or load with `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`."
    )


def _import_module(name: str):
    """The module `name`: imported if it is diffusers' or ours, else only if it is imported already; None if absent."""
    if name in sys.modules:
        return sys.modules[name]
    top, _, rest = name.partition(".")
    try:
        # One literal package per call, so that the import layering stays checkable (tests/test_layering.py).
        if top == _DIFFUSERS:
            return importlib.import_module(f"{_DIFFUSERS}.{rest}") if rest else importlib.import_module(_DIFFUSERS)
        if top == _SCHEDULERS:
            return importlib.import_module(f"{_SCHEDULERS}.{rest}") if rest else importlib.import_module(_SCHEDULERS)
        if top == _PIPELINES:
            return importlib.import_module(f"{_PIPELINES}.{rest}") if rest else importlib.import_module(_PIPELINES)
        return None
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if name == missing or name.startswith(missing + "."):  # the module itself (or its package) is absent
            return None
        raise


def _resolve_folder(pretrained_model_name_or_path, download_options: Dict) -> str:
    """A local folder as is; a Hub repo id through `huggingface_hub.snapshot_download` (cache, revision, token)."""
    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(path):
        return path
    import huggingface_hub

    return huggingface_hub.snapshot_download(path, **download_options)
