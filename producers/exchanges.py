"""Exchange adapters: cryptofeed feeds → canonical :class:`~producers.events.FeedEvent`s.

cryptofeed (2.4.1) owns the websocket protocols: one :class:`cryptofeed.feed.Feed` subclass per
exchange parses frames into cryptofeed ``Ticker``/``Trade``/``OrderBook`` objects. This module
adds what arbstream needs on top:

* a **registry** (:data:`EXCHANGES`, :func:`feed_class`) from our lower-case exchange ids to
  Feed classes: ``coinbase`` (Coinbase Exchange ws-feed, :mod:`producers.coinbase_exchange`),
  ``binance``/``binance_us`` (plus raw ``@trade`` trades), ``bitstamp`` (µs snapshot sync),
  ``kraken``, ``bitfinex``, ``gemini``, and every other cryptofeed exchange under its
  ``EXCHANGE_MAP`` name lower-cased with ``.`` → ``_`` (``okx``, ``bybit``, ``crypto_com``...),
  so adding an exchange is configuration only;
* :func:`make_feed`, which builds a Feed for canonical symbols and channels (``bbo``,
  ``trades``, ``book``), optionally pointed at other URLs (a local replay server), whose
  callbacks normalize to FeedEvents and ``await on_event(event)``;
* pure **normalization** functions (:func:`normalize_ticker`, :func:`normalize_trade`,
  :func:`normalize_book`, :func:`quote_from_book`) and symbol mapping
  (:func:`canonical_symbol`);
* :func:`preload_symbols`: cryptofeed reads REST symbol lists when a Feed is built; this loads
  them from recorded REST bodies (``{url: body}``) instead, for tests and local replay.

Units: cryptofeed timestamps are float seconds since the epoch (UTC); records carry integer
milliseconds (UTC), truncated (:func:`to_ms`). Prices and sizes are ``Decimal`` in cryptofeed
and ``float`` in records. ``exchange_ts`` is the exchange's event time when the message has one,
else the receive time.

Identity (see :class:`~producers.events.FeedEvent`): ``sequence`` is set only where it is
contiguous per (exchange, channel, symbol), because the publisher counts gaps on it: Binance
trade ids (``t``, or ``a`` for aggTrade) and Coinbase ``trade_id``. ``dedupe_id`` is the
exchange's identity of the update where it has one that survives reconnects: Binance
bookTicker ``u`` and depth ``u``, Coinbase ticker ``sequence``, and trade ids (Binance,
Coinbase, Bitstamp, Bitfinex, Gemini, ...). Kraken (WS v1) trades carry no id; they get a
content-derived ``trade_id`` and no ``dedupe_id``. Bitfinex sequence numbers are per connection
(cryptofeed enables and checks them) and restart on reconnect, so they are not used.

Connection handling (reconnects, backoff) stays with cryptofeed's ``ConnectionHandler`` via
``feed.start(loop)``; nothing here logs per message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json as stdjson
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Literal

import aiohttp
from cryptofeed.connection import HTTPAsyncConn, HTTPSync, WSAsyncConn
from cryptofeed.defines import BUY, L2_BOOK, SELL, TICKER, TRADES
from cryptofeed.exchanges import EXCHANGE_MAP, Binance, BinanceUS, Bitstamp
from cryptofeed.exchanges import Coinbase as CoinbaseAdvanced
from cryptofeed.feed import Feed
from cryptofeed.types import OrderBook, Ticker
from cryptofeed.types import Trade as CfTrade
from yapic import json

from arbstream.schemas import SYMBOL_RE, Book, Quote, Trade
from producers.coinbase_exchange import COINBASE_EXCHANGE, CoinbaseExchange
from producers.events import Channel, FeedEvent
from producers.l2 import apply_level

__all__ = [
    "CHANNELS",
    "CURRENCY_ALIASES",
    "EXCHANGES",
    "PROFILES",
    "ArbBinance",
    "ArbBinanceUS",
    "ArbBitstamp",
    "Normalizer",
    "RecordRejected",
    "RestBodies",
    "canonical_symbol",
    "exchange_id",
    "feed_class",
    "make_feed",
    "normalize_book",
    "normalize_ticker",
    "normalize_trade",
    "preload_symbols",
    "quote_from_book",
    "supported_exchanges",
    "symbol_map",
    "to_ms",
    "with_endpoints",
]

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


# --------------------------------------------------------------------------------------------
# Feed subclasses
# --------------------------------------------------------------------------------------------
class _BinanceSpot:
    """Binance spot additions: raw ``@trade`` trades and deep REST book snapshots.

    cryptofeed 2.4.1 subscribes ``@aggTrade`` and drops ``@trade`` frames (``e == "trade"``:
    ``t`` trade id, ``p`` price, ``q`` quantity, ``T`` trade time ms, ``m`` buyer is maker).
    These feeds subscribe ``@trade`` for ``TRADES`` and parse both. Book snapshots are fetched
    with ``limit=snapshot_limit`` (1000) whatever ``max_depth`` is, so the top levels stay
    right after the snapshot's levels are consumed; ``max_depth`` only trims what callbacks
    see.
    """

    snapshot_limit = 1000

    async def _raw_trade(self, msg: dict, timestamp: float) -> None:
        t = CfTrade(
            self.id,
            self.exchange_symbol_to_std_symbol(msg["s"]),
            SELL if msg["m"] else BUY,
            Decimal(msg["q"]),
            Decimal(msg["p"]),
            self.timestamp_normalize(msg["T"]),
            id=str(msg["t"]),
            raw=msg,
        )
        await self.callback(TRADES, t, timestamp)

    async def _snapshot(self, pair: str) -> None:
        limit = max(self.snapshot_limit, self.max_depth or 0)
        limit = next((d for d in self.valid_depths if d >= limit), self.valid_depths[-1])
        url = self.rest_endpoints[0].route("l2book", self.sandbox).format(pair, limit)
        resp = json.loads(await self.http_conn.read(url), parse_float=Decimal)
        std_pair = self.exchange_symbol_to_std_symbol(pair)
        self.last_update_id[std_pair] = resp["lastUpdateId"]
        self._l2_book[std_pair] = OrderBook(
            self.id, std_pair, max_depth=self.max_depth,
            bids={Decimal(p): Decimal(s) for p, s in resp["bids"]},
            asks={Decimal(p): Decimal(s) for p, s in resp["asks"]},
        )
        ts = self.timestamp_normalize(resp["E"]) if "E" in resp else None
        await self.book_callback(
            L2_BOOK, self._l2_book[std_pair], time.time(), timestamp=ts, raw=resp,
            sequence_number=resp["lastUpdateId"],
        )

    async def message_handler(self, msg: str, conn: Any, timestamp: float) -> None:
        """Combined-stream frame ``{"stream": "<sym>@<chan>", "data": {...}}`` → callbacks."""
        if self.requires_authentication:
            await super().message_handler(msg, conn, timestamp)
            return
        frame = json.loads(msg, parse_float=Decimal)
        if not isinstance(frame, dict) or "stream" not in frame:
            return  # e.g. {"result": null, "id": 1} acknowledging a SUBSCRIBE request
        pair = frame["stream"].split("@", 1)[0].upper()
        data = frame["data"]
        kind = data.get("e")
        if kind == "trade":
            await self._raw_trade(data, timestamp)
        elif kind == "depthUpdate":
            await self._book(data, pair, timestamp)
        elif kind == "aggTrade":
            await self._trade(data, timestamp)
        elif kind == "kline":
            await self._candle(data, timestamp)
        elif kind is None and "A" in data:
            await self._ticker(data, timestamp)


class ArbBinance(_BinanceSpot, Binance):
    """Binance spot with ``@trade`` raw trades (see :class:`_BinanceSpot`)."""

    websocket_channels = {**Binance.websocket_channels, TRADES: "trade"}


class ArbBinanceUS(_BinanceSpot, BinanceUS):
    """Binance.US spot with ``@trade`` raw trades (see :class:`_BinanceSpot`)."""

    websocket_channels = {**BinanceUS.websocket_channels, TRADES: "trade"}


class ArbBitstamp(Bitstamp):
    """Bitstamp with the REST snapshot and ``diff_order_book`` synchronized on microseconds.

    cryptofeed compares whole seconds (``timestamp``), so diffs from the snapshot's own second
    that the snapshot already contains are applied again and can leave stale levels. Here a
    diff is skipped while its ``microtimestamp`` is not after the snapshot's, and the snapshot
    event carries the snapshot's ``microtimestamp``.

    Args:
        snapshot_delay: seconds to wait after subscribing before fetching snapshots, so diffs
            are already buffered (cryptofeed waits 5 s).
    """

    def __init__(self, snapshot_delay: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot_delay = snapshot_delay

    async def _snapshot(self, pairs: list, conn: Any) -> None:
        await asyncio.sleep(self.snapshot_delay)
        for pair in pairs:
            url = self.rest_endpoints[0].route("l2book", self.sandbox).format(pair)
            r = json.loads(await self.http_conn.read(url), parse_float=Decimal)
            std_pair = self.exchange_symbol_to_std_symbol(pair)
            micro = int(r.get("microtimestamp") or int(r["timestamp"]) * 1_000_000)
            self.last_update_id[std_pair] = micro
            self._l2_book[std_pair] = OrderBook(
                self.id, std_pair, max_depth=self.max_depth,
                asks={Decimal(p): Decimal(s) for p, s in r["asks"]},
                bids={Decimal(p): Decimal(s) for p, s in r["bids"]},
            )
            await self.book_callback(
                L2_BOOK, self._l2_book[std_pair], time.time(),
                timestamp=self.timestamp_normalize(micro), raw=r,
            )

    async def _process_l2_book(self, msg: dict, timestamp: float) -> None:
        data = msg["data"]
        pair = self.exchange_symbol_to_std_symbol(msg["channel"].split("_")[-1])
        micro = int(data["microtimestamp"])
        snap = self.last_update_id.get(pair)
        if snap is not None:
            if micro <= snap:
                return
            del self.last_update_id[pair]
        book = self._l2_book[pair]
        delta: dict[str, list] = {"bid": [], "ask": []}
        for side in ("bid", "ask"):
            for price, size in data[side + "s"]:
                apply_level(book, side, price, size, delta)
        await self.book_callback(
            L2_BOOK, book, timestamp, timestamp=self.timestamp_normalize(micro), delta=delta,
            raw=msg,
        )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
def _id_of(name: str) -> str:
    return name.strip().lower().replace(".", "_").replace("-", "_")


def _build_registry() -> dict[str, type[Feed]]:
    reg = {_id_of(name): cls for name, cls in EXCHANGE_MAP.items()}
    reg.update({
        "coinbase": CoinbaseExchange,  # cryptofeed's COINBASE is Advanced Trade (keys needed)
        "coinbase_advanced": CoinbaseAdvanced,
        "binance": ArbBinance,
        "binance_us": ArbBinanceUS,
        "bitstamp": ArbBitstamp,
    })
    return dict(sorted(reg.items()))


#: Our exchange id (lower-case, ``[a-z][a-z0-9_]*``) → cryptofeed Feed class.
EXCHANGES: dict[str, type[Feed]] = _build_registry()


def supported_exchanges() -> list[str]:
    """Every exchange id :func:`feed_class` accepts, sorted."""
    return list(EXCHANGES)


def exchange_id(name: str) -> str:
    """Our canonical id for an exchange name (``"OKX"``, ``"crypto.com"``, ``"binance-us"``).

    Raises:
        ValueError: unknown exchange, listing the supported ids.
    """
    key = _id_of(name)
    if key not in EXCHANGES:
        raise ValueError(
            f"unknown exchange {name!r}; supported: {', '.join(supported_exchanges())}"
        )
    return key


def feed_class(name: str) -> type[Feed]:
    """The cryptofeed Feed class registered for ``name`` (see :func:`exchange_id`)."""
    return EXCHANGES[exchange_id(name)]


# --------------------------------------------------------------------------------------------
# Symbols
# --------------------------------------------------------------------------------------------
#: Currency codes an exchange spells its own way → canonical code, per cryptofeed feed id.
#: cryptofeed already maps Kraken XBT/XDG → BTC/DOGE and Bitfinex UST/BCHN → USDT/BCH.
#: Bitfinex: its ``/v2/conf/pub:map:currency:sym`` table (2021), unambiguous entries only;
#: note ``DOG`` is MDOGE on Bitfinex, not DOGE.
CURRENCY_ALIASES: dict[str, dict[str, str]] = {
    "BITFINEX": {
        "ABS": "ABYSS", "AIO": "AION", "ALG": "ALGO", "AMP": "AMPL", "ATO": "ATOM",
        "CTX": "CTXC", "DAT": "DATA", "DOG": "MDOGE", "DRN": "DRGN", "DSH": "DASH",
        "EUS": "EURS", "EUT": "EURT", "GSD": "GUSD", "IOS": "IOST", "IOT": "IOTA",
        "MIT": "MITH", "MNA": "MANA", "NCA": "NCASH", "OMN": "OMNI", "PAS": "PASS",
        "POY": "POLY", "QSH": "QASH", "QTM": "QTUM", "RBT": "RBTC", "SNG": "SNGLS",
        "SPK": "SPANK", "STJ": "STORJ", "TSD": "TUSD", "UDC": "USDC", "USK": "USDK",
        "UTN": "UTNP", "VSY": "VSYS", "WBT": "WBTC", "XCH": "XCHF", "YGG": "YEED",
        "YYW": "YOYOW",
    },
}

_canonical_cache: dict[tuple[str, str], str] = {}


def canonical_symbol(feed_id: str, symbol: str) -> str:
    """cryptofeed's normalized spot symbol on feed ``feed_id`` → our canonical ``BASE-QUOTE``.

    >>> canonical_symbol("BITFINEX", "IOT-ETH")
    'IOTA-ETH'

    Raises:
        ValueError: not a spot ``BASE-QUOTE`` pair (perpetuals, futures, currencies) or not
            matching :data:`arbstream.schemas.SYMBOL_RE`.
    """
    key = (feed_id, symbol)
    cached = _canonical_cache.get(key)
    if cached is not None:
        return cached
    parts = symbol.split("-")
    if len(parts) != 2:
        raise ValueError(f"{feed_id} {symbol!r} is not a spot BASE-QUOTE symbol")
    aliases = CURRENCY_ALIASES.get(feed_id, {})
    out = "-".join(aliases.get(p.upper(), p.upper()) for p in parts)
    if not SYMBOL_RE.match(out):
        raise ValueError(f"{feed_id} {symbol!r} → {out!r} does not match {SYMBOL_RE.pattern}")
    _canonical_cache[key] = out
    return out


def symbol_map(cls: type[Feed]) -> dict[str, str]:
    """Canonical symbol → cryptofeed normalized symbol, for every spot pair ``cls`` lists.

    Reads cryptofeed's symbol cache, fetching the exchange's REST symbol list when it is not
    loaded yet (see :func:`preload_symbols`). When two pairs map to one canonical symbol, the
    one spelled that way natively wins.
    """
    out: dict[str, str] = {}
    for cf_sym in cls.symbol_mapping():
        try:
            canon = canonical_symbol(cls.id, cf_sym)
        except ValueError:
            continue
        if canon not in out or cf_sym == canon:
            out[canon] = cf_sym
    return out


class RestBodies:
    """Recorded REST responses looked up by URL, ignoring scheme and host.

    Match order: same path and query; same path and query apart from ``limit``; then a unique
    entry whose last path segment is a prefix of (or extends) the requested one within the
    same folder (``pub:list:pair:future`` answers ``pub:list:pair:futures``).

    Args:
        bodies: ``{url: body text}``.
    """

    def __init__(self, bodies: Mapping[str, str]) -> None:
        self._entries = [(self._split(url), body) for url, body in bodies.items()]

    @staticmethod
    def _split(url: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        parts = urllib.parse.urlsplit(url)
        return parts.path.rstrip("/"), tuple(sorted(urllib.parse.parse_qsl(parts.query)))

    def lookup(self, url: str, params: Mapping[str, Any] | None = None) -> str:
        """Body recorded for ``url`` (plus query ``params``).

        Raises:
            KeyError: nothing recorded matches.
        """
        path, query = self._split(url)
        if params:
            query = tuple(sorted({**dict(query), **{k: str(v) for k, v in params.items()}}.items()))
        for (p, q), body in self._entries:
            if p == path and q == query:
                return body
        loose = tuple(kv for kv in query if kv[0] != "limit")
        for (p, q), body in self._entries:
            if p == path and tuple(kv for kv in q if kv[0] != "limit") == loose:
                return body
        folder, _, leaf = path.rpartition("/")
        near = [
            body for (p, _q), body in self._entries
            if p.rpartition("/")[0] == folder
            and (p.rpartition("/")[2].startswith(leaf) or leaf.startswith(p.rpartition("/")[2]))
            and p.rpartition("/")[2]
        ]
        if len(near) == 1:
            return near[0]
        raise KeyError(f"no recorded REST body for {url}")

    async def aread(self, address: str, *args: Any, **kwargs: Any) -> str:
        """Drop-in for ``feed.http_conn.read`` (book snapshots) serving recorded bodies."""
        return self.lookup(address, kwargs.get("params"))


class _RecordedHTTP(HTTPSync):
    """cryptofeed's synchronous REST reader, answering from :class:`RestBodies`."""

    def __init__(self, bodies: RestBodies) -> None:
        self.bodies = bodies

    def read(self, address: str, params: Any = None, headers: Any = None, json: bool = False,
             text: bool = True, uuid: Any = None) -> Any:
        body = self.bodies.lookup(address, params)
        return _loads_decimal(body) if json else body


