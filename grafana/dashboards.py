"""Grafana's provisioned dashboards: where they are, loading them, and the checks Grafana's
JSON schema cannot make (:func:`lint`).

The dashboards are JSON files under ``grafana/provisioning/dashboards/arbstream/`` (uids
:data:`DASHBOARD_UIDS`), package data of :mod:`grafana`; every panel queries the InfluxDB
datasource :data:`DATASOURCE_UID` with raw InfluxQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

#: The provisioning files, shipped as package data of ``grafana`` (the same folder
#: ``docker-compose.yml`` mounts into the Grafana container).
PROVISIONING = Path(__file__).resolve().parent / "provisioning"
DASHBOARD_DIR = PROVISIONING / "dashboards" / "arbstream"
DATASOURCE_FILE = PROVISIONING / "datasources" / "influxdb.yaml"
PROVIDER_FILE = PROVISIONING / "dashboards" / "arbstream.yaml"
DATASOURCE_UID = "arbstream-influxdb"
DASHBOARD_UIDS = ("arbstream-monitor", "arbstream-health", "arbstream-analytics",
                  "arbstream-backtest")
#: Grafana's built-in variables that arbstream's queries may use (all but ``timeFilter`` are
#: expanded by the frontend; ``timeFilter`` and the interval ones also by the backend).
BUILTINS = frozenset({"timeFilter", "__interval", "__interval_ms", "interval", "__from", "__to"})
#: Alias patterns of the InfluxDB datasource (``$tag_<key>``, ``$col``, ``$m``...).
ALIAS_PATTERNS = re.compile(r"^(tag_\w+|col|m|measurement)$")
#: Grafana's variable syntaxes: ``$name``, ``[[name]]``/``[[name:fmt]]``, ``${name}``,
#: ``${name:fmt}`` (``public/app/features/variables/utils.ts``).
VARIABLE_RE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}"
)
#: Grafana's ``escapeRegex`` (``@grafana/data``, ``text/string.ts``).

class GrafanaError(RuntimeError):
    """A dashboard cannot be expanded, or Grafana refused or could not be reached."""

# --- dashboards --------------------------------------------------------------------------------


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """Every ``*.json`` dashboard under ``directory``, keyed by uid.

    Raises:
        GrafanaError: a file is not valid JSON, has no uid, or two share a uid.
    """
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            board = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise GrafanaError(f"{path}: not valid JSON: {exc}") from None
        uid = board.get("uid")
        if not uid or uid in out:
            raise GrafanaError(f"{path}: missing or duplicate uid {uid!r}")
        out[uid] = board
    return out


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of ``dashboard``, rows included, and the panels inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", []) if panel.get("type") == "row" else ()


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The dashboard's template variables by name, in definition order."""
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def referenced_variables(text: str) -> set[str]:
    """Names of every variable reference in ``text`` (any Grafana syntax)."""
    return {next(g for g in (m[1], m[2], m[4]) if g) for m in VARIABLE_RE.finditer(text)}


# --- checks Grafana's schema cannot make ------------------------------------------------------


def lint(dashboard: Mapping[str, Any], datasource_uids: set[str]) -> list[str]:
    """Problems Grafana's JSON schema does not catch, one sentence each (empty: none).

    Checks: every panel, target and query variable uses a datasource whose uid is in
    ``datasource_uids``; every ``$variable`` in queries, titles, descriptions and aliases is
    defined (or built in, or an InfluxDB alias pattern in an alias); variables are defined
    before the variables that use them; panel ids are unique; panels lie inside the 24-column
    grid and do not overlap; every non-row panel has targets with unique ``refId``s; stats
    over "the last N minutes" use ``timeFrom`` rather than ``now()`` literals.
    """
    problems: list[str] = []
    defs = variables(dashboard)
    order = list(defs)
    for i, (name, var) in enumerate(defs.items()):
        if var.get("type") == "query":
            uid = (var.get("datasource") or {}).get("uid")
            if uid not in datasource_uids:
                problems.append(f"variable {name}: datasource uid {uid!r} is not provisioned")
            for ref in referenced_variables(str(var.get("query", ""))):
                if ref not in defs:
                    problems.append(f"variable {name}: query uses undefined ${ref}")
                elif order.index(ref) >= i:
                    problems.append(f"variable {name}: uses ${ref}, defined after it")
    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(dashboard):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problems.append(f"panel {title!r}: duplicate id {panel.get('id')}")
        ids.add(panel.get("id"))
        pos = panel.get("gridPos", {})
        x, y, w, h = (pos.get(k, -1) for k in "xywh")
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > 24:
            problems.append(f"panel {title!r}: gridPos {pos} outside the 24-column grid")
        for cell in ((cx, cy) for cx in range(x, x + w) for cy in range(y, y + h)):
            if cell in cells:
                problems.append(f"panel {title!r}: overlaps panel {cells[cell]!r}")
                break
            cells[cell] = title
        for text in (panel.get("title", ""), panel.get("description", "")):
            for ref in referenced_variables(text) - set(defs) - BUILTINS:
                problems.append(f"panel {title!r}: title/description uses undefined ${ref}")
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"panel {title!r}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs):
            problems.append(f"panel {title!r}: duplicate refIds {refs}")
        for obj, what in [(panel, "panel"), *((t, f"target {t.get('refId')}") for t in targets)]:
            uid = (obj.get("datasource") or {}).get("uid")
            if uid not in datasource_uids:
                problems.append(f"panel {title!r} {what}: datasource uid {uid!r} is not "
                                "provisioned")
        for t in targets:
            query = str(t.get("query", ""))
            for ref in referenced_variables(query) - set(defs) - BUILTINS:
                problems.append(f"panel {title!r}: query uses undefined ${ref}")
            if "now()" in query.replace(" ", "").lower():
                problems.append(f"panel {title!r}: now() literal; use timeFrom and $timeFilter")
            if "$timeFilter" not in query:
                problems.append(f"panel {title!r}: query without $timeFilter")
            for ref in referenced_variables(str(t.get("alias", ""))):
                if ref not in defs and ref not in BUILTINS and not ALIAS_PATTERNS.match(ref):
                    problems.append(f"panel {title!r}: alias uses undefined ${ref}")
    return problems

