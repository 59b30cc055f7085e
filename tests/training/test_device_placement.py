"""Device placement of the training state, tested without a GPU: the accelerator is given torch's `meta` device.

A meta tensor has a shape and a dtype but no values, and any operation that mixes it with a CPU tensor fails, just
as mixing CUDA and CPU tensors does. So a few real training updates whose accelerator device is `meta` run every op
of the training step (loss, backward, clipping, AdamW, LR schedule, EMA) with the device a GPU run would have, and a
tensor of the training state that stayed on the CPU (the EMA shadow weights of diffusers' `EMAModel`, a schedule
table, a dropout mask) is either an error or shows up in `TrainingRun.tensors()`.
"""

import pytest
import torch
from accelerate import Accelerator

from training import checkpoints as ckpt
from training import train_unconditional as tu
from training.training_run import load_training_data, prepare_training

from ..conftest import make_vae
from .conftest import tiny_args

META = torch.device("meta")


def _meta_run(monkeypatch, tiny_config, tmp_path, *extra):
    """A `TrainingRun` built by the script's own code, on an accelerator whose device is `meta`."""
    monkeypatch.setattr(Accelerator, "device", property(lambda self: META))
    settings = tu.resolve_settings(tu.parse_args(tiny_args(tiny_config, tmp_path / "run", *extra)))
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    assert accelerator.device == META
    dataset = load_training_data(settings, accelerator)
    run = prepare_training(settings, accelerator, tu.build_model(settings, settings.num_channels), dataset)
    run.objective = tu.DiffusionObjective()  # as the story does (run_training) before the loop
    run.objective.prepare(run)
    return run


def _off_device(run) -> list:
    return sorted(name for name, t in run.tensors().items() if t.device != META)


def _train_updates(run, updates: int) -> None:
    ga = run.settings.gradient_accumulation_steps
    batches = run.batches.epoch(0)
    for _ in range(updates * ga):
        batch = next(batches)
        assert batch["images"].device == META
        is_update = (run.state.micro_step + 1) % ga == 0
        tu.micro_step(run, batch, is_update)
        if is_update:
            loss = tu.update(run)
            assert loss.device == META


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--num_class_embeds", 10, "--snr_gamma", 5, "--prediction_type", "v_prediction", "--noise_offset", 0.1],
        ["--gradient_accumulation_steps", 2, "--no-use_ema", "--lr_scheduler", "constant_with_warmup"],
        ["--data_on_device", "yes", "--channels_last", "yes", "--random_flip", "--num_class_embeds", 10],
        ["--conditioning", "super_resolution", "--sr_factor", 4, "--data_on_device", "yes"],
    ],
    ids=["defaults", "class-conditional-min-snr-v", "accumulation-no-ema", "data-on-device-channels-last", "sr3"],
)
def test_device_placement_every_tensor_of_the_training_state_follows_the_accelerator(
    monkeypatch, tiny_config, tmp_path, extra
):
    run = _meta_run(monkeypatch, tiny_config, tmp_path, "--mixed_precision", "no", *extra)
    # The scheduler moves its cached tables to the data's device at its first add_noise: checked after updates.
    assert not [name for name in _off_device(run) if not name.startswith("noise_scheduler.")]
    _train_updates(run, 3)
    assert run.state.global_step == 3
    held = run.tensors()
    assert any(k.startswith("optimizer.") for k in held)  # Adam's moments exist and were checked
    assert ("ema.0" in held) == run.settings.use_ema
    assert ("data.images" in held) == run.settings.data_on_device  # the images themselves, kept on the device
    assert any(k.startswith("noise_scheduler._") for k in held)  # add_noise's cached tables
    assert not _off_device(run)


