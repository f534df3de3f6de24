"""The stateful tracker: episodes, rolling statistics, percentiles and features.

The pure functions are checked on hand-made rows with hand-computed figures; then the real
Spark processor (``transformWithStateInPandas``) runs over real IAQF quotes split into several
micro-batches and must give exactly what one call of the pure functions gives on all rows at
once: results do not depend on micro-batch boundaries.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from arbstream.config import Settings
from arbstream.schemas import Heartbeat, Quote
from producers.replay import load_iaqf_quotes
from spark_jobs import tracker
from spark_jobs import transforms as T

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
    assert timeout == tracker._ms(T0 + pd.Timedelta(seconds=8)) + CFG.gap_ms
    # the watermark passing second 8 + gap closes the open episode
    st, out, timeout = tracker.track_pair(st, [], timeout + 1, CFG)
    assert [(e["event"], e["windows"]) for e in of(out, "episode")] == [("closed", 1)]
    assert timeout == tracker._ms(T0.floor("h")) + tracker.HOUR_MS  # the hour is still open


def test_batch_boundaries_do_not_matter() -> None:
    rng = np.random.default_rng(7)
    rows = [pair_row(s, float(rng.normal(0, 5)), 1.0) for s in range(1, 200)]
    _, whole, _ = tracker.track_pair(None, rows, None, CFG)
    st, parts = None, []
    for chunk in (rows[:13], rows[13:14], rows[14:150], rows[150:]):
        st, out, _ = tracker.track_pair(json.loads(json.dumps(st, default=str))
                                        if st else None, chunk, None, CFG)
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
    assert last["spread_mean_bps"] == mean and last["spread_std_bps"] == std
    assert last["spread_z"] == (20.0 - mean) / std
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
    assert c["volatility"] == float(np.std(r, ddof=1))
    assert a["quote_spread_bps"] == 200.0 and a["imbalance"] == 0.5
    assert a["message_rate"] == 1.0 and a["quote_age_s"] == 1.5 and a["latency_ms"] == 12.5
    assert a["feature_id"] == "BTC-USD|kraken|2023-03-11T04:00:01.000Z"


def test_spark_processor_equals_pure_functions(
    spark: SparkSession, data_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(state_dir=tmp_path, episode_gap_seconds=120, stats_horizon_seconds=600)
    bars = load_iaqf_quotes(data_dir, datetime(2023, 3, 11, 4, tzinfo=UTC),
                            datetime(2023, 3, 11, 4, 30, tzinfo=UTC))
    values = [
        Quote(exchange=r.exchange, symbol=r.symbol, exchange_ts=int(r.exchange_ts),
              received_ts=int(r.exchange_ts), bid=float(r.bid), ask=float(r.ask),
              dedupe_key=f"{r.exchange}:{r.symbol}:{r.exchange_ts}").to_json().decode()
        for r in bars.itertuples(index=False)
    ]
    last = int(bars["exchange_ts"].max())
    values += [Heartbeat(exchange=e, exchange_ts=last + 3_700_000, received_ts=last)
               .to_json().decode() for e in sorted(set(bars["exchange"]))]
    topics = [f"md.{json.loads(v)['exchange']}.quotes" for v in values]
    inbox = tmp_path / "in"
    inbox.mkdir()
    for k, chunk in enumerate(np.array_split(np.arange(len(values)), 4)):
        path = inbox / f"{k}.json"
        path.write_text("\n".join(
            json.dumps({"value": values[i], "topic": topics[i], "partition": 0, "offset": int(i)})
            for i in chunk))
        # the file source orders files by modification time (ms) and ties by directory order:
        # files written within one ms could be read out of order and their rows be late
        os.utime(path, (1_700_000_000 + k, 1_700_000_000 + k))
    raw = (spark.readStream.schema("value string, topic string, partition int, offset long")
           .option("maxFilesPerTrigger", 1).json(str(inbox)))
    fees, haircut = settings.taker_fees, 2e-4
    rows = T.spread_stream(raw, fees, 10, 1, 5, settings.usd_quotes, haircut)
    got: list[dict[str, Any]] = []
    query = (tracker.track(rows, settings).writeStream
             .foreachBatch(lambda b, _: got.extend(r.asDict() for r in b.collect()))
             .option("checkpointLocation", str(tmp_path / "ckpt"))
             .trigger(availableNow=True).start())
    query.awaitTermination()
    assert sum(1 for p in query.recentProgress if p["numInputRows"] > 0) >= 4

    static = spark.read.schema("value string, topic string, partition int, offset long").json(
        str(inbox))
    all_rows = [r.asDict() for r in T.spread_stream(
        static, fees, 10, 1, 5, settings.usd_quotes, haircut).collect()]
    cfg = tracker.TrackerConfig.of(settings)
    want: list[dict[str, Any]] = []
    for kind in ("pair", "exchange"):
        keyed: dict[str, list] = {}
        for r in all_rows:
            if r["kind"] == kind:
                k = tracker.pair_key(r) if kind == "pair" else f"{r['symbol']}|{r['exchange']}"
                keyed.setdefault(k, []).append(r)
        for group in keyed.values():
            if kind == "pair":
                _, out, _ = tracker.track_pair(None, group, 10**15, cfg)
            else:
                _, out = tracker.track_exchange(None, group, cfg)
            want += out

    def canon(records: list[dict[str, Any]]) -> list[tuple]:
        frame = tracker._frame(records)
        return sorted(
            tuple(None if (isinstance(v, float) and v != v) or v is pd.NaT else
                  (pd.Timestamp(v).tz_localize("UTC") if isinstance(v, datetime) and v.tzinfo
                   is None else pd.Timestamp(v) if isinstance(v, datetime) else v)
                  for v in row)
            for row in frame.itertuples(index=False)
        )

    assert len(of(want, "episode")) > 4 and len(of(want, "percentiles")) > 0
    g, w = canon(got), canon(want)
    fields = list(tracker._frame(got[:1] or want[:1]).columns)

    def show(rows: list[tuple]) -> str:
        return "; ".join(str({f: v for f, v in zip(fields, r, strict=True) if v is not None})
                         for r in rows[:2])

    only_got = [x for x in g if x not in w]
    only_want = [x for x in w if x not in g]
    assert g == w, (f"got {len(g)}, want {len(w)}; only got ({len(only_got)}): "
                    f"{show(only_got)}; only want ({len(only_want)}): {show(only_want)}")


def test_books_give_depth_aware_size_and_imbalance(spark: SparkSession) -> None:
    from arbstream.schemas import Book
    from spark_jobs.depth import size_from_books

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
    bad = b'{"schema_version":1,"type":"book","exchange":"kraken","symbol":"BTC-USD",' \
          b'"exchange_ts":1678507199000,"received_ts":1678507199000,"dedupe_key":"x",' \
          b'"bids":[[101.0,1.0]],"asks":[[100.0,1.0]]}'
    topic = {"book": "book", "quote": "quotes"}
    rows = [(i.symbol.encode(), i.to_json(), f"md.{i.exchange}.{topic[i.type]}", 0, n)
            for n, i in enumerate(items)] + [(None, bad, "md.kraken.book", 0, 9)]
    raw = spark.createDataFrame(rows, "key binary, value binary, topic string, partition int, "
                                "offset long")
    errors = {r["error"] for r in T.parse_quotes(raw, {"kraken": 0.0026, "coinbase": 0.006})
              .collect()}
    assert errors == {None, "crossed book: best bid > best ask"}
    fees = {"kraken": 0.0026, "coinbase": 0.006}
    out = [r.asDict() for r in T.spread_stream(raw, fees, 10, 1, 5, haircut=2e-4).collect()]
    end = pd.Timestamp(t, unit="ms")
    [pair] = [r for r in out if r["kind"] == "pair" and r["buy_exchange"] == "kraken"
              and pd.Timestamp(r["window_end"]) == end]
    assert pair["buy_asks"] == asks and pair["sell_bids"] == bids
    cfg = tracker.TrackerConfig(0.0, 1000, 5000, 10_000, 60_000, 3.0, notional_usd=150.5)
    sized = tracker.with_depth(pair, cfg)
    want = size_from_books(asks, bids, 0.0026 + 0.006 + 2e-4, 0.0, 1.0, 150.5)
    assert sized["size_source"] == "book" and sized["size_base"] == want.max_size
    assert sized["expected_profit"] == want.profit and sized["buy_vwap"] == want.buy_vwap
    assert want.max_size > 0
    [snap] = [r for r in out if r["kind"] == "exchange" and r["exchange"] == "kraken"
              and pd.Timestamp(r["window_end"]) == end]
    _, [feature] = tracker.track_exchange(None, [snap], cfg)
    assert feature["imbalance"] == (5.0 - 3.0) / (5.0 + 3.0)  # top-2 depth, not top of book
