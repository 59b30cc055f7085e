"""The loading contract of saved pipeline folders (issue 3, cases a-e), each checked in a fresh Python process."""

import ast
import filecmp
import importlib
import inspect
import json
import os
import re
import shutil
import sys

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, SchedulerMixin
from diffusers.utils.dynamic_modules_utils import get_relative_imports

import schedulers
from custom_pipelines import (
    TutorialClassConditionalPipeline,
    TutorialDDIMInversionPipeline,
    TutorialRePaintPipeline,
    TutorialUnconditionalPipeline,
    pipeline_tutorial_unconditional,
    tutorial_pipeline_folder,
    tutorial_pipeline_loading,
    tutorial_pipeline_saving,
    tutorial_pipeline_utils,
)
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
from schedulers.scheduling_tutorial_pf_ode import TutorialPFODEScheduler

STEPS = 5  # divides T = 1000, so diffusers' DDIM/DDPM grids agree with ours and the numbers must match
SEED = 7
SCHEDULER_SOURCES = (
    "scheduling_tutorial_ddim.py",
    "tutorial_discrete_base.py",
    "tutorial_math.py",
    "tutorial_scheduler_common.py",
)


def _images(pipe, seed=SEED, steps=STEPS):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="pt"
    ).images


@pytest.fixture(scope="module")
def folders(tmp_path_factory, unet_factory):
    """Folders saved by our pipelines (unconditional with our DDIM, our DDPM, diffusers' DDIM; class-conditional;
    inversion; RePaint), each with its reference images and call arguments, and one in the google/ddpm-* layout."""
    root = tmp_path_factory.mktemp("saved")
    unet = unet_factory(seed=1)
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    specs = [
        ("ours_ddim", TutorialUnconditionalPipeline(unet=unet, scheduler=TutorialDDIMScheduler()), {}),
        ("ours_ddpm", TutorialUnconditionalPipeline(unet=unet, scheduler=TutorialDDPMScheduler()), {}),
        ("diffusers_ddim", TutorialUnconditionalPipeline(unet=unet, scheduler=DDIMScheduler()), {}),
        (
            "class_cond",
            TutorialClassConditionalPipeline(
                unet=unet_factory(seed=1, num_class_embeds=3), scheduler=TutorialDDPMScheduler()
            ),
            dict(class_labels=[0, 1], guidance_scale=2.0),
        ),
        ("inversion", TutorialDDIMInversionPipeline(unet=unet, scheduler=TutorialDDIMScheduler()), {}),
        (
            "repaint",
            TutorialRePaintPipeline(unet=unet, scheduler=TutorialDDPMScheduler()),
            dict(image=image, mask_image=mask, jump_length=2, jump_n_sample=2),
        ),
        ("ours_pf_ode", TutorialUnconditionalPipeline(unet=unet, scheduler=TutorialPFODEScheduler()), {}),
    ]
    out = {}
    for name, pipe, kwargs in specs:
        if "class_labels" not in kwargs and "image" not in kwargs:
            kwargs = dict(kwargs, batch_size=2)
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(root / name)
        torch.save(kwargs, root / f"{name}.call.pt")
        images = pipe(
            generator=torch.Generator().manual_seed(SEED), num_inference_steps=STEPS, output_type="pt", **kwargs
        ).images
        torch.save(images, root / f"{name}.pt")
        out[name] = root / name
    ddpm = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())  # what google/ddpm-cifar10-32 holds, tiny
    ddpm.set_progress_bar_config(disable=True)
    ddpm.save_pretrained(root / "hub_ddpm_layout")
    images = ddpm(
        batch_size=2, generator=torch.Generator().manual_seed(SEED), num_inference_steps=STEPS, output_type="np"
    ).images
    torch.save(torch.from_numpy(images).permute(0, 3, 1, 2), root / "hub_ddpm_layout.pt")
    out["hub_ddpm_layout"] = root / "hub_ddpm_layout"
    out["root"] = root
    return out


