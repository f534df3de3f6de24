"""The ``thresholds`` collection: hourly spread percentiles of each pair, from the stream.

One document per pair and hour, ``_id`` = ``threshold_id``; ``symbol, sell_symbol,
buy_exchange, sell_exchange``, ``hour_start`` (UTC), ``count``, ``mean_bps``, ``p50_bps``,
``p75_bps``, ``p95_bps``, ``max_bps`` and the ``aggressive_bps`` / ``moderate_bps`` /
``conservative_bps`` thresholds (p50 / p75 / p95, bps), and ``first_seen_at``. Kept (no TTL).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from arbstream.store.config import MongoConfig
from arbstream.store.mongo import client as C
from arbstream.store.mongo.schema import THRESHOLDS


def upsert_thresholds(conf: MongoConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Upsert hourly spread-percentile rows into ``thresholds``, ``_id`` = ``threshold_id``;
    every other key is stored as given (``hour_start`` UTC, ``*_bps`` in bps, ``count``).

    Returns:
        Number of documents upserted or matched.

    Raises:
        ValueError: a row without a string ``threshold_id``.
        pymongo.errors.PyMongoError: connection or server errors.
    """
    return C.upsert(conf, THRESHOLDS, rows, C.row_op("threshold_id"))
