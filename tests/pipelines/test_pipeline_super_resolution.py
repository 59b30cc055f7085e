"""TutorialSuperResolutionPipeline (SR3): what the UNet is fed, door checks, output types, schedulers, saving."""

import os
import shutil
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image

from custom_pipelines import SuperResolution, TutorialSuperResolutionPipeline
from schedulers import TutorialDDIMScheduler

C, SIZE, FACTOR, STEPS = 1, 8, 4, 3


@pytest.fixture
def sr_unet(unet_factory):
    """A tiny random SR3 UNet: x_t and the upsampled image in (2 C channels), C out, the noise level as label."""
    return unet_factory(seed=5, in_channels=2 * C, out_channels=C, class_embed_type="timestep")


@pytest.fixture
def pipe(sr_unet):
    p = TutorialSuperResolutionPipeline(unet=sr_unet, scheduler=TutorialDDIMScheduler())
    p.set_progress_bar_config(disable=True)
    return p


def _low_res(batch=2, seed=0):
    return torch.rand(batch, C, SIZE // FACTOR, SIZE // FACTOR, generator=torch.Generator().manual_seed(seed))


def _record_inputs(unet):
    calls = []
    handle = unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0].clone(), kwargs["class_labels"].clone())), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize("scheduler_cls", [TutorialDDIMScheduler, EulerDiscreteScheduler], ids=lambda c: c.__name__)
def test_unet_sees_scaled_x_t_first_then_the_noised_nearest_upsampled_image(pipe, sr_unet, scheduler_cls):
    # The input of every UNet call, rebuilt by hand: cat([scale_model_input(x_t), √ᾱ_s up(y) + √(1-ᾱ_s) ε'], 1), the
    # concatenation order of diffusers' LDMSuperResolutionPipeline; Euler's scale_model_input (÷ √(σ²+1)) must touch
    # x_t only. The generator draws ε' first, then z.
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    y01, level = _low_res(), 30
    calls, handle = _record_inputs(sr_unet)
    try:
        out = pipe(
            y01,
            num_inference_steps=STEPS,
            noise_level=level,
            generator=torch.Generator().manual_seed(7),
            output_type="pt",
            return_trajectory=True,
        )
    finally:
        handle.remove()
    assert len(calls) == STEPS
    g = torch.Generator().manual_seed(7)
    eps_c = torch.randn(2, C, SIZE, SIZE, generator=g)
    z = torch.randn(2, C, SIZE, SIZE, generator=g)
    alpha_bar = float(DDPMScheduler().alphas_cumprod[level])  # the same linear schedule
    up = F.interpolate(y01 * 2 - 1, scale_factor=FACTOR, mode="nearest")
    cond = alpha_bar**0.5 * up + (1 - alpha_bar) ** 0.5 * eps_c
    reference = scheduler_cls.from_config(pipe.scheduler.config)
    reference.set_timesteps(STEPS)
    for i, (model_input, labels) in enumerate(calls):
        x_t = out.trajectory[i]
        assert model_input.shape == (2, 2 * C, SIZE, SIZE)
        scale = (reference.sigmas[i] ** 2 + 1) ** -0.5 if scheduler_cls is EulerDiscreteScheduler else 1.0
        torch.testing.assert_close(model_input[:, :C], x_t * scale)
        torch.testing.assert_close(model_input[:, C:], cond, rtol=1e-5, atol=1e-6)
        assert labels.tolist() == [level, level]
    torch.testing.assert_close(out.trajectory[0], z * reference.init_noise_sigma)


def test_noise_level_zero_conditions_on_almost_exactly_the_measurement(pipe, sr_unet):
    calls, handle = _record_inputs(sr_unet)
    try:
        pipe(_low_res(), num_inference_steps=1, noise_level=0, output_type="pt")
    finally:
        handle.remove()
    cond = calls[0][0][:, C:]
    # A A⁺ y = y: the block means of the conditioning image give back the measurement (up to √(1-ᾱ_0) = 0.01 noise).
    y = _low_res() * 2 - 1
    assert (SuperResolution(FACTOR).A(cond) - y).abs().max() < 0.02


