"""``arbstream status --live``: the local services, the stream job's queries, the exchanges'
health and the last opportunity, refreshed in the terminal (rich ``Live``).

:func:`collect` reads one snapshot, a plain dict; every source is read on its own and a source
that fails (service down, database missing) leaves its panel's error in ``errors`` instead of
raising. :func:`render` and the table builders are pure: dicts in, rich renderables out.

Sources: :func:`arbstream.shell.stack.status` (services); InfluxDB ``query_progress`` and
``query_restarts`` (written by the job's :mod:`spark_jobs.progress` listener, through
:func:`~arbstream.store.influx.queries.latest_query_progress` and
:func:`~arbstream.store.influx.queries.restart_count` over the last :data:`RESTART_WINDOW_S`),
``health`` (:func:`~arbstream.store.influx.queries.latest_health`); MongoDB ``opportunities``
(:func:`~arbstream.store.mongo.opportunities.latest_opportunity`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from time import sleep
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from arbstream.config import Settings
from arbstream.redact import first_line, secret_values
from arbstream.timestamps import iso_ms, to_ms

#: Restarts are counted over this many seconds before now (24 h).
RESTART_WINDOW_S = 86_400
#: Seconds a read of InfluxDB or MongoDB may take before its panel shows an error.
READ_TIMEOUT_S = 2.0
#: Colour of each query state and exchange health status.
COLOURS = {"running": "green", "idle": "cyan", "failed": "red", "stopped": "yellow",
           "ok": "green", "degraded": "yellow", "stale": "red"}


def _num(value: Any, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals and thousands separators, ``-`` when ``None``."""
    return "-" if value is None else f"{float(value):,.{digits}f}"


def _age_s(now_ms: int, then_ms: float | None) -> float | None:
    return None if then_ms is None else (now_ms - then_ms) / 1000


def _coloured(word: str | None) -> Text:
    return Text(word or "-", style=COLOURS.get(word or "", ""))


def services_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The services (``name, endpoint, healthy, pid, detail``, as
    :class:`arbstream.shell.stack.ServiceStatus`): one row each, ``healthy`` as yes/no."""
    table = Table("service", "endpoint", "healthy", "pid", "detail")
    for s in rows:
        mark = Text("yes", style="green") if s["healthy"] else Text("no", style="red")
        table.add_row(s["name"], s["endpoint"], mark, str(s.get("pid") or "-"),
                      Text(s.get("detail") or ""))
    return table


def queries_table(queries: Mapping[str, Mapping[str, Any]], restarts: Mapping[str, int],
                  now_ms: int) -> Group:
    """One row per query (the shape of :func:`~arbstream.store.influx.queries.
    latest_query_progress`): state, input and processed rows/s, batch duration (ms),
    event-time lag (s), consumer lag (records), age of the end of its last batch (s, from
    ``time`` + ``batch_duration_ms`` to ``now_ms``, UTC ms) and restarts (``restarts``:
    name -> count; queries that only have restarts get a row too); then one line per failed
    query with its exception."""
    table = Table("query", "state", "in rows/s", "done rows/s", "batch ms", "event lag s",
                  "consumer lag", "last batch age s", "restarts")
    for name in sorted({*queries, *restarts}):
        q = queries.get(name, {})
        end = None if q.get("time") is None else q["time"] + (q.get("batch_duration_ms") or 0)
        table.add_row(
            name, _coloured(q.get("state")), _num(q.get("input_rows_per_s")),
            _num(q.get("processed_rows_per_s")), _num(q.get("batch_duration_ms"), 0),
            _num(q.get("event_time_lag_s")), _num(q.get("consumer_lag_records"), 0),
            _num(_age_s(now_ms, end)), str(restarts.get(name, 0)),
        )
    failures = [Text(f"{name} failed: {q['exception']}", style="red")
                for name, q in sorted(queries.items()) if q.get("exception")]
    return Group(table, *failures)


def health_table(rows: Sequence[Mapping[str, Any]], now_ms: int) -> Table:
    """The latest health of each exchange (the shape of :func:`~arbstream.store.influx.
    queries.latest_health`): status, staleness (s), message rate (messages/s), rate score
    and reliability (fractions) and the point's age at ``now_ms`` (s)."""
    table = Table("exchange", "status", "staleness s", "msgs/s", "rate score", "reliability",
                  "age s")
    for r in rows:
        table.add_row(r["exchange"], _coloured(r.get("status")), _num(r.get("staleness_s")),
                      _num(r.get("messages_per_s")), _num(r.get("rate_score"), 2),
                      _num(r.get("reliability"), 2), _num(_age_s(now_ms, r.get("time"))))
    return table


