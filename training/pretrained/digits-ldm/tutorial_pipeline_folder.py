"""The layout of a saved pipeline folder, and replacing an earlier save in it atomically.

A folder written by `save_pretrained` holds `model_index.json`, `README.md`, `samples/`, one folder per component and
the pipeline's code files at the root. Saving into a folder that holds an earlier save: the new save is written to a
staging folder inside it, then swapped in entry by entry, `model_index.json` last (`swap_in`), so that a failed or
killed save leaves a folder that loads (`TutorialSavingMixin.save_pretrained` states the exact guarantee).

This file is shipped inside saved folders: it imports only the standard library.
"""

import ast
import ctypes
import functools
import json
import os
import shutil
import tempfile
from typing import List

MODEL_INDEX = "model_index.json"
MODEL_CARD = "README.md"
SAMPLES_DIR = "samples"
SAVE_STAGING_PREFIX = ".tmp-pipeline-save-"  # `save_pretrained` writes here first, inside the target folder


def relative_imports(path: str) -> List[str]:
    """Sibling module names a file imports relatively (`from . import a`, `from .b import c`), as Python sees them."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names += [a.name for a in node.names] if node.module is None else [node.module.split(".")[0]]
    folder = os.path.dirname(path)
    return [n for n in dict.fromkeys(names) if os.path.isfile(os.path.join(folder, f"{n}.py"))]


def relative_import_closure(path: str) -> List[str]:
    """The file itself and every sibling it needs, transitively, as absolute paths."""
    folder, todo, seen = os.path.dirname(path), [path], []
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += [os.path.join(folder, f"{n}.py") for n in relative_imports(current)]
    return seen


def saved_entries(folder: str) -> List[str]:
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
                entries += [os.path.basename(p) for p in relative_import_closure(code)]
            except (SyntaxError, ValueError, OSError):  # a damaged code file: only that file is known to be ours
                entries.append(os.path.basename(code))
    return [e for e in dict.fromkeys(entries) if _is_plain_name(e) and os.path.lexists(os.path.join(folder, e))]


def _is_plain_name(name: str) -> bool:
    """A name of an entry directly inside a folder (no separators, not `.` or `..`)."""
    return name not in ("", ".", "..") and "/" not in name and os.sep not in name


def swap_in(staging: str, folder: str) -> None:
    """Replace the earlier save in `folder` by the complete save in `staging` (a folder inside it).

    1. Each entry of the new save except `model_index.json` replaces its namesake in one rename (`_replace`). The old
       `model_index.json` stays in place meanwhile, so every new component folder first receives the old one's code
       files that it lacks: whatever mix of old and new entries a kill leaves, every module it names exists.
    2. `model_index.json` is renamed in: the commit. The folder is now the new save.
    3. The old save's leftovers are removed: entries the new save does not have, and the code files of step 1.
    """
    new_entries = sorted(e for e in os.listdir(staging) if e != MODEL_INDEX)
    stale = [e for e in saved_entries(folder) if e not in new_entries and e != MODEL_INDEX]
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
        try:
            os.rename(new, target)
        except OSError:
            os.rename(aside, target)  # the old entry back in place rather than removed with the staging folder
            raise


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