def _loads_decimal(body: str) -> Any:
    return json.loads(body, parse_float=Decimal)


def preload_symbols(exchange: str, bodies: Mapping[str, str]) -> dict[str, str]:
    """Load an exchange's symbol metadata into cryptofeed from recorded REST responses.

    Runs the Feed class's own REST symbol parsing (``_symbol_endpoint_prepare``,
    ``_parse_symbol_data``) on ``bodies`` instead of the network and stores the result with
    ``Symbols.set(feed_id, symbols, info)``, so building the feed makes no REST call for
    symbols. Bodies are matched by URL path (:class:`RestBodies`), so captures of the real
    hosts work for feeds pointed at a local server.

    Args:
        exchange: exchange id (see :func:`exchange_id`).
        bodies: ``{url: body}``, e.g. the ``-> `` lines of a cryptofeed capture.

    Returns:
        canonical symbol → the exchange's own symbol (``"IOTA-ETH" → "tIOTETH"``).

    Raises:
        KeyError: a symbol endpoint the feed needs is not in ``bodies``.
    """
    cls = feed_class(exchange)
    reader = _RecordedHTTP(RestBodies(bodies))
    had_own = "http_sync" in cls.__dict__
    previous = cls.__dict__.get("http_sync")
    cls.http_sync = reader
    try:
        native = cls.symbol_mapping(refresh=True)
    finally:
        if had_own:
            cls.http_sync = previous
        else:
            del cls.http_sync
    return {canon: native[cf] for canon, cf in symbol_map(cls).items()}


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------
def to_ms(ts: float | Decimal | str | int) -> int:
    """Seconds since the epoch (float, Decimal or decimal text) → integer ms, truncated.

    Goes through the shortest decimal text of a float, so ``1633998523.963`` gives
    ``1633998523963`` and µs times are never rounded across a millisecond.
    """
    value = ts if isinstance(ts, Decimal) else Decimal(str(ts))
    return int(value.scaleb(3).to_integral_value(rounding=ROUND_FLOOR))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _none(_raw: Any) -> Any:
    return None


