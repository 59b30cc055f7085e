"""Nothing lost, nothing executed, nothing silently wrong: faults injected into real (tiny) training runs."""

import json
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training import checkpoints as ckpt
from training import loss_log, output_folder
from training import train_unconditional as tu

from .conftest import ROOT, SCRIPT, read_losses, subprocess_env, tiny_args


def _finished_run(tiny_config, out, *extra):
    """A finished 2-update run with its checkpoint and pipeline folder, plus a user's file that is not ours."""
    tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--checkpointing_steps", 2, *extra))
    (out / "notes").mkdir()
    (out / "notes" / "keep.txt").write_text("my notes")
    (out / "my_script.py").write_text("print('mine')")
    return sorted(os.listdir(out))


# ----------------------------------------------------------------------------------------------------------------
# 1. --overwrite_output_dir validates first, removes only what the script wrote, and keeps the old run until the
#    new one has a checkpoint
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match",
    [
        (["--train_data_dir", "/nonexistent"], "--train_data_dir='/nonexistent' is not a directory"),
        (["--resolution", "15"], "--resolution=15 is not supported"),
        (["--mixed_precision", "fp16"], "--mixed_precision='fp16' needs a CUDA GPU"),
    ],
    ids=["missing-data", "bad-resolution", "fp16-on-cpu"],
)
def test_overwrite_with_a_failing_flag_leaves_the_folder_untouched(tmp_path, tiny_config, bad, match):
    out = tmp_path / "run"
    before = _finished_run(tiny_config, out)
    weights = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    argv = tiny_args(tiny_config, out, "--max_train_steps", 2, "--overwrite_output_dir")
    if "--resolution" in bad:  # the tiny config's sample_size must not be what fails
        argv = [a for a in argv] + ["--model_config_name_or_path", str(tmp_path / "unet15.json")]
        cfg = json.loads(open(tiny_config).read()) | {"sample_size": 15}
        (tmp_path / "unet15.json").write_text(json.dumps(cfg))
    with pytest.raises(tu.TrainingError, match=match):
        tu.main(argv + bad)
    assert sorted(os.listdir(out)) == before
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert (out / "notes" / "keep.txt").read_text() == "my notes"


