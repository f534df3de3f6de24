"""MongoDB sink for arbitrage opportunities: idempotent upserts keyed on ``opportunity_id``.

Called on executors from ``foreachBatch`` through ``DataFrame.foreachPartition`` with rows
converted to plain dicts (``row.asDict()``). Every call opens (and closes) its own
``MongoClient``; nothing connects at import time.

Document shape in the ``opportunities`` collection (one per opportunity)::

    _id            str       the row's opportunity_id, e.g.
                             "BTC-USD|2023-03-11T04:00:05.000Z|kraken|coinbase"
    symbol, buy_exchange, sell_exchange                       str
    window_start, window_end, buy_ts, sell_ts                 datetime, UTC (ms precision)
    buy_ask, sell_bid                                         float, quote currency
    buy_fee, sell_fee, gross, net                             float, fractions
    gross_bps, net_bps                                        float, basis points
    first_seen_at  datetime  UTC wall-clock time of the first upsert; never changed after

Replaying a micro-batch rewrites the same values onto the same ``_id`` (``first_seen_at`` kept),
so it never creates duplicates. A unique index on (symbol, window_end, buy_exchange,
sell_exchange) guards against two different ids for the same opportunity.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pymongo import ASCENDING, DESCENDING, MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from arbstream.config import Settings

OPPORTUNITIES = "opportunities"
CHUNK_SIZE = 1000
UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
_DUPLICATE_KEY = 11000

#: name -> (keys, unique). Names are fixed so ``ensure_indexes`` is idempotent.
INDEXES: dict[str, tuple[list[tuple[str, int]], bool]] = {
    "uniq_symbol_window_pair": (
        [
            ("symbol", ASCENDING),
            ("window_end", ASCENDING),
            ("buy_exchange", ASCENDING),
            ("sell_exchange", ASCENDING),
        ],
        True,
    ),
    "window_end_desc": ([("window_end", DESCENDING)], False),
    "symbol_window_end": ([("symbol", ASCENDING), ("window_end", ASCENDING)], False),
    "net_bps_desc": ([("net_bps", DESCENDING)], False),
}

_ensured: set[tuple[str, str]] = set()


def to_utc(value: Any) -> dt.datetime:
    """Normalise a timestamp to an aware UTC datetime.

    Accepts an aware datetime (converted), a naive datetime (taken to be UTC already) or an
    int/float of milliseconds since the epoch.

    Raises:
        TypeError: any other type.
    """
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _EPOCH + dt.timedelta(milliseconds=value)
    raise TypeError(f"expected a datetime or epoch milliseconds, got {type(value).__name__}")


def connect(settings: Settings) -> MongoClient:
    """A UTC-aware MongoClient for ``settings.mongo_uri`` (use it as a context manager)."""
    return MongoClient(settings.mongo_uri.get_secret_value(), tz_aware=True, tzinfo=UTC)


def _collection(client: MongoClient, settings: Settings) -> Collection:
    return client[settings.mongo_db][OPPORTUNITIES]


def ensure_indexes(db: Database) -> list[str]:
    """Create the opportunities indexes if missing; safe to call any number of times.

    Returns:
        The index names, in creation order.

    Raises:
        pymongo.errors.OperationFailure: an index of the same name exists with other keys.
    """
    coll = db[OPPORTUNITIES]
    return [
        coll.create_index(keys, name=name, unique=unique)
        for name, (keys, unique) in INDEXES.items()
    ]


def _document(row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    oid = row.get("opportunity_id")
    if not isinstance(oid, str) or not oid:
        raise ValueError(f"row has no opportunity_id: {dict(row)!r}")
    fields: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("opportunity_id", "_id", "first_seen_at"):
            continue
        fields[key] = to_utc(value) if isinstance(value, dt.datetime) else value
    return oid, fields


def _chunks(rows: Iterable[Mapping[str, Any]], now: dt.datetime) -> Iterator[list[UpdateOne]]:
    ops: list[UpdateOne] = []
    for row in rows:
        oid, fields = _document(row)
        ops.append(
            UpdateOne(
                {"_id": oid},
                {"$set": fields, "$setOnInsert": {"first_seen_at": now}},
                upsert=True,
            )
        )
        if len(ops) >= CHUNK_SIZE:
            yield ops
            ops = []
    if ops:
        yield ops


def _bulk(coll: Collection, ops: list[UpdateOne]) -> int:
    """One unordered bulk write; retries once the ops lost to concurrent-upsert races."""
    try:
        res = coll.bulk_write(ops, ordered=False)
        return res.upserted_count + res.matched_count
    except BulkWriteError as exc:
        details = exc.details
        errors = details.get("writeErrors", [])
        if not errors or any(e.get("code") != _DUPLICATE_KEY for e in errors):
            raise
        # Two writers upserting the same new _id at once: the loser's op now matches.
        done = details.get("nUpserted", 0) + details.get("nMatched", 0)
        retry = [ops[e["index"]] for e in errors]
        res = coll.bulk_write(retry, ordered=False)
        return done + res.upserted_count + res.matched_count


def upsert_opportunities(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Upsert opportunity rows into ``settings.mongo_db``.``opportunities``, idempotently.

    Args:
        settings: ``mongo_uri`` and ``mongo_db`` are used.
        rows: opportunity dicts (see the module docstring); datetimes aware or naive-UTC.
            Every key except ``opportunity_id`` is ``$set``; ``first_seen_at`` is set on
            insert only. Consumed lazily in chunks of :data:`CHUNK_SIZE`.

    Returns:
        Number of documents upserted or matched (== number of rows with distinct ids).

    Raises:
        ValueError: a row without a string ``opportunity_id``.
        pymongo.errors.BulkWriteError: e.g. a different ``opportunity_id`` for an
            opportunity already stored (unique index violation).
        pymongo.errors.PyMongoError: connection or server errors.
    """
    now = dt.datetime.now(UTC)
    chunks = _chunks(rows, now)
    first = next(chunks, None)
    if first is None:
        return 0  # empty partition: no connection at all
    with connect(settings) as client:
        key = (settings.mongo_uri.get_secret_value(), settings.mongo_db)
        if key not in _ensured:
            ensure_indexes(client[settings.mongo_db])
            _ensured.add(key)
        coll = _collection(client, settings)
        total = _bulk(coll, first)
        for ops in chunks:
            total += _bulk(coll, ops)
    return total


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    doc["opportunity_id"] = doc.pop("_id")
    return doc


