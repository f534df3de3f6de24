"""Session fixtures: one real local stack (tansu, InfluxDB, SecantusDB) and one SparkSession.

Services run as processes on free loopback ports with their data in a temporary state
directory, exactly as ``arbstream up`` runs them. The recorded market data is read in place
from ``ARB_DATA_DIR`` (default ``../shared/data`` beside the repository).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from arbstream.config import Settings
from arbstream.shell import stack
from arbstream.shell.stack import free_port

REPO = Path(__file__).resolve().parent.parent
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



@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "iaqf-2023-03").is_dir():
        pytest.fail(f"recorded data not found under {DATA_DIR}; set ARB_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Settings]:
    """Settings pointing at a freshly started real stack; services stop after the session."""
    state = tmp_path_factory.mktemp("state")
    conf = Settings(
        state_dir=state,
        data_dir=data_dir,
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        influx_url=f"http://127.0.0.1:{free_port()}",
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}",
        kafka_partitions=2,
        spark_shuffle_partitions=2,
    )
    try:
        stack.up(conf)
        yield conf
    finally:
        stack.down(conf)


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory):
    """One local SparkSession for the whole test session (start-up takes ~8 s)."""
    from arbstream.shell.stack import ensure_java
    from spark_jobs.session import build_session

    ensure_java()  # local-stack tooling: installs OpenJDK 17 when missing (as root)
    conf = Settings(
        state_dir=tmp_path_factory.mktemp("spark"), spark_shuffle_partitions=2
    )
    session = build_session(conf, app_name="arbstream-tests")
    yield session
    session.stop()
