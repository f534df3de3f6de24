"""Kafka as a Spark data source, written on PySpark's Python Data Source API with confluent-kafka.

Long module: Spark's Python Data Source API splits a source into cooperating classes
(data source, batch and streaming readers, partitions, writer) around one offset model; they
stay together, as in PySpark's own data source examples.

Registered as format ``arbkafka``. Its rows have the built-in ``format("kafka")`` source's
columns (``key, value, topic, partition, offset, timestamp, timestampType``), so everything
downstream is the same whichever source a deployment selects (``ARB_SPARK_KAFKA_SOURCE``).

Stream reading (``spark.readStream.format("arbkafka")``), options as in the built-in source:

* ``kafka.bootstrap.servers`` (required) and any other ``kafka.<librdkafka setting>``;
* ``subscribe`` (comma-separated topics) or ``subscribePattern`` (a Python regex, full match);
* ``startingOffsets``: ``earliest`` (default) or ``latest``, used only when the query has no
  checkpoint; afterwards offsets come from the checkpoint;
* ``maxOffsetsPerTrigger``: cap on records per micro-batch, split over partitions in
  proportion to their backlog, like the built-in source;
* ``maxBytesPerTrigger``: cap on the bytes (keys and values) per micro-batch, estimated per
  partition from the size of its newest record, which the end-offset probe reads anyway; the
  same proportional split, and at least one record per batch so the query always moves on;
* ``failOnDataLoss`` (default ``true``): fail when offsets go backwards (topic recreated, broker
  lost its data) or records were deleted before being read; with ``false`` such partitions
  restart from their earliest available offset and a warning is logged;
* ``topicIdsFile``: a JSON file pinning the id of every subscribed topic
  (:mod:`spark_jobs.topic_identity`); before each micro-batch is planned the broker's topic
  ids are compared with it, and a topic deleted and recreated since the checkpoint was written
  is data loss (as above), even when it was refilled past the checkpointed offsets, which
  would otherwise look valid and silently skip the new topic's first records;
* ``endOffsets``: ``fetch`` (default) takes each partition's end from a fetch response's
  high-water mark; ``list`` uses ListOffsets(LATEST). ``fetch`` exists because tansu answers
  ListOffsets(LATEST) with the last batch's base offset + 1, which is not the end.

Batch writing (``df.write.format("arbkafka")``) takes columns ``topic``, ``key``, ``value``
(string or binary) and produces them with an idempotent producer (acks=all) on the executors.

Offsets are JSON ``{"<topic>": {"<partition>": next_offset}}``. Kafka clients are opened
lazily where they are used (driver for planning, executors for reading), never in
``__init__``, so the reader pickles cleanly.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyspark.sql.datasource import (
    DataSource,
    DataSourceStreamReader,
    DataSourceWriter,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.streaming.datasource import (
    ReadAllAvailable,
    ReadLimit,
    ReadMaxRows,
    SupportsTriggerAvailableNow,
)
from pyspark.sql.types import StructType

from arbstream.kafka import reliable_producer_config, with_logger
from spark_jobs.topic_identity import TopicIdentity

log = logging.getLogger(__name__)

FORMAT = "arbkafka"
SCHEMA = (
    "key BINARY, value BINARY, topic STRING, partition INT, offset BIGINT, "
    "timestamp TIMESTAMP, timestampType INT"
)
ARROW_SCHEMA = pa.schema(
    [
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("timestampType", pa.int32()),
    ]
)
ARROW_BATCH_ROWS = 10_000
#: A read batch is cut once its values reach this many bytes, whatever its row count.
ARROW_BATCH_BYTES = 16 << 20

Offsets = dict[str, dict[str, int]]


class KafkaDataLossError(RuntimeError):
    """Offsets went backwards or records vanished before the query read them."""


class KafkaReadTimeoutError(RuntimeError):
    """A planned offset range could not be read within ``pollTimeoutMs`` (the broker did not
    answer): transient, unlike :class:`KafkaDataLossError`; the job restarts the query."""


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {value!r}")
    return value.lower() == "true"


def client_config(options: dict[str, str]) -> dict[str, Any]:
    """librdkafka settings from ``kafka.*`` options.

    Raises:
        ValueError: ``kafka.bootstrap.servers`` is missing.
    """
    conf = {k[len("kafka."):]: v for k, v in options.items() if k.startswith("kafka.")}
    if "bootstrap.servers" not in conf:
        raise ValueError("option kafka.bootstrap.servers is required")
    return conf


@dataclass(frozen=True)
class KafkaPartition(InputPartition):
    """One topic-partition's offset range ``[start, end)`` for one micro-batch."""

    topic: str
    partition: int
    start: int
    end: int


class KafkaStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Micro-batch reader over a set of topics; see the module docstring for options."""

    def __init__(self, options: dict[str, str]) -> None:
        self.conf = client_config(options)
        topics = options.get("subscribe")
        pattern = options.get("subscribePattern")
        if bool(topics) == bool(pattern):
            raise ValueError("set exactly one of the options subscribe, subscribePattern")
        self.topics = [t.strip() for t in topics.split(",")] if topics else None
        self.pattern = re.compile(pattern) if pattern else None
        self.starting = options.get("startingOffsets", "earliest")
        if self.starting not in ("earliest", "latest"):
            raise ValueError(f"startingOffsets must be earliest or latest, not {self.starting!r}")
        max_offsets = options.get("maxOffsetsPerTrigger")
        self.max_offsets = int(max_offsets) if max_offsets else None
        if self.max_offsets is not None and self.max_offsets < 1:
            raise ValueError("maxOffsetsPerTrigger must be a positive integer")
        max_bytes = options.get("maxBytesPerTrigger")
        self.max_bytes = int(max_bytes) if max_bytes else None
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError("maxBytesPerTrigger must be a positive integer")
        #: bytes of the newest record of each (topic, partition) seen by the end-offset probe
        self._record_bytes: dict[tuple[str, str], int] = {}
        self.fail_on_data_loss = _flag(options.get("failOnDataLoss"), True)
        self.end_offsets_mode = options.get("endOffsets", "fetch")
        if self.end_offsets_mode not in ("fetch", "list"):
            raise ValueError("endOffsets must be fetch or list")
        self.poll_timeout = float(options.get("pollTimeoutMs", "120000")) / 1000
        self._consumer: Any = None
        self._admin: Any = None
        self._available_now: Offsets | None = None
        self._latest: Offsets | None = None
        ids_file = options.get("topicIdsFile")
        self._identity = TopicIdentity(Path(ids_file)) if ids_file else None
        #: the query has no checkpointed offsets: pin the topics as they are now
        self._fresh = False
        #: recreated topics read from their earliest offset in the next planned batch
        self._reset: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_consumer"] = None
        state["_admin"] = None
        state["_identity"] = None  # driver-only
        return state

    # --- driver side -------------------------------------------------------------------
    def _client(self) -> Any:
        from confluent_kafka import Consumer

        if self._consumer is None:
            self._consumer = Consumer(
                {
                    **with_logger(self.conf),  # librdkafka's log lines via Python logging
                    "group.id": f"arbstream-planner-{uuid.uuid4()}",
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                    "max.partition.fetch.bytes": 65536,
                    "queued.max.messages.kbytes": 1024,
                    "fetch.wait.max.ms": 10,
                }
            )
        return self._consumer

    def _topic_partitions(self) -> dict[str, list[int]]:
        meta = self._client().list_topics(timeout=15)
        out = {}
        for name, topic in meta.topics.items():
            if topic.error is not None:
                continue
            wanted = name in self.topics if self.topics else self.pattern.fullmatch(name)
            if wanted:
                out[name] = sorted(topic.partitions)
        return out

    def _topic_ids(self, topics: list[str]) -> dict[str, str] | None:
        """The broker's current id of each of ``topics`` (KIP-516 UUIDs, base64), or
        ``None`` when the broker does not answer in time (logged; checked again next batch)."""
        from confluent_kafka import KafkaException, TopicCollection
        from confluent_kafka.admin import AdminClient

        if self._admin is None:
            self._admin = AdminClient({**self.conf, "log_level": 0})
        try:
            found = self._admin.describe_topics(TopicCollection(topics), request_timeout=15)
            return {t: str(f.result().topic_id) for t, f in found.items()}
        except KafkaException as exc:
            log.warning("could not read topic ids of %s (%s); checked again next batch",
                        topics, exc)
            return None

    def _check_identity(self, positions: Offsets) -> None:
        """Compare the subscribed topics' ids with the pinned ones (``topicIdsFile``); a
        recreated topic is data loss: raised, or (``failOnDataLoss=false``) read again from its
        earliest offset. Pins the current ids afterwards."""
        if self._identity is None or not positions:
            return
        current = self._topic_ids(sorted(positions))
        if current is None:
            return
        if self._fresh:
            self._identity.pinned = {}
            self._fresh = False
        for topic, old, new in self._identity.changed(current):
            self._data_loss(
                f"{topic} was deleted and recreated since this checkpoint was written (topic "
                f"id {old} -> {new}); its offsets count the new topic's records, so the "
                f"checkpointed offsets {positions[topic]} would skip its first records"
            )
            for p in positions[topic]:
                positions[topic][p] = self._earliest(topic, int(p))
            self._reset.add(topic)
        self._identity.pin(current)

    def _earliest(self, topic: str, partition: int) -> int:
        from confluent_kafka import TopicPartition

        low, _ = self._client().get_watermark_offsets(
            TopicPartition(topic, partition), timeout=15, cached=False
        )
        return max(low, 0)

    def _end_offsets(self, positions: Offsets) -> Offsets:
        """High-water mark of every partition in ``positions``.

        ``fetch`` mode assigns each partition just before its listed end and reads the
        high-water mark that the broker returns with the first fetch response (a message or an
        end-of-partition event), so at most one fetch (64 KiB) per partition is downloaded here.
        The start is ``max(earliest, listed latest − 1)``: inside the log even with tansu's
        short ListOffsets(LATEST) answer, and not the checkpointed position, so a response comes
        even when that position is past the end (topic recreated) and data loss is detected at
        once. Starting at the beginning instead costs time in proportion to the topic size on
        tansu (3.1 s per call at 600k records, against 7–16 ms).
        """
        from confluent_kafka import KafkaError, TopicPartition

        client = self._client()
        tps = [
            TopicPartition(t, int(p), off) for t, parts in positions.items()
            for p, off in parts.items()
        ]
        if not tps:
            return {}
        if self.end_offsets_mode == "list":
            return _group(
                (tp.topic, tp.partition, client.get_watermark_offsets(tp, timeout=15)[1])
                for tp in tps
            )
        starts = []
        for tp in tps:
            low, listed = client.get_watermark_offsets(tp, timeout=15)
            starts.append(TopicPartition(tp.topic, tp.partition, max(low, listed - 1)))
        client.assign(starts)
        pending = {(tp.topic, tp.partition) for tp in tps}
        deadline = time.monotonic() + 15
        try:
            while pending and time.monotonic() < deadline:
                msg = client.poll(0.2)
                eof = msg is not None and msg.error() is not None and (
                    msg.error().code() == KafkaError._PARTITION_EOF
                )
                if msg is not None and (msg.error() is None or eof):
                    pending.discard((msg.topic(), msg.partition()))
                if msg is not None and msg.error() is None:
                    self._record_bytes[(msg.topic(), str(msg.partition()))] = (
                        len(msg.value() or b"") + len(msg.key() or b""))
            ends = []
            for tp in tps:
                if (tp.topic, tp.partition) in pending:
                    log.warning("no fetch response from %s[%d]; keeping offset %d",
                                tp.topic, tp.partition, tp.offset)
                    ends.append((tp.topic, tp.partition, tp.offset))
                    continue
                _, high = client.get_watermark_offsets(tp, cached=True)
                ends.append((tp.topic, tp.partition, high))
            return _group(ends)
        finally:
            client.unassign()

    def _positions(self, start: Offsets) -> Offsets:
        """``start`` plus newly discovered partitions (from their earliest offset)."""
        positions: Offsets = {t: dict(parts) for t, parts in start.items()}
        for topic, parts in self._topic_partitions().items():
            known = positions.setdefault(topic, {})
            for p in parts:
                if str(p) not in known:
                    known[str(p)] = self._earliest(topic, p)
        return positions

    def initialOffset(self) -> dict:
        self._fresh = True
        positions = self._positions({})
        if self.starting == "earliest":
            return positions
        return self._end_offsets(positions)

    def getDefaultReadLimit(self) -> ReadLimit:
        return ReadMaxRows(self.max_offsets) if self.max_offsets else ReadAllAvailable()

    def prepareForTriggerAvailableNow(self) -> None:
        self._available_now = self._end_offsets(self._positions({}))

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        positions = self._positions(start)
        self._check_identity(positions)
        ends = self._end_offsets(positions)
        if self._available_now is not None:
            ends = _group(
                (t, int(p), min(off, self._available_now.get(t, {}).get(p, off)))
                for t, parts in ends.items() for p, off in parts.items()
            )
        for topic, parts in ends.items():
            for p, end in parts.items():
                begin = positions[topic][p]
                if end < begin:
                    self._data_loss(
                        f"{topic}[{p}] end offset {end} is before the checkpointed offset "
                        f"{begin}: the topic was recreated or the broker lost its data"
                    )
                    positions[topic][p] = self._earliest(topic, int(p))
        self._latest = ends  # before the caps: the source's true end (consumer lag)
        if isinstance(limit, ReadMaxRows):
            ends = _rate_limit(positions, ends, limit.max_rows)
        if self.max_bytes is not None:
            ends = _byte_limit(positions, ends, self.max_bytes, self._record_bytes)
        return ends

    def reportLatestOffset(self) -> dict | None:
        """The end offsets seen by the last :meth:`latestOffset`, before the
        ``maxOffsetsPerTrigger``/``maxBytesPerTrigger`` caps (Spark reports them as the source's
        ``latestOffset`` in query progress: the consumer lag is their distance from
        ``endOffset``); ``None`` before the first call."""
        return self._latest

    def _data_loss(self, message: str) -> None:
        if self.fail_on_data_loss:
            raise KafkaDataLossError(
                message + ". Delete the query's checkpoint or set failOnDataLoss=false "
                "(ARB_FAIL_ON_DATA_LOSS=false) to restart those partitions from earliest."
            )
        log.warning("data loss: %s; restarting from earliest", message)

    def partitions(self, start: dict, end: dict) -> list[KafkaPartition]:
        out = []
        for topic, parts in end.items():
            for p, stop in parts.items():
                begin = start.get(topic, {}).get(p)
                if begin is None:
                    begin = self._earliest(topic, int(p))
                if stop < begin or topic in self._reset:  # data loss reported in latestOffset
                    begin = self._earliest(topic, int(p))
                if stop > begin:
                    out.append(KafkaPartition(topic, int(p), begin, stop))
        self._reset.clear()
        return out

    def commit(self, end: dict) -> None:
        """Offsets live in Spark's checkpoint; nothing is committed to Kafka."""

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self._admin = None

    # --- executor side -----------------------------------------------------------------
    def read(self, partition: KafkaPartition) -> Iterator[pa.RecordBatch]:  # type: ignore[override]
        """Yield the records of ``[start, end)`` as Arrow batches of up to 10k rows and about
        :data:`ARROW_BATCH_BYTES`.

        Raises:
            KafkaDataLossError: records in the range were deleted (``failOnDataLoss``).
            KafkaReadTimeoutError: the range could not be read within ``pollTimeoutMs``.
        """
        for cols in self.read_columns(partition):
            yield pa.RecordBatch.from_pydict(cols, schema=ARROW_SCHEMA)

    def read_columns(self, partition: KafkaPartition) -> Iterator[dict[str, list[Any]]]:
        """The records of ``[start, end)`` as column lists (:data:`ARROW_SCHEMA` names,
        ``timestamp`` in µs) of up to 10k records and about :data:`ARROW_BATCH_BYTES` (cut
        after the record that reaches it); the consumer is closed at the end.

        Raises:
            KafkaDataLossError: as :meth:`read`.
        """
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        consumer = Consumer(
            {
                **with_logger(self.conf),  # librdkafka's log lines via Python logging
                "group.id": f"arbstream-reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                # Records deleted below ``start``: continue from the earliest one (and report
                # the gap), never jump to the end.
                "auto.offset.reset": "earliest",
            }
        )
        try:
            consumer.assign([TopicPartition(partition.topic, partition.partition,
                                            partition.start)])
            cols: dict[str, list[Any]] = {name: [] for name in ARROW_SCHEMA.names}
            expected = partition.start
            size = 0
            deadline = time.monotonic() + self.poll_timeout
            while expected < partition.end:
                msg = consumer.poll(0.5)
                at_end = msg is not None and msg.error() is not None and (
                    msg.error().code() == KafkaError._PARTITION_EOF
                )
                if msg is None or at_end:
                    if time.monotonic() > deadline:
                        raise KafkaReadTimeoutError(
                            f"timed out reading {partition.topic}[{partition.partition}] "
                            f"offsets {expected}..{partition.end}"
                        )
                    continue
                if msg.error():
                    raise RuntimeError(f"Kafka error on {partition}: {msg.error()}")
                offset = msg.offset()
                if offset >= partition.end:
                    break
                if offset > expected:
                    self._data_loss(
                        f"{partition.topic}[{partition.partition}] offsets {expected}..{offset} "
                        "were deleted before they were read"
                    )
                expected = offset + 1
                ts_type, ts = msg.timestamp()
                cols["key"].append(msg.key())
                value = msg.value()
                size += len(value) if value is not None else 0
                cols["value"].append(value)
                cols["topic"].append(partition.topic)
                cols["partition"].append(partition.partition)
                cols["offset"].append(offset)
                cols["timestamp"].append(ts * 1000 if ts >= 0 else None)
                cols["timestampType"].append(max(ts_type - 1, 0))
                if len(cols["offset"]) >= ARROW_BATCH_ROWS or size >= ARROW_BATCH_BYTES:
                    yield cols
                    cols = {name: [] for name in ARROW_SCHEMA.names}
                    size = 0
            if cols["offset"]:
                yield cols
        finally:
            consumer.close()


