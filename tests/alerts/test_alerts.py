"""The e-mail alert worker (alerts/) against a real SMTP server (aiosmtpd), the real local
Kafka broker (tansu) and MongoDB-protocol server (SecantusDB) of the ``settings`` fixture.

Events are real: IAQF bars of 2023-03-11 (USDC depeg) through the independent pandas spread
implementation and the real tracker functions, serialised as the stream job does
(``tests/alert_events.py``); ``test_events_contract`` pins that to the real
``spark_jobs.arbitrage._events`` on Spark. Each test uses its own topics, consumer group and
MongoDB database (``alerts_test_<id>``).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pydantic import ValidationError
from typer.testing import CliRunner

from alerts import message as M
from alerts.cli import app as alerts_app
from alerts.events import AlertOpportunityEvent, forbidden_char, parse_event, printable
from alerts.rules import alert_key, fires_on, mismatch, rule_stage
from alerts.smtp import PermanentSmtpError, SmtpConfig, SmtpTransport, TransientSmtpError
from alerts.worker import AlertsConfig, AlertWorker, check_config
from arbstream.config import AlertRule, Settings
from arbstream.schemas import (
    EpisodeEvent,
    OpportunityEvent,
    episode_start_ms,
    parse_arb_event,
)
from arbstream.shell.stack import free_port
from arbstream.store.config import MongoConfig
from arbstream.store.mongo.alert_log import AlertStore
from arbstream.store.mongo.schema import ALERTS, CLAIMS
from testing.alert_events import (
    event_dict,
    iaqf_events,
    iaqf_quotes,
    reference_rows,
    reference_runs,
    tracker_records,
)
from testing.support import REPO, consume

START = datetime(2023, 3, 11, 4, tzinfo=UTC)
END = datetime(2023, 3, 11, 5, tzinfo=UTC)
#: As in the demo: 1-minute bars need episodes that survive the minute between bars.
GAP = 120.0
SAME = "BTC-USDC|binance|kraken|"  # same-quote pair: binance BTC-USDC → kraken BTC-USDC
LONG = SAME + "2023-03-11T03:59:59.000Z"  # 2585 s, cooldown pair of LATER
LATER = SAME + "2023-03-11T04:49:59.000Z"  # 545 s, starts ~5 min after LONG ended
OTHER = "BTC-USDT/BTC-USDC|binance|kraken|2023-03-11T04:49:59.000Z"  # cross-quote
USER, PASSWORD = "alerts@desk.example", "correct horse battery staple"


# --- data ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def events(data_dir: Path) -> list[tuple[bytes, bytes]]:
    """Every arb.opportunities record of 04:00-05:00 on 2023-03-11, in the tracker's order."""
    return iaqf_events(data_dir, START, END, Settings(episode_gap_seconds=GAP))


def of_episode(events: list[tuple[bytes, bytes]], *episode_ids: str) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in events if json.loads(v)["episode_id"] in episode_ids]


def parsed(values: list[tuple[bytes, bytes]]) -> list[OpportunityEvent | EpisodeEvent]:
    return [parse_arb_event(v) for _, v in values]


# --- services --------------------------------------------------------------------------------

class Inbox:
    """aiosmtpd handler keeping every accepted message; ``on_data`` runs before the reply."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[Any] = []
        self.auth_calls: list[tuple[str, bool]] = []
        self.on_data: Callable[[EmailMessage], None] | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                       policy=email.policy.default)
        self.messages.append(msg)
        over_tls = (session.ssl is not None  # STARTTLS, or implicit TLS:
                    or server.transport.get_extra_info("ssl_object") is not None)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), over_tls,
                               session.authenticated))
        if self.on_data is not None:
            self.on_data(msg)
        return "250 Message accepted for delivery"

    def authenticator(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == USER
              and auth_data.password.decode() == PASSWORD)
        self.auth_calls.append((mechanism, ok))
        return AuthResult(success=ok, handled=False)

    def keys(self) -> list[str]:
        return [str(k).strip() for m in self.messages
                for k in m.get_all("X-Arbstream-Alert-Key", [])]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trustme CA and a server certificate for 127.0.0.1; the CA as a PEM file."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return {"server": server, "ca_file": ca_file}


@pytest.fixture
def smtp() -> Iterator[Callable[..., tuple[Inbox, int]]]:
    """Start real SMTP servers: ``smtp(port=None, **aiosmtpd options) -> (inbox, port)``."""
    started: list[Controller] = []

    def start(port: int | None = None, **options: Any) -> tuple[Inbox, int]:
        inbox = Inbox()
        if options.pop("auth", False):
            options["authenticator"] = inbox.authenticator
        port = port or free_port()
        controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
        controller.start()
        started.append(controller)
        return inbox, port

    yield start
    for c in started:
        c.stop()


def make_topics(settings: Settings, *names: str, partitions: int = 2) -> None:
    admin = AdminClient(settings.kafka_client_config())
    futures = admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1)
                                   for n in names])
    for f in futures.values():
        f.result(15)


def publish(settings: Settings, records: list[tuple[bytes | None, bytes]]) -> None:
    producer = Producer({**settings.kafka_client_config(), "acks": "all", "linger.ms": 5})
    for key, value in records:
        producer.produce(settings.alert_topic, value, key)
    assert producer.flush(15) == 0


def alert_settings(base: Settings, tmp_path: Path, smtp_port: int, **overrides: Any) -> Settings:
    """Settings on the fixture's Kafka and MongoDB with this test's own topics, group and
    database, a plain local SMTP server, fast retries and no cooldown unless overridden."""
    uid = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "state_dir": tmp_path, "data_dir": base.data_dir,
        "kafka_bootstrap": base.kafka_bootstrap, "influx_url": base.influx_url,
        "mongo_uri": base.mongo_uri, "mongo_db": f"alerts_test_{uid}",
        "alert_topic": f"alerts.test.{uid}", "alert_deadletter_topic": f"alerts.test.{uid}.dl",
        "alert_group_id": f"alerts-test-{uid}", "alert_starting_offsets": "earliest",
        "alert_session_timeout_seconds": 6.0, "alert_cooldown_seconds": 0.0,
        "smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_security": "none",
        "smtp_timeout_seconds": 5.0, "smtp_retry_attempts": 3,
        "smtp_retry_initial_seconds": 0.05, "smtp_retry_max_seconds": 1.0,
        "episode_gap_seconds": GAP, "grafana_url": "http://grafana.test:3000",
        "alert_rules": [rule()],
    }
    values.update(overrides)
    return Settings(**values)


def rule(**fields: Any) -> AlertRule:
    """A rule on the same-quote binance → kraken BTC-USDC pair, 60 s, 20 bps, 10 USD."""
    values: dict[str, Any] = {
        "name": "usdc-depeg", "symbols": ["BTC-USDC"], "buy_exchanges": ["binance"],
        "sell_exchanges": ["kraken"], "cross_quote": False, "min_net_bps": 20.0,
        "min_profit_usd": 10.0, "min_duration_s": 60.0, "recipients": ["desk@example.com"],
    }
    values.update(fields)
    return AlertRule(**values)


def wait_for(condition: Callable[[], Any], timeout: float = 120.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


@contextmanager
def running(worker: AlertWorker) -> Iterator[list[BaseException]]:
    """Run ``worker.run`` in a thread; stop it (commit, flush digests) at exit."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def target() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


