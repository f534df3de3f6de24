"""The ``features`` collection: per-exchange and per-pair features of the stream.

Documents of ``kind`` "exchange" (``_id`` = "exchange|" + ``feature_id``; ``symbol,
exchange, window_end`` and the per-exchange features) or "pair" (``_id`` = "pair|" +
``opportunity_id``; :data:`PAIR_FEATURE_KEYS`), each with ``first_seen_at``. Expired by the
TTL index (:mod:`~arbstream.store.mongo.schema`). (The stream job writes its features to
InfluxDB only, see :mod:`spark_jobs.sinks.records`.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from pymongo import UpdateOne

from arbstream.store.config import MongoConfig
from arbstream.store.mongo import client as C
from arbstream.store.mongo.schema import FEATURES

#: Keys of a spread row copied into its ``features`` document of kind "pair".
PAIR_FEATURE_KEYS = (
    "symbol", "sell_symbol", "cross_quote", "buy_exchange", "sell_exchange", "window_end",
    "net_bps", "gross_bps", "spread_mean_bps", "spread_std_bps", "spread_z", "anomaly",
)


def _pair_feature_op(row: Mapping[str, Any], now: dt.datetime) -> UpdateOne:
    oid = C.id_of(row, "opportunity_id")
    values = C.fields({key: row.get(key) for key in PAIR_FEATURE_KEYS}, ())
    values["sell_symbol"] = values["sell_symbol"] or values["symbol"]
    values["cross_quote"] = bool(values["cross_quote"])
    return C.replace_op("pair|" + oid, {"kind": "pair", **values}, now)


def upsert_pair_features(conf: MongoConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Upsert one ``features`` document of kind "pair" per spread row (every pair, every
    window), ``_id`` = "pair|" + ``opportunity_id``.

    Only :data:`PAIR_FEATURE_KEYS` are stored (missing ones as ``None``; ``sell_symbol``
    defaults to ``symbol``, ``cross_quote`` to false): ``net_bps``, ``gross_bps``,
    ``spread_mean_bps``, ``spread_std_bps`` in bps, ``spread_z`` in standard deviations over
    the stats horizon, ``anomaly`` bool, ``window_end`` UTC.

    Returns:
        Number of documents upserted or matched.

    Raises:
        ValueError: a row without a string ``opportunity_id``.
        pymongo.errors.PyMongoError: connection or server errors.
    """
    return C.upsert(conf, FEATURES, rows, _pair_feature_op)


def _exchange_feature_op(row: Mapping[str, Any], now: dt.datetime) -> UpdateOne:
    oid = C.id_of(row, "feature_id")
    return C.replace_op("exchange|" + oid,
                        {"kind": "exchange", **C.fields(row, ["feature_id"])}, now)


def upsert_features(conf: MongoConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Upsert per-exchange feature rows as ``features`` documents of kind "exchange",
    ``_id`` = "exchange|" + ``feature_id`` ("symbol|exchange|window_end ISO").

    Every key but ``feature_id`` is stored as given: ``symbol, exchange, window_end`` (UTC),
    ``mid`` (quote currency), ``log_return``, ``volatility``, ``quote_spread_bps`` (bps),
    ``imbalance``, ``latency_ms`` (ms), ``message_rate`` (per second), ``volume``,
    ``volume_z``, ``quote_age_s`` (seconds), ``volume_spike`` (bool).

    Returns:
        Number of documents upserted or matched.

    Raises:
        ValueError: a row without a string ``feature_id``.
        pymongo.errors.PyMongoError: connection or server errors.
    """
    return C.upsert(conf, FEATURES, rows, _exchange_feature_op)
