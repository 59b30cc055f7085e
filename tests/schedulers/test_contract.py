"""The diffusers scheduler contract, run over every scheduler of ours with no per-class special cases.

Each test is written once and takes the scheduler class as its only parameter: what differs between schedulers
(the step's keyword arguments, `order`, `init_noise_sigma`, repeated timesteps) is read from the scheduler itself,
the way diffusers' pipelines read it.
"""

import inspect
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, SchedulerMixin

import schedulers
from custom_pipelines import sample_loop
from schedulers import (
    TutorialDDIMScheduler,
    TutorialDDPMScheduler,
    TutorialDistilledScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    TutorialPFODEScheduler,
    TutorialSchedulerOutput,
    TutorialScoreSDEScheduler,
)
from schedulers import tutorial_grids as grids
from schedulers import tutorial_math as tm

from .conftest import SHARED_CONFIG

OUR_SCHEDULERS = [
    TutorialDDPMScheduler,
    TutorialDDIMScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    TutorialPFODEScheduler,
    TutorialScoreSDEScheduler,
    TutorialDistilledScheduler,
]
DIFFUSERS_CONFIGS = [DDPMScheduler, DDIMScheduler]
# A second, stochastic flavour where a scheduler has one (the SDE with its Langevin corrector: order 2).
VARIANTS = {TutorialScoreSDEScheduler: dict(corrector="langevin", sde_type="ve")}


def make(cls, **config):
    # `config` goes in as keyword arguments: from_config drops the keys of a config that were left at their defaults
    # (its `_use_default_values`), so `clip_sample_range=1.5` merged into diffusers' DDPM config would become 1.0.
    return cls.from_config({**DDPMScheduler(**SHARED_CONFIG).config, **VARIANTS.get(cls, {})}, **config)


def step_kwargs(scheduler, generator):
    """What a diffusers pipeline passes: `generator` (and `eta`) only where `step` names them."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if "generator" in params else {}
    if "eta" in params:
        kwargs["eta"] = 0.5
    return kwargs


def toy_model(x, t):
    return torch.tanh(x) * 0.3


def run_loop(scheduler, n=5, seed=0, start=None, model=toy_model, x0=None):
    """The loop of diffusers' pipelines: txt2img from x_T, or img2img from add_noise at entry `start`."""
    scheduler.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    timesteps = scheduler.timesteps[start or 0 :]
    if start is not None:
        scheduler.set_begin_index(start)
        x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(2))
    else:
        x = noise * scheduler.init_noise_sigma
    kwargs = step_kwargs(scheduler, g)
    for t in timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
    return x


def point_mass_model(scheduler, c):
    """The exact network for data x_0 = c: output such that x̂_0 = c at every (x_t, t), in the scheduler's
    prediction type. ᾱ(t) is the continuous schedule (the table itself at integer t)."""

    def model(x, t):
        ab = float(grids.alpha_bar_at(float(t), scheduler.alpha_bar))
        eps = (x - math.sqrt(ab) * c) / math.sqrt(1 - ab)
        if scheduler.config.prediction_type == "v_prediction":
            return tm.velocity(torch.full_like(x, c), eps, ab)
        if scheduler.config.prediction_type == "sample":
            return torch.full_like(x, c)
        return eps

    return model


@pytest.fixture(params=OUR_SCHEDULERS, ids=lambda c: c.__name__)
def scheduler_cls(request):
    return request.param


def test_is_a_diffusers_scheduler(scheduler_cls):
    s = scheduler_cls()
    assert isinstance(s, SchedulerMixin)
    assert s.init_noise_sigma > 0 and isinstance(s.order, int) and s.order >= 1 and len(s) == 1000
    # diffusers resolves a scheduler's loader as an attribute of its defining module.
    module = sys.modules[scheduler_cls.__module__]
    assert module.SchedulerMixin is SchedulerMixin
    # every config key is an explicit __init__ parameter and is registered
    params = [p for p in inspect.signature(scheduler_cls.__init__).parameters if p != "self"]
    assert set(params) <= set(s.config.keys())
    assert not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(scheduler_cls.__init__).parameters.values())
    # step names its parameters (pipelines look for eta and generator in the signature)
    assert not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(scheduler_cls.step).parameters.values())
    # compatibles resolve to diffusers classes (Euler, DDIM, ... can take our config)
    assert EulerDiscreteScheduler in s.compatibles and DDIMScheduler in s.compatibles
    assert scheduler_cls.__name__ in schedulers.__all__


