"""The stateful tracker: episodes, rolling statistics, percentiles and features.

The pure functions are checked on hand-made rows with hand-computed figures. Then the stream
engine (:class:`spark_jobs.engine.Engine`) runs over real IAQF quotes: its episode, feature,
percentile and spread records must be what the pure functions give when fed, window by window,
the rows of the independent pandas reference (tests/reference.py); and its final records must
not depend on how the input is split into micro-batches.
"""

from __future__ import annotations

import json
import math
import pickle
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from arbstream.config import Settings
from arbstream.depth import size_from_books
from arbstream.schemas import Book, Quote
from arbstream.timestamps import from_ms, iso_ms, to_ms
from producers.replay.iaqf import load_iaqf_quotes
from spark_jobs import tracker
from spark_jobs.engine import EngineConfig
from testing.reference import OUTPUT_COLUMNS, reference_spreads
from tests.spark_jobs.test_engine_scenarios import config, engine_frame, quotes_frame, run

CFG = tracker.TrackerConfig(min_net=0.0, window_ms=1000, age_ms=5000, gap_ms=3000,
                            horizon_ms=60_000, sigma=3.0)
T0 = pd.Timestamp("2023-03-11T04:00:00Z")


def pair_row(second: int, net_bps: float, profit_usd: float | None = None) -> dict[str, Any]:
    end = T0 + pd.Timedelta(seconds=second)
    return {
        "opportunity_id": f"BTC-USD|{second}|kraken|coinbase", "symbol": "BTC-USD",
        "sell_symbol": "BTC-USD", "cross_quote": False, "buy_exchange": "kraken",
        "sell_exchange": "coinbase", "window_start": end - pd.Timedelta(seconds=5),
        "window_end": end, "net": net_bps / 10_000.0, "net_bps": net_bps,
        "size_base": 0.5, "size_source": "notional", "expected_profit": profit_usd,
        "profit_currency": "USD", "expected_profit_usd": profit_usd,
    }


def of(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["record"] == kind]


def test_episode_opens_grows_and_closes_on_the_gap() -> None:
    rows = [pair_row(1, 5.0, 5.0), pair_row(2, 9.0, 9.0), pair_row(4, 7.0, 7.0),
            pair_row(5, -1.0), pair_row(8, 2.0, 2.0)]
    st, out, timeout = tracker.track_pair(None, rows, None, CFG)
    eps = of(out, "episode")
    # second 8 is 4 s after the last opportunity (second 4) > gap 3 s: a new episode
    assert [(e["event"], e["episode_id"]) for e in eps] == [
        ("opened", "BTC-USD|kraken|coinbase|2023-03-11T04:00:00.000Z"),
        ("closed", "BTC-USD|kraken|coinbase|2023-03-11T04:00:00.000Z"),
        ("opened", "BTC-USD|kraken|coinbase|2023-03-11T04:00:07.000Z"),
    ]
    closed = eps[1]
    assert closed["start"] == T0 and closed["end"] == T0 + pd.Timedelta(seconds=4)
    assert closed["duration_s"] == 4.0 and closed["windows"] == 3
    assert closed["peak_net_bps"] == 9.0 and closed["mean_net_bps"] == 7.0
    assert closed["expected_profit_usd"] == 9.0  # the best single execution
    spreads = of(out, "spread")
    assert [s["episode_id"] is not None for s in spreads] == [True, True, True, False, True]
    assert timeout == to_ms(T0 + pd.Timedelta(seconds=8)) + CFG.gap_ms
    # the watermark passing second 8 + gap closes the open episode
    st, out, timeout = tracker.track_pair(st, [], timeout + 1, CFG)
    assert [(e["event"], e["windows"]) for e in of(out, "episode")] == [("closed", 1)]
    assert timeout == to_ms(T0.floor("h")) + tracker.HOUR_MS  # the hour is still open


def test_batch_boundaries_do_not_matter() -> None:
    rng = np.random.default_rng(7)
    rows = [pair_row(s, float(rng.normal(0, 5)), 1.0) for s in range(1, 200)]
    _, whole, _ = tracker.track_pair(None, rows, None, CFG)
    st, parts = None, []
    for chunk in (rows[:13], rows[13:14], rows[14:150], rows[150:]):
        # the state goes through a round trip between batches, as in the engine (pickled)
        st, out, _ = tracker.track_pair(pickle.loads(pickle.dumps(st)) if st else None,
                                        chunk, None, CFG)
        parts += out
    assert parts == whole


