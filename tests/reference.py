"""An independent pandas (no Spark) implementation of the spread semantics, for comparison.

Semantics (the same as the module docstring of :mod:`spark_jobs.transforms`):

* Quotes are first deduplicated: a repeated ``dedupe_key`` is dropped (the first row is kept).
* For each symbol and each window end ``e`` (a multiple of ``W = window_s`` since the epoch,
  in integer milliseconds) the *snapshot* holds each exchange's latest quote with
  ``exchange_ts`` in the half-open interval ``(e - age, e]`` (``age = max_quote_age_s``):
  a quote at exactly ``e`` is in, one at exactly ``e - age`` is out. "Latest" is the maximum
  of ``(exchange_ts, received_ts, dedupe_key)``.
* For every ordered pair of distinct exchanges in a snapshot (buy on A at A's ask, sell on B at
  B's bid): ``gross = B.bid / A.ask - 1``, ``net = gross - fee_A - fee_B``,
  ``gross_bps = gross * 10000`` and ``net_bps = net * 10000``, in exactly that float64
  operation order, so values are bit-identical to Spark's doubles.
* ``window_start = window_end - age``; ``opportunity_id`` is
  ``SYMBOL|YYYY-MM-DDTHH:MM:SS.mmmZ|buy|sell`` of ``window_end`` (UTC).
* An opportunity is a pair with ``net > min_net`` (strictly).

Unlike Spark (sliding windows over ``exchange_ts - 1 µs``) this enumerates, for each quote, the
window ends it belongs to directly: the first is ``ceil(ts / W) * W`` (``>= ts``, so ``ts == e``
is included), then every ``W`` while ``e < ts + age`` (i.e. ``ts > e - age``). Snapshots are a
sort plus ``drop_duplicates(keep="last")`` and pairs a self-merge, all vectorised.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

BPS = 10_000.0
OUTPUT_COLUMNS = [
    "opportunity_id", "symbol", "window_start", "window_end", "buy_exchange", "sell_exchange",
    "buy_ask", "sell_bid", "buy_ts", "sell_ts", "buy_fee", "sell_fee", "gross", "net",
    "gross_bps", "net_bps",
]
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


def reference_spreads(
    quotes: pd.DataFrame,
    fees: Mapping[str, float],
    window_s: float = 1.0,
    max_quote_age_s: float = 5.0,
) -> pd.DataFrame:
    """Every (symbol, window, ordered exchange pair) spread row; see the module docstring.

    Args:
        quotes: columns ``exchange, symbol, exchange_ts`` (int UTC ms), ``bid, ask,
            received_ts, dedupe_key``; all rows valid (fees known for every exchange).
        fees: taker fee per exchange, fractions.
        window_s: the window width W, seconds.
        max_quote_age_s: the staleness bound, seconds (a multiple of W).

    Returns:
        Columns :data:`OUTPUT_COLUMNS` sorted by ``opportunity_id``; timestamps tz-aware UTC.
    """
    w = round(window_s * 1000)
    age = round(max_quote_age_s * 1000)
    snap = _snapshots(quotes[_QUOTE_INPUT], w, age)[
        ["symbol", "window_end_ms", "exchange", "bid", "ask", "exchange_ts"]
    ]
    buy = snap.rename(columns={"exchange": "buy_exchange", "ask": "buy_ask",
                               "exchange_ts": "buy_ts_ms"}).drop(columns="bid")
    sell = snap.rename(columns={"exchange": "sell_exchange", "bid": "sell_bid",
                                "exchange_ts": "sell_ts_ms"}).drop(columns="ask")
    p = buy.merge(sell, on=["symbol", "window_end_ms"], how="inner")
    p = p[p["buy_exchange"] != p["sell_exchange"]].reset_index(drop=True)

    fee_of = {str(k): float(v) for k, v in fees.items()}
    buy_fee = p["buy_exchange"].map(fee_of).to_numpy(dtype=np.float64)
    sell_fee = p["sell_exchange"].map(fee_of).to_numpy(dtype=np.float64)
    buy_ask = p["buy_ask"].to_numpy(dtype=np.float64)
    sell_bid = p["sell_bid"].to_numpy(dtype=np.float64)
    gross = sell_bid / buy_ask - 1.0
    net = gross - buy_fee - sell_fee
    end_ms = p["window_end_ms"].astype(np.int64)

    out = pd.DataFrame({
        "opportunity_id": p["symbol"] + "|" + _iso_ms(end_ms) + "|" + p["buy_exchange"] + "|"
        + p["sell_exchange"],
        "symbol": p["symbol"],
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
        "gross": gross,
        "net": net,
        "gross_bps": gross * BPS,
        "net_bps": net * BPS,
    })
    return out.sort_values("opportunity_id", kind="stable").reset_index(drop=True)[OUTPUT_COLUMNS]


def reference_opportunities(
    quotes: pd.DataFrame,
    fees: Mapping[str, float],
    window_s: float = 1.0,
    max_quote_age_s: float = 5.0,
    min_net: float = 0.0,
) -> pd.DataFrame:
    """The rows of :func:`reference_spreads` with ``net > min_net`` (strictly)."""
    rows = reference_spreads(quotes, fees, window_s, max_quote_age_s)
    return rows[rows["net"] > min_net].reset_index(drop=True)
