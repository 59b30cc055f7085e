"""Execute the tutorial notebooks from their py:percent sources (jupytext) and optionally refresh the .ipynb files.

python notebooks/run_notebooks.py --write            # full size, rewrite every NN_*.ipynb with its outputs
python notebooks/run_notebooks.py --fast 03 04       # small sizes (what `make test` runs), no files written
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def notebook_sources(names=()):
    """The numbered py:percent sources, optionally filtered by prefixes such as '03'."""
    sources = sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))
    return [p for p in sources if not names or any(p.name.startswith(n) for n in names)]


# Warnings the kernel is started without: tqdm.auto (which diffusers imports) warns "IProgress not found" when
# ipywidgets is absent, with the path of the installed tqdm. The notebooks draw no progress bars, so the warning says
# nothing to a reader and would put this machine's paths into the committed outputs.
KERNEL_WARNING_FILTERS = ("ignore:IProgress not found",)


def kernel_env(fast: bool) -> dict:
    """The kernel's environment: this process's, plus the notebook size and the warning filters above."""
    filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f] + list(KERNEL_WARNING_FILTERS)
    return {**os.environ, "TUTORIAL_FAST": "1" if fast else "0", "PYTHONWARNINGS": ",".join(filters)}


def execute(source: Path, fast: bool, timeout: int = 600) -> nbformat.NotebookNode:
    """Run one notebook top to bottom in a fresh kernel (cwd = notebooks/); raises on the first failing cell."""
    notebook = jupytext.read(source)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    )
    client.execute(env=kernel_env(fast))
    return notebook


# What an output committed with a notebook must not carry: a warning (its text names the file that raised it) or an
# absolute path of the machine that ran it. Only text is read: base64 images contain "/" and letters by chance.
WARNING = re.compile(r"\b\w*Warning: ")
LOCAL_PATH = re.compile(
    r"(?<![\w.])/(home|root|tmp|work|Users|mnt|var/folders)/|site-packages|" + re.escape(str(HERE.parent))
)
TEXT_MIMETYPES = ("text/plain", "text/html", "text/markdown", "text/latex", "application/json")


def output_text(value) -> str:
    """An output field as one string (nbformat keeps text as a string or a list of lines; JSON data as objects)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)
    return json.dumps(value)


def output_problems(notebook: nbformat.NotebookNode) -> list:
    """'code cell N: <what>: <line>' for every output line that shows a warning or a local absolute path."""
    problems = []
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    for number, cell in enumerate(code_cells, start=1):
        for output in cell.get("outputs", []):
            fields = [output.get("text", ""), output.get("traceback", [])]
            fields += [output.get("data", {}).get(m, "") for m in TEXT_MIMETYPES]
            for line in "\n".join(map(output_text, fields)).splitlines():
                for what, pattern in (("a warning", WARNING), ("a local path", LOCAL_PATH)):
                    if pattern.search(line):
                        problems.append(f"code cell {number}: {what}: {line.strip()[:160]}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook number prefixes to run (default: all)")
    parser.add_argument("--fast", action="store_true", help="small sizes, as in the test suite")
    parser.add_argument("--write", action="store_true", help="write the executed .ipynb next to each source")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    for source in notebook_sources(args.names):
        start = time.perf_counter()
        notebook = execute(source, args.fast, args.timeout)
        problems = output_problems(notebook)
        if args.write and problems:  # a user's clone must not show this machine's warnings or paths
            sys.exit(f"{source.name}: not written; its outputs show\n  " + "\n  ".join(problems))
        if args.write:
            jupytext.write(notebook, source.with_suffix(".ipynb"), fmt="ipynb")
        print(f"{source.name}: ok in {time.perf_counter() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