def feed(conf: Settings, records: list[tuple[bytes, bytes]]) -> None:
    """Handle ``records`` (key, value) in a fresh worker in this thread, then log and close."""
    worker = AlertWorker(AlertsConfig.of(conf))
    worker.start()
    for _, value in records:
        worker.handle(value)
    worker.flush_log()
    worker.store.close()


def log_docs(conf: Settings, **query: Any) -> list[dict[str, Any]]:
    with AlertStore(MongoConfig.of(conf)) as store:
        return list(store.log.find(query))


def claims(conf: Settings) -> dict[str, dict[str, Any]]:
    with AlertStore(MongoConfig.of(conf)) as store:
        return {c["_id"]: c for c in store.claims.find({})}


def parts(msg: EmailMessage) -> tuple[str, str]:
    """The text/plain and text/html bodies of a multipart/alternative message."""
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


# --- the event contract ----------------------------------------------------------------------

def test_events_contract(data_dir: Path, tmp_path: Path) -> None:
    """The stream's real event writer (:func:`spark_jobs.sinks.records.event_json`) over the
    real engine's records for real quotes, converted through Arrow as the sink receives them,
    validates with the models and equals what tests/alert_events.py publishes for the same
    quotes (an independent path: pandas reference spreads and the pure tracker)."""

    from spark_jobs.engine import INPUT_COLUMNS, Engine, EngineConfig
    from spark_jobs.market import records_table
    from spark_jobs.sinks.records import FIELDS, event_json

    conf = Settings(state_dir=tmp_path, episode_gap_seconds=GAP)
    start, end = START, datetime(2023, 3, 11, 4, 8, tzinfo=UTC)
    quotes = iaqf_quotes(data_dir, start, end)
    frame = quotes.assign(
        kind="quote", bid_size=None, ask_size=None, bids=None, asks=None, error=None,
        value=None, topic="md.x.quotes", partition=0, offset=0, home=True,
        dedupe_hash=[hash(k) for k in quotes["dedupe_key"]])[INPUT_COLUMNS]
    cfg, engine = EngineConfig.of(conf), Engine()
    now = 1_800_000_000_000
    records = engine.process(frame, now, cfg)
    for step in range(1, 4):  # idle: every window closes and open episodes are flushed
        records += engine.process(frame.iloc[:0], now + step * (cfg.idle_ms + 1), cfg)
    table = records_table(records)
    rows = table.to_pylist()
    out = [(r["opportunity_id"], event_json("opportunity", {k: r[k] for k in
                                                            FIELDS["opportunity"]}))
           for r in rows if r["record"] == "opportunity"]
    out += [(r["episode_id"], event_json("episode", {k: r[k] for k in FIELDS["episode"]}))
            for r in rows if r["record"] == "episode"]

    models = [parse_arb_event(v) for _, v in out]  # every event validates
    # ... with the alert worker's model too
    assert [parse_event(v).model_dump() for _, v in out] == [m.model_dump() for m in models]
    kinds = Counter((m.type, getattr(m, "event", None)) for m in models)
    assert kinds[("opportunity", None)] > 40 and kinds[("episode", "closed")] > 5
    assert kinds[("episode", "opened")] == kinds[("episode", "closed")]
    assert all(k == (m.opportunity_id if m.type == "opportunity" else m.episode_id)
               for (k, _), m in zip(out, models, strict=True))
    stages = Counter(json.loads(v).get("stage") for _, v in out)
    assert stages["early"] > 0 and stages["final"] > 0
    final = sorted((
        {k: v for k, v in json.loads(value).items() if k not in ("stage", "emitted_ts")}
        for _, value in out if json.loads(value).get("stage") in ("final", None)
    ), key=json.dumps)
    # the independent path: reference spread rows through the pure tracker
    reference = [event_dict(r) for r in tracker_records(reference_rows(quotes, conf), conf,
                                                        reference_runs(quotes, conf))]
    assert sorted(reference, key=json.dumps) == final


def test_event_models_reject_what_the_stream_never_sends(
    events: list[tuple[bytes, bytes]],
) -> None:
    opp = next(json.loads(v) for _, v in events if json.loads(v)["type"] == "opportunity")
    ep = next(json.loads(v) for _, v in events if json.loads(v)["type"] == "episode")
    ok = parse_arb_event(json.dumps(opp))
    assert isinstance(ok, OpportunityEvent)
    assert ok.duration_s == (ok.event_ms - episode_start_ms(ok.episode_id)) / 1000
    assert isinstance(parse_arb_event(json.dumps(ep).encode()), EpisodeEvent)

    def reason(obj: Any) -> str:
        with pytest.raises(ValueError) as info:
            parse_arb_event(obj if isinstance(obj, bytes) else json.dumps(obj))
        return str(info.value)

    assert "malformed JSON" in reason(b"{not json")
    assert "malformed JSON" in reason(b"\xff\xfe")
    assert "JSON object" in reason([1, 2])
    assert "type" in reason({**opp, "type": "quote"})
    assert "schema_version" in reason({**opp, "schema_version": 2})
    assert "extra" in reason({**opp, "surprise": 1}).lower()
    assert "buy_ask" in reason({k: v for k, v in opp.items() if k != "buy_ask"})
    assert "episode_id" in reason({**opp, "episode_id": "no-start"})
    assert "cross_quote" in reason({**opp, "cross_quote": not opp["cross_quote"]})
    assert "status" in reason({**ep, "status": "closed" if ep["event"] == "opened" else "open"})
    assert "window_end" in reason({**opp, "window_end": "2023-03-11T04:00:00"})  # no zone


# --- configuration ---------------------------------------------------------------------------

RULES_TOML = """\
alert_cooldown_seconds = 600

[[alert_rules]]
name = "btc-big"
symbols = ["BTC-USD", "BTC-USDC"]
buy_exchanges = ["binance"]
min_net_bps = 25
min_profit_usd = 50
min_duration_s = 30
recipients = ["desk@example.com", "risk@example.com"]

[[alert_rules]]
name = "all-digest"
digest = true
recipients = ["research@example.com"]
"""