def _no_sizes(_raw: Any) -> tuple[None, None]:
    return None, None


def _kraken_book_time(book: OrderBook) -> Decimal | None:
    """Latest level time of a Kraken v1 book update (snapshots: None → receive time)."""
    raw = book.raw
    if not isinstance(raw, list):
        return None
    times = [
        Decimal(level[2])
        for part in raw if isinstance(part, dict)
        for key in ("a", "b") for level in part.get(key, ())
    ]
    return max(times) if times else None


@dataclass(frozen=True)
class _Profile:
    """What one cryptofeed feed id carries beyond cryptofeed's normalized objects."""

    #: ticker ``raw`` → (bid size, ask size), each None when absent
    ticker_sizes: Callable[[Any], tuple[Any, Any]] = _no_sizes
    #: ticker ``raw`` → the exchange's update id (dedupe), or None
    ticker_id: Callable[[Any], int | None] = _none
    #: trade ids are integers contiguous per symbol (→ FeedEvent.sequence)
    trade_ids_contiguous: bool = False
    #: ``OrderBook.sequence_number`` is a per-symbol update id that survives reconnects
    book_sequence: bool = False
    #: book → exchange time (seconds) when cryptofeed leaves ``OrderBook.timestamp`` empty
    book_time: Callable[[OrderBook], Decimal | None] = _none


