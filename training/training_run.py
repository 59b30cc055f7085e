"""What one training run holds, built once on `accelerator.device`: data, model, optimizer, LR schedule, EMA, tables.

`prepare_training` is the "prepare" stage of `train_unconditional.py`'s story; `TrainingRun` is what the loop
advances. The throughput switches of `settings` (`--data_on_device`, `--channels_last`, `--adam_fused`,
`--torch_compile`) act here and nowhere else; each leaves the numbers of a run as they are (up to the rounding of a
different kernel), so the loop does not know about them.
"""

import logging
import os
import signal
import uuid
from typing import Dict

import torch
from accelerate import Accelerator
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler

from training.data import DeviceBatches, EpochSampler, build_dataset, default_cache_dir
from training.data.batches import naming_broken_files
from training.data.streaming import StreamBatches, open_stream
from training.ema import EMA
from training.errors import TrainingError
from training.precision import use_float32_attention
from training.settings import Settings, make_scheduler

logger = logging.getLogger("train_unconditional")

# `--data_on_device auto` keeps the images on a GPU when they take at most this fraction of its free memory.
DATA_ON_DEVICE_MAX_FRACTION = 0.25


class TrainState:
    """The loop's position, saved in every checkpoint next to the model, optimizer, LR schedule, EMA and RNGs."""

    def __init__(self):
        self.global_step = 0  # optimizer updates done
        self.micro_step = 0  # micro-batches consumed (= global_step * gradient_accumulation_steps)
        self.images_seen = 0

    def state_dict(self) -> Dict:
        return {"global_step": self.global_step, "micro_step": self.micro_step, "images_seen": self.images_seen}

    def load_state_dict(self, state: Dict) -> None:
        self.global_step = int(state["global_step"])
        self.micro_step = int(state["micro_step"])
        self.images_seen = int(state["images_seen"])


class LoaderBatches:
    """The training batches from a DataLoader prepared by accelerate (the data stays on the host until each batch).

    `epoch(epoch, skip)` sets the epoch of the sampler, of the dataset (flips, crops) and of accelerate's loader,
    which re-applies its own iteration count as the epoch on `iter` (so ours is set on it, not only on the sampler).
    """

    def __init__(self, accelerator: Accelerator, dataloader, sampler: EpochSampler):
        self.accelerator, self.dataloader, self.sampler = accelerator, dataloader, sampler

    def __len__(self) -> int:
        return len(self.dataloader)

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> Dict:
        return {}

    def epoch(self, epoch: int, skip: int = 0):
        loader = self.accelerator.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
        loader.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.dataloader.dataset.set_epoch(epoch)
        return naming_broken_files(iter(loader))


class TrainingRun:
    """Everything one run trains and keeps: built by `prepare_training`, advanced by the loop's `micro_step`/`update`.

    Attributes:
        model, optimizer: as returned by `accelerator.prepare` (the model may be DDP-wrapped).
        batches (`LoaderBatches` or `DeviceBatches`): `len(batches)` per epoch, `batches.epoch(epoch, skip)`.
        lr_scheduler: stepped once per update, by us. ema (`EMA` or None): on the model's device.
        noise_scheduler: our scheduler whose `add_noise` defines q(x_t | x_0). alpha_bar: its ᾱ table, on the device.
        update_loss: the loss of the update being accumulated, on the device. state (`TrainState`).
    """

    def __init__(self, settings, accelerator, model, optimizer, batches, lr_scheduler, ema, noise_scheduler):
        self.settings, self.accelerator = settings, accelerator
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.lr_scheduler, self.ema, self.noise_scheduler = lr_scheduler, ema, noise_scheduler
        self.alpha_bar = noise_scheduler.alpha_bar.to(accelerator.device)
        self.update_loss = torch.zeros((), device=accelerator.device)
        self.state = TrainState()
        self.objective = None  # set by the story before the loop: what the loop optimises (see DiffusionObjective)

    @property
    def unwrapped(self) -> UNet2DModel:
        return self.accelerator.unwrap_model(self.model)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """Every tensor the run holds, by name (the device-placement tests check that all are on the device).

        The optimizer's per-parameter `step` counters are left out: torch keeps them on the CPU by design for
        non-capturable optimizers (they are host-side counters, not data of the computation).
        """
        found = {f"model.{n}": t for n, t in self.unwrapped.state_dict(keep_vars=True).items()}
        found.update({f"grad.{n}": p.grad for n, p in self.unwrapped.named_parameters() if p.grad is not None})
        for index, per_param in self.optimizer.state_dict()["state"].items():
            found.update({f"optimizer.{index}.{k}": v for k, v in per_param.items() if torch.is_tensor(v)})
        found = {k: v for k, v in found.items() if not k.endswith(".step")}
        if self.ema is not None:
            found.update({f"ema.{i}": s for i, s in enumerate(self.ema.shadow_params)})
        found["alpha_bar"] = self.alpha_bar
        found["update_loss"] = self.update_loss
        found.update(self.batches.tensors())
        scheduler_tables = {k: v for k, v in vars(self.noise_scheduler).items() if torch.is_tensor(v) and k[0] == "_"}
        found.update({f"noise_scheduler.{k}": v for k, v in scheduler_tables.items()})  # its device caches
        return found


