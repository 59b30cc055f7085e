"""TutorialRePaintPipeline: the jump schedule, eqs. (8)-(10) against a hand loop, the known region kept, bad input."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler, RePaintScheduler

from custom_pipelines import TutorialRePaintPipeline
from custom_pipelines.pipeline_tutorial_repaint import repaint_levels
from schedulers import TutorialDDPMScheduler


@pytest.fixture
def pipe(tiny_unet):
    p = TutorialRePaintPipeline(unet=tiny_unet, scheduler=TutorialDDPMScheduler())
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def image_and_mask():
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1  # left half known
    return image, mask


@pytest.mark.parametrize("n, jump_length, jump_n_sample", [(10, 3, 2), (20, 5, 3), (12, 1, 1), (7, 10, 10)])
def test_levels_are_repaints_jump_schedule(n, jump_length, jump_n_sample):
    sched = RePaintScheduler(num_train_timesteps=1000)
    sched.set_timesteps(n, jump_length=jump_length, jump_n_sample=jump_n_sample)
    levels = repaint_levels(n, jump_length, jump_n_sample)
    assert levels[1:] == (sched.timesteps // (1000 // n)).tolist()  # diffusers' sequence, in grid units
    assert levels[0] == n and levels[-1] == 0 and all(abs(a - b) == 1 for a, b in zip(levels, levels[1:]))


def inpaint(pipe, image, mask, num_inference_steps: int, jump_n_sample: int) -> torch.Tensor:
    """The pipeline's images as a tensor, jump_length 2, generator seeded with 0."""
    return pipe(
        image,
        mask,
        num_inference_steps=num_inference_steps,
        jump_length=2,
        jump_n_sample=jump_n_sample,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_known_region_is_the_input_and_unknown_is_generated(pipe, tiny_unet, image_and_mask):
    image, mask = image_and_mask
    calls = []
    handle = tiny_unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = inpaint(pipe, image, mask, num_inference_steps=6, jump_n_sample=2)
    finally:
        handle.remove()
    torch.testing.assert_close(out[..., :4], image[..., :4], atol=1e-6, rtol=0)
    assert (out[..., 4:] - image[..., 4:]).abs().mean() > 0.05
    levels = repaint_levels(6, 2, 2)
    assert len(calls) == sum(b < a for a, b in zip(levels, levels[1:])) == 10  # one UNet call per downward move


def test_without_resampling_matches_hand_written_eqs_8_to_10(pipe, tiny_unet, image_and_mask):
    """x_{t'} = m ⊙ q(x_{t'} | x_0) + (1 - m) ⊙ p_θ(x_{t'} | x_t), with the generator's draws in the same order."""
    image, mask = image_and_mask
    out = inpaint(pipe, image, mask, num_inference_steps=4, jump_n_sample=1)

    sched = TutorialDDPMScheduler()
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x0 = 2 * image - 1
    x = torch.randn(x0.shape, generator=g)
    grid = sched.timesteps.tolist()
    with torch.no_grad():
        for t, t_next in zip(grid, grid[1:] + [-1]):
            unknown = sched.step(tiny_unet(x, t).sample, t, x, generator=g).prev_sample
            known = (
                sched.add_noise(x0, torch.randn(x0.shape, generator=g), torch.tensor([t_next])) if t_next >= 0 else x0
            )
            x = mask * known + (1 - mask) * unknown
    torch.testing.assert_close(out, (x / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("defer", [False, True], ids=["at-once", "deferred"])
@pytest.mark.parametrize("bad_call", [2, 4, 8], ids=["before-any-jump", "after-a-jump", "after-two-jumps"])
def test_a_nan_from_the_model_is_reported_at_its_step_and_timestep(pipe, tiny_unet, image_and_mask, bad_call, defer):
    """Issue #21.6: only down-steps are checked, numbered among all moves. The deferred check (an accelerator's; forced
    here on the CPU) kept one timestep per checked step and looked the bad one up by its move number: after a jump it
    named another step's timestep (bad_call=4) or raised IndexError instead (bad_call=8)."""
    n, jump_length, jump_n_sample = 6, 2, 2
    levels = repaint_levels(n, jump_length, jump_n_sample)
    moves = list(zip(levels[:-1], levels[1:]))
    down_moves = [i for i, (level, next_level) in enumerate(moves) if next_level < level]
    step = down_moves[bad_call]  # the move of the bad UNet call: 2, 6 and 12 (levels 4 -> 3, 4 -> 3, 2 -> 1)
    sched = TutorialDDPMScheduler()
    sched.set_timesteps(n)
    timestep = int(sched.timesteps[n - levels[step]])  # level l holds x at the grid's entry N - l
    calls = []

    def nan_at_bad_call(module, args, output):
        if len(calls) == bad_call:
            output.sample[0, 0, 0, 0] = float("nan")
        calls.append(1)
        return output

    pipe._defer_finite_check = defer
    image, mask = image_and_mask
    handle = tiny_unet.register_forward_hook(nan_at_bad_call)
    try:
        with pytest.raises(
            FloatingPointError,
            match=rf"after step {step} of {len(moves)} \(timestep {timestep}\); it first appeared in the model output",
        ):
            pipe(image, mask, num_inference_steps=n, jump_length=jump_length, jump_n_sample=jump_n_sample)
    finally:
        handle.remove()
    # At once: the loop stops at the bad step. Deferred: it runs to its end and then names the first bad step.
    assert len(calls) == (len(down_moves) if defer else bad_call + 1)


def test_pil_and_numpy_masks(pipe, image_and_mask):
    image, mask = image_and_mask
    pil_mask = PIL.Image.fromarray((mask.numpy() * 255).astype(np.uint8))
    kw = dict(num_inference_steps=2, jump_length=1, jump_n_sample=1, output_type="np")
    a = pipe(image, pil_mask, generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(image, mask.numpy(), generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask_image=torch.ones(4, 4)), r"mask_image has shape \(1, 1, 4, 4\) but image has shape \(2, 3, 8, 8\)"),
        (dict(mask_image=torch.full((8, 8), 0.5)), r"mask_image must be binary .* such as \[0.5\]"),
        (
            dict(mask_image=torch.ones(1, 1, 1, 8, 8)),
            r"mask_image has 5 dimensions \(shape \(1, 1, 1, 8, 8\)\); allowed shapes: \(H, W\), \(1 or C, H, W\)",
        ),
        (dict(mask_image=torch.ones(8)), r"mask_image has 1 dimensions"),
        (dict(jump_length=0), "jump_length=0"),
        (dict(jump_n_sample=0), "jump_n_sample=0"),
        (dict(image=torch.rand(2, 3, 4, 4)), r"image has shape \(2, 3, 4, 4\)"),
        (dict(output_type="bmp"), "output_type='bmp'"),
    ],
)
def test_bad_input(pipe, image_and_mask, kwargs, match):
    image, mask = image_and_mask
    args = dict(image=image, mask_image=mask, num_inference_steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe(**args)


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, HeunDiscreteScheduler])
def test_unsuitable_scheduler_is_refused(tiny_unet, image_and_mask, scheduler_cls):
    pipe = TutorialRePaintPipeline(unet=tiny_unet, scheduler=scheduler_cls())
    with pytest.raises(ValueError, match=f"scheduler={scheduler_cls.__name__} cannot drive RePaint"):
        pipe(*image_and_mask, num_inference_steps=2)
