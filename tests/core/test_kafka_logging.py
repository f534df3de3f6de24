"""librdkafka's own log lines go to Python logging (``arbstream.librdkafka``), WARNING and up,
repeated lines held back: checked with a real librdkafka client against a closed port."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import Consumer, Producer

from arbstream.kafka import (
    LIBRDKAFKA_LOGGER,
    RepeatFilter,
    reliable_producer_config,
    with_logger,
)
from arbstream.shell.stack import free_port


def test_an_unreachable_broker_is_logged_through_python_not_stderr(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    conf = with_logger({"bootstrap.servers": f"127.0.0.1:{free_port()}",
                        "group.id": "t-log", "reconnect.backoff.ms": 10,
                        "reconnect.backoff.max.ms": 20})
    caplog.set_level(logging.DEBUG, logger=LIBRDKAFKA_LOGGER)
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.WARNING)
    consumer = Consumer(conf)
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            consumer.poll(0.2)  # log lines are served by poll
    finally:
        consumer.close()
    lines = [r for r in caplog.records if r.name == LIBRDKAFKA_LOGGER]
    assert lines, "no librdkafka line reached Python logging"
    assert all(r.levelno >= logging.WARNING for r in lines)
    assert any("Connection refused" in r.getMessage() or "failed" in r.getMessage()
               for r in lines)
    # ~100 reconnection attempts in 3 s, but each message shape passes once
    shapes = [r.getMessage() for r in lines]
    assert len(shapes) <= 6, shapes
    assert "Connection refused" not in capfd.readouterr().err  # not librdkafka's own printer


def test_every_producer_config_routes_its_logs() -> None:
    conf = reliable_producer_config({"bootstrap.servers": "127.0.0.1:1"})
    assert conf["logger"].name == LIBRDKAFKA_LOGGER
    Producer(conf).flush(0)  # librdkafka accepts it


def test_repeat_filter_counts_what_it_held_back() -> None:
    held = RepeatFilter(every_s=0.2)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("x", logging.ERROR, __file__, 1, msg, None, None)

    assert held.filter(record("connect to 127.0.0.1:9092 failed after 3 ms"))
    assert not held.filter(record("connect to 127.0.0.1:9092 failed after 17 ms"))
    assert not held.filter(record("connect to 127.0.0.1:9092 failed after 5 ms"))
    assert held.filter(record("another message"))
    time.sleep(0.25)
    again = record("connect to 127.0.0.1:9092 failed after 9 ms")
    assert held.filter(again)
    assert again.getMessage().endswith("(2 similar lines in the last 0.2 s)")
