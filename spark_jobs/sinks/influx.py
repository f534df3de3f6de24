"""InfluxDB sink: quotes and spreads as line protocol, millisecond precision.

Called on executors from ``foreachBatch`` through ``DataFrame.foreachPartition`` with rows
converted to plain dicts (``row.asDict()``); nothing connects at import time.

Measurements (numbers are always written as floats, so field types never conflict):

* ``quote``  tags ``exchange``, ``symbol``; fields ``bid``, ``ask`` and, when not ``None``,
  ``bid_size``, ``ask_size``; time = ``exchange_ts`` (UTC ms).
* ``spread`` tags ``symbol``, ``buy_exchange``, ``sell_exchange``; fields ``gross_bps``,
  ``net_bps`` (basis points), ``buy_ask``, ``sell_bid`` (quote currency); time =
  ``window_end`` (UTC ms).

Writes are idempotent: InfluxDB keeps one point per (measurement, tag set, timestamp) and a
rewrite replaces its fields, so replaying a micro-batch does not add points. (Two different
quotes of one exchange and symbol with the same ``exchange_ts`` millisecond collapse into the
last one written.)

APIs: ``settings.influx_api == "v1"`` talks InfluxDB 1.x's ``/write`` and ``/query`` with the
standard library (1.x has no ``/api/v2``); ``"v2"`` writes with ``influxdb_client``'s
synchronous write API to ``settings.influx_db`` as the bucket.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from influxdb_client import Point, WritePrecision

from arbstream.config import Settings
from arbstream.schemas import HEALTH_FIELDS

BATCH_LINES = 5000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
T = TypeVar("T")


class InfluxError(RuntimeError):
    """InfluxDB rejected a request (HTTP 4xx, or an error in a query result).

    Not retried: bad line protocol, a missing database or wrong credentials will not fix
    themselves. ``status`` is the HTTP status (``None`` for query-level errors) and ``body``
    InfluxDB's error message.
    """

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class InfluxUnavailableError(InfluxError):
    """InfluxDB kept answering 5xx or could not be reached, after every retry."""


class _Retryable(Exception):
    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


# --- line protocol ---------------------------------------------------------------------------


def to_epoch_ms(value: Any) -> int:
    """Milliseconds since the epoch of an int (already ms) or a datetime (naive means UTC)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return (value - _EPOCH) // dt.timedelta(milliseconds=1)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"expected a datetime or epoch milliseconds, got {type(value).__name__}")


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def quote_point(row: Mapping[str, Any]) -> Point:
    """The ``quote`` point of one quote row (``exchange, symbol, bid, ask, bid_size,
    ask_size, exchange_ts`` in UTC ms).

    Raises:
        KeyError: a required key is missing.
    """
    point = (
        Point("quote")
        .tag("exchange", row["exchange"])
        .tag("symbol", row["symbol"])
        .field("bid", _float(row["bid"]))
        .field("ask", _float(row["ask"]))
        .time(to_epoch_ms(row["exchange_ts"]), WritePrecision.MS)
    )
    for size in ("bid_size", "ask_size"):
        if row.get(size) is not None:
            point.field(size, float(row[size]))
    return point


def spread_point(row: Mapping[str, Any]) -> Point:
    """The ``spread`` point of one spread/opportunity row (``symbol, buy_exchange,
    sell_exchange, gross_bps, net_bps, buy_ask, sell_bid, window_end``).

    Raises:
        KeyError: a required key is missing.
    """
    return (
        Point("spread")
        .tag("symbol", row["symbol"])
        .tag("buy_exchange", row["buy_exchange"])
        .tag("sell_exchange", row["sell_exchange"])
        .field("gross_bps", _float(row["gross_bps"]))
        .field("net_bps", _float(row["net_bps"]))
        .field("buy_ask", _float(row["buy_ask"]))
        .field("sell_bid", _float(row["sell_bid"]))
        .time(to_epoch_ms(row["window_end"]), WritePrecision.MS)
    )


def health_point(row: Mapping[str, Any]) -> Point:
    """The ``health`` point of one producer health row: tag ``exchange``, every numeric
    counter and rate of :data:`arbstream.schemas.HEALTH_FIELDS` that is not null as a float
    field, time = ``ts`` (UTC ms).

    Raises:
        KeyError: ``exchange`` or ``ts`` is missing.
    """
    point = Point("health").tag("exchange", row["exchange"])
    for name in HEALTH_FIELDS:
        if name not in ("schema_version", "type", "exchange", "ts") and row.get(name) is not None:
            point.field(name, float(row[name]))
    return point.time(to_epoch_ms(row["ts"]), WritePrecision.MS)


