"""``arbstream status --live``: the frame rendered from plain dicts (pure), and ``status --live
--once`` against the session stack with points written by the store's own functions."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from rich.console import Console
from typer.testing import CliRunner, Result

from arbstream.config import Settings, get_settings
from arbstream.shell import status_live
from arbstream.shell.cli import app
from arbstream.shell.stack import free_port
from arbstream.shell.status_live import collect, render
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.lines import LINES
from arbstream.store.influx.schema import QUERY_PROGRESS, QUERY_RESTARTS, ensure_database
from arbstream.store.influx.writer import InfluxWriter, write_health
from arbstream.store.mongo.opportunities import upsert_opportunities
from arbstream.timestamps import to_ms

NOW = datetime(2026, 12, 6, 6, 0, 0, tzinfo=UTC)
NOW_MS = to_ms(NOW)


def text(snapshot: dict[str, Any]) -> str:
    """The frame as plain text, whitespace collapsed (wrapping does not matter)."""
    console = Console(width=200, record=True, color_system=None)
    console.print(render(snapshot))
    return " ".join(console.export_text().split())


def row(frame: str, *cells: str) -> bool:
    """Whether ``cells`` follow each other as cells of one table row of ``frame``."""
    return re.search(r"\s*│\s*".join(re.escape(c) for c in cells), frame) is not None


SNAPSHOT: dict[str, Any] = {
    "now_ms": NOW_MS,
    "services": [{"name": "kafka", "endpoint": "127.0.0.1:9092", "healthy": True, "pid": 42,
                  "detail": "1 broker(s)"},
                 {"name": "mongodb", "endpoint": "127.0.0.1:27017", "healthy": False,
                  "pid": None, "detail": "Connection refused"}],
    "queries": {
        "market": {"state": "running", "input_rows_per_s": 1234.5,
                   "processed_rows_per_s": 2000.25, "batch_duration_ms": 750.0,
                   "event_time_lag_s": 3.25, "consumer_lag_records": 120.0,
                   "time": NOW_MS - 10_750, "exception": None},
        "trades": {"state": "failed", "time": NOW_MS - 60_000, "batch_duration_ms": None,
                   "exception": "java.io.IOException: disk full"},
    },
    "restarts": {"trades": 3, "health": 1},
    "health": [{"exchange": "kraken", "status": "degraded", "staleness_s": 7.5,
                "messages_per_s": 12.0, "rate_score": 0.4, "reliability": 0.655,
                "time": NOW_MS - 4_000}],
    "opportunity": {"opportunity_id": "BTC-USD|x|kraken|coinbase", "symbol": "BTC-USD",
                    "buy_exchange": "kraken", "sell_exchange": "coinbase", "net_bps": 12.345,
                    "gross_bps": 40.0, "window_end": NOW - timedelta(seconds=30),
                    "stage": "final"},
    "errors": {},
}


def test_render_shows_every_panel_from_dicts() -> None:
    frame = text(SNAPSHOT)
    assert "arbstream status at 2026-12-06T06:00:00.000Z" in frame
    assert row(frame, "kafka", "127.0.0.1:9092", "yes", "42", "1 broker(s)")
    assert row(frame, "mongodb", "127.0.0.1:27017", "no", "-", "Connection refused")
    # rows/s, batch ms, event lag s, consumer lag, last batch age (10.75 s ago + 0.75 s), restarts
    assert row(frame, "market", "running", "1,234.5", "2,000.2", "750", "3.2", "120", "10.0", "0")
    assert row(frame, "trades", "failed", "-", "-", "-", "-", "-", "60.0", "3")
    assert "trades failed: java.io.IOException: disk full" in frame
    assert row(frame, "health", "-", "-", "-", "-", "-", "-", "-", "1")  # restarts only
    assert row(frame, "kraken", "degraded", "7.5", "12.0", "0.40", "0.66", "4.0")
    for cells in (("pair", "BTC-USD"), ("buy -> sell", "kraken -> coinbase"),
                  ("net bps", "12.35"), ("window end", "2026-12-06T05:59:30.000Z"),
                  ("age s", "30.0"), ("stage", "final")):
        assert re.search(r"\s+".join(map(re.escape, cells)), frame), cells


def test_render_shows_a_failed_source_in_its_panel_and_empty_ones() -> None:
    snapshot = {"now_ms": NOW_MS, "services": SNAPSHOT["services"], "queries": None,
                "restarts": None, "health": [], "opportunity": None,
                "errors": {"queries": "InfluxUnavailableError: cannot reach http://x",
                           "opportunity": "ServerSelectionTimeoutError: refused"}}
    frame = text(snapshot)
    assert "unavailable: InfluxUnavailableError: cannot reach http://x" in frame
    assert "unavailable: ServerSelectionTimeoutError: refused" in frame
    assert "no health points recorded" in frame
    assert row(frame, "kafka", "127.0.0.1:9092", "yes")


# --- e2e: the real stack ------------------------------------------------------------------------


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
        tmp_path: Path) -> Iterator[Settings]:
    """The session stack as ``ARB_*`` variables, with InfluxDB and MongoDB databases of this
    test's own (created, empty); yields the equivalent settings."""
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    db = "t_live_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    own = settings.model_copy(update={"mongo_db": db, "influx_db": db})
    for name, value in {
        "ARB_KAFKA_BOOTSTRAP": own.kafka_bootstrap, "ARB_INFLUX_URL": own.influx_url,
        "ARB_INFLUX_DB": db, "ARB_MONGO_URI": own.mongo_uri.get_secret_value(),
        "ARB_MONGO_DB": db, "ARB_STATE_DIR": str(own.state_dir),
        "ARB_DATA_DIR": str(own.data_dir),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)  # no stray .env
    with MongoClient(own.mongo_uri.get_secret_value()) as client:
        client.drop_database(db)
    ensure_database(InfluxConfig.of(own))
    get_settings.cache_clear()
    yield own
    get_settings.cache_clear()


