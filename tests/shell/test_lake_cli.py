"""``arbstream lake compact`` in-process (Typer's CliRunner) on a lake of stream-keyed files
under ``ARB_LAKE_DIR``."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arbstream.config import get_settings
from arbstream.shell.cli import app
from arbstream.store import lake


@pytest.fixture
def lake_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ARB_LAKE_DIR", str(tmp_path / "lake"))
    get_settings.cache_clear()
    yield tmp_path / "lake"
    get_settings.cache_clear()


def test_compact_reports_and_merges(lake_dir: Path) -> None:
    cfg = lake.LakeConfig(lake_dir)
    t0 = datetime(2023, 3, 11, 12, tzinfo=UTC)
    for batch in range(3):
        rows = [{"opportunity_id": f"x|{batch}|{i}", "window_end": t0 + timedelta(seconds=i)}
                for i in range(5)]
        lake.write(cfg, "spread", rows, f"market-{batch:010d}-00000")
    dry = CliRunner().invoke(app, ["lake", "compact", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would merge 2 files into 1" in " ".join(dry.output.split())
    assert len(list(lake_dir.rglob("*.parquet"))) == 3
    done = CliRunner().invoke(app, ["lake", "compact", "--record", "spread"])
    assert done.exit_code == 0, done.output
    assert "merged 2 files into 1 (date partitions), removed 2, kept 1" in " ".join(
        done.output.split())
    assert lake.read(cfg, "spread").num_rows == 15
    assert len(list(lake_dir.rglob("*.parquet"))) == 2
    bad = CliRunner().invoke(app, ["lake", "compact", "--record", "spreads"])
    assert bad.exit_code != 0 and "unknown lake record" in bad.output