@pytest.mark.parametrize("output_type, expected", [("pt", (2, C, SIZE, SIZE)), ("np", (2, SIZE, SIZE, C))])
def test_output_types_and_input_types_agree(pipe, output_type, expected):
    y = _low_res()
    kw = dict(num_inference_steps=STEPS, output_type=output_type)
    from_tensor = pipe(y, generator=torch.Generator().manual_seed(1), **kw).images
    assert tuple(from_tensor.shape) == expected
    from_array = pipe(y.permute(0, 2, 3, 1).numpy(), generator=torch.Generator().manual_seed(1), **kw).images
    np.testing.assert_allclose(np.asarray(from_array), np.asarray(from_tensor), atol=1e-6)


def test_pil_input_and_output(pipe):
    y = (_low_res(batch=1) * 255).round() / 255  # 8-bit exact
    image = Image.fromarray((y[0, 0].numpy() * 255).round().astype(np.uint8), mode="L")
    kw = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(2))
    out = pipe(image, output_type="pil", **kw).images
    assert len(out) == 1 and out[0].size == (SIZE, SIZE)
    reference = pipe(y, output_type="pil", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(2))
    assert np.array_equal(np.asarray(out[0]), np.asarray(reference.images[0]))


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda config: DDPMScheduler.from_config(config),
        lambda config: EulerDiscreteScheduler.from_config(config),
        lambda config: DPMSolverMultistepScheduler.from_config(config),
    ],
    ids=["diffusers-ddpm", "diffusers-euler", "diffusers-dpm-solver"],
)
def test_diffusers_schedulers_run_and_are_kept(pipe, make_scheduler):
    pipe.scheduler = make_scheduler(pipe.scheduler.config)
    scheduler = pipe.scheduler
    images = pipe(_low_res(), num_inference_steps=STEPS, output_type="pt").images
    assert pipe.scheduler is scheduler and torch.isfinite(images).all() and images.shape == (2, C, SIZE, SIZE)


def test_our_schedulers_run(pipe, our_scheduler_cls):
    pipe.scheduler = our_scheduler_cls.from_config(pipe.scheduler.config)
    images = pipe(_low_res(), num_inference_steps=STEPS, output_type="pt").images
    assert torch.isfinite(images).all() and images.shape == (2, C, SIZE, SIZE)


@pytest.mark.parametrize(
    "image, kwargs, match",
    [
        (torch.rand(2, C, 3, 3), {}, r"image has shape \(2, 1, 3, 3\); this UNet makes \(1, 8, 8\) images"),
        (torch.rand(2, C, 2, 4), {}, r"image has shape \(2, 1, 2, 4\)"),
        (torch.rand(2, 3, 2, 2), {}, r"image has shape \(2, 3, 2, 2\)"),
        (torch.rand(2, C, 8, 8).fill_(float("nan"))[:, :, :2, :2], {}, "image has non-finite entries"),
        (torch.rand(C, 2, 2), {}, r"got a tensor of shape \(1, 2, 2\)"),
        ("image.png", {}, "got str"),
        (torch.rand(2, C, 2, 2), {"noise_level": 1000}, r"noise_level=1000 must be an integer in \[0, 999\]"),
        (torch.rand(2, C, 2, 2), {"noise_level": -1}, "noise_level=-1"),
        (torch.rand(2, C, 2, 2), {"noise_level": 2.5}, "noise_level=2.5"),
        (torch.rand(2, C, 2, 2), {"output_type": "gif"}, "output_type='gif'"),
        (torch.rand(2, C, 2, 2), {"num_inference_steps": 0}, "num_inference_steps=0"),
        (torch.rand(2, C, 2, 2), {"generator": [torch.Generator()]}, "batch_size=2"),
    ],
    ids=[
        "size-not-a-divisor",
        "not-square-factor",
        "channels",
        "nan",
        "no-batch-axis",
        "a-path",
        "noise-level-high",
        "noise-level-negative",
        "noise-level-float",
        "output-type",
        "steps",
        "generators",
    ],
)
def test_bad_input_is_refused_at_the_door(pipe, sr_unet, image, kwargs, match):
    calls, handle = _record_inputs(sr_unet)
    try:
        with pytest.raises(ValueError, match=match):
            pipe(image, **{"num_inference_steps": 1, **kwargs})
    finally:
        handle.remove()
    assert calls == []  # nothing ran


