"""Parsing, validation and keying of market-data records (:mod:`spark_jobs.decode`): the
reasons every invalid record gets, the fields of valid ones, the buckets and hashes (checked
against Spark's own ``xxhash64``), and the ``mapInArrow`` path used with the built-in Kafka
source (checked against the decoder run directly)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from arbstream.schemas import DeadLetter, Heartbeat, Quote
from spark_jobs.decode import (
    INPUT_SCHEMA,
    DecodeConfig,
    Decoder,
    spark_xxhash64,
    unpack,
)
from spark_jobs.market import market_input

FEES = {"coinbase": 0.006, "kraken": 0.0026, "binance": 0.001}
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z
CFG = DecodeConfig(frozenset(FEES), frozenset({"USD", "USDT", "USDC"}), 4)


def quote(
    exchange: str, symbol: str, ts: int, bid: float, ask: float,
    received: int | None = None, key: str = "",
) -> Quote:
    return Quote(
        exchange=exchange, symbol=symbol, exchange_ts=ts,
        received_ts=ts if received is None else received, bid=bid, ask=ask, dedupe_key=key,
    )


def decode_all(items: list[tuple[str, bytes | None]], cfg: DecodeConfig = CFG
               ) -> list[dict[str, Any]]:
    """Rows of every bucket for ``(topic, value)`` records at offsets 0, 1, ..., in offset
    order (a fanned-out record once per bucket)."""
    decoder = Decoder(cfg)
    parts = decoder.records([v for _, v in items], [t for t, _ in items], [0] * len(items),
                            list(range(len(items))))
    rows = [dict(r, bucket=b) for b, batch in parts for r in batch.to_pylist()]
    return sorted(rows, key=lambda r: (r["offset"], r["bucket"]))


def home_rows(items: list[tuple[str, bytes | None]]) -> list[dict[str, Any]]:
    return [r for r in decode_all(items) if r["home"]]


# --- validation and dead letters --------------------------------------------------------------

GOOD = {
    "schema_version": 1, "type": "quote", "exchange": "kraken", "symbol": "BTC-USD",
    "bid": 100.0, "ask": 101.0, "bid_size": None, "ask_size": None,
    "exchange_ts": T0, "received_ts": T0, "dedupe_key": "k",
}
KRAKEN = "md.kraken.quotes"


def bad(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


NOT_UTF8 = b'\xff\xfe{"bid": 1}'
HB_KRAKEN = Heartbeat(exchange="kraken", exchange_ts=T0 + 1, received_ts=T0 + 1).to_json()
HB_ZERO_TS = json.dumps({"schema_version": 1, "type": "heartbeat", "exchange": "kraken",
                         "exchange_ts": 0, "received_ts": T0, "dedupe_key": "kraken:hb:0"}).encode()
VALIDATION: list[tuple[str, bytes | None, str | None]] = [
    (KRAKEN, quote("kraken", "BTC-USD", T0, 100.0, 101.0, key="ok-1").to_json(), None),
    ("md.coinbase.quotes", quote("coinbase", "ETH-USD", T0, 1.0, 1.0, key="ok-2").to_json(), None),
    (KRAKEN, b'{"schema_version": 1, "type": "quote", "exchange": "kraken"', "malformed JSON"),
    (KRAKEN, b"", "malformed JSON"),
    (KRAKEN, NOT_UTF8, "payload is not UTF-8"),
    (KRAKEN, None, "empty payload"),
    (KRAKEN, bad(schema_version=2), "unsupported schema_version 2"),
    (KRAKEN, bad(type="trade"), "type must be 'quote', 'book' or 'heartbeat'"),
    (KRAKEN, bad(bid=101.0, ask=100.0), "crossed quote: bid 101.0 > ask 100.0"),
    (KRAKEN, bad(bid=0.0), "bid missing or not a positive number"),
    (KRAKEN, bad(ask=-1.5), "ask missing or not a positive number"),
    (KRAKEN, bad(exchange="coinbase"), "exchange 'coinbase' does not match topic md.kraken.quotes"),
    (KRAKEN, bad(symbol="btcusd"), "symbol missing or not canonical BASE-QUOTE"),
    ("md.bitmex.quotes", bad(exchange="bitmex"), "no taker fee configured for exchange bitmex"),
    (KRAKEN, bad(exchange_ts=0), "exchange_ts missing or not a positive number"),
    (KRAKEN, Heartbeat(exchange="kraken", exchange_ts=T0, received_ts=T0).to_json(), None),
    (KRAKEN, HB_ZERO_TS, "exchange_ts missing or not a positive number"),
    ("md.coinbase.quotes", HB_KRAKEN, "exchange 'kraken' does not match topic md.coinbase.quotes"),
    (KRAKEN, bad(dedupe_key=""), "dedupe_key missing"),
]
# Records the stream once accepted by mistake (NaN, Infinity, a trailing newline).
GAPS: list[tuple[str, bytes | None]] = [
    (KRAKEN, bad(ask="NaN", dedupe_key="gap-nan")),
    (KRAKEN, bad(bid="Infinity", ask="Infinity", dedupe_key="gap-inf")),
    (KRAKEN, bad(symbol="BTC-USD\n", dedupe_key="gap-newline")),
]

KRAKEN_BOOK = "md.kraken.book"
BOOK = {
    "schema_version": 1, "type": "book", "exchange": "kraken", "symbol": "BTC-USD",
    "exchange_ts": T0, "received_ts": T0, "depth": 2, "dedupe_key": "b",
    "bids": [[100.0, 1.0], [99.0, 2.0]], "asks": [[101.0, 1.0], [102.0, 2.0]],
}


def book(**changes: Any) -> bytes:
    return json.dumps({**BOOK, **changes}).encode()


FAR_MS = 9_300_000_000_000_000  # year ~296,700: beyond Spark's timestamp range (~9.22e15 ms)
OUT_OF_RANGE = "timestamp_out_of_range: "
UNSORTED = "book levels not sorted best first (bids descending, asks ascending)"
CONTROL = "dedupe_key contains control characters (CR, LF, ...)"
# Newer checks: (topic, value, the error's start, or None for a valid record).
CHECKS: list[tuple[str, bytes, str | None]] = [
    (KRAKEN, bad(exchange_ts=FAR_MS, dedupe_key="c-far"),
     f"{OUT_OF_RANGE}exchange_ts {FAR_MS} ms is outside 2009-01-01..2100-01-01"),
    (KRAKEN, bad(received_ts=FAR_MS, dedupe_key="c-far-recv"), f"{OUT_OF_RANGE}received_ts"),
    (KRAKEN, bad(exchange_ts=1000, dedupe_key="c-1970"), f"{OUT_OF_RANGE}exchange_ts 1000 ms"),
    (KRAKEN, bad(exchange_ts=4_102_444_800_000, dedupe_key="c-2100"), OUT_OF_RANGE),
    (KRAKEN, bad(exchange_ts=4_102_444_799_999, received_ts=4_102_444_799_999,
                 dedupe_key="c-2099"), None),  # the last ms of 2099
    (KRAKEN, bad(exchange_ts=1_230_768_000_000, received_ts=1_230_768_000_000,
                 dedupe_key="c-2009"), None),  # 2009-01-01T00:00:00.000Z
    (KRAKEN, Heartbeat(exchange="kraken", exchange_ts=FAR_MS, received_ts=T0).to_json(),
     f"{OUT_OF_RANGE}exchange_ts {FAR_MS} ms"),
    (KRAKEN, bad(bid_size="NaN", dedupe_key="c-nan-size"), "bid_size is not a finite number"),
    (KRAKEN, bad(ask_size="Infinity", dedupe_key="c-inf-size"),
     "ask_size is not a finite number"),
    (KRAKEN, bad(bid_size="-Infinity", dedupe_key="c-neg-inf-size"),
     "bid_size is not a finite number"),
    (KRAKEN, bad(bid_size=1.5, ask_size=0.0, dedupe_key="c-sizes"), None),
    (KRAKEN_BOOK, book(dedupe_key="c-book"), None),
    (KRAKEN_BOOK, book(bids=[[99.0, 2.0], [100.0, 1.0]], dedupe_key="c-bids-up"), UNSORTED),
    (KRAKEN_BOOK, book(asks=[[102.0, 2.0], [101.0, 1.0]], dedupe_key="c-asks-down"), UNSORTED),
    (KRAKEN_BOOK, book(bids=[[100.0, 1.0], [100.0, 2.0]], dedupe_key="c-bids-dup"), UNSORTED),
    (KRAKEN_BOOK, book(asks=[[101.0, 1.0], [101.0, 1.0]], dedupe_key="c-asks-dup"), UNSORTED),
    (KRAKEN_BOOK, book(bids=[[101.0, 1.0]], asks=[[100.0, 1.0]], dedupe_key="c-crossed"),
     "crossed book: best bid > best ask"),
    (KRAKEN, bad(dedupe_key="k\r\nX-Injected: 1"), CONTROL),
    (KRAKEN, bad(dedupe_key="k\n"), CONTROL),
    (KRAKEN, bad(dedupe_key="k\x00"), CONTROL),
]




@pytest.fixture(scope="module")
def validation() -> dict[str, Any]:
    parsed = home_rows([(t, v) for t, v, _ in VALIDATION] + GAPS + [(t, v) for t, v, _ in CHECKS])
    return {
        "parsed": parsed,
        "valid": [r for r in parsed if r["kind"] == "quote"],
        "events": [r for r in parsed if r["error"] is None],
    }


def test_validation_reasons(validation: dict[str, Any]) -> None:
    parsed = validation["parsed"][: len(VALIDATION)]
    assert [r["error"] for r in parsed] == [reason for _, _, reason in VALIDATION]
    ok = parsed[0]
    assert (ok["exchange"], ok["symbol"], ok["bid"], ok["ask"], ok["exchange_ts"]) == (
        "kraken", "BTC-USD", 100.0, 101.0, T0)
    # ``value``: the original payload, as is (bytes, also when not UTF-8)
    assert [r["value"] for r in parsed] == [v for _, v, _ in VALIDATION]
    assert {r["dedupe_key"] for r in validation["valid"]} >= {"ok-1", "ok-2"}
    # The valid heartbeat is an event but not a quote.
    hb = f"kraken:hb:{T0}"
    assert hb not in {r["dedupe_key"] for r in validation["valid"]}
    assert [r["kind"] for r in validation["events"] if r["dedupe_key"] == hb] == ["heartbeat"]
    # an invalid record keeps only where it came from and why
    for r in parsed:
        if r["error"] is not None:
            assert r["kind"] is None and r["exchange"] is None and r["dedupe_hash"] is None


def test_dead_letter_of_each_invalid_record() -> None:
    """What the sink makes of an invalid row: a DeadLetter with the reason and the payload
    (base64 when not UTF-8, "" when there was none)."""
    rows = home_rows([(t, v) for t, v, _ in VALIDATION])
    for row, (topic, value, reason) in zip(rows, VALIDATION, strict=True):
        if reason is None:
            continue
        letter = DeadLetter.of(row["value"] or b"", row["error"], "stream",
                               source_topic=row["topic"], source_partition=row["partition"],
                               source_offset=row["offset"])
        assert (letter.reason, letter.source_topic) == (reason, topic)
        if value == NOT_UTF8:
            assert letter.raw_encoding == "base64"
        elif value is not None:
            assert letter.raw == value.decode()


def test_nan_infinity_and_trailing_newline_rejected(validation: dict[str, Any]) -> None:
    gaps = validation["parsed"][len(VALIDATION):len(VALIDATION) + len(GAPS)]
    assert len(gaps) == len(GAPS)
    assert all(r["error"] is not None for r in gaps), [(r["offset"], r["error"]) for r in gaps]


def test_newer_checks(validation: dict[str, Any]) -> None:
    first = len(VALIDATION) + len(GAPS)
    rows = validation["parsed"][first:]
    assert len(rows) == len(CHECKS)
    for row, (_, value, start) in zip(rows, CHECKS, strict=True):
        if start is None:
            assert row["error"] is None, (value, row["error"])
        else:
            assert row["error"] is not None and row["error"].startswith(start), (
                value, row["error"])


def test_timestamp_far_out_of_range(validation: dict[str, Any]) -> None:
    # 9.3e15 ms is beyond Spark's timestamps (microseconds in a long): the quote, its receive
    # time and the heartbeat are each an error, and no such time reaches the engine.
    first = len(VALIDATION) + len(GAPS)
    rows = validation["parsed"][first:]
    assert [rows[i]["error"] for i in (0, 1, 6)] == [
        f"{OUT_OF_RANGE}exchange_ts {FAR_MS} ms is outside 2009-01-01..2100-01-01",
        f"{OUT_OF_RANGE}received_ts {FAR_MS} ms is outside 2009-01-01..2100-01-01",
        f"{OUT_OF_RANGE}exchange_ts {FAR_MS} ms is outside 2009-01-01..2100-01-01"]
    assert FAR_MS not in {r["exchange_ts"] for r in validation["events"]}
    assert FAR_MS not in {r["received_ts"] for r in validation["events"]}


def test_valid_sizes_books_and_edges_of_the_range(validation: dict[str, Any]) -> None:
    events = {r["dedupe_key"]: r for r in validation["events"]}
    assert (events["c-sizes"]["bid_size"], events["c-sizes"]["ask_size"]) == (1.5, 0.0)
    assert events["c-book"]["kind"] == "book"
    assert (events["c-book"]["bids"], events["c-book"]["asks"]) == (BOOK["bids"], BOOK["asks"])
    assert events["c-2099"]["exchange_ts"] == 4_102_444_799_999
    assert events["c-2009"]["exchange_ts"] == 1_230_768_000_000
    assert "c-book" not in {r["dedupe_key"] for r in validation["valid"]}  # a book, no quote



# --- limits, keys and hashes ---------------------------------------------------------------------


def test_record_too_large_is_the_first_check() -> None:
    cfg = DecodeConfig(frozenset(FEES), CFG.usd_quotes, 4, max_record_bytes=2048)
    big_valid = bad(dedupe_key="x" * 3000)
    garbage = b"\xff" * 5000
    rows = [r for r in decode_all([(KRAKEN, big_valid), (KRAKEN, garbage), (KRAKEN, bad())],
                                  cfg) if r["home"]]
    assert [r["error"] for r in rows] == [
        f"record_too_large: {len(big_valid)} bytes > 2048",
        "record_too_large: 5000 bytes > 2048", None]
    assert rows[1]["value"] == garbage


def test_buckets_fan_out_and_home() -> None:
    items = [
        (KRAKEN, quote("kraken", "BTC-USD", T0, 1.0, 2.0, key="btc").to_json()),
        (KRAKEN, quote("kraken", "USDC-USD", T0, 0.99, 1.0, key="rate").to_json()),
        (KRAKEN, Heartbeat(exchange="kraken", exchange_ts=T0, received_ts=T0).to_json()),
        (KRAKEN, b"not json"),
    ]
    rows = decode_all(items)
    by = {o: [r for r in rows if r["offset"] == o] for o in range(4)}
    assert [r["bucket"] for r in by[0]] == [spark_xxhash64("BTC") % 4]
    assert [r["bucket"] for r in by[1]] == [0, 1, 2, 3]  # a conversion leg of every base
    assert [r["bucket"] for r in by[1] if r["home"]] == [spark_xxhash64("USDC") % 4]
    assert [r["bucket"] for r in by[2]] == [0, 1, 2, 3]  # advances every bucket's clock
    assert [r["bucket"] for r in by[2] if r["home"]] == [spark_xxhash64("kraken") % 4]
    assert [(r["bucket"], r["home"]) for r in by[3]] == [(3, True)]  # offset mod buckets


def test_hashes_and_the_mapinarrow_path_equal_spark(spark: SparkSession) -> None:
    """The bucket and ``dedupe_hash`` are Spark's ``xxhash64`` (so keys and deduplication
    state are those the Spark-parsed job had), and decoding in a ``mapInArrow`` after a raw
    Kafka-shaped DataFrame (the built-in source's path) gives exactly the decoder's rows."""
    items = [(t, v) for t, v, _ in VALIDATION] + GAPS + [(t, v) for t, v, _ in CHECKS]
    raw = spark.createDataFrame(
        [(None, v, t, 0, i) for i, (t, v) in enumerate(items)],
        "key binary, value binary, topic string, partition int, offset long")
    keys = [r["dedupe_key"] for r in home_rows(items) if r["dedupe_key"]]
    words = keys + ["BTC", "ETH", "kraken", "USDC", "é-ü-日本"]
    got = spark.createDataFrame([(w,) for w in words], "w string").select(
        "w", F.xxhash64("w").alias("h")).collect()
    assert {r["w"]: r["h"] for r in got} == {w: spark_xxhash64(w) for w in words}

    class S:  # the settings market_input reads
        taker_fees, usd_quotes, stream_buckets, max_record_bytes = FEES, ["USD", "USDT",
                                                                          "USDC"], 4, None

    packed = market_input(raw, S())  # type: ignore[arg-type]
    assert packed.schema.fieldNames() == ["bucket", "kind", "rows", "payload"]
    rows = []
    for row in packed.collect():
        table = unpack(row["payload"])
        assert table.schema == INPUT_SCHEMA and table.num_rows == row["rows"]
        rows += [dict(r, bucket=row["bucket"]) for r in table.to_pylist()]
    rows.sort(key=lambda r: (r["offset"], r["bucket"]))
    assert rows == decode_all(items)
    assert pa.Table.from_pylist(rows).num_rows > len(items)  # the fanned-out heartbeats


def test_input_schema_is_the_engines() -> None:
    from spark_jobs.engine import INPUT_COLUMNS

    assert INPUT_SCHEMA.names == INPUT_COLUMNS


def test_market_reader_lists_every_partition_with_each_batch_that_reads() -> None:
    from spark_jobs.market_source import MarketStreamReader, PartitionList

    reader = MarketStreamReader({"kafka.bootstrap.servers": "127.0.0.1:1", "subscribe": "a,b",
                                 "decode": CFG.to_json()})
    start = {"a": {"0": 5, "1": 7}, "b": {"0": 0}}
    end = {"a": {"0": 9, "1": 7}, "b": {"0": 0}}
    parts = reader.partitions(start, end)
    assert [type(p).__name__ for p in parts] == ["KafkaPartition", "PartitionList"]
    assert parts[-1] == PartitionList((("a", 0), ("a", 1), ("b", 0)))
    [batch] = list(reader.read(parts[-1]))
    rows = batch.to_pylist()
    assert [r["bucket"] for r in rows] == [0, 1, 2, 3]  # every bucket's engine learns them
    for row in rows:
        listed = unpack(row["payload"]).to_pylist()
        assert [(r["kind"], r["topic"], r["partition"]) for r in listed] == [
            ("partition", "a", 0), ("partition", "a", 1), ("partition", "b", 0)]
    assert reader.partitions(end, end) == []  # nothing to read: no list either
