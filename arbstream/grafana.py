"""Grafana: the provisioned dashboards, how Grafana expands their InfluxQL, and publishing.

The dashboards are JSON files under ``grafana/provisioning/dashboards/arbstream/`` (uids
:data:`DASHBOARD_UIDS`); every panel queries the InfluxDB datasource :data:`DATASOURCE_UID`
with raw InfluxQL. This module

* loads them (:func:`load_dashboards`, :func:`iter_panels`);
* expands a query the way Grafana 11 does before it reaches InfluxDB
  (:func:`render_query`): template variables with the InfluxDB datasource's regex formatting
  (``interpolateQueryExpr`` in Grafana's ``public/app/plugins/datasource/influxdb``), the
  panel's relative-time override (``timeFrom``/``timeShift``), ``$__interval`` /
  ``$__interval_ms`` from the time range and the panel width (Grafana's interval calculator
  and its rounding table, ``grafana-plugin-sdk-go/backend/gtime``), then the backend's
  ``$timeFilter`` = ``time >= <from>ms and time <= <to>ms`` (``pkg/tsdb/influxdb/influxql``);
* publishes the dashboards (and optionally the datasource) to a running Grafana over its HTTP
  API with ``grafana-client`` (:func:`publish`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arbstream.config import Settings

REPO = Path(__file__).resolve().parent.parent
#: ``grafana/provisioning`` of the source tree, else of the working directory (an installed
#: package, e.g. the Docker image's ``/app``, has it there).
PROVISIONING = next(
    (p for p in (REPO / "grafana" / "provisioning", Path.cwd() / "grafana" / "provisioning")
     if p.is_dir()),
    REPO / "grafana" / "provisioning",
)
DASHBOARD_DIR = PROVISIONING / "dashboards" / "arbstream"
DATASOURCE_FILE = PROVISIONING / "datasources" / "influxdb.yaml"
PROVIDER_FILE = PROVISIONING / "dashboards" / "arbstream.yaml"
DATASOURCE_UID = "arbstream-influxdb"
DASHBOARD_UIDS = ("arbstream-monitor", "arbstream-health", "arbstream-analytics")
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
_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")
#: A ``=~ /.../`` regex literal in InfluxQL (from the InfluxDB datasource).
_REGEX_LITERAL = re.compile(r"=~\s*/((?:[^\r\n\[/\\]|\\.|\[(?:[^\r\n\]\\]|\\.)*\])+)/")
#: ``gtime.roundInterval``: (upper bound ms, rounded interval ms).
_ROUNDING = (
    (10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500),
    (1_500, 1_000), (3_500, 2_000), (7_500, 5_000), (12_500, 10_000), (17_500, 15_000),
    (25_000, 20_000), (45_000, 30_000), (90_000, 60_000), (210_000, 120_000),
    (450_000, 300_000), (750_000, 600_000), (1_050_000, 900_000), (1_500_000, 1_200_000),
    (2_700_000, 1_800_000), (5_400_000, 3_600_000), (9_000_000, 7_200_000),
    (16_200_000, 10_800_000), (24_300_000, 21_600_000), (64_800_000, 43_200_000),
    (129_600_000, 86_400_000), (604_800_000, 604_800_000), (1_814_400_000, 1_209_600_000),
    (3_628_800_000, 2_592_000_000),
)
_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
             "w": 604_800_000, "y": 31_536_000_000}


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


# --- time ranges and intervals --------------------------------------------------------------------


@dataclass(frozen=True)
class TimeRange:
    """A dashboard or panel time range, UTC epoch milliseconds, ``from_ms <= to_ms``."""

    from_ms: int
    to_ms: int


def duration_ms(text: str) -> int:
    """Milliseconds of a Grafana duration like ``5m``, ``1h``, ``250ms``, ``7d``.

    Raises:
        GrafanaError: not ``<int><unit>`` with unit ms, s, m, h, d, w or y.
    """
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w|y)", text.strip())
    if not m:
        raise GrafanaError(f"not a Grafana duration: {text!r}")
    return int(m[1]) * _UNITS_MS[m[2]]


def panel_range(panel: Mapping[str, Any], dashboard_range: TimeRange, now_ms: int) -> TimeRange:
    """The time range Grafana queries a panel with: ``timeFrom: "5m"`` replaces the
    dashboard's range by ``[now - 5m, now]`` (relative to *now*, not to the dashboard's end);
    ``timeShift: "1h"`` then moves both ends back by 1 h."""
    rng = dashboard_range
    if panel.get("timeFrom"):
        rng = TimeRange(now_ms - duration_ms(panel["timeFrom"]), now_ms)
    if panel.get("timeShift"):
        shift = duration_ms(panel["timeShift"])
        rng = TimeRange(rng.from_ms - shift, rng.to_ms - shift)
    return rng


def round_interval(ms: float) -> int:
    """Grafana's ``gtime.roundInterval``: a raw interval (ms) to a "nice" one (ms)."""
    for bound, rounded in _ROUNDING:
        if ms <= bound:
            return rounded
    return 31_536_000_000


