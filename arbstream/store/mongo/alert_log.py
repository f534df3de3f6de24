"""The alert worker's MongoDB state: idempotency claims and the decision log.

``alert_claims``  one document per alert, ``_id`` = the idempotency key ``<rule>|<episode_id>``
    (unique by construction), inserted *before* anything is sent. ``state``:

    * ``queued``: waiting for its rule's digest (reloaded after a restart);
    * ``sending``: an SMTP transaction is (or was) under way;
    * ``sent``: delivered (``sent_at``, ``attempts``, ``refused`` recipients);
    * ``failed``: not delivered (``error``, ``permanent``, ``attempts``);
    * ``unknown``: the worker stopped while ``sending`` (found stale at a later start): the
      e-mail may or may not have gone out, and is not sent again.

    Also ``rule, episode_id, symbol, sell_symbol, buy_exchange, sell_exchange, event_ms``
    (event time of the triggering event, UTC ms), ``claimed_at, updated_at`` (UTC),
    ``message_id``, ``digest_id``, ``item`` (the alert item as JSON,
    :class:`alerts.message.AlertItem`) and ``token`` (of the claiming attempt, when given:
    :meth:`AlertStore.claim`).
``alerts``  the decision log, one document per (key, decision, reason):
    ``_id`` = ``<key>|<decision>|<reason>``, ``decision`` one of ``sent``, ``queued``
    (digest), ``suppressed``, ``skipped`` (a rule with model thresholds whose champion gave
    no value), ``failed``, ``retracted`` (a retracted opportunity window);
    ``reason`` (``delivered``, ``digest``, ``duplicate``, ``cooldown``, ``no_model``,
    ``permanent``, ``transient``, ``interrupted``; retractions: ``alerted``, ``withdrawn``,
    ``no_alert``), ``detail``, ``error``, ``rule, episode_id, symbol, sell_symbol,
    buy_exchange, sell_exchange, event_ms, net_bps, profit_usd, duration_s, stage`` (of an
    opportunity event), ``score, score_version, predicted_bps, predicted_version`` (the
    champion models' outputs for the window and their registry versions, when scored),
    ``recipients, message_id, digest_id, attempts, source``
    (topic/partition/offset of the last event), ``count`` (how many times this decision was
    taken), ``first_at``, ``last_at`` (UTC wall clock). Re-taking a decision (a replayed
    event, every later window of an already alerted episode) increments ``count``.

Indexes: :data:`~arbstream.store.mongo.schema.ALERT_INDEXES`, one per query made here, and
the ``opportunities`` index of :func:`AlertStore.latest_opportunity`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Protocol

from pymongo import DESCENDING, MongoClient, UpdateOne
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from arbstream.store.config import MongoConfig
from arbstream.store.mongo.client import connect
from arbstream.store.mongo.opportunities import latest_window
from arbstream.store.mongo.schema import ALERTS, CLAIMS, ensure_alert_indexes

#: States of a claim that count as "alerted" for the cooldown.
ALERTED = ("queued", "sending", "sent", "unknown")


class AlertKey(Protocol):
    """What the store reads of an alert item (:class:`alerts.message.AlertItem` is one)."""

    @property
    def key(self) -> str: ...
    @property
    def rule(self) -> str: ...
    @property
    def episode_id(self) -> str: ...
    @property
    def symbol(self) -> str: ...
    @property
    def sell_symbol(self) -> str: ...
    @property
    def buy_exchange(self) -> str: ...
    @property
    def sell_exchange(self) -> str: ...
    @property
    def event_ms(self) -> int: ...
    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AlertStore:
    """Claims and decision log in ``conf.db``; one ``MongoClient`` for its lifetime (close
    it, or use it as a context manager).

    Args:
        conf: the database.
        client: a client to use instead of a new one (closed by :meth:`close`).

    Raises (every method):
        pymongo.errors.PyMongoError: connection or server errors.
    """

    def __init__(self, conf: MongoConfig, client: MongoClient | None = None) -> None:
        self.conf = conf
        self.client = client or connect(conf)
        self.db: Database = self.client[conf.db]
        self.claims = self.db[CLAIMS]
        self.log = self.db[ALERTS]

    def __enter__(self) -> AlertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def ensure_indexes(self) -> None:
        """Create the indexes the methods query by (idempotent; see
        :func:`~arbstream.store.mongo.schema.ensure_alert_indexes`)."""
        ensure_alert_indexes(self.db)

    # --- claims ------------------------------------------------------------------------------
    def claim(self, item: AlertKey, state: str, message_id: str | None = None,
              token: str | None = None) -> bool:
        """Insert the claim of ``item.key`` in ``state`` (``queued`` or ``sending``).

        Args:
            token: a value unique to this claim attempt, stored with it, so that a retry
                after a lost reply (the insert applied, the connection dropped) recognises
                its own claim instead of taking it for another worker's.

        Returns:
            ``False`` when the key is already claimed (by this or another worker, earlier or
            concurrently, with another ``token``): the caller must not send.
        """
        now = _now()
        doc = {
            "_id": item.key, "rule": item.rule, "episode_id": item.episode_id,
            "symbol": item.symbol, "sell_symbol": item.sell_symbol,
            "buy_exchange": item.buy_exchange, "sell_exchange": item.sell_exchange,
            "event_ms": item.event_ms, "state": state, "claimed_at": now, "updated_at": now,
            "message_id": message_id, "digest_id": None, "item": item.model_dump(mode="json"),
        }
        if token is not None:
            doc["token"] = token
        try:
            self.claims.insert_one(doc)
        except DuplicateKeyError:
            if token is None:
                return False
            mine = self.claims.find_one({"_id": item.key, "token": token}, {"_id": 1})
            return mine is not None
        return True

    def claim_of(self, key: str) -> dict[str, Any] | None:
        """The claim of ``key``, or ``None``."""
        return self.claims.find_one({"_id": key})

    def finish(self, keys: list[str], state: str, **fields: Any) -> None:
        """Set the final ``state`` (``sent``, ``failed``) and ``fields`` of claims."""
        now = _now()
        extra = {"sent_at": now} if state == "sent" else {}
        self.claims.update_many({"_id": {"$in": keys}},
                                {"$set": {"state": state, "updated_at": now, **extra, **fields}})

    def withdraw(self, key: str) -> bool:
        """Delete the claim of ``key`` if it is still ``queued`` (nothing sent); whether it
        was."""
        return self.claims.delete_one({"_id": key, "state": "queued"}).deleted_count == 1

    def alerted_nearby(self, item: AlertKey, cooldown_ms: int) -> dict[str, Any] | None:
        """Another alert of ``item``'s rule on the same pair whose event time is less than
        ``cooldown_ms`` away from ``item.event_ms`` (states :data:`ALERTED`), latest first."""
        return self.claims.find_one(
            {"rule": item.rule, "symbol": item.symbol, "sell_symbol": item.sell_symbol,
             "buy_exchange": item.buy_exchange, "sell_exchange": item.sell_exchange,
             "event_ms": {"$gt": item.event_ms - cooldown_ms,
                          "$lt": item.event_ms + cooldown_ms},
             "state": {"$in": list(ALERTED)}, "_id": {"$ne": item.key}},
            sort=[("event_ms", DESCENDING)],
        )

    def queued(self, rules: list[str]) -> list[dict[str, Any]]:
        """Claims waiting for a digest of one of ``rules``, oldest first."""
        if not rules:
            return []
        cursor = self.claims.find({"state": "queued", "rule": {"$in": rules}})
        return sorted(cursor, key=lambda c: (c["claimed_at"], c["_id"]))

    def take_digest(self, keys: list[str], digest_id: str, message_id: str) -> list[dict]:
        """Atomically move the still-``queued`` claims of ``keys`` to ``sending`` under
        ``digest_id``; return exactly those (a concurrent worker gets none of them)."""
        now = _now()
        self.claims.update_many(
            {"_id": {"$in": keys}, "state": "queued"},
            {"$set": {"state": "sending", "digest_id": digest_id, "message_id": message_id,
                      "updated_at": now}},
        )
        return list(self.claims.find({"digest_id": digest_id, "state": "sending"}))

    def mark_interrupted(self, older_than_s: float) -> list[dict[str, Any]]:
        """Claims left ``sending`` for longer than ``older_than_s`` (their worker died during
        the SMTP transaction): set them ``unknown`` and return them. They are not resent."""
        cutoff = _now() - dt.timedelta(seconds=older_than_s)
        stale = list(self.claims.find({"state": "sending", "updated_at": {"$lt": cutoff}}))
        if stale:
            self.claims.update_many(
                {"_id": {"$in": [c["_id"] for c in stale]}, "state": "sending"},
                {"$set": {"state": "unknown", "updated_at": _now()}},
            )
        return stale

    # --- decision log ------------------------------------------------------------------------
    def record(self, decision: str, reason: str, ctx: Mapping[str, Any], **fields: Any) -> None:
        """Log one decision (see the module docstring), aggregated by (key, decision, reason).

        Args:
            ctx: ``key, rule, episode_id`` and the pair and figures of the event.
            fields: ``detail``, ``error``, ``recipients``, ``message_id``, ``attempts``,
                ``source`` ... as known.
        """
        self.record_many([(decision, reason, ctx, fields, 1)])

    def record_many(
        self, entries: list[tuple[str, str, Mapping[str, Any], Mapping[str, Any], int]]
    ) -> None:
        """Log decisions in one bulk write: ``(decision, reason, ctx, fields, times)`` each,
        ``times`` added to the document's ``count``."""
        if not entries:
            return
        now = _now()
        ops = []
        for decision, reason, ctx, fields, times in entries:
            doc = {**ctx, **fields, "decision": decision, "reason": reason, "last_at": now}
            ops.append(UpdateOne(
                {"_id": f"{ctx['key']}|{decision}|{reason}"},
                {"$set": doc, "$setOnInsert": {"first_at": now}, "$inc": {"count": times}},
                upsert=True,
            ))
        self.log.bulk_write(ops, ordered=True)

    def decisions(
        self, limit: int = 50, rule: str | None = None, decision: str | None = None,
        episode_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Latest decisions first, filtered by rule, decision and episode when given."""
        query: dict[str, Any] = {}
        if rule:
            query["rule"] = rule
        if decision:
            query["decision"] = decision
        if episode_id:
            query["episode_id"] = episode_id
        cursor = self.log.find(query).sort([("last_at", DESCENDING)])
        return list(cursor.limit(limit) if limit else cursor)

    # --- the stream's documents --------------------------------------------------------------
    def latest_opportunity(self, episode_id: str) -> dict[str, Any] | None:
        """The latest stored opportunity window of an episode, on this store's client (see
        :func:`~arbstream.store.mongo.opportunities.latest_window`: ``opportunity_id`` and
        the non-``None`` stored fields), or ``None``."""
        return latest_window(self.db, episode_id)
