"""The digits metrics: the Fréchet distance is right, and it ranks real digits far above noise and untrained models."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from schedulers import TutorialDDIMScheduler
from training import evaluate
from training.data import load_digits_tensors
from training.digits_classifier import CLASSIFIER_WEIGHTS, load_classifier
from training.metrics import digits_metrics, frechet_distance
from training.sampling import sample_sharded

from .conftest import TINY_UNET


def test_frechet_distance_matches_scipy_and_the_gaussian_closed_form():
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g) @ torch.randn(5, 5, generator=g)
    b = torch.randn(300, 5, generator=g) * 2 + 1
    mu_a, mu_b = a.double().mean(0).numpy(), b.double().mean(0).numpy()
    ca, cb = np.cov(a.double().numpy(), rowvar=False), np.cov(b.double().numpy(), rowvar=False)
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_shipped_classifier_is_small_and_accurate_on_held_out_digits():
    assert os.path.getsize(CLASSIFIER_WEIGHTS) < 300_000
    for resolution in (8, 16, 32):
        x, y = load_digits_tensors(resolution, "test")
        accuracy = (load_classifier()(x).argmax(-1) == y).float().mean()
        assert accuracy > 0.95, (resolution, accuracy)


def test_metric_ranks_real_digits_far_above_noise_and_an_untrained_model():
    real_train, _ = load_digits_tensors(16, "train")  # real digits the reference set (held-out split) never saw
    real = digits_metrics(real_train[:400])
    noise = digits_metrics(torch.rand(400, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    unet = UNet2DModel(**{**{k: v for k, v in TINY_UNET.items() if k != "_class_name"}, "sample_size": 16})
    untrained = digits_metrics(sample_sharded(unet.eval(), TutorialDDIMScheduler(), 400, 5))
    assert real["frechet_distance"] * 20 < noise["frechet_distance"]
    assert real["frechet_distance"] * 20 < untrained["frechet_distance"]
    assert real["class_coverage"] == 1.0 and real["mean_confidence"] > 0.9
    assert sum(real["class_histogram"]) == 400 and real["classifier_test_accuracy"] > 0.95
    constant = digits_metrics(torch.zeros(40, 1, 16, 16) - 1)
    assert constant["class_coverage"] == 0.1  # every sample lands in one class


def test_cli_evaluates_a_saved_folder_with_any_scheduler(tmp_path):
    from custom_pipelines import TutorialUnconditionalPipeline

    unet = UNet2DModel(**{k: v for k, v in TINY_UNET.items() if k != "_class_name"})
    TutorialUnconditionalPipeline(unet=unet, scheduler=TutorialDDIMScheduler()).save_pretrained(tmp_path / "pipe")
    metrics = evaluate.main(
        [
            str(tmp_path / "pipe"),
            "--scheduler",
            "diffusers-ddim",
            "--num_inference_steps",
            "3",
            "--num_samples",
            "20",
            "--output",
            str(tmp_path / "m.json"),
            "--grid",
            str(tmp_path / "g.png"),
        ]
    )
    assert metrics["scheduler"] == "DDIMScheduler" and metrics["num_samples"] == 20
    with open(tmp_path / "m.json") as f:
        assert json.load(f)["frechet_distance"] == metrics["frechet_distance"]
    assert (tmp_path / "g.png").exists()
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "nope")])


def test_sharded_sampling_does_not_depend_on_batching():
    unet = UNet2DModel(**{k: v for k, v in TINY_UNET.items() if k != "_class_name"}).eval()
    whole = sample_sharded(unet, TutorialDDIMScheduler(), 6, 3, seed=1)
    pieces = sample_sharded(unet, TutorialDDIMScheduler(), 6, 3, seed=1, batch_size=4)
    torch.testing.assert_close(whole, pieces, atol=1e-5, rtol=0)
    assert not torch.allclose(whole[0], whole[1])


def test_cli_reports_both_likelihoods_of_the_shipped_model_and_they_see_structure():
    """`--likelihood_samples` adds the variational bound and the ODE likelihood (bits/dim) of held-out 8-bit digits.

    Both are finite and positive, and the trained model assigns real digits a clearly better bound than the same
    pixels shuffled (same histogram, no digit structure), which a likelihood that ignored the model could not do.
    """
    from custom_pipelines import TutorialUnconditionalPipeline

    folder = os.path.join(os.path.dirname(evaluate.__file__), "pretrained", "digits-ddpm")
    metrics = evaluate.main(
        [
            folder,
            "--num_samples",
            "4",
            "--num_inference_steps",
            "2",
            "--likelihood_samples",
            "4",
            "--elbo_steps",
            "20",
            "--ode_tolerance",
            "1e-2",
        ]
    )
    assert metrics["likelihood_num_images"] == 4 and metrics["ode_num_evals"] > 0
    # 8-bit data: an upper bound on the discrete NLL lies in (0, 8] for any sensible model; the 20-step bound is loose
    assert 0 < metrics["ode_bits_per_dim"] < 8 and 0 < metrics["elbo_bits_per_dim"] < 100

    pipe = TutorialUnconditionalPipeline.from_pretrained(folder)
    images, _ = load_digits_tensors(resolution=pipe.unet.config.sample_size, split="test")
    images = torch.round((images[:4] + 1) * 127.5) / 127.5 - 1
    perm = torch.randperm(images[0].numel(), generator=torch.Generator().manual_seed(0))
    shuffled = images.flatten(1)[:, perm].reshape(images.shape)
    real_bpd = pipe.variational_bound(images, num_steps=20, generator=torch.Generator().manual_seed(0)).bits_per_dim
    shuffled_bpd = pipe.variational_bound(
        shuffled, num_steps=20, generator=torch.Generator().manual_seed(0)
    ).bits_per_dim
    assert float(shuffled_bpd.mean()) > float(real_bpd.mean()) + 0.5, (real_bpd, shuffled_bpd)


# ---- user errors at the door (issue 11.10): one line, exit status 2, nothing sampled ------------------------------------
def _save_tiny_pipeline(folder, **unet_overrides):
    from custom_pipelines import TutorialUnconditionalPipeline

    config = {**{k: v for k, v in TINY_UNET.items() if k != "_class_name"}, **unet_overrides}
    TutorialUnconditionalPipeline(unet=UNet2DModel(**config), scheduler=TutorialDDIMScheduler()).save_pretrained(
        folder
    )


@pytest.fixture
def cli_error(monkeypatch, capsys):
    """`run(argv) -> str`: the CLI's one error line for a user error, checked to come before any sampling."""

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the error was found")

    monkeypatch.setattr(evaluate, "sample_sharded", no_sampling)

    def run(argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (line,) = [line for line in err.splitlines() if line.startswith("evaluate.py: error: ")]
        return line

    return run


def test_cli_refuses_a_three_channel_model_before_sampling(tmp_path, cli_error):
    _save_tiny_pipeline(tmp_path / "rgb", in_channels=3, out_channels=3)
    line = cli_error([str(tmp_path / "rgb"), "--num_samples", "4", "--num_inference_steps", "1"])
    assert "in_channels=3" in line and "1-channel" in line and str(tmp_path / "rgb") in line


def test_cli_names_a_missing_unet_folder(tmp_path, cli_error):
    _save_tiny_pipeline(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "unet")
    line = cli_error([str(tmp_path / "pipe"), "--num_samples", "4"])
    assert "unet/" in line and str(tmp_path / "pipe") in line and "connect" not in line


@pytest.mark.parametrize("damaged", ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"])
def test_cli_names_a_corrupt_json_file(tmp_path, cli_error, damaged):
    _save_tiny_pipeline(tmp_path / "pipe")
    (tmp_path / "pipe" / damaged).write_text('{"_class_name": "UNet2D')  # a write cut short
    line = cli_error([str(tmp_path / "pipe"), "--num_samples", "4"])
    assert str(tmp_path / "pipe" / damaged) in line and "not a valid JSON" in line


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--num_samples", "1"], "--num_samples=1 must be >= 2"),
        (["--num_inference_steps", "0"], "--num_inference_steps=0 must be >= 1"),
        (["--likelihood_samples", "-1"], "--likelihood_samples=-1 must be >= 0"),
    ],
)
def test_cli_refuses_bad_flags_before_sampling(tmp_path, cli_error, flags, match):
    _save_tiny_pipeline(tmp_path / "pipe")
    assert match in cli_error([str(tmp_path / "pipe"), *flags])


