"""The training script: exact resume, atomic and rotated checkpoints, clear errors, the loss, the output folder."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file

from training import train_unconditional as tu

from .conftest import ROOT, read_losses, subprocess_env, tiny_args, training_in_background


def _unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_resume_from_latest_repeats_the_uninterrupted_run_exactly(tmp_path, tiny_config):
    # 8 micro-batches per epoch, 2 per update: the stop at update 3 falls mid-epoch (micro-batch 6 of 8), so the
    # resume must restore the data position, the step RNG, Adam's moments, the LR schedule and the EMA.
    extra = [
        "--max_train_steps",
        8,
        "--gradient_accumulation_steps",
        2,
        "--checkpointing_steps",
        100,
        "--seed",
        3,
        "--random_flip",
        "--prediction_type",
        "v_prediction",
        "--snr_gamma",
        5,
        "--noise_offset",
        0.05,
    ]
    full = tu.main(tiny_args(tiny_config, tmp_path / "full", *extra))
    assert full["interrupted"] is False and full["global_step"] == 8

    first = tu.main(tiny_args(tiny_config, tmp_path / "cut", *extra), should_stop=lambda step: step == 3)
    assert first["interrupted"] is True and first["global_step"] == 3
    assert [os.path.basename(p) for p in tu.list_checkpoints(tmp_path / "cut")] == ["checkpoint-3"]
    assert not os.path.exists(tmp_path / "cut" / "model_index.json")  # an interrupted run exports nothing
    second = tu.main(tiny_args(tiny_config, tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest"))
    assert second["global_step"] == 8

    losses_full, losses_cut = read_losses(tmp_path / "full"), read_losses(tmp_path / "cut")
    assert sorted(losses_cut) == list(range(1, 9))
    assert losses_cut == losses_full  # bit-for-bit, float equality
    weights_full, weights_cut = _unet_weights(tmp_path / "full"), _unet_weights(tmp_path / "cut")
    assert all(torch.equal(weights_full[k], weights_cut[k]) for k in weights_full)  # EMA weights


def test_checkpoints_rotate_and_survive_a_kill_mid_save(tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "run"
    argv = tiny_args(
        tiny_config, out, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2, "--max_train_steps", 6
    )
    tu.main(argv)
    assert [os.path.basename(p) for p in tu.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]

    # A save that dies half-way (as under SIGKILL) leaves a temp folder; the last complete checkpoint is intact.
    from training import checkpoints

    real_save = checkpoints.save_file

    def dying_save(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoints, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tu.main(
            tiny_args(
                tiny_config,
                out,
                "--checkpointing_steps",
                2,
                "--max_train_steps",
                10,
                "--resume_from_checkpoint",
                "latest",
            )
        )
    assert os.path.isdir(out / ".tmp-checkpoint-8")
    assert [os.path.basename(p) for p in tu.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    monkeypatch.setattr(checkpoints, "save_file", real_save)

    result = tu.main(
        tiny_args(
            tiny_config, out, "--checkpointing_steps", 2, "--max_train_steps", 10, "--resume_from_checkpoint", "latest"
        )
    )
    assert result["global_step"] == 10
    assert read_losses(out)[7] is not None and not glob.glob(str(out / ".tmp-checkpoint-*"))
    with open(out / "checkpoint-10" / "training_state.json") as f:
        assert json.load(f)["global_step"] == 10


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path, tiny_config):
    out = tmp_path / "run"
    tu.main(tiny_args(tiny_config, out, "--checkpointing_steps", 2, "--max_train_steps", 2))
    ckpt = out / "checkpoint-2"
    resume = tiny_args(tiny_config, out, "--max_train_steps", 4, "--resume_from_checkpoint")
    with pytest.raises(tu.TrainingError, match="no checkpoint folder"):
        tu.main(resume + [str(out / "checkpoint-99")])

    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    with pytest.raises(tu.TrainingError, match="checkpoint-2.* is corrupt"):
        tu.main(resume + [str(ckpt)])
    os.remove(ckpt / "training_state.json")
    with pytest.raises(tu.TrainingError, match="incomplete or corrupt: training_state.json is missing"):
        tu.main(resume + ["latest"])


def test_bad_flags_are_cli_errors_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        tu.parse_args(["--rescale_betas_zero_snr"])
    err = capsys.readouterr().err
    assert "--prediction_type='epsilon' with --rescale_betas_zero_snr" in err and "v_prediction" in err
    tu.parse_args(["--rescale_betas_zero_snr", "--prediction_type", "v_prediction"])  # the supported pairing
    for bad in (["--cond_drop_prob", "1.5"], ["--train_batch_size", "0"], ["--ddpm_num_inference_steps", "2000"]):
        with pytest.raises(SystemExit):
            tu.parse_args(bad)
        assert bad[0] in capsys.readouterr().err


def test_no_arguments_means_digits_and_a_small_default_unet():
    args = tu.parse_args([])
    assert args.dataset_name is None and args.train_data_dir is None and args.resolution == 16
    model = tu.build_model(tu.resolve_settings(args), channels=1)
    assert model.config.in_channels == 1 and model.config.sample_size == 16
    assert 3e5 < sum(p.numel() for p in model.parameters()) < 1.5e6
    # Every flag of diffusers' train_unconditional.py exists under the same name.
    diffusers_flags = """dataset_name dataset_config_name model_config_name_or_path train_data_dir output_dir
        overwrite_output_dir cache_dir resolution center_crop random_flip train_batch_size eval_batch_size
        dataloader_num_workers num_epochs save_images_epochs save_model_epochs gradient_accumulation_steps
        learning_rate lr_scheduler lr_warmup_steps adam_beta1 adam_beta2 adam_weight_decay adam_epsilon use_ema
        ema_inv_gamma ema_power ema_max_decay push_to_hub hub_token hub_model_id hub_private_repo logger
        logging_dir local_rank mixed_precision prediction_type ddpm_num_steps ddpm_num_inference_steps
        ddpm_beta_schedule checkpointing_steps checkpoints_total_limit resume_from_checkpoint""".split()
    assert not [f for f in diffusers_flags if not hasattr(args, f)]


class _ZeroModel(torch.nn.Module):
    """A 'network' that predicts 0 and records its inputs: the loss is then E[w_t ‖target‖²]."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x, t, class_labels))
        return Namespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_matches_diffusers_targets_and_min_snr_weights(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    args = tu.parse_args(["--prediction_type", prediction_type, "--snr_gamma", "5"])
    ours = tu.make_scheduler(args, "ddpm")
    theirs = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    model = _ZeroModel()
    loss = tu.diffusion_loss(model, ours, {"images": x0}, args, tu.step_generator(0, 0, 0, "cpu"))

    g = tu.step_generator(0, 0, 0, "cpu")  # replay the same draws
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    x_t = theirs.add_noise(x0, eps, t)
    torch.testing.assert_close(model.calls[0][0], x_t, rtol=1e-5, atol=1e-6)
    target = {"epsilon": eps, "sample": x0, "v_prediction": theirs.get_velocity(x0, eps, t)}[prediction_type]
    snr = compute_snr(theirs, t)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    expected = (target.pow(2).mean(dim=(1, 2, 3)) * weight).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_label_dropout_uses_the_null_class():
    args = tu.parse_args(["--num_class_embeds", "10", "--cond_drop_prob", "0.5"])
    model = _ZeroModel()
    labels = torch.arange(64) % 10
    batch = {"images": torch.zeros(64, 1, 4, 4), "labels": labels}
    tu.diffusion_loss(model, tu.make_scheduler(args, "ddpm"), batch, args, tu.step_generator(0, 0, 0, "cpu"))
    used = model.calls[0][2]
    dropped = used == 10
    assert 10 < int(dropped.sum()) < 54 and torch.equal(used[~dropped], labels[~dropped])


def test_output_folder_is_a_pipeline_with_the_ema_weights(tmp_path, tiny_config):
    out = tmp_path / "run"
    flags = "--max_train_steps 4 --checkpointing_steps 4 --eval_every_steps 2 --validation_scheduler ddpm"
    metrics = tu.main(tiny_args(tiny_config, out, *flags.split(), "--logger", "tensorboard"))
    ema_state = load_file(out / "checkpoint-4" / "ema.safetensors")
    weights = _unet_weights(out)
    from diffusers import UNet2DModel

    names = [n for n, _ in UNet2DModel.from_config(UNet2DModel.load_config(tiny_config)).named_parameters()]
    for i, name in enumerate(names):
        shadow = ema_state[str(i)]
        assert torch.equal(weights[name], shadow.float())
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert [h["step"] for h in saved["history"]] == [2, 4] and saved["final"]["frechet_distance"] > 0
    assert saved["effective_batch_size"] == 8 and saved["images_seen"] == 32 and metrics["global_step"] == 4
    assert (out / "grids" / "final.png").exists() and (out / "samples" / "sample_00.png").exists()
    assert "accelerate launch training/train_unconditional.py" in (out / "README.md").read_text()
    # Tensorboard got the losses and the sample grids.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(out / "logs" / "train_unconditional" / "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4] and len(acc.Images("samples")) >= 2
    # The folder loads in a fresh process with only our package imported, and samples with the saved scheduler.
    code = (
        "import sys, torch; from custom_pipelines import TutorialUnconditionalPipeline as P; "
        "p = P.from_pretrained(sys.argv[1]); print(type(p.scheduler).__name__); "
        "x = p(batch_size=2, num_inference_steps=3, output_type='pt', generator=torch.manual_seed(0)).images; "
        "print(tuple(x.shape))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["TutorialDDPMScheduler", "(2,", "1,", "8,", "8)"]


def test_class_conditional_bf16_run_samples_requested_classes(tmp_path, tiny_config):
    out = tmp_path / "run"
    flags = "--max_train_steps 3 --num_class_embeds 10 --mixed_precision bf16 --checkpointing_steps 3"
    result = tu.main(tiny_args(tiny_config, out, *flags.split()))
    losses = read_losses(out)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert "conditional_accuracy" in result
    from custom_pipelines import TutorialClassConditionalPipeline

    pipe = TutorialClassConditionalPipeline.from_pretrained(out)
    assert pipe.unet.config.num_class_embeds == 11 and pipe.unet.dtype == torch.float32  # 10 classes + null
    images = pipe(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=3, output_type="pt").images
    assert images.shape == (2, 1, 8, 8)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_config):
    out = tmp_path / "run"
    argv = tiny_args(tiny_config, out, "--max_train_steps", 100000, "--checkpointing_steps", 100000)
    with training_in_background(argv, out) as proc:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    (ckpt,) = tu.list_checkpoints(out)
    step = int(ckpt.rsplit("-", 1)[1])
    assert 1 <= step < 100000 and max(read_losses(out)) == step
    with open(out / "metrics.json") as f:
        assert json.load(f)["interrupted"] is True
    resumed = tu.main(
        argv[:-4]
        + ["--max_train_steps", str(step + 1), "--checkpointing_steps", "1000", "--resume_from_checkpoint", "latest"]
    )
    assert resumed["global_step"] == step + 1 and sorted(read_losses(out))[-1] == step + 1
    shutil.rmtree(out)


def test_trains_on_an_image_folder_skipping_a_broken_file(tmp_path, tiny_config):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i in range(16):
        Image.fromarray(rng.randint(0, 255, (10, 10, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    (folder / "bad.png").write_bytes(b"garbage")
    out = tmp_path / "run"
    argv = tiny_args(
        tiny_config,
        out,
        "--train_data_dir",
        folder,
        "--num_channels",
        1,
        "--max_train_steps",
        2,
        "--center_crop",
        "--random_flip",
    )
    with pytest.raises(tu.TrainingError, match="bad.png"):
        tu.main(argv)
    result = tu.main(argv + ["--skip_broken_images", "--overwrite_output_dir"])
    assert result["global_step"] == 2 and "frechet_distance" not in result  # digits metrics only for digits
    assert (out / "model_index.json").exists()