def test_device_placement_a_latent_run_keeps_the_vae_and_its_latents_on_the_device(monkeypatch, tmp_path):
    # --vae: the frozen VAE moves with the run, each batch is encoded (a posterior sample) on the device.
    from training.latent import LatentDiffusionObjective

    make_vae(scaling_factor=0.18215).save_pretrained(tmp_path / "vae")  # diffusers' default scaling_factor
    monkeypatch.setattr(Accelerator, "device", property(lambda self: META))
    argv = ["--vae", tmp_path / "vae", "--resolution", 8, "--max_train_samples", 64, "--train_batch_size", 8]
    argv += ["--output_dir", tmp_path / "run", "--logger", "none", "--mixed_precision", "no"]
    objective = LatentDiffusionObjective()
    settings = objective.resolve_settings(tu.parse_args([str(a) for a in argv]))
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    run = prepare_training(
        settings, accelerator, objective.build_model(settings), load_training_data(settings, accelerator)
    )
    run.objective = objective
    objective.prepare(run)
    assert all(t.device == META for t in objective.vae.state_dict().values())
    assert run.unwrapped.config.in_channels == 2 and run.unwrapped.config.sample_size == 4
    _train_updates(run, 2)
    assert run.state.global_step == 2 and not _off_device(run)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_device_placement_a_resumed_run_holds_the_checkpoint_on_the_device(monkeypatch, tiny_config, tmp_path):
    # A real checkpoint written by a CPU run, loaded into a run on another device: every value is copied into the
    # tensors that live there (a checkpoint read as CPU tensors and kept as such would show here).
    out = tmp_path / "cpu"
    tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--mixed_precision", "no"))
    path = str(out / "checkpoint-2")
    run = _meta_run(monkeypatch, tiny_config, tmp_path, "--mixed_precision", "no", "--max_train_steps", 4)
    saved = ckpt.read_checkpoint(path)
    tu.check_resume_flags(path, saved[0], run.settings, run.unwrapped)
    tu.load_checkpoint(run, path, saved)
    assert run.state.global_step == 2 and run.ema.optimization_step == 2
    assert not [name for name in _off_device(run) if not name.startswith("noise_scheduler.")]
    _train_updates(run, 1)
    assert not _off_device(run) and run.state.global_step == 3


def test_device_placement_precision_choices_the_device_cannot_honour_stop_at_the_door(monkeypatch, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(tu.TrainingError, match="--mixed_precision='fp16' needs a CUDA GPU"):
        tu.main(["--mixed_precision", "fp16", "--output_dir", str(out), "--logger", "none"])
    assert not out.exists()  # nothing was written

    # A GPU without bf16 (simulated): 'bf16' is refused by name, 'auto' falls back to float32, 'fp16' is kept.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(tu.TrainingError, match="--mixed_precision='bf16' needs a GPU with bfloat16; Old GPU"):
        tu.resolve_mixed_precision("bf16", cpu=False)
    assert tu.resolve_mixed_precision("auto", cpu=False) == "no"
    assert tu.resolve_mixed_precision("fp16", cpu=False) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert tu.resolve_mixed_precision("auto", cpu=False) == "bf16"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert tu.uses_cpu() is False  # a visible GPU is used unless accelerate is told to use the CPU
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert tu.uses_cpu() is True


def test_device_placement_checkpoints_carry_every_cuda_generator(monkeypatch):
    # CUDA generators (simulated): saved as JSON lists, restored on every device that is there.
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.extend(s))
    import json

    state = json.loads(json.dumps(ckpt.rng_state()))
    assert state["cuda"] == [s.tolist() for s in states]
    ckpt.set_rng_state(state)
    assert [torch.equal(a, b) for a, b in zip(restored, states)] == [True, True]


def test_device_placement_the_autoencoder_objective_keeps_its_state_on_the_device(monkeypatch, tmp_path):
    # training/train_autoencoder.py through the same story: its AutoencoderKL, Adam's moments, the EMA and the
    # posterior's noise all live on the accelerator's device.
    from training import train_autoencoder as ta

    monkeypatch.setattr(Accelerator, "device", property(lambda self: META))
    argv = ["--resolution", 8, "--downsample_factor", 2, "--block_out_channels", "8,16", "--max_train_samples", 64]
    argv += ["--train_batch_size", 8, "--output_dir", tmp_path / "run", "--logger", "none", "--mixed_precision", "no"]
    objective = ta.AutoencoderObjective([])
    settings = objective.resolve_settings(ta.parse_autoencoder_args(list(map(str, argv))))
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    dataset = load_training_data(settings, accelerator)
    run = prepare_training(settings, accelerator, objective.build_model(settings), dataset)
    run.objective = objective
    objective.prepare(run)
    _train_updates(run, 3)
    assert run.state.global_step == 3 and any(k.startswith("optimizer.") for k in run.tensors())
    # the noise scheduler that prepare_training builds for every run is never used by this objective
    assert not [name for name in _off_device(run) if not name.startswith("noise_scheduler.")]
