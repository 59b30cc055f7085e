"""TutorialLatentPipeline: the UNet is checked against the VAE's latents at the door, decoding undoes the scaling
(z = z̃ / s + b, checked with a decoder that records its input), every output type, our schedulers and diffusers',
SDEdit through the encoder, loading in a fresh process (diffusers alone and ours) and a simulated push to the Hub."""

import os
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from custom_pipelines import TutorialLatentPipeline
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler

SEED, STEPS = 3, 4


@pytest.fixture
def pipe(unet_factory, vae_factory):
    p = TutorialLatentPipeline(
        vae=vae_factory(), unet=unet_factory(sample_size=4, in_channels=2, seed=1), scheduler=TutorialDDIMScheduler()
    )
    p.set_progress_bar_config(disable=True)
    return p


def _call(p, **kwargs):
    kwargs = {
        "batch_size": 2,
        "num_inference_steps": STEPS,
        "generator": torch.Generator().manual_seed(SEED),
        **kwargs,
    }
    return p(**kwargs)


# ---- the door --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "unet_config, match",
    [
        (dict(sample_size=4, in_channels=1), r"in_channels=1 \(the latents have 2\)"),
        (dict(sample_size=8, in_channels=2), r"sample_size=8 \(the latents are 4 = 8 / 2\)"),
        (dict(sample_size=4, in_channels=2, out_channels=3), r"out_channels=3 \(expected 2 or 4\)"),
    ],
)
def test_a_unet_that_does_not_fit_the_latents_is_refused_naming_both(unet_factory, vae_factory, unet_config, match):
    with pytest.raises(
        ValueError, match=match + r".*latent_channels=2, sample_size=8, 2 down blocks: downsampling x2"
    ):
        TutorialLatentPipeline(vae=vae_factory(), unet=unet_factory(**unet_config), scheduler=DDIMScheduler())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(output_type="jpeg"),
            r"output_type='jpeg' is not supported; choose one of \('pil', 'np', 'pt', 'latent'\)",
        ),
        (dict(strength=0.5), r"strength=0.5 applies only with image="),
        (dict(image=torch.rand(2, 1, 8, 8), strength=1.5), r"strength=1.5 must be a number in \(0, 1\]"),
        (dict(image=torch.rand(2, 2, 4, 4)), r"image has shape \(2, 2, 4, 4\); expected \(2, 1, 8, 8\)"),
        (dict(latents=torch.zeros(2, 1, 8, 8)), r"latents has shape \(2, 1, 8, 8\); expected \(2, 2, 4, 4\)"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(pipe, kwargs, match):
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=match):
        _call(pipe, **kwargs)
    assert not calls


# ---- decoding undoes the scaling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling_factor, shift_factor", [(0.5, None), (0.18215, None), (2.5, 0.3)])
def test_decoding_divides_the_latents_by_the_scaling_factor(
    unet_factory, vae_factory, monkeypatch, scaling_factor, shift_factor
):
    vae = vae_factory(scaling_factor, shift_factor)
    p = TutorialLatentPipeline(
        vae=vae, unet=unet_factory(sample_size=4, in_channels=2, seed=1), scheduler=TutorialDDIMScheduler()
    )
    p.set_progress_bar_config(disable=True)
    latents = _call(p, output_type="latent").images  # z̃_0, the UNet's space, not decoded
    seen = []
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, *a, **k: seen.append(z.clone()) or decode(z, *a, **k))
    images = _call(p, output_type="pt").images
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], latents / scaling_factor + (shift_factor or 0.0))  # z = z̃ / s + b
    torch.testing.assert_close(images, (decode(seen[0]).sample / 2 + 0.5).clamp(0, 1))


def test_sdedit_encodes_scales_and_noises_the_image(pipe):
    """z̃_{t_s} = add_noise(s E(x_0), ε, t_s), with ε then the posterior sample drawn from the call's generator."""
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = _call(pipe, image=image, strength=0.5, output_type="pt", return_trajectory=True)
    assert len(out.timesteps) == int(STEPS * 0.5)
    g = torch.Generator().manual_seed(SEED)
    eps = torch.randn(2, 2, 4, 4, generator=g)
    posterior = pipe.vae.encode(2 * image - 1).latent_dist
    z0 = posterior.sample(generator=g) * pipe.vae.config.scaling_factor
    start = torch.tensor([out.timesteps[0]] * 2)
    torch.testing.assert_close(out.trajectory[0], pipe.scheduler.add_noise(z0, eps, start))
    assert out.images.shape == (2, 1, 8, 8)


