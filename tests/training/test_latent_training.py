"""Latent training (`--vae PATH`): a tiny run on a tiny random AutoencoderKL trains and resumes exactly, the UNet's shape
comes from the VAE (a conflicting one is refused naming both), the scaling-factor warning fires with the measured std
and stays quiet when the factor is right, and the saved folder holds TutorialLatentPipeline that samples in a fresh
process."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from training import train_unconditional as tu
from training.latent import LatentDiffusionObjective, find_vae_folder

from ..conftest import make_vae
from .conftest import read_losses, subprocess_env

# A UNet for 2-channel 4x4 latents (8x8 digits through a VAE with two blocks: f = 2).
TINY_LATENT_UNET = {
    "_class_name": "UNet2DModel",
    "sample_size": 4,
    "in_channels": 2,
    "out_channels": 2,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}


def save_vae(folder, scaling_factor=None, subfolder=None) -> str:
    """A tiny random AutoencoderKL (1 x 8x8 <-> 2 x 4x4) saved to `folder` (or `folder/subfolder`); its config holds
    `scaling_factor` when given, else none (diffusers then fills in 0.18215)."""
    vae = make_vae(latent_channels=2, seed=0)
    with torch.no_grad():  # latents of std ≈ 0.08: far from 1 both unscaled and times 0.18215
        vae.quant_conv.weight[:2] *= 0.3
        vae.quant_conv.bias[:2] *= 0.3
        vae.quant_conv.bias[2:] = -12.0  # log σ² of the posterior: σ ≈ 0.0025
    target = os.path.join(folder, subfolder) if subfolder else str(folder)
    vae.save_pretrained(target)
    config_path = os.path.join(target, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("scaling_factor")
    if scaling_factor is not None:
        config["scaling_factor"] = scaling_factor
    with open(config_path, "w") as f:
        json.dump(config, f)
    return str(folder)


def measured_std(vae_folder, n_batches=4) -> float:
    """std of posterior samples of the first training images (not the run's draws, nor its shuffled order: close)."""
    from training.data import load_digits_tensors

    vae = AutoencoderKL.from_pretrained(find_vae_folder(vae_folder)).eval()
    images, _ = load_digits_tensors(8, "train")
    with torch.no_grad():
        z = vae.encode(images[: 8 * n_batches]).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    return float(z.std())


@pytest.fixture(scope="module")
def latent_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("latent_config") / "config.json"
    path.write_text(json.dumps(TINY_LATENT_UNET))
    return str(path)


def latent_args(vae, output_dir, *extra, config=None) -> list:
    """argv of a seconds-long latent run: 8x8 digits, 64 images, batch 8, 5 DDIM steps, 16 eval samples, float32."""
    args = ["--vae", str(vae), "--resolution", "8", "--max_train_samples", "64", "--train_batch_size", "8"]
    args += ["--eval_batch_size", "16", "--ddpm_num_inference_steps", "5", "--output_dir", str(output_dir)]
    args += ["--logger", "none", "--lr_warmup_steps", "2", "--mixed_precision", "no"]
    if config is not None:
        args += ["--model_config_name_or_path", config]
    return args + [str(a) for a in extra]


def test_a_latent_run_trains_resumes_exactly_and_saves_a_latent_pipeline(tmp_path, latent_config):
    vae = save_vae(tmp_path / "ae", scaling_factor=1.0, subfolder="vae")  # a pipeline-style folder: VAE in vae/
    extra = ["--max_train_steps", 6, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 100, "--seed", 3]
    full = tu.main(latent_args(vae, tmp_path / "full", *extra, config=latent_config))
    assert full["global_step"] == 6 and "frechet_distance" in full  # decoded samples went through the digits metrics
    cut = latent_args(vae, tmp_path / "cut", *extra, config=latent_config)
    assert tu.main(cut, should_stop=lambda step: step == 3)["interrupted"] is True
    second = tu.main(cut + ["--resume_from_checkpoint", "latest"])
    assert second["global_step"] == 6
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "full")  # bit-for-bit: the posterior draws too
    name = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    full_w, cut_w = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
    assert all(torch.equal(full_w[k], cut_w[k]) for k in full_w)
    assert second["frechet_distance"] == full["frechet_distance"]

    folder = tmp_path / "full"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_tutorial_latent", "TutorialLatentPipeline"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    saved_vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    original = load_file(tmp_path / "ae" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved_vae[k], original[k]) for k in original)  # the frozen VAE, unchanged, in float32
    # Scaled latents have unit variance, not a range: the saved sampler must not clip x̂_0 to [-1, 1] (notebook 15).
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False

    script = f"""
import json, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
print("RESULT:" + json.dumps(dict(cls=type(pipe).__name__, shape=list(images.shape), finite=bool((images == images).all()))))
"""
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT:")][-1][7:])
    assert result == {"cls": "TutorialLatentPipeline", "shape": [3, 8, 8, 1], "finite": True}


def test_the_unet_shape_comes_from_the_vae(tmp_path):
    vae = save_vae(tmp_path / "ae", scaling_factor=1.0)
    objective = LatentDiffusionObjective()
    settings = objective.resolve_settings(tu.parse_args(latent_args(vae, tmp_path / "run")))
    model = objective.build_model(settings)
    assert (model.config.in_channels, model.config.out_channels, model.config.sample_size) == (2, 2, 4)


