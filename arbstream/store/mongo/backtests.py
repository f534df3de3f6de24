"""MongoDB ``backtests``: one document per (backtest run, bot), written by
``arbstream backtest run`` (:mod:`backtest.report`).

Document:

``_id``  ``<run_id>|<bot>`` (a re-run under the same run id overwrites)
``run_id``, ``bot``  the run (``bt-<UTC start>-<digest of its inputs and settings>``) and bot
``source``  what was replayed (``iaqf``, ``binance``...), ``since``/``until`` (UTC)
``execution``  the bot's execution model (latencies in ms, impact and slippage in bps,
    ``legs``), ``config``  capital (USD), position cap (fraction), rebalancing, pauses
``metrics``  :func:`backtest.metrics.summarize` (USD, fractions, annualized ratios)
``decomposition``  PnL parts in USD (spread, fees, slippage, leg_risk, transfers,
    revaluation, total)
``skipped``  reason → signals the bot wanted and did not trade; ``transfers``,
    ``blocked_transfers``
``trades_file``  where the run's trades were exported; ``created_at``  UTC wall clock

Trades themselves are not stored here (thousands per bot): they are exported as Parquet,
CSV and JSON files. Index ``run_created`` (``run_id``, ``created_at``) lists runs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from pymongo import DESCENDING

from arbstream.store.config import MongoConfig
from arbstream.store.mongo import client as C
from arbstream.store.mongo.schema import BACKTESTS, ensure_backtest_indexes


def save_backtest(conf: MongoConfig, doc: Mapping[str, Any]) -> str:
    """Upsert one (run, bot) document (see the module docstring; ``run_id`` and ``bot``
    required); returns its ``_id``.

    Raises:
        KeyError: ``run_id`` or ``bot`` missing.
        pymongo.errors.PyMongoError: connection or server errors.
    """
    oid = f"{doc['run_id']}|{doc['bot']}"
    ensure_backtest_indexes(C.cached_client(conf)[conf.db])
    body = {**doc, "_id": oid, "created_at": doc.get("created_at") or dt.datetime.now(dt.UTC)}
    C.collection(conf, BACKTESTS).replace_one({"_id": oid}, body, upsert=True)
    return oid


def backtest_run(conf: MongoConfig, run_id: str | None = None) -> list[dict[str, Any]]:
    """The documents of run ``run_id`` (default: the latest run), one per bot, by bot name.

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    coll = C.collection(conf, BACKTESTS)
    if run_id is None:
        last = coll.find_one({}, sort=[("created_at", DESCENDING)])
        if last is None:
            return []
        run_id = last["run_id"]
    return sorted(coll.find({"run_id": run_id}), key=lambda d: d["bot"])
