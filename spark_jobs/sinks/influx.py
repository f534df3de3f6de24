"""InfluxDB sink: quotes, trades, spreads, episodes, features and percentiles as line protocol,
millisecond precision.

Called on executors from ``foreachBatch`` through ``DataFrame.foreachPartition`` with rows
converted to plain dicts (``row.asDict()``); nothing connects at import time. Extra keys in a
row are ignored; optional keys that are missing or ``None`` leave their field out.

Measurements (numbers are always written as floats, so field types never conflict; booleans
as booleans; every time is UTC, ms):

* ``quote`` (RP ``raw``) tags ``exchange``, ``symbol``; fields ``bid``, ``ask`` and, when not
  ``None``, ``bid_size``, ``ask_size``; time = ``exchange_ts``.
* ``trade`` (RP ``raw``) tags ``exchange``, ``symbol`` and ``side`` when given; fields
  ``price`` (quote currency), ``size`` (base units), ``trade_id``; time = ``exchange_ts`` plus
  a sub-ms offset from ``trade_id`` (ns precision).
* ``spread`` (default RP) tags ``symbol`` (buy leg), ``sell_symbol``, ``buy_exchange``,
  ``sell_exchange``, ``cross_quote`` (``"true"``/``"false"``); fields ``gross_bps``,
  ``net_bps`` (basis points), ``buy_ask``, ``sell_bid`` (quote currency of each leg) and,
  when not ``None``, ``spread_mean_bps``, ``spread_std_bps`` (bps), ``spread_z`` (standard
  deviations), ``anomaly`` (bool), ``size_base`` (base units), ``expected_profit_usd`` (USD),
  ``conversion_rate``; time = ``window_end``.
* ``episode`` (default RP, closed episodes only) tags as ``spread``; fields ``duration_s``
  (seconds), ``windows``, ``peak_net_bps``, ``mean_net_bps`` (bps) and
  ``expected_profit_usd`` (USD) when not ``None``; time = ``start``.
* ``spread_percentiles`` (default RP) tags as ``spread``; fields ``count``, ``mean_bps``,
  ``p50_bps``, ``p75_bps``, ``p95_bps``, ``max_bps``, ``aggressive_bps``, ``moderate_bps``,
  ``conservative_bps`` (bps); time = ``hour_start``.
* ``features`` (RP ``features``) tags ``symbol``, ``exchange``; fields the non-``None`` of
  :data:`FEATURE_FIELDS` and ``volume_spike`` (bool); time = ``window_end``.
* ``health`` (default RP), see :func:`health_point`.

Retention: in v1, :func:`ensure_database` keeps retention policies ``raw``
(``settings.influx_raw_retention``) and ``features`` (``settings.influx_features_retention``)
beside the default ``autogen`` (infinite); :data:`MEASUREMENT_RP` says which measurement lives
where, and writes pass ``rp=`` on ``/write``. Read them qualified, e.g.
``SELECT ... FROM "raw"."quote"`` (see :func:`ref`). InfluxDB drops points older than their
policy's duration (relative to the wall clock): such a "points beyond retention policy" partial
write is logged and counted in :attr:`InfluxWriter.dropped`, not raised, so replaying old data
never stops the stream — use ``INF`` retentions to keep historical replays. In v2 retention
is a property of the bucket: every measurement is written to the one bucket
``settings.influx_db`` and ``rp`` is ignored (use separate buckets and DBRP mappings if raw data
must expire sooner).

Refused points: when InfluxDB answers a write with a 4xx that concerns its points (unparseable
line protocol, a timestamp outside its range of 1677-09-21..2262-04-11 UTC, a field type
conflict, a too-large body), :class:`InfluxWriter` bisects the batch down to the refused lines,
stores the rest and records each refused line with its reason in
:attr:`InfluxWriter.rejected` instead of failing the whole write; :func:`write_lines_with_rejects`
hands them back so a caller can dead-letter them. Auth errors (401/403), a missing database
(404) and 5xx/connection errors still raise.

Writes are idempotent: InfluxDB keeps one point per (measurement, tag set, timestamp) and a
rewrite replaces its fields, so replaying a micro-batch does not add points. (Two different
quotes of one exchange and symbol with the same ``exchange_ts`` millisecond collapse into the
last one written: the best bid/offer at that millisecond. Trades are written in ns with a
per-trade offset inside their millisecond, so none collapse; see :func:`trade_point`.)

APIs: ``settings.influx_api == "v1"`` talks InfluxDB 1.x's ``/write`` and ``/query`` with the
standard library (1.x has no ``/api/v2``); ``"v2"`` writes with ``influxdb_client``'s
synchronous write API to ``settings.influx_db`` as the bucket.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar

from influxdb_client import Point, WritePrecision

from arbstream.config import Settings
from arbstream.schemas import HEALTH_FIELDS

BATCH_LINES = 5000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
T = TypeVar("T")
#: Timestamp unit of written line protocol: ms for every measurement but ``trade`` (ns).
Precision = Literal["ms", "ns"]
log = logging.getLogger(__name__)

RP_RAW = "raw"
RP_FEATURES = "features"
#: Measurement -> its retention policy (v1). Measurements not listed use the default RP.
MEASUREMENT_RP: dict[str, str] = {"quote": RP_RAW, "trade": RP_RAW, "features": RP_FEATURES}
#: Optional float fields of ``features`` points.
FEATURE_FIELDS = (
    "mid", "log_return", "volatility", "quote_spread_bps", "imbalance", "latency_ms",
    "message_rate", "volume", "volume_z", "quote_age_s",
)
#: Float fields of ``spread_percentiles`` points (bps, except ``count``).
PERCENTILE_FIELDS = (
    "count", "mean_bps", "p50_bps", "p75_bps", "p95_bps", "max_bps", "aggressive_bps",
    "moderate_bps", "conservative_bps",
)
_BEYOND_RETENTION = re.compile(r"^partial write: points beyond retention policy dropped=(\d+)$")
#: Most characters of a refused line's reason kept in :attr:`InfluxWriter.rejected`.
REJECT_REASON_CHARS = 500
#: 4xx statuses that are about the request, not its points: raised, never bisected.
_REQUEST_STATUSES = frozenset({401, 403, 404})
#: 400 bodies about the request, not its points (InfluxDB 1.x): raised, never bisected.
_REQUEST_ERRORS = re.compile(r"^(database is required|invalid precision)")


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


def _bool_tag(value: Any) -> str:
    return "true" if value else "false"


def _optional_fields(point: Point, row: Mapping[str, Any], names: Iterable[str]) -> Point:
    """Add each of ``names`` whose value is not ``None`` as a float field."""
    for name in names:
        if row.get(name) is not None:
            point.field(name, float(row[name]))
    return point


def _pair_tags(point: Point, row: Mapping[str, Any]) -> Point:
    """Tags of a pair: ``symbol`` (buy leg), ``sell_symbol`` (defaults to ``symbol``),
    ``buy_exchange``, ``sell_exchange``, ``cross_quote`` (``"true"``/``"false"``, default
    false). Raises KeyError when ``symbol`` or an exchange is missing."""
    return (
        point.tag("symbol", row["symbol"])
        .tag("sell_symbol", row.get("sell_symbol") or row["symbol"])
        .tag("buy_exchange", row["buy_exchange"])
        .tag("sell_exchange", row["sell_exchange"])
        .tag("cross_quote", _bool_tag(row.get("cross_quote")))
    )


#: Optional float fields of ``spread`` points.
SPREAD_OPTIONAL_FIELDS = (
    "spread_mean_bps", "spread_std_bps", "spread_z", "size_base", "expected_profit_usd",
    "conversion_rate",
)


def spread_point(row: Mapping[str, Any]) -> Point:
    """The ``spread`` point of one spread/opportunity row.

    Required keys: ``symbol, buy_exchange, sell_exchange, gross_bps, net_bps`` (bps),
    ``buy_ask, sell_bid`` (quote currency) and ``window_end`` (datetime, naive = UTC).
    Optional: ``sell_symbol`` (default ``symbol``), ``cross_quote`` (default false) and, each
    written only when not ``None``, ``anomaly`` (bool) and :data:`SPREAD_OPTIONAL_FIELDS`.

    Raises:
        KeyError: a required key is missing.
    """
    point = (
        _pair_tags(Point("spread"), row)
        .field("gross_bps", _float(row["gross_bps"]))
        .field("net_bps", _float(row["net_bps"]))
        .field("buy_ask", _float(row["buy_ask"]))
        .field("sell_bid", _float(row["sell_bid"]))
        .time(to_epoch_ms(row["window_end"]), WritePrecision.MS)
    )
    _optional_fields(point, row, SPREAD_OPTIONAL_FIELDS)
    if row.get("anomaly") is not None:
        point.field("anomaly", bool(row["anomaly"]))
    return point


def trade_point(row: Mapping[str, Any]) -> Point:
    """The ``trade`` point (RP ``raw``) of one trade row: tags ``exchange``, ``symbol`` and
    ``side`` when not ``None``; fields ``price`` (quote currency) and ``size`` (base units)
    when not ``None``, and ``trade_id``; time in **nanoseconds**: ``exchange_ts`` (UTC ms)
    plus a sub-millisecond offset derived from ``trade_id`` (:func:`trade_time_ns`), so trades
    of one series in the same millisecond (a taker order filling several levels) stay
    distinct points, and a rewritten trade lands on its own point again.

    Raises:
        KeyError: ``exchange``, ``symbol``, ``exchange_ts`` or ``trade_id`` is missing.
    """
    point = Point("trade").tag("exchange", row["exchange"]).tag("symbol", row["symbol"])
    if row.get("side") is not None:
        point.tag("side", row["side"])
    _optional_fields(point, row, ("price", "size"))
    point.field("trade_id", str(row["trade_id"]))
    return point.time(trade_time_ns(row["exchange_ts"], str(row["trade_id"])), WritePrecision.NS)


def trade_time_ns(exchange_ts: Any, trade_id: str) -> int:
    """``exchange_ts`` (UTC ms, or a datetime) in ns plus ``sha256(trade_id) mod 10^6`` ns:
    deterministic, inside the trade's millisecond, distinct for two trades of the same
    millisecond unless their ids collide on that offset (probability 10^-6)."""
    offset = int.from_bytes(hashlib.sha256(trade_id.encode()).digest()[:8], "big") % 1_000_000
    return to_epoch_ms(exchange_ts) * 1_000_000 + offset


def episode_point(row: Mapping[str, Any]) -> Point:
    """The ``episode`` point of one closed-episode row: pair tags (see :func:`spread_point`);
    fields ``duration_s`` (seconds), ``windows`` (count, as float), ``peak_net_bps``,
    ``mean_net_bps`` (bps) and ``expected_profit_usd`` (USD) when not ``None``; time =
    ``start`` (datetime, naive = UTC).

    Raises:
        KeyError: a tag key or ``start`` is missing.
    """
    point = _pair_tags(Point("episode"), row)
    _optional_fields(
        point, row,
        ("duration_s", "windows", "peak_net_bps", "mean_net_bps", "expected_profit_usd"),
    )
    return point.time(to_epoch_ms(row["start"]), WritePrecision.MS)


def percentile_point(row: Mapping[str, Any]) -> Point:
    """The ``spread_percentiles`` point of one hourly percentile row: pair tags (see
    :func:`spread_point`), the non-``None`` of :data:`PERCENTILE_FIELDS` (bps; ``count`` as
    float), time = ``hour_start`` (datetime, naive = UTC).

    Raises:
        KeyError: a tag key or ``hour_start`` is missing.
    """
    point = _optional_fields(_pair_tags(Point("spread_percentiles"), row), row,
                             PERCENTILE_FIELDS)
    return point.time(to_epoch_ms(row["hour_start"]), WritePrecision.MS)


#: Counter fields of ``stream`` points (records per exchange and market micro-batch).
STREAM_FIELDS = ("received", "duplicates", "late", "future")


def stream_point(row: Mapping[str, Any]) -> Point:
    """The ``stream`` point (default RP) of one exchange's counters in one market micro-batch
    of one stream bucket: tags ``exchange``; fields ``received``, ``duplicates``, ``late``,
    ``future`` (records, floats; 0 when absent) and ``watermark_ms`` (the combined watermark,
    UTC ms); time = ``emitted_ts`` (UTC ms, processing time). Sum the counters over time.

    Raises:
        KeyError: ``exchange`` or ``emitted_ts`` is missing.
    """
    point = Point("stream").tag("exchange", row["exchange"])
    for name in STREAM_FIELDS:
        point.field(name, float(row.get(name) or 0))
    if row.get("watermark_ms") is not None:
        point.field("watermark_ms", float(row["watermark_ms"]))
    return point.time(int(row["emitted_ts"]), WritePrecision.MS)


def feature_point(row: Mapping[str, Any]) -> Point:
    """The ``features`` point (RP ``features``) of one per-exchange feature row: tags
    ``symbol``, ``exchange``; the non-``None`` of :data:`FEATURE_FIELDS` as floats
    (``quote_spread_bps`` in bps, ``latency_ms`` in ms, ``quote_age_s`` in seconds,
    ``message_rate`` per second) and ``volume_spike`` (bool) when not ``None``; time =
    ``window_end`` (datetime, naive = UTC).

    Raises:
        KeyError: ``symbol``, ``exchange`` or ``window_end`` is missing.
    """
    point = _optional_fields(
        Point("features").tag("symbol", row["symbol"]).tag("exchange", row["exchange"]),
        row, FEATURE_FIELDS,
    )
    if row.get("volume_spike") is not None:
        point.field("volume_spike", bool(row["volume_spike"]))
    return point.time(to_epoch_ms(row["window_end"]), WritePrecision.MS)


def health_point(row: Mapping[str, Any]) -> Point:
    """The ``health`` point of one producer health row, raw or enriched by
    :func:`spark_jobs.health.enrich`.

    Tags ``exchange`` and, on enriched rows, ``status`` (``ok``/``degraded``/``stale``, for
    ``WHERE``/``GROUP BY``). Float fields: every numeric counter and rate of
    :data:`arbstream.schemas.HEALTH_FIELDS`, the enriched ``interval_s`` (s),
    ``records_delta``, ``errors_delta``, ``reconnects_delta`` (counts), ``staleness_s`` (s),
    ``uptime``, ``rate_score``, ``freshness``, ``error_rate``, ``reliability`` (fractions) and
    ``status_code`` (0 ok, 1 degraded, 2 stale, for graphs and alerts). Null or absent keys are
    left out. Time = ``ts`` (UTC ms).

    Raises:
        KeyError: ``exchange`` or ``ts`` is missing.
        ValueError: ``status`` is not one of the three.
    """
    enriched = ("interval_s", "records_delta", "errors_delta", "reconnects_delta", "staleness_s",
                "uptime", "rate_score", "freshness", "error_rate", "reliability")
    point = Point("health").tag("exchange", row["exchange"])
    status = row.get("status")
    if status is not None:
        codes = {"ok": 0.0, "degraded": 1.0, "stale": 2.0}
        if status not in codes:
            raise ValueError(f"health status must be one of {sorted(codes)}, got {status!r}")
        point.tag("status", status).field("status_code", codes[status])
    for name in [*HEALTH_FIELDS, *enriched]:
        if name not in ("schema_version", "type", "exchange", "ts") and row.get(name) is not None:
            point.field(name, float(row[name]))
    return point.time(to_epoch_ms(row["ts"]), WritePrecision.MS)


def quote_line(row: Mapping[str, Any]) -> str:
    """Line protocol (ms precision) of one quote row; ``""`` when it has no finite field."""
    return quote_point(row).to_line_protocol()


def quote_lines(exchange: list[str], symbol: list[str], bid: list[float], ask: list[float],
                bid_size: list[float | None], ask_size: list[float | None],
                exchange_ts: list[int]) -> list[str]:
    """Line protocol (ms precision) of many quotes, column-wise: the same points as
    :func:`quote_line` without building a ``Point`` per quote (the stream's hot path).

    ``exchange`` and ``symbol`` must be validated ids (lower-case exchange, ``BASE-QUOTE``),
    which need no escaping; sizes that are ``None`` or NaN are left out.
    """
    def size(name: str, value: float | None) -> str:
        return f",{name}={float(value)!r}" if value is not None and value == value else ""

    return [
        f"quote,exchange={e},symbol={s} bid={float(b)!r},ask={float(a)!r}"
        f"{size('bid_size', bs)}{size('ask_size', az)} {int(t)}"
        for e, s, b, a, bs, az, t in zip(exchange, symbol, bid, ask, bid_size, ask_size,
                                         exchange_ts, strict=True)
    ]


def spread_line(row: Mapping[str, Any]) -> str:
    """Line protocol (ms precision) of one spread row: byte for byte the line of
    :func:`spread_point`, formatted directly (one per pair and window: the stream's
    second-hottest path). Tag values are validated exchange ids and ``BASE-QUOTE`` symbols,
    which need no escaping; ``""`` when the row has no finite field.

    Raises:
        KeyError: a required key is missing.
    """
    fields = []
    if row.get("anomaly") is not None:
        fields.append(f"anomaly={'true' if row['anomaly'] else 'false'}")
    for name in SPREAD_LINE_FIELDS:  # sorted by name, as Point writes them
        value = _float(row[name]) if name in SPREAD_REQUIRED_FIELDS else _float(row.get(name))
        if value is not None and math.isfinite(value):  # as Point: NaN and ±Inf left out
            text = str(value)
            fields.append(f"{name}={text[:-2] if text.endswith('.0') else text}")
    if not fields:
        return ""
    symbol = row["symbol"]
    tags = (f"buy_exchange={row['buy_exchange']},cross_quote={_bool_tag(row.get('cross_quote'))}"
            f",sell_exchange={row['sell_exchange']},sell_symbol={row.get('sell_symbol') or symbol}"
            f",symbol={symbol}")
    return f"spread,{tags} {','.join(fields)} {to_epoch_ms(row['window_end'])}"


SPREAD_REQUIRED_FIELDS = frozenset({"gross_bps", "net_bps", "buy_ask", "sell_bid"})
#: Float fields of a spread line in Point's order (sorted; ``anomaly`` sorts first).
SPREAD_LINE_FIELDS = tuple(sorted({*SPREAD_REQUIRED_FIELDS, *SPREAD_OPTIONAL_FIELDS}))


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
    :attr:`dropped` counts the points InfluxDB dropped as older than their retention policy;
    :attr:`rejected` lists ``(line, reason)`` for every line InfluxDB refused (see
    :meth:`write_lines`), across calls, oldest first.
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
        send = self._send_v2 if self.settings.influx_api == "v2" else self._send_v1
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
            dropped = _retrying(
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
            _Retryable: other 5xx and connection errors.
        """
        params = {"db": self.settings.influx_db, "precision": precision}
        if rp:
            params["rp"] = rp
        url = _url(self.settings, "/write", **params)
        headers = {"Content-Type": "text/plain; charset=utf-8", **_auth_headers(self.settings)}
        hint = "(create it with spark_jobs.sinks.influx.ensure_database)"
        try:
            _http(url, data=body, headers=headers, timeout=self.timeout)
        except InfluxError as exc:
            beyond = _BEYOND_RETENTION.match(exc.body) if exc.status == 400 else None
            if beyond:
                return int(beyond[1])
            if exc.status == 404 and "database not found" in exc.body:
                raise InfluxError(f"{exc} {hint}", exc.status, exc.body) from None
            raise
        except _Retryable as exc:
            if exc.body.startswith("retention policy not found"):  # 1.x answers 500
                raise InfluxError(
                    f"InfluxDB rejected the write: {exc.body} {hint}", exc.status, exc.body
                ) from None
            raise
        return 0

    def _send_v2(self, body: bytes, rp: str | None, precision: Precision) -> int:
        """Write to the bucket ``influx_db`` (``rp`` is ignored); returns 0 (nothing dropped)."""
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
            raise _Retryable(f"HTTP {status}: {text}", status, text) from None
        except (Urllib3Error, OSError) as exc:
            raise _Retryable(f"cannot reach {self.settings.influx_url}: {exc}") from None
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


# --- convenience for foreachPartition ---------------------------------------------------------


def write_lines_with_rejects(
    settings: Settings, measurement: str, lines: Iterable[str], precision: Precision = "ms"
) -> tuple[int, list[tuple[str, str]]]:
    """Write line protocol of ``measurement`` into its retention policy
    (:data:`MEASUREMENT_RP`, default RP when not listed), keeping the lines InfluxDB refuses.

    Args:
        settings: the InfluxDB connection (see :class:`InfluxWriter`).
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
    with InfluxWriter(settings) as writer:
        stored = writer.write_lines(lines, rp=MEASUREMENT_RP.get(measurement),
                                    precision=precision)
        return stored, writer.rejected


def _write(settings: Settings, measurement: str, lines: Iterable[str],
           precision: Precision = "ms") -> int:
    """Write ``lines`` into the retention policy of ``measurement`` (:data:`MEASUREMENT_RP`);
    refused lines are logged and left out (see :func:`write_lines_with_rejects`).

    Returns:
        Number of points stored.
    """
    return write_lines_with_rejects(settings, measurement, lines, precision)[0]


def write_quotes(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write quote rows (see :func:`quote_point`) as ``quote`` points in RP ``raw``.

    Returns:
        Number of points stored. Raises as :meth:`InfluxWriter.write_lines`.
    """
    return _write(settings, "quote", (quote_line(row) for row in rows))


def write_trades(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write trade rows (see :func:`trade_point`) as ``trade`` points in RP ``raw``
    (nanosecond precision).

    Returns:
        Number of points stored. Raises KeyError as :func:`trade_point`, otherwise as
        :meth:`InfluxWriter.write_lines`.
    """
    return _write(settings, "trade", (trade_point(row).to_line_protocol() for row in rows),
                  precision="ns")


def write_health(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write producer health rows (see :func:`health_point`) as ``health`` points.

    Returns:
        Number of points stored. Raises as :meth:`InfluxWriter.write_lines`.
    """
    return _write(settings, "health", (health_point(row).to_line_protocol() for row in rows))


def write_spreads(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write spread/opportunity rows (see :func:`spread_point`) as ``spread`` points.

    Returns:
        Number of points written. Raises as :meth:`InfluxWriter.write_lines`.
    """
    return _write(settings, "spread", (spread_line(row) for row in rows))


def write_episodes(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write the closed episodes among episode event rows (``event == "closed"``; "opened"
    rows are skipped) as ``episode`` points (see :func:`episode_point`), time = ``start``.

    Returns:
        Number of points written. Raises as :func:`episode_point` and
        :meth:`InfluxWriter.write_lines`.
    """
    return _write(settings, "episode", (
        episode_point(row).to_line_protocol() for row in rows if row.get("event") == "closed"
    ))


def write_features(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write per-exchange feature rows (see :func:`feature_point`) as ``features`` points in
    RP ``features``; a row without any non-``None`` field writes nothing.

    Returns:
        Number of points stored. Raises as :func:`feature_point` and
        :meth:`InfluxWriter.write_lines`.
    """
    return _write(settings, "features",
                  (feature_point(row).to_line_protocol() for row in rows))


def write_percentiles(settings: Settings, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write hourly spread-percentile rows (see :func:`percentile_point`) as
    ``spread_percentiles`` points, time = ``hour_start``.

    Returns:
        Number of points written. Raises as :func:`percentile_point` and
        :meth:`InfluxWriter.write_lines`.
    """
    return _write(settings, "spread_percentiles",
                  (percentile_point(row).to_line_protocol() for row in rows))


# --- administration and queries ------------------------------------------------------------


def _ident(name: str) -> str:
    """A double-quoted InfluxQL identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ref(measurement: str) -> str:
    """The qualified InfluxQL name of a measurement, e.g. ``"raw"."quote"`` or ``"spread"``
    (default RP), for ``FROM`` clauses."""
    rp = MEASUREMENT_RP.get(measurement)
    return f"{_ident(rp)}.{_ident(measurement)}" if rp else _ident(measurement)


def retention_policies(settings: Settings) -> dict[str, str]:
    """The wanted v1 retention policies: name -> InfluxQL duration (``30d``, ``INF``...)."""
    return {RP_RAW: settings.influx_raw_retention,
            RP_FEATURES: settings.influx_features_retention}


def ensure_database(settings: Settings, *, retries: int = 3, backoff: float = 0.5) -> None:
    """Make sure the target database and its retention policies exist.

    v1: ``CREATE DATABASE "<influx_db>"`` (a no-op when it exists; needs admin rights when
    auth is on), then each policy of :func:`retention_policies` — ``raw`` for ``quote`` and
    ``trade``, ``features`` for ``features`` — is created (``REPLICATION 1``, not default) or,
    when it exists, altered to the configured duration. The default policy (``autogen``,
    infinite) keeps ``spread``, ``episode``, ``spread_percentiles`` and ``health``. Shortening a
    duration makes InfluxDB delete the older shards at its next retention check.

    v2: does nothing — the bucket ``influx_db`` must already exist in ``influx_org`` (create
    it with ``influx bucket create``; its retention applies to every measurement); writes to
    a missing bucket fail with :class:`InfluxError` (HTTP 404).

    Raises:
        InfluxError: as :func:`query`, e.g. a duration under InfluxDB's minimum of 1 h.
        InfluxUnavailableError: as :func:`query`.
    """
    if settings.influx_api == "v2":
        return
    db = _ident(settings.influx_db)

    def run(statement: str) -> list[dict[str, Any]]:
        return _run_query(settings, statement, post=True, retries=retries, backoff=backoff)

    run(f"CREATE DATABASE {db}")
    existing = {r["name"] for r in run(f"SHOW RETENTION POLICIES ON {db}")}
    for name, duration in retention_policies(settings).items():
        if name in existing:
            run(f"ALTER RETENTION POLICY {_ident(name)} ON {db} DURATION {duration}")
        else:
            run(f"CREATE RETENTION POLICY {_ident(name)} ON {db} DURATION {duration} "
                "REPLICATION 1")


def query(
    settings: Settings, influxql: str, *, retries: int = 3, backoff: float = 0.5
) -> list[dict[str, Any]]:
    """Run InfluxQL against ``settings.influx_db`` (``GET /query ... epoch=ms``).

    Measurements outside the default retention policy must be qualified: ``"raw"."quote"``,
    ``"raw"."trade"``, ``"features"."features"`` (:func:`ref` builds the name). Meant for v1;
    with v2 it needs the v1-compatibility endpoint and a DBRP mapping for each policy name.

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


def _time_clause(since: dt.datetime | None, until: dt.datetime | None) -> str:
    """`` AND time >= ...ms AND time < ...ms`` for the half-open ``[since, until)``."""
    clause = ""
    if since is not None:
        clause += f" AND time >= {to_epoch_ms(since)}ms"
    if until is not None:
        clause += f" AND time < {to_epoch_ms(until)}ms"
    return clause


def min_mid(
    settings: Settings,
    symbol: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> dict[str, Any] | None:
    """The lowest quote mid ``(bid + ask) / 2`` of ``symbol`` in ``"raw"."quote"`` with time
    in ``[since, until)`` (naive means UTC), across exchanges.

    Returns:
        ``{"mid": float (quote currency), "time": aware UTC datetime, "exchange": str}`` of
        the earliest such quote on the exchange with the lowest mid, or ``None`` when there
        is no quote (e.g. dropped as older than the ``raw`` retention).

    Raises:
        InfluxError, InfluxUnavailableError: as :func:`query`.
    """
    literal = symbol.replace("\\", "\\\\").replace("'", "\\'")
    inner = (f"SELECT (bid + ask) / 2 AS mid FROM {ref('quote')} WHERE symbol = '{literal}'"
             + _time_clause(since, until))
    rows = query(settings, f"SELECT min(mid) FROM ({inner}) GROUP BY exchange")
    rows = [r for r in rows if r.get("min") is not None]
    if not rows:
        return None
    best = min(rows, key=lambda r: (r["min"], r["time"], r["exchange"]))
    return {"mid": float(best["min"]), "exchange": best["exchange"],
            "time": _EPOCH + dt.timedelta(milliseconds=best["time"])}