def format_interval(ms: int) -> str:
    """Grafana's ``gtime.FormatInterval``: ``90000`` → ``"1m"``, ``604800000`` → ``"7d"``."""
    for unit, size in (("y", 31_536_000_000), ("d", 86_400_000), ("h", 3_600_000),
                       ("m", 60_000), ("s", 1_000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def panel_interval(panel: Mapping[str, Any], rng: TimeRange, min_interval: str = "1s") -> int:
    """``$__interval_ms`` of a panel: range / max data points, rounded, at least the panel's
    ``interval`` (else the datasource's ``timeInterval``, ``min_interval``). Max data points
    is the panel's ``maxDataPoints`` or, as Grafana does, its width in pixels (estimated as
    ``gridPos.w / 24`` of a 1,920-pixel screen)."""
    points = panel.get("maxDataPoints") or max(1, round(panel["gridPos"]["w"] / 24 * 1920))
    raw = (rng.to_ms - rng.from_ms) / points
    floor = duration_ms(panel.get("interval") or min_interval)
    return max(round_interval(raw), floor)


# --- template variables ---------------------------------------------------------------------


def escape_regex(value: str) -> str:
    """Grafana's ``escapeRegex``: backslash before ``\\ ^ $ * + ? . ( ) | [ ] { } /``."""
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m[0], value)


def _in_regex(query: str, name: str) -> bool:
    return any(re.search(rf"\${name}\b|\$\{{{name}\}}", m[1])
               for m in _REGEX_LITERAL.finditer(query))


def format_value(variable: Mapping[str, Any], value: str | Sequence[str], query: str) -> str:
    """A variable's value as the InfluxDB datasource interpolates it (``interpolateQueryExpr``).

    * ``$__all`` with a custom ``allValue`` (``.*`` here): the all value, unformatted;
      without one: every option value (the caller passes them).
    * A number (``parseFloat`` succeeds): as is.
    * Multi-value or include-all variables: each value regex-escaped; one value alone, several
      as ``(a|b|c)``.
    * Otherwise: regex-escaped when the variable is used inside a ``=~ /.../`` literal of the
      query, else as is.
    """
    values = [value] if isinstance(value, str) else list(value)
    if values == ["$__all"]:
        if variable.get("allValue"):
            return str(variable["allValue"])
        raise GrafanaError(f"${variable['name']}: pass the option values for All")
    if len(values) == 1 and _is_number(values[0]):
        return values[0]
    if variable.get("multi") or variable.get("includeAll"):
        escaped = [escape_regex(v) for v in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    if len(values) != 1:
        raise GrafanaError(f"${variable['name']} is single-valued, got {values}")
    return escape_regex(values[0]) if _in_regex(query, variable["name"]) else values[0]


def _is_number(text: str) -> bool:
    return re.match(r"^\s*[-+]?(\d+\.?\d*|\.\d+)", text) is not None  # JS parseFloat


def interpolate(
    text: str,
    definitions: Mapping[str, Mapping[str, Any]],
    values: Mapping[str, str | Sequence[str]],
    builtins: Mapping[str, str] | None = None,
) -> str:
    """Replace every variable reference in ``text`` like Grafana's template service with the
    InfluxDB formatter (:func:`format_value`). ``builtins`` holds ``__interval`` and the like.
    ``$timeFilter`` is left for :func:`render_query` (the backend expands it).

    Raises:
        GrafanaError: a variable is neither defined, given in ``values`` nor built in; or a
            ``${name:format}`` / ``${name.field}`` form (not used by arbstream's dashboards).
    """
    builtins = builtins or {}

    def one(m: re.Match[str]) -> str:
        name = next(g for g in (m[1], m[2], m[4]) if g)
        if m[3] or m[5] or m[6]:
            raise GrafanaError(f"unsupported variable form {m[0]!r}")
        if name == "timeFilter":
            return m[0]
        if name in builtins:
            return builtins[name]
        if name not in definitions:
            raise GrafanaError(f"undefined variable ${name} in {text!r}")
        if name not in values:
            raise GrafanaError(f"no value given for ${name}")
        return format_value(definitions[name], values[name], text)

    return VARIABLE_RE.sub(one, text)


def render_query(
    query: str,
    definitions: Mapping[str, Mapping[str, Any]],
    values: Mapping[str, str | Sequence[str]],
    rng: TimeRange,
    interval_ms: int,
) -> str:
    """The InfluxQL Grafana sends for a panel's raw query: template variables and the
    frontend built-ins (``$__interval``, ``$__interval_ms``, ``$__from``, ``$__to``), then the
    backend's ``$timeFilter``, ``$interval``, ``$__interval_ms``, ``$__interval``.

    Raises:
        GrafanaError: as :func:`interpolate`.
    """
    text = format_interval(interval_ms)
    builtins = {"__interval": text, "interval": text, "__interval_ms": str(interval_ms),
                "__from": str(rng.from_ms), "__to": str(rng.to_ms)}
    out = interpolate(query, definitions, values, builtins)
    return out.replace("$timeFilter", f"time >= {rng.from_ms}ms and time <= {rng.to_ms}ms")


@dataclass
class PanelQuery:
    """One target of one panel, expanded (:func:`dashboard_queries`)."""

    panel_id: int
    panel_title: str
    ref_id: str
    raw: str
    influxql: str
    range: TimeRange
    interval_ms: int


def _target_query(
    panel: Mapping[str, Any], target: Mapping[str, Any], defs: Mapping[str, dict[str, Any]],
    values: Mapping[str, str | Sequence[str]], dashboard_range: TimeRange, now_ms: int,
    min_interval: str = "1s",
) -> PanelQuery:
    """One panel target expanded as Grafana sends it (see :func:`dashboard_queries`).

    Raises:
        GrafanaError: as :func:`render_query`; the target is not a raw InfluxQL query.
    """
    if not target.get("rawQuery") or not target.get("query"):
        raise GrafanaError(f"panel {panel['title']!r}: target {target.get('refId')} "
                           "is not a raw InfluxQL query")
    rng = panel_range(panel, dashboard_range, now_ms)
    interval = panel_interval(panel, rng, min_interval)
    return PanelQuery(panel["id"], panel["title"], target["refId"], target["query"],
                      render_query(target["query"], defs, values, rng, interval), rng, interval)


def dashboard_queries(
    dashboard: Mapping[str, Any],
    values: Mapping[str, str | Sequence[str]],
    dashboard_range: TimeRange,
    now_ms: int,
    min_interval: str = "1s",
) -> list[PanelQuery]:
    """Every panel target of ``dashboard`` as Grafana would send it, for the variable
    ``values`` (name → value or list of values, ``"$__all"`` for All), the dashboard time
    range and the wall-clock ``now_ms`` (for ``timeFrom`` overrides).

    Raises:
        GrafanaError: as :func:`render_query`; a target that is not a raw InfluxQL query.
    """
    defs = variables(dashboard)
    return [_target_query(panel, target, defs, values, dashboard_range, now_ms, min_interval)
            for panel in iter_panels(dashboard) for target in panel.get("targets", [])]


def variable_query(
    dashboard: Mapping[str, Any], name: str, values: Mapping[str, str | Sequence[str]]
) -> str:
    """The InfluxQL of query variable ``name`` with the variables it depends on expanded
    (Grafana's ``metricFindQuery``).

    Raises:
        GrafanaError: not a query variable, or as :func:`interpolate`.
    """
    defs = variables(dashboard)
    var = defs.get(name)
    if var is None or var.get("type") != "query":
        raise GrafanaError(f"{name} is not a query variable")
    return interpolate(str(var["query"]), defs, values)


def current_values(
    dashboard: Mapping[str, Any], options: Callable[[str], list[str]]
) -> dict[str, str | list[str]]:
    """The variable values Grafana starts the dashboard with: each variable's saved
    ``current`` value, else (a query variable with nothing saved) its first option, as
    Grafana selects on load. ``options(influxql)`` runs a variable query and returns its
    values; queries see the values chosen for the variables before them.

    Raises:
        GrafanaError: a query variable with no saved value returns no option.
    """
    values: dict[str, str | list[str]] = {}
    for name, var in variables(dashboard).items():
        saved = (var.get("current") or {}).get("value")
        if saved not in (None, "", []):
            values[name] = saved
        elif var.get("type") == "query":
            found = options(variable_query(dashboard, name, values))
            if not found:
                raise GrafanaError(f"variable {name}: its query returns no value")
            values[name] = found[0]
        else:
            values[name] = str(var.get("query", ""))
    return values


@dataclass
class PanelResult:
    """Rows one panel returned (summed over its targets), or the first target's error."""

    panel_title: str
    rows: int = 0
    error: str | None = None


def check(
    dashboard: Mapping[str, Any],
    values: Mapping[str, str | Sequence[str]],
    dashboard_range: TimeRange,
    now_ms: int,
    run: Callable[[str], int],
) -> list[PanelResult]:
    """Run every panel of ``dashboard`` as Grafana would (:func:`dashboard_queries`), with
    ``run(influxql)`` returning the number of rows; rows are skipped. An exception raised by
    ``run`` or by the expansion becomes that panel's ``error``."""
    results: dict[int, PanelResult] = {}
    defs = variables(dashboard)
    for panel in iter_panels(dashboard):
        if panel.get("type") == "row":
            continue
        result = results.setdefault(panel["id"], PanelResult(panel["title"]))
        for target in panel.get("targets", []):
            try:
                result.rows += run(_target_query(panel, target, defs, values, dashboard_range,
                                                 now_ms).influxql)
            except Exception as exc:  # noqa: BLE001 - reported per panel, the check goes on
                result.error = f"{target.get('refId')}: {exc}"
                break
    return list(results.values())


# --- publishing -------------------------------------------------------------------------------


@dataclass
class PublishReport:
    """What :func:`publish` did: the folder uid, each dashboard's uid → URL path and version
    as Grafana answered, and whether the datasource was created or updated."""

    folder_uid: str
    dashboards: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    datasource: str | None = None


def folder_uid(title: str) -> str:
    """The uid arbstream gives a folder: the lower-case slug of its title (``a-z0-9-``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return slug or "arbstream"


def datasource_payload(settings: Settings) -> dict[str, Any]:
    """The InfluxQL datasource for Grafana's ``/api/datasources``, the same as
    ``grafana/provisioning/datasources/influxdb.yaml`` with the settings' values:
    URL ``grafana_influx_url`` (default ``influx_url``), database ``influx_db``, user and
    password ``influx_username``/``influx_password`` (password in ``secureJsonData``)."""
    payload: dict[str, Any] = {
        "uid": DATASOURCE_UID, "name": "arbstream InfluxDB", "type": "influxdb",
        "access": "proxy", "url": settings.grafana_influx_url or settings.influx_url,
        "user": settings.influx_username or "",
        "jsonData": {"version": "InfluxQL", "dbName": settings.influx_db, "httpMode": "GET",
                     "timeInterval": "1s"},
        "isDefault": False,
    }
    if settings.influx_password is not None:
        payload["secureJsonData"] = {"password": settings.influx_password.get_secret_value()}
    return payload


def client(settings: Settings, timeout: float = 10.0) -> Any:
    """A ``grafana_client.GrafanaApi`` for ``settings.grafana_url``, authenticated with the
    token (``Authorization: Bearer``) or else the user and password (basic auth).

    Raises:
        GrafanaError: neither a token nor a user and password is configured.
    """
    from grafana_client import GrafanaApi

    if settings.grafana_token is not None:
        credential: Any = settings.grafana_token.get_secret_value()
    elif settings.grafana_username and settings.grafana_password is not None:
        credential = (settings.grafana_username, settings.grafana_password.get_secret_value())
    else:
        raise GrafanaError("no Grafana credentials: set ARB_GRAFANA_TOKEN, or "
                           "ARB_GRAFANA_USERNAME and ARB_GRAFANA_PASSWORD")
    return GrafanaApi.from_url(settings.grafana_url.rstrip("/"), credential=credential,
                               timeout=timeout)


def publish(
    settings: Settings,
    dashboards: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    datasource: bool = False,
    timeout: float = 10.0,
) -> PublishReport:
    """Push the dashboards (default: :func:`load_dashboards`) into the folder
    ``settings.grafana_folder`` of the Grafana at ``settings.grafana_url``, overwriting any
    dashboard with the same uid (``POST /api/dashboards/db``, ``overwrite: true``). The folder
    is created when missing (``GET``/``POST /api/folders``). With ``datasource`` the InfluxDB
    datasource (:func:`datasource_payload`) is updated by uid, or created when missing.

    Returns:
        A :class:`PublishReport`.

    Raises:
        GrafanaError: missing credentials; Grafana answered an HTTP error (4xx/5xx: the status,
            what was being done and Grafana's message are in the text); or it could not be
            reached.
    """
    import requests
    from grafana_client.client import GrafanaClientError, GrafanaException

    boards = dict(dashboards) if dashboards is not None else load_dashboards()
    api = client(settings, timeout)
    base = settings.grafana_url.rstrip("/")

    def call(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except GrafanaException as exc:
            raise GrafanaError(f"Grafana at {base} answered HTTP {exc.status_code} to {what}: "
                               f"{_message(exc)}") from None
        except requests.RequestException as exc:
            raise GrafanaError(f"cannot reach Grafana at {base} ({what}): {exc}") from None

    uid = folder_uid(settings.grafana_folder)
    try:
        api.folder.get_folder(uid)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise GrafanaError(f"Grafana at {base} answered HTTP {exc.status_code} to reading "
                               f"folder {uid}: {_message(exc)}") from None
        call(f"creating folder {settings.grafana_folder!r}", api.folder.create_folder,
             settings.grafana_folder, uid)
    except requests.RequestException as exc:
        raise GrafanaError(f"cannot reach Grafana at {base}: {exc}") from None
    report = PublishReport(folder_uid=uid)
    if datasource:
        payload = datasource_payload(settings)
        try:
            api.datasource.get_datasource_by_uid(DATASOURCE_UID)
            exists = True
        except GrafanaClientError as exc:
            if exc.status_code != 404:
                raise GrafanaError(f"Grafana at {base} answered HTTP {exc.status_code} to "
                                   f"reading datasource {DATASOURCE_UID}: {_message(exc)}"
                                   ) from None
            exists = False
        if exists:
            call("updating the datasource", api.datasource.update_datasource_by_uid,
                 DATASOURCE_UID, payload)
            report.datasource = "updated"
        else:
            call("creating the datasource", api.datasource.create_datasource, payload)
            report.datasource = "created"
    for board_uid, board in boards.items():
        body = {"dashboard": {**board, "id": None}, "folderUid": uid, "overwrite": True,
                "message": "arbstream grafana publish"}
        answer = call(f"saving dashboard {board_uid}", api.dashboard.update_dashboard, body)
        report.dashboards[board_uid] = str(answer.get("url", f"/d/{board_uid}"))
        if isinstance(answer.get("version"), int):
            report.versions[board_uid] = answer["version"]
    return report


def _message(exc: Any) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and response.get("message"):
        return str(response["message"])
    return str(response or exc)


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
