"""Components as subprocesses for the fault tests (tests/faults/): ``arbstream stream`` or
``arbstream alerts run`` with the environment of a :class:`~arbstream.config.Settings`, a log
file and a graceful stop; and counts of what the sinks hold (MongoDB documents, InfluxDB
points). Test tooling (:mod:`testing.faults` has the stack and the faults); never imported by
components.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from arbstream.config import Settings
from testing.faults import FaultError, note, signal_group, wait_until

# --- components as subprocesses ------------------------------------------------------------

def _env_value(value: Any) -> str:
    def plain(v: Any) -> Any:
        if isinstance(v, SecretStr):
            return v.get_secret_value()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if hasattr(v, "model_dump"):
            return plain(v.model_dump())
        return str(v.resolve()) if isinstance(v, Path) else v  # as this process sees it

    v = plain(value)
    return v if isinstance(v, str) else json.dumps(v)


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The process environment that makes a child load the same ``settings``: this
    process's variables without any ``ARB_*`` or ``PYSPARK_*``, then ``ARB_<FIELD>`` for
    every field set explicitly (by keyword, environment or file), lists, dicts and models
    as JSON, paths absolute, secrets in clear (the environment is the child's only), then
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARB_", "PYSPARK_"))}
    for name in sorted(settings.model_fields_set):
        value = getattr(settings, name)
        if value is not None and not (name == "id_hash_key" and settings.id_hash_key_file):
            env[f"ARB_{name.upper()}"] = _env_value(value)
    env.update(extra)
    return env


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of group ``pgid`` exists (Linux ``/proc``)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    """Wait until no process of group ``pgid`` is left (a Spark JVM may outlive its Python
    driver), SIGKILLing the group after ``timeout`` s.

    Raises:
        FaultError: still alive ``timeout`` s after the SIGKILL.
    """
    for signum in (None, signal.SIGKILL):
        if signum is not None:
            signal_group(pgid, signum)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not group_alive(pgid), timeout, 0.2)
            return
    raise FaultError(f"process group {pgid} survived SIGKILL")


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> int:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session=True``),
    SIGKILL it if ``proc`` is still running after ``grace`` s, then wait until the whole
    group is gone (:func:`wait_group_gone`); return ``proc``'s exit code (negative: killed
    by that signal)."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            note(f"pid {proc.pid} still running {grace:g} s after SIGTERM: SIGKILL")
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(30)
    wait_group_gone(proc.pid, grace)
    return proc.returncode


def kill_group(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGKILL the process group of ``proc`` at once and wait until it is gone; return
    ``proc``'s exit code (``-9``)."""
    signal_group(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout)
    wait_group_gone(proc.pid, timeout)
    return code


class Component:
    """An ``arbstream`` command (or any argv) running as a subprocess in a session of its
    own, stdout and stderr appended to ``log``, with :func:`settings_env` of ``settings``,
    in ``cwd`` (default: ``settings.state_dir``, created).

    Args:
        args: the command after ``arbstream`` (``["stream"]``, ``["alerts", "run"]``), or a
            full argv when ``argv0`` is False.
        extra_env: variables added last (e.g. ``{"ARB_TRIGGER_SECONDS": "2"}``).
    """

    def __init__(self, args: Sequence[str], settings: Settings, log: Path,
                 extra_env: dict[str, str] | None = None, cwd: Path | None = None,
                 argv0: bool = True) -> None:
        self.log = log
        cwd = cwd or settings.state_dir
        cwd.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(Path(sys.executable).with_name("arbstream")), *args] if argv0 else [*args]
        self.name = " ".join(args)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, env=settings_env(settings, **(extra_env or {})), cwd=cwd, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        note(f"started `{self.name}` (pid {self.proc.pid}), log {log}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the main process is still running."""
        return self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of its log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self, timeout: float = 30.0) -> int:
        """SIGKILL the whole process group (e.g. the driver and its JVM); return the exit
        code (``-9``)."""
        code = kill_group(self.proc, timeout)
        note(f"`{self.name}` SIGKILLed (exit {code})")
        return code

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM the process group, SIGKILL whatever is left after ``grace`` s; return the
        main process's exit code (negative: killed by that signal)."""
        code = stop_group(self.proc, grace)
        note(f"`{self.name}` stopped (exit {code})")
        return code


