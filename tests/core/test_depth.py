"""Depth-aware sizing from top-N books, against hand-computed figures."""

from __future__ import annotations

import pytest

from arbstream.depth import size_from_books

ASKS = [[100.0, 1.0], [101.0, 2.0]]
BIDS = [[102.0, 1.5], [100.5, 1.0]]


def test_size_limited_by_depth() -> None:
    d = size_from_books(ASKS, BIDS, costs=0.003, min_net=0.0)
    assert d.max_size == 2.5  # every level is profitable; the bids run out at 2.5


def test_size_solved_inside_a_segment_and_best_profit() -> None:
    d = size_from_books(ASKS, BIDS, costs=0.01, min_net=0.0, notional=150.5)
    # between 1.5 and 2.5 both marginal prices are constant (ask 101, bid 100.5):
    # 153 + 100.5 x = 1.01 (150.5 + 101 x)  =>  x = 0.995 / 1.51
    assert d.max_size == pytest.approx(1.5 + 0.995 / 1.51, rel=1e-12)
    # profit P - 1.01 C: 1.0 at q = 1, 0.995 at 1.5, -0.515 at 2.5
    assert d.profit_size == 1.0 and d.profit == pytest.approx(1.0, rel=1e-12)
    assert d.buy_vwap == pytest.approx(150.5 / 1.5) and d.sell_vwap == pytest.approx(102.0)


def test_unprofitable_top_and_conversion_rate() -> None:
    assert size_from_books(ASKS, BIDS, costs=0.03, min_net=0.0).max_size == 0.0
    # proceeds in another currency at 0.5 per unit: never profitable
    assert size_from_books(ASKS, BIDS, costs=0.0, min_net=0.0, rate=0.5).max_size == 0.0
    thin = size_from_books(ASKS, BIDS, costs=0.0, min_net=0.0, notional=1e9)
    assert thin.buy_vwap is None and thin.sell_vwap is None


def test_empty_book_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one level"):
        size_from_books([], BIDS, costs=0.0, min_net=0.0)
