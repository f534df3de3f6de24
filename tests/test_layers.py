"""Layering checks on the source: parsed imports, no execution.

The local-stack tooling (:mod:`arbstream.stack`: process supervision, apt installers) is for
the CLI shell and the tests; no component module (``spark_jobs``, ``producers``, ``alerts``,
``ml``) imports it, so a job on a cluster never runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = ("spark_jobs", "producers", "alerts", "ml")
TOOLING = "arbstream.stack"


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement names (``from a import b``
    counts as ``a`` and ``a.b``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_imported_modules_sees_every_form() -> None:
    src = "import arbstream.stack\nfrom arbstream import stack\nfrom arbstream.stack import up\n"
    for line in src.splitlines():
        assert TOOLING in imported_modules(line), line
    assert TOOLING not in imported_modules("from arbstream import config\nimport stack\n")


def test_no_component_imports_the_local_stack_tooling() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for package in COMPONENTS if (REPO / package).is_dir()
        for path in sorted((REPO / package).rglob("*.py"))
        if TOOLING in imported_modules(path.read_text())
    ]
    assert not offenders, f"component modules importing {TOOLING}: {offenders}"
