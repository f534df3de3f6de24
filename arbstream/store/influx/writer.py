"""Writes to InfluxDB: batches, retries, refused points, and one writer per measurement.

Called on executors from ``foreachBatch`` (through ``DataFrame.foreachPartition`` or the
stream's records writer) with rows converted to plain dicts; nothing connects at import time.
Each ``write_*`` writes its measurement's lines (:data:`~arbstream.store.influx.lines.LINES`)
into its retention policy (:data:`~arbstream.store.influx.schema.MEASUREMENT_RP`).

Refused points: when InfluxDB answers a write with a 4xx that concerns its points (unparseable
line protocol, a timestamp outside its range of 1677-09-21..2262-04-11 UTC, a field type
conflict, a too-large body), :class:`InfluxWriter` bisects the batch down to the refused lines,
stores the rest and records each refused line with its reason in
:attr:`InfluxWriter.rejected` instead of failing the whole write; :func:`write_lines_with_rejects`
hands them back so a caller can dead-letter them. Auth errors (401/403), a missing database
(404) and 5xx/connection errors still raise.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

from influxdb_client import WritePrecision

from arbstream.store.config import InfluxConfig
from arbstream.store.influx.client import (
    InfluxError,
    InfluxUnavailableError,
    RetryableError,
    auth_headers,
    http,
    retrying,
    url,
)
from arbstream.store.influx.lines import LINES
from arbstream.store.influx.schema import (
    EPISODE,
    FEATURES,
    HEALTH,
    MEASUREMENT_RP,
    ML_SCORE,
    PERCENTILES,
    QUOTE,
    SPREAD,
    TRADE,
)

BATCH_LINES = 5000
#: Timestamp unit of written line protocol: ms for every measurement but ``trade`` (ns).
Precision = Literal["ms", "ns"]
log = logging.getLogger(__name__)

_BEYOND_RETENTION = re.compile(r"^partial write: points beyond retention policy dropped=(\d+)$")
#: Most characters of a refused line's reason kept in :attr:`InfluxWriter.rejected`.
REJECT_REASON_CHARS = 500
#: 4xx statuses that are about the request, not its points: raised, never bisected.
_REQUEST_STATUSES = frozenset({401, 403, 404})
#: 400 bodies about the request, not its points (InfluxDB 1.x): raised, never bisected.
_REQUEST_ERRORS = re.compile(r"^(database is required|invalid precision)")


class InfluxWriter:
    """Writes line protocol to ``conf.db`` in batches, precision milliseconds.

    Args:
        conf: ``api``, ``url``, ``db`` (v1 database or v2 bucket), ``username``/``password``
            (v1 basic auth), ``org`` and ``token`` (v2).
        batch_lines: lines per HTTP request.
        retries: extra attempts after a 5xx or connection error, with exponential backoff
            starting at ``backoff`` seconds.
        timeout: seconds per HTTP request.

    Use as a context manager (or call :meth:`close`) to release the v2 client.
    :attr:`dropped` counts the points InfluxDB dropped as older than their retention policy;
    :attr:`rejected` lists ``(line, reason)`` for every line InfluxDB refused (see
    :meth:`write_lines`), across calls, oldest first.
    """

    def __init__(
        self,
        conf: InfluxConfig,
        *,
        batch_lines: int = BATCH_LINES,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 10.0,
    ) -> None:
        self.conf = conf
        self.batch_lines = batch_lines
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._v2_client: Any = None
        self._v2_write: Any = None
        self.dropped = 0
        self.rejected: list[tuple[str, str]] = []

    def __enter__(self) -> InfluxWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the v2 client if one was opened (no-op for v1)."""
        if self._v2_client is not None:
            self._v2_client.close()
            self._v2_client = self._v2_write = None

    def write_lines(
        self, lines: Iterable[str], *, rp: str | None = None, precision: Precision = "ms"
    ) -> int:
        """Write line protocol, ``batch_lines`` per request; empty lines are skipped.

        A batch InfluxDB refuses with a 4xx about its points (unparseable line, timestamp
        outside InfluxDB's range, field type conflict, body too large...) is split in halves
        and each half sent again, recursively, until the refused lines are alone: the other
        lines are stored, and each refused line is appended to :attr:`rejected` as
        ``(line, "HTTP <status>: <InfluxDB's error>")``, the reason cut to
        :data:`REJECT_REASON_CHARS` characters, and logged. That costs about
        ``2 * log2(batch_lines)`` extra requests per refused line. Lines of a 1.x "partial
        write" that were stored are sent again, which is harmless: rewriting a point replaces
        it with itself.

        Args:
            lines: line protocol, one point each, timestamps in ``precision`` units.
            rp: v1 retention policy to write into (``None``: the database's default); ignored
                by v2, where retention is a property of the bucket.
            precision: unit of the timestamps, ``"ms"`` or ``"ns"``.

        Returns:
            Number of lines stored: those sent minus the refused ones and any InfluxDB
            dropped as older than the retention policy (added to :attr:`dropped` and logged,
            not raised). Caveat of InfluxDB 1.x: when a batch has points beyond retention,
            its answer reports only those, so an unparseable line in that same batch is
            neither stored nor reported (counted as stored).

        Raises:
            InfluxError: HTTP 401/403 (authentication or authorization), 404 (unknown
                database or bucket), a v1 "retention policy not found"; never retried.
            InfluxUnavailableError: 5xx or connection errors after every retry.
        """
        send = self._send_v2 if self.conf.api == "v2" else self._send_v1
        total = 0
        for batch in _batches(lines, self.batch_lines):
            refused = len(self.rejected)
            total += self._write_batch(batch, send, rp, precision)
            if len(self.rejected) > refused:
                line, reason = self.rejected[refused]
                log.warning(
                    "InfluxDB refused %d of %d lines (rp %s); first: %.200s -- %s",
                    len(self.rejected) - refused, len(batch), rp or "(default)", line, reason,
                )
        return total

    def _write_batch(
        self,
        batch: list[str],
        send: Callable[[bytes, str | None, Precision], int],
        rp: str | None,
        precision: Precision,
    ) -> int:
        """Send ``batch`` (retrying 5xx), bisecting on a point-level 4xx; returns lines stored.

        Raises:
            InfluxError: a 4xx about the request (see :func:`_refuses_points`).
            InfluxUnavailableError: as :func:`_retrying`.
        """
        body = "\n".join(batch).encode("utf-8")
        try:
            dropped = retrying(
                lambda: send(body, rp, precision), self.retries, self.backoff, "InfluxDB write"
            )
        except InfluxUnavailableError:
            raise
        except InfluxError as exc:
            if not _refuses_points(exc):
                raise
            if len(batch) == 1:
                reason = f"HTTP {exc.status}: {exc.body}"[:REJECT_REASON_CHARS]
                self.rejected.append((batch[0], reason))
                return 0
            half = len(batch) // 2
            return (self._write_batch(batch[:half], send, rp, precision)
                    + self._write_batch(batch[half:], send, rp, precision))
        if dropped:
            self.dropped += dropped
            log.warning(
                "InfluxDB dropped %d of %d points older than retention policy %s",
                dropped, len(batch), rp or "(default)",
            )
        return len(batch) - dropped

    def _send_v1(self, body: bytes, rp: str | None, precision: Precision) -> int:
        """POST ``/write``; returns how many points were dropped as beyond retention.

        Raises:
            InfluxError: any other 4xx (status and InfluxDB's message in ``status``/``body``;
                a 400 "partial write" means the other points were stored), or a 500
                "retention policy not found".
            RetryableError: other 5xx and connection errors.
        """
        params = {"db": self.conf.db, "precision": precision}
        if rp:
            params["rp"] = rp
        target = url(self.conf, "/write", **params)
        headers = {"Content-Type": "text/plain; charset=utf-8", **auth_headers(self.conf)}
        hint = "(create it with arbstream.store.influx.schema.ensure_database)"
        try:
            http(target, data=body, headers=headers, timeout=self.timeout)
        except InfluxError as exc:
            beyond = _BEYOND_RETENTION.match(exc.body) if exc.status == 400 else None
            if beyond:
                return int(beyond[1])
            if exc.status == 404 and "database not found" in exc.body:
                raise InfluxError(f"{exc} {hint}", exc.status, exc.body) from None
            raise
        except RetryableError as exc:
            if exc.body.startswith("retention policy not found"):  # 1.x answers 500
                raise InfluxError(
                    f"InfluxDB rejected the write: {exc.body} {hint}", exc.status, exc.body
                ) from None
            raise
        return 0

    def _send_v2(self, body: bytes, rp: str | None, precision: Precision) -> int:
        """Write to the bucket ``conf.db`` (``rp`` is ignored); returns 0 (nothing dropped)."""
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        if self._v2_write is None:
            from influxdb_client import InfluxDBClient
            from influxdb_client.client.write_api import SYNCHRONOUS

            token = self.conf.token
            self._v2_client = InfluxDBClient(
                url=self.conf.url,
                token=token.get_secret_value() if token else None,
                org=self.conf.org,
                timeout=int(self.timeout * 1000),
                retries=False,
            )
            self._v2_write = self._v2_client.write_api(write_options=SYNCHRONOUS)
        try:
            self._v2_write.write(
                bucket=self.conf.db,
                org=self.conf.org,
                record=body,
                write_precision=WritePrecision.NS if precision == "ns" else WritePrecision.MS,
            )
        except ApiException as exc:
            status = exc.status or 0
            text = (
                exc.body.decode("utf-8", "replace")
                if isinstance(exc.body, bytes)
                else str(exc.body or exc.reason)
            )
            if 400 <= status < 500:
                raise InfluxError(
                    f"InfluxDB rejected the write with HTTP {status}: {text}", status, text
                ) from None
            raise RetryableError(f"HTTP {status}: {text}", status, text) from None
        except (Urllib3Error, OSError) as exc:
            raise RetryableError(f"cannot reach {self.conf.url}: {exc}") from None
        return 0


