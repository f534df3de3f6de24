"""Stream benchmark: real recorded quotes at a controlled rate through Kafka and the whole job.

Starts its own local stack (tansu, InfluxDB, SecantusDB) on free ports in a temporary state
directory and the stream job (:func:`spark_jobs.arbitrage.start`: queries ``market``,
``trades``, ``health``; ``local[2]``). The quotes are published by a separate process
(``bench/publisher_proc.py``), never by the Spark driver's Python process, so that the driver
(py4j, progress polling) and the publisher do not share one interpreter. Prints a compact
summary with the goals beside the figures (``--json PATH`` writes it, with every micro-batch
figure, as JSON):

* throughput, quotes/s: the publish rate, and the sustained pipeline rate = quotes published /
  (publish start → end of the last micro-batch that read data, over every query);
* detection latency, s, p50/p95/p99, to the **early** opportunity event: a confluent-kafka
  consumer (a thread of the bench) reads ``arb.opportunities`` from its end offsets before the
  run; for each ``opportunity_id`` the first event's read time minus the ``received_ts`` of the
  later leg's quote (the quote whose ``exchange_ts`` = max(``buy_ts``, ``sell_ts``) of that
  first event, looked up in the publisher's exchange_ts → received_ts map). With it, as a
  breakdown: the event's ``emitted_ts`` (the micro-batch's processing clock) and its Kafka
  CreateTime (the sink's ``produce()``) from the same ``received_ts``; and the latency to the
  MongoDB document, ``first_seen_at`` (its first upsert) minus the same ``received_ts``.
  ``min_net`` = −1, so every pair of every window is an opportunity;
* CPU seconds per quote by process kind (Spark JVM, Python workers, the Python source's
  planner, broker, InfluxDB, MongoDB server, the publisher process, and the driver, which also
  runs the event consumer thread), from ``/proc``: on a shared machine these are steadier than
  wall-clock figures. Counted from just before the queries start to the end of the last batch
  with data (the publisher's loading of the input is before, so not counted);
* micro-batch durations per query from ``query.recentProgress``;
* the ceiling (``--rate max``, or ``--ceiling``): the Kafka source alone
  (``format("arbkafka")``, same options and topics, ``foreachBatch`` doing ``count()``) draining
  the same records from the topics, and the pipeline draining the same backlog, as a
  pipeline/source ratio.

Inputs (both real, read in place): ``binance`` = ``binance-ws-2024-08`` bookTicker quotes, spot
(``binance``) and USD-M perpetual (``binanceusdm``), BTC-USDT and ETH-USDT, 217,332 quotes
(:mod:`producers.replay.binance`); ``iaqf`` = the IAQF 1-minute bars as quotes
(:func:`producers.replay.iaqf.load_iaqf_quotes`).

Modes:

* ``--rate N`` (latency run): N quotes/s for ``--duration`` s, the recording repeated as often
  as needed (each pass's dedupe keys suffixed ``#<pass>``). The quotes keep their real prices,
  sizes and order, but are **re-timed onto the wall clock** in the publisher process, so that
  event time advances like a live feed: quote i gets ``exchange_ts`` = its scheduled publish
  time (start + i/N) and ``received_ts`` = the wall time its ``produce()`` was called (later
  when the publisher falls behind schedule). Defaults: trigger 0.25 s, watermark 1 s, window
  1 s, max quote age 1 s. The replay ends with a heartbeat at its last event time; the job
  closes the last windows on its idle timer (ARB_IDLE_TIMEOUT_SECONDS), which the bench waits
  for (:func:`spark_jobs.arbitrage.wait_drained`) before reading the figures.
* ``--rate max`` (throughput run): the recording once, original timestamps, as fast as one
  producer goes, while the job runs; then the ceiling. Defaults: the job's own (trigger 0.5 s,
  watermark 10 s, window 1 s, max quote age 5 s, 200,000 offsets per trigger); ``--trigger``
  and ``--max-offsets`` (and the others) override them.

    python bench/stream_bench.py --rate 10000 --duration 20  # latency, Binance spot vs perp
    python bench/stream_bench.py --rate max                  # throughput + ceiling
    python bench/stream_bench.py --input iaqf --rate max

Goals: throughput ≥25,000 quotes/s (aim 30,000); at 10,000 quotes/s, early-event latency p50
≤1.0 s and p99 ≤2.5 s, MongoDB p50 ≤1.5 s; pipeline/source ratio ≥0.25 (aim 0.5). Times are
wall-clock seconds unless stated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arbstream.config import Settings
from arbstream.shell import stack
from arbstream.shell.stack import free_port
from arbstream.timestamps import to_ms
from arbstream.topics import OPPORTUNITIES, ensure_topics, quotes_topic
from spark_jobs import arbitrage
from spark_jobs.kafka_source import end_offsets
from spark_jobs.session import build_session

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import CpuSampler  # noqa: E402 (bench/ is not a package)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PUBLISHER = Path(__file__).resolve().with_name("publisher_proc.py")
PHASES = ("addBatch", "getBatch", "latestOffset", "queryPlanning", "walCommit", "commitOffsets")
STATE_STORES = {
    "rocksdb": "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider",
    "hdfs": "org.apache.spark.sql.execution.streaming.state.HDFSBackedStateStoreProvider",
}
#: Goals: (throughput quotes/s, aim), early p50 / p99 s, MongoDB p50 s, (ratio, aim).
GOAL_RATE, AIM_RATE = 25_000, 30_000
GOAL_EARLY_P50, GOAL_EARLY_P99, GOAL_MONGO_P50 = 1.0, 2.5, 1.5
GOAL_RATIO, AIM_RATIO = 0.25, 0.5


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def dist(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max and n of ``values``."""
    return {"p50": pct(values, 50), "p95": pct(values, 95), "p99": pct(values, 99),
            "max": max(values, default=float("nan")), "n": len(values)}


