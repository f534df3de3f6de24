"""arbstream's dependency rule, and the package dependency graph it is checked on.

The rule (docs/architecture.md)::

    core  →  store  →  components  →  shell

* **core** — ``arbstream`` (config, schemas, topics, fees, timestamps, kafka, console): imports
  no store, component or shell module;
* **store** — ``arbstream.store``: every MongoDB collection and InfluxDB measurement; imports
  core only;
* **components** — ``producers``, ``spark_jobs``, ``alerts``, ``grafana``, ``ml``,
  ``backtest``: import core and store, never another component and never the shell;
* **shell** — ``arbstream.shell``: the CLI that mounts the components' sub-apps, the local
  stack and the demo; may import anything.

No product module imports the test infrastructure (``testing``, ``tests``) or a test-only
dependency. Imports are read from the source with :mod:`ast` (nothing is executed), inside
functions too, so a lazy import counts like any other.

Run ``python tools/depgraph.py`` for the package graph with the edges' module counts,
``--modules`` for every module edge, ``--check`` to exit 1 on a violation. ``tests/
test_layers.py`` runs the check.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE, STORE, COMPONENT, SHELL = "core", "store", "component", "shell"
#: Layer order: a module may import its own layer and the layers before it.
RANK = {CORE: 0, STORE: 1, COMPONENT: 2, SHELL: 3}
COMPONENTS = ("producers", "spark_jobs", "alerts", "grafana", "ml", "backtest")
PRODUCT = ("arbstream", *COMPONENTS)
#: Test infrastructure and test-only dependencies (pyproject's ``test`` extra) that no
#: product module may import.
TEST_ONLY = ("testing", "tests", "conftest", "pytest", "xdist", "trustme", "jsonschema",
             "aiosmtpd")


def layer(module: str) -> str | None:
    """The layer of a product module (dotted name), ``None`` outside the product."""
    top = module.split(".")[0]
    if top in COMPONENTS:
        return COMPONENT
    if top != "arbstream":
        return None
    if module == "arbstream.store" or module.startswith("arbstream.store."):
        return STORE
    if module == "arbstream.shell" or module.startswith("arbstream.shell."):
        return SHELL
    return CORE


def group(module: str) -> str:
    """The package a module counts under in the graph: the component, ``arbstream.store``,
    ``arbstream.shell`` or ``arbstream`` (core)."""
    kind = layer(module)
    if kind == COMPONENT:
        return module.split(".")[0]
    return {STORE: "arbstream.store", SHELL: "arbstream.shell"}.get(kind or "", "arbstream")


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a source file under ``root`` (``pkg/__init__.py`` → ``pkg``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an ``import`` or ``from … import`` in ``source`` names, relative imports
    resolved against ``module``; ``from a import b`` counts as ``a`` and ``a.b`` (``b`` may be
    a submodule)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join([*parts[:keep], *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


@dataclass(frozen=True)
class Violation:
    """One import that breaks the rule: ``importer`` imports ``imported``; ``why`` says
    which part of the rule."""

    importer: str
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported}: {self.why}"


def check_import(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (``None``: allowed)."""
    top = imported.split(".")[0]
    if top in TEST_ONLY:
        return "the product imports test infrastructure or a test-only dependency"
    src, dst = layer(importer), layer(imported)
    if src is None or dst is None:
        return None
    if RANK[dst] > RANK[src]:
        return f"{src} may not import {dst} (upward)"
    if src == dst == COMPONENT and importer.split(".")[0] != top:
        return "components never import each other (sideways)"
    return None


def scan(root: Path = REPO, packages: tuple[str, ...] = PRODUCT
         ) -> tuple[dict[str, set[str]], dict[str, int]]:
    """The product's module graph under ``root``: module → the product modules it imports
    (``from m import name`` counts as ``m`` when ``m.name`` is no module; a product module
    missing from the tree still counts) and the top-level names of test-only modules it
    imports; and module → lines of source."""
    files = {module_name(p, root): p for pkg in packages if (root / pkg).is_dir()
             for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    lines: dict[str, int] = {}
    for mod, path in files.items():
        text = path.read_text()
        lines[mod] = len(text.splitlines())
        deps: set[str] = set()
        for name in imports(text, mod, path.name == "__init__.py"):
            top, parent = name.split(".")[0], name.rpartition(".")[0]
            if top in TEST_ONLY:
                deps.add(top)
            elif top in packages:
                deps.add(parent if name not in files and parent in files else name)
        graph[mod] = deps - {mod}
    return graph, lines


def violations(graph: dict[str, set[str]]) -> list[Violation]:
    """Every edge of ``graph`` that breaks the rule, sorted."""
    found = {Violation(a, b, why) for a, deps in graph.items() for b in deps
             if (why := check_import(a, b))}
    return sorted(found, key=lambda v: (v.importer, v.imported))


def package_graph(graph: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    """(package, package) → number of module edges between them (self-edges left out)."""
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for a, deps in graph.items():
        for b in deps:
            if layer(b) is not None and group(a) != group(b):
                edges[group(a), group(b)] += 1
    return dict(edges)


def main(argv: list[str] | None = None) -> int:
    """Print the graph; with ``--check``, exit 1 when the rule is broken."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", action="store_true", help="every module edge")
    parser.add_argument("--check", action="store_true", help="exit 1 on a violation")
    parser.add_argument("--root", type=Path, default=REPO, help="repository root")
    args = parser.parse_args(argv)
    graph, lines = scan(args.root)
    by_group: dict[str, list[str]] = defaultdict(list)
    for mod in graph:
        by_group[group(mod)].append(mod)
    print("package (layer): modules, lines -> imported packages (module edges)")
    edges = package_graph(graph)
    for pkg in sorted(by_group, key=lambda g: (RANK[layer(by_group[g][0]) or CORE], g)):
        out = ", ".join(f"{b} ({n})" for (a, b), n in sorted(edges.items()) if a == pkg)
        size = sum(lines[m] for m in by_group[pkg])
        print(f"{pkg} ({layer(by_group[pkg][0])}): {len(by_group[pkg])} modules, "
              f"{size} lines -> {out or '-'}")
    if args.modules:
        print()
        for mod in sorted(graph):
            print(f"{mod} ({lines[mod]}) -> {', '.join(sorted(graph[mod])) or '-'}")
    found = violations(graph)
    print(f"\n{len(found)} violation(s) of core -> store -> components -> shell")
    for v in found:
        print(f"  {v}")
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
