"""The diffusers scheduler contract, run over every scheduler of ours with no per-class special cases."""

import inspect
import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, SchedulerMixin

import schedulers
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler, TutorialSchedulerOutput

OUR_SCHEDULERS = [TutorialDDPMScheduler, TutorialDDIMScheduler]
DIFFUSERS_COUNTERPARTS = [DDPMScheduler, DDIMScheduler]
SHARED_CONFIG = dict(
    num_train_timesteps=500,
    beta_start=0.0002,
    beta_end=0.03,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    clip_sample=False,
    thresholding=True,
    dynamic_thresholding_ratio=0.9,
    clip_sample_range=2.0,
    sample_max_value=3.0,
    timestep_spacing="trailing",
    steps_offset=0,
    rescale_betas_zero_snr=True,
)


def run_loop(scheduler, n=5, seed=0):
    scheduler.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(torch.tanh(x_in) * 0.3, t, x, generator=g).prev_sample
    return x


@pytest.fixture(params=OUR_SCHEDULERS, ids=lambda c: c.__name__)
def scheduler_cls(request):
    return request.param


def test_is_a_diffusers_scheduler(scheduler_cls):
    s = scheduler_cls()
    assert isinstance(s, SchedulerMixin)
    assert s.init_noise_sigma == 1.0 and s.order == 1 and len(s) == 1000
    # diffusers resolves a scheduler's loader as an attribute of its defining module.
    module = sys.modules[scheduler_cls.__module__]
    assert module.SchedulerMixin is SchedulerMixin
    # every config key is an explicit __init__ parameter and is registered
    params = [p for p in inspect.signature(scheduler_cls.__init__).parameters if p != "self"]
    assert set(params) <= set(s.config.keys())
    assert not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(scheduler_cls.__init__).parameters.values())
    # compatibles resolve to diffusers classes (Euler, DDIM, ... can take our config)
    assert EulerDiscreteScheduler in s.compatibles and DDIMScheduler in s.compatibles


@pytest.mark.parametrize("counterpart", DIFFUSERS_COUNTERPARTS, ids=lambda c: c.__name__)
def test_config_has_every_key_of_the_diffusers_counterpart(counterpart):
    """Both directions of from_config need the key names; ours is a superset of diffusers' own for its class."""
    ours = {DDPMScheduler: TutorialDDPMScheduler, DDIMScheduler: TutorialDDIMScheduler}[counterpart]
    theirs = set(inspect.signature(counterpart.__init__).parameters) - {"self"}
    assert theirs <= set(inspect.signature(ours.__init__).parameters)
    defaults = {k: v.default for k, v in inspect.signature(counterpart.__init__).parameters.items() if k != "self"}
    for key, value in defaults.items():
        assert ours().config[key] == value, key


@pytest.mark.parametrize("counterpart", DIFFUSERS_COUNTERPARTS, ids=lambda c: c.__name__)
def test_from_config_both_ways(scheduler_cls, counterpart):
    theirs = counterpart.from_config({**SHARED_CONFIG, "prediction_type": "v_prediction"})
    ours = scheduler_cls.from_config(theirs.config)
    for key in SHARED_CONFIG:
        assert ours.config[key] == theirs.config[key], key
    back = counterpart.from_config(ours.config)
    for key in SHARED_CONFIG:
        assert back.config[key] == SHARED_CONFIG[key], key
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-4, atol=1e-6)


def test_save_pretrained_and_from_pretrained_round_trip(scheduler_cls, tmp_path):
    s = scheduler_cls(**SHARED_CONFIG)
    s.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert config["_class_name"] == scheduler_cls.__name__
    loaded = scheduler_cls.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(s.config)
    torch.testing.assert_close(run_loop(loaded), run_loop(s), rtol=0, atol=0)


def test_from_pretrained_in_a_fresh_process(scheduler_cls, tmp_path):
    scheduler_cls(**SHARED_CONFIG).save_pretrained(tmp_path)
    code = (
        f"from schedulers import {scheduler_cls.__name__} as S; s = S.from_pretrained({str(tmp_path)!r}); "
        "s.set_timesteps(4); print(s.timesteps.tolist(), s.config.prediction_type)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    reference = scheduler_cls(**SHARED_CONFIG)
    reference.set_timesteps(4)
    assert out.strip() == f"{reference.timesteps.tolist()} v_prediction"


def test_tuple_and_dataclass_outputs_agree(scheduler_cls):
    s = scheduler_cls(prediction_type="sample")
    s.set_timesteps(3)
    x, out = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = s.timesteps[0]
    as_dataclass = s.step(out, t, x, generator=torch.Generator().manual_seed(0))
    as_tuple = s.step(out, t, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(as_dataclass, TutorialSchedulerOutput) and isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dataclass.prev_sample)
    torch.testing.assert_close(as_tuple[1], as_dataclass.pred_original_sample)
    torch.testing.assert_close(as_dataclass.pred_original_sample, out.clamp(-1, 1))  # sample-prediction, clipped


def test_timesteps_and_previous_timestep(scheduler_cls):
    s = scheduler_cls(timestep_spacing="linspace")
    s.set_timesteps(7, device="cpu")
    grid = s.timesteps.tolist()
    assert grid == sorted(grid, reverse=True) and len(grid) == 7 and grid[0] == 999 and grid[-1] == 0
    assert [s.previous_timestep(t) for t in grid] == grid[1:] + [-1]
    assert s.previous_timestep(torch.tensor(grid[0])).item() == grid[1]
    s.set_timesteps(timesteps=[900, 500, 20])
    assert s.timesteps.tolist() == [900, 500, 20] and s.previous_timestep(500) == 20 and s.num_inference_steps == 3
    s.set_timesteps(7)  # grids are cached per N: switching back restores the whole state
    assert s.timesteps.tolist() == grid and s.num_inference_steps == 7 and not s.custom_timesteps
    assert [s.previous_timestep(t) for t in grid] == grid[1:] + [-1]


def test_step_accepts_tensor_timesteps_and_keeps_dtype(scheduler_cls):
    s = scheduler_cls()
    s.set_timesteps(4)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(2, 3, 4, 4).to(dtype)
        out = s.step(x * 0.1, s.timesteps[1], x, generator=torch.Generator().manual_seed(0)).prev_sample
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_add_noise_is_q_sample(scheduler_cls):
    s = scheduler_cls()
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 250, 999])
    expected = s.alpha_bar[t].sqrt().view(3, 1, 1, 1) * x0 + (1 - s.alpha_bar[t]).sqrt().view(3, 1, 1, 1) * eps
    torch.testing.assert_close(s.add_noise(x0, eps, t), expected.float())
    v = s.get_velocity(x0, eps, t)
    expected_v = s.alpha_bar[t].sqrt().view(3, 1, 1, 1) * eps - (1 - s.alpha_bar[t]).sqrt().view(3, 1, 1, 1) * x0
    torch.testing.assert_close(v, expected_v.float())


def test_same_seed_same_samples_and_package_exports(scheduler_cls):
    assert scheduler_cls.__name__ in schedulers.__all__
    torch.testing.assert_close(run_loop(scheduler_cls(), seed=3), run_loop(scheduler_cls(), seed=3), rtol=0, atol=0)
