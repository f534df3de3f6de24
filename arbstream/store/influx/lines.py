"""The points and line protocol of every InfluxDB measurement, one function each.

Rows are plain dicts (``row.asDict()`` on executors); extra keys are ignored, and optional
keys that are missing or ``None`` leave their field out. Numbers are always written as floats,
so field types never conflict; booleans as booleans; every time is UTC, in ms (``trade``: ns).
Retention policies: :mod:`~arbstream.store.influx.schema`.

* ``quote`` tags ``exchange``, ``symbol``; fields ``bid``, ``ask`` and, when not ``None``,
  ``bid_size``, ``ask_size``; time = ``exchange_ts``.
* ``trade`` tags ``exchange``, ``symbol`` and ``side`` when given; fields ``price`` (quote
  currency), ``size`` (base units), ``trade_id``; time = ``exchange_ts`` plus a sub-ms offset
  from ``trade_id`` (ns precision).
* ``spread`` tags ``symbol`` (buy leg), ``sell_symbol``, ``buy_exchange``, ``sell_exchange``,
  ``cross_quote`` (``"true"``/``"false"``); fields ``gross_bps``, ``net_bps`` (basis points),
  ``buy_ask``, ``sell_bid`` (quote currency of each leg) and, when not ``None``,
  ``spread_mean_bps``, ``spread_std_bps`` (bps), ``spread_z`` (standard deviations),
  ``anomaly`` (bool), ``size_base`` (base units), ``expected_profit_usd`` (USD),
  ``conversion_rate``; time = ``window_end``.
* ``episode`` (closed episodes only) tags as ``spread``; fields ``duration_s`` (seconds),
  ``windows``, ``peak_net_bps``, ``mean_net_bps`` (bps) and ``expected_profit_usd`` (USD) when
  not ``None``; time = ``start``.
* ``spread_percentiles`` tags as ``spread``; fields ``count``, ``mean_bps``, ``p50_bps``,
  ``p75_bps``, ``p95_bps``, ``max_bps``, ``aggressive_bps``, ``moderate_bps``,
  ``conservative_bps`` (bps); time = ``hour_start``.
* ``features`` tags ``symbol``, ``exchange``; fields the non-``None`` of
  :data:`FEATURE_FIELDS` and ``volume_spike`` (bool); time = ``window_end``.
* ``stream``, see :func:`stream_point`; ``health``, see :func:`health_point`.
* ``ml_score`` (one point per scored opportunity window and model), see
  :func:`ml_score_point`.
* ``pair_stats`` (one point per pair-trading pair and common window end), see
  :func:`pair_stats_point`.
* ``query_progress`` (one point per streaming-query progress, idle or termination event of
  the stream job), see :func:`query_progress_point`; ``query_restarts`` (one point per
  restart of a failed query), see :func:`restart_point`.

Writes are idempotent: InfluxDB keeps one point per (measurement, tag set, timestamp) and a
rewrite replaces its fields, so replaying a micro-batch does not add points. (Two different
quotes of one exchange and symbol with the same ``exchange_ts`` millisecond collapse into the
last one written: the best bid/offer at that millisecond. Trades are written in ns with a
per-trade offset inside their millisecond, so none collapse; see :func:`trade_point`.)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from influxdb_client import Point, WritePrecision

from arbstream.schemas import HEALTH_FIELDS
from arbstream.store.influx.schema import (
    EPISODE,
    FEATURES,
    HEALTH,
    ML_SCORE,
    PAIR_STATS,
    PERCENTILES,
    QUERY_PROGRESS,
    QUERY_RESTARTS,
    QUOTE,
    SPREAD,
    STREAM,
    TRADE,
)
from arbstream.timestamps import to_ms

#: Optional float fields of ``features`` points.
FEATURE_FIELDS = (
    "mid", "log_return", "volatility", "quote_spread_bps", "imbalance", "latency_ms",
    "message_rate", "volume", "volume_z", "quote_age_s",
)
#: Float fields of ``spread_percentiles`` points (bps, except ``count``).
PERCENTILE_FIELDS = (
    "count", "mean_bps", "p50_bps", "p75_bps", "p95_bps", "max_bps", "aggressive_bps",
    "moderate_bps", "conservative_bps",
)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def quote_point(row: Mapping[str, Any]) -> Point:
    """The ``quote`` point of one quote row (``exchange, symbol, bid, ask, bid_size,
    ask_size, exchange_ts`` in UTC ms).

    Raises:
        KeyError: a required key is missing.
    """
    point = (
        Point(QUOTE)
        .tag("exchange", row["exchange"])
        .tag("symbol", row["symbol"])
        .field("bid", _float(row["bid"]))
        .field("ask", _float(row["ask"]))
        .time(to_ms(row["exchange_ts"]), WritePrecision.MS)
    )
    for size in ("bid_size", "ask_size"):
        if row.get(size) is not None:
            point.field(size, float(row[size]))
    return point


def _bool_tag(value: Any) -> str:
    return "true" if value else "false"


def _optional_fields(point: Point, row: Mapping[str, Any], names: Iterable[str]) -> Point:
    """Add each of ``names`` whose value is not ``None`` as a float field."""
    for name in names:
        if row.get(name) is not None:
            point.field(name, float(row[name]))
    return point


def _pair_tags(point: Point, row: Mapping[str, Any]) -> Point:
    """Tags of a pair: ``symbol`` (buy leg), ``sell_symbol`` (defaults to ``symbol``),
    ``buy_exchange``, ``sell_exchange``, ``cross_quote`` (``"true"``/``"false"``, default
    false). Raises KeyError when ``symbol`` or an exchange is missing."""
    return (
        point.tag("symbol", row["symbol"])
        .tag("sell_symbol", row.get("sell_symbol") or row["symbol"])
        .tag("buy_exchange", row["buy_exchange"])
        .tag("sell_exchange", row["sell_exchange"])
        .tag("cross_quote", _bool_tag(row.get("cross_quote")))
    )


#: Optional float fields of ``spread`` points.
SPREAD_OPTIONAL_FIELDS = (
    "spread_mean_bps", "spread_std_bps", "spread_z", "size_base", "expected_profit_usd",
    "conversion_rate",
)


def spread_point(row: Mapping[str, Any]) -> Point:
    """The ``spread`` point of one spread/opportunity row.

    Required keys: ``symbol, buy_exchange, sell_exchange, gross_bps, net_bps`` (bps),
    ``buy_ask, sell_bid`` (quote currency) and ``window_end`` (datetime, naive = UTC).
    Optional: ``sell_symbol`` (default ``symbol``), ``cross_quote`` (default false) and, each
    written only when not ``None``, ``anomaly`` (bool) and :data:`SPREAD_OPTIONAL_FIELDS`.

    Raises:
        KeyError: a required key is missing.
    """
    point = (
        _pair_tags(Point(SPREAD), row)
        .field("gross_bps", _float(row["gross_bps"]))
        .field("net_bps", _float(row["net_bps"]))
        .field("buy_ask", _float(row["buy_ask"]))
        .field("sell_bid", _float(row["sell_bid"]))
        .time(to_ms(row["window_end"]), WritePrecision.MS)
    )
    _optional_fields(point, row, SPREAD_OPTIONAL_FIELDS)
    if row.get("anomaly") is not None:
        point.field("anomaly", bool(row["anomaly"]))
    return point


def trade_point(row: Mapping[str, Any]) -> Point:
    """The ``trade`` point (RP ``raw``) of one trade row: tags ``exchange``, ``symbol`` and
    ``side`` when not ``None``; fields ``price`` (quote currency) and ``size`` (base units)
    when not ``None``, and ``trade_id``; time in **nanoseconds**: ``exchange_ts`` (UTC ms)
    plus a sub-millisecond offset derived from ``trade_id`` (:func:`trade_time_ns`), so trades
    of one series in the same millisecond (a taker order filling several levels) stay
    distinct points, and a rewritten trade lands on its own point again.

    Raises:
        KeyError: ``exchange``, ``symbol``, ``exchange_ts`` or ``trade_id`` is missing.
    """
    point = Point(TRADE).tag("exchange", row["exchange"]).tag("symbol", row["symbol"])
    if row.get("side") is not None:
        point.tag("side", row["side"])
    _optional_fields(point, row, ("price", "size"))
    point.field("trade_id", str(row["trade_id"]))
    return point.time(trade_time_ns(row["exchange_ts"], str(row["trade_id"])), WritePrecision.NS)


def trade_time_ns(exchange_ts: Any, trade_id: str) -> int:
    """``exchange_ts`` (UTC ms, or a datetime) in ns plus ``sha256(trade_id) mod 10^6`` ns:
    deterministic, inside the trade's millisecond, distinct for two trades of the same
    millisecond unless their ids collide on that offset (probability 10^-6)."""
    offset = int.from_bytes(hashlib.sha256(trade_id.encode()).digest()[:8], "big") % 1_000_000
    return to_ms(exchange_ts) * 1_000_000 + offset


def episode_point(row: Mapping[str, Any]) -> Point:
    """The ``episode`` point of one closed-episode row: pair tags (see :func:`spread_point`);
    fields ``duration_s`` (seconds), ``windows`` (count, as float), ``peak_net_bps``,
    ``mean_net_bps`` (bps) and ``expected_profit_usd`` (USD) when not ``None``; time =
    ``start`` (datetime, naive = UTC).

    Raises:
        KeyError: a tag key or ``start`` is missing.
    """
    point = _pair_tags(Point(EPISODE), row)
    _optional_fields(
        point, row,
        ("duration_s", "windows", "peak_net_bps", "mean_net_bps", "expected_profit_usd"),
    )
    return point.time(to_ms(row["start"]), WritePrecision.MS)


def percentile_point(row: Mapping[str, Any]) -> Point:
    """The ``spread_percentiles`` point of one hourly percentile row: pair tags (see
    :func:`spread_point`), the non-``None`` of :data:`PERCENTILE_FIELDS` (bps; ``count`` as
    float), time = ``hour_start`` (datetime, naive = UTC).

    Raises:
        KeyError: a tag key or ``hour_start`` is missing.
    """
    point = _optional_fields(_pair_tags(Point(PERCENTILES), row), row,
                             PERCENTILE_FIELDS)
    return point.time(to_ms(row["hour_start"]), WritePrecision.MS)


#: Counter fields of ``stream`` points (records per exchange and market micro-batch).
STREAM_FIELDS = ("received", "duplicates", "late", "future")


def stream_point(row: Mapping[str, Any]) -> Point:
    """The ``stream`` point (default RP) of one exchange's counters in one market micro-batch
    of one stream bucket: tags ``exchange``; fields ``received``, ``duplicates``, ``late``,
    ``future`` (records, floats; 0 when absent) and ``watermark_ms`` (the combined watermark,
    UTC ms); time = ``emitted_ts`` (UTC ms, processing time). Sum the counters over time.

    Raises:
        KeyError: ``exchange`` or ``emitted_ts`` is missing.
    """
    point = Point(STREAM).tag("exchange", row["exchange"])
    for name in STREAM_FIELDS:
        point.field(name, float(row.get(name) or 0))
    if row.get("watermark_ms") is not None:
        point.field("watermark_ms", float(row["watermark_ms"]))
    return point.time(int(row["emitted_ts"]), WritePrecision.MS)


def feature_point(row: Mapping[str, Any]) -> Point:
    """The ``features`` point (RP ``features``) of one per-exchange feature row: tags
    ``symbol``, ``exchange``; the non-``None`` of :data:`FEATURE_FIELDS` as floats
    (``quote_spread_bps`` in bps, ``latency_ms`` in ms, ``quote_age_s`` in seconds,
    ``message_rate`` per second) and ``volume_spike`` (bool) when not ``None``; time =
    ``window_end`` (datetime, naive = UTC).

    Raises:
        KeyError: ``symbol``, ``exchange`` or ``window_end`` is missing.
    """
    point = _optional_fields(
        Point(FEATURES).tag("symbol", row["symbol"]).tag("exchange", row["exchange"]),
        row, FEATURE_FIELDS,
    )
    if row.get("volume_spike") is not None:
        point.field("volume_spike", bool(row["volume_spike"]))
    return point.time(to_ms(row["window_end"]), WritePrecision.MS)


def health_point(row: Mapping[str, Any]) -> Point:
    """The ``health`` point of one producer health row, raw or enriched by
    :func:`spark_jobs.health.enrich`.

    Tags ``exchange`` and, on enriched rows, ``status`` (``ok``/``degraded``/``stale``, for
    ``WHERE``/``GROUP BY``). Float fields: every numeric counter and rate of
    :data:`arbstream.schemas.HEALTH_FIELDS`, the enriched ``interval_s`` (s),
    ``records_delta``, ``errors_delta``, ``reconnects_delta`` (counts), ``staleness_s`` (s),
    ``uptime``, ``rate_score``, ``freshness``, ``error_rate``, ``reliability`` (fractions) and
    ``status_code`` (0 ok, 1 degraded, 2 stale, for graphs and alerts). Null or absent keys are
    left out. Time = ``ts`` (UTC ms).

    Raises:
        KeyError: ``exchange`` or ``ts`` is missing.
        ValueError: ``status`` is not one of the three.
    """
    enriched = ("interval_s", "records_delta", "errors_delta", "reconnects_delta", "staleness_s",
                "uptime", "rate_score", "freshness", "error_rate", "reliability")
    point = Point(HEALTH).tag("exchange", row["exchange"])
    status = row.get("status")
    if status is not None:
        codes = {"ok": 0.0, "degraded": 1.0, "stale": 2.0}
        if status not in codes:
            raise ValueError(f"health status must be one of {sorted(codes)}, got {status!r}")
        point.tag("status", status).field("status_code", codes[status])
    for name in [*HEALTH_FIELDS, *enriched]:
        if name not in ("schema_version", "type", "exchange", "ts") and row.get(name) is not None:
            point.field(name, float(row[name]))
    return point.time(to_ms(row["ts"]), WritePrecision.MS)


#: Optional float fields of ``ml_score`` points.
ML_SCORE_FIELDS = ("score", "predicted_bps", "net_bps")
#: Prefix of the ``ml_score`` fields holding the model's input features.
ML_FEATURE_PREFIX = "f_"


def pair_label(row: Mapping[str, Any]) -> str:
    """``<symbol>|<buy_exchange>|<sell_exchange>``, or ``<symbol>/<sell_symbol>|...`` for a
    cross-quote pair: the pair part of an ``episode_id``."""
    symbol, sell = row["symbol"], row.get("sell_symbol") or row["symbol"]
    pair = symbol if sell == symbol else f"{symbol}/{sell}"
    return f"{pair}|{row['buy_exchange']}|{row['sell_exchange']}"


def ml_score_point(row: Mapping[str, Any]) -> Point:
    """The ``ml_score`` point of one opportunity window scored by one model.

    Tags: the pair's (see :func:`spread_point`), ``pair`` (:func:`pair_label` unless given),
    ``model`` (registry name) and ``version`` (its version, as text). Fields, each only when
    not ``None`` and finite: ``score`` (classifier probability, 0..1), ``predicted_bps``
    (regressor prediction of the net spread at the model's horizon, bps), ``net_bps`` (the
    window's net spread when scored, bps) and ``f_<name>`` for each item of the optional
    mapping ``features`` (the model's inputs, for drift monitoring). Time = ``window_end``
    (datetime, naive = UTC, or UTC ms).

    Raises:
        KeyError: a pair tag, ``model``, ``version`` or ``window_end`` is missing.
    """
    point = (_pair_tags(Point(ML_SCORE), row)
             .tag("pair", row.get("pair") or pair_label(row))
             .tag("model", row["model"]).tag("version", str(row["version"])))
    _optional_fields(point, row, ML_SCORE_FIELDS)
    for name, value in (row.get("features") or {}).items():
        if value is not None and math.isfinite(value):
            point.field(ML_FEATURE_PREFIX + name, float(value))
    return point.time(to_ms(row["window_end"]), WritePrecision.MS)


#: Float fields of ``pair_stats`` points.
PAIR_STATS_FIELDS = ("beta", "alpha", "spread", "z", "correlation")


def pair_stats_point(row: Mapping[str, Any]) -> Point:
    """The ``pair_stats`` point of one pair and window end (:mod:`ml.pairs`): tags ``pair``
    (its ``ARB_PAIRS`` name), ``y`` and ``x`` (legs, ``exchange:SYMBOL``); fields, each only
    when not ``None`` and finite: ``beta`` (rolling OLS hedge ratio of log mids,
    dimensionless), ``alpha`` (its intercept, log units), ``spread`` (log y − α − β log x,
    log units ≈ fraction), ``z`` (rolling z-score of the spread, standard deviations),
    ``correlation`` (rolling correlation of log returns); time = ``window_end`` (datetime,
    naive = UTC, or UTC ms).

    Raises:
        KeyError: ``pair``, ``y``, ``x`` or ``window_end`` is missing.
    """
    point = Point(PAIR_STATS).tag("pair", row["pair"]).tag("y", row["y"]).tag("x", row["x"])
    for name in PAIR_STATS_FIELDS:
        value = row.get(name)
        if value is not None and math.isfinite(value):
            point.field(name, float(value))
    return point.time(to_ms(row["window_end"]), WritePrecision.MS)


#: Float fields of ``query_progress`` points (see :func:`query_progress_point`).
QUERY_PROGRESS_FIELDS = (
    "input_rows_per_s", "processed_rows_per_s", "num_input_rows", "batch_id",
    "batch_duration_ms", "event_time_lag_s", "consumer_lag_records", "failed",
)
#: Events of a streaming query, the ``event`` tag of ``query_progress``.
QUERY_EVENTS = ("progress", "idle", "terminated")


def query_progress_point(row: Mapping[str, Any]) -> Point:
    """The ``query_progress`` point of one event of one streaming query of the stream job
    (written by :mod:`spark_jobs.progress`).

    Tags ``query`` (the query's name) and ``event``: ``progress`` (a completed micro-batch),
    ``idle`` (the query waits for data) or ``terminated`` (it stopped). Fields, each only when
    not ``None`` and finite: ``input_rows_per_s`` and ``processed_rows_per_s`` (rows per
    second), ``num_input_rows`` (rows of the micro-batch), ``batch_id``,
    ``batch_duration_ms`` (the trigger's execution, ms), ``event_time_lag_s`` (batch start
    minus the query's event-time watermark, s), ``consumer_lag_records`` (records between the
    batch's end offsets and the sources' latest offsets, summed over sources and partitions),
    ``failed`` (1 when the query terminated with an exception, 0 when it was stopped); and
    ``exception`` (string: the exception's first line, already free of secrets). Every
    ``idle`` point has field ``idle`` = 1 (a point needs a field). Time = ``ts`` (UTC ms: the
    batch start for ``progress``, the event's time otherwise).

    Raises:
        KeyError: ``query``, ``event`` or ``ts`` is missing.
        ValueError: ``event`` is not one of :data:`QUERY_EVENTS`.
    """
    if row["event"] not in QUERY_EVENTS:
        raise ValueError(f"query event must be one of {QUERY_EVENTS}, got {row['event']!r}")
    point = Point(QUERY_PROGRESS).tag("query", row["query"]).tag("event", row["event"])
    for name in QUERY_PROGRESS_FIELDS:
        value = row.get(name)
        if value is not None and math.isfinite(value):
            point.field(name, float(value))
    if row.get("exception") is not None:
        point.field("exception", str(row["exception"]))
    if row["event"] == "idle":
        point.field("idle", 1.0)
    return point.time(to_ms(row["ts"]), WritePrecision.MS)


def restart_point(row: Mapping[str, Any]) -> Point:
    """The ``query_restarts`` point of one restart of a failed streaming query: tag ``query``
    (its name); fields ``attempt`` (the restart's number since the job started, 1 for the
    first, as float) and ``reason`` (string, free of secrets) when not ``None``; time = ``ts``
    (UTC ms, wall clock). Count the points for the number of restarts.

    Raises:
        KeyError: ``query``, ``attempt`` or ``ts`` is missing.
    """
    point = (Point(QUERY_RESTARTS).tag("query", row["query"])
             .field("attempt", float(row["attempt"])))
    if row.get("reason") is not None:
        point.field("reason", str(row["reason"]))
    return point.time(to_ms(row["ts"]), WritePrecision.MS)


def quote_line(row: Mapping[str, Any]) -> str:
    """Line protocol (ms precision) of one quote row; ``""`` when it has no finite field."""
    return quote_point(row).to_line_protocol()


def quote_lines(exchange: list[str], symbol: list[str], bid: list[float], ask: list[float],
                bid_size: list[float | None], ask_size: list[float | None],
                exchange_ts: list[int]) -> list[str]:
    """Line protocol (ms precision) of many quotes, column-wise: the same points as
    :func:`quote_line` without building a ``Point`` per quote (the stream's hot path).

    ``exchange`` and ``symbol`` must be validated ids (lower-case exchange, ``BASE-QUOTE``),
    which need no escaping; sizes that are ``None`` or NaN are left out.
    """
    def size(name: str, value: float | None) -> str:
        return f",{name}={float(value)!r}" if value is not None and value == value else ""

    return [
        f"quote,exchange={e},symbol={s} bid={float(b)!r},ask={float(a)!r}"
        f"{size('bid_size', bs)}{size('ask_size', az)} {int(t)}"
        for e, s, b, a, bs, az, t in zip(exchange, symbol, bid, ask, bid_size, ask_size,
                                         exchange_ts, strict=True)
    ]


def spread_line(row: Mapping[str, Any]) -> str:
    """Line protocol (ms precision) of one spread row: byte for byte the line of
    :func:`spread_point`, formatted directly (one per pair and window: the stream's
    second-hottest path). Tag values are validated exchange ids and ``BASE-QUOTE`` symbols,
    which need no escaping; ``""`` when the row has no finite field.

    Raises:
        KeyError: a required key is missing.
    """
    fields = []
    if row.get("anomaly") is not None:
        fields.append(f"anomaly={'true' if row['anomaly'] else 'false'}")
    for name in SPREAD_LINE_FIELDS:  # sorted by name, as Point writes them
        value = _float(row[name]) if name in SPREAD_REQUIRED_FIELDS else _float(row.get(name))
        if value is not None and math.isfinite(value):  # as Point: NaN and ±Inf left out
            text = str(value)
            fields.append(f"{name}={text[:-2] if text.endswith('.0') else text}")
    if not fields:
        return ""
    symbol = row["symbol"]
    tags = (f"buy_exchange={row['buy_exchange']},cross_quote={_bool_tag(row.get('cross_quote'))}"
            f",sell_exchange={row['sell_exchange']},sell_symbol={row.get('sell_symbol') or symbol}"
            f",symbol={symbol}")
    return f"spread,{tags} {','.join(fields)} {to_ms(row['window_end'])}"


SPREAD_REQUIRED_FIELDS = frozenset({"gross_bps", "net_bps", "buy_ask", "sell_bid"})
#: Float fields of a spread line in Point's order (sorted; ``anomaly`` sorts first).
SPREAD_LINE_FIELDS = tuple(sorted({*SPREAD_REQUIRED_FIELDS, *SPREAD_OPTIONAL_FIELDS}))



def _line(point: Callable[[Mapping[str, Any]], Point]) -> Callable[[Mapping[str, Any]], str]:
    def line(row: Mapping[str, Any]) -> str:
        return point(row).to_line_protocol()

    line.__doc__ = f"Line protocol of :func:`{point.__name__}` of one row."
    return line


#: Measurement -> the line protocol of one row (``""`` when the row has no field): ms
#: timestamps, but ns for ``trade``. Raises as the measurement's ``*_point``.
LINES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    QUOTE: quote_line,
    TRADE: _line(trade_point),
    SPREAD: spread_line,
    EPISODE: _line(episode_point),
    PERCENTILES: _line(percentile_point),
    FEATURES: _line(feature_point),
    STREAM: _line(stream_point),
    HEALTH: _line(health_point),
    ML_SCORE: _line(ml_score_point),
    PAIR_STATS: _line(pair_stats_point),
    QUERY_PROGRESS: _line(query_progress_point),
    QUERY_RESTARTS: _line(restart_point),
}
