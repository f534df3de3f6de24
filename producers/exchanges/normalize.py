"""Normalization: cryptofeed symbols and objects → canonical symbols and records.

Pure functions: :func:`symbol_from_feed` and :func:`symbol_map` (cryptofeed's normalized spot
symbols ↔ our ``BASE-QUOTE``), and :func:`normalize_ticker`, :func:`normalize_trade`,
:func:`normalize_book`, :func:`quote_from_book`, which build the records of
:mod:`arbstream.schemas` wrapped in :class:`~producers.events.FeedEvent`\\ s.

Units: cryptofeed timestamps are float seconds since the epoch (UTC); records carry integer
milliseconds (UTC), floored (:func:`arbstream.timestamps.seconds_to_ms`). Prices and sizes are
``Decimal`` in cryptofeed and ``float`` in records. ``exchange_ts`` is the exchange's event time
when the message has one, else the receive time.

Identity (see :class:`~producers.events.FeedEvent`): ``sequence`` is set only where it is
contiguous per (exchange, channel, symbol), because the publisher counts gaps on it: Binance
trade ids (``t``, or ``a`` for aggTrade) and Coinbase ``trade_id``. ``dedupe_id`` is the
exchange's identity of the update where it has one that survives reconnects: Binance
bookTicker ``u`` and depth ``u``, Coinbase ticker ``sequence``, and trade ids (Binance,
Coinbase, Bitstamp, Bitfinex, Gemini, ...). Kraken (WS v1) trades carry no id; they get a
content-derived ``trade_id`` and no ``dedupe_id``. What each exchange carries is its
:class:`~producers.exchanges.profile.ExchangeProfile` (:func:`producers.exchanges.registry.
profile`).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from cryptofeed.defines import BUY, SELL
from cryptofeed.feed import Feed
from cryptofeed.types import OrderBook, Ticker
from cryptofeed.types import Trade as CfTrade

from arbstream.schemas import SYMBOL_RE, Book, Quote, Trade
from arbstream.timestamps import seconds_to_ms
from producers.events import FeedEvent
from producers.exchanges.registry import profile

#: Levels of one book side, best first: ``[(price, size), ...]``.
Levels = list[tuple[Decimal, Decimal]]

_symbol_cache: dict[tuple[str, str], str] = {}


# --- symbols ---------------------------------------------------------------------------------
def symbol_from_feed(feed_id: str, symbol: str) -> str:
    """cryptofeed's normalized spot symbol on feed ``feed_id`` → our canonical ``BASE-QUOTE``.

    Currency codes are upper-cased and the feed's own spellings mapped
    (:attr:`~producers.exchanges.profile.ExchangeProfile.currency_aliases`).

    >>> symbol_from_feed("BITFINEX", "IOT-ETH")
    'IOTA-ETH'

    Raises:
        ValueError: not a spot ``BASE-QUOTE`` pair (perpetuals, futures, currencies) or not
            matching :data:`arbstream.schemas.SYMBOL_RE`.
    """
    key = (feed_id, symbol)
    cached = _symbol_cache.get(key)
    if cached is not None:
        return cached
    parts = symbol.split("-")
    if len(parts) != 2:
        raise ValueError(f"{feed_id} {symbol!r} is not a spot BASE-QUOTE symbol")
    aliases = profile(feed_id).currency_aliases
    out = "-".join(aliases.get(p.upper(), p.upper()) for p in parts)
    if not SYMBOL_RE.match(out):
        raise ValueError(f"{feed_id} {symbol!r} → {out!r} does not match {SYMBOL_RE.pattern}")
    _symbol_cache[key] = out
    return out


def symbol_map(cls: type[Feed]) -> dict[str, str]:
    """Canonical symbol → cryptofeed normalized symbol, for every spot pair ``cls`` lists.

    Reads cryptofeed's symbol cache, fetching the exchange's REST symbol list when it is not
    loaded yet. When two pairs map to one canonical symbol, the one spelled that way natively
    wins.
    """
    out: dict[str, str] = {}
    for cf_sym in cls.symbol_mapping():
        try:
            canon = symbol_from_feed(cls.id, cf_sym)
        except ValueError:
            continue
        if canon not in out or cf_sym == canon:
            out[canon] = cf_sym
    return out


# --- records ---------------------------------------------------------------------------------
def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def normalize_ticker(exchange: str, ticker: Ticker, receipt_ts: float) -> FeedEvent:
    """cryptofeed ``Ticker`` → ``bbo`` FeedEvent with a :class:`~arbstream.schemas.Quote`.

    Sizes come from the raw message where the exchange sends them (Binance ``B``/``A``,
    Kraken ``b[2]``/``a[2]``, Bitfinex ticker fields 1 and 3, Coinbase ``best_*_size``),
    else None.

    Args:
        exchange: our exchange id for the record.
        ticker: cryptofeed ticker (``timestamp`` float s or None).
        receipt_ts: receive time, float seconds.

    Raises:
        ValueError: the quote fails validation (crossed, non-positive, bad symbol...).
    """
    prof = profile(ticker.exchange)
    bid_size, ask_size = prof.ticker_sizes(ticker.raw)
    ident = prof.ticker_id(ticker.raw)
    quote = Quote.build(
        sequence=ident,
        exchange=exchange,
        symbol=symbol_from_feed(ticker.exchange, ticker.symbol),
        bid=float(ticker.bid),
        ask=float(ticker.ask),
        bid_size=_float(bid_size),
        ask_size=_float(ask_size),
        exchange_ts=seconds_to_ms(
            ticker.timestamp if ticker.timestamp is not None else receipt_ts),
        received_ts=seconds_to_ms(receipt_ts),
    )
    return FeedEvent("bbo", quote, None, None if ident is None else str(ident))


def anonymous_trade_id(trade: CfTrade) -> str:
    """``<time s>:<price>:<size>:<side>``: the id of a trade the exchange sends without one."""
    return f"{Decimal(str(trade.timestamp))}:{trade.price}:{trade.amount}:{trade.side}"


def normalize_trade(exchange: str, trade: CfTrade, receipt_ts: float, *,
                    ordinal: int = 0) -> FeedEvent:
    """cryptofeed ``Trade`` → ``trades`` FeedEvent with a :class:`~arbstream.schemas.Trade`.

    ``side`` is the taker side. Without an exchange trade id (Kraken v1) the ``trade_id`` is
    :func:`anonymous_trade_id` plus ``#<ordinal>`` for the ordinal-th identical trade in one
    message, and ``dedupe_id`` is None.

    Raises:
        ValueError: the trade fails validation.
    """
    prof = profile(trade.exchange)
    tid = trade.id
    sequence = int(tid) if tid is not None and prof.trade_ids_contiguous else None
    record = Trade(
        exchange=exchange,
        symbol=symbol_from_feed(trade.exchange, trade.symbol),
        trade_id=tid if tid is not None else (
            anonymous_trade_id(trade) + (f"#{ordinal}" if ordinal else "")
        ),
        price=float(trade.price),
        size=float(trade.amount),
        side=trade.side if trade.side in (BUY, SELL) else None,
        exchange_ts=seconds_to_ms(trade.timestamp if trade.timestamp is not None else receipt_ts),
        received_ts=seconds_to_ms(receipt_ts),
    )
    return FeedEvent("trades", record, sequence, tid)


def top_levels(book: OrderBook, depth: int) -> tuple[Levels, Levels]:
    """The best ``depth`` (bids, asks) of a cryptofeed ``OrderBook``, best first."""
    bids, asks = book.book.bids, book.book.asks
    return (
        [bids.index(i) for i in range(min(depth, len(bids)))],
        [asks.index(i) for i in range(min(depth, len(asks)))],
    )


def _book_times(book: OrderBook, receipt_ts: float) -> tuple[int, int]:
    ts = book.timestamp
    if ts is None:
        ts = profile(book.exchange).book_time(book)
    return seconds_to_ms(ts if ts is not None else receipt_ts), seconds_to_ms(receipt_ts)


def _book_sequence(book: OrderBook) -> int | None:
    if profile(book.exchange).book_sequence and book.sequence_number is not None:
        return int(book.sequence_number)
    return None


def normalize_book(exchange: str, book: OrderBook, receipt_ts: float, depth: int, *,
                   top: tuple[Levels, Levels] | None = None) -> FeedEvent:
    """cryptofeed ``OrderBook`` → ``book`` FeedEvent: the top ``depth`` levels per side.

    Levels come from ``book.book.bids``/``asks`` (best first), or ``top`` when the caller has
    them already (:func:`top_levels`). ``Book.sequence`` and ``dedupe_id`` are the book's
    update id where it is stable (Binance ``u`` / ``lastUpdateId``). ``exchange_ts`` is the
    update's exchange time (Kraken: its latest level time), else the receive time.

    Raises:
        ValueError: the book fails validation (crossed...).
    """
    if top is None:
        top = top_levels(book, depth)
    exchange_ts, received_ts = _book_times(book, receipt_ts)
    seq = _book_sequence(book)
    record = Book(
        exchange=exchange,
        symbol=symbol_from_feed(book.exchange, book.symbol),
        depth=depth,
        bids=[(float(p), float(s)) for p, s in top[0]],
        asks=[(float(p), float(s)) for p, s in top[1]],
        sequence=seq,
        exchange_ts=exchange_ts,
        received_ts=received_ts,
    )
    return FeedEvent("book", record, None, None if seq is None else str(seq))


def quote_from_book(exchange: str, book: OrderBook, receipt_ts: float) -> FeedEvent | None:
    """Best bid/offer (with sizes) from the top of a cryptofeed ``OrderBook``.

    For exchanges without a ticker channel (Bitstamp, Gemini...). None while a side is empty.

    Raises:
        ValueError: the quote fails validation (crossed book...).
    """
    bids, asks = book.book.bids, book.book.asks
    if not len(bids) or not len(asks):
        return None
    (bid, bid_size), (ask, ask_size) = bids.index(0), asks.index(0)
    exchange_ts, received_ts = _book_times(book, receipt_ts)
    seq = _book_sequence(book)
    quote = Quote.build(
        sequence=seq,
        exchange=exchange,
        symbol=symbol_from_feed(book.exchange, book.symbol),
        bid=float(bid), ask=float(ask), bid_size=float(bid_size), ask_size=float(ask_size),
        exchange_ts=exchange_ts, received_ts=received_ts,
    )
    return FeedEvent("bbo", quote, None, None if seq is None else str(seq))
