"""The jobs on a real Spark standalone cluster: a master and two workers (one core each)
started from the pyspark distribution (:mod:`testing.spark_cluster`), jobs sent with
``spark-submit --master spark://127.0.0.1:<port> --py-files arbstream-jobs.zip`` as on a real
cluster (docs/cluster.md).

The code travels as a real cluster needs it to: the zip of ``tools/pack_job.py``, and a driver
and executors whose Python (:func:`testing.spark_cluster.executor_python`) has the third-party
packages but not this checkout's editable install, so every arbstream module they run comes
from the zip (the probe shows where each executor imported it from).

The stream job: IAQF bars of 2023-03-11 04:00-04:30 UTC (the USDC depeg weekend) replayed into
the broker while ``spark_jobs/arbitrage.py`` runs on the cluster; its MongoDB and InfluxDB
output is checked by ``tests/spark_jobs/test_e2e.py``'s own checks against the independent
pandas reference (``testing/reference.py``), its lake against the batch backfill of the same
slice and the reference's spreads; the executors of both workers ran its tasks (the driver's
REST API, the master's and the workers' ``/json/``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from arbstream.config import Settings
from arbstream.shell.stack import free_port
from arbstream.store import lake
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.queries import query
from arbstream.store.mongo.episodes import find_episodes
from arbstream.topics import ensure_topics
from producers.replay.iaqf import replay_iaqf
from testing.components import stop_group
from testing.reference import OUTPUT_COLUMNS, reference_spreads, replayed_iaqf_quotes
from testing.spark_cluster import SPARK_HOME, Cluster, executor_python, get_json, spark_cluster
from testing.support import REPO
from tests.spark_jobs import test_e2e as E2E
from tests.spark_jobs.test_lake import assert_same_lake, run_backfill
from tests.store.test_lake import slice_spreads
from tools.pack_job import pack

pytestmark = pytest.mark.e2e

START = datetime(2023, 3, 11, 4, tzinfo=UTC)  # test_lake.run_backfill's start too
END = START + timedelta(minutes=30)
WORKERS = 2
QUERIES = ("market", "trades", "health")


@dataclass(frozen=True)
class Shipped:
    """What a job ships: the code zip (``--py-files``) and the interpreter of the driver
    and the executors (``PYSPARK_PYTHON``), which has no arbstream of its own."""

    zip: Path
    python: Path


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Shipped:
    root = tmp_path_factory.mktemp("ship")
    return Shipped(pack(root / "arbstream-jobs.zip"), executor_python(root / "python"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with spark_cluster(tmp_path_factory.mktemp("cluster"), workers=WORKERS, cores=1,
                       memory="2g") as running:
        yield running


def submit_args(cluster: Cluster, shipped: Shipped, ui_port: int) -> list[str]:
    """``spark-submit`` and its flags for a job on ``cluster``: one single-core executor per
    worker (tasks wait until both have registered), the zip, the driver's UI port."""
    return [str(SPARK_HOME / "bin" / "spark-submit"), "--master", cluster.url,
            "--total-executor-cores", str(WORKERS), "--executor-cores", "1",
            "--executor-memory", "1g", "--driver-memory", "2g",
            "--py-files", str(shipped.zip),
            "--conf", f"spark.ui.port={ui_port}",
            "--conf", "spark.scheduler.minRegisteredResourcesRatio=1.0",
            "--conf", "spark.scheduler.maxRegisteredResourcesWaitingTime=120s"]


