"""TutorialInverseProblemPipeline: every method with every operator, the door, schedulers and prediction types, NaN,
host reads, DDNM's consistency, saving and loading (the exact posterior check is tests/advanced/test_inverse_exact.py)."""

import os
import shutil
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ScoreSdeVeScheduler,
)

from custom_pipelines import (
    Blur,
    Colorization,
    Denoising,
    Inpainting,
    RandomProjection,
    SuperResolution,
    TutorialInverseProblemPipeline,
)
from custom_pipelines.pipeline_tutorial_inverse_problem import METHODS
from schedulers import (
    TutorialDDIMScheduler,
    TutorialDDPMScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    TutorialPFODEScheduler,
    TutorialScoreSDEScheduler,
)
from schedulers.gaussian_mixture import GaussianMixture

SHAPE = (3, 8, 8)
STEPS = 3
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only contend


def _mask():
    mask = torch.ones(8, 8)
    mask[2:6, 3:7] = 0
    return mask


OPERATORS = {
    "denoising": Denoising(),
    "inpainting": Inpainting(_mask()),
    "colorization": Colorization(),
    "super_resolution": SuperResolution(2),
    "blur_circular": Blur.gaussian(3, 1.0),  # no SVD: DDRM, DDNM+ and noisy ΠGDM refuse it
    "blur_zero": Blur.gaussian(3, 1.0, padding="zero"),
    "random_projection": RandomProjection(40, SHAPE, seed=0),
}
NEEDS_SVD = {("ddrm", 0.0), ("ddrm", 0.1), ("ddnm", 0.1), ("pigdm", 0.1)}


def _clean(seed=1, batch=2):
    return 2 * torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(seed)) - 1


def _measure(op, sigma_y=0.0, seed=1, batch=2):
    y = op.A(_clean(seed, batch))
    return y + sigma_y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))


@pytest.fixture
def pipe(tiny_unet):
    p = TutorialInverseProblemPipeline(unet=tiny_unet, scheduler=TutorialDDPMScheduler())
    p.set_progress_bar_config(disable=True)
    return p


def _restore(pipe, y, op, method="ddnm", **kwargs):
    """The restored x_0 in model space (unclipped: the trajectory's last entry)."""
    kwargs = {"num_inference_steps": STEPS, "generator": torch.Generator().manual_seed(0), **kwargs}
    out = pipe(y, op, method=method, output_type="pt", return_trajectory=True, **kwargs)
    assert out.images.shape == (y.shape[0], *SHAPE)
    return out.trajectory[-1]


