"""The InfluxDB layout: database, retention policies and measurement names.

Measurements (points and fields in :mod:`~arbstream.store.influx.lines`): ``quote`` and
``trade`` in retention policy ``raw``, ``features`` in ``features``; ``spread``, ``episode``,
``spread_percentiles``, ``stream``, ``health``, ``ml_score`` (the alert worker's model
scores) and ``pair_stats`` (the pairs job's rolling hedge ratio, spread and z-score per pair;
default policy like ``spread``, the other per-window pair series: one point per pair and
window is small, and a run over old lake data must not be dropped as beyond a retention) in
the default policy. ``query_progress`` (the stream job's streaming-query progress, written by
its listener :mod:`spark_jobs.progress`) and ``query_restarts`` (one point per restart of a
failed query) are small operational series, also in the default policy.

Retention: in v1, :func:`ensure_database` keeps retention policies ``raw``
(``conf.raw_retention``) and ``features`` (``conf.features_retention``) beside the default
``autogen`` (infinite); :data:`MEASUREMENT_RP` says which measurement lives where, and writes
pass ``rp=`` on ``/write``. Read them qualified, e.g. ``SELECT ... FROM "raw"."quote"`` (see
:func:`ref`). InfluxDB drops points older than their policy's duration (relative to the wall
clock): such a "points beyond retention policy" partial write is logged and counted in
``InfluxWriter.dropped``, not raised, so replaying old data never stops the stream — use
``INF`` retentions to keep historical replays. In v2 retention is a property of the bucket:
every measurement is written to the one bucket ``conf.db`` and ``rp`` is ignored (use
separate buckets and DBRP mappings if raw data must expire sooner).
"""

from __future__ import annotations

from typing import Any

from arbstream.store.config import InfluxConfig
from arbstream.store.influx.client import run_query

QUOTE = "quote"
TRADE = "trade"
SPREAD = "spread"
EPISODE = "episode"
PERCENTILES = "spread_percentiles"
FEATURES = "features"
STREAM = "stream"
HEALTH = "health"
ML_SCORE = "ml_score"
PAIR_STATS = "pair_stats"
QUERY_PROGRESS = "query_progress"
QUERY_RESTARTS = "query_restarts"

RP_RAW = "raw"
RP_FEATURES = "features"
#: Measurement -> its retention policy (v1). Measurements not listed use the default RP.
MEASUREMENT_RP: dict[str, str] = {QUOTE: RP_RAW, TRADE: RP_RAW, FEATURES: RP_FEATURES}


def ident(name: str) -> str:
    """A double-quoted InfluxQL identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ref(measurement: str) -> str:
    """The qualified InfluxQL name of a measurement, e.g. ``"raw"."quote"`` or ``"spread"``
    (default RP), for ``FROM`` clauses."""
    rp = MEASUREMENT_RP.get(measurement)
    return f"{ident(rp)}.{ident(measurement)}" if rp else ident(measurement)


def retention_policies(conf: InfluxConfig) -> dict[str, str]:
    """The wanted v1 retention policies: name -> InfluxQL duration (``30d``, ``INF``...)."""
    return {RP_RAW: conf.raw_retention, RP_FEATURES: conf.features_retention}


def ensure_database(conf: InfluxConfig, *, retries: int = 3, backoff: float = 0.5) -> None:
    """Make sure the target database and its retention policies exist.

    v1: ``CREATE DATABASE "<db>"`` (a no-op when it exists; needs admin rights when auth is
    on), then each policy of :func:`retention_policies` — ``raw`` for ``quote`` and
    ``trade``, ``features`` for ``features`` — is created (``REPLICATION 1``, not default) or,
    when it exists, altered to the configured duration. The default policy (``autogen``,
    infinite) keeps ``spread``, ``episode``, ``spread_percentiles``, ``stream`` and
    ``health``. Shortening a duration makes InfluxDB delete the older shards at its next
    retention check.

    v2: does nothing — the bucket ``conf.db`` must already exist in ``conf.org`` (create it
    with ``influx bucket create``; its retention applies to every measurement); writes to a
    missing bucket fail with :class:`~arbstream.store.influx.client.InfluxError` (HTTP 404).

    Raises:
        InfluxError: HTTP 4xx or a statement error, e.g. a duration under InfluxDB's minimum
            of 1 h.
        InfluxUnavailableError: 5xx or connection errors after every retry.
    """
    if conf.api == "v2":
        return
    db = ident(conf.db)

    def run(statement: str) -> list[dict[str, Any]]:
        return run_query(conf, statement, post=True, retries=retries, backoff=backoff)

    run(f"CREATE DATABASE {db}")
    existing = {r["name"] for r in run(f"SHOW RETENTION POLICIES ON {db}")}
    for name, duration in retention_policies(conf).items():
        if name in existing:
            run(f"ALTER RETENTION POLICY {ident(name)} ON {db} DURATION {duration}")
        else:
            run(f"CREATE RETENTION POLICY {ident(name)} ON {db} DURATION {duration} "
                "REPLICATION 1")