@pytest.mark.parametrize("counterpart", DIFFUSERS_CONFIGS, ids=lambda c: c.__name__)
def test_from_config_both_ways(scheduler_cls, counterpart):
    theirs = counterpart.from_config(SHARED_CONFIG)
    ours = scheduler_cls.from_config(theirs.config)
    for key in SHARED_CONFIG:
        assert ours.config[key] == theirs.config[key], key
    back = counterpart.from_config(ours.config)
    for key in SHARED_CONFIG:
        assert back.config[key] == SHARED_CONFIG[key], key
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-4, atol=1e-6)


def public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def test_save_pretrained_and_from_pretrained_round_trip(scheduler_cls, tmp_path):
    s = make(scheduler_cls)
    s.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert config["_class_name"] == scheduler_cls.__name__
    loaded = scheduler_cls.from_pretrained(tmp_path)
    assert public(loaded.config) == public(s.config)
    torch.testing.assert_close(run_loop(loaded), run_loop(s), rtol=0, atol=0)


def test_from_pretrained_in_a_fresh_process(scheduler_cls, tmp_path):
    make(scheduler_cls).save_pretrained(tmp_path)
    code = (
        f"from schedulers import {scheduler_cls.__name__} as S; s = S.from_pretrained({str(tmp_path)!r}); "
        "s.set_timesteps(4); print(s.timesteps.tolist(), s.config.prediction_type)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    reference = make(scheduler_cls)
    reference.set_timesteps(4)
    assert out.strip() == f"{reference.timesteps.tolist()} v_prediction"


def test_tuple_and_dataclass_outputs_agree(scheduler_cls):
    s = make(scheduler_cls, prediction_type="sample", thresholding=False)
    s.set_timesteps(3)
    x, out = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = s.timesteps[0]
    as_dataclass = s.step(out, t, x, **step_kwargs(s, torch.Generator().manual_seed(0)))
    s.set_timesteps(3)
    as_tuple = s.step(out, t, x, return_dict=False, **step_kwargs(s, torch.Generator().manual_seed(0)))
    assert isinstance(as_dataclass, TutorialSchedulerOutput) and isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dataclass.prev_sample)
    torch.testing.assert_close(as_tuple[1], as_dataclass.pred_original_sample)


def test_shapes_and_dtypes(scheduler_cls):
    s = make(scheduler_cls)
    s.set_timesteps(4, device="cpu")
    assert s.timesteps.ndim == 1 and s.num_inference_steps == 4
    assert s.timesteps.tolist() == sorted(s.timesteps.tolist(), reverse=True)  # descending (repeats allowed)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(2, 3, 4, 5).to(dtype)
        s.set_timesteps(4)
        for t in s.timesteps[:3]:
            out = s.step(x * 0.1, t, x, **step_kwargs(s, torch.Generator().manual_seed(0)))
            x = out.prev_sample
            assert x.dtype == dtype and x.shape == (2, 3, 4, 5) and bool(torch.isfinite(x).all())
            assert out.pred_original_sample.shape == x.shape and out.pred_original_sample.dtype == dtype


def test_same_generator_same_samples(scheduler_cls):
    torch.testing.assert_close(
        run_loop(make(scheduler_cls), seed=3), run_loop(make(scheduler_cls), seed=3), rtol=0, atol=0
    )


def test_numpy_and_tensor_step_counts(scheduler_cls):
    s = make(scheduler_cls)
    s.set_timesteps(6)
    grid = s.timesteps.clone()
    for n in (np.int64(6), torch.tensor(6)):
        s.set_timesteps(5)
        s.set_timesteps(n)
        assert torch.equal(s.timesteps, grid) and s.num_inference_steps == 6