def test_a_unet_that_is_not_sr3_is_refused(unet_factory):
    plain = TutorialSuperResolutionPipeline(unet=unet_factory(in_channels=1), scheduler=TutorialDDIMScheduler())
    with pytest.raises(ValueError, match="in_channels = 2 \\* out_channels"):
        plain(torch.rand(1, 1, 2, 2), num_inference_steps=1)
    no_label = TutorialSuperResolutionPipeline(
        unet=unet_factory(in_channels=2, out_channels=1), scheduler=TutorialDDIMScheduler()
    )
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        no_label(torch.rand(1, 1, 2, 2), num_inference_steps=1)


def test_save_load_in_a_fresh_process_with_diffusers_alone_and_with_our_package(pipe, tmp_path, fresh_python):
    folder = tmp_path / "sr3"
    pipe.save_pretrained(folder, num_inference_steps=STEPS)
    assert {"pipeline_tutorial_super_resolution.py", "tutorial_operators.py"} <= set(os.listdir(folder))
    card = (folder / "README.md").read_text()
    assert "image=low_res_images, noise_level=20" in card and "- super-resolution" in card
    y = _low_res()
    torch.save(y, tmp_path / "y.pt")
    kw = dict(num_inference_steps=STEPS, noise_level=10, output_type="pt")
    ours = pipe(y, generator=torch.Generator().manual_seed(3), **kw).images
    script = """
    import json, sys, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    y = torch.load(Y)
    images = pipe(y, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS, noise_level=10,
                  output_type="pt").images
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("schedulers", "custom_pipelines", "training"))
    print("RESULT:" + json.dumps({"pipeline": type(pipe).__name__, "images": images.flatten().tolist(), "ours": ours}))
    """
    script = (
        script.replace("FOLDER", repr(str(folder))).replace("Y", repr(str(tmp_path / "y.pt"))).replace("STEPS", "3")
    )
    res = fresh_python(script, tmp_path, block_our_packages=True)
    assert res["pipeline"] == "TutorialSuperResolutionPipeline" and res["ours"] == []
    torch.testing.assert_close(torch.tensor(res["images"]).reshape(ours.shape), ours, atol=1e-6, rtol=0)

    loaded = TutorialSuperResolutionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(y, generator=torch.Generator().manual_seed(3), **kw).images, ours)


def test_push_to_hub_uploads_the_self_contained_folder(pipe, tmp_path, monkeypatch):
    hub = tmp_path / "hub"

    def create_repo(api, repo_id, private=None, exist_ok=False, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(api, repo_id, folder_path, commit_message=None, create_pr=False, **kwargs):
        shutil.copytree(folder_path, hub / repo_id)
        return SimpleNamespace(oid="0" * 40, commit_url=f"https://hub.invalid/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    pipe.push_to_hub("me/tiny-sr3", num_inference_steps=STEPS)
    repo = hub / "me" / "tiny-sr3"
    assert {"model_index.json", "pipeline_tutorial_super_resolution.py", "tutorial_operators.py", "unet"} <= set(
        os.listdir(repo)
    )
    loaded = TutorialSuperResolutionPipeline.from_pretrained(repo)
    assert loaded.unet.config.class_embed_type == "timestep"
