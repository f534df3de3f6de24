"""The ``query_progress`` and ``query_restarts`` measurements and the status readers
(latest query state, restart counts, latest health, latest opportunity) against the real
InfluxDB and MongoDB of the session stack."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pymongo.errors import PyMongoError

from arbstream.shell.stack import free_port
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.lines import LINES, query_progress_point, restart_point
from arbstream.store.influx.queries import (
    latest_health,
    latest_query_progress,
    query,
    restart_count,
)
from arbstream.store.influx.schema import QUERY_PROGRESS, QUERY_RESTARTS
from arbstream.store.influx.writer import InfluxWriter, write_health
from arbstream.store.mongo.opportunities import (
    find_opportunities,
    latest_opportunity,
    upsert_opportunities,
)
from tests.store.test_sinks import opportunity

UTC = dt.UTC
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, ms


def _write(conf: InfluxConfig, measurement: str, rows: list[dict[str, Any]]) -> int:
    with InfluxWriter(conf) as writer:
        return writer.write_lines(LINES[measurement](r) for r in rows)


def progress(query_name: str, ts: int, **fields: Any) -> dict[str, Any]:
    return {"query": query_name, "event": "progress", "ts": ts, **fields}


# --- points ---------------------------------------------------------------------------------


def test_progress_point_fields_tags_and_time() -> None:
    line = query_progress_point(progress(
        "market", T0, input_rows_per_s=12.5, processed_rows_per_s=30, num_input_rows=25,
        batch_id=7, batch_duration_ms=812, event_time_lag_s=None,
        consumer_lag_records=float("nan"))).to_line_protocol()
    assert line == (f"query_progress,event=progress,query=market batch_duration_ms=812,"
                    f"batch_id=7,input_rows_per_s=12.5,num_input_rows=25,"
                    f"processed_rows_per_s=30 {T0}")


def test_terminated_point_has_failed_and_exception_string() -> None:
    line = query_progress_point({"query": "trades", "event": "terminated", "ts": T0,
                                 "failed": 1, "exception": 'boom "x"'}).to_line_protocol()
    assert line == f'query_progress,event=terminated,query=trades exception="boom \\"x\\"",' \
                   f"failed=1 {T0}"


def test_progress_point_rejects_unknown_event() -> None:
    with pytest.raises(ValueError, match="query event"):
        query_progress_point({"query": "q", "event": "paused", "ts": T0})


def test_restart_point() -> None:
    line = restart_point({"query": "market", "attempt": 2, "reason": "lost", "ts": T0})
    assert line.to_line_protocol() == f'query_restarts,query=market attempt=2,reason="lost" {T0}'


# --- readers --------------------------------------------------------------------------------


def test_latest_query_progress_takes_each_querys_last_point_and_state(
        isettings: InfluxConfig) -> None:
    rows = [
        progress("market", T0, input_rows_per_s=10.0, batch_id=1, batch_duration_ms=100),
        progress("market", T0 + 1000, input_rows_per_s=20.0, batch_id=2,
                 batch_duration_ms=200, event_time_lag_s=1.5, consumer_lag_records=40),
        progress("trades", T0, batch_id=5, num_input_rows=3),
        {"query": "trades", "event": "idle", "ts": T0 + 5000},
        progress("health", T0, batch_id=9),
        {"query": "health", "event": "terminated", "ts": T0 + 2000, "failed": 1,
         "exception": "java.lang.RuntimeException: boom"},
        # an idle point older than the last batch does not make the query idle
        {"query": "old", "event": "idle", "ts": T0},
        progress("old", T0 + 10, batch_id=1),
        {"query": "stopped", "event": "terminated", "ts": T0, "failed": 0},
    ]
    assert _write(isettings, QUERY_PROGRESS, rows) == len(rows)

    got = latest_query_progress(isettings)

    assert list(got) == ["health", "market", "old", "stopped", "trades"]
    assert got["market"] == {
        "input_rows_per_s": 20.0, "processed_rows_per_s": None, "num_input_rows": None,
        "batch_id": 2.0, "batch_duration_ms": 200.0, "event_time_lag_s": 1.5,
        "consumer_lag_records": 40.0, "time": T0 + 1000, "state": "running",
        "state_time": T0 + 1000, "exception": None,
    }
    assert (got["trades"]["state"], got["trades"]["state_time"]) == ("idle", T0 + 5000)
    assert got["trades"]["batch_id"] == 5.0 and got["trades"]["time"] == T0
    assert got["health"]["state"] == "failed"
    assert got["health"]["exception"] == "java.lang.RuntimeException: boom"
    assert got["old"]["state"] == "running"
    assert got["stopped"]["state"] == "stopped" and got["stopped"]["time"] is None


def test_latest_query_progress_empty_database(isettings: InfluxConfig) -> None:
    assert latest_query_progress(isettings) == {}


def test_restart_count_counts_points_since(isettings: InfluxConfig) -> None:
    rows = [{"query": "market", "attempt": n, "ts": T0 + n * 1000} for n in (1, 2, 3)]
    rows.append({"query": "trades", "attempt": 1, "ts": T0 - 60_000, "reason": "old"})
    assert _write(isettings, QUERY_RESTARTS, rows) == 4
    since = dt.datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)  # T0 + 2 s: attempts 2 and 3
    assert restart_count(isettings, since) == {"market": 2}
    assert restart_count(isettings, dt.datetime(2025, 12, 31)) == {"market": 3, "trades": 1}


def test_latest_health_one_row_per_exchange(isettings: InfluxConfig) -> None:
    rows = [
        {"exchange": "kraken", "ts": T0, "status": "ok", "staleness_s": 1.0,
         "messages_per_s": 5.0, "reliability": 0.9, "rate_score": 1.0},
        {"exchange": "kraken", "ts": T0 + 5000, "status": "degraded", "staleness_s": 7.0,
         "messages_per_s": 2.0, "reliability": 0.6, "rate_score": 0.4},
        {"exchange": "coinbase", "ts": T0, "messages_per_s": 3.0},  # raw: no status
    ]
    assert write_health(isettings, rows) == 3
    got = latest_health(isettings)
    assert [r["exchange"] for r in got] == ["coinbase", "kraken"]
    assert got[0]["status"] is None and got[0]["messages_per_s"] == 3.0
    kraken = got[1]
    assert (kraken["time"], kraken["status"], kraken["staleness_s"], kraken["reliability"],
            kraken["rate_score"], kraken["messages_per_s"]) == (T0 + 5000, "degraded", 7.0,
                                                                  0.6, 0.4, 2.0)
    assert query(isettings, "SELECT count(staleness_s) FROM health")[0]["count"] == 2


def test_latest_opportunity_is_find_opportunities_newest_first(msettings: MongoConfig) -> None:
    t = dt.datetime(2023, 3, 11, 4, 0, 5, tzinfo=UTC)
    rows = [opportunity(window_end=t, net_bps=10.0),
            opportunity(window_end=t + dt.timedelta(seconds=2), net_bps=5.0),
            opportunity(window_end=t + dt.timedelta(seconds=2), buy="binance", net_bps=8.0),
            opportunity("ETH-USD", window_end=t + dt.timedelta(seconds=1), net_bps=50.0)]
    assert latest_opportunity(msettings) is None
    upsert_opportunities(msettings, rows)
    got = latest_opportunity(msettings)
    assert got is not None
    assert got == find_opportunities(msettings, limit=1, newest_first=True)[0]
    assert (got["buy_exchange"], got["net_bps"]) == ("binance", 8.0)


def test_latest_opportunity_fails_fast_on_a_server_that_is_down(
        msettings: MongoConfig) -> None:
    down = MongoConfig(uri=type(msettings.uri)(f"mongodb://127.0.0.1:{free_port()}"),
                       db=msettings.db, ttl_days=msettings.ttl_days)
    started = dt.datetime.now(UTC)
    with pytest.raises(PyMongoError):
        latest_opportunity(down, timeout=0.5)
    assert dt.datetime.now(UTC) - started < dt.timedelta(seconds=5)