# --- the publisher process -----------------------------------------------------------------


class Publisher:
    """``bench/publisher_proc.py`` in a subprocess (see its docstring for the protocol): it
    loads the input as soon as it is started and publishes when :meth:`send` tells it to."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PUBLISHER), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.warmup = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def message(self, timeout: float, queries: Sequence[Any] = ()) -> dict[str, Any]:
        """The publisher's next message; raises a failed query's exception meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            for q in queries:
                if q.exception():
                    raise q.exception()  # type: ignore[misc]
            try:
                msg = self.lines.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no word from the publisher within {timeout:.0f}s") from None
                continue
            if msg is None:
                raise RuntimeError(f"the publisher exited with {self.proc.wait()}")
            if "error" in msg:
                raise RuntimeError(f"the publisher failed:\n{msg['error']}")
            return msg

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message, default=str) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# --- the opportunity event reader ----------------------------------------------------------


class EventReader(threading.Thread):
    """Reads ``arb.opportunities`` from ``start`` (``{partition: offset}``) with
    confluent-kafka and keeps, per ``opportunity_id``, the first event: (wall time read, s;
    the event; its Kafka CreateTime, ms). :meth:`finish` reads up to the topic's end now."""

    def __init__(self, settings: Settings, start: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.conf = settings.kafka_client_config()
        self.start_offsets = {int(p): off for p, off in start.items()}
        self.first: dict[str, tuple[float, dict[str, Any], int]] = {}
        self.stages: Counter[str] = Counter()
        self.next: dict[int, int] = dict(self.start_offsets)
        self.stop_at: dict[int, int] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from confluent_kafka import Consumer, TopicPartition

        try:
            consumer = Consumer({
                **self.conf, "group.id": f"stream-bench-{uuid.uuid4()}",
                "enable.auto.commit": False, "fetch.wait.max.ms": 10,
            })
            consumer.assign([TopicPartition(OPPORTUNITIES, p, off)
                             for p, off in self.start_offsets.items()])
            try:
                while not self._done():
                    msg = consumer.poll(0.05)
                    now = time.time()
                    if msg is None or msg.error():
                        continue
                    self.next[msg.partition()] = msg.offset() + 1
                    event = json.loads(msg.value())
                    if event.get("type") != "opportunity":
                        continue
                    self.stages[event["stage"]] += 1
                    if event["opportunity_id"] not in self.first:
                        self.first[event["opportunity_id"]] = (now, event, msg.timestamp()[1])
            finally:
                consumer.close()
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def _done(self) -> bool:
        stop = self.stop_at
        return stop is not None and all(self.next.get(p, 0) >= end for p, end in stop.items())

    def finish(self, timeout: float = 60.0) -> None:
        ends = end_offsets(self.conf, [OPPORTUNITIES]).get(OPPORTUNITIES, {})
        self.stop_at = {int(p): off for p, off in ends.items()}
        self.join(timeout)
        if self.error is not None:
            raise self.error
        if self.is_alive():
            raise TimeoutError(f"{OPPORTUNITIES} not read to {self.stop_at} within {timeout}s")


def _ms(iso: Any) -> int:
    """An event's ISO-8601 time or a datetime, as UTC ms."""
    return to_ms(iso if isinstance(iso, dt.datetime) else dt.datetime.fromisoformat(iso))


def later_leg_received(received: dict[tuple[str, str, int], int], row: dict[str, Any]
                       ) -> int | None:
    """``received_ts`` (ms) of the later leg's quote of an opportunity event or document: the
    quote whose ``exchange_ts`` is max(``buy_ts``, ``sell_ts``) (the latest of both legs when
    they tie); None when it is not in ``received``."""
    buy, sell = _ms(row["buy_ts"]), _ms(row["sell_ts"])
    later = max(buy, sell)
    legs = (((row["buy_exchange"], row["symbol"]), buy),
            ((row["sell_exchange"], row.get("sell_symbol") or row["symbol"]), sell))
    recv = [received.get((ex, sym, later)) for (ex, sym), ts in legs if ts == later]
    return max((r for r in recv if r is not None), default=None)


def latencies(settings: Settings, received: dict[tuple[str, str, int], int],
              reader: EventReader, since: float) -> dict[str, Any]:
    """Latency samples (s) of every opportunity of the measured run, from the later leg's
    ``received_ts`` of its first event (module docstring); MongoDB documents first seen at or
    after ``since`` (wall s)."""
    from arbstream.store.config import MongoConfig
    from arbstream.store.mongo.opportunities import first_seen_since

    docs = first_seen_since(
        MongoConfig.of(settings), dt.datetime.fromtimestamp(since, dt.UTC),
        ["buy_ts", "sell_ts", "symbol", "sell_symbol", "buy_exchange", "sell_exchange"])
    samples: dict[str, list[float]] = {"early": [], "emitted": [], "produced": [], "mongo": []}
    first_stage: Counter[str] = Counter()
    recv_of: dict[str, int] = {}
    missing = 0
    for oid, (read_s, event, created_ms) in reader.first.items():
        first_stage[event["stage"]] += 1
        recv = later_leg_received(received, event)
        if recv is None:
            missing += 1
            continue
        recv_of[oid] = recv
        samples["early"].append(read_s - recv / 1000)
        samples["emitted"].append((event["emitted_ts"] - recv) / 1000)
        samples["produced"].append((created_ms - recv) / 1000)
    not_in_kafka = 0
    for doc in docs:
        recv = recv_of.get(doc["_id"])
        if recv is None:
            not_in_kafka += doc["_id"] not in reader.first
            recv = later_leg_received(received, doc)
        if recv is not None:
            samples["mongo"].append(doc["first_seen_at"].timestamp() - recv / 1000)
    return {"samples": samples, "opportunities": len(reader.first), "documents": len(docs),
            "first_stage": dict(first_stage), "events": dict(reader.stages),
            "no_receive_time": missing, "documents_without_event": not_in_kafka}


# --- progress ------------------------------------------------------------------------------


_ts = arbitrage.batch_started  # a progress entry's batch start, Unix s


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
            "updates_ms_median": statistics.median(o.get("allUpdatesTimeMs", 0) for o in per),
            "commit_ms_median": statistics.median(o.get("commitTimeMs", 0) for o in per),
            "memory_mb_max": max(o.get("memoryUsedBytes", 0) for o in per) / 2**20,
        })
    out["state"] = ops
    return out