def run_token(accelerator: Accelerator) -> str:
    """A string that every process of this run agrees on (the main process draws it)."""
    token = [uuid.uuid4().hex]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token, from_process=0)
    return token[0]


def load_training_data(settings: Settings, accelerator: Accelerator):
    """The training set on the path `build_dataset` chooses (logged with its reason). Errors in the data are
    `TrainingError`s naming the file or flag. A missing uint8 cache is built by each machine's main process while
    the others wait for it."""
    logger.info("data: opening %s", settings.train_data_dir or settings.dataset_name or "the built-in digits")
    cache_dir = settings.data_cache_dir or default_cache_dir()
    try:
        if settings.streaming:
            dataset = open_stream(settings, accelerator.process_index, accelerator.num_processes)
        else:
            dataset = build_dataset(
                settings.dataset_name,
                settings.train_data_dir,
                settings.resolution,
                settings.num_channels,
                settings.center_crop,
                settings.random_flip,
                settings.dataset_config_name,
                settings.cache_dir,
                settings.skip_broken_images,
                settings.seed,
                settings.image_column,
                settings.label_column,
                max_train_samples=settings.max_train_samples,
                data_loading=settings.data_loading,
                data_cache_dir=cache_dir,
                num_workers=settings.dataloader_num_workers,
                local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
                eight_bit_ok=not settings.preserve_input_precision,
                builder=accelerator.is_local_main_process,
                failure_marker=os.path.join(cache_dir, f".failed-{run_token(accelerator)}"),
            )
    except (ValueError, OSError) as err:
        raise TrainingError(str(err)) from err
    logger.info("data path: %s (%s); %d DataLoader worker(s)", dataset.path, dataset.reason, dataset.num_workers)
    if dataset.num_skipped:
        logger.warning("skipped %d unreadable image file(s) (--skip_broken_images).", dataset.num_skipped)
    if settings.num_class_embeds and dataset.labels is None:
        raise TrainingError("--num_class_embeds needs labels, and the dataset has no label column.")
    if not settings.streaming and len(dataset) < settings.train_batch_size * accelerator.num_processes:
        raise TrainingError(
            f"the dataset has {len(dataset)} images, fewer than one global batch "
            f"(--train_batch_size={settings.train_batch_size} x {accelerator.num_processes} processes)."
        )
    return dataset


