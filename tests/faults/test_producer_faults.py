"""Faults under the live producer's publisher, against a private tansu broker: the broker
paused for 10 s under a producer process, and the producer process SIGKILLed during an outage
and under load, with and without the on-disk spool. Each test prints its figures (records
sent, lost, duplicated, time to recover: ``pytest -s``) and asserts the documented outcome
(docs/producers.md, "What a fault costs")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from arbstream.topics import ensure_topics
from testing.faults_producer import Broker, Figures, count, spawn

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    b = Broker()
    try:
        yield b
    finally:
        b.stop()


def topic_of(broker: Broker, exchange: str) -> dict:
    """The producer-process spec for ``exchange`` (its topics created)."""
    ensure_topics(broker.settings(exchanges=[exchange]))
    return {"bootstrap": broker.bootstrap, "exchange": exchange}


def deliver(spec: dict, start: int, n: int) -> None:
    """Quotes ``start`` .. ``start + n - 1`` delivered by a producer process that then exits."""
    proc = spawn({**spec, "start": start, "count": n})
    try:
        assert proc.event("closed")["undelivered"] == 0
        proc.wait(30)
    finally:
        proc.kill()


def test_broker_paused_10_s_under_a_producer(broker: Broker) -> None:
    """2,000 records/s for 20 s; the broker is SIGSTOPped from 5 s to 15 s. Nothing may be
    lost or duplicated (librdkafka holds the records; idempotence dedupes its retries)."""
    spec = topic_of(broker, "faultpause")
    rate, n = 2_000, 40_000
    proc = spawn({**spec, "start": 0, "count": n, "rate": rate})
    try:
        t0 = proc.event("started")["t"]
        time.sleep(max(0.0, t0 + 5 - time.time()))
        broker.pause()
        paused_at = time.time()
        time.sleep(10)
        broker.resume()
        resumed_at = time.time()
        events = []
        while not events or events[-1]["event"] != "closed":  # up to the end of the run
            msg = proc.lines.get(timeout=60)
            assert msg is not None, "producer process ended early"
            events.append(msg)
        proc.wait(30)
    finally:
        broker.resume()
        proc.kill()
    assert events[-1]["undelivered"] == 0
    held = max(e["pending"] for e in events if e["event"] == "progress")
    drained = next(e["t"] for e in events if e["event"] == "progress"
                   and e["t"] > resumed_at and e["pending"] <= rate // 10)
    figures = Figures.of("broker paused 10 s", range(n), count(broker.settings(), "faultpause"),
                         drained - resumed_at)
    print(f"\n{figures.show()}; most records held {held} (outage {resumed_at - paused_at:.1f} s)")
    assert (figures.lost, figures.duplicated) == (0, 0)
    assert held >= rate * 9  # the records of the outage were held, not dropped


def _kill_during_outage(broker: Broker, exchange: str, spool: Path | None) -> Figures:
    """1,000 quotes delivered; the broker pauses; 3,000 more are taken in (and spooled when
    ``spool``); SIGKILL; the broker resumes; with a spool a new process re-sends it."""
    spec = {**topic_of(broker, exchange), "spool": str(spool) if spool else None}
    deliver(spec, 0, 1_000)
    broker.pause()
    proc = spawn({**spec, "start": 1_000, "count": 3_000, "hold": True})
    try:
        proc.event("taken")
        time.sleep(0.5)
        proc.kill()
    finally:
        proc.kill()
        broker.resume()
    recovery = None
    t0 = time.monotonic()
    if spool is not None:
        again = spawn({**spec, "count": 0})
        try:
            assert again.event("started")["recovered"] == 3_000
            again.event("delivered")
            recovery = time.monotonic() - t0
            again.event("closed")
        finally:
            again.kill()
    else:
        time.sleep(3)  # whatever reached the broker's socket before the kill lands now
    name = f"SIGKILL during an outage, {'with' if spool else 'without'} spool"
    return Figures.of(name, range(4_000), count(broker.settings(), exchange), recovery)


def test_sigkill_during_an_outage_without_the_spool_loses_what_was_held(broker: Broker) -> None:
    figures = _kill_during_outage(broker, "faultkillmem", None)
    print(f"\n{figures.show()}")
    assert figures.unique >= 1_000 and figures.duplicated == 0
    assert figures.lost > 0  # the records held in memory die with the process


def test_sigkill_during_an_outage_with_the_spool_loses_nothing(broker: Broker,
                                                              tmp_path: Path) -> None:
    figures = _kill_during_outage(broker, "faultkillspool", tmp_path)
    print(f"\n{figures.show()}")
    assert figures.lost == 0
    assert figures.duplicated <= 3_000  # only records that reached the broker before the kill


def test_sigkill_under_load_with_the_spool_loses_nothing_spooled(broker: Broker,
                                                                 tmp_path: Path) -> None:
    """5,000 records/s with the broker up; SIGKILL after ~3 s; a new process re-sends the
    spool. Every record the killed process had spooled must be on the topic, in a contiguous
    prefix (one partition, in order): the loss is bounded by what was still in the in-memory
    queue, never spooled."""
    spec = {**topic_of(broker, "faultkillload"), "spool": str(tmp_path)}
    proc = spawn({**spec, "start": 0, "count": 100_000, "rate": 5_000})
    try:
        proc.event("started")
        time.sleep(3)
        last = proc.latest("progress")
        proc.kill()
    finally:
        proc.kill()
    t0 = time.monotonic()
    again = spawn({**spec, "count": 0})
    try:
        recovered = again.event("started")["recovered"]
        again.event("delivered")
        recovery = time.monotonic() - t0
        again.event("closed")
    finally:
        again.kill()
    got = count(broker.settings(), "faultkillload")
    prefix = max(got) + 1
    figures = Figures.of("SIGKILL under load, with spool", range(prefix), got, recovery)
    print(f"\n{figures.show()}; the last progress line before the kill counted "
          f"{last['submitted']} records submitted; {recovered} re-sent from the spool")
    assert figures.lost == 0  # no hole: nothing spooled was lost
    assert prefix >= last["submitted"] - 10_000  # the queue holds at most 10,000 records
