"""MongoDB ``privacy_budget``: the privacy-budget accountant of differentially private
releases, and the log of every release.

Accounting is basic sequential composition (Dwork & Roth 2014, "The Algorithmic Foundations
of Differential Privacy", Theorem 3.14): releases of ε₁, ε₂ ... over the same data are
together (Σεᵢ)-DP, so a scope's releases may spend at most its total ε. ε is counted in
integer micro-units (:data:`MICRO`, each spend rounded up), so sums are exact.

Documents (``kind``):

``ledger``  ``_id`` ``ledger|<scope>``: ``scope``, ``total_units`` (total ε × 10⁶, fixed when
    the ledger is created), ``spent_units``, ``releases`` (count), ``created_at``,
    ``updated_at`` (UTC).
``release``  ``_id`` ``release|<uuid4 hex>``: ``scope``, ``what`` (the query released),
    ``epsilon``, ``units``, ``state`` (``reserved``: budget spent, no value yet, e.g. the
    process died; ``released``), ``reserved_at``, and once released ``sensitivity``,
    ``scale``, ``mechanism``, ``noisy_value``, ``released_at`` and the caller's ``meta``.
    The true value is never stored.

A spend is one conditional ``find_one_and_update`` on the ledger (``spent_units <= total −
units``, ``$inc``), atomic on one document, so concurrent releases cannot overspend: the
budget is spent *before* the noise is drawn, and a release that fails afterwards stays
``reserved`` (its ε is lost, never reused).

Indexes: :data:`~arbstream.store.mongo.schema.PRIVACY_INDEXES`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pymongo import DESCENDING, ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError

from arbstream.config import Settings
from arbstream.privacy import laplace_mechanism
from arbstream.store.config import MongoConfig
from arbstream.store.mongo.client import connect
from arbstream.store.mongo.schema import PRIVACY_BUDGET, ensure_privacy_indexes

#: ε micro-units per 1 ε.
MICRO = 1_000_000
DEFAULT_SCOPE = "default"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:|/=-]{0,127}$")
MECHANISM = "opendp.make_laplace (float, absolute distance)"


class DpDisabled(RuntimeError):  # noqa: N818
    """DP releases are opt-in: ``ARB_DP_ENABLED`` is false."""


class BudgetExhausted(RuntimeError):  # noqa: N818
    """The release would spend more than the scope's remaining budget; nothing was spent."""


class BudgetMismatch(ValueError):  # noqa: N818
    """The configured total ε differs from the one the scope's ledger was created with."""


@dataclass(frozen=True)
class DpConfig:
    """The DP slice of :class:`~arbstream.config.Settings`: ``enabled``
    (``ARB_DP_ENABLED``), ``epsilon_total`` (``ARB_DP_EPSILON_TOTAL``) and the database."""

    mongo: MongoConfig
    enabled: bool
    epsilon_total: float

    @classmethod
    def of(cls, settings: Settings) -> DpConfig:
        return cls(MongoConfig.of(settings), settings.dp_enabled, settings.dp_epsilon_total)


@dataclass(frozen=True)
class Budget:
    """A scope's budget: ``total``, ``spent``, ``remaining`` ε and ``releases`` made
    (``exists`` False: nothing spent yet, the ledger is created by the first release)."""

    scope: str
    total: float
    spent: float
    remaining: float
    releases: int
    exists: bool


@dataclass(frozen=True)
class Release:
    """One DP release: ``noisy_value`` = true value + Laplace(0, ``scale``) noise, ``scale`` =
    ``sensitivity`` / ``epsilon``; ``budget`` after it."""

    release_id: str
    what: str
    epsilon: float
    sensitivity: float
    scale: float
    noisy_value: float
    released_at: dt.datetime
    budget: Budget


def epsilon_units(epsilon: float) -> int:
    """``epsilon`` in micro-units, rounded up (a spend never counts less than it costs; at
    least 1).

    Raises:
        ValueError: not a finite number > 0.
    """
    if isinstance(epsilon, bool) or not (isinstance(epsilon, int | float)
                                         and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    return max(1, math.ceil(round(epsilon * MICRO, 3)))


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"{what} must match {NAME_RE.pattern}, got {value!r}")
    return value


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ledger_id(scope: str) -> str:
    return f"ledger|{_name(scope, 'scope')}"


def _coll(client: Any, conf: MongoConfig) -> Collection:
    db = client[conf.db]
    ensure_privacy_indexes(db)
    return db[PRIVACY_BUDGET]


def _budget(scope: str, total_units: int, doc: Mapping[str, Any] | None) -> Budget:
    if doc is None:
        return Budget(scope, total_units / MICRO, 0.0, total_units / MICRO, 0, False)
    total, spent = int(doc["total_units"]), int(doc["spent_units"])
    return Budget(scope, total / MICRO, spent / MICRO, max(total - spent, 0) / MICRO,
                  int(doc.get("releases", 0)), True)


def _check_total(scope: str, doc: Mapping[str, Any], total_units: int) -> None:
    if int(doc["total_units"]) != total_units:
        raise BudgetMismatch(
            f"privacy budget {scope!r} was created with total epsilon "
            f"{int(doc['total_units']) / MICRO:g}; ARB_DP_EPSILON_TOTAL is "
            f"{total_units / MICRO:g}. A budget cannot be changed once spent from: restore "
            "the setting, or release under a new --scope (new data only)")


def budget(conf: DpConfig, scope: str = DEFAULT_SCOPE) -> Budget:
    """The budget of ``scope`` (total from ``conf`` until its ledger exists).

    Raises:
        BudgetMismatch: the ledger's total differs from ``conf.epsilon_total``.
        ValueError: a bad scope name. pymongo.errors.PyMongoError: server errors.
    """
    total_units = epsilon_units(conf.epsilon_total)
    with connect(conf.mongo) as client:
        doc = _coll(client, conf.mongo).find_one({"_id": _ledger_id(scope)})
    if doc is not None:
        _check_total(scope, doc, total_units)
    return _budget(scope, total_units, doc)