_BINANCE = _Profile(
    ticker_sizes=lambda raw: (raw.get("B"), raw.get("A")),
    ticker_id=lambda raw: raw.get("u"),
    trade_ids_contiguous=True,
    book_sequence=True,
)

PROFILES: dict[str, _Profile] = {
    ArbBinance.id: _BINANCE,
    ArbBinanceUS.id: _BINANCE,
    COINBASE_EXCHANGE: _Profile(
        ticker_sizes=lambda raw: (raw.get("best_bid_size"), raw.get("best_ask_size")),
        ticker_id=lambda raw: raw.get("sequence"),
        trade_ids_contiguous=True,
    ),
    "KRAKEN": _Profile(
        ticker_sizes=lambda raw: (raw[1]["b"][2], raw[1]["a"][2]),
        book_time=_kraken_book_time,
    ),
    "BITFINEX": _Profile(ticker_sizes=lambda raw: (raw[1][1], raw[1][3])),
}
_DEFAULT_PROFILE = _Profile()


def _profile(feed_id: str) -> _Profile:
    return PROFILES.get(feed_id, _DEFAULT_PROFILE)


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
    prof = _profile(ticker.exchange)
    bid_size, ask_size = prof.ticker_sizes(ticker.raw)
    ident = prof.ticker_id(ticker.raw)
    quote = Quote.build(
        sequence=ident,
        exchange=exchange,
        symbol=canonical_symbol(ticker.exchange, ticker.symbol),
        bid=float(ticker.bid),
        ask=float(ticker.ask),
        bid_size=_float(bid_size),
        ask_size=_float(ask_size),
        exchange_ts=to_ms(ticker.timestamp if ticker.timestamp is not None else receipt_ts),
        received_ts=to_ms(receipt_ts),
    )
    return FeedEvent("bbo", quote, None, None if ident is None else str(ident))


