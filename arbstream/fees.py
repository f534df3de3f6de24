"""Fee tables: the one place fee figures live: taker fees (below), withdrawal fees and delays
between venues (:data:`DEFAULT_WITHDRAWALS`, each row sourced and dated) and the periods a
transfer rail was paused (:data:`USDC_DEPEG_PAUSE`), the last two for the backtester.

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
from dataclasses import dataclass

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


# --- transfers between venues -----------------------------------------------------------------


@dataclass(frozen=True)
class Withdrawal:
    """Moving ``asset`` off an exchange: a flat ``fee`` in units of the asset, charged to the
    sender, and a ``delay_s`` (seconds) until the receiving venue credits it (network
    confirmations plus the exchange's processing). ``source`` and ``as_of`` say where the
    figure comes from and when it was read."""

    fee: float
    delay_s: float
    source: str
    as_of: str


_BTC_DELAY = 3_600.0  # 3 confirmations (~30 min) plus processing and the receiver's credit
_ERC20_DELAY = 900.0  # 12-64 Ethereum blocks plus processing
_WIRE_DELAY = 86_400.0  # a domestic USD wire, same or next business day

#: ``(exchange, asset) -> Withdrawal``: flat withdrawal fees and typical delays used by the
#: backtester's transfers (``backtest.inventory``). Crypto fees follow the network's cost and
#: change often: these are representative published figures, not the ones in force in
#: March 2023; verify them before trading (a backtest takes its own table in
#: ``backtest.run.BacktestConfig.withdrawals``).
DEFAULT_WITHDRAWALS: Mapping[tuple[str, str], Withdrawal] = {
    ("kraken", "BTC"): Withdrawal(0.00015, _BTC_DELAY, "Kraken withdrawal fees page, BTC "
                                  "network, as summarized in 'Kraken Withdrawal Fees: Complete "
                                  "2026 Guide' (abcdstable.com)", "2026"),
    ("kraken", "USDT"): Withdrawal(10.0, _ERC20_DELAY, "same source, USDT ERC-20 ('10 USDT or "
                                   "higher')", "2026"),
    ("kraken", "USDC"): Withdrawal(10.0, _ERC20_DELAY, "assumed equal to Kraken's USDT ERC-20 "
                                   "fee (same network cost)", "2026"),
    ("kraken", "USD"): Withdrawal(4.0, _WIRE_DELAY, "Kraken USD Fedwire withdrawal fee, "
                                  "Kraken funding page (recalled, not re-checked here)", "2023"),
    ("coinbase", "BTC"): Withdrawal(0.0006, _BTC_DELAY, "third-party comparison table on "
                                    "cryptocurrencyexchanges.cc ('Coinbase 0.0006 BTC')", "2024"),
    ("coinbase", "USDT"): Withdrawal(10.0, _ERC20_DELAY, "Coinbase passes the ERC-20 network "
                                     "fee on; assumed equal to Kraken's", "2026"),
    ("coinbase", "USDC"): Withdrawal(10.0, _ERC20_DELAY, "as USDT (ERC-20 network fee)", "2026"),
    ("coinbase", "USD"): Withdrawal(25.0, _WIRE_DELAY, "Coinbase outgoing USD wire fee "
                                    "(recalled, not re-checked here)", "2023"),
    ("binance", "BTC"): Withdrawal(0.0005, _BTC_DELAY, "third-party comparison table on "
                                   "cryptocurrencyexchanges.cc ('Binance 0.0005 BTC')", "2024"),
    ("binance", "USDT"): Withdrawal(10.0, _ERC20_DELAY, "assumed equal to Kraken's USDT "
                                    "ERC-20 fee", "2026"),
    ("binance", "USDC"): Withdrawal(10.0, _ERC20_DELAY, "as USDT (ERC-20 network fee)", "2026"),
}


@dataclass(frozen=True)
class RailPause:
    """A period (UTC ms, half-open ``[start_ms, end_ms)``) when transfers of ``asset`` between
    venues were not possible."""

    asset: str
    start_ms: int
    end_ms: int
    source: str


#: The USDC depeg weekend: Circle could not redeem USDC while Silicon Valley Bank's deposits
#: were frozen, and Coinbase paused USDC-USD conversions on Saturday 11 March 2023, resuming
#: on Monday 13 March after the joint Treasury/Fed/FDIC statement of 12 March (Coinbase's
#: and Circle's public statements of 11-13 March 2023). Hours are approximate: from 2023-03-11
#: 00:00 to 2023-03-13 14:00 UTC (the US banks' Monday opening).
USDC_DEPEG_PAUSE = RailPause("USDC", 1_678_492_800_000, 1_678_716_000_000,
                             "Coinbase and Circle statements, 11-13 March 2023")
