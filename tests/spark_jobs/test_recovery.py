"""Exactly-once recovery: SIGKILL the stream job mid-replay, restart it from its checkpoint, and
MongoDB and InfluxDB must end up identical to an uninterrupted run.

Real data (IAQF bars, 2023-03-11 04:00–05:30 UTC, with the replay's closing heartbeats) is
replayed once into the quote topics. The job then runs as a real ``arbstream stream``
subprocess (its own Spark JVM), from ``earliest``:

* run A, uninterrupted, with the default ``ARB_MAX_OFFSETS_PER_TRIGGER`` (the slice in one
  micro-batch), into MongoDB/InfluxDB databases ``recovery_a``;
* run B into ``recovery_b`` with ``ARB_MAX_OFFSETS_PER_TRIGGER`` = records / :data:`BATCHES` (a few
  micro-batches): its whole process group (Python driver and Spark JVM) is SIGKILLed while a
  micro-batch after the first committed one is in flight and has written part of its output,
  then restarted on the same ``ARB_STATE_DIR``.

So equality also says the output does not depend on where micro-batches end. Should A and B
ever differ, run A with the same batch size too to tell the two causes apart.

Both read the same topics (which may also hold other tests' records: both see them alike).
Every MongoDB collection and every InfluxDB measurement of every retention policy is compared
generically, so collections and measurements added to the job later are covered too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from arbstream.config import Settings
from arbstream.fees import DEFAULT_TAKER_FEES
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.queries import query
from arbstream.store.influx.schema import QUERY_PROGRESS, QUERY_RESTARTS, STREAM
from arbstream.store.mongo.client import connect
from arbstream.store.mongo.schema import OPPORTUNITIES
from arbstream.topics import ensure_topics
from producers.replay.iaqf import load_iaqf_quotes
from producers.replay.publish import publish_quotes
from spark_jobs.kafka_source import end_offsets
from testing.components import kill_group, stop_group

pytestmark = pytest.mark.e2e

START = datetime(2023, 3, 11, 4, tzinfo=UTC)
END = datetime(2023, 3, 11, 5, 30, tzinfo=UTC)
#: The IAQF exchanges under ids of their own, so the job reads topics that hold this test's
#: records only: other tests' records (live captures stamped with today's time) interleaved
#: with 2023 ones would make the watermark, and so what is late, depend on batch boundaries.
RENAMED = {"binance": "rec_binance", "coinbase": "rec_coinbase", "kraken": "rec_kraken"}
EXCHANGES = sorted(RENAMED.values())
FEES = {RENAMED[e]: f for e, f in DEFAULT_TAKER_FEES.items() if e in RENAMED}
QUERIES = ("market", "trades", "health")  # at least these; others are found on disk
BATCHES = 4  # run B's micro-batches over this test's topics
TRIGGER_SECONDS = 0.5
#: The job's ARB_IDLE_TIMEOUT_SECONDS: once every exchange has been silent this long, a
#: processing-time timer closes the last windows (a no-data micro-batch).
JOB_IDLE_SECONDS = 2.0
#: drained = caught up, offsets and watermark still for this long: past the idle timer, with
#: room for a micro-batch of several seconds when the machine is loaded (CI runs two test
#: workers, and the ML tests beside this one), so the timer's no-data batch has committed
IDLE_SECONDS = JOB_IDLE_SECONDS + 15.0
RUN_TIMEOUT = 900.0  # generous: CI machines have 2 cores
#: Fields holding wall-clock time of the write, which legitimately differ between runs.
WALL_CLOCK_FIELDS = {"first_seen_at", "emitted_ts"}
#: Measurements stamped with processing time (per-batch stream counters, the job's query
#: progress and restarts): not content.
PROCESSING_TIME_MEASUREMENTS = {STREAM, QUERY_PROGRESS, QUERY_RESTARTS}

Offsets = dict[str, dict[str, int]]


# --- the job as a subprocess -------------------------------------------------------------------


def job_env(conf: Settings, db: str, state: Path, max_offsets: int | None) -> dict[str, str]:
    """The process environment of one ``arbstream stream`` run: the test stack's services,
    databases ``db``, checkpoints under ``state``, at most ``max_offsets`` records per
    micro-batch (``None``: the job's default); no inherited ``ARB_*`` variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARB_", "PYSPARK_"))}
    env.update({
        "ARB_STATE_DIR": str(state),
        "ARB_DATA_DIR": str(conf.data_dir),
        "ARB_KAFKA_BOOTSTRAP": conf.kafka_bootstrap,
        "ARB_KAFKA_PARTITIONS": str(conf.kafka_partitions),
        "ARB_INFLUX_URL": conf.influx_url,
        "ARB_INFLUX_API": conf.influx_api,
        "ARB_INFLUX_DB": db,
        "ARB_MONGO_URI": conf.mongo_uri.get_secret_value(),
        "ARB_MONGO_DB": db,
        "ARB_EXCHANGES": json.dumps(EXCHANGES),
        "ARB_FEES": json.dumps(FEES),
        "ARB_SPARK_SHUFFLE_PARTITIONS": str(conf.spark_shuffle_partitions),
        "ARB_STARTING_OFFSETS": "earliest",
        "ARB_TRIGGER_SECONDS": str(TRIGGER_SECONDS),
        "ARB_IDLE_TIMEOUT_SECONDS": str(JOB_IDLE_SECONDS),
        # keep 2023 data: a finite retention would drop it on write, in both runs alike
        "ARB_INFLUX_RAW_RETENTION": "INF",
        "ARB_INFLUX_FEATURES_RETENTION": "INF",
    })
    if max_offsets is not None:
        env["ARB_MAX_OFFSETS_PER_TRIGGER"] = str(max_offsets)
    return env


class Job:
    """One ``arbstream stream`` process in its own session (so its JVM can be killed with it)."""

    def __init__(
        self, conf: Settings, db: str, state: Path, log: Path, max_offsets: int | None = None
    ) -> None:
        self.state = state
        self.log = log
        state.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("arbstream")), "stream"],
                env=job_env(conf, db, state, max_offsets), cwd=state, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def checkpoints(self) -> Path:
        return self.state / "checkpoints"

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, (
            f"stream job exited with {self.proc.returncode}:\n{self.tail()}"
        )

    def kill(self) -> None:
        """SIGKILL the whole process group: the Python driver and the Spark JVM at once."""
        kill_group(self.proc)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group; SIGKILL whatever is left after ``grace`` seconds."""
        stop_group(self.proc, grace)


# --- reading the checkpoint from outside ---------------------------------------------------------


def _batch_ids(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def query_names(root: Path) -> list[str]:
    """The streaming queries that have a checkpoint under ``root``."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "offsets").is_dir())


