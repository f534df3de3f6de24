"""The z-score pair-trading bot: mean reversion of a pair's spread, filled like every bot.

Input: a pair's z-score series (``t_ms``, ``z``, ``beta``), computed by the caller from the
stream's mids (``arbstream backtest run`` uses ``ml.pairs.compute``: rolling OLS hedge ratio of
log mids, spread z-score, no look-ahead). Rule (the classic one, e.g. Chan 2013, ch. 3):

* **enter** when ``|z| > entry`` (2): ``z > entry`` shorts the spread (sell ``y``, buy ``x``),
  ``z < -entry`` buys it (buy ``y``, sell ``x``); the ``y`` leg is ``position_cap`` × capital
  (USD) and the ``x`` leg ``|β|`` times that in value (β is an elasticity of log prices);
* **exit** when ``z`` crosses ``exit`` (0) against the position, or at the end of the data.

Each decision is at the observation's time plus the decision latency; each leg is a taker
order filled by :func:`backtest.execution.fill` against the recorded quotes at its arrival
(book, top of book, or bar with impact), paying its venue's taker fee on its own notional.
No inventory or budget rule: a short leg needs the base on that venue (or margin), which the
bot assumes; its equity is the capital plus the realized results plus the open position
marked at the venues' mids, less the entry fees paid. An entry whose legs cannot fill (no
quote), or an exit that cannot close both legs in full, waits for the next observation
(counted in ``skipped``); a position still open at the end is marked, not closed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from backtest.bots import Bot
from backtest.execution import ExecutionModel, Fill, fill
from backtest.market import Market
from backtest.run import BacktestConfig, BotResult


@dataclass(frozen=True)
class Leg:
    """One leg of a pair: ``exchange`` and canonical ``symbol``."""

    exchange: str
    symbol: str

    @classmethod
    def parse(cls, text: str) -> Leg:
        """``exchange:SYMBOL`` (the ``ARB_PAIRS`` leg syntax)."""
        exchange, _, symbol = text.partition(":")
        return cls(exchange, symbol)


@dataclass
class _Position:
    side: int  # +1 long the spread (long y, short x), -1 short it
    y: Fill
    x: Fill
    entry_ms: int
    fees: float


def _mid(market: Market, leg: Leg, t: int) -> float | None:
    top = market.top(leg.exchange, leg.symbol, t)
    return None if top is None else (top.bid + top.ask) / 2.0


def run_pair_bot(market: Market, series: pd.DataFrame, y: Leg, x: Leg,
                 execution: ExecutionModel, fees: Mapping[str, float],
                 config: BacktestConfig, name: str = "pair-z", entry: float = 2.0,
                 exit_z: float = 0.0) -> BotResult:
    """Run the pair bot over ``series`` (columns ``t_ms``, ``z``, ``beta``, in time order).

    ``fees``: taker fee per exchange (fractions). Values are in the legs' quote currency,
    converted to USD with :meth:`backtest.market.Market.usd` at each fill.

    Raises:
        KeyError: a leg's exchange has no taker fee.
        ValueError: ``series`` lacks a column.
    """
    missing = {"t_ms", "z", "beta"} - set(series.columns)
    if missing:
        raise ValueError(f"pair series lacks {sorted(missing)}")
    fee_y, fee_x = fees[y.exchange], fees[x.exchange]
    usd_of = {leg: leg.symbol.split("-", 1)[1] for leg in (y, x)}
    rows: list[dict[str, Any]] = []
    marks: list[tuple[int, float]] = []
    skipped: Counter[str] = Counter()
    realized, pos = 0.0, None
    next_mark = int(series["t_ms"].iloc[0]) if len(series) else 0

    def usd(leg: Leg, t: int) -> float:
        return market.usd(usd_of[leg], t) or 1.0

    def open_value(t: int) -> float:
        if pos is None:
            return 0.0
        my, mx = _mid(market, y, t), _mid(market, x, t)
        my = my if my is not None else pos.y.price
        mx = mx if mx is not None else pos.x.price
        return pos.side * ((pos.y.qty * my - pos.y.value) * usd(y, t)
                           - (pos.x.qty * mx - pos.x.value) * usd(x, t)) - pos.fees

    def mark_until(t: int) -> None:
        nonlocal next_mark
        while next_mark <= t:
            marks.append((next_mark, config.capital_usd + realized + open_value(next_mark)))
            next_mark += config.mark_every_ms

    def legs(t: int, side: int, qty_y: float, qty_x: float) -> tuple[Fill, Fill] | None:
        ay, ax = int(t + execution.latency(y.exchange)), int(t + execution.latency(x.exchange))
        fy = fill(market, execution, y.exchange, y.symbol, "buy" if side > 0 else "sell",
                  qty_y, ay)
        fx = fill(market, execution, x.exchange, x.symbol, "sell" if side > 0 else "buy",
                  qty_x, ax)
        if fy.qty <= 0 or fx.qty <= 0:
            return None
        return fy, fx

    for obs in series.dropna(subset=["z", "beta"]).to_dict("records"):
        t = int(obs["t_ms"])
        mark_until(t)
        decided = int(t + execution.decision_latency_ms)
        z = float(obs["z"])
        if pos is None and abs(z) > entry:
            side = -1 if z > 0 else 1
            py, px = _mid(market, y, decided), _mid(market, x, decided)
            if py is None or px is None:
                skipped["no_quote"] += 1
                continue
            notional = config.position_cap * config.capital_usd
            qy = notional / (py * usd(y, decided))
            qx = abs(float(obs["beta"])) * notional / (px * usd(x, decided))
            got = legs(decided, side, qy, qx)
            if got is None:
                skipped["no_fill"] += 1
                continue
            fy, fx = got
            fee = fee_y * fy.value * usd(y, fy.t_ms) + fee_x * fx.value * usd(x, fx.t_ms)
            pos = _Position(side, fy, fx, decided, fee)
        elif pos is not None and (z - exit_z) * pos.side >= 0:
            got = legs(decided, -pos.side, pos.y.qty, pos.x.qty)
            if got is None or got[0].qty < pos.y.qty or got[1].qty < pos.x.qty:
                skipped["no_fill" if got is None else "partial_exit"] += 1
                continue  # try again at the next observation
            fy, fx = got
            gross = pos.side * ((fy.value - pos.y.value) * usd(y, fy.t_ms)
                                - (fx.value - pos.x.value) * usd(x, fx.t_ms))
            fee = pos.fees + fee_y * fy.value * usd(y, fy.t_ms) + fee_x * fx.value * usd(
                x, fx.t_ms)
            rows.append({"bot": name, "pair": f"{y.exchange}:{y.symbol}/{x.exchange}:"
                                              f"{x.symbol}",
                         "side": "long" if pos.side > 0 else "short",
                         "decided_ms": pos.entry_ms, "exit_ms": decided,
                         "requested": pos.y.requested, "matched": pos.y.qty,
                         "y_entry": pos.y.price, "x_entry": pos.x.price, "y_exit": fy.price,
                         "x_exit": fx.price, "gross_usd": gross, "fees_usd": fee,
                         "pnl_usd": gross - fee, "fill_ratio": pos.y.qty / pos.y.requested})
            realized += gross - fee
            pos = None
    if len(series):
        mark_until(int(series["t_ms"].iloc[-1]))
    if pos is not None:
        skipped["open_at_end"] += 1
    trades = pd.DataFrame(rows)
    equity = pd.DataFrame(marks, columns=["t_ms", "equity_usd"])
    total = float(equity["equity_usd"].iloc[-1] - equity["equity_usd"].iloc[0]) if len(
        equity) else 0.0
    fees_paid = float(trades["fees_usd"].sum()) if len(trades) else 0.0
    gross = float(trades["gross_usd"].sum()) if len(trades) else 0.0
    decomposition = {"spread": gross, "fees": -fees_paid, "slippage": 0.0, "leg_risk": 0.0,
                     "transfers": 0.0, "revaluation": total - gross + fees_paid, "total": total}
    return BotResult(Bot(name, execution, constrained=False, kind="pair"), trades, equity,
                     dict(skipped),
                     decomposition)