def quote_line(row: Mapping[str, Any]) -> str:
    """Line protocol (ms precision) of one quote row; ``""`` when it has no finite field."""
    return quote_point(row).to_line_protocol()


def spread_line(row: Mapping[str, Any]) -> str:
    """Line protocol (ms precision) of one spread row; ``""`` when it has no finite field."""
    return spread_point(row).to_line_protocol()


# --- HTTP ------------------------------------------------------------------------------------


def _retrying(call: Callable[[], T], retries: int, backoff: float, what: str) -> T:
    """Run ``call``; on :class:`_Retryable` sleep ``backoff * 2**n`` and retry ``retries``
    times, then raise :class:`InfluxUnavailableError`."""
    for attempt in range(retries + 1):
        try:
            return call()
        except _Retryable as exc:
            if attempt == retries:
                raise InfluxUnavailableError(
                    f"{what} failed after {retries + 1} attempts: {exc}", exc.status, exc.body
                ) from exc
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def _http(
    url: str,
    *,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> bytes:
    """One request: the body on 2xx, :class:`InfluxError` on 4xx, :class:`_Retryable` on
    5xx and connection errors."""
    request = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            body = json.loads(body).get("error", body)
        safe_url = url.split("?")[0]
        if 400 <= exc.code < 500:
            raise InfluxError(
                f"InfluxDB rejected {safe_url} with HTTP {exc.code}: {body}", exc.code, body
            ) from None
        raise _Retryable(f"HTTP {exc.code} from {safe_url}: {body}", exc.code, body) from None
    except (urllib.error.URLError, OSError) as exc:
        raise _Retryable(f"cannot reach {url.split('?')[0]}: {exc}") from None


def _auth_headers(settings: Settings) -> dict[str, str]:
    headers: dict[str, str] = {}
    if settings.influx_api == "v2" and settings.influx_token:
        headers["Authorization"] = f"Token {settings.influx_token.get_secret_value()}"
    elif settings.influx_username:
        password = settings.influx_password.get_secret_value() if settings.influx_password else ""
        raw = f"{settings.influx_username}:{password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    return headers


def _url(settings: Settings, path: str, **params: str) -> str:
    return f"{settings.influx_url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"


class InfluxWriter:
    """Writes line protocol to ``settings.influx_db`` in batches, precision milliseconds.

    Args:
        settings: ``influx_api``, ``influx_url``, ``influx_db`` (v1 database or v2 bucket),
            ``influx_username``/``influx_password`` (v1 basic auth), ``influx_org`` and
            ``influx_token`` (v2).
        batch_lines: lines per HTTP request.
        retries: extra attempts after a 5xx or connection error, with exponential backoff
            starting at ``backoff`` seconds.
        timeout: seconds per HTTP request.

    Use as a context manager (or call :meth:`close`) to release the v2 client.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        batch_lines: int = BATCH_LINES,
        retries: int = 3,
        backoff: float = 0.5,
        timeout: float = 10.0,
    ) -> None:
        self.settings = settings
        self.batch_lines = batch_lines
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._v2_client: Any = None
        self._v2_write: Any = None

    def __enter__(self) -> InfluxWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the v2 client if one was opened (no-op for v1)."""
        if self._v2_client is not None:
            self._v2_client.close()
            self._v2_client = self._v2_write = None

    def write_lines(self, lines: Iterable[str]) -> int:
        """Write line protocol (ms timestamps), ``batch_lines`` per request; empty lines are
        skipped.

        Returns:
            Number of lines written.

        Raises:
            InfluxError: HTTP 4xx with InfluxDB's message (bad line protocol, field type
                conflict, unknown database, auth); never retried. In v1 a 400 "partial
                write" means the valid lines of that batch were stored.
            InfluxUnavailableError: 5xx or connection errors after every retry.
        """
        total = 0
        for batch in _batches(lines, self.batch_lines):
            body = "\n".join(batch).encode("utf-8")
            send = self._send_v2 if self.settings.influx_api == "v2" else self._send_v1
            _retrying(
                lambda body=body, send=send: send(body),
                self.retries,
                self.backoff,
                "InfluxDB write",
            )
            total += len(batch)
        return total

    def _send_v1(self, body: bytes) -> None:
        url = _url(self.settings, "/write", db=self.settings.influx_db, precision="ms")
        headers = {"Content-Type": "text/plain; charset=utf-8", **_auth_headers(self.settings)}
        try:
            _http(url, data=body, headers=headers, timeout=self.timeout)
        except InfluxError as exc:
            if exc.status == 404 and "database not found" in exc.body:
                raise InfluxError(
                    f"{exc} (create it with spark_jobs.sinks.influx.ensure_database)",
                    exc.status,
                    exc.body,
                ) from None
            raise

    def _send_v2(self, body: bytes) -> None:
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        if self._v2_write is None:
            from influxdb_client import InfluxDBClient
            from influxdb_client.client.write_api import SYNCHRONOUS

            token = self.settings.influx_token
            self._v2_client = InfluxDBClient(
                url=self.settings.influx_url,
                token=token.get_secret_value() if token else None,
                org=self.settings.influx_org,
                timeout=int(self.timeout * 1000),
                retries=False,
            )
            self._v2_write = self._v2_client.write_api(write_options=SYNCHRONOUS)
        try:
            self._v2_write.write(
                bucket=self.settings.influx_db,
                org=self.settings.influx_org,
                record=body,
                write_precision=WritePrecision.MS,
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
            raise _Retryable(f"HTTP {status}: {text}", status, text) from None
        except (Urllib3Error, OSError) as exc:
            raise _Retryable(f"cannot reach {self.settings.influx_url}: {exc}") from None


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


# --- convenience for foreachPartition ---------------------------------------------------------


def write_quotes(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write quote rows (see :func:`quote_point`) as ``quote`` points.

    Returns:
        Number of points written. Raises as :meth:`InfluxWriter.write_lines`.
    """
    with InfluxWriter(settings) as writer:
        return writer.write_lines(quote_line(row) for row in rows)


def write_health(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write producer health rows (see :func:`health_point`) as ``health`` points."""
    with InfluxWriter(settings) as writer:
        return writer.write_lines(health_point(row).to_line_protocol() for row in rows)


def write_spreads(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write spread/opportunity rows (see :func:`spread_point`) as ``spread`` points.

    Returns:
        Number of points written. Raises as :meth:`InfluxWriter.write_lines`.
    """
    with InfluxWriter(settings) as writer:
        return writer.write_lines(spread_line(row) for row in rows)


# --- administration and queries ------------------------------------------------------------


def ensure_database(settings: Settings, *, retries: int = 3, backoff: float = 0.5) -> None:
    """Make sure the target database exists.

    v1: ``CREATE DATABASE "<influx_db>"`` (a no-op when it exists; needs admin rights when
    auth is on). v2: does nothing — the bucket ``influx_db`` must already exist in
    ``influx_org`` (create it with ``influx bucket create``); writes to a missing bucket fail
    with :class:`InfluxError` (HTTP 404).

    Raises:
        InfluxError, InfluxUnavailableError: as :func:`query`.
    """
    if settings.influx_api == "v2":
        return
    name = settings.influx_db.replace("\\", "\\\\").replace('"', '\\"')
    _run_query(settings, f'CREATE DATABASE "{name}"', post=True, retries=retries, backoff=backoff)


def query(
    settings: Settings, influxql: str, *, retries: int = 3, backoff: float = 0.5
) -> list[dict[str, Any]]:
    """Run InfluxQL against ``settings.influx_db`` (``GET /query ... epoch=ms``).

    Meant for v1; with v2 it needs the v1-compatibility endpoint and a DBRP mapping.

    Returns:
        One dict per result row, across every statement and series: the row's columns
        (``time`` as int UTC ms) plus the series' ``GROUP BY`` tags.

    Raises:
        InfluxError: HTTP 4xx or an error reported for a statement (e.g. a parse error).
        InfluxUnavailableError: 5xx or connection errors after every retry.
    """
    return _run_query(settings, influxql, post=False, retries=retries, backoff=backoff)


def _run_query(
    settings: Settings, influxql: str, *, post: bool, retries: int, backoff: float
) -> list[dict[str, Any]]:
    params = {"db": settings.influx_db, "epoch": "ms"}
    headers = _auth_headers(settings)
    if post:
        url = _url(settings, "/query", **params)
        data: bytes | None = urllib.parse.urlencode({"q": influxql}).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    else:
        url = _url(settings, "/query", q=influxql, **params)
        data = None
    raw = _retrying(
        lambda: _http(url, data=data, headers=headers), retries, backoff, "InfluxDB query"
    )
    payload = json.loads(raw)
    if "error" in payload:
        raise InfluxError(f"InfluxDB query failed: {payload['error']}", None, payload["error"])
    rows: list[dict[str, Any]] = []
    for result in payload.get("results", []):
        if "error" in result:
            raise InfluxError(f"InfluxDB query failed: {result['error']}", None, result["error"])
        for series in result.get("series", []):
            tags = series.get("tags", {})
            for values in series.get("values", []):
                rows.append({**dict(zip(series["columns"], values, strict=True)), **tags})
    return rows
