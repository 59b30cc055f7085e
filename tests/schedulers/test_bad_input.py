"""Bad arguments raise ValueError at the door, naming the argument, the value and the allowed values."""

import numpy as np
import pytest
import torch

from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers import tutorial_math as tm

BOTH = [TutorialDDPMScheduler, TutorialDDIMScheduler]


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"beta_schedule": "cubic"}, r"beta_schedule='cubic'.*'linear', 'scaled_linear', 'squaredcos_cap_v2'"),
        ({"prediction_type": "noise"}, r"prediction_type='noise'.*'epsilon', 'sample', 'v_prediction'"),
        ({"timestep_spacing": "uniform"}, r"timestep_spacing='uniform'.*'leading', 'linspace', 'trailing'"),
        ({"trained_betas": [0.1] * 10}, r"trained_betas has length 10 but num_train_timesteps=1000"),
        ({"num_train_timesteps": 4, "trained_betas": [0.1, 0.2, 1.0, 0.3]}, r"trained_betas must lie in .*\(0, 1\)"),
        ({"num_train_timesteps": 3, "trained_betas": [0.1, -0.2, 0.3]}, r"trained_betas must lie in .*\(0, 1\)"),
        ({"num_train_timesteps": 0}, r"num_train_timesteps=0"),
        ({"rescale_betas_zero_snr": True}, r"rescale_betas_zero_snr=True with prediction_type='epsilon'"),
        ({"thresholding": True, "dynamic_thresholding_ratio": 1.5}, r"dynamic_thresholding_ratio=1.5"),
        ({"steps_offset": -1}, r"steps_offset=-1"),
    ],
)
def test_bad_config_is_refused_at_construction(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


def test_bad_variance_type_names_the_choices():
    with pytest.raises(ValueError, match=r"variance_type='big'.*'fixed_small', 'fixed_small_log'.*'learned_range'"):
        TutorialDDPMScheduler(variance_type="big")


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("n", [0, -3, 1001, 2.5])
def test_num_inference_steps_out_of_range(cls, n):
    with pytest.raises(ValueError, match=rf"num_inference_steps={n}.*\[1, num_train_timesteps=1000\]"):
        cls().set_timesteps(n)


@pytest.mark.parametrize("cls", BOTH)
def test_set_timesteps_argument_checks(cls):
    s = cls()
    with pytest.raises(ValueError, match="exactly one of num_inference_steps and timesteps"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="exactly one of num_inference_steps and timesteps"):
        s.set_timesteps(10, timesteps=[5, 3])
    with pytest.raises(ValueError, match="strictly descending"):
        s.set_timesteps(timesteps=[5, 7, 1])
    with pytest.raises(ValueError, match=r"\[0, num_train_timesteps - 1 = 999\]"):
        s.set_timesteps(timesteps=[1000, 5])
    s.set_timesteps(timesteps=[900, 3])  # a cached grid must not let a near-identical bad one through
    with pytest.raises(ValueError, match="timesteps must be integers"):
        s.set_timesteps(timesteps=[900.5, 3])
    with pytest.raises(ValueError, match="steps_offset=5 pushes the 'leading' grid past t = 999"):
        cls(steps_offset=5).set_timesteps(1000)


@pytest.mark.parametrize("cls", BOTH)
def test_step_checks(cls):
    s = cls()
    x = torch.randn(1, 3, 4, 4)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match=r"model_output has shape \(1, 3, 8, 8\) but sample has shape \(1, 3, 4, 4\)"):
        s.step(torch.randn(1, 3, 8, 8), s.timesteps[0], x)
    # A float timestep used to be floored silently; an integral float is harmless and accepted.
    for bad in (900.7, torch.tensor(900.7), torch.tensor(900.5, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"timestep=900.[57]\d* is not an integer.*integer timesteps 0..999"):
            s.step(x, bad, x)
    for outside in (1000, -1, torch.tensor(-3)):
        with pytest.raises(ValueError, match=r"timestep=-?\d+ is outside \[0, num_train_timesteps - 1 = 999\]"):
            s.step(x, outside, x)
    with pytest.raises(ValueError, match=r"timestep has shape \(2,\); step takes one timestep"):
        s.step(x, torch.tensor([900, 800]), x)
    torch.testing.assert_close(
        s.step(x, 900.0, x, generator=torch.Generator().manual_seed(0)).prev_sample,
        s.step(x, 900, x, generator=torch.Generator().manual_seed(0)).prev_sample,
    )


@pytest.mark.parametrize("cls", BOTH)
def test_add_noise_refuses_timesteps_outside_the_table(cls):
    """t = -1 used to index ᾱ[-1] = ᾱ_{T-1} (silently the noisiest level); 3.5 used to be floored."""
    s = cls()
    x0 = torch.zeros(2, 1, 2, 2)
    for bad in (torch.tensor([-1, 5]), torch.tensor([0, 1000]), -1, torch.tensor([3.5, 2.0])):
        with pytest.raises(
            ValueError, match=r"timesteps=\[.*\] must be integers in \[0, num_train_timesteps - 1 = 999\]"
        ):
            s.add_noise(x0, x0, bad)
    with pytest.raises(ValueError, match=r"must be integers in \[0"):
        s.get_velocity(x0, x0, torch.tensor([0, -1]))
    ok = s.add_noise(x0 + 1, x0, torch.tensor([3.0, 999.0]))  # integral floats are harmless
    torch.testing.assert_close(ok[:, 0, 0, 0], s.alpha_bar[[3, 999]].sqrt().float())


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"beta_end": 2.0}, r"beta_end=2.0 must be a number in the open interval \(0, 1\) for beta_schedule='linear'"),
        ({"beta_start": 0.0}, r"beta_start=0.0 must be a number in the open interval \(0, 1\)"),
        ({"beta_start": -0.1, "beta_schedule": "sigmoid"}, r"beta_start=-0.1 .*beta_schedule='sigmoid'"),
        ({"beta_end": float("nan"), "beta_schedule": "scaled_linear"}, r"beta_end=nan must be a number in"),
        (
            {"beta_start": 0.02, "beta_end": 0.0001},
            r"beta_start=0.02 > beta_end=0.0001.*0 < beta_start <= beta_end < 1",
        ),
    ],
)
def test_beta_endpoints_are_checked_at_the_door(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


@pytest.mark.parametrize("cls", BOTH)
def test_beta_endpoints_are_ignored_where_the_schedule_does_not_use_them(cls):
    cls(beta_schedule="squaredcos_cap_v2", beta_end=2.0)
    cls(beta_start=0.01, beta_end=0.01)  # a constant schedule is a schedule


def test_negative_eta_is_refused():
    s = TutorialDDIMScheduler()
    s.set_timesteps(10)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"eta=-0.5 must be >= 0"):
        s.step(x, s.timesteps[0], x, eta=-0.5)
    with pytest.raises(ValueError, match="at most one of generator and variance_noise"):
        s.step(x, s.timesteps[0], x, eta=1.0, generator=torch.Generator(), variance_noise=x)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_needs_the_variance_channels(variance_type):
    s = TutorialDDPMScheduler(variance_type=variance_type)
    s.set_timesteps(10)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=rf"variance_type='{variance_type}' needs model_output with 2 x 3 channels"):
        s.step(x, s.timesteps[0], x)


