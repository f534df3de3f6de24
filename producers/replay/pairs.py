"""Concatenated pair names of recorded data (``btcusdt``) → canonical ``BASE-QUOTE`` symbols.

The IAQF file names (``<exchange>_<pair>.parquet``) and the Binance recording (file names and
frames' ``s``) spell pairs without a separator. Live feeds map cryptofeed's symbols instead
(:func:`producers.exchanges.normalize.symbol_from_feed`).
"""

from __future__ import annotations

from arbstream.schemas import SYMBOL_RE

#: Quote currencies the pair parser knows; matched longest first (``USDT`` before ``USD``).
QUOTE_CURRENCIES: tuple[str, ...] = ("USDT", "USDC", "USD")


def symbol_from_pair(pair: str) -> str:
    """Map a concatenated pair name to the canonical ``BASE-QUOTE`` symbol.

    The quote currency is the longest known suffix among :data:`QUOTE_CURRENCIES`, so
    ``btcusdt`` -> ``BTC-USDT``, ``usdtusd`` -> ``USDT-USD``, ``usdcusdt`` -> ``USDC-USDT``.

    Raises:
        ValueError: no known quote currency ends the name, or the base is empty or malformed.
    """
    name = pair.strip().upper()
    for quote in sorted(QUOTE_CURRENCIES, key=len, reverse=True):
        if name.endswith(quote):
            symbol = f"{name[: -len(quote)]}-{quote}"
            if SYMBOL_RE.match(symbol):
                return symbol
            raise ValueError(f"pair {pair!r}: base currency {name[: -len(quote)]!r} is invalid")
    raise ValueError(
        f"pair {pair!r} ends in no known quote currency ({', '.join(QUOTE_CURRENCIES)})"
    )
