"""Filling a signal's two legs (and its conversion leg) against the recorded market.

**Timing.** The bot decides at the signal's window end plus ``decision_latency_ms`` (default
in ``arbstream backtest``: the stream benchmark's measured detection latency). Each order
reaches its venue ``order_latency_ms`` later (per venue; constant, or the recorded
``received - exchange`` median, :meth:`backtest.market.Market.recorded_latency_ms`) and
fills against the venue's state at that instant (:meth:`backtest.market.Market.top`):

* **concurrent** legs: buy, sell and conversion orders are sent together;
* **sequential** legs: the sell (and conversion) order is sent when the buy leg's fill
  report is back (buy arrival + buy venue latency).

**Fills** (taker orders, :func:`fill`): with a recorded book, walk its levels
(:func:`arbstream.depth.walk`, the stream's depth code); with top of book only, at the best
price capped at the quoted size; on bars (no size recorded), the full quantity at the close
moved against the taker by the declared impact ``bar_impact_bps``. ``slippage_bps`` moves
every fill price against the taker (the reference systems' naive "0.1 % slippage" is 10).

**Partial fills.** The matched size is the smaller leg's fill; the excess of the other leg is
unwound on its own venue (sold back, or bought back) as soon as both fill reports are back,
and its result is booked as **leg risk**.

**Money.** Everything is in the buy leg's quote currency (the stream's ``profit_currency``).
Sell proceeds are converted at the conversion market's price when the conversion order
arrives (rate ``bid`` of ``<S>-<B>`` or ``1 / ask`` of ``<B>-<S>``, as the stream). Fees
follow the stream's definition of the net spread (``spark_jobs.engine``): the buy, sell and
conversion taker fees are fractions of the buy notional ``C``, so

    gross_profit = P - C - C * (buy_fee + sell_fee + conversion_fee)

where ``P`` is the converted sell value and ``C`` the buy cost of the matched size. This is
exactly the stream's ``expected_profit`` when the fills are at the signal's quotes and size
(the stream's haircut aside), so the two never disagree about what an opportunity was worth.
An exchange charges the sell fee on the sell notional instead: the difference is
``sell_fee * (P - C)``, e.g. 0.26 % of a 50 bps spread = 0.013 bps of the notional.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from arbstream.depth import walk
from arbstream.fees import BPS
from backtest.market import Market

Side = Literal["buy", "sell"]


@dataclass(frozen=True)
class ExecutionModel:
    """How orders reach venues and fill. Latencies in ms, impact and slippage in bps."""

    decision_latency_ms: float = 0.0
    order_latency_ms: Mapping[str, float] = field(default_factory=dict)
    default_order_latency_ms: float = 0.0
    sequential: bool = False
    bar_impact_bps: float = 0.0
    slippage_bps: float = 0.0

    def latency(self, exchange: str) -> float:
        """Order latency to ``exchange``, ms."""
        return float(self.order_latency_ms.get(exchange, self.default_order_latency_ms))

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (for reports)."""
        return {"decision_latency_ms": self.decision_latency_ms,
                "order_latency_ms": dict(self.order_latency_ms),
                "default_order_latency_ms": self.default_order_latency_ms,
                "legs": "sequential" if self.sequential else "concurrent",
                "bar_impact_bps": self.bar_impact_bps, "slippage_bps": self.slippage_bps}


@dataclass(frozen=True)
class Fill:
    """One taker order's fill: ``qty`` base units of ``requested`` at total ``value`` (quote
    currency of ``symbol``) at ``t_ms``; ``source`` ``book``, ``top_of_book``, ``bar`` or
    ``none`` (no quote in effect: nothing filled)."""

    exchange: str
    symbol: str
    side: Side
    t_ms: int
    requested: float
    qty: float
    value: float
    source: str

    @property
    def price(self) -> float:
        """Average fill price (NaN when nothing filled)."""
        return self.value / self.qty if self.qty > 0 else math.nan


def fill(market: Market, model: ExecutionModel, exchange: str, symbol: str, side: Side,
         qty: float, t_ms: int) -> Fill:
    """A taker order of ``qty`` base units arriving at ``exchange`` at ``t_ms`` (see the
    module docstring for the book / top of book / bar rules).

    Raises:
        ValueError: a negative ``qty``.
    """
    if qty < 0:
        raise ValueError(f"qty must be >= 0, got {qty}")
    top = market.top(exchange, symbol, t_ms)
    if top is None or qty == 0:
        return Fill(exchange, symbol, side, t_ms, qty, 0.0, 0.0, "none")
    buy = side == "buy"
    levels = top.asks if buy else top.bids
    size = top.ask_size if buy else top.bid_size
    price = top.ask if buy else top.bid
    sign = 1.0 if buy else -1.0
    if levels:
        filled, value = walk(levels, qty)
        source = "book"
    elif size is not None:
        filled = min(qty, size)
        value = filled * price
        source = "top_of_book"
    else:
        filled = qty
        value = qty * price * (1.0 + sign * model.bar_impact_bps / BPS)
        source = "bar"
    if model.slippage_bps:
        value *= 1.0 + sign * model.slippage_bps / BPS
    return Fill(exchange, symbol, side, t_ms, qty, filled, value, source)