def all_batches(query: Any, since: float = 0.0) -> tuple[int, float]:
    """Micro-batches of every kind (with data, no-data, timer-only) started at or after
    ``since`` (wall s) and their total seconds."""
    progress = [p for p in query.recentProgress if _ts(p) >= since]
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
    idle (nor for the idle timeout): the CPU figures end here.
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


# --- runs ----------------------------------------------------------------------------------


def run_live(spark: Any, settings: Settings, checkpoint: Path, timeout: float,
             publisher: Publisher, go: dict[str, Any]) -> dict[str, Any]:
    """Start the job, then (``go``: the publisher's settings and output file):

    1. the warm-up, if any: publish it, wait until the job read it and drained (its idle
       timeout closed every window);
    2. the measured run: the event reader starts at the end offsets of ``arb.opportunities``
       and the CPU sampler starts; publish; wait until the market query read every quote and
       every query reached the end of its topics (the CPU figures end here); then until
       drained, and read the topic to its end.
    """
    queries = arbitrage.start(spark, settings, checkpoint)
    try:
        arbitrage.wait_started(queries)
        publisher.send(go)
        warm = 0
        if publisher.warmup:
            warm = publisher.message(timeout, queries)["quotes"]
            arbitrage.wait_drained(queries, settings, timeout)
            publisher.send({"go": True})
        start = end_offsets(settings.kafka_client_config(), [OPPORTUNITIES])
        reader = EventReader(settings, start.get(OPPORTUNITIES) or {
            str(p): 0 for p in range(settings.kafka_partitions)})
        reader.start()
        sampler = CpuSampler()
        sampler.start()
        t_go = time.time()
        if not publisher.warmup:
            publisher.send(go)
        done = publisher.message(timeout, queries)
        # (offsets, not numInputRows: the market source's rows are packed, many quotes each)
        wait_offsets(queries, settings, timeout)
        cpu = sampler.delta()
        publisher.close()
        arbitrage.wait_drained(queries, settings, timeout)
        reader.finish()
        return {
            "cpu": cpu, "publisher": done, "warmup_quotes": warm, "t_go": t_go,
            "reader": reader, "last_end": last_end(queries),
            "batches": {q.name: batch_summary([p for p in data_batches(q)
                                               if _ts(p) >= t_go]) for q in queries},
            "all_batches": {q.name: all_batches(q, t_go) for q in queries},
            "all_detail": {q.name: batch_summary([p for p in q.recentProgress
                                                  if _ts(p) >= t_go]) for q in queries},
        }
    finally:
        for q in queries:
            q.stop()


