"""The spread semantics through the stream engine (:class:`spark_jobs.engine.Engine`, pure
Python, no Spark, no services): hand-computed spreads, staleness bounds, latest-quote ties,
dedupe, ids, cross-quote conversion, the opportunity threshold, and an exact comparison with
the independent pandas reference (tests/reference.py).

These are the scenarios (and assertions) that pinned down the former Spark chain
(``snapshots → pairs → spreads``), checked on the engine's final ``spread`` and ``opportunity``
records. Snapshots are the ones the engine finalizes (recorded by :class:`Recorder`), and
the ``feature`` records must follow them.

Helpers here (:func:`engine_frame`, :func:`quotes_frame`, :func:`run`, :func:`config`) are also
used by ``tests/test_tracker.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from arbstream.fees import DEFAULT_TAKER_FEES
from arbstream.schemas import Book, Heartbeat, Quote
from arbstream.timestamps import from_ms, to_ms
from producers.replay.iaqf import load_iaqf_quotes
from spark_jobs import tracker
from spark_jobs.engine import INPUT_COLUMNS, Engine, EngineConfig
from testing.reference import OUTPUT_COLUMNS, reference_opportunities, reference_spreads
from tests.spark_jobs.test_decode import quote

FEES = {"coinbase": 0.006, "kraken": 0.0026, "binance": 0.001}
W, AGE = 1000, 5000  # window width and staleness bound, ms
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z: a whole second (and a multiple of 5 s)
REL = 1e-12
USD_QUOTES = ("USD", "USDT", "USDC")


def approx(value: float) -> Any:
    return pytest.approx(value, rel=REL, abs=0)


# --- driving the engine ----------------------------------------------------------------------


def config(
    fees: dict[str, float] = FEES, *, haircut: float = 0.0, min_net: float = 0.0,
    window_ms: int = W, notional_usd: float = 10_000.0,
) -> EngineConfig:
    """Engine parameters: W = 1 s, age 5 s, watermark 10 s, idle 5 s, skew 10 s, jump 900 s."""
    return EngineConfig(
        tracker=tracker.TrackerConfig(min_net=min_net, window_ms=window_ms, age_ms=AGE,
                                      gap_ms=10_000, horizon_ms=300_000, sigma=3.0,
                                      notional_usd=notional_usd),
        fees=dict(fees), usd_quotes=USD_QUOTES, watermark_ms=10_000, idle_ms=5_000,
        max_skew_ms=10_000, max_jump_ms=900_000, haircut=haircut,
    )


def _with_hash(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``dedupe_hash`` (a 64-bit hash of ``dedupe_key``) and order the columns."""
    frame["dedupe_hash"] = pd.util.hash_pandas_object(
        frame["dedupe_key"], index=False).to_numpy().view(np.int64)
    return frame[INPUT_COLUMNS]


Item = Quote | Book | Heartbeat | dict[str, Any]


def engine_frame(items: Iterable[Item]) -> pd.DataFrame:
    """Valid records (models, or dicts of their fields for inputs the models would refuse) as
    the engine's input: ``kind`` = the record type, on the exchange's topic, partition 0,
    offsets 0, 1, 2, ... in order, every record in its home bucket."""
    rows = []
    for offset, item in enumerate(items):
        d = item if isinstance(item, dict) else item.model_dump()
        kind = d.get("type", "quote")
        rows.append({
            "kind": kind, "exchange": d["exchange"], "symbol": d.get("symbol"),
            "bid": d.get("bid"), "ask": d.get("ask"), "bid_size": d.get("bid_size"),
            "ask_size": d.get("ask_size"), "exchange_ts": d["exchange_ts"],
            "received_ts": d["received_ts"], "dedupe_key": d["dedupe_key"],
            "bids": d.get("bids"), "asks": d.get("asks"), "error": None, "value": None,
            "topic": f"md.{d['exchange']}.{'book' if kind == 'book' else 'quotes'}",
            "partition": 0, "offset": offset, "home": True,
        })
    return _with_hash(pd.DataFrame(rows))


def quotes_frame(quotes: pd.DataFrame) -> pd.DataFrame:
    """A quote frame (``exchange, symbol, exchange_ts, received_ts, bid, ask, bid_size,
    ask_size, dedupe_key``; NaN sizes = unknown) as the engine's input, vectorised."""
    frame = quotes.reset_index(drop=True).copy()
    frame["kind"] = "quote"
    for name in ("bid_size", "ask_size"):
        frame[name] = frame[name].astype(object).where(frame[name].notna(), None)
    for name in ("bids", "asks", "error", "value"):
        frame[name] = None
    frame["topic"] = "md." + frame["exchange"] + ".quotes"
    frame["partition"] = 0
    frame["offset"] = np.arange(len(frame), dtype=np.int64)
    frame["home"] = True
    return _with_hash(frame)