def _anonymous_trade_id(trade: CfTrade) -> str:
    return f"{Decimal(str(trade.timestamp))}:{trade.price}:{trade.amount}:{trade.side}"


def normalize_trade(exchange: str, trade: CfTrade, receipt_ts: float, *,
                    ordinal: int = 0) -> FeedEvent:
    """cryptofeed ``Trade`` → ``trades`` FeedEvent with a :class:`~arbstream.schemas.Trade`.

    ``side`` is the taker side. Without an exchange trade id (Kraken v1) the ``trade_id`` is
    ``<time s>:<price>:<size>:<side>`` plus ``#<ordinal>`` for the ordinal-th identical trade
    in one message, and ``dedupe_id`` is None.

    Raises:
        ValueError: the trade fails validation.
    """
    prof = _profile(trade.exchange)
    tid = trade.id
    sequence = int(tid) if tid is not None and prof.trade_ids_contiguous else None
    record = Trade(
        exchange=exchange,
        symbol=canonical_symbol(trade.exchange, trade.symbol),
        trade_id=tid if tid is not None else (
            _anonymous_trade_id(trade) + (f"#{ordinal}" if ordinal else "")
        ),
        price=float(trade.price),
        size=float(trade.amount),
        side=trade.side if trade.side in (BUY, SELL) else None,
        exchange_ts=to_ms(trade.timestamp if trade.timestamp is not None else receipt_ts),
        received_ts=to_ms(receipt_ts),
    )
    return FeedEvent("trades", record, sequence, tid)


