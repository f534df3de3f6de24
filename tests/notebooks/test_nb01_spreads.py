"""Notebook 1 (spreads and episodes through the USDC depeg) on the real two-day lake: every
number of its ``results.json`` and ``thresholds.csv`` re-derived here straight from the lake's
Parquet files with pandas, numpy and scipy (not through ``arbstream.store.lake`` nor the
tracker's code), its four PNGs written and no cell in error."""

from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from testing.notebooks import NOTEBOOKS, run_notebook

SOURCE = NOTEBOOKS / "01_spreads_and_episodes.py"
SPLIT = pd.Timestamp("2023-03-10", tz="UTC")
PNGS = ("net_spread_by_pair.png", "episode_durations.png", "time_of_day.png",
        "return_correlations.png")
REL = 1e-9  # every number is a deterministic float computation on the same rows


def _parquet(lake: Path, record: str) -> pd.DataFrame:
    frame = pd.read_parquet(lake / record)
    return frame.drop(columns="date")


@pytest.fixture(scope="module")
def executed(iaqf_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("nb01")
    results = run_notebook(SOURCE, out, {"lake_dir": str(iaqf_lake), "start": "2023-03-09",
                                         "end": "2023-03-11", "depeg_start": "2023-03-10"})
    return results, out


@pytest.fixture(scope="module")
def spread(iaqf_lake: Path) -> pd.DataFrame:
    s = _parquet(iaqf_lake, "spread")
    symbols = np.where(s["cross_quote"], s["symbol"] + "/" + s["sell_symbol"], s["symbol"])
    s["pair"] = symbols + "|" + s["buy_exchange"] + "|" + s["sell_exchange"]
    s["period"] = np.where(s["window_end"] < SPLIT, "before", "during")
    ms = (s["window_end"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    s["hour_start"] = pd.to_datetime((ms - 1) // 3_600_000 * 3_600_000, unit="ms", utc=True)
    return s


def test_the_notebook_runs_and_writes_its_plots(executed) -> None:
    results, out = executed
    nb = nbformat.read(out / "01_spreads_and_episodes.ipynb", as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", ()) if o["output_type"] == "error"]
    assert not errors
    for png in PNGS:
        assert (out / png).stat().st_size > 1000, png
    assert results["pairs"] == 44 and results["spread_rows"] > 90_000


def test_net_spread_quantiles_per_pair_and_period(executed, spread) -> None:
    results, _ = executed
    checked = 0
    for (pair, period), rows in spread.groupby(["pair", "period"]):
        got = results["net_bps"][pair][period]
        x = rows["net_bps"].to_numpy()
        expect = dict(zip(("p5", "p25", "p50", "p75", "p95"),
                          np.percentile(x, [5, 25, 50, 75, 95]), strict=True))
        expect |= {"count": len(x), "mean": x.mean(), "std": x.std(ddof=1),
                   "positive_share": (x > 0).mean()}
        for key, value in expect.items():
            assert got[key] == pytest.approx(value, rel=REL, abs=1e-12), (pair, period, key)
        checked += 1
    assert checked == sum(len(v) for v in results["net_bps"].values()) == 88


def test_episode_durations_of_closed_episodes(executed, iaqf_lake: Path) -> None:
    results, _ = executed
    ep = _parquet(iaqf_lake, "episode")
    ep["closed"] = ep["event"] == "closed"
    last = ep.sort_values(["episode_id", "windows", "end", "closed"]).drop_duplicates(
        "episode_id", keep="last")
    closed = last[last["closed"]]
    assert results["episodes"]["total"] == len(last)
    assert results["episodes"]["closed"] == len(closed) > 0
    for period, rows in closed.groupby(np.where(closed["start"] < SPLIT, "before", "during")):
        d = rows["duration_s"].to_numpy()
        got = results["episodes"]["durations"][period]
        expect = {"count": len(d), "mean": d.mean(), "median": np.median(d),
                  "p90": np.percentile(d, 90), "max": d.max(),
                  "single_window_share": (rows["windows"] == 1).mean()}
        for key, value in expect.items():
            assert got[key] == pytest.approx(value, rel=REL), (period, key)


def test_hourly_thresholds_follow_the_trackers_definition(executed, spread) -> None:
    results, out = executed
    rows = []
    for (pair, hour), g in spread.groupby(["pair", "hour_start"]):
        p50, p75, p95 = np.percentile(g["net_bps"].to_numpy(), [50, 75, 95])
        rows.append({"pair": pair, "hour_start": hour, "p50_bps": p50, "p75_bps": p75,
                     "p95_bps": p95, "count": len(g)})
    expect = pd.DataFrame(rows).set_index(["pair", "hour_start"]).sort_index()
    got = pd.read_csv(out / "thresholds.csv", parse_dates=["hour_start"]).set_index(
        ["pair", "hour_start"]).sort_index()
    assert got.index.equals(expect.index)
    pd.testing.assert_frame_equal(got[expect.columns], expect, rtol=REL, check_dtype=False)
    for pair, g in expect.groupby("pair"):
        summary = results["thresholds"][pair]
        assert summary["hours"] == len(g)
        for q in ("p50", "p75", "p95"):
            assert summary[f"{q}_median"] == pytest.approx(g[f"{q}_bps"].median(), rel=REL)
        assert summary["p95_positive_share"] == pytest.approx((g["p95_bps"] > 0).mean())


def _friedman(table: np.ndarray) -> tuple[float, float]:
    """Friedman's chi-square with the tie correction (Friedman 1937; Conover 1999, 5.8)."""
    n, k = table.shape
    ranks = np.apply_along_axis(stats.rankdata, 1, table)
    chi2 = 12 / (n * k * (k + 1)) * (ranks.sum(axis=0) ** 2).sum() - 3 * n * (k + 1)
    ties = sum((c ** 3 - c).sum() for c in (np.unique(r, return_counts=True)[1] for r in ranks))
    chi2 /= 1 - ties / (n * k * (k * k - 1))
    return chi2, stats.chi2.sf(chi2, k - 1)


def test_time_of_day_best_route_spread_and_friedman_test(executed, spread) -> None:
    results, _ = executed
    a = spread["symbol"] + "@" + spread["buy_exchange"]
    b = spread["sell_symbol"] + "@" + spread["sell_exchange"]
    route = pd.Series(np.where(a < b, a + " ~ " + b, b + " ~ " + a), index=spread.index)
    best = spread.assign(route=route).groupby(["route", "window_end"]).agg(
        net=("net_bps", "max"), hour=("hour_start", "first"))
    best["hour"] = best["hour"].dt.hour
    best["period"] = np.where(best.index.get_level_values("window_end") < SPLIT, "before",
                              "during")
    tod = results["time_of_day"]
    for period, rows in best.groupby("period"):
        table = rows.groupby(["route", "hour"])["net"].mean().unstack("hour")
        means = table.mean(axis=0)  # mean over routes that have the hour
        for hour, value in means.items():
            assert tod["mean_by_hour"][period][str(hour)] == pytest.approx(value, rel=REL)
        complete = table.dropna().to_numpy()
        chi2, p = _friedman(complete)
        got = tod["friedman"][period]
        assert (got["routes"], got["hours"]) == complete.shape
        assert got["chi2"] == pytest.approx(chi2, rel=1e-9)
        assert got["p"] == pytest.approx(p, rel=1e-6, abs=1e-300)
        n, k = complete.shape
        assert got["kendall_w"] == pytest.approx(chi2 / (n * (k - 1)), rel=1e-9)


def test_log_return_correlations_before_and_during(executed, iaqf_lake: Path) -> None:
    results, _ = executed
    f = _parquet(iaqf_lake, "feature")
    f["series"] = f["symbol"] + "@" + f["exchange"]
    for period, rows in f.groupby(np.where(f["window_end"] < SPLIT, "before", "during")):
        wide = rows.pivot(index="window_end", columns="series", values="log_return")
        got = pd.DataFrame(results["correlation"][period]).loc[wide.columns, wide.columns]
        assert got.shape == (11, 11)
        for i in wide.columns:
            for j in wide.columns:
                both = wide[[i, j]].dropna()
                r = np.corrcoef(both[i], both[j])[0, 1] if i != j else 1.0
                assert got.loc[i, j] == pytest.approx(r, rel=1e-9, abs=1e-12), (period, i, j)
