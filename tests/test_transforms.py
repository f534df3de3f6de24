"""Parsing and validation on static Spark DataFrames: ``parse_quotes``, ``parse_trades``,
``valid_quotes``, ``valid_events``, ``valid_trades`` and ``dead_letters``.

Only the shared ``spark`` fixture is used (no services). Cases are batched into a few
DataFrames to keep the number of Spark jobs small. The spread semantics (snapshots, pairs,
spreads) are checked through the stream engine in ``tests/test_engine_scenarios.py``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import TimestampType

from arbstream.schemas import DeadLetter, Heartbeat, Quote
from arbstream.topics import quotes_topic
from spark_jobs.transforms import (
    dead_letters,
    parse_quotes,
    parse_trades,
    valid_events,
    valid_quotes,
    valid_trades,
)

RAW_SCHEMA = "key binary, value binary, topic string, partition int, offset long"
FEES = {"coinbase": 0.006, "kraken": 0.0026, "binance": 0.001}
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z


# --- helpers ---------------------------------------------------------------------------------


def quote(
    exchange: str, symbol: str, ts: int, bid: float, ask: float,
    received: int | None = None, key: str = "",
) -> Quote:
    return Quote(
        exchange=exchange, symbol=symbol, exchange_ts=ts,
        received_ts=ts if received is None else received, bid=bid, ask=ask, dedupe_key=key,
    )


Record = Quote | tuple[str, bytes | None]


def raw_frame(spark: SparkSession, items: Iterable[Record]) -> DataFrame:
    """Kafka-shaped rows; a Quote goes to its exchange's topic keyed by symbol, a ``(topic,
    value)`` tuple is sent as is. Partition 0, offsets 0, 1, 2, ... in order."""
    rows = []
    for offset, item in enumerate(items):
        if isinstance(item, Quote):
            rows.append((item.symbol.encode(), item.to_json(), quotes_topic(item.exchange), 0,
                         offset))
        else:
            topic, value = item
            rows.append((None, value, topic, 0, offset))
    return spark.createDataFrame(rows, RAW_SCHEMA)


def collect(df: DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with every timestamp column as integer UTC ms (checked to be whole ms)."""
    ts_cols = {f.name for f in df.schema.fields if isinstance(f.dataType, TimestampType)}
    cols = [F.unix_micros(c).alias(c) if c in ts_cols else F.col(c) for c in df.columns]
    out = []
    for row in df.select(*cols).collect():
        d = row.asDict()
        for c in ts_cols:
            if d[c] is not None:
                assert d[c] % 1000 == 0, (c, d)
                d[c] //= 1000
        out.append(d)
    return out


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
def validation(spark: SparkSession) -> dict[str, Any]:
    raw = raw_frame(spark, [(t, v) for t, v, _ in VALIDATION] + GAPS
                    + [(t, v) for t, v, _ in CHECKS])
    parsed = parse_quotes(raw, FEES)
    return {
        "parsed": sorted(collect(parsed), key=lambda r: r["offset"]),
        "valid": collect(valid_quotes(parsed)),
        "events": collect(valid_events(parsed)),
        "dead": collect(dead_letters(parsed)),
    }


def test_validation_reasons(validation: dict[str, Any]) -> None:
    parsed = validation["parsed"][: len(VALIDATION)]
    assert [r["error"] for r in parsed] == [reason for _, _, reason in VALIDATION]
    ok = parsed[0]
    assert (ok["exchange"], ok["symbol"], ok["bid"], ok["ask"], ok["ts"], ok["raw_encoding"]) == (
        "kraken", "BTC-USD", 100.0, 101.0, T0, "utf-8")
    # ``value``: the original payload, as is (bytes, also when not UTF-8)
    assert [None if r["value"] is None else bytes(r["value"]) for r in parsed] == [
        v for _, v, _ in VALIDATION]
    assert {r["dedupe_key"] for r in validation["valid"]} >= {"ok-1", "ok-2"}
    # The valid heartbeat is an event but not a quote.
    hb = f"kraken:hb:{T0}"
    assert hb not in {r["dedupe_key"] for r in validation["valid"]}
    assert [r["type"] for r in validation["events"] if r["dedupe_key"] == hb] == ["heartbeat"]