def test_overwrite_replaces_only_what_the_script_wrote(tmp_path, tiny_config):
    out = tmp_path / "run"
    _finished_run(tiny_config, out, "--checkpointing_steps", 1)
    assert [os.path.basename(p) for p in tu.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    tu.main(tiny_args(tiny_config, out, "--max_train_steps", 3, "--checkpointing_steps", 3, "--overwrite_output_dir"))
    assert [os.path.basename(p) for p in tu.list_checkpoints(out)] == ["checkpoint-3"]
    assert sorted(read_losses(out)) == [1, 2, 3]  # the old run's losses are not mixed in
    assert (out / "notes" / "keep.txt").read_text() == "my notes" and (out / "my_script.py").exists()
    assert not (out / output_folder.PREVIOUS_RUN).exists()


def test_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "run"
    before = _finished_run(tiny_config, out)
    losses = read_losses(out)
    real_update = tu.update

    def failing_update(run):
        if run.state.global_step == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")  # a crash mid-run
        return real_update(run)

    monkeypatch.setattr(tu, "update", failing_update)
    argv = tiny_args(tiny_config, out, "--max_train_steps", 4, "--checkpointing_steps", 4, "--overwrite_output_dir")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tu.main(argv)
    assert sorted(os.listdir(out)) == before and read_losses(out) == losses

    # A kill (no Python cleanup) in the same place leaves the old run set aside: the next start puts it back.
    output_folder.set_aside_previous_run(str(out), "logs")
    (out / "losses.jsonl").write_text('{"step": 1, "loss": 0.5}\n')  # the killed new run's first record
    monkeypatch.setattr(tu, "update", real_update)
    with pytest.raises(tu.TrainingError, match="--resolution=15"):  # even a start that then fails validation
        tu.main(argv + ["--resolution", "15"])
    assert sorted(os.listdir(out)) == before and read_losses(out) == losses


# ----------------------------------------------------------------------------------------------------------------
# 2. A checkpoint holds nothing that runs code when loaded
# ----------------------------------------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (open, (os.environ["PAYLOAD_MARKER"], "w"))  # unpickling creates this file


def test_checkpoints_hold_only_json_and_safetensors_and_a_planted_pickle_is_refused(
    tmp_path, tiny_config, monkeypatch
):
    out = tmp_path / "run"
    tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--checkpointing_steps", 2))
    ckpt_dir = out / "checkpoint-2"
    assert sorted(os.listdir(ckpt_dir)) == [
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "random_states_0.json",
        "training_state.json",
    ]
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.pt"):
        planted = ckpt_dir / name
        planted.write_bytes(pickle.dumps(_Payload()))
        resume = tiny_args(tiny_config, out, "--max_train_steps", 3, "--resume_from_checkpoint", "latest")
        with pytest.raises(tu.TrainingError, match=f"holds '{name}'.*could run code|holds '{name}'"):
            tu.main(resume)
        assert not marker.exists()
        planted.unlink()
    # A safetensors file's header is JSON and its body raw numbers: reading is not executing.
    assert set(load_file(ckpt_dir / "ema.safetensors")) == {
        str(i) for i in range(len(load_file(ckpt_dir / "ema.safetensors")))
    }
    assert tu.main(resume)["global_step"] == 3


# ----------------------------------------------------------------------------------------------------------------
# 3. Resuming from an older checkpoint abandons the later branch: moved aside, never "latest"
# ----------------------------------------------------------------------------------------------------------------
def test_rollback_moves_the_abandoned_branch_aside_and_rotation_keeps_the_new_run(tmp_path, tiny_config):
    out = tmp_path / "run"
    argv = tiny_args(tiny_config, out, "--max_train_steps", 3, "--checkpointing_steps", 1, "--seed", 1)
    tu.main(argv)
    old3 = load_file(out / "checkpoint-3" / "model.safetensors")
    # Go back to update 1 and train a different branch (another learning rate) to update 3.
    tu.main(
        tiny_args(
            tiny_config,
            out,
            "--max_train_steps",
            3,
            "--checkpointing_steps",
            1,
            "--seed",
            1,
            "--learning_rate",
            "1e-2",
            "--checkpoints_total_limit",
            1,
            "--resume_from_checkpoint",
            str(out / "checkpoint-1"),
        )
    )
    assert [os.path.basename(p) for p in tu.list_checkpoints(out)] == ["checkpoint-3"]  # the new run's, kept
    new3 = load_file(out / "checkpoint-3" / "model.safetensors")
    assert not all(torch.equal(old3[k], new3[k]) for k in old3)  # it is the new branch's update 3
    assert tu.resolve_checkpoint("latest", str(out)) == str(out / "checkpoint-3")
    (aside,) = (out / ckpt.ABANDONED).iterdir()
    assert sorted(os.listdir(aside)) == ["checkpoint-2", "checkpoint-3", "losses.jsonl"]  # nothing deleted
    assert torch.equal(
        load_file(aside / "checkpoint-3" / "model.safetensors")[next(iter(old3))], old3[next(iter(old3))]
    )
    with open(out / "losses.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3]  # one row per update of the current branch


# ----------------------------------------------------------------------------------------------------------------
# 4. Divergence stops the run before anything non-finite is saved
# ----------------------------------------------------------------------------------------------------------------
def test_divergence_stops_at_the_first_non_finite_loss_and_keeps_the_good_checkpoints(tmp_path, tiny_config):
    out = tmp_path / "run"
    argv = tiny_args(
        tiny_config,
        out,
        "--max_train_steps",
        8,
        "--checkpointing_steps",
        1,
        "--checkpoints_total_limit",
        2,
        "--learning_rate",
        "1e30",
        "--lr_warmup_steps",
        0,
        "--max_grad_norm",
        0,
    )
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, argv)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode != 0
    (error,) = [line for line in res.stderr.splitlines() if "error:" in line]
    assert "train_unconditional.py: error:" in error and "--learning_rate (now 1e+30)" in error, res.stderr[-2000:]
    bad_update = int(error.split(" at update ")[1].split(":")[0])
    kept = tu.list_checkpoints(out)
    assert kept and all(ckpt.checkpoint_step(p) < bad_update for p in kept)
    for path in kept:  # every saved tensor is finite
        for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(os.path.join(path, name)).values())
    assert not (out / "model_index.json").exists()  # no pipeline exported from a diverged run


