"""MongoDB ``pair_stats``: the latest pair-trading statistics of each configured pair, written
by the pairs job (:mod:`ml.pairs`, ``arbstream pairs run``), read by ``arbstream pairs show``.

One document per pair, ``_id`` = the pair's name (``ARB_PAIRS``), replaced by each run (the
time series of β, α, spread, z-score and correlation is InfluxDB ``pair_stats``; keeping the
history there keeps this collection at one small document per pair):

``pair``, ``y``, ``x``  the name and the legs (``exchange:SYMBOL``)
``status``  ``ok``, or ``error`` with ``error`` (why the last run could not compute the pair,
    e.g. a leg without data); an ``error`` run keeps the last good values
``since``, ``until``  the run's requested half-open time range (UTC; ``None``: unbounded)
``first``, ``last``  the first and last common window end used (UTC); ``observations``
``window_end``, ``beta``, ``alpha``, ``spread``, ``z``, ``correlation``  the latest rolling
    values (hedge ratio, intercept and spread of log mids; z in standard deviations)
``beta_ols``, ``alpha_ols``, ``beta_ols_no_intercept``  static OLS over the test lookback
``adf_pvalue``, ``coint_pvalue``, ``half_life_obs``, ``half_life_s``, ``test_observations``
    the Engle-Granger statistics over the test lookback (``half_life_*`` ``None`` when the
    spread does not mean-revert)
``excursion_start``  the window end where the spread's z-score last changed sign (UTC)
``windows``  ``{"beta": ..., "z": ..., "test": ...}``, the settings used, observations
``computed_at``  UTC wall clock of the run

Indexes: :data:`~arbstream.store.mongo.schema.PAIR_INDEXES`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from pymongo import DESCENDING

from arbstream.store.config import MongoConfig
from arbstream.store.mongo.client import connect, fields
from arbstream.store.mongo.schema import PAIR_STATS, ensure_pair_indexes


def upsert_pair_stats(conf: MongoConfig, docs: Iterable[Mapping[str, Any]]) -> int:
    """Replace the document of each pair (``pair`` key = ``_id``; datetimes stored as UTC).

    Returns:
        Number of documents written.

    Raises:
        ValueError: a document without a string ``pair``.
        pymongo.errors.PyMongoError: connection or server errors.
    """
    rows = list(docs)
    for doc in rows:
        if not isinstance(doc.get("pair"), str) or not doc["pair"]:
            raise ValueError(f"pair_stats document without a pair name: {dict(doc)!r}")
    if not rows:
        return 0
    with connect(conf) as client:
        db = client[conf.db]
        ensure_pair_indexes(db)
        for doc in rows:
            db[PAIR_STATS].replace_one({"_id": doc["pair"]},
                                       {**fields(doc, []), "_id": doc["pair"]}, upsert=True)
    return len(rows)


def record_error(conf: MongoConfig, pair: str, y: str, x: str, error: str,
                 computed_at: dt.datetime) -> None:
    """Mark ``pair``'s document ``status`` ``error`` with ``error`` (its last good values are
    kept; the document is created when there is none).

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    with connect(conf) as client:
        db = client[conf.db]
        ensure_pair_indexes(db)
        db[PAIR_STATS].update_one(
            {"_id": pair},
            {"$set": {"pair": pair, "y": y, "x": x, "status": "error", "error": error,
                      "computed_at": computed_at}},
            upsert=True,
        )


def pair_stats(conf: MongoConfig, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The documents of ``names`` (``None``: every pair), latest ``computed_at`` first.

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    query = {} if names is None else {"_id": {"$in": list(names)}}
    with connect(conf) as client:
        cursor = client[conf.db][PAIR_STATS].find(query).sort([("computed_at", DESCENDING),
                                                                ("_id", DESCENDING)])
        return list(cursor)
