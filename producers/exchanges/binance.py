"""Binance adapter: spot feeds with raw ``@trade`` trades and deep book snapshots.

cryptofeed's ``Binance``/``BinanceUS`` classes speak the protocol; :class:`ArbBinance` and
:class:`ArbBinanceUS` add raw trades and 1000-level snapshots, and :data:`PROFILE` says what the
messages carry: bookTicker sizes ``B``/``A`` and update id ``u`` (the quote's dedupe id), trade
ids ``t`` (contiguous, so gaps are counted on them) and the book's ``u``/``lastUpdateId`` (its
sequence and dedupe id).
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

from cryptofeed.defines import BUY, L2_BOOK, SELL, TRADES
from cryptofeed.exchanges import Binance, BinanceUS
from cryptofeed.types import OrderBook
from cryptofeed.types import Trade as CfTrade
from yapic import json

from producers.exchanges.profile import ExchangeProfile

#: bookTicker sizes and update id; contiguous trade ids; a stable book update id.
PROFILE = ExchangeProfile(
    ticker_sizes=lambda raw: (raw.get("B"), raw.get("A")),
    ticker_id=lambda raw: raw.get("u"),
    trade_ids_contiguous=True,
    book_sequence=True,
)


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
