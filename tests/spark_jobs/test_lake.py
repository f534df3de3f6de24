"""The lake written by the stream equals the lake written by ``arbstream backfill``.

Real IAQF bars of 2023-03-11 04:00-06:00 UTC (the USDC depeg weekend) go once through Kafka
into the running stream (as ``tests/spark_jobs/test_e2e.py`` replays them) and once through
:func:`spark_jobs.backfill.backfill`, each into a lake of its own. Every spread and feature
row must be equal, every column, and so must the last version of every episode and final
opportunity (but ``emitted_ts``, the processing time); the spreads must also equal the
independent pandas reference (``testing/reference.py``).

The backfill's own properties need no Spark: its lake does not depend on the chunk size nor
on where idleness flushes the operator, a re-run overwrites its files, and rejected records
are counted, never written.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from arbstream.config import Settings
from arbstream.shell.backfill import Input, read_quotes
from arbstream.store import lake
from arbstream.timestamps import to_ms
from arbstream.topics import ensure_topics
from producers.replay.iaqf import replay_iaqf
from spark_jobs import arbitrage
from spark_jobs.backfill import BackfillConfig, BackfillReport, backfill
from testing.reference import OUTPUT_COLUMNS
from tests.store.test_lake import slice_spreads

START = datetime(2023, 3, 11, 4, tzinfo=UTC)
END = datetime(2023, 3, 11, 6, tzinfo=UTC)
#: Sort keys of each record type: the pair (or leg) and its time; versions last.
KEYS = {
    "spread": ["symbol", "sell_symbol", "buy_exchange", "sell_exchange", "window_end"],
    "feature": ["symbol", "exchange", "window_end"],
    "episode": ["episode_id"],
    "opportunity": ["opportunity_id"],
}
#: Bar-sized episode gaps and an hour of rolling statistics, as the demo and test_e2e run.
BARS = {"episode_gap_seconds": 120.0, "stats_horizon_seconds": 3600.0}


def frame(cfg: lake.LakeConfig, record: str) -> pd.DataFrame:
    """The lake's ``record`` rows (the last version per id of episodes and opportunities,
    final opportunities only, without ``emitted_ts``), sorted by :data:`KEYS`."""
    table = lake.latest(lake.read(cfg, record), record)
    df = table.to_pandas()
    if record == "opportunity":
        df = df[df["stage"] == "final"].drop(columns="emitted_ts")
    return df.sort_values(KEYS[record], kind="stable").reset_index(drop=True)


def assert_same_lake(got: lake.LakeConfig, want: lake.LakeConfig) -> dict[str, int]:
    """Every record type's rows equal (:func:`frame`), exactly; returns the rows per type."""
    counts = {}
    for record in lake.RECORDS:
        g, w = frame(got, record), frame(want, record)
        pd.testing.assert_frame_equal(g, w, check_exact=True, obj=record)
        counts[record] = len(g)
    return counts


def run_backfill(conf: Settings, lake_dir: Path, chunk: int = 2_000, idle_ms: int | None = None,
                 wire: str = "bytes", end: datetime = END) -> BackfillReport:
    """Backfill the IAQF quotes of ``[START, end)`` (as the shell reads them, sent as JSON
    bytes or dicts) into ``lake_dir``."""
    cfg = BackfillConfig.of(conf.model_copy(update={"lake_dir": lake_dir}), chunk)
    if idle_ms is not None:
        cfg = BackfillConfig(cfg.decode, cfg.engine, cfg.lake, chunk, idle_ms)
    quotes = read_quotes(conf, Input.iaqf, START, end)[1]
    records = ([q.to_json() for q in quotes] if wire == "bytes" else
               [q.model_dump() for q in quotes])
    return backfill(records, "iaqf", cfg)


@pytest.fixture(scope="module")
def bars(data_dir: Path) -> Settings:
    """Settings of the fast tests: the defaults, bar-sized gaps, the recorded data."""
    return Settings(data_dir=data_dir, lake_dir=None, **BARS)


@pytest.fixture(scope="module")
def backfilled(bars: Settings, tmp_path_factory) -> tuple[lake.LakeConfig, BackfillReport]:
    lake_dir = tmp_path_factory.mktemp("backfill") / "lake"
    return lake.LakeConfig(lake_dir), run_backfill(bars, lake_dir)


# --- the backfill alone (fast: no Spark, no services) ------------------------------------------


def test_backfill_report_and_keys(bars, backfilled) -> None:
    cfg, report = backfilled
    total, quotes = read_quotes(bars, Input.iaqf, START, END)
    assert report.records == total == len(list(quotes)) > 1_000
    assert report.deadletters == {} and report.duplicates == 0
    assert (report.first_ts, report.last_ts) == (to_ms(START), to_ms(END) - 60_000)
    assert report.rows["spread"] > 20_000 and report.rows["opportunity"] > 100
    assert report.rows == {r: lake.read(cfg, r).num_rows for r in lake.RECORDS}
    files = sorted(p.relative_to(cfg.dir).as_posix() for p in cfg.dir.rglob("*.parquet"))
    assert len(files) == sum(report.files.values())
    assert all(re.fullmatch(r"(spread|feature|episode|opportunity)/date=2023-03-11/"
                            r"backfill-iaqf-\d{8}-[01]\.parquet", f) for f in files), files
    stages = set(lake.read(cfg, "opportunity").column("stage").to_pylist())
    assert stages <= {"final", "retracted"} and "final" in stages
    assert f"backfill iaqf: {total:,} records" in report.summary()


