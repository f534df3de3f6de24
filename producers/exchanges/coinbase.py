"""Coinbase adapter: a cryptofeed :class:`~cryptofeed.feed.Feed` for the public Coinbase Exchange
websocket feed, and what its messages carry beyond cryptofeed's objects (:data:`PROFILE`).

cryptofeed 2.4.1's ``Coinbase`` class speaks the Advanced Trade protocol
(``wss://advanced-trade-ws.coinbase.com``, API keys required for symbols). The Coinbase
Exchange feed (``wss://ws-feed.exchange.coinbase.com``, formerly ``ws-feed.pro.coinbase.com``)
is a different protocol and needs no keys for market data; :class:`CoinbaseExchange`
implements it the way cryptofeed implements other exchanges, emitting cryptofeed
:class:`~cryptofeed.types.Ticker`, :class:`~cryptofeed.types.Trade` and
:class:`~cryptofeed.types.OrderBook` objects through the usual callbacks.

Channels (Coinbase Exchange docs, "Websocket channels"):

* ``ticker`` → ``TICKER``: ``best_bid``/``best_ask`` (and ``best_bid_size``/``best_ask_size``
  since 2022; absent in older data), ``sequence`` (the product's feed sequence: increasing,
  not contiguous within the ticker channel), ``time`` (ISO-8601, µs, UTC). The first message
  after subscribing repeats the latest ticker. Messages with a sequence not above the last one
  seen for the product are stale and dropped.
* ``matches`` → ``TRADES``: ``match`` and, once on subscribe, ``last_match``. ``side`` is the
  *maker* order's side, so the taker side is its opposite. ``trade_id`` is contiguous per
  product.
* ``level2_batch`` (default) or ``level2`` → ``L2_BOOK``: a ``snapshot`` then ``l2update``
  ``changes`` ``[side, price, new size]`` (size ``0`` removes the level). ``level2`` needs an
  authenticated connection on today's feed; ``level2_batch`` carries the same messages batched
  every 50 ms without keys. Pass ``level2_channel="level2"`` to use it.

Symbols come from REST ``GET /products`` (``id``, ``base_currency``, ``quote_currency``,
``status``, ``quote_increment``). cryptofeed timestamps are float seconds since the epoch, UTC.

Identity: ticker ``sequence`` is the quote's dedupe id, ``trade_id`` the trade's (contiguous,
so gaps are counted on it); ticker sizes are ``best_bid_size``/``best_ask_size``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from typing import Any

from cryptofeed.connection import AsyncConnection, RestEndpoint, Routes, WebsocketEndpoint
from cryptofeed.defines import ASK, BID, BUY, L2_BOOK, SELL, TICKER, TRADES
from cryptofeed.feed import Feed
from cryptofeed.symbols import Symbol
from cryptofeed.types import OrderBook, Ticker, Trade
from yapic import json

from arbstream.timestamps import to_utc
from producers.exchanges.l2 import apply_level
from producers.exchanges.profile import ExchangeProfile

LOG = logging.getLogger("feedhandler")

#: cryptofeed feed id of :class:`CoinbaseExchange` (``Symbols`` cache key, ``Ticker.exchange``).
COINBASE_EXCHANGE = "COINBASE_EXCHANGE"

_LEVEL2_CHANNELS = ("level2_batch", "level2")

#: Ticker sizes and sequence (dedupe id); trade ids are contiguous per product.
PROFILE = ExchangeProfile(
    ticker_sizes=lambda raw: (raw.get("best_bid_size"), raw.get("best_ask_size")),
    ticker_id=lambda raw: raw.get("sequence"),
    trade_ids_contiguous=True,
)


def parse_coinbase_time(value: str | datetime | None) -> float | None:
    """Coinbase UTC time → float seconds since the epoch, or None when absent.

    Accepts ISO-8601 text (``2021-04-17T16:43:30.244075Z``; digits beyond µs are truncated)
    and the ``datetime`` that cryptofeed's JSON parser (yapic) already makes of such text.
    """
    if not value:
        return None
    if isinstance(value, datetime):
        when = value
    else:
        text = value.rstrip("Z")
        if "." in text:
            head, frac = text.split(".", 1)
            text = f"{head}.{frac[:6]:0<6}"
        when = datetime.fromisoformat(text)
    return to_utc(when).timestamp()


class CoinbaseExchange(Feed):
    """Coinbase Exchange (ws-feed) market data: ``TICKER``, ``TRADES`` and ``L2_BOOK``.

    Args:
        level2_channel: ``"level2_batch"`` (public, default) or ``"level2"`` (needs auth).
        **kwargs: passed to :class:`cryptofeed.feed.Feed` (``symbols``, ``channels``,
            ``callbacks``, ``max_depth``, ``timeout``...).
    """

    id = COINBASE_EXCHANGE
    websocket_endpoints = [
        WebsocketEndpoint("wss://ws-feed.exchange.coinbase.com", options={"compression": None})
    ]
    rest_endpoints = [RestEndpoint("https://api.exchange.coinbase.com", routes=Routes("/products"))]
    websocket_channels = {L2_BOOK: "level2_batch", TRADES: "matches", TICKER: "ticker"}
    request_limit = 10

    @classmethod
    def _parse_symbol_data(cls, data: list[dict[str, Any]]) -> tuple[dict, dict]:
        """``GET /products`` body → (normalized ``BASE-QUOTE`` → product id, info)."""
        ret: dict[str, str] = {}
        info: dict[str, dict] = defaultdict(dict)
        for product in data:
            if product.get("status", "online") != "online":
                continue
            sym = Symbol(product["base_currency"], product["quote_currency"])
            ret[sym.normalized] = product["id"]
            if "quote_increment" in product:
                info["tick_size"][sym.normalized] = product["quote_increment"]
            info["instrument_type"][sym.normalized] = sym.type
        return ret, info

    def __init__(self, level2_channel: str = "level2_batch", **kwargs: Any) -> None:
        if level2_channel not in _LEVEL2_CHANNELS:
            raise ValueError(f"level2_channel must be one of {_LEVEL2_CHANNELS}")
        super().__init__(**kwargs)
        self.level2_channel = level2_channel
        self._ticker_seq: dict[str, int] = {}

    def _reset(self, conn: AsyncConnection) -> None:
        book_chan = self.std_channel_to_exchange(L2_BOOK)
        for product in (conn.subscription or {}).get(book_chan, []):
            self._l2_book.pop(self.exchange_symbol_to_std_symbol(product), None)

    async def subscribe(self, conn: AsyncConnection) -> None:
        """One ``subscribe`` message per channel, as the Coinbase docs show."""
        self._reset(conn)
        for chan, products in conn.subscription.items():
            name = self.level2_channel if chan in _LEVEL2_CHANNELS else chan
            await conn.write(
                json.dumps({"type": "subscribe", "product_ids": list(products), "channels": [name]})
            )

    async def _ticker(self, msg: dict, timestamp: float) -> None:
        if msg.get("best_bid") is None or msg.get("best_ask") is None:
            return
        pair = self.exchange_symbol_to_std_symbol(msg["product_id"])
        seq = msg.get("sequence")
        if seq is not None:
            last = self._ticker_seq.get(pair)
            if last is not None and seq <= last:
                return
            self._ticker_seq[pair] = seq
        t = Ticker(
            self.id, pair, Decimal(msg["best_bid"]), Decimal(msg["best_ask"]),
            parse_coinbase_time(msg.get("time")), raw=msg,
        )
        await self.callback(TICKER, t, timestamp)

    async def _match(self, msg: dict, timestamp: float) -> None:
        t = Trade(
            self.id,
            self.exchange_symbol_to_std_symbol(msg["product_id"]),
            SELL if msg["side"] == "buy" else BUY,  # ``side`` is the maker's
            Decimal(msg["size"]),
            Decimal(msg["price"]),
            parse_coinbase_time(msg.get("time")),
            id=str(msg["trade_id"]),
            raw=msg,
        )
        await self.callback(TRADES, t, timestamp)

    async def _snapshot(self, msg: dict, timestamp: float) -> None:
        pair = self.exchange_symbol_to_std_symbol(msg["product_id"])
        self._l2_book[pair] = OrderBook(
            self.id, pair, max_depth=self.max_depth,
            bids={Decimal(p): Decimal(s) for p, s, *_ in msg["bids"]},
            asks={Decimal(p): Decimal(s) for p, s, *_ in msg["asks"]},
        )
        await self.book_callback(
            L2_BOOK, self._l2_book[pair], timestamp,
            timestamp=parse_coinbase_time(msg.get("time")), raw=msg,
        )

    async def _l2update(self, msg: dict, timestamp: float) -> None:
        pair = self.exchange_symbol_to_std_symbol(msg["product_id"])
        book = self._l2_book.get(pair)
        if book is None:  # update before its snapshot: nothing to apply it to
            return
        delta: dict[str, list] = {BID: [], ASK: []}
        for side_name, price, size in msg["changes"]:
            apply_level(book, BID if side_name == "buy" else ASK, price, size, delta)
        await self.book_callback(
            L2_BOOK, book, timestamp, timestamp=parse_coinbase_time(msg.get("time")), raw=msg,
            delta=delta,
        )

    async def message_handler(self, msg: str, conn: AsyncConnection, timestamp: float) -> None:
        """Dispatch one server frame (JSON text); ``timestamp`` is the receive time, float s."""
        msg = json.loads(msg, parse_float=Decimal)
        kind = msg.get("type")
        if kind == "ticker":
            await self._ticker(msg, timestamp)
        elif kind in ("match", "last_match"):
            await self._match(msg, timestamp)
        elif kind == "l2update":
            await self._l2update(msg, timestamp)
        elif kind == "snapshot":
            await self._snapshot(msg, timestamp)
        elif kind in ("subscriptions", "heartbeat", "status"):
            return
        elif kind == "error":
            LOG.error("%s: error from exchange: %s", conn.uuid, msg)
        else:
            LOG.warning("%s: unexpected message type %r", conn.uuid, kind)
