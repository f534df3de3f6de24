"""The ``opportunities`` collection: written by the stream job, read by the CLI and the alert
worker.

One document per opportunity (one snapshot of a pair's legs over consecutive windows),
``_id`` = the row's ``opportunity_id`` (named by its first window), e.g.
"BTC-USD|2023-03-11T04:00:05.000Z|kraken|coinbase"; every other key of the row as given
(``symbol, sell_symbol, cross_quote, buy_exchange, sell_exchange, window_start, window_end,
valid_from, valid_to, windows, buy_ask, sell_bid, buy_fee, sell_fee, gross, net, gross_bps,
net_bps, stage, episode_id, ...``: fractions are fractions, ``*_bps`` basis points, prices in
the quote currency of their leg, datetimes UTC) and ``first_seen_at`` (UTC wall clock of the
first upsert). Expired by the TTL index (:mod:`~arbstream.store.mongo.schema`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from pymongo import ASCENDING, DESCENDING, MongoClient
from pymongo.database import Database

from arbstream.store.config import MongoConfig
from arbstream.store.mongo import client as C
from arbstream.store.mongo.schema import FEATURES, OPPORTUNITIES
from arbstream.timestamps import to_utc


def upsert_opportunities(conf: MongoConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Upsert opportunity rows into ``conf.db``.``opportunities``, idempotently.

    Args:
        conf: the database; its indexes are created with ``conf.ttl_seconds`` once per
            process.
        rows: opportunity dicts (see the module docstring); datetimes aware or naive-UTC.
            Every key except ``opportunity_id`` is ``$set``; ``first_seen_at`` is set on
            insert only. Consumed lazily in chunks of
            :data:`~arbstream.store.mongo.client.CHUNK_SIZE`.

    Returns:
        Number of documents upserted or matched (== number of rows with distinct ids).

    Raises:
        ValueError: a row without a string ``opportunity_id``.
        pymongo.errors.BulkWriteError: e.g. a different ``opportunity_id`` for an
            opportunity already stored (unique index violation).
        pymongo.errors.PyMongoError: connection or server errors.
    """
    return C.upsert(conf, OPPORTUNITIES, rows, C.row_op("opportunity_id"))


def delete_opportunities(conf: MongoConfig, ids: Iterable[str]) -> int:
    """Delete retracted opportunities and their pair feature documents (``_id`` = "pair|" +
    id, :mod:`arbstream.store.mongo.features`) by id.

    Returns:
        Number of opportunity documents deleted (0 when none was stored).

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    ids = list(ids)
    if not ids:
        return 0
    deleted = C.collection(conf, OPPORTUNITIES).delete_many({"_id": {"$in": ids}})
    C.collection(conf, FEATURES).delete_many({"_id": {"$in": [f"pair|{i}" for i in ids]}})
    return deleted.deleted_count


def _filter(
    symbol: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    min_net_bps: float | None = None,
) -> dict[str, Any]:
    return C.match("window_end", since, until, {"net_bps": min_net_bps}, symbol=symbol)


def find_opportunities(
    conf: MongoConfig,
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

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    query = _filter(symbol, since, until, min_net_bps)
    order = DESCENDING if newest_first else ASCENDING
    with C.connect(conf) as client:
        cursor = client[conf.db][OPPORTUNITIES].find(query)
        cursor = cursor.sort([("window_end", order), ("net_bps", DESCENDING)])
        if limit:
            cursor = cursor.limit(limit)
        return [C.public(doc, "opportunity_id") for doc in cursor]


def summary(
    conf: MongoConfig,
    top_n: int = 10,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> dict[str, Any]:
    """Small overview of stored opportunities with ``window_end`` in ``[since, until)``.

    Returns:
        ``{"total": int, "pairs": [...], "top": [...]}`` where ``pairs`` holds one dict per
        (symbol, sell_symbol, buy_exchange, sell_exchange) with ``count``, ``max_net_bps`` and
        ``avg_net_bps`` (bps), most frequent first (``sell_symbol`` is ``symbol`` for
        documents without one); ``top`` holds the ``top_n`` documents with the
        highest ``net_bps`` (shaped as in :func:`find_opportunities`).

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    query = _filter(since=since, until=until)
    pipeline: list[dict[str, Any]] = [
        {"$match": query},
        {
            "$group": {
                "_id": {
                    "symbol": "$symbol",
                    "sell_symbol": {"$ifNull": ["$sell_symbol", "$symbol"]},
                    "buy_exchange": "$buy_exchange",
                    "sell_exchange": "$sell_exchange",
                },
                "count": {"$sum": 1},
                "max_net_bps": {"$max": "$net_bps"},
                "avg_net_bps": {"$avg": "$net_bps"},
            }
        },
        {"$sort": {"count": -1, "_id.symbol": 1, "_id.sell_symbol": 1, "_id.buy_exchange": 1,
                   "_id.sell_exchange": 1}},
    ]
    with C.connect(conf) as client:
        coll = client[conf.db][OPPORTUNITIES]
        pairs = [{**g.pop("_id"), **g} for g in coll.aggregate(pipeline)]
        top = coll.find(query).sort([("net_bps", DESCENDING), ("window_end", ASCENDING)])
        top_docs = ([C.public(doc, "opportunity_id") for doc in top.limit(top_n)]
                    if top_n > 0 else [])
    return {"total": sum(p["count"] for p in pairs), "pairs": pairs, "top": top_docs}


