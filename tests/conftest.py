"""Session fixtures: one real local stack (tansu, InfluxDB, SecantusDB) and one SparkSession.

Services run as processes on free loopback ports with their data in a temporary state
directory, exactly as ``arbstream up`` runs them. The recorded market data is read in place
from ``ARB_DATA_DIR`` (default ``../shared/data`` beside the repository). ``iaqf_lake`` is a
real two-day Parquet lake built from it once per test run (tests/ml, tests/notebooks).
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
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


#: The lake's slice: 2023-03-09T00:00 to 2023-03-11T00:00 UTC (the day before the USDC depeg
#: and its first day).
LAKE_START, LAKE_END = datetime(2023, 3, 9, tzinfo=UTC), datetime(2023, 3, 11, tzinfo=UTC)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_lake(root: Path, data_dir: Path, start: datetime = LAKE_START,
               end: datetime = LAKE_END) -> Path:
    """The lake of ``[start, end)`` at ``root`` (default: the two days, IAQF bars of
    2023-03-09 and 2023-03-10), 60 s windows, through the stream's own backfill,
    :func:`spark_jobs.backfill.backfill`."""
    from arbstream.shell.backfill import Input, read_quotes
    from spark_jobs.backfill import BackfillConfig, backfill

    settings = Settings(data_dir=data_dir, lake_dir=root, window_seconds=60.0,
                        max_quote_age_seconds=60.0, stats_horizon_seconds=3600.0)
    _, quotes = read_quotes(settings, Input.iaqf, start, end)
    backfill((q.to_json() for q in quotes), "iaqf", BackfillConfig.of(settings))
    return root


@pytest.fixture(scope="session")
def iaqf_lake(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, worker_id: str
              ) -> Path:
    """The two-day lake (:func:`build_lake`), built once per test run by the first
    pytest-xdist worker that needs it (a file lock in the run's common temporary directory)
    and shared by the others."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # common to the xdist workers
    root, done = shared / "iaqf-lake", shared / "iaqf-lake.done"
    with _locked(shared / "iaqf-lake.lock"):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            build_lake(root, data_dir)
            done.touch()
    return root


#: Fixtures that start Spark or the real services, or build a lake from the recordings (the
#: backfill and the notebooks' kernels): a test using any of them (directly or through
#: another fixture) is end-to-end.
E2E_FIXTURES = frozenset({"settings", "spark", "iaqf_lake", "depeg"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``e2e`` every test that needs Spark, the local stack or a recorded lake, so
    ``pytest -m "not e2e"`` is the fast tier (pure Python, no services)."""
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
