"""Backfill: the market query's logic over recorded quotes, as a batch, straight into the lake.

``arbstream backfill`` (:mod:`arbstream.shell.backfill`) reads a recording with the producers'
readers and hands :func:`backfill` its records in event-time order, in the wire format the
producers publish (:class:`arbstream.schemas.Quote` JSON, or dicts of it). They go through
what the stream does to each Kafka record, without Kafka or Spark:

1. **decode**: :class:`spark_jobs.decode.Decoder`, the stream's parser and validator, with the
   record's topic (``md.<exchange>.quotes``, ``.book`` for books) and a running offset per
   topic, partition 0: one event-time clock per exchange. It keys records exactly as the
   stream (``pmod(xxhash64(base), ARB_STREAM_BUCKETS)``, stablecoin-rate markets copied to
   every bucket);
2. **the operator**: one :class:`spark_jobs.engine.Engine` per bucket, advanced over
   "micro-batches" of ``chunk`` records, as ``transformWithStateInPandas`` advances the
   stream's (:class:`spark_jobs.market.MarketProcessor`);
3. **the lake**: the records the stream's sink keeps (:func:`spark_jobs.sinks.records.
   lake_rows`), written under the key ``backfill-<source>-<chunk, 8 digits>-<bucket>``, so a
   re-run of the same input, range and chunk size overwrites its own files. Nothing else is written:
   no MongoDB, InfluxDB or Kafka.

**Time.** A backfill has no processing time of its own; the batch's processing clock is the
input's: ``now`` = the largest ``exchange_ts`` so far + ``ARB_MAX_CLOCK_SKEW_SECONDS``, and
never less than the largest ``received_ts`` so far (a record was processed after it was
received), so no record is ``future_timestamp`` for being received after ``now``, and every
``emitted_ts`` is at most the skew after the event that caused it. Idleness is then measured
in event time. The stream's ``ARB_IDLE_TIMEOUT_SECONDS`` is processing time: replaying a
recording through Kafka, the stream reads hours of event time per second and no exchange goes
idle before the end, while in event time 5 s of silence is normal between 1-minute bars (every
bar would close the windows and flush the open episodes, each then emitted again). So an
exchange is idle here after ``idle_ms`` of event time without a record, by default
``ARB_MAX_EVENT_TIME_JUMP_SECONDS`` (the longest silence after which the stream accepts input
without re-anchoring its clocks): a silent exchange stops holding the watermark back, and
input that resumes after a longer silence of every exchange re-anchors time as a live stream
does. A micro-batch is processed at the clock of its last record. The operator's
processing-time timer (``now + idle + 1``, per bucket) fires before a micro-batch whose first
record comes after it, and once at the end, when every exchange is idle: the last windows
close and open episodes, runs and hours are flushed, as at the end of a replay. Micro-batches
are also cut where the whole input is silent for longer than ``idle_ms``, so where the timers
fire does not depend on the chunk size.

**Why the result equals the stream's.** The records of final windows (spreads, features, the
last version of each episode and opportunity) depend only on the accepted quotes, never on
micro-batch boundaries or on when the watermark moved (``tests/spark_jobs/test_tracker.py``).
Quotes in event-time order are never behind the watermark (it trails the slowest active clock
by ``ARB_WATERMARK_SECONDS``), so the backfill accepts exactly what a replay through Kafka
does, and ``tests/spark_jobs/test_lake.py`` checks the two lakes' rows are equal. What may
differ is only processing-time bookkeeping: ``emitted_ts``, and ``retracted`` opportunities
(an early version depends on which quotes of a window one micro-batch held).

All times are integer UTC milliseconds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pandas as pd

from arbstream.store import lake
from arbstream.topics import book_topic, quotes_topic
from spark_jobs.decode import DecodeConfig, Decoder
from spark_jobs.engine import INPUT_COLUMNS, Engine, EngineConfig
from spark_jobs.sinks.records import lake_rows

#: Records per micro-batch by default: about 3 hours of the IAQF bars (some 16k spread rows per
#: file), 1 s of the Binance capture. The lake's content does not depend on it.
DEFAULT_CHUNK = 2_000
#: A wire record: JSON bytes or text as published, or the parsed object.
WireRecord = bytes | str | Mapping[str, Any]


@dataclass(frozen=True)
class BackfillConfig:
    """What a backfill needs: the stream's ``decode`` and ``engine`` configurations, the
    ``lake``, records per micro-batch (``chunk``) and the event-time idle timeout
    (``idle_ms``, module docstring)."""

    decode: DecodeConfig
    engine: EngineConfig
    lake: lake.LakeConfig
    chunk: int = DEFAULT_CHUNK
    idle_ms: int | None = None  # None: engine.max_jump_ms

    @classmethod
    def of(cls, settings: Any, chunk: int = DEFAULT_CHUNK) -> BackfillConfig:
        """From :class:`arbstream.config.Settings`.

        Raises:
            ValueError: ``chunk`` is not positive.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of records, got {chunk}")
        return cls(DecodeConfig.of(settings), EngineConfig.of(settings),
                   lake.LakeConfig.of(settings), chunk)

    @property
    def idle(self) -> int:
        """The event-time idle timeout, ms."""
        return self.engine.max_jump_ms if self.idle_ms is None else self.idle_ms


