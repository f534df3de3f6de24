"""InfluxQL reads: arbitrary queries (dashboards, checks), the demo's lowest mid, the
model scores and spread series the live model evaluation labels them with, and what
``arbstream status --live`` shows (the latest streaming-query progress, restarts and exchange
health)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from arbstream.store.config import InfluxConfig
from arbstream.store.influx.client import run_query
from arbstream.store.influx.schema import (
    HEALTH,
    ML_SCORE,
    QUERY_PROGRESS,
    QUERY_RESTARTS,
    QUOTE,
    SPREAD,
    ident,
    ref,
)
from arbstream.timestamps import from_ms, to_ms


def query(
    conf: InfluxConfig, influxql: str, *, retries: int = 3, backoff: float = 0.5
) -> list[dict[str, Any]]:
    """Run InfluxQL against ``conf.db`` (``GET /query ... epoch=ms``).

    Measurements outside the default retention policy must be qualified: ``"raw"."quote"``,
    ``"raw"."trade"``, ``"features"."features"`` (:func:`~arbstream.store.influx.schema.ref`
    builds the name). Meant for v1; with v2 it needs the v1-compatibility endpoint and a DBRP
    mapping for each policy name.

    Args:
        retries: extra attempts after a 5xx or connection error, backing off from
            ``backoff`` seconds, doubling.

    Returns and raises as :func:`~arbstream.store.influx.client.run_query`: one dict per
    row (its columns, ``time`` as int UTC ms, and its series' ``GROUP BY`` tags);
    :class:`~arbstream.store.influx.client.InfluxError` on HTTP 4xx or a statement's error
    (e.g. a parse error), :class:`~arbstream.store.influx.client.InfluxUnavailableError`
    after every retry of a 5xx or connection error.
    """
    return run_query(conf, influxql, post=False, retries=retries, backoff=backoff)


def _time_clause(since: dt.datetime | None, until: dt.datetime | None) -> str:
    """`` AND time >= ...ms AND time < ...ms`` for the half-open ``[since, until)``."""
    clause = ""
    if since is not None:
        clause += f" AND time >= {to_ms(since)}ms"
    if until is not None:
        clause += f" AND time < {to_ms(until)}ms"
    return clause


def _literal(text: str) -> str:
    """An InfluxQL string literal of ``text``, quoted and escaped."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def min_mid(
    conf: InfluxConfig,
    symbol: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> dict[str, Any] | None:
    """The lowest quote mid ``(bid + ask) / 2`` of ``symbol`` in ``"raw"."quote"`` with time
    in ``[since, until)`` (naive means UTC), across exchanges.

    Returns:
        ``{"mid": float (quote currency), "time": aware UTC datetime, "exchange": str}`` of
        the earliest such quote on the exchange with the lowest mid, or ``None`` when there
        is no quote (e.g. dropped as older than the ``raw`` retention).

    Raises:
        InfluxError, InfluxUnavailableError: as :func:`query`.
    """
    inner = (f"SELECT (bid + ask) / 2 AS mid FROM {ref(QUOTE)} WHERE symbol = {_literal(symbol)}"
             + _time_clause(since, until))
    rows = query(conf, f"SELECT min(mid) FROM ({inner}) GROUP BY exchange")
    rows = [r for r in rows if r.get("min") is not None]
    if not rows:
        return None
    best = min(rows, key=lambda r: (r["min"], r["time"], r["exchange"]))
    return {"mid": float(best["min"]), "exchange": best["exchange"],
            "time": from_ms(best["time"])}


#: Tags that name a pair in ``spread`` and ``ml_score``.
PAIR_TAGS = ("symbol", "sell_symbol", "buy_exchange", "sell_exchange")


def ml_scores(conf: InfluxConfig, model: str, since: dt.datetime | None = None,
              until: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Every ``ml_score`` point of registry model ``model`` with time in ``[since, until)``
    (naive means UTC), oldest first.

    Returns:
        One dict per point: ``time`` (UTC ms), its tags (``symbol, sell_symbol,
        buy_exchange, sell_exchange, cross_quote, pair, model, version``) and fields
        (``score``, ``predicted_bps``, ``net_bps``, ``f_<feature>``; ``None`` when absent).

    Raises:
        InfluxError, InfluxUnavailableError: as :func:`query`.
    """
    return query(conf, f"SELECT * FROM {ref(ML_SCORE)} WHERE \"model\" = {_literal(model)}"
                       + _time_clause(since, until) + " ORDER BY time ASC")


def net_bps_series(conf: InfluxConfig, since: dt.datetime | None = None,
                   until: dt.datetime | None = None) -> list[dict[str, Any]]:
    """The ``net_bps`` of every ``spread`` point with time in ``[since, until)`` (naive means
    UTC), per pair, oldest first within a pair.

    Returns:
        One dict per point: ``time`` (UTC ms), ``net_bps`` (bps) and the pair tags
        :data:`PAIR_TAGS`.

    Raises:
        InfluxError, InfluxUnavailableError: as :func:`query`.
    """
    group = ", ".join(ident(t) for t in PAIR_TAGS)
    where = _time_clause(since, until).removeprefix(" AND ")
    return query(conf, f'SELECT "net_bps" FROM {ref(SPREAD)}'
                       + (f" WHERE {where}" if where else "") + f" GROUP BY {group}")


def last_time(conf: InfluxConfig, measurement: str, field: str) -> int | None:
    """Time (UTC ms) of the latest point of ``measurement`` with ``field``, or ``None`` when
    there is none: how far a series has progressed.

    Raises:
        InfluxError, InfluxUnavailableError: as :func:`query`.
    """
    rows = query(conf, f"SELECT last({ident(field)}) FROM {ref(measurement)}")
    return int(rows[0]["time"]) if rows else None


def _latest_per(conf: InfluxConfig, measurement: str, tags: tuple[str, ...], *, retries: int,
                backoff: float) -> list[dict[str, Any]]:
    """The latest point of every series of ``measurement`` grouped by ``tags``."""
    group = ", ".join(ident(t) for t in tags)
    return query(conf, f"SELECT * FROM {ref(measurement)} GROUP BY {group} "
                       "ORDER BY time DESC LIMIT 1", retries=retries, backoff=backoff)


def latest_query_progress(conf: InfluxConfig, *, retries: int = 3,
                          backoff: float = 0.5) -> dict[str, dict[str, Any]]:
    """The state of every streaming query from its latest ``query_progress`` points (see
    :func:`~arbstream.store.influx.lines.query_progress_point`).

    Returns:
        Query name -> the fields of its latest ``progress`` point (``None`` when absent; no
        ``progress`` point yet: all ``None``) plus ``time`` (that batch's start, UTC ms, or
        ``None``), ``state`` (``"running"``; ``"idle"`` when its latest ``idle`` point is
        newer than that batch; ``"failed"`` or ``"stopped"`` when its latest ``terminated``
        point is, by its ``failed`` field), ``state_time`` (UTC ms of the point that set the
        state) and ``exception`` (the failure's first line, or ``None``). Ordered by name.

    Raises:
        InfluxError, InfluxUnavailableError: as :func:`query` (``retries``, ``backoff``).
    """
    from arbstream.store.influx.lines import QUERY_PROGRESS_FIELDS

    latest: dict[str, dict[str, dict[str, Any]]] = {}
    for row in _latest_per(conf, QUERY_PROGRESS, ("query", "event"), retries=retries,
                           backoff=backoff):
        latest.setdefault(row["query"], {})[row["event"]] = row
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(latest):
        events = latest[name]
        progress = events.get("progress", {})
        state = {**{f: progress.get(f) for f in QUERY_PROGRESS_FIELDS if f != "failed"},
                 "time": progress.get("time"), "state": "running",
                 "state_time": progress.get("time"), "exception": None}
        since = progress.get("time") or -1
        idle, end = events.get("idle"), events.get("terminated")
        if idle and idle["time"] > since:
            state.update(state="idle", state_time=idle["time"])
            since = idle["time"]
        if end and end["time"] > since:
            state.update(state="failed" if end.get("failed") else "stopped",
                         state_time=end["time"], exception=end.get("exception"))
        out[name] = state
    return out


def restart_count(conf: InfluxConfig, since: dt.datetime, *, retries: int = 3,
                  backoff: float = 0.5) -> dict[str, int]:
    """How many times each streaming query was restarted after a failure (``query_restarts``
    points, see :func:`~arbstream.store.influx.lines.restart_point`) at or after ``since``
    (naive means UTC).

    Returns:
        Query name -> restarts; queries without any are absent.

    Raises:
        InfluxError, InfluxUnavailableError: as :func:`query` (``retries``, ``backoff``).
    """
    rows = query(conf, f'SELECT count("attempt") FROM {ref(QUERY_RESTARTS)} WHERE '
                       f'time >= {to_ms(since)}ms GROUP BY "query"', retries=retries,
                 backoff=backoff)
    return {r["query"]: int(r["count"]) for r in rows if r.get("count")}


def latest_health(conf: InfluxConfig, *, retries: int = 3,
                  backoff: float = 0.5) -> list[dict[str, Any]]:
    """The latest ``health`` point of every exchange (see
    :func:`~arbstream.store.influx.lines.health_point`), by exchange name.

    Returns:
        One dict per exchange: ``exchange``, ``time`` (UTC ms), ``status`` (``ok``,
        ``degraded``, ``stale``, or ``None`` on a raw point) and every field of the point
        (e.g. ``staleness_s`` in s, ``messages_per_s``, ``rate_score`` and ``reliability`` as
        fractions; ``None`` when absent).

    Raises:
        InfluxError, InfluxUnavailableError: as :func:`query` (``retries``, ``backoff``).
    """
    rows = _latest_per(conf, HEALTH, ("exchange",), retries=retries, backoff=backoff)
    return sorted(({"status": None, **r} for r in rows), key=lambda r: r["exchange"])