# ---- --scheduler: every scheduler of ours (issue 15.3) ------------------------------------------------------------------
@pytest.mark.parametrize("name", [name for name, _ in evaluate.OUR_SCHEDULERS])
def test_cli_samples_the_shipped_model_with_each_of_our_schedulers(name):
    folder = os.path.join(os.path.dirname(evaluate.__file__), "pretrained", "digits-ddpm")
    metrics = evaluate.main([folder, "--scheduler", name, "--num_samples", "4", "--num_inference_steps", "3"])
    assert metrics["scheduler"] == dict(evaluate.OUR_SCHEDULERS)[name].__name__ and metrics["num_samples"] == 4
    assert np.isfinite(metrics["frechet_distance"])


def test_every_scheduler_of_ours_is_a_choice():
    import schedulers

    ours = {c for c in vars(schedulers).values() if isinstance(c, type) and c.__name__.endswith("Scheduler")}
    assert ours == {klass for _, klass in evaluate.OUR_SCHEDULERS}


def test_evaluate_folder_refuses_an_unknown_scheduler_naming_the_choices(tmp_path):
    _save_tiny_pipeline(tmp_path / "pipe")
    with pytest.raises(evaluate.EvaluationError, match=r"--scheduler='heun' is not supported; choose one of \("):
        evaluate.evaluate_folder(str(tmp_path / "pipe"), scheduler="heun")