# ---- the folder itself ------------------------------------------------------------------------------------------------
def test_folder_is_self_contained(folders):
    path = folders["ours_ddim"]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_tutorial_unconditional", "TutorialUnconditionalPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    # diffusers' loader fetches only the siblings the named file imports as `from .name import ...` (one level deep);
    # the scheduler file names every file it needs that way, so it is recorded itself (no loader entry file).
    assert index["scheduler"] == ["scheduling_tutorial_ddim", "TutorialDDIMScheduler"]
    named = (path / "scheduler" / "scheduling_tutorial_ddim.py").read_text()
    for stem in ("tutorial_discrete_base", "tutorial_math", "tutorial_scheduler_common"):
        assert f"from .{stem} import" in named
    assert not list(path.glob("**/*_entry.py"))
    sched_dir = os.path.dirname(schedulers.__file__)
    for name in SCHEDULER_SOURCES:  # byte-identical copies of our sources
        assert filecmp.cmp(os.path.join(sched_dir, name), path / "scheduler" / name, shallow=False)
    for module in (
        pipeline_tutorial_unconditional,
        tutorial_pipeline_utils,
        tutorial_pipeline_saving,
        tutorial_pipeline_loading,
        tutorial_pipeline_folder,
    ):
        assert filecmp.cmp(module.__file__, path / os.path.basename(module.__file__), shallow=False)
    assert not (path / "scheduler" / "__init__.py").exists()


def test_ddpm_scheduler_ships_only_what_it_imports(folders):
    shipped = {p.name for p in (folders["ours_ddpm"] / "scheduler").glob("*.py")}
    expected = {"scheduling_tutorial_ddpm.py", "tutorial_discrete_base.py", "tutorial_grids.py", "tutorial_math.py"}
    assert shipped == expected | {"tutorial_scheduler_common.py"}
    index = json.loads((folders["ours_ddpm"] / "model_index.json").read_text())
    assert index["scheduler"] == ["scheduling_tutorial_ddpm", "TutorialDDPMScheduler"]


# ---- what diffusers' loader fetches: the named file must name its whole sibling closure ---------------------------------
def _our_shipped_classes():
    """Every scheduler and pipeline class of this project that `save_pretrained` ships as code."""
    import custom_pipelines

    found = [getattr(schedulers, n) for n in schedulers.__all__]
    found += [getattr(custom_pipelines, n) for n in custom_pipelines.__all__]
    return [
        c
        for c in found
        if isinstance(c, type)
        and issubclass(c, (SchedulerMixin, tutorial_pipeline_utils.TutorialPipelineBase))
        and c is not tutorial_pipeline_utils.TutorialPipelineBase
    ]


def test_every_shipped_class_names_its_whole_sibling_closure_as_diffusers_detects():
    """diffusers copies the siblings `get_relative_imports` finds in the named file, and no further: for each class we
    ship, every file its module needs (transitively, as Python imports it) must be among them."""
    classes = _our_shipped_classes()
    names = {c.__name__ for c in classes}
    assert {"TutorialDDPMScheduler", "TutorialDDIMScheduler", "TutorialPFODEScheduler"} <= names
    assert {"TutorialDPMSolverPlusPlusScheduler", "TutorialScoreSDEScheduler", "TutorialRePaintPipeline"} <= names
    for klass in classes:
        source = inspect.getsourcefile(klass)
        closure = {os.path.basename(p)[:-3] for p in tutorial_pipeline_folder.relative_import_closure(source)[1:]}
        detected = set(get_relative_imports(source))
        assert closure <= detected, f"{klass.__name__}: {os.path.basename(source)} does not name {closure - detected}"
        assert set(tutorial_pipeline_saving.detected_by_diffusers(source)) == detected  # our copy of the regex


def _write_package(root, name, files):
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for stem, text in files.items():
        (package / f"{stem}.py").write_text(text)
    return package


SHIPPABLE_CLASS = "from diffusers import ConfigMixin, SchedulerMixin\n{imports}\n\nclass {name}(SchedulerMixin, ConfigMixin):\n    pass\n"


