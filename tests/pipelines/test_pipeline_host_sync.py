"""No per-step host synchronisation in the sampling loops (issue #14, goal 2), checked without a GPU.

On a GPU, reading a device tensor on the host (`.item()`, `int(t)`, `bool(x)`, `.cpu()`, `.tolist()`) waits for every
kernel queued so far: one such read per step makes the CPU wait for the GPU at every step instead of queueing ahead.
Here the pipelines run on torch's `meta` device, where every tensor is a device tensor without values, and every read
of a meta tensor is counted (and answered with a placeholder). A loop may read once, at its end (the deferred NaN/inf
check); a read per step shows as a count that grows with the number of steps.
"""

import pytest
import torch
from diffusers import DDIMScheduler

from custom_pipelines import (
    TutorialClassConditionalPipeline,
    TutorialDDIMInversionPipeline,
    TutorialImg2ImgPipeline,
    TutorialLatentPipeline,
    TutorialRePaintPipeline,
    TutorialUnconditionalPipeline,
    sample_loop,
)
from schedulers import TutorialDDIMScheduler, TutorialScoreSDEScheduler

META = torch.device("meta")
# The score-SDE configs whose per-step code differs from the default (VP, predictor only): VE / sub-VP rescale the model
# input at every step, the Langevin corrector computes a step size from the sample at every corrector step.
SDE_CONFIGS = [
    {"sde_type": "ve"},
    {"sde_type": "subvp"},
    {"corrector": "langevin"},
    {"sde_type": "ve", "corrector": "langevin", "n_corrector_steps": 2},
]
# Host reads and the placeholder each answers with on `meta` (-1: "no bad step" for the deferred finite check).
PLACEHOLDERS = {"item": -1, "__int__": -1, "__index__": -1, "__float__": 0.0, "__bool__": False}
UNREADABLE = ("tolist", "cpu", "numpy")  # no placeholder makes sense: a call fails the test at once


@pytest.fixture
def host_reads(monkeypatch):
    """The names of the host reads of meta tensors made while the test runs, in order."""
    reads = []

    def counting(name, real):
        def read(self, *args, **kwargs):
            if self.device.type != "meta":
                return real(self, *args, **kwargs)
            reads.append(name)
            if name in UNREADABLE:
                raise AssertionError(f"Tensor.{name}() of a device tensor inside a sampling loop")
            return PLACEHOLDERS[name]

        return read

    for name in (*PLACEHOLDERS, *UNREADABLE):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return reads


