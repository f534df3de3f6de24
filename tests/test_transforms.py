"""Spark transforms on static DataFrames: hand-computed spreads, staleness bounds, validation,
dead letters, and an exact comparison with the independent pandas reference (tests/reference.py).

Only the shared ``spark`` fixture is used (no services). Cases are batched into a few
DataFrames (one symbol per scenario so they cannot interact) to keep the number of Spark jobs
small.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import TimestampType
from reference import OUTPUT_COLUMNS, reference_opportunities, reference_spreads

from arbstream.fees import DEFAULT_TAKER_FEES
from arbstream.schemas import DeadLetter, Heartbeat, Quote
from arbstream.topics import quotes_topic
from producers.replay import load_iaqf_quotes
from spark_jobs.transforms import (
    dead_letters,
    dedupe,
    opportunities,
    pairs,
    parse_quotes,
    parse_trades,
    snapshots,
    spread_stream,
    spreads,
    valid_events,
    valid_quotes,
    valid_trades,
)

RAW_SCHEMA = "key binary, value binary, topic string, partition int, offset long"
FEES = {"coinbase": 0.006, "kraken": 0.0026, "binance": 0.001}
W, AGE, WATERMARK = 1.0, 5.0, 10.0
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z: a whole second (and a multiple of 5 s)
REL = 1e-12


def approx(value: float) -> Any:
    return pytest.approx(value, rel=REL, abs=0)


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
    """Rows as dicts with every timestamp column as integer UTC ms (checked to be whole ms);
    ``event_time`` (exchange time - 1 µs) is dropped."""
    df = df.drop("event_time")
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


def flat_snapshots(snap: DataFrame) -> DataFrame:
    return snap.select(
        "symbol", "exchange", F.col("window.start").alias("window_start"),
        F.col("window.end").alias("window_end"), "bid", "ask", "quote_ts",
    )


def by_window(rows: list[dict[str, Any]], symbol: str) -> dict[int, dict[tuple[str, str], dict]]:
    """Spread rows of one symbol: {window_end: {(buy, sell): row}}."""
    out: dict[int, dict[tuple[str, str], dict]] = {}
    for r in rows:
        if r["symbol"] == symbol:
            out.setdefault(r["window_end"], {})[(r["buy_exchange"], r["sell_exchange"])] = r
    return out


def snap_of(rows: list[dict[str, Any]], symbol: str) -> dict[int, dict[str, dict]]:
    """Snapshot rows of one symbol: {window_end: {exchange: row}}."""
    out: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r["symbol"] == symbol:
            out.setdefault(r["window_end"], {})[r["exchange"]] = r
    return out


# --- hand-computed scenario: one symbol per case, one DataFrame -------------------------------

E_STALE = T0 + 10_000  # staleness case (XRP-USD)
E_LATEST = T0 + 20_000  # latest-wins case (LTC-USD)

SCENARIO: list[Record] = [
    # BTC-USD, fees both directions: coinbase bid 99 / ask 100, kraken bid 101 / ask 102.
    quote("coinbase", "BTC-USD", T0, 99.0, 100.0),
    quote("kraken", "BTC-USD", T0, 101.0, 102.0),
    # ETH-USD, binance + kraken: binance 1999 / 2000, kraken 2010 / 2011.
    quote("binance", "ETH-USD", T0, 1999.0, 2000.0),
    quote("kraken", "ETH-USD", T0, 2010.0, 2011.0),
    # SOL-USD, gross-positive but net-negative: coinbase 99.9 / 100, kraken 100.5 / 100.6.
    quote("coinbase", "SOL-USD", T0, 99.9, 100.0),
    quote("kraken", "SOL-USD", T0, 100.5, 100.6),
    # XRP-USD, staleness around E = E_STALE (age 5 s):
    quote("coinbase", "XRP-USD", E_STALE - 5000, 0.50, 0.51),  # exactly E - age: not in E
    quote("kraken", "XRP-USD", E_STALE - 4999, 0.52, 0.53),  # E - age + 1 ms: in E
    quote("binance", "XRP-USD", E_STALE, 0.54, 0.55),  # exactly E: in E
    quote("binance", "XRP-USD", E_STALE + 1, 0.56, 0.57),  # E + 1 ms: later windows only
    # LTC-USD, latest wins, ties by received_ts then dedupe_key (delivery order shuffled).
    quote("coinbase", "LTC-USD", E_LATEST - 1000, 12.0, 12.1, E_LATEST - 500, "ltc-cb-3"),
    quote("coinbase", "LTC-USD", E_LATEST - 3000, 10.0, 10.1, E_LATEST - 3000, "ltc-cb-1"),
    quote("kraken", "LTC-USD", E_LATEST - 1000, 14.0, 14.1, E_LATEST - 1000, "ltc-kr-b"),
    quote("coinbase", "LTC-USD", E_LATEST - 1000, 11.0, 11.1, E_LATEST - 900, "ltc-cb-2"),
    quote("kraken", "LTC-USD", E_LATEST - 1000, 13.0, 13.1, E_LATEST - 1000, "ltc-kr-a"),
    quote("coinbase", "LTC-USD", E_LATEST - 2000, 9.0, 9.1, E_LATEST, "ltc-cb-4"),  # late arrival
    # DOGE-USD, one exchange at t = 1000 ms: window membership, no pairs.
    quote("kraken", "DOGE-USD", 1000, 0.1, 0.2),
    # ADA-USD, the same update delivered twice (identical bytes, two offsets).
    quote("coinbase", "ADA-USD", T0, 0.30, 0.31, key="ada-dup"),
    quote("kraken", "ADA-USD", T0 + 500, 0.32, 0.33, key="ada-kr"),
    quote("coinbase", "ADA-USD", T0, 0.30, 0.31, key="ada-dup"),
    # A heartbeat carries only event time: valid, but never part of a snapshot.
    ("md.kraken.quotes",
     Heartbeat(exchange="kraken", exchange_ts=T0 + 500, received_ts=T0).to_json()),
]


@pytest.fixture(scope="module")
def scenario(spark: SparkSession) -> dict[str, Any]:
    raw = raw_frame(spark, SCENARIO)
    parsed = parse_quotes(raw, FEES)
    deduped = dedupe(valid_quotes(parsed), WATERMARK)
    snap = snapshots(deduped, W, AGE)
    spread_rows = spreads(pairs(snap, W, FEES), FEES)
    return {
        "dedupe": collect(deduped),
        "snap": collect(flat_snapshots(snap)),
        "snap_columns": snap.columns,
        "spreads": collect(spread_rows),
        "spread_columns": spread_rows.columns,
        "opps": collect(opportunities(spread_rows, 0.0)),
        "stream": collect(spread_stream(raw, FEES, WATERMARK, W, AGE)
                          .where(F.col("kind") == "pair").select(*spread_rows.columns)),
    }


def test_fee_table_matches_literals() -> None:
    # The literals below are the published taker fees of arbstream.fees.
    assert {k: DEFAULT_TAKER_FEES[k] for k in FEES} == FEES


def test_output_columns(scenario: dict[str, Any]) -> None:
    assert scenario["snap_columns"] == [
        "symbol", "exchange", "window", "bid", "ask", "bid_size", "ask_size", "quote_ts",
        "messages", "latency_ms", "book_bids", "book_asks",
    ]
    assert set(OUTPUT_COLUMNS) <= set(scenario["spread_columns"])


def test_spread_stream_equals_the_explicit_chain(scenario: dict[str, Any]) -> None:
    def key(r: dict[str, Any]) -> str:
        return r["opportunity_id"]

    assert sorted(scenario["stream"], key=key) == sorted(scenario["spreads"], key=key)


def test_coinbase_kraken_both_directions(scenario: dict[str, Any]) -> None:
    windows = by_window(scenario["spreads"], "BTC-USD")
    # A quote at T0 is fresh in the windows ending T0, T0+1 s, ..., T0+4 s.
    assert sorted(windows) == [T0 + k * 1000 for k in range(5)]
    for end, rows in windows.items():
        assert set(rows) == {("coinbase", "kraken"), ("kraken", "coinbase")}
        up = rows[("coinbase", "kraken")]
        # buy coinbase at ask 100, sell kraken at bid 101: gross = 101/100 - 1 = 0.01
        # net = 0.01 - 0.006 - 0.0026 = 0.0014; bps: 0.01*1e4 = 100, 0.0014*1e4 = 14
        assert (up["buy_ask"], up["sell_bid"]) == (100.0, 101.0)
        assert (up["buy_fee"], up["sell_fee"]) == (0.006, 0.0026)
        assert up["gross"] == approx(0.01)
        assert up["net"] == approx(0.0014)
        assert up["gross_bps"] == approx(100.0)
        assert up["net_bps"] == approx(14.0)
        assert (up["buy_ts"], up["sell_ts"]) == (T0, T0)
        assert (up["window_start"], up["window_end"]) == (end - 5000, end)
        down = rows[("kraken", "coinbase")]
        # buy kraken at ask 102, sell coinbase at bid 99: gross = 99/102 - 1 = -1/34
        #   = -0.029411764705882353; net = gross - 0.0026 - 0.006 = -0.038011764705882353
        assert (down["buy_ask"], down["sell_bid"]) == (102.0, 99.0)
        assert (down["buy_fee"], down["sell_fee"]) == (0.0026, 0.006)
        assert down["gross"] == approx(-0.029411764705882353)
        assert down["net"] == approx(-0.038011764705882353)
        assert down["gross_bps"] == approx(-294.11764705882353)
        assert down["net_bps"] == approx(-380.11764705882353)


def test_binance_kraken(scenario: dict[str, Any]) -> None:
    windows = by_window(scenario["spreads"], "ETH-USD")
    assert sorted(windows) == [T0 + k * 1000 for k in range(5)]
    rows = windows[T0]
    up = rows[("binance", "kraken")]
    # buy binance at 2000, sell kraken at 2010: gross = 2010/2000 - 1 = 0.005
    # net = 0.005 - 0.001 - 0.0026 = 0.0014; 50 bps gross, 14 bps net
    assert (up["buy_fee"], up["sell_fee"]) == (0.001, 0.0026)
    assert up["gross"] == approx(0.005)
    assert up["net"] == approx(0.0014)
    assert up["gross_bps"] == approx(50.0)
    assert up["net_bps"] == approx(14.0)
    down = rows[("kraken", "binance")]
    # buy kraken at 2011, sell binance at 1999: gross = 1999/2011 - 1 = -12/2011
    #   = -0.0059671805072103431; net = gross - 0.0026 - 0.001 = -0.0095671805072103431
    assert down["gross"] == approx(-0.0059671805072103431)
    assert down["net"] == approx(-0.0095671805072103431)
    assert down["gross_bps"] == approx(-59.671805072103431)
    assert down["net_bps"] == approx(-95.671805072103431)


def test_gross_positive_net_negative_is_no_opportunity(scenario: dict[str, Any]) -> None:
    rows = by_window(scenario["spreads"], "SOL-USD")[T0]
    up = rows[("coinbase", "kraken")]
    # buy coinbase at 100, sell kraken at 100.5: gross = 0.005 > 0 (50 bps)
    # but net = 0.005 - 0.006 - 0.0026 = -0.0036 (-36 bps)
    assert up["gross"] == approx(0.005)
    assert up["net"] == approx(-0.0036)
    assert up["net_bps"] == approx(-36.0)
    down = rows[("kraken", "coinbase")]
    # buy kraken at 100.6, sell coinbase at 99.9: gross = 99.9/100.6 - 1 = -7/1006
    assert down["gross"] == approx(-0.0069582504970178926)
    assert down["net"] == approx(-0.0155582504970178926)
    assert not [r for r in scenario["opps"] if r["symbol"] == "SOL-USD"]


def test_opportunities_of_scenario(scenario: dict[str, Any]) -> None:
    got = {(r["symbol"], r["window_end"], r["buy_exchange"], r["sell_exchange"])
           for r in scenario["opps"]}
    want = {(r["symbol"], r["window_end"], r["buy_exchange"], r["sell_exchange"])
            for r in scenario["spreads"] if r["net"] > 0}
    assert got == want
    assert all(r["net"] > 0 for r in scenario["opps"])
    # BTC-USD and ETH-USD: only the profitable direction (net 0.0014), in each of 5 windows.
    for symbol, buy, sell in [("BTC-USD", "coinbase", "kraken"), ("ETH-USD", "binance", "kraken")]:
        mine = [r for r in scenario["opps"] if r["symbol"] == symbol]
        assert {(r["buy_exchange"], r["sell_exchange"]) for r in mine} == {(buy, sell)}
        assert sorted(r["window_end"] for r in mine) == [T0 + k * 1000 for k in range(5)]


def test_staleness_bounds(scenario: dict[str, Any]) -> None:
    e = E_STALE
    snap = snap_of(scenario["snap"], "XRP-USD")
    # Window (e - 5 s, e]: coinbase at e - 5000 is out, kraken at e - 4999 and binance at e in.
    assert set(snap[e]) == {"kraken", "binance"}
    assert snap[e]["kraken"]["quote_ts"] == e - 4999
    assert snap[e]["binance"]["quote_ts"] == e
    # coinbase at e - 5000 is fresh in the windows ending e - 5 s .. e - 1 s only.
    assert sorted(w for w, s in snap.items() if "coinbase" in s) == [
        e - 5000, e - 4000, e - 3000, e - 2000, e - 1000]
    # kraken at e - 4999: windows ending e - 4 s .. e.
    assert sorted(w for w, s in snap.items() if "kraken" in s) == [
        e - 4000, e - 3000, e - 2000, e - 1000, e]
    # binance at e + 1 ms belongs to windows ending e + 1 s .. e + 5 s, where it is the latest.
    assert sorted(w for w, s in snap.items() if "binance" in s) == [e + k * 1000 for k in range(6)]
    assert {w: s["binance"]["quote_ts"] for w, s in snap.items() if "binance" in s} == {
        e: e, e + 1000: e + 1, e + 2000: e + 1, e + 3000: e + 1, e + 4000: e + 1, e + 5000: e + 1}
    assert snap[e + 1000]["binance"]["bid"] == 0.56
    # Pairs: coinbase+kraken in windows e - 4 s .. e - 1 s, kraken+binance in e, none after
    # (binance alone) and none at e - 5 s (coinbase alone).
    windows = by_window(scenario["spreads"], "XRP-USD")
    assert sorted(windows) == [e - 4000, e - 3000, e - 2000, e - 1000, e]
    assert set(windows[e]) == {("kraken", "binance"), ("binance", "kraken")}
    row = windows[e][("kraken", "binance")]
    assert (row["buy_ts"], row["sell_ts"], row["buy_ask"], row["sell_bid"]) == (
        e - 4999, e, 0.53, 0.54)
    assert set(windows[e - 1000]) == {("coinbase", "kraken"), ("kraken", "coinbase")}


def test_latest_quote_per_exchange_wins(scenario: dict[str, Any]) -> None:
    e = E_LATEST
    snap = snap_of(scenario["snap"], "LTC-USD")
    # In (e - 5 s, e]: coinbase quotes at e-3000, e-2000 and two at e-1000 (received e-900 and
    # e-500): the latest exchange_ts wins, then the latest received_ts -> bid 12.0.
    assert (snap[e]["coinbase"]["bid"], snap[e]["coinbase"]["quote_ts"]) == (12.0, e - 1000)
    # kraken: two quotes with the same exchange_ts and received_ts -> the greater dedupe_key
    # ("ltc-kr-b" > "ltc-kr-a") -> bid 14.0.
    assert snap[e]["kraken"]["bid"] == 14.0
    # Window ending e - 2 s holds coinbase at e-3000 and e-2000 (received last, at e): the one
    # with the later exchange_ts wins even though it arrived last -> bid 9.0.
    assert snap[e - 2000]["coinbase"]["bid"] == 9.0
    assert snap[e - 3000]["coinbase"]["bid"] == 10.0
    row = by_window(scenario["spreads"], "LTC-USD")[e][("coinbase", "kraken")]
    # buy coinbase at 12.1, sell kraken at 14.0: gross = 14/12.1 - 1 = 19/121
    #   = 0.15702479338842975; net = gross - 0.0086 = 0.14842479338842975
    assert (row["buy_ask"], row["sell_bid"]) == (12.1, 14.0)
    assert row["gross"] == approx(0.15702479338842975)
    assert row["net"] == approx(0.14842479338842975)


def test_window_membership_of_one_quote(scenario: dict[str, Any]) -> None:
    # A quote at t = 1000 ms (1970-01-01T00:00:01Z), W = 1 s, age 5 s: fresh in the windows
    # ending 1, 2, 3, 4 and 5 s, each starting 5 s earlier.
    snap = [r for r in scenario["snap"] if r["symbol"] == "DOGE-USD"]
    assert sorted((r["window_start"], r["window_end"]) for r in snap) == [
        (-4000, 1000), (-3000, 2000), (-2000, 3000), (-1000, 4000), (0, 5000)]
    assert {r["quote_ts"] for r in snap} == {1000}
    # One exchange: no pairs.
    assert not [r for r in scenario["spreads"] if r["symbol"] == "DOGE-USD"]


def test_windows_end_on_whole_seconds(scenario: dict[str, Any]) -> None:
    for r in scenario["spreads"] + scenario["snap"]:
        assert r["window_end"] % 1000 == 0
        assert r["window_end"] - r["window_start"] == 5000


def test_dedupe(scenario: dict[str, Any]) -> None:
    keys = [r["dedupe_key"] for r in scenario["dedupe"]]
    assert keys.count("ada-dup") == 1
    assert len(keys) == len(set(keys)) == len(SCENARIO) - 2  # minus the copy and the heartbeat
    snap = snap_of(scenario["snap"], "ADA-USD")
    assert set(snap[T0]) == {"coinbase"}
    assert set(snap[T0 + 1000]) == {"coinbase", "kraken"}
    assert len(by_window(scenario["spreads"], "ADA-USD")[T0 + 1000]) == 2


def test_dedupe_event_time(spark: SparkSession) -> None:
    raw = raw_frame(spark, [quote("kraken", "BTC-USD", T0, 1.0, 2.0)])
    row = dedupe(valid_quotes(parse_quotes(raw, FEES)), WATERMARK).select(
        F.unix_micros("ts").alias("ts"), F.unix_micros("event_time").alias("et")).first()
    assert row is not None
    assert (row["ts"], row["et"]) == (T0 * 1000, T0 * 1000 - 1)


def test_opportunity_id_format(scenario: dict[str, Any]) -> None:
    row = by_window(scenario["spreads"], "BTC-USD")[T0][("coinbase", "kraken")]
    assert row["opportunity_id"] == "BTC-USD|2023-11-14T22:13:20.000Z|coinbase|kraken"
    # symbol|window_end (ISO-8601 UTC, ms)|buy|sell, unique per row
    ids = [r["opportunity_id"] for r in scenario["spreads"]]
    assert len(ids) == len(set(ids))
    row = by_window(scenario["spreads"], "XRP-USD")[E_STALE - 4000][("kraken", "coinbase")]
    assert row["opportunity_id"] == "XRP-USD|2023-11-14T22:13:26.000Z|kraken|coinbase"


# --- spreads() and opportunities() on hand-made pair rows -------------------------------------


def test_spreads_bps_and_id(spark: SparkSession) -> None:
    end = datetime(2023, 3, 11, 4, 5, 0, 250_000, tzinfo=UTC)
    start = datetime(2023, 3, 11, 4, 4, 55, 250_000, tzinfo=UTC)
    pair_rows = spark.createDataFrame(
        [("BTC-USD", start, end, "kraken", 100.0, start, "binance", 100.25, end),
         ("BTC-USD", start, end, "binance", 80.0, start, "kraken", 79.0, end)],
        "symbol string, window_start timestamp, window_end timestamp, buy_exchange string, "
        "buy_ask double, buy_ts timestamp, sell_exchange string, sell_bid double, "
        "sell_ts timestamp",
    ).select(
        "*", F.col("symbol").alias("sell_symbol"), F.lit(False).alias("cross_quote"),
        *[F.lit(None).cast("double").alias(c) for c in (
            "conversion_rate", "conversion_fee", "buy_ask_size", "sell_bid_size")],
        F.lit(1.0).alias("usd_rate"),
    )
    rows = {r["buy_exchange"]: r for r in collect(spreads(pair_rows, FEES))}
    a = rows["kraken"]
    # gross = 100.25/100 - 1 = 0.0025 = 25 bps; net = 0.0025 - 0.0026 - 0.001 = -0.0011 = -11 bps
    assert a["gross"] == approx(0.0025)
    assert a["gross_bps"] == approx(25.0)
    assert a["net"] == approx(-0.0011)
    assert a["net_bps"] == approx(-11.0)
    assert a["gross_bps"] == a["gross"] * 10_000.0 and a["net_bps"] == a["net"] * 10_000.0
    assert a["opportunity_id"] == "BTC-USD|2023-03-11T04:05:00.250Z|kraken|binance"
    b = rows["binance"]
    # gross = 79/80 - 1 = -0.0125 = -125 bps; net = -0.0125 - 0.001 - 0.0026 = -0.0161
    assert b["gross"] == approx(-0.0125)
    assert b["gross_bps"] == approx(-125.0)
    assert b["net"] == approx(-0.0161)
    assert b["net_bps"] == approx(-161.0)


def test_opportunities_threshold_is_strict(spark: SparkSession) -> None:
    above = float(np.nextafter(0.001, 1.0))
    below = float(np.nextafter(0.001, 0.0))
    rows = spark.createDataFrame(
        [("eq", 0.001), ("above", above), ("below", below), ("big", 0.01), ("neg", -0.5)],
        "opportunity_id string, net double",
    )
    got = {r["opportunity_id"] for r in opportunities(rows, 0.001).collect()}
    assert got == {"above", "big"}  # net == min_net is not an opportunity
    got0 = {r["opportunity_id"] for r in opportunities(rows, 0.0).collect()}
    assert got0 == {"eq", "above", "below", "big"}


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
# Records the stream should reject but (bug) accepts; see test_known_validation_gaps.
GAPS: list[tuple[str, bytes | None]] = [
    (KRAKEN, bad(ask="NaN", dedupe_key="gap-nan")),
    (KRAKEN, bad(bid="Infinity", ask="Infinity", dedupe_key="gap-inf")),
    (KRAKEN, bad(symbol="BTC-USD\n", dedupe_key="gap-newline")),
]


@pytest.fixture(scope="module")
def validation(spark: SparkSession) -> dict[str, Any]:
    raw = raw_frame(spark, [(t, v) for t, v, _ in VALIDATION] + GAPS)
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
    assert set(dead) == set(expected) | gaps
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
    gaps = validation["parsed"][len(VALIDATION):]
    assert len(gaps) == len(GAPS)
    assert all(r["error"] is not None for r in gaps), [(r["offset"], r["error"]) for r in gaps]


# --- exact comparison with the pandas reference -----------------------------------------------


def _none_for_nan(row: tuple) -> tuple:
    return tuple(None if isinstance(v, float) and v != v else v for v in row)


def spark_vs_reference(
    spark: SparkSession, quotes: list[Quote], order: list[int], fees: dict[str, float],
    haircut: float = 0.0,
) -> tuple[list[tuple], list[tuple], int]:
    """(Spark rows, reference rows, opportunities count) with timestamps as UTC µs."""
    raw = raw_frame(spark, [quotes[i] for i in order])
    stream = spread_stream(raw, fees, WATERMARK, W, AGE, haircut=haircut).where(
        F.col("kind") == "pair")
    ts_cols = ["window_start", "window_end", "buy_ts", "sell_ts"]
    sel = [F.unix_micros(c).alias(c) if c in ts_cols else F.col(c) for c in OUTPUT_COLUMNS]
    got = sorted(_none_for_nan(tuple(r)) for r in stream.select(*sel).collect())
    frame = pd.DataFrame([q.model_dump() for q in (quotes[i] for i in order)])
    ref = reference_spreads(frame, fees, W, AGE, haircut)
    for c in ts_cols:
        ref[c] = (ref[c] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)
    want = sorted(_none_for_nan(tuple(r)) for r in ref[OUTPUT_COLUMNS].itertuples(index=False))
    ref_opps = reference_opportunities(frame, fees, W, AGE, min_net=0.0, haircut=haircut)
    n_opps = opportunities(stream, 0.0).count()
    assert n_opps == len(ref_opps)
    return got, want, n_opps


def test_random_quotes_match_reference(spark: SparkSession) -> None:
    rng = np.random.default_rng(20230311)
    base = 1_678_500_000_000  # 2023-03-11T02:00:00Z
    exchanges = ["coinbase", "kraken", "binance"]
    symbols = ["BTC-USD", "ETH-USD", "BTC-USDT", "USDT-USD"]
    n = 300
    ts = base + rng.integers(0, 30_000, n)
    ts[:60] = base + rng.integers(0, 30, 60) * 1000  # on window ends
    ts[60:100] = base + rng.integers(1, 30, 40) * 1000 + rng.choice([-1, 1], 40)  # around them
    ts[100:160] = base + rng.integers(0, 120, 60) * 250  # coarse grid: exchange_ts ties
    quotes = []
    for i in range(n):
        ex, sym = exchanges[rng.integers(3)], symbols[rng.integers(4)]
        if sym == "USDT-USD" and ex == "binance":  # two USDT-USD venues: an exact mean
            ex = "kraken"
        level = {"BTC-USD": 100.0, "ETH-USD": 7.0, "BTC-USDT": 100.3, "USDT-USD": 0.998}[sym]
        mid = level * float(np.exp(rng.normal(0, 0.004)))
        half = mid * float(rng.uniform(0, 0.001)) if i % 7 else 0.0  # some bid == ask
        bid, ask = mid - half, mid + half
        if i % 3 == 0:
            bid, ask = round(bid, 2), round(ask, 2)
        received = int(ts[i]) + int(rng.integers(0, 3))  # received_ts ties too
        quotes.append(quote(ex, sym, int(ts[i]), bid, ask, received, f"{ex}:{sym}:q:{i}"))
    dups = rng.choice(n, 40, replace=False)
    order = [*range(n), *dups.tolist()]  # 40 re-deliveries of identical records
    order = rng.permutation(order).tolist()
    got, want, n_opps = spark_vs_reference(spark, quotes, order, FEES, haircut=2e-4)
    assert len(want) > 300 and n_opps > 0
    assert any(r[OUTPUT_COLUMNS.index("cross_quote")] for r in want)
    assert got == want


def test_real_iaqf_slice_matches_reference(spark: SparkSession, data_dir: Path) -> None:
    bars = load_iaqf_quotes(
        data_dir, datetime(2023, 3, 11, 4, 0, tzinfo=UTC), datetime(2023, 3, 11, 5, 0, tzinfo=UTC)
    )
    assert len(bars) > 300
    quotes = [
        quote(r.exchange, r.symbol, int(r.exchange_ts), float(r.bid), float(r.ask))
        for r in bars.itertuples(index=False)
    ]
    fees = dict(DEFAULT_TAKER_FEES)
    got, want, _ = spark_vs_reference(spark, quotes, list(range(len(quotes))), fees, 2e-4)
    assert len(want) > 1000
    assert sum(r[OUTPUT_COLUMNS.index("cross_quote")] for r in want) > 1000
    assert got == want


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