# ---- every method with every operator ----------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_y", [0.0, 0.1])
@pytest.mark.parametrize("op_name", list(OPERATORS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_with_every_operator(pipe, method, op_name, sigma_y):
    op = OPERATORS[op_name]
    y = _measure(op, sigma_y)
    if op_name == "blur_circular" and (method, sigma_y) in NEEDS_SVD:
        with pytest.raises(ValueError, match=rf"operator=Blur cannot serve method='{method}'.*needs the SVD of A"):
            _restore(pipe, y, op, method, measurement_noise=sigma_y)
        return
    x = _restore(pipe, y, op, method, measurement_noise=sigma_y)
    assert bool(torch.isfinite(x).all())


@pytest.mark.parametrize(
    "op_name", ["denoising", "inpainting", "colorization", "super_resolution", "random_projection"]
)
def test_noiseless_ddnm_and_ddrm_end_on_the_measurement(pipe, op_name):
    """DDNM's last x̂_0 correction puts A x = y to float32 rounding (the issue's goal: ≤ 1e-4), and so does DDRM's
    η_b = 1 range step; exact operators only (blur's A⁺ amplifies rounding by 1/s_min)."""
    op = OPERATORS[op_name]
    y = _measure(op)
    for method in ("ddnm", "ddrm"):
        x = _restore(pipe, y, op, method, num_inference_steps=10)
        error = float(((op.A(x) - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)).max())
        assert error <= 1e-5, (method, error)


def test_noiseless_ddnm_keeps_the_measurement_on_zero_padded_blur(pipe):
    op = OPERATORS["blur_zero"]
    y = _measure(op)
    x = _restore(pipe, y, op, "ddnm", num_inference_steps=10)
    assert float((op.A(x) - y).norm() / y.norm()) <= 1e-4


# ---- schedulers and prediction types -----------------------------------------------------------------------------
DIFFUSERS_SCHEDULERS = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler]
OUR_SCHEDULERS = [
    TutorialDDPMScheduler,
    TutorialDDIMScheduler,
    TutorialDPMSolverPlusPlusScheduler,
    TutorialPFODEScheduler,
    TutorialScoreSDEScheduler,
]


@pytest.mark.parametrize("scheduler_cls", DIFFUSERS_SCHEDULERS + OUR_SCHEDULERS, ids=lambda c: c.__name__)
def test_any_variance_preserving_scheduler_serves_every_method(tiny_unet, scheduler_cls):
    scheduler = scheduler_cls.from_config(TutorialDDPMScheduler().config)
    pipe = TutorialInverseProblemPipeline(unet=tiny_unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    op = OPERATORS["super_resolution"]
    y = _measure(op)
    calls = []
    handle = tiny_unet.register_forward_hook(lambda module, args, out: calls.append(float(args[1].flatten()[0])))
    try:
        for method in METHODS:
            x = _restore(pipe, y, op, method, num_inference_steps=4)
            assert bool(torch.isfinite(x).all())
    finally:
        handle.remove()
    grid = []  # a multi-stage scheduler repeats each timestep; the methods take one step per distinct one
    for t in scheduler.timesteps.tolist():
        if not grid or t != grid[-1]:
            grid.append(t)
    assert np.allclose(calls, grid * len(METHODS))
    assert pipe.scheduler is scheduler  # never swapped


def test_a_diffusers_scheduler_gives_our_schedulers_numbers(tiny_unet):
    """The methods read only ᾱ and the grid: diffusers' DDPM (float32 ᾱ) and ours (float64) agree to rounding."""
    op = OPERATORS["inpainting"]
    y = _measure(op)
    outs = []
    for scheduler in (TutorialDDPMScheduler(), DDPMScheduler.from_config(TutorialDDPMScheduler().config)):
        pipe = TutorialInverseProblemPipeline(unet=tiny_unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        outs.append([_restore(pipe, y, op, method, num_inference_steps=5) for method in METHODS])
    for ours, theirs in zip(*outs):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_every_prediction_type_gives_the_same_restoration():
    """With the exact network of a mixture, ε-, x_0- and v-prediction are the same x̂_0: the same samples."""
    gm = GaussianMixture.random(dim=16, num_modes=3, seed=2)
    op = SuperResolution(2)
    y = op.A(gm.sample(2, generator=torch.Generator().manual_seed(0)).reshape(2, 1, 4, 4))
    results = {}
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        scheduler = TutorialDDIMScheduler(prediction_type=prediction_type, clip_sample=False)
        pipe = TutorialInverseProblemPipeline(
            unet=gm.as_unet(scheduler.alpha_bar, (1, 4, 4), prediction_type), scheduler=scheduler
        )
        pipe.set_progress_bar_config(disable=True)
        results[prediction_type] = [
            pipe(y, op, method=m, num_inference_steps=6, measurement_noise=0.05 * (m != "dps"),
                 generator=torch.Generator().manual_seed(1), output_type="pt", return_trajectory=True).trajectory[-1]
            for m in METHODS
        ]  # fmt: skip
    for prediction_type in ("sample", "v_prediction"):
        for method, a, b in zip(METHODS, results["epsilon"], results[prediction_type]):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=0, msg=f"{method} {prediction_type}")


def test_clip_sample_is_applied_to_the_networks_x0(tiny_unet):
    op = OPERATORS["super_resolution"]
    y = _measure(op)
    outs = []
    for clip in (False, True):
        pipe = TutorialInverseProblemPipeline(unet=tiny_unet, scheduler=TutorialDDIMScheduler(clip_sample=clip))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(y, op, method="dps", num_inference_steps=3, output_type="pt", return_trajectory=True,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
        outs.append(out.pred_original_samples[0])
    assert outs[0].abs().max() > 1 and outs[1].abs().max() <= 1  # DPS' x̂_0 is the network's, clipped or not


# ---- the door -----------------------------------------------------------------------------------------------------
BAD_INPUT = [
    (dict(method="ddpm"), r"method='ddpm' is not supported; choose one of \('ddnm', 'ddrm', 'dps', 'pigdm'\)"),
    (dict(measurement=torch.zeros(2, 3, 8, 8)), r"measurement has shape \(2, 3, 8, 8\); operator=SuperResolution"),
    (dict(measurement=torch.zeros(3, 4, 4)), r"measurement has shape \(3, 4, 4\)"),
    (dict(measurement=np.zeros((2, 3, 4, 4))), r"measurement must be a floating tensor .* got ndarray"),
    (dict(measurement=torch.zeros(2, 3, 4, 4, dtype=torch.long)), r"measurement must be a floating tensor"),
    (dict(measurement=torch.full((2, 3, 4, 4), float("nan"))), r"measurement has non-finite entries"),
    (dict(measurement_noise=-0.1), r"measurement_noise=-0.1 must be a finite number >= 0"),
    (dict(measurement_noise=float("nan")), r"measurement_noise=nan must be a finite number >= 0"),
    (dict(measurement_noise=True), r"measurement_noise=True must be"),
    (dict(num_inference_steps=0), r"num_inference_steps=0 must be an integer >= 1"),
    (dict(eta=1.5), r"eta=1.5 must be in \[0.0, 1.0\]"),
    (dict(eta=-0.1, method="dps"), r"eta=-0.1 must be in \[0.0, 1.0\]"),
    (dict(eta=0.0, measurement_noise=0.1), r"eta=0 with measurement_noise > 0 is not supported by method='ddnm'"),
    (dict(eta_b=0.5), r"eta_b=0.5 is DDRM's; method='ddnm' does not use it"),
    (dict(eta_b=2.0, method="ddrm"), r"eta_b=2.0 must be in \[0.0, 1.0\]"),
    (dict(guidance_scale=1.0), r"guidance_scale=1.0 is the step size of \('dps', 'pigdm'\); method='ddnm'"),
    (dict(guidance_scale=-1.0, method="dps"), r"guidance_scale=-1.0 must be a finite number >= 0"),
    (dict(guidance_scale=float("inf"), method="pigdm"), r"guidance_scale=inf must be"),
    (dict(output_type="gif"), r"output_type='gif' is not supported"),
    (dict(generator=[torch.Generator()]), r"generator is a list of 1 generators but batch_size=2"),
    (dict(latents=torch.zeros(1, 3, 8, 8)), r"latents has shape \(1, 3, 8, 8\); expected \(2, 3, 8, 8\)"),
    (dict(operator="blur"), r"operator=str has no A\(\)"),
    (dict(operator=SuperResolution(3)), r"operator=SuperResolution does not apply to this UNet's images .* factor=3"),
    (dict(operator=RandomProjection(4, (1, 8, 8))), r"operator=RandomProjection does not apply"),
    (
        dict(operator=OPERATORS["blur_circular"], method="ddrm", measurement=torch.zeros(2, *SHAPE)),
        r"operator=Blur cannot serve method='ddrm'",
    ),
    (dict(callback_on_step_end_tensor_inputs=["x0"]), r"callback_on_step_end_tensor_inputs=\['x0'\] contains"),
]


@pytest.mark.parametrize("kwargs, match", BAD_INPUT, ids=[m[:40] for _, m in BAD_INPUT])
def test_bad_input_is_refused_at_the_door(pipe, tiny_unet, kwargs, match):
    args = dict(measurement=torch.zeros(2, 3, 4, 4), operator=OPERATORS["super_resolution"], num_inference_steps=2)
    args.update(kwargs)
    calls = []
    handle = tiny_unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            pipe(**args)
    finally:
        handle.remove()
    assert calls == []  # refused before the first network call


@pytest.mark.parametrize(
    "scheduler, reason",
    [
        (EulerDiscreteScheduler(), r"its init_noise_sigma=157.4 says it works in a σ-scaled space"),
        (TutorialScoreSDEScheduler(sde_type="ve"), r"it samples the 've' SDE"),
        (TutorialScoreSDEScheduler(sde_type="subvp"), r"it samples the 'subvp' SDE"),
        (ScoreSdeVeScheduler(), r"it has no ᾱ table"),
        (DDIMScheduler(thresholding=True), r"thresholding=True"),
    ],
    ids=["euler", "sde-ve", "sde-subvp", "diffusers-sde-ve", "thresholding"],
)
def test_a_scheduler_the_methods_cannot_use_is_refused(tiny_unet, scheduler, reason):
    pipe = TutorialInverseProblemPipeline(unet=tiny_unet, scheduler=scheduler)
    op = OPERATORS["super_resolution"]
    with pytest.raises(ValueError, match=rf"scheduler={type(scheduler).__name__} cannot serve method='dps': {reason}"):
        pipe(_measure(op), op, method="dps", num_inference_steps=2)


# ---- outputs, callbacks --------------------------------------------------------------------------------------------
def test_output_types_and_tuple(pipe):
    op = OPERATORS["inpainting"]
    y = _measure(op)
    kw = dict(num_inference_steps=2)
    pil = pipe(y, op, generator=torch.Generator().manual_seed(0), **kw).images
    arr = pipe(y, op, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    (pt,) = pipe(y, op, generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False, **kw)
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    assert arr.shape == (2, 8, 8, 3) and pt.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1] * 255).round().astype(np.uint8))


def test_same_generator_same_images_and_latents_are_the_start(pipe):
    op = OPERATORS["super_resolution"]
    y = _measure(op)
    a = _restore(pipe, y, op, "pigdm")
    b = _restore(pipe, y, op, "pigdm")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    latents = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    out = pipe(y, op, num_inference_steps=2, latents=latents, output_type="pt", return_trajectory=True)
    torch.testing.assert_close(out.trajectory[0], latents)


def test_callback_sees_every_step_and_may_replace_x_t(pipe):
    op = OPERATORS["super_resolution"]
    y = _measure(op)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, t))
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == STEPS - 2 else {}

    out = pipe(y, op, method="ddnm", num_inference_steps=STEPS, output_type="pt", return_trajectory=True,
               callback_on_step_end=callback, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert [i for i, _ in seen] == list(range(STEPS)) and [t for _, t in seen] == out.timesteps
    pipe.scheduler.set_timesteps(STEPS)
    assert out.timesteps == [float(t) for t in pipe.scheduler.timesteps]


# ---- NaN is never hidden ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("defer", [False, True], ids=["at-once", "deferred"])
@pytest.mark.parametrize("method", METHODS)
def test_a_nan_from_the_model_raises_naming_its_step(pipe, tiny_unet, method, defer):
    calls = []

    def poison(module, args, output):
        if len(calls) == 1:
            output.sample[0, 0, 0, 0] = float("nan")
        calls.append(1)
        return output

    pipe._defer_finite_check = defer
    op = OPERATORS["super_resolution"]
    pipe.scheduler.set_timesteps(4)
    timestep = int(pipe.scheduler.timesteps[1])
    handle = tiny_unet.register_forward_hook(poison)
    try:
        with pytest.raises(
            FloatingPointError,
            match=rf"after step 1 of 4 \(timestep {timestep}(\.0)?\); it first appeared in the model",
        ):
            pipe(_measure(op), op, method=method, num_inference_steps=4)
    finally:
        handle.remove()
    assert len(calls) == (4 if defer else 2)


# ---- no host reads per step (the meta device, as tests/pipelines/test_pipeline_host_sync.py) -----------------------
META = torch.device("meta")
PLACEHOLDERS = {"item": -1, "__int__": -1, "__index__": -1, "__float__": 0.0, "__bool__": False}


@pytest.fixture
def host_reads(monkeypatch):
    reads = []

    def counting(name, real):
        def read(self, *args, **kwargs):
            if self.device.type != "meta":
                return real(self, *args, **kwargs)
            reads.append(name)
            if name not in PLACEHOLDERS:
                raise AssertionError(f"Tensor.{name}() of a device tensor inside a sampling loop")
            return PLACEHOLDERS[name]

        return read

    for name in (*PLACEHOLDERS, "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return reads


@pytest.mark.parametrize("sigma_y", [0.0, 0.1])
@pytest.mark.parametrize("method", METHODS)
def test_the_loop_reads_nothing_from_the_device_per_step(host_reads, unet_factory, method, sigma_y):
    pipe = TutorialInverseProblemPipeline(unet=unet_factory(sample_size=8).to(META), scheduler=TutorialDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    op = OPERATORS["super_resolution"]
    y = _measure(op)  # on the host: its finiteness is read at the door, before it moves to the device
    counts = []
    for steps in (3, 6):
        host_reads.clear()
        out = pipe(y, op, method=method, num_inference_steps=steps, measurement_noise=sigma_y, output_type="pt")
        assert out.images.device == META
        counts.append(len(host_reads))
    assert counts[0] == counts[1] <= 1, f"host reads for 3 and 6 steps: {counts}"


# ---- saving and loading ---------------------------------------------------------------------------------------------
FRESH = """
import json, sys, torch
FROM
folder, call = FOLDER, torch.load(CALL)
pipe = LOAD
pipe.set_progress_bar_config(disable=True)
op = pipe.operators.SuperResolution(2)  # the shipped module's own operator classes
results = {}
for method in ("ddnm", "ddrm", "dps", "pigdm"):
    x = pipe(call["y"], op, method=method, num_inference_steps=3, measurement_noise=call["sigma_y"],
             generator=torch.Generator().manual_seed(0), output_type="pt").images
    results[method] = float((x - call[method]).abs().max())
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("schedulers", "custom_pipelines", "training"))
print("RESULT:" + json.dumps(dict(results=results, pipeline=type(pipe).__module__, ours=ours,
                                  operator=type(op).__module__)))
"""


def test_a_saved_folder_loads_in_fresh_processes_with_diffusers_alone_and_with_ours(
    unet_factory, tmp_path, start_fresh_python
):
    pipe = TutorialInverseProblemPipeline(unet=unet_factory(seed=3), scheduler=TutorialDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "restore"
    pipe.save_pretrained(folder, num_inference_steps=STEPS)
    assert {"pipeline_tutorial_inverse_problem.py", "tutorial_operators.py"} <= set(os.listdir(folder))
    card = (folder / "README.md").read_text()
    assert "measurement=y, operator=operator, method='ddnm'" in card and "- inverse-problems" in card
    op = SuperResolution(2)
    call = dict(y=_measure(op, 0.05), sigma_y=0.05)
    for method in METHODS:
        call[method] = pipe(call["y"], op, method=method, num_inference_steps=3, measurement_noise=0.05,
                            generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    torch.save(call, tmp_path / "call.pt")
    common = FRESH.replace("FOLDER", repr(str(folder))).replace("CALL", repr(str(tmp_path / "call.pt")))
    diffusers_only = common.replace("FROM", "from diffusers import DiffusionPipeline").replace(
        "LOAD", "DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)"
    )
    with_ours = common.replace("FROM", "from custom_pipelines import TutorialInverseProblemPipeline").replace(
        "LOAD", "TutorialInverseProblemPipeline.from_pretrained(folder)"
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    running = [
        start_fresh_python(diffusers_only, tmp_path / "a", block_our_packages=True),
        start_fresh_python(with_ours, tmp_path / "b"),
    ]
    alone, ours = (proc.result() for proc in running)
    assert alone["ours"] == [] and alone["pipeline"].startswith("diffusers_modules.local.")
    assert alone["operator"].startswith("diffusers_modules.local.")
    assert ours["pipeline"] == "custom_pipelines.pipeline_tutorial_inverse_problem"
    for res in (alone, ours):
        assert set(res["results"]) == set(METHODS)  # the same code and seed (thread counts differ: float rounding)
        assert max(res["results"].values()) < 1e-4, res["results"]


def test_push_to_hub_uploads_a_folder_that_loads(pipe, tmp_path, monkeypatch):
    hub = tmp_path / "hub"

    def create_repo(api, repo_id, private=None, exist_ok=False, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(api, repo_id, folder_path, commit_message=None, create_pr=False, **kwargs):
        shutil.copytree(folder_path, hub / repo_id)
        return SimpleNamespace(oid="0" * 40, commit_url=f"https://hub.invalid/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    pipe.push_to_hub("me/tiny-restore", num_inference_steps=STEPS)
    repo = hub / "me" / "tiny-restore"
    assert {"model_index.json", "pipeline_tutorial_inverse_problem.py", "tutorial_operators.py"} <= set(
        os.listdir(repo)
    )
    loaded = TutorialInverseProblemPipeline.from_pretrained(repo)
    loaded.set_progress_bar_config(disable=True)
    op = OPERATORS["colorization"]
    y = _measure(op)
    torch.testing.assert_close(_restore(loaded, y, op), _restore(pipe, y, op))
