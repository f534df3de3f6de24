"""The layout of every MongoDB collection: names, indexes and retention, defined once.

Collections (documents described by their owner module):

``opportunities``  :mod:`~arbstream.store.mongo.opportunities`; TTL.
``episodes``  :mod:`~arbstream.store.mongo.episodes`; kept.
``features``  :mod:`~arbstream.store.mongo.features`; TTL.
``thresholds``  :mod:`~arbstream.store.mongo.thresholds`; kept.
``alerts``, ``alert_claims``  :mod:`~arbstream.store.mongo.alert_log`; kept.
``models``  :mod:`~arbstream.store.models` (the registry's mirror of every model card); kept.
``ml_eval``  :mod:`~arbstream.store.mongo.ml_eval` (live metrics and drift); kept.
``privacy_budget``  :mod:`~arbstream.store.mongo.privacy_budget` (the DP budget ledger and
every release); kept.
``pair_stats``  :mod:`~arbstream.store.mongo.pair_stats` (pair-trading statistics, one
document per pair); kept.
``backtests``  :mod:`~arbstream.store.mongo.backtests` (one document per backtest run and
bot); kept.

Every stream document gets ``first_seen_at``, the UTC wall-clock time of its first upsert.
Retention: a TTL index on ``first_seen_at`` expires ``opportunities`` and ``features``
documents ``MongoConfig.ttl_days`` after they were first written (wall clock, so replaying
old market data does not expire at once). :data:`INDEXES` and :data:`ALERT_INDEXES` list
every other index, one for each query of the store (or of a dashboard, noted);
:data:`ML_INDEXES` those of the model registry (:func:`ensure_ml_indexes`).
"""

from __future__ import annotations

from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database

from arbstream.config import Settings
from arbstream.store.config import DAY_S

OPPORTUNITIES = "opportunities"
EPISODES = "episodes"
FEATURES = "features"
THRESHOLDS = "thresholds"
ALERTS = "alerts"
CLAIMS = "alert_claims"
MODELS = "models"
ML_EVAL = "ml_eval"
PRIVACY_BUDGET = "privacy_budget"
PAIR_STATS = "pair_stats"
BACKTESTS = "backtests"

IndexKeys = list[tuple[str, int]]
#: index name -> (keys, unique)
IndexSpecs = dict[str, tuple[IndexKeys, bool]]

#: Index on ``opportunities`` of the alert worker's query: the latest window of an episode.
EPISODE_WINDOW_INDEX = "alerts_episode_window_end"

