"""Fault injection for tests/faults/: a private local stack, outages with measured timings,
components run as subprocesses, and the figures of a scenario (lost, duplicated, recovery).

A :class:`PrivateStack` runs tansu, influxd and secantusd-py exactly as ``arbstream up`` does
(:mod:`arbstream.shell.stack`), on free loopback ports with data under its own root, so the
faults never touch the stack other tests share. The faults:

* :func:`paused` (SIGSTOP, then SIGCONT, to the service's process group): a hung server or a
  network partition; connections stay open, requests get no answer until it resumes. The
  only fault for the broker: tansu keeps topics in memory, so stopping it loses every topic
  and offset (:meth:`ManagedService.stop` refuses ``kafka``);
* :func:`stopped` (SIGTERM, or SIGKILL with ``kill=True``; then the same command on the same
  port and data directory, waiting until healthy): a crashed or restarted server;
  connections are refused meanwhile. InfluxDB and MongoDB keep their data on disk. Also
  for :class:`SmtpServer`, an aiosmtpd server in this process restarted on its port.

Every fault prints (and logs, logger ``testing.faults``) what it did with a UTC timestamp and
returns an :class:`Outage` with its timings (monotonic seconds); :class:`Figures` compares
what a sink received with what it should have. Components run as subprocesses with
:mod:`testing.components`. Not shipped; never imported by components.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, Protocol

from arbstream.config import Settings
from arbstream.shell import stack

log = logging.getLogger("testing.faults")


def note(message: str) -> None:
    """Print ``message`` prefixed with the UTC time (ms) and log it (INFO)."""
    now = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    print(f"[faults {now}Z] {message}", flush=True)
    log.info(message)


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05,
               what: str = "") -> float:
    """Poll ``predicate`` every ``interval`` s until it is truthy; return the seconds waited.

    Raises:
        TimeoutError: still falsy after ``timeout`` s (the message names ``what``).
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)
    return time.monotonic() - start


class FaultError(RuntimeError):
    """A fault cannot be injected or lifted (service not running, not restartable, not
    healthy again in time)."""


@dataclass
class Outage:
    """One injected fault. Times are ``time.monotonic()`` seconds: ``started`` when it was
    injected, ``lifted`` when SIGCONT or the restart was issued, ``healthy`` when the service
    answered its health check again (a pause: = ``lifted``). ``started_at`` is UTC."""

    service: str
    kind: Literal["paused", "stopped", "killed"]
    planned_seconds: float
    started: float
    started_at: datetime
    lifted: float | None = None
    healthy: float | None = None

    @property
    def down_seconds(self) -> float:
        """How long the service did not answer: injection to healthy again, seconds."""
        end = self.healthy if self.healthy is not None else time.monotonic()
        return end - self.started

    @property
    def restart_seconds(self) -> float:
        """From the restart command to healthy again, seconds (0 for a pause)."""
        if self.lifted is None or self.healthy is None:
            raise FaultError(f"{self.service} outage not lifted yet")
        return self.healthy - self.lifted

    def recovered(self, predicate: Callable[[], Any], timeout: float = 60.0,
                  what: str = "") -> float:
        """Wait until ``predicate`` holds; return seconds from the service being healthy
        again to that moment (its *time to recover*; 0 if it already held).

        Raises:
            FaultError: the outage is not over; TimeoutError: as :func:`wait_until`.
        """
        if self.healthy is None:
            raise FaultError(f"{self.service} outage not over yet")
        wait_until(predicate, timeout, what=what)
        return max(0.0, time.monotonic() - self.healthy)


class Restartable(Protocol):
    """What :func:`stopped` needs of a service."""

    name: str

    def stop(self, kill: bool = False) -> None: ...
    def start(self, timeout: float = 60.0) -> None: ...


# --- the private stack -------------------------------------------------------------------

