"""The alert worker: consume ``arb.opportunities``, decide, e-mail, log, commit.

Long module: the consumer loop and its per-record decision (validate, match, cool down,
claim, send, log, commit) share the worker's state; helpers live in the sibling modules.

For each record (``poll()`` in a consumer group, manual offset commits):

1. validate it (:func:`alerts.events.parse_event`: the stream's schema, no control
   characters in any string, optional ``stage``/``emitted_ts``); an invalid one goes to
   ``ARB_ALERT_DEADLETTER_TOPIC`` with its reason (stage ``alerts``) and the worker goes on. So
   does a valid one whose handling fails for any reason but MongoDB or Kafka (a bad record
   never stops the stream);
2. a ``retracted`` opportunity window alerts nothing: for each rule watching its pair it is
   logged ``retracted`` (``alerted`` when it had triggered the rule's alert, ``withdrawn`` when
   that alert was still queued for a digest and is taken out of it, else ``no_alert``);
3. a valid opportunity window is scored by the champion models (:mod:`alerts.scoring`,
   reloaded when a new champion is promoted), and the scores are written to InfluxDB
   ``ml_score`` with the next commit;
4. for each rule the event makes its episode alertable under (:mod:`alerts.rules`: stage,
   filters, minimums), with key ``<rule>|<episode_id>``:

   * already claimed → ``suppressed``/``duplicate`` (at most one alert per rule and episode);
   * a model threshold (``min_score``, ``min_predicted_bps``) whose champion gave no value →
     ``skipped``/``no_model`` with the reason (the rule does not fire); one not reached → no
     match (like any other minimum, not logged; the score is in ``ml_score``);
   * another episode of the same pair alerted under the rule within
     ``ARB_ALERT_COOLDOWN_SECONDS`` of event time → ``suppressed``/``cooldown`` (re-checked on
     the episode's later events);
   * digest rule → claim ``queued``, logged ``queued``; sent with the rule's other queued
     alerts once the oldest has waited ``ARB_ALERT_DIGEST_SECONDS`` (wall clock);
   * otherwise → claim ``sending`` (inserted first, unique ``_id`` = key), send with retries,
     claim ``sent``/``failed``, logged ``sent``/``failed``;

   a ``pair_signal`` event of the pairs job (``ARB_PAIRS_TOPIC``, read when a rule sets
   ``min_abs_pair_z``) is decided the same way for the pair-trading rules it fires, keyed by
   the spread's excursion (:mod:`alerts.pair_alerts`; never a digest);

5. store the record's offset; stored offsets are committed (synchronously) after at most 100
   records or 1 s, when the topic goes quiet, on a rebalance and at shutdown: a record's
   offset is committed only after its decisions are logged. ``sent``, ``failed`` and
   ``queued`` decisions are written at once; ``suppressed`` and ``skipped`` ones (one per
   later window of an episode) are aggregated in memory and written in one bulk write just
   before each commit (:meth:`AlertWorker.flush_log`). Every decision on a scored window
   carries ``score``/``score_version`` and ``predicted_bps``/``predicted_version``.

Delivery is **at most once** per (rule, episode): a crash after the claim and before the
SMTP server accepted the message loses that alert rather than risking a second e-mail; the
claim stays ``sending`` and a later start marks it ``unknown`` (logged ``failed``/
``interrupted``). Records handled but not yet committed are re-read after a crash and find
their claims. MongoDB calls are retried through connection errors for up to 120 s
(:mod:`alerts.store_retry`; a claim whose reply was lost is recognised as the worker's own);
a commit the group no longer accepts (assignment lost while the broker did not answer for a
session timeout, a rebalance) is skipped, its records read again. Other MongoDB or Kafka
errors stop the worker (exit 1) without committing; run it under a supervisor
(``restart: unless-stopped``).

The worker takes :class:`AlertsConfig` (``AlertsConfig.of(settings)``): the rules, topics and
timings of the alerts section, with the Kafka, MongoDB, SMTP, message, model-registry and
InfluxDB slices.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from pydantic import ValidationError
from pymongo.errors import PyMongoError

from alerts.events import AlertOpportunityEvent, parse_event, printable, stage_of
from alerts.message import (
    AlertItem,
    MessageConfig,
    alert_message,
    build_item,
    digest_id,
    digest_message,
    fmt_time,
    message_id,
)
from alerts.pair_alerts import (
    PairAlertItem,
    build_pair_item,
    is_pair_rule,
    pair_context,
    pair_message,
    pair_mismatch,
)
from alerts.rules import Event, alert_key, figures, filter_mismatch, fires_on, mismatch, rule_stage
from alerts.scoring import NO_SCORES, ModelScores, Scorer, model_mismatch, required_models
from alerts.smtp import SmtpConfig, SmtpError, SmtpTransport, send_budget_seconds
from alerts.store_retry import RetryingStore
from arbstream.config import AlertRule
from arbstream.kafka import KafkaConfig, reliable_producer_config, with_logger
from arbstream.schemas import DeadLetter, OpportunityEvent, PairSignal
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.client import InfluxError
from arbstream.store.influx.writer import write_ml_scores
from arbstream.store.models import RegistryConfig
from arbstream.store.mongo.alert_log import AlertStore

if TYPE_CHECKING:
    from arbstream.config import Settings

log = logging.getLogger(__name__)

#: Episodes whose latest opportunity window is kept in memory for episode-event alerts.
LEGS_CACHE = 10_000
COMMIT_EVERY = 100
COMMIT_SECONDS = 1.0
POLL_SECONDS = 0.5
#: ``ml_score`` rows kept while InfluxDB is unreachable (the oldest are dropped beyond it).
MAX_PENDING_SCORES = 10_000
#: Pause before writing ``ml_score`` again after a failed write, seconds.
SCORE_RETRY_SECONDS = 30.0
#: Commit errors meaning the consumer no longer owns its partitions (assignment lost,
#: rebalance under way, generation or member unknown): not fatal, the records are re-read.
GROUP_MOVED_ON = frozenset({KafkaError._ASSIGNMENT_LOST, KafkaError.REBALANCE_IN_PROGRESS,
                            KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID})


@dataclass(frozen=True)
class AlertsConfig:
    """Everything the alert worker needs of :class:`~arbstream.config.Settings`
    (``ARB_ALERT_*`` with the Kafka, MongoDB and ``ARB_SMTP_*`` slices), nothing else.

    ``rules`` the alert rules (``ARB_ALERT_RULES``); ``topic`` the topic read,
    ``deadletter_topic`` where invalid events go, ``group_id`` the consumer group,
    ``starting_offsets`` where a new group starts (``earliest``/``latest``);
    ``session_timeout_seconds`` the consumer group session timeout, ``cooldown_seconds`` the
    event time between two alerts of a rule on a pair, ``digest_seconds`` the wall-clock
    interval batched into one digest e-mail (all seconds); ``model_reload_seconds`` how often
    the champion pointers are looked at (wall-clock seconds), ``registry`` the model registry,
    ``influx`` where ``ml_score`` points go; ``pair_topic`` the pairs job's ``pair_signal``
    events (``ARB_PAIRS_TOPIC``), read when a pair-trading rule is configured
    (:mod:`alerts.pair_alerts`). Every secret sits in a slice that hides it from
    ``repr`` (Kafka SASL password, MongoDB URI, SMTP password, InfluxDB credentials), so the
    config can be logged.
    """

    rules: tuple[AlertRule, ...]
    topic: str
    deadletter_topic: str
    group_id: str
    starting_offsets: Literal["earliest", "latest"]
    session_timeout_seconds: float
    cooldown_seconds: float
    digest_seconds: float
    kafka: KafkaConfig
    mongo: MongoConfig
    smtp: SmtpConfig
    message: MessageConfig
    registry: RegistryConfig
    influx: InfluxConfig
    model_reload_seconds: float
    pair_topic: str = "arb.pair_signals"

    @classmethod
    def of(cls, settings: Settings) -> AlertsConfig:
        """The alert worker's slice of ``settings`` (not checked: see :func:`check_config`)."""
        return cls(
            rules=tuple(settings.alert_rules), topic=settings.alert_topic,
            deadletter_topic=settings.alert_deadletter_topic, group_id=settings.alert_group_id,
            starting_offsets=settings.alert_starting_offsets,
            session_timeout_seconds=settings.alert_session_timeout_seconds,
            cooldown_seconds=settings.alert_cooldown_seconds,
            digest_seconds=settings.alert_digest_seconds,
            kafka=KafkaConfig.of(settings), mongo=MongoConfig.of(settings),
            smtp=SmtpConfig.of(settings), message=MessageConfig.of(settings),
            registry=RegistryConfig.of(settings), influx=InfluxConfig.of(settings),
            model_reload_seconds=settings.alert_model_reload_seconds,
            pair_topic=settings.pairs_topic,
        )