Levels = list[tuple[Decimal, Decimal]]


def _top(book: OrderBook, depth: int) -> tuple[Levels, Levels]:
    bids, asks = book.book.bids, book.book.asks
    return (
        [bids.index(i) for i in range(min(depth, len(bids)))],
        [asks.index(i) for i in range(min(depth, len(asks)))],
    )


def _book_times(book: OrderBook, receipt_ts: float) -> tuple[int, int]:
    ts = book.timestamp
    if ts is None:
        ts = _profile(book.exchange).book_time(book)
    return to_ms(ts if ts is not None else receipt_ts), to_ms(receipt_ts)


def _book_sequence(book: OrderBook) -> int | None:
    if _profile(book.exchange).book_sequence and book.sequence_number is not None:
        return int(book.sequence_number)
    return None


def _book_event(exchange: str, book: OrderBook, receipt_ts: float, depth: int,
                top: tuple[Levels, Levels]) -> FeedEvent:
    exchange_ts, received_ts = _book_times(book, receipt_ts)
    seq = _book_sequence(book)
    record = Book(
        exchange=exchange,
        symbol=canonical_symbol(book.exchange, book.symbol),
        depth=depth,
        bids=[(float(p), float(s)) for p, s in top[0]],
        asks=[(float(p), float(s)) for p, s in top[1]],
        sequence=seq,
        exchange_ts=exchange_ts,
        received_ts=received_ts,
    )
    return FeedEvent("book", record, None, None if seq is None else str(seq))


