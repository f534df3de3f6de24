"""Bitstamp adapter: the REST book snapshot and ``diff_order_book`` synchronized on µs.

Quotes come from the book (Bitstamp has no ticker channel in cryptofeed); trades carry the
exchange's trade id (the dedupe id). Nothing else beyond cryptofeed's objects, so no profile.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

from cryptofeed.defines import L2_BOOK
from cryptofeed.exchanges import Bitstamp
from cryptofeed.types import OrderBook
from yapic import json

from producers.exchanges.l2 import apply_level


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
