"""The committed notebooks stand alone: no output shows a warning or a path of the machine that executed them.

`notebooks/run_notebooks.py` starts each kernel without tqdm's "IProgress not found" warning and refuses to `--write`
a notebook whose outputs fail `output_problems`; this test reads what is committed, without executing anything.
"""

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOKS / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)
COMMITTED = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))

# The stderr output every executed notebook carried before the runner filtered it (a build machine's venv path).
TQDM_WARNING = (
    "/work/main/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update "
    "jupyter and ipywidgets. See https://ipywidgets.readthedocs.io/en/stable/user_install.html\n"
    "  from .autonotebook import tqdm as notebook_tqdm\n"
)


def notebook_with(*outputs) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell("x = 1", outputs=list(outputs))
    return nbformat.v4.new_notebook(cells=[cell])


def test_there_are_committed_notebooks():
    assert len(COMMITTED) == len(run_notebooks.notebook_sources())


@pytest.mark.parametrize("ipynb", COMMITTED, ids=lambda p: p.stem)
def test_committed_outputs_show_no_warning_or_local_path(ipynb):
    problems = run_notebooks.output_problems(nbformat.read(ipynb, as_version=4))
    assert not problems, f"{ipynb.name}: re-run `make notebooks`; its outputs show\n" + "\n".join(problems)


def test_the_check_catches_the_tqdm_warning_and_local_paths():
    stderr = nbformat.v4.new_output("stream", name="stderr", text=TQDM_WARNING)
    problems = run_notebooks.output_problems(notebook_with(stderr))
    assert any("a warning" in p and "TqdmWarning" in p for p in problems)
    assert any("a local path" in p for p in problems)
    for path in ("/home/alice/runs/digits", "/tmp/tmpab12/out", str(NOTEBOOKS / "data")):
        shown = nbformat.v4.new_output("execute_result", data={"text/plain": f"PosixPath('{path}')"})
        assert run_notebooks.output_problems(notebook_with(shown)), path


def test_the_check_passes_relative_paths_and_urls():
    text = "saved to training/pretrained/digits-ddpm (see https://github.com/huggingface/diffusers/tree/main/src)\n"
    stdout = nbformat.v4.new_output("stream", name="stdout", text=text)
    image = nbformat.v4.new_output(
        "display_data", data={"image/png": "iVBORw0KG/tmp/work/AAA=", "text/plain": "<Figure>"}
    )
    assert run_notebooks.output_problems(notebook_with(stdout, image)) == []