def opportunity_table(doc: Mapping[str, Any], now_ms: int) -> Table:
    """One opportunity document (as :func:`~arbstream.store.mongo.opportunities.
    find_opportunities` returns it) as a two-column table: pair, legs, net and gross spread
    (bps), window end (UTC) and its age at ``now_ms`` (s), stage and id."""
    symbol, sell = doc.get("symbol"), doc.get("sell_symbol") or doc.get("symbol")
    end = doc.get("window_end")
    end_ms = to_ms(end) if end is not None else None
    table = Table(show_header=False, box=None)
    for key, value in (
        ("pair", symbol if sell == symbol else f"{symbol}/{sell}"),
        ("buy -> sell", f"{doc.get('buy_exchange')} -> {doc.get('sell_exchange')}"),
        ("net bps", _num(doc.get("net_bps"), 2)),
        ("gross bps", _num(doc.get("gross_bps"), 2)),
        ("window end", "-" if end_ms is None else iso_ms(end_ms)),
        ("age s", _num(_age_s(now_ms, end_ms))),
        ("stage", str(doc.get("stage") or "-")),
        ("id", str(doc.get("opportunity_id") or "-")),
    ):
        table.add_row(key, Text(value))
    return table


def _panel(title: str, body: RenderableType | None, error: str | None,
           empty: str) -> Panel:
    if error is not None:
        body = Text(f"unavailable: {error}", style="red")
    elif body is None:
        body = Text(empty, style="dim")
    return Panel(body, title=title, title_align="left")


def render(snapshot: Mapping[str, Any]) -> Group:
    """The frame of one snapshot (:func:`collect`'s shape): a panel each for the services,
    the queries, the exchanges' health and the last opportunity; a panel whose source failed
    (``snapshot["errors"][panel]``) shows that error instead."""
    now, errors = snapshot["now_ms"], snapshot.get("errors", {})
    queries, restarts = snapshot.get("queries") or {}, snapshot.get("restarts") or {}
    health, doc = snapshot.get("health") or [], snapshot.get("opportunity")
    query_error = errors.get("queries") or errors.get("restarts")
    return Group(
        Text(f"arbstream status at {iso_ms(now)}", style="bold"),
        _panel("services", services_table(snapshot.get("services") or []),
               errors.get("services"), ""),
        _panel(f"queries (restarts in the last {RESTART_WINDOW_S // 3600} h)",
               queries_table(queries, restarts, now) if queries or restarts else None,
               query_error, "no query progress recorded (is `arbstream stream` running?)"),
        _panel("exchange health", health_table(health, now) if health else None,
               errors.get("health"), "no health points recorded"),
        _panel("last opportunity", opportunity_table(doc, now) if doc else None,
               errors.get("opportunity"), "no opportunity stored"),
    )


def collect(settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """One snapshot of everything :func:`render` shows, read now.

    Returns:
        ``now_ms`` (UTC ms), ``services`` (list of dicts of
        :class:`~arbstream.shell.stack.ServiceStatus`), ``queries``, ``restarts``, ``health``,
        ``opportunity`` (each as its store reader returns it; ``None`` when unread) and
        ``errors``: panel -> ``"<ExceptionType>: <first line>"`` (secrets masked) of each
        source that failed. Never raises for an unreachable service.
    """
    from arbstream.shell import stack
    from arbstream.store.config import InfluxConfig, MongoConfig
    from arbstream.store.influx import queries as Q
    from arbstream.store.mongo.opportunities import latest_opportunity

    now = now or datetime.now(UTC)
    influx, mongo = InfluxConfig.of(settings), MongoConfig.of(settings)
    secrets = secret_values(settings)
    since = now - timedelta(seconds=RESTART_WINDOW_S)
    reads: dict[str, Callable[[], Any]] = {
        "services": lambda: [dataclasses.asdict(s) for s in stack.status(settings)],
        "queries": lambda: Q.latest_query_progress(influx, retries=0),
        "restarts": lambda: Q.restart_count(influx, since, retries=0),
        "health": lambda: Q.latest_health(influx, retries=0),
        "opportunity": lambda: latest_opportunity(mongo, timeout=READ_TIMEOUT_S),
    }
    snapshot: dict[str, Any] = {"now_ms": to_ms(now), "errors": {}}
    for panel, read in reads.items():
        try:
            snapshot[panel] = read()
        except Exception as exc:  # noqa: BLE001 - a panel shows its source's failure
            snapshot[panel] = None
            snapshot["errors"][panel] = (
                f"{type(exc).__name__}: {first_line(str(exc), secrets) or '(no message)'}")
    return snapshot


def healthy(snapshot: Mapping[str, Any]) -> bool:
    """Whether every service of the snapshot is healthy."""
    services = snapshot.get("services")
    return services is not None and all(s["healthy"] for s in services)


def run(settings: Settings, console: Console, interval: float = 2.0,
        once: bool = False) -> bool:
    """Show :func:`render` of :func:`collect` on ``console``, refreshed every ``interval``
    seconds until Ctrl-C; with ``once``, print one frame and return.

    Returns:
        Whether every service was healthy in the last frame.
    """
    snapshot = collect(settings)
    if once:
        console.print(render(snapshot))
        return healthy(snapshot)
    try:
        with Live(render(snapshot), console=console, auto_refresh=False,
                  vertical_overflow="visible") as live:
            while True:
                sleep(interval)
                snapshot = collect(settings)
                live.update(render(snapshot), refresh=True)
    except KeyboardInterrupt:
        pass
    return healthy(snapshot)

