"""Building one exchange's cryptofeed Feed whose callbacks emit canonical FeedEvents.

:func:`make_feed` picks the Feed class from the registry (:mod:`producers.exchanges.registry`),
maps our channels (``bbo``, ``trades``, ``book``) and canonical symbols to cryptofeed's,
optionally points it at other URLs (:func:`~producers.exchanges.endpoints.with_endpoints`), and
wires a :class:`Normalizer` as its callbacks: each cryptofeed object is normalized
(:mod:`producers.exchanges.normalize`) and handed to ``await on_event(event)``.

Connection handling (reconnects, backoff) stays with cryptofeed's ``ConnectionHandler`` via
``feed.start(loop)`` or :func:`producers.resilience.start_resilient`; nothing here logs per
message.
"""

from __future__ import annotations

import json
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Literal

from cryptofeed.defines import L2_BOOK, TICKER, TRADES
from cryptofeed.feed import Feed
from cryptofeed.types import OrderBook, Ticker
from cryptofeed.types import Trade as CfTrade

from producers.events import Channel, FeedEvent
from producers.exchanges.endpoints import TLSHTTPAsyncConn, with_endpoints
from producers.exchanges.normalize import (
    Levels,
    anonymous_trade_id,
    normalize_book,
    normalize_ticker,
    normalize_trade,
    quote_from_book,
    symbol_from_feed,
    symbol_map,
    top_levels,
)
from producers.exchanges.registry import EXCHANGES, exchange_id

CHANNELS: tuple[Channel, ...] = ("bbo", "trades", "book")

OnEvent = Callable[[FeedEvent], Awaitable[None]]
#: ``await on_reject(exchange, raw, reason)``: same shape as ``Publisher.deadletter``.
OnReject = Callable[[str, str, str], Awaitable[None]]


class RecordRejected(ValueError):
    """Records normalized from one frame failed validation (raised once the frame is done).

    The frame's other records were still emitted. ``producers.resilience`` dead-letters the
    frame with this message as the reason; cryptofeed's own ConnectionHandler reconnects.
    """


#: Reasons of records rejected while the current task handles one frame (see make_feed).
_PENDING: ContextVar[list[str] | None] = ContextVar("arbstream_rejected", default=None)

#: What normalizing a cryptofeed object may raise for a bad record.
_BAD_RECORD = (ValueError, ArithmeticError, LookupError, TypeError)


def _raw_text(obj: Any) -> str:
    raw = getattr(obj, "raw", None)
    if raw is None:
        raw = obj.to_dict()
    return json.dumps(raw, default=str)


