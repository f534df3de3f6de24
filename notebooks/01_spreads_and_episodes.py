# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Spreads and episodes through the USDC depeg
#
# What the stream computed over the lake (the Parquet history, `arbstream.store.lake`), split
# into the days **before** the USDC depeg and the days **during** it (Silicon Valley Bank
# failed on Friday 10 March 2023; USDC traded below 0.90 USD on 11 March and recovered by
# 13 March).
#
# * **Net spread distributions** per pair: quantiles of `net_bps`, the spread after taker
#   fees, conversion and haircut (bps), one value per pair and final window.
# * **Episodes**: a run of consecutive windows with net > 0 (`spark_jobs/tracker.py`); the
#   durations of the *closed* ones.
# * **Recommended thresholds**: the hourly p50 / p75 / p95 of net bps per pair (aggressive,
#   moderate, conservative). The stream writes them to MongoDB `thresholds`, not to the
#   lake, so they are **recomputed here** from the lake's `spread` rows with the tracker's
#   definition (`percentile_record`: numpy linear interpolation; a window belongs to the UTC
#   hour of `window_end − 1 ms`, i.e. of its interval `(end − W, end]`).
# * **Time of day**: when is the best arbitrage of a route larger? Per route (the two legs,
#   either direction) and window, the better direction's net bps, averaged by UTC hour; a
#   Friedman test across the 24 hours with the routes as blocks.
# * **Exchange correlations** of 1-window log returns of mids (`feature` records), every
#   (symbol, exchange) series against every other: what InfluxQL cannot compute.
#
# Parameters: `lake_dir` (empty: the user's `ARB_LAKE_DIR` / `<state_dir>/lake`), `start`,
# `end` (UTC, `[start, end)`), `depeg_start` (first UTC instant of the "during" period).

# %% tags=["parameters"]
out_dir = "build/notebooks/01_spreads_and_episodes"
lake_dir = ""
start = "2023-03-09"
end = "2023-03-14"
depeg_start = "2023-03-10"

# %%
import json
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from arbstream.config import Settings
from arbstream.store import lake
from spark_jobs.tracker import pair_key


def utc(text: str) -> datetime:
    """An ISO date or time as an aware UTC datetime."""
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
cfg = lake.LakeConfig(Path(lake_dir)) if lake_dir else lake.LakeConfig.of(Settings())
since, until, split = utc(start), utc(end), utc(depeg_start)
if not since < split < until:
    raise ValueError(f"need start < depeg_start < end, got {start}, {depeg_start}, {end}")
print(f"lake {cfg.dir}: [{since:%Y-%m-%d %H:%M}, {until:%Y-%m-%d %H:%M}) UTC, "
      f"depeg from {split:%Y-%m-%d %H:%M}")

# %% [markdown]
# ## Loading the lake
#
# `lake.read` opens only the date partitions of the range. A pair is the tracker's key
# (`spark_jobs.tracker.pair_key`): `symbol|buy exchange|sell exchange`, or
# `buy symbol/sell symbol|…` for a cross-quote pair (e.g. buy BTC-USDC, sell BTC-USD).

# %%
LEG = ["symbol", "sell_symbol", "cross_quote", "buy_exchange", "sell_exchange"]
spread = lake.read(cfg, "spread", since, until).select(
    [*LEG, "window_end", "net_bps", "gross_bps"]).to_pandas()
if spread.empty:
    raise ValueError(f"no spread rows in {cfg.dir} for [{start}, {end})")
spread["pair"] = [pair_key(r) for r in spread[LEG].to_dict("records")]
spread["period"] = np.where(spread["window_end"] < pd.Timestamp(split), "before", "during")
# the tracker's hour of a window: (end_ms - 1) // HOUR_MS * HOUR_MS
spread["hour_start"] = (spread["window_end"] - pd.Timedelta(milliseconds=1)).dt.floor("h")
spread["hour"] = spread["hour_start"].dt.hour
print(f"{len(spread):,} spread rows, {spread['pair'].nunique()} pairs")
spread.groupby("period").agg(rows=("net_bps", "size"), pairs=("pair", "nunique"))

# %% [markdown]
# ## Net spread distributions
#
# Per pair and period: window count, mean, standard deviation, the 5/25/50/75/95th
# percentiles (linear interpolation) and the share of windows with net > 0. A same-exchange
# cross-quote pair (e.g. `BTC-USDT/BTC-USDC|binance|binance`) is a bet on the stablecoin
# rate; the cross-exchange same-quote pairs are classic arbitrage, usually well below zero
# after two taker fees.

