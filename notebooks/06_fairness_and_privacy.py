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
# # 6. Fairness and privacy
#
# Is every exchange, symbol and hour treated alike by the data and by the models, and do the
# platform's outputs keep users' identifiers and activity private?
#
# * **Coverage** of the recorded quotes by exchange, symbol and UTC hour: Pearson's χ² test
#   of independence of exchange and hour, and the coverage check (`ml.coverage`) of the
#   period against the week before it: χ² goodness of fit, and the groups significantly
#   *and* materially under-covered (one-sided exact binomial p < α/k and observed/expected
#   < 0.5).
# * **Welch ANOVA** (`statsmodels.stats.oneway.anova_oneway`, `use_var="unequal"`; Welch
#   1951) of the net spread across buy exchanges and across UTC hours, and of the absolute
#   1-window log return across exchanges. The IAQF bars carry no bid/ask and no receive
#   time, so `quote_spread_bps` and `latency_ms` are constant 0 here (reported, not tested).
# * **Model error parity**: the persistence baseline (net spread of the next window = this
#   window's) scored per exchange route (buy → sell): MAE and RMSE in bps, their spread
#   across routes, and a Welch ANOVA of the absolute errors.
# * **Privacy in use**: an export holding identifiers refused without `ARB_ID_HASH_KEY` and
#   tokenized with it (HMAC-SHA256); a differentially private release of the alert decision
#   count with its persisted budget, and the refusal once the budget is spent.
#   `ARB_DP_ENABLED`, `ARB_DP_EPSILON_TOTAL`, `ARB_ID_HASH_KEY` and MongoDB come from the
#   environment (never notebook parameters, which are saved in the executed notebook).
#
# Parameters: `lake_dir` (empty: the user's lake), `data_dir` (empty: `ARB_DATA_DIR`),
# `start`, `end` (UTC, `[start, end)`, whole days), `reference_days` (the reference period
# of the coverage check: that many days before `start`), `release_epsilon` (ε of the DP
# release), `budget_scope`.

# %% tags=["parameters"]
out_dir = "build/notebooks/06_fairness_and_privacy"
lake_dir = ""
data_dir = ""
start = "2023-03-09"
end = "2023-03-11"
reference_days = 7
release_epsilon = 0.5
budget_scope = "notebook-06"

# %%
import json
from datetime import timedelta
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from statsmodels.stats.oneway import anova_oneway

from arbstream.config import Settings
from arbstream.store import lake
from arbstream.timestamps import parse_time as utc
from ml.coverage import check_coverage, hour_independence, hourly_table, quote_counts
from producers.replay.iaqf import load_iaqf_quotes

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
settings = Settings()
cfg = lake.LakeConfig(Path(lake_dir)) if lake_dir else lake.LakeConfig.of(settings)
data = Path(data_dir) if data_dir else settings.data_dir
since, until = utc(start), utc(end)
ref_since = since - timedelta(days=int(reference_days))
if not since < until or reference_days < 1:
    raise ValueError(f"need start < end and reference_days >= 1, got {start}, {end}, "
                     f"{reference_days}")
results: dict = {"start": start, "end": end, "reference": [ref_since.isoformat(), start]}
print(f"lake {cfg.dir}, data {data}: [{since:%Y-%m-%d}, {until:%Y-%m-%d}) UTC, reference "
      f"from {ref_since:%Y-%m-%d}")

# %% [markdown]
# ## Coverage by exchange, symbol and hour
#
# The quotes a replay publishes (`producers.replay.iaqf`: each 1-minute bar's close at the
# bar's close time). A bar exists only when the exchange traded in that minute, so thin
# series (Kraken BTC-USDC) have fewer quotes *every* day: the check compares each group
# with its own share in the reference week, not with one quote a minute.

# %%
quotes = load_iaqf_quotes(data, since, until)
reference = load_iaqf_quotes(data, ref_since, since)
by_symbol = quote_counts(quotes, ("exchange", "symbol"))
hours = hour_independence(quotes)
print(f"{len(quotes):,} quotes; exchange × hour χ² = {hours.statistic:.1f}, dof {hours.dof}, "
      f"p = {hours.p_value:.3g}")
checks = {}
for name, by in (("exchange", ("exchange",)), ("exchange_symbol", ("exchange", "symbol"))):
    checks[name] = check_coverage(quote_counts(quotes, by), quote_counts(reference, by))
    c = checks[name]
    print(f"by {name}: χ² = {c.statistic:.1f}, dof {c.dof}, p = {c.p_value:.3g}, "
          f"flagged {c.flagged or 'none'}")