def test_rolling_z_score_and_anomaly() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    rows = [pair_row(i + 1, v) for i, v in enumerate(values)] + [pair_row(11, 20.0)]
    _, out, _ = tracker.track_pair(None, rows, None, CFG)
    spreads = of(out, "spread")
    assert all(s["spread_z"] is None for s in spreads[:10])  # fewer than MIN_PERIODS before
    last = spreads[10]
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    # rolling sums (tracker.Rolling), not numpy's two passes: equal to ~1e-12 relative
    assert last["spread_mean_bps"] == pytest.approx(mean, rel=1e-9)
    assert last["spread_std_bps"] == pytest.approx(std, rel=1e-9)
    assert last["spread_z"] == pytest.approx((20.0 - mean) / std, rel=1e-9)
    assert last["anomaly"] is True  # z = 11.6 > 3


def test_hourly_percentiles() -> None:
    rows = [pair_row(s, float(s)) for s in range(1, 101)] + [pair_row(3601, 0.0)]
    _, out, _ = tracker.track_pair(None, rows, None, CFG)
    [p] = of(out, "percentiles")
    assert p["hour_start"] == T0 and p["count"] == 100
    assert p["p50_bps"] == 50.5 and p["p75_bps"] == 75.25 and p["p95_bps"] == 95.05
    assert p["aggressive_bps"] == 50.5 and p["conservative_bps"] == 95.05
    assert p["threshold_id"] == "BTC-USD|kraken|coinbase|2023-03-11T04:00:00.000Z"


def test_exchange_features() -> None:
    def snap(second: int, bid: float, ask: float, messages: int) -> dict[str, Any]:
        end = T0 + pd.Timedelta(seconds=second)
        return {"symbol": "BTC-USD", "exchange": "kraken", "window_end": end, "bid": bid,
                "ask": ask, "bid_size": 3.0, "ask_size": 1.0, "messages": messages,
                "latency_ms": 12.5, "quote_ts": end - pd.Timedelta(milliseconds=1500)}

    rows = [snap(1, 99.0, 101.0, 5), snap(2, 100.0, 102.0, 5), snap(3, 98.0, 100.0, 5)]
    _, out = tracker.track_exchange(None, rows, CFG)
    a, b, c = out
    assert a["mid"] == 100.0 and a["log_return"] is None and a["volatility"] is None
    assert b["log_return"] == math.log(101.0 / 100.0)
    r = [math.log(101.0 / 100.0), math.log(99.0 / 101.0)]
    assert c["volatility"] == pytest.approx(float(np.std(r, ddof=1)), rel=1e-9)
    assert a["quote_spread_bps"] == 200.0 and a["imbalance"] == 0.5
    assert a["message_rate"] == 1.0 and a["quote_age_s"] == 1.5 and a["latency_ms"] == 12.5
    assert a["feature_id"] == "BTC-USD|kraken|2023-03-11T04:00:01.000Z"


# --- the engine against the pure functions ----------------------------------------------------


def iaqf(data_dir: Path, start_hour: int, end_hour: int) -> pd.DataFrame:
    """Real IAQF quotes of 2023-03-11 ``[start_hour, end_hour)`` UTC, received when stamped."""
    q = load_iaqf_quotes(data_dir, datetime(2023, 3, 11, start_hour, tzinfo=UTC),
                         datetime(2023, 3, 11, end_hour, tzinfo=UTC))
    q["received_ts"] = q["exchange_ts"]
    q["dedupe_key"] = q["exchange"] + ":" + q["symbol"] + ":q:" + q["exchange_ts"].astype(str)
    return q


def _plain(value: Any) -> Any:
    """A JSON-able value: NaN -> None, numpy scalars -> Python, timestamps (``datetime`` or
    ``pd.Timestamp``, aware, whole ms) -> ISO-8601 UTC ms."""
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, datetime):  # pd.Timestamp is a datetime too
        ms = to_ms(value)
        assert value.tzinfo is not None and value == from_ms(ms), value
        return iso_ms(ms)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def canon(records: list[dict[str, Any]], kind: str, stage: str | None = None,
          fields: list[str] | None = None) -> list[str]:
    """Records of one kind (and stage) as sorted JSON texts of ``fields`` (default: all but
    ``emitted_ts``); floats keep every bit (``repr``)."""
    out = []
    for r in records:
        if r["record"] != kind or (stage is not None and r.get("stage") != stage):
            continue
        keys = fields if fields is not None else [k for k in r if k != "emitted_ts"]
        out.append(json.dumps({k: _plain(r.get(k)) for k in keys}, sort_keys=True))
    return sorted(out)