def spend(conf: DpConfig, what: str, epsilon: float, scope: str = DEFAULT_SCOPE) -> str:
    """Atomically spend ``epsilon`` of ``scope``'s budget for a release of ``what``; returns
    the ``reserved`` release document's id (see the module docstring).

    Raises:
        DpDisabled: ``conf.enabled`` is false.
        BudgetExhausted: the remaining budget is smaller than ``epsilon`` (nothing spent).
        BudgetMismatch: the ledger's total differs from ``conf.epsilon_total``.
        ValueError: a bad ``what``, ``scope`` or ``epsilon``.
        pymongo.errors.PyMongoError: server errors.
    """
    if not conf.enabled:
        raise DpDisabled("differentially private releases are off; set ARB_DP_ENABLED=true "
                         "(and ARB_DP_EPSILON_TOTAL) to opt in")
    _name(what, "what")
    units, total_units = epsilon_units(epsilon), epsilon_units(conf.epsilon_total)
    lid, now = _ledger_id(scope), _now()
    with connect(conf.mongo) as client:
        coll = _coll(client, conf.mongo)
        with contextlib.suppress(DuplicateKeyError):  # created concurrently
            coll.update_one({"_id": lid}, {"$setOnInsert": {
                "kind": "ledger", "scope": scope, "total_units": total_units, "spent_units": 0,
                "releases": 0, "created_at": now, "updated_at": now}}, upsert=True)
        doc = coll.find_one_and_update(
            {"_id": lid, "total_units": total_units,
             "spent_units": {"$lte": total_units - units}},
            {"$inc": {"spent_units": units, "releases": 1}, "$set": {"updated_at": now}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            current = coll.find_one({"_id": lid})
            assert current is not None
            _check_total(scope, current, total_units)
            left = _budget(scope, total_units, current)
            raise BudgetExhausted(
                f"privacy budget {scope!r} exhausted: {left.spent:g} of {left.total:g} epsilon "
                f"spent over {left.releases} release(s), {left.remaining:g} left; releasing "
                f"{what!r} needs {units / MICRO:g}. Nothing was released")
        rid = f"release|{uuid.uuid4().hex}"
        coll.insert_one({"_id": rid, "kind": "release", "scope": scope, "what": what,
                         "epsilon": units / MICRO, "units": units, "state": "reserved",
                         "reserved_at": now})
    return rid


def record(conf: DpConfig, release_id: str, noisy_value: float, sensitivity: float,
           scale: float, meta: Mapping[str, Any] | None = None) -> dt.datetime:
    """Mark a reserved release ``released`` with its noisy value (never the true one) and
    ``meta``; returns ``released_at``.

    Raises:
        KeyError: no reserved release ``release_id``. pymongo.errors.PyMongoError: server.
    """
    now = _now()
    with connect(conf.mongo) as client:
        res = _coll(client, conf.mongo).update_one(
            {"_id": release_id, "kind": "release", "state": "reserved"},
            {"$set": {"state": "released", "noisy_value": float(noisy_value),
                      "sensitivity": float(sensitivity), "scale": float(scale),
                      "mechanism": MECHANISM, "released_at": now, "meta": dict(meta or {})}})
    if res.matched_count != 1:
        raise KeyError(f"no reserved release {release_id!r}")
    return now


def releases(conf: DpConfig, scope: str = DEFAULT_SCOPE, limit: int = 50
             ) -> list[dict[str, Any]]:
    """The release documents of ``scope``, latest first (``limit`` 0: all)."""
    with connect(conf.mongo) as client:
        cursor = _coll(client, conf.mongo).find(
            {"kind": "release", "scope": _name(scope, "scope")}
        ).sort([("reserved_at", DESCENDING)])
        return list(cursor.limit(limit) if limit else cursor)


def release_count(conf: DpConfig, what: str, true_count: float, epsilon: float,
                  sensitivity: float = 1.0, scope: str = DEFAULT_SCOPE,
                  meta: Mapping[str, Any] | None = None) -> Release:
    """Release ``true_count`` with ε-DP: spend ``epsilon`` (atomically), then add
    Laplace(0, ``sensitivity``/``epsilon``) noise (:func:`arbstream.privacy.laplace_mechanism`)
    and log the release.

    Args:
        what: a name for the query (``alert_decisions:sent``, ``backtest_trades:<bot>``).
        true_count: the exact count (>= 0), computed by the caller over the data protected.
        epsilon: this release's ε.
        sensitivity: Δ, how much one unit of privacy (one alert decision, one trade, or one
            user's clipped contribution) can change ``true_count``.
        meta: context stored with the release (filters, time range; never the true value).

    Raises:
        DpDisabled, BudgetExhausted, BudgetMismatch: as :func:`spend` (nothing released).
        ValueError: a negative or non-finite count, or bad ``epsilon``/``sensitivity``
            (checked before anything is spent).
        pymongo.errors.PyMongoError: server errors.
    """
    if isinstance(true_count, bool) or not isinstance(true_count, int | float) \
            or not math.isfinite(true_count) or true_count < 0:
        raise ValueError(f"a count must be a finite number >= 0, got {true_count!r}")
    noise = laplace_mechanism(sensitivity, epsilon)
    rid = spend(conf, what, epsilon, scope)
    noisy = noise(true_count)
    at = record(conf, rid, noisy, sensitivity, noise.scale, meta)
    return Release(rid, what, epsilon, noise.sensitivity, noise.scale, noisy, at,
                   budget(conf, scope))
