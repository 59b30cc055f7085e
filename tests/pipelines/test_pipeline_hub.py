"""push_to_hub uploads exactly the saved folder; the uploaded repo loads back. The Hub is simulated at the
huggingface_hub boundary: HfApi.create_repo / HfApi.upload_folder write into a local Hub cache
(models--user--repo/snapshots/<commit>), which is what huggingface_hub reads offline."""

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from custom_pipelines import TutorialUnconditionalPipeline
from schedulers import TutorialDDPMScheduler

REPO_ID = "tutorial-user/tiny-ddpm"
SEED, STEPS = 11, 4


def _files(folder: Path):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    """Records create_repo/upload_folder calls and stores each upload as a snapshot in a local Hub cache."""

    def __init__(self, cache: Path):
        self.cache, self.created, self.uploads = cache, [], []

    def create_repo(self, api, repo_id, private=None, exist_ok=False, **kwargs):
        self.created.append(dict(repo_id=repo_id, private=private, exist_ok=exist_ok))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, api, repo_id, folder_path, commit_message=None, create_pr=False, **kwargs):
        files = _files(Path(folder_path))
        commit = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
        repo = self.cache / ("models--" + repo_id.replace("/", "--"))
        for rel, data in files.items():
            target = repo / "snapshots" / commit / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        self.uploads.append(dict(repo_id=repo_id, files=files, commit_message=commit_message, create_pr=create_pr))
        return SimpleNamespace(oid=commit, commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub_cache")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(api, *a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, *a, **k: hub.upload_folder(api, *a, **k))
    return hub


@pytest.fixture
def pipe(unet_factory):
    p = TutorialUnconditionalPipeline(unet=unet_factory(seed=2), scheduler=TutorialDDPMScheduler())
    p.set_progress_bar_config(disable=True)
    return p


def _images(p):
    return p(
        batch_size=2, generator=torch.Generator().manual_seed(SEED), num_inference_steps=STEPS, output_type="pt"
    ).images


def test_push_uploads_exactly_the_saved_folder(fake_hub, pipe, tmp_path):
    commit = pipe.push_to_hub(REPO_ID, private=True, num_inference_steps=STEPS)
    pipe.save_pretrained(tmp_path / "saved", num_inference_steps=STEPS, repo_id=REPO_ID)
    assert fake_hub.created == [dict(repo_id=REPO_ID, private=True, exist_ok=True)]
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == REPO_ID and upload["commit_message"] == "Upload TutorialUnconditionalPipeline"
    assert upload["files"] == _files(tmp_path / "saved")  # same names, same bytes
    assert (
        f'DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)'
        in upload["files"]["README.md"].decode()
    )
    assert commit.oid in commit.commit_url


def test_push_with_sample_images_adds_only_samples(fake_hub, pipe, tmp_path):
    images = pipe(batch_size=2, num_inference_steps=2, output_type="pil").images
    pipe.push_to_hub(REPO_ID, images=images)
    pipe.save_pretrained(tmp_path / "saved", repo_id=REPO_ID)
    uploaded, saved = fake_hub.uploads[0]["files"], _files(tmp_path / "saved")
    assert set(uploaded) - set(saved) == {"samples/sample_00.png", "samples/sample_01.png"}
    assert {k: v for k, v in uploaded.items() if k in saved and k != "README.md"} == {
        k: v for k, v in saved.items() if k != "README.md"
    }
    assert "![sample](samples/sample_01.png)" in uploaded["README.md"].decode()


def test_pushed_repo_loads_from_the_simulated_hub(fake_hub, pipe, tmp_path, fresh_python):
    pipe.push_to_hub(REPO_ID)
    reference = _images(pipe)
    torch.save(reference, tmp_path / "reference.pt")

    # With our package: snapshot_download from the cache, no remote code.
    loaded = TutorialUnconditionalPipeline.from_pretrained(REPO_ID, cache_dir=fake_hub.cache, local_files_only=True)
    assert type(loaded.scheduler) is TutorialDDPMScheduler
    torch.testing.assert_close(_images(loaded), reference)

    # With only diffusers, in a fresh process: DiffusionPipeline.from_pretrained("user/repo", trust_remote_code=True).
    script = f"""
    import json, sys, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained({REPO_ID!r}, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed({SEED}), num_inference_steps={STEPS},
                  output_type="pt").images
    ref = torch.load({str(tmp_path / "reference.pt")!r})
    print("RESULT:" + json.dumps(dict(cls=type(pipe).__name__, module=type(pipe).__module__,
                                      scheduler=type(pipe.scheduler).__name__,
                                      max_diff=float((images - ref).abs().max()))))
    """
    res = fresh_python(
        script,
        tmp_path,
        block_our_packages=True,
        extra_env={"HF_HUB_CACHE": str(fake_hub.cache), "HF_HOME": str(tmp_path / "hf_home")},
    )
    assert res == dict(
        cls="TutorialUnconditionalPipeline",
        module="diffusers_modules.local.pipeline_tutorial_unconditional",
        scheduler="TutorialDDPMScheduler",
        max_diff=0.0,
    )
    assert os.path.isdir(tmp_path / "hf_modules" / "diffusers_modules")  # the shipped code ran from the modules cache