def log_state(root: Path, query: str) -> tuple[int, int]:
    """(latest batch id in ``offsets/``, latest in ``commits/``) of one query; -1 when none."""
    offsets = _batch_ids(root / query / "offsets")
    commits = _batch_ids(root / query / "commits")
    return (offsets[-1] if offsets else -1, commits[-1] if commits else -1)


def committed_sources(root: Path, query: str) -> list[Offsets]:
    """End offsets of each source of the query's latest committed micro-batch (``[]`` before
    the first).

    An offset-log entry is ``v<n>``, a metadata JSON line, then one line per source: here
    Kafka sources' ``{"topic": {"partition": next_offset}}``.
    """
    _, commit = log_state(root, query)
    if commit < 0:
        return []
    lines = (root / query / "offsets" / str(commit)).read_text().splitlines()
    return [json.loads(line) for line in lines[2:] if line.strip() not in ("", "-")]


def caught_up(root: Path, query: str, ends: Offsets) -> bool:
    """Whether every source of ``query`` has committed up to ``ends`` on all its topics."""
    sources = committed_sources(root, query)
    return bool(sources) and all(
        topic in ends and all(int(parts.get(p, -1)) >= end for p, end in ends[topic].items())
        for source in sources
        for topic, parts in source.items()
    )


def _entry(root: Path, query: str, batch: int) -> str:
    """Offset-log entry ``batch`` of ``query`` without its wall-clock ``batchTimestampMs``:
    the watermark, the sources' end offsets and the session configuration."""
    lines = (root / query / "offsets" / str(batch)).read_text().splitlines()
    meta = json.loads(lines[1])
    meta.pop("batchTimestampMs", None)
    return json.dumps(meta, sort_keys=True) + "\n" + "\n".join(lines[2:])


def settled(root: Path, query: str) -> str | None:
    """The latest committed offset-log entry of ``query`` (see :func:`_entry`), or ``None``
    while a batch that differs from it (new offsets or a moved watermark) is in flight."""
    offset_id, commit_id = log_state(root, query)
    if commit_id < 0:
        return None
    committed = _entry(root, query, commit_id)
    if offset_id > commit_id and _entry(root, query, offset_id) != committed:
        return None
    return committed