def check_config(config: AlertsConfig) -> None:
    """What ``alerts run`` needs beyond :class:`~arbstream.config.Settings` validation.

    Raises:
        ValueError: no rule is configured, or a rule's ``opportunity_stage`` is not ``early``
            or ``final``.
    """
    if not config.rules:
        raise ValueError("no alert rules configured: set ARB_ALERT_RULES (JSON) or alert_rules "
                         "in the ARB_CONFIG_FILE file (see alerts/README.md)")
    for rule in config.rules:
        rule_stage(rule)


def consumer_config(config: AlertsConfig) -> dict[str, Any]:
    """librdkafka consumer settings: the Kafka client settings, the group, manual commits of
    stored offsets, the session timeout, and a poll interval longer than the longest SMTP send
    (:func:`~alerts.smtp.send_budget_seconds`; librdkafka keys in ms)."""
    session_ms = round(config.session_timeout_seconds * 1000)
    poll_ms = max(300_000, round(send_budget_seconds(config.smtp) * 1000 * 2) + 60_000)
    return {
        **with_logger(config.kafka.client_config()),  # librdkafka lines via Python logging
        "group.id": config.group_id,
        "client.id": "arbstream-alerts",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": config.starting_offsets,
        "session.timeout.ms": session_ms,
        "heartbeat.interval.ms": max(100, session_ms // 4),
        "max.poll.interval.ms": poll_ms,
        "topic.metadata.refresh.interval.ms": 10_000,
    }


def _context(rule: str, key: str, source: Event | AlertItem | PairAlertItem,
             scores: ModelScores = NO_SCORES) -> dict[str, Any]:
    """The identifying and figure fields of a decision log document, with the model outputs
    (``scores``, or those stored in an item); a pair alert's are :func:`~alerts.pair_alerts.
    pair_context`."""
    if isinstance(source, PairAlertItem):
        return pair_context(source)
    model = scores.log_fields()
    if isinstance(source, AlertItem):
        net, profit, duration = source.net_bps, source.profit_usd, source.duration_s
        model = {k: v for k in ("score", "score_version", "predicted_bps", "predicted_version")
                 if (v := getattr(source, k)) is not None}
    else:
        f = figures(source)
        net, profit, duration = f.net_bps, f.profit_usd, f.duration_s
    ctx = {
        "key": key, "rule": rule, "episode_id": source.episode_id, "symbol": source.symbol,
        "sell_symbol": source.sell_symbol, "buy_exchange": source.buy_exchange,
        "sell_exchange": source.sell_exchange,
        "event_ms": source.event_ms, "net_bps": net, "profit_usd": profit,
        "duration_s": duration,
    }
    stage = source.stage if isinstance(source, AlertItem) else (
        stage_of(source) if isinstance(source, OpportunityEvent) else None)
    if stage is not None:
        ctx["stage"] = stage
    ctx.update(model)
    return ctx


def _stored_legs(doc: dict[str, Any] | None) -> OpportunityEvent | None:
    """The stored latest window of an episode (:meth:`AlertStore.latest_opportunity`) as an
    opportunity event, or ``None`` when there is none or it does not validate."""
    if doc is None:
        return None
    try:
        return AlertOpportunityEvent.model_validate({"type": "opportunity", **doc})
    except ValidationError:
        return None


class AlertWorker:
    """Decides and sends alerts for events; :meth:`run` drives it from Kafka.

    Args:
        config: the worker's configuration (rules, topics, timings, Kafka, MongoDB, SMTP).
        transport: SMTP transport (default :class:`~alerts.smtp.SmtpTransport` of
            ``config.smtp``).
        store: claims and decision log (default
            :class:`~arbstream.store.mongo.alert_log.AlertStore` of ``config.mongo``).
        scorer: the champion models (default :class:`~alerts.scoring.Scorer` of
            ``config.registry``, reloaded every ``config.model_reload_seconds``).

    Raises:
        ValueError: no rule configured, or a rule with an unknown stage
            (:func:`check_config`).
    """

    def __init__(self, config: AlertsConfig, transport: SmtpTransport | None = None,
                 store: AlertStore | None = None, scorer: Scorer | None = None) -> None:
        check_config(config)
        self.config = config
        self.rules: list[AlertRule] = list(config.rules)
        self.by_name = {r.name: r for r in self.rules}
        self.transport = transport or SmtpTransport(config.smtp)
        #: the store, its calls retried through MongoDB connection errors (same interface)
        self.store: AlertStore = cast(AlertStore, RetryingStore(store or AlertStore(
            config.mongo)))
        self.scorer = scorer or Scorer(config.registry, config.model_reload_seconds)
        self.stats: Counter[str] = Counter()
        self._legs: OrderedDict[str, OpportunityEvent] = OrderedDict()
        #: keys known to be claimed (by this worker, or found claimed): no lookup needed
        self._claimed: OrderedDict[str, None] = OrderedDict()
        #: (rule, pair) -> the latest claim known on it: key, episode_id, event_ms
        self._last_alert: dict[tuple[str, ...], dict[str, Any]] = {}
        #: buffered decisions not yet written: (decision, key, reason) -> ctx, detail, source,
        #: times
        self._pending: dict[tuple[str, str, str], dict[str, Any]] = {}
        #: ``ml_score`` rows not yet written, and when writing may be tried again (epoch s)
        self._scores: list[dict[str, Any]] = []
        self._scores_retry_at = 0.0
        #: rule -> key -> (item, queued at, epoch seconds)
        self._digests: dict[str, dict[str, tuple[AlertItem, float]]] = {}
        self._producer: Producer | None = None

    # --- start-up ----------------------------------------------------------------------------
    def start(self) -> None:
        """Create indexes, load the champion models, mark sends interrupted by a previous
        crash, reload queued digests."""
        self.store.ensure_indexes()
        self.scorer.refresh(force=True)
        log.info("champion models: %s", self.scorer.versions())
        for rule in self.rules:
            missing = [self.scorer.problems[n] for n in required_models(rule)
                       if n in self.scorer.problems and n not in self.scorer.models]
            if missing:
                log.warning("rule %s has model thresholds and will not fire until a champion "
                            "is available: %s", rule.name, "; ".join(missing))
        for claim in self.store.mark_interrupted(send_budget_seconds(self.config.smtp)):
            item = (PairAlertItem if claim["item"].get("kind") == "pair"
                    else AlertItem).model_validate(claim["item"])
            log.warning("alert %s was being sent when a worker stopped: delivery unknown, "
                        "not resent", item.key)
            self.store.record(
                "failed", "interrupted", _context(item.rule, item.key, item),
                error="worker stopped during the SMTP transaction; delivery unknown, not resent",
                message_id=claim.get("message_id"), digest_id=claim.get("digest_id"),
            )
            self.stats["failed"] += 1
        digest_rules = [r.name for r in self.rules if r.digest]
        for claim in self.store.queued(digest_rules):
            item = AlertItem.model_validate(claim["item"])
            queued_at = claim["claimed_at"].timestamp()
            self._digests.setdefault(item.rule, {})[item.key] = (item, queued_at)
        pending = sum(len(v) for v in self._digests.values())
        if pending:
            log.info("reloaded %d queued digest alerts", pending)

    # --- one event ---------------------------------------------------------------------------
    def handle(self, value: bytes | None, source: dict[str, Any] | None = None) -> None:
        """Validate one record value and take every decision it calls for.

        Args:
            value: the raw record value.
            source: ``topic``, ``partition``, ``offset`` of the record, logged with decisions
                and dead letters.

        Suppressed decisions are buffered: call :meth:`flush_log` before acknowledging the
        record (:meth:`run` does before every commit).

        An invalid record, or one whose handling fails with anything but a MongoDB or Kafka
        error, goes to the dead-letter topic with the reason; the next record is handled as
        usual.

        Raises:
            pymongo.errors.PyMongoError, confluent_kafka.KafkaException: infrastructure
                failures (nothing may be committed).
        """
        source = source or {}
        try:
            event = parse_event(value if value is not None else b"")
        except ValueError as exc:
            self._deadletter(value or b"", str(exc), source)
            return
        self.stats["events"] += 1
        try:
            self.scorer.refresh()
            self._handle_event(event, source)
        except (PyMongoError, KafkaException):
            raise
        except Exception as exc:  # a bug or an input the model let through: not a stop
            log.exception("event at %s not processed", source)
            self.stats["failed_events"] += 1
            self._deadletter(value or b"", f"not processed: {type(exc).__name__}: {exc}",
                             source)

    def _handle_event(self, event: Event | PairSignal, source: dict[str, Any]) -> None:
        if isinstance(event, PairSignal):
            self._pair_signal(event, source)
            return
        if isinstance(event, OpportunityEvent) and stage_of(event) == "retracted":
            self._retract(event, source)
            return
        scores: ModelScores | None = None
        if isinstance(event, OpportunityEvent):
            self._remember(event)
            if self.scorer.active:
                scores = self._score(event, write=True)
        for rule in self.rules:
            if fires_on(rule, event) and mismatch(rule, event) is None:
                if scores is None:  # an episode event (its latest window), or nothing loaded
                    scores = (self._score(self._legs_of(event)) if self.scorer.active
                              else self.scorer.score(None))
                self._decide(rule, event, source, scores)

    def _score(self, window: OpportunityEvent | None, write: bool = False) -> ModelScores:
        """The champions' outputs for ``window``; with ``write``, its ``ml_score`` rows are
        queued for InfluxDB (:meth:`flush_scores`)."""
        row = window.model_dump() if window is not None else None
        scores = self.scorer.score(row)
        if write and row is not None:
            self._scores.extend(scores.points(row))
            self.stats["scored"] += 1
        return scores

    def _pair_signal(self, signal: PairSignal, source: dict[str, Any]) -> None:
        """A ``pair_signal`` event: for each pair rule it fires (:func:`~alerts.pair_alerts.
        pair_mismatch`), the excursion's alert is decided as an episode's: duplicate,
        cooldown (per rule and pair, event time), claim, send (no digest)."""
        self.stats["pair_signals"] += 1
        for rule in self.rules:
            if pair_mismatch(rule, signal) is not None:
                continue
            item = build_pair_item(rule, signal, self.config.message)
            ctx = pair_context(item)
            claim = None if item.key in self._claimed else self.store.claim_of(item.key)
            if item.key in self._claimed or claim is not None:
                self._known_claimed(item.key)
                self._suppress("duplicate", ctx, "already alerted", source)
                continue
            cooldown_ms = round(self.config.cooldown_seconds * 1000)
            other = self._cooldown_blocker(item, cooldown_ms) if cooldown_ms > 0 else None
            if other is not None:
                self._suppress("cooldown", ctx, f"excursion {other['episode_id']} of the pair "
                               f"alerted at event time {fmt_time(other['event_ms'])}; cooldown "
                               f"{self.config.cooldown_seconds:g} s", source)
                continue
            mid = message_id(item.key, self.config.message)
            msg = pair_message(item, rule, self.config.message)
            claimed = self.store.claim(item, "sending", mid)
            self._known_claimed(item.key)
            if not claimed:
                self._suppress("duplicate", ctx, "claimed concurrently", source)
                continue
            self._last_alert[self._pair(item, rule.name)] = {
                "_id": item.key, "episode_id": item.episode_id, "event_ms": item.event_ms}
            self._deliver(rule, [item], msg, mid, None, source)

    def _retract(self, event: OpportunityEvent, source: dict[str, Any]) -> None:
        """A retracted window: never alerted; logged ``retracted`` for each rule watching its
        pair; a digest alert it triggered that is still queued is withdrawn (claim removed, so
        a later window of the episode can alert); its prices stop being the episode's legs."""
        self.stats["retracted"] += 1
        known = self._legs.get(event.episode_id)
        if known is not None and known.opportunity_id == event.opportunity_id:
            del self._legs[event.episode_id]
        for rule in self.rules:
            if filter_mismatch(rule, event) is not None:
                continue
            key = alert_key(rule.name, event.episode_id)
            ctx = _context(rule.name, key, event)
            claim = self.store.claim_of(key)
            item = (claim or {}).get("item") or {}
            by_this = (claim is not None and item.get("trigger") == "opportunity"
                       and item.get("opportunity_id") == event.opportunity_id)
            if not by_this:
                detail = ("no alert of this episode under the rule" if claim is None else
                          f"the rule's alert of this episode ({claim['state']}) was triggered "
                          f"by another window")
                self.store.record("retracted", "no_alert", ctx, detail=detail, source=source)
            elif claim["state"] == "queued" and self.store.withdraw(key):
                self._digests.get(rule.name, {}).pop(key, None)
                self._claimed.pop(key, None)
                pair = self._pair(AlertItem.model_validate(item), rule.name)
                if self._last_alert.get(pair, {}).get("_id") == key:
                    del self._last_alert[pair]
                self.store.record("retracted", "withdrawn", ctx, source=source,
                                  detail="queued digest alert taken out before it was sent")
            else:
                detail = (f"the alert ({claim['state']}) was triggered by this window; an "
                          f"e-mail is not recalled and the episode is not alerted again")
                self.store.record("retracted", "alerted", ctx, detail=detail, source=source,
                                  message_id=claim.get("message_id"))
        log.info("opportunity window %s retracted", printable(event.opportunity_id))

    def _remember(self, event: OpportunityEvent) -> None:
        known = self._legs.get(event.episode_id)
        if known is None or known.event_ms <= event.event_ms:
            self._legs[event.episode_id] = event
        self._legs.move_to_end(event.episode_id)
        while len(self._legs) > LEGS_CACHE:
            self._legs.popitem(last=False)

    def _legs_of(self, event: Event) -> OpportunityEvent | None:
        if isinstance(event, OpportunityEvent):
            return event
        return self._legs.get(event.episode_id) or _stored_legs(
            self.store.latest_opportunity(event.episode_id))

    def _suppress(self, reason: str, ctx: dict[str, Any], detail: str,
                  source: dict[str, Any], decision: str = "suppressed") -> None:
        """Buffer a ``suppressed`` (or other repeated) decision, written by :meth:`flush_log`
        before any commit."""
        entry = self._pending.setdefault((decision, ctx["key"], reason), {"times": 0})
        entry.update(ctx=ctx, detail=detail, source=source)
        entry["times"] += 1
        self.stats[f"{decision}_{reason}"] += 1
        log.debug("%s %s (%s): %s", decision, ctx["key"], reason, detail)

    def flush_log(self) -> None:
        """Write the buffered decisions (one bulk write, counts aggregated)."""
        if not self._pending:
            return
        entries = [(decision, reason, e["ctx"],
                    {"detail": e["detail"], "source": e["source"]}, e["times"])
                   for (decision, _, reason), e in self._pending.items()]
        self.store.record_many(entries)
        self._pending.clear()

    def flush_scores(self, force: bool = False) -> None:
        """Write the queued ``ml_score`` rows to InfluxDB. A failure is logged and counted,
        never raised (alerts do not depend on it): the rows are kept (at most
        :data:`MAX_PENDING_SCORES`, newest) and writing pauses :data:`SCORE_RETRY_SECONDS`
        unless ``force``."""
        if not self._scores or (not force and time.time() < self._scores_retry_at):
            return
        try:
            written = write_ml_scores(self.config.influx, self._scores)
        except InfluxError as exc:
            self.stats["ml_score_write_failures"] += 1
            dropped = max(0, len(self._scores) - MAX_PENDING_SCORES)
            if dropped:
                self.stats["ml_scores_dropped"] += dropped
                del self._scores[:dropped]
            self._scores_retry_at = time.time() + SCORE_RETRY_SECONDS
            log.warning("ml_score points not written to InfluxDB (%d kept, %d dropped): %s",
                        len(self._scores), dropped, exc)
            return
        self.stats["ml_scores"] += written
        self._scores.clear()

    def _known_claimed(self, key: str) -> None:
        self._claimed[key] = None
        self._claimed.move_to_end(key)
        while len(self._claimed) > 100 * LEGS_CACHE:
            self._claimed.popitem(last=False)

    @staticmethod
    def _pair(item: AlertItem | PairAlertItem, rule: str) -> tuple[str, ...]:
        return (rule, item.symbol, item.sell_symbol, item.buy_exchange, item.sell_exchange)

    def _cooldown_blocker(self, item: AlertItem | PairAlertItem, cooldown_ms: int
                          ) -> dict[str, Any] | None:
        """An alert of the rule on the pair within the cooldown of ``item`` (event time):
        the last one this worker knows, else looked up in MongoDB."""
        known = self._last_alert.get(self._pair(item, item.rule))
        if known and known["_id"] != item.key and abs(
                known["event_ms"] - item.event_ms) < cooldown_ms:
            return known
        other = self.store.alerted_nearby(item, cooldown_ms)
        if other is not None:
            self._last_alert[self._pair(item, item.rule)] = other
        return other

    def _decide(self, rule: AlertRule, event: Event, source: dict[str, Any],
                scores: ModelScores = NO_SCORES) -> None:
        key = alert_key(rule.name, event.episode_id)
        ctx = _context(rule.name, key, event, scores)
        if key in self._claimed:
            self._suppress("duplicate", ctx, "already alerted", source)
            return
        claim = self.store.claim_of(key)
        if claim is not None:
            self._known_claimed(key)
            self._suppress("duplicate", ctx, f"already alerted (claim {claim['state']})", source)
            return
        below = model_mismatch(rule, scores)
        if below is not None:
            why, detail = below
            if why == "no_model":  # would have matched: say why it does not fire
                self._suppress("no_model", ctx, detail, source, decision="skipped")
            return
        item = build_item(rule, event, self._legs_of(event), self.config.message, scores)
        cooldown_ms = round(self.config.cooldown_seconds * 1000)
        if cooldown_ms > 0:
            other = self._cooldown_blocker(item, cooldown_ms)
            if other is not None:
                detail = (f"episode {other['episode_id']} of the same pair alerted at event "
                          f"time {fmt_time(other['event_ms'])}; cooldown "
                          f"{self.config.cooldown_seconds:g} s")
                self._suppress("cooldown", ctx, detail, source)
                return
        mid = None if rule.digest else message_id(key, self.config.message)
        # composed before the claim: a message that cannot be built leaves no claim behind
        msg = None if rule.digest else alert_message(item, rule, self.config.message)
        claimed = self.store.claim(item, "queued" if rule.digest else "sending", mid)
        self._known_claimed(key)
        if not claimed:
            self._suppress("duplicate", ctx, "claimed concurrently", source)
            return
        self._last_alert[self._pair(item, rule.name)] = {
            "_id": key, "episode_id": item.episode_id, "event_ms": item.event_ms}
        if mid is None or msg is None:  # digest rule
            self._digests.setdefault(rule.name, {})[key] = (item, time.time())
            self.store.record("queued", "digest", ctx, recipients=rule.recipients,
                              source=source)
            self.stats["queued"] += 1
            return
        self._deliver(rule, [item], msg, mid, None, source)

    def _deliver(self, rule: AlertRule, items: list[AlertItem] | list[PairAlertItem], msg: Any,
                 mid: str, did: str | None, source: dict[str, Any] | None) -> None:
        keys = [i.key for i in items]
        common = {"recipients": rule.recipients, "message_id": mid, "digest_id": did}
        if source:
            common["source"] = source
        try:
            result = self.transport.send(msg)
        except SmtpError as exc:
            reason = "permanent" if exc.permanent else "transient"
            self.store.finish(keys, "failed", error=str(exc), permanent=exc.permanent,
                              attempts=exc.attempts)
            for item in items:
                self.store.record("failed", reason, _context(rule.name, item.key, item),
                                  error=str(exc), attempts=exc.attempts, **common)
            self.stats["failed"] += len(items)
            log.error("alert %s not sent after %d attempt(s), %s failure: %s",
                      mid, exc.attempts, reason, exc)
            return
        refused = [{"recipient": r, "reply": reply} for r, (_, reply) in result.refused.items()]
        self.store.finish(keys, "sent", attempts=result.attempts, refused=refused)
        for item in items:
            self.store.record("sent", "digest" if did else "delivered",
                              _context(rule.name, item.key, item), attempts=result.attempts,
                              refused=refused, **common)
        self.stats["sent"] += len(items)
        self.stats["emails"] += 1
        log.info("sent %s to %s (%d alert(s), %d attempt(s))", mid, ", ".join(rule.recipients),
                 len(items), result.attempts)

    # --- digests -----------------------------------------------------------------------------
    def pending_digests(self) -> dict[str, int]:
        """Queued alerts per digest rule."""
        return {rule: len(items) for rule, items in self._digests.items() if items}

    def flush_digests(self, force: bool = False, now: float | None = None) -> int:
        """Send each digest rule's queued alerts as one e-mail once the oldest has waited
        ``ARB_ALERT_DIGEST_SECONDS`` (any age when ``force``). Returns e-mails attempted."""
        now = time.time() if now is None else now
        attempted = 0
        for name, queued in list(self._digests.items()):
            if not queued:
                continue
            oldest = min(at for _, at in queued.values())
            if not force and now - oldest < self.config.digest_seconds:
                continue
            rule = self.by_name.get(name)
            self._digests[name] = {}
            if rule is None:
                continue
            keys = sorted(queued)
            did = digest_id(name, keys)
            mid = message_id("digest|" + did, self.config.message)
            taken = {c["_id"] for c in self.store.take_digest(keys, did, mid)}
            items = [queued[k][0] for k in keys if k in taken]
            if not items:
                continue
            msg = digest_message(items, rule, self.config.message)
            self._deliver(rule, items, msg, mid, did, None)
            attempted += 1
        return attempted

    # --- Kafka -------------------------------------------------------------------------------
    def _deadletter(self, value: bytes, reason: str, source: dict[str, Any]) -> None:
        if self._producer is None:
            # linger.ms 5: librdkafka's default, as each dead letter is flushed at once
            self._producer = Producer(reliable_producer_config(
                self.config.kafka.client_config(), linger_ms=5))
        errors: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(str(err))

        letter = DeadLetter.of(value, reason, "alerts", source_topic=source.get("topic"),
                               source_partition=source.get("partition"),
                               source_offset=source.get("offset"))
        self._producer.produce(self.config.deadletter_topic, letter.to_json(),
                               on_delivery=delivered)
        left = self._producer.flush(10)
        if left or errors:
            raise KafkaException(f"dead letter not delivered to "
                                 f"{self.config.deadletter_topic}: {errors or left}")
        self.stats["deadletters"] += 1
        log.warning("invalid event at %s sent to %s: %s", source,
                    self.config.deadletter_topic, printable(reason))

    def _commit(self, consumer: Consumer) -> None:
        """Write buffered decisions and model scores, then commit the stored offsets
        (synchronously). A commit refused because the group moved on (the assignment was
        lost, e.g. the broker did not answer for a session timeout, or a rebalance) is logged
        and skipped: the records are read again by the partitions' next owner and find their
        claims, so nothing is sent twice."""
        self.flush_log()
        self.flush_scores()
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            code = exc.args[0].code()
            if code in GROUP_MOVED_ON:
                self.stats["commits_refused"] += 1
                log.warning("offsets not committed, records will be read again: %s",
                            exc.args[0].str())
            elif code != KafkaError._NO_OFFSET:
                raise

    def run(self, stop: threading.Event | None = None) -> None:
        """Consume ``ARB_ALERT_TOPIC`` until ``stop`` is set; then commit, send the queued
        digests and close.

        Raises:
            confluent_kafka.KafkaException: a fatal consumer error or a failed commit.
            pymongo.errors.PyMongoError: MongoDB unreachable for longer than the retry
                budget (:data:`alerts.store_retry.RETRY_SECONDS`), or another MongoDB error.
        """
        stop = stop or threading.Event()
        self.start()
        consumer = Consumer(consumer_config(self.config))

        def on_revoke(c: Consumer, _partitions: list) -> None:
            self._commit(c)

        topics = [self.config.topic]
        if any(is_pair_rule(r) for r in self.rules):
            topics.append(self.config.pair_topic)
        consumer.subscribe(topics, on_revoke=on_revoke)
        log.info("consuming %s as group %s with %d rule(s)", ", ".join(topics),
                 self.config.group_id, len(self.rules))
        uncommitted, last_commit = 0, time.monotonic()
        try:
            while not stop.is_set():
                msg = consumer.poll(POLL_SECONDS)
                if msg is not None and msg.error():
                    if msg.error().fatal():
                        raise KafkaException(msg.error())
                    log.warning("consumer: %s", msg.error())
                elif msg is not None:
                    source = {"topic": msg.topic(), "partition": msg.partition(),
                              "offset": msg.offset()}
                    self.handle(msg.value(), source)
                    consumer.store_offsets(message=msg)
                    uncommitted += 1
                if uncommitted and (msg is None or uncommitted >= COMMIT_EVERY
                                    or time.monotonic() - last_commit >= COMMIT_SECONDS):
                    self._commit(consumer)
                    uncommitted, last_commit = 0, time.monotonic()
                self.flush_digests()
            if uncommitted:
                self._commit(consumer)
            self.flush_scores(force=True)
            self.flush_digests(force=True)
        finally:
            consumer.close()
            if self._producer is not None:
                self._producer.flush(10)
            log.info("stopped: %s", dict(self.stats))
