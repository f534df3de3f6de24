"""Notebook 5 (pair trading) on the real IAQF lake and the Binance spot / perpetual recording:
its hedge ratios, ADF and Engle-Granger p-values, half-lives and backtest (trade count, PnL)
re-derived here with statsmodels and pandas straight from the lakes' Parquet files (not
through ``ml.pairs`` nor ``arbstream.store.lake``), its plots written and no cell in error."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from statsmodels.regression.rolling import RollingOLS
from statsmodels.tsa.stattools import adfuller, coint

from arbstream.fees import DEFAULT_TAKER_FEES
from testing.notebooks import NOTEBOOKS, run_notebook

SOURCE = NOTEBOOKS / "05_pair_trading.py"
WINDOW, Z_WINDOW, ENTRY = 60, 60, 2.0
LEGS = {"btcusd-coinbase-kraken": ("coinbase:BTC-USD", "kraken:BTC-USD", "iaqf"),
        "btc-binance-usdt-coinbase-usd": ("binance:BTC-USDT", "coinbase:BTC-USD", "iaqf"),
        "btcusdt-binance-perp-spot": ("binanceusdm:BTC-USDT", "binance:BTC-USDT", "binance")}


@pytest.fixture(scope="module")
def executed(iaqf_lake: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("nb05")
    results = run_notebook(SOURCE, out, {"lake_dir": str(iaqf_lake), "data_dir": str(data_dir),
                                         "start": "2023-03-09", "end": "2023-03-11",
                                         "window": WINDOW, "z_window": Z_WINDOW,
                                         "entry": ENTRY})
    return results, out


def log_mids(lake_dir: Path, y: str, x: str) -> pd.DataFrame:
    """Log mids of the two legs on their common window ends, from the Parquet files."""
    frame = pd.read_parquet(lake_dir / "feature", columns=["exchange", "symbol", "window_end",
                                                           "mid"])
    legs = {}
    for name, leg in (("y", y), ("x", x)):
        exchange, symbol = leg.split(":")
        rows = frame[(frame.exchange == exchange) & (frame.symbol == symbol)]
        legs[name] = np.log(rows.set_index("window_end")["mid"].sort_index())
    return pd.DataFrame(legs).dropna()


def reference_backtest(m: pd.DataFrame, fee_y: float, fee_x: float) -> tuple[int, float]:
    """Trades and total net bps of the rule, written independently: RollingOLS β, spread with
    the previous window's α, β, z over Z_WINDOW; enter |z| > 2, exit when z crosses 0 (a trade
    still open at the end is closed at the last observation)."""
    params = RollingOLS(m["y"], sm.add_constant(m["x"]), window=WINDOW).fit().params
    alpha, beta = params["const"].shift(1), params["x"].shift(1)
    spread = m["y"] - alpha - beta * m["x"]
    z = (spread - spread.rolling(Z_WINDOW).mean()) / spread.rolling(Z_WINDOW).std()
    trades, net, position = 0, 0.0, None
    rows = [(i, zi) for i, zi in enumerate(z.to_numpy()) if not np.isnan(zi)]

    def close(i: int, j: int, side: int) -> float:
        b = beta.iloc[i]
        gross = side * ((m["y"].iloc[j] - m["y"].iloc[i]) - b * (m["x"].iloc[j] - m["x"].iloc[i]))
        return (gross - 2 * (fee_y + abs(b) * fee_x)) / (1 + abs(b)) * 10_000

    for i, zi in rows:
        if position is None:
            if abs(zi) > ENTRY:
                position = (i, -1 if zi > 0 else 1)
        elif (position[1] < 0 and zi <= 0) or (position[1] > 0 and zi >= 0):
            net += close(position[0], i, position[1])
            trades += 1
            position = None
    if position is not None and position[0] < len(m) - 1:
        net += close(position[0], len(m) - 1, position[1])
        trades += 1
    return trades, net


def test_the_notebook_runs_and_writes_its_plots(executed) -> None:
    results, out = executed
    nb = nbformat.read(out / "05_pair_trading.ipynb", as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", ()) if o["output_type"] == "error"]
    assert not errors
    for png in ("zscores.png", "betas.png"):
        assert (out / png).stat().st_size > 10_000, png
    assert set(results["pairs"]) == set(LEGS)


@pytest.mark.parametrize("name", list(LEGS))
def test_statistics_equal_statsmodels(executed, iaqf_lake: Path, name: str) -> None:
    results, out = executed
    y, x, source = LEGS[name]
    m = log_mids(iaqf_lake if source == "iaqf" else out / "binance-lake", y, x)
    got = results["pairs"][name]
    assert got["observations"] == got["test_observations"] == len(m)
    ols = sm.OLS(m["y"], sm.add_constant(m["x"])).fit()
    assert got["alpha_ols"] == pytest.approx(ols.params["const"], rel=1e-9)
    assert got["beta_ols"] == pytest.approx(ols.params["x"], rel=1e-9)
    assert got["beta_ols_no_intercept"] == pytest.approx(
        sm.OLS(m["y"], m["x"]).fit().params["x"], rel=1e-9)
    resid = (m["y"] - ols.params["const"] - ols.params["x"] * m["x"]).to_numpy()
    adf = adfuller(resid, autolag="AIC", result_object=False)
    assert got["adf_pvalue"] == pytest.approx(adf[1], rel=1e-6, abs=1e-12)
    assert got["coint_pvalue"] == pytest.approx(coint(m["y"], m["x"])[1], rel=1e-6, abs=1e-12)
    phi = sm.OLS(resid[1:], sm.add_constant(resid[:-1])).fit().params[1]
    assert got["half_life_obs"] == pytest.approx(-math.log(2) / math.log(phi), rel=1e-6)
    spacing = m.index.to_series().diff().dt.total_seconds().median()
    assert got["half_life_s"] == pytest.approx(got["half_life_obs"] * spacing, rel=1e-9)
    fee_y, fee_x = (DEFAULT_TAKER_FEES[leg.split(":")[0]] for leg in (y, x))
    trades, net = reference_backtest(m, fee_y, fee_x)
    assert got["backtest"]["trades"] == trades > 5
    assert got["backtest"]["net_bps"] == pytest.approx(net, rel=1e-9)


def test_what_the_notebook_shows(executed) -> None:
    """The figures its text rests on: Coinbase/Kraken and spot/perp cointegrate, the
    USDT/USD pair through the depeg does not, and taker fees turn every pair's PnL negative."""
    pairs = executed[0]["pairs"]
    assert pairs["btcusd-coinbase-kraken"]["coint_pvalue"] < 0.01
    assert pairs["btcusdt-binance-perp-spot"]["coint_pvalue"] < 0.01
    assert pairs["btc-binance-usdt-coinbase-usd"]["coint_pvalue"] > 0.1
    for p in pairs.values():
        assert p["backtest"]["gross_bps"] > 0 > p["backtest"]["net_bps"]