def job_env(shipped: Shipped, arb: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without ``ARB_*``, plus ``arb``; driver and executors on
    :attr:`Shipped.python`, Spark bound to loopback; ``PYTHONPATH`` the zip alone, for the
    Python worker the driver's JVM starts to plan the Python data sources, which looks for
    ``--py-files`` where they are not (docs/cluster.md). Executors never see this variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
    return env | (arb or {}) | {"PYSPARK_PYTHON": str(shipped.python),
                                "PYSPARK_DRIVER_PYTHON": str(shipped.python),
                                "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(shipped.zip)}


def test_the_shipped_interpreter_has_no_arbstream_of_its_own(shipped: Shipped,
                                                              tmp_path: Path) -> None:
    """The control: without the zip, the jobs' interpreter cannot import arbstream (so the
    cluster's jobs below can only run what the zip holds)."""
    done = subprocess.run([str(shipped.python), "-c", "import pyspark, pandas, orjson, "
                           "xxhash, pydantic_settings, pymongo; import arbstream"],
                          cwd=tmp_path, env=job_env(shipped) | {"PYTHONPATH": ""},
                          capture_output=True, text=True)
    assert done.returncode == 1 and "No module named 'arbstream'" in done.stderr, done.stderr


PROBE = '''
import json, os, sys, time
from pyspark.sql import SparkSession

def where(_):
    time.sleep(0.5)  # keep both executors busy
    import arbstream.config, spark_jobs.engine
    yield json.dumps({"spark_jobs": spark_jobs.engine.__file__,
                      "arbstream": arbstream.config.__file__, "cwd": os.getcwd(),
                      "python": sys.executable, "pythonpath": os.environ.get("PYTHONPATH"),
                      "zips": [p for p in sys.path if "arbstream-jobs" in p]})

spark = SparkSession.builder.appName("arbstream-probe").getOrCreate()
import spark_jobs
print("driver " + spark_jobs.__file__)
for row in spark.sparkContext.parallelize(range(8), 8).mapPartitions(where).collect():
    print("executor " + row)
spark.stop()
'''


def test_executors_import_arbstream_from_the_shipped_zip(cluster: Cluster, shipped: Shipped,
                                                         tmp_path: Path) -> None:
    """Tasks on both workers import ``spark_jobs`` and ``arbstream`` from the copy of the zip
    Spark fetched into their executor's directory under the worker's work directory (its
    bytes the shipped zip's), not from the ``PYTHONPATH`` of spark-submit (which names the zip
    too, for the driver's own Python workers); the driver from the zip."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    done = subprocess.run([*submit_args(cluster, shipped, free_port()), str(script)],
                          cwd=tmp_path, env=job_env(shipped), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    [driver] = [line.removeprefix("driver ") for line in lines if line.startswith("driver ")]
    # the zip, or spark-submit's copy of it in the driver's scratch directory
    assert re.fullmatch(rf"/.+/{re.escape(shipped.zip.name)}/spark_jobs/__init__\.py",
                        driver), driver
    rows = [json.loads(line.removeprefix("executor ")) for line in lines
            if line.startswith("executor ")]
    assert len(rows) == 8
    used = set()
    for row in rows:
        cwd = Path(row["cwd"])  # <work dir>/<app id>/<executor id>
        [work] = [w for w in cluster.work_dirs if cwd.is_relative_to(w)]
        used.add(work)
        # the zip as Spark put it on sys.path: relative to the executor's directory
        assert row["spark_jobs"] == f"./{shipped.zip.name}/spark_jobs/engine.py", row
        assert row["arbstream"] == f"./{shipped.zip.name}/arbstream/config.py", row
        assert Path(row["python"]) == shipped.python, row
        assert row["zips"] == [f"./{shipped.zip.name}"], row  # spark-submit's PYTHONPATH: not here
        assert str(shipped.zip) not in (row["pythonpath"] or ""), row
        assert (cwd / shipped.zip.name).read_bytes() == shipped.zip.read_bytes()
    assert used == set(cluster.work_dirs)  # both workers ran tasks


# --- the stream job ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conf(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The session's stack, a database of this module's own, new offsets only, a fresh
    state directory (checkpoints) and lake; bar-sized episode gaps, as test_e2e runs."""
    root = tmp_path_factory.mktemp("stream")
    name = f"t_cluster_{uuid.uuid4().hex[:8]}"
    conf = settings.model_copy(update={
        "mongo_db": name, "influx_db": name, "starting_offsets": "latest",
        "trigger_seconds": 0.5, "state_dir": root / "state", "lake_dir": root / "lake",
        "influx_raw_retention": "INF", "influx_features_retention": "INF",
        "episode_gap_seconds": 120.0, "stats_horizon_seconds": 3600.0,
    })
    ensure_topics(conf)
    return conf


def arb_env(conf: Settings) -> dict[str, str]:
    """``conf`` as the ``ARB_*`` variables the job reads (the fields this module sets)."""
    values: dict[str, Any] = {
        "kafka_bootstrap": conf.kafka_bootstrap, "kafka_partitions": conf.kafka_partitions,
        "influx_url": conf.influx_url, "mongo_uri": conf.mongo_uri.get_secret_value(),
        "mongo_db": conf.mongo_db, "influx_db": conf.influx_db,
        "state_dir": conf.state_dir, "lake_dir": conf.lake_dir, "data_dir": conf.data_dir,
        "starting_offsets": conf.starting_offsets, "trigger_seconds": conf.trigger_seconds,
        "spark_shuffle_partitions": conf.spark_shuffle_partitions,
        "influx_raw_retention": conf.influx_raw_retention,
        "influx_features_retention": conf.influx_features_retention,
        "episode_gap_seconds": conf.episode_gap_seconds,
        "stats_horizon_seconds": conf.stats_horizon_seconds,
    }
    return {f"ARB_{k.upper()}": str(v) for k, v in values.items()}


@pytest.fixture(scope="module")
def expected(conf: Settings) -> pd.DataFrame:
    """The slice's quotes as the stream receives them (test_e2e's ``expected``)."""
    return replayed_iaqf_quotes(conf.data_dir, START, END)


@dataclass(frozen=True)
class StreamRun:
    """The finished stream job: its application id, the driver's executor list (REST API,
    taken while it ran) and log, and its seconds from submit to the output's completion."""

    app_id: str
    executors: list[dict[str, Any]]
    log: str
    seconds: float


def _wait(what: str, done, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``done()`` every second until true. Raises AssertionError: the job exited or
    ``timeout`` s passed (with the driver log's tail)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"job exited ({proc.returncode}) before {what}: " + (
            log.read_text()[-4000:])
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s: " + (
            log.read_text()[-4000:])
        time.sleep(1.0)


def _targets(conf: Settings, expected: pd.DataFrame) -> tuple[int, int, int]:
    """How many spread points, opportunities and episodes the reference has."""
    spreads = reference_spreads(expected, conf.taker_fees, conf.window_seconds,
                                conf.max_quote_age_seconds, E2E._haircut(conf),
                                conf.notional_usd)
    episodes = E2E._reference_episodes(spreads[spreads["net"] > conf.min_net],
                                       conf.episode_gap_seconds, conf.window_seconds)
    return len(spreads), len(E2E._reference(conf, expected)), len(episodes)


def _complete(conf: Settings, targets: tuple[int, int, int]) -> bool:
    """The output is all there: as many spread points, opportunities and (closed) episodes
    as the reference has (their values are the tests')."""
    try:
        points = query(InfluxConfig.of(conf), 'SELECT count("net_bps") FROM "spread"')
        episodes = find_episodes(MongoConfig.of(conf), limit=100_000)
        opportunities = len(E2E._stored(conf)) if points else 0
    except Exception:  # the database is not created yet
        return False
    return (bool(points) and (points[0]["count"], opportunities, len(episodes)) == targets
            and all(d["status"] == "closed" for d in episodes))


@pytest.fixture(scope="module")
def stream_run(cluster: Cluster, shipped: Shipped, conf: Settings, expected: pd.DataFrame,
               tmp_path_factory: pytest.TempPathFactory) -> StreamRun:
    """``spark-submit spark_jobs/arbitrage.py`` on the cluster; once its three queries have
    completed a first micro-batch (their offsets pinned), the slice is replayed; once the
    output is complete the job is stopped (SIGTERM to its process group)."""
    root = tmp_path_factory.mktemp("driver")
    log, ui = root / "driver.log", free_port()
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*submit_args(cluster, shipped, ui), str(REPO / "spark_jobs" / "arbitrage.py")],
            cwd=root, env=job_env(shipped, arb_env(conf)), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        commits = [conf.checkpoint_dir / q / "commits" / "0" for q in QUERIES]
        _wait("first micro-batches", lambda: all(c.exists() for c in commits), proc, log, 300)
        replay_iaqf(conf, START, END, None, progress=False)
        targets = _targets(conf, expected)
        _wait("complete output", lambda: _complete(conf, targets), proc, log, 240)
        seconds = time.monotonic() - started
        [app] = get_json(f"http://127.0.0.1:{ui}/api/v1/applications")
        executors = get_json(f"http://127.0.0.1:{ui}/api/v1/applications/{app['id']}"
                             "/allexecutors")
    finally:
        stop_group(proc, grace=60)
    return StreamRun(app["id"], executors, log.read_text(), seconds)


def test_the_stream_ran_on_both_workers(stream_run: StreamRun, cluster: Cluster) -> None:
    """Two executors, one per worker, both ran tasks; the master lists the finished job and
    each worker the executor it ran for it."""
    print(f"stream on the cluster: submit to complete output {stream_run.seconds:.1f} s")
    workers = [e for e in stream_run.executors if e["id"] != "driver"]
    assert len(workers) == WORKERS, stream_run.executors
    assert all(e["totalTasks"] > 0 for e in workers), workers
    apps = {a["id"]: a for a in cluster.master_state()["completedapps"]}
    assert apps[stream_run.app_id]["name"] == "arbstream-arbitrage"
    ran = [[e for e in state["finishedexecutors"] if e["appid"] == stream_run.app_id]
           for state in cluster.worker_states()]
    assert [len(r) for r in ran] == [1] * WORKERS, ran
    assert sorted(str(r[0]["id"]) for r in ran) == sorted(e["id"] for e in workers)


def test_opportunities_equal_the_pandas_reference(stream_run, conf, expected) -> None:
    E2E.test_opportunities_equal_pandas_reference(stream_run, conf, expected)


def test_influx_has_every_quote_and_spread(stream_run, conf, expected) -> None:
    E2E.test_influx_has_every_quote_and_spread(stream_run, conf, expected)


def test_episodes_follow_the_opportunities(stream_run, conf, expected) -> None:
    E2E.test_episodes_follow_the_opportunities(stream_run, conf, expected)


def test_lake_equals_the_backfill_and_the_reference(stream_run, conf, data_dir: Path,
                                                    tmp_path: Path) -> None:
    """The lake the executors wrote equals the batch backfill's of the same slice, every row
    and column, and its spreads the pandas reference's."""
    assert conf.lake_dir is not None
    report = run_backfill(conf, tmp_path / "lake", end=END)
    counts = assert_same_lake(lake.LakeConfig(conf.lake_dir), lake.LakeConfig(tmp_path / "lake"))
    assert counts["spread"] == report.rows["spread"] > 5_000
    assert counts["opportunity"] > 100 and counts["episode"] > 5
    want = slice_spreads(data_dir, START, END, conf)
    got = lake.read(lake.LakeConfig(conf.lake_dir), "spread").to_pandas().sort_values(
        "opportunity_id").reset_index(drop=True)[OUTPUT_COLUMNS]
    pd.testing.assert_frame_equal(got, want, check_exact=True, check_dtype=False)