def run_backlog(spark: Any, settings: Settings, checkpoint: Path,
                timeout: float) -> dict[str, Any]:
    """The job from earliest on the topics as they are, until it reached their end."""
    sampler = CpuSampler()
    sampler.start()
    queries = arbitrage.start(spark, settings, checkpoint)
    try:
        wait_offsets(queries, settings, timeout)
        return {"cpu": sampler.delta(), "first_batch": first_start(queries),
                "last_end": last_end(queries),
                "batches": {q.name: batch_summary(data_batches(q)) for q in queries}}
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


def goal(value: float, target: float, aim: float | None = None, most: bool = False) -> str:
    """``goal ≥target (aim a)  met`` (or ``≤`` when ``most``; ``MISSED`` when not met)."""
    ok = value <= target if most else value >= target
    text = f"goal {'≤' if most else '≥'}{target:,}" + (f" (aim {aim:,})" if aim else "")
    if aim is not None and not most and ok and value >= aim:
        return text + "  met, aim met"
    return text + ("  met" if ok else "  MISSED")


def cpu_line(title: str, cpu: dict[str, float], n: int) -> str:
    total = sum(cpu.values())
    return (f"  CPU {title}: {total:.1f} s, {total / n * 1e6:,.0f} µs/quote ("
            + ", ".join(f"{k} {v / n * 1e6:,.0f}" for k, v in cpu.items() if v >= 0.05) + ")")


