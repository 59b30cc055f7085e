"""training/distill.py end to end on a tiny teacher: both methods run, resume exactly, and leave a few-step folder."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from custom_pipelines import TutorialUnconditionalPipeline
from custom_pipelines.tutorial_pipeline_folder import saved_entries
from schedulers import TutorialDDIMScheduler, TutorialDistilledScheduler
from training import distill
from training import train_unconditional as tu

from .conftest import ROOT, TINY_UNET, read_losses, subprocess_env, training_in_background


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> str:
    """A random tiny ε-prediction teacher folder (8x8): distillation's mechanics do not need a good teacher."""
    folder = tmp_path_factory.mktemp("teacher") / "tiny-ddpm"
    torch.manual_seed(0)
    unet = UNet2DModel(**{k: v for k, v in TINY_UNET.items() if not k.startswith("_")})
    TutorialUnconditionalPipeline(unet=unet, scheduler=TutorialDDIMScheduler()).save_pretrained(folder)
    return str(folder)


def distill_args(teacher, output_dir, method, *extra) -> list:
    """argv of a seconds-long run: 8x8 digits, 64 images, batch 8, 8 evaluation samples at 1, 2 and 4 steps."""
    steps = ["--start_steps", "4", "--steps_per_round", "3"] if method == "progressive" else ["--max_train_steps", "6"]
    return [
        "--teacher",
        teacher,
        "--method",
        method,
        "--resolution",
        "8",
        "--max_train_samples",
        "64",
        "--train_batch_size",
        "8",
        "--eval_batch_size",
        "8",
        "--logger",
        "none",
        "--output_dir",
        str(output_dir),
        *steps,
        *map(str, extra),
    ]