def normalize_book(exchange: str, book: OrderBook, receipt_ts: float, depth: int) -> FeedEvent:
    """cryptofeed ``OrderBook`` → ``book`` FeedEvent: the top ``depth`` levels per side.

    Levels come from ``book.book.bids``/``asks`` (best first). ``Book.sequence`` and
    ``dedupe_id`` are the book's update id where it is stable (Binance ``u`` /
    ``lastUpdateId``). ``exchange_ts`` is the update's exchange time (Kraken: its latest level
    time), else the receive time.

    Raises:
        ValueError: the book fails validation (crossed...).
    """
    return _book_event(exchange, book, receipt_ts, depth, _top(book, depth))


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
        symbol=canonical_symbol(book.exchange, book.symbol),
        bid=float(bid), ask=float(ask), bid_size=float(bid_size), ask_size=float(ask_size),
        exchange_ts=exchange_ts, received_ts=received_ts,
    )
    return FeedEvent("bbo", quote, None, None if seq is None else str(seq))


def _raw_text(obj: Any) -> str:
    raw = getattr(obj, "raw", None)
    if raw is None:
        raw = obj.to_dict()
    return stdjson.dumps(raw, default=str)


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
        except (ValueError, ArithmeticError, LookupError, TypeError) as exc:
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
                key = f"{trade.symbol}|{_anonymous_trade_id(trade)}"
                ordinal = seen[key]
                seen[key] += 1
            event = normalize_trade(self.exchange, trade, receipt_ts, ordinal=ordinal)
        except (ValueError, ArithmeticError, LookupError, TypeError) as exc:
            await self._reject(trade, exc)
            return
        await self._emit(event)

    async def on_book(self, book: OrderBook, receipt_ts: float) -> None:
        """cryptofeed ``L2_BOOK`` callback: book snapshots and/or book-derived quotes."""
        if self.emit_book:
            try:
                top = _top(book, self.book_depth)
                event = None
                if self._last_top.get(book.symbol) != top:
                    event = _book_event(self.exchange, book, receipt_ts, self.book_depth, top)
                    self._last_top[book.symbol] = top
            except (ValueError, ArithmeticError, LookupError, TypeError) as exc:
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
            except (ValueError, ArithmeticError, LookupError, TypeError) as exc:
                await self._reject(book, exc)
                return
            await self._emit(event)


