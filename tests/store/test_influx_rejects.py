"""Points InfluxDB refuses are isolated and reported, not fatal to the whole write: against
the session's real InfluxDB 1.x (and a second real one with authentication on)."""

from __future__ import annotations

import base64
import random
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import SecretStr

from arbstream.config import Settings
from arbstream.shell import stack
from arbstream.store.config import InfluxConfig
from arbstream.store.influx.client import InfluxError, InfluxUnavailableError
from arbstream.store.influx.lines import quote_line
from arbstream.store.influx.queries import query
from arbstream.store.influx.schema import ensure_database
from arbstream.store.influx.writer import (
    REJECT_REASON_CHARS,
    InfluxWriter,
    write_lines_with_rejects,
    write_quotes,
)
from tests.store.test_sinks import T0_MS, quote

FAR_FUTURE_MS = 9_300_000_000_000_000  # 9.3e15 ms = 9.3e21 ns: beyond 2262, outside int64 ns


def good_lines(n: int, start: int = 1000) -> list[str]:
    return [quote_line(quote(exchange_ts=T0_MS + start + i, bid=20000.0 + i,
                                    ask=20001.0 + i)) for i in range(n)]


def count(conf: InfluxConfig) -> int:
    rows = query(conf, 'SELECT count(bid) FROM "raw"."quote"')
    return rows[0]["count"] if rows else 0


BAD = {
    "time outside range": f"quote,exchange=kraken,symbol=BTC-USD ask=2,bid=1 {FAR_FUTURE_MS}",
    "field type conflict": f'quote,exchange=kraken,symbol=BTC-USD ask=2,bid="x" {T0_MS + 1}',
    "missing field value": f"quote,exchange=kraken,symbol=BTC-USD bid= {T0_MS + 2}",
}


@pytest.mark.parametrize("batch_lines", [5000, 7, 1])
def test_refused_lines_are_isolated_and_the_rest_stored(isettings: InfluxConfig,  # noqa: F811
                                                        batch_lines: int) -> None:
    assert write_quotes(isettings, [quote()]) == 1  # bid is a float field from now on
    good = good_lines(40)
    lines = good + list(BAD.values())
    random.Random(batch_lines).shuffle(lines)

    writer = InfluxWriter(isettings, batch_lines=batch_lines, retries=3, backoff=5.0)
    started = time.monotonic()
    assert writer.write_lines(lines, rp="raw") == len(good)  # nothing raises
    assert time.monotonic() - started < 4.0  # 4xx answers are bisected, never retried

    rejected = dict(writer.rejected)
    assert set(rejected) == set(BAD.values()) and len(writer.rejected) == len(BAD)
    for expected, line in BAD.items():
        assert rejected[line].startswith("HTTP 400: "), rejected[line]
        assert expected in rejected[line]
        assert len(rejected[line]) <= REJECT_REASON_CHARS
    assert writer.dropped == 0

    assert count(isettings) == 1 + len(good)  # every good point is queryable
    got = query(isettings, 'SELECT bid FROM "raw"."quote" WHERE time >= '
                                  f"{T0_MS + 1000}ms ORDER BY time")
    assert [r["bid"] for r in got] == [20000.0 + i for i in range(len(good))]
    kinds = query(isettings, 'SHOW FIELD KEYS FROM "raw"."quote"')
    assert {r["fieldKey"]: r["fieldType"] for r in kinds}["bid"] == "float"


def test_write_lines_with_rejects_and_module_writers(isettings: InfluxConfig) -> None:  # noqa: F811
    lines = [*good_lines(3), BAD["time outside range"], *good_lines(2, start=2000)]
    stored, rejected = write_lines_with_rejects(isettings, "quote", lines)
    assert stored == 5
    assert [line for line, _ in rejected] == [BAD["time outside range"]]
    assert "time outside range" in rejected[0][1]
    assert count(isettings) == 5  # written into the RP of quote, "raw"

    # the row writers keep returning the number stored, and do not raise on a refused row
    rows = [quote(exchange_ts=T0_MS + 5000), quote(exchange_ts=FAR_FUTURE_MS),
            quote(exchange_ts=T0_MS + 5001)]
    assert write_quotes(isettings, rows) == 2
    assert count(isettings) == 7


def test_reason_is_capped(isettings: InfluxConfig) -> None:  # noqa: F811
    line = f"quote,exchange={'k' * 2000},symbol=BTC-USD bid= {T0_MS}"  # echoed in the error
    stored, rejected = write_lines_with_rejects(isettings, "quote", [line])
    assert stored == 0
    [(got, reason)] = rejected
    assert got == line
    assert len(reason) == REJECT_REASON_CHARS
    assert reason.startswith("HTTP 400: unable to parse")