# %%
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
grouped = spread.groupby(["pair", "period"])["net_bps"]
dist = grouped.agg(count="size", mean="mean", std="std").join(
    grouped.quantile(list(QUANTILES)).unstack().rename(columns=lambda q: f"p{round(q * 100)}"))
dist["positive_share"] = grouped.apply(lambda s: float((s > 0).mean()))
dist.sort_values("p50", ascending=False).round(2).head(20)

# %%
top = (dist.xs("during", level="period")["p95"].sort_values(ascending=False).index[:12]
       if "during" in dist.index.get_level_values("period") else dist.index.levels[0][:12])
fig, ax = plt.subplots(figsize=(10, 6))
data, labels = [], []
for pair in top:
    for period in ("before", "during"):
        values = spread.loc[(spread["pair"] == pair) & (spread["period"] == period), "net_bps"]
        data.append(values.to_numpy())
        labels.append(f"{pair} ({period})")
ax.boxplot(data, vert=False, whis=(5, 95), showfliers=False)
ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
ax.axvline(0, color="k", lw=0.8)
ax.set_xlabel("net spread, bps (box: quartiles, whiskers: p5-p95)")
ax.set_title("Net spread by pair, before vs during the USDC depeg (top 12 by p95 during)")
fig.tight_layout()
fig.savefig(out / "net_spread_by_pair.png", dpi=100)

# %% [markdown]
# ## Episode durations
#
# `lake.latest` keeps the last version of each episode id; only **closed** episodes have a
# final duration (`duration_s` = end − start of the run; one window of W seconds gives W).
# The period is that of the episode's start.

# %%
episodes = lake.latest(lake.read(cfg, "episode", since, until), "episode").to_pandas()
closed = episodes[episodes["event"] == "closed"].copy()
closed["period"] = np.where(closed["start"] < pd.Timestamp(split), "before", "during")
durations = closed.groupby("period")["duration_s"].agg(
    count="size", mean="mean", median="median", p90=lambda s: s.quantile(0.9), max="max")
durations["single_window_share"] = closed.groupby("period")["windows"].apply(
    lambda s: float((s == 1).mean()))
print(f"{len(episodes)} episodes, {len(closed)} closed")
durations

# %%
fig, ax = plt.subplots(figsize=(8, 4))
bins = np.unique(np.geomspace(max(closed["duration_s"].min(), 1.0),
                              max(closed["duration_s"].max(), 2.0), 30)) if len(closed) else 10
for period, rows in closed.groupby("period"):
    ax.hist(rows["duration_s"], bins=bins, alpha=0.6, label=f"{period} ({len(rows)})")
ax.set_xscale("log")
ax.set_xlabel("episode duration, s (log scale)")
ax.set_ylabel("closed episodes")
ax.legend()
ax.set_title("Episode durations")
fig.tight_layout()
fig.savefig(out / "episode_durations.png", dpi=100)

# %% [markdown]
# ## Recommended thresholds (hourly p50 / p75 / p95)
#
# The tracker's definition, recomputed: per pair and UTC hour, `np.percentile(net_bps,
# [50, 75, 95])` (linear interpolation). The full table is `thresholds.csv`; below, per pair,
# the median over hours of each, and how often the hourly p95 (the conservative threshold)
# is above zero.

# %%
hourly = spread.groupby(["pair", "hour_start"])["net_bps"].apply(
    lambda s: pd.Series(np.percentile(s.to_numpy(), [50, 75, 95]),
                        index=["p50_bps", "p75_bps", "p95_bps"])).unstack()
hourly["count"] = spread.groupby(["pair", "hour_start"]).size()
hourly.reset_index().to_csv(out / "thresholds.csv", index=False)
per_pair = hourly.groupby("pair").agg(
    hours=("count", "size"), p50_median=("p50_bps", "median"),
    p75_median=("p75_bps", "median"), p95_median=("p95_bps", "median"),
    p95_positive_share=("p95_bps", lambda s: float((s > 0).mean())))
per_pair.sort_values("p95_median", ascending=False).round(2).head(15)

# %% [markdown]
# ## Time-of-day effect
#
# The two directions of a route (buy on A and sell on B, or the reverse) have net spreads of
# nearly opposite sign, so averaging ordered pairs would cancel. Per **route** (the unordered
# pair of legs) and window we take the better direction, `max(net_bps)`, the arbitrage
# actually on offer, and average it per route and UTC hour. Friedman's test (Friedman 1937,
# `scipy.stats.friedmanchisquare`; routes are blocks, hours are treatments, ranks within a
# route, so routes with different fee levels compare) asks whether some hours are
# systematically better; Kendall's W = χ² / (n (k − 1)) is its effect size (0: no
# agreement between routes on which hours are better, 1: perfect). Only routes with all 24
# hours in the period are blocks. Caveat: one or two days give few independent hours.