def test_non_finite_weights_are_never_checkpointed(tmp_path, tiny_config, monkeypatch):
    # A finite loss can still leave non-finite weights (an overflowing update): the save refuses them.
    real_update = tu.update

    def poisoning_update(run):
        loss = real_update(run)
        if run.state.global_step == 2:
            with torch.no_grad():
                next(run.unwrapped.parameters()).fill_(float("inf"))
        return loss

    monkeypatch.setattr(tu, "update", poisoning_update)
    out = tmp_path / "run"
    with pytest.raises(tu.TrainingError, match="weights are not finite at update 2"):
        tu.main(tiny_args(tiny_config, out, "--max_train_steps", 4, "--checkpointing_steps", 1))
    assert [os.path.basename(p) for p in tu.list_checkpoints(out)] == ["checkpoint-1"]


# ----------------------------------------------------------------------------------------------------------------
# 5. Resume refuses changed run-defining flags and applies the others
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changed, value",
    [
        ("--prediction_type", "v_prediction"),
        ("--ddpm_beta_schedule", "squaredcos_cap_v2"),
        ("--train_batch_size", "16"),
        ("--seed", "7"),
    ],
)
def test_resume_refuses_flags_that_change_the_model_objective_or_data(tmp_path, tiny_config, changed, value):
    out = tmp_path / "run"
    tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--checkpointing_steps", 2))
    argv = tiny_args(tiny_config, out, "--max_train_steps", 4, "--resume_from_checkpoint", "latest", changed, value)
    with pytest.raises(tu.TrainingError, match=f"cannot resume.*{changed}: .* in the checkpoint, .* now"):
        tu.main(argv)
    assert [os.path.basename(p) for p in tu.list_checkpoints(out)] == ["checkpoint-2"]


def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path, tiny_config, monkeypatch, caplog):
    out = tmp_path / "run"
    common = ["--lr_scheduler", "constant", "--checkpointing_steps", 2]
    tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--learning_rate", "1e-3", *common))
    seen, real_update = [], tu.update
    monkeypatch.setattr(tu, "update", lambda run: seen.append(run.optimizer.param_groups[0]["lr"]) or real_update(run))
    with caplog.at_level(logging.WARNING, logger="train_unconditional"):
        resume = ["--max_train_steps", 4, "--learning_rate", "5e-5", "--adam_beta1", "0.9", "--resume_from_checkpoint"]
        tu.main(tiny_args(tiny_config, out, *resume, "latest", *common))
    assert seen == [5e-5, 5e-5]
    assert "--learning_rate: 0.001 -> 5e-05" in caplog.text and "--adam_beta1: 0.95 -> 0.9" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# 7, 8, 10. Data and flags at the door
# ----------------------------------------------------------------------------------------------------------------
def test_sixteen_bit_pngs_train_on_their_full_range(tmp_path, tiny_config):
    folder = tmp_path / "imgs16"
    folder.mkdir()
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    for i in range(16):
        Image.fromarray(np.roll(ramp, i, axis=1)).save(folder / f"{i}.png")
    assert Image.open(folder / "0.png").mode in ("I;16", "I")
    from training.data import build_dataset

    def items(channels, data_loading):
        ds = build_dataset(
            train_data_dir=str(folder), resolution=8, channels=channels, center_crop=True, data_loading=data_loading
        )
        return torch.stack([ds[i]["images"] for i in range(len(ds))])

    images = items(1, "memory")
    assert images.min() == -1 and images.max() == 1
    assert abs(float(images.mean())) < 0.05 and float((images >= 0.999).float().mean()) < 0.05  # not saturated
    rgb = items(3, "memory")
    assert rgb.shape == (16, 3, 8, 8) and torch.equal(rgb[:, 0], images[:, 0])
    assert torch.equal(items(1, "workers"), images)  # decoded per item: the same 16-bit values
    result = tu.main(
        tiny_args(
            tiny_config,
            tmp_path / "run",
            "--train_data_dir",
            folder,
            "--num_channels",
            1,
            "--max_train_samples",
            16,
            "--max_train_steps",
            1,
            "--center_crop",
        )
    )
    assert result["global_step"] == 1