def print_batches(title: str, batches: dict[str, dict[str, Any]], details: bool) -> None:
    parts = []
    for name, b in batches.items():
        if not b.get("batches"):
            continue
        med, p95, mx = b["triggerExecution"]
        parts.append(f"{name} {b['batches']} × median {med:.2f} / p95 {p95:.2f} / max {mx:.2f}"
                     f" s, {b['rows'][0]:,.0f} input rows median")
        if details:
            parts.append("    " + "  ".join(f"{ph} {b[ph][0]:.2f}/{b[ph][2]:.2f}"
                                            for ph in PHASES))
            for op in b.get("state", []):
                parts.append(f"    state {op['name']}: rows<= {op['rows_total_max']:,}, "
                             f"updates {op['updates_ms_median']:.0f} ms, commit "
                             f"{op['commit_ms_median']:.0f} ms, mem<= "
                             f"{op['memory_mb_max']:.0f} MB")
    print(f"  batches with data, {title}: " + ("; ".join(p for p in parts if not
                                                          p.startswith("    ")) or "none"))
    for p in parts:
        if p.startswith("    "):
            print(p)


def lat_line(label: str, d: dict[str, float], target: str = "") -> str:
    return (f"  {label:44} {d['p50']:6.2f} {d['p95']:6.2f} {d['p99']:6.2f} {d['max']:6.2f}"
            f" {d['n']:7,}  {target}")


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", choices=("binance", "iaqf"), default="binance")
    parser.add_argument("--rate", default="10000", help="quotes/s, or max")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="latency run length, s (the recording repeats as needed)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="warm-up before the measured run, s of quotes (0 = none)")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--iaqf-from", default="2023-03-01")
    parser.add_argument("--iaqf-to", default="2023-03-22")
    parser.add_argument("--trigger", type=float, help="trigger interval, s")
    parser.add_argument("--watermark", type=float, help="watermark delay, s")
    parser.add_argument("--window", type=float, help="window W, s")
    parser.add_argument("--max-age", type=float, help="max quote age, s")
    parser.add_argument("--max-offsets", type=int, help="maxOffsetsPerTrigger (0 = no cap)")
    parser.add_argument("--shuffle-partitions", type=int,
                        default=Settings.model_fields["spark_shuffle_partitions"].default)
    parser.add_argument("--kafka-partitions", type=int, default=3)
    parser.add_argument("--state-store", choices=sorted(STATE_STORES), default="rocksdb",
                        help="hdfs does not support transformWithState")
    parser.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark SQL setting for the session (repeatable)")
    ceiling = parser.add_mutually_exclusive_group()
    ceiling.add_argument("--ceiling", action="store_true",
                         help="also run the source-alone and backlog drains in a latency run")
    ceiling.add_argument("--no-ceiling", action="store_true",
                         help="skip the source-alone and backlog drains in a --rate max run")
    parser.add_argument("--details", action="store_true",
                        help="print micro-batch phases and state operator metrics too")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    latency_run = args.rate != "max"
    rate = float(args.rate) if latency_run else None
    with_ceiling = args.ceiling or (not latency_run and not args.no_ceiling)

    publisher = Publisher({
        "input": args.input, "data_dir": str(args.data_dir), "iaqf_from": args.iaqf_from,
        "iaqf_to": args.iaqf_to, "rate": rate, "duration": args.duration,
        "warmup": args.warmup,
    })
    state = Path(tempfile.mkdtemp(prefix="arb-stream-bench-"))
    try:
        ready = publisher.message(300)
        exchanges, publisher.warmup = ready["exchanges"], ready["warmup"]
        job = Settings.model_fields  # the job's own defaults for the throughput run
        defaults = (0.25, 1.0, 1.0, 1.0) if latency_run else (
            job["trigger_seconds"].default, job["watermark_seconds"].default,
            job["window_seconds"].default, job["max_quote_age_seconds"].default)
        trigger, watermark, window, age = (
            v if v is not None else d for v, d in zip(
                (args.trigger, args.watermark, args.window, args.max_age), defaults,
                strict=True))
        max_offsets = 200_000 if args.max_offsets is None else (args.max_offsets or None)
        kw: dict[str, Any] = {
            "state_dir": str(state), "data_dir": str(args.data_dir),
            "starting_offsets": "latest", "kafka_bootstrap": f"127.0.0.1:{free_port()}",
            "influx_url": f"http://127.0.0.1:{free_port()}",
            "mongo_uri": f"mongodb://127.0.0.1:{free_port()}", "exchanges": exchanges,
            "kafka_partitions": args.kafka_partitions,
            "spark_shuffle_partitions": args.shuffle_partitions, "trigger_seconds": trigger,
            "watermark_seconds": watermark, "window_seconds": window,
            "max_quote_age_seconds": age, "max_offsets_per_trigger": max_offsets,
            "min_net": -1.0,
        }
        settings = Settings(**kw)
        topics = [quotes_topic(e) for e in exchanges]
        load0 = os.getloadavg()
        results: dict[str, Any] = {}
        try:
            stack.up(settings)
            ensure_topics(settings)
            stack.ensure_java()
            spark = build_session(settings, app_name="arbstream-stream-bench")
            spark.conf.set("spark.sql.streaming.numRecentProgressUpdates", "100000")
            spark.conf.set("spark.sql.streaming.stateStore.providerClass",
                           STATE_STORES[args.state_store])
            for item in args.spark_conf:
                key, _, value = item.partition("=")
                spark.conf.set(key, value)
            out = state / "received.pickle"
            live = run_live(spark, settings, state / "cp-live", args.timeout, publisher,
                            {"settings": kw, "out": out})
            results["live"] = live
            if latency_run:
                received = pickle.loads(out.read_bytes())
                results["latency"] = latencies(settings, received, live["reader"],
                                               live["t_go"])
            if with_ceiling:
                earliest = settings.model_copy(update={"starting_offsets": "earliest"})
                market_topics = arbitrage.query_topics(settings)["market"]
                ends = end_offsets(settings.kafka_client_config(), market_topics)
                records = sum(n for parts in ends.values() for n in parts.values())
                results["source"] = run_source(spark, earliest, market_topics,
                                               state / "cp-source", records, args.timeout)
                results["backlog"] = run_backlog(spark, earliest, state / "cp-backlog",
                                                 args.timeout)
            spark.stop()
        finally:
            stack.down(settings)
    finally:
        publisher.close()
    summary = report(args, results, ready, topics,
                     (trigger, watermark, window, age, max_offsets, settings), load0, rate)
    if args.json:
        args.json.write_text(json.dumps(summary, default=str, indent=1))
    shutil.rmtree(state, ignore_errors=True)


