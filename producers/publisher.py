"""The producers' way into Kafka: bounded queue, duplicate filter, gap counter, health.

One :class:`Publisher` per process owns one confluent-kafka producer (idempotent, acks=all,
lz4, ``message.timeout.ms=0`` so a record is retried until the broker takes it). Adapters
``await publisher.submit(event)``; when the bounded queue is full that call waits, which stops
reading the websocket: backpressure instead of dropping. While the broker is unreachable
records are held (in the queue, then librdkafka's buffer) and the log says so.

Duplicates that exchanges re-send after a reconnect are dropped with a two-generation
ScalableBloomFilter (pybloom-live) keyed on ``(exchange, channel, symbol, dedupe_id)``.
Sequence gaps are counted per ``(exchange, channel, symbol)`` when events carry a contiguous
sequence. Every ``health_interval`` seconds one ``health`` record per exchange goes to
``md.health`` and a one-line summary to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Producer
from pybloom_live import ScalableBloomFilter

from arbstream.config import Settings
from arbstream.kafka import KafkaConfig, reliable_producer_config
from arbstream.schemas import SCHEMA_VERSION, DeadLetter, now_ms
from arbstream.topics import DEADLETTER, HEALTH, book_topic, quotes_topic, trades_topic
from producers.events import FeedEvent

log = logging.getLogger(__name__)

TOPIC_OF = {"bbo": quotes_topic, "trades": trades_topic, "book": book_topic}


class DuplicateFilter:
    """Seen-before test over a sliding population of keys, in bounded memory.

    Two generations of ScalableBloomFilter: when the current one holds ``generation_size``
    keys it becomes the previous one and a fresh one starts, so memory stays bounded over
    weeks while keys from the last ``generation_size`` to ``2 * generation_size`` inserts are
    remembered. False positives (a new key reported as seen) happen with probability about
    ``error_rate`` per lookup.
    """

    def __init__(self, generation_size: int = 1_000_000, error_rate: float = 1e-7) -> None:
        self.generation_size = generation_size
        self.error_rate = error_rate
        self._current = self._new()
        self._previous: ScalableBloomFilter | None = None

    def _new(self) -> ScalableBloomFilter:
        return ScalableBloomFilter(
            initial_capacity=min(self.generation_size, 100_000), error_rate=self.error_rate,
            mode=ScalableBloomFilter.LARGE_SET_GROWTH,
        )

    def seen(self, key: str) -> bool:
        """Return True when ``key`` was added before; otherwise remember it and return False."""
        if key in self._current or (self._previous is not None and key in self._previous):
            return True
        if self._current.count >= self.generation_size:
            self._previous, self._current = self._current, self._new()
        self._current.add(key)
        return False


@dataclass
class ExchangeStats:
    """Counters of one exchange feed since the process started."""

    frames: int = 0
    records: int = 0
    reconnects: int = 0
    duplicates_dropped: int = 0
    gaps: int = 0
    missing: int = 0
    deadletters: int = 0
    delivery_failures: int = 0
    last_frame_at: float | None = None
    _frames_at_last_report: int = field(default=0, repr=False)


class Publisher:
    """Single Kafka producer for every feed of this process; see the module docstring.

    Args:
        kafka: the brokers (a whole ``Settings`` is narrowed to its Kafka slice).
        queue_size: bound of the in-memory queue, records.
        health_interval: seconds between ``md.health`` reports.
        dedupe: the duplicate filter (a fresh :class:`DuplicateFilter` by default).
    """

    def __init__(
        self,
        kafka: KafkaConfig | Settings,
        queue_size: int = 10_000,
        health_interval: float = 5.0,
        dedupe: DuplicateFilter | None = None,
    ) -> None:
        if not isinstance(kafka, KafkaConfig):
            kafka = KafkaConfig.of(kafka)
        self.queue: asyncio.Queue[tuple[str, bytes | None, bytes, str | None]] = asyncio.Queue(
            maxsize=queue_size
        )
        self.health_interval = health_interval
        self.dedupe = dedupe or DuplicateFilter()
        self.stats: dict[str, ExchangeStats] = defaultdict(ExchangeStats)
        self._last_seq: dict[tuple[str, str, str], int] = {}
        self._broker_down_since: float | None = None
        self._callbacks: dict[str | None, Any] = {}
        self._producer = Producer(reliable_producer_config(
            kafka.client_config(), linger_ms=20, **{
                "message.timeout.ms": 0,  # never expire a record: hold it until delivered
                "queue.buffering.max.messages": 200_000,
                "error_cb": self._on_error,
                "client.id": "arbstream-producer",
            },
        ))
        self._last_report = time.monotonic()

    # --- intake (called by adapters and connection handlers) -------------------------------
    async def submit(self, event: FeedEvent) -> bool:
        """Queue one normalized record; waits while the queue is full. False if a duplicate."""
        stats = self.stats[event.exchange]
        if event.dedupe_id is not None:
            key = f"{event.exchange}|{event.channel}|{event.symbol}|{event.dedupe_id}"
            if self.dedupe.seen(key):
                stats.duplicates_dropped += 1
                return False
        if event.sequence is not None:
            self._check_sequence(stats, event)
        stats.records += 1
        topic = TOPIC_OF[event.channel](event.exchange)
        await self.queue.put((topic, event.symbol.encode(), event.record.to_json(), event.exchange))
        return True

    def _check_sequence(self, stats: ExchangeStats, event: FeedEvent) -> None:
        stream = (event.exchange, event.channel, event.symbol)
        last = self._last_seq.get(stream)
        assert event.sequence is not None
        if last is not None and event.sequence > last + 1:
            stats.gaps += 1
            stats.missing += event.sequence - last - 1
            log.warning("%s %s %s: sequence gap %d -> %d", *stream, last, event.sequence)
        if last is None or event.sequence > last:
            self._last_seq[stream] = event.sequence

    def frame_received(self, exchange: str) -> None:
        """Count one websocket frame (valid or not) and note its arrival time."""
        stats = self.stats[exchange]
        stats.frames += 1
        stats.last_frame_at = time.time()

    def reconnected(self, exchange: str) -> None:
        """Count one reconnect of ``exchange``'s feed."""
        self.stats[exchange].reconnects += 1

    def reset_sequences(self, exchange: str) -> None:
        """Forget the last sequence numbers of ``exchange`` (a new connection restarts them)."""
        for stream in [s for s in self._last_seq if s[0] == exchange]:
            del self._last_seq[stream]

    async def deadletter(self, exchange: str, raw: bytes | str, reason: str) -> None:
        """Send a frame that could not be parsed to ``md.deadletter`` with the reason."""
        self.stats[exchange].deadletters += 1
        letter = DeadLetter.of(raw, f"{exchange}: {reason}", stage="producer")
        await self.queue.put((DEADLETTER, exchange.encode(), letter.to_json(), exchange))

    # --- output ----------------------------------------------------------------------------
    def _on_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            if self._broker_down_since is None:
                self._broker_down_since = time.monotonic()
            log.warning("Kafka unreachable (%s): holding %d records, retrying", err.str(),
                        len(self._producer) + self.queue.qsize())
        else:
            log.error("Kafka error: %s", err.str())

    def _delivered(self, exchange: str | None):  # noqa: ANN202 - librdkafka callback
        """The delivery callback for ``exchange``'s records, made once per exchange (this is on
        the per-record path)."""
        if exchange in self._callbacks:
            return self._callbacks[exchange]

        def callback(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                if exchange:
                    self.stats[exchange].delivery_failures += 1
                log.error("delivery failed: %s", err.str())
            elif self._broker_down_since is not None:
                log.info("Kafka reachable again after %.1f s",
                         time.monotonic() - self._broker_down_since)
                self._broker_down_since = None

        self._callbacks[exchange] = callback
        return callback

    async def run(self) -> None:
        """Move queued records into the producer until cancelled; report health on schedule."""
        await asyncio.gather(self._drain(), self._health_loop())

    async def _drain(self) -> None:
        while True:
            await self._produce(*await self.queue.get())
            while not self.queue.empty():  # produce the backlog without a wake-up per record
                await self._produce(*self.queue.get_nowait())
            self._producer.poll(0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            self._producer.poll(0)
            await self.report_health()

    async def _produce(self, topic: str, key: bytes | None, value: bytes, exchange: str | None
                       ) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key,
                                       on_delivery=self._delivered(exchange))
                return
            except BufferError:  # librdkafka's buffer is full (broker slow or down): hold
                self._producer.poll(0.05)
                await asyncio.sleep(0.05)

    def health(self) -> list[dict[str, Any]]:
        """One canonical ``health`` record per exchange (rates over the last interval)."""
        now = time.monotonic()
        elapsed = max(now - self._last_report, 1e-9)
        self._last_report = now
        wall = time.time()
        out = []
        for exchange, s in sorted(self.stats.items()):
            rate = (s.frames - s._frames_at_last_report) / elapsed
            s._frames_at_last_report = s.frames
            counters = {k: v for k, v in asdict(s).items() if not k.startswith("_")}
            counters.pop("last_frame_at")
            out.append({
                "schema_version": SCHEMA_VERSION,
                "type": "health",
                "exchange": exchange,
                "ts": now_ms(),
                "messages_per_s": round(rate, 3),
                "last_message_age_s": (round(wall - s.last_frame_at, 3)
                                       if s.last_frame_at else None),
                "queue_depth": self.queue.qsize() + len(self._producer),
                **counters,
            })
        return out

    async def report_health(self) -> list[dict[str, Any]]:
        """Publish :meth:`health` to ``md.health`` and log a one-line summary."""
        records = self.health()
        for r in records:
            await self._produce(HEALTH, r["exchange"].encode(), json.dumps(r).encode(), None)
        if records:
            log.info("health %s", "  ".join(
                f"{r['exchange']}: {r['messages_per_s']:.0f} msg/s age "
                f"{r['last_message_age_s']}s rc {r['reconnects']} dup {r['duplicates_dropped']} "
                f"gaps {r['gaps']} dlq {r['deadletters']} q {r['queue_depth']}"
                for r in records
            ))
        return records

    async def close(self, timeout: float = 30.0) -> int:
        """Produce what is queued, flush, and return the number of records not delivered."""
        while not self.queue.empty():
            await self._produce(*self.queue.get_nowait())
        await self.report_health()
        deadline = time.monotonic() + timeout
        while len(self._producer) and time.monotonic() < deadline:
            await asyncio.to_thread(self._producer.flush, 0.5)
        return len(self._producer)
