"""`make shipped`: regenerate the code inside every shipped pipeline folder from the library, or check it.

    python training/export_shipped.py              # rewrite the code files of training/pretrained/*/
    python training/export_shipped.py --check      # write nothing; exit 1 naming every file that differs
    python training/export_shipped.py FOLDER ...   # only these pipeline folders

A shipped folder (a folder with a `model_index.json` under `training/pretrained/`) holds what training wrote (the
weights and config in `unet/`, `scheduler/scheduler_config.json`, `README.md`, `metrics.json`, `samples/`) and what
`save_pretrained` generated from the library: `model_index.json` and every `*.py` at the root or in a component folder
(the pipeline's code and the scheduler's code). This script regenerates the second part with
`TutorialPipelineBase.save_code`, the function `save_pretrained` calls, so a shipped folder's code is exactly what a
fresh save would write. The pipeline class is the one `model_index.json` names, each component's class the one its own
config names; the UNet is built on the meta device, so no weights are read. Code files the library no longer ships
are removed. Never edit these files by hand: change the library, then run this. A folder without a
`model_index.json` is a model alone (`digits-vae/`, an `AutoencoderKL` written by `training/train_autoencoder.py`):
it holds no code, so there is nothing here to generate; it is checked by tests/training/test_train_autoencoder.py.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import diffusers
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import custom_pipelines
import schedulers
from custom_pipelines.tutorial_pipeline_folder import MODEL_INDEX
from custom_pipelines.tutorial_pipeline_utils import TutorialPipelineBase

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "training" / "pretrained"
COMPONENT_CONFIGS = ("config.json", "scheduler_config.json")  # a model's, a scheduler's (diffusers' file names)


class ExportError(Exception):
    """A shipped folder whose code cannot be generated (its class names are missing or unknown)."""


def pipeline_folders(root: Path = PRETRAINED) -> List[Path]:
    """The folders under `root` that hold a pipeline (a `model_index.json`)."""
    return sorted(p.parent for p in Path(root).glob(f"*/{MODEL_INDEX}"))


def code_files(folder: Path) -> List[str]:
    """The generated files of a pipeline folder, relative to it: `model_index.json`, `*.py` at the root and one below."""
    folder = Path(folder)
    found = [MODEL_INDEX] if (folder / MODEL_INDEX).exists() else []
    found += [p.relative_to(folder).as_posix() for p in (*folder.glob("*.py"), *folder.glob("*/*.py"))]
    return sorted(found)


def _library_class(name, where: str) -> type:
    for module in (diffusers, schedulers, custom_pipelines):
        klass = getattr(module, name, None) if isinstance(name, str) else None
        if isinstance(klass, type):
            return klass
    raise ExportError(f"{where} names the class {name!r}, which neither diffusers nor this project defines.")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {path} ({err}); restore it from git.") from err


def build_pipeline(folder: Path) -> TutorialPipelineBase:
    """The folder's pipeline built from its components' configs, without weights (models live on the meta device)."""
    folder = Path(folder)
    class_name = _read_json(folder / MODEL_INDEX).get("_class_name")
    if isinstance(class_name, list) and len(class_name) == 2:
        class_name = class_name[1]
    if not isinstance(class_name, str):
        raise ExportError(f"{folder / MODEL_INDEX} names no pipeline class (`_class_name`); restore it from git.")
    pipeline_cls = _library_class(class_name, str(folder / MODEL_INDEX))
    if not issubclass(pipeline_cls, TutorialPipelineBase):
        raise ExportError(f"{folder}: {class_name} is not one of this project's pipelines; nothing to generate.")
    components = {}
    for name in pipeline_cls._get_signature_keys(pipeline_cls)[0]:
        config_path = next((folder / name / c for c in COMPONENT_CONFIGS if (folder / name / c).is_file()), None)
        if config_path is None and name in pipeline_cls._optional_components:
            components[name] = None
            continue
        if config_path is None:
            raise ExportError(f"{folder / name} has none of {COMPONENT_CONFIGS}: which class is {name}?")
        component_cls = _library_class(_read_json(config_path).get("_class_name"), str(config_path))
        config = component_cls.load_config(str(config_path.parent))
        is_model = issubclass(component_cls, diffusers.ModelMixin)
        with torch.device("meta") if is_model else contextlib.nullcontext():
            components[name] = component_cls.from_config(config)
    return pipeline_cls(**components)


def generate(folder: Path, target: Path) -> None:
    """Write into `target` the code files `save_pretrained` would write for the pipeline in `folder`."""
    build_pipeline(folder).save_code(target)


def _display(path: Path) -> str:
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _compare(folder: Path, generated: Path) -> List[Tuple[str, str]]:
    """(relative path, what is wrong) for every code file of `folder` that is not the one in `generated`."""
    ours, theirs = set(code_files(generated)), set(code_files(folder))
    problems = []
    for rel in sorted(ours | theirs):
        if rel not in theirs:
            problems.append((rel, "missing"))
        elif rel not in ours:
            problems.append((rel, "stale: the library no longer ships it"))
        elif (folder / rel).read_bytes() != (generated / rel).read_bytes():
            problems.append((rel, "differs from the library"))
    return problems


def check(folder: Path) -> List[str]:
    """'PATH: what is wrong' for every code file of `folder` that differs from the library's; empty when up to date."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        generate(folder, Path(tmp))
        return [f"{_display(folder / rel)}: {why}" for rel, why in _compare(folder, Path(tmp))]


def export(folder: Path) -> List[str]:
    """Rewrite the code files of `folder` from the library, remove stale ones; 'PATH: written|removed' for each."""
    folder = Path(folder)
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp)
        generate(folder, generated)
        for rel, why in _compare(folder, generated):
            if why.startswith("stale"):
                (folder / rel).unlink()
                done.append(f"{_display(folder / rel)}: removed ({why})")
            else:
                (folder / rel).parent.mkdir(exist_ok=True)
                shutil.copyfile(generated / rel, folder / rel)
                done.append(f"{_display(folder / rel)}: written ({why})")
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders", nargs="*", type=Path, help="pipeline folders (default: every one under training/pretrained/)"
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any code file differs")
    args = parser.parse_args(argv)
    folders = args.folders or pipeline_folders()
    if not folders:
        parser.error(f"no pipeline folder (with a {MODEL_INDEX}) under {_display(PRETRAINED)}")
    for folder in folders:
        if not (folder / MODEL_INDEX).is_file():
            parser.error(f"{folder} is not a pipeline folder: it has no {MODEL_INDEX}")
    try:
        reports = [line for folder in folders for line in (check(folder) if args.check else export(folder))]
    except ExportError as err:
        print(f"export_shipped.py: error: {err}", file=sys.stderr)
        return 2
    if args.check and reports:
        print(
            "\n".join(reports + ["The shipped code is out of date: run `make shipped` (training/export_shipped.py)."])
        )
        return 1
    print("\n".join(reports or [f"{len(folders)} shipped folder(s) match the library."]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
