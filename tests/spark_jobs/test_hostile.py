"""Hostile and broken input, consecutive replays, and health under a backlog, end to end.

Real IAQF bars (2023-03-11 04:00–04:40 UTC) are replayed under exchange ids of this module's
own (``hx_*``), so its topics hold its records only, into the running stream job (real broker,
Spark, InfluxDB, MongoDB-protocol server):

* a clean run, and a run with hostile records injected mid-replay: every hostile record is
  dead-lettered with its reason, the stream keeps running, and every MongoDB collection and
  InfluxDB measurement equals the clean run's;
* two consecutive replays (04:00–04:20, then 04:20–04:40) into one running stream give the
  union of both replays' opportunities: exactly the pandas reference over 04:00–04:40;
* health rows keep reaching InfluxDB while a large market backlog is processed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from confluent_kafka import Producer

from arbstream.config import Settings
from arbstream.fees import DEFAULT_TAKER_FEES
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.queries import query
from arbstream.store.influx.schema import ensure_database
from arbstream.store.mongo.opportunities import find_opportunities
from arbstream.topics import DEADLETTER, HEALTH, book_topic, ensure_topics, quotes_topic
from producers.replay.iaqf import load_iaqf_quotes
from producers.replay.publish import publish_quotes
from spark_jobs import arbitrage
from spark_jobs.kafka_source import end_offsets
from testing.reference import reference_opportunities
from testing.support import consume
from tests.spark_jobs.test_recovery import assert_same, influx_contents, mongo_contents

pytestmark = pytest.mark.e2e

START = datetime(2023, 3, 11, 4, tzinfo=UTC)
MID = datetime(2023, 3, 11, 4, 20, tzinfo=UTC)
END = datetime(2023, 3, 11, 4, 40, tzinfo=UTC)
RENAMED = {"binance": "hx_binance", "coinbase": "hx_coinbase", "kraken": "hx_kraken"}
FEES = {RENAMED[e]: f for e, f in DEFAULT_TAKER_FEES.items() if e in RENAMED}
HOUR = 3_600_000


@pytest.fixture(scope="module")
def conf(settings: Settings) -> Settings:
    out = settings.model_copy(update={
        "exchanges": sorted(RENAMED.values()), "fees": FEES, "starting_offsets": "latest",
        "trigger_seconds": 0.5, "idle_timeout_seconds": 6.0, "health_interval_seconds": 1.0,
        "influx_raw_retention": "INF", "influx_features_retention": "INF",
        "episode_gap_seconds": 120.0,
    })
    ensure_topics(out)
    return out


def quotes(conf: Settings, start: datetime, end: datetime) -> pd.DataFrame:
    frame = load_iaqf_quotes(conf.data_dir, start, end)
    frame["exchange"] = frame["exchange"].map(RENAMED)
    return frame


def reference(conf: Settings, frame: pd.DataFrame) -> pd.DataFrame:
    q = frame.copy()
    q["received_ts"] = q["exchange_ts"]
    q["dedupe_key"] = [  # the replay's Quote.dedupe_key
        f"{e}:{s}:q:{t}:{b!r}:{a!r}:None:None"
        for e, s, t, b, a in zip(q.exchange, q.symbol, q.exchange_ts, q.bid, q.ask, strict=True)
    ]
    haircut = (conf.slippage_bps + conf.latency_haircut_bps) / 10_000.0
    return reference_opportunities(q, conf.taker_fees, conf.window_seconds,
                                   conf.max_quote_age_seconds, conf.min_net, haircut,
                                   conf.notional_usd).sort_values("opportunity_id")


def run_stream(spark: Any, conf: Settings, checkpoint: Path, steps: list[Any]) -> None:
    """Start the job, run each step (a callable) and wait until the stream has drained
    after each; stop the job."""
    queries = arbitrage.start(spark, conf, checkpoint)
    try:
        arbitrage.wait_started(queries, timeout=120)
        for step in steps:
            step()
            arbitrage.wait_drained(queries, conf, timeout=600)
            for q in queries:
                assert q.exception() is None, q.exception()
    finally:
        for q in queries:
            q.stop()


def hostile_records(last_ts: int) -> list[tuple[str, bytes, str]]:
    """``(topic, value, expected reason prefix)`` of every kind of bad input."""
    kr, cb = RENAMED["kraken"], RENAMED["coinbase"]

    def quote(**over: Any) -> dict[str, Any]:
        q = {"schema_version": 1, "type": "quote", "exchange": kr, "symbol": "BTC-USD",
             "bid": 20_000.0, "ask": 20_001.0, "bid_size": 1.0, "ask_size": 1.0,
             "exchange_ts": last_ts, "received_ts": last_ts, "dedupe_key": "hostile"}
        q.update(over)
        return q

    def beat(ts: int) -> dict[str, Any]:
        return {"schema_version": 1, "type": "heartbeat", "exchange": cb, "exchange_ts": ts,
                "received_ts": ts, "dedupe_key": f"{cb}:hb:{ts}"}

    def j(doc: dict[str, Any]) -> bytes:
        return json.dumps(doc).encode()

    book = {"schema_version": 1, "type": "book", "exchange": kr, "symbol": "BTC-USD",
            "bids": [[19_999.0, 1.0], [20_000.0, 1.0]], "asks": [[20_001.0, 1.0]],
            "exchange_ts": last_ts, "received_ts": last_ts, "dedupe_key": "hostile-book"}
    inf_book = {**book, "bids": [[20_000.0, "Infinity"]], "dedupe_key": "inf-book"}
    century = last_ts + 100 * 365 * 24 * HOUR
    big = quote(dedupe_key="big", pad="x" * 1_200_000)
    return [
        (quotes_topic(kr), j(quote(exchange_ts=last_ts + HOUR, received_ts=last_ts + HOUR,
                                   dedupe_key="1h")), "future_timestamp"),
        (quotes_topic(kr), j(quote(exchange_ts=last_ts + HOUR, dedupe_key="1h-skew")),
         "future_timestamp"),
        (quotes_topic(cb), j(beat(last_ts + HOUR)), "future_timestamp"),
        (quotes_topic(kr), j(quote(exchange_ts=century, received_ts=century,
                                   dedupe_key="100y")), "timestamp_out_of_range"),
        (quotes_topic(cb), j(beat(century)), "timestamp_out_of_range"),
        (quotes_topic(kr), j(quote(exchange_ts=9_300_000_000_000_000, dedupe_key="9.3e15")),
         "timestamp_out_of_range"),
        (quotes_topic(kr), os.urandom(800_000), "record_too_large"),
        (quotes_topic(kr), b"\xff\xfe" + os.urandom(1000), "payload is not UTF-8"),
        (quotes_topic(kr), j(big), "record_too_large"),
        (quotes_topic(kr), j(quote(bid_size="NaN", dedupe_key="nan")), "bid_size"),
        (quotes_topic(kr), j(quote(ask_size="Infinity", dedupe_key="inf")), "ask_size"),
        (book_topic(kr), j(book), "book levels not sorted"),
        (book_topic(kr), j(inf_book), "book levels missing"),
        (quotes_topic(kr), j(quote(dedupe_key="a\r\nX-Injected: 1")), "dedupe_key contains"),
        (quotes_topic(kr), j(quote(exchange="evilex", dedupe_key="evil")),
         "exchange 'evilex' does not match topic"),
    ]


def inject(conf: Settings, records: list[tuple[str, bytes, str]]) -> None:
    producer = Producer({**conf.kafka_client_config(), "message.max.bytes": 4_000_000})
    for topic, value, _ in records:
        producer.produce(topic, key=b"BTC-USD", value=value)
    assert producer.flush(30) == 0


@pytest.fixture(scope="module")
def clean_and_hostile(spark: Any, conf: Settings, tmp_path_factory) -> dict[str, Any]:
    frame = quotes(conf, START, MID)
    cut = int(frame["exchange_ts"].median())  # by time: no bar's quotes are split
    first, second = frame[frame["exchange_ts"] < cut], frame[frame["exchange_ts"] >= cut]
    clean = conf.model_copy(update={"mongo_db": "hostile_a", "influx_db": "hostile_a"})
    run_stream(spark, clean, tmp_path_factory.mktemp("clean"), [
        lambda: publish_quotes(frame, clean, progress=False)])
    dirty = conf.model_copy(update={"mongo_db": "hostile_b", "influx_db": "hostile_b"})
    before = end_offsets(conf.kafka_client_config(), [DEADLETTER])
    records = hostile_records(int(first["exchange_ts"].max()))

    def replay_with_hostile_input() -> None:
        publish_quotes(first, dirty, progress=False, heartbeat=False)
        inject(dirty, records)
        publish_quotes(second, dirty, progress=False)

    run_stream(spark, dirty, tmp_path_factory.mktemp("dirty"), [replay_with_hostile_input])
    letters = [json.loads(m.value()) for m in consume(conf, DEADLETTER, before.get(DEADLETTER))]
    return {"clean": clean, "dirty": dirty, "records": records, "letters": letters}


def test_every_hostile_record_is_dead_lettered_with_its_reason(clean_and_hostile) -> None:
    letters = [d for d in clean_and_hostile["letters"] if d["stage"] == "stream"]
    reasons = [d["reason"] for d in letters]
    for _, value, expected in clean_and_hostile["records"]:
        found = [d for d in letters if d["raw_sha256"] == hashlib.sha256(value).hexdigest()]
        assert len(found) == 1, (expected, reasons)
        assert expected in found[0]["reason"], (expected, found[0]["reason"])
        letter = json.dumps(found[0]).encode()
        assert len(letter) < 200_000  # far below librdkafka's 1 MB message.max.bytes
        assert found[0]["raw_length"] == len(value)
    assert len(letters) == len(clean_and_hostile["records"])  # nothing else was rejected


def test_sinks_equal_a_run_without_the_hostile_records(clean_and_hostile) -> None:
    a, b = clean_and_hostile["clean"], clean_and_hostile["dirty"]
    mongo_a, mongo_b = mongo_contents(a, a.mongo_db), mongo_contents(b, b.mongo_db)
    assert len(mongo_a["opportunities"]) > 50
    assert_same("MongoDB", mongo_a, mongo_b)
    assert_same("InfluxDB", influx_contents(a, a.influx_db), influx_contents(b, b.influx_db))


def test_consecutive_replays_give_the_union(spark: Any, conf: Settings, tmp_path) -> None:
    union = conf.model_copy(update={"mongo_db": "consecutive", "influx_db": "consecutive"})
    run_stream(spark, union, tmp_path / "ckpt", [
        lambda: publish_quotes(quotes(union, START, MID), union, progress=False),
        lambda: publish_quotes(quotes(union, MID, END), union, progress=False),
    ])
    want = reference(union, quotes(union, START, END))
    got = pd.DataFrame(find_opportunities(MongoConfig.of(union), since=START, until=END,
                                          limit=1_000_000))
    assert len(want) > 50
    assert sorted(got["opportunity_id"]) == want["opportunity_id"].tolist()
    got = got.set_index("opportunity_id").loc[want["opportunity_id"]]
    assert got["net"].tolist() == want["net"].tolist()
    assert got["windows"].tolist() == want["windows"].tolist()
    assert (got["stage"] == "final").all()


def test_health_rows_flow_while_a_market_backlog_is_processed(
    spark: Any, conf: Settings, tmp_path
) -> None:
    """8 hours of bars (~4.6k quotes) read 1,000 records per market micro-batch; the
    health query (its own FAIR pool) keeps writing its rows meanwhile."""
    busy = conf.model_copy(update={"mongo_db": "backlog", "influx_db": "backlog",
                                   "max_offsets_per_trigger": 1_000})
    backlog = load_iaqf_quotes(conf.data_dir, datetime(2023, 3, 1, tzinfo=UTC),
                               datetime(2023, 3, 1, 8, tzinfo=UTC))
    backlog["exchange"] = backlog["exchange"].map(RENAMED)
    ensure_database(InfluxConfig.of(busy))
    producer = Producer(busy.kafka_client_config())
    topics = arbitrage.query_topics(busy)["market"]
    before = end_offsets(busy.kafka_client_config(), topics)
    queries = arbitrage.start(spark, busy, tmp_path / "ckpt")
    seen: list[float] = []
    busy_batches: dict[int, int] = {}  # batch id -> packed input rows, batches with data
    publisher = threading.Thread(target=publish_quotes, args=(backlog, busy),
                                 kwargs={"progress": False})
    try:
        market = next(q for q in queries if q.name == "market")
        while market.lastProgress is None:
            time.sleep(0.5)
        publisher.start()
        started = time.monotonic()
        while time.monotonic() - started < 90:
            ts = int(time.time() * 1000)
            producer.produce(HEALTH, key=b"hx_kraken", value=json.dumps({
                "schema_version": 1, "type": "health", "exchange": "hx_kraken", "ts": ts,
                "messages_per_s": 1.0, "last_message_age_s": 0.1, "queue_depth": 0,
                "frames": 1, "records": 1, "reconnects": 0, "duplicates_dropped": 0,
                "gaps": 0, "missing": 0, "deadletters": 0, "delivery_failures": 0}).encode())
            producer.flush(5)
            rows = query(InfluxConfig.of(busy), "SELECT count(queue_depth) FROM health WHERE "
                                                "exchange = 'hx_kraken'")
            seen.append(rows[0]["count"] if rows else 0)
            busy_batches.update({p["batchId"]: p["numInputRows"]
                                 for p in market.recentProgress if p["numInputRows"] > 0})
            # records read, from offsets (numInputRows counts packed rows, not quotes)
            done = sum(off - before.get(t, {}).get(p, 0) for t, parts in
                       arbitrage.processed_offsets(market).items() for p, off in parts.items())
            if done >= len(backlog) and len(seen) > 10:
                break
            time.sleep(1.0)
        assert len(busy_batches) >= 3, "the backlog was not processed in several batches"
    finally:
        publisher.join()
        for q in queries:
            q.stop()
    # health rows arrived all along, not only after the backlog: the count kept growing
    assert seen[len(seen) // 2] > 0
    assert seen[-1] > seen[len(seen) // 2]