def _sample(pipeline_cls, scheduler, steps: int, unet_factory):
    unet = unet_factory(
        sample_size=8, num_class_embeds=3 if pipeline_cls is TutorialClassConditionalPipeline else None
    )
    pipe = pipeline_cls(unet=unet.to(META), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    if pipeline_cls is TutorialClassConditionalPipeline:
        return pipe(class_labels=[0, 1], num_inference_steps=steps, guidance_scale=2.0, output_type="pt")
    if pipeline_cls is TutorialImg2ImgPipeline:
        return pipe(torch.rand(2, 3, 8, 8), strength=1.0, num_inference_steps=steps, output_type="pt")
    if pipeline_cls is TutorialRePaintPipeline:
        mask = torch.ones(2, 1, 8, 8)
        mask[..., 4:] = 0
        return pipe(
            torch.rand(2, 3, 8, 8), mask, num_inference_steps=steps, jump_length=2, jump_n_sample=2, output_type="pt"
        )
    if pipeline_cls is TutorialDDIMInversionPipeline:
        return pipe.invert(torch.rand(2, 3, 8, 8), num_inference_steps=steps)
    return pipe(batch_size=2, num_inference_steps=steps, output_type="pt")


def _assert_unconditional_loop_reads_nothing_per_step(host_reads, unet_factory, make_scheduler):
    counts = []
    for steps in (3, 6):
        host_reads.clear()
        out = _sample(TutorialUnconditionalPipeline, make_scheduler(), steps, unet_factory)
        assert out.images.device == META
        counts.append(len(host_reads))
    assert counts[0] == counts[1] <= 1, f"host reads for 3 and 6 steps: {counts}"


def test_the_unconditional_loop_reads_nothing_from_the_device_per_step(host_reads, unet_factory, our_scheduler_cls):
    _assert_unconditional_loop_reads_nothing_per_step(host_reads, unet_factory, our_scheduler_cls)


def test_the_unconditional_loop_with_diffusers_ddim_reads_nothing_per_step(host_reads, unet_factory):
    _assert_unconditional_loop_reads_nothing_per_step(host_reads, unet_factory, DDIMScheduler)


@pytest.mark.parametrize(
    "pipeline_cls",
    [
        TutorialClassConditionalPipeline,
        TutorialImg2ImgPipeline,
        TutorialDDIMInversionPipeline,
        TutorialRePaintPipeline,
    ],
    ids=lambda c: c.__name__,
)
def test_every_sampling_loop_reads_nothing_from_the_device_per_step(host_reads, unet_factory, pipeline_cls):
    counts = []
    for steps in (3, 6):
        host_reads.clear()
        _sample(pipeline_cls, TutorialDDIMScheduler(), steps, unet_factory)
        counts.append(len(host_reads))
    assert counts[0] == counts[1] <= 1, f"host reads for 3 and 6 steps: {counts}"


def _assert_device_timesteps_loop_reads_nothing(host_reads, unet_factory, make_scheduler):
    # The loop diffusers' own pipelines run: `set_timesteps(device=...)`, then `t` straight from `scheduler.timesteps`.
    unet = unet_factory(sample_size=8).to(META)
    counts = []
    for steps in (3, 6):
        host_reads.clear()
        scheduler = make_scheduler()
        scheduler.set_timesteps(steps, device=META)
        x = torch.randn(2, 3, 8, 8, device=META)
        with torch.no_grad():
            x = sample_loop(lambda x, t: unet(x, t).sample, scheduler, x)
        counts.append(len(host_reads))
    assert counts == [0, 0], f"host reads for 3 and 6 steps: {counts}"


def test_a_diffusers_style_loop_over_device_timesteps_reads_nothing_per_step(
    host_reads, unet_factory, our_scheduler_cls
):
    _assert_device_timesteps_loop_reads_nothing(host_reads, unet_factory, our_scheduler_cls)


@pytest.mark.parametrize("config", SDE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_score_sde_loops_read_nothing_per_step_in_every_config(host_reads, unet_factory, config):
    # Issue #21.7: the Langevin step size was read with float() at every corrector step, and VE / sub-VP's
    # scale_model_input looked its scale up by float(timestep); the tests above run only the default config.
    def make_scheduler():
        return TutorialScoreSDEScheduler(**config)

    _assert_unconditional_loop_reads_nothing_per_step(host_reads, unet_factory, make_scheduler)
    _assert_device_timesteps_loop_reads_nothing(host_reads, unet_factory, make_scheduler)


# The latent pipeline (issue #25): its loop, and once per call the decoded images' NaN/inf check (`check_decoded`, a
# second read after the loop's deferred one; none with output_type="latent", which does not decode). SDEdit with our
# continuous schedulers is left out: their `add_noise` reads its timesteps on the host, once, before the loop.
LATENT_CONFIGS = [
    pytest.param(DDIMScheduler, {}, {}, id="diffusers-DDIM"),
    pytest.param(TutorialDDIMScheduler, {"output_type": "latent"}, {}, id="output_type=latent"),
    pytest.param(TutorialDDIMScheduler, {"image": torch.rand(2, 1, 8, 8), "strength": 0.75}, {}, id="sdedit"),
    pytest.param(DDIMScheduler, {"image": torch.rand(2, 1, 8, 8), "strength": 0.75}, {}, id="sdedit-diffusers-DDIM"),
]


def _assert_latent_loop_reads_nothing_per_step(
    host_reads, vae_factory, unet_factory, make_scheduler, call_kwargs=None, vae_config=None
):
    call_kwargs = {"batch_size": 2, "output_type": "pt", **(call_kwargs or {})}
    vae = vae_factory(**(vae_config or {})).to(META)  # 1 x 8x8 images <-> 2 x 4x4 latents
    unet = unet_factory(sample_size=4, in_channels=2).to(META)
    counts = []
    for steps in (2, 4):  # SDEdit at strength 0.75: 1 and 3 steps (a UNet call on `meta` takes ~80 ms)
        host_reads.clear()
        pipe = TutorialLatentPipeline(vae=vae, unet=unet, scheduler=make_scheduler())
        pipe.set_progress_bar_config(disable=True)
        out = pipe(num_inference_steps=steps, **call_kwargs)
        assert out.images.device == META
        counts.append(len(host_reads))
    once = 1 if call_kwargs["output_type"] == "latent" else 2
    assert counts[0] == counts[1] <= once, f"host reads for 2 and 4 steps: {counts}"


def test_the_latent_loop_reads_nothing_per_step(host_reads, vae_factory, unet_factory, our_scheduler_cls):
    _assert_latent_loop_reads_nothing_per_step(host_reads, vae_factory, unet_factory, our_scheduler_cls)


@pytest.mark.parametrize("scheduler_cls, call_kwargs, vae_config", LATENT_CONFIGS)
def test_the_latent_loop_reads_nothing_per_step_in_other_configs(
    host_reads, vae_factory, unet_factory, scheduler_cls, call_kwargs, vae_config
):
    _assert_latent_loop_reads_nothing_per_step(
        host_reads, vae_factory, unet_factory, scheduler_cls, call_kwargs, vae_config
    )
