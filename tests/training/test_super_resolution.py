"""`--conditioning super_resolution` (SR3): the loss's inputs, a tiny end-to-end run, exact resume, bad flags, and the
saved folder loading in a fresh process with diffusers alone. Device placement: tests/training/test_device_placement.py
(its `sr3` case)."""

import json
import os
import subprocess
import sys
import textwrap
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from custom_pipelines import SuperResolution, TutorialSuperResolutionPipeline
from schedulers import tutorial_math as tm
from training import train_unconditional as tu
from training.super_resolution import psnr, restoration_metrics

from .conftest import ROOT, read_losses, tiny_args

SR = ["--conditioning", "super_resolution", "--sr_factor", 4]  # 8x8 tiny digits from their 2x2 block means


class _RecordingModel(torch.nn.Module):
    """A 'network' that predicts 0 and records what it is fed."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x, t, class_labels))
        return Namespace(sample=torch.zeros_like(x[:, :1]))


def test_the_loss_feeds_x_t_then_the_noised_nearest_upsampled_block_means():
    settings = tu.resolve_settings(tu.parse_args([*map(str, SR), "--resolution", "8", "--sr_noise_level_max", "50"]))
    scheduler = tu.make_scheduler(settings, "ddpm")
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    model = _RecordingModel()
    tu.diffusion_loss(model, scheduler, {"images": x0}, settings, tu.step_generator(0, 0, 0, "cpu"))
    ((x, t, levels),) = model.calls

    g = tu.step_generator(0, 0, 0, "cpu")  # replay: ε, t, then the levels and the conditioning noise
    eps = torch.randn(x0.shape, generator=g)
    t_ref = torch.randint(0, 1000, (16,), generator=g)
    levels_ref = torch.randint(0, 51, (16,), generator=g)
    eps_c = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, t_ref) and torch.equal(levels, levels_ref) and levels.max() <= 50
    up = F.interpolate(F.avg_pool2d(x0, 4), scale_factor=4, mode="nearest")  # y = block means, then A⁺ y
    alpha_bar = scheduler.alpha_bar[levels]
    torch.testing.assert_close(x[:, :1], tm.q_sample(x0, eps, scheduler.alpha_bar[t]).float())
    torch.testing.assert_close(x[:, 1:], tm.q_sample(up, eps_c, alpha_bar).float())


def test_sr_noise_level_max_zero_conditions_on_a_all_but_noiseless_measurement():
    settings = tu.resolve_settings(tu.parse_args([*map(str, SR), "--resolution", "8", "--sr_noise_level_max", "0"]))
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    model = _RecordingModel()
    tu.diffusion_loss(model, tu.make_scheduler(settings, "ddpm"), {"images": x0}, settings, None)
    ((x, _, levels),) = model.calls
    assert levels.tolist() == [0] * 4
    assert (SuperResolution(4).A(x[:, 1:]) - SuperResolution(4).A(x0)).abs().max() < 0.06  # √(1-ᾱ_0) = 0.01


def test_a_tiny_run_leaves_a_super_resolution_pipeline_grid_and_metrics(tmp_path, tiny_config):
    out = tmp_path / "run"
    metrics = tu.main(tiny_args(tiny_config, out, *SR, "--max_train_steps", 3, "--eval_every_steps", 3))
    assert metrics["interrupted"] is False
    for key in ("psnr", "consistency_rmse", "restored_accuracy", "frechet_distance", "upsampled_psnr"):
        assert isinstance(metrics[key], float), key
    assert metrics["num_samples"] == 16 and metrics["noise_level"] == 20
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_tutorial_super_resolution", "TutorialSuperResolutionPipeline"]
    card = (out / "README.md").read_text()
    assert "--conditioning super_resolution" in card and "Super-resolution (SR3) x4: 2x2 -> 8x8" in card
    # The grid: 8 rows of (A⁺ y | sample | original), 8x8 images with 1-pixel gaps, enlarged 4x.
    grid = Image.open(out / "grids" / "final.png")
    assert grid.size == (4 * (3 * 9 + 1), 4 * (8 * 9 + 1))
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [3]

    pipe = TutorialSuperResolutionPipeline.from_pretrained(str(out))
    config = pipe.unet.config
    assert (config.in_channels, config.out_channels, config.class_embed_type) == (2, 1, "timestep")
    pipe.set_progress_bar_config(disable=True)
    y = torch.rand(3, 1, 2, 2)
    images = pipe(y, num_inference_steps=2, output_type="pt").images
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()

    # After training: the evaluation command restores held-out digits with any scheduler and noise level.
    from training import evaluate

    argv = [str(out), "--num_samples", "4", "--num_inference_steps", "2", "--noise_level", "0", "--scheduler", "euler"]
    scores = evaluate.main(argv)
    assert scores["scheduler"] == "EulerDiscreteScheduler" and scores["noise_level"] == 0
    assert {"psnr", "consistency_rmse", "restored_accuracy", "frechet_distance"} <= set(scores)
    with pytest.raises(SystemExit):
        evaluate.main([str(out), "--num_samples", "4", "--noise_level", "1000"])


def test_resume_from_latest_repeats_the_uninterrupted_run_exactly(tmp_path, tiny_config):
    # The stop falls mid-epoch with accumulation: the conditioning noise and levels come from the step generator.
    extra = [*SR, "--max_train_steps", 6, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 100]
    extra += ["--seed", 5, "--random_flip", "--sr_noise_level_max", 200, "--sr_noise_level", 10]
    full = tu.main(tiny_args(tiny_config, tmp_path / "full", *extra))
    assert full["global_step"] == 6
    first = tu.main(tiny_args(tiny_config, tmp_path / "cut", *extra), should_stop=lambda step: step == 3)
    assert first["interrupted"] is True
    second = tu.main(tiny_args(tiny_config, tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest"))
    assert second["global_step"] == 6
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "full")  # bit-for-bit
    name = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    full_w, cut_w = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
    assert all(torch.equal(full_w[k], cut_w[k]) for k in full_w)
    assert second["psnr"] == full["psnr"] and second["restored_accuracy"] == full["restored_accuracy"]


@pytest.mark.parametrize(
    "change, match",
    [
        (["--sr_factor", 2], r"--sr_factor: 4 in the checkpoint, 2 now"),
        (["--sr_noise_level_max", 10], r"--sr_noise_level_max: 100 in the checkpoint, 10 now"),
    ],
)
def test_a_resume_that_changes_the_sr_model_is_refused(tmp_path, tiny_config, change, match):
    out = tmp_path / "run"
    tu.main(tiny_args(tiny_config, out, *SR, "--max_train_steps", 2, "--checkpointing_steps", 2))
    resume = tiny_args(tiny_config, out, *SR, *change, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    with pytest.raises(tu.TrainingError, match=match):
        tu.main(resume)


def test_resuming_an_unconditional_checkpoint_as_sr3_is_refused(tmp_path, tiny_config):
    out = tmp_path / "run"
    tu.main(tiny_args(tiny_config, out, "--max_train_steps", 2, "--checkpointing_steps", 2))
    with pytest.raises(tu.TrainingError, match="--sr_factor: None in the checkpoint, 4 now.*class_embed_type"):
        tu.main(tiny_args(tiny_config, out, *SR, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sr_factor", "3"], "--sr_factor=3 must divide --resolution=16 and be >= 2; allowed: [2, 4, 8, 16]"),
        (["--sr_factor", "1"], "--sr_factor=1 must divide --resolution=16"),
        (["--sr_noise_level_max", "1000"], "--sr_noise_level_max=1000 must be a timestep in [0, 999]"),
        (["--sr_noise_level_max", "-1"], "--sr_noise_level_max=-1 must be a timestep in [0, 999]"),
        (["--sr_noise_level_max", "10", "--sr_noise_level", "20"], "--sr_noise_level=20 must be in [0, 10]"),
        (["--num_class_embeds", "10"], "--num_class_embeds=10 with --conditioning super_resolution"),
    ],
)
def test_bad_super_resolution_flags_are_cli_errors_naming_flag_value_and_allowed(capsys, argv, message):
    with pytest.raises(SystemExit):
        tu.parse_args(["--conditioning", "super_resolution", *argv])
    assert message in capsys.readouterr().err


def test_sr_flags_without_the_conditioning_and_unknown_conditionings_are_refused(capsys):
    with pytest.raises(SystemExit):
        tu.parse_args(["--sr_factor", "2"])
    assert "--sr_factor=2 applies only with --conditioning super_resolution" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tu.parse_args(["--conditioning", "inpainting"])
    assert "'none', 'super_resolution'" in capsys.readouterr().err


def test_defaults_resolve_once_and_unconditional_runs_record_no_sr_values():
    settings = tu.resolve_settings(tu.parse_args(["--conditioning", "super_resolution"]))
    assert (settings.sr_factor, settings.sr_noise_level_max, settings.sr_noise_level) == (4, 100, 20)
    capped = tu.resolve_settings(tu.parse_args(["--conditioning", "super_resolution", "--sr_noise_level_max", "5"]))
    assert capped.sr_noise_level == 5
    plain = tu.recorded_flags(tu.resolve_settings(tu.parse_args([])))
    # None, as a checkpoint written before these flags existed reads them: such checkpoints still resume.
    assert plain["conditioning"] == "none" and plain["sr_factor"] is None and plain["sr_noise_level_max"] is None
    model = tu.build_model(settings, channels=1)
    assert (model.config.in_channels, model.config.out_channels, model.config.class_embed_type) == (2, 1, "timestep")


def test_a_users_config_with_the_wrong_channels_is_refused(tmp_path, tiny_config):
    config = json.loads(open(tiny_config).read())
    config["in_channels"] = 3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(tu.TrainingError, match=r"in_channels=3.*SR3 takes 1 or 2 in_channels"):
        tu.main(tiny_args(str(path), tmp_path / "run", *SR, "--max_train_steps", 1))
    assert not (tmp_path / "run").exists()


def test_restoration_metrics_of_the_original_are_perfect():
    from training.data import load_digits_tensors

    images, labels = load_digits_tensors(16, "test")
    images, labels = images[:64], labels[:64]
    perfect = restoration_metrics(images, images, labels, 4)
    assert perfect["psnr"] == 100.0 and perfect["consistency_rmse"] == 0.0
    assert perfect["restored_accuracy"] > 0.9  # the classifier's accuracy on real held-out digits
    assert psnr(images, -images) < psnr(images, images * 0.9)


BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"schedulers", "custom_pipelines", "training"}:
                raise ImportError(name + " is blocked: only diffusers is installed here")
    sys.meta_path.insert(0, _Block())
    """
)


def test_the_saved_folder_samples_in_a_fresh_process_with_diffusers_alone(tmp_path, tiny_config):
    out = tmp_path / "run"
    tu.main(tiny_args(tiny_config, out, *SR, "--max_train_steps", 2))
    y = torch.rand(2, 1, 2, 2)
    torch.save(y, tmp_path / "y.pt")
    script = BLOCK + textwrap.dedent(
        f"""
        import json, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(torch.load({str(tmp_path / "y.pt")!r}), num_inference_steps=3, noise_level=5,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
        print("RESULT:" + json.dumps({{"name": type(pipe).__name__, "images": images.flatten().tolist()}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    (tmp_path / "cwd").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=180
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT:") :])
    pipe = TutorialSuperResolutionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(y, num_inference_steps=3, noise_level=5, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert res["name"] == "TutorialSuperResolutionPipeline"
    theirs = torch.tensor(res["images"]).reshape(ours.images.shape)
    torch.testing.assert_close(theirs, ours.images, atol=1e-5, rtol=0)  # float32 sums over other thread counts: ~2e-6
    assert str(ROOT) not in json.dumps(res)
