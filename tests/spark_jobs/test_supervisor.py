"""spark_jobs.supervisor: failed queries restarted from their checkpoints, within a budget.

The policy tests drive :func:`supervise` with stand-in query objects (the ``StreamingQuery``
surface it uses: ``awaitTermination``, ``stop``, ``isActive``) so that restart counts and
waits are exact; the last test runs a real Spark query over a real topic whose sink fails once,
and checks that the restart replays the failed micro-batch: every record once, none lost."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pyspark.sql import DataFrame, SparkSession

from arbstream.config import Settings
from spark_jobs.kafka_source import FORMAT
from spark_jobs.supervisor import QueryFailedError, RestartPolicy, first_line, supervise


class FailingQuery:
    """Terminates with ``error`` at once, or (``error=None``) runs until stopped."""

    def __init__(self, error: Exception | None) -> None:
        self.error, self.stopped = error, threading.Event()

    @property
    def isActive(self) -> bool:  # noqa: N802 - PySpark's name
        return self.error is None and not self.stopped.is_set()

    def awaitTermination(self) -> None:  # noqa: N802
        if self.error is not None:
            raise self.error
        self.stopped.wait()

    def stop(self) -> None:
        self.stopped.set()


def starter(errors: list[Exception | None], log: list[float]) -> Any:
    """Start queries failing with ``errors`` in turn (then running)."""
    def begin() -> FailingQuery:
        log.append(time.monotonic())
        return FailingQuery(errors.pop(0) if errors else None)
    return begin


FAST = RestartPolicy(max_restarts=5, window_s=60, backoff_s=0.05, backoff_max_s=0.2)


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(backoff_s=2, backoff_max_s=60)
    assert [policy.wait(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]


def test_transient_failures_restart_only_that_query() -> None:
    starts: dict[str, list[float]] = {"market": [], "health": []}
    restarts: list[tuple[str, int, str]] = []
    stop = threading.Event()
    begin = {
        "market": starter([RuntimeError("InfluxDB unreachable\nat ..."),
                           RuntimeError("InfluxDB unreachable")], starts["market"]),
        "health": starter([], starts["health"]),
    }
    runner = threading.Thread(target=supervise, args=(begin, FAST),
                              kwargs={"on_restart": lambda *a: restarts.append(a), "stop": stop})
    runner.start()
    deadline = time.monotonic() + 10
    while len(starts["market"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    runner.join(10)
    assert not runner.is_alive()
    assert len(starts["market"]) == 3 and len(starts["health"]) == 1
    assert restarts == [("market", 1, "InfluxDB unreachable"),
                        ("market", 2, "InfluxDB unreachable")]
    gaps = [b - a for a, b in zip(starts["market"], starts["market"][1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # backoff 0.05 s, then 0.1 s


def test_data_loss_is_not_retried() -> None:
    starts: list[float] = []
    loss = RuntimeError("[STREAM_FAILED] Query [id = 1] terminated with exception:\n"
                        "  KafkaDataLossError: q.x[0] was deleted and recreated ...\n  at ...")
    with pytest.raises(QueryFailedError) as caught:
        supervise({"market": starter([loss], starts)}, FAST)
    assert len(starts) == 1
    assert caught.value.query == "market" and caught.value.restarts == 0
    assert "a restart cannot fix: KafkaDataLossError: q.x[0] was deleted" in str(caught.value)
    assert first_line(loss).startswith("KafkaDataLossError")


def test_restart_budget_is_bounded_and_other_queries_stop() -> None:
    starts: list[float] = []
    other: list[float] = []
    begin = {"market": starter([RuntimeError("down")] * 10, starts),
             "health": starter([], other)}
    policy = RestartPolicy(max_restarts=3, window_s=60, backoff_s=0.01, backoff_max_s=0.01)
    with pytest.raises(QueryFailedError, match="more than 3 times in 60 s: down") as caught:
        supervise(begin, policy)
    assert len(starts) == 4 and caught.value.restarts == 3  # the first run + 3 restarts


def test_no_restarts_when_disabled() -> None:
    starts: list[float] = []
    with pytest.raises(QueryFailedError):
        supervise({"trades": starter([RuntimeError("x")], starts)},
                  RestartPolicy(max_restarts=0))
    assert len(starts) == 1


# --- a real query, a real topic, a sink that fails once ---------------------------------------
def test_restart_replays_the_failed_batch_exactly_once(
    spark: SparkSession, settings: Settings, tmp_path: Path
) -> None:
    topic = f"t.sup.{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        fut.result(timeout=15)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for n in range(40):
        producer.produce(topic, key=f"k{n}".encode(), value=f"v{n}".encode(), partition=n % 2)
    assert producer.flush(30) == 0

    seen: list[str] = []
    batches: list[int] = []
    failed = threading.Event()
    stop = threading.Event()

    def sink(batch: DataFrame, batch_id: int) -> None:
        rows = [bytes(r.value).decode() for r in batch.collect()]
        if rows and not failed.is_set():
            failed.set()  # the first batch with data fails, as a write to a down store would
            raise RuntimeError("sink unavailable")
        batches.append(batch_id)
        seen.extend(rows)
        if len(seen) >= 40:
            stop.set()

    def begin() -> Any:
        df = (spark.readStream.format(FORMAT)
              .option("kafka.bootstrap.servers", settings.kafka_bootstrap)
              .option("subscribe", topic).option("maxOffsetsPerTrigger", "15").load())
        return (df.writeStream.foreachBatch(sink)
                .option("checkpointLocation", str(tmp_path / "cp"))
                .trigger(processingTime="200 milliseconds").start())

    restarts: list[tuple[str, int, str]] = []
    timer = threading.Timer(120, stop.set)
    timer.start()
    try:
        supervise({"q": begin}, RestartPolicy(3, 60, 0.2, 1.0),
                  on_restart=lambda *a: restarts.append(a), stop=stop)
    finally:
        timer.cancel()
    assert [(q, n) for q, n, _ in restarts] == [("q", 1)]
    assert "sink unavailable" in restarts[0][2]
    assert sorted(seen) == sorted(f"v{n}" for n in range(40))  # none lost, none twice
    assert batches[0] == 0 and batches == sorted(set(batches))  # batch 0 replayed, then on
