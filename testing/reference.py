"""An independent pandas (no Spark) implementation of the spread semantics, for comparison.

Semantics (the same as the module docstring of :mod:`spark_jobs.transforms`):

* Quotes are first deduplicated: a repeated ``dedupe_key`` is dropped (the first row is kept).
* For each symbol and each window end ``e`` (a multiple of ``W = window_s`` since the epoch,
  in integer milliseconds) the *snapshot* holds each exchange's latest quote with
  ``exchange_ts`` in the half-open interval ``(e - age, e]`` (``age = max_quote_age_s``):
  a quote at exactly ``e`` is in, one at exactly ``e - age`` is out. "Latest" is the maximum
  of ``(exchange_ts, received_ts, dedupe_key)``.
* For every ordered pair of distinct exchanges in a snapshot (buy on A at A's ask, sell on B at
  B's bid): ``gross = B.bid / A.ask - 1``, ``net = gross - fee_A - fee_B - 0 - haircut``,
  ``gross_bps = gross * 10000`` and ``net_bps = net * 10000``, in exactly that float64
  operation order, so values are bit-identical to Spark's doubles.
* Cross-quote pairs: A and B quote the same base in different USD-like currencies (any two
  exchanges, also the same one). B's proceeds are converted into A's quote currency at the
  best rate of the window's stablecoin markets: ``1 / ask`` of ``<A.quote>-<B.quote>`` or
  ``bid`` of ``<B.quote>-<A.quote>``, best by ``rate * (1 - fee)`` (ties: rate, symbol,
  exchange). ``gross = B.bid * rate / A.ask - 1``, ``net = gross - fee_A - fee_B - fee_conv -
  haircut``. The id's first part is ``A.symbol/B.symbol``.
* ``usd_rate``: 1 for USD, else the mean mid of the window's ``<quote>-USD`` markets;
  ``size_base = notional_usd / usd_rate / buy_ask`` (no sizes in these inputs),
  ``expected_profit = net * size_base * buy_ask``, ``expected_profit_usd = expected_profit *
  usd_rate``.
* ``window_start = window_end - age``; ``opportunity_id`` is
  ``SYMBOL|YYYY-MM-DDTHH:MM:SS.mmmZ|buy|sell`` of ``window_end`` (UTC).
* An opportunity is a pair with ``net > min_net`` (strictly). Consecutive windows of one
  pair (``window_end`` W apart) whose rows are equal in every value but the window are one
  opportunity: the row of its first window with ``valid_from`` (that window's end),
  ``valid_to`` (the last one's) and ``windows`` (how many).

Unlike Spark (sliding windows over ``exchange_ts - 1 µs``) this enumerates, for each quote, the
window ends it belongs to directly: the first is ``ceil(ts / W) * W`` (``>= ts``, so ``ts == e``
is included), then every ``W`` while ``e < ts + age`` (i.e. ``ts > e - age``). Snapshots are a
sort plus ``drop_duplicates(keep="last")`` and pairs a self-merge, all vectorised.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

BPS = 10_000.0
OUTPUT_COLUMNS = [
    "opportunity_id", "symbol", "sell_symbol", "cross_quote", "window_start", "window_end",
    "buy_exchange", "sell_exchange", "buy_ask", "sell_bid", "buy_ts", "sell_ts", "buy_fee",
    "sell_fee", "conversion_symbol", "conversion_exchange", "conversion_rate", "conversion_fee",
    "haircut", "gross", "net", "gross_bps", "net_bps", "usd_rate", "size_base",
    "expected_profit", "expected_profit_usd",
]
USD_QUOTES = ("USD", "USDT", "USDC")
_QUOTE_INPUT = ["exchange", "symbol", "exchange_ts", "bid", "ask", "received_ts", "dedupe_key"]


def _utc(ms: np.ndarray | pd.Series) -> pd.Series:
    return pd.Series(pd.to_datetime(np.asarray(ms, dtype=np.int64), unit="ms", utc=True))


def _iso_ms(ms: pd.Series) -> pd.Series:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` of integer UTC ms, formatted once per distinct value."""
    unique = pd.Series(ms.unique())
    secs = _utc(unique).dt.strftime("%Y-%m-%dT%H:%M:%S")
    frac = (unique % 1000).astype(np.int64).astype(str).str.zfill(3)
    text = dict(zip(unique.tolist(), (secs + "." + frac + "Z").tolist(), strict=True))
    return ms.map(text)


