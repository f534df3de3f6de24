"""Self-healing for the stream job: failed queries restarted from their checkpoints.

In ``local[N]`` mode Spark never retries a task, so one failed write (InfluxDB restarting,
MongoDB unreachable past its server-selection timeout, the broker not answering the source's
end-offset probe) fails its whole query, and without a supervisor the job ends.
:func:`supervise` runs each query in a thread of its own and, when one fails on an error a
restart can fix, restarts *that* query from its checkpoint after a backoff while the others
keep running. The checkpoint makes the restart exact: the micro-batch that failed is planned
again with the same offsets (Spark wrote them to ``offsets/`` before running it), and the
sinks are idempotent (InfluxDB points and MongoDB upserts keyed by id), so nothing is lost and
nothing is stored twice. Events the failed batch already published to ``arb.opportunities``
are published again (at-least-once; consumers dedupe by id, as the alert worker does).

Restarts are bounded: at most ``ARB_STREAM_MAX_RESTARTS`` within
``ARB_STREAM_RESTART_WINDOW_SECONDS`` (over all queries), waiting
``ARB_STREAM_RESTART_BACKOFF_SECONDS`` × 2^(n−1) (n = consecutive failures of that query,
reset after a run longer than the longest backoff) up to
``ARB_STREAM_RESTART_BACKOFF_MAX_SECONDS``. Errors a restart cannot fix stop the job at once:
data loss (:class:`spark_jobs.kafka_source.KafkaDataLossError`, e.g. a recreated topic) and a
checkpoint whose state Spark refuses (:func:`spark_jobs.checkpoint.is_state_incompatibility`).
Every restart is logged and reported to ``on_restart`` (the job counts it in InfluxDB).
The retry loop is tenacity's.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception

from spark_jobs.checkpoint import is_state_incompatibility

log = logging.getLogger(__name__)

#: Texts of failures that no restart can fix (besides Spark's state-schema errors).
FATAL_MARKERS = ("KafkaDataLossError",)


class QueryFailedError(RuntimeError):
    """A query failed for good: a fatal error, or more restarts than the budget allows.

    ``query`` is its name, ``cause`` the last failure, ``restarts`` how many restarts the
    job made in all before giving up.
    """

    def __init__(self, message: str, query: str, cause: BaseException, restarts: int) -> None:
        super().__init__(message)
        self.query = query
        self.cause = cause
        self.restarts = restarts


@dataclass(frozen=True)
class RestartPolicy:
    """How often and how fast failed queries are restarted (seconds)."""

    max_restarts: int = 10
    window_s: float = 900.0
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0

    @classmethod
    def of(cls, settings: Any) -> RestartPolicy:
        """The policy of ``ARB_STREAM_*RESTART*`` settings."""
        return cls(settings.stream_max_restarts, settings.stream_restart_window_seconds,
                   settings.stream_restart_backoff_seconds,
                   settings.stream_restart_backoff_max_seconds)

    def wait(self, consecutive: int) -> float:
        """Seconds before restart number ``consecutive`` (1-based) of one query."""
        return min(self.backoff_s * 2 ** (consecutive - 1), self.backoff_max_s)


def is_fatal(exc: BaseException) -> bool:
    """Whether a restart cannot fix ``exc``: data loss or an incompatible checkpoint."""
    text = str(exc)
    return any(m in text for m in FATAL_MARKERS) or is_state_incompatibility(exc)


def first_line(exc: BaseException, limit: int = 800) -> str:
    """The line of ``exc``'s message that says what went wrong: the one naming a
    :data:`FATAL_MARKERS` error when there is one (Spark wraps it in its own lines), else the
    first non-empty line (its type name when there is none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # a Python error inside Spark: the last "SomeError: message" of the embedded traceback,
    # preferably one no restart can fix
    raised = [line for line in lines if _RAISED.match(line) and not line.startswith(_WRAPPERS)]
    for line in reversed(raised):
        for marker in FATAL_MARKERS:
            if marker in line:
                return line[line.index(marker):][:limit]
    return (raised[-1] if raised else lines[0] if lines else type(exc).__name__)[:limit]


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit): \S")
#: Spark's and py4j's own wrapper exceptions, which name no cause.
_WRAPPERS = ("pyspark.", "py4j.", "org.apache.spark.", "java.", "StreamingQueryException")


