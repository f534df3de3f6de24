"""HTTP to InfluxDB: one request, retries with backoff, authentication and errors.

APIs: ``conf.api == "v1"`` talks InfluxDB 1.x's ``/write`` and ``/query`` with the standard
library (1.x has no ``/api/v2``); ``"v2"`` writes with ``influxdb_client``'s synchronous write
API (see :class:`~arbstream.store.influx.writer.InfluxWriter`). A 4xx raises
:class:`InfluxError` at once; 5xx and connection errors are retried, then raise
:class:`InfluxUnavailableError`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from arbstream.store.config import InfluxConfig

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


class RetryableError(Exception):
    """A 5xx answer (``status``, ``body``) or a connection error (``status`` ``None``):
    worth another attempt (:func:`retrying`)."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def retrying(call: Callable[[], T], retries: int, backoff: float, what: str) -> T:
    """Run ``call``; on :class:`RetryableError` sleep ``backoff * 2**n`` seconds and retry,
    ``retries`` times.

    Raises:
        InfluxUnavailableError: the last attempt failed too (``what`` names the request).
        InfluxError: as ``call``, at once.
    """
    for attempt in range(retries + 1):
        try:
            return call()
        except RetryableError as exc:
            if attempt == retries:
                raise InfluxUnavailableError(
                    f"{what} failed after {retries + 1} attempts: {exc}", exc.status, exc.body
                ) from exc
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def http(
    url: str,
    *,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> bytes:
    """One request (POST when ``data`` is given), ``timeout`` seconds.

    Returns:
        The body of a 2xx answer.

    Raises:
        InfluxError: a 4xx (``body``: InfluxDB's ``error`` message when JSON).
        RetryableError: a 5xx or a connection error.
    """
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
        raise RetryableError(f"HTTP {exc.code} from {safe_url}: {body}", exc.code, body) from None
    except (urllib.error.URLError, OSError) as exc:
        raise RetryableError(f"cannot reach {url.split('?')[0]}: {exc}") from None


def auth_headers(conf: InfluxConfig) -> dict[str, str]:
    """``Authorization``: ``Token`` (v2 with a token) or ``Basic`` (a username); else none."""
    headers: dict[str, str] = {}
    if conf.api == "v2" and conf.token:
        headers["Authorization"] = f"Token {conf.token.get_secret_value()}"
    elif conf.username:
        password = conf.password.get_secret_value() if conf.password else ""
        raw = f"{conf.username}:{password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    return headers


def url(conf: InfluxConfig, path: str, **params: str) -> str:
    """``conf.url`` + ``path`` + the URL-encoded query ``params``."""
    return f"{conf.url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"


def run_query(
    conf: InfluxConfig, influxql: str, *, post: bool, retries: int, backoff: float
) -> list[dict[str, Any]]:
    """Run InfluxQL on ``conf.db`` (``/query ... epoch=ms``; POST for statements that change
    something, GET otherwise).

    Returns:
        One dict per result row, across every statement and series: the row's columns
        (``time`` as int UTC ms) plus the series' ``GROUP BY`` tags.

    Raises:
        InfluxError: HTTP 4xx or an error reported for a statement (e.g. a parse error).
        InfluxUnavailableError: 5xx or connection errors after every retry.
    """
    params = {"db": conf.db, "epoch": "ms"}
    headers = auth_headers(conf)
    if post:
        target = url(conf, "/query", **params)
        data: bytes | None = urllib.parse.urlencode({"q": influxql}).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    else:
        target = url(conf, "/query", q=influxql, **params)
        data = None
    raw = retrying(
        lambda: http(target, data=data, headers=headers), retries, backoff, "InfluxDB query"
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
