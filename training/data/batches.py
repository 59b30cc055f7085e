"""The order of an epoch, and the batches drawn on the device: both pure functions of (seed, epoch)."""

import re

import torch

from training.data.decode import BrokenImageError, to_model_range
from training.errors import TrainingError


def naming_broken_files(batches):
    """The batches; an unreadable file met while making one (in a DataLoader worker, in a decoding thread) becomes a
    `TrainingError` that names it (the worker's traceback, which torch puts in the message, is left out)."""
    try:
        yield from batches
    except BrokenImageError as err:
        found = re.search(r"(cannot read image|image ).*", str(err).strip().splitlines()[-1])
        message = found.group(0) if found else str(err)
        raise TrainingError(f"{message}; pass --skip_broken_images to skip unreadable files.") from err


class EpochSampler(torch.utils.data.Sampler):
    """A shuffling sampler whose order is a pure function of (seed, epoch): identical on every process and after a
    resume, which is what makes `--resume_from_checkpoint` exact."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class DeviceBatches:
    """The training batches drawn on the device from images kept there (`--data_on_device`): no DataLoader.

    The images stay as they are stored (uint8 for image files: 4x less memory than float32) and each batch is
    converted to [-1, 1] on the device, with the same arithmetic as the DataLoader paths. The batches are those of a
    `DataLoader(dataset, batch_size, sampler=EpochSampler(N, seed), drop_last=True)` that accelerate shards over
    `num_processes`: accelerate gives process p the batches p, p + n, p + 2n, ... of the epoch's order, that is rows
    [p B, (p + 1) B) of every global batch of n B images, which is what `epoch` yields. Flips are the dataset's own
    (a function of (seed, epoch, index)). An epoch's order and flips are copied to the device once; within the epoch
    nothing is read back from it.

    Args:
        dataset (`ImageSet`): one whose `device_images()` is a (N, C, R, R) tensor (no per-epoch crops).
        batch_size (`int`): images per process and batch.
        num_processes (`int`), process_index (`int`): this process's shard.
        device (`torch.device`): where the images are kept and the batches made.
        seed (`int`): the seed of the `EpochSampler` order.
    """

    def __init__(self, dataset, batch_size: int, num_processes: int, process_index: int, device, seed: int):
        images = dataset.device_images()
        if images is None:
            raise ValueError("DeviceBatches needs the images as one tensor (all of the training resolution).")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.images = images.to(device)
        self.labels = None if dataset.labels is None else dataset.labels.to(device)

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.num_processes)

    def tensors(self):
        """The tensors kept on the device, by name."""
        found = {"data.images": self.images}
        if self.labels is not None:
            found["data.labels"] = self.labels
        return found

    def state_dict(self) -> dict:
        return {}

    def epoch(self, epoch: int, skip: int = 0):
        """The batches of `epoch` for this process, from its `skip`-th on; each a dict like the DataLoader's."""
        device = self.images.device
        sampler = EpochSampler(len(self.dataset), seed=self.seed)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long).to(device)
        flips = self.dataset.flips(epoch).to(device) if self.dataset.random_flip else None
        b, n, p = self.batch_size, self.num_processes, self.process_index
        for k in range(skip, len(self)):
            index = order[(k * n + p) * b : (k * n + p + 1) * b]
            x = self.images[index]
            if flips is not None:
                x = torch.where(flips[index].view(-1, 1, 1, 1), x.flip(-1), x)
            x = x if self.dataset.prescaled else to_model_range(x)
            yield {"images": x} if self.labels is None else {"images": x, "labels": self.labels[index]}