def wait_drained(job: Job, ends: Offsets, timeout: float = RUN_TIMEOUT) -> None:
    """Block until every query (at least :data:`QUERIES`) has committed up to ``ends`` and
    its last committed offsets and watermark stayed the same for IDLE_SECONDS.

    A moved watermark makes Spark run one more (no-data) batch that closes the last windows;
    its offset-log entry differs from the previous one by the watermark, so this waits for it
    too. Batch ids alone would not do: a query with processing-time timeouts (``health``)
    runs an identical no-data batch every trigger, forever.

    Raises:
        AssertionError: the job died or did not drain within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        job.assert_alive()
        names = query_names(job.checkpoints)
        state = {q: settled(job.checkpoints, q) for q in names}
        done = set(QUERIES) <= set(names) and all(
            entry is not None and caught_up(job.checkpoints, q, ends)
            for q, entry in state.items()
        )
        if state != last or not done:
            last, since = state, time.monotonic()
        elif time.monotonic() - since >= IDLE_SECONDS:
            return
        time.sleep(0.25)
    logs = {q: log_state(job.checkpoints, q) for q in query_names(job.checkpoints)}
    behind = {q: committed_sources(job.checkpoints, q) for q in logs}
    raise AssertionError(
        f"not drained within {timeout:.0f}s: batches {logs}, committed {behind}, "
        f"ends {ends}\n{job.tail()}"
    )


# --- comparing sinks -----------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def mongo_contents(conf: Settings, db: str) -> dict[str, list[dict[str, Any]]]:
    """Every document of every collection of ``db``, wall-clock fields removed, sorted."""
    out: dict[str, list[dict[str, Any]]] = {}
    with connect(MongoConfig.of(conf)) as client:
        for name in sorted(client[db].list_collection_names()):
            if name.startswith("system."):
                continue
            docs = [
                _canonical({k: v for k, v in doc.items() if k not in WALL_CLOCK_FIELDS})
                for doc in client[db][name].find()
            ]
            out[name] = sorted(docs, key=lambda d: json.dumps(d, sort_keys=True, default=str))
    return out


def _ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def influx_contents(conf: Settings, db: str) -> dict[str, list[dict[str, Any]]]:
    """Every point (all tags and fields, ms time) of every measurement in every retention
    policy of ``db``, keyed ``"<rp>.<measurement>"``, sorted. (The test stack's InfluxDB has
    no ``max-row-limit``, so one SELECT returns every point.)"""
    at = InfluxConfig.of(conf.model_copy(update={"influx_db": db}))
    policies = [r["name"] for r in query(at, f"SHOW RETENTION POLICIES ON {_ident(db)}")]
    measurements = [r["name"] for r in query(at, "SHOW MEASUREMENTS")
                    if r["name"] not in PROCESSING_TIME_MEASUREMENTS]
    out: dict[str, list[dict[str, Any]]] = {}
    for rp in policies:
        for m in measurements:
            rows = query(at, f"SELECT * FROM {_ident(db)}.{_ident(rp)}.{_ident(m)}")
            if m == "health":  # a silence row is emitted after wall time passes: not content
                rows = [r for r in rows if not _silence_row(r)]
            if rows:
                out[f"{rp}.{m}"] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    return out


def _silence_row(row: dict[str, Any]) -> bool:
    """A ``health`` row the health query emits on a processing-time timeout (an exchange
    silent for 3 intervals of wall time: see :mod:`spark_jobs.health`): whether a run emits it
    depends on how long it stays up after the replay, not on the data."""
    return row.get("status") == "stale" and row.get("records") is None


def _diff(name: str, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    key = lambda d: json.dumps(d, sort_keys=True, default=str)  # noqa: E731
    sa, sb = {key(d) for d in a}, {key(d) for d in b}
    only_a, only_b = sorted(sa - sb), sorted(sb - sa)
    return (
        f"{name}: {len(a)} in A, {len(b)} in B; {len(only_a)} only in A, {len(only_b)} only in B"
        + "".join(f"\n  A only: {d}" for d in only_a[:5])
        + "".join(f"\n  B only: {d}" for d in only_b[:5])
    )


def assert_same(kind: str, a: dict[str, list[dict]], b: dict[str, list[dict]]) -> None:
    assert sorted(a) == sorted(b), f"{kind}: A has {sorted(a)}, B has {sorted(b)}"
    diffs = [_diff(f"{kind} {name}", a[name], b[name]) for name in a if a[name] != b[name]]
    assert not diffs, "\n".join(diffs)


# --- the test ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ends(settings: Settings) -> Offsets:
    """Replay the slice once; the end offsets of every topic then (what the job must reach)."""
    conf = settings.model_copy(update={"exchanges": EXCHANGES, "fees": FEES})
    ensure_topics(conf)
    quotes = load_iaqf_quotes(conf.data_dir, START, END)
    quotes["exchange"] = quotes["exchange"].map(RENAMED)
    report = publish_quotes(quotes, conf, progress=False)
    assert report.quotes > 500
    admin = AdminClient(conf.kafka_client_config())
    topics = sorted(admin.list_topics(timeout=15).topics)
    return end_offsets(conf.kafka_client_config(), topics)


def _doc_count(client: Any, db: str) -> int:
    return sum(client[db][c].estimated_document_count() for c in client[db].list_collection_names())


def kill_mid_batch(job: Job, conf: Settings, db: str, ends: Offsets) -> int:
    """SIGKILL ``job`` once a ``market`` micro-batch after the first committed one is in
    flight and has already written part of its output to MongoDB.

    Returns:
        The id of the batch that was in flight.
    """
    deadline = time.monotonic() + RUN_TIMEOUT
    in_flight, base = -1, 0
    with connect(MongoConfig.of(conf)) as client:
        while True:
            job.assert_alive()
            assert time.monotonic() < deadline, f"no partial batch to kill\n{job.tail()}"
            assert not caught_up(job.checkpoints, "market", ends), (
                "drained before a batch was caught mid-write: raise BATCHES"
            )
            offset_id, commit_id = log_state(job.checkpoints, "market")
            count = _doc_count(client, db)
            if commit_id < 0 or offset_id <= commit_id:
                in_flight = -1
            elif offset_id != in_flight:
                in_flight, base = offset_id, count
            elif count > base:
                job.kill()
                return in_flight
            time.sleep(0.05)


def test_sigkill_and_restart_equals_uninterrupted_run(
    settings: Settings, ends: Offsets, tmp_path: Path
) -> None:
    # One after the other: two Spark JVMs at once starve each other on a small machine.
    run_a = Job(settings, "recovery_a", tmp_path / "a", tmp_path / "a.log")
    try:
        wait_drained(run_a, ends)
    finally:
        run_a.stop()
    state_b, log_b = tmp_path / "b", tmp_path / "b.log"
    market = [f"md.{e}.{kind}" for e in EXCHANGES for kind in ("quotes", "book")]
    max_offsets = max(100, sum(sum(ends[t].values()) for t in market) // BATCHES)
    job = Job(settings, "recovery_b", state_b, log_b, max_offsets)
    try:
        in_flight = kill_mid_batch(job, settings, "recovery_b", ends)
    finally:
        job.stop()
    spreads = job.checkpoints / "market"
    logged = (spreads / "offsets" / str(in_flight)).read_text()
    assert log_state(job.checkpoints, "market")[1] < in_flight, "committed before the kill"
    restarted = Job(settings, "recovery_b", state_b, log_b, max_offsets)
    try:
        wait_drained(restarted, ends)
    finally:
        restarted.stop()
    # Resumed from the checkpoint: the killed batch was re-run with its logged offsets.
    assert (spreads / "offsets" / str(in_flight)).read_text() == logged
    assert (spreads / "commits" / str(in_flight)).exists()

    mongo_a = mongo_contents(settings, "recovery_a")
    mongo_b = mongo_contents(settings, "recovery_b")
    influx_a = influx_contents(settings, "recovery_a")
    influx_b = influx_contents(settings, "recovery_b")
    assert len(mongo_a.get(OPPORTUNITIES, [])) > 0, "no opportunities: trivial comparison"
    quote_points = sum(len(rows) for name, rows in influx_a.items() if name.endswith(".quote"))
    assert quote_points > 500
    print("compared:", {k: len(v) for k, v in {**mongo_a, **influx_a}.items()})
    assert_same("MongoDB", mongo_a, mongo_b)
    assert_same("InfluxDB", influx_a, influx_b)
