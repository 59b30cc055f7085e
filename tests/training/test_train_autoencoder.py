"""training/train_autoencoder.py end to end on a tiny AutoencoderKL: the folder, its measured scaling_factor, the
held-out PSNR, exact resume, flags checked at the door, SIGTERM; and the shipped digits-vae."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from training import train_autoencoder as ta
from training import train_unconditional as tu
from training.data import load_digits_tensors

from .conftest import ROOT, read_losses, subprocess_env, training_in_background

SCRIPT = ROOT / "training" / "train_autoencoder.py"
SHIPPED = ROOT / "training" / "pretrained" / "digits-vae"


def ae_args(output_dir, *extra) -> list:
    """argv of a seconds-long run: 8x8 digits, 64 images, batch 8, a 2-block AutoencoderKL (4x4x4 latents)."""
    return [
        "--resolution",
        "8",
        "--downsample_factor",
        "2",
        "--block_out_channels",
        "8,16",
        "--max_train_samples",
        "64",
        "--train_batch_size",
        "8",
        "--max_train_steps",
        "6",
        "--lr_warmup_steps",
        "2",
        "--logger",
        "none",
        "--output_dir",
        str(output_dir),
        *map(str, extra),
    ]


def expected_latent_std(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """The std of posterior samples z = μ + σ ε over all latent values, from the posterior's moments (no sampling):
    Var z = E μ² - (E μ)² + E σ²."""
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    mean, var = posterior.mean.double(), posterior.var.double()
    return math.sqrt(mean.pow(2).mean() - mean.mean() ** 2 + var.mean())


def held_out_psnr(vae: AutoencoderKL, resolution: int) -> float:
    """PSNR (dB, images in [0, 1]) of D(μ(x)) on the digits test split, averaged over images."""
    images, _ = load_digits_tensors(resolution, "test")
    with torch.no_grad():
        restored = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((restored - images) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


ONLY_DIFFUSERS = """
import json, sys, torch
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained(__FOLDER__)
x = torch.zeros(2, 1, __RES__, __RES__)
z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
print("RESULT:" + json.dumps({
    "scaling_factor": vae.config.scaling_factor,
    "latent_shape": list(z.shape),
    "decoded_shape": list(vae.decode(z / vae.config.scaling_factor).sample.shape),
    "ours": sorted(m for m in sys.modules if m.split(".")[0] in ("schedulers", "custom_pipelines", "training")),
}))
"""


def load_in_fresh_process(folder, resolution: int, cwd) -> dict:
    code = ONLY_DIFFUSERS.replace("__FOLDER__", repr(str(folder))).replace("__RES__", str(resolution))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=subprocess_env(PYTHONPATH=""), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.split("RESULT:")[1])


def test_the_folder_is_an_autoencoder_with_scaling_factor_one_over_the_measured_std(tmp_path):
    out = tmp_path / "run"
    metrics = ta.main(ae_args(out))
    assert metrics["interrupted"] is False and metrics["global_step"] == 6

    # The value written is 1 / std of the latents of the 64 training images (whole batches of 8: all of them),
    # checked against the std that the saved model's posterior moments give (independent of the run's sampling; the
    # sampled std is within a few sampling errors of it: 4096 values, ~1.1 % relative).
    vae = AutoencoderKL.from_pretrained(out)
    images = load_digits_tensors(8, "train")[0][:64]
    expected = expected_latent_std(vae, images)
    assert abs(expected - 1) > 0.05  # so that std and 1 / std are told apart by the check below
    assert metrics["num_images_encoded"] == 64 and metrics["num_latent_values"] == 64 * 4 * 4 * 4
    assert vae.config.scaling_factor == pytest.approx(1 / expected, rel=0.04)
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"], rel=1e-6)
    assert metrics["latent_std_expected"] == pytest.approx(expected, rel=1e-4)
    with open(out / "metrics.json") as f:
        final = json.load(f)["final"]
    assert final["scaling_factor"] == pytest.approx(1 / final["latent_std"], rel=1e-12)

    # PSNR on the 359 held-out digits, recomputed here from the saved folder.
    assert metrics["psnr"] == pytest.approx(held_out_psnr(vae, 8), abs=1e-3)
    assert metrics["psnr_split"] == "the digits test split (359 held-out images)"

    card = (out / "README.md").read_text()
    assert "accelerate launch training/train_autoencoder.py --resolution 8" in card
    assert f"{metrics['scaling_factor']:.6g}" in card and f"{metrics['psnr']:.2f} dB" in card
    assert (out / "grids" / "final.png").exists()

    # With diffusers alone, in a fresh process.
    res = load_in_fresh_process(out, 8, tmp_path)
    assert res["ours"] == []
    assert res["scaling_factor"] == pytest.approx(metrics["scaling_factor"], rel=1e-6)
    assert res["latent_shape"] == [2, 4, 4, 4] and res["decoded_shape"] == [2, 1, 8, 8]


def test_off_the_digits_the_psnr_is_that_of_the_encoded_training_images(tmp_path):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(24):  # 8x8 RGB images
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i:02d}.png")
    argv = ae_args(tmp_path / "run", "--train_data_dir", data, "--scaling_samples", 16)
    argv[argv.index("--max_train_samples") : argv.index("--max_train_samples") + 2] = []
    metrics = ta.main(argv)
    assert metrics["num_images_encoded"] == 16  # two whole batches of 8
    assert metrics["psnr_split"] == "16 training images (no held-out split off the digits)"
    vae = AutoencoderKL.from_pretrained(tmp_path / "run")
    assert vae.config.in_channels == 3 and vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    extra = ["--seed", 3, "--random_flip", "--reconstruction_loss", "l2", "--kl_weight", 1e-3]
    full = ta.main(ae_args(tmp_path / "full", *extra))
    first = ta.main(ae_args(tmp_path / "cut", *extra), should_stop=lambda s: s == 4)
    assert first["interrupted"] is True and first["global_step"] == 4
    assert not (tmp_path / "cut" / "config.json").exists()  # no model from an unfinished run
    second = ta.main(ae_args(tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest"))
    assert second["global_step"] == 6

    losses_full, losses_cut = read_losses(tmp_path / "full"), read_losses(tmp_path / "cut")
    assert sorted(losses_cut) == list(range(1, 7)) and losses_cut == losses_full  # bit for bit
    weights = [load_file(tmp_path / run / "diffusion_pytorch_model.safetensors") for run in ("full", "cut")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert second["scaling_factor"] == full["scaling_factor"] and second["psnr"] == full["psnr"]


def test_a_resume_that_changes_the_objective_is_refused(tmp_path):
    out = tmp_path / "run"
    ta.main(ae_args(out, "--checkpointing_steps", 2), should_stop=lambda s: s == 2)
    with pytest.raises(tu.TrainingError, match=r"--kl_weight: 1e-06 in the checkpoint, 0.001 now"):
        ta.main(ae_args(out, "--kl_weight", 1e-3, "--resume_from_checkpoint", "latest"))
    with pytest.raises(tu.TrainingError, match=r"--latent_channels: 4 in the checkpoint, 8 now"):
        ta.main(ae_args(out, "--latent_channels", 8, "--resume_from_checkpoint", "latest"))


def test_flags_of_the_autoencoder_are_checked_at_the_door(capsys):
    for bad, named in (
        (["--downsample_factor", "3"], "argument --downsample_factor: invalid choice: 3 (choose from 1, 2, 4, 8)"),
        (
            ["--reconstruction_loss", "l3"],
            "argument --reconstruction_loss: invalid choice: 'l3' (choose from 'l1', 'l2')",
        ),
        (["--resolution", "30"], "--resolution=30 must be a multiple of --downsample_factor=4; e.g. 28 or 32"),
        (["--block_out_channels", "8,16"], "--block_out_channels='8,16' must list 3 positive multiples"),
        (["--block_out_channels", "8,x,16"], "--block_out_channels='8,x,16' must be comma-separated integers"),
        (["--norm_num_groups", "5"], "--norm_num_groups=5 must divide every block's channels (16,32,64)"),
        (["--kl_weight", "-1"], "--kl_weight=-1.0 must be a finite number >= 0"),
        (["--latent_channels", "0"], "--latent_channels=0 must be >= 1"),
        (["--num_class_embeds", "10"], "--num_class_embeds=10 does not apply to the autoencoder"),
        (["--vae", "x"], "--vae='x' does not apply to the autoencoder"),
        (["--conditioning", "super_resolution"], "--conditioning='super_resolution' does not apply"),
    ):
        with pytest.raises(SystemExit):
            ta.parse_autoencoder_args(bad)
        err = capsys.readouterr().err
        assert named in err, err


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    argv = ae_args(out, "--checkpointing_steps", 100000)
    argv[argv.index("--max_train_steps") + 1] = "100000"
    with training_in_background(argv, out, script=SCRIPT) as proc:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    (ckpt,) = tu.list_checkpoints(out)
    step = int(ckpt.rsplit("-", 1)[1])
    assert 1 <= step < 100000 and max(read_losses(out)) == step
    assert not (out / "config.json").exists()
    resumed = ta.main([*argv, "--resume_from_checkpoint", "latest"], should_stop=lambda s: s == step + 1)
    assert resumed["global_step"] == step + 1


@pytest.mark.skipif(not SHIPPED.exists(), reason="training/pretrained/digits-vae is not shipped")
def test_shipped_digits_vae_loads_with_diffusers_alone_and_its_numbers_hold(tmp_path):
    with open(SHIPPED / "metrics.json") as f:
        final = json.load(f)["final"]
    res = load_in_fresh_process(SHIPPED, 32, tmp_path)
    assert res["ours"] == [] and res["latent_shape"] == [2, 4, 8, 8] and res["decoded_shape"] == [2, 1, 32, 32]
    assert res["scaling_factor"] == pytest.approx(1 / final["latent_std"], rel=1e-6)
    vae = AutoencoderKL.from_pretrained(SHIPPED)
    images = load_digits_tensors(32, "train")[0]
    assert final["num_images_encoded"] <= len(images)
    assert vae.config.scaling_factor == pytest.approx(1 / expected_latent_std(vae, images), rel=0.02)
    assert held_out_psnr(vae, 32) == pytest.approx(final["psnr"], abs=0.01)
    assert not list(SHIPPED.glob("*.py"))  # a model folder: no code to generate (`make shipped` has nothing here)
    assert "accelerate launch training/train_autoencoder.py" in (SHIPPED / "README.md").read_text()


def test_push_to_hub_uploads_the_model_its_card_and_numbers(tmp_path, monkeypatch):
    # huggingface_hub's HfApi patched at its boundary (as in test_push_to_hub.py): nothing leaves the machine.
    hub, calls = tmp_path / "hub", []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls.append(("create_repo", repo_id, private, self.token))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, hub / repo_id)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    hub_flags = ["--push_to_hub", "--hub_model_id", "me/tiny-vae", "--hub_token", "hf_fake", "--hub_private_repo"]
    metrics = ta.main(ae_args(tmp_path / "run", *hub_flags))

    assert calls == [("create_repo", "me/tiny-vae", True, "hf_fake"), ("upload_folder", "me/tiny-vae")]
    repo = hub / "me" / "tiny-vae"
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert files == set(ta.UPLOADED)
    vae = AutoencoderKL.from_pretrained(repo)
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    with open(repo / "metrics.json") as f:
        assert json.load(f)["final"]["psnr"] == pytest.approx(metrics["psnr"])
    assert "accelerate launch training/train_autoencoder.py" in (repo / "README.md").read_text()
