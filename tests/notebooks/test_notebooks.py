"""Every tutorial notebook executes top to bottom at small sizes (its final cell asserts what it showed), and the
committed .ipynb is the executed twin of its py:percent source."""

import importlib.util
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOKS / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)
SOURCES = run_notebooks.notebook_sources()


def code_cells(notebook):
    return [c.source.strip() for c in notebook.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert SOURCES, "notebooks/ has no NN_*.py sources"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_the_executed_twin_of_its_source(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `make notebooks`"
    committed = nbformat.read(ipynb, as_version=4)
    assert code_cells(committed) == code_cells(jupytext.read(source)), (
        f"{ipynb.name} is out of sync with {source.name}"
    )
    executed = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in executed), f"{ipynb.name} was not fully executed"
    assert not any(o.get("output_type") == "error" for c in executed for o in c.get("outputs", []))


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_executes_and_its_assertions_hold(source):
    notebook = run_notebooks.execute(source, fast=True, timeout=300)
    assert code_cells(notebook)[-1].count("assert") >= 2, "a notebook ends with assertions on what it showed"
    assert not run_notebooks.output_problems(notebook), "the runner's kernel prints no warnings or local paths"