def _refuses_points(exc: InfluxError) -> bool:
    """Whether a write error is InfluxDB refusing some of the points (a 4xx other than
    401/403/404 and request-level 400s), which bisecting the batch can isolate."""
    if exc.status is None or not 400 <= exc.status < 500:
        return False
    if exc.status in _REQUEST_STATUSES:
        return False
    return not _REQUEST_ERRORS.match(exc.body)


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        if not item:
            continue
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch




def write_lines_with_rejects(
    conf: InfluxConfig, measurement: str, lines: Iterable[str], precision: Precision = "ms"
) -> tuple[int, list[tuple[str, str]]]:
    """Write line protocol of ``measurement`` into its retention policy
    (:data:`MEASUREMENT_RP`, default RP when not listed), keeping the lines InfluxDB refuses.

    Args:
        conf: the InfluxDB connection (see :class:`InfluxWriter`).
        measurement: measurement of every line; picks the retention policy.
        lines: line protocol, timestamps in ``precision`` units; empty lines are skipped.
        precision: ``"ms"`` or ``"ns"``.

    Returns:
        ``(stored, rejected)``: the number of points stored, and ``(line, reason)`` for each
        line InfluxDB refused (reason: ``"HTTP <status>: <InfluxDB's error>"``, at most
        :data:`REJECT_REASON_CHARS` characters), e.g. to publish as dead letters.

    Raises:
        InfluxError, InfluxUnavailableError: as :meth:`InfluxWriter.write_lines`.
    """
    with InfluxWriter(conf) as writer:
        stored = writer.write_lines(lines, rp=MEASUREMENT_RP.get(measurement),
                                    precision=precision)
        return stored, writer.rejected


