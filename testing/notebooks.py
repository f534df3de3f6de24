"""Executing the research notebooks (``notebooks/*.py``, jupytext ``py:percent`` sources).

:func:`run_notebook` reads a source with jupytext, injects parameters into its cell tagged
``parameters`` (``# %% tags=["parameters"]``) and executes it with papermill in a kernel of
*this* interpreter (``sys.executable``; no kernelspec is registered or looked up), writes the
executed ``<stem>.ipynb`` into ``out_dir`` and returns the ``results.json`` the notebook wrote
there. Every notebook takes at least the parameter ``out_dir`` (str) and writes
``results.json`` and its PNGs into it.

From the command line (``make notebooks``), every notebook with the user's ``ARB_*`` settings::

    python -m testing.notebooks [--out build/notebooks] [--only 01_spreads_and_episodes]

writes ``<out>/<stem>/`` (the executed notebook, ``results.json``, PNGs) for each.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpec

#: The notebook sources.
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookError(RuntimeError):
    """A notebook failed: the failing cell's source and traceback are in the message."""


class _ThisInterpreter(AsyncKernelManager):
    """An ipykernel of ``sys.executable``, whatever kernelspecs the machine has."""

    @property
    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                "{connection_file}"],
                          display_name="arbstream", language="python")


def _failure(source: Path, executed: Path, error: Exception) -> NotebookError:
    """The failing cell of a papermill execution error, readable (ANSI colours stripped)."""
    import nbformat

    cell_text = ""
    if executed.exists():
        nb = nbformat.read(executed, as_version=4)
        for cell in nb.cells:
            errors = [o for o in cell.get("outputs", ()) if o.get("output_type") == "error"]
            if errors:
                cell_text = f"failing cell:\n{cell.source}\n\n"
                break
    trace = "\n".join(getattr(error, "traceback", None) or [str(error)])
    return NotebookError(f"notebook {source.name} failed ({executed}):\n{cell_text}"
                         f"{_ANSI.sub('', trace)}")


def run_notebook(source: Path, out_dir: Path, parameters: Mapping[str, Any],
                 timeout: float = 600) -> dict[str, Any]:
    """Execute one jupytext ``py:percent`` notebook and return its ``results.json``.

    Args:
        source: the ``.py`` source (jupytext ``py:percent``, with a cell tagged
            ``parameters``).
        out_dir: where the executed ``<stem>.ipynb`` goes; the notebook receives it as its
            ``out_dir`` parameter (str) and writes ``results.json`` and PNGs there. Created if
            missing.
        parameters: values injected after the ``parameters`` cell (JSON-able: str, numbers,
            bool, None, lists, dicts); ``out_dir`` is added.
        timeout: seconds one cell may run.

    The kernel runs in the current working directory, so relative ``ARB_*`` paths (e.g.
    ``ARB_DATA_DIR=../shared/data``) mean what they mean to the caller.

    Returns:
        The parsed ``out_dir/results.json``.

    Raises:
        FileNotFoundError: ``source`` missing, or the notebook wrote no ``results.json``.
        ValueError: ``source`` has no cell tagged ``parameters``.
        NotebookError: a cell raised; the message has the cell and its traceback.
    """
    import jupytext
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    if not source.is_file():
        raise FileNotFoundError(f"no notebook source {source}")
    nb = jupytext.read(source, fmt="py:percent")
    if not any("parameters" in c.metadata.get("tags", ()) for c in nb.cells):
        raise ValueError(f"{source.name} has no cell tagged 'parameters'")
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                 "display_name": "Python 3"}
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{source.stem}.ipynb"
    results = out_dir / "results.json"
    results.unlink(missing_ok=True)
    try:
        papermill.execute_notebook(
            nb, str(executed), parameters={**parameters, "out_dir": str(out_dir)},
            kernel_name="python3", language="python", progress_bar=False,
            execution_timeout=timeout,  # the kernel runs in this process's directory
            kernel_manager_class=_ThisInterpreter)
    except PapermillExecutionError as error:
        raise _failure(source, executed, error) from None
    if not results.is_file():
        raise FileNotFoundError(f"{source.name} wrote no {results}")
    return json.loads(results.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    """Execute every notebook (or ``--only`` some) into ``--out/<stem>/``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/notebooks"))
    parser.add_argument("--only", nargs="*", default=None, help="notebook stems")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    sources = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    if args.only:
        sources = [s for s in sources if s.stem in set(args.only)]
        if not sources:
            parser.error(f"no notebook named {args.only} in {NOTEBOOKS}")
    failed = 0
    for src in sources:
        out = args.out / src.stem
        try:
            results = run_notebook(src, out, {}, timeout=args.timeout)
        except (NotebookError, FileNotFoundError, ValueError) as error:
            failed += 1
            print(f"FAILED {src.stem}: {error}", file=sys.stderr)
            continue
        note = f" (skipped: {results['skipped']})" if "skipped" in results else ""
        print(f"{src.stem}: {out}/{src.stem}.ipynb{note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
