"""The alert worker (``arbstream alerts run``, a real process) under faults of its services:
the broker paused, MongoDB stopped, the SMTP server stopped, each for 10 s while events are
being published.

Events are real: every ``arb.opportunities`` record of 2023-03-11 04:00-05:00 (the USDC
depeg; :func:`testing.alert_events.iaqf_events`), published at a steady rate before, during
and after the fault. One rule matches every episode, so each (rule, episode) must be e-mailed
exactly once: *lost* = expected alert keys never received, *duplicated* = extra copies. Time
to recover = from the service being healthy again to the moment every alert whose events
were published before that was received. Each scenario prints its figures (``FIGURES``
lines; ``pytest -s`` shows them) and asserts that the worker process did not die and stops
with exit code 0.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from pymongo.errors import ConnectionFailure

from alerts.rules import alert_key, mismatch
from alerts.store_retry import RetryingStore
from arbstream.config import AlertRule, Settings
from arbstream.schemas import parse_arb_event
from arbstream.store.config import MongoConfig
from arbstream.store.mongo.alert_log import AlertStore
from testing.alert_events import iaqf_events
from testing.components import Component, PacedProducer
from testing.faults import Figures, Outage, PrivateStack, SmtpServer, note, stopped, wait_until

pytestmark = pytest.mark.faults

START, END = datetime(2023, 3, 11, 4, tzinfo=UTC), datetime(2023, 3, 11, 5, tzinfo=UTC)
GAP = 120.0  # episode gap for 1-minute bars, as tests/alerts
RULE = AlertRule(name="every-episode", recipients=["desk@example.com"])
#: Events per second (the hour's 517 events take ~21 s); the fault starts ``FAULT_AFTER`` s
#: after the first e-mail (the worker has joined its group and worked off the events
#: published meanwhile: steady state), for 10 s.
RATE, FAULT_AFTER, FAULT_SECONDS = 25.0, 4.0, 10.0
#: The hang before the crash, and how long before it writes may be acknowledged but not yet
#: synced (lost by the crash), seconds.
HANG_SECONDS, SYNC_WINDOW = 3.0, 1.0


@pytest.fixture(scope="module")
def events(data_dir: Path) -> list[tuple[bytes, bytes]]:
    return iaqf_events(data_dir, START, END, Settings(episode_gap_seconds=GAP))


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def first_alert_index(events: list[tuple[bytes, bytes]]) -> dict[str, int]:
    """Alert key -> index of the first event that makes it alertable (computed with the
    rule semantics, independently of the worker)."""
    out: dict[str, int] = {}
    for i, (_, value) in enumerate(events):
        event = parse_arb_event(value)
        if mismatch(RULE, event) is None:
            out.setdefault(alert_key(RULE.name, event.episode_id), i)
    return out


def worker_settings(stack: PrivateStack, tmp_path: Path, smtp_port: int) -> Settings:
    """The private stack, this test's own topics, group and database; production SMTP retry
    defaults (5 attempts, 1-2-4-8 s backoff) on a plain local server; no cooldown."""
    uid = uuid.uuid4().hex[:8]
    base = stack.settings
    return Settings(
        state_dir=tmp_path, kafka_bootstrap=base.kafka_bootstrap, influx_url=base.influx_url,
        mongo_uri=base.mongo_uri, mongo_db=f"alert_faults_{uid}",
        alert_topic=f"faults.alerts.{uid}", alert_deadletter_topic=f"faults.alerts.{uid}.dl",
        alert_group_id=f"faults-{uid}", alert_starting_offsets="earliest",
        alert_cooldown_seconds=0.0, episode_gap_seconds=GAP, alert_rules=[RULE],
        smtp_host="127.0.0.1", smtp_port=smtp_port, smtp_security="none",
    )


def make_topics(conf: Settings) -> None:
    admin = AdminClient(conf.kafka_client_config())
    futures = admin.create_topics([NewTopic(t, num_partitions=2, replication_factor=1) for t
                                   in (conf.alert_topic, conf.alert_deadletter_topic)])
    for f in futures.values():
        f.result(15)


def log_and_claims(conf: Settings) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """``decision/reason`` -> key -> count of the decision log, and key -> claim state."""
    with AlertStore(MongoConfig.of(conf)) as store:
        docs = list(store.log.find({}, {"decision": 1, "reason": 1, "key": 1, "count": 1}))
        claims = {c["_id"]: c["state"] for c in store.claims.find({}, {"state": 1})}
    log: dict[str, dict[str, int]] = {}
    for d in docs:
        log.setdefault(f"{d['decision']}/{d['reason']}", {})[d["key"]] = d["count"]
    return log, claims


@dataclass
class Run:
    """One scenario's outcome: its figures, the outage, the keys expected, the decision log
    (``decision/reason`` -> key -> count) and the claims (key -> state) afterwards."""

    figures: Figures
    outage: Outage
    expected: set[str]
    log: dict[str, dict[str, int]]
    claims: dict[str, str]

    def assert_exact(self, keys: set[str] | None = None) -> None:
        """One e-mail per expected alert, nothing else; one ``sent`` decision (count 1)
        and a ``sent`` claim for each of ``keys`` (default: all)."""
        f = self.figures
        assert (f.lost, f.duplicated, f.unexpected) == (0, 0, 0), f.line()
        keys = self.expected if keys is None else keys
        sent = self.log.get("sent/delivered", {})
        assert {k: sent.get(k) for k in keys} == dict.fromkeys(keys, 1)
        assert {k: self.claims.get(k) for k in keys} == dict.fromkeys(keys, "sent")
        assert set(self.log) <= {"sent/delivered", "suppressed/duplicate"}, self.log.keys()


def run_scenario(name: str, stack: PrivateStack, tmp_path: Path,
                 events: list[tuple[bytes, bytes]], smtp: SmtpServer,
                 fault: Callable[[], contextlib.AbstractContextManager[Outage]]) -> Run:
    """Start the worker and the paced publisher; ``FAULT_AFTER`` s after the first e-mail
    inject ``fault()`` for its duration; wait until every alert is e-mailed; stop the
    worker (SIGTERM). Asserts it lived through it all and exited with 0."""
    conf = worker_settings(stack, tmp_path, smtp.port)
    make_topics(conf)
    first = first_alert_index(events)
    worker = Component(["alerts", "run"], conf, tmp_path / "worker.log")
    publisher = PacedProducer(conf, conf.alert_topic, events, RATE)
    try:
        publisher.start()
        wait_until(lambda: smtp.keys() or not worker.alive(), 60, what="the first e-mail")
        time.sleep(FAULT_AFTER)
        at_fault = (len(set(smtp.keys())), publisher.handed_by(time.monotonic()))
        with fault() as outage:
            pass
        assert worker.alive(), f"the worker died during the fault:\n{worker.tail()}"
        before = {k for k, i in first.items() if i < publisher.handed_by(outage.healthy)}

        def received(keys: set[str]) -> Callable[[], bool]:
            return lambda: keys <= set(smtp.keys()) or not worker.alive()

        recovery = outage.recovered(received(before), 90, "alerts of events before the end")
        publisher.finish()
        wait_until(received(set(first)), 90, what="every alert")
        time.sleep(2.0)  # nothing more may arrive
        assert worker.alive(), f"the worker died after the fault:\n{worker.tail()}"
    finally:
        code = worker.stop()
    figures = Figures.of(
        name, set(first), smtp.keys(), recovery, events=len(events),
        during=publisher.handed_by(outage.healthy) - publisher.handed_by(outage.started),
        down_s=round(outage.down_seconds, 2), emails_before=at_fault[0],
        events_before=at_fault[1],
    ).report()
    log, claims = log_and_claims(conf)
    note(f"{name}: decision log {({k: len(v) for k, v in log.items()})}, claims "
         f"{dict(Counter(claims.values()))}")
    assert code == 0, worker.tail()
    return Run(figures, outage, set(first), log, claims)


def test_broker_paused_while_events_are_published(
    fault_stack: PrivateStack, tmp_path: Path, events: list[tuple[bytes, bytes]],
    smtp: SmtpServer,
) -> None:
    """tansu SIGSTOPped 10 s (a hung broker or a partition): the publisher's client buffers;
    the worker's consumer-group session (10 s) times out, its commit is refused (assignment
    lost: skipped, no longer fatal) and it rejoins; the records it had not committed are read
    again and find their claims. Every alert is e-mailed once."""
    run = run_scenario("alerts/broker paused 10 s", fault_stack, tmp_path, events, smtp,
                       lambda: fault_stack.paused("kafka", FAULT_SECONDS))
    run.assert_exact()


def test_mongodb_stopped_while_events_are_handled(
    fault_stack: PrivateStack, tmp_path: Path, events: list[tuple[bytes, bytes]],
    smtp: SmtpServer,
) -> None:
    """SecantusDB (claims, decision log) stopped (SIGTERM) for 10 s and restarted on its
    data: the worker's calls wait and retry; nothing lost, nothing sent twice, the log and
    the claims exact."""
    run = run_scenario("alerts/mongodb stopped 10 s", fault_stack, tmp_path, events, smtp,
                       lambda: fault_stack.stopped("mongodb", FAULT_SECONDS))
    run.assert_exact()


def test_mongodb_hangs_then_crashes_while_events_are_handled(
    fault_stack: PrivateStack, tmp_path: Path, events: list[tuple[bytes, bytes]],
    smtp: SmtpServer,
) -> None:
    """SecantusDB SIGSTOPped 3 s (the worker's request in flight hangs), then SIGKILLed and
    restarted 7 s later: the request's connection is reset. Every alert is e-mailed once.

    Allowed, and only this: SecantusDB, like mongod with ``j: false``, acknowledges a write
    before it is synced, so a crash can lose the writes of its last moments: the claim or
    ``sent`` decision of an alert e-mailed less than ``SYNC_WINDOW`` s before the hang may
    be missing or stale (``sending``). The e-mails themselves are exact."""
    run = run_scenario("alerts/mongodb hangs 3 s, crashes, down 10 s", fault_stack, tmp_path,
                       events, smtp, lambda: fault_stack.stopped(
                           "mongodb", FAULT_SECONDS, kill=True, hang=HANG_SECONDS))
    window = smtp.keys_between(run.outage.started - SYNC_WINDOW, run.outage.started)
    run.assert_exact(run.expected - window)
    note(f"alerts e-mailed in the {SYNC_WINDOW:g} s before the hang: {len(window)}; of "
         f"them without a sent claim after the crash: "
         f"{sum(run.claims.get(k) != 'sent' for k in window)}")


def test_smtp_server_stopped_while_alerts_are_sent(
    fault_stack: PrivateStack, tmp_path: Path, events: list[tuple[bytes, bytes]],
    smtp: SmtpServer,
) -> None:
    """The SMTP server stopped 10 s and restarted on its port: the e-mail under way is
    retried with backoff (default 5 attempts, 1+2+4+8 s: more than the outage) and
    delivered; the next events wait in Kafka meanwhile; none lost or doubled. (An outage
    longer than the retry budget fails that alert, logged ``failed``/``transient``:
    alerts/README.md.)"""
    run = run_scenario("alerts/smtp stopped 10 s", fault_stack, tmp_path, events, smtp,
                       lambda: stopped(smtp, FAULT_SECONDS))
    run.assert_exact()


# --- the store's retries, deterministically ------------------------------------------------

@dataclass(frozen=True)
class Key:
    """A minimal alert item for the store (:class:`~arbstream.store.mongo.alert_log.
    AlertKey`)."""

    key: str
    rule: str = "r"
    episode_id: str = "BTC-USD|binance|kraken|2023-03-11T04:00:00.000Z"
    symbol: str = "BTC-USD"
    sell_symbol: str = "BTC-USD"
    buy_exchange: str = "binance"
    sell_exchange: str = "kraken"
    event_ms: int = 1678507200000

    def model_dump(self, *, mode: str) -> dict[str, Any]:
        return {"key": self.key}


def in_flight_during_crash(stack: PrivateStack, call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call`` in a thread while MongoDB hangs (its request unanswered), then crash
    and restart MongoDB; return ``{"result": ...}`` or ``{"error": exc}``."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = call()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["error"] = exc

    stack["mongodb"].pause()
    note("mongodb: SIGSTOP (hangs)")
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    time.sleep(1.0)  # the request is sent, and not answered
    assert thread.is_alive(), out
    with stack.stopped("mongodb", 3.0, kill=True):
        pass
    thread.join(60)
    assert not thread.is_alive()
    return out


def test_store_calls_are_retried_through_a_crash_and_claims_recognised(
    fault_stack: PrivateStack,
) -> None:
    """A multi-document update (``finish``: not a retryable write for pymongo) in flight
    when MongoDB crashes fails on the bare store and is retried by :class:`RetryingStore`;
    a claim retried after its insert was applied is recognised by its token."""
    conf = MongoConfig.of(fault_stack.settings.model_copy(
        update={"mongo_db": f"store_retry_{uuid.uuid4().hex[:8]}"}))
    with AlertStore(conf) as bare:
        assert bare.claim(Key("a"), "sending")  # and connected, as a worker is
        time.sleep(SYNC_WINDOW)  # synced before the crashes (see the hang-then-crash test)
        out = in_flight_during_crash(fault_stack, lambda: bare.finish(["a"], "sent"))
    assert isinstance(out.get("error"), ConnectionFailure), out
    retrying = RetryingStore(AlertStore(conf))
    try:
        assert retrying.claim_of("a")["state"] == "sending"  # connected, as a worker is
        out = in_flight_during_crash(fault_stack, lambda: retrying.finish(["a"], "sent"))
        assert "error" not in out and retrying.stats["retries"] >= 1, out
        assert retrying.claim_of("a")["state"] == "sent"
        # a lost reply: the insert applied, the same attempt's token inserts again
        assert retrying.store.claim(Key("b"), "sending", None, token="t1")
        assert retrying.store.claim(Key("b"), "sending", None, token="t1")
        assert not retrying.store.claim(Key("b"), "sending", None, token="t2")
        assert not retrying.store.claim(Key("b"), "sending", None)
        assert retrying.claim(Key("c"), "sending") and not retrying.claim(Key("c"), "queued")
    finally:
        retrying.close()
