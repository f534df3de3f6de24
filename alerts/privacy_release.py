"""Differentially private counts of the alert worker's decisions (MongoDB ``alerts``).

The decision log is derived from users' own activity: which rules they subscribed to, and
so which episodes they were e-mailed about. :func:`count_decisions` counts its documents
(one per rule, episode, decision and reason); :func:`release_decisions` releases that count
through :func:`arbstream.store.mongo.privacy_budget.release_count` (Laplace noise, budget
spent atomically).

Unit of privacy and sensitivity Δ:

* default: **one decision document** (event-level DP): adding or removing one decision
  changes the count by 1, so Δ = 1. A user whose rules produced k decisions is protected at
  k·ε only (group privacy), not at ε.
* ``per_rule_cap=m``: each rule (a user's subscription) contributes at most m decisions
  (the rest are not counted; how many is not stored: it depends on the data), so Δ = m and
  the unit is **one rule**: a whole rule's presence or absence is hidden at ε.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass

from arbstream.store.config import MongoConfig
from arbstream.store.mongo.alert_log import AlertStore
from arbstream.store.mongo.privacy_budget import DEFAULT_SCOPE, DpConfig, Release, release_count
from arbstream.timestamps import to_utc

#: The decisions the worker logs (``alerts/README.md``).
DECISIONS = ("sent", "queued", "suppressed", "skipped", "failed", "retracted")


@dataclass(frozen=True)
class DecisionCount:
    """The exact count (never released as is): ``count`` decision documents after clipping,
    ``clipped`` documents dropped by the per-rule cap, ``sensitivity`` Δ of ``count``."""

    count: int
    clipped: int
    sensitivity: float


def count_decisions(conf: MongoConfig, decision: str | None = None,
                    since: dt.datetime | None = None, until: dt.datetime | None = None,
                    per_rule_cap: int | None = None) -> DecisionCount:
    """Decision documents of ``decision`` (None: all) first taken in ``[since, until)``
    (``first_at``, UTC; None: unbounded), each rule's clipped to ``per_rule_cap``.

    Raises:
        ValueError: an unknown decision, or a cap < 1.
        pymongo.errors.PyMongoError: server errors.
    """
    if decision is not None and decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    if per_rule_cap is not None and per_rule_cap < 1:
        raise ValueError(f"per_rule_cap must be >= 1, got {per_rule_cap}")
    lo = to_utc(since) if since is not None else None
    hi = to_utc(until) if until is not None else None
    with AlertStore(conf) as store:
        docs = store.decisions(limit=0, decision=decision)
    per_rule = Counter(
        d["rule"] for d in docs
        if (lo is None or d["first_at"] >= lo) and (hi is None or d["first_at"] < hi)
    )
    if per_rule_cap is None:
        return DecisionCount(sum(per_rule.values()), 0, 1.0)
    kept = sum(min(n, per_rule_cap) for n in per_rule.values())
    return DecisionCount(kept, sum(per_rule.values()) - kept, float(per_rule_cap))


def release_decisions(conf: DpConfig, epsilon: float, decision: str | None = None,
                      since: dt.datetime | None = None, until: dt.datetime | None = None,
                      per_rule_cap: int | None = None, scope: str = DEFAULT_SCOPE) -> Release:
    """An ε-DP release of :func:`count_decisions` (``what`` = ``alert_decisions:<decision or
    all>``; the filters and the cap are stored with it, nothing derived from the data).

    Raises:
        As :func:`count_decisions` and
        :func:`~arbstream.store.mongo.privacy_budget.release_count` (``DpDisabled``,
        ``BudgetExhausted``, ``BudgetMismatch``); nothing is read when DP is disabled.
    """
    from arbstream.store.mongo.privacy_budget import DpDisabled

    if not conf.enabled:
        raise DpDisabled("differentially private releases are off; set ARB_DP_ENABLED=true "
                         "(and ARB_DP_EPSILON_TOTAL) to opt in")
    found = count_decisions(conf.mongo, decision, since, until, per_rule_cap)
    meta = {"decision": decision, "since": since, "until": until,
            "per_rule_cap": per_rule_cap, "unit": "rule" if per_rule_cap else "decision"}
    return release_count(conf, f"alert_decisions:{decision or 'all'}", found.count, epsilon,
                         found.sensitivity, scope, meta)
