"""The arbitrage streaming job: per-exchange quote topics in, spreads and opportunities out.

Three streaming queries, each reading its own topics once:

* ``market``: every quote and book record (``md.<exchange>.quotes``, ``md.<exchange>.book``)
  decoded where it is read (:mod:`spark_jobs.decode`; the ``arbmarket`` source), then one
  stateful operator (:mod:`spark_jobs.market`, :mod:`spark_jobs.engine`): per-exchange event
  time, deduplication, snapshots, same-quote and cross-quote pairs, fee-adjusted spreads,
  early/final/retracted opportunities, episodes, rolling statistics, hourly percentiles and
  per-exchange features. Sinks (:mod:`spark_jobs.sinks.records`): InfluxDB ``quote``,
  ``spread``, ``features``, ``spread_percentiles``, ``episode``, ``stream``; MongoDB
  ``opportunities``, ``episodes``, ``thresholds``; Kafka ``arb.opportunities`` events and
  ``md.deadletter``; the Parquet history of spreads, features, episodes and final
  opportunities (:mod:`arbstream.store.lake`, ``ARB_LAKE_DIR``).
* ``trades``: ``md.<exchange>.trades`` parsed and validated (:mod:`spark_jobs.transforms`):
  valid trades to InfluxDB ``trade``, invalid ones to ``md.deadletter``.
* ``health``: the producers' ``md.health`` records, enriched with interval deltas, staleness
  and a reliability score (:mod:`spark_jobs.health`), to InfluxDB ``health``, in its own FAIR
  scheduler pool.

Sinks are written from ``foreachBatch`` and are idempotent (deterministic ids, InfluxDB
series+timestamp overwrite), so a micro-batch replayed after a failure does not duplicate.
Run with ``arbstream stream`` or ``spark-submit spark_jobs/arbitrage.py`` (same ``ARB_*``
configuration).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from arbstream.config import Settings, get_settings
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.schema import ensure_database
from arbstream.store.influx.writer import write_health, write_trades
from arbstream.store.mongo.client import ensure_collections
from arbstream.topics import (
    DEADLETTER,
    HEALTH,
    book_topic,
    quotes_topic,
    trades_topic,
)
from spark_jobs import health as H
from spark_jobs import transforms as T
from spark_jobs.checkpoint import raise_if_incompatible
from spark_jobs.checkpoint import verify as verify_checkpoint
from spark_jobs.decode import DecodeConfig
from spark_jobs.kafka_source import FORMAT, end_offsets
from spark_jobs.market import market_input, market_stream
from spark_jobs.market_source import FORMAT as MARKET_FORMAT
from spark_jobs.sinks import records
from spark_jobs.topic_identity import ids_file

log = logging.getLogger(__name__)


def _source_format(settings: Settings) -> str:
    return FORMAT if settings.spark_kafka_source == "python" else "kafka"


def kafka_options(settings: Settings) -> dict[str, str]:
    """``kafka.*`` options for either source or sink, from the one Kafka configuration.

    The built-in (JVM) connector takes SASL credentials as a JAAS line; librdkafka takes them
    as ``sasl.username``/``sasl.password``.
    """
    conf = settings.kafka_client_config()
    if settings.spark_kafka_source == "builtin" and "sasl.mechanism" in conf:
        module = (
            "org.apache.kafka.common.security.plain.PlainLoginModule"
            if conf["sasl.mechanism"] == "PLAIN"
            else "org.apache.kafka.common.security.scram.ScramLoginModule"
        )
        user, password = conf.pop("sasl.username"), conf.pop("sasl.password")
        conf["sasl.jaas.config"] = (f"{module} required username={jaas_quote(user)} "
                                    f"password={jaas_quote(password)};")
    return {f"kafka.{k}": str(v) for k, v in conf.items()}


def jaas_quote(value: str) -> str:
    """``value`` as a double-quoted JAAS option value: Kafka's ``JaasConfig`` reads it with
    ``java.io.StreamTokenizer``, whose quoted strings take ``\\`` and ``\"`` escapes, so a
    password holding a quote or a backslash cannot end the value early or inject options."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def query_topics(settings: Settings) -> dict[str, list[str]]:
    """The topics each streaming query reads."""
    market = [t for e in settings.exchanges for t in (quotes_topic(e), book_topic(e))]
    return {"market": market, "trades": [trades_topic(e) for e in settings.exchanges],
            "health": [HEALTH]}