def run(frame: pd.DataFrame, cfg: EngineConfig, chunks: int = 1,
        engine: Engine | None = None) -> list[dict[str, Any]]:
    """Every record of one engine fed ``frame`` in ``chunks`` consecutive micro-batches (100 ms
    of processing time apart), then an empty batch once every exchange is idle, so every
    window closes."""
    engine = Engine() if engine is None else engine
    now = int(frame["received_ts"].max()) + 1
    out: list[dict[str, Any]] = []
    for idx in np.array_split(np.arange(len(frame)), chunks):
        out += engine.process(frame.iloc[idx], now, cfg)
        now += 100
    out += engine.process(frame.iloc[:0], now + cfg.idle_ms + 1, cfg)
    return out


@dataclass
class Recorder(Engine):
    """An engine that keeps every snapshot it finalizes: ``{window_end_ms: snapshot}``."""

    snaps: dict[int, dict] = field(default_factory=dict)

    def snapshot(self, e: int, cfg: EngineConfig, by_k: dict | None = None
                 ) -> dict[tuple[str, str], dict]:
        snap = super().snapshot(e, cfg, by_k)
        if e <= self.watermark:  # finalization (early firing only looks past the watermark)
            self.snaps[e] = snap
        return snap


def of(records: list[dict[str, Any]], kind: str, stage: str | None = None
       ) -> list[dict[str, Any]]:
    return [r for r in records if r["record"] == kind and (stage is None or r["stage"] == stage)]


