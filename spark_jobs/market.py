"""The market query: every quote and book record read once, parsed once, one stateful operator.

``Kafka records → decode (orjson + validation + keying, in the Python source's reader) → packed
Arrow rows per bucket → transformWithStateInPandas(MarketProcessor) → foreachBatch → sinks``.

Decoding and keying are :mod:`spark_jobs.decode`: every symbol of one base (same-quote and
cross-quote pairs) lands on one key (``pmod(xxhash64(base), ARB_STREAM_BUCKETS)``);
stablecoin-rate markets (the conversion legs of every base) and heartbeats are copied to every
bucket. With the ``arbmarket`` source (default) it runs inside the reader; with the built-in
``format("kafka")`` source, in a ``mapInArrow`` (:func:`market_input`). The processor runs in
processing-time mode and owns event time itself (:mod:`spark_jobs.engine`): Spark's own
watermark is not used, so one record cannot move it.

Engine callbacks (``StatefulProcessor``): ``init`` opens one value state per key (the pickled
:class:`~spark_jobs.engine.Engine`); ``handleInputRows`` loads it, runs
:meth:`~spark_jobs.engine.Engine.process` over the key's rows of the micro-batch, saves it and
registers a processing-time timer ``ARB_IDLE_TIMEOUT_SECONDS`` ahead (replacing the previous
one); ``handleExpiredTimer`` runs the same step without input, so windows close once every
exchange has gone idle (end of a replay, a quiet market) without any future-dated record.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql.streaming.stateful_processor import (
    ExpiredTimerInfo,
    StatefulProcessor,
    StatefulProcessorHandle,
    TimerValues,
)

from arbstream.config import Settings
from spark_jobs import tracker
from spark_jobs.decode import PACKED_DDL, DecodeConfig, decode_batches, pack, unpack
from spark_jobs.engine import INPUT_COLUMNS, Engine, EngineConfig

#: Columns of the processor's output: ``record`` says which are meaningful (see
#: :meth:`spark_jobs.engine.Engine.process`): the tracker's records, plus ``stage`` and
#: ``emitted_ts`` (UTC ms) of opportunities, the quote fields of ``quote`` points, the
#: dead-letter fields, and the per-exchange counters of ``stream`` records.
OUTPUT_FIELDS: dict[str, str] = {
    **tracker.OUTPUT_FIELDS,
    "stage": "string", "emitted_ts": "bigint", "bid": "double", "ask": "double",
    "bid_size": "double", "ask_size": "double", "exchange_ts": "bigint", "reason": "string",
    "value": "binary", "source_topic": "string", "source_partition": "int",
    "source_offset": "bigint", "received": "bigint", "duplicates": "bigint", "late": "bigint",
    "future": "bigint", "watermark_ms": "bigint", "valid_from": "timestamp",
    "valid_to": "timestamp",
}
_ARROW_TYPES = {
    "string": pa.string(), "double": pa.float64(), "bigint": pa.int64(), "int": pa.int32(),
    "boolean": pa.bool_(), "timestamp": pa.timestamp("us", tz="UTC"), "binary": pa.binary(),
}
OUTPUT_SCHEMA = pa.schema([(k, _ARROW_TYPES[v]) for k, v in OUTPUT_FIELDS.items()])
QUOTE_SCHEMA = pa.schema([
    ("exchange", pa.string()), ("symbol", pa.string()), ("bid", pa.float64()),
    ("ask", pa.float64()), ("bid_size", pa.float64()), ("ask_size", pa.float64()),
    ("exchange_ts", pa.int64()),
])
#: The processor's output rows: ``kind`` "records" (a packed table of :data:`OUTPUT_SCHEMA`)
#: or "quotes" (:data:`QUOTE_SCHEMA`), ``rows`` in it, ``payload`` (:func:`pack`).
OUTPUT_DDL = "kind string, rows bigint, payload binary"
STATE_DDL = "engine binary"


def market_input(raw: DataFrame, settings: Settings) -> DataFrame:
    """Kafka records of the quote and book topics from a raw source (the built-in
    ``format("kafka")`` or ``arbkafka``) → packed engine input (:data:`PACKED_DDL`), decoded in
    a ``mapInArrow``: what the ``arbmarket`` source yields directly."""
    cfg = DecodeConfig.of(settings)
    return raw.select("value", "topic", "partition", "offset").mapInArrow(
        lambda batches: decode_batches(batches, cfg), PACKED_DDL)


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    """Engine records as a table of :data:`OUTPUT_SCHEMA`: each record's fields by name,
    missing ones null, other keys ignored (Arrow converts the dicts directly: 2.4x faster
    than through pandas)."""
    return pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA)


#: Most rows per packed output table (a few MB each).
PACK_ROWS = 20_000


def _packed_row(kind: str, table: pa.Table) -> pd.DataFrame:
    return pd.DataFrame({"kind": [kind], "rows": [table.num_rows], "payload": [pack(table)]})


class MarketProcessor(StatefulProcessor):
    """The ``transformWithStateInPandas`` processor of the market query, key ``bucket``; see
    the module docstring for its callbacks."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg

    def init(self, handle: StatefulProcessorHandle) -> None:
        self.handle = handle
        self.state = handle.getValueState("engine", STATE_DDL)

    def _step(self, frame: pd.DataFrame, now_ms: int,
              expired: int | None = None) -> Iterator[pd.DataFrame]:
        engine = pickle.loads(self.state.get()[0]) if self.state.exists() else Engine()
        quotes: list[pd.DataFrame] = []
        records = engine.process(frame, now_ms, self.cfg, quotes)
        self.state.update((pickle.dumps(engine, protocol=5),))
        for old in self.handle.listTimers():
            if old != expired:  # the expired timer is gone already
                self.handle.deleteTimer(old)
        if engine.clocks and not engine.flushed:
            self.handle.registerTimer(now_ms + self.cfg.idle_ms + 1)
        # Output in packs of at most PACK_ROWS rows: one JVM binary value per pack, so a
        # large backlog (days of windows finalized at once) never becomes one huge value.
        for i in range(0, len(records), PACK_ROWS):
            table = records_table(records[i:i + PACK_ROWS])
            yield _packed_row("records", table)
        points = [q for q in quotes if len(q)]
        if points:
            table = pa.Table.from_pandas(pd.concat(points, ignore_index=True),
                                         schema=QUOTE_SCHEMA, preserve_index=False)
            for i in range(0, table.num_rows, PACK_ROWS):
                yield _packed_row("quotes", table.slice(i, PACK_ROWS))

    def handleInputRows(
        self, key: Any, rows: Iterator[pd.DataFrame], timerValues: TimerValues
    ) -> Iterator[pd.DataFrame]:
        tables = [unpack(p) for f in rows for p in f["payload"]]
        frame = pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(
            columns=INPUT_COLUMNS)
        yield from self._step(frame, timerValues.getCurrentProcessingTimeInMs())

    def handleExpiredTimer(
        self, key: Any, timerValues: TimerValues, expiredTimerInfo: ExpiredTimerInfo
    ) -> Iterator[pd.DataFrame]:
        empty = pd.DataFrame(columns=INPUT_COLUMNS)
        yield from self._step(empty, timerValues.getCurrentProcessingTimeInMs(),
                              expiredTimerInfo.getExpiryTimeInMs())

    def close(self) -> None:
        pass


def market_stream(packed: DataFrame, settings: Settings) -> DataFrame:
    """The market query's output from packed input (:data:`PACKED_DDL`: the ``arbmarket``
    source, or :func:`market_input`): packed rows of :data:`OUTPUT_DDL`."""
    return packed.groupBy("bucket").transformWithStateInPandas(
        MarketProcessor(EngineConfig.of(settings)), OUTPUT_DDL, "Append", "ProcessingTime",
    )