def _reader(spark: SparkSession, settings: Settings, topics: list[str], fmt: str,
            ids_file: Path | None = None) -> Any:
    reader = (
        spark.readStream.format(fmt)
        .options(**kafka_options(settings))
        .option("subscribe", ",".join(topics))
        .option("startingOffsets", settings.starting_offsets)
        .option("failOnDataLoss", str(settings.fail_on_data_loss).lower())
    )
    if settings.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(settings.max_offsets_per_trigger))
    if settings.max_bytes_per_trigger and fmt != "kafka":
        reader = reader.option("maxBytesPerTrigger", str(settings.max_bytes_per_trigger))
    if ids_file is not None and fmt != "kafka":  # a recreated topic is refused (topic ids)
        reader = reader.option("topicIdsFile", str(ids_file))
    return reader


def _load(reader: Any, settings: Settings) -> DataFrame:
    try:
        return reader.load()
    except Exception as exc:
        if settings.spark_kafka_source == "builtin" and "kafka" in str(exc).lower():
            raise RuntimeError(
                "ARB_SPARK_KAFKA_SOURCE=builtin needs the spark-sql-kafka-0-10 connector jar "
                "(spark-submit --packages org.apache.spark:spark-sql-kafka-0-10_2.13:<spark "
                "version>); use ARB_SPARK_KAFKA_SOURCE=python without it"
            ) from exc
        raise


def read_records(spark: SparkSession, settings: Settings, topics: list[str],
                 ids_file: Path | None = None) -> DataFrame:
    """Streaming DataFrame of raw Kafka records from ``topics``; ``ids_file`` pins the
    topics' ids (:mod:`spark_jobs.topic_identity`; Python source only)."""
    return _load(_reader(spark, settings, topics, _source_format(settings), ids_file),
                 settings)


def read_market(spark: SparkSession, settings: Settings, topics: list[str],
                ids_file: Path | None = None) -> DataFrame:
    """Streaming DataFrame of packed, decoded market records (:data:`spark_jobs.decode.
    PACKED_DDL`) from ``topics``: the ``arbmarket`` source, or the built-in source followed by
    :func:`spark_jobs.market.market_input`."""
    if settings.spark_kafka_source == "builtin":
        return market_input(read_records(spark, settings, topics), settings)
    reader = _reader(spark, settings, topics, MARKET_FORMAT, ids_file).option(
        "decode", DecodeConfig.of(settings).to_json())
    return _load(reader, settings)


def write_kafka(df: DataFrame, topic: str, settings: Settings) -> None:
    """Produce a batch DataFrame of ``key``/``value`` columns to ``topic``."""
    (
        df.select(F.lit(topic).alias("topic"), "key", "value")
        .write.format(_source_format(settings))
        .options(**kafka_options(settings))
        .mode("append")
        .save()
    )


def validated_batch(
    settings: Settings,
    valid: Callable[[DataFrame], DataFrame],
    write: Callable[[InfluxConfig, Any], int],
) -> Callable[[DataFrame, int], None]:
    """foreachBatch body of a query over parsed records (``error`` column): invalid ones to
    ``md.deadletter``, the rows ``valid`` selects through ``write`` (an InfluxDB writer of
    :mod:`arbstream.store.influx.writer`); its executor tasks carry only the
    :class:`~arbstream.store.config.InfluxConfig`."""
    influx = InfluxConfig.of(settings)

    def run(batch: DataFrame, batch_id: int) -> None:
        batch.persist()
        try:
            bad = T.dead_letters(batch)
            if not bad.isEmpty():
                write_kafka(bad, DEADLETTER, settings)
            valid(batch).foreachPartition(
                lambda rows: write(influx, (r.asDict() for r in rows))
            )
        finally:
            batch.unpersist()

    return run


def prepare_sinks(settings: Settings) -> None:
    """Create the InfluxDB database (v1) and MongoDB indexes; both are idempotent."""
    ensure_database(InfluxConfig.of(settings))
    ensure_collections(MongoConfig.of(settings))


def start(spark: SparkSession, settings: Settings, checkpoint: Path | None = None) -> list[
    StreamingQuery
]:
    """Start the ``market``, ``trades`` and ``health`` queries; checkpoints under
    ``checkpoint`` (default ``ARB_STATE_DIR/checkpoints``).

    Raises:
        spark_jobs.checkpoint.IncompatibleCheckpointError: the checkpoint was written under
            settings that change the state or the output ids (nothing is started).
    """
    return [begin() for begin in starters(spark, settings, checkpoint).values()]


