"""The query progress listener (:mod:`spark_jobs.progress`): the pure lag computations on
hand-made progress dicts with known answers, and the listener on the shared Spark session
writing to the session stack's real InfluxDB (and surviving one that is unreachable)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from arbstream.config import Settings
from arbstream.redact import first_line, redact, secret_values
from arbstream.shell.stack import free_port
from arbstream.store.config import InfluxConfig
from arbstream.store.influx.queries import query, restart_count
from arbstream.store.influx.schema import ensure_database
from spark_jobs.progress import (
    ProgressListener,
    attach,
    consumer_lag,
    event_time_lag_s,
    exception_summary,
    progress_row,
    record_restart,
)
from testing.support import unique_name

# --- pure: lags from hand-made progress dicts ---------------------------------------------------


def kafka_source(end: Any, latest: Any) -> dict[str, Any]:
    return {"description": "KafkaV2[Subscribe[md.kraken.quotes]]", "startOffset": None,
            "endOffset": end, "latestOffset": latest, "numInputRows": 0}


def test_consumer_lag_sums_latest_minus_end_over_sources_and_partitions() -> None:
    progress = {"sources": [
        # dicts, as in the progress JSON: (12-10) + (7-7) + (30-5) = 27
        kafka_source({"a": {"0": 10, "1": 7}, "b": {"0": 5}},
                     {"a": {"0": 12, "1": 7}, "b": {"0": 30}}),
        # JSON text, as in a StreamingQueryProgress object: 100-40 = 60
        kafka_source('{"c": {"0": 40}}', '{"c": {"0": 100}}'),
    ]}
    assert consumer_lag(progress) == 87


def test_consumer_lag_skips_what_is_not_reported_in_both() -> None:
    progress = {"sources": [
        kafka_source({"a": {"0": 10}}, None),  # no latestOffset (e.g. a Python source)
        kafka_source({"a": {"0": 10}}, "null"),
        kafka_source(1234, 1300),  # a rate/memory source's offsets: not Kafka's shape
        # partition 1 only in latest, topic z only in end; latest < end counts 0, not -3
        kafka_source({"a": {"0": 10, "2": 9}, "z": {"0": 1}}, {"a": {"0": 11, "1": 50, "2": 6}}),
    ]}
    assert consumer_lag(progress) == 1
    assert consumer_lag({"sources": progress["sources"][:3]}) is None
    assert consumer_lag({"sources": []}) is None


def test_event_time_lag_is_batch_start_minus_watermark() -> None:
    p = {"timestamp": "2026-12-06T05:00:10.250Z",
         "eventTime": {"watermark": "2026-12-06T04:59:58.000Z"}}
    assert event_time_lag_s(p) == 12.25
    assert event_time_lag_s({**p, "eventTime": {"watermark": "1970-01-01T00:00:00.000Z"}}) is None
    assert event_time_lag_s({**p, "eventTime": {}}) is None
    assert event_time_lag_s({"timestamp": p["timestamp"]}) is None


def test_progress_row_of_a_kafka_progress() -> None:
    progress = {
        "id": "0b7c", "name": "market", "timestamp": "2026-12-06T05:00:10.250Z",
        "batchId": 41, "numInputRows": 1200, "inputRowsPerSecond": 600.5,
        "processedRowsPerSecond": 800.25,
        "durationMs": {"addBatch": 1300, "triggerExecution": 1500},
        "eventTime": {"watermark": "2026-12-06T05:00:00.250Z"},
        "sources": [kafka_source({"t": {"0": 5, "1": 5}}, {"t": {"0": 15, "1": 6}})],
    }
    assert progress_row(progress) == {
        "query": "market", "event": "progress",
        "ts": int(datetime(2026, 12, 6, 5, 0, 10, 250000, tzinfo=UTC).timestamp() * 1000),
        "input_rows_per_s": 600.5, "processed_rows_per_s": 800.25, "num_input_rows": 1200.0,
        "batch_id": 41.0, "batch_duration_ms": 1500.0, "event_time_lag_s": 10.0,
        "consumer_lag_records": 11,
    }
    assert progress_row({**progress, "name": None})["query"] == "0b7c"


def test_redact_masks_secrets_and_url_credentials() -> None:
    text = ("failed: mongodb://arb:hunter2@db:27017/x token=tok-123\n"
            "second line with tok-123")
    assert redact(text, ["tok-123"]) == ("failed: mongodb://***@db:27017/x token=***\n"
                                         "second line with ***")
    assert first_line("\n\n  boom tok-123  \nmore", ["tok-123"]) == "boom ***"
    settings = Settings(influx_password="pw-1", influx_username="u",
                        kafka_config={"ssl.key.password": "pw-2"})
    assert {"pw-1", "pw-2"} <= set(secret_values(settings))


def test_exception_summary_adds_the_python_exception_of_a_traceback() -> None:
    text = ("org.apache.spark.SparkException: [FOREACH_BATCH_USER_FUNCTION_ERROR] Reason: "
            "Return Message: Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise RuntimeError(pw)\n'
            "RuntimeError: bad pw-9\n\nJVM stack trace:\n\tat a.b(c)")
    assert exception_summary(text, ["pw-9"]) == (
        "org.apache.spark.SparkException: [FOREACH_BATCH_USER_FUNCTION_ERROR] Reason: "
        "Return Message: Traceback (most recent call last): ... RuntimeError: bad ***")
    assert exception_summary("java.io.IOException: disk full\n\tat x") == (
        "java.io.IOException: disk full")
    assert exception_summary("  \n") == ""


# --- e2e: the listener on the shared session ----------------------------------------------------


@pytest.fixture
def influx(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The session's InfluxDB with a database of this test's own."""
    own = settings.model_copy(update={"influx_db": unique_name(request, "t_progress_")})
    ensure_database(InfluxConfig.of(own))
    return own


