"""Every long phase shows progress: sampling draws one tqdm bar on stderr (main process only) and the log names it."""

import logging
import re
from types import SimpleNamespace

import torch
from diffusers import UNet2DModel

from custom_pipelines import TutorialUnconditionalPipeline
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from training import demo, evaluate
from training import train_unconditional as tu
from training.sampling import sample_sharded

from .conftest import TINY_UNET, tiny_args


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**{k: v for k, v in TINY_UNET.items() if k != "_class_name"}).eval()


def _bar_lines(err: str, desc: str) -> list:
    """The refreshes of the tqdm bar named `desc` in captured stderr (tqdm rewrites its line with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", err) if line.startswith(f"{desc}:")]


def test_sharded_sampling_counts_every_denoising_step_of_every_chunk_on_stderr(capsys):
    unet = _tiny_unet()
    quiet = sample_sharded(unet, TutorialDDIMScheduler(), 6, 3, seed=1, batch_size=4)
    assert capsys.readouterr().err == ""  # no desc: no bar, as in the notebooks

    shown = sample_sharded(unet, TutorialDDIMScheduler(), 6, 3, seed=1, batch_size=4, desc="tiny samples")
    captured = capsys.readouterr()
    bars = _bar_lines(captured.err, "tiny samples")
    assert bars and "/6 " in bars[0]  # 2 chunks (4 + 2 samples) x 3 steps
    assert "100%" in bars[-1] and "6/6" in bars[-1]
    assert captured.out == ""  # the bar goes to stderr only
    assert torch.equal(shown, quiet)  # the bar changes no sample


def test_no_bar_on_a_process_that_is_not_the_local_main_one(capsys):
    # Rank 1 of 2: it samples indices 1, 3, 5 and its "gather" hands back its own samples twice (no process group).
    accelerator = SimpleNamespace(
        process_index=1,
        num_processes=2,
        is_local_main_process=False,
        device=torch.device("cpu"),
        gather=lambda t: torch.cat([t, t]),
    )
    sample_sharded(_tiny_unet(), TutorialDDIMScheduler(), 6, 3, accelerator=accelerator, desc="rank 1 samples")
    assert "rank 1 samples" not in capsys.readouterr().err

    accelerator.is_local_main_process = True
    sample_sharded(_tiny_unet(), TutorialDDIMScheduler(), 6, 3, accelerator=accelerator, desc="local main samples")
    assert "3/3" in _bar_lines(capsys.readouterr().err, "local main samples")[-1]  # 3 samples on this process


def test_training_logs_its_final_phases_and_shows_the_validation_bar(tmp_path, tiny_config, capsys, caplog):
    caplog.set_level(logging.INFO)
    tu.main(tiny_args(tiny_config, tmp_path / "run", "--max_train_steps", 3, "--checkpointing_steps", 100))
    messages = [r.getMessage() for r in caplog.records]
    phases = ["final checkpoint: saving checkpoint-3", "final evaluation", "validation: sampling 16 images", "saving"]
    found = [next((i for i, m in enumerate(messages) if m.startswith(p)), None) for p in phases]
    assert None not in found and found == sorted(found), messages  # each phase named, in the order they run
    assert f"saving the pipeline folder to {tmp_path / 'run'}" in messages
    bars = _bar_lines(capsys.readouterr().err, "validation samples (final)")
    assert bars and "5/5" in bars[-1]  # one chunk of 16 samples x 5 steps


def test_evaluate_folder_logs_the_evaluation_and_shows_its_bar(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    TutorialUnconditionalPipeline(unet=_tiny_unet(), scheduler=TutorialDDIMScheduler()).save_pretrained(tmp_path)
    evaluate.evaluate_folder(str(tmp_path), num_inference_steps=3, num_samples=6)
    assert any(r.getMessage().startswith("evaluation: sampling 6 images from") for r in caplog.records)
    assert "3/3" in _bar_lines(capsys.readouterr().err, "evaluation samples")[-1]


def test_demo_shows_one_bar_per_sampler(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(demo, "SAMPLERS", (("ddpm-7", TutorialDDPMScheduler, 7), ("ddim-2", TutorialDDIMScheduler, 2)))
    caplog.set_level(logging.INFO)
    TutorialUnconditionalPipeline(unet=_tiny_unet(), scheduler=TutorialDDIMScheduler()).save_pretrained(tmp_path / "m")
    demo.main(["--model", str(tmp_path / "m"), "--output_dir", str(tmp_path / "demo"), "--num_samples", "4"])
    messages = [r.getMessage() for r in caplog.records]
    assert "demo: sampling 4 images with TutorialDDPMScheduler, 7 steps" in messages
    err = capsys.readouterr().err
    assert "7/7" in _bar_lines(err, "demo: ddpm-7")[-1] and "2/2" in _bar_lines(err, "demo: ddim-2")[-1]


def test_a_multi_stage_scheduler_bar_counts_grid_entries(capsys):
    from diffusers import HeunDiscreteScheduler

    scheduler = HeunDiscreteScheduler()
    sample_sharded(_tiny_unet(), scheduler, 2, 4, desc="heun samples")
    entries = len(scheduler.timesteps)  # 2 N - 1: Heun evaluates the network twice per step but the last
    assert entries == 7
    assert f"{entries}/{entries}" in _bar_lines(capsys.readouterr().err, "heun samples")[-1]
