"""InfluxQL reads: arbitrary queries (dashboards, checks), the demo's lowest mid, and the
model scores and spread series the live model evaluation labels them with."""

from __future__ import annotations

import datetime as dt
from typing import Any

from arbstream.store.config import InfluxConfig
from arbstream.store.influx.client import run_query
from arbstream.store.influx.schema import ML_SCORE, QUOTE, SPREAD, ident, ref
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
