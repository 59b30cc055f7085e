"""Sources: what a dataset holds, listed without decoding anything.

A source is a sequence of undecoded items (`item(i)`: a path, or `datasets`' `{"bytes", "path"}` record, with its
name for error messages), optional labels, and a fingerprint that changes when the data does (the key of the
uint8 cache). `--max_train_samples` cuts a source (`head(n)`) before anything is decoded. Memory does not grow with
the data: a folder is a list of paths; a `datasets` dataset stays a memory-mapped Arrow table.
"""

import hashlib
import os
from typing import Optional, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGE_COLUMNS = ("image", "img", "images", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "class", "digit")


def list_image_files(folder: str) -> list:
    """Every file with an image extension under `folder` (recursively), sorted."""
    if not os.path.isdir(folder):
        raise ValueError(f"--train_data_dir={folder!r} is not a directory.")
    files = sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(folder)
        for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise ValueError(f"--train_data_dir={folder!r} contains no image files (looked for {IMAGE_EXTENSIONS}).")
    return files


class FolderSource:
    """The image files of a folder (searched recursively, sorted); no labels."""

    kind = "image_folder"

    def __init__(self, folder: str, files: Optional[Sequence[str]] = None):
        self.folder = folder
        self.files = list_image_files(folder) if files is None else list(files)
        self.labels = None

    def __len__(self) -> int:
        return len(self.files)

    def item(self, index: int):
        """(undecoded item, its name for error messages)."""
        return self.files[index], self.files[index]

    def head(self, n: int) -> "FolderSource":
        return FolderSource(self.folder, self.files[:n])

    def fingerprint(self) -> str:
        """A hash of every file's path (relative to the folder), size and modification time."""
        h = hashlib.sha256(os.path.abspath(self.folder).encode())
        for path in self.files:
            st = os.stat(path)
            h.update(f"\0{os.path.relpath(path, self.folder)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def describe(self) -> str:
        return f"folder {self.folder!r}"


def _pick_column(columns: Sequence[str], wanted: Optional[str], candidates: Sequence[str], what: str):
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"--{what}={wanted!r} is not a column of the dataset; columns: {tuple(columns)}.")
        return wanted
    return next((c for c in candidates if c in columns), None)


def pick_columns(name: str, column_names: Sequence[str], image_column=None, label_column=None):
    """The image column (required) and the label column (or None) of a dataset, by name or by the usual names."""
    image_col = _pick_column(column_names, image_column, IMAGE_COLUMNS, "image_column")
    if image_col is None:
        raise ValueError(
            f"dataset {name!r} has no image column among {IMAGE_COLUMNS}; columns: {tuple(column_names)}; "
            "pass --image_column."
        )
    return image_col, _pick_column(column_names, label_column, LABEL_COLUMNS, "label_column")


class DatasetsSource:
    """A split of a `datasets` dataset: its Arrow table stays memory-mapped; images are read one at a time.

    The image column is read undecoded (`datasets.Image(decode=False)`): we decode it, so a broken file is named.
    """

    kind = "datasets"

    def __init__(self, dataset, title: str, image_column: str, label_column: Optional[str]):
        import datasets

        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.title = dataset, title
        self.image_column, self.label_column = image_column, label_column
        self.labels = None
        if label_column is not None:
            column = dataset.select_columns([label_column]).with_format("numpy")[label_column]
            self.labels = np.asarray(column, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, index: int):
        """(undecoded item, its name for error messages)."""
        raw = self.dataset[int(index)][self.image_column]
        path = raw.get("path") if isinstance(raw, dict) else None
        return raw, f"{self.title}[{index}]" + (f" ({path})" if path else "")

    def head(self, n: int) -> "DatasetsSource":
        head = self.dataset.select(range(min(n, len(self))))
        return DatasetsSource(head, self.title, self.image_column, self.label_column)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.title}\0{self.dataset._fingerprint}\0{self.image_column}".encode()).hexdigest()

    def describe(self) -> str:
        return f"dataset {self.title!r}"


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")
    )


def open_datasets_source(
    name_or_path: str,
    config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    split: str = "train",
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
) -> DatasetsSource:
    """A `datasets` split: `load_from_disk` for a local `save_to_disk` folder, `load_dataset` otherwise."""
    import datasets

    if is_saved_dataset(name_or_path):
        ds = datasets.load_from_disk(name_or_path)
    else:
        ds = datasets.load_dataset(name_or_path, config_name, cache_dir=cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"split={split!r} is not in dataset {name_or_path!r}; splits: {tuple(ds.keys())}.")
        ds = ds[split]
    image_col, label_col = pick_columns(name_or_path, ds.column_names, image_column, label_column)
    return DatasetsSource(ds, name_or_path, image_col, label_col)
