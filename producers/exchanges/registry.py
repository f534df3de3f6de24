"""The registry: our exchange ids → cryptofeed Feed classes and their profiles.

Every exchange cryptofeed supports is registered under its ``EXCHANGE_MAP`` name lower-cased
with ``.`` and ``-`` → ``_`` (``okx``, ``bybit``, ``crypto_com``...), so **adding an exchange is
configuration only**: list it in ``ARB_EXCHANGES`` (its topics), give it a taker fee in
``ARB_FEES`` and symbols in ``ARB_FEEDS``; cryptofeed's own class then parses its frames and
:data:`~producers.exchanges.profile.DEFAULT_PROFILE` applies (Gemini works this way).

An exchange that needs more gets an adapter module in this package: a Feed subclass
registered in :data:`EXCHANGES` below (``coinbase`` → :class:`~producers.exchanges.coinbase.
CoinbaseExchange`, the public ws-feed; ``binance``/``binance_us`` → raw ``@trade`` trades;
``bitstamp`` → µs snapshot sync) and/or an :class:`~producers.exchanges.profile.
ExchangeProfile` in :data:`PROFILES` (sizes, ids and times read from raw messages: Binance,
Coinbase, Kraken, Bitfinex).
"""

from __future__ import annotations

from cryptofeed.defines import BITFINEX, KRAKEN
from cryptofeed.exchanges import EXCHANGE_MAP
from cryptofeed.exchanges import Coinbase as CoinbaseAdvanced
from cryptofeed.feed import Feed

from producers.exchanges import binance, bitfinex, coinbase, kraken
from producers.exchanges.binance import ArbBinance, ArbBinanceUS
from producers.exchanges.bitstamp import ArbBitstamp
from producers.exchanges.coinbase import CoinbaseExchange
from producers.exchanges.profile import DEFAULT_PROFILE, ExchangeProfile


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

#: cryptofeed feed id (``Feed.id``, ``Ticker.exchange``) → what its messages carry beyond
#: cryptofeed's objects. Feeds not listed get :data:`DEFAULT_PROFILE`.
PROFILES: dict[str, ExchangeProfile] = {
    ArbBinance.id: binance.PROFILE,
    ArbBinanceUS.id: binance.PROFILE,
    CoinbaseExchange.id: coinbase.PROFILE,
    KRAKEN: kraken.PROFILE,
    BITFINEX: bitfinex.PROFILE,
}


def profile(feed_id: str) -> ExchangeProfile:
    """The profile of cryptofeed feed ``feed_id`` (:data:`DEFAULT_PROFILE` when it has none)."""
    return PROFILES.get(feed_id, DEFAULT_PROFILE)


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
    """The cryptofeed Feed class registered for ``name`` (see :func:`exchange_id`).

    Raises:
        ValueError: unknown exchange.
    """
    return EXCHANGES[exchange_id(name)]
