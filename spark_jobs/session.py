"""SparkSession construction shared by ``arbstream stream``, ``spark-submit`` and the tests."""

from __future__ import annotations

import os
import shutil
import sys

from pyspark.sql import SparkSession

from arbstream.config import Settings
from spark_jobs.kafka_source import KafkaDataSource
from spark_jobs.market_source import MarketDataSource


def build_session(
    settings: Settings, app_name: str = "arbstream", ui: bool = False
) -> SparkSession:
    """Get or create the SparkSession, UTC everywhere, with the ``arbkafka`` source registered.

    Under ``spark-submit`` (a JVM gateway already exists) the master and resources come from
    spark-submit's own flags; otherwise ``settings.spark_master`` (``local[2]`` by default).

    The web UI (``ui``) never offers its kill links, and with a ``local[...]`` master the
    driver, and so the UI, binds to 127.0.0.1 unless ``SPARK_LOCAL_IP`` says otherwise:
    nothing outside this machine needs to reach a local job (Spark binds the UI to 0.0.0.0
    by default). On a cluster the driver must be reachable: set ``SPARK_LOCAL_IP`` and guard
    the UI (``spark.ui.filters``, a firewall) as the cluster's practice is.

    Java is not installed here: that is local-stack tooling
    (:func:`arbstream.shell.stack.ensure_java`, called by the CLI and the tests before this),
    never part of a job's code path.

    Raises:
        RuntimeError: not under spark-submit and no ``java`` on ``PATH``.
    """
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    if not submitted:
        if shutil.which("java") is None:
            raise RuntimeError("no java on PATH: Spark needs a Java 17+ runtime "
                               "(`arbstream up` installs OpenJDK 17 when run as root)")
        # Executors' Python workers must import arbstream: use this very interpreter.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        if settings.spark_master.startswith("local"):
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # the UI and driver ports
    builder = SparkSession.builder.appName(app_name)
    if not submitted:
        builder = builder.master(settings.spark_master).config(
            "spark.driver.memory", settings.spark_driver_memory)
    session = (
        builder.config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
        .config("spark.executor.extraJavaOptions", "-Duser.timezone=UTC")
        .config("spark.sql.shuffle.partitions", str(settings.spark_shuffle_partitions))
        .config("spark.ui.enabled", str(ui).lower())
        .config("spark.ui.killEnabled", "false")  # no "kill" links on the web UI
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.streaming.stateStore.providerClass",
                "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider")
        # Commit RocksDB state as a changelog, not a snapshot per batch: 0.7-3 s -> 40-110 ms
        # per stateful operator and micro-batch (bench/stream_bench.py).
        .config("spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled", "true")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # One FAIR pool per query (spark_jobs.arbitrage.start): a long market micro-batch
        # does not hold the health query's tasks back.
        .config("spark.scheduler.mode", "FAIR")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("WARN")
    session.dataSource.register(KafkaDataSource)
    session.dataSource.register(MarketDataSource)
    return session
