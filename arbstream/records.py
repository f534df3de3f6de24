"""The records the stream job computes: each record type's field names and Spark SQL types.

One definition for every place that stores or reads them: the stream's stateful operator
(:mod:`spark_jobs.tracker`, :mod:`spark_jobs.engine`) builds records with these fields, its
sinks (:mod:`spark_jobs.sinks.records`) select them, and the Parquet history
(:mod:`arbstream.store.lake`) derives its file schemas from them, so a field added here reaches
all of them.

Types are Spark SQL type names: ``string``, ``double``, ``bigint``, ``boolean`` and
``timestamp`` (UTC; the records carry tz-aware datetimes). Units: prices in the quote
currency, sizes in base units, spreads as fractions (``gross``, ``net``) and in bps
(``*_bps``), ``emitted_ts`` integer UTC ms, durations in seconds; the field meanings are in
:mod:`spark_jobs.tracker` (spreads, episodes, features, percentiles) and ``docs/stream.md``
(opportunities).
"""

from __future__ import annotations

import math
from typing import Any

#: One pair's spread in one final window (``spread`` records; an opportunity is one with
#: ``is_opportunity``).
SPREAD_FIELDS: dict[str, str] = {
    "opportunity_id": "string", "symbol": "string", "sell_symbol": "string",
    "cross_quote": "boolean", "window_start": "timestamp", "window_end": "timestamp",
    "buy_exchange": "string", "buy_ask": "double", "buy_ask_size": "double",
    "buy_ts": "timestamp", "sell_exchange": "string", "sell_bid": "double",
    "sell_bid_size": "double", "sell_ts": "timestamp", "conversion_symbol": "string",
    "conversion_exchange": "string", "conversion_rate": "double", "conversion_fee": "double",
    "buy_fee": "double", "sell_fee": "double", "haircut": "double", "gross": "double",
    "net": "double", "gross_bps": "double", "net_bps": "double", "size_base": "double",
    "size_source": "string", "expected_profit": "double", "profit_currency": "string",
    "usd_rate": "double", "expected_profit_usd": "double", "buy_vwap": "double",
    "sell_vwap": "double", "is_opportunity": "boolean",
    "episode_id": "string", "spread_mean_bps": "double", "spread_std_bps": "double",
    "spread_z": "double", "anomaly": "boolean",
}
#: An episode event (``opened`` or ``closed``) of one pair.
EPISODE_FIELDS: dict[str, str] = {
    "episode_id": "string", "event": "string", "status": "string", "symbol": "string",
    "sell_symbol": "string", "cross_quote": "boolean", "buy_exchange": "string",
    "sell_exchange": "string", "start": "timestamp", "end": "timestamp",
    "duration_s": "double", "windows": "bigint", "peak_net_bps": "double",
    "mean_net_bps": "double", "size_base": "double", "size_source": "string",
    "expected_profit": "double", "profit_currency": "string", "expected_profit_usd": "double",
}
#: One (symbol, exchange)'s features in one final window.
FEATURE_FIELDS: dict[str, str] = {
    "feature_id": "string", "symbol": "string", "exchange": "string",
    "window_end": "timestamp", "mid": "double", "log_return": "double",
    "volatility": "double", "quote_spread_bps": "double", "imbalance": "double",
    "latency_ms": "double", "message_rate": "double", "volume": "double",
    "volume_z": "double", "volume_spike": "boolean", "quote_age_s": "double",
}
#: One pair's hourly distribution of net bps (threshold recommendations).
PERCENTILE_FIELDS: dict[str, str] = {
    "threshold_id": "string", "symbol": "string", "sell_symbol": "string",
    "cross_quote": "boolean", "buy_exchange": "string", "sell_exchange": "string",
    "hour_start": "timestamp", "count": "bigint", "mean_bps": "double", "p50_bps": "double",
    "p75_bps": "double", "p95_bps": "double", "max_bps": "double", "aggressive_bps": "double",
    "moderate_bps": "double", "conservative_bps": "double",
}
#: The tracker's record types (``record`` of the operator's output) and their fields.
RECORD_FIELDS: dict[str, dict[str, str]] = {
    "spread": SPREAD_FIELDS, "episode": EPISODE_FIELDS, "feature": FEATURE_FIELDS,
    "percentiles": PERCENTILE_FIELDS,
}
#: An ``opportunity`` record: the spread row of its first window, its ``stage`` (``early``,
#: ``final``, ``retracted``), when the stream emitted that version (``emitted_ts``, UTC ms),
#: and the windows its snapshot held (``valid_from`` .. ``valid_to``, ``windows`` of them).
OPPORTUNITY_FIELDS: dict[str, str] = {
    **SPREAD_FIELDS, "stage": "string", "emitted_ts": "bigint", "valid_from": "timestamp",
    "valid_to": "timestamp", "windows": "bigint",
}


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else ``None`` (``None``, booleans,
    NaN, ±inf and non-numbers): how a record's optional numeric field is stored (JSON and
    MongoDB have no NaN; InfluxDB refuses it)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
