"""The stream job's streaming-query progress, published to InfluxDB for ``arbstream status
--live`` (a separate process): a :class:`~pyspark.sql.streaming.StreamingQueryListener`.

:func:`attach` registers a :class:`ProgressListener` on the job's session; it writes
``query_progress`` points (:func:`arbstream.store.influx.lines.query_progress_point`, default
retention policy), tagged ``query`` (name) and ``event``. Engine callbacks (Spark calls them
on the driver, through py4j, from its listener bus thread):

* ``onQueryStarted``: remembers the query's name by id (the idle and termination events
  carry only the id); writes nothing.
* ``onQueryProgress``: one ``progress`` point per completed micro-batch, from the progress
  JSON (:func:`progress_row`): rows/s in and processed, input rows, batch id, batch duration
  (``durationMs.triggerExecution``, ms), event-time lag (:func:`event_time_lag_s`, s) and
  consumer lag (:func:`consumer_lag`, records). Time = the batch's start.
* ``onQueryIdle``: one ``idle`` point (the query has no new data; Spark sends it instead of
  empty progress, every ``spark.sql.streaming.noDataProgressEventInterval``).
* ``onQueryTerminated``: one ``terminated`` point, ``failed`` 1 and ``exception`` (its first
  line, secrets replaced by ``***``: :func:`exception_summary`) when the query failed,
  ``failed`` 0 when it was stopped. Time = the wall clock.

Costs and failures: a callback only builds a row and queues it; one daemon thread writes
whatever is queued in one HTTP request (several queries reporting together share it), with a
short timeout and no retry (the next progress comes soon). Nothing is raised into Spark's
listener bus: a failed write, a refused line or a full queue (:data:`QUEUE_POINTS`) is
counted in :attr:`ProgressListener.failed` / :attr:`ProgressListener.dropped` and logged,
at most once per :data:`LOG_INTERVAL_S` seconds with the count suppressed since.

:func:`record_restart` writes one ``query_restarts`` point per restart of a failed query
(for the job's restart loop).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pyspark.sql.streaming.listener import (
    QueryIdleEvent,
    QueryProgressEvent,
    QueryStartedEvent,
    QueryTerminatedEvent,
    StreamingQueryListener,
)

from arbstream.config import Settings
from arbstream.redact import first_line, redact, secret_values
from arbstream.store.config import InfluxConfig
from arbstream.store.influx.lines import LINES
from arbstream.store.influx.schema import MEASUREMENT_RP, QUERY_PROGRESS, QUERY_RESTARTS
from arbstream.store.influx.writer import InfluxWriter
from arbstream.timestamps import parse_time, to_ms

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: Most points waiting for the writer thread; more are dropped (counted and logged).
QUEUE_POINTS = 10_000
#: Seconds between two log records of the same kind of failure.
LOG_INTERVAL_S = 60.0
#: Seconds per InfluxDB write of the listener (no retry).
WRITE_TIMEOUT_S = 2.0


def _ms(iso: str) -> int:
    """UTC ms of an ISO-8601 timestamp of Spark's progress (``...T05:46:27.123Z``)."""
    return to_ms(parse_time(iso.replace("Z", "+00:00")))


def _offsets(value: Any) -> dict[str, dict[str, int]] | None:
    """Kafka-shaped offsets ``{"topic": {"partition": offset}}`` from a progress source's
    ``endOffset``/``latestOffset`` (a dict, or its JSON text); ``None`` for any other shape
    (another source's offsets, ``null``, unparseable text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict) or not value:
        return None
    out: dict[str, dict[str, int]] = {}
    for topic, parts in value.items():
        if not isinstance(parts, dict):
            return None
        out[topic] = {}
        for partition, offset in parts.items():
            if not isinstance(offset, int) or isinstance(offset, bool):
                return None
            out[topic][str(partition)] = offset
    return out


def consumer_lag(progress: Mapping[str, Any]) -> int | None:
    """Records the query has not read yet when its micro-batch was planned: the sum over its
    sources and their partitions of ``latestOffset − endOffset`` (each at least 0).

    Only sources that report both offsets in the Kafka shape ``{"topic": {"partition":
    offset}}`` (dicts or JSON text) count, and only the partitions present in both. Spark
    reports ``latestOffset`` for the built-in Kafka source, and for a Python data source that
    implements ``reportLatestOffset``.

    Returns:
        The lag in records, or ``None`` when no source reports both offsets.
    """
    total: int | None = None
    for source in progress.get("sources") or ():
        end, latest = _offsets(source.get("endOffset")), _offsets(source.get("latestOffset"))
        if end is None or latest is None:
            continue
        total = (total or 0) + sum(
            max(0, latest[topic][p] - offset)
            for topic, parts in end.items() if topic in latest
            for p, offset in parts.items() if p in latest[topic]
        )
    return total


def event_time_lag_s(progress: Mapping[str, Any]) -> float | None:
    """How far the query's event-time watermark is behind the start of the micro-batch:
    ``timestamp − eventTime.watermark``, in seconds (negative when the watermark is ahead of
    the wall clock). ``None`` without a watermark, and while it is still the epoch (Spark's
    value before the first event). A replay of recorded data lags by the recording's age."""
    watermark = (progress.get("eventTime") or {}).get("watermark")
    if not watermark:
        return None
    mark = _ms(watermark)
    if mark <= 0:
        return None
    return (_ms(progress["timestamp"]) - mark) / 1000


