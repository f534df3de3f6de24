"""Detection latency measured from Kafka itself: quote published → early opportunity event.

For a replay (``arbstream demo``) a quote's ``received_ts`` is its recorded time, not when it
entered the system, so latency is measured between two Kafka CreateTimes instead: that of the
quote records (set by the producer when it published them) and that of each opportunity's
first event on ``arb.opportunities`` (set by the stream's sink when it produced it). An
opportunity's quote is the later of its two legs, found by ``(exchange, symbol, exchange_ts)``
among the quote records read; the conversion leg of a cross-quote pair is not counted.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arbstream.timestamps import to_ms

#: ``{topic: {partition (str): (start offset, end offset)}}``, end exclusive.
Ranges = dict[str, dict[str, tuple[int, int]]]


@dataclass(frozen=True)
class Latency:
    """Latencies in seconds of ``n`` opportunities (``nan`` when ``n`` is 0); ``unmatched``
    first events whose legs were not among the quotes read."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float
    unmatched: int

    @classmethod
    def of(cls, values: list[float], unmatched: int = 0) -> Latency:
        if not values:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, unmatched)
        ordered = sorted(values)
        q = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 \
            else [ordered[0]] * 99
        return cls(len(ordered), q[49], q[94], q[98], ordered[-1], unmatched)

    def summary(self) -> str:
        """One line: ``p50 … s, p95 …, p99 …, max … (n opportunities)``."""
        return (f"p50 {self.p50:.2f} s, p95 {self.p95:.2f} s, p99 {self.p99:.2f} s, max "
                f"{self.max:.2f} s ({self.n:,} opportunities"
                + (f", {self.unmatched} without their quotes" if self.unmatched else "") + ")")


def read_ranges(conf: dict[str, Any], ranges: Ranges,
                on_record: Callable[[str, bytes, int], None], timeout: float = 120.0) -> None:
    """Call ``on_record(topic, value, create_time_ms)`` for every record in ``ranges``.

    Raises:
        TimeoutError: the ranges were not read within ``timeout`` seconds.
    """
    from confluent_kafka import Consumer, TopicPartition

    todo = {(t, int(p)): (start, end) for t, parts in ranges.items()
            for p, (start, end) in parts.items() if end > start}
    if not todo:
        return
    consumer = Consumer({**conf, "group.id": f"arbstream-latency-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in todo.items()])
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"records not read within {timeout:.0f} s: {todo}")
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            key = (msg.topic(), msg.partition())
            if key not in todo or msg.offset() >= todo[key][1]:
                continue
            on_record(msg.topic(), msg.value() or b"", msg.timestamp()[1])
            if msg.offset() + 1 >= todo[key][1]:
                del todo[key]
    finally:
        consumer.close()


def detection_latency(conf: dict[str, Any], quotes: Ranges, events: Ranges) -> Latency:
    """Latency from each opportunity's later leg quote entering Kafka to its first event
    (any stage; the stream emits ``early`` first) entering Kafka, over the records in the
    given ranges of the quote topics and ``arb.opportunities``. Quote records that are not
    JSON quotes (heartbeats, books, invalid records) are skipped."""
    published: dict[tuple[str, str, int], int] = {}

    def on_quote(_topic: str, value: bytes, ts: int) -> None:
        try:
            q = json.loads(value)
        except ValueError:
            return
        if isinstance(q, dict) and q.get("type") == "quote":
            published.setdefault((q.get("exchange"), q.get("symbol"), q.get("exchange_ts")), ts)

    first: dict[str, tuple[dict[str, Any], int]] = {}

    def on_event(_topic: str, value: bytes, ts: int) -> None:
        e = json.loads(value)
        if e.get("type") == "opportunity" and e["opportunity_id"] not in first:
            first[e["opportunity_id"]] = (e, ts)

    read_ranges(conf, quotes, on_quote)
    read_ranges(conf, events, on_event)
    return latencies(published, first.values())


def latencies(published: dict[tuple[str, str, int], int],
              first_events: Iterable[tuple[dict[str, Any], int]]) -> Latency:
    """:func:`detection_latency` from the quotes' publish times (ms, by ``(exchange, symbol,
    exchange_ts)``) and each opportunity's first event with its CreateTime (ms)."""
    values, unmatched = [], 0
    for e, ts in first_events:
        buy_ms, sell_ms = (to_ms(datetime.fromisoformat(e[k])) for k in ("buy_ts", "sell_ts"))
        legs = [published.get((e["buy_exchange"], e["symbol"], buy_ms)),
                published.get((e["sell_exchange"], e.get("sell_symbol") or e["symbol"], sell_ms))]
        if None in legs:
            unmatched += 1
            continue
        values.append((ts - max(legs)) / 1000)  # type: ignore[type-var]
    return Latency.of(values, unmatched)