# ---- outputs and schedulers ------------------------------------------------------------------------------------------
def test_every_output_type(pipe):
    pt = _call(pipe, output_type="pt").images
    assert pt.shape == (2, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    np_images = _call(pipe, output_type="np").images
    assert np_images.shape == (2, 8, 8, 1)
    torch.testing.assert_close(torch.from_numpy(np_images).permute(0, 3, 1, 2), pt)
    pil = _call(pipe, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    assert _call(pipe, output_type="latent").images.shape == (2, 2, 4, 4)
    images, trajectory, x0s, timesteps = _call(pipe, output_type="pt", return_dict=False, return_trajectory=True)
    torch.testing.assert_close(images, pt)
    assert len(trajectory) == STEPS + 1 and trajectory[0].shape == (2, 2, 4, 4) and len(timesteps) == STEPS


def test_our_schedulers_sample(pipe, our_scheduler_cls):
    pipe.scheduler = our_scheduler_cls()
    images = _call(pipe, output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_diffusers_schedulers_sample_and_sdedit(pipe, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    assert torch.isfinite(_call(pipe, output_type="pt").images).all()
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(_call(pipe, image=image, strength=0.75, output_type="pt").images).all()


def test_diffusers_ddim_gives_our_ddim_numbers(pipe):
    ours = _call(pipe, output_type="pt").images
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    torch.testing.assert_close(_call(pipe, output_type="pt").images, ours, atol=1e-5, rtol=1e-5)


# ---- saving, loading, the Hub ----------------------------------------------------------------------------------------
LOAD_SCRIPT = """
import json, torch
from diffusers import DiffusionPipeline
{imports}
pipe = {loader}
pipe.set_progress_bar_config(disable=True)
images = pipe(batch_size=2, num_inference_steps={steps}, generator=torch.Generator().manual_seed({seed}),
              output_type="pt").images
print("RESULT:" + json.dumps(dict(cls=type(pipe).__name__, vae=type(pipe.vae).__name__,
                                  scaling=pipe.vae.config.scaling_factor, images=images.tolist())))
"""


@pytest.fixture
def saved(pipe, tmp_path):
    pipe.vae.register_to_config(scaling_factor=0.75)
    folder = tmp_path / "latent"
    pipe.save_pretrained(folder)
    return folder, _call(pipe, output_type="pt").images


def test_the_saved_folder_loads_in_a_fresh_process_with_diffusers_alone_and_with_ours(
    saved, tmp_path, start_fresh_python
):
    folder, expected = saved
    (tmp_path / "remote").mkdir()
    (tmp_path / "ours").mkdir()
    assert {"vae", "unet", "scheduler", "model_index.json", "pipeline_tutorial_latent.py"} <= set(os.listdir(folder))
    remote = start_fresh_python(
        LOAD_SCRIPT.format(
            imports="",
            loader=f"DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)",
            steps=STEPS,
            seed=SEED,
        ),
        tmp_path / "remote",
        block_our_packages=True,
    )
    ours = start_fresh_python(
        LOAD_SCRIPT.format(
            imports="from custom_pipelines import TutorialLatentPipeline",
            loader=f"TutorialLatentPipeline.from_pretrained({str(folder)!r})",
            steps=STEPS,
            seed=SEED,
        ),
        tmp_path / "ours",
    )
    for result in (remote.result(), ours.result()):
        assert result["cls"] == "TutorialLatentPipeline" and result["vae"] == "AutoencoderKL"
        assert result["scaling"] == 0.75
        torch.testing.assert_close(torch.tensor(result["images"]), expected)


def test_push_to_hub_uploads_the_folder_that_loads_back(pipe, tmp_path, monkeypatch):
    uploads = []

    def upload_folder(api, repo_id, folder_path, **kwargs):
        uploads.append(
            {p: open(os.path.join(r, p), "rb").read() for r, _, files in os.walk(folder_path) for p in files}
        )
        target = tmp_path / "hub" / repo_id.replace("/", "--")
        import shutil

        shutil.copytree(folder_path, target)
        return SimpleNamespace(oid="0" * 40, repo=str(target))

    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **k: SimpleNamespace(repo_id=repo_id)
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    info = pipe.push_to_hub("tutorial-user/tiny-latent", num_inference_steps=STEPS)
    assert len(uploads) == 1
    names = set(uploads[0])
    assert {"model_index.json", "README.md", "pipeline_tutorial_latent.py", "config.json"} <= names
    card = uploads[0]["README.md"].decode()
    assert "latent-diffusion" in card and "scaling_factor=0.5" in card
    loaded = TutorialLatentPipeline.from_pretrained(info.repo)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_call(loaded, output_type="pt").images, _call(pipe, output_type="pt").images)


def test_our_ddpm_scheduler_round_trips_through_the_folder(unet_factory, vae_factory, tmp_path):
    p = TutorialLatentPipeline(
        vae=vae_factory(), unet=unet_factory(sample_size=4, in_channels=2), scheduler=TutorialDDPMScheduler()
    )
    p.save_pretrained(tmp_path / "f")
    loaded = TutorialLatentPipeline.from_pretrained(tmp_path / "f")
    assert type(loaded.scheduler) is TutorialDDPMScheduler
    assert loaded.vae.config.scaling_factor == 0.5