class Normalizer:
    """The cryptofeed callbacks of one feed: normalize, then ``await on_event(event)``.

    Book-derived quotes are emitted only when the best bid/ask or their sizes change, and
    book events only when the top ``book_depth`` levels change (cryptofeed calls back on every
    update, most of them deeper in the book). A record that fails validation is counted in
    :attr:`rejected` and passed to ``on_reject(exchange, raw_json, reason)`` when given;
    otherwise, inside a frame handled by :func:`make_feed`'s message handler, the handler
    raises :class:`RecordRejected` after the frame (so the frame can be dead-lettered whole),
    and elsewhere (REST snapshots) it is dropped.

    Attributes:
        events: FeedEvents handed to ``on_event``.
        rejected: records that failed normalization or validation.
    """

    def __init__(self, exchange: str, on_event: OnEvent, *, book_depth: int = 10,
                 emit_book: bool = False, bbo_from_book: bool = False,
                 on_reject: OnReject | None = None) -> None:
        self.exchange = exchange
        self.on_event = on_event
        self.on_reject = on_reject
        self.book_depth = book_depth
        self.emit_book = emit_book
        self.bbo_from_book = bbo_from_book
        self.events = 0
        self.rejected = 0
        self._last_top: dict[str, tuple[Levels, Levels]] = {}
        self._last_bbo: dict[str, tuple] = {}
        self._anon: tuple[float | None, Counter[str]] = (None, Counter())

    async def _emit(self, event: FeedEvent | None) -> None:
        if event is not None:
            self.events += 1
            await self.on_event(event)

    async def _reject(self, obj: Any, exc: Exception) -> None:
        self.rejected += 1
        reason = f"{type(exc).__name__}: {exc}"
        if self.on_reject is not None:
            await self.on_reject(self.exchange, _raw_text(obj), reason)
            return
        pending = _PENDING.get()
        if pending is not None:
            pending.append(reason)

    async def on_ticker(self, ticker: Ticker, receipt_ts: float) -> None:
        """cryptofeed ``TICKER`` callback."""
        try:
            event = normalize_ticker(self.exchange, ticker, receipt_ts)
        except _BAD_RECORD as exc:
            await self._reject(ticker, exc)
            return
        await self._emit(event)

    async def on_trade(self, trade: CfTrade, receipt_ts: float) -> None:
        """cryptofeed ``TRADES`` callback."""
        try:
            ordinal = 0
            if trade.id is None:  # number identical anonymous trades within one message
                when, seen = self._anon
                if when != receipt_ts:
                    seen = Counter()
                    self._anon = (receipt_ts, seen)
                key = f"{trade.symbol}|{anonymous_trade_id(trade)}"
                ordinal = seen[key]
                seen[key] += 1
            event = normalize_trade(self.exchange, trade, receipt_ts, ordinal=ordinal)
        except _BAD_RECORD as exc:
            await self._reject(trade, exc)
            return
        await self._emit(event)

    async def on_book(self, book: OrderBook, receipt_ts: float) -> None:
        """cryptofeed ``L2_BOOK`` callback: book snapshots and/or book-derived quotes."""
        if self.emit_book:
            try:
                top = top_levels(book, self.book_depth)
                event = None
                if self._last_top.get(book.symbol) != top:
                    event = normalize_book(self.exchange, book, receipt_ts, self.book_depth,
                                           top=top)
                    self._last_top[book.symbol] = top
            except _BAD_RECORD as exc:
                await self._reject(book, exc)
            else:
                await self._emit(event)
        if self.bbo_from_book:
            bids, asks = book.book.bids, book.book.asks
            best = (bids.index(0) if len(bids) else None, asks.index(0) if len(asks) else None)
            if self._last_bbo.get(book.symbol) == best:
                return
            self._last_bbo[book.symbol] = best
            try:
                event = quote_from_book(self.exchange, book, receipt_ts)
            except _BAD_RECORD as exc:
                await self._reject(book, exc)
                return
            await self._emit(event)


