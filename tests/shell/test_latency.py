"""Detection latency read from Kafka (:mod:`arbstream.shell.latency`), against a real broker: quote
records and opportunity events produced with chosen CreateTimes, latencies computed by hand."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from arbstream.config import Settings
from arbstream.schemas import Heartbeat, Quote
from arbstream.shell.latency import Latency, detection_latency, latencies

T0 = 1_678_507_205_000  # 2023-03-11T04:00:05Z, the quotes' exchange_ts


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _event(oid: str, buy: tuple[str, str, int], sell: tuple[str, str, int],
           stage: str = "early") -> dict:
    return {"type": "opportunity", "opportunity_id": oid, "stage": stage,
            "buy_exchange": buy[0], "symbol": buy[1], "buy_ts": _iso(buy[2]),
            "sell_exchange": sell[0], "sell_symbol": sell[1], "sell_ts": _iso(sell[2])}


def test_latency_from_the_later_legs_publish_time_to_the_first_event(settings: Settings
                                                                      ) -> None:
    conf = settings.kafka_client_config()
    quotes, events = f"t.lat.q.{uuid.uuid4().hex[:8]}", f"t.lat.e.{uuid.uuid4().hex[:8]}"
    admin = AdminClient(conf)  # kept referenced until the futures resolve
    for fut in admin.create_topics([NewTopic(quotes, 1, 1), NewTopic(events, 1, 1)]).values():
        fut.result(15)
    producer = Producer(conf)
    published = 1_800_000_000_000  # CreateTimes chosen here (ms)
    records = [
        (Quote(exchange="kraken", symbol="BTC-USD", exchange_ts=T0, received_ts=T0, bid=1.0,
               ask=2.0), published),
        (Quote(exchange="coinbase", symbol="BTC-USD", exchange_ts=T0 + 7, received_ts=T0,
               bid=3.0, ask=4.0), published + 400),
        (Heartbeat(exchange="kraken", exchange_ts=T0, received_ts=T0), published + 500),
        (Quote(exchange="binance", symbol="BTC-USDT", exchange_ts=T0 + 9, received_ts=T0,
               bid=3.0, ask=4.0), published + 900),
    ]
    for rec, ts in records:
        producer.produce(quotes, rec.to_json(), partition=0, timestamp=ts)
    producer.produce(quotes, b"\xff not json", partition=0, timestamp=published)
    sent = [
        # later leg coinbase (published + 400): read 1.1 s later
        (_event("a", ("kraken", "BTC-USD", T0), ("coinbase", "BTC-USD", T0 + 7)), 1_500),
        (_event("a", ("kraken", "BTC-USD", T0), ("coinbase", "BTC-USD", T0 + 7), "final"),
         9_000),  # a later stage of the same opportunity: not its first event
        # cross-quote: the sell leg is BTC-USDT on binance (published + 900)
        (_event("b", ("kraken", "BTC-USD", T0), ("binance", "BTC-USDT", T0 + 9)), 1_150),
        # a leg that was never published in the range
        (_event("c", ("kraken", "BTC-USD", T0 + 1), ("coinbase", "BTC-USD", T0 + 7)), 2_000),
    ]
    for e, ts in sent:
        producer.produce(events, json.dumps(e).encode(), partition=0, timestamp=published + ts)
    producer.produce(events, json.dumps({"type": "episode"}).encode(), partition=0)
    assert producer.flush(15) == 0

    got = detection_latency(conf, {quotes: {"0": (0, 5)}}, {events: {"0": (0, 5)}})
    assert (got.n, got.unmatched) == (2, 1)
    assert (got.p50, got.max) == (pytest.approx(0.675), 1.1)  # (0.25 + 1.1) / 2, and 1.1
    # an empty range reads nothing
    none = detection_latency(conf, {quotes: {"0": (5, 5)}}, {events: {"0": (2, 2)}})
    assert none.n == 0 and math.isnan(none.p50)


def test_percentiles_and_summary() -> None:
    published = {("x", "A-B", T0): 0}
    firsts = [(_event(str(i), ("x", "A-B", T0), ("x", "A-B", T0)), i * 10) for i in range(101)]
    got = latencies(published, firsts)
    assert (got.n, got.p50, got.p95, got.p99, got.max) == (101, 0.5, 0.95, 0.99, 1.0)
    assert got.summary() == ("p50 0.50 s, p95 0.95 s, p99 0.99 s, max 1.00 s "
                             "(101 opportunities)")
    assert Latency.of([0.3]).p99 == 0.3