def signal_group(pid: int, signum: int) -> None:
    """Send ``signum`` to process group ``pid`` (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (reaped here when it is our child)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class ManagedService:
    """One service of a :class:`PrivateStack` (``kafka``, ``influxdb`` or ``mongodb``); its
    process runs in a session of its own, data and log under
    ``<state_dir>/services/<name>/``, as :func:`arbstream.shell.stack.up` starts it."""

    def __init__(self, settings: Settings, service: stack.Service) -> None:
        self.settings, self.service, self.name = settings, service, service.name
        self.home = settings.state_dir.resolve() / "services" / service.name

    def pid(self) -> int:
        """The running process (group) id.

        Raises:
            FaultError: not running.
        """
        try:
            pid = int((self.home / "pid").read_text())
        except (FileNotFoundError, ValueError):
            raise FaultError(f"{self.name} is not running (no pid file)") from None
        if _gone(pid):
            raise FaultError(f"{self.name} (pid {pid}) is not running")
        return pid

    def healthy(self, timeout: float = 1.0) -> bool:
        """Whether it answers its health check within ``timeout`` s."""
        return self.service.health(self.settings, timeout=timeout)[0]

    def pause(self) -> None:
        """SIGSTOP the process group."""
        signal_group(self.pid(), signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the process group."""
        signal_group(self.pid(), signal.SIGCONT)

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM (``kill``: SIGKILL) the process group and wait until it has exited
        (SIGKILL after ``timeout`` s).

        Raises:
            FaultError: it is the broker (memory-only: a restart loses every topic), or it
                is not running.
        """
        if self.name == "kafka":
            raise FaultError("tansu keeps topics in memory only: stopping it loses every "
                             "topic and committed offset; use paused() for the broker")
        pid = self.pid()
        if kill:  # at once, even if it is paused: requests in flight stay unanswered
            signal_group(pid, signal.SIGKILL)
        else:  # a paused process handles SIGTERM once resumed
            signal_group(pid, signal.SIGCONT)
            signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not _gone(pid):
            if time.monotonic() > deadline:
                signal_group(pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.05)
        (self.home / "pid").unlink(missing_ok=True)

    def start(self, timeout: float = 60.0) -> None:
        """Run the service's command again (same port, same data directory) and wait until
        it is healthy.

        Raises:
            FaultError: it exits early (the tail of its log is included) or is not healthy
                within ``timeout`` s.
        """
        try:
            stack.start_service(self.settings, self.service, timeout)
        except stack.StackError as exc:
            raise FaultError(f"{self.name} restart failed: {exc}") from None


class PrivateStack:
    """tansu, influxd and secantusd-py of its own for fault tests, on free ports with data
    under ``root`` (a context manager: :meth:`up` at entry, :meth:`down` at exit).

    Args:
        root: directory of the state (``<root>/state``).
        overrides: further :class:`~arbstream.config.Settings` fields (``kafka_partitions``
            defaults to 2, ``spark_shuffle_partitions`` to 2, as the shared fixture).
    """

    def __init__(self, root: Path, **overrides: Any) -> None:
        values: dict[str, Any] = {
            "state_dir": root / "state",
            "kafka_bootstrap": f"127.0.0.1:{stack.free_port()}",
            "influx_url": f"http://127.0.0.1:{stack.free_port()}",
            "mongo_uri": f"mongodb://127.0.0.1:{stack.free_port()}",
            "kafka_partitions": 2, "spark_shuffle_partitions": 2,
        }
        values.update(overrides)
        self.settings = Settings(**values)
        self.services = {s.name: ManagedService(self.settings, s)
                         for s in stack.services(self.settings)}

    def up(self, timeout: float = 60.0) -> PrivateStack:
        """Start the three services (:func:`arbstream.shell.stack.up`)."""
        stack.up(self.settings, timeout)
        note("private stack up: kafka " + self.settings.kafka_bootstrap + ", influxdb "
             + self.settings.influx_url + ", mongodb port "
             + str(self.services["mongodb"].service.endpoint.port))
        return self

    def down(self) -> None:
        """Resume anything paused, then stop every service
        (:func:`arbstream.shell.stack.down`)."""
        for svc in self.services.values():
            with contextlib.suppress(FaultError):
                svc.resume()
        stack.down(self.settings)

    def __enter__(self) -> PrivateStack:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __getitem__(self, name: str) -> ManagedService:
        return self.services[name]

    def paused(self, name: str, seconds: float) -> contextlib.AbstractContextManager[Outage]:
        """:func:`paused` of service ``name``."""
        return paused(self.services[name], seconds)

    def stopped(self, name: str, seconds: float, kill: bool = False, hang: float = 0.0
                ) -> contextlib.AbstractContextManager[Outage]:
        """:func:`stopped` of service ``name``."""
        return stopped(self.services[name], seconds, kill=kill, hang=hang)


# --- the faults ----------------------------------------------------------------------------

def _hold(outage: Outage) -> None:
    left = outage.started + outage.planned_seconds - time.monotonic()
    if left > 0:
        time.sleep(left)


@contextlib.contextmanager
def paused(service: ManagedService, seconds: float) -> Iterator[Outage]:
    """SIGSTOP ``service`` for ``seconds``; the ``with`` body runs during the pause, and the
    exit waits for the rest of ``seconds`` (or for the body, if longer), then SIGCONTs it.

    Simulates a hung server or a network partition (open connections get no answer). Yields
    the :class:`Outage` (``healthy`` = ``lifted``, set at exit).

    Raises:
        FaultError: the service is not running.
    """
    pid = service.pid()
    outage = Outage(service.name, "paused", seconds, time.monotonic(), datetime.now(UTC))
    service.pause()
    note(f"{service.name}: SIGSTOP (pid {pid}) for {seconds:g} s")
    try:
        yield outage
        _hold(outage)
    finally:
        service.resume()
        outage.lifted = outage.healthy = time.monotonic()
        note(f"{service.name}: SIGCONT after {outage.lifted - outage.started:.2f} s")


@contextlib.contextmanager
def stopped(service: Restartable, seconds: float, kill: bool = False,
            hang: float = 0.0) -> Iterator[Outage]:
    """Stop ``service`` (SIGTERM; ``kill``: SIGKILL, a crash) for ``seconds``, counted from
    the stop; the ``with`` body runs meanwhile; at exit, after the rest of ``seconds``, start
    it again (same command, port and data) and wait until healthy.

    With ``hang`` (a :class:`ManagedService` only), it is first SIGSTOPped for ``hang`` of
    the ``seconds`` and then stopped: the requests in flight stay unanswered, then their
    connections are reset (a server that hangs, then crashes mid-request).

    Yields the :class:`Outage` (``started`` at the stop, or at the hang; ``lifted`` at the
    restart, ``healthy`` when it answers).

    Raises:
        FaultError: as :meth:`ManagedService.stop` and :meth:`ManagedService.start`.
    """
    started = time.monotonic()
    if hang > 0:
        if not isinstance(service, ManagedService):
            raise FaultError(f"{service.name} cannot hang (not a process of the stack)")
        service.pause()
        note(f"{service.name}: SIGSTOP (hangs) for {hang:g} s before it is stopped")
        time.sleep(hang)
    service.stop(kill=kill)
    outage = Outage(service.name, "killed" if kill else "stopped", seconds, started,
                    datetime.now(UTC))
    note(f"{service.name}: {'SIGKILL' if kill else 'stopped'} in "
         f"{time.monotonic() - started:.2f} s, down for {seconds:g} s")
    try:
        yield outage
        _hold(outage)
    finally:
        outage.lifted = time.monotonic()
        note(f"{service.name}: restarting after {outage.lifted - started:.2f} s")
        service.start()
        outage.healthy = time.monotonic()
        note(f"{service.name}: healthy again {outage.restart_seconds:.2f} s after the restart")


# --- an SMTP server that can be stopped ----------------------------------------------------

class SmtpServer:
    """A real SMTP server (aiosmtpd, plain, in this process) on a fixed loopback port; the
    messages it accepted are kept across :meth:`stop` / :meth:`start` (:class:`Restartable`).

    ``messages`` every accepted message, ``arrived`` when; :meth:`keys` their
    ``X-Arbstream-Alert-Key`` headers (one per alert, several for a digest).
    """

    name = "smtp"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or stack.free_port()
        self.messages: list[EmailMessage] = []
        #: when each of ``messages`` was accepted (monotonic s)
        self.arrived: list[float] = []
        self._lock = threading.Lock()
        self._controller: Any = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.original_content or envelope.content,
                                       policy=email.policy.default)
        with self._lock:
            self.messages.append(msg)
            self.arrived.append(time.monotonic())
        return "250 Message accepted for delivery"

    def keys(self) -> list[str]:
        """The alert keys of every accepted message, in arrival order."""
        with self._lock:
            return [str(k).strip() for m in self.messages
                    for k in m.get_all("X-Arbstream-Alert-Key", [])]

    def keys_between(self, start: float, end: float) -> set[str]:
        """Alert keys of the messages accepted in ``[start, end]`` (monotonic s)."""
        with self._lock:
            return {str(k).strip() for m, t in zip(self.messages, self.arrived, strict=True)
                    if start <= t <= end for k in m.get_all("X-Arbstream-Alert-Key", [])}

    def start(self, timeout: float = 60.0) -> None:
        """Listen on :attr:`port` (retrying while the port is still taken, up to
        ``timeout`` s).

        Raises:
            FaultError: the port stays taken.
        """
        from aiosmtpd.controller import Controller

        deadline = time.monotonic() + timeout
        while True:
            controller = Controller(self, hostname="127.0.0.1", port=self.port)
            try:
                controller.start()
                break
            except (OSError, RuntimeError) as exc:
                if time.monotonic() > deadline:
                    raise FaultError(f"SMTP port {self.port} still taken: {exc}") from exc
                time.sleep(0.2)
        self._controller = controller

    def stop(self, kill: bool = False) -> None:
        """Close the listener and every open session (``kill`` has the same effect)."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- figures ---------------------------------------------------------------------------------