def exception_summary(text: str, secrets: list[str] | None = None, limit: int = 500) -> str:
    """One line about a query's failure, secrets replaced by ``***``
    (:func:`arbstream.redact.redact`): the exception's first line and, when that line ends
    where a Python traceback starts (an error of a ``foreachBatch`` function reaches Spark as
    ``...Return Message: Traceback (most recent call last):``), the traceback's exception line
    after `` ... ``. At most ``limit`` characters; ``""`` for blank text."""
    lines = [line.rstrip() for line in redact(text, secrets or []).splitlines() if line.strip()]
    if not lines:
        return ""
    head = lines[0].strip()
    if head.endswith("Traceback (most recent call last):"):
        cause = next((line for line in lines[1:]
                      if not line[0].isspace() and not line.startswith("Traceback")), None)
        if cause:
            head = f"{head} ... {cause.strip()}"
    return head[:limit]


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def progress_row(progress: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """The ``progress`` row (:func:`~arbstream.store.influx.lines.query_progress_point`) of a
    query's progress as a dict (``json.loads(progress.json)``, or ``StreamingQuery.
    lastProgress``): ``query`` (``name``, else the progress's name, else its id), ``ts``
    (batch start, UTC ms), ``input_rows_per_s``, ``processed_rows_per_s`` (rows/s),
    ``num_input_rows``, ``batch_id``, ``batch_duration_ms`` (``durationMs.triggerExecution``,
    ms), ``event_time_lag_s`` (s, :func:`event_time_lag_s`) and ``consumer_lag_records``
    (:func:`consumer_lag`); ``None`` where the progress does not say.

    Raises:
        KeyError: the progress has no ``timestamp``.
        ValueError: its timestamp is not ISO-8601.
    """
    return {
        "query": name or progress.get("name") or str(progress.get("id")),
        "event": "progress",
        "ts": _ms(progress["timestamp"]),
        "input_rows_per_s": _finite(progress.get("inputRowsPerSecond")),
        "processed_rows_per_s": _finite(progress.get("processedRowsPerSecond")),
        "num_input_rows": _finite(progress.get("numInputRows")),
        "batch_id": _finite(progress.get("batchId")),
        "batch_duration_ms": _finite((progress.get("durationMs") or {}).get("triggerExecution")),
        "event_time_lag_s": event_time_lag_s(progress),
        "consumer_lag_records": consumer_lag(progress),
    }


class _Limited:
    """Logs a kind of failure at most once per ``interval`` seconds, with the number of
    occurrences not logged since."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -math.inf
        self._quiet = 0
        self._lock = threading.Lock()

    def error(self, message: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval:
                self._quiet += 1
                return
            quiet, self._quiet, self._last = self._quiet, 0, now
        suffix = f" ({quiet} similar failures not logged in the last {self.interval:.0f}s)"
        log.error(message + (suffix if quiet else ""), *args)


class ProgressListener(StreamingQueryListener):
    """Writes every streaming query's progress, idle and termination events to InfluxDB
    ``query_progress`` (see the module docstring).

    Args:
        conf: the InfluxDB to write to (its database must exist; the stream job creates it).
        secrets: texts to replace by ``***`` in exception messages (:func:`attach` passes
            every secret of the settings).
        timeout: seconds per HTTP write (no retry).

    Counters (points): :attr:`written`, :attr:`failed` (InfluxDB refused them or was
    unreachable), :attr:`dropped` (queue full). Call :meth:`close` to stop the writer thread
    after removing the listener.
    """

    def __init__(self, conf: InfluxConfig, secrets: list[str] | None = None,
                 timeout: float = WRITE_TIMEOUT_S) -> None:
        self.conf = conf
        self.secrets = list(secrets or [])
        self.timeout = timeout
        self.written = self.failed = self.dropped = 0
        self._names: dict[str, str] = {}
        self._queue: queue.Queue[str | None] = queue.Queue(QUEUE_POINTS)
        self._pending = 0
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._limit = {k: _Limited(LOG_INTERVAL_S) for k in ("write", "drop", "event")}

    # --- engine callbacks (never raise) ---------------------------------------------------
    def onQueryStarted(self, event: QueryStartedEvent) -> None:
        """Remember the query's name under its id (nothing is written)."""
        self._guard(lambda: self._names.__setitem__(str(event.id), event.name or ""))

    def onQueryProgress(self, event: QueryProgressEvent) -> None:
        """Queue one ``progress`` point of the completed micro-batch (:func:`progress_row`)."""
        self._guard(lambda: self._put(progress_row(json.loads(event.progress.json))))

    def onQueryIdle(self, event: QueryIdleEvent) -> None:
        """Queue one ``idle`` point at the event's time."""
        self._guard(lambda: self._put({"query": self._name(event.id), "event": "idle",
                                       "ts": _ms(event.timestamp)}))

    def onQueryTerminated(self, event: QueryTerminatedEvent) -> None:
        """Queue one ``terminated`` point at the wall clock: ``failed`` 1 and the exception's
        first line (secrets masked) when the query failed, ``failed`` 0 when stopped."""
        def row() -> dict[str, Any]:
            failed = event.exception is not None
            return {"query": self._name(event.id), "event": "terminated",
                    "ts": to_ms(datetime.now(UTC)), "failed": 1 if failed else 0,
                    "exception": exception_summary(event.exception, self.secrets)
                    if failed else None}

        self._guard(lambda: self._put(row()))

    # --- queue and writer thread ----------------------------------------------------------
    def _name(self, query_id: Any) -> str:
        return self._names.get(str(query_id)) or str(query_id)

    def _guard(self, action: Any) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - never raise into Spark's listener bus
            self._limit["event"].error("query progress event not recorded: %s",
                                       first_line(repr(exc), self.secrets))

    def _put(self, row: Mapping[str, Any]) -> None:
        line = LINES[QUERY_PROGRESS](row)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="query-progress-writer",
                                            daemon=True)
            self._thread.start()
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self._done(1)
            self.dropped += 1
            self._limit["drop"].error("query progress point dropped: %d points already "
                                      "wait for InfluxDB (%d dropped so far)", QUEUE_POINTS,
                                      self.dropped)

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            self._idle.notify_all()

    def _run(self) -> None:
        writer = InfluxWriter(self.conf, retries=0, timeout=self.timeout)
        while True:
            first = self._queue.get()
            if first is None:
                writer.close()
                return
            lines = [first]
            stop = False
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                lines.append(more)
            self._write(writer, lines)
            self._done(len(lines))
            if stop:
                writer.close()
                return

    def _write(self, writer: InfluxWriter, lines: list[str]) -> None:
        try:
            stored = writer.write_lines(lines, rp=MEASUREMENT_RP.get(QUERY_PROGRESS))
        except Exception as exc:  # noqa: BLE001 - logged and counted, the stream goes on
            self.failed += len(lines)
            self._limit["write"].error(
                "could not write %d query progress points to InfluxDB (%d failed so far): %s",
                len(lines), self.failed, first_line(str(exc), self.secrets))
            return
        self.written += stored
        self.failed += len(lines) - stored

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued point was written or failed; ``False`` on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending <= 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the writer thread (call after
        ``spark.streams.removeListener``)."""
        if self._thread is not None:
            self.flush(timeout)
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None


def attach(spark: SparkSession, settings: Settings) -> ProgressListener:
    """Register a :class:`ProgressListener` writing to the InfluxDB of ``settings`` on
    ``spark``'s streaming queries (``spark.streams.addListener``); returns it. Call it once,
    after building the session (before starting queries, so their start is seen)."""
    listener = ProgressListener(InfluxConfig.of(settings), secret_values(settings))
    spark.streams.addListener(listener)
    return listener


def record_restart(settings_or_conf: Settings | InfluxConfig, query_name: str, attempt: int,
                   reason: str | BaseException | None) -> bool:
    """Write one ``query_restarts`` point (:func:`~arbstream.store.influx.lines.
    restart_point`) for a restart of the failed query ``query_name`` at the wall clock.

    Args:
        settings_or_conf: the job's settings (their secrets are masked in ``reason``) or an
            InfluxDB config.
        attempt: the restart's number (1 for the first).
        reason: why it restarted (an exception or text); its first line is stored, secrets
            replaced by ``***``.

    Returns:
        Whether the point was stored. Never raises for InfluxDB: a failure is logged (the
        restart itself must go on).
    """
    if isinstance(settings_or_conf, Settings):
        conf, secrets = InfluxConfig.of(settings_or_conf), secret_values(settings_or_conf)
    else:
        conf, secrets = settings_or_conf, secret_values(settings_or_conf)
    row = {"query": query_name, "attempt": attempt, "ts": to_ms(datetime.now(UTC)),
           "reason": None if reason is None else first_line(str(reason), secrets)}
    try:
        with InfluxWriter(conf, retries=1, backoff=0.5, timeout=5.0) as writer:
            stored = writer.write_lines([LINES[QUERY_RESTARTS](row)],
                                        rp=MEASUREMENT_RP.get(QUERY_RESTARTS))
    except Exception as exc:  # noqa: BLE001 - the restart must not fail on its record
        log.error("could not record restart %d of query %s in InfluxDB: %s", attempt,
                  query_name, first_line(str(exc), secrets))
        return False
    return stored == 1
