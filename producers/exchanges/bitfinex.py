"""Bitfinex adapter (v2, cryptofeed's ``Bitfinex`` class): ticker sizes and currency aliases.

Bitfinex sequence numbers are per connection (cryptofeed enables and checks them) and restart
on reconnect, so they are not used for gaps or dedupe; trade ids are the dedupe ids.
"""

from __future__ import annotations

from producers.exchanges.profile import ExchangeProfile

#: Bitfinex's own currency codes → canonical codes: its ``/v2/conf/pub:map:currency:sym``
#: table (2021), unambiguous entries only; note ``DOG`` is MDOGE on Bitfinex, not DOGE.
#: cryptofeed already maps UST/BCHN → USDT/BCH.
CURRENCY_ALIASES: dict[str, str] = {
    "ABS": "ABYSS", "AIO": "AION", "ALG": "ALGO", "AMP": "AMPL", "ATO": "ATOM",
    "CTX": "CTXC", "DAT": "DATA", "DOG": "MDOGE", "DRN": "DRGN", "DSH": "DASH",
    "EUS": "EURS", "EUT": "EURT", "GSD": "GUSD", "IOS": "IOST", "IOT": "IOTA",
    "MIT": "MITH", "MNA": "MANA", "NCA": "NCASH", "OMN": "OMNI", "PAS": "PASS",
    "POY": "POLY", "QSH": "QASH", "QTM": "QTUM", "RBT": "RBTC", "SNG": "SNGLS",
    "SPK": "SPANK", "STJ": "STORJ", "TSD": "TUSD", "UDC": "USDC", "USK": "USDK",
    "UTN": "UTNP", "VSY": "VSYS", "WBT": "WBTC", "XCH": "XCHF", "YGG": "YEED",
    "YYW": "YOYOW",
}

#: Ticker fields 1 and 3 are the bid and ask sizes.
PROFILE = ExchangeProfile(
    ticker_sizes=lambda raw: (raw[1][1], raw[1][3]),
    currency_aliases=CURRENCY_ALIASES,
)