@dataclass
class Figures:
    """What a scenario's sink received against what it should have: ``records`` expected,
    ``delivered`` received (with repeats), ``lost`` expected but never received,
    ``duplicated`` received more than once (extra copies), ``unexpected`` received but not
    expected, ``recovery_seconds`` the time to recover (:meth:`Outage.recovered`)."""

    scenario: str
    records: int
    delivered: int
    lost: int
    duplicated: int
    unexpected: int
    recovery_seconds: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, scenario: str, expected: Collection[str], received: Iterable[str],
           recovery_seconds: float | None = None, **extra: Any) -> Figures:
        """Compare the ``received`` keys (in any order, repeats counted) with ``expected``."""
        counts = Counter(received)
        want = set(expected)
        return cls(scenario, len(want), sum(counts.values()), len(want - set(counts)),
                   sum(n - 1 for n in counts.values()), len(set(counts) - want),
                   recovery_seconds, dict(extra))

    def line(self) -> str:
        """One line: ``scenario: records N, delivered N, lost N, duplicated N, ...``."""
        rec = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.2f}"
        more = "".join(f", {k} {v}" for k, v in self.extra.items())
        return (f"{self.scenario}: records {self.records}, delivered {self.delivered}, "
                f"lost {self.lost}, duplicated {self.duplicated}, unexpected "
                f"{self.unexpected}, recovery {rec} s{more}")

    def report(self) -> Figures:
        """:func:`note` :meth:`line` and return self."""
        note("FIGURES " + self.line())
        return self