def _group(items: Any) -> Offsets:
    out: Offsets = {}
    for topic, partition, offset in items:
        out.setdefault(topic, {})[str(partition)] = int(offset)
    return out


def _rate_limit(start: Offsets, end: Offsets, max_rows: int) -> Offsets:
    """Cap the total ``end - start`` at ``max_rows``, split in proportion to each backlog."""
    backlog = {
        (t, p): end[t][p] - start.get(t, {}).get(p, end[t][p])
        for t in end for p in end[t]
    }
    total = sum(max(b, 0) for b in backlog.values())
    if total <= max_rows:
        return end
    capped = _group(
        (t, p, start[t][p] + (max(b, 0) * max_rows) // total) for (t, p), b in backlog.items()
    )
    if capped == start:  # every share rounded down to zero: move the largest backlog on
        t, p = max(backlog, key=lambda k: backlog[k])
        capped[t][p] = start[t][p] + min(backlog[(t, p)], max_rows)
    return capped


def _byte_limit(start: Offsets, end: Offsets, max_bytes: int,
                record_bytes: dict[tuple[str, str], int]) -> Offsets:
    """Cap the estimated bytes of ``end - start`` at ``max_bytes``: each partition's records
    are estimated at ``record_bytes`` (its newest record's size, 1 KiB when unknown), and the
    cap is split in proportion to each backlog's bytes (:func:`_rate_limit` on bytes)."""
    size = {(t, p): max(record_bytes.get((t, p), 1024), 1) for t in end for p in end[t]}
    backlog = {(t, p): max(end[t][p] - start.get(t, {}).get(p, end[t][p]), 0)
               for t in end for p in end[t]}
    total = sum(backlog[k] * size[k] for k in backlog)
    if total <= max_bytes:
        return end
    capped = _group((t, p, start[t][p] + (backlog[(t, p)] * max_bytes) // total)
                    for (t, p) in backlog if p in start.get(t, {}))
    for t in end:  # partitions without a start keep their end (nothing planned from them)
        for p in end[t]:
            capped.setdefault(t, {}).setdefault(p, end[t][p])
    if all(capped[t][p] == start.get(t, {}).get(p, capped[t][p]) for t in capped
           for p in capped[t]):  # every share rounded down to zero: one record moves on
        t, p = max(backlog, key=lambda k: backlog[k])
        capped[t][p] = start[t][p] + 1
    return capped


class KafkaWriter(DataSourceWriter):
    """Produces each row's ``value`` to its ``topic`` with ``key`` (optional column)."""

    def __init__(self, options: dict[str, str]) -> None:
        self.conf = client_config(options)

    def write(self, iterator: Iterator[Any]) -> WriterCommitMessage:
        """Produce every row, flush, and fail the task if any delivery failed.

        Raises:
            RuntimeError: with the first delivery error, after all rows were attempted.
        """
        from confluent_kafka import Producer

        producer = Producer(reliable_producer_config(self.conf, linger_ms=20))
        errors: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        count = 0
        for row in iterator:
            fields = row.asDict()
            key, value = fields.get("key"), fields["value"]
            while True:
                try:
                    producer.produce(
                        row["topic"],
                        key=key.encode() if isinstance(key, str) else key,
                        value=value.encode() if isinstance(value, str) else value,
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
            count += 1
            producer.poll(0)
        remaining = producer.flush(60)
        if remaining or errors:
            raise RuntimeError(
                f"{len(errors)} Kafka deliveries failed, {remaining} undelivered: "
                f"{errors[:1]}"
            )
        return ProducedCount(count)


@dataclass
class ProducedCount(WriterCommitMessage):
    rows: int


class KafkaDataSource(DataSource):
    """``arbkafka``: Kafka stream reader and batch writer (see module docstring)."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> str:
        return SCHEMA

    def streamReader(self, schema: StructType) -> KafkaStreamReader:
        return KafkaStreamReader(self.options)

    def writer(self, schema: StructType, overwrite: bool) -> KafkaWriter:
        return KafkaWriter(self.options)


def end_offsets(conf: dict[str, Any], topics: list[str]) -> Offsets:
    """Current end offset (high-water mark) of every partition of ``topics``.

    ``conf`` is a librdkafka configuration. Uses the same fetch-based probe as the stream
    reader, so it is right on tansu too. Missing topics are left out.
    """
    options = {f"kafka.{k}": str(v) for k, v in conf.items()}
    reader = KafkaStreamReader({**options, "subscribe": ",".join(topics)})
    try:
        return reader._end_offsets(reader._positions({}))
    finally:
        reader.stop()