def keeps_data_on_device(settings: Settings, dataset, device: torch.device) -> bool:
    """`--data_on_device`: 'yes' needs the images as one tensor; 'auto' also needs them to fit on the device (their
    stored size: uint8 for image files)."""
    if not settings.data_on_device or settings.streaming:
        return False
    images = dataset.device_images()
    if images is None:
        if settings.requested_data_on_device == "yes":
            raise TrainingError(
                f"--data_on_device='yes' needs every image held at one size, and the {dataset.path} path holds "
                f"images that are not square at --resolution {settings.resolution} or not held at all: pass "
                "--center_crop with --data_loading memory or cache, or --data_on_device no."
            )
        return False
    if settings.requested_data_on_device == "auto" and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if images.nbytes > DATA_ON_DEVICE_MAX_FRACTION * free:
            logger.info("the images take %.1f GB: kept on the host (--data_on_device auto)", images.nbytes / 1e9)
            return False
    return True


def make_batches(settings: Settings, accelerator: Accelerator, dataset):
    """`DeviceBatches` when the images stay on the device (`keeps_data_on_device`), `StreamBatches` for a stream,
    else a prepared DataLoader with the dataset's workers."""
    if settings.streaming:
        return StreamBatches(dataset, settings.train_batch_size, accelerator.device)
    if keeps_data_on_device(settings, dataset, accelerator.device):
        return DeviceBatches(
            dataset,
            settings.train_batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            accelerator.device,
            settings.seed,
        )
    sampler = EpochSampler(len(dataset), seed=settings.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.train_batch_size,
        sampler=sampler,
        num_workers=dataset.num_workers,
        drop_last=True,
        pin_memory=accelerator.device.type == "cuda",
        worker_init_fn=_worker_ignores_ctrl_c,
    )
    return LoaderBatches(accelerator, accelerator.prepare(dataloader), sampler)


def _worker_ignores_ctrl_c(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the whole process group: a DataLoader worker ignores it and keeps serving batches
    while the training process finishes its update and saves a checkpoint (it ends with its parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_optimizer(settings: Settings, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with the flags' settings; torch's fused kernel with `--adam_fused` (one launch per update)."""
    try:
        return torch.optim.AdamW(
            model.parameters(),
            lr=settings.learning_rate,
            betas=(settings.adam_beta1, settings.adam_beta2),
            weight_decay=settings.adam_weight_decay,
            eps=settings.adam_epsilon,
            fused=True if settings.adam_fused else None,
        )
    except RuntimeError as err:  # a device without torch's fused kernel
        raise TrainingError(f"--adam_fused=yes: {err}; pass --adam_fused no.") from err


def prepare_training(settings: Settings, accelerator: Accelerator, model, dataset) -> TrainingRun:
    """The model on its device (and its memory format, compiled), the optimizer, `accelerator.prepare`, the batches,
    then what follows the model onto its device: EMA, LR schedule, tables."""
    if settings.mixed_precision != "no" and accelerator.device.type == "cpu":
        use_float32_attention(model)
    # The optimizer is built on the parameters where they will live: a move that makes new parameter tensors (as
    # some devices' do) would otherwise leave it holding the old ones.
    model = model.to(accelerator.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if settings.torch_compile:  # in place: the module, its parameters and state_dict keys stay what they are
        model.compile(mode=settings.torch_compile_mode)
    optimizer = make_optimizer(settings, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = make_batches(settings, accelerator, dataset)
    ema = None
    if settings.use_ema:  # created from the prepared model's parameters: on accelerator.device with them
        params = accelerator.unwrap_model(model).parameters()
        ema = EMA(params, settings.ema_max_decay, settings.ema_inv_gamma, settings.ema_power)
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=max_train_steps(settings, len(batches)),
    )
    noise_scheduler = make_scheduler(settings, settings.train_scheduler)
    return TrainingRun(settings, accelerator, model, optimizer, batches, lr_scheduler, ema, noise_scheduler)


def max_train_steps(settings: Settings, batches_per_epoch: int) -> int:
    """`--max_train_steps`, or the updates in `--num_epochs` epochs of `batches_per_epoch` (per process)."""
    steps = (
        settings.max_train_steps or (settings.num_epochs * batches_per_epoch) // settings.gradient_accumulation_steps
    )
    if steps < 1:
        raise TrainingError(
            f"--num_epochs={settings.num_epochs} gives no full update of "
            f"{settings.gradient_accumulation_steps} batch(es)."
        )
    return steps