@dataclass(frozen=True)
class Execution:
    """The result of executing one signal at a requested size (units: buy quote currency
    unless stated; sizes in base units).

    ``matched``: base units bought and sold; ``cost`` (C) and ``proceeds`` (P, converted) of
    the matched size; ``fees`` = C × (buy + sell + conversion fee); ``gross_profit`` = P − C −
    fees; ``spread`` = (signal sell bid × signal rate − signal buy ask) × matched, what the
    signal promised for that size; ``slippage`` = (P − C) − spread (negative when adverse);
    ``leg_risk`` = the unwind's result (0 without one); ``unwound``: base units unwound,
    ``stuck``: base units the unwind could not fill (left in inventory, + bought / − sold);
    ``rate``: the conversion rate used (1 without a conversion leg).
    """

    buy: Fill
    sell: Fill
    unwind: Fill | None
    matched: float
    cost: float
    proceeds: float
    fees: float
    gross_profit: float
    spread: float
    slippage: float
    leg_risk: float
    unwound: float
    stuck: float
    rate: float
    decided_ms: int

    @property
    def fill_ratio(self) -> float:
        """Matched / requested size (0 when nothing was requested)."""
        return self.matched / self.buy.requested if self.buy.requested > 0 else 0.0


def conversion_rate(market: Market, signal: Mapping[str, Any], t_ms: int,
                    model: ExecutionModel) -> float | None:
    """Units of buy quote currency per unit of sell quote currency at ``t_ms`` through the
    signal's conversion market (1.0 for a same-quote pair); ``None`` when that market has
    no quote in effect."""
    if not signal.get("cross_quote"):
        return 1.0
    into = str(signal["symbol"]).split("-", 1)[1]
    top = market.top(str(signal["conversion_exchange"]), str(signal["conversion_symbol"]), t_ms)
    if top is None:
        return None
    base = str(signal["conversion_symbol"]).split("-", 1)[0]
    slip = model.slippage_bps / BPS
    return 1.0 / (top.ask * (1.0 + slip)) if base == into else top.bid * (1.0 - slip)


def execute(market: Market, model: ExecutionModel, signal: Mapping[str, Any], qty: float
            ) -> Execution:
    """Execute ``signal`` (a row of :func:`backtest.signals.prepare`) for ``qty`` base units.

    Raises:
        ValueError: a negative ``qty``.
    """
    decided = int(signal["t_ms"] + model.decision_latency_ms)
    bx, sx = str(signal["buy_exchange"]), str(signal["sell_exchange"])
    lb, ls = model.latency(bx), model.latency(sx)
    t_buy = int(decided + lb)
    t_sell = int(t_buy + lb + ls) if model.sequential else int(decided + ls)
    buy = fill(market, model, bx, str(signal["symbol"]), "buy", qty, t_buy)
    sell_qty = buy.qty if model.sequential else qty
    sell = fill(market, model, sx, str(signal["sell_symbol"]), "sell", sell_qty, t_sell)
    t_conv = int(t_sell if model.sequential else decided + model.latency(
        str(signal.get("conversion_exchange") or sx)))
    rate = conversion_rate(market, signal, t_conv, model)
    if rate is None:  # the conversion cannot fill: the sell leg is not sent
        sell = Fill(sx, str(signal["sell_symbol"]), "sell", t_sell, sell_qty, 0.0, 0.0, "none")
        rate = 1.0
    matched = min(buy.qty, sell.qty)
    cost = buy.value * matched / buy.qty if buy.qty > 0 else 0.0
    proceeds = (sell.value * matched / sell.qty if sell.qty > 0 else 0.0) * rate
    fee_rate = float(signal["buy_fee"]) + float(signal["sell_fee"])
    if signal.get("cross_quote"):
        fee_rate += float(signal.get("conversion_fee") or 0.0)
    fees = cost * fee_rate
    signal_rate = float(signal["conversion_rate"]) if signal.get("cross_quote") else 1.0
    spread = (float(signal["sell_bid"]) * signal_rate - float(signal["buy_ask"])) * matched
    unwind, leg_risk, unwound, stuck = _unwind(market, model, signal, buy, sell, matched, rate)
    return Execution(buy, sell, unwind, matched, cost, proceeds, fees, proceeds - cost - fees,
                     spread, (proceeds - cost) - spread, leg_risk, unwound, stuck, rate, decided)


def _unwind(market: Market, model: ExecutionModel, signal: Mapping[str, Any], buy: Fill,
            sell: Fill, matched: float, rate: float) -> tuple[Fill | None, float, float, float]:
    """Unwind the excess of the larger leg on its own venue when both fill reports are back;
    returns ``(fill, leg_risk, unwound, stuck)``. The excess is charged its venue's taker fee
    on both trades (its purchase or sale, and the unwind)."""
    excess = abs(buy.qty - sell.qty)
    if excess <= 0:
        return None, 0.0, 0.0, 0.0
    back = max(buy.t_ms + model.latency(buy.exchange), sell.t_ms + model.latency(sell.exchange))
    if buy.qty > sell.qty:  # holding extra base on the buy venue: sell it back there
        fee = float(signal["buy_fee"])
        t = int(back + model.latency(buy.exchange))
        u = fill(market, model, buy.exchange, buy.symbol, "sell", excess, t)
        paid = buy.value * excess / buy.qty
        done = u.qty
        result = u.value * (1 - fee) - paid * done / excess * (1 + fee)
        return u, result, done, excess - done
    fee = float(signal["sell_fee"])  # sold extra base on the sell venue: buy it back there
    t = int(back + model.latency(sell.exchange))
    u = fill(market, model, sell.exchange, sell.symbol, "buy", excess, t)
    got = sell.value * excess / sell.qty
    done = u.qty
    result = (got * done / excess * (1 - fee) - u.value * (1 + fee)) * rate
    return u, result, done, -(excess - done)