@dataclass
class BackfillReport:
    """What a backfill did: input ``records`` (quotes, books, heartbeats, invalid ones) in
    ``chunks``; lake ``rows`` and ``files`` written per record type; ``deadletters`` per
    reason (what the stream would have sent to ``md.deadletter``) and ``duplicates``
    dropped; the event times of the input (``first_ts``, ``last_ts``, UTC ms, of the records
    with usable times); wall ``seconds``."""

    source: str
    records: int = 0
    chunks: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    deadletters: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """One line per figure, for the terminal."""
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        rows = ", ".join(f"{k} {v:,}" for k, v in sorted(self.rows.items())) or "none"
        lines = [f"backfill {self.source}: {self.records:,} records in {self.chunks} chunks, "
                 f"{self.seconds:.1f} s ({rate:,.0f} records/s)",
                 f"lake rows: {rows}; files: {sum(self.files.values()):,}",
                 f"duplicates dropped: {self.duplicates:,}; dead letters: "
                 f"{sum(self.deadletters.values()):,}"]
        lines += [f"  {n:,} {reason}" for reason, n in sorted(
            self.deadletters.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


@dataclass
class _Chunk:
    """One micro-batch of wire records (``(payload, topic)``) and the processing clock at its
    first and last record (UTC ms; None while no record had a usable time)."""

    wires: list[tuple[bytes, str]] = field(default_factory=list)
    first: int | None = None
    last: int | None = None


def _wire(record: WireRecord) -> tuple[bytes, str, Any, Any]:
    """``(payload, topic, exchange_ts, received_ts)`` of one wire record, with the topic the
    producers publish it to (``""`` when the record does not say, e.g. malformed JSON: the
    decoder rejects it) and its times as given (validated by the decoder, not here)."""
    if isinstance(record, Mapping):
        doc: Any = record
        value = orjson.dumps(record)
    else:
        value = record.encode() if isinstance(record, str) else bytes(record)
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value, "", None, None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("exchange"), str):
        return value, "", None, None
    topic = book_topic if doc.get("type") == "book" else quotes_topic
    return value, topic(doc["exchange"]), doc.get("exchange_ts"), doc.get("received_ts")


class _Backfill:
    """The state of one run: the decoder, one engine and one pending timer per bucket, the
    processing clock, the offsets per topic, and the report."""

    def __init__(self, cfg: BackfillConfig, source: str) -> None:
        self.cfg = cfg
        self.engine_cfg = dataclasses.replace(cfg.engine, idle_ms=cfg.idle)
        self.source = source
        self.decoder = Decoder(cfg.decode)
        self.engines: dict[int, Engine] = {}
        self.timers: dict[int, int] = {}
        self.offsets: dict[str, int] = {}
        self.report = BackfillReport(source)

    def _clock(self, ets: Any, recv: Any) -> int | None:
        """The processing time a record brings: ``exchange_ts`` + skew, at least its
        ``received_ts``; None for a record without both times as integers, or one the stream
        rejects as ``future_timestamp`` whatever the clock (``exchange_ts`` too far ahead of
        ``received_ts``): such a record never moves time."""
        skew = self.cfg.engine.max_skew_ms
        if type(ets) is not int or type(recv) is not int or ets > recv + skew:
            return None
        r = self.report
        r.first_ts = ets if r.first_ts is None else min(r.first_ts, ets)
        r.last_ts = ets if r.last_ts is None else max(r.last_ts, ets)
        return max(ets + skew, recv)

    def chunks(self, records: Iterable[WireRecord]) -> Iterator[_Chunk]:
        """``records`` in micro-batches of at most ``cfg.chunk``, cut also where the clock
        moves by more than the idle timeout from one record to the next (the input was
        silent: the operator's timers fire in between, whatever the chunk size)."""
        chunk, clock = _Chunk(), None
        for record in records:
            value, topic, ets, recv = _wire(record)
            brings = self._clock(ets, recv)
            at = clock if brings is None else brings if clock is None else max(clock, brings)
            gap = clock is not None and at is not None and at - clock > self.cfg.idle
            if chunk.wires and (len(chunk.wires) >= self.cfg.chunk or gap):
                yield chunk
                chunk = _Chunk()
            chunk.wires.append((value, topic))
            chunk.first = at if chunk.first is None else chunk.first
            chunk.last = clock = at
        if chunk.wires:
            yield chunk

    def decode(self, chunk: _Chunk) -> dict[int, pd.DataFrame]:
        """One chunk → the engine's input frame per bucket (:class:`spark_jobs.decode.
        Decoder`, a running offset per topic, partition 0)."""
        offsets = []
        for _, topic in chunk.wires:
            offset = self.offsets.get(topic, 0)
            self.offsets[topic] = offset + 1
            offsets.append(offset)
        values, topics = [v for v, _ in chunk.wires], [t for _, t in chunk.wires]
        return {bucket: batch.to_pandas() for bucket, batch in self.decoder.records(
            values, topics, [0] * len(values), offsets)}

    def step(self, bucket: int, frame: pd.DataFrame, now: int) -> list[dict[str, Any]]:
        """One bucket's operator call at processing time ``now``, and its next timer (as
        :class:`spark_jobs.market.MarketProcessor` registers it)."""
        engine = self.engines.setdefault(bucket, Engine())
        records = engine.process(frame, now, self.engine_cfg, quotes=[])
        if engine.clocks and not engine.flushed:
            self.timers[bucket] = now + self.engine_cfg.idle_ms + 1
        else:
            self.timers.pop(bucket, None)
        return records

    def batch(self, index: int, chunk: _Chunk) -> None:
        """Micro-batch ``index``: each bucket's timer if it is due before the chunk's first
        record, then the bucket's input at the chunk's last clock; write the lake."""
        frames = self.decode(chunk)
        first = chunk.first if chunk.first is not None else 0
        now = chunk.last if chunk.last is not None else 0
        for bucket in sorted(set(frames) | set(self.timers)):
            out: list[dict[str, Any]] = []
            timer = self.timers.get(bucket)
            if timer is not None and timer <= first:  # no input for longer than idle
                out += self.step(bucket, pd.DataFrame(columns=INPUT_COLUMNS), timer)
            if bucket in frames:
                out += self.step(bucket, frames[bucket], now)
            self.write(out, f"backfill-{self.source}-{index:08d}-{bucket}")

    def finish(self, index: int) -> None:
        """The end of the input: every bucket's timer fires (every exchange idle)."""
        for bucket in sorted(self.timers):
            timer = self.timers[bucket]
            out = self.step(bucket, pd.DataFrame(columns=INPUT_COLUMNS), timer)
            self.write(out, f"backfill-{self.source}-{index:08d}-{bucket}")

    def write(self, records: list[dict[str, Any]], key: str) -> None:
        """Count the dead letters and duplicates of ``records``; write the lake's rows."""
        r = self.report
        for rec in records:
            kind = rec["record"]
            if kind == "deadletter":
                reason = str(rec["reason"]).split(":", 1)[0]
                r.deadletters[reason] = r.deadletters.get(reason, 0) + 1
            elif kind == "stream":
                r.duplicates += rec.get("duplicates") or 0
        parts: dict[str, list[dict[str, Any]]] = {}
        for rec in records:
            if rec["record"] in lake.RECORDS:
                parts.setdefault(rec["record"], []).append(rec)
        for name, group in sorted(parts.items()):
            # straight into the record's lake schema: the sink's types, without the union of
            # every record's columns the operator's output table has (2.5x faster)
            rows = lake_rows(name, [lake.to_table(name, group)])
            written = lake.write(self.cfg.lake, name, rows, key)
            r.rows[name] = r.rows.get(name, 0) + rows.num_rows
            r.files[name] = r.files.get(name, 0) + len(written)


def backfill(records: Iterable[WireRecord], source: str, cfg: BackfillConfig,
             progress: Callable[[int], None] | None = None) -> BackfillReport:
    """Run the stream's logic over ``records`` into the lake (module docstring).

    Args:
        records: wire records in event-time order (JSON bytes or text, or dicts of
            :class:`arbstream.schemas.Quote`, ``Book`` or ``Heartbeat``), consumed lazily,
            one micro-batch at a time.
        source: the input's name in the file keys (``iaqf``, ``binance``, ``csv``):
            ``[A-Za-z0-9_.-]``.
        cfg: the configuration (:meth:`BackfillConfig.of`).
        progress: called with the number of records of each micro-batch once it is done.

    Returns:
        The :class:`BackfillReport`.

    Raises:
        ValueError: a bad ``source`` (as a lake key).
        OSError: the lake cannot be written.
    """
    started = time.monotonic()
    run = _Backfill(cfg, source)
    chunks = 0
    for index, chunk in enumerate(run.chunks(records)):
        run.batch(index, chunk)
        run.report.records += len(chunk.wires)
        chunks = index + 1
        if progress is not None:
            progress(len(chunk.wires))
    run.finish(chunks)  # the timers' micro-batch, after the last chunk
    run.report.chunks = chunks
    run.report.seconds = time.monotonic() - started
    return run.report