def test_a_conflicting_unet_config_is_refused_naming_both(tmp_path, tiny_config):
    vae = save_vae(tmp_path / "ae", scaling_factor=1.0)
    with pytest.raises(
        tu.TrainingError,
        match=r"in_channels=1, out_channels=1, sample_size=8; --vae=.* makes latents "
        r"of 2 channel\(s\) at 4x4 \(--resolution 8 / 2\)",
    ):
        tu.main(latent_args(vae, tmp_path / "run", "--max_train_steps", 1, config=tiny_config))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["--resolution", "16"],
            r"--resolution=16 does not fit --vae=.*sample_size=8 and downsamples x2; pass --resolution 8",
        ),
        (["--num_channels", "3"], r"encodes 1-channel images; the data has 3"),
    ],
)
def test_a_vae_that_does_not_fit_the_data_is_refused(tmp_path, argv, match):
    vae = save_vae(tmp_path / "ae", scaling_factor=1.0)
    with pytest.raises(tu.TrainingError, match=match):
        tu.main(latent_args(vae, tmp_path / "run", "--max_train_steps", 1) + argv)


def test_a_path_without_a_vae_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(tu.TrainingError, match=r"holds no AutoencoderKL: expected a config.json .* vae/ subfolder"):
        tu.main(latent_args(tmp_path / "empty", tmp_path / "run", "--max_train_steps", 1))


@pytest.mark.parametrize("argv", [["--num_class_embeds", "10"], ["--conditioning", "super_resolution"]])
def test_latent_training_is_unconditional(capsys, argv):
    with pytest.raises(SystemExit):
        tu.parse_args(["--vae", "x", *argv])
    assert "--vae='x' with" in capsys.readouterr().err


def test_changing_the_vae_on_resume_is_refused(tmp_path, latent_config):
    a, b = save_vae(tmp_path / "a", scaling_factor=1.0), save_vae(tmp_path / "b", scaling_factor=1.0)
    tu.main(latent_args(a, tmp_path / "run", "--max_train_steps", 2, "--checkpointing_steps", 2, config=latent_config))
    resume = latent_args(
        b, tmp_path / "run", "--max_train_steps", 4, "--resume_from_checkpoint", "latest", config=latent_config
    )
    with pytest.raises(tu.TrainingError, match=r"--vae: .* in the checkpoint, .* now"):
        tu.main(resume)


@pytest.mark.parametrize("scaling_factor", [None, 0.18215, 1.0, "measured"])
def test_the_scaling_factor_warning_names_the_measured_std(tmp_path, latent_config, caplog, scaling_factor):
    probe = save_vae(tmp_path / "probe", scaling_factor=1.0)
    std = measured_std(probe)
    value = 1 / std if scaling_factor == "measured" else scaling_factor
    vae = save_vae(tmp_path / "ae", scaling_factor=value)
    effective = 0.18215 if value is None else value
    caplog.set_level(logging.WARNING, logger="train_unconditional")
    objective = LatentDiffusionObjective()
    argv = latent_args(vae, tmp_path / "run", "--max_train_steps", 4, "--eval_batch_size", 2, config=latent_config)
    tu.main(argv, objective=objective)
    warnings = [r.getMessage() for r in caplog.records if "latents' std measured" in r.getMessage()]
    far = not 0.5 <= effective * objective.latent_std.value <= 2.0
    assert far == (scaling_factor != "measured")  # the tiny VAE's std is far from 1/0.18215 and from 1
    if not far:
        assert warnings == [] and objective.scaling_warning is None
        return
    assert len(warnings) == 1
    measured = objective.latent_std.value
    assert measured == pytest.approx(std, rel=0.2)
    assert f"is {measured:.4g}" in warnings[0] and f"1 / std = {1 / measured:.4g}" in warnings[0]
    if scaling_factor is None:
        assert "no scaling_factor in its config" in warnings[0]
    elif scaling_factor == 0.18215:
        assert "Stable Diffusion's default scaling_factor 0.18215" in warnings[0]


@pytest.mark.parametrize("shift_factor", [None, 0.25])
def test_the_unet_is_trained_on_scaled_posterior_samples(tmp_path, shift_factor):
    """z̃ = s (z − b), z ~ q(z | x) drawn from the micro-batch's generator (LDM App. G)."""
    from types import SimpleNamespace

    vae = save_vae(tmp_path / "ae", scaling_factor=4.0)
    if shift_factor is not None:
        config = json.loads((tmp_path / "ae" / "config.json").read_text())
        (tmp_path / "ae" / "config.json").write_text(json.dumps({**config, "shift_factor": shift_factor}))
    objective = LatentDiffusionObjective()
    settings = objective.resolve_settings(tu.parse_args(latent_args(vae, tmp_path / "run")))
    run = SimpleNamespace(settings=settings, accelerator=SimpleNamespace(device=torch.device("cpu")))
    objective.prepare(run)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = objective.encode(run, images, torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = objective.vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents, (z - (shift_factor or 0.0)) * 4.0)