def run_stream(settings: Settings, log: Path, extra_env: dict[str, str] | None = None
               ) -> Component:
    """``arbstream stream`` as a :class:`Component` (stop it with :meth:`Component.stop`)."""
    return Component(["stream"], settings, log, extra_env)


# --- what the sinks hold -----------------------------------------------------------------------

def count_documents(settings: Settings, collection: str = "opportunities",
                    db: str | None = None) -> int:
    """Documents in MongoDB ``collection`` of ``db`` (default ``settings.mongo_db``).

    Raises:
        pymongo.errors.PyMongoError: MongoDB unreachable.
    """
    from arbstream.store.config import MongoConfig
    from arbstream.store.mongo.client import connect

    conf = MongoConfig.of(settings)
    with connect(conf) as client:
        return client[db or conf.db][collection].count_documents({})


def count_points(settings: Settings, measurement: str = "quote", db: str | None = None) -> int:
    """Points of InfluxDB ``measurement`` (in its retention policy) of ``db`` (default
    ``settings.influx_db``): the largest per-field ``COUNT`` (a point has at least one field).

    Raises:
        arbstream.store.influx.client.InfluxError: as :func:`arbstream.store.influx.queries.
            query` (an unknown database is an error, a missing measurement 0).
    """
    from arbstream.store.config import InfluxConfig
    from arbstream.store.influx.queries import query
    from arbstream.store.influx.schema import ref

    conf = InfluxConfig.of(settings.model_copy(update={"influx_db": db or settings.influx_db}))
    rows = query(conf, f"SELECT COUNT(*) FROM {ref(measurement)}")
    return max((int(v) for r in rows for k, v in r.items() if k.startswith("count_")),
               default=0)


# --- paced publishing --------------------------------------------------------------------------

class PacedProducer(threading.Thread):
    """Publish ``records`` (key, value) to ``topic`` at ``per_second`` in a thread, through an
    idempotent ``acks=all`` producer (:func:`arbstream.kafka.reliable_producer_config`),
    so records keep being handed over while a fault is on (the client buffers and retries).

    ``handed[i]`` is when record ``i`` was handed to the client (monotonic s); :meth:`handed_by`
    how many were by a given time; after :meth:`finish`, ``failed`` holds delivery errors.
    """

    def __init__(self, settings: Settings, topic: str, records: Sequence[tuple[bytes | None,
                 bytes]], per_second: float) -> None:
        super().__init__(daemon=True, name=f"paced-{topic}")
        self.settings, self.topic, self.records = settings, topic, list(records)
        self.interval = 1.0 / per_second
        self.handed: list[float] = []
        self.failed: list[str] = []
        self.delivered = 0

    def run(self) -> None:
        from confluent_kafka import Producer

        from arbstream.kafka import reliable_producer_config

        producer = Producer(reliable_producer_config(self.settings.kafka_client_config(),
                                                     linger_ms=5))

        def done(err: Any, _msg: Any) -> None:
            if err is None:
                self.delivered += 1
            else:
                self.failed.append(str(err))

        start = time.monotonic()
        for i, (key, value) in enumerate(self.records):
            time.sleep(max(0.0, start + i * self.interval - time.monotonic()))
            producer.produce(self.topic, value, key, on_delivery=done)
            self.handed.append(time.monotonic())
            producer.poll(0)
        left = producer.flush(120)
        if left:
            self.failed.append(f"{left} record(s) not delivered after 120 s")

    def handed_by(self, when: float) -> int:
        """Records handed over at or before ``when`` (monotonic s)."""
        return sum(1 for t in self.handed if t <= when)

    def finish(self, timeout: float = 180.0) -> None:
        """Wait until every record is delivered.

        Raises:
            FaultError: still running after ``timeout`` s, or a delivery failed.
        """
        self.join(timeout)
        if self.is_alive() or self.failed:
            raise FaultError(f"publishing to {self.topic}: {self.failed or 'still running'}")