class _Budget:
    """Restart times over all queries; at most ``policy.max_restarts`` per window."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float]) -> None:
        self.policy, self.clock = policy, clock
        self.times: deque[float] = deque()
        self.total = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = self.clock()
            while self.times and now - self.times[0] > self.policy.window_s:
                self.times.popleft()
            if len(self.times) >= self.policy.max_restarts:
                return False
            self.times.append(now)
            self.total += 1
            return True


OnRestart = Callable[[str, int, str], None]


def supervise(
    starters: dict[str, Callable[[], Any]],
    policy: RestartPolicy,
    on_restart: OnRestart | None = None,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run the queries ``starters`` start (name → a function starting that query and returning
    its ``StreamingQuery``) until ``stop`` is set or one fails for good.

    Each query runs in its own thread: a failure a restart can fix is logged, reported as
    ``on_restart(query name, restart number of that query, first line of the error)``, and
    the query is started again after :meth:`RestartPolicy.wait`. Setting ``stop`` stops every
    query (their checkpoints are consistent) and returns.

    Raises:
        QueryFailedError: a fatal failure (:func:`is_fatal`), or a failure beyond the restart
            budget; every other query has been stopped.
    """
    stop = stop or threading.Event()
    budget = _Budget(policy, clock)
    active: dict[str, Any] = {}
    failures: list[QueryFailedError] = []

    def give_up(name: str, exc: BaseException, why: str) -> None:
        failures.append(QueryFailedError(
            f"query {name!r} failed{why}: {first_line(exc)}", name, exc, budget.total))
        stop.set()

    def run(name: str) -> None:
        started = clock()
        consecutive = 0

        def retryable(exc: BaseException) -> bool:
            return not stop.is_set() and not is_fatal(exc)

        def out_of_budget(state: RetryCallState) -> bool:
            return not budget.take()

        def wait(state: RetryCallState) -> float:
            nonlocal consecutive
            if clock() - started > 2 * policy.backoff_max_s:
                consecutive = 0  # it ran well for a while: start the backoff again
            consecutive += 1
            return policy.wait(consecutive)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reason = first_line(exc) if exc else "unknown"
            log.warning("query %s failed (%s); restart %d from its checkpoint in %.1f s",
                        name, reason, consecutive, state.upcoming_sleep)
            if on_restart is not None:
                try:
                    on_restart(name, consecutive, reason)
                except Exception:  # reporting must not stop the healing
                    log.exception("could not record the restart of query %s", name)

        retrying = Retrying(
            retry=retry_if_exception(retryable), stop=out_of_budget, wait=wait,
            sleep=stop.wait, before_sleep=before_sleep, reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if stop.is_set():
                        return
                    started = clock()
                    query = active[name] = starters[name]()
                    query.awaitTermination()  # raises StreamingQueryException on failure
        except Exception as exc:
            if stop.is_set() and not is_fatal(exc):
                return  # failed while everything was being stopped
            give_up(name, exc, " with an error a restart cannot fix" if is_fatal(exc) else
                    f" more than {policy.max_restarts} times in {policy.window_s:.0f} s")

    threads = [threading.Thread(target=run, args=(n,), name=f"supervise-{n}", daemon=True)
               for n in starters]
    for thread in threads:
        thread.start()
    try:
        while any(t.is_alive() for t in threads) and not stop.wait(0.5):
            pass
    finally:
        stop.set()
        for query in list(active.values()):
            try:
                if query.isActive:
                    query.stop()
            except Exception:  # a query failing as it stops: its failure is reported below
                log.debug("stopping %s", query, exc_info=True)
        for thread in threads:
            thread.join(60)
    if failures:
        raise failures[0]
