"""Performance metrics of a bot's run, and a block-bootstrap comparison of two bots.

Trade statistics (USD, each trade's ``pnl_usd`` = gross profit + leg risk at its USD rate):
trades, win rate (share of trades with ``pnl_usd > 0``), total and average profit, largest
win and loss, profit factor (sum of wins / |sum of losses|; ``inf`` without a loss), fees
paid, fill ratio (matched / requested size, summed over trades), capture (total profit / the
oracle's, when an oracle ran).

Risk statistics on **hourly** returns of the marked equity (``r_h = E_h / E_{h-1} - 1``, the
last mark of each UTC hour): Sharpe = mean / std (ddof 1) × √8760 and Sortino = mean /
downside deviation × √8760, where the downside deviation is √(mean(min(r, 0)²)) (Sortino and
Price 1994, target 0); crypto trades every hour of the year, so 8,760 hours annualize them,
with a zero risk-free rate. Maximum drawdown = max over t of 1 − E_t / max_{s≤t} E_s
(fraction), its duration = seconds from the peak before it to the recovery of that peak (or
the end of the run).

Comparison (:func:`compare`): the difference of two bots' hourly returns, a 95 % confidence
interval of its mean by the circular block bootstrap (Politis and Romano 1992;
``arch.bootstrap.CircularBlockBootstrap``), block length by Politis and White (2004) with
Patton, Politis and White's (2009) correction (``arch.bootstrap.optimal_block_length``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

HOURS_PER_YEAR = 8_760
HOUR_MS = 3_600_000


def hourly_returns(equity: pd.DataFrame) -> pd.Series:
    """Hourly simple returns of the last mark of each UTC hour, indexed by the hour (UTC ms).
    ``equity``: columns ``t_ms``, ``equity_usd``."""
    if equity.empty:
        return pd.Series(dtype=float)
    last = equity.assign(hour=equity["t_ms"] // HOUR_MS * HOUR_MS).groupby("hour")[
        "equity_usd"].last()
    return last.pct_change().dropna()


def drawdown(equity: pd.DataFrame) -> tuple[float, float]:
    """``(maximum drawdown as a fraction, its duration in seconds)`` (module docstring)."""
    if equity.empty:
        return 0.0, 0.0
    e = equity["equity_usd"].to_numpy(float)
    t = equity["t_ms"].to_numpy(np.int64)
    peak = np.maximum.accumulate(e)
    dd = 1.0 - e / peak
    i = int(np.argmax(dd))
    if dd[i] <= 0:
        return 0.0, 0.0
    p = int(np.argmax(e[: i + 1]))  # the peak before the trough
    rec = np.nonzero(e[i:] >= e[p])[0]
    end = t[i + rec[0]] if len(rec) else t[-1]
    return float(dd[i]), float((end - t[p]) / 1000.0)


def sharpe_sortino(returns: pd.Series) -> tuple[float | None, float | None]:
    """Annualized Sharpe and Sortino of hourly ``returns`` (``None`` when undefined)."""
    r = returns.to_numpy(float)
    if len(r) < 2:
        return None, None
    std = r.std(ddof=1)
    down = math.sqrt(float(np.mean(np.minimum(r, 0.0) ** 2)))
    k = math.sqrt(HOURS_PER_YEAR)
    return (float(r.mean() / std * k) if std > 0 else None,
            float(r.mean() / down * k) if down > 0 else None)


def summarize(trades: pd.DataFrame, equity: pd.DataFrame, oracle_total: float | None = None
              ) -> dict[str, Any]:
    """The metrics of one bot (module docstring); JSON-ready."""
    pnl = trades["pnl_usd"].to_numpy(float) if len(trades) else np.array([])
    wins, losses = pnl[pnl > 0], pnl[pnl <= 0]
    total = float(pnl.sum())
    requested = float(trades["requested"].sum()) if len(trades) else 0.0
    sharpe, sortino = sharpe_sortino(hourly_returns(equity))
    mdd, mdd_s = drawdown(equity)
    loss_sum = float(-losses.sum())
    return {
        "trades": int(len(pnl)), "win_rate": float(len(wins) / len(pnl)) if len(pnl) else None,
        "total_profit_usd": total, "avg_profit_usd": float(pnl.mean()) if len(pnl) else None,
        "largest_win_usd": float(pnl.max()) if len(pnl) else None,
        "largest_loss_usd": float(pnl.min()) if len(pnl) else None,
        "profit_factor": (float(wins.sum() / loss_sum) if loss_sum > 0 else (
            math.inf if len(wins) else None)),
        "fees_usd": float(trades["fees_usd"].sum()) if len(trades) else 0.0,
        "fill_ratio": float(trades["matched"].sum() / requested) if requested > 0 else None,
        "capture": (total / oracle_total if oracle_total else None),
        "sharpe": sharpe, "sortino": sortino, "max_drawdown": mdd,
        "max_drawdown_duration_s": mdd_s,
        "start_equity_usd": float(equity["equity_usd"].iloc[0]) if len(equity) else None,
        "end_equity_usd": float(equity["equity_usd"].iloc[-1]) if len(equity) else None,
    }


def compare(a: pd.DataFrame, b: pd.DataFrame, reps: int = 2000, seed: int = 7
            ) -> dict[str, float | None]:
    """Mean hourly return of bot ``a`` minus bot ``b`` (equity frames) with a 95 % circular
    block-bootstrap confidence interval (module docstring). ``None`` figures with fewer than
    8 common hours."""
    from arch.bootstrap import CircularBlockBootstrap, optimal_block_length

    ra, rb = hourly_returns(a), hourly_returns(b)
    diff = (ra - rb).dropna()
    if len(diff) < 8:
        return {"mean_diff": None, "ci_low": None, "ci_high": None, "block": None,
                "hours": len(diff)}
    x = diff.to_numpy(float)
    block = float(optimal_block_length(x)["circular"].iloc[0])
    block = max(1.0, min(block, len(x) / 2))
    bs = CircularBlockBootstrap(int(round(block)), x, seed=seed)
    ci = bs.conf_int(np.mean, reps=reps, method="percentile", size=0.95)
    return {"mean_diff": float(x.mean()), "ci_low": float(ci[0, 0]),
            "ci_high": float(ci[1, 0]), "block": int(round(block)), "hours": len(x)}
