"""Session fixtures: one real local stack (tansu, InfluxDB, SecantusDB) and one SparkSession.

Services run as processes on free loopback ports with their data in a temporary state
directory, exactly as ``arbstream up`` runs them. The recorded market data is read in place
from ``ARB_DATA_DIR`` (default ``../shared/data`` beside the repository).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from arbstream.config import Settings
from arbstream.shell import stack
from arbstream.shell.stack import free_port
from testing.support import DATA_DIR


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


#: Fixtures that start Spark or the real services: a test using any of them (directly or
#: through another fixture) is end-to-end.
E2E_FIXTURES = frozenset({"settings", "spark"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``e2e`` every test that needs Spark or the local stack, so ``pytest -m "not e2e"``
    is the fast tier (pure Python, no services)."""
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
