"""Notebook 6 (fairness and privacy) on the real two-day lake and the recorded IAQF bars:
its χ² statistics re-derived from the raw IAQF Parquet files (pandas, numpy formulas,
scipy's χ² distribution), its Welch ANOVAs and error parity from the lake's Parquet files
(scipy's ``f_oneway(equal_var=False)``), its HMAC token with the standard library, and its
DP release against the budget persisted in the session's real MongoDB-protocol server."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from pymongo import MongoClient
from scipy import stats

from arbstream.config import Settings
from testing.notebooks import NOTEBOOKS, run_notebook

SOURCE = NOTEBOOKS / "06_fairness_and_privacy.py"
START, END = pd.Timestamp("2023-03-09", tz="UTC"), pd.Timestamp("2023-03-11", tz="UTC")
REF_START = START - pd.Timedelta(days=7)
KEY = "nb06-test-key-0123456789abcdef-0123"
DB = "t_nb06_fairness"
SYMBOLS = {"btcusd": "BTC-USD", "btcusdt": "BTC-USDT", "btcusdc": "BTC-USDC",
           "usdtusd": "USDT-USD", "usdcusd": "USDC-USD", "usdcusdt": "USDC-USDT"}


@pytest.fixture(scope="module")
def executed(iaqf_lake: Path, settings: Settings, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[dict, Path]]:
    out = tmp_path_factory.mktemp("nb06")
    uri = settings.mongo_uri.get_secret_value()
    with MongoClient(uri) as client:
        client.drop_database(DB)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits the environment
        for name in [n for n in os.environ if n.startswith("ARB_")]:
            mp.delenv(name)
        for name, value in {"ARB_MONGO_URI": uri, "ARB_MONGO_DB": DB,
                            "ARB_ID_HASH_KEY": KEY, "ARB_DP_ENABLED": "true",
                            "ARB_DP_EPSILON_TOTAL": "1.0",
                            "ARB_DATA_DIR": str(settings.data_dir)}.items():
            mp.setenv(name, value)
        results = run_notebook(SOURCE, out, {
            "lake_dir": str(iaqf_lake), "data_dir": str(settings.data_dir),
            "start": "2023-03-09", "end": "2023-03-11", "reference_days": 7,
            "release_epsilon": 0.4, "budget_scope": "nb06"})
    yield results, out


@pytest.fixture(scope="module")
def bars(settings: Settings) -> pd.DataFrame:
    """One row per recorded bar: exchange, symbol, quote time (bar open + 60 s)."""
    parts = []
    for path in sorted((settings.data_dir / "iaqf-2023-03").glob("*.parquet")):
        exchange, pair = path.stem.split("_")
        frame = pd.read_parquet(path)
        parts.append(pd.DataFrame({"exchange": exchange, "symbol": SYMBOLS[pair],
                                   "time": frame.index + pd.Timedelta(seconds=60)}))
    return pd.concat(parts, ignore_index=True)


def _parquet(lake: Path, record: str) -> pd.DataFrame:
    return pd.read_parquet(lake / record).drop(columns="date")


def test_runs_without_error(executed) -> None:
    results, out = executed
    nb = nbformat.read(out / "06_fairness_and_privacy.ipynb", as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", ()) if o["output_type"] == "error"]
    for png in ("coverage_by_hour.png", "error_parity.png"):
        assert (out / png).stat().st_size > 1000
    assert KEY not in (out / "06_fairness_and_privacy.ipynb").read_text()


def test_coverage_chi_square(executed, bars: pd.DataFrame) -> None:
    cov = executed[0]["coverage"]
    day = bars[(bars["time"] >= START) & (bars["time"] < END)]
    ref = bars[(bars["time"] >= REF_START) & (bars["time"] < START)]
    assert cov["quotes"] == len(day)
    counts = day.groupby(["exchange", "symbol"]).size()
    assert cov["by_exchange_symbol"] == {f"{e}|{s}": int(n) for (e, s), n in counts.items()}
    # exchange x hour independence: X² = Σ (o − e)² / e, e = row × column / N
    o = pd.crosstab(day["exchange"], day["time"].dt.hour).to_numpy(dtype=float)
    e = np.outer(o.sum(1), o.sum(0)) / o.sum()
    x2 = ((o - e) ** 2 / e).sum()
    got = cov["hour_independence"]
    assert got["chi2"] == pytest.approx(x2, rel=1e-9) and got["dof"] == 2 * 23
    assert got["p"] == pytest.approx(stats.chi2.sf(x2, 46), rel=1e-6)
    # goodness of fit against the reference week's shares, by exchange and by series
    for name, by in (("exchange", ["exchange"]), ("exchange_symbol", ["exchange", "symbol"])):
        obs, r = day.groupby(by).size(), ref.groupby(by).size()
        exp = r / r.sum() * obs.sum()
        x2 = (((obs - exp) ** 2) / exp).sum()
        assert cov[name]["chi2"] == pytest.approx(x2, rel=1e-9), name
        assert cov[name]["p"] == pytest.approx(stats.chi2.sf(x2, len(r) - 1), rel=1e-6)
        assert cov[name]["flagged"] == [] and cov[name]["min_ratio"] == pytest.approx(
            (obs / exp).min())


def test_welch_anova(executed, iaqf_lake: Path) -> None:
    anova = executed[0]["anova"]
    s = _parquet(iaqf_lake, "spread")
    f = _parquet(iaqf_lake, "feature")
    cases = {
        "net_bps_by_buy_exchange": (s["net_bps"], s["buy_exchange"]),
        "net_bps_by_hour": (s["net_bps"], s["window_end"].dt.hour),
        "abs_return_bps_by_exchange": (f["log_return"].abs() * 1e4, f["exchange"]),
    }
    for name, (values, groups) in cases.items():
        keep = values.notna()
        samples = [g.to_numpy() for _, g in values[keep].groupby(groups[keep])]
        res = stats.f_oneway(*samples, equal_var=False)
        got = anova[name]
        assert got["F"] == pytest.approx(res.statistic, rel=1e-7), name
        assert got["p"] == pytest.approx(res.pvalue, rel=1e-5, abs=1e-300), name
        assert got["groups"] == len(samples)
    assert anova["net_bps_by_hour"]["groups"] == 24
    assert executed[0]["constant_features_std"] == {"quote_spread_bps": 0.0, "latency_ms": 0.0}


def test_persistence_error_parity(executed, iaqf_lake: Path) -> None:
    parity = executed[0]["error_parity"]
    s = _parquet(iaqf_lake, "spread")
    rows = []
    for (_, _, buy, sell), g in s.groupby(["symbol", "sell_symbol", "buy_exchange",
                                           "sell_exchange"]):
        g = g.sort_values("window_end")
        t = g["window_end"].to_numpy()
        x = g["net_bps"].to_numpy()
        ok = (t[1:] - t[:-1]) == np.timedelta64(60, "s")
        rows.append(pd.DataFrame({"route": f"{buy}→{sell}", "err": np.abs(x[1:] - x[:-1])[ok]}))
    err = pd.concat(rows)
    assert parity["scored"] == len(err) and parity["window_s"] == 60
    for route, g in err.groupby("route"):
        got = parity["routes"][route]
        assert got["n"] == len(g)
        assert got["mae"] == pytest.approx(g["err"].mean(), rel=1e-9)
        assert got["rmse"] == pytest.approx(np.sqrt((g["err"] ** 2).mean()), rel=1e-9)
    res = stats.f_oneway(*[g["err"].to_numpy() for _, g in err.groupby("route")],
                         equal_var=False)
    assert parity["welch"]["F"] == pytest.approx(res.statistic, rel=1e-7)


def test_privacy_in_use(executed, settings: Settings) -> None:
    results = executed[0]
    tok = results["tokens"]
    assert tok["refused_without_key"] and tok["keyed"] and tok["rows"] > 0
    raw = tok["sample"]["trade_id"]
    assert tok["sample"]["token"] == "h1:" + hmac.new(KEY.encode(), raw.encode(),
                                                      hashlib.sha256).hexdigest()
    dp = results["dp"]
    assert dp["enabled"] and dp["refused"] and dp["scale"] == pytest.approx(1 / 0.4)
    assert dp["spent"] == pytest.approx(0.4) and dp["remaining"] == pytest.approx(0.6)
    with MongoClient(settings.mongo_uri.get_secret_value()) as client:
        docs = list(client[DB]["privacy_budget"].find({"scope": "nb06"}))
    ledger = [d for d in docs if d["kind"] == "ledger"]
    released = [d for d in docs if d["kind"] == "release"]
    assert len(ledger) == 1 and ledger[0]["spent_units"] == 400_000
    assert len(released) == 1 and released[0]["noisy_value"] == dp["noisy_value"]