def test_expand_to_refuses_a_mismatched_batch():
    with pytest.raises(ValueError, match=r"coefficient of shape \(3,\) cannot broadcast against a batch of shape"):
        tm.expand_to(torch.ones(3), torch.zeros(4, 2, 2))


@pytest.mark.parametrize(
    "value,kwargs,message",
    [
        (0, {}, "n=0 must be an integer >= 1."),
        (True, {}, "n=True must be an integer >= 1 (an int, a numpy integer or 0-d tensor)."),  # not a count
        (2.0, {"minimum": 0}, "n=2.0 must be an integer >= 0 (an int, a numpy integer or 0-d tensor)."),
        (
            torch.tensor([1, 2]),
            {},
            "n=tensor([1, 2]) must be an integer >= 1 (an int, a numpy integer or 0-d tensor).",
        ),
        (11, {"minimum": 2, "maximum": 10}, "n=11 must be an integer in [2, 10]."),
        (0, {"maximum": 5, "maximum_name": "T"}, "n=0 must be an integer in [1, T=5]."),
        (3, {"minimum": 7, "reason": "one step"}, "n=3 must be an integer >= 7 (one step)."),
    ],
)
def test_check_int_names_the_argument_the_value_and_the_allowed_range(value, kwargs, message):
    with pytest.raises(ValueError) as info:
        tm.check_int("n", value, **kwargs)
    assert str(info.value) == message


def test_check_int_returns_a_python_int_for_any_integer_kind():
    assert tm.check_int("n", 5, minimum=5, maximum=5) == 5
    assert tm.check_int("n", 0, minimum=0) == 0
    for value in (np.int64(3), torch.tensor(3), torch.tensor([3])):
        number = tm.check_int("n", value)
        assert number == 3 and type(number) is int
