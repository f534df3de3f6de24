"""ε-differentially private release of a backtest's trade count (a user's own activity).

The unit of privacy is **one trade** of the user's bots: the count of trades of a stored run
(MongoDB ``backtests``, all bots or one) changes by at most 1 when one trade is added or
removed, so the sensitivity Δ is 1 and the release adds Laplace(0, 1/ε) noise through
:func:`arbstream.store.mongo.privacy_budget.release_count` (OpenDP, budget spent atomically
first). What this protects and what it does not: ``docs/privacy.md``.
"""

from __future__ import annotations

from arbstream.store.mongo.backtests import backtest_run
from arbstream.store.mongo.privacy_budget import (
    DEFAULT_SCOPE,
    DpConfig,
    DpDisabled,
    Release,
    release_count,
)


def release_trade_count(conf: DpConfig, epsilon: float, run: str | None = None,
                        bot: str | None = None, scope: str = DEFAULT_SCOPE) -> Release:
    """Release the number of trades of run ``run`` (default: the latest), of ``bot`` or of
    every bot, with ε-DP (``what`` = ``backtest_trades:<run>:<bot or all>``).

    Raises:
        DpDisabled: ``ARB_DP_ENABLED`` is false (nothing is read).
        ValueError: no such run, or no such bot in it.
        BudgetExhausted, BudgetMismatch: as
            :func:`~arbstream.store.mongo.privacy_budget.release_count` (nothing released).
        pymongo.errors.PyMongoError: server errors.
    """
    if not conf.enabled:
        raise DpDisabled("differentially private releases are off: set ARB_DP_ENABLED=true")
    docs = backtest_run(conf.mongo, run)
    if not docs:
        raise ValueError(f"no stored backtest run {run or '(latest)'}")
    if bot is not None:
        docs = [d for d in docs if d["bot"] == bot]
        if not docs:
            raise ValueError(f"no bot {bot!r} in backtest run {run or '(latest)'}")
    count = sum(int(d["metrics"]["trades"]) for d in docs)
    rid = docs[0]["run_id"]
    return release_count(conf, f"backtest_trades:{rid}:{bot or 'all'}", count, epsilon, 1.0,
                         scope, meta={"run": rid, "bot": bot})
