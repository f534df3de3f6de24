"""Recorded market state for fills and marks: what each venue quoted at any instant.

A :class:`Market` holds the recorded quotes (and, when recorded, top-N books) of every
(exchange, symbol), sorted by the exchange's own event time. The state of a venue at time
``t`` is its **last record with** ``exchange_ts <= t`` (ties: the last one recorded), if not
older than ``max_age_ms`` — the rule of the stream's snapshots (a window ending at ``t``
holds each market's latest quote at or before ``t`` within ``ARB_MAX_QUOTE_AGE_SECONDS``), so
a fill at zero latency sees exactly the quotes the stream priced. Nothing recorded after
``t`` can change what is seen at ``t``.

USD values follow the stream's rule (``spark_jobs.engine``): 1 for USD, else the mean mid of
the ``<C>-USD`` markets in effect (mids summed in ascending order); see :meth:`Market.usd`
for recordings without USD markets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: Columns of the quotes frame :class:`Market` takes (times UTC ms, prices in the quote
#: currency, sizes in base units or NaN when the recording has none, e.g. bars).
QUOTE_COLUMNS = ("exchange", "symbol", "exchange_ts", "received_ts", "bid", "ask", "bid_size",
                 "ask_size")
#: USD stablecoins and their pegs: the fallback of :meth:`Market.usd` for a recording with
#: no ``<C>-USD`` market.
PEGS = {"USDT": 1.0, "USDC": 1.0}
#: Columns of the books frame: ``bids``/``asks`` are ``[[price, size], ...]`` best first.
BOOK_COLUMNS = ("exchange", "symbol", "exchange_ts", "bids", "asks")


@dataclass(frozen=True)
class Top:
    """A venue's state at an instant: best bid/offer (sizes ``None`` when not recorded), the
    time it was quoted (``ts``, UTC ms) and, when a book was recorded at or before that
    instant (and not older than the quote), its levels."""

    ts: int
    bid: float
    ask: float
    bid_size: float | None
    ask_size: float | None
    bids: list[list[float]] | None = None
    asks: list[list[float]] | None = None


class _Series:
    def __init__(self, frame: pd.DataFrame, columns: Iterable[str]) -> None:
        frame = frame.sort_values("exchange_ts", kind="stable")
        self.ts = frame["exchange_ts"].to_numpy(np.int64)
        self.cols = {c: frame[c].to_numpy() for c in columns}

    def index(self, t: int, max_age: int) -> int | None:
        i = int(np.searchsorted(self.ts, t, side="right")) - 1
        if i < 0 or t - self.ts[i] > max_age:
            return None
        return i


def _opt(value: Any) -> float | None:
    v = float(value)
    return None if np.isnan(v) else v


class Market:
    """The recorded quotes and books of many venues, for as-of lookups.

    Args:
        quotes: one row per quote, columns :data:`QUOTE_COLUMNS`.
        books: optional, one row per book snapshot, columns :data:`BOOK_COLUMNS`.
        max_age_ms: a quote older than this at the lookup time is not in effect (the venue
            is treated as not quoting).

    Raises:
        ValueError: a missing column, or a crossed or non-positive quote.
    """

    def __init__(self, quotes: pd.DataFrame, books: pd.DataFrame | None = None,
                 max_age_ms: int = 60_000) -> None:
        missing = set(QUOTE_COLUMNS) - set(quotes.columns)
        if missing:
            raise ValueError(f"quotes frame lacks columns {sorted(missing)}")
        bad = quotes[(quotes["bid"] <= 0) | (quotes["ask"] < quotes["bid"])]
        if len(bad):
            raise ValueError(f"{len(bad)} crossed or non-positive quotes, first: "
                             f"{bad.iloc[0][list(QUOTE_COLUMNS)].to_dict()}")
        self.max_age_ms = int(max_age_ms)
        self._quotes = {key: _Series(g, ("bid", "ask", "bid_size", "ask_size", "received_ts"))
                        for key, g in quotes.groupby(["exchange", "symbol"], sort=True)}
        self._books: dict[tuple[str, str], _Series] = {}
        if books is not None and len(books):
            self._books = {key: _Series(g, ("bids", "asks"))
                           for key, g in books.groupby(["exchange", "symbol"], sort=True)}
        self.start_ms = int(quotes["exchange_ts"].min()) if len(quotes) else 0
        self.end_ms = int(quotes["exchange_ts"].max()) if len(quotes) else 0
        self._latency = (quotes.assign(lat=quotes["received_ts"] - quotes["exchange_ts"])
                         .groupby("exchange")["lat"].median().to_dict())

    @classmethod
    def from_records(cls, quotes: Iterable[Any], books: Iterable[Any] = (),
                     max_age_ms: int = 60_000) -> Market:
        """A market from :class:`arbstream.schemas.Quote` / ``Book`` objects (or dicts with
        their fields)."""
        def rows(items: Iterable[Any], cols: tuple[str, ...]) -> pd.DataFrame:
            dicts = [i if isinstance(i, Mapping) else i.model_dump() for i in items]
            return pd.DataFrame([{c: d.get(c) for c in cols} for d in dicts], columns=list(cols))

        q = rows(quotes, QUOTE_COLUMNS).astype({"bid_size": float, "ask_size": float})
        b = rows(books, BOOK_COLUMNS)
        return cls(q, b if len(b) else None, max_age_ms)

    @property
    def markets(self) -> list[tuple[str, str]]:
        """Every recorded ``(exchange, symbol)``."""
        return sorted(self._quotes)

    def top(self, exchange: str, symbol: str, t_ms: int) -> Top | None:
        """The venue's state at ``t_ms`` (see the module docstring), ``None`` when it has no
        quote in effect."""
        series = self._quotes.get((exchange, symbol))
        if series is None:
            return None
        i = series.index(t_ms, self.max_age_ms)
        if i is None:
            return None
        c = series.cols
        top = Top(int(series.ts[i]), float(c["bid"][i]), float(c["ask"][i]),
                  _opt(c["bid_size"][i]), _opt(c["ask_size"][i]))
        book = self._books.get((exchange, symbol))
        if book is not None:
            j = book.index(t_ms, self.max_age_ms)
            if j is not None and book.ts[j] >= top.ts:
                top = Top(top.ts, top.bid, top.ask, top.bid_size, top.ask_size,
                          [list(lv) for lv in book.cols["bids"][j]],
                          [list(lv) for lv in book.cols["asks"][j]])
        return top

    def _mean_mid(self, symbol: str, t_ms: int) -> float | None:
        mids = []
        for exchange, sym in self._quotes:
            if sym == symbol:
                top = self.top(exchange, sym, t_ms)
                if top is not None:
                    mids.append((top.bid + top.ask) / 2.0)
        if not mids:
            return None
        total = 0.0
        for m in sorted(mids):
            total += m
        return total / len(mids)

    def usd(self, currency: str, t_ms: int) -> float | None:
        """USD per unit of ``currency`` at ``t_ms``: 1 for USD, else the mean mid of the
        ``<currency>-USD`` markets in effect (the stream's rule). A recording without such a
        market (the Binance capture) falls back to the mean mid of ``<currency>-<S>`` times
        the USD price of a stablecoin ``S`` in :data:`PEGS`, and a stablecoin with no market
        at all to its peg (an assumption, stated in the backtest's docs); ``None`` when none
        of these exists."""
        if currency == "USD":
            return 1.0
        direct = self._mean_mid(f"{currency}-USD", t_ms)
        if direct is not None:
            return direct
        for stable in PEGS:
            if stable == currency:
                continue
            mid = self._mean_mid(f"{currency}-{stable}", t_ms)
            if mid is not None:
                rate = self._mean_mid(f"{stable}-USD", t_ms)
                return mid * (rate if rate is not None else PEGS[stable])
        if currency in PEGS and not any(s == f"{currency}-USD" for _, s in self._quotes):
            return PEGS[currency]
        return None

    def recorded_latency_ms(self) -> dict[str, float]:
        """Per exchange, the median ``received_ts - exchange_ts`` of its quotes (ms): the
        one-way delay from the venue to the recorder, a stand-in for order latency."""
        return {k: float(v) for k, v in self._latency.items()}
