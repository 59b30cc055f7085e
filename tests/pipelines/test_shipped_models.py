"""The committed pipelines under training/pretrained/ load in a fresh process with diffusers alone
(`trust_remote_code=True`, our packages blocked) and produce the same images as our classes do in this process."""

from pathlib import Path

import pytest
import torch

from custom_pipelines import (
    TutorialClassConditionalPipeline,
    TutorialLatentPipeline,
    TutorialSuperResolutionPipeline,
    TutorialUnconditionalPipeline,
)

PRETRAINED = Path(__file__).resolve().parents[2] / "training" / "pretrained"
CASES = {
    "digits-ddpm": (TutorialUnconditionalPipeline, {"batch_size": 3}),
    "digits-cfg": (TutorialClassConditionalPipeline, {"class_labels": [0, 4, 7], "guidance_scale": 2.0}),
    # three 4x4 low-resolution images in [0, 1] (a tensor in both processes: see ONLY_DIFFUSERS)
    "digits-sr3": (TutorialSuperResolutionPipeline, {"image": torch.linspace(0, 1, 48).reshape(3, 1, 4, 4).tolist()}),
    # latent diffusion: 4x8x8 latents of the shipped digits-vae (in the folder's vae/), decoded to 32x32
    "digits-ldm": (TutorialLatentPipeline, {"batch_size": 3}),
}
SIZES = {"digits-ldm": 32}  # the others are 16x16
STEPS = 5

ONLY_DIFFUSERS = """
import json, sys, torch
from diffusers import DiffusionPipeline
res = {}
for name, kwargs in CASES:
    kwargs = {k: torch.tensor(v) if k == "image" else v for k, v in kwargs.items()}
    pipe = DiffusionPipeline.from_pretrained(PRETRAINED + "/" + name, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="pt",
                  **kwargs).images
    res[name] = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                 "images": images.flatten().tolist()}
res["our_modules_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("schedulers", "custom_pipelines"))
print("RESULT:" + json.dumps(res))
"""


@pytest.mark.parametrize("name", sorted(CASES))
def test_shipped_folder_loads_with_diffusers_alone_and_matches_our_classes(name, tmp_path, fresh_python):
    cls, kwargs = CASES[name]
    script = (
        ONLY_DIFFUSERS.replace("PRETRAINED", repr(str(PRETRAINED)))
        .replace("CASES", repr([(name, kwargs)]))
        .replace("STEPS", str(STEPS))
    )
    res = fresh_python(script, tmp_path, block_our_packages=True)
    assert res["our_modules_imported"] == []
    assert res[name]["pipeline"] == cls.__name__ and res[name]["scheduler"] == "TutorialDDIMScheduler"

    kwargs = {k: torch.tensor(v) if k == "image" else v for k, v in kwargs.items()}
    pipe = cls.from_pretrained(str(PRETRAINED / name))
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="pt", **kwargs)
    theirs = torch.tensor(res[name]["images"]).reshape(ours.images.shape)
    size = SIZES.get(name, 16)
    assert ours.images.shape == (3, 1, size, size)
    torch.testing.assert_close(theirs, ours.images, atol=1e-6, rtol=0)