def starters(spark: SparkSession, settings: Settings, checkpoint: Path | None = None
             ) -> dict[str, Callable[[], StreamingQuery]]:
    """Verify the checkpoint and prepare the sinks, then return, per query name (``market``,
    ``trades``, ``health``), a function that starts that query from its checkpoint
    (``<checkpoint>/<name>``): called once to start it, and again by
    :func:`spark_jobs.supervisor.supervise` to restart it after a failure.

    The health query runs in its own FAIR scheduler pool, so a large market backlog never
    holds its micro-batches back.

    Raises:
        spark_jobs.checkpoint.IncompatibleCheckpointError: as :func:`start`.
    """
    root = checkpoint or settings.checkpoint_dir
    verify_checkpoint(settings, root)
    prepare_sinks(settings)
    topics = query_topics(settings)

    def src(name: str) -> DataFrame:
        return read_records(spark, settings, topics[name], ids_file(root, name))

    bodies: dict[str, Callable[[], tuple[DataFrame, Callable[[DataFrame, int], None]]]] = {
        "market": lambda: (market_stream(read_market(spark, settings, topics["market"],
                                                     ids_file(root, "market")), settings),
                           records.write_batch(settings, root / "market")),
        "trades": lambda: (T.parse_trades(src("trades")),
                           validated_batch(settings, T.valid_trades, write_trades)),
        "health": lambda: (H.health_stream(T.parse_health(src("health")), settings),
                           validated_batch(settings, lambda b: b.where(F.col("error").isNull()),
                                           write_health)),
    }
    # The health query runs a batch every trigger for its processing-time timers: trigger it
    # once per producer health interval, not every ARB_TRIGGER_SECONDS.
    every = {name: settings.trigger_seconds for name in bodies}
    every["health"] = max(settings.trigger_seconds, settings.health_interval_seconds)

    def starter(name: str) -> Callable[[], StreamingQuery]:
        def begin() -> StreamingQuery:
            df, body = bodies[name]()
            # Streaming queries inherit the starting thread's local properties: one pool each.
            spark.sparkContext.setLocalProperty("spark.scheduler.pool", name)
            try:
                return (
                    df.writeStream.queryName(name)
                    .outputMode("append")
                    .foreachBatch(body)
                    .option("checkpointLocation", str(root / name))
                    .trigger(processingTime=f"{int(every[name] * 1000)} milliseconds")
                    .start()
                )
            finally:
                spark.sparkContext.setLocalProperty("spark.scheduler.pool", None)
        return begin

    return {name: starter(name) for name in bodies}


def wait_started(queries: list[StreamingQuery], timeout: float | None = None) -> None:
    """Block until every query has completed its first micro-batch (its initial offsets are
    then pinned in the checkpoint, so records published afterwards are read).

    Raises:
        pyspark.errors.StreamingQueryException: a query failed.
        TimeoutError: not started within ``timeout`` seconds (``None``: no limit).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while any(q.lastProgress is None for q in queries):
        for q in queries:
            if q.exception():
                raise q.exception()  # type: ignore[misc]
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"queries did not start within {timeout:.0f}s")
        time.sleep(0.1)


def processed_offsets(query: StreamingQuery) -> dict[str, dict[str, int]]:
    """End offsets of the query's last completed micro-batch, ``{topic: {partition: n}}``."""
    import json

    progress = query.lastProgress
    if not progress or not progress.get("sources"):
        return {}
    end = progress["sources"][0].get("endOffset")
    if isinstance(end, str):
        end = json.loads(end)
    return end or {}


