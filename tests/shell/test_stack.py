"""The local stack as real processes: up, idempotent up, status, down, and its error paths.

Every test here builds its own :class:`Settings` with a private state directory and free
loopback ports, so it never touches the session stack of ``conftest.settings`` (except to
borrow its healthy endpoints where a test needs services that are already up). "External"
endpoints use ``127.0.0.2``: a loopback address (connections are refused at once, nothing
leaves the machine) that is not in :data:`arbstream.shell.stack.LOCAL_HOSTS`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from arbstream.config import Settings
from arbstream.shell import stack
from arbstream.shell.stack import free_port

NAMES = ["kafka", "influxdb", "mongodb"]
EXTERNAL = "127.0.0.2"


def _own_settings(state: Path, **overrides: object) -> Settings:
    conf: dict[str, object] = {
        "state_dir": state,
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "influx_url": f"http://127.0.0.1:{free_port()}",
        "mongo_uri": f"mongodb://127.0.0.1:{free_port()}",
    }
    conf.update(overrides)
    return Settings(**conf)  # type: ignore[arg-type]


def _pid_file(conf: Settings, name: str) -> Path:
    return conf.state_dir / "services" / name / "pid"


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def own(tmp_path: Path) -> Iterator[Settings]:
    """Settings of a private, not yet started stack; whatever it started is stopped after."""
    conf = _own_settings(tmp_path / "state")
    try:
        yield conf
    finally:
        stack.down(conf)


# --- pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", True),
        ("127.0.0.2", False),
        ("10.0.0.5", False),
        ("kafka.example.com", False),
        ("", False),
    ],
)
def test_endpoint_local(host: str, local: bool) -> None:
    assert stack.Endpoint(host, 1234).local is local


def test_service_endpoints_come_from_settings(tmp_path: Path) -> None:
    conf = Settings(
        state_dir=tmp_path,
        kafka_bootstrap="localhost:19092, broker2.example.com:9092",
        influx_url="http://127.0.0.1:18086",
        mongo_uri="mongodb://user:secret@127.0.0.1:37017/?authSource=admin",
    )
    got = {s.name: s.endpoint for s in stack.services(conf)}
    assert list(got) == NAMES
    assert got["kafka"] == stack.Endpoint("localhost", 19092)
    assert got["influxdb"] == stack.Endpoint("127.0.0.1", 18086)
    assert got["mongodb"] == stack.Endpoint("127.0.0.1", 37017)
    assert all(e.local for e in got.values())

    remote = Settings(
        state_dir=tmp_path,
        influx_url="https://influx.example.com",
        mongo_uri="mongodb+srv://user:secret@cluster0.example.net/?retryWrites=true",
    )
    got = {s.name: s.endpoint for s in stack.services(remote)}
    assert got["influxdb"] == stack.Endpoint("influx.example.com", 443)
    assert got["mongodb"] == stack.Endpoint("cluster0.example.net", 27017)
    assert not got["influxdb"].local and not got["mongodb"].local


def test_replica_set_mongo_uri_is_an_external_endpoint(tmp_path: Path) -> None:
    conf = Settings(
        state_dir=tmp_path,
        mongo_uri="mongodb://a.example.com:27017,b.example.com:27017/?replicaSet=rs0",
    )
    mongo = {s.name: s.endpoint for s in stack.services(conf)}["mongodb"]
    assert not mongo.local


def test_ensure_java_returns_a_java_17_runtime() -> None:
    java = stack.ensure_java()
    assert Path(java).is_file() and os.access(java, os.X_OK)
    assert java == shutil.which("java")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=True).stderr
    assert int(out.split('"')[1].split(".")[0]) >= 17


# --- real processes --------------------------------------------------------------------------


def test_up_status_up_again_down(own: Settings) -> None:
    rows = stack.up(own)
    assert [r.name for r in rows] == NAMES
    assert all(r.healthy and r.managed for r in rows), rows
    pids = {}
    for r in rows:
        pid_file = _pid_file(own, r.name)
        assert pid_file.is_file(), r.name
        pid = int(pid_file.read_text())
        assert r.pid == pid
        assert _running(pid)
        assert os.getpgid(pid) == pid  # own session: `down` signals the whole group
        assert (pid_file.parent / "service.log").is_file()
        pids[r.name] = pid
    kafka_port = own.kafka_bootstrap.rpartition(":")[2]
    cmdline = Path(f"/proc/{pids['kafka']}/cmdline").read_bytes().replace(b"\0", b" ")
    assert f"tcp://127.0.0.1:{kafka_port}".encode() in cmdline
    assert rows[0].endpoint == own.kafka_bootstrap
    assert rows[1].detail.startswith("InfluxDB")

    status = stack.status(own)
    assert [(s.name, s.healthy, s.pid, s.managed) for s in status] == [
        (n, True, pids[n], True) for n in NAMES
    ]

    again = stack.up(own)  # every service is healthy: nothing is started
    assert {r.name: r.pid for r in again} == pids
    assert all(r.healthy for r in again)
    assert {n: int(_pid_file(own, n).read_text()) for n in NAMES} == pids

    assert stack.down(own) == NAMES
    for name, pid in pids.items():
        assert not _pid_file(own, name).exists(), name
        assert not _running(pid), name
    after = stack.status(own)
    assert [(s.name, s.healthy, s.pid) for s in after] == [(n, False, None) for n in NAMES]
    assert all(s.detail for s in after)  # the failure is explained
    assert stack.down(own) == []  # nothing left to stop


def test_down_without_up_stops_nothing(own: Settings) -> None:
    assert stack.down(own) == []
    assert not (own.state_dir / "services").exists()


def test_stale_pid_file_is_ignored(own: Settings) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid that no longer exists
    pid_file = _pid_file(own, "mongodb")
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(str(proc.pid))
    assert stack.down(own) == []


@pytest.mark.parametrize("external", NAMES)
def test_unreachable_external_service_is_never_started(
    external: str, settings: Settings, tmp_path: Path
) -> None:
    # the two other services point at the (healthy) session stack, so `up` reaches the
    # external one without starting anything
    port = free_port()
    endpoint = {
        "kafka": ("kafka_bootstrap", f"{EXTERNAL}:{port}"),
        "influxdb": ("influx_url", f"http://{EXTERNAL}:{port}"),
        "mongodb": ("mongo_uri", f"mongodb://{EXTERNAL}:{port}"),
    }[external]
    fields = {
        "kafka_bootstrap": settings.kafka_bootstrap,
        "influx_url": settings.influx_url,
        "mongo_uri": settings.mongo_uri.get_secret_value(),
        endpoint[0]: endpoint[1],
    }
    conf = _own_settings(tmp_path / "state", **fields)
    with pytest.raises(stack.StackError) as info:
        stack.up(conf)
    message = str(info.value)
    assert f"{external} at {EXTERNAL}:{port} is external and not reachable" in message
    assert "only starts services on this machine" in message
    assert not (conf.state_dir / "services").exists()

    status = {s.name: s for s in stack.status(conf)}
    assert not status[external].healthy and not status[external].managed
    assert status[external].endpoint == f"{EXTERNAL}:{port}"
    assert all(s.healthy for n, s in status.items() if n != external)


def test_service_that_exits_at_once_is_reported_with_its_log(own: Settings) -> None:
    # something that is not Kafka holds the Kafka port: the health check fails, tansu
    # cannot bind and exits, and `up` says so with the tail of tansu's log
    port = int(own.kafka_bootstrap.rpartition(":")[2])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(stack.StackError) as info:
            stack.up(own, timeout=20)
    message = str(info.value)
    assert message.startswith("kafka exited with ")
    assert "Address in use" in message
    assert (own.state_dir / "services" / "kafka" / "service.log").is_file()
    assert not (own.state_dir / "services" / "influxdb").exists()  # stopped at the first


def test_up_after_a_port_change_leaves_no_orphan(settings: Settings, tmp_path: Path) -> None:
    # influxdb and mongodb are the (healthy) session stack's, so only tansu is started
    shared = {"influx_url": settings.influx_url, "mongo_uri": settings.mongo_uri.get_secret_value()}
    first = _own_settings(tmp_path / "state", **shared)
    stack.up(first)
    old = int(_pid_file(first, "kafka").read_text())
    second = _own_settings(tmp_path / "state", **shared)  # same state dir, new Kafka port
    try:
        with contextlib.suppress(stack.StackError):
            stack.up(second)  # refusing while the old broker runs would be a fix too
        stack.down(second)
        assert not _running(old), "the first broker is still running and no pid file names it"
    finally:
        stack.down(second)
        if _running(old):
            os.killpg(old, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(old, 0)
