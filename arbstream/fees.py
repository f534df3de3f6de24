"""Taker fee table: the one place fee figures live.

All fees are fractions of notional (0.006 == 0.60 % == 60 bps), taker side, base (lowest
30-day-volume) tier, spot markets, except ``binanceusdm`` (Binance USD-M perpetual futures, the
venue of the ``usdm_*`` files of ``binance-ws-2024-08``).

Source: each exchange's public fee schedule, as published on its website, checked 2026-11-21:
  coinbase  0.60 %  Coinbase Advanced Trade fee tiers, $0-10k tier, taker
  kraken    0.26 %  Kraken Pro spot fee schedule, $0-50k tier, taker
  binance   0.10 %  Binance spot trading fee rate, VIP 0 / regular user, taker, no BNB discount
  bitstamp  0.40 %  Bitstamp fee schedule, $0-10k tier, taker
  bitfinex  0.20 %  Bitfinex fee schedule, base tier, taker
  gemini    0.40 %  Gemini ActiveTrader fee schedule, base tier, taker
  binanceusdm 0.05 %  Binance USD-M futures trading fee rate, VIP 0 / regular user, taker
                      0.0500 %, no BNB discount (perpetual futures, not spot)

Override any figure (or add an exchange) with ``ARB_FEES`` in the environment, for example
``ARB_FEES='{"binance": 0.00075}'``; see ``arbstream.config.Settings.fees``.
"""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_TAKER_FEES: Mapping[str, float] = {
    "coinbase": 0.0060,
    "kraken": 0.0026,
    "binance": 0.0010,
    "bitstamp": 0.0040,
    "bitfinex": 0.0020,
    "gemini": 0.0040,
    "binanceusdm": 0.0005,
}

#: Basis points in one unit of a fraction: ``bps = fraction * BPS`` (1 bp = 0.01 %).
BPS = 10_000.0