@pytest.fixture
def listen(spark: SparkSession) -> Iterator[Callable[[ProgressListener], ProgressListener]]:
    """Registers listeners on the shared session; removes and closes them afterwards."""
    added: list[ProgressListener] = []

    def add(listener: ProgressListener, registered: bool = False) -> ProgressListener:
        if not registered:
            spark.streams.addListener(listener)
        added.append(listener)
        return listener

    yield add
    for listener in added:
        spark.streams.removeListener(listener)
        listener.close()


def rate_counts(spark: SparkSession) -> DataFrame:
    """A rate source (20 rows/s) counted per 1 s event-time window, 1 s watermark."""
    return (spark.readStream.format("rate").option("rowsPerSecond", 20).load()
            .withWatermark("timestamp", "1 second")
            .groupBy(F.window("timestamp", "1 second")).count())


def start(df: DataFrame, name: str, **sink: Any) -> StreamingQuery:
    writer = df.writeStream.queryName(name).outputMode("append").trigger(
        processingTime="500 milliseconds")
    if "foreach_batch" in sink:
        writer = writer.foreachBatch(sink["foreach_batch"])
    else:
        writer = writer.format("noop")
    return writer.start()


def wait_batches(q: StreamingQuery, n: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while len([p for p in q.recentProgress if p["numInputRows"] > 0]) < n:
        assert q.exception() is None, q.exception()
        assert time.monotonic() < deadline, f"{n} batches not done in {timeout:.0f}s"
        time.sleep(0.2)


def points(conf: InfluxConfig, name: str, event: str) -> list[dict[str, Any]]:
    return query(conf, f"SELECT * FROM query_progress WHERE \"query\" = '{name}' "
                       f"AND \"event\" = '{event}' ORDER BY time")


def wait_points(conf: InfluxConfig, listener: ProgressListener, name: str, event: str,
                timeout: float = 30.0) -> list[dict[str, Any]]:
    """The points of ``event`` once there are some (events reach listeners asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        listener.flush()
        found = points(conf, name, event)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def iso_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def test_listener_writes_one_point_per_progress_matching_last_progress(
        spark: SparkSession, influx: Settings, listen: Callable[..., ProgressListener]) -> None:
    conf = InfluxConfig.of(influx)
    listener = listen(attach(spark, influx), registered=True)
    name = f"progress_{uuid.uuid4().hex[:8]}"
    q = start(rate_counts(spark), name)
    try:
        wait_batches(q, 4)
    finally:
        q.stop()
    recent = [json.loads(p.json) for p in q.recentProgress]
    # the bus delivers a query's events in order: once its termination is written, every
    # progress before it is too
    [end] = wait_points(conf, listener, name, "terminated")
    written = {p["time"]: p for p in points(conf, name, "progress")}

    assert listener.failed == 0 and listener.dropped == 0
    assert len(written) >= len(recent) >= 4
    lags = 0
    for p in recent:
        point = written[iso_ms(p["timestamp"])]  # time = batch start
        assert point["batch_id"] == p["batchId"]
        assert point["num_input_rows"] == p["numInputRows"]
        assert point["input_rows_per_s"] == pytest.approx(p["inputRowsPerSecond"])
        assert point["processed_rows_per_s"] == pytest.approx(p["processedRowsPerSecond"])
        assert point["batch_duration_ms"] == p["durationMs"]["triggerExecution"]
        assert point.get("consumer_lag_records") is None  # the rate source: no latest
        watermark = iso_ms(p["eventTime"]["watermark"])
        if watermark > 0:
            lags += 1
            expected = (iso_ms(p["timestamp"]) - watermark) / 1000
            assert point["event_time_lag_s"] == pytest.approx(expected)
            assert 0 < expected < 60
        else:
            assert point.get("event_time_lag_s") is None
    assert lags >= 2
    assert end["failed"] == 0 and end.get("exception") is None


def test_failed_query_writes_failed_point_with_the_exceptions_first_line(
        spark: SparkSession, influx: Settings, listen: Callable[..., ProgressListener]) -> None:
    conf = InfluxConfig.of(influx)
    secret = "tok-" + uuid.uuid4().hex
    listener = listen(ProgressListener(conf, [secret]))
    name = f"failing_{uuid.uuid4().hex[:8]}"

    def body(_batch: DataFrame, batch_id: int) -> None:
        if batch_id >= 1:
            raise RuntimeError(f"sink lost with credentials {secret}")

    rate = spark.readStream.format("rate").option("rowsPerSecond", 20).load()
    q = start(rate, name, foreach_batch=body)
    with pytest.raises(Exception, match="sink lost"):
        q.awaitTermination(90)
    [end] = wait_points(conf, listener, name, "terminated")

    assert end["failed"] == 1
    assert end["exception"] and "\n" not in end["exception"]
    assert secret not in end["exception"]
    # the Java exception's first line, then the Python exception's line of its traceback
    assert end["exception"].endswith(" ... RuntimeError: sink lost with credentials ***")
    assert "Traceback (most recent call last):" in end["exception"]


def test_listener_survives_an_unreachable_influxdb(
        spark: SparkSession, listen: Callable[..., ProgressListener],
        caplog: pytest.LogCaptureFixture, settings: Settings) -> None:
    down = InfluxConfig.of(settings.model_copy(
        update={"influx_url": f"http://127.0.0.1:{free_port()}"}))
    listener = listen(ProgressListener(down, timeout=0.5))
    name = f"no_influx_{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.ERROR, logger="spark_jobs.progress"):
        q = start(rate_counts(spark), name)
        try:
            wait_batches(q, 3)
            assert q.isActive and q.exception() is None
        finally:
            q.stop()
        assert listener.flush()
    assert listener.failed >= 3 and listener.written == 0
    errors = [r for r in caplog.records if r.name == "spark_jobs.progress"]
    assert errors and "could not write" in errors[0].getMessage()
    assert len(errors) < listener.failed  # rate-limited: one record per minute


def test_record_restart_counts_and_never_raises(
        influx: Settings, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    conf = InfluxConfig.of(influx)
    since = datetime.now(UTC)
    password = influx.mongo_uri.get_secret_value()
    assert record_restart(influx, "market", 1, RuntimeError(f"lost {password}\ntrace"))
    assert record_restart(conf, "market", 2, "again")
    assert restart_count(conf, since) == {"market": 2}
    reasons = [r["reason"] for r in query(conf, "SELECT * FROM query_restarts ORDER BY time")]
    assert reasons == ["lost ***", "again"]

    down = settings.model_copy(update={"influx_url": f"http://127.0.0.1:{free_port()}"})
    with caplog.at_level(logging.ERROR, logger="spark_jobs.progress"):
        assert record_restart(down, "market", 3, "x") is False
    assert "could not record restart 3 of query market" in caplog.text