def count_cross_quote_opportunities(
    db: Database, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> int:
    """How many cross-quote opportunities of ``db`` have ``window_end`` in ``[since, until)``
    (naive means UTC).

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    return db[OPPORTUNITIES].count_documents(
        {"cross_quote": True, **_filter(since=since, until=until)})


def latest_window(db: Database, episode_id: str) -> dict[str, Any] | None:
    """The latest stored opportunity window of an episode (the stream writes it before its
    events), on the caller's database handle (the alert worker keeps one client).

    Returns:
        The document with ``_id`` renamed to ``opportunity_id``, without ``first_seen_at``
        and ``None`` values; ``None`` when the episode has no stored window.

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    doc = db[OPPORTUNITIES].find_one({"episode_id": episode_id},
                                     sort=[("window_end", DESCENDING)])
    if doc is None:
        return None
    found = {k: v for k, v in doc.items() if k != "first_seen_at" and v is not None}
    return C.public(found, "opportunity_id")


def first_seen_since(conf: MongoConfig, since: dt.datetime,
                     keys: Iterable[str]) -> list[dict[str, Any]]:
    """Opportunities first written (``first_seen_at``, UTC wall clock) at or after ``since``
    (naive means UTC), e.g. to measure the stream's write latency.

    Args:
        keys: the fields to return besides ``_id`` and ``first_seen_at``.

    Returns:
        Documents with ``_id`` (the opportunity id), ``first_seen_at`` (aware UTC) and
        ``keys`` (those stored), in no particular order.

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    projection = dict.fromkeys(["_id", "first_seen_at", *keys], 1)
    with C.connect(conf) as client:
        return list(client[conf.db][OPPORTUNITIES].find(
            {"first_seen_at": {"$gte": to_utc(since)}}, projection))


def latest_opportunity(conf: MongoConfig, timeout: float = 2.0) -> dict[str, Any] | None:
    """The newest stored opportunity: the latest ``window_end``, and of those the highest
    ``net_bps`` (the first of :func:`find_opportunities` with ``newest_first``), for a status
    display that must not hang on a server that is down.

    Args:
        timeout: seconds to find and connect to the server (``serverSelectionTimeoutMS``,
            ``connectTimeoutMS``) and for the query (``socketTimeoutMS``).

    Returns:
        The document shaped as in :func:`find_opportunities`, or ``None`` when there is none.

    Raises:
        pymongo.errors.PyMongoError: e.g. ``ServerSelectionTimeoutError`` when the server is
            not reachable within ``timeout``.
    """
    ms = max(1, int(timeout * 1000))
    with MongoClient(conf.uri.get_secret_value(), tz_aware=True, tzinfo=dt.UTC,
                     serverSelectionTimeoutMS=ms, connectTimeoutMS=ms,
                     socketTimeoutMS=ms) as client:
        doc = client[conf.db][OPPORTUNITIES].find_one(
            {}, sort=[("window_end", DESCENDING), ("net_bps", DESCENDING)])
    return None if doc is None else C.public(doc, "opportunity_id")
