"""Write the market query's records to every sink, from Arrow batches on the executors.

The foreachBatch body (:func:`write_batch`) runs :func:`write_partition` through
``DataFrame.mapInArrow``: each executor task unpacks the market query's packed tables
(:func:`spark_jobs.market.pack`), converts them to dicts once (quotes: straight to line
protocol, column-wise), groups them by ``record`` and writes them through the store
(:mod:`arbstream.store`) with clients cached per Python worker (one MongoDB client, one Kafka
producer), in this order, so that a consumer of an event finds its documents:

1. MongoDB: opportunities (the last version of each id in the partition: ``early`` then
   ``final`` upserts, ``retracted`` deletes), episodes, hourly thresholds (features are
   InfluxDB ``features`` and ``spread`` only);
2. InfluxDB: quotes, spreads (every final pair), closed episodes, features, percentiles,
   per-exchange stream counters; a point InfluxDB refuses becomes a dead letter;
3. Kafka: dead letters to ``md.deadletter``, opportunity events (every stage, in order) and
   episode events to ``arb.opportunities``; flushed before the task ends, and a failed
   delivery fails the task (the micro-batch is retried; every sink is idempotent);
4. the Parquet history (:mod:`arbstream.store.lake`): every ``spread``, ``feature`` and
   ``episode`` record (``opened`` and ``closed`` events), and of ``opportunity`` records the
   ``final`` and ``retracted`` versions (:data:`LAKE_STAGES`): what MongoDB ends with, plus
   the retractions that deleted early documents; ``early`` versions are not history (the
   final one follows, or a retraction). Files are keyed ``market-<query id>-<batch id>-<task
   partition>`` (:func:`lake_key`): a retried or replayed micro-batch computes the same rows
   and overwrites its own files; a fresh checkpoint (a new query id) never overwrites another
   run's. A failed write fails the task, like a failed delivery.

The executors get a :class:`SinkConfig` (MongoDB, InfluxDB, Kafka and lake slices of the
settings), never the whole :class:`~arbstream.config.Settings` with its SMTP and Grafana
secrets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame

from arbstream.config import Settings
from arbstream.kafka import KafkaConfig, reliable_producer_config
from arbstream.records import OPPORTUNITY_FIELDS as OPPORTUNITY_TYPES
from arbstream.schemas import SCHEMA_VERSION, DeadLetter
from arbstream.store import lake
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx import lines as influx_lines
from arbstream.store.influx.schema import EPISODE, FEATURES, PERCENTILES, QUOTE, SPREAD, STREAM
from arbstream.store.influx.writer import write_lines_with_rejects
from arbstream.store.mongo.episodes import upsert_episodes
from arbstream.store.mongo.opportunities import delete_opportunities, upsert_opportunities
from arbstream.store.mongo.thresholds import upsert_thresholds
from arbstream.timestamps import iso_ms, to_ms
from arbstream.topics import DEADLETTER, OPPORTUNITIES
from spark_jobs import tracker
from spark_jobs.market import unpack

log = logging.getLogger(__name__)

#: Fields of an ``opportunity`` record: a spread row (its first window) plus its stage,
#: emission time and the windows its snapshot holds.
OPPORTUNITY_FIELDS = list(OPPORTUNITY_TYPES)
#: The versions of an opportunity the lake keeps (module docstring, step 4).
LAKE_STAGES = ("final", "retracted")
QUOTE_FIELDS = ["exchange", "symbol", "bid", "ask", "bid_size", "ask_size", "exchange_ts"]
STREAM_FIELDS = ["exchange", "received", "duplicates", "late", "future", "watermark_ms",
                 "emitted_ts"]
FIELDS: dict[str, list[str]] = {
    "opportunity": OPPORTUNITY_FIELDS, "quote": QUOTE_FIELDS, "stream": STREAM_FIELDS,
    "deadletter": ["reason", "value", "source_topic", "source_partition", "source_offset"],
    **{kind: list(fields) for kind, fields in tracker.RECORD_FIELDS.items()},
}
COUNT_SCHEMA = "record string, n bigint"

#: InfluxDB measurement and line-protocol function of each record type (closed episodes only).
INFLUX_LINES: dict[str, tuple[str, Any]] = {
    "quote": (QUOTE, lambda r: r["line"]),  # built column-wise in write_partition
    **{kind: (m, influx_lines.LINES[m]) for kind, m in (
        ("spread", SPREAD), ("episode", EPISODE), ("feature", FEATURES),
        ("percentiles", PERCENTILES), ("stream", STREAM))},
}


@dataclass(frozen=True)
class SinkConfig:
    """What the records writer needs on the executors: the store's MongoDB, InfluxDB and lake
    configurations and the Kafka connection (secrets hidden from ``repr``)."""

    mongo: MongoConfig
    influx: InfluxConfig
    kafka: KafkaConfig
    lake: lake.LakeConfig

    @classmethod
    def of(cls, settings: Settings) -> SinkConfig:
        """The sink slices of ``settings``."""
        return cls(MongoConfig.of(settings), InfluxConfig.of(settings), KafkaConfig.of(settings),
                   lake.LakeConfig.of(settings))


_producers: dict[str, Any] = {}


def producer(kafka: KafkaConfig) -> Any:
    """One idempotent Kafka producer per bootstrap address and Python worker
    (:func:`arbstream.kafka.reliable_producer_config`, batching for at most 5 ms: latency
    matters here)."""
    from confluent_kafka import Producer

    key = kafka.bootstrap
    if key not in _producers:
        _producers[key] = Producer(reliable_producer_config(kafka.client_config(), linger_ms=5))
    return _producers[key]


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):  # naive means UTC
        return iso_ms(to_ms(value))
    return value


def event_json(event_type: str, row: dict[str, Any]) -> bytes:
    """An ``arb.opportunities`` event: ``schema_version``, ``type``, then the row's non-null
    fields, times as ISO-8601 UTC with ms (``2023-03-11T04:00:01.000Z``)."""
    body = {"schema_version": SCHEMA_VERSION, "type": event_type}
    body.update({k: _json_value(v) for k, v in row.items() if v is not None})
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _produce(prod: Any, topic: str, key: str | None, value: bytes, errors: list[str]) -> None:
    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    while True:
        try:
            prod.produce(topic, key=key.encode() if key else None, value=value,
                         on_delivery=on_delivery)
            return
        except BufferError:
            prod.poll(0.05)


def write_records(conf: SinkConfig, by_type: dict[str, list[dict[str, Any]]]) -> None:
    """Write one partition's records (grouped by ``record``) to every sink; see the module
    docstring for the order.

    Raises:
        RuntimeError: a Kafka delivery failed (after all were attempted).
        pymongo.errors.PyMongoError, arbstream.store.influx.client.InfluxError: a sink failed.
    """
    opps = by_type.get("opportunity", [])
    last: dict[str, dict[str, Any]] = {}
    for row in opps:
        last[row["opportunity_id"]] = row
    live = [r for r in last.values() if r["stage"] != "retracted"]
    if live:
        upsert_opportunities(conf.mongo, live)
    delete_opportunities(conf.mongo, [i for i, r in last.items() if r["stage"] == "retracted"])
    # Features go to InfluxDB only: per exchange they are about five points per quote, and the
    # pair features of an opportunity are fields of its own document (MongoDB here is a
    # Python server: half the demo's write time went to those duplicates).
    for kind, write in (("episode", upsert_episodes), ("percentiles", upsert_thresholds)):
        if by_type.get(kind):
            write(conf.mongo, by_type[kind])
    rejected: list[tuple[str, str]] = []
    for kind, (measurement, line) in INFLUX_LINES.items():
        rows = by_type.get(kind)
        if rows:
            lines = (line(r) for r in rows if kind != "episode" or r.get("event") == "closed")
            rejected += write_lines_with_rejects(conf.influx, measurement, lines)[1]
    prod = producer(conf.kafka)
    errors: list[str] = []
    for line, reason in rejected:
        letter = DeadLetter.of(line, f"sink_rejected: InfluxDB refused the point: {reason}",
                               "stream")
        _produce(prod, DEADLETTER, "influx", letter.to_json(), errors)
    for row in by_type.get("deadletter", []):
        letter = DeadLetter.of(row["value"] or b"", row["reason"], "stream",
                               source_topic=row["source_topic"],
                               source_partition=row["source_partition"],
                               source_offset=row["source_offset"])
        _produce(prod, DEADLETTER, row["source_topic"], letter.to_json(), errors)
    for row in opps:
        _produce(prod, OPPORTUNITIES, row["opportunity_id"], event_json("opportunity", row),
                 errors)
    for row in by_type.get("episode", []):
        _produce(prod, OPPORTUNITIES, row["episode_id"], event_json("episode", row), errors)
    remaining = prod.flush(60)
    if remaining or errors:
        raise RuntimeError(f"{len(errors)} Kafka deliveries failed, {remaining} undelivered: "
                           f"{errors[:1]}")


def lake_key(batch_id: int, partition: int, run: str = "market") -> str:
    """The lake file key of one task of one micro-batch: ``<run>-<batch id, 10 digits>-<task
    partition, 5 digits>``; ``run`` names the checkpoint (:func:`checkpoint_run`), so a query
    started on a fresh checkpoint (batch ids from 0 again) never overwrites an earlier run's
    files, while a replayed batch of the same checkpoint overwrites its own."""
    return f"{run}-{batch_id:010d}-{partition:05d}"


def checkpoint_run(checkpoint: Path | None) -> str:
    """``market-<first 12 hex digits of the query id>``: the id Spark keeps in the
    checkpoint's ``metadata`` file (stable across restarts of that checkpoint); ``market``
    when there is no checkpoint directory.

    Raises:
        OSError, ValueError: the metadata file exists but cannot be read as JSON.
    """
    meta = checkpoint / "metadata" if checkpoint else None
    if meta is None or not meta.is_file():
        return "market"
    return "market-" + json.loads(meta.read_text().splitlines()[0])["id"].replace("-", "")[:12]


def lake_rows(record: str, tables: list[pa.Table]) -> pa.Table:
    """The rows of ``record`` (tables of its :data:`FIELDS`) the lake keeps: all of them, but
    only the :data:`LAKE_STAGES` versions of opportunities."""
    table = pa.concat_tables(tables)
    if record == "opportunity":
        table = table.filter(pc.is_in(table.column("stage"), value_set=pa.array(LAKE_STAGES)))
    return table


def by_record(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """The rows of one output table of the market query (:data:`spark_jobs.market.
    OUTPUT_SCHEMA`) per ``record`` type, each with its :data:`FIELDS`."""
    record = table.column("record")
    for name in pc.unique(record).to_pylist():
        yield name, table.filter(pc.equal(record, name)).select(FIELDS[name])


def write_partition(conf: SinkConfig, batches: Iterator[pa.RecordBatch], batch_id: int,
                    partition: int | None = None, run: str = "market"
                    ) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: group the partition's rows by ``record`` and write them
    (:func:`write_records`, then the lake under :func:`lake_key` of ``batch_id``,
    ``partition`` (default the task's partition id) and ``run``); yield one row of counts per record
    type.

    Raises:
        ValueError, OSError: the lake cannot be written (the task fails and is retried).
    """
    if partition is None:
        from pyspark import TaskContext

        partition = TaskContext.get().partitionId()  # type: ignore[union-attr]
    by_type: dict[str, list[dict[str, Any]]] = {}
    history: dict[str, list[pa.Table]] = {}
    quote_lines: list[str] = []
    for packed in batches:
        for kind, payload in zip(packed.column("kind").to_pylist(),
                                 packed.column("payload").to_pylist(), strict=True):
            table = unpack(payload)
            if kind == "quotes":  # the per-quote path: columns straight to line protocol
                quote_lines += influx_lines.quote_lines(*[table.column(n).to_pylist()
                                                          for n in QUOTE_FIELDS])
                continue
            for name, sub in by_record(table):
                by_type.setdefault(name, []).extend(sub.to_pylist())
                if name in lake.RECORDS:
                    history.setdefault(name, []).append(sub)
    if quote_lines:
        by_type["quote"] = [{"line": line} for line in quote_lines]
    if by_type:
        write_records(conf, by_type)
    for name, tables in sorted(history.items()):
        lake.write(conf.lake, name, lake_rows(name, tables), lake_key(batch_id, partition, run))
    kinds = sorted(by_type)
    yield pa.RecordBatch.from_pydict({
        "record": pa.array(kinds, pa.string()),
        "n": pa.array([len(by_type[k]) for k in kinds], pa.int64()),
    })


def write_batch(settings: Settings, checkpoint: Path | None = None) -> Any:
    """The market query's ``foreachBatch`` body; logs the records written per type. Its
    executor tasks carry only the :class:`SinkConfig` of ``settings``; lake files are named
    after the query's ``checkpoint`` (:func:`checkpoint_run`, read at the first batch, when
    Spark has written the metadata)."""
    conf = SinkConfig.of(settings)
    tag: list[str] = []

    def run(batch: DataFrame, batch_id: int) -> None:
        if not tag:
            tag.append(checkpoint_run(checkpoint))
        name = tag[0]
        counts: dict[str, int] = {}
        for row in batch.mapInArrow(lambda it: write_partition(conf, it, batch_id, run=name),
                                    COUNT_SCHEMA).collect():
            counts[row["record"]] = counts.get(row["record"], 0) + row["n"]
        if counts:
            log.info("market batch %d: %s", batch_id, counts)

    return run
