"""The backtester on the real USDC depeg day: it reconciles to the stream's own figures,
three depeg trades recomputed from the raw IAQF bars match exactly, fills never see the
future, the unconstrained oracle is never beaten, balances never go negative, and the
metrics equal direct computations."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arbstream.fees import BPS, DEFAULT_TAKER_FEES, USDC_DEPEG_PAUSE
from arbstream.store.lake import LakeConfig
from backtest import bots as B
from backtest import metrics, signals
from backtest.execution import ExecutionModel, execute
from backtest.job import backtest_config, default_bots
from backtest.market import Market
from backtest.portfolio import NegativeBalanceError
from backtest.run import BacktestConfig, run, run_bot

#: A realistic execution: the stream benchmark's detection latency p50, 100 ms to each venue,
#: 1 bp of impact on bars.
REAL = ExecutionModel(decision_latency_ms=840.0, default_order_latency_ms=100.0,
                      bar_impact_bps=1.0)
ZERO = ExecutionModel()


@pytest.fixture(scope="module")
def sig(depeg) -> pd.DataFrame:
    settings, _ = depeg
    return signals.from_lake(LakeConfig.of(settings))


@pytest.fixture(scope="module")
def thresholds(depeg) -> pd.DataFrame:
    settings, _ = depeg
    return signals.hourly_thresholds(signals.spreads_from_lake(LakeConfig.of(settings)))


def test_reconciles_to_the_streams_expected_profit(depeg, sig) -> None:
    """Zero latency, no inventory limits, threshold at min_net (every opportunity): the
    backtest's gross profit is the stream's expected_profit, trade by trade and in sum."""
    _, market = depeg
    assert len(sig) > 1000 and (sig["size_source"] == "notional").all()
    bot = B.Bot("all", ZERO, lambda _s: True, constrained=False)
    trades = run_bot(market, sig, bot, BacktestConfig()).trades
    assert len(trades) == len(sig)
    merged = trades.merge(sig[["opportunity_id", "expected_profit"]], on="opportunity_id",
                          suffixes=("", "_stream"))
    assert np.abs(merged["gross_profit"] - merged["expected_profit_stream"]).max() <= 1e-9
    assert abs(math.fsum(trades["gross_profit"]) - math.fsum(sig["expected_profit"])) <= 1e-9
    assert trades["slippage"].abs().max() <= 1e-9 and (trades["leg_risk"] == 0).all()


def _bar_close(data_dir: Path, exchange: str, symbol: str, t_ms: int) -> float:
    """The raw IAQF bar close in effect at ``t_ms``: the last bar whose close time (open +
    60 s) is at or before ``t_ms``, at most 60 s old."""
    name = f"{exchange}_{symbol.replace('-', '').lower()}.parquet"
    bars = pd.read_parquet(data_dir / "iaqf-2023-03" / name)
    close_ms = (bars.index.as_unit("ms").asi8 + 60_000)
    i = int(np.searchsorted(close_ms, t_ms, side="right")) - 1
    assert i >= 0 and t_ms - close_ms[i] <= 60_000
    return float(bars["close"].iloc[i])


def test_three_depeg_trades_recomputed_from_the_raw_bars(depeg, sig, data_dir) -> None:
    """The three most profitable depeg signals (one cross-quote at least), executed with
    latency and impact, equal a recomputation from the raw Parquet bars with the published
    taker fees."""
    _, market = depeg
    depeg_sig = sig[sig["t_ms"] >= 1_678_406_400_000]  # from 2023-03-10 00:00 UTC
    picks = depeg_sig.nlargest(3, "expected_profit")
    assert picks["cross_quote"].any()
    for s in picks.to_dict("records"):
        q = 0.05
        ex = execute(market, REAL, s, q)
        t = s["t_ms"] + 840 + 100
        ask = _bar_close(data_dir, s["buy_exchange"], s["symbol"], t) * (1 + 1 / BPS)
        bid = _bar_close(data_dir, s["sell_exchange"], s["sell_symbol"], t) * (1 - 1 / BPS)
        into, source = s["symbol"].split("-")[1], s["sell_symbol"].split("-")[1]
        rate, conv_fee = 1.0, 0.0
        if into != source:
            c = _bar_close(data_dir, s["conversion_exchange"], s["conversion_symbol"], t)
            rate = 1.0 / c if s["conversion_symbol"].startswith(into + "-") else c
            conv_fee = DEFAULT_TAKER_FEES[s["conversion_exchange"]]
        fees = (DEFAULT_TAKER_FEES[s["buy_exchange"]] + DEFAULT_TAKER_FEES[s["sell_exchange"]]
                + conv_fee)
        cost, proceeds = ask * q, bid * q * rate
        assert ex.matched == q
        assert ex.cost == pytest.approx(cost, rel=1e-12)
        assert ex.proceeds == pytest.approx(proceeds, rel=1e-12)
        assert ex.gross_profit == pytest.approx(proceeds - cost - cost * fees, abs=1e-9)


def test_quotes_after_the_arrival_do_not_change_a_fill(depeg, sig, data_dir) -> None:
    """Rewriting every quote after an order's arrival leaves its fill unchanged; rewriting
    one at or before it changes it (so the check can fail)."""
    from arbstream.shell.backfill import Input, read_quotes
    from tests.backtest.conftest import END, START, lake_settings

    settings = lake_settings(data_dir, Path("/nonexistent"))
    _, quotes = read_quotes(settings, Input.iaqf, START, END)
    frame = pd.DataFrame([q.model_dump() for q in quotes])
    s = sig.iloc[len(sig) // 2].to_dict()
    base = execute(depeg[1], REAL, s, 0.05)
    arrival = max(base.buy.t_ms, base.sell.t_ms)
    later = frame["exchange_ts"] > arrival
    future = frame.copy()
    future.loc[later, ["bid", "ask"]] *= 2.0
    assert later.any()
    again = execute(Market(future.astype({"bid_size": float, "ask_size": float})), REAL, s,
                    0.05)
    assert again == base
    past = frame.copy()
    past.loc[~later, ["bid", "ask"]] *= 2.0
    changed = execute(Market(past.astype({"bid_size": float, "ask_size": float})), REAL, s,
                      0.05)
    assert changed.cost != base.cost


def test_the_unconstrained_oracle_is_never_beaten(depeg, sig, thresholds) -> None:
    _, market = depeg
    bots = default_bots(thresholds, REAL)
    results = run(market, sig, bots, BacktestConfig())
    totals = {n: float(r.trades["pnl_usd"].sum()) if len(r.trades) else 0.0
              for n, r in results.items()}
    best = totals["oracle-unconstrained"]
    for name, r in results.items():
        if r.bot.execution == REAL:
            assert totals[name] <= best + 1e-9, name
    # the oracle's trades: every realized result positive; it skipped the losing signals
    oracle = results["oracle-unconstrained"]
    assert (oracle.trades["pnl_usd"] > 0).all() and oracle.skipped.get("unprofitable", 0) > 0
    # the naive setup (zero latency, 0.1 % slippage) is a different, optimistic execution
    assert results["naive"].bot.execution.slippage_bps == 10.0


def test_inventory_budget_and_no_negative_balance(depeg, sig, thresholds) -> None:
    """Constrained bots obey the position cap and the budget rule; balances stay >= 0; a
    cap that would overdraw is cut to the balance."""
    _, market = depeg
    config = BacktestConfig(capital_usd=10_000.0)
    r = run_bot(market, sig, B.threshold_bot("p50", B.Thresholds(thresholds), REAL), config)
    assert len(r.trades) > 50 and r.skipped.get("budget", 0) > 0
    notional_usd = r.trades["buy_price"] * r.trades["buy_qty"] * r.trades["usd_rate"]
    assert (notional_usd <= 0.10 * config.capital_usd * (1 + 2e-4)).all()  # 1 bp impact
    assert r.transfers > 0
    first = r.equity["equity_usd"].iloc[0]
    assert first == pytest.approx(10_000.0, rel=1e-9)


def test_usdc_pause_blocks_usdc_transfers(depeg, sig, thresholds, data_dir) -> None:
    settings, market = depeg
    bot = B.threshold_bot("p50", B.Thresholds(thresholds), REAL)
    paused = run_bot(market, sig, bot, backtest_config(settings, usdc_paused=True))
    normal = run_bot(market, sig, bot, backtest_config(settings, usdc_paused=False))
    assert paused.blocked_transfers > 0 and normal.blocked_transfers == 0
    assert paused.decomposition != normal.decomposition


def test_equity_marks_revalue_usdc_at_the_market(depeg, sig, thresholds, data_dir) -> None:
    """At a depeg mark, the equity equals the balances valued with the raw bars' USD prices
    (USDC at Kraken's USDC-USD close, BTC at the mean of Coinbase's and Kraken's BTC-USD)."""
    from backtest.portfolio import Portfolio

    _, market = depeg
    config = BacktestConfig()
    book = Portfolio(config.withdrawals)
    t0 = int(sig["t_ms"].iloc[0]) // 60_000 * 60_000
    from backtest.run import venues_of

    book.allocate(market, venues_of(sig), "BTC", 10_000.0, t0)
    t = 1_678_521_600_000  # 2023-03-11 08:00 UTC, USDC near its low
    usdc = _bar_close(data_dir, "kraken", "USDC-USD", t)
    btc = (_bar_close(data_dir, "coinbase", "BTC-USD", t)
           + _bar_close(data_dir, "kraken", "BTC-USD", t)) / 2
    usdt = (_bar_close(data_dir, "coinbase", "USDT-USD", t)
            + _bar_close(data_dir, "kraken", "USDT-USD", t)) / 2
    units = pd.Series(book.balances).groupby(level=1).sum()
    expected = units["BTC"] * btc + units["USDC"] * usdc + units["USDT"] * usdt + units["USD"]
    assert usdc < 0.95
    assert book.equity(market, t) == pytest.approx(expected, rel=1e-12)


def test_metrics_equal_direct_computations(depeg, sig, thresholds) -> None:
    _, market = depeg
    r = run_bot(market, sig, B.threshold_bot("p75", B.Thresholds(thresholds), REAL),
                BacktestConfig())
    m = metrics.summarize(r.trades, r.equity)
    pnl = r.trades["pnl_usd"]
    assert m["trades"] == len(pnl) and m["win_rate"] == pytest.approx((pnl > 0).mean())
    assert m["profit_factor"] == pytest.approx(pnl[pnl > 0].sum() / -pnl[pnl <= 0].sum())
    eq = r.equity.assign(h=pd.to_datetime(r.equity["t_ms"], unit="ms", utc=True).dt.floor("h"))
    hourly = eq.groupby("h")["equity_usd"].last().pct_change().dropna()
    assert m["sharpe"] == pytest.approx(hourly.mean() / hourly.std() * math.sqrt(8760))
    downside = math.sqrt((hourly.clip(upper=0) ** 2).mean())
    assert m["sortino"] == pytest.approx(hourly.mean() / downside * math.sqrt(8760))
    e = r.equity["equity_usd"].to_numpy()
    worst = max(1 - e[j] / e[: j + 1].max() for j in range(len(e)))  # brute force
    assert m["max_drawdown"] == pytest.approx(worst, abs=1e-15)


def test_block_bootstrap_comparison(depeg, sig, thresholds) -> None:
    from arch.bootstrap import CircularBlockBootstrap

    _, market = depeg
    th = B.Thresholds(thresholds)
    a = run_bot(market, sig, B.threshold_bot("p50", th, REAL), BacktestConfig())
    b = run_bot(market, sig, B.threshold_bot("p95", th, REAL), BacktestConfig())
    c = metrics.compare(a.equity, b.equity)
    diff = (metrics.hourly_returns(a.equity) - metrics.hourly_returns(b.equity)).dropna()
    assert c["hours"] == len(diff) and c["mean_diff"] == pytest.approx(diff.mean())
    assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
    direct = CircularBlockBootstrap(c["block"], diff.to_numpy(), seed=7).conf_int(
        np.mean, reps=2000, method="percentile")
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((direct[0, 0], direct[1, 0]))


def test_negative_balances_are_refused() -> None:
    from arbstream.fees import DEFAULT_WITHDRAWALS
    from backtest.portfolio import Portfolio

    book = Portfolio(DEFAULT_WITHDRAWALS)
    with pytest.raises(NegativeBalanceError):
        book._credit("kraken", "USD", -1.0)


def test_usdc_pause_is_the_depeg_weekend() -> None:
    assert USDC_DEPEG_PAUSE.asset == "USDC"
    start = pd.Timestamp(USDC_DEPEG_PAUSE.start_ms, unit="ms", tz="UTC")
    end = pd.Timestamp(USDC_DEPEG_PAUSE.end_ms, unit="ms", tz="UTC")
    assert start.day_name() == "Saturday" and end.day_name() == "Monday"
    assert replace(REAL, slippage_bps=0.0) == REAL


def test_mongo_signals_equal_the_lake_signals(depeg, sig, settings) -> None:
    """The lake's final opportunities written to MongoDB by the stream's own writer read
    back as the same signals."""
    from arbstream.records import OPPORTUNITY_FIELDS
    from arbstream.store.config import MongoConfig
    from arbstream.store.mongo.opportunities import upsert_opportunities

    conf = MongoConfig.of(settings.model_copy(update={"mongo_db": "bt_signals"}))
    rows = sig[list(OPPORTUNITY_FIELDS)].to_dict("records")
    assert upsert_opportunities(conf, rows) == len(rows)
    got = signals.from_mongo(conf)
    cols = ["opportunity_id", "t_ms", "pair", "net_bps", "expected_profit", "size_base"]
    pd.testing.assert_frame_equal(got[cols], sig[cols])
