"""Throughput of the whole pipeline on the real IAQF data: replay → Kafka → Spark → sinks.

Starts its own local stack on free ports in a temporary state directory, starts the streaming
job, replays ``--from``/``--to`` at max speed and waits until the stream has drained the topics.
Prints the replay rate, the stream's end-to-end drain rate and its micro-batch durations.

    python bench/pipeline_bench.py --from 2023-03-01 --to 2023-03-22   # all 292k quotes
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from arbstream.config import Settings
from arbstream.shell import stack
from arbstream.shell.stack import free_port
from arbstream.timestamps import parse_time
from arbstream.topics import ensure_topics
from producers.replay.iaqf import replay_iaqf
from spark_jobs import arbitrage
from spark_jobs.session import build_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="start", default="2023-03-10")
    parser.add_argument("--to", dest="end", default="2023-03-13")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared"
                                                  / "data"))
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="arb-bench-"))
    influx = free_port()
    settings = Settings(
        state_dir=state, data_dir=Path(args.data_dir), starting_offsets="latest",
        kafka_bootstrap=f"127.0.0.1:{free_port()}", influx_url=f"http://127.0.0.1:{influx}",
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}",
    )
    try:
        stack.up(settings)
        ensure_topics(settings)
        stack.ensure_java()
        spark = build_session(settings, app_name="arbstream-bench")
        queries = arbitrage.start(spark, settings)
        while any(q.lastProgress is None for q in queries):
            time.sleep(0.2)
        t0 = time.monotonic()
        report = replay_iaqf(settings, parse_time(args.start), parse_time(args.end), None,
                             progress=False)
        t1 = time.monotonic()
        arbitrage.wait_drained(queries, settings, timeout=3600)
        t2 = time.monotonic()
        batches = {q.name: [p["durationMs"].get("triggerExecution", 0) / 1000
                            for p in q.recentProgress if p["numInputRows"] > 0]
                   for q in queries}
        for q in queries:
            q.stop()
    finally:
        stack.down(settings)
    n = report.quotes
    print(f"quotes replayed            {n}")
    print(f"replay                     {t1 - t0:8.2f} s  {n / (t1 - t0):10,.0f} quotes/s")
    print(f"replay start -> drained    {t2 - t0:8.2f} s  {n / (t2 - t0):10,.0f} quotes/s")
    for name, durations in batches.items():
        if durations:
            print(f"{name:8} micro-batches with data: {len(durations)}, "
                  f"median {statistics.median(durations):.2f} s, max {max(durations):.2f} s")
    print(f"cores: local[2] on a {__import__('os').cpu_count()}-core machine")


if __name__ == "__main__":
    main()