def ms_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with every timestamp (``datetime``, or ``pd.Timestamp``) as integer UTC ms
    (checked to be aware and whole ms)."""
    out = []
    for r in records:
        d = dict(r)
        for k, v in d.items():
            if isinstance(v, datetime):  # pd.Timestamp is a datetime too
                ms = to_ms(v)
                assert v.tzinfo is not None and v == from_ms(ms), (k, d)
                d[k] = ms
        out.append(d)
    return out


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


# --- hand-computed scenario: one symbol per case -----------------------------------------------

E_STALE = T0 + 10_000  # staleness case (XRP-USD)
E_LATEST = T0 + 20_000  # latest-wins case (LTC-USD)
E_CROSS = T0 + 30_000  # cross-quote case (ETC-USD / ETC-USDT through USDT-USD)

SCENARIO: list[Quote | Heartbeat] = [
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
    # ETC: bought as ETC-USDT on binance, sold as ETC-USD on coinbase (and the reverse); the
    # USD proceeds become USDT on one of two USDT-USD markets, the USDT ones USD likewise.
    quote("binance", "ETC-USDT", E_CROSS, 19.9, 20.0),
    quote("coinbase", "ETC-USD", E_CROSS, 20.3, 20.4),
    quote("kraken", "USDT-USD", E_CROSS, 0.9990, 1.0010),
    quote("coinbase", "USDT-USD", E_CROSS, 0.9995, 1.0005),
    # A heartbeat carries only event time: valid, but never part of a snapshot.
    Heartbeat(exchange="kraken", exchange_ts=T0 + 500, received_ts=T0),
]


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    # The DOGE-USD quote is 53 years older than the rest: in one engine, everything after it
    # would be a future_timestamp (event time jumping ahead of every clock), a guard of the
    # stream, not of the spread semantics. Each era runs through its own engine.
    eras = [[i for i in SCENARIO if i.exchange_ts >= T0 - 3_600_000],
            [i for i in SCENARIO if i.exchange_ts < T0 - 3_600_000]]
    records: list[dict[str, Any]] = []
    snaps: list[dict[str, Any]] = []
    for items in eras:
        engine = Recorder()
        records += run(engine_frame(items), config(), engine=engine)
        snaps += [{**leg, "window_start": e - AGE, "window_end": e}
                  for e, snap in engine.snaps.items() for leg in snap.values()]
    return {
        "records": records,
        "snap": snaps,
        "spreads": ms_rows(of(records, "spread")),
        "opps": ms_rows(of(records, "opportunity", "final")),
        "early": ms_rows(of(records, "opportunity", "early")),
        "features": ms_rows(of(records, "feature")),
    }


def test_fee_table_matches_literals() -> None:
    # The literals below are the published taker fees of arbstream.fees.
    assert {k: DEFAULT_TAKER_FEES[k] for k in FEES} == FEES


def test_nothing_rejected(scenario: dict[str, Any]) -> None:
    assert not of(scenario["records"], "deadletter")
    assert not of(scenario["records"], "opportunity", "retracted")


def test_output_columns(scenario: dict[str, Any]) -> None:
    assert {k for r in scenario["snap"] for k in r} == {
        "symbol", "exchange", "window_start", "window_end", "bid", "ask", "bid_size",
        "ask_size", "quote_ts", "messages", "latency_ms", "book_bids", "book_asks",
    }
    for r in scenario["spreads"]:
        assert set(OUTPUT_COLUMNS) <= set(r) and set(tracker.SPREAD_FIELDS) <= set(r)


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
    assert not [r for r in scenario["opps"] + scenario["early"] if r["symbol"] == "SOL-USD"]


def test_opportunities_of_scenario(scenario: dict[str, Any]) -> None:
    # each final opportunity covers the windows valid_from .. valid_to of its pair; together
    # they are exactly the opportunity windows of the spread rows, each window once
    got = [(r["symbol"], e, r["buy_exchange"], r["sell_exchange"]) for r in scenario["opps"]
           for e in range(r["valid_from"], r["valid_to"] + W, W)]
    want = {(r["symbol"], r["window_end"], r["buy_exchange"], r["sell_exchange"])
            for r in scenario["spreads"] if r["net"] > 0}
    assert sorted(got) == sorted(want)
    assert all(r["windows"] == (r["valid_to"] - r["valid_from"]) // W + 1
               and r["valid_from"] == r["window_end"] for r in scenario["opps"])
    ids = [r["opportunity_id"] for r in scenario["opps"]]
    assert len(ids) == len(set(ids))  # one final version per opportunity
    assert all(r["net"] > 0 for r in scenario["opps"])
    assert {r["opportunity_id"] for r in scenario["early"]} <= set(ids)
    # BTC-USD and ETH-USD: only the profitable direction (net 0.0014), one snapshot that stays
    # fresh for 5 windows: one opportunity of 5 windows
    for symbol, buy, sell in [("BTC-USD", "coinbase", "kraken"), ("ETH-USD", "binance", "kraken")]:
        [mine] = [r for r in scenario["opps"] if r["symbol"] == symbol]
        assert (mine["buy_exchange"], mine["sell_exchange"]) == (buy, sell)
        assert (mine["valid_from"], mine["valid_to"], mine["windows"]) == (T0, T0 + 4000, 5)


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
    # ``quote`` records are the accepted (deduplicated) quotes
    quotes = of(scenario["records"], "quote")
    assert [(q["exchange"], q["symbol"]) for q in quotes].count(("coinbase", "ADA-USD")) == 1
    assert len(quotes) == len(SCENARIO) - 2  # minus the copy and the heartbeat
    stream = {r["exchange"]: r for r in of(scenario["records"], "stream")}
    assert stream["coinbase"].get("duplicates") == 1
    assert all("duplicates" not in r for e, r in stream.items() if e != "coinbase")
    snap = snap_of(scenario["snap"], "ADA-USD")
    assert set(snap[T0]) == {"coinbase"}
    assert set(snap[T0 + 1000]) == {"coinbase", "kraken"}
    assert len(by_window(scenario["spreads"], "ADA-USD")[T0 + 1000]) == 2


def test_opportunity_id_format(scenario: dict[str, Any]) -> None:
    row = by_window(scenario["spreads"], "BTC-USD")[T0][("coinbase", "kraken")]
    assert row["opportunity_id"] == "BTC-USD|2023-11-14T22:13:20.000Z|coinbase|kraken"
    # symbol|window_end (ISO-8601 UTC, ms)|buy|sell, unique per row
    ids = [r["opportunity_id"] for r in scenario["spreads"]]
    assert len(ids) == len(set(ids))
    row = by_window(scenario["spreads"], "XRP-USD")[E_STALE - 4000][("kraken", "coinbase")]
    assert row["opportunity_id"] == "XRP-USD|2023-11-14T22:13:26.000Z|kraken|coinbase"


def test_cross_quote_conversion(scenario: dict[str, Any]) -> None:
    e = E_CROSS
    rows = {(r["symbol"], r["sell_symbol"], r["buy_exchange"], r["sell_exchange"]): r
            for r in scenario["spreads"] if r["window_end"] == e and r["cross_quote"]}
    assert set(rows) == {("ETC-USDT", "ETC-USD", "binance", "coinbase"),
                         ("ETC-USD", "ETC-USDT", "coinbase", "binance")}
    # Buy ETC-USDT on binance at 20.0 USDT, sell ETC-USD on coinbase at 20.3 USD; USD -> USDT
    # by buying USDT at a USDT-USD ask (rate 1/ask): kraken 1/1.001 * (1 - 0.0026) =
    # 0.99640... beats coinbase 1/1.0005 * (1 - 0.006) = 0.99350...
    up = rows[("ETC-USDT", "ETC-USD", "binance", "coinbase")]
    rate = 1.0 / 1.0010
    gross = 20.3 * rate / 20.0 - 1.0
    assert (up["conversion_symbol"], up["conversion_exchange"]) == ("USDT-USD", "kraken")
    assert up["conversion_rate"] == approx(rate) and up["conversion_fee"] == 0.0026
    assert up["gross"] == approx(gross)
    assert up["net"] == approx(gross - 0.001 - 0.006 - 0.0026)
    assert up["opportunity_id"] == (
        "ETC-USDT/ETC-USD|2023-11-14T22:13:50.000Z|binance|coinbase")
    # USD per USDT: the mean mid of the two USDT-USD markets, (1.0 + 1.0) / 2
    assert (up["profit_currency"], up["usd_rate"]) == ("USDT", approx(1.0))
    assert up["size_base"] == approx(10_000.0 / up["usd_rate"] / 20.0)
    # Reverse: buy ETC-USD on coinbase at 20.4, sell ETC-USDT on binance at 19.9; USDT -> USD
    # by selling USDT at a USDT-USD bid (rate = bid): kraken 0.999 * (1 - 0.0026) = 0.99640...
    # beats coinbase 0.9995 * (1 - 0.006) = 0.99350...
    down = rows[("ETC-USD", "ETC-USDT", "coinbase", "binance")]
    assert (down["conversion_exchange"], down["conversion_rate"]) == ("kraken", 0.999)
    gross = 19.9 * 0.999 / 20.4 - 1.0
    assert down["gross"] == approx(gross)
    assert down["net"] == approx(gross - 0.006 - 0.001 - 0.0026)
    assert (down["profit_currency"], down["usd_rate"]) == ("USD", 1.0)
    # No same-symbol pair of one exchange, no pair between the stablecoin market and ETC.
    assert not [r for r in scenario["spreads"]
                if r["buy_exchange"] == r["sell_exchange"] and not r["cross_quote"]]
    assert {(r["symbol"], r["sell_symbol"]) for r in scenario["spreads"]
            if r["window_end"] == e} == {("ETC-USDT", "ETC-USD"), ("ETC-USD", "ETC-USDT"),
                                        ("USDT-USD", "USDT-USD")}


def test_features_follow_the_snapshots(scenario: dict[str, Any]) -> None:
    features = {(f["symbol"], f["exchange"], f["window_end"]): f for f in scenario["features"]}
    assert len(features) == len(scenario["features"]) == len(scenario["snap"])
    for s in scenario["snap"]:
        f = features[(s["symbol"], s["exchange"], s["window_end"])]
        assert f["feature_id"].startswith(f"{s['symbol']}|{s['exchange']}|")
        assert f["mid"] == (s["bid"] + s["ask"]) / 2.0
        assert f["quote_age_s"] == (s["window_end"] - s["quote_ts"]) / 1000.0
        assert f["message_rate"] == s["messages"] / 5.0


# --- the arithmetic and the threshold on one pair --------------------------------------------


def test_spreads_bps_and_id() -> None:
    # W = 250 ms, so that a window ends at 04:05:00.250. Legs: kraken bid 79 / ask 100 and
    # binance bid 100.25 / ask 80 (crossed: the engine takes valid records, and these give
    # exactly the two hand-made pairs below).
    e = int(datetime(2023, 3, 11, 4, 5, 0, 250_000, tzinfo=UTC).timestamp() * 1000)
    legs = [{"exchange": "kraken", "symbol": "BTC-USD", "bid": 79.0, "ask": 100.0},
            {"exchange": "binance", "symbol": "BTC-USD", "bid": 100.25, "ask": 80.0}]
    items = [{**leg, "exchange_ts": e, "received_ts": e, "dedupe_key": leg["exchange"]}
             for leg in legs]
    out = ms_rows(of(run(engine_frame(items), config(window_ms=250)), "spread"))
    rows = {r["buy_exchange"]: r for r in out if r["window_end"] == e}
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


def test_opportunities_threshold_is_strict() -> None:
    frame = engine_frame(SCENARIO[:2])  # BTC-USD: coinbase -> kraken nets 0.0014
    up = ("coinbase", "kraken")

    def opportunities(min_net: float) -> tuple[set[bool], int, int]:
        out = run(frame, config(min_net=min_net))
        spreads = [r for r in of(out, "spread") if (r["buy_exchange"], r["sell_exchange"]) == up]
        assert len(spreads) == 5
        return ({r["is_opportunity"] for r in spreads}, len(of(out, "opportunity", "final")),
                len(of(out, "opportunity", "early")))

    net = next(r["net"] for r in of(run(frame, config()), "spread")
               if (r["buy_exchange"], r["sell_exchange"]) == up)
    assert net == approx(0.0014)
    assert opportunities(net) == ({False}, 0, 0)  # net == min_net is not an opportunity
    assert opportunities(float(np.nextafter(net, 1.0))) == ({False}, 0, 0)
    # 5 opportunity windows of one snapshot: one final opportunity (and one early)
    assert opportunities(float(np.nextafter(net, 0.0))) == ({True}, 1, 1)
    assert opportunities(0.0) == ({True}, 1, 1)


# --- exact comparison with the pandas reference -----------------------------------------------


def _none_for_nan(row: tuple) -> tuple:
    return tuple(None if isinstance(v, float) and v != v else v for v in row)


def engine_vs_reference(
    quotes: list[Quote], order: list[int], fees: dict[str, float], haircut: float = 0.0,
) -> tuple[list[tuple], list[tuple], int]:
    """(engine rows, reference rows, opportunities count) with timestamps as UTC ms."""
    items = [quotes[i] for i in order]
    out = run(engine_frame(items), config(fees, haircut=haircut))
    assert not of(out, "deadletter")
    got = sorted(_none_for_nan(tuple(r[c] for c in OUTPUT_COLUMNS))
                 for r in ms_rows(of(out, "spread")))
    frame = pd.DataFrame([q.model_dump() for q in items])
    ref = reference_spreads(frame, fees, W / 1000, AGE / 1000, haircut)
    for c in ["window_start", "window_end", "buy_ts", "sell_ts"]:
        ref[c] = (ref[c] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    want = sorted(_none_for_nan(tuple(r)) for r in ref[OUTPUT_COLUMNS].itertuples(index=False))
    ref_opps = reference_opportunities(frame, fees, W / 1000, AGE / 1000, min_net=0.0,
                                       haircut=haircut)
    n_opps = len(of(out, "opportunity", "final"))
    assert n_opps == len(ref_opps)
    return got, want, n_opps


def test_random_quotes_match_reference() -> None:
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
    got, want, n_opps = engine_vs_reference(quotes, order, FEES, haircut=2e-4)
    assert len(want) > 300 and n_opps > 0
    assert any(r[OUTPUT_COLUMNS.index("cross_quote")] for r in want)
    assert got == want


def test_real_iaqf_slice_matches_reference(data_dir: Path) -> None:
    bars = load_iaqf_quotes(
        data_dir, datetime(2023, 3, 11, 4, 0, tzinfo=UTC), datetime(2023, 3, 11, 5, 0, tzinfo=UTC)
    )
    assert len(bars) > 300
    quotes = [
        quote(r.exchange, r.symbol, int(r.exchange_ts), float(r.bid), float(r.ask))
        for r in bars.itertuples(index=False)
    ]
    fees = dict(DEFAULT_TAKER_FEES)
    got, want, _ = engine_vs_reference(quotes, list(range(len(quotes))), fees, 2e-4)
    assert len(want) > 1000
    assert sum(r[OUTPUT_COLUMNS.index("cross_quote")] for r in want) > 1000
    assert got == want


def test_config_of_settings() -> None:
    from arbstream.config import Settings

    cfg = EngineConfig.of(Settings(slippage_bps=1.5, latency_haircut_bps=0.5, min_net=0.001))
    assert cfg.haircut == 2e-4 and cfg.tracker.min_net == 0.001
    assert (cfg.w, cfg.age, cfg.watermark_ms, cfg.idle_ms) == (1000, 5000, 10_000, 5_000)
    assert cfg.usd_quotes == USD_QUOTES
