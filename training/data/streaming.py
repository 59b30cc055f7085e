"""`datasets` streaming (`--streaming`): data read as it goes, each process its own shards, resumable exactly.

The stream is `datasets.load_dataset(..., streaming=True)` (a Hub name when online, a local folder of parquet,
webdataset or image files, a `save_to_disk` folder), its image column read undecoded, cut to `--max_train_samples`,
shuffled through a buffer (`--shuffle_buffer_size`, reseeded every pass with `set_epoch`) and split over the processes
with `datasets.distributed.split_dataset_by_node` (whole shards per process when their count divides evenly, else
every n-th record). A pass over the stream is a "stream epoch"; when this process's share ends, the next pass starts
at once, so every process yields batches for as long as training asks and the processes stay in step.

Items are decoded by `decode.decode_array` in a thread pool (PIL releases the GIL while it decodes and resizes), one
batch ahead of training. The crop and flip of the p-th record of stream epoch e are a pure function of
(seed, e, p), like the map-style paths' (seed, epoch, index).

Resume: a checkpoint keeps each process's (stream epoch, records consumed). Resuming replays the stream of that epoch
up to that record without decoding anything (same seed, same order, shuffle buffer included), which is exact. It
costs one read of the raw records already consumed in the current pass (`datasets`' own `state_dict` would skip the
read, but it does not restore the shuffle buffer's content, so it would not be exact); the log says how many. A resume
with another `--shuffle_buffer_size` or process count reads other records from there on, and the log warns so.

What `datasets` does, seen from here: `--max_train_samples` is a `take`, which fixes the shard order (only the buffer
shuffles) and, over several processes, takes each process's share from its own shards. At the end of every pass of a
stream of several parquet shards, `datasets` sleeps 5 s (`datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`, its
workaround for apache/arrow#45214): negligible for real data, visible on a tiny one.
Webdataset shards name their columns by extension: pass e.g. `--image_column png --label_column cls`.
"""

import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

import torch

from training.data.batches import naming_broken_files
from training.data.build import default_num_workers
from training.data.decode import BrokenImageError, decode_array
from training.data.image_sets import ImageSet
from training.data.sources import is_saved_dataset, pick_columns

logger = logging.getLogger("train_unconditional")

# Passes larger than this count as "no length" for the loop (which counts micro-batches per epoch).
ENDLESS = 2**62


def load_stream(dataset_name, train_data_dir, dataset_config_name=None, cache_dir=None, split="train"):
    """The `datasets.IterableDataset` of the flags: a folder of image files, a `save_to_disk` folder, or a name or
    folder for `load_dataset(..., streaming=True)`."""
    import datasets

    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"--train_data_dir={train_data_dir!r} is not a directory.")
        return datasets.load_dataset("imagefolder", data_dir=train_data_dir, split=split, streaming=True)
    if is_saved_dataset(dataset_name):
        ds = datasets.load_from_disk(dataset_name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split={split!r} is not in dataset {dataset_name!r}; splits: {tuple(ds.keys())}.")
            ds = ds[split]
        return ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 1000)))
    return datasets.load_dataset(dataset_name, dataset_config_name, split=split, streaming=True, cache_dir=cache_dir)


class StreamImages(ImageSet):
    """This process's share of a stream: `records(stream_epoch)` yields its raw records; `item(...)` makes one.

    Attributes:
        path (`"streaming"`), reason, num_workers (0: decoding runs in `num_threads` threads, not in workers).
    """

    path = "streaming"

    def __init__(
        self,
        stream,
        title,
        image_column,
        label_column,
        channels,
        center_crop,
        resolution,
        random_flip,
        seed,
        skip_broken=False,
        num_threads=1,
    ):
        super().__init__(None, resolution, random_flip, seed)
        self.stream, self.title, self.image_column, self.label_column = stream, title, image_column, label_column
        self.has_labels = label_column is not None
        self.labels = "stream" if self.has_labels else None  # labels come with each record
        self.channels, self.center_crop, self.skip_broken, self.num_threads = (
            channels,
            center_crop,
            skip_broken,
            num_threads,
        )
        self.num_workers = 0
        self.shuffle_buffer_size, self.num_processes = None, 1  # set by `open_stream`; kept in checkpoints

    def __len__(self) -> int:
        raise TypeError("a stream has no length")

    def records(self, stream_epoch: int):
        """The raw records of one pass, in this process's order for `stream_epoch` (the shuffle is reseeded)."""
        self.stream.set_epoch(stream_epoch)
        return iter(self.stream)

    def make_item(self, record, stream_epoch: int, position: int) -> Optional[Dict]:
        """Decode, crop, flip and convert one record; None for a broken file with `skip_broken`."""
        raw = record[self.image_column]
        path = raw.get("path") if isinstance(raw, dict) else None
        name = f"{self.title} (stream epoch {stream_epoch}, record {position})" + (f" ({path})" if path else "")
        try:
            x = torch.from_numpy(decode_array(raw, name, self.resolution, self.channels, self.center_crop))
        except BrokenImageError as err:
            if not self.skip_broken:
                raise
            logger.warning("skipped an unreadable image (--skip_broken_images): %s", err)
            return None
        item = {"images": self.augment(x, position, stream_epoch)}
        if self.has_labels:
            item["labels"] = torch.as_tensor(record[self.label_column], dtype=torch.long)
        return item