results["coverage"] = {
    "quotes": len(quotes),
    "by_exchange_symbol": {f"{e}|{s}": int(n) for (e, s), n in by_symbol.items()},
    "hour_independence": {"chi2": hours.statistic, "p": hours.p_value, "dof": hours.dof},
    "hourly": {e: [int(v) for v in row] for e, row in hours.table.iterrows()},
    **{name: {"chi2": c.statistic, "p": c.p_value, "dof": c.dof,
              "flagged": ["|".join(g) if isinstance(g, tuple) else g for g in c.flagged],
              "min_ratio": float(c.table["ratio"].min())}
       for name, c in checks.items()},
}
checks["exchange_symbol"].table.round(4)

# %%
table = hourly_table(quotes, ("exchange", "symbol"))
fig, ax = plt.subplots(figsize=(11, 4.5))
im = ax.imshow(table.to_numpy() / table.to_numpy().max(), aspect="auto", cmap="viridis")
ax.set_yticks(range(len(table)), [f"{e} {s}" for e, s in table.index])
ax.set_xticks(range(24))
ax.set_xlabel("UTC hour")
ax.set_title("Quotes per exchange, symbol and hour (share of the fullest cell)")
fig.colorbar(im, ax=ax)
fig.tight_layout()
fig.savefig(out / "coverage_by_hour.png", dpi=90)

# %% [markdown]
# ## Welch ANOVA across exchanges and hours
#
# Welch's F (unequal variances) of the net spread (bps) of every pair and final window,
# grouped by the buy leg's exchange and by the UTC hour of the window's end; and of the
# absolute 1-window log return (bps) of every (symbol, exchange) series, grouped by
# exchange. Exchanges differ in fees, so their net spreads differ by construction: the
# test says by how much, not whether it is unfair.

# %%
spread = lake.read(cfg, "spread", since, until).select(
    ["symbol", "sell_symbol", "buy_exchange", "sell_exchange", "window_end", "net_bps"]
).to_pandas()
feature = lake.read(cfg, "feature", since, until).select(
    ["symbol", "exchange", "window_end", "log_return", "quote_spread_bps", "latency_ms"]
).to_pandas()
if spread.empty or feature.empty:
    raise ValueError(f"no spread or feature rows in {cfg.dir} for [{start}, {end})")
spread["hour"] = spread["window_end"].dt.hour
feature["abs_return_bps"] = feature["log_return"].abs() * 1e4


def welch(values: pd.Series, groups: pd.Series) -> dict:
    """Welch's ANOVA of ``values`` by ``groups`` (rows with a missing value dropped)."""
    keep = values.notna()
    res = anova_oneway(values[keep].to_numpy(), groups[keep].to_numpy(), use_var="unequal")
    means = values[keep].groupby(groups[keep]).mean()
    return {"F": float(res.statistic), "p": float(res.pvalue), "df_num": float(res.df_num),
            "df_denom": float(res.df_denom), "groups": int(means.size),
            "means": {str(k): float(v) for k, v in means.items()}}


anova = {
    "net_bps_by_buy_exchange": welch(spread["net_bps"], spread["buy_exchange"]),
    "net_bps_by_hour": welch(spread["net_bps"], spread["hour"]),
    "abs_return_bps_by_exchange": welch(feature["abs_return_bps"], feature["exchange"]),
}
constant = {c: float(feature[c].std()) for c in ("quote_spread_bps", "latency_ms")}
results["anova"] = anova
results["constant_features_std"] = constant
for name, a in anova.items():
    print(f"{name}: F = {a['F']:.1f} on ({a['df_num']:.0f}, {a['df_denom']:.0f}) df, "
          f"p = {a['p']:.3g}")
print(f"standard deviation of quote_spread_bps and latency_ms (bars): {constant}")

# %% [markdown]
# ## Model error parity
#
# The persistence baseline predicts a pair's net spread of the next window as this
# window's; only consecutive windows (one window length apart) are scored. Its absolute
# error per exchange route (buy → sell, over every symbol pair of the route): a model that
# is much worse on one route serves that route's users worse.