@pytest.mark.parametrize("resolution, suggestion", [(15, "14 or 16"), (34, "32 or 36")])
def test_unsupported_resolution_is_refused_before_training(tmp_path, resolution, suggestion):
    out = tmp_path / "run"
    with pytest.raises(
        tu.TrainingError, match=f"--resolution={resolution} .* multiple of .*--resolution {suggestion}"
    ):
        tu.main(
            ["--resolution", str(resolution), "--output_dir", str(out), "--logger", "none", "--max_train_steps", "1"]
        )
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--learning_rate", "nan"),
        ("--learning_rate", "-1"),
        ("--guidance_scale", "nan"),
        ("--adam_beta1", "1.5"),
        ("--max_grad_norm", "inf"),
        ("--ema_max_decay", "nan"),
    ],
)
def test_bad_numbers_are_cli_errors_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit):
        tu.parse_args([flag, value])
    assert f"{flag}={float(value)!r} must be a finite number in" in capsys.readouterr().err


def test_an_output_dir_that_cannot_be_written_is_refused_at_the_door(tmp_path, tiny_config, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(tu.TrainingError, match="--output_dir=.*file.txt' is a file"):
        tu.main(tiny_args(tiny_config, a_file, "--max_train_steps", 1))
    with pytest.raises(tu.TrainingError, match="cannot be created: .*file.txt' is a file"):
        tu.main(tiny_args(tiny_config, a_file / "run", "--max_train_steps", 1))

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(output_folder.tempfile, "mkstemp", read_only)
    with pytest.raises(tu.TrainingError, match="--output_dir=.* is not writable: .*Read-only file system"):
        tu.main(tiny_args(tiny_config, tmp_path / "run", "--max_train_steps", 1))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# A loss that does not fall is named, with the flag to change
# ----------------------------------------------------------------------------------------------------------------
def test_a_loss_that_does_not_fall_warns_naming_the_learning_rate(tmp_path, tiny_config, monkeypatch, caplog):
    flat = [1.0 + 0.01 * ((-1) ** i) for i in range(300)]
    falling = [1.0 * 0.99**i for i in range(300)]
    settings = tu.resolve_settings(tu.parse_args([]))
    assert "--learning_rate (now 0.002" in loss_log.loss_plateau_warning(flat, settings)
    assert (
        loss_log.loss_plateau_warning(falling, settings) is None
        and loss_log.loss_plateau_warning(flat[:299], settings) is None
    )

    monkeypatch.setattr(loss_log, "LOSS_PLATEAU_CHECK_UPDATE", 60)
    with caplog.at_level(logging.WARNING, logger="train_unconditional"):
        tu.main(tiny_args(tiny_config, tmp_path / "run", "--max_train_steps", 60, "--learning_rate", "1e-12"))
    assert "the loss has not fallen in 60 updates" in caplog.text and "--learning_rate (now 1e-12" in caplog.text


def test_defaults_follow_the_model_and_equal_diffusers_on_its_default_unet(tmp_path):
    from training.settings import width_scaled_defaults

    assert width_scaled_defaults(512) == {"learning_rate": 1e-4, "lr_warmup_steps": 500, "ema_max_decay": 0.9999}
    assert width_scaled_defaults(128) == {"learning_rate": 4e-4, "lr_warmup_steps": 125, "ema_max_decay": 0.9999}
    assert width_scaled_defaults(16)["learning_rate"] == 2e-3  # capped at the small UNet's rate
    small = tu.resolve_settings(tu.parse_args([]))
    assert (small.preset, small.learning_rate, small.lr_warmup_steps, small.ema_max_decay) == (
        "small-unet",
        2e-3,
        50,
        0.999,
    )
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({"sample_size": 64, "block_out_channels": [128, 128, 256, 256, 512, 512]}))
    user = tu.resolve_settings(tu.parse_args(["--model_config_name_or_path", str(config)]))
    assert (user.preset, user.learning_rate, user.lr_warmup_steps) == ("width-scaled", 1e-4, 500)
    given = tu.resolve_settings(tu.parse_args(["--model_config_name_or_path", str(config), "--learning_rate", "3e-4"]))
    assert given.learning_rate == 3e-4 and given.lr_warmup_steps == 500  # a value given always wins
