"""Our continuous-time samplers run unchanged inside the generic unconditional pipeline with a tiny UNet2DModel."""

import math

import pytest
import torch

from custom_pipelines import TutorialUnconditionalPipeline
from schedulers import TutorialDDPMScheduler
from schedulers.scheduling_tutorial_dpmpp import TutorialDPMSolverPlusPlusScheduler
from schedulers.scheduling_tutorial_pf_ode import TutorialPFODEScheduler
from schedulers.scheduling_tutorial_sde import TutorialScoreSDEScheduler


@pytest.fixture(scope="module")
def unet(unet_factory):
    return unet_factory(sample_size=8, in_channels=1)


@pytest.mark.parametrize(
    "cls, kwargs, evals",
    [
        (TutorialDPMSolverPlusPlusScheduler, {"solver_order": 3}, 4),
        (TutorialPFODEScheduler, {"solver": "heun"}, 7),
        (TutorialScoreSDEScheduler, {"sde_type": "ve", "corrector": "langevin"}, 7),
    ],
)
def test_pipeline_runs_our_scheduler(unet, cls, kwargs, evals):
    scheduler = cls.from_config(TutorialDDPMScheduler().config, **kwargs)
    calls = []
    hook = unet.register_forward_hook(lambda module, args, out: calls.append(args[1]))
    try:
        pipe = TutorialUnconditionalPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images
    finally:
        hook.remove()
    assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())
    assert len(calls) == evals  # one network call per entry of scheduler.timesteps
    assert pipe.scheduler is scheduler


def public_config(scheduler):
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}


@pytest.mark.parametrize(
    "cls", [TutorialDPMSolverPlusPlusScheduler, TutorialPFODEScheduler, TutorialScoreSDEScheduler]
)
def test_save_and_load_round_trip(cls, tmp_path):
    from diffusers import DDIMScheduler

    s = cls.from_config(DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config)
    assert s.config.beta_schedule == "squaredcos_cap_v2" and s.config.prediction_type == "v_prediction"
    s.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert public_config(loaded) == public_config(s)
    torch.testing.assert_close(loaded.alpha_bar, s.alpha_bar, rtol=0, atol=0)


def test_likelihoods_run_on_a_float32_unet(unet):
    """The likelihood functions take a real network (float32, fractional timesteps) and 8-bit images."""
    from schedulers.tutorial_likelihood import ode_log_likelihood, variational_bound

    def model(x, t):
        return unet(x, t).sample

    x = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    ddpm = TutorialDDPMScheduler()
    ode = ode_log_likelihood(
        model,
        ddpm,
        x,
        trace="hutchinson",
        dequantize=True,
        rtol=1e-3,
        atol=1e-3,
        generator=torch.Generator().manual_seed(1),
    )
    assert ode.log_prob.dtype == torch.float32 and not ode.log_prob.requires_grad
    torch.testing.assert_close(ode.bits_per_dim, -ode.log_prob / (64 * math.log(2)) + 7.0)
    vb = variational_bound(model, ddpm, x, num_steps=5, generator=torch.Generator().manual_seed(1))
    assert not vb.nats.requires_grad and bool(torch.isfinite(vb.nats).all())
    # every KL term and the prior term are >= 0; the discretized decoder is a probability, so its NLL is >= 0 too
    assert bool((vb.steps >= 0).all() and (vb.prior >= 0).all() and (vb.decoder >= 0).all())


def test_pipeline_likelihood_methods_equal_the_functions(unet):
    """`pipe.variational_bound` / `pipe.log_likelihood` are the library functions on the pipeline's own UNet and
    schedule; with a diffusers scheduler the schedule is read from its config."""
    from diffusers import DDIMScheduler

    from schedulers.tutorial_likelihood import ode_log_likelihood, variational_bound

    def model(x, t):
        return unet(x, t).sample

    x = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 127.5 - 1
    ddpm = TutorialDDPMScheduler(beta_schedule="squaredcos_cap_v2")
    for scheduler in (ddpm, DDIMScheduler.from_config(ddpm.config)):
        pipe = TutorialUnconditionalPipeline(unet=unet, scheduler=scheduler)
        got = pipe.variational_bound(x, num_steps=6, generator=torch.Generator().manual_seed(2))
        want = variational_bound(model, ddpm, x, num_steps=6, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(got.bits_per_dim, want.bits_per_dim)
        torch.testing.assert_close(got.steps, want.steps)
    kwargs = dict(trace="hutchinson", rtol=1e-3, atol=1e-3)
    got = pipe.log_likelihood(x, generator=torch.Generator().manual_seed(3), **kwargs)
    want = ode_log_likelihood(model, ddpm, x, generator=torch.Generator().manual_seed(3), **kwargs)
    torch.testing.assert_close(got.bits_per_dim, want.bits_per_dim)
    assert got.num_evals == want.num_evals
    dataset = pipe.variational_bound_dataset([x[:1], x[1:]], num_steps=6, generator=torch.Generator().manual_seed(4))
    assert math.isfinite(float(dataset.bits_per_dim))
