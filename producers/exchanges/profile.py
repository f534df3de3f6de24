"""What one cryptofeed feed carries beyond cryptofeed's normalized objects.

An adapter module (:mod:`producers.exchanges.binance`, ``coinbase``, ``kraken``, ``bitfinex``)
describes its exchange with one :class:`ExchangeProfile`; :data:`producers.exchanges.registry.
PROFILES` maps cryptofeed feed ids to them, and every other feed gets :data:`DEFAULT_PROFILE`
(no sizes, no ids, no aliases), which is all a configuration-only exchange needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from cryptofeed.types import OrderBook


def _none(_raw: Any) -> Any:
    return None


def _no_sizes(_raw: Any) -> tuple[None, None]:
    return None, None


@dataclass(frozen=True)
class ExchangeProfile:
    """Per-feed extras read from the raw messages; the defaults read nothing.

    Attributes:
        ticker_sizes: ticker ``raw`` → (bid size, ask size), each None when absent.
        ticker_id: ticker ``raw`` → the exchange's update id (dedupe), or None.
        trade_ids_contiguous: trade ids are integers contiguous per symbol
            (→ ``FeedEvent.sequence``).
        book_sequence: ``OrderBook.sequence_number`` is a per-symbol update id that survives
            reconnects.
        book_time: book → exchange time (seconds) when cryptofeed leaves
            ``OrderBook.timestamp`` empty.
        currency_aliases: currency codes the exchange spells its own way → canonical code
            (upper case), beyond the ones cryptofeed already maps.
    """

    ticker_sizes: Callable[[Any], tuple[Any, Any]] = _no_sizes
    ticker_id: Callable[[Any], int | None] = _none
    trade_ids_contiguous: bool = False
    book_sequence: bool = False
    book_time: Callable[[OrderBook], Decimal | None] = _none
    currency_aliases: Mapping[str, str] = field(default_factory=dict)


#: The profile of every feed without one of its own.
DEFAULT_PROFILE = ExchangeProfile()