RULES_YAML = """\
alert_rules:
  - name: btc-big
    symbols: [BTC-USD, BTC-USDC]
    buy_exchanges: [binance]
    min_net_bps: 25
    min_profit_usd: 50
    min_duration_s: 30
    recipients: [desk@example.com, risk@example.com]
  - name: all-digest
    digest: true
    recipients: [research@example.com]
"""


@pytest.mark.parametrize("suffix,text", [(".toml", RULES_TOML), (".yaml", RULES_YAML)])
def test_rules_from_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str,
                                text: str) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"arbstream{suffix}"
    path.write_text(text)
    monkeypatch.setenv("ARB_CONFIG_FILE", str(path))
    conf = Settings()
    big, digest = conf.alert_rules
    assert big.name == "btc-big" and big.symbols == ["BTC-USD", "BTC-USDC"]
    assert big.min_net_bps == 25 and big.min_profit_usd == 50 and big.min_duration_s == 30
    assert big.recipients == ["desk@example.com", "risk@example.com"] and not big.digest
    assert big.cross_quote and big.sell_exchanges == []
    assert digest.digest and digest.symbols == []


def test_rules_from_env_and_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ARB_ALERT_RULES", json.dumps([
        {"name": "a", "recipients": ["x@example.com"], "min_net_bps": 5, "digest": True}]))
    assert Settings().alert_rules == [AlertRule(name="a", recipients=["x@example.com"],
                                                min_net_bps=5, digest=True)]

    def error(rules: Any, **other: Any) -> str:
        with pytest.raises(ValidationError) as info:
            Settings(alert_rules=rules, **other)
        return str(info.value)

    assert "recipients" in error([{"name": "a", "recipients": []}])
    assert "ops@example.com" in error([{"name": "a", "recipients": ["not-an-address"]}])
    assert "canonical" in error([{"name": "a", "recipients": ["x@e.com"], "symbols": ["btc"]}])
    assert "buy_exchanges" in error([{"name": "a", "recipients": ["x@e.com"],
                                      "buy_exchanges": ["Binance"]}])
    assert "unique" in error([{"name": "a", "recipients": ["x@e.com"]}] * 2)
    assert "min_net" in error([{"name": "a", "recipients": ["x@e.com"], "min_net": 1}])
    assert "name" in error([{"name": "bad name!", "recipients": ["x@e.com"]}])
    assert "SMTP_PASSWORD" in error([], smtp_username="u")
    assert "alert_from" in error([], alert_from="nobody")
    # the worker refuses to start without rules, with exit code 2
    monkeypatch.delenv("ARB_ALERT_RULES")
    from arbstream.config import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(alerts_app, ["run"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and "no alert rules" in result.output


def test_rule_semantics(events: list[tuple[bytes, bytes]]) -> None:
    """Duration so far comes from the episode id (opportunities) or the event (episodes);
    filters and minimums as documented."""
    evs = parsed(of_episode(events, LATER))
    r = rule(min_net_bps=0, min_profit_usd=0, min_duration_s=60)
    opened = next(e for e in evs if isinstance(e, EpisodeEvent) and e.event == "opened")
    closed = next(e for e in evs if isinstance(e, EpisodeEvent) and e.event == "closed")
    windows = [e for e in evs if isinstance(e, OpportunityEvent)]
    assert opened.duration_s == 1.0 and "duration" in (mismatch(r, opened) or "")
    first_ok = next(w for w in windows if mismatch(r, w) is None)
    assert first_ok.duration_s >= 60 and all(w.duration_s < 60 for w in windows
                                             if w.event_ms < first_ok.event_ms)
    assert mismatch(r, closed) is None and closed.duration_s == 545.0
    assert "symbol" in mismatch(rule(symbols=["ETH-USD"]), closed)
    assert "buy exchange" in mismatch(rule(buy_exchanges=["kraken"]), closed)
    assert "sell exchange" in mismatch(rule(sell_exchanges=["binance"]), closed)
    assert "net" in mismatch(rule(min_net_bps=closed.peak_net_bps + 1), closed)
    assert "profit" in mismatch(rule(min_profit_usd=1e9), closed)
    cross = parsed(of_episode(events, OTHER))[-1]
    assert cross.cross_quote and "cross-quote" in mismatch(rule(symbols=[]), cross)
    assert mismatch(rule(symbols=["BTC-USDC"], buy_exchanges=[], sell_exchanges=[],
                         cross_quote=True, min_net_bps=0, min_profit_usd=0,
                         min_duration_s=0), cross) is None  # sell leg's symbol matches


# --- delivery --------------------------------------------------------------------------------

def test_delivery_content_once_per_episode_and_deadletters(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    inbox, port = smtp()
    conf = alert_settings(settings, tmp_path, port)
    # one partition: the worker sees the events in the tracker's order (content is checked)
    make_topics(conf, conf.alert_topic, conf.alert_deadletter_topic, partitions=1)
    records = of_episode(events, LATER)
    bad = [(b"x", b"{broken"), (None, json.dumps({"schema_version": 1, "type": "episode"})
                                .encode())]
    publish(conf, records[:5] + bad + records[5:])
    worker = AlertWorker(AlertsConfig.of(conf))
    with running(worker) as errors:
        wait_for(lambda: inbox.messages, what="the alert e-mail")
        wait_for(lambda: worker.stats["events"] == len(records), what="every event")
    assert not errors
    key = alert_key("usdc-depeg", LATER)
    [msg] = inbox.messages
    mail = M.MessageConfig.of(conf)
    assert msg["Message-ID"] == M.message_id(key, mail) == M.message_id(key, mail)
    assert inbox.keys() == [key] and msg["To"] == "desk@example.com"
    assert msg["Auto-Submitted"] == "auto-generated"
    text, html = parts(msg)
    # the alert is taken at the first window where the episode had lasted 60 s
    first = next(e for e in parsed(records) if isinstance(e, OpportunityEvent)
                 and e.duration_s >= 60)
    link = (f"http://grafana.test:3000/d/arbstream-monitor?var-symbol=BTC-USDC"
            f"&from={episode_start_ms(LATER) - 300_000}&to={first.event_ms + 300_000}")
    for body in (text, html.replace("&amp;", "&")):
        assert "binance" in body and "kraken" in body and "BTC-USDC" in body
        assert M.fmt_price(first.buy_ask) in body and M.fmt_price(first.sell_bid) in body
        assert M.fmt_fee(first.buy_fee) in body and M.fmt_fee(first.sell_fee) in body
        assert M.fmt_bps(first.net_bps) in body and M.fmt_bps(first.gross_bps) in body
        assert M.fmt_size(first.size_base, "BTC") in body
        assert M.fmt_amount(first.expected_profit, "USDC") in body
        assert f"≈ {first.expected_profit_usd:,.2f} USD" in body
        assert M.fmt_duration(first.duration_s) in body
        assert link in body
    assert f'href="{link.replace("&", "&amp;")}"' in html and html.startswith("<!DOCTYPE html>")
    assert M.fmt_bps(first.net_bps) in msg["Subject"]
    # decision log: one sent, every later matching event suppressed as a duplicate
    docs = {(d["decision"], d["reason"]): d for d in log_docs(conf)}
    sent = docs[("sent", "delivered")]
    assert sent["count"] == 1 and sent["message_id"] == msg["Message-ID"]
    assert sent["attempts"] == 1 and sent["recipients"] == ["desk@example.com"]
    later = [e for e in parsed(records) if mismatch(conf.alert_rules[0], e) is None]
    assert docs[("suppressed", "duplicate")]["count"] == len(later) - 1
    assert claims(conf)[key]["state"] == "sent"
    # invalid events went to the dead-letter topic with their reason; the worker went on
    letters = [json.loads(m.value()) for m in consume(conf, conf.alert_deadletter_topic)]
    assert sorted(d["raw"] for d in letters) == sorted(v.decode() for _, v in bad)
    assert all(d["stage"] == "alerts" and d["source_topic"] == conf.alert_topic
               for d in letters)
    reasons = " ".join(d["reason"] for d in letters)
    assert "malformed JSON" in reasons and "episode_id" in reasons


def test_starttls_with_authentication_and_implicit_tls(
    settings: Settings, tmp_path: Path, smtp: Any, tls: dict[str, Any],
    events: list[tuple[bytes, bytes]],
) -> None:
    inbox, port = smtp(tls_context=tls["server"], require_starttls=True, auth=True,
                       auth_required=True)
    conf = alert_settings(settings, tmp_path, port, smtp_security="starttls",
                          smtp_username=USER, smtp_password=PASSWORD,
                          smtp_ca_file=tls["ca_file"])
    assert PASSWORD not in repr(conf) and PASSWORD not in str(conf.model_dump())
    assert PASSWORD not in repr(AlertsConfig.of(conf))
    feed(conf, of_episode(events, LATER))
    [(mail_from, rcpts, over_tls, authenticated)] = inbox.envelopes
    assert over_tls and authenticated and rcpts == ["desk@example.com"]
    assert mail_from == "alerts@arbstream.local"
    assert ("PLAIN", True) in inbox.auth_calls or ("LOGIN", True) in inbox.auth_calls
    # implicit TLS (port 465 style) with the same CA
    inbox2, port2 = smtp(ssl_context=tls["server"])
    conf2 = alert_settings(settings, tmp_path, port2, smtp_security="tls",
                           smtp_ca_file=tls["ca_file"])
    msg = M.alert_message(M.build_item(conf2.alert_rules[0], parse_arb_event(
        of_episode(events, LATER)[-1][1]), None, M.MessageConfig.of(conf2)),
        conf2.alert_rules[0], M.MessageConfig.of(conf2))
    assert SmtpTransport(SmtpConfig.of(conf2)).send(msg).attempts == 1
    assert inbox2.envelopes[0][2] is True
    # a server certificate the client does not trust is a permanent failure
    conf3 = alert_settings(settings, tmp_path, port2, smtp_security="tls")
    with pytest.raises(PermanentSmtpError, match="certificate"):
        SmtpTransport(SmtpConfig.of(conf3)).send(msg)


def test_wrong_password_is_logged_failed_without_retries(
    settings: Settings, tmp_path: Path, smtp: Any, tls: dict[str, Any],
    events: list[tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture,
) -> None:
    inbox, port = smtp(tls_context=tls["server"], require_starttls=True, auth=True,
                       auth_required=True)
    wrong = "not-the-password"
    conf = alert_settings(settings, tmp_path, port, smtp_security="starttls",
                          smtp_username=USER, smtp_password=wrong,
                          smtp_ca_file=tls["ca_file"], smtp_retry_attempts=5)
    sleeps: list[float] = []
    worker = AlertWorker(AlertsConfig.of(conf),
                         transport=SmtpTransport(SmtpConfig.of(conf), sleep=sleeps.append))
    worker.start()
    t0 = time.monotonic()
    for _, value in of_episode(events, LATER):
        worker.handle(value)
    worker.flush_log()
    assert time.monotonic() - t0 < 10 and sleeps == []  # no retry, no backoff
    assert inbox.messages == [] and {ok for _, ok in inbox.auth_calls} == {False}
    assert len(inbox.auth_calls) <= 2  # smtplib tries each offered mechanism once
    key = alert_key("usdc-depeg", LATER)
    [failed] = log_docs(conf, decision="failed")
    assert failed["reason"] == "permanent" and failed["attempts"] == 1
    assert "535" in failed["error"] and "authentication" in failed["error"]
    assert claims(conf)[key]["state"] == "failed"
    # the episode's later events do not try again
    assert log_docs(conf, decision="suppressed")[0]["reason"] == "duplicate"
    assert wrong not in caplog.text and wrong not in json.dumps(log_docs(conf), default=str)
    worker.store.close()


def test_server_down_then_back_is_delivered_after_backoff(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    port = free_port()
    conf = alert_settings(settings, tmp_path, port, smtp_retry_attempts=6,
                          smtp_retry_initial_seconds=0.2, smtp_retry_max_seconds=2.0)
    sleeps: list[float] = []
    started: list[Inbox] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:  # the server comes back during the second backoff
            started.append(smtp(port=port)[0])
        time.sleep(seconds)

    worker = AlertWorker(AlertsConfig.of(conf),
                         transport=SmtpTransport(SmtpConfig.of(conf), sleep=sleep))
    worker.start()
    for _, value in of_episode(events, LATER):
        worker.handle(value)
    worker.flush_log()
    assert sleeps == [0.2, 0.4]  # exponential
    [inbox] = started
    assert inbox.keys() == [alert_key("usdc-depeg", LATER)]
    [sent] = log_docs(conf, decision="sent")
    assert sent["attempts"] == 3
    # with the server down for good, it gives up after the configured attempts
    conf2 = alert_settings(settings, tmp_path, free_port(), smtp_retry_attempts=3,
                           smtp_retry_initial_seconds=0.01)
    with pytest.raises(TransientSmtpError) as info:
        SmtpTransport(SmtpConfig.of(conf2)).send(inbox.messages[0])
    assert info.value.attempts == 3 and "Connection" in str(info.value)
    worker.store.close()


# --- noise control ---------------------------------------------------------------------------

def test_cooldown_per_rule_symbol_and_pair(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """LONG and LATER are two episodes of one pair; OTHER is another pair. The cooldown runs
    in event time from LONG's alert and is re-checked on each of LATER's events."""
    wide = rule(name="wide", symbols=[], buy_exchanges=[], sell_exchanges=[],
                cross_quote=True, min_duration_s=60)
    records = of_episode(events, LONG, LATER, OTHER)

    def first_match(episode_id: str) -> int:
        return next(e.event_ms for e in parsed(records)
                    if e.episode_id == episode_id and mismatch(wide, e) is None)

    gap_s = (first_match(LATER) - first_match(LONG)) / 1000
    closed = next(e for e in parsed(records) if isinstance(e, EpisodeEvent)
                  and e.episode_id == LATER and e.event == "closed")

    def run(cooldown: float) -> tuple[Inbox, Settings]:
        inbox, port = smtp()
        conf = alert_settings(settings, tmp_path, port, alert_cooldown_seconds=cooldown,
                              alert_rules=[wide])
        feed(conf, records)
        return inbox, conf

    # a cooldown longer than all of LATER: suppressed throughout; OTHER is another pair
    long_cd = (closed.event_ms - first_match(LONG)) / 1000 + 1
    inbox, conf = run(long_cd)
    assert sorted(inbox.keys()) == sorted([alert_key("wide", LONG), alert_key("wide", OTHER)])
    [cool] = log_docs(conf, reason="cooldown")
    assert cool["episode_id"] == LATER and cool["count"] > 5
    assert LONG in cool["detail"] and f"cooldown {long_cd:g} s" in cool["detail"]
    assert alert_key("wide", LATER) not in claims(conf)
    # a cooldown ending 60 s into LATER: suppressed, then alerted once it is over
    inbox, conf = run(gap_s + 60)
    assert len(inbox.keys()) == 3
    [cool] = log_docs(conf, reason="cooldown")
    later = claims(conf)[alert_key("wide", LATER)]
    assert later["event_ms"] >= first_match(LONG) + (gap_s + 60) * 1000
    assert cool["count"] >= 1 and cool["event_ms"] < later["event_ms"]
    # no cooldown: LATER at its first match
    inbox, conf = run(0)
    assert len(inbox.keys()) == 3 and not log_docs(conf, reason="cooldown")
    assert claims(conf)[alert_key("wide", LATER)]["event_ms"] == first_match(LATER)


def test_digest_batches_matches_and_survives_a_restart(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    inbox, port = smtp()
    digest = rule(name="digest", symbols=[], buy_exchanges=[], sell_exchanges=[],
                  cross_quote=True, min_duration_s=300, min_net_bps=50,
                  recipients=["research@example.com", "desk@example.com"], digest=True)
    conf = alert_settings(settings, tmp_path, port, alert_rules=[digest],
                          alert_digest_seconds=60.0)
    worker = AlertWorker(AlertsConfig.of(conf))
    worker.start()
    for _, value in events:
        worker.handle(value)
    worker.flush_log()
    queued = worker.pending_digests()["digest"]
    episodes = {e.episode_id for e in parsed(events) if mismatch(digest, e) is None}
    assert queued == len(episodes) >= 3
    assert worker.flush_digests() == 0 and inbox.messages == []  # interval not over
    # a new worker (a restart) reloads the queued alerts from MongoDB and sends one e-mail
    worker.store.close()
    again = AlertWorker(AlertsConfig.of(conf))
    again.start()
    assert again.pending_digests() == {"digest": queued}
    assert again.flush_digests(now=time.time() + 61) == 1
    [msg] = inbox.messages
    assert sorted(inbox.keys()) == sorted(alert_key("digest", e) for e in episodes)
    assert msg["To"] == "research@example.com, desk@example.com"
    assert f"digest of {queued} episodes" in msg["Subject"]
    text, html = parts(msg)
    for episode_id in episodes:
        assert episode_id in text and episode_id in html
    did = msg["X-Arbstream-Digest-Id"].strip()
    assert msg["Message-ID"] == M.message_id("digest|" + did, M.MessageConfig.of(conf))
    assert {c["state"] for c in claims(conf).values()} == {"sent"}
    sent = log_docs(conf, decision="sent")
    assert len(sent) == queued and {d["reason"] for d in sent} == {"digest"}
    assert len(log_docs(conf, decision="queued")) == queued
    assert again.flush_digests(force=True) == 0  # nothing left, nothing twice
    again.store.close()


# --- crash and restart -----------------------------------------------------------------------

def test_no_duplicates_after_sigkill_mid_stream(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """The real worker process, SIGKILLed while the SMTP server holds its 3rd e-mail: after a
    restart every (rule, episode) has been e-mailed exactly once, and the log says so."""
    inbox, port = smtp()
    rules = [
        rule(name="fast", symbols=[], buy_exchanges=[], sell_exchanges=[], cross_quote=True,
             min_duration_s=30, min_net_bps=20),
        rule(name="big", symbols=[], buy_exchanges=[], sell_exchanges=[], cross_quote=True,
             min_duration_s=120, min_net_bps=100, recipients=["risk@example.com"]),
    ]
    conf = alert_settings(settings, tmp_path, port, alert_rules=rules)
    make_topics(conf, conf.alert_topic, conf.alert_deadletter_topic)
    expected = {alert_key(r.name, e.episode_id) for e in parsed(events) for r in rules
                if mismatch(r, e) is None}
    assert len(expected) >= 10
    publish(conf, events)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ARB_")},
        "ARB_KAFKA_BOOTSTRAP": conf.kafka_bootstrap, "ARB_MONGO_URI":
        conf.mongo_uri.get_secret_value(), "ARB_MONGO_DB": conf.mongo_db,
        "ARB_STATE_DIR": str(tmp_path), "ARB_ALERT_TOPIC": conf.alert_topic,
        "ARB_ALERT_DEADLETTER_TOPIC": conf.alert_deadletter_topic,
        "ARB_ALERT_GROUP_ID": conf.alert_group_id, "ARB_ALERT_STARTING_OFFSETS": "earliest",
        "ARB_ALERT_SESSION_TIMEOUT_SECONDS": "6", "ARB_ALERT_COOLDOWN_SECONDS": "0",
        "ARB_ALERT_RULES": json.dumps([r.model_dump() for r in rules]),
        "ARB_SMTP_HOST": "127.0.0.1", "ARB_SMTP_PORT": str(port), "ARB_SMTP_SECURITY": "none",
        "ARB_SMTP_RETRY_INITIAL_SECONDS": "0.05",
    }
    killed = threading.Event()
    proc: dict[str, subprocess.Popen] = {}

    def kill_on_third(msg: EmailMessage) -> None:
        if len(inbox.messages) == 3 and not killed.is_set():
            proc["worker"].send_signal(signal.SIGKILL)  # before the server answers 250
            proc["worker"].wait(10)
            killed.set()

    inbox.on_data = kill_on_third
    logs = tmp_path / "worker.log"

    def start() -> subprocess.Popen:
        with logs.open("a") as out:
            return subprocess.Popen([sys.executable, "-m", "alerts", "run"], cwd=tmp_path,
                                    env={**env, "PYTHONPATH": str(REPO)}, stdout=out,
                                    stderr=subprocess.STDOUT)

    proc["worker"] = start()
    try:
        wait_for(killed.is_set, 180, "the first worker to be killed mid-stream")
        assert proc["worker"].returncode == -signal.SIGKILL
        before = len(inbox.messages)
        proc["worker"] = start()
        wait_for(lambda: set(inbox.keys()) >= expected - interrupted(conf), 300,
                 f"every alert; log:\n{logs.read_text()[-3000:]}")
        time.sleep(1.0)  # nothing more may arrive
    finally:
        for p in proc.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    assert proc["worker"].returncode == 0, logs.read_text()[-3000:]
    sent_keys = Counter(inbox.keys())
    assert before == 3 and set(sent_keys) == expected
    assert all(n == 1 for n in sent_keys.values()), sent_keys.most_common(3)
    # the log: one "sent" per key, except the one whose 250 the killed worker never read,
    # whose claim stays "sending" (delivery unknown to the worker, not resent)
    state = claims(conf)
    assert set(state) == expected
    unknown = {k for k, c in state.items() if c["state"] != "sent"}
    assert len(unknown) == 1 and state[unknown.pop()]["state"] == "sending"
    sent = log_docs(conf, decision="sent")
    assert len(sent) == len(expected) - 1 and all(d["count"] == 1 for d in sent)
    assert not log_docs(conf, decision="failed")
    # `alerts log` reads it back
    from arbstream.config import get_settings

    get_settings.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                if k.startswith("ARB_"):
                    mp.setenv(k, v)
            mp.chdir(tmp_path)
            out = CliRunner().invoke(alerts_app, ["log", "--decision", "sent", "--limit", "0",
                                                  "--json"])
    finally:
        get_settings.cache_clear()
    assert out.exit_code == 0, out.output
    assert out.output.count('"decision": "sent"') == len(expected) - 1


def interrupted(conf: Settings) -> set[str]:
    return {k for k, c in claims(conf).items() if c["state"] == "sending"}


def test_module_layout() -> None:
    """The collections and the CLI the README documents exist under these names."""
    assert (ALERTS, CLAIMS) == ("alerts", "alert_claims")
    names = {c.name or c.callback.__name__ for c in alerts_app.registered_commands}
    assert names == {"run", "test-email", "log", "rules"}


def test_interrupted_send_is_marked_unknown_and_not_resent(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """A claim left ``sending`` longer than any send can take (its worker died mid-send) is
    marked ``unknown`` and logged failed/interrupted at start; its episode is never resent."""
    import datetime as dt

    inbox, port = smtp()
    conf = alert_settings(settings, tmp_path, port)
    records = of_episode(events, LATER)
    item = M.build_item(conf.alert_rules[0], parse_arb_event(records[-1][1]), None,
                        M.MessageConfig.of(conf))
    with AlertStore(MongoConfig.of(conf)) as store:
        assert store.claim(item, "sending", M.message_id(item.key, M.MessageConfig.of(conf)))
        old = dt.datetime.now(UTC) - dt.timedelta(hours=1)
        store.claims.update_one({"_id": item.key}, {"$set": {"updated_at": old}})
    feed(conf, records)
    assert inbox.messages == [] and claims(conf)[item.key]["state"] == "unknown"
    [failed] = log_docs(conf, decision="failed")
    assert failed["reason"] == "interrupted" and "delivery unknown" in failed["error"]
    assert log_docs(conf, decision="suppressed")[0]["reason"] == "duplicate"


def test_cli_test_email_and_rules(
    tmp_path: Path, smtp: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from arbstream.config import get_settings

    inbox, port = smtp()
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "ARB_SMTP_HOST": "127.0.0.1", "ARB_SMTP_PORT": str(port), "ARB_SMTP_SECURITY": "none",
        "ARB_ALERT_RULES": json.dumps([rule().model_dump()]),
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        sent = CliRunner().invoke(alerts_app, ["test-email", "--to", "me@example.com"])
        shown = CliRunner().invoke(alerts_app, ["rules"])
        missing = CliRunner().invoke(alerts_app, ["test-email", "--rule", "nope"])
        monkeypatch.setenv("ARB_SMTP_PORT", str(free_port()))
        monkeypatch.setenv("ARB_SMTP_RETRY_ATTEMPTS", "1")
        get_settings.cache_clear()
        down = CliRunner().invoke(alerts_app, ["test-email"])
    finally:
        get_settings.cache_clear()
    assert sent.exit_code == 0 and "delivered to me@example.com" in sent.output
    [msg] = inbox.messages
    assert msg["Subject"].startswith("[TEST] [arbstream] test-usdc-depeg: BTC-USDC/BTC-USD")
    text, _ = parts(msg)
    assert "20,546.06" in text and "USDC-USD on kraken" in text
    assert shown.exit_code == 0 and "usdc-depeg" in shown.output
    assert missing.exit_code == 2
    assert down.exit_code == 1 and "transient" in down.output


# --- hostile input ---------------------------------------------------------------------------

#: Each (field, value) makes a valid event invalid: line breaks would end an e-mail header or a
#: log line, the others corrupt a log line or a MongoDB key, or do not encode.
HOSTILE = [
    ("episode_id", SAME + "\r\nBcc: attacker@evil.example\r\nX-Y: |2023-03-11T04:49:59.000Z"),
    ("episode_id", SAME + "\n2023-03-11T04:49:59.000Z"),
    ("episode_id", SAME.replace("|", "|\x00", 1) + "2023-03-11T04:49:59.000Z"),
    ("episode_id", SAME + "\u2028|2023-03-11T04:49:59.000Z"),
    ("opportunity_id", "BTC-USDC|\r\n2023-03-11T04:50:00.000Z|binance|kraken"),
    ("profit_currency", "USDC\r\nBcc: attacker@evil.example"),
    ("conversion_exchange", "kraken\x1b[2J"),
    ("conversion_symbol", "USDC-USD\x85"),
    ("opportunity_id", "BTC-USDC\u202e|2023-03-11T04:50:00.000Z"),  # bidi override
    ("opportunity_id", "BTC-USDC\ud800"),  # lone surrogate: no UTF-8, no BSON
]


def hostile_records(events: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The first window of LATER that matches :func:`rule`, once per :data:`HOSTILE` field,
    and LATER's closed episode event with a CR/LF episode id: each would alert if valid."""
    good = parsed(of_episode(events, LATER))
    first = next(json.loads(v) for (_, v), e in zip(of_episode(events, LATER), good, strict=True)
                 if isinstance(e, OpportunityEvent) and mismatch(rule(), e) is None)
    closed = next(json.loads(v) for _, v in of_episode(events, LATER)
                  if json.loads(v).get("event") == "closed")
    out = [{**first, name: value} for name, value in HOSTILE]
    out.append({**closed, "episode_id": HOSTILE[0][1]})
    return [(b"bad", json.dumps(o).encode()) for o in out]


def test_control_characters_are_dead_lettered_and_the_stream_goes_on(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """Bug: an episode_id with CR/LF passed the schema, its alert's headers could not be built
    and the worker died (after claiming the alert). Now every event with a control character in
    any string field is dead-lettered with the field named, and the records behind it are
    alerted as usual, with no injected header."""
    inbox, port = smtp()
    conf = alert_settings(settings, tmp_path, port)
    make_topics(conf, conf.alert_topic, conf.alert_deadletter_topic, partitions=1)
    bad = hostile_records(events)
    records = of_episode(events, LATER)
    publish(conf, bad + records)
    worker = AlertWorker(AlertsConfig.of(conf))
    with running(worker) as errors:
        wait_for(lambda: errors or worker.stats["events"] == len(records), what="every event")
        wait_for(lambda: errors or inbox.messages, what="the alert e-mail")
    assert not errors, errors
    assert worker.stats["deadletters"] == len(bad)
    [msg] = inbox.messages
    assert inbox.keys() == [alert_key("usdc-depeg", LATER)]
    assert msg["Bcc"] is None and msg["X-Y"] is None
    assert [env[1] for env in inbox.envelopes] == [["desk@example.com"]]
    assert list(claims(conf)) == [alert_key("usdc-depeg", LATER)]
    letters = [json.loads(m.value()) for m in consume(conf, conf.alert_deadletter_topic)]
    assert sorted(d["raw"] for d in letters) == sorted(v.decode() for _, v in bad)
    for letter in letters:
        field, value = next((name, value) for name, value in HOSTILE
                            if json.loads(letter["raw"]).get(name) == value)
        index, code, _ = forbidden_char(value)
        assert f"{field} contains a" in letter["reason"], letter["reason"]
        assert f"({code}) at index {index}" in letter["reason"]
        assert letter["stage"] == "alerts" and letter["source_topic"] == conf.alert_topic


def test_alert_event_model_rejects_control_characters_with_a_clear_reason(
    events: list[tuple[bytes, bytes]],
) -> None:
    # every event the stream publishes today is accepted, unchanged, as a final one
    for _, value in events:
        event, plain = parse_event(value), parse_arb_event(value)
        assert isinstance(event, type(plain))
        volatile = {"stage", "emitted_ts"}
        assert event.model_dump(exclude=volatile) == plain.model_dump(exclude=volatile)
        assert getattr(event, "stage", "final") == "final"
    for _, value in hostile_records(events):
        with pytest.raises(ValueError) as info:
            parse_event(value)
        reason = str(info.value)
        assert " contains a " in reason and "not allowed in ids, e-mail headers" in reason
        assert not any(c in reason for c in "\r\n\x00\x1b\x85\u2028\u202e")
        assert "attacker" not in reason  # the value itself is never quoted
    # an unknown key is named in the reason, escaped
    opp = json.loads(next(v for _, v in events if json.loads(v)["type"] == "opportunity"))
    with pytest.raises(ValueError) as info:
        parse_event(json.dumps({**opp, "x\r\nBcc: a@b.c": 1}))
    assert "x\\r\\nBcc" in str(info.value) and "\n" not in str(info.value)
    assert printable("a\r\nb\u2028c\x00") == "a\\r\\nb\\u2028c\\x00"
    assert printable("BTC-USDC/BTC-USD → ok") == "BTC-USDC/BTC-USD → ok"


def test_headers_built_from_event_fields_cannot_be_injected(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """The model keeps control characters out; an AlertItem from elsewhere (a claim stored by
    an older worker) still cannot add header lines or recipients, single or digest."""
    inbox, port = smtp()
    conf = alert_settings(settings, tmp_path, port)
    r = conf.alert_rules[0]
    item = M.build_item(r, parse_event(of_episode(events, LATER)[-1][1]), None,
                        M.MessageConfig.of(conf))
    evil = item.model_copy(update={
        "profit_currency": "USDC\r\nBcc: attacker@evil.example",
        "expected_profit_usd": None, "key": "usdc-depeg|x\nX-Injected: 1|2023-03-11",
        "symbol": "BTC-USDC", "sell_symbol": "BTC-USDC"})
    for msg in (M.alert_message(evil, r, M.MessageConfig.of(conf)),
                M.digest_message([evil, item], r, M.MessageConfig.of(conf))):
        SmtpTransport(SmtpConfig.of(conf)).send(msg)
    assert len(inbox.messages) == 2
    for got in inbox.messages:
        assert got["Bcc"] is None and got["X-Injected"] is None
        assert all(k.lower() != "bcc" for k in got)
    single = inbox.messages[0]
    assert "USDC\ufffd\ufffdBcc: attacker@evil.example" in single["Subject"]
    assert inbox.keys()[0] == "usdc-depeg|x\ufffdX-Injected: 1|2023-03-11"
    assert [env[1] for env in inbox.envelopes] == [["desk@example.com"]] * 2


# --- stages of opportunity events ------------------------------------------------------------

class StagedRule(AlertRule):
    """:class:`AlertRule` with the ``opportunity_stage`` field the config model is to get."""

    opportunity_stage: Literal["early", "final"] = "early"


def staged_rule(stage: str, **fields: Any) -> AlertRule:
    """:func:`rule` firing on ``stage`` opportunity events (with the config model's own field
    when it has one)."""
    values = {**rule(**fields).model_dump(), "opportunity_stage": stage}
    if "opportunity_stage" in AlertRule.model_fields:
        return AlertRule(**values)
    return StagedRule(**values)


def test_stage_fields_are_optional_and_checked(events: list[tuple[bytes, bytes]]) -> None:
    opp = json.loads(next(v for _, v in events if json.loads(v)["type"] == "opportunity"))
    ep = json.loads(next(v for _, v in events if json.loads(v)["type"] == "episode"))
    assert parse_event(json.dumps(opp)).stage == "final"  # older events: final
    assert parse_event(json.dumps(opp)).emitted_ts is None
    for stage in ("early", "final", "retracted"):
        event = parse_event(json.dumps({**opp, "stage": stage, "emitted_ts": 1678507200123}))
        assert isinstance(event, AlertOpportunityEvent)
        assert (event.stage, event.emitted_ts) == (stage, 1678507200123)

    def reason(obj: dict[str, Any]) -> str:
        with pytest.raises(ValueError) as info:
            parse_event(json.dumps(obj))
        return str(info.value)

    assert "stage" in reason({**opp, "stage": "late"})
    for bad in ("1678507200123", 0, -5, 1.5, True):
        assert "emitted_ts" in reason({**opp, "emitted_ts": bad})
    # episode events stay as they are
    assert "extra" in reason({**ep, "stage": "final"}).lower()
    # rules: early (default) fires on early and final windows, final only on final ones,
    # nothing fires on a retracted one
    early, final = rule(), staged_rule("final")
    assert rule_stage(early) == "early" and rule_stage(final) == "final"
    by_stage = {s: parse_event(json.dumps({**opp, "stage": s}))
                for s in ("early", "final", "retracted")}
    assert [fires_on(early, by_stage[s]) for s in by_stage] == [True, True, False]
    assert [fires_on(final, by_stage[s]) for s in by_stage] == [False, True, False]
    assert fires_on(final, parse_event(json.dumps(ep)))

    class LooseRule(AlertRule):
        opportunity_stage: str = "early"

    with pytest.raises(ValueError, match="opportunity_stage"):
        check_config(AlertsConfig.of(Settings(alert_rules=[LooseRule(
            name="x", recipients=["a@b.cd"], opportunity_stage="late")])))


def staged_episode(events: list[tuple[bytes, bytes]], retract: str
                   ) -> list[tuple[bytes, bytes]]:
    """LATER as a staged stream publishes it: each opportunity window early (emitted at its
    opening quote) then final, except ``retract``, early then retracted; episode events
    as they are."""
    out = []
    for key, value in of_episode(events, LATER):
        obj = json.loads(value)
        if obj["type"] != "opportunity":
            out.append((key, value))
            continue
        end_ms = parse_event(value).event_ms
        late = "retracted" if obj["opportunity_id"] == retract else "final"
        out += [(key, json.dumps({**obj, "stage": "early", "emitted_ts": end_ms - 900}).encode()),
                (key, json.dumps({**obj, "stage": late, "emitted_ts": end_ms + 10_500}).encode())]
    return out


def test_rules_fire_on_their_stage_and_retractions_alert_nothing(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """The first matching window of LATER (W1) is emitted early, then retracted; the others
    early then final. An ``early`` rule alerts at W1's early version (and logs the retraction
    against its sent alert); a ``final`` rule at the next matching window (W2), final; an early
    digest rule queues W1, withdraws it on the retraction and queues W2 instead."""
    windows = [e for e in parsed(of_episode(events, LATER))
               if isinstance(e, OpportunityEvent) and mismatch(rule(), e) is None]
    w1, w2 = windows[0].opportunity_id, windows[1].opportunity_id
    inbox, port = smtp()
    rules = [rule(name="early"), staged_rule("final", name="final"),
             rule(name="digest", digest=True, recipients=["research@example.com"])]
    conf = alert_settings(settings, tmp_path, port, alert_rules=rules,
                          alert_digest_seconds=3600.0)
    make_topics(conf, conf.alert_topic, conf.alert_deadletter_topic, partitions=1)
    records = staged_episode(events, retract=w1)
    publish(conf, records)
    worker = AlertWorker(AlertsConfig.of(conf))
    with running(worker) as errors:
        wait_for(lambda: errors or worker.stats["events"] == len(records), what="every event")
        wait_for(lambda: errors or len(inbox.messages) == 2, what="the two alert e-mails")
    assert not errors, errors
    assert worker.stats["deadletters"] == 0 and worker.stats["retracted"] == 1
    # three e-mails: one per rule (the digest at the worker's stop); none from the retraction
    assert sorted(inbox.keys()) == sorted(alert_key(n, LATER) for n in ("early", "final",
                                                                         "digest"))
    state = claims(conf)
    fired = {name: (state[alert_key(name, LATER)]["item"]["opportunity_id"],
                    state[alert_key(name, LATER)]["item"]["stage"])
             for name in ("early", "final", "digest")}
    assert fired == {"early": (w1, "early"), "final": (w2, "final"), "digest": (w2, "early")}
    assert {c["state"] for c in state.values()} == {"sent"}
    early_msg = next(m for m in inbox.messages if "early" in str(m["X-Arbstream-Alert-Key"]))
    text, _ = parts(early_msg)
    assert "triggered by an early opportunity window" in text and "Window stage" in text
    digest_msg = next(m for m in inbox.messages if m["X-Arbstream-Digest-Id"])
    assert M.fmt_time(windows[1].event_ms) in parts(digest_msg)[0]
    # the decision log: the retraction once per rule, with what it did
    retracted = {d["rule"]: d for d in log_docs(conf, decision="retracted")}
    assert {r: d["reason"] for r, d in retracted.items()} == {
        "early": "alerted", "final": "no_alert", "digest": "withdrawn"}
    assert all(d["count"] == 1 and d["stage"] == "retracted" and d["episode_id"] == LATER
               for d in retracted.values())
    assert retracted["early"]["message_id"] == M.message_id(alert_key("early", LATER),
                                                               M.MessageConfig.of(conf))
    [queued] = log_docs(conf, decision="queued")
    assert queued["count"] == 2  # W1, withdrawn, then W2
    sent = {d["rule"]: d for d in log_docs(conf, decision="sent")}
    assert sent["early"]["stage"] == "early" and sent["final"]["stage"] == "final"


def test_a_record_whose_handling_fails_is_dead_lettered_and_the_stream_goes_on(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """Any failure but MongoDB's or Kafka's while handling one valid record (here a transport
    bug on the first e-mail) dead-letters that record; the worker goes on with the next."""
    inbox, port = smtp()
    wide = rule(name="wide", symbols=[], buy_exchanges=[], sell_exchanges=[], cross_quote=True)
    conf = alert_settings(settings, tmp_path, port, alert_rules=[wide])
    make_topics(conf, conf.alert_topic, conf.alert_deadletter_topic, partitions=1)

    class Buggy(SmtpTransport):
        calls = 0

        def send(self, msg: EmailMessage) -> Any:
            Buggy.calls += 1
            if Buggy.calls == 1:
                raise RuntimeError("transport bug")
            return super().send(msg)

    records = of_episode(events, LATER, OTHER)
    publish(conf, records)
    worker = AlertWorker(AlertsConfig.of(conf), transport=Buggy(SmtpConfig.of(conf)))
    with running(worker) as errors:
        wait_for(lambda: errors or worker.stats["events"] == len(records), what="every event")
        wait_for(lambda: errors or inbox.messages, what="the second alert")
    assert not errors, errors
    assert worker.stats["failed_events"] == 1 and len(inbox.messages) == 1
    [letter] = [json.loads(m.value()) for m in consume(conf, conf.alert_deadletter_topic)]
    assert letter["reason"] == "not processed: RuntimeError: transport bug"
    first = parse_event(letter["raw"])
    assert mismatch(wide, first) is None
    assert inbox.keys() == [alert_key("wide", OTHER if first.episode_id == LATER else LATER)]
