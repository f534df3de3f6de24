"""Balances per venue and asset, transfers between venues, and marks to market in USD.

**Start.** ``capital_usd`` (default $10,000) is split equally across the venues; on each
venue half is held in the base asset and half split equally across the quote currencies it
trades (USD, USDT, USDC...), at the USD prices of the start (:meth:`Portfolio.allocate`).

**Budget rule** (Hummingbot's cross-exchange ``arbitrage`` strategy: a buy needs the quote
currency on the buy venue, a sell needs the base asset on the sell venue): the size of a
trade is at most ``min(position_cap × capital, what the buy venue's quote balance pays
for, the sell venue's base balance, the executable size)`` (:meth:`Portfolio.cap`), and a
fill that would cost more than the balance (the price moved during the latency) is cut to
what the balance pays for. No balance ever goes negative (:meth:`Portfolio.check`).

**Flows of a trade** (fees as the stream defines them, see :mod:`backtest.execution`): the
buy venue pays the buy cost plus the buy fee in the buy quote currency and receives the
base; the sell venue delivers the base and receives the sell value, pays the sell and
conversion fees and converts the matched proceeds into the buy quote currency at the
conversion rate (the conversion is booked on the sell venue).

**Transfers** (rebalancing, :meth:`Portfolio.rebalance`): when a venue's balance of an asset
falls below ``rebalance_below`` × its starting balance, the venue holding the largest surplus
of it sends the shortfall (at most its surplus), paying the withdrawal fee of
:data:`arbstream.fees.DEFAULT_WITHDRAWALS` in the asset; the receiver is credited after the
withdrawal delay. A transfer of an asset whose rail is paused (:class:`arbstream.fees.
RailPause`), or without a withdrawal entry, is not possible and is counted as blocked.

**Marks.** Equity in USD = Σ balance × USD price of the asset (+ transfers in flight), the
price being the mean ``<asset>-USD`` mid in effect (:meth:`backtest.market.Market.usd`), the
last known one when none is in effect: USDC held over the depeg is revalued at its market
rate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from arbstream.fees import RailPause, Withdrawal
from backtest.execution import Execution
from backtest.market import Market

EPS = 1e-9


class NegativeBalanceError(RuntimeError):
    """A flow would make a balance negative (a bug in the caller's sizing)."""


@dataclass(frozen=True)
class Transfer:
    """One transfer: ``amount`` of ``asset`` sent at ``sent_ms``, credited at ``arrive_ms``
    (UTC ms), ``fee`` (units of the asset) paid by the sender."""

    asset: str
    source: str
    target: str
    amount: float
    fee: float
    sent_ms: int
    arrive_ms: int


@dataclass
class Portfolio:
    """Balances ``(venue, asset) -> units`` and transfers in flight (see the module
    docstring). ``withdrawals`` and ``pauses`` come from :mod:`arbstream.fees`."""

    withdrawals: Mapping[tuple[str, str], Withdrawal]
    pauses: tuple[RailPause, ...] = ()
    rebalance_below: float = 0.5
    balances: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    start: dict[tuple[str, str], float] = field(default_factory=dict)
    in_flight: list[Transfer] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    blocked: int = 0
    _prices: dict[str, float] = field(default_factory=dict)

    def allocate(self, market: Market, venues: Mapping[str, Iterable[str]], base: str,
                 capital_usd: float, t_ms: int) -> None:
        """The starting balances (module docstring): ``venues`` maps each venue to the quote
        currencies it trades.

        Raises:
            ValueError: no USD price of ``base`` or of a quote currency at ``t_ms``.
        """
        share = capital_usd / len(venues)
        for venue, quotes in sorted(venues.items()):
            quotes = sorted(set(quotes))
            self._credit(venue, base, share / 2 / self._need_price(market, base, t_ms))
            for q in quotes:
                self._credit(venue, q, share / 2 / len(quotes) / self._need_price(
                    market, q, t_ms))
        self.start = dict(self.balances)

    def _need_price(self, market: Market, asset: str, t_ms: int) -> float:
        p = self.price(market, asset, t_ms)
        if p is None:
            raise ValueError(f"no USD price for {asset} at {t_ms} ms")
        return p

    def price(self, market: Market, asset: str, t_ms: int) -> float | None:
        """USD per unit of ``asset`` at ``t_ms``, or the last one seen."""
        p = market.usd(asset, t_ms)
        if p is not None:
            self._prices[asset] = p
        return self._prices.get(asset)

    def _credit(self, venue: str, asset: str, amount: float) -> None:
        new = self.balances[(venue, asset)] + amount
        if new < -EPS * max(1.0, abs(amount)):
            raise NegativeBalanceError(f"{venue} {asset}: {self.balances[(venue, asset)]} + "
                                       f"{amount} < 0")
        self.balances[(venue, asset)] = max(new, 0.0)

    def balance(self, venue: str, asset: str) -> float:
        """Units of ``asset`` available on ``venue``."""
        return self.balances.get((venue, asset), 0.0)

    def settle(self, t_ms: int) -> None:
        """Credit the transfers that have arrived by ``t_ms``."""
        still = []
        for tr in self.in_flight:
            if tr.arrive_ms <= t_ms:
                self._credit(tr.target, tr.asset, tr.amount)
            else:
                still.append(tr)
        self.in_flight = still

    def cap(self, signal: Mapping[str, object], capital_usd: float, position_cap: float,
            usd_rate: float | None) -> float:
        """The largest size (base units) the budget rule allows for ``signal`` before fills:
        min(position cap, buy venue's quote balance / (ask × (1 + buy fee)), sell venue's
        base balance, ``size_base``)."""
        base, quote = str(signal["symbol"]).split("-", 1)
        ask = float(signal["buy_ask"])  # type: ignore[arg-type]
        cap_units = position_cap * capital_usd / (ask * (usd_rate or 1.0))
        pay = self.balance(str(signal["buy_exchange"]), quote) / (
            ask * (1.0 + float(signal["buy_fee"])))  # type: ignore[arg-type]
        have = self.balance(str(signal["sell_exchange"]), base)
        return max(0.0, min(cap_units, pay, have, float(signal["size_base"])))  # type: ignore

    def affordable(self, signal: Mapping[str, object], ex: Execution) -> bool:
        """Whether the buy venue's quote balance pays for ``ex``'s buy (cost + buy fee)."""
        quote = str(signal["symbol"]).split("-", 1)[1]
        need = ex.buy.value * (1.0 + float(signal["buy_fee"]))  # type: ignore[arg-type]
        return need <= self.balance(str(signal["buy_exchange"]), quote) * (1 + 1e-12)

    def book(self, signal: Mapping[str, object], ex: Execution) -> None:
        """Apply the flows of one execution (module docstring).

        Raises:
            NegativeBalanceError: a balance would go negative.
        """
        base, bq = str(signal["symbol"]).split("-", 1)
        sq = str(signal["sell_symbol"]).split("-", 1)[1]
        bx, sx = str(signal["buy_exchange"]), str(signal["sell_exchange"])
        buy_fee, sell_fee = float(signal["buy_fee"]), float(signal["sell_fee"])  # type: ignore
        conv_fee = float(signal.get("conversion_fee") or 0.0) if signal.get(  # type: ignore
            "cross_quote") else 0.0
        self._credit(bx, bq, -ex.buy.value * (1.0 + buy_fee))
        self._credit(bx, base, ex.buy.qty)
        self._credit(sx, base, -ex.sell.qty)
        excess_value = (ex.sell.value * (ex.sell.qty - ex.matched) / ex.sell.qty
                        if ex.sell.qty > 0 else 0.0)
        sell_fees = sell_fee * ex.cost / ex.rate  # the stream's sell fee on the matched size
        self._credit(sx, sq, ex.sell.value - sell_fees - sell_fee * excess_value)
        if signal.get("cross_quote") and ex.matched > 0:  # convert the matched proceeds
            converted = ex.sell.value * ex.matched / ex.sell.qty - sell_fees
            self._credit(sx, sq, -converted)
            self._credit(sx, bq, converted * ex.rate - conv_fee * ex.cost)
        if ex.unwind is not None and ex.unwind.qty > 0:
            u = ex.unwind
            if u.side == "sell":  # extra base bought on the buy venue, sold back there
                self._credit(bx, base, -u.qty)
                self._credit(bx, bq, u.value * (1 - buy_fee))
            else:  # extra base sold on the sell venue, bought back there
                self._credit(sx, sq, -u.value * (1 + sell_fee))
                self._credit(sx, base, u.qty)

    def rebalance(self, t_ms: int) -> None:
        """Send transfers to every (venue, asset) below ``rebalance_below`` × its start
        (module docstring)."""
        for (venue, asset), start in sorted(self.start.items()):
            have = self.balance(venue, asset) + sum(
                t.amount for t in self.in_flight if t.target == venue and t.asset == asset)
            if start <= 0 or have >= self.rebalance_below * start:
                continue
            donors = sorted(((self.balance(v, a) - self.start.get((v, a), 0.0), v)
                             for (v, a) in self.start if a == asset and v != venue),
                            reverse=True)
            if not donors or donors[0][0] <= 0:
                continue
            surplus, donor = donors[0]
            w = self.withdrawals.get((donor, asset))
            if w is None or self._paused(asset, t_ms):
                self.blocked += 1
                continue
            amount = min(start - have, surplus) - w.fee
            if amount <= 0:
                continue
            self._credit(donor, asset, -(amount + w.fee))
            tr = Transfer(asset, donor, venue, amount, w.fee, t_ms, int(t_ms + w.delay_s * 1000))
            self.in_flight.append(tr)
            self.transfers.append(tr)

    def _paused(self, asset: str, t_ms: int) -> bool:
        return any(p.asset == asset and p.start_ms <= t_ms < p.end_ms for p in self.pauses)

    def holdings(self) -> dict[str, float]:
        """Units of each asset held, summed over venues and transfers in flight."""
        out: dict[str, float] = defaultdict(float)
        for (_, asset), units in self.balances.items():
            out[asset] += units
        for tr in self.in_flight:
            out[tr.asset] += tr.amount
        return dict(sorted(out.items()))

    def equity(self, market: Market, t_ms: int) -> float:
        """Equity in USD at ``t_ms`` (balances and transfers in flight).

        Raises:
            ValueError: an asset that never had a USD price.
        """
        total = 0.0
        for asset, units in self.holdings().items():
            if units:
                total += units * self._need_price(market, asset, t_ms)
        return total

    def check(self) -> None:
        """Raises :class:`NegativeBalanceError` if any balance is negative."""
        bad = {k: v for k, v in self.balances.items() if v < 0}
        if bad:
            raise NegativeBalanceError(f"negative balances: {bad}")
