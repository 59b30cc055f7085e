"""The shipped digits model samples recognisable digits instantly; the demo writes its grids, comparison and metrics."""

import json
import os

import pytest
import torch
from diffusers import UNet2DModel

from custom_pipelines import TutorialClassConditionalPipeline, TutorialUnconditionalPipeline
from schedulers import TutorialDDIMScheduler
from training import demo
from training.metrics import digits_metrics
from training.sampling import sample_sharded

from .conftest import ROOT, TINY_UNET

PRETRAINED = ROOT / "training" / "pretrained" / "digits-ddpm"
PRETRAINED_CFG = ROOT / "training" / "pretrained" / "digits-cfg"
PRETRAINED_SR3 = ROOT / "training" / "pretrained" / "digits-sr3"


@pytest.mark.parametrize(
    "folder, command",
    [
        (PRETRAINED, "accelerate launch training/train_unconditional.py"),
        (
            PRETRAINED_CFG,
            "accelerate launch training/train_unconditional.py --num_class_embeds 10 --cond_drop_prob 0.1",
        ),
        (
            PRETRAINED_SR3,
            "accelerate launch training/train_unconditional.py --conditioning super_resolution --sr_factor 4",
        ),
    ],
    ids=lambda v: getattr(v, "name", ""),
)
def test_shipped_model_is_small_and_its_card_names_the_training_command(folder, command):
    assert sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) < 5_000_000
    assert command in (folder / "README.md").read_text()


def test_shipped_model_samples_digits_with_ddim_10_steps():
    pipe = TutorialUnconditionalPipeline.from_pretrained(str(PRETRAINED))
    ddim = TutorialDDIMScheduler.from_config(pipe.scheduler.config)
    samples = sample_sharded(pipe.unet.eval(), ddim, 128, 10, seed=0)
    metrics = digits_metrics(samples)
    # Real held-out digits score ~40-50 at this sample size, noise and untrained models > 500 (test_evaluate.py).
    assert metrics["frechet_distance"] < 150, metrics
    assert metrics["class_coverage"] >= 0.9 and metrics["mean_confidence"] > 0.8, metrics


def test_shipped_class_conditional_model_draws_the_requested_digit_and_guidance_helps():
    pipe = TutorialClassConditionalPipeline.from_pretrained(str(PRETRAINED_CFG))
    labels = torch.arange(100) % 10
    accuracy = {}
    for scale in (0.0, 2.0):  # w = 0 is the unconditional branch alone: it ignores the label
        ddim = TutorialDDIMScheduler.from_config(pipe.scheduler.config)
        samples = sample_sharded(pipe.unet.eval(), ddim, 100, 10, class_labels=labels, guidance_scale=scale)
        accuracy[scale] = digits_metrics(samples, class_labels=labels)["conditional_accuracy"]
    assert accuracy[2.0] > 0.85, accuracy  # ~0.94 measured at 256 samples, 50 steps
    assert accuracy[0.0] < 0.3, accuracy  # chance is 0.1: without guidance the label is not used


def test_shipped_sr3_model_restores_held_out_digits_from_4x4_far_better_than_upsampling(one_thread):
    from custom_pipelines import SuperResolution, TutorialSuperResolutionPipeline
    from training.data import load_digits_tensors
    from training.super_resolution import restoration_metrics, restore_sharded

    pipe = TutorialSuperResolutionPipeline.from_pretrained(str(PRETRAINED_SR3))
    original, labels = load_digits_tensors(16, "test")
    original, labels = original[:100], labels[:100]
    y = SuperResolution(4).A(original)
    ddim = TutorialDDIMScheduler.from_config(pipe.scheduler.config)
    restored = restore_sharded(pipe.unet.eval(), ddim, y, 10, noise_level=0)
    ours = restoration_metrics(restored, original, labels, 4)
    upsampled = restoration_metrics(SuperResolution(4).A_pinv(y), original, labels, 4)
    # Measured (2026-12-06, 100 digits, DDIM-10, noise level 0): accuracy 0.94, Fréchet 30, PSNR 24.2 dB, consistency
    # 0.011; nearest upsampling (A⁺ y): 0.83, 211, 15.5 dB.
    assert ours["restored_accuracy"] > 0.88 and ours["frechet_distance"] < 80, ours
    assert ours["psnr"] > upsampled["psnr"] + 5 and ours["consistency_rmse"] < 0.03, ours
    assert upsampled["restored_accuracy"] < ours["restored_accuracy"] and upsampled["frechet_distance"] > 150


def test_demo_writes_grids_comparison_and_metrics_for_three_samplers(tmp_path):
    unet = UNet2DModel(**{k: v for k, v in TINY_UNET.items() if k != "_class_name"})
    TutorialUnconditionalPipeline(unet=unet, scheduler=TutorialDDIMScheduler()).save_pretrained(tmp_path / "model")
    report = demo.main(
        ["--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "demo"), "--num_samples", "4"]
    )
    assert set(report) == {"ddpm-1000", "ddim-50", "ddim-10"}
    for name in report:
        assert (tmp_path / "demo" / f"{name}.png").exists() and report[name]["num_samples"] == 4
    assert (tmp_path / "demo" / "comparison.png").exists()
    with open(tmp_path / "demo" / "metrics.json") as f:
        assert json.load(f)["ddim-10"]["frechet_distance"] == report["ddim-10"]["frechet_distance"]
