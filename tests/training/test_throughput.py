"""The throughput switches (issue #14): each keeps the numbers of a run, runs on the CPU, and is device-correct.

`--data_on_device`, `--channels_last`, `--adam_fused` and `--torch_compile` are 'auto' (on a GPU) or off on this
CPU-only machine; here each is switched on where torch allows it on a CPU and compared with the default path. Their
device placement is checked on torch's `meta` device in test_device_placement.py.
"""

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from training import train_unconditional as tu
from training.data import DeviceBatches, EpochSampler, build_dataset

from .conftest import read_losses, tiny_args


def test_device_batches_are_the_sharded_dataloader_batches_with_the_same_flips():
    # What accelerate gives each process of a prepared DataLoader: its BatchSamplerShard over our sampler.
    from accelerate.data_loader import BatchSamplerShard

    dataset = build_dataset(resolution=8, random_flip=True, seed=3)
    batch, processes = 16, 2
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        sampler = EpochSampler(len(dataset), seed=3)
        sampler.set_epoch(epoch)
        for p in range(processes):
            batches = torch.utils.data.BatchSampler(sampler, batch, drop_last=True)
            shard = list(BatchSamplerShard(batches, processes, p, split_batches=False, even_batches=True))
            device = list(DeviceBatches(dataset, batch, processes, p, "cpu", seed=3).epoch(epoch))
            assert len(device) == len(shard)
            for got, indices in zip(device, shard):
                expected = torch.utils.data.default_collate([dataset[i] for i in indices])
                assert torch.equal(got["images"], expected["images"]) and torch.equal(
                    got["labels"], expected["labels"]
                )
        skipped = list(DeviceBatches(dataset, batch, 1, 0, "cpu", seed=3).epoch(epoch, skip=5))
        fifth = list(torch.utils.data.BatchSampler(sampler, batch, drop_last=True))[5]
        assert torch.equal(skipped[0]["images"], torch.stack([dataset[i]["images"] for i in fifth]))  # a resume


def test_data_on_device_trains_exactly_as_the_dataloader(tmp_path, tiny_config):
    # 64 images in batches of 8: 6 updates cross an epoch boundary; flips are drawn per epoch.
    common = ("--max_train_steps", 10, "--random_flip", "--num_class_embeds", 10, "--mixed_precision", "no")
    tu.main(tiny_args(tiny_config, tmp_path / "loader", *common, "--data_on_device", "no"))
    tu.main(tiny_args(tiny_config, tmp_path / "device", *common, "--data_on_device", "yes"))
    assert read_losses(tmp_path / "device") == read_losses(tmp_path / "loader")


def test_fused_adam_and_channels_last_train_like_the_defaults_and_resume_fused(tmp_path, tiny_config, monkeypatch):
    common = ("--mixed_precision", "no", "--checkpointing_steps", 3, "--lr_scheduler", "constant")
    tu.main(tiny_args(tiny_config, tmp_path / "plain", "--max_train_steps", 6, *common))
    fast = ("--adam_fused", "yes", "--channels_last", "yes")
    tu.main(tiny_args(tiny_config, tmp_path / "fast", "--max_train_steps", 6, *common, *fast))
    plain, fast_losses = read_losses(tmp_path / "plain"), read_losses(tmp_path / "fast")
    assert sorted(plain) == sorted(fast_losses) == list(range(1, 7))
    for step in plain:  # other kernels, the same numbers up to float32 rounding
        assert abs(plain[step] - fast_losses[step]) < 1e-4 * max(1.0, abs(plain[step]))

    # A checkpoint written without the fused kernel resumes with it: the kernel is this run's choice.
    seen, real_update = [], tu.update
    monkeypatch.setattr(
        tu, "update", lambda run: seen.append(run.optimizer.param_groups[0]["fused"]) or real_update(run)
    )
    tu.main(
        tiny_args(
            tiny_config,
            tmp_path / "plain",
            "--max_train_steps",
            8,
            *common,
            *fast,
            "--resume_from_checkpoint",
            "latest",
        )
    )
    assert seen == [True, True]


def test_torch_compile_compiles_the_unet_in_place_with_the_mode(tmp_path, tiny_config, monkeypatch):
    compiled = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((type(self).__name__, kwargs))
    )
    tu.main(
        tiny_args(
            tiny_config,
            tmp_path / "run",
            "--max_train_steps",
            1,
            "--torch_compile",
            "--torch_compile_mode",
            "max-autotune",
        )
    )
    assert compiled == [("UNet2DModel", {"mode": "max-autotune"})]


def test_attention_is_torch_sdpa(tiny_config):
    # diffusers' AttnProcessor2_0 calls torch's scaled_dot_product_attention (flash / memory-efficient kernels).
    settings = tu.resolve_settings(tu.parse_args(tiny_args(tiny_config, "unused")))
    layers = [m for m in tu.build_model(settings, 1).modules() if isinstance(m, Attention)]
    assert layers and all(isinstance(m.processor, AttnProcessor2_0) for m in layers)


def test_auto_switches_are_off_on_the_cpu_and_on_on_a_gpu(monkeypatch):
    cpu = tu.resolve_settings(tu.parse_args([]))
    assert (cpu.data_on_device, cpu.channels_last, cpu.adam_fused, cpu.torch_compile) == (False, False, False, False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = tu.resolve_settings(tu.parse_args([]))
    assert (gpu.data_on_device, gpu.channels_last, gpu.adam_fused) == (True, True, True)
    no = tu.resolve_settings(tu.parse_args(["--data_on_device", "no", "--adam_fused", "no", "--channels_last", "no"]))
    assert (no.data_on_device, no.channels_last, no.adam_fused) == (False, False, False)
