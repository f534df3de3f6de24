"""Producer durability against a real tansu broker of this module's own (paused with SIGSTOP
for outages, so other tests' brokers are not disturbed): a bounded shutdown that counts what
it could not deliver, produce errors surfaced (an oversized record goes to the dead-letter
topic, the records behind it are delivered), a real librdkafka fatal error stopping the
producer with its exit code, and the on-disk spool (framing, torn tail, CRC, recovery after
a SIGKILL)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from arbstream.schemas import DeadLetter, Trade
from arbstream.topics import DEADLETTER, ensure_topics, quotes_topic, trades_topic
from producers.errors import (
    EXIT_FATAL,
    EXIT_UNDELIVERED,
    ProducerError,
    ProducerFatalError,
)
from producers.events import FeedEvent
from producers.publisher import Publisher
from producers.spool import Spool, SpoolRecord, decode, encode
from testing.faults_producer import Broker, count, inject_fatal_error, quote, spawn
from testing.support import consume


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    b = Broker()
    try:
        yield b
    finally:
        b.stop()


e2e = pytest.mark.e2e  # a real broker, this module's own


def settings_for(broker: Broker, exchange: str, **kw):  # noqa: ANN201 - Settings
    conf = broker.settings(exchanges=[exchange], **kw)
    ensure_topics(conf)
    return conf


async def warm(pub: Publisher, exchange: str, n: int = 5) -> None:
    """Deliver ``n`` quotes so the producer is connected and has its producer id."""
    for i in range(n):
        await pub.submit(quote(10_000_000 + i, exchange))
    deadline = time.monotonic() + 30
    while pub.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert pub.pending == 0


# --- spool framing (no broker) ----------------------------------------------------------------
def test_frames_round_trip_and_a_torn_or_corrupt_tail_ends_the_segment() -> None:
    recs = [SpoolRecord(1, "md.kraken.quotes", b"BTC-USD", b'{"a":1}', "kraken"),
            SpoolRecord(2, "md.health", None, b"", None),
            SpoolRecord(3, "t", b"", b"x" * 1000, "gemini")]
    data = b"".join(encode(r) for r in recs)
    assert decode(data) == (recs, len(data))
    whole = len(data) - len(encode(recs[2]))
    for cut in (1, 7, len(encode(recs[2])) - 1):  # a write interrupted anywhere in the frame
        assert decode(data[:whole + cut]) == (recs[:2], whole)
    flipped = bytearray(data)
    flipped[-5] ^= 0x01  # one bit of the last value: its CRC fails
    assert decode(bytes(flipped)) == (recs[:2], whole)
    bad_len = bytearray(data)
    bad_len[whole:whole + 4] = (2**31).to_bytes(4, "little")  # impossible length
    assert decode(bytes(bad_len)) == (recs[:2], whole)


def test_spool_recovers_unacknowledged_records_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    spool = Spool(tmp_path, commit_interval=0)
    recs = spool.append([("t", b"k", b"v%d" % i, "ex") for i in range(6)])
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5, 6]
    for seq in (2, 1, 4):  # out of order: the watermark stops below 3
        spool.ack(seq)
    assert (spool.watermark, spool.pending) == (2, 3)
    spool.commit()
    [segment] = tmp_path.glob("seg-*.log")
    with segment.open("ab") as f:  # a kill in the middle of the next write
        f.write(encode(SpoolRecord(7, "t", b"k", b"v6", "ex"))[:-3])
    with pytest.raises(Exception, match="in use"):
        Spool(tmp_path)  # one process per directory
    spool._lock.close()  # what a SIGKILL does to the lock (the file stays unclosed)
    again = Spool(tmp_path)
    assert [r.seq for r in again.recovered] == [3, 4, 5, 6]  # 4 was acked out of order
    assert [r.value for r in again.recovered] == [b"v2", b"v3", b"v4", b"v5"]
    assert decode(segment.read_bytes())[1] == segment.stat().st_size  # tail cut
    [seven] = again.append([("t", None, b"new", None)])
    assert seven.seq == 7  # numbering continues after the last whole record
    for seq in (3, 4, 5, 6, 7):
        again.ack(seq)
    again.close()
    assert not list(tmp_path.glob("seg-*.log"))  # all acknowledged: nothing to recover
    assert Spool(tmp_path).recovered == []


def test_corruption_inside_an_older_segment_is_kept_aside_not_dropped(tmp_path: Path,
                                                                        caplog) -> None:
    spool = Spool(tmp_path, segment_bytes=1)  # a new segment after every append
    spool.append([("t", None, b"a", None)])
    spool.append([("t", None, b"b", None), ("t", None, b"c", None)])
    spool.append([("t", None, b"d", None)])
    spool._lock.close()
    first, second = sorted(tmp_path.glob("seg-*.log"))[:2]
    data = bytearray(second.read_bytes())
    data[-2] ^= 0xFF  # the CRC of record "c" fails
    second.write_bytes(bytes(data))
    again = Spool(tmp_path)
    assert [r.value for r in again.recovered] == [b"a", b"b", b"d"]
    [kept] = tmp_path.glob("*.corrupt-*")
    assert kept.read_bytes() == bytes(data[len(encode(SpoolRecord(2, "t", None, b"b", None))):])
    assert "corrupt bytes" in caplog.text
    again.ack(1), again.ack(2), again.ack(4)
    assert again.watermark == 4  # record 3 is unrecoverable: it does not block the watermark


# --- bounded shutdown ---------------------------------------------------------------------------
@e2e
def test_close_during_an_outage_ends_at_the_deadline_and_counts_what_is_held(
        broker: Broker) -> None:
    conf = settings_for(broker, "durclose")

    async def scenario() -> tuple[int, float]:
        pub = Publisher(conf, health_interval=3600)
        runner = asyncio.create_task(pub.run())
        await warm(pub, "durclose")
        broker.pause()
        try:
            for i in range(500):
                await pub.submit(quote(i, "durclose"))
            await asyncio.sleep(0.5)
            runner.cancel()
            t0 = time.monotonic()
            undelivered = await pub.close(timeout=3.0)
            return undelivered, time.monotonic() - t0
        finally:
            broker.resume()

    undelivered, took = asyncio.run(scenario())
    assert undelivered == 500 + 1  # the quotes and the final health record
    assert 3.0 <= took < 5.0, took


@e2e
def test_sigterm_during_an_outage_exits_3_within_the_deadline(broker: Broker, data_dir: Path,
                                                              tmp_path: Path) -> None:
    """``arbstream produce`` as a real process, fed at capture pace by the replay server (the
    Binance 2024 BTC-USDT capture): once records flow the broker pauses, SIGTERM comes, the
    process reports what it could not deliver and exits with code 3 within the deadline."""
    from itertools import islice

    from spark_jobs.kafka_source import end_offsets
    from testing.replay_server import ReplayServer, binance_gz_frames

    conf = settings_for(broker, "binance")
    topic = quotes_topic("binance")
    gz = data_dir / "binance-ws-2024-08" / "spot_btcusdt_20240808.gz"
    frames = list(islice((f for f in binance_gz_frames(gz) if "@bookTicker" in f[1]), 5_000))
    with ReplayServer("binance", data_dir=data_dir / "exchange-ws-captures", frames=frames,
                      speed=1.0) as srv:
        env = {
            **os.environ, "ARB_KAFKA_BOOTSTRAP": conf.kafka_bootstrap,
            "ARB_STATE_DIR": str(tmp_path), "ARB_KAFKA_PARTITIONS": "1",
            "ARB_EXCHANGES": '["binance"]', "ARB_PRODUCER_CLOSE_TIMEOUT_SECONDS": "4",
            "ARB_FEED_CHANNELS": '["bbo"]',
            "ARB_FEED_WS_URLS": json.dumps({"binance": srv.ws_url}),
            "ARB_FEED_REST_URLS": json.dumps({"binance": srv.http_url}),
            "ARB_FEED_CA_FILE": str(srv.ca_file),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "arbstream.shell.cli", "produce", "--exchange", "binance",
             "--symbols", "BTC-USDT"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not sum(end_offsets(conf.kafka_client_config(), [topic])
                          .get(topic, {}).values()):  # records flow: Kafka and feed are up
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
            broker.pause()
            time.sleep(2.0)  # frames keep coming: held
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
            took = time.monotonic() - t0
        finally:
            broker.resume()
            proc.kill()
    assert proc.returncode == EXIT_UNDELIVERED, out
    assert took < 4.0 + 5.0, took  # the deadline, plus stopping the feeds and the interpreter
    assert "records not delivered" in out and "lost with this process" in out, out


# --- produce errors -----------------------------------------------------------------------------
@e2e
def test_an_oversized_record_goes_to_the_deadletter_topic_and_the_rest_is_delivered(
        broker: Broker) -> None:
    conf = settings_for(broker, "duroversize")
    fields = {"exchange": "duroversize", "symbol": "ETH-USD", "price": 1500.5, "size": 0.1,
              "side": "buy", "exchange_ts": 1_700_000_000_000, "received_ts": 1_700_000_000_001}
    huge, small = Trade(trade_id="9" * 1_200_000, **fields), Trade(trade_id="1", **fields)

    async def scenario() -> Publisher:
        pub = Publisher(conf, health_interval=3600)
        runner = asyncio.create_task(pub.run())
        await pub.submit(quote(1, "duroversize"))
        await pub.submit(FeedEvent("trades", huge, dedupe_id="big"))  # > message.max.bytes
        await pub.submit(FeedEvent("trades", small, dedupe_id="1"))
        await pub.submit(quote(2, "duroversize"))
        while pub.pending:
            await asyncio.sleep(0.05)
        assert not runner.done()  # the loop carries on
        runner.cancel()
        assert await pub.close() == 0
        return pub

    pub = asyncio.run(scenario())
    assert pub.errors["MSG_SIZE_TOO_LARGE"] == 1
    assert pub.stats["duroversize"].deadletters == 1
    assert sorted(count(conf, "duroversize")) == [1, 2]
    trades = [Trade.model_validate_json(m.value()) for m in
              consume(conf, trades_topic("duroversize"))]
    assert trades == [small]
    letters = [DeadLetter.model_validate_json(m.value()) for m in consume(conf, DEADLETTER)]
    mine = [d for d in letters if d.source_topic == trades_topic("duroversize")]
    assert len(mine) == 1
    assert mine[0].stage == "producer" and "MSG_SIZE_TOO_LARGE" in mine[0].reason
    assert mine[0].raw_length == len(huge.to_json()) and mine[0].truncated


@e2e
def test_a_fatal_librdkafka_error_stops_the_publisher_with_exit_code_4(broker: Broker) -> None:
    """A real fatal error, raised inside librdkafka (``rd_kafka_test_fatal_error``): run()
    raises ProducerFatalError, nothing more is sent, close() counts what was held."""
    conf = settings_for(broker, "durfatal")

    async def scenario() -> tuple[BaseException | None, int]:
        pub = Publisher(conf, health_interval=3600)
        runner = asyncio.create_task(pub.run())
        await warm(pub, "durfatal")
        broker.pause()  # keep some records outstanding
        try:
            for i in range(100):
                await pub.submit(quote(i, "durfatal"))
            await asyncio.sleep(0.3)
            inject_fatal_error(pub._producer, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER)
            done, _ = await asyncio.wait({runner}, timeout=10)
            assert done, "run() did not stop on the fatal error"
            with pytest.raises(ProducerFatalError):
                await pub.submit(quote(101, "durfatal"))
            t0 = time.monotonic()
            undelivered = await pub.close(timeout=30)
            assert time.monotonic() - t0 < 5  # no flushing into a dead producer
            return runner.exception(), undelivered
        finally:
            broker.resume()

    error, undelivered = asyncio.run(scenario())
    assert isinstance(error, ProducerFatalError), error
    assert error.exit_code == EXIT_FATAL
    assert "OUT_OF_ORDER_SEQUENCE_NUMBER" in str(error)
    assert undelivered == 100


@e2e
def test_a_fatal_error_reported_to_the_error_callback_stops_the_publisher(
        broker: Broker) -> None:
    """The error-callback path (older confluent-kafka versions report fatal errors there
    rather than raising them from poll): a fatal KafkaError, as librdkafka builds it."""
    conf = settings_for(broker, "durfatalcb")

    async def scenario() -> BaseException | None:
        pub = Publisher(conf, health_interval=3600)
        runner = asyncio.create_task(pub.run())
        await warm(pub, "durfatalcb")
        pub._on_error(KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True))
        done, _ = await asyncio.wait({runner}, timeout=10)
        assert done
        await pub.close()
        return runner.exception()

    error = asyncio.run(scenario())
    assert isinstance(error, ProducerFatalError) and "_FENCED" in str(error)
    assert isinstance(error, ProducerError) and error.exit_code == EXIT_FATAL


# --- spool across a SIGKILL -------------------------------------------------------------------
@e2e
def test_sigkill_during_an_outage_loses_nothing_that_was_spooled(broker: Broker,
                                                                 tmp_path: Path) -> None:
    exchange = "durspool"
    conf = settings_for(broker, exchange)
    spec = {"bootstrap": conf.kafka_bootstrap, "exchange": exchange, "spool": str(tmp_path)}
    first = spawn({**spec, "start": 0, "count": 2_000})
    try:
        assert first.event("closed")["undelivered"] == 0  # 0..1999 delivered
        first.wait(30)
    finally:
        first.kill()
    broker.pause()
    second_half = spawn({**spec, "start": 2_000, "count": 3_000, "hold": True})
    try:
        second_half.event("taken")  # 2000..4999 spooled, held: the broker is paused
        time.sleep(0.5)
        second_half.kill()
    finally:
        second_half.kill()
        broker.resume()
    third = spawn({**spec, "count": 0})
    try:
        started = third.event("started")
        third.event("closed")
    finally:
        third.kill()
    assert started["recovered"] == 3_000
    got = count(conf, exchange)
    assert [i for i in range(5_000) if not got[i]] == []  # nothing lost
    assert set(got) == set(range(5_000))
    duplicates = sum(n - 1 for n in got.values())
    print(f"\nspool after SIGKILL: 3000 spooled, 0 lost, {duplicates} duplicated")
