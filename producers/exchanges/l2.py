"""Applying price-level updates to a cryptofeed ``OrderBook``, shared by the adapters' feeds
(:mod:`producers.exchanges.coinbase`, :mod:`producers.exchanges.bitstamp`)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any


def apply_level(book: Any, side: str, price: str | Decimal, size: str | Decimal,
                delta: dict[str, list]) -> None:
    """Set ``price`` to ``size`` on ``side`` (``"bid"``/``"ask"``) of ``book``; size 0 removes
    the level. Each change is appended to ``delta[side]`` as ``(price, size)`` Decimals, the
    shape cryptofeed's ``book_callback`` expects."""
    price, size = Decimal(price), Decimal(size)
    levels = book.book[side]
    if size == 0:
        if price in levels:
            del levels[price]
            delta[side].append((price, size))
    else:
        levels[price] = size
        delta[side].append((price, size))
