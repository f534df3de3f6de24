"""The stream job (``arbstream stream``, a real subprocess with its own Spark JVM) under faults,
on a private stack: InfluxDB stopped 10 s, MongoDB stopped 10 s, the broker paused 10 s and
the job itself paused 10 s, one after the other while it works through a backlog of real
quotes (IAQF bars, 2023-03-11 04:00–06:00 UTC, a few dozen records per micro-batch so the
faults land mid-processing); then a topic recreated and refilled past the checkpoint.

What must hold, checked against the independent pandas reference (testing/reference.py):
every quote is in InfluxDB exactly once, the opportunities in MongoDB are exactly the
reference's, and the job heals by itself (restarting queries from their checkpoints where a
write failed). Events on ``arb.opportunities`` are at-least-once: a micro-batch that fails
after publishing is published again on restart (counted and printed, not failed on). The
recreated topic must be refused with one clear error and exit 1.

Figures (recovery = from the service answering again to the next committed micro-batch of
the market query) are printed with ``FIGURES`` (``pytest -s``).
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from arbstream.config import Settings
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.queries import query
from arbstream.store.mongo.opportunities import find_opportunities
from arbstream.topics import OPPORTUNITIES, ensure_topics, quotes_topic
from producers.replay.iaqf import replay_iaqf
from testing.components import run_stream
from testing.faults import Figures, PrivateStack, note, signal_group, wait_until
from testing.reference import reference_opportunities, replayed_iaqf_quotes
from testing.support import consume

START = datetime(2023, 3, 11, 4, tzinfo=UTC)
END = datetime(2023, 3, 11, 6, tzinfo=UTC)
OUTAGE_S = 10.0
#: records per micro-batch: the ~1,300 quotes take dozens of batches, so faults land mid-work
PER_TRIGGER = 25


def _commits(state: Path, query_name: str = "market") -> int:
    folder = state / "checkpoints" / query_name / "commits"
    return len([p for p in folder.glob("[0-9]*")]) if folder.is_dir() else 0


def _influx_quotes(conf: Settings) -> int:
    try:
        rows = query(InfluxConfig.of(conf), 'SELECT count("bid") FROM "raw"."quote"')
    except Exception:  # InfluxDB restarting: not yet
        return -1
    return int(rows[0]["count"]) if rows else 0


def _stored_ids(conf: Settings) -> list[str]:
    rows = find_opportunities(MongoConfig.of(conf), since=START,
                              until=END + timedelta(seconds=10), limit=None)
    return sorted(r["opportunity_id"] for r in rows)


@pytest.fixture(scope="module")
def job_settings(private_stack: PrivateStack, tmp_path_factory: pytest.TempPathFactory
                 ) -> Settings:
    conf = private_stack.settings.model_copy(update={
        "state_dir": tmp_path_factory.mktemp("stream-faults"),
        "mongo_db": "faults_stream", "influx_db": "faults_stream",
        "starting_offsets": "earliest", "trigger_seconds": 0.5,
        "max_offsets_per_trigger": PER_TRIGGER,
        "influx_raw_retention": "INF", "influx_features_retention": "INF",
        "episode_gap_seconds": 120.0, "stats_horizon_seconds": 3600.0,
        "stream_restart_backoff_seconds": 1.0, "stream_restart_backoff_max_seconds": 5.0,
    })
    return conf


@pytest.fixture(scope="module")
def expected(job_settings: Settings) -> pd.DataFrame:
    return replayed_iaqf_quotes(job_settings.data_dir, START, END)


def _reference_ids(conf: Settings, quotes: pd.DataFrame) -> list[str]:
    haircut = (conf.slippage_bps + conf.latency_haircut_bps) / 10_000.0
    ref = reference_opportunities(quotes, conf.taker_fees, conf.window_seconds,
                                  conf.max_quote_age_seconds, conf.min_net, haircut,
                                  conf.notional_usd)
    return sorted(ref["opportunity_id"])


def test_stream_heals_from_outages_and_refuses_a_refilled_topic(
    fault_stack: PrivateStack, job_settings: Settings, expected: pd.DataFrame,
    tmp_path: Path,
) -> None:
    conf = job_settings
    ensure_topics(conf)  # the private stack's ports; checkpoints in the job's own state dir
    replay_iaqf(conf, START, END, None, progress=False)
    want_ids = _reference_ids(conf, expected)
    assert len(want_ids) > 20
    job = run_stream(conf, tmp_path / "stream.log")
    figures: list[Figures] = []
    try:
        wait_until(lambda: _commits(conf.state_dir) >= 2 or not job.alive(), 240,
                   what="the market query's first micro-batches")
        assert job.alive(), job.tail()

        def outage(label: str, ctx: object) -> None:
            before = _influx_quotes(conf)
            with ctx as out:  # type: ignore[attr-defined]
                pass
            commits = _commits(conf.state_dir)
            done = _influx_quotes(conf) >= len(expected)
            recovery = 0.0 if done else out.recovered(
                lambda: _commits(conf.state_dir) > commits
                or _influx_quotes(conf) >= len(expected), 240, what=f"{label}: next batch")
            figures.append(Figures(label, len(expected), 0, 0, 0, 0, recovery,
                                   {"quotes stored before": before}))
            assert job.alive(), f"the job died during {label}:\n{job.tail()}"

        outage("InfluxDB stopped 10 s", fault_stack.stopped("influxdb", OUTAGE_S))
        outage("MongoDB stopped 10 s", fault_stack.stopped("mongodb", OUTAGE_S))
        outage("broker paused 10 s", fault_stack.paused("kafka", OUTAGE_S))

        # the job itself paused (driver and JVM: a GC pause, a VM migration)
        before = _commits(conf.state_dir)
        signal_group(job.pid, signal.SIGSTOP)
        time.sleep(OUTAGE_S)
        signal_group(job.pid, signal.SIGCONT)
        resumed = time.monotonic()
        if _influx_quotes(conf) < len(expected):
            wait_until(lambda: _commits(conf.state_dir) > before
                       or _influx_quotes(conf) >= len(expected), 240)
        figures.append(Figures("stream job paused 10 s", len(expected), 0, 0, 0, 0,
                               time.monotonic() - resumed))

        wait_until(lambda: _influx_quotes(conf) >= len(expected)
                   and _stored_ids(conf) == want_ids, 300, interval=1.0,
                   what="every quote and opportunity stored")
    finally:
        code = job.stop()
    log = job.log.read_text(errors="replace")
    restarts = log.count("from its checkpoint in")
    note(f"stream job exit code {code}; query restarts {restarts}")

    stored = _influx_quotes(conf)
    ids = _stored_ids(conf)
    def identity(value: bytes) -> tuple:
        event = json.loads(value)  # an opportunity's stage, or an episode's event, once each
        return tuple(event.get(k) for k in ("opportunity_id", "episode_id", "stage", "event",
                                            "windows", "valid_to", "end"))

    events = Counter(identity(m.value()) for m in consume(conf, OPPORTUNITIES))
    repeats = sum(n - 1 for n in events.values())
    for fig in figures:
        fig.delivered, fig.lost = stored, len(expected) - stored
        fig.extra.update({"opportunities": f"{len(ids)}/{len(want_ids)}",
                          "restarts (whole run)": restarts,
                          "arb.opportunities events repeated (whole run)": repeats})
        fig.report()
    assert stored == len(expected)  # every quote once: nothing lost, nothing doubled
    assert ids == want_ids
    assert code in (0, -signal.SIGTERM), job.tail()

    # --- a topic recreated and refilled past the checkpoint ---------------------------------
    topic = quotes_topic("kraken")
    admin = AdminClient(conf.kafka_client_config())
    for fut in admin.delete_topics([topic]).values():
        fut.result(timeout=15)
    wait_until(lambda: topic not in admin.list_topics(timeout=5).topics, 30)
    for fut in admin.create_topics([NewTopic(topic, conf.kafka_partitions, 1)]).values():
        fut.result(timeout=15)
    producer = Producer(conf.kafka_client_config())
    for n in range(400):  # more per partition than the checkpoint's offsets (~150)
        producer.produce(topic, key=b"BTC-USD", value=b"{}", partition=n % conf.kafka_partitions)
    assert producer.flush(30) == 0
    refused = run_stream(conf, tmp_path / "refused.log")
    started = time.monotonic()
    refused.proc.wait(300)
    text = refused.log.read_text(errors="replace")
    note(f"refilled topic: exit {refused.proc.returncode} after "
         f"{time.monotonic() - started:.1f} s")
    assert refused.proc.returncode == 1, text[-3000:]
    last = text[text.rindex("error: query"):]  # the command's own one-line error
    assert last.startswith("error: query 'market' failed with an error a restart cannot fix: "
                           f"KafkaDataLossError: {topic} was deleted and recreated since this "
                           "checkpoint was written"), last[:600]
    assert _stored_ids(conf) == want_ids  # nothing written from the new topic
