"""Exchange health derived in the stream: interval deltas, staleness, silence, reliability score.

Input: the valid rows of :func:`spark_jobs.transforms.parse_health`, one producer ``health``
record per exchange every ``health_interval_seconds`` (cumulative counters since the producer
started, ``messages_per_s`` over its last interval; see ``producers/publisher.py``).
Output: one *enriched* row per input record, plus one ``stale`` row when an exchange goes
silent. Two steps:

1. :func:`track` (stateful, keyed by ``exchange``, ``applyInPandasWithState``) remembers the
   previous record of each exchange and measures what needs history;
2. :func:`score` (Spark column expressions only) turns those measurements into scores.

Measurements (per exchange, from the record at ``ts`` and the previous one at ``ts'``):

* ``interval_s = (ts - ts') / 1000``; null for the first record the stream sees.
* Counter deltas ``x - x'`` for ``records``, ``reconnects`` and
  ``errors_delta = Δdeadletters + Δdelivery_failures + Δmissing`` (``missing`` counts the lost
  messages of sequence gaps). A producer restart resets every counter together, so when any
  cumulative counter went down the deltas are the current values (counts since the restart);
  this is Prometheus's counter-reset rule for ``increase()``, applied to the whole record
  (https://prometheus.io/docs/prometheus/latest/querying/functions/#increase). A restart after
  which every counter has already passed its old value is not detectable. The first record's
  deltas are likewise its counts since the producer started.
* ``staleness_s = max(last_message_age_s, growth_age_s)`` (nulls ignored; null if both are),
  where ``growth_age_s = (ts - g) / 1000`` and ``g`` is the ``ts`` of the latest record whose
  ``records`` grew (``Δrecords > 0``). ``last_message_age_s`` is the producer's age of the last
  websocket *frame*; ``growth_age_s`` also catches a feed that still sends frames (exchange
  heartbeats, unparseable data) but publishes no market data, and it survives producer
  restarts. Both are lower bounds at report granularity.
* ``uptime``: time-based availability over the last ``uptime_window`` (12) reports, i.e. the
  fraction of reports whose interval was *up*: ``messages_per_s > 0`` and no reconnect
  (Google SRE book, ch. 3 "Embracing Risk": availability = uptime / (uptime + downtime),
  https://sre.google/sre-book/embracing-risk/). Rolling, so one reconnect costs 1/12.
* rate baseline: the median of ``messages_per_s`` over the last ``rate_window`` (60) reports,
  the current one included; a median so that bursts do not raise the bar.

Silence: ``track`` sets a *processing-time* timeout of ``stale_after_s`` (the job passes
3 × ``health_interval_seconds``) every time an exchange's records arrive. When it expires the
exchange gets one row with ``status = "stale"``, ``ts = ts_last + stale_after`` (the instant the
exchange became stale by this definition: deterministic, so a replayed batch rewrites the same
InfluxDB point), ``interval_s = stale_after_s``, ``uptime = 0``, null producer fields and deltas,
and ``staleness_s`` = its lower bound at that instant; the rolling uptime records a down report.
One row per silence; the next record resumes normally (its deltas span the silence).
Why processing time: an event-time timeout needs the watermark to move, and the watermark
moves only with new records; when the one producer process dies nothing arrives at all, so
an event-time timeout would never fire on a live feed. Behaviour on replays: the timeout
follows the wall clock, not the recorded time. At the end of a finite replay every exchange
gets its stale row ``stale_after_s`` of wall time later (true: the replay stopped); a gap
*inside* the recording is seen as a long ``interval_s`` and staleness, but gets a stale row
only when the replay itself pauses that long. After the job was down, exchanges that have
records in the first micro-batch do not time out; Spark checks timeouts only for keys without
data in a batch.

Records whose ``ts`` is not after the exchange's previous one (redeliveries, out of order) are
dropped: they would make ``interval_s <= 0``. One producer per exchange is assumed.

Scores (:func:`score`), all in [0, 1]:

* ``rate_score = min(1, messages_per_s / baseline)``; 0 when ``messages_per_s`` is 0 or null,
  1 when the baseline is 0 but messages flow.
* ``freshness = clamp(1 - staleness_s / feed_stale_seconds, 0, 1)``: a linear ramp from 1
  (just received) to 0 at ``feed_stale_seconds``, the silence after which the producer's own
  watchdog declares the websocket dead and reconnects. Chosen over ``exp(-s/τ)`` because it
  reaches 0 exactly at that existing operational threshold instead of crediting a dead feed
  (exp would still give 0.37 at the threshold and 0.14 at twice it). 0 when staleness is null
  (no frame ever received) and on stale rows.
* ``error_rate = errors_delta / (Δrecords + Δdeadletters + Δmissing)``: bad messages over every
  message of the interval (published, rejected or lost; a delivery failure is a published
  record that failed). 0 without traffic, capped at 1, null on stale rows. This is the SRE
  request-based ratio 1 - good/total (same chapter).
* ``error_score = max(0, 1 - error_rate / ERROR_BUDGET)`` with ``ERROR_BUDGET = 0.01``: the
  share of a 1 % error budget left in the interval (SLO burn rate, Google SRE workbook
  "Alerting on SLOs", https://sre.google/workbook/alerting-on-slos/); 0 when null.

Reliability, a weighted arithmetic mean (linear aggregation of normalised indicators, OECD/JRC
*Handbook on Constructing Composite Indicators*, 2008, §6)::

    reliability = 0.3 * uptime + 0.3 * freshness + 0.3 * error_score + 0.1 * rate_score

Connected, current and correct weigh the same; the message rate weighs less because market
activity moves it by itself (a quiet market is not an unreliable feed). A feed perfect on the
first three scores at least 0.9 whatever its rate. Stale rows score 0.

Status: ``"stale"`` on a stale row or when ``freshness == 0`` (``staleness_s >=
feed_stale_seconds``, or nothing ever received); else ``"degraded"`` when ``reliability <
0.9`` (below what a feed perfect on uptime, freshness and errors scores); else ``"ok"``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.streaming.state import GroupState, GroupStateTimeout

from arbstream.config import Settings
from arbstream.schemas import HEALTH_DDL, HEALTH_FIELDS, SCHEMA_VERSION, Health
from arbstream.spark_schema import spark_columns

#: Share of messages allowed to fail (1 %): ``error_score`` is the part of it left unspent.
ERROR_BUDGET = 0.01
#: Weights of :func:`score`'s reliability (they sum to 1).
WEIGHTS = {"uptime": 0.3, "freshness": 0.3, "error": 0.3, "rate": 0.1}
#: ``reliability`` below this is ``degraded``.
DEGRADED_BELOW = 0.9
#: Silence, in health intervals, after which an exchange is declared stale.
STALE_INTERVALS = 3

#: Counters whose decrease marks a producer restart (cumulative since the producer started).
COUNTERS = ("frames", "records", "reconnects", "duplicates_dropped", "gaps", "missing",
            "deadletters", "delivery_failures")
ERROR_COUNTERS = ("deadletters", "delivery_failures", "missing")

#: :func:`track`'s output: the health fields (:class:`arbstream.schemas.Health`), measurements,
#: and ``_``-prefixed inputs of :func:`score` (which drops them).
TRACKED_DDL = (
    f"{HEALTH_DDL}, interval_s DOUBLE, records_delta BIGINT, errors_delta BIGINT, "
    "reconnects_delta BIGINT, staleness_s DOUBLE, uptime DOUBLE, _total_delta BIGINT, "
    "_rate_baseline DOUBLE, _timed_out BOOLEAN"
)
TRACKED_COLUMNS = [c.split()[0] for c in TRACKED_DDL.split(", ")]
#: Columns of :func:`score` and :func:`enrich` output, in order.
ENRICHED_COLUMNS = [
    *HEALTH_FIELDS, "time", "interval_s", "records_delta", "errors_delta", "reconnects_delta",
    "staleness_s", "uptime", "rate_score", "freshness", "error_rate", "reliability", "status",
]
#: Per-exchange state of :func:`track` (one row per exchange; the windows are bounded).
#: The sequences are JSON arrays in strings: PySpark 4's Python worker cannot read the schema
#: of an ARRAY state field (``KeyError: 'elementType'`` in ``state_value_schema``).
STATE_DDL = (
    "last_ts BIGINT, counters STRING, last_age_s DOUBLE, last_growth_ts BIGINT, "
    "up STRING, rates STRING, timed_out BOOLEAN"
)


@dataclass(frozen=True)
class Tracking:
    """How :func:`track` measures: silence timeout (s) and the rolling windows (reports)."""

    stale_after_s: float
    uptime_window: int = 12
    rate_window: int = 60

    @classmethod
    def of(cls, settings: Settings) -> Tracking:
        """Stale after ``STALE_INTERVALS`` × ``health_interval_seconds``."""
        return cls(stale_after_s=STALE_INTERVALS * settings.health_interval_seconds)

    @property
    def stale_after_ms(self) -> int:
        return round(self.stale_after_s * 1000)


@dataclass(frozen=True)
class ExchangeState:
    """What :func:`advance` remembers of one exchange (see :data:`STATE_DDL`)."""

    last_ts: int
    counters: tuple[int | None, ...]
    last_age_s: float | None
    last_growth_ts: int | None
    up: tuple[bool, ...]
    rates: tuple[float, ...]
    timed_out: bool = False


# --- the per-exchange state machine (plain Python, no Spark) ---------------------------------


def _int(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _float(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


_HEALTH_TYPES = dict(spark_columns(Health))


def _clean(record: Mapping[str, Any]) -> dict[str, Any]:
    """The health fields of ``record`` as Python values of their DDL type (NaN → None)."""
    out: dict[str, Any] = {}
    for name, kind in _HEALTH_TYPES.items():
        value = record.get(name)
        if kind in ("INT", "BIGINT"):
            out[name] = _int(value)
        elif kind == "DOUBLE":
            out[name] = _float(value)
        else:
            out[name] = None if value is None or value != value else str(value)
    return out


def _sum(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def advance(
    state: ExchangeState | None, record: Mapping[str, Any], tracking: Tracking
) -> tuple[ExchangeState | None, dict[str, Any] | None]:
    """Fold one health record into the exchange's state (module docstring, "Measurements").

    Args:
        state: the exchange's state, ``None`` before its first record.
        record: the :data:`arbstream.schemas.HEALTH_FIELDS` of one record (NaN means null).

    Returns:
        The new state and the row of :data:`TRACKED_COLUMNS`, or ``(state, None)`` when the
        record's ``ts`` is not after the previous record's (dropped).
    """
    record = _clean(record)
    ts = int(record["ts"])
    if state is not None and ts <= state.last_ts:
        return state, None
    counters = tuple(record[c] for c in COUNTERS)
    restart = state is not None and any(
        cur is not None and old is not None and cur < old
        for cur, old in zip(counters, state.counters, strict=True)
    )

    def delta(name: str) -> int | None:
        i = COUNTERS.index(name)
        cur = counters[i]
        if state is None or restart or cur is None:
            return cur
        old = state.counters[i]
        return None if old is None else cur - old

    records_delta, reconnects_delta = delta("records"), delta("reconnects")
    errors_delta = _sum(delta(c) for c in ERROR_COUNTERS)
    total_delta = _sum(delta(c) for c in ("records", "deadletters", "missing"))
    last_growth_ts = state.last_growth_ts if state is not None else None
    if records_delta is not None and records_delta > 0:
        last_growth_ts = ts
    age_s = record["last_message_age_s"]
    ages = [a for a in (age_s, None if last_growth_ts is None else (ts - last_growth_ts) / 1000)
            if a is not None]
    rate = record["messages_per_s"] or 0.0
    up = rate > 0 and not reconnects_delta
    history = state.up if state is not None else ()
    ups = (*history, up)[-tracking.uptime_window:]
    rates = (*(state.rates if state is not None else ()), rate)[-tracking.rate_window:]
    row = {
        **record,
        "interval_s": None if state is None else (ts - state.last_ts) / 1000,
        "records_delta": records_delta,
        "errors_delta": errors_delta,
        "reconnects_delta": reconnects_delta,
        "staleness_s": max(ages) if ages else None,
        "uptime": sum(ups) / len(ups),
        "_total_delta": total_delta,
        "_rate_baseline": statistics.median(rates),
        "_timed_out": False,
    }
    new = ExchangeState(ts, counters, age_s, last_growth_ts, ups, rates)
    return new, row


def silence(
    state: ExchangeState, exchange: str, tracking: Tracking
) -> tuple[ExchangeState, dict[str, Any]]:
    """The ``stale`` row of an exchange with no record for ``tracking.stale_after_s``.

    Returns:
        The new state (a down report appended to the uptime window, ``last_ts`` kept, so the
        next record's deltas span the silence) and the row of :data:`TRACKED_COLUMNS`.
    """
    ts = state.last_ts + tracking.stale_after_ms
    ages = []
    if state.last_age_s is not None:
        ages.append(state.last_age_s + tracking.stale_after_ms / 1000)
    if state.last_growth_ts is not None:
        ages.append((ts - state.last_growth_ts) / 1000)
    row = {
        **dict.fromkeys(TRACKED_COLUMNS),
        "schema_version": SCHEMA_VERSION, "type": "health", "exchange": exchange, "ts": ts,
        "interval_s": tracking.stale_after_ms / 1000,
        "staleness_s": max(ages) if ages else None,
        "uptime": 0.0,
        "_rate_baseline": statistics.median(state.rates) if state.rates else None,
        "_timed_out": True,
    }
    ups = (*state.up, False)[-tracking.uptime_window:]
    return ExchangeState(state.last_ts, state.counters, state.last_age_s, state.last_growth_ts,
                         ups, state.rates, timed_out=True), row


def _records(frames: Iterable[pd.DataFrame]) -> list[dict[str, Any]]:
    """Rows in ``ts`` order; equal ``ts`` in Kafka ``offset`` order, so the first is kept."""
    rows = [r for pdf in frames for r in pdf.to_dict("records")]
    return sorted(rows, key=lambda r: (r["ts"], r["offset"]))


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    # object columns keep Python ints and None, which Arrow converts to nullable BIGINTs.
    return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object)
                         for c in TRACKED_COLUMNS})


def _state_tuple(s: ExchangeState) -> tuple[Any, ...]:
    return (s.last_ts, json.dumps(s.counters), s.last_age_s, s.last_growth_ts,
            json.dumps(s.up), json.dumps(s.rates), s.timed_out)


def _state_of(value: tuple[Any, ...] | None) -> ExchangeState | None:
    if value is None:
        return None
    last_ts, counters, age, growth, up, rates, timed_out = value
    return ExchangeState(int(last_ts), tuple(json.loads(counters)), _float(age), _int(growth),
                         tuple(json.loads(up)), tuple(json.loads(rates)), bool(timed_out))


# --- Spark ------------------------------------------------------------------------------------


def track(valid: DataFrame, tracking: Tracking) -> DataFrame:
    """Per-exchange measurements of valid health rows: :data:`TRACKED_DDL` columns.

    Input: valid :func:`spark_jobs.transforms.parse_health` rows (the health fields and the
    Kafka ``offset``, which orders records of equal ``ts``).

    Streaming input: ``applyInPandasWithState`` keyed by ``exchange`` with a processing-time
    timeout (stale rows; append mode). Static input (tests, backfills): the same
    :func:`advance` over each exchange's records in ``ts`` order, without stale rows.
    """
    rows = valid.select(*HEALTH_FIELDS, "offset")
    if not rows.isStreaming:
        def batch(pdf: pd.DataFrame) -> pd.DataFrame:
            state, out = None, []
            for record in _records([pdf]):
                state, row = advance(state, record, tracking)
                if row is not None:
                    out.append(row)
            return _frame(out)

        return rows.groupBy("exchange").applyInPandas(batch, TRACKED_DDL)

    def stateful(
        key: tuple[Any, ...], frames: Iterator[pd.DataFrame], group: GroupState
    ) -> Iterator[pd.DataFrame]:
        state, out = _state_of(group.getOption), []
        if group.hasTimedOut:
            if state is not None and not state.timed_out:
                state, row = silence(state, str(key[0]), tracking)
                out.append(row)
        else:
            for record in _records(frames):
                state, row = advance(state, record, tracking)
                if row is not None:
                    out.append(row)
            group.setTimeoutDuration(tracking.stale_after_ms)
        if state is not None:
            group.update(_state_tuple(state))
        if out:
            yield _frame(out)

    return rows.groupBy("exchange").applyInPandasWithState(
        stateful, TRACKED_DDL, STATE_DDL, "append", GroupStateTimeout.ProcessingTimeTimeout
    )


def _clamp01(col: Column) -> Column:
    return F.least(F.lit(1.0), F.greatest(F.lit(0.0), col))


def score(tracked: DataFrame, feed_stale_seconds: float) -> DataFrame:
    """Scores, reliability and status of :func:`track` rows (formulas: module docstring).

    Output: :data:`ENRICHED_COLUMNS` (``time`` is the timestamp of ``ts``); Spark operators only.
    """
    timed_out = F.coalesce(F.col("_timed_out"), F.lit(False))
    rate, baseline = F.col("messages_per_s"), F.col("_rate_baseline")
    rate_score = (
        F.when(timed_out | rate.isNull() | (rate <= 0), F.lit(0.0))
        .when(baseline.isNull() | (baseline <= 0), F.lit(1.0))
        .otherwise(F.least(F.lit(1.0), rate / baseline))
    )
    staleness = F.col("staleness_s")
    freshness = (
        F.when(timed_out | staleness.isNull(), F.lit(0.0))
        .otherwise(_clamp01(F.lit(1.0) - staleness / F.lit(feed_stale_seconds)))
    )
    errors, total = F.col("errors_delta"), F.col("_total_delta")
    error_rate = (
        F.when(timed_out | errors.isNull(), F.lit(None).cast("double"))
        .when(total > 0, F.least(F.lit(1.0), errors / total))
        .when(errors > 0, F.lit(1.0))
        .otherwise(F.lit(0.0))
    )
    error_score = F.coalesce(
        F.greatest(F.lit(0.0), F.lit(1.0) - F.col("error_rate") / F.lit(ERROR_BUDGET)),
        F.lit(0.0),
    )
    reliability = (
        F.lit(WEIGHTS["uptime"]) * F.col("uptime")
        + F.lit(WEIGHTS["freshness"]) * F.col("freshness")
        + F.lit(WEIGHTS["error"]) * error_score
        + F.lit(WEIGHTS["rate"]) * F.col("rate_score")
    )
    status = (
        F.when(timed_out | (F.col("freshness") <= 0), F.lit("stale"))
        .when(F.col("reliability") < DEGRADED_BELOW, F.lit("degraded"))
        .otherwise(F.lit("ok"))
    )
    return (
        tracked.withColumns({
            "time": F.timestamp_millis("ts"),
            "rate_score": rate_score, "freshness": freshness, "error_rate": error_rate,
        })
        .withColumn("reliability", reliability)
        .withColumn("status", status)
        .select(*ENRICHED_COLUMNS)
    )


def enrich(valid: DataFrame, settings: Settings, tracking: Tracking | None = None) -> DataFrame:
    """Valid parsed health rows → :data:`ENRICHED_COLUMNS` rows (plus stale rows when
    streaming). ``tracking`` defaults to :meth:`Tracking.of` ``settings``."""
    return score(track(valid, tracking or Tracking.of(settings)), settings.feed_stale_seconds)


def health_stream(
    parsed: DataFrame, settings: Settings, tracking: Tracking | None = None
) -> DataFrame:
    """What the ``health`` query's foreachBatch writes, from :func:`transforms.parse_health`.

    Output: valid records enriched (:data:`ENRICHED_COLUMNS`, ``error`` null) and stale rows,
    unioned with the invalid records (``error`` set; ``raw, raw_encoding, topic, partition,
    offset`` for :func:`transforms.dead_letters`; enriched columns null). Select the writable
    rows with ``error IS NULL``.
    """
    dead_letter_columns = ["raw", "raw_encoding", "topic", "partition", "offset", "error"]
    invalid = parsed.where(F.col("error").isNotNull()).select(
        *HEALTH_FIELDS, "time", *dead_letter_columns
    )
    enriched = enrich(parsed.where(F.col("error").isNull()), settings, tracking)
    return enriched.unionByName(invalid, allowMissingColumns=True)