def invoke(*args: str, **env: str) -> Result:
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args), env=env or None)
    finally:
        get_settings.cache_clear()


def seed(conf: Settings, now: datetime) -> None:
    """A running ``market`` query, a failed ``trades`` one restarted twice, kraken's health
    and two opportunities, through the store's own functions."""
    influx, ms = InfluxConfig.of(conf), to_ms(now)
    progress = [
        {"query": "market", "event": "progress", "ts": ms - 5000, "input_rows_per_s": 111.0,
         "processed_rows_per_s": 222.0, "batch_duration_ms": 1000, "event_time_lag_s": 9.5,
         "consumer_lag_records": 77, "batch_id": 3, "num_input_rows": 50},
        {"query": "trades", "event": "progress", "ts": ms - 9000, "batch_id": 1},
        {"query": "trades", "event": "terminated", "ts": ms - 8000, "failed": 1,
         "exception": "java.lang.IllegalStateException: broker gone"},
    ]
    restarts = [{"query": "trades", "attempt": n, "ts": ms - 7000 + n} for n in (1, 2)]
    with InfluxWriter(influx) as writer:
        assert writer.write_lines(LINES[QUERY_PROGRESS](r) for r in progress) == 3
        assert writer.write_lines(LINES[QUERY_RESTARTS](r) for r in restarts) == 2
    assert write_health(influx, [{"exchange": "kraken", "ts": ms - 2000, "status": "stale",
                                  "staleness_s": 31.5, "messages_per_s": 0.0,
                                  "rate_score": 0.0, "reliability": 0.125}]) == 1
    base = {"symbol": "ETH-USD", "buy_exchange": "kraken", "sell_exchange": "coinbase",
            "gross_bps": 30.0, "stage": "final"}
    upsert_opportunities(MongoConfig.of(conf), [
        {**base, "opportunity_id": "old", "window_end": now - timedelta(minutes=5),
         "net_bps": 99.0},
        {**base, "opportunity_id": "newest", "window_end": now - timedelta(seconds=20),
         "net_bps": 4.5},
    ])


def test_status_live_once_shows_the_stored_values(env: Settings) -> None:
    seed(env, datetime.now(UTC))
    result = invoke("status", "--live", "--once")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    frame = " ".join(result.stdout.split())
    assert row(frame, "market", "running", "111.0", "222.0", "1,000", "9.5", "77")
    assert row(frame, "trades", "failed")
    assert re.search(r"trades │ failed(?: │ -){5} │ [\d.]+ │ 2", frame), frame
    assert "trades failed: java.lang.IllegalStateException: broker gone" in frame
    assert row(frame, "kraken", "stale", "31.5", "0.0", "0.00", "0.12")
    assert re.search(r"net bps\s+4\.50", frame) and "newest" in frame
    assert row(frame, "influxdb", env.influx_url.removeprefix("http://"), "yes")


def test_collect_reads_what_the_store_wrote(env: Settings) -> None:
    now = datetime.now(UTC)
    seed(env, now)
    snapshot = collect(env, now)
    assert snapshot["errors"] == {}
    assert snapshot["queries"]["market"]["consumer_lag_records"] == 77.0
    assert snapshot["queries"]["trades"]["state"] == "failed"
    assert snapshot["restarts"] == {"trades": 2}
    assert [h["exchange"] for h in snapshot["health"]] == ["kraken"]
    assert snapshot["opportunity"]["opportunity_id"] == "newest"


def test_status_live_once_with_services_down_shows_them_without_traceback(
        env: Settings) -> None:
    result = invoke("status", "--live", "--once",
                    ARB_INFLUX_URL=f"http://127.0.0.1:{free_port()}",
                    ARB_MONGO_URI=f"mongodb://arb:s3cret-pw@127.0.0.1:{free_port()}")
    assert result.exit_code == 1, f"{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit)
    frame = " ".join(result.stdout.split())
    assert "Traceback" not in result.output and "s3cret-pw" not in result.output
    assert row(frame, "influxdb") and re.search(r"influxdb │ [^│]+ │ no", frame)
    assert re.search(r"mongodb │ [^│]+ │ no", frame)
    assert frame.count("unavailable: InfluxUnavailableError") >= 2  # queries and health
    assert "unavailable: ServerSelectionTimeoutError" in frame


def test_live_refreshes_every_interval_until_ctrl_c(
        env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C cannot be typed here: the sleep between two refreshes raises it the third
    time; every refresh reads the store again (a point written meanwhile shows)."""
    sleeps: list[float] = []
    influx = InfluxConfig.of(env)

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:  # between the 2nd and 3rd frame, a query reports
            with InfluxWriter(influx) as writer:
                writer.write_lines([LINES[QUERY_PROGRESS]({
                    "query": "late", "event": "progress", "ts": to_ms(datetime.now(UTC)),
                    "input_rows_per_s": 4321.0})])
        if len(sleeps) >= 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_live, "sleep", sleep)
    console = Console(width=200, record=True, color_system=None, force_terminal=True)
    assert status_live.run(env, console, interval=0.5) is True
    assert sleeps == [0.5, 0.5, 0.5]
    assert "4,321.0" in console.export_text()