def _write(conf: InfluxConfig, measurement: str, lines: Iterable[str],
           precision: Precision = "ms") -> int:
    """Write ``lines`` into the retention policy of ``measurement`` (:data:`MEASUREMENT_RP`);
    refused lines are logged and left out (see :func:`write_lines_with_rejects`).

    Returns:
        Number of points stored.
    """
    return write_lines_with_rejects(conf, measurement, lines, precision)[0]



def _write_rows(conf: InfluxConfig, measurement: str, rows: Iterable[Mapping[str, Any]],
                precision: Precision = "ms") -> int:
    """:func:`_write` the :data:`~arbstream.store.influx.lines.LINES` of ``measurement`` of
    every row."""
    line = LINES[measurement]
    return _write(conf, measurement, (line(row) for row in rows), precision)


def write_quotes(conf: InfluxConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write quote rows (see :func:`~arbstream.store.influx.lines.quote_point`) as ``quote``
    points in RP ``raw``.

    Returns:
        Number of points stored. Raises as :meth:`InfluxWriter.write_lines`.
    """
    return _write_rows(conf, QUOTE, rows)


def write_trades(conf: InfluxConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write trade rows (see :func:`~arbstream.store.influx.lines.trade_point`) as ``trade``
    points in RP ``raw`` (nanosecond precision).

    Returns:
        Number of points stored. Raises KeyError as ``trade_point``, otherwise as
        :meth:`InfluxWriter.write_lines`.
    """
    return _write_rows(conf, TRADE, rows, precision="ns")


def write_health(conf: InfluxConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write producer health rows (see :func:`~arbstream.store.influx.lines.health_point`)
    as ``health`` points.

    Returns:
        Number of points stored. Raises as :meth:`InfluxWriter.write_lines`.
    """
    return _write_rows(conf, HEALTH, rows)


def write_spreads(conf: InfluxConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write spread/opportunity rows (see :func:`~arbstream.store.influx.lines.spread_point`)
    as ``spread`` points.

    Returns:
        Number of points written. Raises as :meth:`InfluxWriter.write_lines`.
    """
    return _write_rows(conf, SPREAD, rows)


def write_episodes(conf: InfluxConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write the closed episodes among episode event rows (``event == "closed"``; "opened"
    rows are skipped) as ``episode`` points (see
    :func:`~arbstream.store.influx.lines.episode_point`), time = ``start``.

    Returns:
        Number of points written. Raises as ``episode_point`` and
        :meth:`InfluxWriter.write_lines`.
    """
    return _write_rows(conf, EPISODE, (row for row in rows if row.get("event") == "closed"))


def write_features(conf: InfluxConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write per-exchange feature rows (see :func:`~arbstream.store.influx.lines.
    feature_point`) as ``features`` points in RP ``features``; a row without any
    non-``None`` field writes nothing.

    Returns:
        Number of points stored. Raises as ``feature_point`` and
        :meth:`InfluxWriter.write_lines`.
    """
    return _write_rows(conf, FEATURES, rows)


def write_percentiles(conf: InfluxConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write hourly spread-percentile rows (see :func:`~arbstream.store.influx.lines.
    percentile_point`) as ``spread_percentiles`` points, time = ``hour_start``.

    Returns:
        Number of points written. Raises as ``percentile_point`` and
        :meth:`InfluxWriter.write_lines`.
    """
    return _write_rows(conf, PERCENTILES, rows)


def write_ml_scores(conf: InfluxConfig, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write scored opportunity windows (see :func:`~arbstream.store.influx.lines.
    ml_score_point`) as ``ml_score`` points, time = ``window_end``.

    Returns:
        Number of points stored. Raises as ``ml_score_point`` and
        :meth:`InfluxWriter.write_lines`.
    """
    return _write_rows(conf, ML_SCORE, rows)