def open_stream(settings, process_index: int, num_processes: int) -> StreamImages:
    """The stream of `settings` (see `load_stream`), this process's share of it, ready for `StreamBatches`."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    stream = load_stream(
        settings.dataset_name, settings.train_data_dir, settings.dataset_config_name, settings.cache_dir
    )
    title = settings.train_data_dir or settings.dataset_name
    columns = stream.column_names or list((stream.features or {}).keys())
    image_col, label_col = pick_columns(title, columns, settings.image_column, settings.label_column)
    if isinstance((stream.features or {}).get(image_col), datasets.Image):
        stream = stream.cast_column(image_col, datasets.Image(decode=False))
    if settings.max_train_samples is not None:
        stream = stream.take(settings.max_train_samples)
    stream = stream.shuffle(seed=settings.seed, buffer_size=settings.shuffle_buffer_size)
    stream = split_dataset_by_node(stream, rank=process_index, world_size=num_processes)
    threads = settings.dataloader_num_workers
    if threads is None:
        threads = default_num_workers("workers", int(os.environ.get("LOCAL_WORLD_SIZE", num_processes)))
    threads = max(1, threads)
    images = StreamImages(
        stream,
        title,
        image_col,
        label_col,
        settings.num_channels,
        settings.center_crop,
        settings.resolution,
        settings.random_flip,
        settings.seed,
        settings.skip_broken_images,
        threads,
    )
    images.shuffle_buffer_size, images.num_processes = settings.shuffle_buffer_size, num_processes
    shards = getattr(stream, "num_shards", None) or getattr(stream, "n_shards", None)
    images.reason = (
        f"--streaming: {title!r}, {shards} shard(s) split over {num_processes} process(es), shuffle buffer "
        f"{settings.shuffle_buffer_size}, decoded in {threads} thread(s)"
    )
    return images


class StreamBatches:
    """Batches of `batch_size` items from a `StreamImages`, on `device`, forever (pass after pass).

    `state_dict()` is this process's position (stream epoch, records consumed), saved in every checkpoint;
    `load_state_dict` makes the next `epoch()` continue from it.
    """

    def __init__(self, dataset: StreamImages, batch_size: int, device):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.stream_epoch, self.position = 0, 0

    def __len__(self) -> int:
        return ENDLESS

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> Dict:
        order = {"shuffle_buffer_size": self.dataset.shuffle_buffer_size, "num_processes": self.dataset.num_processes}
        return {"stream_epoch": self.stream_epoch, "position": self.position, **order}

    def load_state_dict(self, state: Dict) -> None:
        self.stream_epoch, self.position = int(state["stream_epoch"]), int(state["position"])
        for name in ("shuffle_buffer_size", "num_processes"):
            saved, now = state.get(name), getattr(self.dataset, name)
            if saved is not None and saved != now:
                logger.warning(
                    "streaming: %s was %s in the checkpoint and is %s now: the stream resumes at the same position "
                    "but reads other records from there on (the resume is not exact).",
                    name,
                    saved,
                    now,
                )

    def _raw_batches(self):
        """(stream epoch, position after the batch, [(position, record), ...]) from the saved position on."""
        epoch, start = self.stream_epoch, self.position
        if start:
            logger.info("streaming: replaying %d record(s) of stream epoch %d to resume exactly", start, epoch)
        while True:
            records = enumerate(self.dataset.records(epoch))
            records = itertools.islice(records, start, None)
            full_batches = 0
            while True:
                chunk = list(itertools.islice(records, self.batch_size))
                if len(chunk) < self.batch_size:  # the pass ended: the rest of it is dropped (drop_last)
                    break
                full_batches += 1
                yield epoch, chunk[-1][0] + 1, chunk
            if full_batches == 0 and start == 0:
                raise ValueError(
                    f"the stream {self.dataset.title!r} has fewer than --train_batch_size={self.batch_size} records "
                    "for this process in a pass."
                )
            epoch, start = epoch + 1, 0

    def epoch(self, epoch: int = 0, skip: int = 0):
        """Batches from the current position on (the arguments are the loop's; a stream keeps its own position).
        An unreadable image stops it with a `TrainingError` naming the record."""
        return naming_broken_files(self._batches())

    def _batches(self):
        with ThreadPoolExecutor(max(1, self.dataset.num_threads)) as pool:
            pending = None
            for stream_epoch, after, chunk in self._raw_batches():
                future = [pool.submit(self.dataset.make_item, record, stream_epoch, p) for p, record in chunk]
                if pending is not None:
                    yield self._emit(*pending)
                pending = (future, stream_epoch, after)
            if pending is not None:
                yield self._emit(*pending)

    def _emit(self, futures, stream_epoch: int, after: int) -> Dict:
        items = [item for item in (f.result() for f in futures) if item is not None]
        if not items:
            raise BrokenImageError("a whole batch of the stream was unreadable.")
        self.stream_epoch, self.position = stream_epoch, after
        batch = {"images": torch.stack([it["images"] for it in items]).to(self.device)}
        if self.dataset.has_labels:
            batch["labels"] = torch.stack([it["labels"] for it in items]).to(self.device)
        return batch