def test_rejects_accumulate_across_calls_and_empty_writes(isettings: InfluxConfig) -> None:  # noqa: F811
    with InfluxWriter(isettings) as writer:
        assert writer.write_lines([], rp="raw") == 0
        assert writer.write_lines([BAD["missing field value"]], rp="raw") == 0
        assert writer.write_lines([*good_lines(2), BAD["time outside range"]], rp="raw") == 2
    assert [line for line, _ in writer.rejected] == [BAD["missing field value"],
                                                    BAD["time outside range"]]


def test_beyond_retention_is_still_counted_as_dropped(
    settings: Settings, request: pytest.FixtureRequest
) -> None:
    conf = InfluxConfig.of(settings.model_copy(update={
        "influx_db": "t_rejects_" + request.node.name[:30].lower(), "influx_raw_retention": "1h",
    }))
    ensure_database(conf)
    now_ms = time.time_ns() // 1_000_000
    fresh = quote_line(quote(exchange_ts=now_ms))
    old = good_lines(3)  # 2023: older than the 1 h policy
    with InfluxWriter(conf) as writer:
        assert writer.write_lines([*old, fresh], rp="raw") == 1
        assert writer.dropped == 3 and writer.rejected == []
        # mixed with a refused line: bisected; old points dropped, the refused one reported
        conflict = f'quote,exchange=kraken,symbol=BTC-USD bid="x" {now_ms + 1}'
        assert writer.write_lines([*old, conflict, fresh], rp="raw") == 1
        assert writer.dropped == 6
        assert [line for line, _ in writer.rejected] == [conflict]
        assert "field type conflict" in writer.rejected[0][1]
    assert count(conf) == 1


def test_missing_database_still_raises(isettings: InfluxConfig) -> None:  # noqa: F811
    missing = replace(isettings, db=isettings.db + "_missing")
    with pytest.raises(InfluxError, match="database not found") as err:
        write_lines_with_rejects(missing, "quote", good_lines(3))
    assert err.value.status == 404


# --- a second real InfluxDB with authentication on ----------------------------------------


@pytest.fixture(scope="module")
def auth_influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a private influxd with ``auth-enabled``, an admin ``admin``/``secret`` and a
    read-only user ``reader``/``secret`` on database ``db``; stopped after the module."""
    binary = shutil.which("influxd") or "/usr/bin/influxd"
    if not Path(binary).exists():
        pytest.fail("influxd not found (apt-get install influxdb)")
    home = tmp_path_factory.mktemp("influx_auth")
    port = stack.free_port()
    conf = home / "influxdb.conf"
    conf.write_text(
        "reporting-disabled = true\n"
        f'bind-address = "127.0.0.1:{port + 2}"\n'
        f'[meta]\n  dir = "{home}/meta"\n'
        f'[data]\n  dir = "{home}/data"\n  wal-dir = "{home}/wal"\n'
        f'[http]\n  bind-address = "127.0.0.1:{port}"\n  auth-enabled = true\n'
        "  log-enabled = false\n"
        "[monitor]\n  store-enabled = false\n"
    )
    url = f"http://127.0.0.1:{port}"
    with open(home / "log", "wb") as log:
        proc = subprocess.Popen([binary, "-config", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not stack.influx_healthy(Settings(influx_url=url), timeout=1.0)[0]:
            assert proc.poll() is None, (home / "log").read_text()[-2000:]
            assert time.monotonic() < deadline, "influxd with auth did not start"
            time.sleep(0.2)

        def run(q: str, basic_auth: bool = True) -> None:
            headers = {"Authorization": "Basic " + base64.b64encode(b"admin:secret").decode()}
            request = urllib.request.Request(
                f"{url}/query", data=urllib.parse.urlencode({"q": q}).encode(),
                headers=headers if basic_auth else {},
            )
            urllib.request.urlopen(request, timeout=10).read()

        # the first admin is created without credentials (the only query allowed so)
        run("CREATE USER admin WITH PASSWORD 'secret' WITH ALL PRIVILEGES", basic_auth=False)
        run('CREATE DATABASE "db"')
        run("CREATE USER reader WITH PASSWORD 'secret'")
        run('GRANT READ ON "db" TO reader')
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("user", "password", "status"), [
    ("admin", "wrong", 401),  # authentication failed
    ("reader", "secret", 403),  # authenticated, no write privilege
])
def test_auth_errors_still_raise(auth_influx: str, user: str, password: str,
                                 status: int) -> None:
    conf = InfluxConfig.of(Settings(influx_url=auth_influx, influx_db="db",
                                    influx_username=user, influx_password=SecretStr(password)))
    writer = InfluxWriter(conf, retries=3, backoff=5.0)
    started = time.monotonic()
    with pytest.raises(InfluxError) as err:
        writer.write_lines([*good_lines(3), BAD["time outside range"]])
    assert time.monotonic() - started < 2.0  # neither retried nor bisected
    assert err.value.status == status and not isinstance(err.value,
                                                         InfluxUnavailableError)
    assert writer.rejected == []

    ok = replace(conf, username="admin", password=SecretStr("secret"))
    assert write_lines_with_rejects(ok, "spread", ["spread net_bps=1 1"]) == (1, [])
