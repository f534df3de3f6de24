"""MongoDB sink: idempotent upserts of opportunities, episodes, features and thresholds.

Called on executors from the stream's ``foreachBatch`` writer (:mod:`spark_jobs.sinks.records`)
with rows as plain dicts, through one cached ``MongoClient`` per worker process
(:func:`cached_client`); nothing connects at import time. Datetimes are
stored as UTC (naive input means UTC already); every ``_id`` is deterministic, so replaying a
micro-batch rewrites the same documents instead of adding any.

Collections (fractions are fractions, ``*_bps`` basis points, prices in the quote currency of
their leg, sizes in base units, durations seconds):

``opportunities``  one per opportunity (one snapshot of a pair's legs over consecutive
    windows), ``_id`` = the row's ``opportunity_id`` (named by its first window), e.g.
    "BTC-USD|2023-03-11T04:00:05.000Z|kraken|coinbase"; every other key of the row as given
    (``symbol, sell_symbol, cross_quote, buy_exchange, sell_exchange, window_start,
    window_end, valid_from, valid_to, windows, buy_ask, sell_bid, buy_fee, sell_fee, gross,
    net, gross_bps, net_bps, stage, ...``).
``episodes``  one per episode, ``_id`` = ``episode_id``; ``status`` "open" or "closed",
    ``symbol, sell_symbol, cross_quote, buy_exchange, sell_exchange, start, end, duration_s,
    windows, peak_net_bps, mean_net_bps, size_base, size_source, expected_profit,
    profit_currency, expected_profit_usd``. An "opened" event only inserts; a "closed" event
    overwrites, so a replayed "opened" never turns a closed episode back to open.
``features``  ``kind`` "exchange" (``_id`` = "exchange|" + ``feature_id``; ``symbol,
    exchange, window_end`` and the per-exchange features) or "pair" (``_id`` = "pair|" +
    ``opportunity_id``; ``symbol, sell_symbol, cross_quote, buy_exchange, sell_exchange,
    window_end, net_bps, gross_bps, spread_mean_bps, spread_std_bps, spread_z, anomaly``).
``thresholds``  one per pair and hour, ``_id`` = ``threshold_id``; ``hour_start``,
    ``count``, ``mean_bps``, ``p50_bps``, ``p75_bps``, ``p95_bps``, ``max_bps`` and the
    ``aggressive_bps`` / ``moderate_bps`` / ``conservative_bps`` thresholds (p50 / p75 / p95).

Every document also gets ``first_seen_at``, the UTC wall-clock time of its first upsert, never
changed afterwards. Retention: a TTL index on ``first_seen_at`` expires ``opportunities`` and
``features`` documents ``settings.mongo_ttl_days`` after they were first written (wall clock,
so replaying old market data does not expire at once); ``episodes`` and ``thresholds`` are
kept. :data:`INDEXES` lists every other index, one for each query this module makes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from pymongo import ASCENDING, DESCENDING, MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from arbstream.config import Settings

OPPORTUNITIES = "opportunities"
EPISODES = "episodes"
FEATURES = "features"
THRESHOLDS = "thresholds"
CHUNK_SIZE = 1000
UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
_DUPLICATE_KEY = 11000

IndexKeys = list[tuple[str, int]]

#: collection -> index name -> (keys, unique). Names are fixed so ``ensure_indexes`` is
#: idempotent. Each serves a query of this module (or of a dashboard, noted).
INDEXES: dict[str, dict[str, tuple[IndexKeys, bool]]] = {
    OPPORTUNITIES: {
        # one opportunity per pair (both legs' symbols) and first window
        "uniq_pair_window": (
            [("symbol", ASCENDING), ("sell_symbol", ASCENDING), ("window_end", ASCENDING),
             ("buy_exchange", ASCENDING), ("sell_exchange", ASCENDING)],
            True,
        ),
        # find_opportunities' order (window_end, then net bps largest first); time ranges
        "window_end_net_bps": ([("window_end", ASCENDING), ("net_bps", DESCENDING)], False),
        "symbol_window_end": ([("symbol", ASCENDING), ("window_end", ASCENDING)], False),
        "net_bps_desc": ([("net_bps", DESCENDING)], False),  # summary top, --min-net-bps
        "cross_quote_window_end": (  # count_cross_quote
            [("cross_quote", ASCENDING), ("window_end", ASCENDING)], False,
        ),
    },
    EPISODES: {
        "symbol_start": ([("symbol", ASCENDING), ("start", ASCENDING)], False),
        "status_start": ([("status", ASCENDING), ("start", ASCENDING)], False),
        "cross_quote_start": ([("cross_quote", ASCENDING), ("start", ASCENDING)], False),
        # one per find_episodes sort order, so an unfiltered listing walks an index
        "start_id": ([("start", ASCENDING), ("_id", ASCENDING)], False),
        "peak_net_bps_desc": (
            [("peak_net_bps", DESCENDING), ("start", ASCENDING), ("_id", ASCENDING)], False,
        ),
        "duration_s_desc": (
            [("duration_s", DESCENDING), ("start", ASCENDING), ("_id", ASCENDING)], False,
        ),
        "expected_profit_usd_desc": (
            [("expected_profit_usd", DESCENDING), ("start", ASCENDING), ("_id", ASCENDING)],
            False,
        ),
    },
    FEATURES: {
        "symbol_exchange_window_end": (  # one exchange's features over time
            [("symbol", ASCENDING), ("exchange", ASCENDING), ("window_end", ASCENDING)], False,
        ),
        "kind_window_end": ([("kind", ASCENDING), ("window_end", ASCENDING)], False),
        "pair_window_end": (  # one pair's spread statistics over time
            [("symbol", ASCENDING), ("sell_symbol", ASCENDING), ("buy_exchange", ASCENDING),
             ("sell_exchange", ASCENDING), ("window_end", ASCENDING)],
            False,
        ),
    },
    THRESHOLDS: {
        "pair_hour_start": (
            [("symbol", ASCENDING), ("buy_exchange", ASCENDING), ("sell_exchange", ASCENDING),
             ("hour_start", ASCENDING)],
            False,
        ),
        "hour_start": ([("hour_start", ASCENDING)], False),
    },
}
#: Single-field TTL index on ``first_seen_at`` in these collections only.
TTL_INDEX = "ttl_first_seen_at"
TTL_COLLECTIONS = (OPPORTUNITIES, FEATURES)
#: ``expireAfterSeconds`` when none is given: ``Settings().mongo_ttl_days`` in seconds.
DEFAULT_TTL_SECONDS = round(Settings.model_fields["mongo_ttl_days"].default * 86_400)
#: Indexes of earlier versions, dropped by ``ensure_indexes``.
OBSOLETE_INDEXES: dict[str, tuple[str, ...]] = {
    OPPORTUNITIES: ("uniq_symbol_window_pair", "window_end_desc"),
}
#: find_episodes sort name -> sort keys (ties broken by start, then id).
EPISODE_SORTS: dict[str, IndexKeys] = {
    "peak_net_bps": INDEXES[EPISODES]["peak_net_bps_desc"][0],
    "duration_s": INDEXES[EPISODES]["duration_s_desc"][0],
    "expected_profit_usd": INDEXES[EPISODES]["expected_profit_usd_desc"][0],
    "start": INDEXES[EPISODES]["start_id"][0],
}

_ensured: set[tuple[str, str, int]] = set()


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


def ttl_seconds(settings: Settings) -> int:
    """``settings.mongo_ttl_days`` as whole seconds (at least 1), for :func:`ensure_indexes`."""
    return max(1, round(settings.mongo_ttl_days * 86_400))


def ensure_indexes(db: Database, *, ttl_seconds: int | None = None) -> dict[str, list[str]]:
    """Create every index of :data:`INDEXES` and the TTL indexes; safe to call any number of
    times.

    Args:
        db: the database (``client[settings.mongo_db]``).
        ttl_seconds: ``expireAfterSeconds`` of the ``first_seen_at`` TTL index of
            :data:`TTL_COLLECTIONS` (default :data:`DEFAULT_TTL_SECONDS`; pass
            :func:`ttl_seconds` of the settings). An existing TTL index with another value is
            changed in place (``collMod``), not rebuilt.

    Indexes named in :data:`OBSOLETE_INDEXES` are dropped.

    Returns:
        collection -> its index names, in creation order (TTL last).

    Raises:
        pymongo.errors.OperationFailure: an index of the same name exists with other keys.
    """
    ttl = DEFAULT_TTL_SECONDS if ttl_seconds is None else int(ttl_seconds)
    created: dict[str, list[str]] = {}
    for name, specs in INDEXES.items():
        coll = db[name]
        info = coll.index_information()
        for old in OBSOLETE_INDEXES.get(name, ()):
            if old in info:
                coll.drop_index(old)
        created[name] = [
            coll.create_index(keys, name=index, unique=unique)
            for index, (keys, unique) in specs.items()
        ]
        if name not in TTL_COLLECTIONS:
            continue
        current = info.get(TTL_INDEX)
        if current is None:
            coll.create_index([("first_seen_at", ASCENDING)], name=TTL_INDEX,
                              expireAfterSeconds=ttl)
        elif current.get("expireAfterSeconds") != ttl:
            db.command("collMod", name, index={"name": TTL_INDEX, "expireAfterSeconds": ttl})
        created[name].append(TTL_INDEX)
    return created


def _fields(row: Mapping[str, Any], drop: Iterable[str]) -> dict[str, Any]:
    """Every key of ``row`` but ``drop``, ``_id`` and ``first_seen_at``; datetimes as UTC."""
    skip = {"_id", "first_seen_at", *drop}
    return {
        key: to_utc(value) if isinstance(value, dt.datetime) else value
        for key, value in row.items()
        if key not in skip
    }


def _id_of(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"row has no {key}: {dict(row)!r}")
    return value


def _replace_op(oid: str, fields: dict[str, Any], now: dt.datetime) -> UpdateOne:
    """``$set`` every field, ``first_seen_at`` on insert only."""
    return UpdateOne(
        {"_id": oid}, {"$set": fields, "$setOnInsert": {"first_seen_at": now}}, upsert=True
    )


def _chunks(
    rows: Iterable[Mapping[str, Any]],
    op: Callable[[Mapping[str, Any], dt.datetime], UpdateOne],
    now: dt.datetime,
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


def _upsert(
    settings: Settings,
    collection: str,
    rows: Iterable[Mapping[str, Any]],
    op: Callable[[Mapping[str, Any], dt.datetime], UpdateOne],
) -> int:
    """Bulk-upsert ``op(row, now)`` of every row into ``collection`` in chunks of
    :data:`CHUNK_SIZE`, creating the indexes once per process and database; no connection
    for empty input."""
    chunks = _chunks(rows, op, dt.datetime.now(UTC))
    first = next(chunks, None)
    if first is None:
        return 0  # empty partition: no connection at all
    coll = _collection(settings, collection)
    total = _bulk(coll, first)
    for ops in chunks:
        total += _bulk(coll, ops)
    return total


_clients: dict[str, MongoClient] = {}


def cached_client(settings: Settings) -> MongoClient:
    """One MongoClient per URI and process (executors' Python workers are reused across
    micro-batches, and a client is a connection pool: do not close it). Thread-safe."""
    uri = settings.mongo_uri.get_secret_value()
    client = _clients.get(uri)
    if client is None:
        client = _clients[uri] = connect(settings)
    return client


def _collection(settings: Settings, collection: str) -> Collection:
    """``collection`` of ``settings.mongo_db`` on the cached client, indexes ensured once per
    process and database."""
    client = cached_client(settings)
    ttl = ttl_seconds(settings)
    key = (settings.mongo_uri.get_secret_value(), settings.mongo_db, ttl)
    if key not in _ensured:
        ensure_indexes(client[settings.mongo_db], ttl_seconds=ttl)
        _ensured.add(key)
    return client[settings.mongo_db][collection]


def delete_opportunities(settings: Settings, ids: Iterable[str]) -> int:
    """Delete retracted opportunities (and their pair feature documents) by id.

    Returns:
        Number of opportunity documents deleted (0 when none was stored).

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    ids = list(ids)
    if not ids:
        return 0
    deleted = _collection(settings, OPPORTUNITIES).delete_many({"_id": {"$in": ids}})
    _collection(settings, FEATURES).delete_many({"_id": {"$in": ids}})
    return deleted.deleted_count