def report(args: argparse.Namespace, results: dict[str, Any], ready: dict[str, Any],
           topics: list[str], setup: tuple, load0: tuple[float, ...], rate: float | None
           ) -> dict[str, Any]:
    """Print the summary; return it (with every micro-batch figure) for ``--json``."""
    trigger, watermark, window, age, max_offsets, settings = setup
    live = results["live"]
    pub = live["publisher"]
    n = pub["quotes"]
    summary: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "input": args.input, "quotes": n, "distinct_quotes": ready["distinct"],
        "settings": {"rate": args.rate, "trigger_s": trigger, "watermark_s": watermark,
                     "window_s": window, "max_quote_age_s": age,
                     "idle_timeout_s": settings.idle_timeout_seconds,
                     "max_offsets_per_trigger": max_offsets,
                     "shuffle_partitions": args.shuffle_partitions,
                     "kafka_partitions": args.kafka_partitions,
                     "stream_buckets": settings.stream_buckets,
                     "state_store": args.state_store, "min_net": -1.0,
                     "spark_conf": args.spark_conf},
        "load_average": [load0[0], os.getloadavg()[0]], "cores": os.cpu_count(),
    }
    print(f"\n== stream bench: {args.input}, {n:,} quotes on {', '.join(topics)} "
          f"({ready['distinct']:,} distinct recorded"
          + (f", re-timed to {rate:,.0f}/s for {args.duration:.0f} s)" if rate else
             ", original timestamps, as fast as possible)")
          + f", after a warm-up of {live['warmup_quotes']:,} quotes")
    print(f"settings: trigger {trigger} s, watermark {watermark} s, window {window} s, max quote"
          f" age {age} s, idle timeout {settings.idle_timeout_seconds} s, maxOffsetsPerTrigger "
          f"{max_offsets}, shuffle {args.shuffle_partitions}, kafka partitions "
          f"{args.kafka_partitions}, buckets {settings.stream_buckets}, {args.state_store}, "
          "min_net -1" + "".join(f", {c}" for c in args.spark_conf))
    print(f"machine: Spark local[2] on {os.cpu_count()} cores shared with other work (load "
          f"average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end); figures are noisy")

    pub_s = pub["t_end"] - pub["t_start"]
    span = live["last_end"] - pub["t_start"]
    sustained = n / span
    summary["throughput"] = {"publish_s": pub_s, "publish_quotes_per_s": n / pub_s,
                             "sustained_s": span, "sustained_quotes_per_s": sustained}
    print("\nthroughput")
    print(f"  publish (own process)                  {pub_s:7.2f} s {n / pub_s:9,.0f} quotes/s")
    print(f"  sustained, publish start -> last batch {span:7.2f} s {sustained:9,.0f} quotes/s"
          + ("" if rate else f"   {goal(sustained, GOAL_RATE, AIM_RATE)}"))
    if "source" in results:
        src, back = results["source"], results["backlog"]
        s_span = src["last_end"] - src["first_batch"]
        b_span = back["last_end"] - back["first_batch"]
        records = src["counted"]
        s_rate, b_rate = records / s_span, records / b_span
        summary["ceiling"] = {"records": records, "source_s": s_span,
                              "source_records_per_s": s_rate, "backlog_s": b_span,
                              "backlog_records_per_s": b_rate, "ratio": b_rate / s_rate}
        print(f"  backlog of {records:,} records (warm-up and measured quotes, heartbeats), "
              "from earliest:")
        print(f"  Kafka source alone drains it           {s_span:7.2f} s {s_rate:9,.0f} "
              "records/s")
        print(f"  pipeline drains it                     {b_span:7.2f} s {b_rate:9,.0f} "
              f"records/s   {goal(b_rate, GOAL_RATE, AIM_RATE)}")
        print(f"  pipeline / source                      {b_rate / s_rate:7.2f}"
              f"                      {goal(b_rate / s_rate, GOAL_RATIO, AIM_RATIO)}")

    if "latency" in results:
        lat = results["latency"]
        s = lat["samples"]
        d = {k: dist(v) for k, v in s.items()}
        summary["latency"] = {**{k: v for k, v in lat.items() if k != "samples"}, **d}
        early, mongo_d = d["early"], d["mongo"]
        early_ok = goal(early["p50"], GOAL_EARLY_P50, most=True).split("  ")[-1]
        p99_ok = goal(early["p99"], GOAL_EARLY_P99, most=True).split("  ")[-1]
        print(f"\nlatency at {rate:,.0f} quotes/s from the later leg's received_ts, s")
        print(f"  {'':44} {'p50':>6} {'p95':>6} {'p99':>6} {'max':>6} {'n':>7}")
        print(lat_line("early event read from arb.opportunities", early,
                       f"goal p50 ≤{GOAL_EARLY_P50} {early_ok}, p99 ≤{GOAL_EARLY_P99} {p99_ok}"))
        print(lat_line("  its emitted_ts (batch processing clock)", d["emitted"]))
        print(lat_line("  its Kafka CreateTime (sink produce)", d["produced"]))
        print(lat_line("MongoDB document first_seen_at", mongo_d,
                       goal(mongo_d["p50"], GOAL_MONGO_P50, most=True).replace("goal ",
                                                                               "goal p50 ")))
        print(f"  {lat['opportunities']:,} opportunities; first event stage {lat['first_stage']};"
              f" events {lat['events']}; {lat['documents']:,} documents; no receive time "
              f"{lat['no_receive_time']}, documents without an event "
              f"{lat['documents_without_event']}")

    summary["cpu_seconds"] = {"live": live["cpu"]}
    summary["cpu_us_per_quote"] = {"live": {k: v / n * 1e6 for k, v in live["cpu"].items()}}
    print()
    print(cpu_line("live run", live["cpu"], n))
    for name in ("source", "backlog"):
        if name in results:
            cpu, records = results[name]["cpu"], results["source"]["counted"]
            summary["cpu_seconds"][name] = cpu
            summary["cpu_us_per_quote"][name] = {k: v / records * 1e6 for k, v in cpu.items()}
            print(cpu_line({"source": "source alone", "backlog": "pipeline on the backlog"}[name],
                           cpu, records))
    print()
    print_batches("live run", live["batches"], args.details)
    print("  all micro-batches incl. no-data and timer ones, live run: " + ", ".join(
        f"{name} {k} ({busy:.1f} s busy)" for name, (k, busy) in live["all_batches"].items()))
    summary["batches"] = {"live": live["batches"], "live_all": live["all_batches"],
                          "live_all_detail": live["all_detail"]}
    for name in ("source", "backlog"):
        if name in results:
            print_batches({"source": "source alone", "backlog": "backlog"}[name],
                          results[name]["batches"], args.details)
            summary["batches"][name] = results[name]["batches"]
    summary["goals"] = goals(summary, rate)
    return summary


def goals(summary: dict[str, Any], rate: float | None) -> list[dict[str, Any]]:
    """Each goal that this run measures: name, value, target, aim, met."""
    out = []

    def add(name: str, value: float, target: float, aim: float | None = None,
            most: bool = False) -> None:
        out.append({"name": name, "value": value, "target": target, "aim": aim,
                    "met": value <= target if most else value >= target})

    if rate is None:
        add("sustained quotes/s while publishing",
            summary["throughput"]["sustained_quotes_per_s"], GOAL_RATE, AIM_RATE)
    if "ceiling" in summary:
        add("pipeline records/s on the backlog", summary["ceiling"]["backlog_records_per_s"],
            GOAL_RATE, AIM_RATE)
        add("pipeline / source", summary["ceiling"]["ratio"], GOAL_RATIO, AIM_RATIO)
    if "latency" in summary:
        lat = summary["latency"]
        add("early event latency p50, s", lat["early"]["p50"], GOAL_EARLY_P50, most=True)
        add("early event latency p99, s", lat["early"]["p99"], GOAL_EARLY_P99, most=True)
        add("MongoDB latency p50, s", lat["mongo"]["p50"], GOAL_MONGO_P50, most=True)
    return out


if __name__ == "__main__":
    main()