@pytest.mark.parametrize(
    "package, imports, missing",
    [
        ("zzz_pkg_plain", "from . import zzz_helper_a", ["zzz_helper_a"]),  # a form diffusers' regex does not see
        ("zzz_pkg_deep", "from .zzz_helper_b import VALUE", ["zzz_helper_c"]),  # a sibling's sibling: one level only
    ],
)
def test_a_class_whose_siblings_diffusers_would_miss_is_refused(tmp_path, monkeypatch, package, imports, missing):
    _write_package(
        tmp_path,
        package,
        {
            "scheduling_zzz": SHIPPABLE_CLASS.format(imports=imports, name="ZzzScheduler"),
            "zzz_helper_a": "VALUE = 1\n",
            "zzz_helper_b": "from .zzz_helper_c import VALUE\n",
            "zzz_helper_c": "VALUE = 2\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    klass = importlib.import_module(f"{package}.scheduling_zzz").ZzzScheduler
    target = tmp_path / "saved" / "scheduler"
    with pytest.raises(
        ValueError, match=rf"Cannot ship ZzzScheduler: .* {re.escape(str(missing))} .*scheduling_zzz\.py"
    ):
        tutorial_pipeline_saving.ship_module(klass, str(target))
    assert not target.exists()  # refused before anything is written


def test_a_class_that_names_its_siblings_ships_them_and_is_recorded_itself(tmp_path, monkeypatch):
    _write_package(
        tmp_path,
        "zzz_pkg_ok",
        {
            "scheduling_zzz_ok": SHIPPABLE_CLASS.format(
                imports="from .zzz_helper_b import VALUE\nfrom .zzz_helper_c import VALUE as OTHER", name="ZzzOk"
            ),
            "zzz_helper_b": "from .zzz_helper_c import VALUE\n",
            "zzz_helper_c": "VALUE = 2\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    klass = importlib.import_module("zzz_pkg_ok.scheduling_zzz_ok").ZzzOk
    target = tmp_path / "saved" / "scheduler"
    assert tutorial_pipeline_saving.ship_module(klass, str(target)) == "scheduling_zzz_ok"
    assert sorted(p.name for p in target.iterdir()) == ["scheduling_zzz_ok.py", "zzz_helper_b.py", "zzz_helper_c.py"]


def test_diffusers_scheduler_keeps_the_diffusers_entry(folders):
    path = folders["diffusers_ddim"]
    index = json.loads((path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not list((path / "scheduler").glob("*.py"))


def test_model_card_has_hub_metadata_and_instructions(folders):
    card = (folders["ours_ddim"] / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert "diffusion-tutorial" in meta["tags"]
    assert "trust_remote_code=True" in card and "TutorialUnconditionalPipeline.from_pretrained" in card
    assert "`TutorialDDIMScheduler`" in card and f"num_inference_steps`: {STEPS}" in card  # the last steps used


def test_card_records_requested_steps_and_samples(tmp_path, tiny_unet):
    pipe = TutorialUnconditionalPipeline(unet=tiny_unet, scheduler=TutorialDDIMScheduler())
    samples = torch.rand(3, 3, 8, 8)
    pipe.save_pretrained(tmp_path, num_inference_steps=25, sample_images=samples, model_card_text="Trained on digits.")
    card = (tmp_path / "README.md").read_text()
    assert "num_inference_steps`: 25" in card and "Trained on digits." in card
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"sample_0{i}.png" for i in range(3)]
    assert "![sample](samples/sample_02.png)" in card


def test_unknown_component_class_is_reported(folders, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(folders["ours_ddim"], path)
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["scheduling_somebody_else", "SomebodyElsesScheduler"]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError,
        match=r"scheduler: class 'SomebodyElsesScheduler' of module 'scheduling_somebody_else' named in model_index."
        r"json is not found in schedulers.scheduling_somebody_else or custom_pipelines.scheduling_somebody_else",
    ):
        TutorialUnconditionalPipeline.from_pretrained(path)


def test_incomplete_or_corrupt_folder_is_named(folders, tmp_path):
    """A missing component folder or a damaged model_index.json is named, not taken for a Hub repo id to download."""
    path = tmp_path / "copy"
    shutil.copytree(folders["ours_ddim"], path)
    shutil.rmtree(path / "unet")
    with pytest.raises(
        ValueError, match=r"unet: model_index.json names \['diffusers', 'UNet2DModel'\] but .*unet is not a"
    ):
        TutorialUnconditionalPipeline.from_pretrained(path)
    (path / "model_index.json").write_text('{"_class_name": ["pipeline_tutorial_unconditional",')
    with pytest.raises(
        ValueError, match=r"copy.model_index.json is not valid JSON \(.*\); the pipeline folder is damaged"
    ):
        TutorialUnconditionalPipeline.from_pretrained(path)


def test_torch_dtype_reaches_the_unet(folders):
    pipe = TutorialUnconditionalPipeline.from_pretrained(folders["ours_ddim"], torch_dtype=torch.float64)
    assert pipe.unet.dtype == torch.float64 and type(pipe.scheduler) is TutorialDDIMScheduler


def test_in_process_round_trip(folders):
    pipe = TutorialUnconditionalPipeline.from_pretrained(folders["ours_ddpm"])
    assert type(pipe.scheduler) is TutorialDDPMScheduler
    torch.testing.assert_close(_images(pipe), torch.load(folders["root"] / "ours_ddpm.pt"))


# ---- (a) and (e): only diffusers importable ---------------------------------------------------------------------------
ONLY_DIFFUSERS = """
import json, sys, torch
from diffusers import DiffusionPipeline
root = ROOT
res = {}
# (e) without trust_remote_code: diffusers' own error, nothing loaded
try:
    DiffusionPipeline.from_pretrained(root + "/ours_ddim")
    res["e"] = "loaded silently"
except ValueError as err:
    res["e"] = str(err)
for name in ("ours_ddim", "ours_ddpm", "diffusers_ddim", "class_cond", "inversion", "repaint", "ours_pf_ode"):
    pipe = DiffusionPipeline.from_pretrained(root + "/" + name, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = torch.load(root + "/" + name + ".call.pt")
    images = pipe(generator=torch.Generator().manual_seed(SEED), num_inference_steps=STEPS, output_type="pt",
                  **kwargs).images
    res[name] = dict(
        pipeline=type(pipe).__module__ + "." + type(pipe).__name__,
        scheduler=type(pipe.scheduler).__module__ + "." + type(pipe.scheduler).__name__,
        max_diff=float((images - torch.load(root + "/" + name + ".pt")).abs().max()),
    )
res["our_modules_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("schedulers", "custom_pipelines"))
print("RESULT:" + json.dumps(res))
"""


@pytest.fixture(scope="module")
def fresh_results(folders, tmp_path_factory, start_fresh_python):
    """Both fresh processes, started side by side: only diffusers importable (a, e), and our package imported (b-d)."""
    scripts = {}
    for key, template in (("only_diffusers", ONLY_DIFFUSERS), ("with_package", WITH_OUR_PACKAGE)):
        script = template.replace("ROOT", repr(str(folders["root"]))).replace("SEED", str(SEED))
        scripts[key] = script.replace("STEPS", str(STEPS))
    running = {
        "only_diffusers": start_fresh_python(
            scripts["only_diffusers"], tmp_path_factory.mktemp("fresh_a"), block_our_packages=True
        ),
        "with_package": start_fresh_python(scripts["with_package"], tmp_path_factory.mktemp("fresh_b")),
    }
    return {key: proc.result() for key, proc in running.items()}


def test_a_remote_code_loads_and_reproduces_images_without_our_packages(fresh_results):
    res = fresh_results["only_diffusers"]
    assert res["our_modules_imported"] == []
    for name in ("ours_ddim", "ours_ddpm"):
        assert (
            res[name]["pipeline"]
            == "diffusers_modules.local.pipeline_tutorial_unconditional.TutorialUnconditionalPipeline"
        )
        assert res[name]["scheduler"].startswith("diffusers_modules.local.scheduling_tutorial_")
        assert res[name]["max_diff"] == 0.0  # same code, same seed: the same images, bit for bit
    assert res["diffusers_ddim"]["scheduler"] == "diffusers.schedulers.scheduling_ddim.DDIMScheduler"
    assert res["diffusers_ddim"]["max_diff"] == 0.0
    assert res["ours_pf_ode"]["scheduler"].endswith("scheduling_tutorial_pf_ode.TutorialPFODEScheduler")
    assert res["ours_pf_ode"]["max_diff"] == 0.0  # four siblings, all named by scheduling_tutorial_pf_ode.py itself
    for name, cls_name in (
        ("class_cond", "pipeline_tutorial_class_conditional.TutorialClassConditionalPipeline"),
        ("inversion", "pipeline_tutorial_ddim_inversion.TutorialDDIMInversionPipeline"),
        ("repaint", "pipeline_tutorial_repaint.TutorialRePaintPipeline"),
    ):
        assert res[name]["pipeline"] == "diffusers_modules.local." + cls_name
        assert res[name]["max_diff"] == 0.0


def test_e_without_trust_remote_code_fails_with_diffusers_message(fresh_results):
    msg = fresh_results["only_diffusers"]["e"]
    assert "contains custom code in pipeline_tutorial_unconditional.py" in msg
    assert "Pass `trust_remote_code=True`" in msg


# ---- (b), (c), (d): our package imported ------------------------------------------------------------------------------
WITH_OUR_PACKAGE = """
import json, sys, torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from custom_pipelines import TutorialUnconditionalPipeline
from schedulers import TutorialDDIMScheduler, TutorialDDPMScheduler
root = ROOT
res = {}

def images(pipe, seed=SEED):
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
                output_type="pt").images

def cls(obj):
    return type(obj).__module__ + "." + type(obj).__name__

# (b) no remote code
pipe = TutorialUnconditionalPipeline.from_pretrained(root + "/ours_ddim")
res["b"] = dict(pipeline=cls(pipe), scheduler=cls(pipe.scheduler),
                max_diff=float((images(pipe) - torch.load(root + "/ours_ddim.pt")).abs().max()))
# (c) ours -> diffusers and back: DDIM numbers agree (the grid divides T), Euler runs
ours = images(pipe)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
theirs = images(pipe)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
euler = images(pipe)
pipe2 = TutorialUnconditionalPipeline.from_pretrained(root + "/diffusers_ddim")
diffusers_loaded = cls(pipe2.scheduler)
pipe2.scheduler = TutorialDDIMScheduler.from_config(pipe2.scheduler.config)
back = images(pipe2)
res["c"] = dict(ours_vs_diffusers=float((ours - theirs).abs().max()), euler_finite=bool(torch.isfinite(euler).all()),
                euler_vs_ddim=float((euler - ours).abs().max()), diffusers_loaded=diffusers_loaded,
                back=cls(pipe2.scheduler), back_vs_ours=float((back - ours).abs().max()))
# (d) the google/ddpm-* layout with our schedulers
path = root + "/hub_ddpm_layout"
pipe3 = TutorialUnconditionalPipeline.from_pretrained(path, scheduler=TutorialDDPMScheduler.from_pretrained(path, subfolder="scheduler"))
ddpm_ref = torch.load(path + ".pt")
d = dict(scheduler=cls(pipe3.scheduler), vs_ddpm_pipeline=float((images(pipe3) - ddpm_ref).abs().max()))
pipe4 = TutorialUnconditionalPipeline.from_pretrained(path)
d["default_scheduler"] = cls(pipe4.scheduler)
pipe4.scheduler = TutorialDDIMScheduler.from_config(pipe4.scheduler.config)
d["ddim_finite"] = bool(torch.isfinite(images(pipe4)).all())
d["ddim_scheduler"] = cls(pipe4.scheduler)
res["d"] = d
pipe5 = TutorialUnconditionalPipeline.from_pretrained(root + "/ours_pf_ode")
res["pf_ode"] = dict(scheduler=cls(pipe5.scheduler),
                     max_diff=float((images(pipe5) - torch.load(root + "/ours_pf_ode.pt")).abs().max()))
res["remote_modules_imported"] = sorted(m for m in sys.modules if m.startswith("diffusers_modules"))
print("RESULT:" + json.dumps(res))
"""


def test_b_our_class_loads_the_folder_without_remote_code(fresh_results):
    res = fresh_results["with_package"]
    assert res["remote_modules_imported"] == []
    assert res["b"]["pipeline"] == "custom_pipelines.pipeline_tutorial_unconditional.TutorialUnconditionalPipeline"
    assert res["b"]["scheduler"] == "schedulers.scheduling_tutorial_ddim.TutorialDDIMScheduler"
    assert res["b"]["max_diff"] == 0.0


def test_c_schedulers_swap_both_ways_with_from_config(fresh_results):
    c = fresh_results["with_package"]["c"]
    assert c["ours_vs_diffusers"] < 1e-5  # same DDIM, same numbers
    assert c["euler_finite"] and c["euler_vs_ddim"] > 1e-3  # Euler really ran
    assert c["diffusers_loaded"] == "diffusers.schedulers.scheduling_ddim.DDIMScheduler"
    assert c["back"] == "schedulers.scheduling_tutorial_ddim.TutorialDDIMScheduler"
    assert c["back_vs_ours"] < 1e-5


def test_b_other_scheduler_loads_without_remote_code(fresh_results):
    res = fresh_results["with_package"]["pf_ode"]
    assert res["scheduler"] == "schedulers.scheduling_tutorial_pf_ode.TutorialPFODEScheduler"
    assert res["max_diff"] == 0.0


def test_scheduler_module_not_yet_imported_is_found_by_its_file_name(tmp_path, monkeypatch):
    """A class not imported yet is looked up in our installed package under the shipped file's name."""
    package = tmp_path / "zzz_tutorial_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scheduling_zzz.py").write_text(
        "from diffusers import ConfigMixin, SchedulerMixin\n\n\n"
        "class ZzzShippedScheduler(SchedulerMixin, ConfigMixin):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tutorial_pipeline_loading, "_OUR_PACKAGES", ("zzz_tutorial_pkg",))
    monkeypatch.setattr(tutorial_pipeline_loading, "_SCHEDULERS", "zzz_tutorial_pkg")  # the package it imports from
    assert "zzz_tutorial_pkg.scheduling_zzz" not in sys.modules
    # Folders saved before the entry files went away record `<stem>_entry`; the installed `<stem>` is still found.
    klass = tutorial_pipeline_loading.find_class("ZzzShippedScheduler", "scheduler", "scheduling_zzz_entry")
    assert klass.__module__ == "zzz_tutorial_pkg.scheduling_zzz"
    with pytest.raises(ValueError, match="'NoSuchScheduler' of module 'scheduling_nothing_here' named in"):
        tutorial_pipeline_loading.find_class("NoSuchScheduler", "scheduler", "scheduling_nothing_here")


def test_d_ddpm_hub_layout_loads_with_our_schedulers(fresh_results):
    d = fresh_results["with_package"]["d"]
    assert d["scheduler"] == "schedulers.scheduling_tutorial_ddpm.TutorialDDPMScheduler"
    assert d["vs_ddpm_pipeline"] < 1e-5  # our pipeline + our DDPM reproduce diffusers' DDPMPipeline on its own folder
    assert d["default_scheduler"] == "diffusers.schedulers.scheduling_ddpm.DDPMScheduler"
    assert d["ddim_scheduler"] == "schedulers.scheduling_tutorial_ddim.TutorialDDIMScheduler" and d["ddim_finite"]


def test_shipped_files_import_only_what_diffusers_users_have():
    """Files copied into saved folders may import the standard library, torch, numpy, PIL, diffusers,
    huggingface_hub and each other (relatively), never our packages: they must run where only diffusers is installed."""
    allowed = {"torch", "numpy", "PIL", "diffusers", "huggingface_hub"} | set(sys.stdlib_module_names)
    shipped = sorted(
        {
            path
            for klass in _our_shipped_classes()
            for path in tutorial_pipeline_folder.relative_import_closure(inspect.getsourcefile(klass))
        }
    )
    assert len(shipped) >= 12  # 5 pipelines and their utilities, 5 schedulers, their bases, the math and helpers
    for name in shipped:
        tree = ast.parse(open(name, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            assert set(tops) <= allowed, f"{name}:{node.lineno} imports {tops}"
