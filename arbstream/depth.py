"""Depth-aware size of a two-leg trade from top-N order books (pure numpy, no Spark).

A pair buys ``q`` base units up the buy exchange's asks and sells them down the sell
exchange's bids. With ``C(q)`` the cost (buy quote currency) and ``P(q)`` the proceeds
(converted into the buy quote currency at ``rate``), the net spread at size ``q`` is

    net(q) = P(q) / C(q) - 1 - costs          costs = buy fee + sell fee + conversion fee + haircut

(fractions), the book-walking version of the stream's spread (``spark_jobs.engine``). It
lives in the core so that the stream (``spark_jobs.tracker``) and the backtester
(``backtest.execution``) size and fill with the same code. ``net`` falls as ``q`` grows.
Within a segment between two level boundaries both marginal prices are constant, so ``P``
and ``C`` are linear and the largest ``q`` with ``net(q) >= min_net`` is solved exactly. The
profit ``P(q) - C(q) (1 + costs)`` is concave and piecewise linear, so its maximum is at a
level boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Levels = Sequence[Sequence[float]]


@dataclass(frozen=True)
class Depth:
    """Result of :func:`size_from_books`.

    ``max_size``: largest base quantity with ``net >= min_net`` (0 when even the first unit is
    not); ``profit_size`` and ``profit``: the base quantity with the highest expected profit
    and that profit (buy quote currency); ``buy_vwap``/``sell_vwap``: average prices to fill
    ``notional`` (buy quote currency) on both legs (sell price in the sell leg's currency),
    ``None`` when the books are too thin to fill it.
    """

    max_size: float
    profit_size: float
    profit: float
    buy_vwap: float | None
    sell_vwap: float | None


def _cumulative(levels: Levels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = np.asarray(levels, dtype=np.float64).reshape(-1, 2)
    arr = arr[(arr[:, 0] > 0) & (arr[:, 1] > 0)]
    qty = np.concatenate([[0.0], np.cumsum(arr[:, 1])])
    value = np.concatenate([[0.0], np.cumsum(arr[:, 0] * arr[:, 1])])
    return arr[:, 0], qty, value


def _value_at(prices: np.ndarray, qty: np.ndarray, value: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Cost (or proceeds) of filling ``q`` base units along the levels (``q <= qty[-1]``)."""
    i = np.clip(np.searchsorted(qty, q, side="right") - 1, 0, len(prices) - 1)
    return value[i] + prices[i] * (q - qty[i])


def size_from_books(
    asks: Levels, bids: Levels, costs: float, min_net: float, rate: float = 1.0,
    notional: float | None = None,
) -> Depth:
    """Size a pair from the buy leg's ``asks`` and the sell leg's ``bids``.

    Args:
        asks: ``[[price, size], ...]`` best (lowest) first, buy exchange.
        bids: ``[[price, size], ...]`` best (highest) first, sell exchange.
        costs: buy fee + sell fee + conversion fee + haircut, fraction.
        min_net: the opportunity threshold, fraction.
        rate: units of buy quote currency per unit of sell quote currency (1 when the same).
        notional: amount to fill for the VWAPs, buy quote currency; ``None`` to skip.

    Raises:
        ValueError: an empty side after dropping non-positive levels.
    """
    ap, aq, av = _cumulative(asks)
    bp, bq, bv = _cumulative(bids)
    if len(ap) == 0 or len(bp) == 0:
        raise ValueError("both books need at least one level with positive price and size")
    bp, bv = bp * rate, bv * rate
    top = min(aq[-1], bq[-1])
    k = 1.0 + min_net + costs
    points = np.unique(np.concatenate([aq[aq <= top], bq[bq <= top], [top]]))
    cost = _value_at(ap, aq, av, points)
    proceeds = _value_at(bp, bq, bv, points)
    ok = proceeds >= k * cost
    ok[0] = True  # q = 0
    last = int(np.nonzero(ok)[0][-1])
    if last == len(points) - 1:
        max_size = float(points[-1])
    else:
        q0 = points[last]
        mid = (q0 + points[last + 1]) / 2.0
        pa = float(_value_at(ap, aq, av, np.array([mid]))[0] - _value_at(
            ap, aq, av, np.array([q0]))[0]) / (mid - q0)
        pb = float(_value_at(bp, bq, bv, np.array([mid]))[0] - _value_at(
            bp, bq, bv, np.array([q0]))[0]) / (mid - q0)
        slack = k * cost[last] - proceeds[last]  # <= 0 at q0
        max_size = float(q0 + (slack / (pb - k * pa) if pb - k * pa < 0 else 0.0))
    profit = proceeds - cost * (1.0 + costs)
    best = int(np.argmax(profit))
    buy_vwap = sell_vwap = None
    if notional is not None and av[-1] >= notional:
        q = float(np.interp(notional, av, aq))
        if q <= bq[-1]:
            buy_vwap = notional / q
            sell_vwap = float(_value_at(bp, bq, bv, np.array([q]))[0]) / rate / q
    return Depth(max_size, float(points[best]), float(profit[best]), buy_vwap, sell_vwap)


def walk(levels: Levels, qty: float) -> tuple[float, float]:
    """Fill a taker order of ``qty`` base units along one side of a book.

    Args:
        levels: ``[[price, size], ...]`` best first (asks ascending for a buy, bids
            descending for a sell); levels with a non-positive price or size are ignored.
        qty: base units wanted, ``>= 0``.

    Returns:
        ``(filled, value)``: the base units filled (``min(qty, total size)``) and their value
        in the book's quote currency (so the average price is ``value / filled``).

    Raises:
        ValueError: a negative ``qty``.
    """
    if qty < 0:
        raise ValueError(f"qty must be >= 0, got {qty}")
    prices, cum_qty, cum_value = _cumulative(levels)
    if len(prices) == 0 or qty == 0:
        return 0.0, 0.0
    filled = min(float(qty), float(cum_qty[-1]))
    return filled, float(_value_at(prices, cum_qty, cum_value, np.array([filled]))[0])
