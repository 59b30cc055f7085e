"""Execute the tutorial notebooks from their py:percent sources (jupytext) and optionally refresh the .ipynb files.

python notebooks/run_notebooks.py --write            # full size, rewrite every NN_*.ipynb with its outputs
python notebooks/run_notebooks.py --fast 03 04       # small sizes (what `make test` runs), no files written
"""

import argparse
import os
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


def execute(source: Path, fast: bool, timeout: int = 600) -> nbformat.NotebookNode:
    """Run one notebook top to bottom in a fresh kernel (cwd = notebooks/); raises on the first failing cell."""
    notebook = jupytext.read(source)
    os.environ["TUTORIAL_FAST"] = "1" if fast else "0"
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    )
    client.execute()
    return notebook


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
        if args.write:
            jupytext.write(notebook, source.with_suffix(".ipynb"), fmt="ipynb")
        print(f"{source.name}: ok in {time.perf_counter() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
