"""How Grafana expands an InfluxQL panel query before it reaches InfluxDB, and running every
panel of a dashboard (:func:`check`).

The expansion (:func:`render_query`) follows Grafana 11: template variables with the InfluxDB
datasource's regex formatting (``interpolateQueryExpr`` in Grafana's
``public/app/plugins/datasource/influxdb``), the panel's relative-time override
(``timeFrom``/``timeShift``), ``$__interval`` / ``$__interval_ms`` from the time range and the
panel width (Grafana's interval calculator and its rounding table,
``grafana-plugin-sdk-go/backend/gtime``), then the backend's ``$timeFilter`` =
``time >= <from>ms and time <= <to>ms`` (``pkg/tsdb/influxdb/influxql``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grafana.dashboards import VARIABLE_RE, GrafanaError, iter_panels, variables

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


