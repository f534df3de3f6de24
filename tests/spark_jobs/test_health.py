"""Exchange health in the stream (spark_jobs/health.py): exact measurements and scores of
hand-made producer records on static DataFrames, the InfluxDB point of an enriched row, and a
streaming query over real ``md.health`` records from two real publishers, one of which goes
silent and gets its ``stale`` row from the processing-time timeout."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from typing import Any

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from arbstream.config import Settings
from arbstream.schemas import HEALTH_FIELDS, Quote
from arbstream.store.config import InfluxConfig
from arbstream.store.influx.lines import health_point
from arbstream.store.influx.queries import query as influx_query
from arbstream.store.influx.schema import ensure_database
from arbstream.store.influx.writer import write_health
from arbstream.topics import HEALTH, ensure_topics
from producers.events import FeedEvent
from producers.publisher import Publisher
from spark_jobs import arbitrage
from spark_jobs import transforms as T
from spark_jobs.health import (
    ENRICHED_COLUMNS,
    ExchangeState,
    Tracking,
    health_stream,
    silence,
)

RAW_SCHEMA = "key binary, value binary, topic string, partition int, offset long"
T0 = 1_700_000_000_000
REL = 1e-12
FEED_STALE = 30.0  # Settings().feed_stale_seconds


def approx(value: float) -> Any:
    return pytest.approx(value, rel=REL, abs=1e-15)


def record(exchange: str, ts: int, **fields: Any) -> dict[str, Any]:
    """A producer health record (the publisher's field set) with zero counters by default."""
    base = {"schema_version": 1, "type": "health", "exchange": exchange, "ts": ts,
            "messages_per_s": 0.0, "last_message_age_s": None, "queue_depth": 0}
    base |= dict.fromkeys(["frames", "records", "reconnects", "duplicates_dropped", "gaps",
                           "missing", "deadletters", "delivery_failures"], 0)
    assert set(base) == set(HEALTH_FIELDS)
    return base | fields


def kafka_rows(spark: SparkSession, payloads: list[bytes]) -> DataFrame:
    return spark.createDataFrame(
        [(b"k", p, HEALTH, 0, i) for i, p in enumerate(payloads)], RAW_SCHEMA
    )


def reliability(uptime: float, freshness: float, error_rate: float, rate_score: float) -> float:
    """The module docstring's formula, restated."""
    error_score = max(0.0, 1 - error_rate / 0.01)
    return 0.3 * uptime + 0.3 * freshness + 0.3 * error_score + 0.1 * rate_score


# --- static ------------------------------------------------------------------------------------

KRAKEN = [
    # first record: deltas are counts since the producer started
    record("kraken", T0, messages_per_s=10.0, last_message_age_s=0.5, frames=100, records=90),
    # a reconnect, a sequence gap (3 missing) and a dead letter
    record("kraken", T0 + 5000, messages_per_s=5.0, last_message_age_s=0.2, frames=150,
           records=130, reconnects=1, duplicates_dropped=2, gaps=1, missing=3, deadletters=1),
    # frames but no records: only growth_age_s sees the staleness
    record("kraken", T0 + 10_000, messages_per_s=8.0, last_message_age_s=0.1, frames=200,
           records=130, reconnects=1, duplicates_dropped=2, gaps=1, missing=3, deadletters=1),
    # producer restart: counters went down, deltas are the new counts
    record("kraken", T0 + 15_000, messages_per_s=20.0, last_message_age_s=0.05, frames=30,
           records=25, delivery_failures=1),
    # redelivered (same ts): dropped
    record("kraken", T0 + 15_000, messages_per_s=99.0, frames=31, records=26),
    # websocket silent past feed_stale_seconds
    record("kraken", T0 + 20_000, last_message_age_s=40.0, frames=30, records=25,
           delivery_failures=1),
]
# a producer that never received a frame
GEMINI = [record("gemini", T0 + 1000)]


def test_static_measurements_scores_and_status(spark: SparkSession) -> None:
    payloads = [json.dumps(r).encode() for r in KRAKEN + GEMINI] + [b'{"type": "quote"}']
    out = health_stream(T.parse_health(kafka_rows(spark, payloads)), Settings())
    rows = out.collect()
    bad = [r for r in rows if r["error"] is not None]
    assert [r["error"] for r in bad] == ["unsupported schema_version null"]
    assert bad[0]["raw"] == '{"type": "quote"}' and bad[0]["reliability"] is None
    got = {(r["exchange"], r["ts"]): r.asDict() for r in rows if r["error"] is None}
    assert set(ENRICHED_COLUMNS) <= set(out.columns)
    assert sorted(got) == [("gemini", T0 + 1000)] + [("kraken", T0 + k * 5000) for k in range(5)]

    def check(key: tuple[str, int], **expected: Any) -> None:
        row = got[key]
        for name, value in expected.items():
            if isinstance(value, float):
                assert row[name] == approx(value), name
            else:
                assert row[name] == value, name

    f1 = 1 - 0.5 / FEED_STALE
    check(("kraken", T0), interval_s=None, records_delta=90, errors_delta=0, reconnects_delta=0,
          staleness_s=0.5, uptime=1.0, rate_score=1.0, freshness=f1, error_rate=0.0,
          reliability=reliability(1.0, f1, 0.0, 1.0), status="ok", messages_per_s=10.0,
          frames=100)
    assert got[("kraken", T0)]["time"].timestamp() * 1000 == T0
    f2 = 1 - 0.2 / FEED_STALE
    check(("kraken", T0 + 5000), interval_s=5.0, records_delta=40, errors_delta=1 + 0 + 3,
          reconnects_delta=1, staleness_s=0.2, uptime=0.5, rate_score=5.0 / 7.5, freshness=f2,
          error_rate=4 / (40 + 1 + 3), reliability=reliability(0.5, f2, 4 / 44, 5.0 / 7.5),
          status="degraded")
    check(("kraken", T0 + 10_000), interval_s=5.0, records_delta=0, errors_delta=0,
          reconnects_delta=0, staleness_s=5.0, uptime=2 / 3, rate_score=1.0,
          freshness=1 - 5.0 / FEED_STALE, error_rate=0.0,
          reliability=reliability(2 / 3, 1 - 5.0 / FEED_STALE, 0.0, 1.0), status="degraded")
    f4 = 1 - 0.05 / FEED_STALE
    check(("kraken", T0 + 15_000), interval_s=5.0, records_delta=25, errors_delta=1,
          reconnects_delta=0, staleness_s=0.05, uptime=0.75, rate_score=1.0, freshness=f4,
          error_rate=1 / 25, reliability=reliability(0.75, f4, 1 / 25, 1.0), status="degraded",
          messages_per_s=20.0)  # the redelivered record (99 msg/s) was dropped
    # median(10, 5, 8, 20, 0) = 8, but no messages at all scores 0
    check(("kraken", T0 + 20_000), interval_s=5.0, records_delta=0, errors_delta=0,
          staleness_s=40.0, uptime=3 / 5, rate_score=0.0, freshness=0.0, error_rate=0.0,
          reliability=reliability(0.6, 0.0, 0.0, 0.0), status="stale")
    check(("gemini", T0 + 1000), interval_s=None, records_delta=0, staleness_s=None, uptime=0.0,
          rate_score=0.0, freshness=0.0, error_rate=0.0, reliability=0.3, status="stale")


def test_silence_row_is_exact() -> None:
    state = ExchangeState(last_ts=T0, counters=(1,) * 8, last_age_s=0.4,
                          last_growth_ts=T0 - 2000, up=(True,) * 12, rates=(4.0, 6.0))
    new, row = silence(state, "kraken", Tracking(stale_after_s=15.0))
    assert row["ts"] == T0 + 15_000 and row["exchange"] == "kraken"
    assert row["staleness_s"] == 17.0  # max(0.4 + 15, (15000 + 2000) / 1000)
    assert (row["uptime"], row["interval_s"], row["_timed_out"]) == (0.0, 15.0, True)
    assert row["records_delta"] is None and row["messages_per_s"] is None
    assert row["_rate_baseline"] == 5.0
    assert new.up == (True,) * 11 + (False,) and new.last_ts == T0 and new.timed_out


def test_health_point_of_enriched_and_raw_rows() -> None:
    row = record("kraken", T0 + 123, messages_per_s=12.5, frames=10) | {
        "interval_s": 5.0, "records_delta": 9, "errors_delta": 0, "reconnects_delta": None,
        "staleness_s": 0.25, "uptime": 1.0, "rate_score": 0.5, "freshness": 0.99,
        "error_rate": 0.0, "reliability": 0.947, "status": "degraded", "time": None,
    }
    line = health_point(row).to_line_protocol()
    assert line.startswith("health,exchange=kraken,status=degraded ")
    assert line.endswith(f" {T0 + 123}")
    for field in ("status_code=1", "reliability=0.947", "staleness_s=0.25", "records_delta=9",
                  "messages_per_s=12.5"):
        assert field in line
    assert "reconnects_delta" not in line and "last_message_age_s" not in line
    raw = health_point(record("kraken", T0, frames=10)).to_line_protocol()
    assert raw.startswith("health,exchange=kraken ") and "status" not in raw
    with pytest.raises(ValueError, match="health status"):
        health_point(row | {"status": "bad"})


# --- streaming -----------------------------------------------------------------------------------


def _quote(exchange: str, seq: int) -> FeedEvent:
    q = Quote.build(exchange=exchange, symbol="BTC-USD", bid=100.0, ask=100.5,
                    exchange_ts=T0 + seq, received_ts=T0 + seq, sequence=seq)
    return FeedEvent("bbo", q, sequence=seq, dedupe_id=str(seq))


def test_stream_of_real_health_records_and_silent_exchange(
    spark: SparkSession, settings: Settings
) -> None:
    a, b = "hthealthy", "htsilent"
    conf = settings.model_copy(update={"exchanges": [a, b], "health_interval_seconds": 1.0,
                                       "trigger_seconds": 0.5})
    ensure_topics(conf)
    parsed = T.parse_health(arbitrage.read_records(spark, conf, [HEALTH]))
    enriched = health_stream(parsed.where(F.col("exchange").isin(a, b)), conf)
    collected: list[dict[str, Any]] = []
    lock = threading.Lock()

    def collect(batch: DataFrame, _batch_id: int) -> None:
        rows = [r.asDict() for r in batch.where(F.col("error").isNull()).collect()]
        with lock:
            collected.extend(rows)

    def stale_rows() -> list[dict[str, Any]]:
        with lock:
            return [r for r in collected if r["status"] == "stale"]

    query = (
        enriched.writeStream.outputMode("append").foreachBatch(collect)
        .option("checkpointLocation", str(conf.state_dir / "checkpoints" / "test_health"))
        .trigger(processingTime="500 milliseconds").start()
    )

    async def scenario() -> tuple[list[dict], list[dict]]:
        pa, pb = Publisher(conf, health_interval=3600), Publisher(conf, health_interval=3600)
        runners = [asyncio.create_task(p.run()) for p in (pa, pb)]
        try:
            return await live(pa, pb, runners)
        finally:
            for runner in runners:
                runner.cancel()
            for pub in (pa, pb):
                if pub not in closed:
                    await pub.close(timeout=5)

    closed: list[Publisher] = []

    async def live(pa: Publisher, pb: Publisher, runners: list) -> tuple[list[dict], list[dict]]:
        sent_a: list[dict] = []
        for ex, pub in ((a, pa), (b, pb)):
            for _ in range(3):
                pub.frame_received(ex)
            await pub.submit(_quote(ex, 1))
            await pub.submit(_quote(ex, 2))
        sent_a += await pa.report_health()
        sent_b = await pb.report_health()
        await asyncio.sleep(1.0)
        for _ in range(4):
            pa.frame_received(a)
        await pa.submit(_quote(a, 3))
        await pa.submit(_quote(a, 6))  # 4 and 5 missing
        pa.reconnected(a)
        await pa.deadletter(a, b"{not json", "truncated JSON")
        pb.frame_received(b)  # frames, but no records
        pb.frame_received(b)
        sent_a += await pa.report_health()
        sent_b += await pb.report_health()
        runners[1].cancel()
        assert await pb.close() == 0  # b's producer stops (close() reports once more)
        closed.append(pb)
        deadline = time.monotonic() + 60
        while not stale_rows() and time.monotonic() < deadline:
            assert query.exception() is None, query.exception()
            await asyncio.sleep(0.5)
            pa.frame_received(a)
            await pa.submit(_quote(a, 7 + len(sent_a)))
            sent_a += await pa.report_health()
        return sent_a, sent_b

    try:
        sent_a, sent_b = asyncio.run(scenario())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the last records are through
            with lock:
                if {r["ts"] for r in sent_a} <= {r["ts"] for r in collected if r["exchange"] == a}:
                    break
            time.sleep(0.25)
    finally:
        query.stop()

    rows = {(r["exchange"], r["ts"]): r for r in collected}
    assert len(rows) == len(collected)  # nothing written twice
    [stale] = stale_rows()
    last_b = max(ts for ex, ts in rows if ex == b and ts != stale["ts"])
    assert stale["exchange"] == b and stale["ts"] == last_b + 3000
    assert (stale["uptime"], stale["reliability"], stale["freshness"]) == (0.0, 0.0, 0.0)
    assert stale["staleness_s"] >= 3.0 and stale["records_delta"] is None
    assert {(a, r["ts"]) for r in sent_a} <= set(rows)  # every record of the live producer
    assert {(b, r["ts"]) for r in sent_b} <= set(rows)

    a1, a2 = sent_a[0], sent_a[1]
    row = rows[(a, a2["ts"])]
    assert row["interval_s"] == approx((a2["ts"] - a1["ts"]) / 1000)
    assert (row["records_delta"], row["errors_delta"], row["reconnects_delta"]) == (2, 3, 1)
    error_rate = 3 / (2 + 1 + 2)  # (dead letter + 2 missing) / (records + dead letter + missing)
    rate_score = min(1.0, a2["messages_per_s"] / statistics.median(
        [a1["messages_per_s"], a2["messages_per_s"]]))
    freshness = 1 - a2["last_message_age_s"] / FEED_STALE  # records grew: growth age 0
    assert (row["uptime"], row["error_rate"]) == (0.5, approx(error_rate))
    assert row["rate_score"] == approx(rate_score)
    assert row["staleness_s"] == approx(a2["last_message_age_s"])
    assert row["reliability"] == approx(reliability(0.5, freshness, error_rate, rate_score))
    assert row["status"] == "degraded"
    first = rows[(a, a1["ts"])]
    assert (first["interval_s"], first["records_delta"], first["status"]) == (None, 2, "ok")

    b2 = rows[(b, sent_b[1]["ts"])]
    growth_age = (sent_b[1]["ts"] - sent_b[0]["ts"]) / 1000
    assert b2["records_delta"] == 0
    assert b2["staleness_s"] == approx(max(growth_age, sent_b[1]["last_message_age_s"]))
    assert all(r["status"] != "stale" for (ex, _), r in rows.items() if ex == a)

    # the sink writes them (as the job's foreachBatch does); Grafana groups by the status tag
    influx = InfluxConfig.of(conf)
    ensure_database(influx)
    assert write_health(influx, collected) == len(collected)
    counts = influx_query(influx, f"SELECT count(reliability) FROM health WHERE exchange = '{b}' "
                                  "GROUP BY status")
    assert {p["status"]: p["count"] for p in counts}["stale"] == 1
    [point] = influx_query(influx, "SELECT reliability, status_code, uptime FROM health "
                                   f"WHERE exchange = '{b}' AND status = 'stale'")
    assert (point["time"], point["reliability"], point["status_code"], point["uptime"]) == (
        stale["ts"], 0.0, 2.0, 0.0)
    [a_row] = influx_query(influx, f"SELECT * FROM health WHERE exchange = '{a}' "
                                   f"AND time = {a2['ts']}ms")
    assert a_row["status"] == "degraded" and a_row["records_delta"] == 2.0
    assert a_row["reliability"] == approx(row["reliability"])