def _raising_rejections(handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Wrap a feed's ``message_handler`` to raise :class:`RecordRejected` after a frame."""

    async def message_handler(msg: str, conn: Any, timestamp: float) -> None:
        token = _PENDING.set([])
        try:
            await handler(msg, conn, timestamp)
            pending = _PENDING.get()
        finally:
            _PENDING.reset(token)
        if pending:
            raise RecordRejected("; ".join(pending))

    return message_handler


def _cf_channels(ex: str, cls: type[Feed], wanted: set[str],
                 bbo_source: str) -> tuple[set[str], bool]:
    """cryptofeed channels for our ``wanted`` ones, and whether quotes come from the book."""
    available = cls.websocket_channels
    cf_channels: set[str] = set()
    bbo_from_book = False
    if "bbo" in wanted:
        use_ticker = bbo_source == "ticker" or (bbo_source == "auto" and TICKER in available)
        need = TICKER if use_ticker else L2_BOOK
        if need not in available:
            raise ValueError(f"{ex}: no {need} channel for bbo")
        cf_channels.add(need)
        bbo_from_book = not use_ticker
    for ours, theirs in (("trades", TRADES), ("book", L2_BOOK)):
        if ours in wanted:
            if theirs not in available:
                raise ValueError(f"{ex}: cryptofeed {cls.__name__} has no {theirs} channel")
            cf_channels.add(theirs)
    return cf_channels, bbo_from_book


def _cf_symbols(ex: str, cls: type[Feed], symbols: Iterable[str]) -> list[str]:
    """cryptofeed's normalized symbols for canonical ``symbols``, in order."""
    known = symbol_map(cls)
    cf_symbols = []
    for sym in symbols:
        if sym not in known:
            hint = ""
            if sym in cls.symbol_mapping():
                try:
                    hint = f"; its canonical name is {symbol_from_feed(cls.id, sym)!r}"
                except ValueError:
                    hint = "; it is not a spot BASE-QUOTE pair"
            raise ValueError(f"{ex}: unknown symbol {sym!r}{hint}")
        cf_symbols.append(known[sym])
    if not cf_symbols:
        raise ValueError("no symbols")
    return cf_symbols


def make_feed(
    exchange: str,
    symbols: Iterable[str],
    channels: Collection[str],
    on_event: OnEvent,
    *,
    book_depth: int = 10,
    ws_url: str | None = None,
    rest_url: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30,
    bbo_source: Literal["auto", "ticker", "book"] = "auto",
    on_reject: OnReject | None = None,
    feed_options: Mapping[str, Any] | None = None,
) -> Feed:
    """Build the cryptofeed Feed of one exchange, emitting canonical FeedEvents.

    Channels map to cryptofeed channels: ``bbo`` → ``TICKER`` when the feed has one (with
    ``bbo_source="auto"``), else quotes derived from ``L2_BOOK``; ``trades`` → ``TRADES``;
    ``book`` → ``L2_BOOK`` with ``max_depth=book_depth``, emitted as top-``book_depth``
    snapshots. Start it with ``feed.start(loop)`` (or wrap its ``connect()``); cryptofeed
    reads the exchange's REST symbol list when the feed is built unless it is loaded already
    (``testing.recorded_rest.preload_symbols`` loads it from recorded bodies).

    Args:
        exchange: exchange id or cryptofeed name (``"kraken"``, ``"OKX"``...).
        symbols: canonical ``BASE-QUOTE`` symbols.
        channels: subset of ``{"bbo", "trades", "book"}``.
        on_event: awaited with every FeedEvent, in order.
        book_depth: levels per side in book records (and cryptofeed ``max_depth``).
        ws_url, rest_url: endpoint overrides (see :func:`with_endpoints`).
        ssl_context: TLS context for the websocket, and for REST snapshots when ``rest_url``
            is ``https``.
        timeout: seconds without a message before cryptofeed restarts the connection.
        bbo_source: ``"ticker"`` or ``"book"`` forces where quotes come from.
        on_reject: awaited with ``(exchange, raw_json, reason)`` for each record that fails
            validation (``Publisher.deadletter`` fits). Without it the message handler raises
            :class:`RecordRejected` after the frame, for the connection wrapper to dead-letter.
        feed_options: extra keyword arguments for the Feed class (override the defaults
            above), e.g. ``{"checksum_validation": True}``.

    Returns:
        the Feed, with its :class:`Normalizer` as ``feed.normalizer``; ``feed.connect()``
        hands out the wrapped ``feed.message_handler``.

    Raises:
        ValueError: unknown exchange, channel or symbol, or a channel the exchange lacks.
    """
    ex = exchange_id(exchange)
    cls = EXCHANGES[ex]
    wanted = set(channels)
    if not wanted or wanted - set(CHANNELS):
        raise ValueError(f"channels must be a non-empty subset of {CHANNELS}, got {channels!r}")
    if book_depth < 1:
        raise ValueError("book_depth must be >= 1")
    if bbo_source not in ("auto", "ticker", "book"):
        raise ValueError(f"bbo_source must be auto, ticker or book, not {bbo_source!r}")
    if ws_url or rest_url or ssl_context is not None:
        cls = with_endpoints(cls, ws_url=ws_url, rest_url=rest_url, ssl_context=ssl_context)
    cf_channels, bbo_from_book = _cf_channels(ex, cls, wanted, bbo_source)
    cf_symbols = _cf_symbols(ex, cls, symbols)

    norm = Normalizer(ex, on_event, book_depth=book_depth, emit_book="book" in wanted,
                      bbo_from_book=bbo_from_book, on_reject=on_reject)
    callbacks: dict[str, Any] = {}
    if TICKER in cf_channels:
        callbacks[TICKER] = norm.on_ticker
    if TRADES in cf_channels:
        callbacks[TRADES] = norm.on_trade
    if L2_BOOK in cf_channels:
        callbacks[L2_BOOK] = norm.on_book
    kwargs: dict[str, Any] = {
        "symbols": cf_symbols, "channels": sorted(cf_channels), "callbacks": callbacks,
        "max_depth": book_depth, "timeout": timeout,
    }
    kwargs.update(feed_options or {})
    feed = cls(**kwargs)
    feed.normalizer = norm
    feed.message_handler = _raising_rejections(feed.message_handler)
    if ssl_context is not None and rest_url and rest_url.startswith("https://"):
        feed.http_conn = TLSHTTPAsyncConn(feed.id, feed.http_proxy, ssl_context)
    return feed