def test_a_fresh_scheduler_steps_on_the_training_grid(scheduler_cls):
    """No set_timesteps: the grid is every training timestep T-1, ..., 0 (each once per step of the method)."""
    s = make(scheduler_cls, num_train_timesteps=30, beta_end=0.3)
    assert s.num_inference_steps is None
    distinct = sorted(set(s.timesteps.tolist()), reverse=True)
    assert float(s.timesteps[0]) == 29 and float(s.timesteps[-1]) == 0
    assert all(float(t).is_integer() for t in s.timesteps[:: s.order]) and len(s.timesteps) >= 30
    assert distinct[:3] == [29, 28, 27] or s.order > 1  # multi-stage methods add stage points in between
    x = sample_loop(toy_model, s, torch.randn(2, 3, 4, 4), **step_kwargs(s, torch.Generator().manual_seed(0)))
    assert bool(torch.isfinite(x).all()) and s.step_index == len(s.timesteps)


@pytest.mark.parametrize("strength", [1.0, 0.6, 0.2])
def test_part_way_start_with_the_exact_model_returns_the_data(scheduler_cls, strength):
    """img2img's loop (diffusers' `get_timesteps`): noise x_0 = c to timesteps[t_start·order] with add_noise, then
    step from there. With the exact network of the point mass c, every scheduler must end on c."""
    n = 8
    s = make(scheduler_cls, thresholding=False, prediction_type="epsilon")
    s.set_timesteps(n)
    t_start = n - min(int(n * strength), n)
    c = 0.25
    x0 = torch.full((2, 3, 4, 4), c, dtype=torch.float64)
    x = run_loop(s, n=n, start=t_start * s.order, model=point_mass_model(s, c), x0=x0)
    assert s.begin_index == t_start * s.order and s.step_index == len(s.timesteps)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-6)


def test_part_way_start_without_set_begin_index(scheduler_cls):
    """Code that slices timesteps without set_begin_index (diffusers' DDIM tests do) starts at the slice."""
    s = make(scheduler_cls)
    s.set_timesteps(6)
    k = 2 * s.order
    with_index = run_loop(s, n=6, start=k, x0=torch.zeros(2, 3, 4, 4, dtype=torch.float64))
    s.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x = s.add_noise(
        torch.zeros(2, 3, 4, 4, dtype=torch.float64),
        torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64),
        s.timesteps[k : k + 1].repeat(2),
    )
    kwargs = step_kwargs(s, g)
    for t in s.timesteps[k:]:
        x = s.step(toy_model(s.scale_model_input(x, t), t), t, x, **kwargs).prev_sample
    torch.testing.assert_close(x, with_index, rtol=0, atol=0)


def test_set_begin_index_is_checked(scheduler_cls):
    s = make(scheduler_cls)
    s.set_timesteps(5)
    n = len(s.timesteps)
    for bad in (-1, n, 2.0):
        with pytest.raises(ValueError, match=rf"begin_index={bad}"):
            s.set_begin_index(bad)
    s.set_begin_index(np.int64(s.order))
    assert s.begin_index == s.order and s.step_index is None
    x = torch.zeros(1, 3, 4, 4)
    s.step(x, s.timesteps[s.order], x, **step_kwargs(s, None))
    assert s.step_index == s.order + 1
    s.set_timesteps(5)
    assert s.begin_index is None and s.step_index is None  # a new grid starts a new loop


def test_add_noise_takes_one_timestep_per_sample(scheduler_cls):
    """q(x_t | x_0) with a (B,) tensor of timesteps is each sample noised at its own t (DDPM eq. (4) for VP)."""
    s = make(scheduler_cls)
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 250, 499])
    batched = s.add_noise(x0, eps, t)
    for b in range(3):
        torch.testing.assert_close(batched[b : b + 1], s.add_noise(x0[b : b + 1], eps[b : b + 1], t[b : b + 1]))
    assert batched.dtype == x0.dtype and batched.shape == x0.shape
    with pytest.raises(ValueError, match=r"timestep"):
        s.add_noise(x0, eps, torch.tensor([0, -1, 3]))