def test_dead_letters(validation: dict[str, Any]) -> None:
    dead = {}
    for row in validation["dead"]:
        letter = DeadLetter.model_validate_json(row["value"])
        assert row["key"] == letter.source_topic
        dead[letter.source_offset] = letter
    expected = {i: (t, v, r) for i, (t, v, r) in enumerate(VALIDATION) if r is not None}
    gaps = set(range(len(VALIDATION), len(VALIDATION) + len(GAPS)))  # also rejected, see below
    first = len(VALIDATION) + len(GAPS)
    checks = {first + i: (t, v, r) for i, (t, v, r) in enumerate(CHECKS) if r is not None}
    assert set(dead) == set(expected) | gaps | set(checks)
    for offset, (topic, value, start) in checks.items():
        letter = dead[offset]
        assert letter.reason.startswith(start), (offset, letter.reason)
        assert (letter.source_topic, letter.raw) == (topic, value.decode())
    for offset, (topic, value, reason) in expected.items():
        letter = dead[offset]
        assert letter.reason == reason
        assert (letter.stage, letter.source_topic, letter.source_partition) == (
            "stream", topic, 0)
        assert letter.rejected_ts > 0
        if value == NOT_UTF8:
            assert letter.raw_encoding == "base64"
            assert base64.b64decode(letter.raw) == NOT_UTF8
        elif value is None:
            assert letter.raw == ""
        else:
            assert letter.raw_encoding == "utf-8"
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


def test_timestamp_far_out_of_range_does_not_overflow(validation: dict[str, Any]) -> None:
    # 9.3e15 ms overflows Spark's timestamps (microseconds in a long): it is an error, its
    # ``ts`` is null, and nothing raised while collecting (the fixture collected every frame).
    far = [r for r in validation["parsed"] if r["exchange_ts"] == FAR_MS]
    assert len(far) == 2  # the quote and the heartbeat
    assert all(r["ts"] is None and r["error"].startswith(OUT_OF_RANGE) for r in far)
    assert FAR_MS not in {r["exchange_ts"] for r in validation["events"]}
    recv = [r for r in validation["parsed"] if r["received_ts"] == FAR_MS]
    assert [r["ts"] for r in recv] == [T0]  # exchange_ts itself is fine


def test_valid_sizes_books_and_edges_of_the_range(validation: dict[str, Any]) -> None:
    events = {r["dedupe_key"]: r for r in validation["events"]}
    assert (events["c-sizes"]["bid_size"], events["c-sizes"]["ask_size"]) == (1.5, 0.0)
    assert events["c-book"]["type"] == "book"
    assert (events["c-book"]["bids"], events["c-book"]["asks"]) == (BOOK["bids"], BOOK["asks"])
    assert events["c-2099"]["ts"] == 4_102_444_799_999
    assert events["c-2009"]["ts"] == 1_230_768_000_000
    assert "c-book" not in {r["dedupe_key"] for r in validation["valid"]}  # a book, no quote


# --- trades ------------------------------------------------------------------------------------


def test_real_trades_parse_and_bad_ones_are_dead_lettered(spark: SparkSession,
                                                          data_dir: Path) -> None:
    from itertools import islice

    from arbstream.schemas import Trade
    from producers.binance_replay import binance_files, read_binance_file

    file = binance_files(data_dir, ["BTC-USDT"], ["spot"])[0]
    trades = list(islice((r for r in read_binance_file(file, trades=True)
                          if isinstance(r, Trade)), 300))
    topic = f"md.{file.exchange}.trades"
    good = json.loads(trades[0].to_json())

    def tbad(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    cases: list[tuple[str, bytes | None, str]] = [
        (topic, tbad(type="quote"), "type must be 'trade'"),
        (topic, tbad(price=0.0), "price missing or not a positive number"),
        (topic, tbad(size="NaN"), "size missing or not a positive number"),
        (topic, tbad(side="long"), "side must be 'buy', 'sell' or null"),
        (topic, tbad(trade_id=""), "trade_id missing"),
        (topic, tbad(symbol="btcusdt"), "symbol missing or not canonical BASE-QUOTE"),
        ("md.kraken.trades", tbad(), f"exchange '{file.exchange}' does not match topic "
                                     "md.kraken.trades"),
        (topic, tbad(exchange_ts=-5), "exchange_ts missing or not a positive number"),
        (topic, tbad(exchange_ts=FAR_MS), f"{OUT_OF_RANGE}exchange_ts {FAR_MS} ms is outside "
                                          "2009-01-01..2100-01-01"),
        (topic, tbad(dedupe_key="t\r\nx"), CONTROL),
        (topic, b'{"type": "trade"', "malformed JSON"),
    ]
    raw = raw_frame(spark, [(topic, t.to_json()) for t in trades] + [(t, v) for t, v, _ in cases])
    parsed = parse_trades(raw)
    rows = sorted(collect(parsed), key=lambda r: r["offset"])
    assert [r["error"] for r in rows] == [None] * len(trades) + [r for _, _, r in cases]
    valid = sorted(collect(valid_trades(parsed)), key=lambda r: r["dedupe_key"])
    want = sorted(({**t.model_dump(exclude={"schema_version", "type"}), "ts": t.exchange_ts}
                   for t in trades), key=lambda r: r["dedupe_key"])
    assert valid == want
    assert {r["side"] for r in valid} == {"buy", "sell"}
    letters = [DeadLetter.model_validate_json(r["value"]) for r in collect(dead_letters(parsed))]
    assert sorted(x.reason for x in letters) == sorted(r for _, _, r in cases)
