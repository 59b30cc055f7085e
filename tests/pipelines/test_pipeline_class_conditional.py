"""TutorialClassConditionalPipeline: classifier-free guidance math, UNet call counts, bad input."""

import pytest
import torch

from custom_pipelines import TutorialClassConditionalPipeline, sample_loop
from schedulers import TutorialDDIMScheduler

NUM_CLASSES = 3  # + the null class -> num_class_embeds = 4
STEPS = 3


@pytest.fixture
def cond_unet(unet_factory):
    return unet_factory(seed=4, num_class_embeds=NUM_CLASSES + 1)


@pytest.fixture
def pipe(cond_unet):
    p = TutorialClassConditionalPipeline(unet=cond_unet, scheduler=TutorialDDIMScheduler(clip_sample=False))
    p.set_progress_bar_config(disable=True)
    return p


def _count_calls(unet):
    calls = []
    handle = unet.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    return calls, handle


def _hand_loop(unet, labels, w, seed=0):
    """DDIM with ε̃ = ε_u + w (ε_c - ε_u), the two branches evaluated in two separate calls."""
    sched = TutorialDDIMScheduler(clip_sample=False)
    sched.set_timesteps(STEPS)
    labels = torch.tensor(labels)
    x = torch.randn(len(labels), 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def guided(x, t):
        eps_c = unet(x, t, class_labels=labels).sample
        eps_u = unet(x, t, class_labels=torch.full_like(labels, NUM_CLASSES)).sample
        return eps_u + w * (eps_c - eps_u)

    with torch.no_grad():
        return sample_loop(guided, sched, x)


@pytest.mark.parametrize("w, batched", [(0.0, False), (1.0, False), (3.0, True), (0.5, True)])
def test_guidance_matches_two_branch_formula_and_call_count(pipe, cond_unet, w, batched):
    labels = [0, 2]
    calls, handle = _count_calls(cond_unet)
    try:
        out = pipe(
            class_labels=labels,
            guidance_scale=w,
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=STEPS,
            output_type="pt",
            return_trajectory=True,
        )
    finally:
        handle.remove()
    assert len(calls) == STEPS  # one UNet call per step, whatever w
    expected = [NUM_CLASSES] * 2 + labels if batched else ([NUM_CLASSES] * 2 if w == 0 else labels)
    assert all(c == expected for c in calls)
    # float32 rounding of one batched call vs two calls, amplified by w: 1e-4
    torch.testing.assert_close(out.trajectory[-1], _hand_loop(cond_unet, labels, w), atol=1e-4, rtol=1e-4)


def test_labels_change_the_samples_and_int_label_repeats(pipe):
    kw = dict(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="pt")
    a = pipe(class_labels=[0, 0], **kw).images
    b = pipe(
        class_labels=[1, 1], generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="pt"
    ).images
    c = pipe(
        class_labels=0,
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=STEPS,
        output_type="pt",
    ).images
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=[0, 3]), r"class_labels contains \[3\]; allowed labels are 0..2"),
        (dict(class_labels=[-1]), r"class_labels contains \[-1\]"),
        (dict(class_labels=[0, 1], batch_size=3), "class_labels has 2 labels but batch_size=3"),
        (dict(class_labels=[0.5]), "class_labels="),
        (dict(class_labels=[0], guidance_scale=-1.0), "guidance_scale=-1.0"),
        (dict(class_labels=[0], output_type="gif"), "output_type='gif'"),
    ],
)
def test_bad_input(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(num_inference_steps=1, **kwargs)


def test_unet_without_class_embeddings_is_refused(tiny_unet):
    pipe = TutorialClassConditionalPipeline(unet=tiny_unet, scheduler=TutorialDDIMScheduler())
    with pytest.raises(ValueError, match="num_class_embeds=None"):
        pipe(class_labels=[0], num_inference_steps=1)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "class_labels=[0, 1, 2, 3], guidance_scale=3.0" in card and "- classifier-free-guidance" in card
    loaded = TutorialClassConditionalPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[1, 2], guidance_scale=2.0, num_inference_steps=STEPS, output_type="pt")
    torch.testing.assert_close(
        loaded(generator=torch.Generator().manual_seed(1), **kw).images,
        pipe(generator=torch.Generator().manual_seed(1), **kw).images,
    )
