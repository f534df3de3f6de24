"""Running bots over signals: the backtest loop.

For each bot, signals are taken in ``window_end`` order (:func:`backtest.signals.prepare`).
A constrained bot starts from :meth:`backtest.portfolio.Portfolio.allocate`; before each
signal, transfers that have arrived are credited and the equity is marked every
``mark_every_ms`` (default one minute) up to the signal's time; then the bot decides, the
signal is executed (:func:`backtest.execution.execute`) at the size the budget allows, the
flows are booked and the venues rebalanced. An unconstrained bot trades the stream's
``size_base`` and its equity is the capital plus its realized results in USD.

Every signal a bot did not trade is counted with its reason (``declined``: its rule said no;
``no_threshold`` / ``no_score``: it had nothing to decide with yet; ``budget``: the
budget rule left nothing; ``no_fill``: no leg filled; ``unprofitable``: the oracle saw a
loss; ``no_usd_rate``: no USD price of the profit currency), so nothing is dropped silently.

PnL decomposition per bot (USD, each trade's figures at the USD rate of its profit currency
at decision time): ``spread`` (what the signals promised for the matched sizes), ``fees``,
``slippage``, ``leg_risk``, ``transfers`` (withdrawal fees at the USD price when sent) and
``revaluation`` = the change in equity minus the others (marks of the inventory held: the
base asset, and stablecoins over the depeg).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from arbstream.fees import DEFAULT_WITHDRAWALS, RailPause, Withdrawal
from backtest.bots import ORACLE_GRID, Bot
from backtest.execution import Execution, execute
from backtest.market import Market
from backtest.portfolio import Portfolio

MINUTE_MS = 60_000
#: Sizes below this many base units are not traded (dust).
MIN_SIZE = 1e-8


@dataclass(frozen=True)
class BacktestConfig:
    """Money and inventory settings: ``capital_usd`` (USD), ``position_cap`` (fraction of
    capital per trade), ``rebalance_below`` (fraction of a starting balance), the transfer
    table and rail pauses, and the mark interval (ms)."""

    capital_usd: float = 10_000.0
    position_cap: float = 0.10
    rebalance_below: float = 0.5
    withdrawals: Mapping[tuple[str, str], Withdrawal] = field(
        default_factory=lambda: dict(DEFAULT_WITHDRAWALS))
    pauses: tuple[RailPause, ...] = ()
    mark_every_ms: int = MINUTE_MS


@dataclass
class BotResult:
    """One bot's run: ``trades`` (one row per trade, see :func:`trade_row`), ``equity``
    (``t_ms``, ``equity_usd``; one row per mark), ``skipped`` (reason → count),
    ``decomposition`` (USD), ``transfers`` and ``blocked_transfers``, and ``inventory``
    (constrained bots: ``t_ms`` and one column of units per asset, summed over venues and
    transfers in flight, at every mark)."""

    bot: Bot
    trades: pd.DataFrame
    equity: pd.DataFrame
    skipped: dict[str, int]
    decomposition: dict[str, float]
    transfers: int = 0
    blocked_transfers: int = 0
    inventory: pd.DataFrame = field(default_factory=pd.DataFrame)


def venues_of(signals: pd.DataFrame) -> dict[str, set[str]]:
    """Each venue traded by the signals → the quote currencies it trades them in."""
    out: dict[str, set[str]] = {}
    for side, sym in (("buy_exchange", "symbol"), ("sell_exchange", "sell_symbol")):
        for venue, symbol in zip(signals[side], signals[sym], strict=True):
            out.setdefault(str(venue), set()).add(str(symbol).split("-", 1)[1])
    return out


def trade_row(bot: str, signal: Mapping[str, Any], ex: Execution, usd: float) -> dict[str, Any]:
    """The trade record: identifiers, legs, sizes, prices, and the result in the profit
    currency and in USD (``*_usd`` at ``usd``, the profit currency's USD rate)."""
    pnl = ex.gross_profit + ex.leg_risk
    return {
        "bot": bot, "opportunity_id": signal["opportunity_id"],
        "episode_id": signal.get("episode_id"), "pair": signal["pair"],
        "signal_ms": int(signal["t_ms"]), "decided_ms": ex.decided_ms,
        "buy_exchange": ex.buy.exchange, "buy_symbol": ex.buy.symbol, "buy_ms": ex.buy.t_ms,
        "buy_price": ex.buy.price, "buy_qty": ex.buy.qty, "buy_source": ex.buy.source,
        "sell_exchange": ex.sell.exchange, "sell_symbol": ex.sell.symbol,
        "sell_ms": ex.sell.t_ms, "sell_price": ex.sell.price, "sell_qty": ex.sell.qty,
        "sell_source": ex.sell.source, "conversion_rate": ex.rate,
        "requested": ex.buy.requested, "matched": ex.matched, "fill_ratio": ex.fill_ratio,
        "cost": ex.cost, "proceeds": ex.proceeds, "fees": ex.fees, "spread": ex.spread,
        "slippage": ex.slippage, "gross_profit": ex.gross_profit, "leg_risk": ex.leg_risk,
        "unwound": ex.unwound, "stuck": ex.stuck, "pnl": pnl,
        "profit_currency": signal["profit_currency"], "usd_rate": usd,
        "expected_profit": signal["expected_profit"], "net_bps": signal["net_bps"],
        "pnl_usd": pnl * usd, "fees_usd": ex.fees * usd,
    }


def _oracle_execution(market: Market, bot: Bot, signal: Mapping[str, Any], size: float
                      ) -> Execution | None:
    best: Execution | None = None
    for k in ORACLE_GRID:
        ex = execute(market, bot.execution, signal, size * k)
        if best is None or ex.gross_profit + ex.leg_risk > best.gross_profit + best.leg_risk:
            best = ex
    if best is None or best.gross_profit + best.leg_risk <= 0:
        return None
    return best


def _afford(market: Market, bot: Bot, book: Portfolio, signal: Mapping[str, Any],
            ex: Execution) -> Execution:
    """Cut ``ex`` to what the buy venue's balance pays for (price moved during latency)."""
    for _ in range(8):
        if book.affordable(signal, ex) or ex.buy.qty <= MIN_SIZE:
            return ex
        quote = str(signal["symbol"]).split("-", 1)[1]
        have = book.balance(str(signal["buy_exchange"]), quote)
        need = ex.buy.value * (1.0 + float(signal["buy_fee"]))
        ex = execute(market, bot.execution, signal, ex.buy.requested * have / need * 0.999999)
    return ex


def run_bot(market: Market, signals: pd.DataFrame, bot: Bot, config: BacktestConfig,
            base: str = "BTC") -> BotResult:
    """Run one bot over ``signals`` (a frame of :func:`backtest.signals.prepare`).

    Raises:
        ValueError: no USD price of an asset at the start (constrained bots).
        backtest.portfolio.NegativeBalanceError: a flow would make a balance negative.
    """
    rows: list[dict[str, Any]] = []
    marks: list[tuple[int, float]] = []
    holdings: list[dict[str, float]] = []
    skipped: Counter[str] = Counter()
    start = int(signals["t_ms"].min()) if len(signals) else market.start_ms
    end = max(int(signals["t_ms"].max()) if len(signals) else start, market.end_ms)
    book = Portfolio(config.withdrawals, config.pauses, config.rebalance_below)
    if bot.constrained:
        book.allocate(market, venues_of(signals), base, config.capital_usd, start)
    realized = 0.0
    next_mark = start

    def mark_until(t: int) -> None:
        nonlocal next_mark
        while next_mark <= t:
            book.settle(next_mark)
            eq = book.equity(market, next_mark) if bot.constrained else (
                config.capital_usd + realized)
            marks.append((next_mark, eq))
            if bot.constrained:
                holdings.append({"t_ms": next_mark, **book.holdings()})
            next_mark += config.mark_every_ms

    for signal in signals.to_dict("records"):
        t = int(signal["t_ms"])
        mark_until(t)
        if bot.wants is not None:
            decision = bot.wants(signal)
            if decision is not True:
                skipped["declined" if decision is False else str(decision)] += 1
                continue
        book.settle(t)
        usd = market.usd(str(signal["profit_currency"]), t)
        if usd is None:
            usd = signal.get("usd_rate")
        if usd is None or usd != usd:
            skipped["no_usd_rate"] += 1
            continue
        size = book.cap(signal, config.capital_usd, config.position_cap, usd) \
            if bot.constrained else float(signal["size_base"])
        if size <= MIN_SIZE:
            skipped["budget"] += 1
            continue
        ex = _oracle_execution(market, bot, signal, size) if bot.oracle else execute(
            market, bot.execution, signal, size)
        if ex is None:
            skipped["unprofitable"] += 1
            continue
        if bot.constrained:
            ex = _afford(market, bot, book, signal, ex)
        if ex.buy.qty <= MIN_SIZE and ex.sell.qty <= MIN_SIZE:
            skipped["no_fill"] += 1
            continue
        if bot.constrained:
            book.book(signal, ex)
            book.rebalance(ex.sell.t_ms)
        rows.append(trade_row(bot.name, signal, ex, float(usd)))
        realized += rows[-1]["pnl_usd"]
    mark_until(end)
    book.check()
    trades = pd.DataFrame(rows)
    equity = pd.DataFrame(marks, columns=["t_ms", "equity_usd"])
    return BotResult(bot, trades, equity, dict(skipped),
                     decompose(trades, equity, book, market), len(book.transfers),
                     book.blocked, pd.DataFrame(holdings).fillna(0.0))


def decompose(trades: pd.DataFrame, equity: pd.DataFrame, book: Portfolio, market: Market
              ) -> dict[str, float]:
    """The PnL decomposition in USD (module docstring); ``total`` = equity change."""
    def col(name: str) -> float:
        return float((trades[name] * trades["usd_rate"]).sum()) if len(trades) else 0.0

    parts = {"spread": col("spread"), "fees": -col("fees"), "slippage": col("slippage"),
             "leg_risk": col("leg_risk")}
    parts["transfers"] = -sum(tr.fee * (book.price(market, tr.asset, tr.sent_ms) or 0.0)
                              for tr in book.transfers)
    total = float(equity["equity_usd"].iloc[-1] - equity["equity_usd"].iloc[0]) if len(
        equity) else 0.0
    parts["revaluation"] = total - sum(parts.values())
    parts["total"] = total
    return parts


def run(market: Market, signals: pd.DataFrame, bots: Sequence[Bot],
        config: BacktestConfig | None = None) -> dict[str, BotResult]:
    """Run every bot (see :func:`run_bot`); bot name → result.

    Raises:
        ValueError: two bots with one name.
    """
    names = [b.name for b in bots]
    if len(set(names)) != len(names):
        raise ValueError(f"bot names must be unique, got {names}")
    config = config or BacktestConfig()
    return {b.name: run_bot(market, signals, b, config) for b in bots}


def all_trades(results: Iterable[BotResult]) -> pd.DataFrame:
    """Every bot's trades in one frame."""
    frames = [r.trades for r in results if len(r.trades)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