# %%
leg_a = spread["symbol"] + "@" + spread["buy_exchange"]
leg_b = spread["sell_symbol"] + "@" + spread["sell_exchange"]
spread["route"] = np.where(leg_a < leg_b, leg_a + " ~ " + leg_b, leg_b + " ~ " + leg_a)
best = spread.groupby(["route", "window_end"]).agg(
    best_net_bps=("net_bps", "max"), hour=("hour", "first"), period=("period", "first"))
route_hour = best.groupby(["period", "route", "hour"])["best_net_bps"].mean()
by_hour = route_hour.groupby(["period", "hour"]).mean().unstack("period")
tod_test = {}
for period, rows in route_hour.groupby("period"):
    table = rows.droplevel("period").unstack("hour").dropna()
    if table.shape[0] < 2 or table.shape[1] < 3:
        print(f"{period}: too few complete routes for Friedman's test")
        continue
    chi2, p_value = stats.friedmanchisquare(*(table[h].to_numpy() for h in table.columns))
    n, k = table.shape
    tod_test[period] = {"routes": n, "hours": k, "chi2": float(chi2), "p": float(p_value),
                        "kendall_w": float(chi2 / (n * (k - 1)))}
print(tod_test)

fig, ax = plt.subplots(figsize=(8, 4))
by_hour.plot(ax=ax, marker="o")
ax.set_xlabel("UTC hour")
ax.set_ylabel("mean over routes of the better direction's net bps")
ax.set_title("Time of day: best net spread per route")
fig.tight_layout()
fig.savefig(out / "time_of_day.png", dpi=100)
by_hour.round(2)

# %% [markdown]
# ## Exchange correlations of log returns
#
# `log_return` = ln(mid / previous window's mid) of each (symbol, exchange) `feature` row
# (the tracker's definition), one column per series, Pearson correlation over the windows
# both series have (pairwise complete). During the depeg the stablecoin series
# (USDC-USD, USDC-USDT) decouple from BTC and from each other's venues.

# %%
feature = lake.read(cfg, "feature", since, until).select(
    ["symbol", "exchange", "window_end", "log_return"]).to_pandas()
feature["series"] = feature["symbol"] + "@" + feature["exchange"]
feature["period"] = np.where(feature["window_end"] < pd.Timestamp(split), "before", "during")
corr = {}
for period, rows in feature.groupby("period"):
    wide = rows.pivot_table(index="window_end", columns="series", values="log_return",
                            aggfunc="first")
    corr[period] = wide.corr(method="pearson")

fig, axes = plt.subplots(1, len(corr), figsize=(7 * len(corr), 6), squeeze=False)
for ax, (period, matrix) in zip(axes[0], corr.items(), strict=True):
    image = ax.imshow(matrix.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(matrix)), matrix.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(matrix)), matrix.index, fontsize=7)
    ax.set_title(f"log-return correlation, {period}")
fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
fig.savefig(out / "return_correlations.png", dpi=100, bbox_inches="tight")
corr.get("during", next(iter(corr.values()))).round(2)

# %% [markdown]
# ## Results
#
# `results.json`: the numbers above (per pair and period quantiles, episode durations,
# threshold summaries, the time-of-day test, the correlation matrices), for the test that
# re-derives them and for comparing runs.

# %%
def _clean(value):
    """JSON-ready: NaN → None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


results = {
    "lake_dir": str(cfg.dir), "start": since.isoformat(), "end": until.isoformat(),
    "depeg_start": split.isoformat(), "spread_rows": len(spread),
    "pairs": int(spread["pair"].nunique()),
    "net_bps": {pair: {period: dist.loc[(pair, period)].to_dict()
                       for period in dist.loc[pair].index}
                for pair in dist.index.levels[0] if pair in dist.index},
    "episodes": {"total": len(episodes), "closed": len(closed),
                 "durations": durations.to_dict(orient="index")},
    "thresholds": per_pair.to_dict(orient="index"),
    "time_of_day": {"mean_by_hour": {p: by_hour[p].to_dict() for p in by_hour.columns},
                    "friedman": tod_test},
    "correlation": {p: m.to_dict() for p, m in corr.items()},
}
(out / "results.json").write_text(json.dumps(_clean(results), indent=1))
print(f"wrote {out / 'results.json'}")
