"""Stream benchmark: real recorded quotes at a controlled rate through Kafka and the whole job.

Starts its own local stack (tansu, InfluxDB, SecantusDB) on free ports in a temporary state
directory and the stream job (:func:`spark_jobs.arbitrage.start`, ``local[2]``), publishes real
quotes and prints:

* sustained pipeline throughput, quotes/s: quotes published / (publish start → end of the
  last micro-batch that read data, over every query);
* end-to-end latency p50/p95/p99 to the opportunity in MongoDB (``min_net`` = −1, so every pair
  of every window is an opportunity): from exchange time, ``first_seen_at − max(buy_ts,
  sell_ts)``; from receive time, ``first_seen_at −`` the ``received_ts`` of that later leg's
  quote (looked up offline in the replay's exchange_ts → received_ts map); and the time the
  bench's poller (every 0.2 s) first saw the document, as a check;
* micro-batch durations per query from ``query.recentProgress`` (triggerExecution and its
  addBatch / getBatch / latestOffset / queryPlanning / walCommit / commitOffsets parts) and the
  state operators' metrics;
* CPU seconds per quote by process kind (Spark JVM, Python workers, the Python source's
  planner, broker, InfluxDB, MongoDB server, and the driver process, which also runs the
  replay producer and the poller), from ``/proc``: on a shared machine
  these are steadier than wall-clock figures;
* the ceiling: the Kafka source alone (``format("arbkafka")``, same options and topics,
  ``foreachBatch`` doing ``count()``) draining the same records from the topics, and the
  pipeline draining the same backlog, as a pipeline/source ratio.

Inputs (both real, read in place): ``binance`` = ``binance-ws-2024-08`` bookTicker quotes, spot
(``binance``) and USD-M perpetual (``binanceusdm``), BTC-USDT and ETH-USDT, 217,332 quotes
(:mod:`producers.binance_replay`); ``iaqf`` = the IAQF 1-minute bars as quotes
(:func:`producers.replay.load_iaqf_quotes`).

Modes:

* ``--rate N`` (latency run): N quotes/s for ``--duration`` s, the recording repeated as often
  as needed (each pass's dedupe keys suffixed ``#<pass>``). The quotes keep their real prices,
  sizes and order, but are **re-timed onto the wall clock** so that event time advances like a
  live feed: quote i gets ``exchange_ts`` = its scheduled publish time (start + i/N) and
  ``received_ts`` = the wall time its ``produce()`` was called (later when the producer falls
  behind schedule). Defaults: trigger 0.5 s, watermark 1 s, window 1 s, max quote age 1 s.
  Windows that only the replay's closing heartbeat closes are left out of the percentiles.
* ``--rate max`` (throughput run): the recording once, original timestamps, as fast as one
  producer goes, while the job runs. Defaults: the job's own (trigger 1 s, watermark 10 s,
  window 1 s, max quote age 5 s, 200,000 offsets per trigger).

    python bench/stream_bench.py --rate 10000             # latency, Binance spot vs perp
    python bench/stream_bench.py --rate max               # throughput + ceiling
    python bench/stream_bench.py --input iaqf --rate max

Goals (issue): ≥30,000 quotes/s sustained through the whole pipeline; p50 ≤1.5 s and p99 ≤3 s at
10,000 quotes/s; pipeline/source ratio ≥0.5. Times are wall-clock seconds unless stated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from arbstream import stack
from arbstream.config import Settings
from arbstream.schemas import Quote
from arbstream.stack import free_port
from arbstream.topics import ensure_topics, quotes_topic
from producers.binance_replay import VENUES, load_binance_records
from producers.replay import load_iaqf_quotes, parse_time, publish_quotes
from spark_jobs import arbitrage
from spark_jobs.kafka_source import end_offsets
from spark_jobs.session import build_session

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHASES = ("addBatch", "getBatch", "latestOffset", "queryPlanning", "walCommit", "commitOffsets")
POLL_S = 0.2
STATE_STORES = {
    "rocksdb": "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider",
    "hdfs": "org.apache.spark.sql.execution.streaming.state.HDFSBackedStateStoreProvider",
}



def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --- CPU accounting ------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")
#: Process kinds by command line, first match wins: CPU time is summed per kind.
KINDS = (
    ("tansu", "broker"), ("influxd", "influxd"), ("secantusd", "mongo"),
    ("python_streaming_source_runner", "py source planner"), ("pyspark.daemon", "py workers"),
    ("pyspark.worker", "py workers"), ("java", "spark jvm"),
)


def _tree(root: int) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, start time) -> (kind, own CPU seconds) of ``root`` and all its descendants."""
    procs: dict[int, tuple[int, int, float, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        procs[int(entry)] = (int(fields[1]), int(fields[19]), cpu, cmd)
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for pid, (_, started, cpu, cmd) in procs.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in procs:
            ancestor = procs[ancestor][0]
        if ancestor == root:
            kind = "driver" if pid == root else next(
                (k for needle, k in KINDS if needle in cmd), "other")
            out[(pid, started)] = (kind, cpu)
    return out


class CpuSampler(threading.Thread):
    """Samples the own CPU time of this process and its descendants every 0.5 s; ``delta()``
    is the CPU seconds used per kind of process since the sampler started. A process that
    exits is counted up to its last sample (at most 0.5 s of it is missed)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.first = _tree(os.getpid())
        self.last = dict(self.first)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.last.update(_tree(os.getpid()))

    def delta(self) -> dict[str, float]:
        """Stop sampling; CPU seconds per kind since the start."""
        self.stop_event.set()
        self.last.update(_tree(os.getpid()))
        out: dict[str, float] = {}
        for key, (kind, cpu) in self.last.items():
            used = cpu - self.first.get(key, (kind, 0.0))[1]
            out[kind] = out.get(kind, 0.0) + used
        return dict(sorted(out.items()))


# --- input ---------------------------------------------------------------------------------


def load_quotes(args: argparse.Namespace) -> tuple[list[Quote], list[str]]:
    """The input's quotes in event-time order and the exchanges they are on."""
    if args.input == "binance":
        records = load_binance_records(args.data_dir)
        return [r for r in records if isinstance(r, Quote)], list(VENUES.values())
    frame = load_iaqf_quotes(args.data_dir, parse_time(args.iaqf_from), parse_time(args.iaqf_to))
    frame = frame.sort_values("exchange_ts", kind="stable")
    quotes = [
        Quote(exchange=r.exchange, symbol=r.symbol, exchange_ts=int(r.exchange_ts),
              received_ts=int(r.exchange_ts), bid=float(r.bid), ask=float(r.ask))
        for r in frame.itertuples()
    ]
    return quotes, sorted({q.exchange for q in quotes})


def retimed(quotes: Sequence[Quote], rate: float, total: int,
            received: dict[tuple[str, str, int], int]) -> Iterator[Quote]:
    """``total`` quotes cycling through ``quotes``, re-timed onto the wall clock (module
    docstring); records each (exchange, symbol, exchange_ts) → latest ``received_ts`` (ms)."""
    t0 = time.time()
    for i, quote in zip(range(total), itertools.cycle(quotes), strict=False):
        scheduled = int((t0 + i / rate) * 1000)
        sent = max(time.time_ns() // 1_000_000, scheduled)
        suffix = f"#{i // len(quotes)}" if i >= len(quotes) else ""
        key = (quote.exchange, quote.symbol, scheduled)
        received[key] = max(received.get(key, 0), sent)
        yield quote.model_copy(update={
            "exchange_ts": scheduled, "received_ts": sent,
            "dedupe_key": quote.dedupe_key + suffix,
        })


# --- MongoDB poller ------------------------------------------------------------------------


class Poller(threading.Thread):
    """Polls ``opportunities`` every :data:`POLL_S` s and notes when each _id was first seen."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.seen: dict[str, float] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        from spark_jobs.sinks import mongo

        since = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        with mongo.connect(self.settings) as client:
            coll = client[self.settings.mongo_db][mongo.OPPORTUNITIES]
            while not self.stop_event.wait(POLL_S):
                now = time.time()
                newest = since
                for doc in coll.find({"first_seen_at": {"$gte": since}},
                                     {"_id": 1, "first_seen_at": 1}):
                    self.seen.setdefault(doc["_id"], now)
                    newest = max(newest, doc["first_seen_at"])
                since = newest - dt.timedelta(seconds=30)


def latencies(settings: Settings, received: dict[tuple[str, str, int], int], seen: dict[str, float],
              last_event_ms: int) -> dict[str, Any]:
    """Latency samples (s) of every opportunity whose window the data itself closed."""
    from spark_jobs.sinks import mongo

    with mongo.connect(settings) as client:
        docs = list(client[settings.mongo_db][mongo.OPPORTUNITIES].find({}))
    cutoff = last_event_ms - settings.watermark_seconds * 1000
    out: dict[str, list[float]] = {"exchange": [], "receive": [], "visible": [], "window_end": []}
    skipped = missing = 0
    for doc in docs:
        end = doc["window_end"].timestamp() * 1000
        if end > cutoff:
            skipped += 1
            continue
        first = doc["first_seen_at"].timestamp()
        buy, sell = (round(doc[k].timestamp() * 1000) for k in ("buy_ts", "sell_ts"))
        later = max(buy, sell)
        buy_leg = (doc["buy_exchange"], doc["symbol"])
        sell_leg = (doc["sell_exchange"], doc.get("sell_symbol") or doc["symbol"])
        legs = [leg for leg, ts in ((buy_leg, buy), (sell_leg, sell)) if ts == later]
        recv = [received.get((ex, sym, later)) for ex, sym in legs]
        recv_ms = max((r for r in recv if r is not None), default=None)
        out["exchange"].append(first - later / 1000)
        out["window_end"].append(first - end / 1000)
        if recv_ms is None:
            missing += 1
        else:
            out["receive"].append(first - recv_ms / 1000)
        if doc["_id"] in seen:
            out["visible"].append(seen[doc["_id"]] - later / 1000)
    return {"samples": out, "documents": len(docs), "heartbeat_closed": skipped,
            "no_receive_time": missing}


# --- progress ------------------------------------------------------------------------------


def _ts(progress: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(progress["timestamp"].replace("Z", "+00:00")).timestamp()


def data_batches(query: Any) -> list[dict[str, Any]]:
    return [p for p in query.recentProgress if p["numInputRows"] > 0]


def batch_summary(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Median / p95 / max of triggerExecution and its phases (s), rows per batch."""
    out: dict[str, Any] = {"batches": len(batches)}
    if not batches:
        return out
    for name in ("triggerExecution", *PHASES):
        vals = [p["durationMs"].get(name, 0) / 1000 for p in batches]
        out[name] = (statistics.median(vals), pct(vals, 95), max(vals))
    rows = [p["numInputRows"] for p in batches]
    out["rows"] = (statistics.median(rows), max(rows), sum(rows))
    busy = sum(p["durationMs"].get("triggerExecution", 0) for p in batches) / 1000
    out["rows_per_busy_s"] = sum(rows) / busy if busy else float("nan")
    ops = []
    for i in range(len(batches[-1].get("stateOperators", []))):
        per = [p["stateOperators"][i] for p in batches if len(p.get("stateOperators", [])) > i]
        ops.append({
            "name": per[-1].get("operatorName", f"op{i}"),
            "rows_total_max": max(o["numRowsTotal"] for o in per),
            "dropped_by_watermark": sum(o.get("numRowsDroppedByWatermark", 0) for o in per),
            "updates_ms_median": statistics.median(o.get("allUpdatesTimeMs", 0) for o in per),
            "commit_ms_median": statistics.median(o.get("commitTimeMs", 0) for o in per),
            "memory_mb_max": max(o.get("memoryUsedBytes", 0) for o in per) / 2**20,
        })
    out["state"] = ops
    return out


def all_batches(query: Any) -> tuple[int, float]:
    """Micro-batches of every kind (with data, no-data, timer-only) and their total seconds."""
    progress = query.recentProgress
    return len(progress), sum(p["durationMs"].get("triggerExecution", 0) for p in progress) / 1000


def last_end(queries: Sequence[Any]) -> float:
    """Wall time (s) at which the last micro-batch with data ended, over ``queries``."""
    return max((_ts(p) + p["durationMs"].get("triggerExecution", 0) / 1000
                for q in queries for p in data_batches(q)), default=float("nan"))


def first_start(queries: Sequence[Any]) -> float:
    return min((_ts(p) for q in queries for p in data_batches(q)), default=float("nan"))


def wait_rows(queries: Sequence[Any], rows: int, timeout: float) -> None:
    """Until each query has read ``rows`` input rows in total (or ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for q in queries:
            if q.exception():
                raise q.exception()  # type: ignore[misc]
        if all(sum(p["numInputRows"] for p in data_batches(q)) >= rows for q in queries):
            return
        time.sleep(0.2)
    raise TimeoutError(f"queries did not read {rows} rows within {timeout:.0f}s")


def wait_offsets(queries: Sequence[Any], settings: Settings, timeout: float) -> None:
    """Until every query's last micro-batch reached the current end of each of its topics.

    Unlike :func:`spark_jobs.arbitrage.wait_drained` this does not wait for the queries to be
    idle: a trigger whose ``latestOffset`` takes longer than the trigger interval is never
    idle, though it has nothing left to read.
    """
    per_query = arbitrage.query_topics(settings)
    topics = sorted({t for q in queries for t in per_query[q.name]})
    targets = end_offsets(settings.kafka_client_config(), topics)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for q in queries:
            if q.exception():
                raise q.exception()  # type: ignore[misc]
        if all(arbitrage.processed_offsets(q).get(t, {}).get(p, -1) >= end
               for q in queries for t in per_query[q.name]
               for p, end in targets.get(t, {}).items()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"queries did not reach {targets} within {timeout:.0f}s")


def settle(settings: Settings, quiet: float, timeout: float) -> None:
    """Until the ``opportunities`` collection has not grown for ``quiet`` s: windows that
    timers emit after the last batch with data are in before the latencies are read."""
    from spark_jobs.sinks import mongo

    deadline = time.monotonic() + timeout
    with mongo.connect(settings) as client:
        coll = client[settings.mongo_db][mongo.OPPORTUNITIES]
        count, since = coll.estimated_document_count(), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() < deadline:
            time.sleep(0.5)
            now = coll.estimated_document_count()
            if now != count:
                count, since = now, time.monotonic()


# --- runs ----------------------------------------------------------------------------------


def run_pipeline(spark: Any, settings: Settings, checkpoint: Path,
                 publish: Callable[[], Any] | None, expect_rows: int,
                 timeout: float) -> dict[str, Any]:
    """Start the job, optionally publish while it runs, wait until drained; return figures
    (CPU from just before the queries start to the end of the last batch with data)."""
    sampler = CpuSampler()
    sampler.start()
    queries = arbitrage.start(spark, settings, checkpoint)
    try:
        while any(q.lastProgress is None for q in queries):
            for q in queries:
                if q.exception():
                    raise q.exception()  # type: ignore[misc]
            time.sleep(0.1)
        t0 = time.time()
        report = publish() if publish else None
        t1 = time.time()
        spreads = [q for q in queries if q.name in ("ingest", "spreads")]
        wait_rows(spreads, expect_rows, timeout)
        wait_offsets(queries, settings, timeout)
        cpu = sampler.delta()
        settle(settings, max(5.0, 4 * settings.trigger_seconds), timeout)
        return {
            "cpu": cpu,
            "report": report, "t_start": t0, "t_published": t1,
            "first_batch": first_start(spreads), "last_end": last_end(spreads),
            "batches": {q.name: batch_summary(data_batches(q)) for q in queries},
            "all_batches": {q.name: all_batches(q) for q in queries},
        }
    finally:
        for q in queries:
            q.stop()


def run_source(spark: Any, settings: Settings, topics: list[str], checkpoint: Path,
               expect_rows: int, timeout: float) -> dict[str, Any]:
    """The Kafka source alone, from earliest, ``foreachBatch`` doing ``count()``."""
    counted: list[int] = []
    df = arbitrage.read_records(spark, settings, topics)
    sampler = CpuSampler()
    sampler.start()
    query = (
        df.writeStream.queryName("source")
        .foreachBatch(lambda batch, _id: counted.append(batch.count()))
        .option("checkpointLocation", str(checkpoint))
        .trigger(processingTime=f"{int(settings.trigger_seconds * 1000)} milliseconds")
        .start()
    )
    try:
        wait_rows([query], expect_rows, timeout)
        return {"counted": sum(counted), "cpu": sampler.delta(),
                "first_batch": first_start([query]), "last_end": last_end([query]),
                "batches": {"source": batch_summary(data_batches(query))}}
    finally:
        query.stop()


# --- printing ------------------------------------------------------------------------------


def print_batches(title: str, batches: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}: micro-batch durations with data, s (median / p95 / max)")
    for name, b in batches.items():
        if not b.get("batches"):
            print(f"  {name:8} no batch with data")
            continue
        med, p95, mx = b["triggerExecution"]
        rmed, rmax, rsum = b["rows"]
        print(f"  {name:8} {b['batches']:4} batches  total {med:6.2f} / {p95:6.2f} / {mx:6.2f}"
              f"   rows/batch median {rmed:,.0f} max {rmax:,.0f} (sum {rsum:,})"
              f"   {b['rows_per_busy_s']:,.0f} rows per busy s")
        print("           " + "  ".join(f"{ph} {b[ph][0]:.2f}/{b[ph][2]:.2f}" for ph in PHASES))
        for op in b.get("state", []):
            print(f"           state {op['name']:28} rows<= {op['rows_total_max']:>9,}"
                  f"  late-dropped {op['dropped_by_watermark']:>6,}"
                  f"  updates {op['updates_ms_median']:>6.0f} ms  commit "
                  f"{op['commit_ms_median']:>5.0f} ms  mem<= {op['memory_mb_max']:.0f} MB")


def print_cpu(title: str, cpu: dict[str, float], n: int) -> None:
    total = sum(cpu.values())
    print(f"  CPU {title}: {total:.1f} s, {total / n * 1e6:.0f} µs per quote ("
          + ", ".join(f"{k} {v / n * 1e6:.0f}" for k, v in cpu.items() if v >= 0.05) + ")")


def print_latency(lat: dict[str, Any]) -> None:
    s = lat["samples"]
    print(f"\nlatency to MongoDB, s ({len(s['exchange'])} opportunities of {lat['documents']};"
          f" {lat['heartbeat_closed']} in windows closed by the closing heartbeat left out)")
    rows = [("from exchange time (first_seen_at - later leg exchange_ts)", s["exchange"]),
            ("from receive time (first_seen_at - later leg received_ts)", s["receive"]),
            (f"seen by the poller (every {POLL_S} s) - later leg exchange_ts", s["visible"]),
            ("from window end (first_seen_at - window_end)", s["window_end"])]
    for label, vals in rows:
        print(f"  {label:62} p50 {pct(vals, 50):6.2f}  p95 {pct(vals, 95):6.2f}"
              f"  p99 {pct(vals, 99):6.2f}  max {max(vals, default=float('nan')):6.2f}"
              f"  n={len(vals)}")


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", choices=("binance", "iaqf"), default="binance")
    parser.add_argument("--rate", default="10000", help="quotes/s, or max")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="latency run length, s (the recording repeats as needed)")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--iaqf-from", default="2023-03-01")
    parser.add_argument("--iaqf-to", default="2023-03-22")
    parser.add_argument("--trigger", type=float, help="trigger interval, s")
    parser.add_argument("--watermark", type=float, help="watermark delay, s")
    parser.add_argument("--window", type=float, help="window W, s")
    parser.add_argument("--max-age", type=float, help="max quote age, s")
    parser.add_argument("--max-offsets", type=int, help="maxOffsetsPerTrigger (0 = no cap)")
    parser.add_argument("--shuffle-partitions", type=int, default=4)
    parser.add_argument("--kafka-partitions", type=int, default=3)
    parser.add_argument("--state-store", choices=sorted(STATE_STORES), default="rocksdb",
                        help="hdfs does not support transformWithState (the tracker)")
    parser.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark SQL setting for the session (repeatable), e.g. "
                        "spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled"
                        "=true")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the source-alone and pipeline backlog drains")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    latency_run = args.rate != "max"
    rate = float(args.rate) if latency_run else None

    quotes, exchanges = load_quotes(args)
    defaults = (0.5, 1.0, 1.0, 1.0) if latency_run else (1.0, 10.0, 1.0, 5.0)
    trigger, watermark, window, age = (
        v if v is not None else d for v, d in zip(
            (args.trigger, args.watermark, args.window, args.max_age), defaults, strict=True))
    max_offsets = 200_000 if args.max_offsets is None else (args.max_offsets or None)
    state = Path(tempfile.mkdtemp(prefix="arb-stream-bench-"))
    settings = Settings(
        state_dir=state, data_dir=args.data_dir, starting_offsets="latest",
        kafka_bootstrap=f"127.0.0.1:{free_port()}", influx_url=f"http://127.0.0.1:{free_port()}",
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}", exchanges=exchanges,
        kafka_partitions=args.kafka_partitions, spark_shuffle_partitions=args.shuffle_partitions,
        trigger_seconds=trigger, watermark_seconds=watermark, window_seconds=window,
        max_quote_age_seconds=age, max_offsets_per_trigger=max_offsets, min_net=-1.0,
    )
    total = int(rate * args.duration) if rate else len(quotes)
    received: dict[tuple[str, str, int], int] = {}
    topics = [quotes_topic(e) for e in exchanges]
    source_topics = arbitrage.query_topics(settings)["spreads"]  # what the pipeline reads
    load0 = os.getloadavg()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        stack.up(settings)
        ensure_topics(settings)
        spark = build_session(settings, app_name="arbstream-stream-bench")
        spark.conf.set("spark.sql.streaming.numRecentProgressUpdates", "100000")
        spark.conf.set("spark.sql.streaming.stateStore.providerClass",
                       STATE_STORES[args.state_store])
        for item in args.spark_conf:
            key, _, value = item.partition("=")
            spark.conf.set(key, value)
        poller = Poller(settings)
        poller.start()

        def publish() -> Any:
            items = retimed(quotes, rate, total, received) if rate else quotes
            return publish_quotes(items, settings, progress=False, rate=rate)

        live = run_pipeline(spark, settings, state / "cp-live", publish, total, args.timeout)
        poller.stop_event.set()
        poller.join(5)
        report = live["report"]
        results["live"] = {k: v for k, v in live.items() if k != "report"}
        if latency_run:
            results["latency"] = latencies(settings, received, poller.seen,
                                           report.last_event_ts)
        if not args.no_ceiling:
            earliest = settings.model_copy(update={"starting_offsets": "earliest"})
            results["source"] = run_source(spark, earliest, source_topics, state / "cp-source",
                                           total, args.timeout)
            results["backlog"] = run_pipeline(spark, earliest, state / "cp-backlog", None,
                                              total, args.timeout)
        spark.stop()
    finally:
        stack.down(settings)

    n = report.quotes
    print(f"\ninput {args.input}: {n:,} quotes on {', '.join(topics)} "
          f"({len(quotes):,} distinct recorded quotes"
          + (f", re-timed and repeated to {args.duration:.0f} s)" if rate else ")"))
    print(f"settings: rate {args.rate} quotes/s, trigger {trigger} s, watermark {watermark} s, "
          f"window {window} s, max quote age {age} s, maxOffsetsPerTrigger {max_offsets}, "
          f"shuffle partitions {args.shuffle_partitions}, kafka partitions "
          f"{args.kafka_partitions}, state store {args.state_store}, min_net -1.0"
          + "".join(f", {c}" for c in args.spark_conf))
    print(f"cores: Spark local[2] on a {os.cpu_count()}-core machine shared with other work "
          f"(load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}); "
          "figures are noisy")
    pub = live["t_published"] - live["t_start"]
    sustained = n / (live["last_end"] - live["t_start"])
    print(f"\npublish                      {pub:8.2f} s  {n / pub:10,.0f} quotes/s")
    print(f"pipeline, publish -> drained {live['last_end'] - live['t_start']:8.2f} s  "
          f"{sustained:10,.0f} quotes/s sustained (ingest + spreads)")
    results["sustained"] = sustained
    print_cpu("live run", live["cpu"], n)
    print_batches("live run", live["batches"])
    span = live["last_end"] - live["t_start"]
    print("  all micro-batches incl. no-data ones, live run: " + ", ".join(
        f"{name} {n} ({busy:.1f} s busy)" for name, (n, busy) in live["all_batches"].items())
        + f", over {span:.1f} s")
    if latency_run:
        print_latency(results["latency"])
    if not args.no_ceiling:
        src, back = results["source"], results["backlog"]
        s_rate = src["counted"] / (src["last_end"] - src["first_batch"])
        b_rate = n / (back["last_end"] - back["first_batch"])
        results.update(source_rate=s_rate, backlog_rate=b_rate, ratio=b_rate / s_rate)
        print(f"\nceiling: Kafka source alone drains {src['counted']:,} records "
              f"{src['last_end'] - src['first_batch']:.2f} s  {s_rate:10,.0f} records/s")
        print(f"pipeline drains the same backlog  "
              f"{back['last_end'] - back['first_batch']:.2f} s  {b_rate:10,.0f} quotes/s")
        print(f"pipeline / source                 {b_rate / s_rate:.2f}")
        print_cpu("source alone", src["cpu"], n)
        print_cpu("pipeline on the backlog", back["cpu"], n)
        print_batches("source alone", src["batches"])
        print_batches("pipeline on the backlog", back["batches"])
    if args.json:
        args.json.write_text(json.dumps(results, default=str, indent=1))
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