# %%
PAIR = ["symbol", "sell_symbol", "buy_exchange", "sell_exchange"]
s = spread.sort_values([*PAIR, "window_end"]).reset_index(drop=True)
nxt = s.groupby(PAIR)[["window_end", "net_bps"]].shift(-1)
step = s.groupby(PAIR)["window_end"].diff().dropna().min()
scored = s.assign(actual=nxt["net_bps"], next_end=nxt["window_end"])
scored = scored[scored["next_end"] - scored["window_end"] == step].copy()
scored["abs_error"] = (scored["actual"] - scored["net_bps"]).abs()
scored["route"] = scored["buy_exchange"] + "→" + scored["sell_exchange"]
parity = scored.groupby("route")["abs_error"].agg(
    n="size", mae="mean", rmse=lambda e: float(np.sqrt((e ** 2).mean())))
results["error_parity"] = {
    "window_s": step.total_seconds(), "scored": len(scored),
    "routes": {r: {k: float(v) for k, v in row.items()} for r, row in parity.iterrows()},
    "mae_max_over_min": float(parity["mae"].max() / parity["mae"].min()),
    "welch": welch(scored["abs_error"], scored["route"]),
}
print(f"{len(scored):,} persistence forecasts over {len(parity)} routes; MAE max/min "
      f"{results['error_parity']['mae_max_over_min']:.2f}")
fig, ax = plt.subplots(figsize=(8, 4))
parity["mae"].sort_values().plot.barh(ax=ax)
ax.set_xlabel("MAE of the persistence forecast, bps")
ax.set_title("Error parity across exchange routes")
fig.tight_layout()
fig.savefig(out / "error_parity.png", dpi=90)
parity.round(3)

# %% [markdown]
# ## Privacy in use
#
# **Identifier tokens.** An export of paper trades (here: the closed episodes as trades,
# numbered with a sequential `trade_id` as a backtest's trade export carries one) holds
# identifiers: without a key it is refused; with `ARB_ID_HASH_KEY` every id leaves as
# `h1:` + HMAC-SHA256.

# %%
from arbstream.privacy import IdHashKeyMissing, tokenize_rows

episodes = lake.read(cfg, "episode", since, until).select(
    ["episode_id", "event", "symbol", "buy_exchange", "sell_exchange", "peak_net_bps"]
).to_pandas()
trades = [{"trade_id": f"T{i:08d}", "symbol": r.symbol, "buy_exchange": r.buy_exchange,
           "sell_exchange": r.sell_exchange, "peak_net_bps": r.peak_net_bps}
          for i, r in enumerate(episodes[episodes["event"] == "closed"].itertuples())]
try:
    tokenize_rows(trades, None)
    refused = False
except IdHashKeyMissing as exc:
    refused = True
    print(f"without a key: refused ({exc})")
key = settings.id_hash_key
tokens = tokenize_rows(trades, key) if key is not None else []
results["tokens"] = {"refused_without_key": refused, "rows": len(trades),
                     "keyed": key is not None,
                     "sample": {"trade_id": trades[0]["trade_id"],
                                "token": tokens[0]["trade_id"]} if tokens else None}
pd.DataFrame(tokens[:5] or trades[:0])

# %% [markdown]
# **A differentially private release.** The alert decision count (MongoDB `alerts`, the
# users' own activity) released with ε = `release_epsilon`, Laplace(Δ/ε) noise from OpenDP,
# spent from the persisted budget `budget_scope`; then a release asking for more than what
# is left, refused. Market data (the quotes, spreads and coverage above) is public and
# needs no noise.

# %%
from alerts.privacy_release import release_decisions
from arbstream.store.mongo import privacy_budget as pb

dp_conf = pb.DpConfig.of(settings)
dp: dict = {"enabled": dp_conf.enabled, "total": dp_conf.epsilon_total}
if dp_conf.enabled:
    made = release_decisions(dp_conf, release_epsilon, scope=budget_scope)
    dp |= {"release_id": made.release_id, "what": made.what, "epsilon": made.epsilon,
           "scale": made.scale, "noisy_value": made.noisy_value,
           "spent": made.budget.spent, "remaining": made.budget.remaining,
           "abs_error_expected": made.scale}
    try:
        release_decisions(dp_conf, made.budget.remaining + release_epsilon, scope=budget_scope)
        dp["refused"] = False
    except pb.BudgetExhausted as exc:
        dp["refused"] = True
        print(f"refused: {exc}")
    print(f"{made.what}: {made.noisy_value:.2f} (Laplace scale {made.scale:g}, expected "
          f"|error| {made.scale:g}); budget {made.budget.spent:g} of {made.budget.total:g}")
else:
    print("DP releases are opt-in: ARB_DP_ENABLED=false, nothing released")
results["dp"] = dp

# %%
(out / "results.json").write_text(json.dumps(results, indent=1, default=str))
print(f"wrote {out / 'results.json'}")