def wait_drained(
    queries: list[StreamingQuery], settings: Settings, timeout: float = 1800.0,
    progress: Callable[[int, bool], None] | None = None,
) -> dict[str, Any]:
    """Block until every query has processed all records now in its topics and is idle.

    The ``market`` query closes its last windows (and flushes what is open) in the micro-batch
    its processing-time timer starts once every exchange has been idle for
    ``ARB_IDLE_TIMEOUT_SECONDS`` after its last batch with input: it is drained once a batch
    that started that long after its last batch with input has completed. Another query is
    idle once it has nothing to read and its last micro-batch read nothing (the health query
    runs no-data batches for its own timers forever). Returns the end offsets that were
    reached, per topic. ``progress(records left, caught up)`` is called every poll (records
    the queries have still to read; ``caught up`` once none is left and only the closing
    idle timer is awaited).

    Raises:
        TimeoutError: not drained within ``timeout`` seconds.
        pyspark.errors.StreamingQueryException: a query failed.
    """
    per_query = query_topics(settings)
    topics = sorted({t for q in queries for t in per_query[q.name]})
    targets = end_offsets(settings.kafka_client_config(), topics)
    deadline = time.monotonic() + timeout
    idle_rounds = 0
    while time.monotonic() < deadline:
        for q in queries:
            if q.exception():
                raise q.exception()  # type: ignore[misc]
        # (processed offset or None, target) of every partition each query reads
        reached = [
            (done.get(t, {}).get(p), off)
            for q in queries
            for done in (processed_offsets(q),)
            for t in per_query[q.name]
            for p, off in targets.get(t, {}).items()
        ]
        left = sum(max(0, off - (at or 0)) for at, off in reached)
        caught_up = all(at is not None and at >= off for at, off in reached)
        if progress is not None:
            progress(left, caught_up)
        idle = all(not q.status["isDataAvailable"] and (
            _closed(q, settings.idle_timeout_seconds) if q.name == "market" else (
                not q.status["isTriggerActive"]
                or (q.lastProgress or {}).get("numInputRows", 1) == 0))
            for q in queries)
        idle_rounds = idle_rounds + 1 if caught_up and idle else 0
        if idle_rounds >= 3:
            return targets
        time.sleep(max(settings.trigger_seconds, 0.5))
    raise TimeoutError(f"stream did not drain {targets} within {timeout:.0f}s")


def _closed(query: StreamingQuery, idle_timeout: float) -> bool:
    """A micro-batch of ``query`` that started ``idle_timeout`` seconds or more after its
    last batch with input has completed (progress timestamps are batch start times)."""
    progress = query.recentProgress
    data = [p for p in progress if p["numInputRows"] > 0]
    if not data:
        return True  # no input among the recent batches: nothing left to close
    closing = batch_started(data[-1]) + idle_timeout + 0.001  # the timer: idle + 1 ms after
    return any(batch_started(p) >= closing for p in progress)


def batch_started(progress: dict[str, Any]) -> float:
    """When the micro-batch of a query progress entry started, Unix seconds (UTC)."""
    return datetime.fromisoformat(progress["timestamp"].replace("Z", "+00:00")).timestamp()


def main() -> None:
    """Entry point for ``spark-submit spark_jobs/arbitrage.py`` and ``arbstream stream``:
    run the queries under :func:`spark_jobs.supervisor.supervise` until SIGTERM or SIGINT
    (then stop them cleanly) or a failure for good.

    Raises:
        spark_jobs.checkpoint.IncompatibleCheckpointError: the checkpoint is refused.
        spark_jobs.supervisor.QueryFailedError: a query failed for good.
    """
    import signal
    import threading

    from arbstream.topics import ensure_topics
    from spark_jobs.progress import attach, record_restart
    from spark_jobs.session import build_session
    from spark_jobs.supervisor import QueryFailedError, RestartPolicy, is_fatal, supervise

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = get_settings()
    ensure_topics(settings)
    spark = build_session(settings, app_name="arbstream-arbitrage", ui=True)
    attach(spark, settings)
    begin = starters(spark, settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping the queries", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info("queries %s starting; checkpoints in %s", list(begin), settings.checkpoint_dir)
    try:
        supervise(begin, RestartPolicy.of(settings),
                  on_restart=lambda q, n, why: record_restart(settings, q, n, why), stop=stop)
    except QueryFailedError as exc:
        if stop.is_set() and not is_fatal(exc.cause):
            log.info("a query failed while stopping: %s", exc)  # e.g. the JVM got the signal
            return
        check = settings.checkpoint_dir / exc.query
        raise_if_incompatible(exc.cause, exc.query, check)  # Spark's state errors, clearly
        raise
    finally:
        try:
            spark.stop()
        except Exception as exc:  # the JVM is already gone (it got the signal too)
            log.info("Spark already stopped: %s", type(exc).__name__)


if __name__ == "__main__":
    main()
