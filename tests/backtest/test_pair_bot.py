"""The z-score pair bot on the real depeg day (Coinbase vs Kraken BTC-USD): its trades follow
the entry/exit rule on the z-series (re-derived by a plain state machine in the test), and
each trade's result equals a recomputation from the raw IAQF bars and the published fees."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from arbstream.config import PairSpec
from arbstream.fees import BPS, DEFAULT_TAKER_FEES
from arbstream.store.lake import LakeConfig
from backtest.execution import ExecutionModel
from backtest.pair_bot import Leg, run_pair_bot
from backtest.run import BacktestConfig
from ml.pairs import align, compute, read_features
from tests.backtest.test_backtest import _bar_close

MODEL = ExecutionModel(decision_latency_ms=840.0, default_order_latency_ms=100.0,
                       bar_impact_bps=1.0)
PAIR = PairSpec(name="cb-kr", y="coinbase:BTC-USD", x="kraken:BTC-USD")


@pytest.fixture(scope="module")
def series(depeg) -> pd.DataFrame:
    settings, _ = depeg
    stats = compute(align(read_features(LakeConfig.of(settings)), PAIR), PAIR, 60, 60, 1440)
    out = stats.series.reset_index()
    out["t_ms"] = out["window_end"].astype("datetime64[ms, UTC]").astype("int64")
    return out


def test_pair_bot_follows_the_rule_and_the_bars(depeg, series, data_dir) -> None:
    _, market = depeg
    r = run_pair_bot(market, series, Leg.parse(PAIR.y), Leg.parse(PAIR.x), MODEL,
                     DEFAULT_TAKER_FEES, BacktestConfig(), name="pair")
    # the rule, as a state machine over the z-series (every quote is in effect here)
    expected, side, entry = [], 0, None
    for t, z in zip(series["t_ms"], series["z"], strict=True):
        if np.isnan(z):
            continue
        if side == 0 and abs(z) > 2:
            side, entry = (-1 if z > 0 else 1), t
        elif side != 0 and z * side >= 0:
            expected.append((entry, t, side))
            side = 0
    trades = r.trades
    assert len(trades) == len(expected) > 5
    got = list(zip(trades["decided_ms"] - 840, trades["exit_ms"] - 840,
                   trades["side"].map({"long": 1, "short": -1}), strict=True))
    assert got == expected
    # each result from the raw bars: fills at arrival (decision + 100 ms), 1 bp impact
    fee_y, fee_x = DEFAULT_TAKER_FEES["coinbase"], DEFAULT_TAKER_FEES["kraken"]
    for row in trades.to_dict("records")[:5]:
        s = 1 if row["side"] == "long" else -1
        t0, t1 = int(row["decided_ms"]) + 100, int(row["exit_ms"]) + 100
        y0 = _bar_close(data_dir, "coinbase", "BTC-USD", t0) * (1 + s / BPS)
        x0 = _bar_close(data_dir, "kraken", "BTC-USD", t0) * (1 - s / BPS)
        y1 = _bar_close(data_dir, "coinbase", "BTC-USD", t1) * (1 - s / BPS)
        x1 = _bar_close(data_dir, "kraken", "BTC-USD", t1) * (1 + s / BPS)
        decided = int(row["decided_ms"])
        beta = float(series.loc[series["t_ms"] == decided - 840, "beta"].iloc[0])
        qy = 1_000.0 / _bar_close(data_dir, "coinbase", "BTC-USD", decided)  # 10 % of capital
        qx = abs(beta) * 1_000.0 / _bar_close(data_dir, "kraken", "BTC-USD", decided)
        assert row["matched"] == pytest.approx(qy, rel=1e-12)
        assert row["y_entry"] == pytest.approx(y0, rel=1e-12)
        assert row["x_entry"] == pytest.approx(x0, rel=1e-12)
        assert row["y_exit"] == pytest.approx(y1, rel=1e-12)
        assert row["x_exit"] == pytest.approx(x1, rel=1e-12)
        gross = s * ((y1 - y0) * qy - (x1 - x0) * qx)
        assert row["gross_usd"] == pytest.approx(gross, rel=1e-9, abs=1e-9)
        fees = fee_y * qy * (y0 + y1) + fee_x * qx * (x0 + x1)
        assert row["fees_usd"] == pytest.approx(fees, rel=1e-9)
        assert row["pnl_usd"] == pytest.approx(row["gross_usd"] - fees, rel=1e-9)
    # equity: the capital plus the realized results once flat
    assert r.equity["equity_usd"].iloc[0] == pytest.approx(10_000.0)
    assert r.decomposition["total"] == pytest.approx(
        r.equity["equity_usd"].iloc[-1] - 10_000.0)
