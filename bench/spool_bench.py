"""Cost of the producer's on-disk spool: the live publisher (``producers.publisher``) taking
normalized quotes as fast as it can into a private tansu broker, without the spool, with it
(``fsync`` never) and with it (``fsync`` per batch), in the same run, alternating the modes
over ``--rounds`` rounds. Prints records/s (from the first ``submit`` to the last delivery
report) and CPU µs per record of the producer process (all its threads: librdkafka's too),
and the spool's bytes written per record.

    python bench/spool_bench.py [--records 200000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arbstream.topics import ensure_topics
from producers.publisher import Publisher
from producers.spool import Spool, SpoolRecord, encode
from testing.faults_producer import Broker, quote

MODES = ("no spool", "spool, fsync never", "spool, fsync batch")


async def _run(broker: Broker, mode: str, events: list, spool_dir: Path) -> tuple[float, float]:
    shutil.rmtree(spool_dir, ignore_errors=True)
    spool = None if mode == "no spool" else Spool(spool_dir, fsync=mode.rsplit(" ", 1)[1])
    pub = Publisher(broker.settings(), queue_size=10_000, health_interval=3600, spool=spool)
    runner = asyncio.create_task(pub.run())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for event in events:
        await pub.submit(event)
    while pub.pending:
        await asyncio.sleep(0.001)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    runner.cancel()
    assert await pub.close() == 0
    return wall, cpu


def spool_alone(n: int, directory: Path, fsync: str, batch: int = 1_000) -> float:
    """CPU µs per record of the spool by itself: append in batches of ``batch`` records, then
    acknowledge each and commit (no Kafka)."""
    shutil.rmtree(directory, ignore_errors=True)
    spool = Spool(directory, fsync=fsync)  # type: ignore[arg-type]
    value = quote(0, "bench").record.to_json()
    items = [("md.bench.quotes", b"BTC-USD", value, "bench")] * batch
    cpu0 = time.process_time()
    for _ in range(n // batch):
        for record in spool.append(items):
            spool.ack(record.seq)
        spool.commit()
    cpu = time.process_time() - cpu0
    spool.close()
    return cpu / (n // batch * batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    broker = Broker()
    tmp = Path(tempfile.mkdtemp(prefix="spool-bench-"))
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    try:
        settings = broker.settings(exchanges=["bench"], fees={"bench": 0.001})
        ensure_topics(settings)
        sample = quote(0, "bench").record.to_json()
        frame = encode(SpoolRecord(1, "md.bench.quotes", b"BTC-USD", sample, "bench"))
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                events = [quote(r * args.records + i, "bench") for i in range(args.records)]
                wall, cpu = asyncio.run(_run(broker, mode, events, tmp / "spool"))
                results[mode].append((wall, cpu))
                print(f"round {r + 1} {mode:20s} {args.records / wall:10,.0f} records/s   "
                      f"CPU {cpu / args.records * 1e6:6.2f} µs/record", flush=True)
        alone = {f: spool_alone(args.records, tmp / "alone", f) for f in ("never", "batch")}
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.records:,} quotes per run ({len(sample)} bytes of JSON each, "
          f"{len(frame)} bytes per record in the spool), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    for fsync, cpu in alone.items():
        print(f"spool alone, fsync {fsync:5s}  CPU {cpu:6.2f} µs/record (append in batches of "
              "1,000, acknowledge, commit; no Kafka)")
    base = statistics.median(c for _, c in results["no spool"]) / args.records * 1e6
    for mode in MODES:
        rate = statistics.median(args.records / w for w, _ in results[mode])
        cpu = statistics.median(c for _, c in results[mode]) / args.records * 1e6
        print(f"{mode:20s} median {rate:10,.0f} records/s   CPU {cpu:6.2f} µs/record   "
              f"(+{cpu - base:5.2f} µs vs no spool)")


if __name__ == "__main__":
    main()