def reference_pair_rows(quotes: pd.DataFrame, cfg: EngineConfig) -> list[dict[str, Any]]:
    """The reference's spread rows with the fields it leaves implicit: no sizes in these
    quotes, so ``size_source = "notional"``, and profits in the buy leg's quote currency."""
    ref = reference_spreads(quotes, cfg.fees, cfg.w / 1000, cfg.age / 1000, cfg.haircut,
                            cfg.tracker.notional_usd)
    rows = ref.to_dict("records")
    for r in rows:
        r.update(size_source="notional", profit_currency=r["symbol"].split("-", 1)[1],
                 buy_ask_size=None, sell_bid_size=None)
    return rows


def reference_exchange_rows(quotes: pd.DataFrame, cfg: EngineConfig) -> list[dict[str, Any]]:
    """Each (symbol, exchange, window) snapshot, computed here with pandas: the latest quote
    by (exchange_ts, received_ts, dedupe_key) with ``exchange_ts`` in ``(e - age, e]``, the
    number of quotes there and their mean ``received_ts - exchange_ts``."""
    w, age = cfg.w, cfg.age
    q = quotes.drop_duplicates("dedupe_key", keep="first").reset_index(drop=True)
    ts = q["exchange_ts"].to_numpy(dtype=np.int64)
    first = -(-ts // w) * w
    ends = first[:, None] + np.arange(age // w + 1, dtype=np.int64)[None, :] * w
    row, col = np.nonzero(ends < (ts + age)[:, None])
    x = q.iloc[row].reset_index(drop=True)
    x["window_end_ms"] = ends[row, col]
    x["lat"] = x["received_ts"] - x["exchange_ts"]
    keys = ["symbol", "exchange", "window_end_ms"]
    x = x.sort_values([*keys, "exchange_ts", "received_ts", "dedupe_key"], kind="stable")
    agg = x.groupby(keys)["lat"].agg(["size", "sum"])
    latest = x.drop_duplicates(keys, keep="last").set_index(keys).join(agg)
    return [{
        "symbol": symbol, "exchange": exchange,
        "window_end": pd.Timestamp(end, unit="ms", tz="UTC"),
        "bid": r.bid, "ask": r.ask, "bid_size": None, "ask_size": None,
        "quote_ts": pd.Timestamp(r.exchange_ts, unit="ms", tz="UTC"),
        "messages": int(r.size), "latency_ms": int(r.sum) / int(r.size),
        "book_bids": None, "book_asks": None,
    } for (symbol, exchange, end), r in zip(latest.index, latest.itertuples(index=False),
                                             strict=True)]


def test_engine_equals_pure_functions_on_reference_rows(data_dir: Path) -> None:
    settings = Settings(episode_gap_seconds=120, stats_horizon_seconds=600)
    cfg = EngineConfig.of(settings)
    quotes = iaqf(data_dir, 4, 5)
    # latencies of 0..249 ms, so that latency_ms says something
    quotes["received_ts"] += (np.arange(len(quotes)) * 37) % 250
    got = run(quotes_frame(quotes), cfg, chunks=7)
    assert not [r for r in got if r["record"] == "deadletter"]

    # The pure functions over the reference's rows, one window at a time, then a watermark
    # beyond everything (the end of the input).
    want: list[dict[str, Any]] = []
    pair_rows = sorted(reference_pair_rows(quotes, cfg), key=lambda r: r["window_end"])
    pairs: dict[str, Any] = {}
    for r in pair_rows:
        key = tracker.pair_key(r)
        pairs[key], out, _ = tracker.track_pair(pairs.get(key), [r], None, cfg.tracker)
        want += out
    for key, state in pairs.items():
        pairs[key], out, _ = tracker.track_pair(state, [], 10**15, cfg.tracker)
        want += out
    exchanges: dict[str, Any] = {}
    for r in sorted(reference_exchange_rows(quotes, cfg), key=lambda r: r["window_end"]):
        key = f"{r['symbol']}|{r['exchange']}"
        exchanges[key], out = tracker.track_exchange(exchanges.get(key), [r], cfg.tracker)
        want += out

    assert len([r for r in want if r["record"] == "episode"]) > 4
    assert len([r for r in want if r["record"] == "percentiles"]) > 4
    assert any(r["record"] == "spread" and r["anomaly"] for r in want)
    for kind, fields in tracker.RECORD_FIELDS.items():
        g, w = canon(got, kind, fields=list(fields)), canon(want, kind, fields=list(fields))
        only_got, only_want = sorted(set(g) - set(w)), sorted(set(w) - set(g))
        assert g == w, (kind, len(g), len(w), only_got[:2], only_want[:2])
    features = [r for r in got if r["record"] == "feature"]
    assert len({r["latency_ms"] for r in features}) > 10


FLOAT_COLUMNS = [
    "buy_ask", "sell_bid", "buy_fee", "sell_fee", "conversion_rate", "conversion_fee",
    "haircut", "gross", "net", "gross_bps", "net_bps", "usd_rate", "size_base",
    "expected_profit", "expected_profit_usd",
]


def test_final_records_do_not_depend_on_micro_batches(data_dir: Path) -> None:
    cfg = EngineConfig.of(Settings())
    quotes = iaqf(data_dir, 4, 6)
    frame = quotes_frame(quotes)
    runs = {n: run(frame, cfg, chunks=n) for n in (1, 7, 50)}
    finals = [("spread", None), ("episode", None), ("feature", None), ("percentiles", None),
              ("opportunity", "final")]
    one = {k: canon(runs[1], *k) for k in finals}
    assert all(one.values())
    assert len(one[("episode", None)]) > 10 and len(one[("opportunity", "final")]) > 100
    for n in (7, 50):
        for k in finals:
            assert canon(runs[n], *k) == one[k], (n, k)
    for records in runs.values():
        assert not [r for r in records if r["record"] == "deadletter"]
        assert not [r for r in records if r["record"] == "stream"
                    and (r.get("late") or r.get("future") or r.get("duplicates"))]
        assert sum(r.get("received", 0) for r in records if r["record"] == "stream") == len(
            quotes)

    # The final spreads are the reference's, every number bit for bit.
    got = pd.DataFrame([r for r in runs[50] if r["record"] == "spread"])
    got = got.sort_values("opportunity_id", kind="stable").reset_index(drop=True)
    want = reference_spreads(quotes, cfg.fees, cfg.w / 1000, cfg.age / 1000, cfg.haircut,
                             cfg.tracker.notional_usd)
    assert len(got) == len(want) > 10_000
    assert got["opportunity_id"].tolist() == want["opportunity_id"].tolist()
    for c in OUTPUT_COLUMNS:
        if c in FLOAT_COLUMNS:
            a = np.array([np.nan if v is None else v for v in got[c]], dtype=np.float64)
            b = want[c].to_numpy(dtype=np.float64)
            assert (np.isnan(a) == np.isnan(b)).all(), c
            ok = ~np.isnan(a)
            assert (a[ok].view(np.int64) == b[ok].view(np.int64)).all(), c
        else:
            assert [_plain(v) for v in got[c]] == [_plain(v) for v in want[c]], c


def test_books_give_depth_aware_size_and_imbalance() -> None:
    t = 1_678_507_200_000  # 2023-03-11T04:00:00Z
    asks = [[100.0, 1.0], [101.0, 2.0]]
    bids = [[102.0, 1.5], [100.5, 1.0]]
    items = [
        Quote(exchange="kraken", symbol="BTC-USD", exchange_ts=t - 500, received_ts=t - 400,
              bid=99.0, ask=100.0, bid_size=1.0, ask_size=1.0, dedupe_key="k:q"),
        Quote(exchange="coinbase", symbol="BTC-USD", exchange_ts=t - 300, received_ts=t - 250,
              bid=102.0, ask=103.0, bid_size=1.5, ask_size=2.0, dedupe_key="c:q"),
        Book(exchange="kraken", symbol="BTC-USD", exchange_ts=t - 450, received_ts=t - 400,
             depth=2, bids=[[99.0, 1.0], [98.0, 4.0]], asks=asks, dedupe_key="k:b"),
        Book(exchange="coinbase", symbol="BTC-USD", exchange_ts=t - 250, received_ts=t - 200,
             depth=2, bids=bids, asks=[[103.0, 2.0], [104.0, 1.0]], dedupe_key="c:b"),
    ]
    fees = {"kraken": 0.0026, "coinbase": 0.006}
    out = run(engine_frame(items), config(fees, haircut=2e-4, notional_usd=150.5))
    end = pd.Timestamp(t, unit="ms", tz="UTC")
    [pair] = [r for r in out if r["record"] == "spread" and r["buy_exchange"] == "kraken"
              and r["window_end"] == end]
    assert pair["buy_asks"] == asks and pair["sell_bids"] == bids
    want = size_from_books(asks, bids, 0.0026 + 0.006 + 2e-4, 0.0, 1.0, 150.5)
    assert pair["size_source"] == "book" and pair["size_base"] == want.max_size
    assert pair["expected_profit"] == want.profit and pair["buy_vwap"] == want.buy_vwap
    assert want.max_size > 0
    [feature] = [r for r in out if r["record"] == "feature" and r["exchange"] == "kraken"
                 and r["window_end"] == end]
    assert feature["imbalance"] == (5.0 - 3.0) / (5.0 + 3.0)  # top-2 depth, not top of book
