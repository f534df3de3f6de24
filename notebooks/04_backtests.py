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
# # 4. Backtests: bots against the stream's own signals
#
# The bots of `arbstream backtest` (docs/backtest.md) on the stream's final opportunity
# records of the lake, filled against the recorded IAQF quotes: threshold bots at the
# stream's recommended p50/p75/p95, the perfect-foresight oracle (with and without inventory
# limits) and the reference systems' naive setup (zero latency, 0.1 % slippage, no
# inventory). Then their capital and inventory curves, and how the p50 bot's result moves
# with latency, slippage and trade size.
#
# Everything here is the platform's own code (`backtest.*`); the notebook only arranges and
# plots it. Units: USD, bps, ms.

# %% tags=["parameters"]
out_dir = "build/notebooks/04_backtests"
lake_dir = ""  # empty: ARB_LAKE_DIR
data_dir = ""  # empty: ARB_DATA_DIR
start = "2023-03-10"
end = "2023-03-11"
max_quote_age_ms = 60_000
decision_latency_ms = 840.0
order_latency_ms = 100.0
bar_impact_bps = 1.0
# the sensitivity grids (the p50 bot)
latencies_ms = [0.0, 30_000.0, 90_000.0]
slippages_bps = [0.0, 5.0, 10.0]
position_caps = [0.05, 0.10, 0.20]

# %%
import json
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from arbstream.config import Settings
from arbstream.shell.backfill import Input, read_quotes
from arbstream.store.lake import LakeConfig
from arbstream.timestamps import parse_time
from backtest import bots as B
from backtest import signals
from backtest.execution import ExecutionModel
from backtest.job import default_bots
from backtest.market import Market
from backtest.report import comparison
from backtest.run import BacktestConfig, run, run_bot

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
since, until = parse_time(start), parse_time(end)
settings = Settings(**{k: Path(v) for k, v in (("data_dir", data_dir), ("lake_dir", lake_dir))
                       if v})
lake = LakeConfig.of(settings)
sig = signals.from_lake(lake, since, until)
thresholds = signals.hourly_thresholds(signals.spreads_from_lake(lake, since, until))
_, quotes = read_quotes(settings, Input.iaqf, since, until)
market = Market.from_records(quotes, max_age_ms=max_quote_age_ms)
model = ExecutionModel(decision_latency_ms=decision_latency_ms,
                       default_order_latency_ms=order_latency_ms,
                       bar_impact_bps=bar_impact_bps)
print(f"{len(sig)} signals, {len(thresholds)} pair-hours of thresholds, "
      f"{len(market.markets)} markets")

# %% [markdown]
# ## The bot comparison
# Capture is against the oracle of the same execution and inventory (greedy: under inventory
# limits it is not a global optimum, so a selective bot can exceed 100 %).

# %%
results = run(market, sig, default_bots(thresholds, model), BacktestConfig())
table = comparison(results)
cols = ["bot", "trades", "win_rate", "total_profit_usd", "avg_profit_usd", "profit_factor",
        "fees_usd", "capture", "sharpe", "sortino", "max_drawdown", "end_equity_usd"]
table[cols].round(3)

# %% [markdown]
# ## Is p50 better than p95? A block-bootstrap interval
# The mean difference of the two bots' hourly returns with a 95 % circular block-bootstrap
# confidence interval (`backtest.metrics.compare`, `arch`; block length by Politis and White).

# %%
from backtest.metrics import compare

p50_vs_p95 = compare(results["threshold-p50"].equity, results["threshold-p95"].equity)
p50_vs_p95

# %% [markdown]
# ## PnL decomposition (USD)
# Revaluation is the inventory's marks: half the capital is BTC (the budget rule), whose price
# moves more than the arbitrage earns.

# %%
decomposition = table.set_index("bot")[[c for c in table.columns if c.startswith("pnl_")]]
decomposition.round(2)

# %% [markdown]
# ## Capital and inventory curves

# %%
fig, ax = plt.subplots(figsize=(10, 4))
for name, r in results.items():
    if r.bot.constrained:
        t = pd.to_datetime(r.equity["t_ms"], unit="ms", utc=True)
        ax.plot(t, r.equity["equity_usd"], label=name)
ax.set_ylabel("equity, USD (marked to market)")
ax.legend()
ax.set_title("Capital curves of the inventory-constrained bots")
fig.tight_layout()
fig.savefig(out / "capital_curves.png", dpi=80)

inv = results["threshold-p50"].inventory
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
t = pd.to_datetime(inv["t_ms"], unit="ms", utc=True)
axes[0].plot(t, inv["BTC"])
axes[0].set_title("threshold-p50: BTC held")
for asset in [c for c in inv.columns if c not in ("t_ms", "BTC")]:
    axes[1].plot(t, inv[asset], label=asset)
axes[1].set_title("threshold-p50: quote currencies held")
axes[1].legend()
fig.tight_layout()
fig.savefig(out / "inventory.png", dpi=80)

# %% [markdown]
# ## Sensitivity of the p50 bot: latency × slippage, latency × size
# Bars change once a minute: latencies below a minute only add the impact, so the grid
# goes to 90 s.

# %%
th = B.Thresholds(thresholds)


def p50_profit(latency: float, slippage: float, cap: float) -> float:
    m = replace(model, decision_latency_ms=latency, slippage_bps=slippage)
    r = run_bot(market, sig, B.threshold_bot("p50", th, m), BacktestConfig(position_cap=cap))
    return float(r.trades["pnl_usd"].sum()) if len(r.trades) else 0.0


grid_slip = pd.DataFrame([[p50_profit(lat, s, 0.10) for s in slippages_bps]
                          for lat in latencies_ms], index=latencies_ms, columns=slippages_bps)
grid_size = pd.DataFrame([[p50_profit(lat, 0.0, c) for c in position_caps]
                          for lat in latencies_ms], index=latencies_ms, columns=position_caps)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, grid, xlabel in ((axes[0], grid_slip, "slippage, bps"),
                         (axes[1], grid_size, "position cap, fraction of capital")):
    im = ax.imshow(grid.to_numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{v / 1000:g} s" for v in grid.index])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("decision latency")
    fig.colorbar(im, ax=ax, label="profit, USD")
fig.tight_layout()
fig.savefig(out / "sensitivity.png", dpi=80)
grid_slip.round(2), grid_size.round(2)

# %%
naive = results["naive"].trades
results_json = {
    "signals": len(sig),
    # in each profit currency (the buy leg's quote), before any USD conversion
    "naive_pnl_by_currency": naive.groupby("profit_currency")["pnl"].sum().to_dict(),
    "p50_vs_p95": p50_vs_p95,
    "bots": {r["bot"]: {"trades": int(r["trades"]), "total_profit_usd": r["total_profit_usd"],
                        "end_equity_usd": r["end_equity_usd"]}
             for r in table.to_dict("records")},
    "latency_x_slippage": {f"{lat:g}|{s:g}": grid_slip.loc[lat, s]
                           for lat in latencies_ms for s in slippages_bps},
    "latency_x_size": {f"{lat:g}|{c:g}": grid_size.loc[lat, c]
                       for lat in latencies_ms for c in position_caps},
}
(out / "results.json").write_text(json.dumps(results_json, indent=2))
results_json["bots"]
