"""The dependency rule core → store → components → shell, checked on the parsed imports of
the source (:mod:`tools.depgraph`; nothing is executed).

Each rule is first shown to fail on a deliberate violation written into a throw-away source
tree, then checked on the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import depgraph as D

#: (file, source) of a small product tree that keeps the rule.
CLEAN = {
    "arbstream/__init__.py": "",
    "arbstream/config.py": "import os\nfrom arbstream import fees\n",
    "arbstream/fees.py": "",
    "arbstream/store/__init__.py": "",
    "arbstream/store/mongo.py": "from arbstream.config import x\nfrom . import influx\n",
    "arbstream/store/influx.py": "",
    "arbstream/shell/__init__.py": "",
    "arbstream/shell/cli.py": "from alerts.cli import app\nfrom producers import cli\n",
    "alerts/__init__.py": "",
    "alerts/cli.py": "from arbstream.store import mongo\nfrom .rules import r\n",
    "alerts/rules.py": "import arbstream.config\n",
    "producers/__init__.py": "",
    "producers/cli.py": "def f():\n    from arbstream.store.influx import q\n",
}

#: A deliberate violation of each kind: (file, added source, expected importer, imported).
VIOLATIONS = [
    ("arbstream/config.py", "from spark_jobs import engine\n", "arbstream.config",
     "spark_jobs"),  # core → component (upward)
    ("arbstream/fees.py", "def f():\n    from arbstream.store import mongo\n",
     "arbstream.fees", "arbstream.store"),  # core → store, lazily (upward)
    ("arbstream/store/mongo.py", "import alerts.rules\n", "arbstream.store.mongo",
     "alerts.rules"),  # store → component (upward)
    ("arbstream/store/influx.py", "from arbstream.shell import cli\n",
     "arbstream.store.influx", "arbstream.shell"),  # store → shell (upward)
    ("alerts/rules.py", "from producers.cli import x\n", "alerts.rules",
     "producers.cli"),  # component → component (sideways)
    ("producers/cli.py", "from ..alerts import rules\n", "producers.cli",
     "alerts"),  # sideways, relative spelling
    ("alerts/cli.py", "import arbstream.shell.cli\n", "alerts.cli",
     "arbstream.shell.cli"),  # component → shell (upward)
    ("producers/cli.py", "import trustme\n", "producers.cli", "trustme"),  # test-only dep
    ("alerts/rules.py", "from testing.replay_server import S\n", "alerts.rules",
     "testing"),  # test infrastructure
]


def _tree(root: Path, extra: tuple[str, str] | None = None) -> Path:
    for name, src in CLEAN.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src + (extra[1] if extra and extra[0] == name else ""))
    return root


def test_a_tree_that_keeps_the_rule_passes(tmp_path: Path) -> None:
    graph, _ = D.scan(_tree(tmp_path))
    assert D.violations(graph) == []
    assert graph["alerts.cli"] == {"arbstream.store", "arbstream.store.mongo", "alerts.rules"}
    assert D.package_graph(graph)[("arbstream.shell", "alerts")] == 1


@pytest.mark.parametrize(("file", "src", "importer", "imported"), VIOLATIONS,
                         ids=[v[2] + "->" + v[3] for v in VIOLATIONS])
def test_a_deliberate_violation_fails(tmp_path: Path, file: str, src: str, importer: str,
                                      imported: str) -> None:
    graph, _ = D.scan(_tree(tmp_path, (file, src)))
    found = D.violations(graph)
    assert {v.importer for v in found} == {importer}, found
    assert imported in {v.imported for v in found}, found
    assert D.main(["--check", "--root", str(tmp_path)]) == 1


def test_the_repository_keeps_the_rule() -> None:
    graph, _ = D.scan()
    assert len(graph) > 50  # the product was found
    found = D.violations(graph)
    assert not found, "\n".join(map(str, found))


def test_modules_are_short_or_say_why() -> None:
    """No product module over ~500 lines without a reason at its top (a docstring line
    starting ``Long module:``)."""
    _, lines = D.scan()
    long = [m for m, n in lines.items() if n > 520 and "Long module:" not in
            (D.REPO / (m.replace(".", "/") + ".py")).read_text()[:3000]]
    assert not long, long
