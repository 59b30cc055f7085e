"""The code inside the shipped pipeline folders is generated from the library (`make shipped`) and checked here with
`training/export_shipped.py --check`, so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs the
code the tests test. The check names every drifted file, and the export repairs exactly those."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from custom_pipelines import (
    TutorialClassConditionalPipeline,
    TutorialSuperResolutionPipeline,
    TutorialUnconditionalPipeline,
)
from training import export_shipped

from .conftest import ROOT

PRETRAINED = ROOT / "training" / "pretrained"


def _hashes(folder, names):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def test_every_shipped_folder_matches_the_library():
    folders = export_shipped.pipeline_folders()
    assert {"digits-cfg", "digits-ddpm", "digits-sr3"} <= {p.name for p in folders}
    run = subprocess.run(
        [sys.executable, str(ROOT / "training" / "export_shipped.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"{run.stdout}{run.stderr}"
    assert f"{len(folders)} shipped folder(s) match the library" in run.stdout


@pytest.mark.parametrize(
    "name, cls",
    [
        ("digits-ddpm", TutorialUnconditionalPipeline),
        ("digits-cfg", TutorialClassConditionalPipeline),
        ("digits-sr3", TutorialSuperResolutionPipeline),
    ],
)
def test_shipped_code_is_what_save_pretrained_writes(name, cls, tmp_path):
    """The export and `save_pretrained` share `save_code`: a fresh save of the shipped pipeline has the same code."""
    shipped = PRETRAINED / name
    loaded = cls.from_pretrained(str(shipped))
    cls(unet=loaded.unet, scheduler=loaded.scheduler).save_pretrained(tmp_path / "saved")
    code = export_shipped.code_files(shipped)
    assert export_shipped.code_files(tmp_path / "saved") == code
    assert _hashes(tmp_path / "saved", code) == _hashes(shipped, code)


def test_check_names_each_drifted_file_and_export_repairs_only_the_code(tmp_path, capsys):
    folder = tmp_path.resolve() / "digits-ddpm"
    shutil.copytree(PRETRAINED / "digits-ddpm", folder)
    original = _hashes(folder, export_shipped.code_files(folder))
    # Training outputs the tool must neither read nor touch: the weights are replaced by garbage.
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    outputs = [
        rel
        for rel in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        if rel not in original
    ]
    assert {"unet/diffusion_pytorch_model.safetensors", "unet/config.json", "scheduler/scheduler_config.json"} <= set(
        outputs
    ) and {"README.md", "metrics.json", "samples/sample_00.png"} <= set(outputs)
    before = _hashes(folder, outputs)

    # Drift of every kind: an edited code file, a missing one, a stale one, a hand-edited model_index.json.
    index = json.loads((folder / "model_index.json").read_text())
    named = f"scheduler/{index['scheduler'][0]}.py"  # the scheduler module model_index.json names
    with open(folder / named, "a") as f:
        f.write("# a hand edit\n")
    (folder / "tutorial_pipeline_utils.py").unlink()
    (folder / "scheduler" / "tutorial_math.py").unlink()
    (folder / "scheduler" / "scheduling_tutorial_old.py").write_text("OLD = 1\n")
    index["scheduler"][0] = "scheduling_tutorial_old"
    (folder / "model_index.json").write_text(json.dumps(index))

    problems = export_shipped.check(folder)
    expected = {
        named: "differs from the library",
        "tutorial_pipeline_utils.py": "missing",
        "scheduler/tutorial_math.py": "missing",
        "scheduler/scheduling_tutorial_old.py": "stale",
        "model_index.json": "differs from the library",
    }
    assert len(problems) == len(expected), problems
    for rel, why in expected.items():
        assert any(p.startswith(f"{folder / rel}: {why}") for p in problems), (rel, problems)
    assert export_shipped.main(["--check", str(folder)]) == 1
    printed = capsys.readouterr().out
    assert all(str(folder / rel) in printed for rel in expected) and "make shipped" in printed
    assert not (folder / "tutorial_pipeline_utils.py").exists()  # --check wrote nothing

    assert export_shipped.main([str(folder)]) == 0
    assert export_shipped.check(folder) == []
    assert _hashes(folder, export_shipped.code_files(folder)) == original  # the committed code, byte for byte
    assert _hashes(folder, outputs) == before  # training outputs untouched (the garbage weights included)
    assert export_shipped.main(["--check", str(folder)]) == 0


def test_a_folder_without_a_readable_model_index_is_an_error_not_a_rewrite(tmp_path, capsys):
    folder = tmp_path.resolve() / "digits-ddpm"
    shutil.copytree(PRETRAINED / "digits-ddpm", folder)
    (folder / "model_index.json").write_text("{not json")
    assert export_shipped.main([str(folder)]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert (folder / "model_index.json").read_text() == "{not json"
    with pytest.raises(SystemExit):  # not a pipeline folder: argparse's usage error
        export_shipped.main([str(tmp_path)])
