"""Checkpoint fingerprints (``spark_jobs/checkpoint.py``): a checkpoint written under other
settings, or of unknown provenance, must stop the job with a clear error instead of silently
mixing old state with new semantics; Spark's own state-schema errors get the same treatment.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from pyspark.errors import StreamingQueryException
from pyspark.sql import functions as F

from arbstream.config import Settings
from arbstream.topics import ensure_topics
from spark_jobs.checkpoint import (
    FINGERPRINT_FILE,
    IncompatibleCheckpointError,
    check_queries,
    fingerprint,
    is_state_incompatibility,
    raise_if_incompatible,
    record,
    verify,
)

BASE: dict[str, Any] = {"exchanges": ["binance", "coinbase", "kraken"]}

#: (keyword changes, fingerprint setting that must be reported as different)
RELEVANT = [
    ({"exchanges": ["coinbase", "kraken"]}, "exchanges"),
    ({"fees": {"kraken": 0.003}}, "taker_fees"),
    ({"window_seconds": 2.5}, "window_seconds"),
    ({"max_quote_age_seconds": 10.0}, "max_quote_age_seconds"),
    ({"watermark_seconds": 20.0}, "watermark_seconds"),
    ({"min_net": 0.001}, "min_net"),
    ({"slippage_bps": 2.0}, "slippage_bps"),
    ({"latency_haircut_bps": 0.5}, "latency_haircut_bps"),
    ({"notional_usd": 5000.0}, "notional_usd"),
    ({"usd_quotes": ["USD", "USDT"]}, "usd_quotes"),
    ({"episode_gap_seconds": 30.0}, "episode_gap_seconds"),
    ({"stats_horizon_seconds": 600.0}, "stats_horizon_seconds"),
    ({"anomaly_sigma": 4.0}, "anomaly_sigma"),
    ({"health_interval_seconds": 10.0}, "health_interval_seconds"),
    ({"spark_shuffle_partitions": 8}, "spark_shuffle_partitions"),
]

SAFE = [
    {"trigger_seconds": 5.0},
    {"max_offsets_per_trigger": 500},
    {"max_offsets_per_trigger": None},
    {"starting_offsets": "latest"},
    {"fail_on_data_loss": False},
    {"influx_url": "http://influx.example:8086", "influx_db": "other", "influx_username": "u",
     "influx_password": "secret"},
    {"mongo_uri": "mongodb://user:secret@mongo.example:27017", "mongo_db": "other"},
    {"kafka_bootstrap": "broker.example:9092", "kafka_sasl_mechanism": "PLAIN",
     "kafka_sasl_username": "u", "kafka_sasl_password": "secret"},
    {"exchanges": ["kraken", "binance", "coinbase"]},  # order does not matter
    {"usd_quotes": ["USDC", "USDT", "USD"]},
    {"fees": {"bitstamp": 0.001}},  # an exchange the job does not read
    {"feed_stale_seconds": 60.0},
    {"influx_raw_retention": "INF", "mongo_ttl_days": 7.0},
]


def conf(tmp_path: Path, **changes: Any) -> Settings:
    return Settings(state_dir=tmp_path / "state", **{**BASE, **changes})


def spark_state(root: Path) -> None:
    """Files like those Spark leaves in a query checkpoint."""
    (root / "market" / "offsets").mkdir(parents=True)
    (root / "market" / "offsets" / "0").write_text('v1\n{}\n{"md.kraken.quotes": {"0": 5}}\n')
    (root / "market" / "metadata").write_text('{"id": "x"}\n')


# --- verify ------------------------------------------------------------------------------------


def test_new_checkpoint_records_its_fingerprint(tmp_path: Path) -> None:
    settings = conf(tmp_path)
    root = tmp_path / "missing" / "checkpoints"
    verify(settings, root)
    doc = json.loads((root / FINGERPRINT_FILE).read_text())
    assert doc["settings"] == fingerprint(settings)
    assert doc["settings"]["window_seconds"] == 1.0
    assert doc["settings"]["exchanges"] == ["binance", "coinbase", "kraken"]
    assert set(doc["settings"]["taker_fees"]) == {"binance", "coinbase", "kraken"}

    empty = tmp_path / "empty"  # empty query directories are still a new checkpoint
    (empty / "market" / "offsets").mkdir(parents=True)
    verify(settings, empty)
    assert (empty / FINGERPRINT_FILE).is_file()


def test_same_settings_pass_and_keep_the_file(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    verify(conf(tmp_path), root)
    before = (root / FINGERPRINT_FILE).read_bytes()
    spark_state(root)
    verify(conf(tmp_path), root)
    verify(conf(tmp_path), root)
    assert (root / FINGERPRINT_FILE).read_bytes() == before


@pytest.mark.parametrize(("changes", "name"), RELEVANT, ids=[n for _, n in RELEVANT])
def test_relevant_change_raises_listing_the_setting(
    tmp_path: Path, changes: dict[str, Any], name: str
) -> None:
    root = tmp_path / "ckpt"
    old, new = conf(tmp_path), conf(tmp_path, **changes)
    verify(old, root)
    spark_state(root)
    before = (root / FINGERPRINT_FILE).read_bytes()
    with pytest.raises(IncompatibleCheckpointError) as info:
        verify(new, root)
    err = info.value
    was, now = fingerprint(old)[name], fingerprint(new)[name]
    assert err.differences[name] == (was, now)
    assert set(err.differences) <= {name, "taker_fees"}  # fees are those of the exchanges
    message = str(err)
    assert f"{name}: {json.dumps(was, sort_keys=True)} → {json.dumps(now, sort_keys=True)}" in (
        message
    )
    assert str(root) in message and err.checkpoint == root
    for hint in ("ARB_STATE_DIR", "ARB_STARTING_OFFSETS", "idempotent", "delete"):
        assert hint in message
    assert (root / FINGERPRINT_FILE).read_bytes() == before  # never overwritten
    assert isinstance(err, RuntimeError)


def test_several_changes_are_all_listed(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    verify(conf(tmp_path), root)
    with pytest.raises(IncompatibleCheckpointError) as info:
        verify(conf(tmp_path, window_seconds=5.0, watermark_seconds=30.0), root)
    assert set(info.value.differences) == {"window_seconds", "watermark_seconds"}
    assert "window_seconds: 1.0 → 5.0" in str(info.value)
    assert "watermark_seconds: 10.0 → 30.0" in str(info.value)


@pytest.mark.parametrize("changes", SAFE, ids=[",".join(c) for c in SAFE])
def test_safe_change_passes(tmp_path: Path, changes: dict[str, Any]) -> None:
    root = tmp_path / "ckpt"
    verify(conf(tmp_path), root)
    spark_state(root)
    verify(conf(tmp_path, **changes), root)


def test_fingerprint_holds_no_secret_or_address(tmp_path: Path) -> None:
    text = json.dumps(fingerprint(conf(tmp_path, **SAFE[6], **SAFE[7])))
    assert "secret" not in text and "example" not in text


def test_layout_or_schema_version_of_an_older_job_raises(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    verify(conf(tmp_path), root)
    path = root / FINGERPRINT_FILE
    doc = json.loads(path.read_text())
    layout = doc["settings"]["job_layout_version"]
    doc["settings"]["job_layout_version"] = layout - 1
    doc["settings"].pop("anomaly_sigma")  # a setting an older arbstream did not record
    path.write_text(json.dumps(doc))
    with pytest.raises(IncompatibleCheckpointError) as info:
        verify(conf(tmp_path), root)
    assert f"job_layout_version: {layout - 1} → {layout}" in str(info.value)
    assert "anomaly_sigma: (not recorded) → 3.0" in str(info.value)


def test_spark_state_without_fingerprint_is_unknown_provenance(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    spark_state(root)
    with pytest.raises(IncompatibleCheckpointError) as info:
        verify(conf(tmp_path), root)
    message = str(info.value)
    assert "provenance unknown" in message and "older arbstream" in message
    assert "ARB_STATE_DIR" in message and str(root) in message
    assert not (root / FINGERPRINT_FILE).exists()
    record(conf(tmp_path), root)  # adopting it, as the message explains
    verify(conf(tmp_path), root)


def test_unreadable_fingerprint_raises(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / FINGERPRINT_FILE).write_text("{not json")
    with pytest.raises(IncompatibleCheckpointError, match="unreadable"):
        verify(conf(tmp_path), root)


def test_other_errors_are_not_checkpoint_errors(tmp_path: Path) -> None:
    assert not is_state_incompatibility(RuntimeError("Kafka broker unreachable"))
    raise_if_incompatible(ValueError("boom"), "market", tmp_path)  # returns, raises nothing


# --- Spark's own state-schema check ---------------------------------------------------------


def _run_available_now(df, checkpoint: Path):
    query = (
        df.writeStream.queryName(checkpoint.name).format("noop").outputMode("update")
        .option("checkpointLocation", str(checkpoint))
        .trigger(availableNow=True).start()
    )
    with contextlib.suppress(StreamingQueryException):
        query.awaitTermination(180)
    return query


def test_spark_state_schema_error_becomes_incompatible_checkpoint(spark, tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    (source / "part.json").write_text('{"k": "a", "v": 1}\n{"k": "b", "v": 2}\n')
    stream = spark.readStream.schema("k STRING, v BIGINT").json(str(source))
    checkpoint = tmp_path / "ckpt" / "agg"

    first = _run_available_now(stream.groupBy("k").count(), checkpoint)
    assert first.exception() is None
    (source / "more.json").write_text('{"k": "a", "v": 3}\n')
    second = _run_available_now(  # one state value column more than the checkpoint has
        stream.groupBy("k").agg(F.count("*").alias("n"), F.sum("v").alias("s")), checkpoint
    )
    exc = second.exception()
    assert exc is not None, "Spark accepted an incompatible state schema"
    assert is_state_incompatibility(exc), str(exc)[:500]
    with pytest.raises(IncompatibleCheckpointError) as info:
        raise_if_incompatible(exc, "agg", checkpoint)
    message = str(info.value)
    assert "'agg'" in message and str(checkpoint) in message
    assert "STATE_STORE" in message and "ARB_STATE_DIR" in message
    assert info.value.__cause__ is exc and info.value.checkpoint == checkpoint
    with pytest.raises(IncompatibleCheckpointError):
        check_queries([first, second], checkpoint.parent)
    check_queries([first], checkpoint.parent)  # a healthy query: nothing raised


# --- wired into the job ----------------------------------------------------------------------


def test_job_refuses_checkpoint_of_another_window(spark, settings: Settings, tmp_path) -> None:
    """Needs ``verify`` called at the top of ``spark_jobs.arbitrage.start``."""
    from spark_jobs import arbitrage

    one = settings.model_copy(update={
        "mongo_db": "checkpoint_test", "influx_db": "checkpoint_test",
        "starting_offsets": "latest", "trigger_seconds": 0.5,
    })
    ensure_topics(one)
    root = tmp_path / "checkpoints"
    queries = arbitrage.start(spark, one, root)
    try:
        deadline = time.monotonic() + 180
        while any(q.lastProgress is None for q in queries):
            assert time.monotonic() < deadline, "queries never made progress"
            for q in queries:
                assert q.exception() is None, q.exception()
            time.sleep(0.5)
    finally:
        for q in queries:
            q.stop()
    assert (root / "market" / "offsets" / "0").exists()
    fingerprint_file = root / FINGERPRINT_FILE
    assert fingerprint_file.is_file(), "arbitrage.start does not call checkpoint.verify"
    recorded = fingerprint_file.read_bytes()

    two = one.model_copy(update={"window_seconds": 2.5})  # 5 s quote age is 2 windows
    active = {q.id for q in spark.streams.active}
    started: list = []
    try:
        with pytest.raises(IncompatibleCheckpointError) as info:
            started = arbitrage.start(spark, two, root)
    finally:
        for q in started:
            q.stop()
    assert "window_seconds: 1.0 → 2.5" in str(info.value)
    assert {q.id for q in spark.streams.active} == active  # no query started
    assert fingerprint_file.read_bytes() == recorded