# Each way of keeping x̂_0 in range, with the schedulers whose config has it: the continuous schedulers have no
# `clip_sample` key, so a clip_sample case there tested nothing.
KEEP_IN_RANGE = [
    pytest.param(cls, keep, id=f"{cls.__name__}-{keep}")
    for cls in OUR_SCHEDULERS
    for keep in ("clip_sample", "thresholding")
    if keep in cls().config
]


def keeping_in_range(cls, keep_in_range, **config):
    options = {key: key == keep_in_range for key in ("clip_sample", "thresholding") if key in cls().config}
    s = make(cls, **options, **config)
    assert s.config[keep_in_range] is True  # the option under test is on in this scheduler's own config
    return s


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("scheduler_cls, keep_in_range", KEEP_IN_RANGE)
def test_a_non_finite_model_output_is_never_hidden(scheduler_cls, bad, keep_in_range):
    """Clipping x̂_0 to [-1, 1] used to turn +inf into 1: black images and no error. Every step must return a
    non-finite sample for a non-finite model output, whatever keeps x̂_0 in range (issue #11.6)."""
    for prediction_type in tm.PREDICTION_TYPES:
        s = keeping_in_range(scheduler_cls, keep_in_range, prediction_type=prediction_type)
        s.set_timesteps(4)
        x = torch.randn(2, 3, 4, 4)
        out = torch.zeros_like(x)
        out[1, 0, 0, 0] = bad
        for t in s.timesteps:  # every entry, the last (x̂_0 at t = 0) included
            result = s.step(out, t, x, **step_kwargs(s, torch.Generator().manual_seed(0)))
            assert not bool(torch.isfinite(result.prev_sample[1]).all()), (prediction_type, float(t))


@pytest.mark.parametrize("scheduler_cls", [c for c in OUR_SCHEDULERS if "clip_sample" in c().config])
def test_clip_sample_clips_x0_to_its_range(scheduler_cls):
    """`clip_sample`: x̂_0 (DDPM eq. (15) for ε, x̂_0 = √ᾱ x_t - √(1-ᾱ) v for v) is clamped to ±clip_sample_range,
    computed here by hand in float64 at every step of the grid, for every prediction type."""
    for prediction_type in tm.PREDICTION_TYPES:
        s = keeping_in_range(scheduler_cls, "clip_sample", prediction_type=prediction_type, clip_sample_range=1.5)
        s.set_timesteps(4)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        out = 3 * torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)  # x̂_0 well outside ±1.5
        for t in s.timesteps:
            ab = float(s.alpha_bar[int(t)])
            x0 = {
                "epsilon": (x - math.sqrt(1 - ab) * out) / math.sqrt(ab),
                "sample": out,
                "v_prediction": math.sqrt(ab) * x - math.sqrt(1 - ab) * out,
            }[prediction_type]
            assert bool((x0.abs() > 1.5).any())  # the clamp has something to do
            got = s.step(out, t, x, **step_kwargs(s, torch.Generator().manual_seed(0))).pred_original_sample
            torch.testing.assert_close(got, x0.clamp(-1.5, 1.5), rtol=1e-12, atol=1e-12)


def test_bad_arguments_name_the_argument_and_the_choices(scheduler_cls):
    with pytest.raises(ValueError, match=r"prediction_type='noise'.*'epsilon', 'sample', 'v_prediction'"):
        scheduler_cls(prediction_type="noise")
    with pytest.raises(ValueError, match=r"beta_schedule='cubic'.*'linear', 'scaled_linear', 'squaredcos_cap_v2'"):
        scheduler_cls(beta_schedule="cubic")
    with pytest.raises(ValueError, match=r"beta_end=1.5 must be a number in the open interval \(0, 1\)"):
        scheduler_cls(beta_end=1.5)
    s = scheduler_cls()
    for bad in (0, -3, 2.5, "10"):
        with pytest.raises(ValueError, match=rf"num_inference_steps={bad!r} must be an integer"):
            s.set_timesteps(bad)
    with pytest.raises(ValueError, match="exactly one of num_inference_steps and timesteps"):
        s.set_timesteps()
    s.set_timesteps(4)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 3, 8, 8\) but sample has shape \(1, 3, 4, 4\)"):
        s.step(torch.zeros(1, 3, 8, 8), s.timesteps[0], x, **step_kwargs(s, None))
