"""MongoDB connections and the idempotent bulk upserts every writer of the store shares.

Writers run on Spark executors through one cached ``MongoClient`` per URI and worker process
(:func:`cached_client`); nothing connects at import time, and the indexes are created once
per process and database (:func:`collection`). Queries open a client of their own
(:func:`connect`) and close it. Every ``_id`` is deterministic, so replaying a micro-batch
rewrites the same documents instead of adding any.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from arbstream.store.config import MongoConfig
from arbstream.store.mongo.schema import ensure_indexes
from arbstream.timestamps import to_utc

CHUNK_SIZE = 1000
_DUPLICATE_KEY = 11000
#: Builds the update of one row, given the upsert's wall-clock time (aware UTC).
RowOp = Callable[[Mapping[str, Any], dt.datetime], UpdateOne]

_ensured: set[tuple[str, str, int]] = set()
_clients: dict[str, MongoClient] = {}


def connect(conf: MongoConfig) -> MongoClient:
    """A UTC-aware MongoClient for ``conf.uri`` (use it as a context manager)."""
    return MongoClient(conf.uri.get_secret_value(), tz_aware=True, tzinfo=dt.UTC)


def cached_client(conf: MongoConfig) -> MongoClient:
    """One MongoClient per URI and process (executors' Python workers are reused across
    micro-batches, and a client is a connection pool: do not close it). Thread-safe."""
    uri = conf.uri.get_secret_value()
    client = _clients.get(uri)
    if client is None:
        client = _clients[uri] = connect(conf)
    return client


def ensure_collections(conf: MongoConfig) -> dict[str, list[str]]:
    """Create the stream's indexes with ``conf.ttl_seconds`` on a client of its own
    (idempotent; see :func:`~arbstream.store.mongo.schema.ensure_indexes`).

    Returns:
        collection -> its index names.

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    with connect(conf) as client:
        return ensure_indexes(client[conf.db], ttl_seconds=conf.ttl_seconds)


def collection(conf: MongoConfig, name: str) -> Collection:
    """Collection ``name`` of ``conf.db`` on the cached client, the stream's indexes ensured
    once per process, URI, database and TTL."""
    client = cached_client(conf)
    key = (conf.uri.get_secret_value(), conf.db, conf.ttl_seconds)
    if key not in _ensured:
        ensure_indexes(client[conf.db], ttl_seconds=conf.ttl_seconds)
        _ensured.add(key)
    return client[conf.db][name]


def fields(row: Mapping[str, Any], drop: Iterable[str]) -> dict[str, Any]:
    """Every key of ``row`` but ``drop``, ``_id`` and ``first_seen_at``; datetimes as UTC."""
    skip = {"_id", "first_seen_at", *drop}
    return {
        key: to_utc(value) if isinstance(value, dt.datetime) else value
        for key, value in row.items()
        if key not in skip
    }


def id_of(row: Mapping[str, Any], key: str) -> str:
    """``row[key]``, the document id.

    Raises:
        ValueError: it is missing, not a string or empty.
    """
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"row has no {key}: {dict(row)!r}")
    return value


def replace_op(oid: str, values: dict[str, Any], now: dt.datetime) -> UpdateOne:
    """Upsert of ``_id`` ``oid``: ``$set`` every value, ``first_seen_at`` = ``now`` on insert
    only."""
    return UpdateOne(
        {"_id": oid}, {"$set": values, "$setOnInsert": {"first_seen_at": now}}, upsert=True
    )


def row_op(id_key: str) -> RowOp:
    """The :data:`RowOp` storing a row under ``_id`` = ``row[id_key]`` with every other key
    ``$set`` (:func:`replace_op`); raises ValueError as :func:`id_of`."""

    def op(row: Mapping[str, Any], now: dt.datetime) -> UpdateOne:
        return replace_op(id_of(row, id_key), fields(row, [id_key]), now)

    return op


def _chunks(rows: Iterable[Mapping[str, Any]], op: RowOp, now: dt.datetime
            ) -> Iterator[list[UpdateOne]]:
    ops: list[UpdateOne] = []
    for row in rows:
        ops.append(op(row, now))
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


def upsert(conf: MongoConfig, name: str, rows: Iterable[Mapping[str, Any]], op: RowOp) -> int:
    """Bulk-upsert ``op(row, now)`` of every row into collection ``name``, unordered, in
    chunks of :data:`CHUNK_SIZE` (``rows`` consumed lazily); no connection for empty input.

    Returns:
        Number of documents upserted or matched.

    Raises:
        ValueError: as ``op``.
        pymongo.errors.BulkWriteError: a write error other than a lost upsert race.
        pymongo.errors.PyMongoError: connection or server errors.
    """
    chunks = _chunks(rows, op, dt.datetime.now(dt.UTC))
    first = next(chunks, None)
    if first is None:
        return 0  # empty partition: no connection at all
    coll = collection(conf, name)
    total = _bulk(coll, first)
    for ops in chunks:
        total += _bulk(coll, ops)
    return total


def public(doc: dict[str, Any], id_key: str) -> dict[str, Any]:
    """``doc`` with ``_id`` renamed to ``id_key`` (in place)."""
    doc[id_key] = doc.pop("_id")
    return doc


def match(time_key: str, since: dt.datetime | None, until: dt.datetime | None,
          at_least: Mapping[str, float | None] | None = None, **equal: Any) -> dict[str, Any]:
    """A query filter of the given conditions only (``None`` means no condition).

    Args:
        time_key: the field of the half-open ``[since, until)`` (``$gte``/``$lt``, as UTC;
            naive means UTC).
        at_least: field -> minimum (``$gte``).
        equal: field -> exact value.
    """
    query: dict[str, Any] = {k: v for k, v in equal.items() if v is not None}
    window: dict[str, Any] = {}
    if since is not None:
        window["$gte"] = to_utc(since)
    if until is not None:
        window["$lt"] = to_utc(until)
    if window:
        query[time_key] = window
    query.update({k: {"$gte": v} for k, v in (at_least or {}).items() if v is not None})
    return query
