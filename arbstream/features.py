"""The features a model may score an opportunity on at the moment it is emitted: computed
from one spread row of the stream (an ``opportunity`` event, a ``spread`` record of the
Parquet history, or a MongoDB opportunity document) and nothing else, so the alert worker
(online) and the retraining job (offline, with Spark operators over the history) compute the
same numbers. ``tests/core/test_features.py`` checks both ways agree.

Every feature is a float (``nan`` when the source field is missing); units in the table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from arbstream.timestamps import to_utc

#: Online feature names, in model column order, and what each one is.
ONLINE_FEATURES: dict[str, str] = {
    "net_bps": "net spread after taker fees and haircuts, bps",
    "gross_bps": "gross spread (sell bid over buy ask), bps",
    "fees_bps": "buy + sell taker fee (+ conversion fee), bps",
    "spread_mean_bps": "rolling mean of the pair's net spread over the stats horizon, bps",
    "spread_std_bps": "rolling standard deviation of the pair's net spread, bps",
    "spread_z": "(net - rolling mean) / rolling std",
    "cross_quote": "1 when the legs quote in different currencies (e.g. BTC-USDC/BTC-USD)",
    "conversion_dev_bps": "conversion rate's deviation from 1 (stablecoin depeg), bps; 0 "
                          "for same-quote pairs",
    "log_size_usd": "log(1 + size_base * buy_ask * usd_rate): the fillable size, USD",
    "leg_lag_s": "|buy_ts - sell_ts|: how far apart the two legs' quotes are, s",
    "hour": "UTC hour of the window end, 0-23",
    "minute": "UTC minute of the window end, 0-59",
}
FEATURE_NAMES: tuple[str, ...] = tuple(ONLINE_FEATURES)


def _num(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    return math.nan if value is None else float(value)


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        return to_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    return to_utc(value)


def online_features(row: Mapping[str, Any]) -> list[float]:
    """The :data:`FEATURE_NAMES` values of one spread row, in order.

    Args:
        row: a spread row or opportunity event as a mapping: ``net_bps``, ``gross_bps``,
            ``buy_fee``, ``sell_fee`` (fractions), ``conversion_fee``, ``spread_mean_bps``,
            ``spread_std_bps``, ``spread_z``, ``cross_quote``, ``conversion_rate``,
            ``size_base``, ``buy_ask``, ``usd_rate``, ``buy_ts``, ``sell_ts``, ``window_end``
            (datetimes, ISO-8601 text or UTC ms). Missing values give ``nan``.
    """
    fees = sum(float(row.get(k) or 0.0) for k in ("buy_fee", "sell_fee", "conversion_fee"))
    rate = row.get("conversion_rate")
    size, ask, usd = (row.get(k) for k in ("size_base", "buy_ask", "usd_rate"))
    size_usd = float(size) * float(ask) * float(usd or 1.0) if size is not None and ask else None
    buy, sell, end = (_time(row.get(k)) for k in ("buy_ts", "sell_ts", "window_end"))
    return [
        _num(row, "net_bps"),
        _num(row, "gross_bps"),
        fees * 1e4,
        _num(row, "spread_mean_bps"),
        _num(row, "spread_std_bps"),
        _num(row, "spread_z"),
        1.0 if row.get("cross_quote") else 0.0,
        (float(rate) - 1.0) * 1e4 if rate is not None else 0.0,
        math.log1p(size_usd) if size_usd is not None and size_usd >= 0 else math.nan,
        abs((buy - sell).total_seconds()) if buy and sell else math.nan,
        float(end.hour) if end else math.nan,
        float(end.minute) if end else math.nan,
    ]
