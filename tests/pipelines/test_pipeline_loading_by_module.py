"""`from_pretrained` resolves each component's class by its module, and passes the model options to diffusers (issue 21.12).

A class of the same name defined elsewhere, imported before or after ours, never changes what loads; `device_map` and
`low_cpu_mem_usage` reach `UNet2DModel.from_pretrained`; an argument the loader cannot honour is refused by name.
"""

import json
import shutil
import sys

import pytest
import torch
from diffusers import UNet2DModel

import schedulers
from custom_pipelines import TutorialUnconditionalPipeline, tutorial_pipeline_loading

# A namesake of our DDIM scheduler in another package, under the same file name. A lookup by bare name over
# SchedulerMixin.__subclasses__() returns whichever of the two was defined first: the import order decided.
IMPOSTOR = """
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config


class TutorialDDIMScheduler(SchedulerMixin, ConfigMixin):
    @register_to_config
    def __init__(self, **kwargs):
        pass
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory, unet_factory):
    """A folder saved with our DDIM scheduler, and a package `impostor_pkg` (not imported) on a path of its own."""
    root = tmp_path_factory.mktemp("by_module")
    pipe = TutorialUnconditionalPipeline(unet=unet_factory(seed=4), scheduler=schedulers.TutorialDDIMScheduler())
    pipe.save_pretrained(root / "folder")
    package = root / "impostors" / "impostor_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "scheduling_tutorial_ddim.py").write_text(IMPOSTOR)
    return root


@pytest.fixture
def impostor(saved, monkeypatch):
    """The namesake class, imported (after ours: this process imported `schedulers` first)."""
    monkeypatch.syspath_prepend(str(saved / "impostors"))
    import impostor_pkg.scheduling_tutorial_ddim as module

    yield module.TutorialDDIMScheduler
    for name in ("impostor_pkg.scheduling_tutorial_ddim", "impostor_pkg"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "module_path", ["schedulers.scheduling_tutorial_ddim", "impostor_pkg.scheduling_tutorial_ddim"]
)
def test_a_full_module_path_in_the_entry_decides(saved, impostor, tmp_path, module_path):
    """diffusers records a class it does not know by its full module path; that module, and only it, is used."""
    folder = tmp_path / "copy"
    shutil.copytree(saved / "folder", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = [module_path, "TutorialDDIMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = TutorialUnconditionalPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__module__ == module_path


def test_a_module_path_that_is_not_imported_is_not_imported_for_it(saved, tmp_path, monkeypatch):
    """As diffusers: a module outside diffusers and this project is used only if the caller imported it."""
    monkeypatch.syspath_prepend(str(saved / "impostors"))
    folder = tmp_path / "copy"
    shutil.copytree(saved / "folder", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["impostor_pkg.scheduling_tutorial_ddim", "TutorialDDIMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match="scheduler: class 'TutorialDDIMScheduler' of module 'impostor_pkg.scheduling"
    ):
        TutorialUnconditionalPipeline.from_pretrained(folder)
    assert "impostor_pkg.scheduling_tutorial_ddim" not in sys.modules


IMPORT_ORDER = """
import json, sys
sys.path.insert(0, IMPOSTORS)
if IMPOSTOR_FIRST:
    import impostor_pkg.scheduling_tutorial_ddim
    from custom_pipelines import TutorialUnconditionalPipeline
else:
    import schedulers
    from custom_pipelines import TutorialUnconditionalPipeline
    import impostor_pkg.scheduling_tutorial_ddim
pipe = TutorialUnconditionalPipeline.from_pretrained(FOLDER)
print("RESULT:" + json.dumps(dict(module=type(pipe.scheduler).__module__,
                                  imported=sorted(m for m in sys.modules if m.startswith("impostor_pkg")))))
"""


def test_import_order_does_not_matter(saved, tmp_path, start_fresh_python):
    runs = {}
    for first in (True, False):
        script = (
            IMPORT_ORDER.replace("IMPOSTORS", repr(str(saved / "impostors")))
            .replace("IMPOSTOR_FIRST", repr(first))
            .replace("FOLDER", repr(str(saved / "folder")))
        )
        (tmp_path / str(first)).mkdir()
        runs[first] = start_fresh_python(script, tmp_path / str(first))
    for first, run in runs.items():
        assert run.result() == dict(
            module="schedulers.scheduling_tutorial_ddim",
            imported=["impostor_pkg", "impostor_pkg.scheduling_tutorial_ddim"],
        ), f"impostor imported {'before' if first else 'after'} ours"


def test_device_map_and_low_cpu_mem_usage_reach_the_unet(saved, monkeypatch):
    calls, real = [], UNet2DModel.from_pretrained

    def spy(cls, path, **kwargs):
        calls.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(spy))
    pipe = TutorialUnconditionalPipeline.from_pretrained(
        saved / "folder", device_map="cpu", low_cpu_mem_usage=True, torch_dtype=torch.float64
    )
    assert calls == [dict(device_map="cpu", low_cpu_mem_usage=True, torch_dtype=torch.float64)]
    assert pipe.unet.hf_device_map == {"": torch.device("cpu")}  # diffusers placed it by the device map
    assert pipe.unet.dtype == torch.float64


def test_arguments_that_cannot_be_honoured_are_refused_by_name(saved, unet_factory):
    with pytest.raises(ValueError, match=r"cannot honour the argument\(s\) \['custom_revision'\]"):
        TutorialUnconditionalPipeline.from_pretrained(saved / "folder", custom_revision="v1")
    with pytest.raises(ValueError, match=r"cannot honour \['device_map'\]: .* it loads none \(passed: \['unet'\]\)"):
        TutorialUnconditionalPipeline.from_pretrained(saved / "folder", unet=unet_factory(), device_map="cpu")
    # Download options concern a Hub repo; for a local folder there is nothing to do, as in diffusers.
    pipe = TutorialUnconditionalPipeline.from_pretrained(saved / "folder", cache_dir=str(saved), revision="main")
    assert type(pipe.scheduler) is schedulers.TutorialDDIMScheduler


def test_find_class_by_module(impostor):
    find = tutorial_pipeline_loading.find_class
    assert find("TutorialDDIMScheduler", "scheduler", "scheduling_tutorial_ddim") is schedulers.TutorialDDIMScheduler
    assert find("UNet2DModel", "unet", "diffusers") is UNet2DModel
    with pytest.raises(ValueError, match="not found in diffusers"):
        find("TutorialDDIMScheduler", "scheduler", "diffusers")  # diffusers has no class of that name