def _filter(
    symbol: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    min_net_bps: float | None = None,
) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if symbol is not None:
        query["symbol"] = symbol
    window: dict[str, Any] = {}
    if since is not None:
        window["$gte"] = to_utc(since)
    if until is not None:
        window["$lt"] = to_utc(until)
    if window:
        query["window_end"] = window
    if min_net_bps is not None:
        query["net_bps"] = {"$gte": min_net_bps}
    return query


def find_opportunities(
    settings: Settings,
    symbol: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    min_net_bps: float | None = None,
    limit: int | None = None,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """Stored opportunities matching every given filter.

    Args:
        symbol: exact canonical symbol, e.g. ``"BTC-USD"``.
        since, until: half-open ``[since, until)`` on ``window_end``; naive means UTC.
        min_net_bps: keep ``net_bps >= min_net_bps``.
        limit: at most this many (``None`` or 0: all).
        newest_first: sort ``window_end`` descending instead of ascending.

    Returns:
        Documents sorted by ``window_end`` (ascending unless ``newest_first``) then
        ``net_bps`` descending, with ``_id`` renamed to ``opportunity_id`` and datetimes
        aware UTC.
    """
    query = _filter(symbol, since, until, min_net_bps)
    order = DESCENDING if newest_first else ASCENDING
    with connect(settings) as client:
        cursor = _collection(client, settings).find(query)
        cursor = cursor.sort([("window_end", order), ("net_bps", DESCENDING)])
        if limit:
            cursor = cursor.limit(limit)
        return [_public(doc) for doc in cursor]


def summary(
    settings: Settings,
    top_n: int = 10,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> dict[str, Any]:
    """Small overview of stored opportunities with ``window_end`` in ``[since, until)``.

    Returns:
        ``{"total": int, "pairs": [...], "top": [...]}`` where ``pairs`` holds one dict per
        (symbol, buy_exchange, sell_exchange) with ``count``, ``max_net_bps`` and
        ``avg_net_bps``, most frequent first; ``top`` holds the ``top_n`` documents with the
        highest ``net_bps`` (shaped as in :func:`find_opportunities`).
    """
    query = _filter(since=since, until=until)
    pipeline: list[dict[str, Any]] = [
        {"$match": query},
        {
            "$group": {
                "_id": {
                    "symbol": "$symbol",
                    "buy_exchange": "$buy_exchange",
                    "sell_exchange": "$sell_exchange",
                },
                "count": {"$sum": 1},
                "max_net_bps": {"$max": "$net_bps"},
                "avg_net_bps": {"$avg": "$net_bps"},
            }
        },
        {"$sort": {"count": -1, "_id.symbol": 1, "_id.buy_exchange": 1, "_id.sell_exchange": 1}},
    ]
    with connect(settings) as client:
        coll = _collection(client, settings)
        pairs = [{**g.pop("_id"), **g} for g in coll.aggregate(pipeline)]
        top = coll.find(query).sort([("net_bps", DESCENDING), ("window_end", ASCENDING)])
        top_docs = [_public(doc) for doc in top.limit(top_n)] if top_n > 0 else []
    return {"total": sum(p["count"] for p in pairs), "pairs": pairs, "top": top_docs}
