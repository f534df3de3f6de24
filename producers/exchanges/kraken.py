"""Kraken adapter (WS v1, cryptofeed's ``Kraken`` class): ticker sizes and book times.

cryptofeed already maps Kraken's XBT/XDG to BTC/DOGE. Kraken v1 trades carry no id: they get a
content-derived ``trade_id`` and no dedupe id (:func:`producers.exchanges.normalize.
normalize_trade`).
"""

from __future__ import annotations

from decimal import Decimal

from cryptofeed.types import OrderBook

from producers.exchanges.profile import ExchangeProfile


def kraken_book_time(book: OrderBook) -> Decimal | None:
    """Latest level time of a Kraken v1 book update, seconds (snapshots: None → the receive
    time is used)."""
    raw = book.raw
    if not isinstance(raw, list):
        return None
    times = [
        Decimal(level[2])
        for part in raw if isinstance(part, dict)
        for key in ("a", "b") for level in part.get(key, ())
    ]
    return max(times) if times else None


#: Ticker sizes ``b[2]``/``a[2]``; the book's time is its latest level time.
PROFILE = ExchangeProfile(
    ticker_sizes=lambda raw: (raw[1]["b"][2], raw[1]["a"][2]),
    book_time=kraken_book_time,
)