def _snapshots(quotes: pd.DataFrame, w: int, age: int) -> pd.DataFrame:
    """One row per (symbol, window_end_ms, exchange): that exchange's latest fresh quote."""
    q = quotes.drop_duplicates("dedupe_key", keep="first").reset_index(drop=True)
    ts = q["exchange_ts"].to_numpy(dtype=np.int64)
    first = -(-ts // w) * w  # ceil(ts / W) * W: the first window end >= ts
    k = np.arange(-(-age // w) + 1, dtype=np.int64)
    ends = first[:, None] + k[None, :] * w
    member = ends < (ts + age)[:, None]  # e - age < ts  (and ts <= e by construction)
    row, col = np.nonzero(member)
    exploded = q.iloc[row].reset_index(drop=True)
    exploded["window_end_ms"] = ends[row, col]
    exploded = exploded.sort_values(
        ["symbol", "window_end_ms", "exchange", "exchange_ts", "received_ts", "dedupe_key"],
        kind="stable",
    )
    return exploded.drop_duplicates(["symbol", "window_end_ms", "exchange"], keep="last")


def _conversions(snap: pd.DataFrame, fee_of: Mapping[str, float]) -> pd.DataFrame:
    """Per window: every way to turn one unit of ``source`` into ``into`` via a stablecoin
    market, best first per (window, into, source)."""
    rates = snap[snap["base"].isin(USD_QUOTES) & snap["quote"].isin(USD_QUOTES)]
    fee = rates["exchange"].map(fee_of).to_numpy(dtype=np.float64)
    buy = pd.DataFrame({  # buy <base> with <quote> at the ask
        "window_end_ms": rates["window_end_ms"], "into": rates["base"], "source": rates["quote"],
        "rate": 1.0 / rates["ask"].to_numpy(dtype=np.float64), "fee": fee,
        "conversion_symbol": rates["symbol"], "conversion_exchange": rates["exchange"]})
    sell = pd.DataFrame({  # sell <base> for <quote> at the bid
        "window_end_ms": rates["window_end_ms"], "into": rates["quote"], "source": rates["base"],
        "rate": rates["bid"].to_numpy(dtype=np.float64), "fee": fee,
        "conversion_symbol": rates["symbol"], "conversion_exchange": rates["exchange"]})
    conv = pd.concat([buy, sell], ignore_index=True)
    conv["eff"] = conv["rate"].to_numpy() * (1.0 - conv["fee"].to_numpy())
    conv = conv.sort_values(["window_end_ms", "into", "source", "eff", "rate",
                             "conversion_symbol", "conversion_exchange"], kind="stable")
    return conv.drop_duplicates(["window_end_ms", "into", "source"], keep="last")


def _usd_rates(snap: pd.DataFrame) -> pd.DataFrame:
    """Per window and currency: USD per unit (mean mid of its ``<C>-USD`` markets)."""
    usd = snap[(snap["quote"] == "USD") & snap["base"].isin(USD_QUOTES)].copy()
    usd["mid"] = (usd["bid"] + usd["ask"]) / 2.0
    usd = usd.sort_values(["window_end_ms", "base", "mid"], kind="stable")
    total = usd.groupby(["window_end_ms", "base"], sort=False)["mid"].agg(
        lambda m: float(np.add.accumulate(np.concatenate([[0.0], m.to_numpy()]))[-1]) / len(m)
    )
    return total.rename("usd_rate").reset_index().rename(columns={"base": "currency"})


def reference_spreads(
    quotes: pd.DataFrame,
    fees: Mapping[str, float],
    window_s: float = 1.0,
    max_quote_age_s: float = 5.0,
    haircut: float = 0.0,
    notional_usd: float = 10_000.0,
) -> pd.DataFrame:
    """Every (window, ordered pair of legs) spread row; see the module docstring.

    Args:
        quotes: columns ``exchange, symbol, exchange_ts`` (int UTC ms), ``bid, ask,
            received_ts, dedupe_key``; all rows valid (fees known for every exchange).
        fees: taker fee per exchange, fractions.
        window_s: the window width W, seconds.
        max_quote_age_s: the staleness bound, seconds (a multiple of W).
        haircut: slippage + latency haircut, fraction.
        notional_usd: the assumed size, USD (these quotes carry no sizes).

    Returns:
        Columns :data:`OUTPUT_COLUMNS` sorted by ``opportunity_id``; timestamps tz-aware UTC.
    """
    w = round(window_s * 1000)
    age = round(max_quote_age_s * 1000)
    snap = _snapshots(quotes[_QUOTE_INPUT], w, age)[
        ["symbol", "window_end_ms", "exchange", "bid", "ask", "exchange_ts"]
    ].reset_index(drop=True)
    parts = snap["symbol"].str.split("-", n=1, expand=True)
    snap["base"], snap["quote"] = parts[0], parts[1]
    fee_of = {str(k): float(v) for k, v in fees.items()}

    buy = snap.rename(columns={"exchange": "buy_exchange", "ask": "buy_ask", "quote": "bq",
                               "exchange_ts": "buy_ts_ms"}).drop(columns="bid")
    sell = snap.rename(columns={"exchange": "sell_exchange", "bid": "sell_bid", "quote": "sq",
                                "exchange_ts": "sell_ts_ms", "symbol": "sell_symbol"}
                       ).drop(columns="ask")
    p = buy.merge(sell, on=["base", "window_end_ms"], how="inner")
    same = (p["symbol"] == p["sell_symbol"]) & (p["buy_exchange"] != p["sell_exchange"])
    cross = (
        (p["bq"] != p["sq"]) & ~p["base"].isin(USD_QUOTES)
        & p["bq"].isin(USD_QUOTES) & p["sq"].isin(USD_QUOTES)
    )
    p = p[same | cross].reset_index(drop=True)
    p["cross_quote"] = (p["symbol"] != p["sell_symbol"]).to_numpy()
    conv = _conversions(snap, fee_of).rename(columns={"into": "bq", "source": "sq"})
    p = p.merge(conv[["window_end_ms", "bq", "sq", "rate", "fee", "conversion_symbol",
                      "conversion_exchange"]], on=["window_end_ms", "bq", "sq"], how="left")
    p.loc[~p["cross_quote"], ["rate", "fee", "conversion_symbol", "conversion_exchange"]] = None
    p = p[~p["cross_quote"] | p["rate"].notna()].reset_index(drop=True)
    p = p.merge(_usd_rates(snap).rename(columns={"currency": "bq"}), on=["window_end_ms", "bq"],
                how="left")
    p.loc[p["bq"] == "USD", "usd_rate"] = 1.0

    buy_fee = p["buy_exchange"].map(fee_of).to_numpy(dtype=np.float64)
    sell_fee = p["sell_exchange"].map(fee_of).to_numpy(dtype=np.float64)
    buy_ask = p["buy_ask"].to_numpy(dtype=np.float64)
    sell_bid = p["sell_bid"].to_numpy(dtype=np.float64)
    rate = p["rate"].to_numpy(dtype=np.float64)
    cross_q = p["cross_quote"].to_numpy(dtype=bool)
    gross = np.where(cross_q, sell_bid * rate / buy_ask, sell_bid / buy_ask) - 1.0
    conv_fee = p["fee"].to_numpy(dtype=np.float64)
    net = gross - buy_fee - sell_fee - np.where(cross_q, conv_fee, 0.0) - haircut
    usd_rate = p["usd_rate"].to_numpy(dtype=np.float64)
    size = notional_usd / np.where(np.isnan(usd_rate), 1.0, usd_rate) / buy_ask
    profit = net * size * buy_ask
    end_ms = p["window_end_ms"].astype(np.int64)
    key = np.where(cross_q, p["symbol"] + "/" + p["sell_symbol"], p["symbol"])

    out = pd.DataFrame({
        "opportunity_id": key + "|" + _iso_ms(end_ms) + "|" + p["buy_exchange"] + "|"
        + p["sell_exchange"],
        "symbol": p["symbol"],
        "sell_symbol": p["sell_symbol"],
        "cross_quote": cross_q,
        "window_start": _utc(end_ms - age),
        "window_end": _utc(end_ms),
        "buy_exchange": p["buy_exchange"],
        "sell_exchange": p["sell_exchange"],
        "buy_ask": buy_ask,
        "sell_bid": sell_bid,
        "buy_ts": _utc(p["buy_ts_ms"]),
        "sell_ts": _utc(p["sell_ts_ms"]),
        "buy_fee": buy_fee,
        "sell_fee": sell_fee,
        "conversion_symbol": p["conversion_symbol"].where(cross_q, None),
        "conversion_exchange": p["conversion_exchange"].where(cross_q, None),
        "conversion_rate": np.where(cross_q, rate, np.nan),
        "conversion_fee": np.where(cross_q, conv_fee, np.nan),
        "haircut": np.full(len(p), haircut),
        "gross": gross,
        "net": net,
        "gross_bps": gross * BPS,
        "net_bps": net * BPS,
        "usd_rate": usd_rate,
        "size_base": size,
        "expected_profit": profit,
        "expected_profit_usd": profit * usd_rate,
    })
    return out.sort_values("opportunity_id", kind="stable").reset_index(drop=True)[OUTPUT_COLUMNS]


def reference_opportunities(
    quotes: pd.DataFrame,
    fees: Mapping[str, float],
    window_s: float = 1.0,
    max_quote_age_s: float = 5.0,
    min_net: float = 0.0,
    haircut: float = 0.0,
    notional_usd: float = 10_000.0,
) -> pd.DataFrame:
    """The opportunities (``net > min_net``, strictly) among the rows of
    :func:`reference_spreads`, one per run of consecutive windows with the same values (see
    the module docstring): :data:`OUTPUT_COLUMNS` plus ``valid_from``, ``valid_to``,
    ``windows``, sorted by ``opportunity_id``."""
    rows = reference_spreads(quotes, fees, window_s, max_quote_age_s, haircut, notional_usd)
    opp = rows[rows["net"] > min_net].copy()
    pair = opp["opportunity_id"].str.split("|").map(lambda p: (p[0], p[2], p[3]))
    opp["_pair"] = pair.map("|".join)
    values = [c for c in OUTPUT_COLUMNS if c not in ("opportunity_id", "window_start",
                                                     "window_end")]
    opp = opp.sort_values(["_pair", "window_end"], kind="stable").reset_index(drop=True)
    same_pair = opp["_pair"].eq(opp["_pair"].shift())
    next_window = (opp["window_end"] - opp["window_end"].shift()) == pd.Timedelta(
        milliseconds=round(window_s * 1000))
    same_values = pd.Series(True, index=opp.index)
    for c in values:
        cur, prev = opp[c], opp[c].shift()
        same_values &= cur.eq(prev) | (cur.isna() & prev.isna())
    opp["_run"] = (~(same_pair & next_window & same_values)).cumsum()
    runs = opp.groupby("_run", sort=False)
    first = runs.head(1).set_index("_run")
    first["valid_from"] = first["window_end"]
    first["valid_to"] = runs["window_end"].max()
    first["windows"] = runs.size()
    out = first.sort_values("opportunity_id", kind="stable").reset_index(drop=True)
    return out[[*OUTPUT_COLUMNS, "valid_from", "valid_to", "windows"]]


def replayed_iaqf_quotes(data_dir: Path, start: datetime, end: datetime) -> pd.DataFrame:
    """The IAQF bars of ``[start, end)`` as the stream receives them from ``arbstream replay
    iaqf``: :func:`producers.replay.iaqf.load_iaqf_quotes` with ``received_ts`` =
    ``exchange_ts`` (UTC ms) and the stream's ``dedupe_key``
    (``exchange:symbol:q:exchange_ts:bid:ask:None:None``), the input of
    :func:`reference_spreads` and :func:`reference_opportunities`."""
    from producers.replay.iaqf import load_iaqf_quotes

    quotes = load_iaqf_quotes(data_dir, start, end)
    quotes["received_ts"] = quotes["exchange_ts"]
    quotes["dedupe_key"] = [
        f"{e}:{s}:q:{t}:{b!r}:{a!r}:None:None"
        for e, s, t, b, a in zip(quotes.exchange, quotes.symbol, quotes.exchange_ts,
                                 quotes.bid, quotes.ask, strict=True)
    ]
    return quotes
