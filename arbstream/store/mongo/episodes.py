"""The ``episodes`` collection: written by the stream job, read by the CLI.

One document per episode (a run of consecutive opportunities of one pair), ``_id`` =
``episode_id``; ``status`` "open" or "closed", ``symbol, sell_symbol, cross_quote,
buy_exchange, sell_exchange, start, end`` (UTC), ``duration_s`` (seconds), ``windows``,
``peak_net_bps, mean_net_bps`` (bps), ``size_base`` (base units), ``size_source``,
``expected_profit`` (in ``profit_currency``), ``expected_profit_usd`` (USD) and
``first_seen_at``. An "opened" event only inserts; a "closed" event overwrites, so a
replayed "opened" never turns a closed episode back to open. Kept (no TTL).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from pymongo import UpdateOne

from arbstream.store.config import MongoConfig
from arbstream.store.mongo import client as C
from arbstream.store.mongo.opportunities import count_cross_quote_opportunities
from arbstream.store.mongo.schema import EPISODES, INDEXES, IndexKeys

#: find_episodes sort name -> sort keys (ties broken by start, then id), each an index.
EPISODE_SORTS: dict[str, IndexKeys] = {
    "peak_net_bps": INDEXES[EPISODES]["peak_net_bps_desc"][0],
    "duration_s": INDEXES[EPISODES]["duration_s_desc"][0],
    "expected_profit_usd": INDEXES[EPISODES]["expected_profit_usd_desc"][0],
    "start": INDEXES[EPISODES]["start_id"][0],
}


def _episode_op(row: Mapping[str, Any], now: dt.datetime) -> UpdateOne:
    oid = C.id_of(row, "episode_id")
    event = row.get("event")
    values = C.fields(row, ["episode_id", "event"])
    if event == "opened":
        values["status"] = "open"
        return UpdateOne({"_id": oid}, {"$setOnInsert": {**values, "first_seen_at": now}},
                         upsert=True)
    if event == "closed":
        values["status"] = "closed"
        return C.replace_op(oid, values, now)
    raise ValueError(f"episode event must be 'opened' or 'closed', got {event!r}")


def upsert_episodes(conf: MongoConfig, rows: Iterable[Mapping[str, Any]]) -> int:
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
    return C.upsert(conf, EPISODES, rows, _episode_op)


def _episode_filter(
    symbol: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    status: str | None = None,
    cross_quote: bool | None = None,
    min_peak_bps: float | None = None,
) -> dict[str, Any]:
    if status not in (None, "open", "closed"):
        raise ValueError(f"status must be 'open' or 'closed', got {status!r}")
    return C.match("start", since, until, {"peak_net_bps": min_peak_bps}, symbol=symbol,
                   status=status, cross_quote=cross_quote)


def find_episodes(
    conf: MongoConfig,
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
    with C.connect(conf) as client:
        cursor = client[conf.db][EPISODES].find(query).sort(EPISODE_SORTS[sort])
        if limit:
            cursor = cursor.limit(limit)
        return [C.public(doc, "episode_id") for doc in cursor]


def count_cross_quote(
    conf: MongoConfig, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> dict[str, int]:
    """How many cross-quote opportunities (``window_end``) and episodes (``start``) fall in
    ``[since, until)`` (naive means UTC).

    Returns:
        ``{"opportunities": int, "episodes": int}``.

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    with C.connect(conf) as client:
        db = client[conf.db]
        opportunities = count_cross_quote_opportunities(db, since, until)
        episodes = db[EPISODES].count_documents(
            _episode_filter(since=since, until=until, cross_quote=True)
        )
    return {"opportunities": opportunities, "episodes": episodes}
