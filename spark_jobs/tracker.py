"""Stateful analytics over final spread windows: episodes, rolling statistics, features.

Pure functions over one pair's or one (symbol, exchange)'s final windows, in ``window_end``
order, with the state they return: :mod:`spark_jobs.engine` calls them as event time
finalizes windows, and the tests call them directly. Every figure below depends only on the
windows, not on how they were split into micro-batches.

Per **pair** (symbol, sell symbol, buy exchange, sell exchange), each window gives a
``spread`` record (the spread row plus):

* with both legs' books streamed (``md.<exchange>.book``): ``size_base`` = the largest size
  whose book-walking net stays above ``min_net``, ``expected_profit`` = the best achievable
  profit, and ``buy_vwap``/``sell_vwap`` for ``ARB_NOTIONAL_USD`` (:mod:`arbstream.depth`),
  ``size_source = "book"``;
* ``spread_mean_bps``, ``spread_std_bps`` (sample, ddof 1) of ``net_bps`` over the previous
  ``ARB_STATS_HORIZON_SECONDS`` (windows ending in ``[t - horizon, t)``), once at least
  :data:`MIN_PERIODS` values are there; ``spread_z = (net_bps - mean) / std``;
  ``anomaly = |spread_z| > ARB_ANOMALY_SIGMA``.
* ``is_opportunity = net > ARB_MIN_NET`` and ``episode_id``. An **episode** is a run of
  opportunity windows of one pair in which consecutive windows are at most
  ``ARB_EPISODE_GAP_SECONDS`` apart; it closes when a later window (or the watermark) passes
  its last window by more than the gap. ``start`` = first window end − W, ``end`` = last
  window end, ``duration_s = end - start``; ``peak_net_bps``, ``mean_net_bps`` and
  ``windows`` over its windows; the size and expected profit are those of its most profitable
  window (one execution). ``episode_id`` = ``<pair key>|<start ISO-8601 ms>``. ``episode``
  records with ``event`` ``opened`` (at its first window) and ``closed`` are emitted.
* Per pair and UTC hour (of the window's interval ``(end − W, end]``), ``percentiles``
  records: count, mean, max, and the p50/p75/p95 of ``net_bps`` (numpy linear interpolation)
  as aggressive/moderate/conservative threshold recommendations; emitted when a later hour's
  window arrives or the watermark passes the hour's end.

Per **(symbol, exchange)**, each window gives a ``feature`` record: ``mid = (bid + ask) / 2``,
``log_return = ln(mid / previous window's mid)``, ``volatility`` = sample std of the log
returns over the horizon (per window of W, not annualised), ``quote_spread_bps = (ask − bid)
/ mid × 10 000``, ``imbalance = (bid_size − ask_size) / (bid_size + ask_size)`` summed over
the streamed top-N book levels, else of the top of book (null without sizes),
``latency_ms`` (mean received − exchange time of the window's quotes), ``message_rate``
(quotes per second over the snapshot's ``max_quote_age``),
``quote_age_s`` (window end − latest quote time), and ``volume_z``/``volume_spike`` on the
message count against its rolling mean and std over the horizon (the recorded inputs carry no
traded volume per window; ``volume`` stays null).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from arbstream.config import Settings
from arbstream.depth import size_from_books
from arbstream.fees import BPS
from arbstream.records import (  # noqa: F401 (defined in core; re-exported for the engine)
    EPISODE_FIELDS,
    FEATURE_FIELDS,
    PERCENTILE_FIELDS,
    RECORD_FIELDS,
    SPREAD_FIELDS,
)
from arbstream.timestamps import from_ms, iso_ms, to_ms

HOUR_MS = 3_600_000
#: Values needed before a rolling mean/std (and so a z-score) is reported.
MIN_PERIODS = 10

#: The processor's output: ``record`` (a key of :data:`RECORD_FIELDS`) and the union of the
#: record fields (a field absent from a record type is null there).
OUTPUT_FIELDS: dict[str, str] = {"record": "string"}
for _fields in RECORD_FIELDS.values():
    OUTPUT_FIELDS.update(_fields)


@dataclass(frozen=True)
class TrackerConfig:
    """Parameters of the processor, in the units the arithmetic uses.

    ``min_net`` is a fraction; ``*_ms`` are milliseconds of event time.
    """

    min_net: float
    window_ms: int
    age_ms: int
    gap_ms: int
    horizon_ms: int
    sigma: float
    notional_usd: float = 10_000.0

    @classmethod
    def of(cls, settings: Settings) -> TrackerConfig:
        return cls(
            min_net=settings.min_net,
            window_ms=round(settings.window_seconds * 1000),
            age_ms=round(settings.max_quote_age_seconds * 1000),
            gap_ms=round(settings.episode_gap_seconds * 1000),
            horizon_ms=round(settings.stats_horizon_seconds * 1000),
            sigma=settings.anomaly_sigma,
            notional_usd=settings.notional_usd,
        )


def _num(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v


class Rolling:
    """Mean and sample standard deviation (ddof 1) of the values of the last ``horizon`` ms,
    ``[t - horizon, t)``, updated in O(1) per value (amortized) instead of rescanning.

    Sums are kept of ``v - K`` and ``(v - K)^2`` with ``K`` the first value since the window
    was last empty, so nearby values do not cancel catastrophically; results agree with
    numpy's two-pass ``mean``/``std(ddof=1)`` to ~1e-12 relative.
    """

    __slots__ = ("items", "k", "s1", "s2")

    def __init__(self) -> None:
        self.items: deque[tuple[int, float]] = deque()
        self.k = 0.0
        self.s1 = 0.0
        self.s2 = 0.0

    def evict(self, lo: int) -> None:
        """Drop values older than ``lo`` (UTC ms)."""
        items = self.items
        while items and items[0][0] < lo:
            _, v = items.popleft()
            d = v - self.k
            self.s1 -= d
            self.s2 -= d * d
        if not items:
            self.s1 = self.s2 = 0.0

    def push(self, t: int, v: float) -> None:
        if not self.items:
            self.k, self.s1, self.s2 = v, 0.0, 0.0
        d = v - self.k
        self.items.append((t, v))
        self.s1 += d
        self.s2 += d * d

    def stats(self, min_periods: int = 2) -> tuple[float | None, float | None]:
        """``(mean, std)`` once ``min_periods`` values are there, else ``(None, None)``."""
        n = len(self.items)
        if n < max(min_periods, 2):
            return None, None
        mean_d = self.s1 / n
        var = max((self.s2 - n * mean_d * mean_d) / (n - 1), 0.0)
        return self.k + mean_d, math.sqrt(var)


def _z(x: float, mean: float | None, std: float | None) -> float | None:
    if mean is None or std is None or std == 0.0:
        return None
    return (x - mean) / std


# --- pairs -----------------------------------------------------------------------------------


def pair_key(row: dict[str, Any]) -> str:
    """``symbol|buy|sell``, or ``symbol/sell_symbol|buy|sell`` for a cross-quote pair."""
    symbol = row["symbol"]
    if row.get("cross_quote"):
        symbol = f"{symbol}/{row['sell_symbol']}"
    return f"{symbol}|{row['buy_exchange']}|{row['sell_exchange']}"


def episode_record(ep: dict[str, Any], event: str, cfg: TrackerConfig) -> dict[str, Any]:
    return {
        "record": "episode", "episode_id": ep["id"], "event": event,
        "status": "open" if event == "opened" else "closed",
        **{k: ep[k] for k in ("symbol", "sell_symbol", "cross_quote", "buy_exchange",
                              "sell_exchange")},
        "start": from_ms(ep["start"]), "end": from_ms(ep["end"]),
        "duration_s": (ep["end"] - ep["start"]) / 1000.0, "windows": ep["windows"],
        "peak_net_bps": ep["peak"], "mean_net_bps": ep["sum"] / ep["windows"],
        **ep["best"],
    }


def percentile_record(leg: dict[str, Any], key: str, hour: int, values: list[float]
                       ) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    p50, p75, p95 = (float(x) for x in np.percentile(arr, [50, 75, 95]))
    return {
        "record": "percentiles", "threshold_id": f"{key}|{iso_ms(hour)}", **leg,
        "hour_start": from_ms(hour), "count": len(values), "mean_bps": float(arr.mean()),
        "p50_bps": p50, "p75_bps": p75, "p95_bps": p95, "max_bps": float(arr.max()),
        "aggressive_bps": p50, "moderate_bps": p75, "conservative_bps": p95,
    }


def _best(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in ("size_base", "size_source", "expected_profit",
                                    "profit_currency", "expected_profit_usd")}


def _profit_rank(best: dict[str, Any]) -> float:
    for k in ("expected_profit_usd", "expected_profit"):
        v = _num(best.get(k))
        if v is not None:
            return v
    return -math.inf


def _levels(value: Any) -> list[list[float]] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or len(value) == 0:
        return None
    return [[float(x) for x in lv] for lv in value]


def with_depth(row: dict[str, Any], cfg: TrackerConfig) -> dict[str, Any]:
    """The spread row with ``size_base``, ``expected_profit(_usd)``, ``buy_vwap`` and
    ``sell_vwap`` from both legs' books (:func:`arbstream.depth.size_from_books`) when both
    are streamed (``size_source = "book"``); otherwise unchanged (top of book or notional)."""
    asks, bids = _levels(row.get("buy_asks")), _levels(row.get("sell_bids"))
    if asks is None or bids is None:
        return {**row, "buy_vwap": None, "sell_vwap": None}
    costs = (float(row["buy_fee"]) + float(row["sell_fee"])
             + (_num(row.get("conversion_fee")) or 0.0) + float(row["haircut"]))
    usd = _num(row.get("usd_rate"))
    rate = _num(row.get("conversion_rate")) or 1.0
    d = size_from_books(asks, bids, costs, cfg.min_net, rate,
                        cfg.notional_usd / (usd if usd else 1.0))
    return {
        **row, "size_base": d.max_size, "size_source": "book", "expected_profit": d.profit,
        "expected_profit_usd": d.profit * usd if usd is not None else None,
        "buy_vwap": d.buy_vwap, "sell_vwap": d.sell_vwap,
    }


def track_pair(
    state: dict[str, Any] | None, rows: list[dict[str, Any]], watermark_ms: int | None,
    cfg: TrackerConfig,
) -> tuple[dict[str, Any], list[dict[str, Any]], int | None]:
    """Advance one pair's state over its new spread rows (any order; sorted here).

    Args:
        state: the previous state (``None`` at first): ``hist`` (a :class:`Rolling` of net bps
            within the horizon), ``ep`` (the open episode or ``None``), ``hour`` and ``vals`` (the
            current hour's net bps values), ``leg`` (the pair's identity).
        rows: spread rows of this pair (:data:`SPREAD_FIELDS` minus the derived ones).
        watermark_ms: the event-time watermark, UTC ms; episodes and hours it has passed close.
        cfg: thresholds and durations.

    Returns:
        ``(state, records, timeout_ms)``: records are dicts with ``record`` set; the timeout
        is when the watermark would close the open episode or the current hour (or ``None``).
    """
    st = state or {"hist": Rolling(), "ep": None, "hour": None, "vals": [], "leg": None}
    out: list[dict[str, Any]] = []
    ordered = sorted(rows, key=lambda r: to_ms(r["window_end"]))
    for row in ordered:
        row = with_depth(row, cfg)
        t = to_ms(row["window_end"])
        key = pair_key(row)
        st["leg"] = {k: row[k] for k in ("symbol", "sell_symbol", "cross_quote",
                                         "buy_exchange", "sell_exchange")}
        st["key"] = key
        net_bps = float(row["net_bps"])
        # rolling statistics of the previous windows
        hist = st["hist"]
        hist.evict(t - cfg.horizon_ms)
        mean, std = hist.stats(MIN_PERIODS)
        z = _z(net_bps, mean, std)
        hist.push(t, net_bps)
        # hourly distribution
        hour = (t - 1) // HOUR_MS * HOUR_MS
        if st["hour"] is not None and hour != st["hour"] and st["vals"]:
            out.append(percentile_record(st["leg"], key, st["hour"], st["vals"]))
            st["vals"] = []
        st["hour"] = hour
        st["vals"].append(net_bps)
        # episodes
        ep = st["ep"]
        if ep is not None and t - ep["end"] > cfg.gap_ms:
            out.append(episode_record(ep, "closed", cfg))
            ep = st["ep"] = None
        is_opp = float(row["net"]) > cfg.min_net
        episode_id = None
        if is_opp:
            if ep is None:
                start = t - cfg.window_ms
                ep = st["ep"] = {
                    "id": f"{key}|{iso_ms(start)}", "start": start, "end": t, "windows": 1,
                    "peak": net_bps, "sum": net_bps, "best": _best(row), **st["leg"],
                }
                out.append(episode_record(ep, "opened", cfg))
            else:
                ep["end"] = t
                ep["windows"] += 1
                ep["peak"] = max(ep["peak"], net_bps)
                ep["sum"] += net_bps
                if _profit_rank(_best(row)) > _profit_rank(ep["best"]):
                    ep["best"] = _best(row)
            episode_id = ep["id"]
        out.append({
            **row, "record": "spread", "opportunity_id": row["opportunity_id"],
            "is_opportunity": is_opp, "episode_id": episode_id, "spread_mean_bps": mean,
            "spread_std_bps": std, "spread_z": z,
            "anomaly": z is not None and abs(z) > cfg.sigma,
        })
    return _on_watermark(st, out, watermark_ms, cfg)


def _on_watermark(
    st: dict[str, Any], out: list[dict[str, Any]], watermark_ms: int | None, cfg: TrackerConfig
) -> tuple[dict[str, Any], list[dict[str, Any]], int | None]:
    """Close the episode and the hour the watermark has passed; the next timeout."""
    if watermark_ms is not None and watermark_ms >= 0:
        ep = st["ep"]
        if ep is not None and watermark_ms > ep["end"] + cfg.gap_ms:
            out.append(episode_record(ep, "closed", cfg))
            st["ep"] = None
        if st["hour"] is not None and st["vals"] and watermark_ms > st["hour"] + HOUR_MS:
            out.append(percentile_record(st["leg"], st["key"], st["hour"], st["vals"]))
            st["vals"] = []
    deadlines = []
    if st["ep"] is not None:
        deadlines.append(st["ep"]["end"] + cfg.gap_ms)
    if st["vals"]:
        deadlines.append(st["hour"] + HOUR_MS)
    return st, out, (min(deadlines) if deadlines else None)


# --- exchanges -------------------------------------------------------------------------------


def track_exchange(
    state: dict[str, Any] | None, rows: list[dict[str, Any]], cfg: TrackerConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Advance one (symbol, exchange)'s feature state over its new snapshot rows.

    Args:
        state: ``prev`` (``[t_ms, mid]`` of the last window), ``rets`` and ``msgs``
            (:class:`Rolling` within the horizon), or ``None``.
        rows: exchange rows of :func:`spark_jobs.transforms.track_rows`.
        cfg: horizon, sigma, snapshot age.

    Returns:
        ``(state, feature records)``.
    """
    st = state or {"prev": None, "rets": Rolling(), "msgs": Rolling()}
    out = []
    for row in sorted(rows, key=lambda r: to_ms(r["window_end"])):
        t = to_ms(row["window_end"])
        bid, ask = float(row["bid"]), float(row["ask"])
        mid = (bid + ask) / 2.0
        ret = math.log(mid / st["prev"][1]) if st["prev"] is not None else None
        st["prev"] = [t, mid]
        rets = st["rets"]
        rets.evict(t - cfg.horizon_ms)
        if ret is not None:
            rets.push(t, ret)
        vol = rets.stats(2)[1]
        msgs = st["msgs"]
        msgs.evict(t - cfg.horizon_ms)
        m_mean, m_std = msgs.stats(MIN_PERIODS)
        messages = float(row["messages"])
        vz = _z(messages, m_mean, m_std)
        msgs.push(t, messages)
        bsz, asz = _num(row.get("bid_size")), _num(row.get("ask_size"))
        book_bids, book_asks = _levels(row.get("book_bids")), _levels(row.get("book_asks"))
        if book_bids is not None and book_asks is not None:  # top-N depth when streamed
            bsz, asz = sum(lv[1] for lv in book_bids), sum(lv[1] for lv in book_asks)
        imbalance = (bsz - asz) / (bsz + asz) if bsz is not None and asz is not None and (
            bsz + asz) > 0 else None
        out.append({
            "record": "feature",
            "feature_id": f"{row['symbol']}|{row['exchange']}|{iso_ms(t)}",
            "symbol": row["symbol"], "exchange": row["exchange"], "window_end": from_ms(t),
            "mid": mid, "log_return": ret, "volatility": vol,
            "quote_spread_bps": (ask - bid) / mid * BPS, "imbalance": imbalance,
            "latency_ms": _num(row.get("latency_ms")),
            "message_rate": messages / (cfg.age_ms / 1000.0), "volume": None,
            "volume_z": vz, "volume_spike": vz is not None and vz > cfg.sigma,
            "quote_age_s": (t - to_ms(row["quote_ts"])) / 1000.0,
        })
    return st, out
