"""The ``arbkafka`` Spark data source against the session's real tansu broker and SparkSession.

Every test uses topics of its own (``t.src.<uuid>``), created with explicit partitions, because
the broker is shared by the whole test session.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming.datasource import ReadAllAvailable
from pyspark.sql.types import (
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from arbstream.config import Settings
from spark_jobs.kafka_source import (
    FORMAT,
    KafkaDataLossError,
    KafkaStreamReader,
    KafkaWriter,
    _byte_limit,
    _rate_limit,
    end_offsets,
)

T0_MS = 1_678_507_205_000  # 2023-03-11T04:00:05Z

# (partition, offset, key, value, timestamp ms, topic, timestampType) as read from a stream
Record = tuple[int, int, bytes, bytes, int, str, int]


# --- helpers ---------------------------------------------------------------------------------
@pytest.fixture
def bootstrap(settings: Settings) -> str:
    return settings.kafka_bootstrap


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def create_topic(bootstrap: str, partitions: int, name: str | None = None) -> str:
    """Create a topic (a fresh ``t.src.<uuid>`` unless ``name``) and wait until it is listed."""
    name = name or f"t.src.{uuid.uuid4().hex[:12]}"
    admin = _admin(bootstrap)
    for fut in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        fut.result(timeout=15)
    deadline = time.monotonic() + 15
    while True:
        topic = admin.list_topics(timeout=5).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == partitions:
            return name
        assert time.monotonic() < deadline, f"topic {name} not listed"
        time.sleep(0.1)


def delete_topic(bootstrap: str, name: str) -> None:
    admin = _admin(bootstrap)
    for fut in admin.delete_topics([name]).values():
        fut.result(timeout=15)
    deadline = time.monotonic() + 15
    while name in admin.list_topics(timeout=5).topics:
        assert time.monotonic() < deadline, f"topic {name} still listed"
        time.sleep(0.1)


def produce(
    bootstrap: str, topic: str, partitions: int, per_partition: int, batches: int = 1,
    first: int = 0,
) -> dict[int, list[tuple[bytes, bytes, int]]]:
    """Produce ``batches`` flushes of ``per_partition`` records to every partition.

    With ``linger.ms`` each flush becomes one record batch per partition holding all of that
    flush's records. Returns ``{partition: [(key, value, timestamp_ms), ...]}`` in order.
    ``first`` offsets the sequence numbers, so repeated calls produce distinct records.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "acks": "all"})
    errors: list[Any] = []
    out: dict[int, list[tuple[bytes, bytes, int]]] = {p: [] for p in range(partitions)}
    n = first
    for _ in range(batches):
        for p in range(partitions):
            for _ in range(per_partition):
                key, value, ts = f"k{n}".encode(), f"v{n}-p{p}".encode(), T0_MS + n * 7
                producer.produce(
                    topic, key=key, value=value, partition=p, timestamp=ts,
                    on_delivery=lambda err, _msg: errors.append(err) if err else None,
                )
                out[p].append((key, value, ts))
                n += 1
        assert producer.flush(30) == 0
    assert not errors, errors
    return out


