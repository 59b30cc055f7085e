"""`--push_to_hub` against a simulated Hub: huggingface_hub's HfApi is patched at its boundary, nothing leaves."""

import os
import shutil
from types import SimpleNamespace

import huggingface_hub
from PIL import Image

from training import train_unconditional as tu

from .conftest import tiny_args


def test_push_to_hub_uploads_the_pipeline_folder_with_card_and_grid(tmp_path, tiny_config, monkeypatch):
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
    out = tmp_path / "run"
    tu.main(
        tiny_args(
            tiny_config,
            out,
            "--max_train_steps",
            2,
            "--push_to_hub",
            "--hub_model_id",
            "me/tiny-digits",
            "--hub_token",
            "hf_fake",
            "--hub_private_repo",
        )
    )

    assert calls == [("create_repo", "me/tiny-digits", True, "hf_fake"), ("upload_folder", "me/tiny-digits")]
    repo = hub / "me" / "tiny-digits"
    files = {os.path.relpath(os.path.join(d, f), repo) for d, _, fs in os.walk(repo) for f in fs}
    assert {
        "model_index.json",
        "README.md",
        "unet/diffusion_pytorch_model.safetensors",
        "samples/sample_00.png",
        "scheduler/scheduler_config.json",
    } <= files
    assert not any(f.startswith(("checkpoint-", "logs", "grids")) for f in files)  # the pipeline, not the run
    card = (repo / "README.md").read_text()
    assert "accelerate launch training/train_unconditional.py" in card and "samples/sample_00.png" in card
    grid = Image.open(repo / "samples" / "sample_00.png")
    assert grid.width > 8 * 4  # a grid of several 8x8 samples, enlarged 4x
    from custom_pipelines import TutorialUnconditionalPipeline

    pipe = TutorialUnconditionalPipeline.from_pretrained(str(repo))
    assert pipe.unet.config.sample_size == 8