def _unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("method", ["progressive", "progressive-split", "consistency"])
def test_resume_repeats_the_uninterrupted_distillation_exactly(tmp_path, tiny_teacher, method):
    # progressive: 2 rounds of 3 updates (4 -> 2 -> 1 steps), or 2 then 4 (split); the stop at update 4 is inside
    # round 2, after the teacher was replaced by round 1's student: the resume must restore that teacher
    # (teacher.safetensors), the student, Adam's moments (cleared at the round's start), the EMA and the data
    # position. consistency: the stop at update 4 must restore the EMA target network (target.safetensors).
    extra = ["--seed", 3, "--random_flip"]
    if method == "progressive-split":
        method, extra = "progressive", [*extra, "--steps_per_round", "2,4"]
    full = distill.main(distill_args(tiny_teacher, tmp_path / "full", method, *extra))
    assert full["interrupted"] is False and full["global_step"] == 6

    first = distill.main(distill_args(tiny_teacher, tmp_path / "cut", method, *extra), should_stop=lambda s: s == 4)
    assert first["interrupted"] is True and first["global_step"] == 4
    frozen = "teacher.safetensors" if method == "progressive" else "target.safetensors"
    assert os.path.exists(tmp_path / "cut" / "checkpoint-4" / frozen)
    with open(tmp_path / "cut" / "checkpoint-4" / "training_state.json") as f:
        # one number is recorded as an int, as before per-round budgets, so such checkpoints still resume
        assert json.load(f)["flags"]["steps_per_round"] == (
            "2,4" if "2,4" in extra else 300 if method != "progressive" else 3
        )
    second = distill.main(
        distill_args(tiny_teacher, tmp_path / "cut", method, *extra, "--resume_from_checkpoint", "latest")
    )
    assert second["global_step"] == 6

    losses_full, losses_cut = read_losses(tmp_path / "full"), read_losses(tmp_path / "cut")
    assert sorted(losses_cut) == list(range(1, 7)) and losses_cut == losses_full  # bit for bit
    if "2,4" in extra:  # round 1's student was saved after update 2, not 3
        with open(tmp_path / "full" / "students" / "2-step" / "README.md") as f:
            assert "2,4 updates" in f.read()
    weights_full, weights_cut = _unet_weights(tmp_path / "full"), _unet_weights(tmp_path / "cut")
    assert all(torch.equal(weights_full[k], weights_cut[k]) for k in weights_full)


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_output_folder_samples_the_student_in_1_2_and_4_steps(tmp_path, tiny_teacher, method):
    out = tmp_path / "run"
    grids = ["--sample_timesteps", "999,599;999,499,299,149"] if method == "consistency" else []
    metrics = distill.main(distill_args(tiny_teacher, out, method, *grids))
    assert {"frechet_distance@1", "frechet_distance@2", "frechet_distance@4"} <= set(metrics)

    pipe = TutorialUnconditionalPipeline.from_pretrained(out)
    scheduler = pipe.scheduler
    assert isinstance(scheduler, TutorialDistilledScheduler)
    assert scheduler.config.distillation == method and scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.distilled_steps == ([1] if method == "progressive" else [1, 2, 4])
    visited = {1: [999], 2: [999, 599], 4: [999, 499, 299, 149]}  # consistency: the grids the run recorded
    if method == "progressive":
        visited = {1: [999], 2: [999, 499], 4: [999, 749, 499, 249]}  # the trailing grids it was distilled on
    for n in (1, 2, 4):  # no argument but the step count
        images = pipe(batch_size=2, num_inference_steps=n, output_type="pt").images
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
        assert pipe.scheduler.timesteps.tolist() == visited[n]
    card = (out / "README.md").read_text()
    assert "teacher: `tiny-ddpm`" in card and f"method: {method}" in card
    if method == "progressive":  # the student of round 1 (4 -> 2 steps) was kept, with its own step count
        with open(out / "students" / "2-step" / "scheduler" / "scheduler_config.json") as f:
            assert json.load(f)["distilled_steps"] == [2]

    # With diffusers alone, in a fresh process: the folder's own code runs (trust_remote_code).
    code = (
        "import sys; from diffusers import DiffusionPipeline; "
        f"p = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True); "
        "assert type(p.scheduler).__name__ == 'TutorialDistilledScheduler', type(p.scheduler); "
        "assert not any(m.split('.')[0] in ('schedulers', 'custom_pipelines', 'training') for m in sys.modules); "
        "print(p(batch_size=1, num_inference_steps=1, output_type='np').images.shape)"
    )
    env = subprocess_env(PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(1, 8, 8, 1)" in done.stdout


def test_flags_of_distillation_are_checked_at_the_door(capsys, tiny_teacher, tmp_path):
    for bad, named in (
        (["--method", "progressive", "--start_steps", "12"], "--start_steps=12"),
        (["--method", "progressive", "--max_train_steps", "5"], "--max_train_steps=5"),
        (["--method", "progressive", "--start_steps", "8", "--steps_per_round", "4,4"], "--steps_per_round='4,4'"),
        (["--method", "progressive", "--steps_per_round", "4,0,4"], "--steps_per_round='4,0,4'"),
        (["--target_ema_decay", "1.0"], "--target_ema_decay=1.0"),
        (["--num_class_embeds", "10"], "--num_class_embeds=10"),
        (["--sample_steps", "1,x"], "--sample_steps='1,x'"),
        (["--method", "progressive", "--sample_timesteps", "999,499"], "--sample_timesteps='999,499'"),
        (["--sample_timesteps", "999,999"], "--sample_timesteps='999,999'"),
        (["--sample_timesteps", "999,5;999,7"], "--sample_timesteps='999,5;999,7'"),
    ):
        with pytest.raises(SystemExit):
            distill.parse_distill_args(["--teacher", tiny_teacher, *bad])
        assert named in capsys.readouterr().err
    with pytest.raises(tu.TrainingError, match="not a pipeline folder"):
        distill.main(distill_args(str(tmp_path / "missing"), tmp_path / "out", "consistency"))


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_sigterm_saves_the_frozen_network_and_the_run_resumes(tmp_path, tiny_teacher, method):
    # distill.py as a script: SIGTERM mid-run saves a checkpoint with the round's teacher (progressive) or the target
    # network (consistency) and exits 0; `--resume_from_checkpoint latest` continues from it.
    out = tmp_path / "run"
    long = ["--steps_per_round", 100000] if method == "progressive" else ["--max_train_steps", 100000]
    argv = distill_args(tiny_teacher, out, method, *long, "--checkpointing_steps", 100000)
    with training_in_background(argv, out, script=ROOT / "training" / "distill.py") as proc:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    (ckpt,) = tu.list_checkpoints(out)
    step = int(ckpt.rsplit("-", 1)[1])
    assert 1 <= step < 100000 and max(read_losses(out)) == step
    frozen = "teacher.safetensors" if method == "progressive" else "target.safetensors"
    assert os.path.exists(os.path.join(ckpt, frozen))
    with open(out / "metrics.json") as f:
        assert json.load(f)["interrupted"] is True
    assert not (out / "model_index.json").exists()  # no folder from an unfinished run
    # The same flags (the budget is run-defining for progressive), stopped right after the next update.
    resumed = distill.main([*argv, "--resume_from_checkpoint", "latest"], should_stop=lambda s: s == step + 1)
    assert resumed["global_step"] == step + 1 and sorted(read_losses(out))[-1] == step + 1


def test_push_to_hub_uploads_the_distilled_folder(tmp_path, tiny_teacher, monkeypatch):
    # huggingface_hub's HfApi patched at its boundary (as in test_push_to_hub.py): nothing leaves the machine.
    hub, calls = tmp_path / "hub", []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls.append(("create_repo", repo_id, private, self.token))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message=None, create_pr=False, **kwargs):
        calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, hub / repo_id)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    hub_flags = ["--push_to_hub", "--hub_model_id", "me/tiny-cd", "--hub_token", "hf_fake", "--hub_private_repo"]
    distill.main(distill_args(tiny_teacher, tmp_path / "run", "consistency", *hub_flags))

    assert calls == [("create_repo", "me/tiny-cd", True, "hf_fake"), ("upload_folder", "me/tiny-cd")]
    repo = hub / "me" / "tiny-cd"
    files = {os.path.relpath(os.path.join(d, f), repo) for d, _, fs in os.walk(repo) for f in fs}
    assert {"model_index.json", "README.md", "unet/diffusion_pytorch_model.safetensors"} <= files
    assert "scheduler/scheduling_tutorial_distilled.py" in files  # the sampler's code travels with the folder
    assert not any(f.startswith(("checkpoint-", "logs", "grids", "losses")) for f in files)
    card = (repo / "README.md").read_text()
    assert "method: consistency distillation" in card and "teacher: `tiny-ddpm`" in card
    assert "accelerate launch training/distill.py" in card
    pipe = TutorialUnconditionalPipeline.from_pretrained(str(repo))
    assert pipe.scheduler.config.distillation == "consistency" and pipe.scheduler.config.distilled_steps == [1, 2, 4]
    images = pipe(batch_size=2, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def _files(folder) -> set:
    return {
        os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/") for d, _, fs in os.walk(folder) for f in fs
    }


def test_progressive_push_uploads_the_students_the_card_names_and_nothing_else(tmp_path, tiny_teacher, monkeypatch):
    # A simulated Hub that, like huggingface_hub, uploads only the files allow_patterns / ignore_patterns let through.
    hub, calls = tmp_path / "hub", []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls.append(("create_repo", repo_id, private, self.token))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append(("upload_folder", repo_id))
        kept = huggingface_hub.utils.filter_repo_objects(
            sorted(_files(folder_path)), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        )
        for name in kept:
            os.makedirs(os.path.dirname(hub / repo_id / name), exist_ok=True)
            shutil.copyfile(os.path.join(folder_path, name), hub / repo_id / name)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    strays = ["my_notes.txt", "students/my_notes.txt", "students/4-step/my_notes.txt"]

    def user_files(step):  # should_stop as a hook: round 1's student is saved at update 2, then the user adds files
        if step == 2:
            for name in strays:
                (out / name).write_text("the user's own file")
        return False

    # 3 rounds of 2 updates, 8 -> 4 -> 2 -> 1 steps: students/4-step/ and students/2-step/ beside the 1-step folder.
    hub_flags = ["--push_to_hub", "--hub_model_id", "me/tiny-pd", "--hub_token", "hf_fake", "--hub_private_repo"]
    argv = distill_args(tiny_teacher, out, "progressive", "--start_steps", 8, "--steps_per_round", 2)
    distill.main([*argv, "--checkpointing_steps", "2", "--sample_steps", "1", *hub_flags], should_stop=user_files)

    assert calls == [("create_repo", "me/tiny-pd", True, "hf_fake"), ("upload_folder", "me/tiny-pd")]  # one commit
    repo = hub / "me" / "tiny-pd"
    uploaded = _files(repo)
    # What the run's saves wrote (each save's entries, read from its model_index.json): the 1-step folder and every
    # students/<N>-step/ folder. All of it is uploaded, and nothing else: not the checkpoints, logs, grids, loss
    # record or metrics, nor the files the user put beside and inside the saves.
    students = sorted(f"students/{p.name}/" for p in (out / "students").iterdir() if (p / "model_index.json").exists())
    assert students == ["students/2-step/", "students/4-step/"]
    assert tu.list_checkpoints(out) and all(os.path.exists(out / name) for name in strays)
    saved = {"": saved_entries(out)} | {folder: saved_entries(out / folder) for folder in students}
    wrote = {
        folder + e + ("/" + f if f != "." else "")
        for folder, entries in saved.items()
        for e in entries
        for f in (_files(out / folder / e) if (out / folder / e).is_dir() else ["."])
    }
    assert uploaded == wrote, sorted(uploaded ^ wrote)
    assert not any(f.startswith(("checkpoint-", "logs", "grids", "losses", "metrics")) for f in uploaded)
    assert not set(strays) & uploaded
    # The card names those folders (not a pattern), and each link resolves to the uploaded student of that count.
    card = (repo / "README.md").read_text()
    assert sorted(set(re.findall(r"students/[^`\s)]*", card))) == students
    for link in students:
        n = int(link.split("/")[1].split("-")[0])
        assert {
            link + f for f in ("model_index.json", "README.md", "unet/diffusion_pytorch_model.safetensors")
        } <= uploaded
        with open(repo / link / "scheduler" / "scheduler_config.json") as f:
            assert json.load(f)["distilled_steps"] == [n]
        assert f"distilled {2 * n} steps into {n}" in (repo / link / "README.md").read_text()
    # The 2-step student loads from the repository's folder and samples its 2 steps.
    pipe = TutorialUnconditionalPipeline.from_pretrained(str(repo / "students" / "2-step"))
    images = pipe(batch_size=1, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 1, 8, 8) and torch.isfinite(images).all()
