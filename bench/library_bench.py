"""Exchange-library comparison on REAL frames: cryptofeed (through arbstream's adapter) versus
ccxt.pro, handler path only, no network, on the Binance 2024 bookTicker and trade frames.

Prints frames/s and CPU µs per frame for: bare ``json.loads``; arbstream's cryptofeed feed
(``producers.exchanges.feed.make_feed``: parse + normalize to canonical records); and ccxt.pro's
``binance.handle_message`` when ``ccxt`` is installed (``pip install ccxt``; it is not a
dependency of arbstream). Symbol metadata comes from the 2021 REST capture.

    python bench/library_bench.py [--frames 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

# The repository root: testing/ (test and bench infrastructure) is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producers.capture import capture_files, read_rest_capture
from producers.events import FeedEvent
from producers.exchanges.feed import make_feed
from producers.replay.binance import read_binance_gz
from testing.recorded_rest import preload_symbols

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ["spot_btcusdt_20240808.gz", "spot_btcusdt_20240809.gz", "spot_ethusdt_20240808.gz"]


def frames(data: Path, limit: int) -> list[tuple[float, str]]:
    out = []
    for name in FILES:
        for ns, frame in read_binance_gz(data / "binance-ws-2024-08" / name):
            if '@bookTicker"' in frame[:40] or '@trade"' in frame[:40]:
                out.append((ns / 1e9, frame))
    return out[:limit]


def report(name: str, n: int, wall: float, cpu: float, note: str = "") -> None:
    print(f"{name:44} {n / wall:10,.0f} frames/s  {cpu / n * 1e6:6.1f} µs CPU/frame  {note}")


def timed(fn) -> tuple[float, float]:  # noqa: ANN001
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall0, time.process_time() - cpu0


class _Conn:
    uuid = id = "bench"

    def __init__(self, subscription: dict) -> None:
        self.subscription = subscription

    async def write(self, _msg: str) -> None:
        return None


def bench_cryptofeed(data: Path, batch: list[tuple[float, str]]) -> None:
    _ws, rest = capture_files(data, "binance")
    preload_symbols("binance", read_rest_capture(rest))
    events: list[FeedEvent] = []

    async def on_event(event: FeedEvent) -> None:
        events.append(event)

    async def run() -> None:
        feed = make_feed("binance", ["BTC-USDT", "ETH-USDT"], {"bbo", "trades"}, on_event)
        conn = _Conn(feed.subscription)
        for ts, frame in batch:
            await feed.message_handler(frame, conn, ts)

    wall, cpu = timed(lambda: asyncio.run(run()))
    report("arbstream cryptofeed adapter", len(batch), wall, cpu, f"{len(events)} records")


def bench_ccxt(data: Path, batch: list[tuple[float, str]]) -> None:
    try:
        import ccxt.pro as ccxtpro
    except ImportError:
        print("ccxt.pro: not installed (pip install ccxt) - skipped")
        return
    _ws, rest = capture_files(data, "binance")
    info = json.loads(next(b for u, b in read_rest_capture(rest).items()
                           if u.endswith("/api/v3/exchangeInfo")))

    async def run() -> int:
        ex = ccxtpro.binance({"options": {"fetchMarkets": {"types": ["spot"]}}})
        ex.options["crossMarginPairsData"] = []
        ex.options["isolatedMarginPairsData"] = []
        ex.set_markets(ex.parse_markets(info["symbols"]))
        client = ex.client("wss://stream.binance.com:9443/ws")
        resolved = 0
        original = client.resolve

        def resolve(result, message_hash):  # noqa: ANN001, ANN202 - ccxt callback
            nonlocal resolved
            resolved += 1
            return original(result, message_hash)

        client.resolve = resolve
        for _ts, frame in batch:
            ex.handle_message(client, json.loads(frame))
        await ex.close()
        return resolved

    result: list[int] = []
    wall, cpu = timed(lambda: result.append(asyncio.run(run())))
    report("ccxt.pro binance.handle_message", len(batch), wall, cpu, f"{result[0]} resolves")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    args = parser.parse_args()
    batch = frames(args.data_dir, args.frames)
    print(f"{len(batch)} real Binance spot bookTicker/trade frames")
    wall, cpu = timed(lambda: [json.loads(f) for _, f in batch])
    report("json.loads (ceiling)", len(batch), wall, cpu)
    bench_cryptofeed(args.data_dir, batch)
    bench_ccxt(args.data_dir, batch)


if __name__ == "__main__":
    main()