def consume_all(bootstrap: str, topic: str, partitions: int, expected: int) -> list[Any]:
    """Every record of ``topic`` from the beginning, via ``poll()`` until ``expected`` arrived."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}",
         "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        got: list[Any] = []
        deadline = time.monotonic() + 20
        while len(got) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg)
        # anything beyond the expected records?
        extra = consumer.poll(0.5)
        assert extra is None or extra.error() is not None, "more records than expected"
        return got
    finally:
        consumer.close()


def stream(
    spark: SparkSession, bootstrap: str, options: dict[str, str], checkpoint: Path,
) -> tuple[dict[int, list[Record]], DataFrame]:
    """Run an availableNow query of ``arbkafka`` to its end; records per micro-batch id."""
    reader = (
        spark.readStream.format(FORMAT)
        .option("kafka.bootstrap.servers", bootstrap)
        .option("startingOffsets", "earliest")
    )
    for key, value in options.items():
        reader = reader.option(key, value)
    df = reader.load()
    batches: dict[int, list[Record]] = {}

    def collect(batch: DataFrame, batch_id: int) -> None:
        batches[batch_id] = [
            (r.partition, r.offset, bytes(r.key), bytes(r.value),
             round(r.timestamp.timestamp() * 1000), r.topic, r.timestampType)
            for r in batch.collect()
        ]

    query = (
        df.writeStream.foreachBatch(collect)
        .option("checkpointLocation", str(checkpoint))
        .trigger(availableNow=True)
        .start()
    )
    try:
        assert query.awaitTermination(90), "query did not finish"
    finally:
        query.stop()
    stream.progress = query.recentProgress  # type: ignore[attr-defined]
    return batches, df


def by_partition(batches: dict[int, list[Any]]) -> dict[int, list[Any]]:
    """Flatten batches (in batch-id order) into per-partition lists, keeping read order."""
    out: dict[int, list[Any]] = {}
    for batch_id in sorted(batches):
        for rec in sorted(batches[batch_id], key=lambda r: (r[0], r[1])):
            out.setdefault(rec[0], []).append(rec)
    return out


def expect_error(run: Callable[[], Any], text: str) -> None:
    with pytest.raises(Exception) as info:  # noqa: B017 - Spark wraps the Python error
        run()
    assert text in str(info.value), str(info.value)[:2000]


# --- end offsets -----------------------------------------------------------------------------
def test_end_offsets_are_the_true_record_counts(bootstrap: str) -> None:
    topic = create_topic(bootstrap, 2)
    produce(bootstrap, topic, partitions=2, per_partition=5, batches=3)  # batches of 5
    conf = {"bootstrap.servers": bootstrap}

    assert end_offsets(conf, [topic]) == {topic: {"0": 15, "1": 15}}
    assert end_offsets(conf, [topic, "t.src.missing-" + uuid.uuid4().hex]) == {
        topic: {"0": 15, "1": 15}
    }

    # Why the fetch probe exists: tansu answers ListOffsets(LATEST) with the last batch's base
    # offset + 1 (11 here). Not asserted to differ, so a fixed broker does not fail the test.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}"})
    try:
        listed = [
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(2)
        ]
    finally:
        consumer.close()
    assert all(high <= 15 for high in listed)
    if listed != [15, 15]:
        assert listed == [11, 11]  # 3 batches of 5: last base offset 10, + 1


# --- rate limit ------------------------------------------------------------------------------
def test_rate_limit_no_op_under_the_limit() -> None:
    start = {"a": {"0": 10, "1": 0}}
    end = {"a": {"0": 15, "1": 5}}
    assert _rate_limit(start, end, 10) == end
    assert _rate_limit(start, end, 11) == end


def test_rate_limit_splits_in_proportion_to_backlog() -> None:
    start = {"a": {"0": 0, "1": 100}, "b": {"0": 5}}
    end = {"a": {"0": 300, "1": 200}, "b": {"0": 5}}  # backlogs 300, 100, 0
    capped = _rate_limit(start, end, 40)
    assert capped == {"a": {"0": 30, "1": 110}, "b": {"0": 5}}


@pytest.mark.parametrize("max_rows", [1, 2, 3, 7, 10, 99])
def test_rate_limit_total_never_exceeds_max_rows(max_rows: int) -> None:
    start = {"a": {"0": 0, "1": 3, "2": 50}, "b": {"0": 1}}
    end = {"a": {"0": 33, "1": 4, "2": 57}, "b": {"0": 12}}  # backlog 52
    capped = _rate_limit(start, end, max_rows)
    moved = [capped[t][p] - start[t][p] for t in end for p in end[t]]
    assert all(m >= 0 for m in moved)
    assert all(capped[t][p] <= end[t][p] for t in end for p in end[t])
    assert 0 < sum(moved) <= max_rows


def test_rate_limit_progresses_when_every_share_rounds_to_zero() -> None:
    start = {"a": {"0": 0, "1": 0, "2": 0}}
    end = {"a": {"0": 3, "1": 4, "2": 3}}  # 10 rows, 1 allowed: every share floors to 0
    capped = _rate_limit(start, end, 1)
    assert capped == {"a": {"0": 0, "1": 1, "2": 0}}
    capped = _rate_limit(start, end, 2)
    assert sum(capped["a"].values()) == 2 and capped != start


def test_byte_limit_splits_estimated_bytes_in_proportion() -> None:
    start = {"a": {"0": 0, "1": 100}}
    end = {"a": {"0": 300, "1": 200}}  # backlogs 300 and 100 records
    sizes = {("a", "0"): 10, ("a", "1"): 30}  # 3,000 and 3,000 bytes
    assert _byte_limit(start, end, 6_000, sizes) == end
    assert _byte_limit(start, end, 600, sizes) == {"a": {"0": 30, "1": 110}}  # 300 + 300 B
    # unknown sizes count 1 KiB per record; a share that floors to zero still moves one on
    assert _byte_limit(start, end, 1_000, {}) == {"a": {"0": 1, "1": 100}}


@pytest.mark.parametrize("max_bytes", [1, 50, 999, 5_000])
def test_byte_limit_never_exceeds_the_estimate(max_bytes: int) -> None:
    start = {"a": {"0": 0, "1": 3}, "b": {"0": 1}}
    end = {"a": {"0": 33, "1": 40}, "b": {"0": 12}}
    sizes = {("a", "0"): 100, ("a", "1"): 7, ("b", "0"): 250}
    capped = _byte_limit(start, end, max_bytes, sizes)
    moved = {(t, p): capped[t][p] - start[t][p] for t in end for p in end[t]}
    assert all(0 <= m <= end[t][p] - start[t][p] for (t, p), m in moved.items())
    estimate = sum(m * sizes[k] for k, m in moved.items())
    assert sum(moved.values()) == 1 or estimate <= max_bytes
    assert sum(moved.values()) >= 1


# --- streaming read --------------------------------------------------------------------------
KAFKA_COLUMNS = StructType(
    [
        StructField("key", BinaryType()),
        StructField("value", BinaryType()),
        StructField("topic", StringType()),
        StructField("partition", IntegerType()),
        StructField("offset", LongType()),
        StructField("timestamp", TimestampType()),
        StructField("timestampType", IntegerType()),
    ]
)


def _expected(produced: dict[int, list[tuple[bytes, bytes, int]]], topic: str,
              offset0: int = 0) -> dict[int, list[Any]]:
    return {
        p: [(p, offset0 + i, k, v, ts, topic, 0) for i, (k, v, ts) in enumerate(recs)]
        for p, recs in produced.items()
    }


def test_stream_reads_every_record_once_in_order_within_max_offsets(
    spark: SparkSession, bootstrap: str, tmp_path: Path
) -> None:
    topic = create_topic(bootstrap, 3)
    produced = produce(bootstrap, topic, partitions=3, per_partition=4, batches=3)  # 36 rows
    batches, df = stream(
        spark, bootstrap, {"subscribe": topic, "maxOffsetsPerTrigger": "10"}, tmp_path / "cp"
    )

    assert [(f.name, f.dataType) for f in df.schema.fields] == [
        (f.name, f.dataType) for f in KAFKA_COLUMNS.fields
    ]
    sizes = [len(batches[b]) for b in sorted(batches)]
    assert sum(sizes) == 36
    assert max(sizes) <= 10
    assert len([s for s in sizes if s]) >= 4
    assert by_partition(batches) == _expected(produced, topic)


def test_progress_reports_the_true_end_beside_the_capped_batch_end(
    spark: SparkSession, bootstrap: str, tmp_path: Path
) -> None:
    """``latestOffset`` in query progress is the topic's end (consumer lag = its distance
    from ``endOffset``), not the ``maxOffsetsPerTrigger``-capped end of the batch."""
    topic = create_topic(bootstrap, 1)
    produce(bootstrap, topic, partitions=1, per_partition=30)
    stream(spark, bootstrap, {"subscribe": topic, "maxOffsetsPerTrigger": "10"},
           tmp_path / "cp")
    first = next(p for p in stream.progress if p["numInputRows"] > 0)  # type: ignore[attr-defined]
    source = first["sources"][0]
    latest, end = json.loads(source["latestOffset"]), json.loads(source["endOffset"])
    assert end == {topic: {"0": 10}}
    assert latest == {topic: {"0": 30}}


def test_stream_reads_within_max_bytes(
    spark: SparkSession, bootstrap: str, tmp_path: Path
) -> None:
    topic = create_topic(bootstrap, 3)
    produced = produce(bootstrap, topic, partitions=3, per_partition=4, batches=3)  # 36 rows
    # keys and values of 7-10 bytes; the estimate (each partition's newest record) is never
    # below a record's real size here
    batches, _ = stream(spark, bootstrap, {"subscribe": topic, "maxBytesPerTrigger": "40"},
                        tmp_path / "cp")
    sizes = [sum(len(r[2]) + len(r[3]) for r in batches[b]) for b in sorted(batches)]
    assert max(sizes) <= 40
    assert len([s for s in sizes if s]) >= 9
    assert by_partition(batches) == _expected(produced, topic)


def test_stream_restarts_from_its_checkpoint(
    spark: SparkSession, bootstrap: str, tmp_path: Path
) -> None:
    topic = create_topic(bootstrap, 2)
    first = produce(bootstrap, topic, partitions=2, per_partition=3)
    batches, _ = stream(spark, bootstrap, {"subscribe": topic}, tmp_path / "cp")
    assert by_partition(batches) == _expected(first, topic)

    second = produce(bootstrap, topic, partitions=2, per_partition=2, first=100)
    batches, _ = stream(spark, bootstrap, {"subscribe": topic}, tmp_path / "cp")
    assert by_partition(batches) == _expected(second, topic, offset0=3)

    batches, _ = stream(spark, bootstrap, {"subscribe": topic}, tmp_path / "cp")
    assert not any(batches.values())


def test_subscribe_pattern_reads_matching_topics_only(
    spark: SparkSession, bootstrap: str, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:12]
    wanted = [create_topic(bootstrap, 1, f"t.src.{uid}.{s}") for s in ("a", "b")]
    unwanted = [
        create_topic(bootstrap, 1, name)
        for name in (f"t.src.{uid}.c", f"t.src.{uid}.a.x", f"x.t.src.{uid}.a")
    ]
    for n, topic in enumerate(wanted + unwanted):
        produce(bootstrap, topic, partitions=1, per_partition=2, first=10 * n)

    batches, _ = stream(
        spark, bootstrap, {"subscribePattern": rf"t\.src\.{uid}\.[ab]"}, tmp_path / "cp"
    )
    rows = [r for b in batches.values() for r in b]
    assert sorted((r[5], r[1]) for r in rows) == sorted(
        (t, off) for t in wanted for off in (0, 1)
    )


# --- data loss -------------------------------------------------------------------------------
@pytest.mark.parametrize("fail_on_data_loss", [True, False])
def test_offsets_beyond_the_end_are_data_loss(
    spark: SparkSession, bootstrap: str, tmp_path: Path, fail_on_data_loss: bool
) -> None:
    topic = create_topic(bootstrap, 2)
    produce(bootstrap, topic, partitions=2, per_partition=5)
    batches, _ = stream(spark, bootstrap, {"subscribe": topic}, tmp_path / "cp")
    assert sum(map(len, batches.values())) == 10

    # the topic is recreated with fewer records: the checkpoint (5, 5) is beyond its end
    delete_topic(bootstrap, topic)
    create_topic(bootstrap, 2, topic)
    again = produce(bootstrap, topic, partitions=2, per_partition=2, first=100)

    options = {"subscribe": topic, "failOnDataLoss": str(fail_on_data_loss).lower()}
    if fail_on_data_loss:
        expect_error(
            lambda: stream(spark, bootstrap, options, tmp_path / "cp"),
            "recreated or the broker lost its data",
        )
    else:
        batches, _ = stream(spark, bootstrap, options, tmp_path / "cp")
        assert by_partition(batches) == _expected(again, topic)


@pytest.mark.parametrize("fail_on_data_loss", [True, False])
def test_topic_recreated_and_refilled_past_the_checkpoint_is_refused(
    spark: SparkSession, bootstrap: str, tmp_path: Path, fail_on_data_loss: bool
) -> None:
    """Offsets alone look valid (the new topic's end is past the checkpoint's 3): only the
    pinned topic id tells the new topic from the old one."""
    topic = create_topic(bootstrap, 1)
    ids = tmp_path / "ids.json"
    produce(bootstrap, topic, partitions=1, per_partition=3)
    options = {"subscribe": topic, "topicIdsFile": str(ids),
               "failOnDataLoss": str(fail_on_data_loss).lower()}
    batches, _ = stream(spark, bootstrap, options, tmp_path / "cp")
    assert sum(map(len, batches.values())) == 3
    first_id = json.loads(ids.read_text())[topic]

    delete_topic(bootstrap, topic)
    create_topic(bootstrap, 1, topic)
    again = produce(bootstrap, topic, partitions=1, per_partition=8, first=100)  # end 8 > 3
    if fail_on_data_loss:
        expect_error(lambda: stream(spark, bootstrap, options, tmp_path / "cp"),
                     "was deleted and recreated since this checkpoint was written")
        assert json.loads(ids.read_text())[topic] == first_id  # refused again on restart
    else:  # read again from the new topic's first record, not from offset 3
        batches, _ = stream(spark, bootstrap, options, tmp_path / "cp")
        assert by_partition(batches) == _expected(again, topic)
        assert json.loads(ids.read_text())[topic] != first_id


def test_unchanged_topic_ids_restart_normally(
    spark: SparkSession, bootstrap: str, tmp_path: Path
) -> None:
    topic = create_topic(bootstrap, 1)
    options = {"subscribe": topic, "topicIdsFile": str(tmp_path / "ids.json")}
    produce(bootstrap, topic, partitions=1, per_partition=2)
    assert sum(map(len, stream(spark, bootstrap, options, tmp_path / "cp")[0].values())) == 2
    more = produce(bootstrap, topic, partitions=1, per_partition=2, first=50)
    batches, _ = stream(spark, bootstrap, options, tmp_path / "cp")
    assert by_partition(batches) == _expected(more, topic, offset0=2)


def test_data_loss_is_detected_without_available_now(bootstrap: str) -> None:
    """A processing-time trigger (no ``prepareForTriggerAvailableNow``) must see the loss too."""
    topic = create_topic(bootstrap, 1)
    produce(bootstrap, topic, partitions=1, per_partition=2)  # end 2; checkpoint says 5
    reader = KafkaStreamReader({"kafka.bootstrap.servers": bootstrap, "subscribe": topic})
    outcome: list[Any] = []

    def latest() -> None:
        try:
            outcome.append(reader.latestOffset({topic: {"0": 5}}, ReadAllAvailable()))
        except Exception as exc:
            outcome.append(exc)
        finally:
            reader.stop()

    worker = threading.Thread(target=latest, daemon=True)
    worker.start()
    worker.join(5)
    assert outcome, "latestOffset still probing after 5 s"
    assert isinstance(outcome[0], KafkaDataLossError), outcome[0]
    assert "recreated or the broker lost its data" in str(outcome[0])


# --- batch writer ----------------------------------------------------------------------------
def test_batch_writer_produces_keys_and_values(spark: SparkSession, bootstrap: str) -> None:
    topic_a, topic_b = create_topic(bootstrap, 2), create_topic(bootstrap, 1)
    rows = [(topic_a, f"key-{i}", f"value-{i}") for i in range(20)]
    rows += [(topic_b, f"key-b{i}", f"value-b{i}") for i in range(5)]
    rows += [(topic_b, None, "no-key")]
    df = spark.createDataFrame(rows, "topic STRING, key STRING, value STRING").repartition(3)
    df.write.format(FORMAT).option("kafka.bootstrap.servers", bootstrap).mode("append").save()

    binary = spark.createDataFrame(
        [(topic_b, b"\x00\xffbin", b"\x01\x02")], "topic STRING, key BINARY, value BINARY"
    )
    binary.write.format(FORMAT).option("kafka.bootstrap.servers", bootstrap).mode(
        "append"
    ).save()

    got_a = consume_all(bootstrap, topic_a, 2, 20)
    assert sorted((m.key(), m.value()) for m in got_a) == sorted(
        (k.encode(), v.encode()) for _, k, v in rows[:20]
    )
    got_b = consume_all(bootstrap, topic_b, 1, 7)
    assert Counter((m.key(), m.value()) for m in got_b) == Counter(
        [(f"key-b{i}".encode(), f"value-b{i}".encode()) for i in range(5)]
        + [(None, b"no-key"), (b"\x00\xffbin", b"\x01\x02")]
    )


# --- option validation -----------------------------------------------------------------------
BAD_OPTIONS = [
    ({"subscribe": "a", "subscribePattern": "a.*"}, "exactly one of the options subscribe"),
    ({}, "exactly one of the options subscribe"),
    ({"subscribe": "a", "startingOffsets": "newest"}, "startingOffsets must be earliest or"),
    ({"subscribe": "a", "maxOffsetsPerTrigger": "0"}, "maxOffsetsPerTrigger must be a positive"),
    ({"subscribe": "a", "maxOffsetsPerTrigger": "-5"}, "maxOffsetsPerTrigger must be a positive"),
    ({"subscribe": "a", "maxBytesPerTrigger": "0"}, "maxBytesPerTrigger must be a positive"),
    ({"subscribe": "a", "failOnDataLoss": "maybe"}, "expected true or false"),
    ({"subscribe": "a", "endOffsets": "guess"}, "endOffsets must be fetch or list"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_reader_rejects_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KafkaStreamReader({"kafka.bootstrap.servers": "127.0.0.1:1", **options})


def test_bootstrap_servers_is_required() -> None:
    with pytest.raises(ValueError, match="kafka.bootstrap.servers is required"):
        KafkaStreamReader({"subscribe": "a"})
    with pytest.raises(ValueError, match="kafka.bootstrap.servers is required"):
        KafkaWriter({})


def _start_with(spark: SparkSession, options: Iterable[tuple[str, str]], tmp: Path) -> None:
    reader = spark.readStream.format(FORMAT)
    for key, value in options:
        reader = reader.option(key, value)
    query = (
        reader.load().writeStream.format("noop")
        .option("checkpointLocation", str(tmp / uuid.uuid4().hex))
        .trigger(availableNow=True)
        .start()
    )
    try:
        query.awaitTermination(60)
    finally:
        query.stop()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (BAD_OPTIONS[0][0], BAD_OPTIONS[0][1]),
        (BAD_OPTIONS[1][0], BAD_OPTIONS[1][1]),
        (BAD_OPTIONS[2][0], BAD_OPTIONS[2][1]),
        (BAD_OPTIONS[3][0], BAD_OPTIONS[3][1]),
    ],
)
def test_bad_options_fail_the_spark_query_clearly(
    spark: SparkSession, bootstrap: str, tmp_path: Path, options: dict[str, str], message: str
) -> None:
    opts = [("kafka.bootstrap.servers", bootstrap), *options.items()]
    expect_error(lambda: _start_with(spark, opts, tmp_path), message)


def test_missing_bootstrap_fails_the_spark_query_and_write_clearly(
    spark: SparkSession, tmp_path: Path
) -> None:
    message = "kafka.bootstrap.servers is required"
    expect_error(lambda: _start_with(spark, [("subscribe", "a")], tmp_path), message)
    df = spark.createDataFrame([("a", "k", "v")], "topic STRING, key STRING, value STRING")
    expect_error(lambda: df.write.format(FORMAT).mode("append").save(), message)