# ---- latent folders (issue 25): samples are decoded through the folder's VAE before they are scored ------------------
def _save_tiny_latent_pipeline(folder, out_channels=1):
    """A TutorialLatentPipeline of random weights: the tiny VAE of the latent-training tests (8x8 digits <-> 2 x 4x4
    latents), the decoder made `out_channels`-channel, and a UNet for its latents."""
    from diffusers import AutoencoderKL

    from custom_pipelines import TutorialLatentPipeline

    from .test_latent_training import TINY_LATENT_UNET, save_vae

    vae = AutoencoderKL.from_pretrained(save_vae(folder / "ae", scaling_factor=2.0))
    if out_channels != 1:
        vae = AutoencoderKL.from_config({**vae.config, "out_channels": out_channels})
    unet = UNet2DModel(**{k: v for k, v in TINY_LATENT_UNET.items() if k != "_class_name"})
    pipe = TutorialLatentPipeline(vae=vae, unet=unet, scheduler=TutorialDDIMScheduler())
    pipe.save_pretrained(folder / "pipe")
    return pipe, str(folder / "pipe")


def test_cli_scores_a_latent_folder_on_its_decoded_samples(tmp_path):
    pipe, folder = _save_tiny_latent_pipeline(tmp_path)
    metrics = evaluate.main([folder, "--num_inference_steps", "3", "--num_samples", "12", "--seed", "4"])
    decoded = sample_sharded(pipe.unet.eval(), pipe.scheduler, 12, 3, seed=4, vae=pipe.vae.eval())
    assert decoded.shape == (12, 1, 8, 8)  # pixels, not the 2 x 4x4 latents
    assert metrics["frechet_distance"] == pytest.approx(digits_metrics(decoded)["frechet_distance"], rel=1e-6)
    assert metrics["num_samples"] == 12 and metrics["scheduler"] == "TutorialDDIMScheduler"


def test_cli_refuses_a_latent_folder_whose_vae_is_not_one_channel_or_likelihoods(tmp_path, cli_error):
    _, rgb = _save_tiny_latent_pipeline(tmp_path / "rgb", out_channels=3)
    line = cli_error([rgb, "--num_samples", "4", "--num_inference_steps", "1"])
    assert "VAE decodes to out_channels=3" in line and "1-channel" in line and rgb in line
    _, gray = _save_tiny_latent_pipeline(tmp_path / "gray")
    line = cli_error([gray, "--num_samples", "4", "--likelihood_samples", "2"])
    assert "--likelihood_samples=2" in line and "TutorialLatentPipeline" in line
