"""What an exchange adapter hands to the publisher: one normalized record plus its identity.

Adapters (``producers/exchanges/``) turn library callbacks into :class:`FeedEvent`s; the
publisher (``producers/publisher.py``) dedupes them, counts sequence gaps and produces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from arbstream.schemas import Book, Quote, Trade

Channel = Literal["bbo", "trades", "book"]


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One normalized market-data record.

    Attributes:
        channel: ``bbo`` (best bid/offer → ``md.<exchange>.quotes``), ``trades`` or ``book``.
        record: the canonical record.
        sequence: the exchange's sequence number for this (exchange, channel, symbol) stream,
            when it numbers its messages; used to count gaps. ``None`` otherwise.
        dedupe_id: identity of the update for duplicate suppression after reconnects: the
            sequence number or trade id as text; ``None`` when the exchange gives neither.
    """

    channel: Channel
    record: Quote | Trade | Book
    sequence: int | None = None
    dedupe_id: str | None = None

    @property
    def exchange(self) -> str:
        """The record's exchange id."""
        return self.record.exchange

    @property
    def symbol(self) -> str:
        """The record's canonical ``BASE-QUOTE`` symbol."""
        return self.record.symbol