#: Collection of the stream -> its indexes. Names are fixed so :func:`ensure_indexes` is
#: idempotent. Each serves a query of the store (or of a dashboard, noted).
INDEXES: dict[str, IndexSpecs] = {
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
        EPISODE_WINDOW_INDEX: (  # latest_window: the legs of an episode alert
            [("episode_id", ASCENDING), ("window_end", DESCENDING)], False,
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
#: Collection of the alert worker -> its indexes (see :mod:`~arbstream.store.mongo.alert_log`).
ALERT_INDEXES: dict[str, IndexSpecs] = {
    ALERTS: {
        "last_at_desc": ([("last_at", DESCENDING)], False),  # alerts log
        "rule_last_at": ([("rule", ASCENDING), ("last_at", DESCENDING)], False),
        "decision_last_at": ([("decision", ASCENDING), ("last_at", DESCENDING)], False),
        "episode_id": ([("episode_id", ASCENDING)], False),
    },
    CLAIMS: {
        "pair_event_ms": (  # cooldown: the rule's alerts on one pair near an event time
            [("rule", ASCENDING), ("symbol", ASCENDING), ("sell_symbol", ASCENDING),
             ("buy_exchange", ASCENDING), ("sell_exchange", ASCENDING), ("event_ms", ASCENDING)],
            False,
        ),
        "state_rule_claimed_at": (  # queued digests, stale sends
            [("state", ASCENDING), ("rule", ASCENDING), ("claimed_at", ASCENDING)], False,
        ),
        "digest_id": ([("digest_id", ASCENDING)], False),
    },
}
#: Collections of the model registry -> their indexes (see :mod:`arbstream.store.models`
#: and :mod:`arbstream.store.mongo.ml_eval`).
ML_INDEXES: dict[str, IndexSpecs] = {
    MODELS: {
        # one document per (name, version); a name's versions in order (mirrored)
        "uniq_name_version": ([("name", ASCENDING), ("version", ASCENDING)], True),
    },
    ML_EVAL: {
        # the latest evaluation of a name (where the next one starts)
        "name_until_desc": ([("name", ASCENDING), ("until", DESCENDING)], False),
    },
}
#: Collections of the pairs job -> their indexes (see :mod:`arbstream.store.mongo.pair_stats`;
#: documents are read by ``_id``, the pair name, or all of them in this order).
PAIR_INDEXES: dict[str, IndexSpecs] = {
    PAIR_STATS: {"computed_at_desc": ([("computed_at", DESCENDING)], False)},
}
#: The backtester's collection -> its indexes (see :mod:`arbstream.store.mongo.backtests`).
BACKTEST_INDEXES: dict[str, IndexSpecs] = {
    BACKTESTS: {"run_created": ([("run_id", ASCENDING), ("created_at", DESCENDING)], False),
                "created_at_desc": ([("created_at", DESCENDING)], False)},
}
#: The DP accountant's collection -> its indexes (see
#: :mod:`arbstream.store.mongo.privacy_budget`; ledgers are read by ``_id``).
PRIVACY_INDEXES: dict[str, IndexSpecs] = {
    PRIVACY_BUDGET: {  # a scope's releases, latest first
        "kind_scope_reserved_at": (
            [("kind", ASCENDING), ("scope", ASCENDING), ("reserved_at", DESCENDING)], False,
        ),
    },
}
#: Single-field TTL index on ``first_seen_at`` in these collections only.
TTL_INDEX = "ttl_first_seen_at"
TTL_COLLECTIONS = (OPPORTUNITIES, FEATURES)
#: ``expireAfterSeconds`` when none is given: ``Settings().mongo_ttl_days`` in seconds.
DEFAULT_TTL_SECONDS = round(Settings.model_fields["mongo_ttl_days"].default * DAY_S)
#: Indexes of earlier versions, dropped by ``ensure_indexes``.
OBSOLETE_INDEXES: dict[str, tuple[str, ...]] = {
    OPPORTUNITIES: ("uniq_symbol_window_pair", "window_end_desc"),
}


def create_indexes(db: Database, collection: str, specs: IndexSpecs) -> list[str]:
    """Create ``specs`` on ``collection`` of ``db`` (an existing index of the same name and
    keys is left as is).

    Returns:
        The index names, in ``specs`` order.

    Raises:
        pymongo.errors.OperationFailure: an index of the same name exists with other keys.
    """
    coll = db[collection]
    return [coll.create_index(keys, name=name, unique=unique)
            for name, (keys, unique) in specs.items()]


def ensure_indexes(db: Database, *, ttl_seconds: int | None = None) -> dict[str, list[str]]:
    """Create every index of :data:`INDEXES` and the TTL indexes; safe to call any number of
    times.

    Args:
        db: the database (``client[conf.db]``).
        ttl_seconds: ``expireAfterSeconds`` of the ``first_seen_at`` TTL index of
            :data:`TTL_COLLECTIONS` (default :data:`DEFAULT_TTL_SECONDS`; pass
            ``MongoConfig.ttl_seconds``). An existing TTL index with another value is changed
            in place (``collMod``), not rebuilt.

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
        created[name] = create_indexes(db, name, specs)
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


def ensure_alert_indexes(db: Database) -> None:
    """Create every index of :data:`ALERT_INDEXES` and the :data:`EPISODE_WINDOW_INDEX` of
    ``opportunities`` the alert worker reads by (idempotent; the stream's other indexes and
    TTL are left to :func:`ensure_indexes`).

    Raises:
        pymongo.errors.OperationFailure: an index of the same name exists with other keys.
    """
    for name, specs in ALERT_INDEXES.items():
        create_indexes(db, name, specs)
    create_indexes(db, OPPORTUNITIES,
                   {EPISODE_WINDOW_INDEX: INDEXES[OPPORTUNITIES][EPISODE_WINDOW_INDEX]})


def ensure_group(db: Database, group: dict[str, IndexSpecs]) -> None:
    """Create every index of a collection -> specs mapping (idempotent).

    Raises:
        pymongo.errors.OperationFailure: an index of the same name exists with other keys.
    """
    for name, specs in group.items():
        create_indexes(db, name, specs)


def ensure_ml_indexes(db: Database) -> None:
    """Create every index of :data:`ML_INDEXES` (:func:`ensure_group`)."""
    ensure_group(db, ML_INDEXES)


def ensure_pair_indexes(db: Database) -> None:
    """Create every index of :data:`PAIR_INDEXES` (:func:`ensure_group`)."""
    ensure_group(db, PAIR_INDEXES)


def ensure_backtest_indexes(db: Database) -> None:
    """Create every index of :data:`BACKTEST_INDEXES` (:func:`ensure_group`)."""
    ensure_group(db, BACKTEST_INDEXES)


def ensure_privacy_indexes(db: Database) -> None:
    """Create every index of :data:`PRIVACY_INDEXES` (:func:`ensure_group`)."""
    ensure_group(db, PRIVACY_INDEXES)
