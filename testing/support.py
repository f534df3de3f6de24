"""Helpers shared by the tests and benchmarks (plain functions; the fixtures live in the
``conftest.py`` of each test folder)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from arbstream.config import Settings

#: The repository root.
REPO = Path(__file__).resolve().parent.parent
#: The recorded market data, read in place (``ARB_DATA_DIR``, default ``../shared/data``).
DATA_DIR = Path(os.environ.get("ARB_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


def consume(settings: Settings, topic: str, start: dict[str, int] | None = None,
            timeout: float = 30.0) -> list:
    """Every record of ``topic`` from ``start`` (``{"partition": offset}``, missing = 0) to the
    end of each partition, read with ``poll()`` up to the end-of-partition events."""
    import time
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    start = start or {}
    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"test-{uuid.uuid4()}",
                         "enable.partition.eof": True, "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, start.get(str(p), 0)) for p in parts])
        out, eof, deadline = [], set(), time.monotonic() + timeout
        while len(eof) < len(parts) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                eof.add(msg.partition())
            else:
                out.append(msg)
        assert len(eof) == len(parts), f"timed out reading {topic}"
        return out
    finally:
        consumer.close()


def unique_name(request: Any, prefix: str = "t_sinks_") -> str:
    """A MongoDB/InfluxDB database name of the running test's own (``request`` is pytest's
    ``FixtureRequest``): ``prefix`` + the test's name in ``[a-z0-9_]``, at most 40 of them."""
    return prefix + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
