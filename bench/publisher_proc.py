"""The stream benchmark's publisher, in its own process: ``bench/stream_bench.py`` starts it.

    python bench/publisher_proc.py '{"input": "binance", "data_dir": "...", "rate": 10000,
                                     "duration": 20, "warmup": 5, "iaqf_from": "...",
                                     "iaqf_to": "..."}'

It loads the input at once and talks JSON lines (stdout to the bench, stdin from it):

1. says ``{"ready": true, "exchanges": [...], "distinct": n, "total": n, "warmup": n}`` once
   the quotes are loaded (``total`` quotes will be measured, after ``warmup`` more);
2. reads ``{"settings": {...}, "out": path}`` (keyword arguments of
   :class:`arbstream.config.Settings`); with a warm-up, publishes it, says ``{"warm": true,
   "quotes": n}`` and reads one more line (the bench lets the job drain meanwhile);
3. publishes the measured quotes with :func:`producers.replay.publish.publish_quotes` (then one
   heartbeat per exchange at the last event time) and says ``{"done": true, "t_start": s,
   "t_end": s, "quotes": n, "published": {...}, ...}`` (wall times around the publish call);
   the measured quotes' receive times are pickled to ``out``: ``{(exchange, symbol,
   exchange_ts): received_ts}`` (ms; the latest when several quotes of one series share a
   millisecond), empty for ``rate`` None;
4. stays alive (so that its CPU time can still be sampled from ``/proc``) until stdin closes.

An error is reported as ``{"error": traceback}`` (exit status 1).

``rate`` N: the recording is cycled to ``N * duration`` quotes (each pass's dedupe keys suffixed
``#<pass>``) and **re-timed onto the wall clock**: quote i gets ``exchange_ts`` = its scheduled
publish time (start + i/N) and ``received_ts`` = the wall time its ``produce()`` is called
(later than scheduled when the publisher falls behind). ``rate`` None: the recording once,
original timestamps, as fast as one producer goes.

Warm-up (``warmup`` s, 0 for none), so that the measured run does not pay for the job's cold
start (Python workers, JIT, first state store): with ``rate`` N, ``N * warmup`` quotes re-timed
the same way at N/s; with ``rate`` None, the recording's first ``10,000 * warmup`` quotes as
fast as possible, their times shifted back to end 60 s of event time before the recording
starts (so that neither the live run nor a backlog drain of the topics sees them as late or
as a jump of event time). Dedupe keys are suffixed ``#warmup``.
"""

from __future__ import annotations

import itertools
import json
import pickle
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from arbstream.config import Settings
from arbstream.schemas import Quote
from arbstream.timestamps import parse_time
from producers.replay.binance import VENUES, load_binance_records
from producers.replay.iaqf import load_iaqf_quotes
from producers.replay.publish import publish_quotes

Received = dict[tuple[str, str, int], int]


def load_quotes(spec: dict[str, Any]) -> tuple[list[Quote], list[str]]:
    """The input's quotes in event-time order and the exchanges they are on."""
    data_dir = Path(spec["data_dir"])
    if spec["input"] == "binance":
        records = load_binance_records(data_dir)
        return [r for r in records if isinstance(r, Quote)], list(VENUES.values())
    frame = load_iaqf_quotes(data_dir, parse_time(spec["iaqf_from"]),
                             parse_time(spec["iaqf_to"]))
    frame = frame.sort_values("exchange_ts", kind="stable")
    quotes = [
        Quote(exchange=r.exchange, symbol=r.symbol, exchange_ts=int(r.exchange_ts),
              received_ts=int(r.exchange_ts), bid=float(r.bid), ask=float(r.ask))
        for r in frame.itertuples()
    ]
    return quotes, sorted({q.exchange for q in quotes})


def retimed(quotes: Sequence[Quote], rate: float, total: int, received: Received,
            tag: str = "") -> Iterator[Quote]:
    """``total`` quotes cycling through ``quotes``, re-timed onto the wall clock (module
    docstring); records each (exchange, symbol, exchange_ts) → latest ``received_ts`` (ms).
    ``publish_quotes`` takes the next quote only when it is due, so ``received_ts`` is the
    wall time of its ``produce()``."""
    t0 = time.time()
    for i, quote in zip(range(total), itertools.cycle(quotes), strict=False):
        scheduled = int((t0 + i / rate) * 1000)
        sent = max(time.time_ns() // 1_000_000, scheduled)
        suffix = tag + (f"#{i // len(quotes)}" if i >= len(quotes) else "")
        key = (quote.exchange, quote.symbol, scheduled)
        received[key] = max(received.get(key, 0), sent)
        yield quote.model_copy(update={
            "exchange_ts": scheduled, "received_ts": sent,
            "dedupe_key": quote.dedupe_key + suffix,
        })


def shifted(quotes: Sequence[Quote], count: int, gap_ms: int = 60_000) -> list[Quote]:
    """The first ``count`` quotes, times shifted back to end ``gap_ms`` before the first."""
    head = quotes[:count]
    if not head:
        return []
    shift = head[-1].exchange_ts - head[0].exchange_ts + gap_ms
    return [q.model_copy(update={
        "exchange_ts": q.exchange_ts - shift, "received_ts": q.received_ts - shift,
        "dedupe_key": q.dedupe_key + "#warmup"}) for q in head]


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    spec = json.loads(sys.argv[1])
    rate = spec.get("rate")
    try:
        quotes, exchanges = load_quotes(spec)
        total = int(rate * spec["duration"]) if rate else len(quotes)
        warmup = int((rate or 10_000) * spec.get("warmup", 0))
        _say({"ready": True, "exchanges": exchanges, "distinct": len(quotes), "total": total,
              "warmup": warmup})
        line = sys.stdin.readline()
        if not line:
            return
        go = json.loads(line)
        settings = Settings(**go["settings"])
        received: Received = {}
        if warmup:
            warm = (retimed(quotes, rate, warmup, {}, "#warmup") if rate
                    else shifted(quotes, warmup))
            report = publish_quotes(warm, settings, progress=False, rate=rate)
            _say({"warm": True, "quotes": report.quotes})
            if not sys.stdin.readline():
                return
        items = retimed(quotes, rate, total, received) if rate else quotes
        t_start = time.time()
        report = publish_quotes(items, settings, progress=False, rate=rate)
        t_end = time.time()
        Path(go["out"]).write_bytes(pickle.dumps(received, protocol=pickle.HIGHEST_PROTOCOL))
        _say({"done": True, "t_start": t_start, "t_end": t_end, "quotes": report.quotes,
              "published": report.published, "elapsed_s": report.elapsed_s,
              "first_event_ts": report.first_event_ts, "last_event_ts": report.last_event_ts})
    except Exception:
        _say({"error": traceback.format_exc()})
        sys.exit(1)
    sys.stdin.read()  # until the bench closes stdin: CPU stays visible in /proc until then


if __name__ == "__main__":
    main()
