"""Fill rules on a small market of hand-written records: book walking against a level-by-level
loop, top of book capped at the quoted size, sequential legs' timing, and the unwind of a
partial fill booked as leg risk (the real-data checks are in test_backtest.py)."""

from __future__ import annotations

import pandas as pd
import pytest

from backtest.execution import ExecutionModel, execute, fill
from backtest.market import Market

T = 1_700_000_000_000


def market(books: bool = False) -> Market:
    quotes = pd.DataFrame([
        # exchange, symbol, exchange_ts, received_ts, bid, ask, bid_size, ask_size
        ("a", "BTC-USD", T, T, 99.0, 100.0, 1.0, 0.4),
        ("b", "BTC-USD", T, T, 102.0, 103.0, 2.0, 2.0),
        ("a", "BTC-USD", T + 500, T + 500, 98.0, 99.0, 1.0, 5.0),
        ("b", "BTC-USD", T + 900, T + 900, 101.0, 102.0, 2.0, 2.0),
    ], columns=["exchange", "symbol", "exchange_ts", "received_ts", "bid", "ask", "bid_size",
                "ask_size"])
    book = pd.DataFrame([("a", "BTC-USD", T, [[99.0, 1.0]], [[100.0, 0.4], [100.5, 0.3],
                                                            [101.0, 10.0]])],
                        columns=["exchange", "symbol", "exchange_ts", "bids", "asks"])
    return Market(quotes, book if books else None, max_age_ms=5_000)


SIGNAL = {"t_ms": T, "buy_exchange": "a", "sell_exchange": "b", "symbol": "BTC-USD",
          "sell_symbol": "BTC-USD", "cross_quote": False, "buy_fee": 0.001,
          "sell_fee": 0.002, "buy_ask": 100.0, "sell_bid": 102.0}


def test_book_walk_equals_a_level_loop() -> None:
    f = fill(market(books=True), ExecutionModel(), "a", "BTC-USD", "buy", 1.2, T)
    left, value = 1.2, 0.0
    for price, size in [[100.0, 0.4], [100.5, 0.3], [101.0, 10.0]]:
        take = min(left, size)
        value, left = value + take * price, left - take
    assert f.source == "book" and f.qty == 1.2 and f.value == pytest.approx(value, rel=1e-15)


def test_top_of_book_is_capped_and_later_records_are_unseen() -> None:
    m = market()
    f = fill(m, ExecutionModel(), "a", "BTC-USD", "buy", 1.0, T + 499)
    assert (f.source, f.qty, f.price) == ("top_of_book", 0.4, 100.0)
    g = fill(m, ExecutionModel(), "a", "BTC-USD", "buy", 1.0, T + 500)
    assert (g.qty, g.price) == (1.0, 99.0)
    assert fill(m, ExecutionModel(), "a", "BTC-USD", "buy", 1.0, T - 1).source == "none"
    assert fill(m, ExecutionModel(), "a", "BTC-USD", "buy", 1.0, T + 6_000).source == "none"


def test_partial_fill_is_unwound_as_leg_risk() -> None:
    """Buy 1.0 on a: only 0.4 at 100; sell 1.0 on b at 102: the 0.6 sold too many is bought
    back on b at its ask when both reports are back (latency 300 ms: t + 600 ms, 103)."""
    model = ExecutionModel(default_order_latency_ms=300.0)
    ex = execute(market(), model, SIGNAL, 1.0)
    assert ex.buy.qty == 0.4 and ex.sell.qty == 1.0 and ex.matched == 0.4
    assert ex.unwind is not None and ex.unwind.t_ms == T + 900 and ex.unwind.price == 102.0
    assert ex.cost == 40.0 and ex.proceeds == pytest.approx(0.4 * 102.0)
    assert ex.gross_profit == pytest.approx(0.4 * 102.0 - 40.0 - 40.0 * 0.003)
    assert ex.leg_risk == pytest.approx(0.6 * 102.0 * (1 - 0.002) - 0.6 * 102.0 * (1 + 0.002))


def test_sequential_legs_wait_for_the_buy_report() -> None:
    model = ExecutionModel(decision_latency_ms=100.0, default_order_latency_ms=200.0,
                           sequential=True)
    ex = execute(market(), model, SIGNAL, 0.3)
    assert ex.buy.t_ms == T + 300 and ex.sell.t_ms == T + 700
    assert ex.sell.requested == ex.buy.qty == 0.3