def test_backfill_does_not_depend_on_the_chunk_size(bars, backfilled, tmp_path) -> None:
    small = run_backfill(bars, tmp_path / "lake", chunk=151, wire="dicts")
    assert small.chunks == 9
    assert_same_lake(lake.LakeConfig(tmp_path / "lake"), backfilled[0])


def test_backfill_idles_in_event_time(bars, tmp_path) -> None:
    """An idle timeout shorter than the bars' minute: every bar is a silence after which the
    operator's timer closes the windows and flushes the open episodes (more versions in the
    lake), and nothing is late; the last versions are the same (half an hour: a flush per
    bar writes a file per bar)."""
    end = START + timedelta(minutes=30)
    flushing = run_backfill(bars, tmp_path / "flushing", idle_ms=30_000, end=end)
    quiet = run_backfill(bars, tmp_path / "quiet", end=end)
    assert (quiet.chunks, flushing.chunks) == (1, 30)  # the input is cut at every silence
    assert flushing.deadletters == {} == quiet.deadletters
    assert flushing.rows["episode"] > quiet.rows["episode"] > 0
    assert_same_lake(lake.LakeConfig(tmp_path / "flushing"), lake.LakeConfig(tmp_path / "quiet"))


def test_backfill_rerun_overwrites_its_files(bars, tmp_path) -> None:
    cfg = lake.LakeConfig(tmp_path / "lake")
    first = run_backfill(bars, cfg.dir)
    files = sorted(cfg.dir.rglob("*.parquet"))
    second = run_backfill(bars, cfg.dir)
    assert sorted(cfg.dir.rglob("*.parquet")) == files
    assert second.rows == first.rows == {r: lake.read(cfg, r).num_rows for r in lake.RECORDS}


def test_backfill_counts_rejected_records(bars, tmp_path) -> None:
    quotes = [q.to_json() for q in read_quotes(bars, Input.iaqf, START, END)[1]]
    crossed = {"schema_version": 1, "type": "quote", "exchange": "kraken",
               "symbol": "BTC-USD", "bid": 2.0, "ask": 1.0, "bid_size": None,
               "ask_size": None, "exchange_ts": 1_678_507_300_000,
               "received_ts": 1_678_507_300_000, "dedupe_key": "x"}
    records = [b'{"schema_version": 1, "type": "quote", "exchange": ', *quotes[:100],
               quotes[50], crossed, *quotes[100:], quotes[0].decode()]  # dup, late
    cfg = BackfillConfig.of(bars.model_copy(update={"lake_dir": tmp_path / "lake"}), 500)
    report = backfill(records, "iaqf", cfg)  # the late one comes chunks after the watermark
    assert report.deadletters == {"malformed JSON": 1, "crossed quote": 1, "late": 1}
    assert report.duplicates == 1
    assert report.records == len(quotes) + 4


# --- the stream's lake ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream_lake(spark, settings: Settings, tmp_path_factory) -> tuple[lake.LakeConfig, Settings]:
    """The slice replayed through Kafka into the running stream, with a lake of its own."""
    root = tmp_path_factory.mktemp("stream")
    conf = settings.model_copy(update={
        "mongo_db": "lake", "influx_db": "lake", "starting_offsets": "latest",
        "influx_raw_retention": "INF", "influx_features_retention": "INF",
        "lake_dir": root / "lake", **BARS,
    })
    ensure_topics(conf)
    queries = arbitrage.start(spark, conf, root / "checkpoint")
    try:
        arbitrage.wait_started(queries, timeout=120)
        replay_iaqf(conf, START, END, None, progress=False)
        arbitrage.wait_drained(queries, conf, timeout=300)
    finally:
        for q in queries:
            q.stop()
    return lake.LakeConfig(root / "lake"), conf


def test_backfill_equals_the_stream(stream_lake, tmp_path) -> None:
    cfg, conf = stream_lake
    files = [p.name for p in cfg.dir.rglob("*.parquet")]
    assert files and all(re.fullmatch(r"market-[0-9a-f]{12}-\d{10}-\d{5}\.parquet", f)
                         for f in files)  # market-<query id>-<batch>-<task partition>
    report = run_backfill(conf, tmp_path / "lake")
    counts = assert_same_lake(cfg, lake.LakeConfig(tmp_path / "lake"))
    assert counts["spread"] == report.rows["spread"] > 20_000  # one row per pair and window
    assert counts["feature"] == report.rows["feature"]
    assert counts["opportunity"] > 100 and counts["episode"] > 5


def test_stream_lake_spreads_equal_the_pandas_reference(stream_lake, data_dir) -> None:
    cfg, conf = stream_lake
    want = slice_spreads(data_dir, START, END, conf)
    got = lake.read(cfg, "spread").to_pandas().sort_values("opportunity_id").reset_index(
        drop=True)[OUTPUT_COLUMNS]
    assert len(got) == len(want)
    pd.testing.assert_frame_equal(got, want, check_exact=True, check_dtype=False)


def test_lake_keys_name_the_checkpoint(tmp_path) -> None:
    """Spark's checkpoint ``metadata`` (first line: the query id) names the stream's files, so
    a fresh checkpoint (batch ids from 0 again) cannot overwrite an earlier run's."""
    from spark_jobs.sinks.records import checkpoint_run, lake_key

    assert checkpoint_run(None) == checkpoint_run(tmp_path / "missing") == "market"
    (tmp_path / "metadata").write_text('{"id":"43cb5011-e41a-4f00-9c2b-0d0c1f2e3a4b"}\n')
    run = checkpoint_run(tmp_path)
    assert run == "market-43cb5011e41a"
    assert lake_key(4, 1, run) == "market-43cb5011e41a-0000000004-00001"
    assert lake_key(4, 1, run) != lake_key(4, 1, "market-0123456789ab")
