"""The producers' way into Kafka: bounded queue, duplicate filter, gap counter, health, and
what happens when Kafka fails.

One :class:`Publisher` per process owns one confluent-kafka producer (idempotent, acks=all,
lz4, ``message.timeout.ms=0`` so a record is retried until the broker takes it). Adapters
``await publisher.submit(event)``; when the bounded queue is full that call waits, which stops
reading the websocket: backpressure instead of dropping. While the broker is unreachable
records are held (in the queue, then librdkafka's buffer) and the log says so.

Errors (:mod:`producers.kafka_errors` sorts them): a record Kafka cannot take (too large,
invalid), whether ``produce()`` refuses it or its delivery report does, goes to
``md.deadletter`` with the reason and the loop carries on; a fatal librdkafka error or a client
error no retry fixes stops :meth:`Publisher.run` with :class:`~producers.errors.
ProducerFatalError` / :class:`~producers.errors.ProducerError` (exit codes 4 / 5). Every error
is counted (:attr:`Publisher.errors`, ``delivery_failures`` per exchange) and logged, at most
one line per kind every 10 s. :meth:`Publisher.close` delivers what is held within a deadline
and returns the count of records it could not.

With a :class:`~producers.spool.Spool` every record is appended to disk before it is handed to
librdkafka and acknowledged on its delivery report; records the previous process did not get
acknowledged are sent first.

Duplicates that exchanges re-send after a reconnect are dropped with a two-generation
ScalableBloomFilter (pybloom-live) keyed on ``(exchange, channel, symbol, dedupe_id)``.
Sequence gaps are counted per ``(exchange, channel, symbol)`` when events carry a contiguous
sequence. Every ``health_interval`` seconds one ``health`` record per exchange goes to
``md.health`` and a one-line summary to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pybloom_live import ScalableBloomFilter

from arbstream.config import Settings
from arbstream.kafka import KafkaConfig, reliable_producer_config
from arbstream.schemas import SCHEMA_VERSION, DeadLetter, now_ms
from arbstream.topics import DEADLETTER, HEALTH, book_topic, quotes_topic, trades_topic
from producers.errors import ProducerError, ProducerFatalError
from producers.events import FeedEvent
from producers.kafka_errors import RateLimitedLog, classify, describe
from producers.spool import Spool, SpoolRecord

log = logging.getLogger(__name__)

TOPIC_OF = {"bbo": quotes_topic, "trades": trades_topic, "book": book_topic}
#: One record to send: topic, key, value, the exchange it counts against (None: internal).
Item = tuple[str, bytes | None, bytes, str | None]
#: Most records taken off the queue at a time (and held while librdkafka is full).
_BATCH = 5_000
#: Seconds between polls for delivery reports when idle (and spool watermark writes).
_POLL_INTERVAL = 0.05


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
        close_timeout: default deadline of :meth:`close`, seconds.
        spool: the on-disk spool, or None (records then live only in memory). Records it
            recovered from the previous run are sent first.
    """

    def __init__(
        self,
        kafka: KafkaConfig | Settings,
        queue_size: int = 10_000,
        health_interval: float = 5.0,
        dedupe: DuplicateFilter | None = None,
        close_timeout: float = 30.0,
        spool: Spool | None = None,
    ) -> None:
        if not isinstance(kafka, KafkaConfig):
            kafka = KafkaConfig.of(kafka)
        self.queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=queue_size)
        self.health_interval = health_interval
        self.close_timeout = close_timeout
        self.dedupe = dedupe or DuplicateFilter()
        self.stats: dict[str, ExchangeStats] = defaultdict(ExchangeStats)
        self.spool = spool
        #: Delivery reports and produce() calls that failed, by error name (all feeds).
        self.errors: dict[str, int] = defaultdict(int)
        self._last_seq: dict[tuple[str, str, str], int] = {}
        self._broker_down_since: float | None = None
        self._callbacks: dict[str | None, Any] = {}
        self._batch: deque[SpoolRecord] = deque()  # taken off the queue, not yet produced
        self._letters: list[tuple[int | None, Item]] = []  # rejected records' dead letters
        self._handed = self._reported = 0  # produce() successes, delivery reports served
        self._stop_error: ProducerError | None = None
        self._closing = False
        self._log = RateLimitedLog(log)
        self._producer = Producer(reliable_producer_config(
            kafka.client_config(), linger_ms=20, **{
                "message.timeout.ms": 0,  # never expire a record: hold it until delivered
                "queue.buffering.max.messages": 200_000,
                "error_cb": self._on_error,
                "client.id": "arbstream-producer",
            },
        ))
        if spool is not None:
            self._batch.extend(spool.recovered)
        self._last_report = time.monotonic()

    # --- intake (called by adapters and connection handlers) -------------------------------
    async def submit(self, event: FeedEvent) -> bool:
        """Queue one normalized record; waits while the queue is full. False if a duplicate.

        Raises:
            ProducerError: the publisher has stopped (fatal or client error).
        """
        if self._stop_error is not None:
            raise self._stop_error
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
        """Send a frame that could not be parsed to ``md.deadletter`` with the reason.

        Raises:
            ProducerError: the publisher has stopped (fatal or client error).
        """
        if self._stop_error is not None:
            raise self._stop_error
        self.stats[exchange].deadletters += 1
        letter = DeadLetter.of(raw, f"{exchange}: {reason}", stage="producer")
        await self.queue.put((DEADLETTER, exchange.encode(), letter.to_json(), exchange))

    # --- errors ----------------------------------------------------------------------------
    def _stop(self, error: ProducerError) -> None:
        if self._stop_error is None:
            self._stop_error = error
            log.critical("producer stopping: %s", error)

    def _kafka_failed(self, err: KafkaError, where: str) -> None:
        """A fatal or client error outside one record (error callback, poll, flush)."""
        self.errors[err.name()] += 1
        if classify(err) == "fatal":
            self._stop(ProducerFatalError(f"fatal Kafka error ({where}): {describe(err)}"))
        else:
            self._stop(ProducerError(f"Kafka error ({where}): {describe(err)}"))

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._kafka_failed(err, "client")
        elif err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            if self._broker_down_since is None:
                self._broker_down_since = time.monotonic()
            self._log(logging.WARNING, "unreachable", "Kafka unreachable (%s): holding %d "
                      "records, retrying", err.str(), self.pending)
        else:  # librdkafka retries these itself (timeouts, broker restarts, ...)
            self._log(logging.ERROR, err.name(), "Kafka error: %s", describe(err))

    def _reject(self, record: SpoolRecord, err: KafkaError, where: str) -> None:
        """``record`` cannot be written (a record error): count it, log it and route it to
        the dead-letter topic with the reason; its spool entry is settled once the dead
        letter is spooled."""
        self.errors[err.name()] += 1
        reason = f"{where} to {record.topic} failed: {describe(err)}"
        self._log(logging.ERROR, f"reject {err.name()}", "record rejected: %s", reason)
        if record.exchange:
            self.stats[record.exchange].deadletters += 1
        if record.topic == DEADLETTER:  # a dead letter that cannot be written either
            self._stop(ProducerError(f"dead letter rejected: {reason}"))
            return
        letter = DeadLetter.of(record.value, reason, stage="producer",
                               source_topic=record.topic)
        self._letters.append((record.seq if self.spool else None,
                              (DEADLETTER, record.key, letter.to_json(), record.exchange)))

    def _settle(self, exchange: str | None, seq: int, err: KafkaError | None, msg: Message
                ) -> None:
        """Delivery report of one record (``seq`` in the spool, 0 without one)."""
        self._reported += 1
        if err is None:
            if seq:
                self.spool.ack(seq)  # type: ignore[union-attr]
            if self._broker_down_since is not None:
                log.info("Kafka reachable again after %.1f s",
                         time.monotonic() - self._broker_down_since)
                self._broker_down_since = None
            return
        kind = classify(err)
        if kind == "purged" and self._closing:
            return  # our own shutdown purge: counted as undelivered by close()
        if exchange:
            self.stats[exchange].delivery_failures += 1
        if kind == "record":
            record = SpoolRecord(seq, msg.topic() or "", msg.key(), msg.value() or b"", exchange)
            self._reject(record, err, "delivery")
            return
        self.errors[err.name()] += 1
        self._log(logging.ERROR, f"delivery {err.name()}", "delivery to %s failed: %s",
                  msg.topic(), describe(err))
        self._stop((ProducerFatalError if kind == "fatal" else ProducerError)(
            f"delivery to {msg.topic()} failed: {describe(err)}"))

    def _callback(self, exchange: str | None, seq: int) -> Any:
        if seq:  # one per record: the spool needs to know which record was delivered
            return partial(self._settle, exchange, seq)
        cb = self._callbacks.get(exchange)
        if cb is None:  # made once per exchange: this is on the per-record path
            cb = self._callbacks[exchange] = partial(self._settle, exchange, 0)
        return cb

    # --- output ----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Records taken in and not yet confirmed delivered: the queue, the records in hand,
        and those handed to librdkafka whose delivery report has not come."""
        return (self.queue.qsize() + len(self._batch) + len(self._letters)
                + self._handed - self._reported)

    def _take(self, items: list[Item]) -> None:
        """Spool ``items`` (when there is a spool) and put them in hand, in order."""
        if self.spool is not None:
            self._batch.extend(self.spool.append(items))
        else:
            self._batch.extend(SpoolRecord(0, *item) for item in items)

    def _take_letters(self) -> None:
        letters, self._letters = self._letters, []
        self._take([item for _, item in letters])
        for seq, _ in letters:  # the letter is spooled: the rejected record is settled
            if seq:
                self.spool.ack(seq)  # type: ignore[union-attr]

    def _push(self) -> None:
        """Hand the records in hand to librdkafka until its buffer is full.

        Raises:
            ProducerError: a produce() failure that is not about the record.
        """
        batch, produce = self._batch, self._producer.produce
        while batch:
            record = batch[0]
            try:
                produce(record.topic, value=record.value, key=record.key,
                        on_delivery=self._callback(record.exchange, record.seq))
            except BufferError:  # librdkafka's buffer is full (broker slow or down): hold
                return
            except KafkaException as exc:
                err = exc.args[0]
                if classify(err) != "record":
                    self._kafka_failed(err, f"produce to {record.topic}")
                    raise self._stop_error from exc  # type: ignore[misc]
                self._reject(record, err, "produce")
                self._reported += 1  # settled here: no delivery report will come
            except Exception as exc:  # noqa: BLE001 - every failure is surfaced, never lost
                self.errors[type(exc).__name__] += 1
                self._stop(ProducerError(f"produce to {record.topic} failed: {exc!r}"))
                raise self._stop_error from exc  # type: ignore[misc]
            self._handed += 1
            batch.popleft()

    def _poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports and callbacks; raise the error that stopped the publisher."""
        try:
            self._producer.poll(timeout)
        except KafkaException as exc:  # confluent-kafka raises fatal errors from poll()
            self._kafka_failed(exc.args[0], "poll")
        if self._stop_error is not None:
            raise self._stop_error
        if self.spool is not None:
            self.spool.commit()

    async def run(self) -> None:
        """Move queued records into the producer until cancelled; report health on schedule.

        Raises:
            ProducerFatalError: librdkafka reported a fatal error.
            ProducerError: a client error no retry fixes (see :mod:`producers.errors`).
        """
        tasks = [asyncio.create_task(c) for c in
                 (self._drain(), self._health_loop(), self._poll_loop())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self) -> None:
        queue = self.queue
        while True:
            if not self._batch and not self._letters:
                self._take([await queue.get()])
            room = _BATCH - len(self._batch)
            if room > 0 and not queue.empty():  # the backlog, without a wake-up per record
                self._take([queue.get_nowait() for _ in range(min(room, queue.qsize()))])
            if self._letters:
                self._take_letters()
            self._push()
            self._poll(0)
            if self._batch:  # librdkafka is full: let deliveries make room
                await asyncio.sleep(0.05)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await self.report_health()

    async def _poll_loop(self) -> None:
        """Serve delivery reports while no record comes (and persist the spool's progress)."""
        while True:
            await asyncio.sleep(_POLL_INTERVAL)
            self._poll(0)

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
                "queue_depth": self.pending,
                **counters,
            })
        return out

    def _health_items(self) -> list[Item]:
        records = self.health()
        if records:
            log.info("health %s", "  ".join(
                f"{r['exchange']}: {r['messages_per_s']:.0f} msg/s age "
                f"{r['last_message_age_s']}s rc {r['reconnects']} dup {r['duplicates_dropped']} "
                f"gaps {r['gaps']} dlq {r['deadletters']} fail {r['delivery_failures']} "
                f"q {r['queue_depth']}"
                for r in records
            ))
        return [(HEALTH, r["exchange"].encode(), json.dumps(r).encode(), None) for r in records]

    async def report_health(self) -> list[dict[str, Any]]:
        """Queue :meth:`health` for ``md.health`` and log a one-line summary."""
        items = self._health_items()
        for item in items:
            await self.queue.put(item)
        return [json.loads(value) for _, _, value, _ in items]

    async def close(self, timeout: float | None = None) -> int:
        """Deliver what is queued and in hand, within ``timeout`` seconds (default
        ``close_timeout``); return the number of records not confirmed delivered.

        Ends within the deadline even while the broker is down: what is left then is counted
        (the queue, the records in hand, librdkafka's outstanding records; some of those may
        have reached the broker without an acknowledgement), logged, and left in the spool
        when there is one. After a fatal or client error nothing more is sent: the count is
        returned at once (the error itself is raised by :meth:`run`).
        """
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        self._closing = True
        try:
            if self._stop_error is None:
                await self._flush_until(deadline)
        finally:
            self._poll_quietly()
            undelivered = self.pending
            if undelivered:
                where = ("they stay in the spool and are re-sent at the next start"
                         if self.spool is not None else "they are lost with this process")
                log.error("%d records not delivered at shutdown: %s", undelivered, where)
                with contextlib.suppress(Exception):  # nothing left to wait for
                    self._producer.purge(in_queue=True, in_flight=True, blocking=False)
                self._poll_quietly()
            if self.spool is not None:
                self.spool.close()
        return undelivered

    async def _flush_until(self, deadline: float) -> None:
        queue = self.queue
        self._take([queue.get_nowait() for _ in range(queue.qsize())])
        self._take(self._health_items())
        while True:
            if self._letters:
                self._take_letters()
            self._push()
            left = deadline - time.monotonic()
            if not (self._batch or self._letters or self._handed > self._reported) or left <= 0:
                return
            try:  # flush in a thread: the event loop (signals, timers) keeps running
                await asyncio.to_thread(self._producer.flush, min(0.2, left))
            except KafkaException as exc:
                self._kafka_failed(exc.args[0], "flush")
            if self._stop_error is not None:
                return
            if self.spool is not None:
                self.spool.commit()

    def _poll_quietly(self) -> None:
        with contextlib.suppress(KafkaException):
            self._producer.poll(0)
