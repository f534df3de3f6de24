"""Fixtures of the retraining tests: a real two-day lake (IAQF bars of 2023-03-09 and
2023-03-10, one day before and one during the USDC depeg) written by the stream's own
backfill with 60 s windows. It is built once per test run and shared by the pytest-xdist
workers (a file lock in the run's common temporary directory)."""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from arbstream.config import Settings

#: The slice: 2023-03-09T00:00 to 2023-03-11T00:00 UTC.
START, END = datetime(2023, 3, 9, tzinfo=UTC), datetime(2023, 3, 11, tzinfo=UTC)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_lake(root: Path, data_dir: Path) -> Path:
    """The lake of the two days at ``root``, through :func:`spark_jobs.backfill.backfill`."""
    from arbstream.shell.backfill import Input, read_quotes
    from spark_jobs.backfill import BackfillConfig, backfill

    settings = Settings(data_dir=data_dir, lake_dir=root, window_seconds=60.0,
                        max_quote_age_seconds=60.0, stats_horizon_seconds=3600.0)
    _, quotes = read_quotes(settings, Input.iaqf, START, END)
    backfill((q.to_json() for q in quotes), "iaqf", BackfillConfig.of(settings))
    return root


@pytest.fixture(scope="session")
def iaqf_lake(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, worker_id: str
              ) -> Path:
    """The two-day lake, built by the first worker that needs it."""
    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # common to the xdist workers
    root, done = shared / "iaqf-lake", shared / "iaqf-lake.done"
    with _locked(shared / "iaqf-lake.lock"):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            build_lake(root, data_dir)
            done.touch()
    return root
