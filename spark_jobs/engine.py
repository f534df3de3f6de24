"""The stream core's logic, without Spark: event time, dedupe, snapshots, pairs, early firing.

Long module: :class:`Engine` is one state machine; its steps (time checks, dedupe, clocks,
snapshots, pairs, runs) read and update the same state and invariants, so they stay together.

One :class:`Engine` holds everything the market query remembers for one key (a bucket of base
currencies, see :mod:`spark_jobs.market`), and :meth:`Engine.process` advances it over one
micro-batch of parsed records (a pandas frame of :data:`INPUT_COLUMNS`), returning the records
to write. Everything here is pure Python and numpy, so it is tested directly against the pandas
reference (``tests/reference.py``) and runs unchanged inside ``transformWithStateInPandas``.

**Snapshots and pairs** (unchanged semantics, see :mod:`spark_jobs.transforms`): for every
symbol and window end ``e`` (a multiple of ``W``), each exchange's latest quote with
``exchange_ts`` in ``(e - max_quote_age, e]``; every ordered pair of legs (same quote, or cross
quote through the window's best stablecoin conversion) gets ``gross``, ``net`` (fractions) and
their bps. Quotes are kept as per-(symbol, exchange, W-bucket) aggregates (latest quote,
message count, latency sum, latest book), so the work per window is independent of the
message rate: ``max_quote_age / W`` buckets are merged instead of exploding every quote into
``max_quote_age / W`` sliding windows.

**Event time per exchange and partition** (Flink's per-partition watermarks with idleness):
each source partition of each exchange's topics has its own clock (max accepted
``exchange_ts``): a symbol on a partition that is read behind the others (a backlog split over
partitions) is not made late by them. The combined watermark is the minimum over partitions
active in the last ``idle_timeout`` of processing time of ``clock - watermark``;
when every exchange is idle it is the maximum clock (a finite replay closes its windows
without any record stamped into the future): it then moves to the last clock +
``max_quote_age`` - 1 ms, so every window holding a quote closes, and a record of that span
arriving afterwards is late. It never moves back.

**Records that never advance time**, each a dead letter with a reason code first:

* ``future_timestamp``: ``exchange_ts`` more than ``max_skew`` ahead of the record's own
  ``received_ts``, ``received_ts`` more than ``max_skew`` ahead of the processing clock, or an
  event time more than ``max_jump`` ahead of every clock seen so far (checked in event-time
  order within a batch, and all later records of the batch with it). After every exchange
  has gone idle, a jump is accepted (time re-anchors: a replay of a later day, or live feeds
  after a replay) when the records after it come from at least two exchanges or were all
  received within ``max_skew`` of the processing clock;
* ``late``: ``exchange_ts`` at or behind the combined watermark.

Duplicates (``dedupe_key`` seen, as a 64-bit hash, within the non-final buckets) are dropped
and counted in the ``stream`` statistics record of the batch.

**Early firing, exactly-once final state** (Apache Beam's early/on-time panes): in the batch in
which a quote arrives, its first window ``ceil(ts / W) * W`` is computed with the quotes known
so far and every opportunity (``net > min_net``) is emitted as an ``opportunity`` record with
``stage = "early"`` (again if a later quote of that window changes it). When the watermark
passes a window it is final: every pair goes through :func:`spark_jobs.tracker.track_pair`
(episodes, rolling statistics, percentiles) and every exchange snapshot through
:func:`spark_jobs.tracker.track_exchange` (features), in window order, exactly as a batch
computation would; final opportunities are emitted with ``stage = "final"``, and an early
opportunity that is not one in the final state is emitted with ``stage = "retracted"``. The
final records depend only on the accepted records, never on micro-batch boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from arbstream.fees import BPS
from arbstream.timestamps import from_ms, iso_ms, to_ms
from spark_jobs import tracker
from spark_jobs.tracker import TrackerConfig

#: Columns of :meth:`Engine.process`'s input frame. ``kind`` is ``quote``, ``book``,
#: ``heartbeat``, ``partition`` (only ``topic`` and ``partition`` set: a source partition the
#: source reads, with or without records) or null (invalid: ``error`` says why); times are
#: UTC ms (int64);
#: ``dedupe_hash`` is a 64-bit hash of ``dedupe_key``; ``home`` is false for a copy of a
#: stablecoin-rate quote sent to this bucket only for conversions; ``value`` is the original
#: payload (bytes).
INPUT_COLUMNS = [
    "kind", "exchange", "symbol", "bid", "ask", "bid_size", "ask_size", "exchange_ts",
    "received_ts", "dedupe_key", "dedupe_hash", "bids", "asks", "error", "value", "topic",
    "partition", "offset", "home",
]


#: Columns of ``quote`` points (UTC ms ``exchange_ts``).
QUOTE_FIELDS = ["exchange", "symbol", "bid", "ask", "bid_size", "ask_size", "exchange_ts"]
@dataclass(frozen=True)
class EngineConfig:
    """Parameters of the engine; ``*_ms`` are milliseconds, fees and ``haircut`` fractions.

    ``usd_quotes`` are the USD-like currencies (cross-quote legs and conversion markets).
    """

    tracker: TrackerConfig
    fees: dict[str, float]
    usd_quotes: tuple[str, ...]
    watermark_ms: int
    idle_ms: int
    max_skew_ms: int
    max_jump_ms: int
    haircut: float

    @classmethod
    def of(cls, settings: Any) -> EngineConfig:
        """From :class:`arbstream.config.Settings`."""
        return cls(
            tracker=TrackerConfig.of(settings),
            fees=dict(settings.taker_fees),
            usd_quotes=tuple(settings.usd_quotes),
            watermark_ms=round(settings.watermark_seconds * 1000),
            idle_ms=round(settings.idle_timeout_seconds * 1000),
            max_skew_ms=round(settings.max_clock_skew_seconds * 1000),
            max_jump_ms=round(settings.max_event_time_jump_seconds * 1000),
            haircut=(settings.slippage_bps + settings.latency_haircut_bps) / BPS,
        )

    @property
    def w(self) -> int:
        return self.tracker.window_ms

    @property
    def age(self) -> int:
        return self.tracker.age_ms


@dataclass
class Slot:
    """Aggregate of one (symbol, exchange, W-bucket ``k``): quotes with ``exchange_ts`` in
    ``((k - 1) W, k W]``. ``quote`` and ``book`` are the latest by (ts, received_ts,
    dedupe_key); ``lat`` is the sum of ``received_ts - exchange_ts`` over the ``n`` quotes."""

    quote: tuple | None = None  # (ts, recv, dkey, bid, ask, bid_size, ask_size)
    n: int = 0
    lat: int = 0
    book: tuple | None = None  # (ts, recv, dkey, bids, asks)


@dataclass
class Engine:
    """State of one key of the market query and the batch step; see the module docstring."""

    #: event-time clock (max accepted exchange_ts, UTC ms) per source partition
    #: ``<topic>|<partition>``: one exchange's topic partitions, one clock each
    clocks: dict[str, int] = field(default_factory=dict)
    seen_at: dict[str, int] = field(default_factory=dict)  # partition -> processing ms
    #: source partitions the source listed (``kind`` "partition" rows) -> processing ms when
    #: first listed: one without records yet holds the watermark back until it is idle
    known: dict[str, int] = field(default_factory=dict)
    watermark: int = -1
    slots: dict[tuple[str, str, int], Slot] = field(default_factory=dict)
    hashes: dict[int, np.ndarray] = field(default_factory=dict)  # k -> sorted int64
    #: early opportunities of non-final windows: id -> (signature, last early record)
    early: dict[str, tuple] = field(default_factory=dict)
    #: pair key -> (expected episode id, latest early window end) of early opportunities
    early_episodes: dict[str, tuple[str, int]] = field(default_factory=dict)
    pair_states: dict[str, dict] = field(default_factory=dict)
    #: pair key -> the open run of final windows with one snapshot: ``sig`` (its
    #: :func:`_run_signature`), ``rec`` (the spread record of its first window), ``last``
    #: (its last window end, UTC ms)
    runs: dict[str, dict] = field(default_factory=dict)
    exchange_states: dict[str, dict] = field(default_factory=dict)
    home_symbols: set[str] = field(default_factory=set)
    finalized: int = -1  # windows ending at or before this are final
    #: every exchange went idle and open episodes and hours were flushed since the last input
    flushed: bool = False

    def __setstate__(self, state: dict) -> None:
        """Unpickle, giving fields added since the state was written their defaults."""
        fresh = Engine()
        self.__dict__.update({**fresh.__dict__, **state})

    # --- the batch step ---------------------------------------------------------------------

    def process(self, frame: pd.DataFrame, now_ms: int, cfg: EngineConfig,
                quotes: list[pd.DataFrame] | None = None) -> list[dict]:
        """Advance over one micro-batch; return the records to write (dicts with ``record``:
        ``deadletter``, ``quote``, ``opportunity``, ``spread``, ``episode``, ``feature``,
        ``percentiles``, ``stream``).

        Args:
            frame: rows of :data:`INPUT_COLUMNS` (any order; may be empty).
            now_ms: the processing clock, UTC ms (idleness and the received-time check).
            cfg: the engine's parameters.
            quotes: when given, ``quote`` points are appended to it as frames of
                :data:`QUOTE_FIELDS` (float64 sizes, NaN when unknown) instead of records.
        """
        out: list[dict] = []
        stats: dict[str, dict[str, int]] = {}
        if len(frame):
            frame = self._take_partition_list(frame, now_ms)
        if len(frame):
            self.flushed = False
            valid = self._reject_invalid(frame, out)
            valid = self._check_times(valid, now_ms, cfg, out, stats)
            valid = self._dedupe(valid, cfg, stats)
            self._advance_clocks(valid, now_ms)
            self._add(valid, cfg, out, quotes)
            self._fire_early(valid, now_ms, cfg, out)
        self._finalize(now_ms, cfg, out)
        for exchange, counts in sorted(stats.items()):
            out.append({"record": "stream", "exchange": exchange, **counts,
                        "watermark_ms": self.watermark, "emitted_ts": now_ms})
        return out

    # --- validation and event time ----------------------------------------------------------

    @staticmethod
    def _dead(row: Any, reason: str) -> dict:
        return {"record": "deadletter", "reason": reason, "value": row.value,
                "source_topic": row.topic, "source_partition": row.partition,
                "source_offset": row.offset}

    def _reject_invalid(self, frame: pd.DataFrame, out: list[dict]) -> pd.DataFrame:
        bad = frame["error"].notna().to_numpy()
        for row in frame[bad].itertuples(index=False):
            out.append(self._dead(row, row.error))
        return frame[~bad]

    def _check_times(self, df: pd.DataFrame, now_ms: int, cfg: EngineConfig, out: list[dict],
                     stats: dict[str, dict[str, int]]) -> pd.DataFrame:
        """Dead-letter ``future_timestamp`` and ``late`` records (home copies only)."""
        if df.empty:
            return df
        ts = df["exchange_ts"].to_numpy(dtype=np.int64)
        recv = df["received_ts"].to_numpy(dtype=np.int64)
        reason = np.full(len(df), None, dtype=object)
        ahead = ts > recv + cfg.max_skew_ms
        reason[ahead] = "future_timestamp: exchange_ts is more than the allowed skew ahead " \
                        "of received_ts"
        recv_ahead = (recv > now_ms + cfg.max_skew_ms) & (reason == None)  # noqa: E711
        reason[recv_ahead] = "future_timestamp: received_ts is ahead of the processing clock"
        # A jump of event time: in ts order, a record more than max_jump ahead of everything
        # accepted before it (and of the clocks) is rejected, and so is all that follows it.
        ok = np.flatnonzero(reason == None)  # noqa: E711
        if len(ok):
            order = ok[np.argsort(ts[ok], kind="stable")]
            anchor = max(self.clocks.values(), default=None)
            prev = np.concatenate([[ts[order[0]] if anchor is None else anchor], ts[order[:-1]]])
            prev = np.maximum.accumulate(prev)
            jumps = np.flatnonzero(ts[order] - prev > cfg.max_jump_ms)
            if len(jumps):
                tail = order[jumps[0]:]
                exchanges_in_tail = set(df["exchange"].to_numpy(dtype=object)[tail].tolist())
                # (exchanges, not partitions: one exchange's partitions are one producer)
                # After every exchange went idle, a new replay of a later period or a live
                # feed may start: time re-anchors if at least two exchanges agree on it, or if
                # the records are live (received now, by the processing clock); one replayed
                # record or one skewed producer cannot. The tail has no further jump.
                live = bool(np.all(np.abs(recv[tail] - now_ms) <= cfg.max_skew_ms))
                reanchor = (self.clocks and not self._active(now_ms, cfg) and len(jumps) == 1
                            and (len(exchanges_in_tail) >= 2 or live))
                if not reanchor:
                    reason[tail] = (
                        "future_timestamp: event time jumps ahead of every exchange clock by "
                        "more than the allowed jump")
        late = (ts <= self.watermark) & (reason == None)  # noqa: E711
        reason[late] = f"late: exchange_ts at or behind the watermark {self.watermark} ms"
        home = df["home"].to_numpy(dtype=bool)
        exchanges = df["exchange"].to_numpy(dtype=object)
        for i in np.flatnonzero(reason != None):  # noqa: E711
            if home[i]:
                row = next(df.iloc[[i]].itertuples(index=False))
                out.append(self._dead(row, reason[i]))
                code = "late" if reason[i].startswith("late") else "future"
                counts = stats.setdefault(exchanges[i], {})
                counts[code] = counts.get(code, 0) + 1
        for e, n in zip(*np.unique(exchanges[home], return_counts=True), strict=True):
            counts = stats.setdefault(e, {})
            counts["received"] = int(n)
        return df[reason == None]  # noqa: E711

    def _take_partition_list(self, frame: pd.DataFrame, now_ms: int) -> pd.DataFrame:
        """Note the source partitions listed by ``kind`` "partition" rows (the ``arbmarket``
        source sends them with every micro-batch that reads data); return the other rows."""
        marks = (frame["kind"] == "partition").to_numpy(dtype=bool)
        if not marks.any():
            return frame
        listed = frame[marks]
        for topic, part in zip(listed["topic"], listed["partition"], strict=True):
            self.known.setdefault(f"{topic}|{int(part)}", now_ms)
        return frame[~marks]

    def _active(self, now_ms: int, cfg: EngineConfig) -> list[str]:
        return [e for e, t in self.seen_at.items() if now_ms - t <= cfg.idle_ms]

    def _dedupe(self, df: pd.DataFrame, cfg: EngineConfig, stats: dict) -> pd.DataFrame:
        """Drop repeated ``dedupe_key`` hashes (first copy kept, within and across batches)."""
        if df.empty:
            return df
        data = df[df["kind"] != "heartbeat"]
        h = data["dedupe_hash"].to_numpy(dtype=np.int64)
        k = -(-data["exchange_ts"].to_numpy(dtype=np.int64) // cfg.w)
        _, first = np.unique(h, return_index=True)
        keep = np.zeros(len(data), dtype=bool)
        keep[first] = True
        for kk in np.unique(k):
            sel = k == kk
            old = self.hashes.get(int(kk))
            if old is not None:
                keep[sel] &= ~np.isin(h[sel], old, assume_unique=False)
            new = h[sel & keep]
            self.hashes[int(kk)] = np.union1d(old if old is not None else new[:0], new)
        dups = data[~keep & data["home"].to_numpy(dtype=bool)]
        for e, n in dups["exchange"].value_counts().items():
            stats.setdefault(e, {})["duplicates"] = int(n)
        return pd.concat([data[keep], df[df["kind"] == "heartbeat"]])

    def _advance_clocks(self, df: pd.DataFrame, now_ms: int) -> None:
        """Advance the clock of every source partition (``<topic>|<partition>``) in ``df``."""
        if df.empty:
            return
        for (topic, part), t in df.groupby(["topic", "partition"])["exchange_ts"].max().items():
            key = f"{topic}|{part}"
            self.clocks[key] = max(self.clocks.get(key, int(t)), int(t))
            self.seen_at[key] = now_ms

    # --- snapshots --------------------------------------------------------------------------

    def _add(self, df: pd.DataFrame, cfg: EngineConfig, out: list[dict],
             quotes: list[pd.DataFrame] | None) -> None:
        """Merge quotes and books into their slots (vectorized per slot); home quotes go out
        as ``quote`` records, or as frames of :data:`QUOTE_FIELDS` appended to ``quotes``."""
        data = df[df["kind"].isin(["quote", "book"])]
        if data.empty:
            return
        home = data["home"].to_numpy(dtype=bool)
        self.home_symbols.update(data.loc[home, "symbol"].unique().tolist())
        data = data.sort_values(["exchange_ts", "received_ts", "dedupe_key"], kind="stable")
        data = data.assign(k=-(-data["exchange_ts"].to_numpy(dtype=np.int64) // cfg.w))
        qs = data[data["kind"] == "quote"]
        if not qs.empty:
            qs = qs.assign(lat=qs["received_ts"].to_numpy(dtype=np.int64)
                           - qs["exchange_ts"].to_numpy(dtype=np.int64))
            groups = qs.groupby(["symbol", "exchange", "k"], sort=False)
            n, lat, last = groups.size(), groups["lat"].sum(), groups.tail(1)
            for row in last.itertuples(index=False):
                key = (row.symbol, row.exchange, int(row.k))
                slot = self.slots.get(key)
                if slot is None:
                    slot = self.slots[key] = Slot()
                q = (int(row.exchange_ts), int(row.received_ts), row.dedupe_key,
                     float(row.bid), float(row.ask), _opt(row.bid_size), _opt(row.ask_size))
                slot.n += int(n[key])
                slot.lat += int(lat[key])
                if slot.quote is None or q[:3] > slot.quote[:3]:
                    slot.quote = q
            mine = qs[qs["home"].to_numpy(dtype=bool)]
            points = pd.DataFrame({
                "exchange": mine["exchange"], "symbol": mine["symbol"],
                "bid": mine["bid"].astype("float64"), "ask": mine["ask"].astype("float64"),
                "bid_size": pd.to_numeric(mine["bid_size"]).astype("float64"),
                "ask_size": pd.to_numeric(mine["ask_size"]).astype("float64"),
                "exchange_ts": mine["exchange_ts"].astype("int64"),
            })
            if quotes is not None:
                quotes.append(points)
            else:
                for p in points.to_dict("records"):
                    p["bid_size"], p["ask_size"] = _opt(p["bid_size"]), _opt(p["ask_size"])
                    out.append({"record": "quote", **p})
        books = data[data["kind"] == "book"]
        for row in books.groupby(["symbol", "exchange", "k"], sort=False).tail(1).itertuples(
                index=False):
            key = (row.symbol, row.exchange, int(row.k))
            slot = self.slots.get(key)
            if slot is None:
                slot = self.slots[key] = Slot()
            book = (int(row.exchange_ts), int(row.received_ts), row.dedupe_key,
                    _levels(row.bids), _levels(row.asks))
            if slot.book is None or book[:3] > slot.book[:3]:
                slot.book = book

    def snapshot(self, e: int, cfg: EngineConfig, by_k: dict | None = None
                 ) -> dict[tuple[str, str], dict]:
        """Window ``e``'s snapshot: ``{(symbol, exchange): leg}`` with ``bid, ask, bid_size,
        ask_size, quote_ts`` (ms), ``messages``, ``latency_ms``, ``book_bids/asks``.
        ``by_k`` is :meth:`_by_k` when several windows are computed from unchanged slots."""
        k_end = e // cfg.w
        by_k = self._by_k() if by_k is None else by_k
        legs: dict[tuple[str, str], dict] = {}
        for k in range(k_end - cfg.age // cfg.w + 1, k_end + 1):
            for (symbol, exchange, _), slot in by_k.get(k, ()):
                leg = legs.setdefault((symbol, exchange), {"q": None, "n": 0, "lat": 0,
                                                            "book": None})
                if slot.quote is not None and (leg["q"] is None or slot.quote[:3] > leg["q"][:3]):
                    leg["q"] = slot.quote
                leg["n"] += slot.n
                leg["lat"] += slot.lat
                if slot.book is not None and (leg["book"] is None
                                              or slot.book[:3] > leg["book"][:3]):
                    leg["book"] = slot.book
        snap = {}
        for key, leg in legs.items():
            q = leg["q"]
            if q is None:
                continue
            book = leg["book"]
            snap[key] = {
                "symbol": key[0], "exchange": key[1], "bid": q[3], "ask": q[4],
                "bid_size": q[5], "ask_size": q[6], "quote_ts": q[0], "messages": leg["n"],
                "latency_ms": leg["lat"] / leg["n"],
                "book_bids": book[3] if book else None, "book_asks": book[4] if book else None,
            }
        return snap

    def _by_k(self) -> dict[int, list[tuple[tuple[str, str, int], Slot]]]:
        index: dict[int, list] = {}
        for key, slot in self.slots.items():
            index.setdefault(key[2], []).append((key, slot))
        return index

    # --- pairs ------------------------------------------------------------------------------

    def pairs(self, e: int, snap: dict[tuple[str, str], dict], cfg: EngineConfig,
              symbols: set[str] | None = None) -> list[dict]:
        """Spread rows of window ``e`` (buy legs among ``symbols``, default all), with the
        columns of :func:`spark_jobs.transforms.spreads`; times as UTC ``pd.Timestamp``."""
        usd = cfg.usd_quotes
        legs = [dict(v, base=v["symbol"].split("-", 1)[0], quote=v["symbol"].split("-", 1)[1])
                for v in snap.values()]
        rates = [leg for leg in legs if leg["base"] in usd and leg["quote"] in usd]
        conv = _conversions(rates, cfg)
        usd_rate = _usd_rates(rates, usd)
        rows = []
        times = {"iso": iso_ms(e), "start": from_ms(e - cfg.age), "end": from_ms(e)}
        for leg in legs:
            leg["ts"] = from_ms(leg["quote_ts"])
        for a in legs:
            if symbols is not None and a["symbol"] not in symbols:
                continue
            for b in legs:
                if a["base"] != b["base"]:
                    continue
                same = a["symbol"] == b["symbol"] and a["exchange"] != b["exchange"]
                cross = (a["quote"] != b["quote"] and a["base"] not in usd
                         and a["quote"] in usd and b["quote"] in usd)
                c = conv.get((a["quote"], b["quote"])) if cross else None
                if not (same or (cross and c is not None)):
                    continue
                rows.append(_spread_row(a, b, c, usd_rate.get(a["quote"]), times, cfg))
        return rows

    # --- early firing -----------------------------------------------------------------------

    def _fire_early(self, df: pd.DataFrame, now_ms: int, cfg: EngineConfig,
                    out: list[dict]) -> None:
        quotes = df[(df["kind"] == "quote") & df["home"].to_numpy(dtype=bool)]
        if quotes.empty:
            return
        first = -(-quotes["exchange_ts"].to_numpy(dtype=np.int64) // cfg.w) * cfg.w
        windows: dict[int, set[str]] = {}
        for e, symbol in zip(first.tolist(), quotes["symbol"].tolist(), strict=True):
            windows.setdefault(e, set()).add(symbol)
        by_k = self._by_k()
        # windows this batch finalizes get their final version now: no early one before it
        final_now = self._next_watermark(now_ms, cfg)
        for e in sorted(windows):
            if e <= final_now:
                continue
            bases = {s.split("-", 1)[0] for s in windows[e]}
            snap = self.snapshot(e, cfg, by_k)
            mine = {s for s, _ in snap if s.split("-", 1)[0] in bases and s in self.home_symbols}
            before: dict[str, tuple] | None = None
            for row in self.pairs(e, snap, cfg, mine):
                if not row["net"] > cfg.tracker.min_net:
                    continue
                row = tracker.with_depth(row, cfg.tracker)
                sig = _run_signature(row)
                known = self.early.get(row["opportunity_id"])
                if known is not None and known[0] == sig:
                    continue
                if before is None:  # the pairs' snapshots of the window before
                    prev = self.pairs(e - cfg.w, self.snapshot(e - cfg.w, cfg, by_k), cfg, mine)
                    before = {tracker.pair_key(r): _run_signature(tracker.with_depth(
                        r, cfg.tracker)) for r in prev if r["net"] > cfg.tracker.min_net}
                if before.get(tracker.pair_key(row)) == sig:
                    continue  # the same snapshot as the window before: not a new opportunity
                row["episode_id"] = self._expected_episode(row, e, cfg)
                rec = _opportunity(row, "early", now_ms, e, e)
                self.early[row["opportunity_id"]] = (sig, rec)
                out.append(rec)

    def _expected_episode(self, row: dict, e: int, cfg: EngineConfig) -> str:
        """The episode an early opportunity of window ``e`` is expected to belong to: the
        pair's open episode, or the one of its latest early window, when within the episode
        gap; else a new one starting at ``e - W``. The final version carries the real one."""
        key = tracker.pair_key(row)
        state = self.pair_states.get(key) or {}
        ep = state.get("ep")
        last = self.early_episodes.get(key)
        gap = cfg.tracker.gap_ms
        if last is not None and 0 <= e - last[1] <= gap:
            episode = last[0]
        elif ep is not None and e - ep["end"] <= gap:
            episode = ep["id"]
        else:
            episode = f"{key}|{iso_ms(e - cfg.w)}"
        self.early_episodes[key] = (episode, max(e, last[1]) if last else e)
        return episode

    # --- finalization -----------------------------------------------------------------------

    def _finalize(self, now_ms: int, cfg: EngineConfig, out: list[dict]) -> None:
        """Move the watermark; finalize the windows it passed, in order; prune state."""
        if not self.clocks:
            return
        active = self._active(now_ms, cfg)
        wm = self._next_watermark(now_ms, cfg)
        if wm <= self.watermark:
            if not active:
                self._flush(cfg, now_ms, out)
            return
        self.watermark = wm
        last = wm // cfg.w * cfg.w
        ends = self._window_ends(self.finalized, last, cfg)
        pair_rows: dict[str, list[dict]] = {}
        exchange_rows: dict[str, list[dict]] = {}
        final_ids: set[str] = set()
        by_k = self._by_k()
        for e in ends:
            snap = self.snapshot(e, cfg, by_k)
            for row in self.pairs(e, snap, cfg, self.home_symbols):
                pair_rows.setdefault(tracker.pair_key(row), []).append(row)
            usd_rate = _usd_rates([dict(v, base=v["symbol"].split("-", 1)[0],
                                        quote=v["symbol"].split("-", 1)[1])
                                   for v in snap.values()
                                   if _is_rate(v["symbol"], cfg.usd_quotes)], cfg.usd_quotes)
            for (symbol, exchange), leg in snap.items():
                if symbol not in self.home_symbols:
                    continue
                exchange_rows.setdefault(f"{symbol}|{exchange}", []).append({
                    **leg, "window_end": from_ms(e), "quote_ts": from_ms(leg["quote_ts"]),
                    "usd_rate": usd_rate.get(symbol.split("-", 1)[1]),
                })
        for key in sorted(set(pair_rows) | set(self.pair_states)):
            state, records, _ = tracker.track_pair(self.pair_states.get(key),
                                                   pair_rows.get(key, []), wm, cfg.tracker)
            self.pair_states[key] = state
            for rec in records:
                out.append(rec)
                if rec["record"] == "spread":
                    started = self._extend_run(key, rec, cfg, now_ms, out)
                    if started is not None:
                        final_ids.add(started)
            run = self.runs.get(key)
            if run is not None and run["last"] < last:  # the next window is final, another
                out.append(self._close_run(key, cfg, now_ms))
        for key in sorted(exchange_rows):
            state, records = tracker.track_exchange(self.exchange_states.get(key),
                                                    exchange_rows[key], cfg.tracker)
            self.exchange_states[key] = state
            out.extend(records)
        for oid in [i for i in self.early if _window_of(i) <= last]:
            if oid not in final_ids:
                out.append({**self.early[oid][1], "stage": "retracted", "emitted_ts": now_ms})
            del self.early[oid]
        self.finalized = max(self.finalized, last)
        self._prune(cfg)
        if not active:
            self._flush(cfg, now_ms, out)

    def _extend_run(self, key: str, rec: dict, cfg: EngineConfig, now_ms: int,
                    out: list[dict]) -> str | None:
        """Take the final spread record ``rec`` of pair ``key`` (windows in order) into the
        pair's run: an opportunity with the same snapshot as the run's last window, in the
        next window, extends it; any other record closes it (its ``final`` opportunity goes to
        ``out``), and an opportunity starts a new run. Returns the id of a run started here."""
        e = to_ms(rec["window_end"])
        run = self.runs.get(key)
        if rec["is_opportunity"]:
            sig = _run_signature(rec)
            if run is not None and run["sig"] == sig and run["last"] == e - cfg.w:
                run["last"] = e
                return None
            if run is not None:
                out.append(self._close_run(key, cfg, now_ms))
            self.runs[key] = {"sig": sig, "rec": rec, "last": e}
            return rec["opportunity_id"]
        if run is not None:
            out.append(self._close_run(key, cfg, now_ms))
        return None

    def _close_run(self, key: str, cfg: EngineConfig, now_ms: int, keep: bool = False) -> dict:
        """The ``final`` opportunity of pair ``key``'s run (removed unless ``keep``)."""
        run = self.runs[key] if keep else self.runs.pop(key)
        first = to_ms(run["rec"]["window_end"])
        return _opportunity(run["rec"], "final", now_ms, first, run["last"], cfg.w)

    def _flush(self, cfg: EngineConfig, now_ms: int, out: list[dict]) -> None:
        """Every exchange is idle (end of a replay): emit each open run's opportunity as
        ``final``, each open episode as ``closed`` and each open hour's percentiles as they
        stand, once, without forgetting them. If input resumes within the episode gap or the
        hour, or in the next window with the same snapshot, the same run, episode or hour goes
        on and is emitted again, complete (same ids: the sinks keep the last version)."""
        if self.flushed:
            return
        self.flushed = True
        for key in sorted(self.runs):
            out.append(self._close_run(key, cfg, now_ms, keep=True))
        for key in sorted(self.pair_states):
            st = self.pair_states[key]
            if st.get("ep") is not None:
                out.append(tracker.episode_record(st["ep"], "closed", cfg.tracker))
            if st.get("vals"):
                out.append(tracker.percentile_record(st["leg"], st["key"], st["hour"],
                                                      st["vals"]))

    def _next_watermark(self, now_ms: int, cfg: EngineConfig) -> int:
        """The combined watermark the clocks give now (never below the current one). A listed
        source partition that has had no record yet holds it where it is until that partition
        has been idle for ``idle_ms`` since it was listed (Flink's idleness for an empty
        split): its first records, read a batch later, are not late because the others ran
        ahead (the first micro-batch of a replay often reads only some partitions)."""
        if not self.clocks:
            return self.watermark
        if any(k not in self.clocks and now_ms - t <= cfg.idle_ms
               for k, t in self.known.items()):
            return self.watermark
        active = self._active(now_ms, cfg)
        if active:
            wm = min(self.clocks[e] for e in active) - cfg.watermark_ms
        else:  # all idle: close every window that holds a quote
            wm = max(self.clocks.values()) + cfg.age - 1
        return max(wm, self.watermark)

    def _window_ends(self, after: int, last: int, cfg: EngineConfig) -> list[int]:
        """Window ends in ``(after, last]`` with at least one home quote in their snapshot."""
        span = cfg.age // cfg.w
        ks = {k for (symbol, _, k), slot in self.slots.items()
              if slot.quote is not None and symbol in self.home_symbols}
        ends = {(k + j) * cfg.w for k in ks for j in range(span)}
        return sorted(e for e in ends if after < e <= last)

    def _prune(self, cfg: EngineConfig) -> None:
        """Forget buckets no non-final window can use, and their dedupe hashes."""
        keep_from = (self.finalized + cfg.w) // cfg.w - cfg.age // cfg.w + 1
        self.slots = {key: s for key, s in self.slots.items() if key[2] >= keep_from}
        self.early_episodes = {k: v for k, v in self.early_episodes.items()
                               if v[1] + cfg.tracker.gap_ms > self.finalized}
        hash_from = -(-(self.watermark + 1) // cfg.w)
        self.hashes = {k: h for k, h in self.hashes.items() if k >= hash_from}


# --- helpers ---------------------------------------------------------------------------------


def _opt(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v


def _levels(value: Any) -> list[list[float]] | None:
    if value is None or len(value) == 0:
        return None
    return [[float(x) for x in lv] for lv in value]




def _is_rate(symbol: str, usd: tuple[str, ...]) -> bool:
    base, quote = symbol.split("-", 1)
    return base in usd and quote in usd


def _window_of(opportunity_id: str) -> int:
    iso = opportunity_id.split("|")[1]
    return int(pd.Timestamp(iso).value // 1_000_000)


def _conversions(rates: list[dict], cfg: EngineConfig) -> dict[tuple[str, str], dict]:
    """Best way to turn one unit of ``source`` into ``into`` in this window, per
    ``(into, source)``: the max of ``(eff, rate, symbol, exchange)`` with ``eff = rate * (1 -
    fee)``; buying ``into`` at the ask of ``<into>-<source>`` (rate ``1 / ask``) or selling
    ``source`` at the bid of ``<source>-<into>`` (rate ``bid``)."""
    best: dict[tuple[str, str], tuple] = {}
    for r in rates:
        fee = cfg.fees.get(r["exchange"])
        if fee is None:
            continue
        for into, source, rate in ((r["base"], r["quote"], 1.0 / r["ask"]),
                                   (r["quote"], r["base"], r["bid"])):
            cand = (rate * (1.0 - fee), rate, r["symbol"], r["exchange"], fee)
            if (into, source) not in best or cand > best[(into, source)]:
                best[(into, source)] = cand
    return {k: {"rate": v[1], "symbol": v[2], "exchange": v[3], "fee": v[4]}
            for k, v in best.items()}


def _usd_rates(rates: list[dict], usd: tuple[str, ...]) -> dict[str, float]:
    """USD per unit of each currency: 1 for USD, else the mean mid of its ``<C>-USD`` markets
    (mids summed in ascending order, as the reference does)."""
    mids: dict[str, list[float]] = {}
    for r in rates:
        if r["quote"] == "USD" and r["base"] in usd:
            mids.setdefault(r["base"], []).append((r["bid"] + r["ask"]) / 2.0)
    out = {"USD": 1.0}
    for c, m in mids.items():
        if c == "USD":
            continue
        total = 0.0
        for x in sorted(m):
            total += x
        out[c] = total / len(m)
    return out


def _spread_row(a: dict, b: dict, c: dict | None, usd_rate: float | None, times: dict,
                cfg: EngineConfig) -> dict:
    """One pair's spread row, in exactly the float operation order of the reference
    (``tests/reference.py``); ``times`` holds the window's ``iso`` end, ``start`` and ``end``
    datetimes, legs their quote time ``ts``."""
    buy_fee, sell_fee = cfg.fees[a["exchange"]], cfg.fees[b["exchange"]]
    cross = c is not None
    rate = c["rate"] if cross else None
    gross = (b["bid"] * rate / a["ask"] if cross else b["bid"] / a["ask"]) - 1.0
    net = gross - buy_fee - sell_fee - (c["fee"] if cross else 0.0) - cfg.haircut
    sized = a["ask_size"] is not None and b["bid_size"] is not None
    if sized:
        size = min(a["ask_size"], b["bid_size"])
    else:
        size = cfg.tracker.notional_usd / (usd_rate if usd_rate is not None else 1.0) / a["ask"]
    profit = net * size * a["ask"]
    key = f"{a['symbol']}/{b['symbol']}" if cross else a["symbol"]
    return {
        "opportunity_id": f"{key}|{times['iso']}|{a['exchange']}|{b['exchange']}",
        "symbol": a["symbol"], "sell_symbol": b["symbol"], "cross_quote": cross,
        "window_start": times["start"], "window_end": times["end"],
        "buy_exchange": a["exchange"], "buy_ask": a["ask"], "buy_ask_size": a["ask_size"],
        "buy_ts": a["ts"], "sell_exchange": b["exchange"], "sell_bid": b["bid"],
        "sell_bid_size": b["bid_size"], "sell_ts": b["ts"],
        "conversion_symbol": c["symbol"] if cross else None,
        "conversion_exchange": c["exchange"] if cross else None,
        "conversion_rate": rate, "conversion_fee": c["fee"] if cross else None,
        "profit_currency": a["quote"], "usd_rate": usd_rate,
        "buy_asks": a["book_asks"], "sell_bids": b["book_bids"],
        "buy_fee": buy_fee, "sell_fee": sell_fee, "haircut": cfg.haircut,
        "gross": gross, "net": net, "gross_bps": gross * BPS, "net_bps": net * BPS,
        "size_base": size, "size_source": "top_of_book" if sized else "notional",
        "expected_profit": profit,
        "expected_profit_usd": profit * usd_rate if usd_rate is not None else None,
    }


def _run_signature(row: dict) -> tuple:
    """What makes two windows' rows of one pair the same opportunity: every value of the
    spread row except the window and the rolling statistics (same legs' quotes, books,
    conversion, fees, hence the same spreads, size and profit)."""
    return tuple(None if isinstance(v, float) and v != v else v
                 for v in (row.get(k) for k in _RUN_FIELDS))


_RUN_FIELDS = [k for k in tracker.SPREAD_FIELDS if k not in {
    "opportunity_id", "window_start", "window_end", "episode_id", "spread_mean_bps",
    "spread_std_bps", "spread_z", "anomaly"}]


def _opportunity(row: dict, stage: str, now_ms: int, first: int, last: int,
                 w: int | None = None) -> dict:
    """An ``opportunity`` record of spread row ``row`` (its first window), valid over the
    windows ending ``first`` .. ``last`` (UTC ms; ``w`` the window width when they differ)."""
    rec = {k: row.get(k) for k in tracker.SPREAD_FIELDS}
    rec.update(record="opportunity", stage=stage, emitted_ts=now_ms, is_opportunity=True,
               valid_from=from_ms(first), valid_to=from_ms(last),
               windows=1 if w is None else (last - first) // w + 1)
    return rec