# --------------------------------------------------------------------------------------------
# Feed construction
# --------------------------------------------------------------------------------------------
def _rebase(original: str, override: str) -> str:
    """Put ``original``'s path on ``override``'s scheme and host, unless override has a path."""
    new = urllib.parse.urlsplit(override)
    if new.path not in ("", "/") or new.query:
        return override
    old = urllib.parse.urlsplit(original)
    return urllib.parse.urlunsplit((new.scheme, new.netloc, old.path, old.query, ""))


class _TLSHTTPAsyncConn(HTTPAsyncConn):
    """cryptofeed's async REST connection with a caller-supplied TLS context."""

    def __init__(self, conn_id: str, proxy: Any, ssl_context: ssl.SSLContext) -> None:
        super().__init__(conn_id, proxy)
        self._ssl_context = ssl_context

    async def _open(self) -> None:
        if not self.is_open:
            connector = aiohttp.TCPConnector(ssl=self._ssl_context)
            self.conn = aiohttp.ClientSession(connector=connector)
            self.sent = 0
            self.received = 0
            self.last_message = None


def with_endpoints(cls: type[Feed], *, ws_url: str | None = None, rest_url: str | None = None,
                   ssl_context: ssl.SSLContext | None = None) -> type[Feed]:
    """Subclass of ``cls`` whose websocket/REST endpoints point at other URLs.

    A URL without a path replaces only scheme, host and port, and each endpoint keeps its own
    path and routes (``wss://127.0.0.1:9000`` + Gemini → ``wss://127.0.0.1:9000/v2/marketdata/``);
    a URL with a path replaces the address whole. ``ws://`` is accepted (cryptofeed itself
    insists on ``wss://``). ``ssl_context`` goes to the websocket connections; the feed id (and
    so cryptofeed's symbol cache) is unchanged.
    """
    attrs: dict[str, Any] = {"__module__": __name__, "__doc__": f"{cls.__name__} at {ws_url}"}
    plain_ws = bool(ws_url and ws_url.startswith("ws://"))
    if ws_url or ssl_context:
        endpoints = []
        for ep in cls.websocket_endpoints:
            address = _rebase(ep.address, ws_url) if ws_url else ep.address
            if plain_ws:
                address = "wss://" + address[len("ws://"):]
            options = dict(ep.options or {})
            if ssl_context is not None and not plain_ws:
                options["ssl"] = ssl_context
            endpoints.append(dataclasses.replace(ep, address=address, sandbox=None,
                                                 options=options))
        attrs["websocket_endpoints"] = endpoints
    if rest_url:
        attrs["rest_endpoints"] = [
            dataclasses.replace(ep, address=_rebase(ep.address, rest_url), sandbox=None)
            for ep in cls.rest_endpoints
        ]
    if plain_ws:
        def connect(self: Feed) -> list:
            conns = cls.connect(self)
            for conn, *_ in conns:
                if isinstance(conn, WSAsyncConn) and conn.address.startswith("wss://"):
                    conn.address = "ws://" + conn.address[len("wss://"):]
            return conns

        attrs["connect"] = connect
    return type(f"{cls.__name__}Endpoints", (cls,), attrs)


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
    reads the exchange's REST symbol list when the feed is built unless
    :func:`preload_symbols` loaded it.

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

    known = symbol_map(cls)
    cf_symbols = []
    for sym in symbols:
        if sym not in known:
            hint = ""
            if sym in cls.symbol_mapping():
                try:
                    hint = f"; its canonical name is {canonical_symbol(cls.id, sym)!r}"
                except ValueError:
                    hint = "; it is not a spot BASE-QUOTE pair"
            raise ValueError(f"{ex}: unknown symbol {sym!r}{hint}")
        cf_symbols.append(known[sym])
    if not cf_symbols:
        raise ValueError("no symbols")

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
        feed.http_conn = _TLSHTTPAsyncConn(feed.id, feed.http_proxy, ssl_context)
    return feed
