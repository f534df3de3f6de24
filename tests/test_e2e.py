"""End to end on real data: replay → tansu → Spark → InfluxDB + SecantusDB (+ Kafka sinks).

The slice 2023-03-11 04:00–08:00 UTC (the USDC depeg weekend) is replayed into the running
stream; the opportunities in MongoDB must equal an independent pandas computation of the same
semantics (``tests/reference.py``) exactly. A malformed record sent first must land in
``md.deadletter`` while the stream goes on, and a second run over the same data (fresh
checkpoint, as ``arbstream demo`` does) must not add a single document or point.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from confluent_kafka import Producer
from conftest import consume
from reference import reference_opportunities, reference_spreads

from arbstream.config import Settings
from arbstream.topics import DEADLETTER, HEALTH, OPPORTUNITIES, ensure_topics, quotes_topic
from producers.replay import load_iaqf_quotes, replay_iaqf
from spark_jobs import arbitrage
from spark_jobs.kafka_source import end_offsets
from spark_jobs.sinks import influx
from spark_jobs.sinks.mongo import find_opportunities

pytestmark = pytest.mark.e2e

START = datetime(2023, 3, 11, 4, tzinfo=UTC)
END = datetime(2023, 3, 11, 8, tzinfo=UTC)
MALFORMED = b'{"schema_version": 1, "type": "quote", "exchange": "kraken", "bid": '
HEALTH_RECORD = {
    "schema_version": 1, "type": "health", "exchange": "kraken", "ts": 1_678_507_200_000,
    "messages_per_s": 12.5, "last_message_age_s": 0.25, "queue_depth": 3, "frames": 1000,
    "records": 990, "reconnects": 1, "duplicates_dropped": 7, "gaps": 0, "missing": 0,
    "deadletters": 2, "delivery_failures": 0,
}


def _run(spark, settings: Settings, checkpoint: Path, before_replay=None) -> None:
    queries = arbitrage.start(spark, settings, checkpoint)
    try:
        deadline = time.monotonic() + 120
        while any(q.lastProgress is None for q in queries):
            assert time.monotonic() < deadline, "queries never started"
            for q in queries:
                assert q.exception() is None, q.exception()
            time.sleep(0.5)
        if before_replay:
            before_replay()
        replay_iaqf(settings, START, END, None, progress=False)
        arbitrage.wait_drained(queries, settings, timeout=600)
    finally:
        for q in queries:
            q.stop()


@pytest.fixture(scope="module")
def e2e_settings(settings: Settings) -> Settings:
    conf = settings.model_copy(update={
        "mongo_db": "e2e", "influx_db": "e2e", "starting_offsets": "latest",
        "trigger_seconds": 0.5,
    })
    ensure_topics(conf)
    return conf


@pytest.fixture(scope="module")
def expected(e2e_settings: Settings) -> pd.DataFrame:
    quotes = load_iaqf_quotes(e2e_settings.data_dir, START, END)
    quotes["received_ts"] = quotes["exchange_ts"]
    quotes["dedupe_key"] = [
        f"{e}:{s}:q:{t}:{b!r}:{a!r}:None:None"
        for e, s, t, b, a in zip(quotes.exchange, quotes.symbol, quotes.exchange_ts,
                                 quotes.bid, quotes.ask, strict=True)
    ]
    return quotes


@pytest.fixture(scope="module")
def first_run(spark, e2e_settings: Settings, tmp_path_factory) -> dict:
    conf = e2e_settings
    topics = [DEADLETTER, OPPORTUNITIES, HEALTH]
    before = end_offsets(conf.kafka_client_config(), topics)

    def send_malformed() -> None:
        producer = Producer(conf.kafka_client_config())
        producer.produce(quotes_topic("kraken"), key=b"BTC-USD", value=MALFORMED)
        producer.produce(HEALTH, key=b"kraken", value=json.dumps(HEALTH_RECORD).encode())
        producer.produce(HEALTH, key=b"kraken", value=b'{"type": "health"}')
        assert producer.flush(10) == 0

    _run(spark, conf, tmp_path_factory.mktemp("ckpt1"), send_malformed)
    return {"before": before}


def _stored(conf: Settings) -> pd.DataFrame:
    rows = find_opportunities(conf, since=START, until=END + timedelta(seconds=10))
    return pd.DataFrame(rows).sort_values("opportunity_id").reset_index(drop=True)


def test_opportunities_equal_pandas_reference(first_run, e2e_settings, expected) -> None:
    conf = e2e_settings
    want = reference_opportunities(
        expected, conf.taker_fees, conf.window_seconds, conf.max_quote_age_seconds, conf.min_net
    ).sort_values("opportunity_id").reset_index(drop=True)
    got = _stored(conf)
    assert len(want) > 100  # the depeg weekend has real gross-of-fee gaps
    assert got["opportunity_id"].tolist() == want["opportunity_id"].tolist()
    for col in ["buy_ask", "sell_bid", "buy_fee", "sell_fee", "gross", "net", "gross_bps",
                "net_bps"]:
        assert got[col].tolist() == want[col].tolist(), col
    for col in ["window_start", "window_end", "buy_ts", "sell_ts"]:
        assert [pd.Timestamp(v) for v in got[col]] == [pd.Timestamp(v) for v in want[col]], col
    assert (got["net"] > conf.min_net).all()


def test_influx_has_every_quote_and_spread(first_run, e2e_settings, expected) -> None:
    conf = e2e_settings
    spreads = reference_spreads(
        expected, conf.taker_fees, conf.window_seconds, conf.max_quote_age_seconds
    )
    q = influx.query(conf, 'SELECT count("bid") FROM "raw"."quote"')
    s = influx.query(conf, 'SELECT count("net_bps") FROM "spread"')
    assert q[0]["count"] == len(expected)
    assert s[0]["count"] == len(spreads)
    top = spreads.sort_values("net_bps").iloc[-1]
    rows = influx.query(
        conf,
        f"SELECT net_bps FROM spread WHERE symbol = '{top.symbol}' "
        f"AND buy_exchange = '{top.buy_exchange}' AND sell_exchange = '{top.sell_exchange}' "
        f"AND time = {int(top.window_end.timestamp() * 1000)}ms",
    )
    assert rows[0]["net_bps"] == top.net_bps


def test_malformed_record_dead_lettered_and_opportunities_published(
    first_run, e2e_settings
) -> None:
    conf = e2e_settings
    letters = [json.loads(m.value()) for m in
               consume(conf, DEADLETTER, first_run["before"].get(DEADLETTER, {}))]
    mine = [d for d in letters if d["raw"] == MALFORMED.decode()]
    assert len(mine) == 1
    assert mine[0]["reason"] == "malformed JSON"
    assert mine[0]["stage"] == "stream"
    assert mine[0]["source_topic"] == quotes_topic("kraken")
    published = consume(conf, OPPORTUNITIES, first_run["before"].get(OPPORTUNITIES, {}))
    ids = {m.key().decode() for m in published}
    assert ids == set(_stored(conf)["opportunity_id"])
    assert all(json.loads(m.value())["opportunity_id"] == m.key().decode() for m in published)


def test_producer_health_reaches_influx(first_run, e2e_settings) -> None:
    rows = influx.query(e2e_settings, "SELECT * FROM health WHERE exchange = 'kraken'")
    [row] = [r for r in rows if r["time"] == HEALTH_RECORD["ts"]]
    for name, value in HEALTH_RECORD.items():
        if name not in ("schema_version", "type", "exchange", "ts"):
            assert row[name] == value, name
    letters = [json.loads(m.value()) for m in
               consume(e2e_settings, DEADLETTER, first_run["before"].get(DEADLETTER, {}))]
    assert any(d["source_topic"] == HEALTH and d["reason"] == "unsupported schema_version null"
               for d in letters)


def test_rerun_adds_no_duplicates(first_run, spark, e2e_settings, tmp_path_factory) -> None:
    conf = e2e_settings
    before = _stored(conf)
    points = influx.query(conf, 'SELECT count("net_bps") FROM "spread"')[0]["count"]
    _run(spark, conf, tmp_path_factory.mktemp("ckpt2"))
    after = _stored(conf)
    assert len(after) == len(before)
    assert after.drop(columns=["first_seen_at"]).equals(before.drop(columns=["first_seen_at"]))
    assert after["first_seen_at"].tolist() == before["first_seen_at"].tolist()
    assert influx.query(conf, 'SELECT count("net_bps") FROM "spread"')[0]["count"] == points