def _opportunity_op(row: Mapping[str, Any], now: dt.datetime) -> UpdateOne:
    return _replace_op(_id_of(row, "opportunity_id"), _fields(row, ["opportunity_id"]), now)


def upsert_opportunities(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Upsert opportunity rows into ``settings.mongo_db``.``opportunities``, idempotently.

    Args:
        settings: ``mongo_uri``, ``mongo_db`` and ``mongo_ttl_days`` are used.
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
    return _upsert(settings, OPPORTUNITIES, rows, _opportunity_op)


#: Keys of a spread row copied into its ``features`` document of kind "pair".
PAIR_FEATURE_KEYS = (
    "symbol", "sell_symbol", "cross_quote", "buy_exchange", "sell_exchange", "window_end",
    "net_bps", "gross_bps", "spread_mean_bps", "spread_std_bps", "spread_z", "anomaly",
)


def _pair_feature_op(row: Mapping[str, Any], now: dt.datetime) -> UpdateOne:
    oid = _id_of(row, "opportunity_id")
    fields = _fields({key: row.get(key) for key in PAIR_FEATURE_KEYS}, ())
    fields["sell_symbol"] = fields["sell_symbol"] or fields["symbol"]
    fields["cross_quote"] = bool(fields["cross_quote"])
    return _replace_op("pair|" + oid, {"kind": "pair", **fields}, now)


def upsert_pair_features(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
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
    return _upsert(settings, FEATURES, rows, _pair_feature_op)


def _exchange_feature_op(row: Mapping[str, Any], now: dt.datetime) -> UpdateOne:
    oid = _id_of(row, "feature_id")
    return _replace_op("exchange|" + oid, {"kind": "exchange", **_fields(row, ["feature_id"])},
                       now)


def upsert_features(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
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
    return _upsert(settings, FEATURES, rows, _exchange_feature_op)


def _threshold_op(row: Mapping[str, Any], now: dt.datetime) -> UpdateOne:
    return _replace_op(_id_of(row, "threshold_id"), _fields(row, ["threshold_id"]), now)


def upsert_thresholds(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Upsert hourly spread-percentile rows into ``thresholds``, ``_id`` = ``threshold_id``;
    every other key is stored as given (``hour_start`` UTC, ``*_bps`` in bps, ``count``).

    Returns:
        Number of documents upserted or matched.

    Raises:
        ValueError: a row without a string ``threshold_id``.
        pymongo.errors.PyMongoError: connection or server errors.
    """
    return _upsert(settings, THRESHOLDS, rows, _threshold_op)


def _episode_op(row: Mapping[str, Any], now: dt.datetime) -> UpdateOne:
    oid = _id_of(row, "episode_id")
    event = row.get("event")
    fields = _fields(row, ["episode_id", "event"])
    if event == "opened":
        fields["status"] = "open"
        return UpdateOne({"_id": oid}, {"$setOnInsert": {**fields, "first_seen_at": now}},
                         upsert=True)
    if event == "closed":
        fields["status"] = "closed"
        return _replace_op(oid, fields, now)
    raise ValueError(f"episode event must be 'opened' or 'closed', got {event!r}")


def upsert_episodes(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Apply episode events to ``episodes`` (``_id`` = ``episode_id``), idempotently and
    replay-safe.

    An "opened" row inserts the episode (status "open", every field, ``first_seen_at``) only
    when it is absent; a "closed" row ``$set``s every field with status "closed". So the
    events commute: a replayed "opened" after its "closed" changes nothing, and re-applying
    any batch yields identical documents. ``event`` itself is not stored.

    Returns:
        Number of events applied (upserted or matched).

    Raises:
        ValueError: a row without a string ``episode_id``, or an ``event`` other than
            "opened"/"closed".
        pymongo.errors.PyMongoError: connection or server errors.
    """
    return _upsert(settings, EPISODES, rows, _episode_op)


def _public(doc: dict[str, Any], id_key: str = "opportunity_id") -> dict[str, Any]:
    doc[id_key] = doc.pop("_id")
    return doc


def _time_range(since: dt.datetime | None, until: dt.datetime | None) -> dict[str, Any]:
    """``{"$gte": since, "$lt": until}`` (the given bounds only, as UTC)."""
    window: dict[str, Any] = {}
    if since is not None:
        window["$gte"] = to_utc(since)
    if until is not None:
        window["$lt"] = to_utc(until)
    return window


def _filter(
    symbol: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    min_net_bps: float | None = None,
) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if symbol is not None:
        query["symbol"] = symbol
    window = _time_range(since, until)
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
        cursor = client[settings.mongo_db][OPPORTUNITIES].find(query)
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
        (symbol, sell_symbol, buy_exchange, sell_exchange) with ``count``, ``max_net_bps`` and
        ``avg_net_bps`` (bps), most frequent first (``sell_symbol`` is ``symbol`` for
        documents without one); ``top`` holds the ``top_n`` documents with the
        highest ``net_bps`` (shaped as in :func:`find_opportunities`).
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
    with connect(settings) as client:
        coll = client[settings.mongo_db][OPPORTUNITIES]
        pairs = [{**g.pop("_id"), **g} for g in coll.aggregate(pipeline)]
        top = coll.find(query).sort([("net_bps", DESCENDING), ("window_end", ASCENDING)])
        top_docs = [_public(doc) for doc in top.limit(top_n)] if top_n > 0 else []
    return {"total": sum(p["count"] for p in pairs), "pairs": pairs, "top": top_docs}


def _episode_filter(
    symbol: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    status: str | None = None,
    cross_quote: bool | None = None,
    min_peak_bps: float | None = None,
) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if symbol is not None:
        query["symbol"] = symbol
    window = _time_range(since, until)
    if window:
        query["start"] = window
    if status is not None:
        if status not in ("open", "closed"):
            raise ValueError(f"status must be 'open' or 'closed', got {status!r}")
        query["status"] = status
    if cross_quote is not None:
        query["cross_quote"] = cross_quote
    if min_peak_bps is not None:
        query["peak_net_bps"] = {"$gte": min_peak_bps}
    return query


def find_episodes(
    settings: Settings,
    symbol: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    status: str | None = None,
    cross_quote: bool | None = None,
    sort: str = "peak_net_bps",
    limit: int | None = 20,
    min_peak_bps: float | None = None,
) -> list[dict[str, Any]]:
    """Stored episodes matching every given filter.

    Args:
        symbol: exact symbol of the buy leg (``symbol`` as stored), e.g. ``"BTC-USDC"``.
        since, until: half-open ``[since, until)`` on ``start``; naive means UTC.
        status: ``"open"`` or ``"closed"``.
        cross_quote: only cross-quote (true) or same-quote (false) episodes.
        sort: a key of :data:`EPISODE_SORTS`: ``"peak_net_bps"``, ``"duration_s"``,
            ``"expected_profit_usd"`` (each largest first; ``None`` profits last) or
            ``"start"`` (earliest first); ties by ``start``, then id.
        limit: at most this many (``None`` or 0: all).
        min_peak_bps: keep ``peak_net_bps >= min_peak_bps`` (bps).

    Returns:
        Documents with ``_id`` renamed to ``episode_id`` and datetimes aware UTC.

    Raises:
        ValueError: an unknown ``sort`` or ``status``.
        pymongo.errors.PyMongoError: connection or server errors.
    """
    if sort not in EPISODE_SORTS:
        raise ValueError(f"sort must be one of {sorted(EPISODE_SORTS)}, got {sort!r}")
    query = _episode_filter(symbol, since, until, status, cross_quote, min_peak_bps)
    with connect(settings) as client:
        cursor = client[settings.mongo_db][EPISODES].find(query).sort(EPISODE_SORTS[sort])
        if limit:
            cursor = cursor.limit(limit)
        return [_public(doc, "episode_id") for doc in cursor]


def count_cross_quote(
    settings: Settings, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> dict[str, int]:
    """How many cross-quote opportunities (``window_end``) and episodes (``start``) fall in
    ``[since, until)`` (naive means UTC).

    Returns:
        ``{"opportunities": int, "episodes": int}``.

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    with connect(settings) as client:
        db = client[settings.mongo_db]
        opportunities = db[OPPORTUNITIES].count_documents(
            {"cross_quote": True, **_filter(since=since, until=until)}
        )
        episodes = db[EPISODES].count_documents(
            _episode_filter(since=since, until=until, cross_quote=True)
        )
    return {"opportunities": opportunities, "episodes": episodes}
