"""Notebook 4 (backtests) on the real two-day lake and the recorded IAQF bars: it runs, its
plots exist, its signal count and the naive setup's result are re-derived with pandas from
the lake's Parquet files (the naive setup fills every signal at its own quotes moved by
0.1 %, so its result in each profit currency is a closed formula of the stream's records),
and its sensitivity grids are complete."""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from testing.notebooks import NOTEBOOKS, run_notebook

SOURCE = NOTEBOOKS / "04_backtests.py"
START, END = pd.Timestamp("2023-03-10", tz="UTC"), pd.Timestamp("2023-03-11", tz="UTC")


@pytest.fixture(scope="module")
def executed(iaqf_lake: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("nb04")
    results = run_notebook(SOURCE, out, {
        "out_dir": str(out), "lake_dir": str(iaqf_lake), "data_dir": str(data_dir),
        "start": "2023-03-10", "end": "2023-03-11", "max_quote_age_ms": 60_000,
        "latencies_ms": [0.0, 90_000.0], "slippages_bps": [0.0, 10.0],
        "position_caps": [0.05, 0.2]})
    return results, out


@pytest.fixture(scope="module")
def opportunities(iaqf_lake: Path) -> pd.DataFrame:
    """The final opportunity records of the day, last version per id, straight from the
    Parquet files."""
    frames = [pd.read_parquet(p) for p in sorted((iaqf_lake / "opportunity").rglob("*.parquet"))]
    df = pd.concat(frames, ignore_index=True)
    df = df[(df["window_end"] >= START) & (df["window_end"] < END) & (df["stage"] == "final")]
    return df.sort_values("emitted_ts", kind="stable").drop_duplicates("opportunity_id",
                                                                       keep="last")


def test_runs_and_plots(executed) -> None:
    _, out = executed
    nb = nbformat.read(out / "04_backtests.ipynb", as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", ()) if o["output_type"] == "error"]
    for png in ("capital_curves.png", "inventory.png", "sensitivity.png"):
        assert (out / png).stat().st_size > 5_000


def test_signals_and_the_naive_total(executed, opportunities: pd.DataFrame) -> None:
    results, _ = executed
    assert results["signals"] == len(opportunities) > 100
    s = 0.001  # the naive setup's 0.1 % slippage on every fill
    o = opportunities
    q = o["size_base"]
    cost = o["buy_ask"] * q * (1 + s)
    into = o["symbol"].str.split("-").str[1]
    buys_into = np.array([str(c).startswith(f"{i}-")
                          for c, i in zip(o["conversion_symbol"], into, strict=True)])
    rate = np.where(~o["cross_quote"], 1.0,
                    np.where(buys_into, o["conversion_rate"] / (1 + s),
                             o["conversion_rate"] * (1 - s)))
    fees = o["buy_fee"] + o["sell_fee"] + np.where(o["cross_quote"],
                                                   o["conversion_fee"].fillna(0.0), 0.0)
    pnl = o["sell_bid"] * q * (1 - s) * rate - cost - cost * fees
    assert results["bots"]["naive"]["trades"] == len(o)
    by_currency = pnl.groupby(o["profit_currency"]).agg(math.fsum)
    assert results["naive_pnl_by_currency"] == pytest.approx(by_currency.to_dict(), rel=1e-9)


def test_grids_and_the_oracle_bound(executed) -> None:
    results, _ = executed
    assert set(results["latency_x_slippage"]) == {"0|0", "0|10", "90000|0", "90000|10"}
    assert set(results["latency_x_size"]) == {"0|0.05", "0|0.2", "90000|0.05", "90000|0.2"}
    assert all(math.isfinite(v) for v in results["latency_x_slippage"].values())
    bots = results["bots"]
    best = bots["oracle-unconstrained"]["total_profit_usd"]
    assert all(b["total_profit_usd"] <= best + 1e-9 for n, b in bots.items() if n != "naive")



def test_bootstrap_interval_brackets_the_mean(executed) -> None:
    """The p50 - p95 interval is reported with its block length and hours; its arithmetic is
    checked against arch directly in tests/backtest/test_backtest.py."""
    c = executed[0]["p50_vs_p95"]
    assert c["hours"] >= 8 and c["block"] >= 1
    assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
