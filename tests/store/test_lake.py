"""The Parquet history (:mod:`arbstream.store.lake`): layout, schemas, atomic and idempotent
writes, reads by time range, last versions, and Spark reading it.

The rows are the pandas reference's spreads (``testing/reference.py``) of real IAQF bars
around midnight 2023-03-12 UTC, so one batch spans two date partitions. Only the Spark test
needs more than the filesystem.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arbstream.config import Settings
from arbstream.records import OPPORTUNITY_FIELDS, SPREAD_FIELDS
from arbstream.store import lake
from producers.replay.iaqf import load_iaqf_quotes
from testing.reference import reference_spreads

MIDNIGHT = datetime(2023, 3, 12, tzinfo=UTC)


def slice_quotes(data_dir: Path, start: datetime, end: datetime) -> pd.DataFrame:
    """The IAQF quotes of ``[start, end)`` as a replay publishes them (``received_ts`` =
    ``exchange_ts``, the :class:`~arbstream.schemas.Quote` dedupe key), the reference's
    input."""
    quotes = load_iaqf_quotes(data_dir, start, end)
    quotes["received_ts"] = quotes["exchange_ts"]
    quotes["dedupe_key"] = [
        f"{e}:{s}:q:{t}:{b!r}:{a!r}:None:None"
        for e, s, t, b, a in zip(quotes.exchange, quotes.symbol, quotes.exchange_ts,
                                 quotes.bid, quotes.ask, strict=True)]
    return quotes


def slice_spreads(data_dir: Path, start: datetime, end: datetime, settings: Settings
                  ) -> pd.DataFrame:
    """The reference's spread rows of the IAQF quotes in ``[start, end)`` under
    ``settings`` (fees, window, quote age, haircuts, notional)."""
    return reference_spreads(
        slice_quotes(data_dir, start, end), settings.taker_fees, settings.window_seconds,
        settings.max_quote_age_seconds,
        (settings.slippage_bps + settings.latency_haircut_bps) / 10_000.0,
        settings.notional_usd)


@pytest.fixture(scope="module")
def rows(data_dir: Path) -> list[dict]:
    """Reference spread rows of 2023-03-11 23:57 .. 2023-03-12 00:03 UTC, as dicts."""
    spreads = slice_spreads(data_dir, MIDNIGHT - timedelta(minutes=3),
                            MIDNIGHT + timedelta(minutes=3), Settings())
    assert spreads["window_end"].min() < MIDNIGHT <= spreads["window_end"].max()
    return spreads.to_dict("records")


@pytest.fixture
def cfg(tmp_path: Path) -> lake.LakeConfig:
    return lake.LakeConfig(tmp_path / "lake")


def _ids(table: pa.Table) -> list[str]:
    return sorted(table.column("opportunity_id").to_pylist())


def test_config_defaults_to_the_state_dir(tmp_path: Path) -> None:
    assert lake.LakeConfig.of(Settings(state_dir=tmp_path, lake_dir=None)).dir == (
        tmp_path / "lake")
    assert lake.LakeConfig.of(Settings(lake_dir=tmp_path / "h")).dir == tmp_path / "h"


def test_layout_one_file_per_utc_date_with_the_record_schema(cfg, rows) -> None:
    written = lake.write(cfg, "spread", rows, "market-0000000007-00001")
    assert [p.relative_to(cfg.dir).as_posix() for p in written] == [
        "spread/date=2023-03-11/market-0000000007-00001.parquet",
        "spread/date=2023-03-12/market-0000000007-00001.parquet",
    ]
    for file, day in zip(written, ("2023-03-11", "2023-03-12"), strict=True):
        table = pq.read_table(file)
        assert table.schema.names == list(SPREAD_FIELDS)  # exactly the fields, in order
        assert table.schema.equals(lake.SCHEMAS["spread"])
        assert table.schema.field("window_end").type == pa.timestamp("us", tz="UTC")
        ends = table.column("window_end").to_pylist()
        assert {e.date().isoformat() for e in ends} == {day}
    assert sum(pq.read_metadata(f).num_rows for f in written) == len(rows)
    assert not [p for p in cfg.dir.rglob("*") if p.name.startswith(".")]  # no temp file left
    assert lake.path(cfg, "spread") == cfg.dir / "spread"


def test_episodes_partition_by_start_and_opportunities_keep_their_fields(cfg) -> None:
    start = MIDNIGHT - timedelta(seconds=30)
    episode = {"episode_id": "BTC-USD|kraken|coinbase|x", "event": "closed", "start": start,
               "end": start + timedelta(minutes=2), "windows": 3}
    [file] = lake.write(cfg, "episode", [episode], "k")
    assert file.parent.name == "date=2023-03-11"
    assert lake.SCHEMAS["opportunity"].names == list(OPPORTUNITY_FIELDS)
    assert lake.SCHEMAS["opportunity"].field("emitted_ts").type == pa.int64()


def test_rewriting_a_key_replaces_its_files(cfg, rows) -> None:
    first = lake.write(cfg, "spread", rows, "k1")
    files = sorted(cfg.dir.rglob("*.parquet"))
    assert lake.write(cfg, "spread", rows, "k1") == first  # a replayed batch: same key, rows
    assert sorted(cfg.dir.rglob("*.parquet")) == files
    assert _ids(lake.read(cfg, "spread")) == sorted(r["opportunity_id"] for r in rows)
    lake.write(cfg, "spread", rows[:5], "k2")  # another batch adds its own rows
    assert lake.read(cfg, "spread").num_rows == len(rows) + 5
    before_midnight = [r for r in rows if r["window_end"] < MIDNIGHT]
    lake.write(cfg, "spread", before_midnight[:1], "k1")  # that key and date: replaced
    assert lake.read(cfg, "spread", until=MIDNIGHT).num_rows == 1 + sum(
        r["window_end"] < MIDNIGHT for r in rows[:5])


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(cfg, rows, monkeypatch) -> None:
    [old, _] = lake.write(cfg, "spread", rows, "k")
    real = pq.write_table

    def crash(table: pa.Table, where, **kw) -> None:
        real(table.slice(0, 1), where, **kw)  # some bytes are out, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lake.pq, "write_table", crash)
    with pytest.raises(OSError, match="No space"):
        lake.write(cfg, "spread", rows[:3], "k")
    monkeypatch.undo()
    assert pq.read_metadata(old).num_rows == sum(r["window_end"] < MIDNIGHT for r in rows)
    assert not [p for p in cfg.dir.rglob("*") if p.name.startswith(".")]
    # a writer killed before its rename leaves a hidden temporary file: readers skip it
    (old.parent / f".{old.name}.deadbeef.tmp").write_bytes(b"PAR1 torn")
    assert lake.read(cfg, "spread").num_rows == len(rows)


def test_read_by_time_range_opens_only_the_dates_it_needs(cfg, rows) -> None:
    lake.write(cfg, "spread", rows, "k")
    since, until = MIDNIGHT - timedelta(seconds=30), MIDNIGHT + timedelta(seconds=65)
    got = lake.read(cfg, "spread", since, until)
    want = [r["opportunity_id"] for r in rows if since <= r["window_end"] < until]
    assert 0 < len(want) < len(rows)
    assert _ids(got) == sorted(want)
    assert got.schema.equals(lake.SCHEMAS["spread"])  # no partition column
    naive = lake.read(cfg, "spread", since.replace(tzinfo=None), until.replace(tzinfo=None))
    assert _ids(naive) == _ids(got)
    # a torn file in a date outside the range is never opened
    bad = lake.path(cfg, "spread") / "date=2023-03-10" / "x.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"not parquet")
    assert lake.read(cfg, "spread", since=MIDNIGHT).num_rows == sum(
        r["window_end"] >= MIDNIGHT for r in rows)
    with pytest.raises((OSError, pa.ArrowInvalid)):
        lake.read(cfg, "spread")
    assert lake.read(cfg, "feature").num_rows == 0  # nothing written yet: empty, typed
    assert lake.read(cfg, "feature").schema.equals(lake.SCHEMAS["feature"])


def test_tables_are_cast_and_bad_input_refused(cfg, rows) -> None:
    frame = pd.DataFrame(rows)
    table = pa.Table.from_pandas(frame.assign(extra=1), preserve_index=False)
    missing = [n for n in SPREAD_FIELDS if n not in table.column_names]
    with pytest.raises(ValueError, match="lack columns"):
        lake.write(cfg, "spread", table, "k")
    full = table.drop_columns(["extra"])
    for name in missing:
        full = full.append_column(name, pa.nulls(len(frame), lake.SCHEMAS["spread"].field(
            name).type))
    naive = full.set_column(full.schema.get_field_index("window_end"), "window_end",
                            full.column("window_end").cast(pa.timestamp("us")))
    lake.write(cfg, "spread", naive, "k")  # naive times are UTC, columns reordered
    assert _ids(lake.read(cfg, "spread")) == sorted(r["opportunity_id"] for r in rows)
    with pytest.raises(ValueError, match="unknown lake record"):
        lake.write(cfg, "quote", rows, "k")
    for key in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="lake key"):
            lake.write(cfg, "spread", rows, key)
    with pytest.raises(ValueError, match="without window_end"):
        lake.write(cfg, "spread", [{"opportunity_id": "x"}], "k")
    assert lake.write(cfg, "spread", [], "k") == []


def test_latest_keeps_the_last_version_of_each_id() -> None:
    t = MIDNIGHT
    opp = lake.to_table("opportunity", [
        {"opportunity_id": "a", "window_end": t, "stage": "final", "emitted_ts": 1,
         "windows": 2},
        {"opportunity_id": "a", "window_end": t, "stage": "final", "emitted_ts": 9,
         "windows": 5},
        {"opportunity_id": "b", "window_end": t, "stage": "retracted", "emitted_ts": 3}])
    got = lake.latest(opp, "opportunity").sort_by("opportunity_id")
    assert got.column("windows").to_pylist() == [5, None]
    ep = lake.to_table("episode", [
        {"episode_id": "e", "event": "closed", "start": t, "end": t, "windows": 1},
        {"episode_id": "e", "event": "opened", "start": t, "end": t, "windows": 1},
        {"episode_id": "e", "event": "closed", "start": t, "end": t + timedelta(seconds=9),
         "windows": 1}])
    [last] = lake.latest(ep, "episode").to_pylist()
    assert (last["event"], last["end"]) == ("closed", t + timedelta(seconds=9))


def _stream_batches(cfg: lake.LakeConfig, rows: list[dict], run: str, batches: int,
                    parts: int = 2) -> list[dict]:
    """Write ``rows`` spread over ``batches`` micro-batches x ``parts`` tasks of stream run
    ``run`` (keys as :func:`spark_jobs.sinks.records.lake_key`); the rows written."""
    chunks = [rows[i::batches * parts] for i in range(batches * parts)]
    for i, chunk in enumerate(chunks):
        lake.write(cfg, "spread", chunk, f"{run}-{i // parts:010d}-{i % parts:05d}")
    return [r for chunk in chunks for r in chunk]


def _content(table: pa.Table) -> list[tuple]:
    """The rows as sorted tuples (NaN as None, which compares equal): a multiset, so a
    duplicate shows."""
    return sorted((tuple(None if v != v else v for v in r.values()) for r in table.to_pylist()),
                  key=repr)


def _stream_files(cfg: lake.LakeConfig) -> list[str]:
    return sorted(p.name for p in cfg.dir.rglob("*.parquet")
                  if lake.STREAM_KEY.match(p.name.removesuffix(".parquet")))


def test_compaction_merges_stream_files_and_keeps_the_newest_batch(cfg, rows) -> None:
    run_a, run_b = "market-0123456789ab", "market-ba9876543210"
    _stream_batches(cfg, rows, run_a, batches=4)
    _stream_batches(cfg, rows[:40], run_b, batches=2)
    lake.write(cfg, "spread", rows[:10], "backfill-iaqf-00000001-0")
    before = _content(lake.read(cfg, "spread"))
    files = sorted(p.name for p in cfg.dir.rglob("*.parquet"))
    stream_before = _stream_files(cfg)
    assert lake.compact(cfg, dry_run=True)["merged"] > 0
    assert sorted(p.name for p in cfg.dir.rglob("*.parquet")) == files  # dry run: no change

    counts = lake.compact(cfg)
    assert _content(lake.read(cfg, "spread")) == before  # same rows, none twice
    left = sorted(p.name for p in cfg.dir.rglob("*.parquet"))
    assert len([n for n in left if n.startswith(lake.COMPACTED)]) == counts["partitions"] == 2
    # the newest batch of each run is left for a replay: run a's 3, run b's 1
    assert {n.rsplit("-", 1)[0] for n in _stream_files(cfg)} == {
        f"{run_a}-0000000003", f"{run_b}-0000000001"}
    assert "backfill-iaqf-00000001-0.parquet" in left
    assert counts["merged"] == counts["removed"] == len(stream_before) - len(_stream_files(cfg))
    for file in cfg.dir.rglob(f"{lake.COMPACTED}*.parquet"):
        table = pq.read_table(file)
        assert table.schema.names == list(SPREAD_FIELDS)
        ends = table.column("window_end").to_pylist()
        assert ends == sorted(ends)
    assert lake.compact(cfg)["merged"] == 0  # nothing left to merge

    # a replay of run a's newest batch rewrites its own files: still no duplicate
    for part, chunk in enumerate(rows[i::8] for i in (6, 7)):
        lake.write(cfg, "spread", chunk, f"{run_a}-0000000003-{part:05d}")
    assert _content(lake.read(cfg, "spread")) == before


def test_compaction_stopped_before_deleting_its_sources_does_not_duplicate(
    cfg, rows, monkeypatch,
) -> None:
    run = "market-0123456789ab"
    written = _stream_batches(cfg, rows, run, batches=3)
    once = _content(lake.read(cfg, "spread"))
    assert once == _content(lake.to_table("spread", written))
    unlink = Path.unlink

    def killed(self: Path, missing_ok: bool = False) -> None:
        if self.name.startswith(run):  # the sources survive the compacted file's write
            raise OSError("killed")
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(OSError, match="killed"):
        lake.compact(cfg)
    monkeypatch.undo()
    assert len(_content(lake.read(cfg, "spread"))) > len(once)  # sources and compacted

    more = _stream_batches(cfg, rows[:20], "market-ffffffffffff", batches=2)
    sources = len(_stream_files(cfg))
    stale = [n for n in _stream_files(cfg) if not n.startswith(f"{run}-0000000002")
             and n.startswith(run)]  # already in the compacted files
    fresh = [n for n in _stream_files(cfg) if n.startswith("market-ffffffffffff-0000000000")]
    manifests = list(cfg.dir.rglob(f"{lake.MANIFEST}*.json"))
    assert manifests and all((m.parent / json.loads(m.read_text())["compacted"]).is_file()
                             for m in manifests)
    merged_before = {n for m in manifests for n in json.loads(m.read_text())["sources"]}
    assert merged_before and merged_before <= set(stale)
    counts = lake.compact(cfg)  # the sources already merged are deleted, not merged again
    assert counts["removed"] == len(fresh) + len(stale)
    assert counts["merged"] == counts["removed"] - len(merged_before)
    assert not list(cfg.dir.rglob(f"{lake.MANIFEST}*"))
    assert _content(lake.read(cfg, "spread")) == _content(lake.to_table("spread",
                                                                         [*written, *more]))
    assert len(_stream_files(cfg)) == sources - counts["removed"]


def test_compaction_discards_a_manifest_whose_compacted_file_never_came(cfg, rows) -> None:
    written = _stream_batches(cfg, rows, "market-0123456789ab", batches=3)
    [directory, *_] = sorted(lake.path(cfg, "spread").glob("date=*"))
    sources = sorted(f.name for f in directory.glob("market*.parquet"))
    (directory / f"{lake.MANIFEST}0000000000000000.json").write_text(json.dumps(
        {"compacted": f"{lake.COMPACTED}0000000000000000.parquet", "sources": sources}))
    stale = directory / ".compacted-x.parquet.0123.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))  # a crashed writer's, long ago
    lake.compact(cfg)
    assert _content(lake.read(cfg, "spread")) == _content(lake.to_table("spread", written))
    assert not list(cfg.dir.rglob(f"{lake.MANIFEST}*")) and not stale.exists()


def test_a_reader_holding_the_lock_makes_compaction_wait(cfg, rows) -> None:
    _stream_batches(cfg, rows, "market-0123456789ab", batches=3)
    done = threading.Event()
    with lake.locked(cfg):  # a retrain reading the lake
        worker = threading.Thread(target=lambda: (lake.compact(cfg), done.set()))
        worker.start()
        assert not done.wait(1.0)  # compaction waits for the reader
        assert not list(cfg.dir.rglob(f"{lake.COMPACTED}*"))
    worker.join(30)
    assert done.is_set() and list(cfg.dir.rglob(f"{lake.COMPACTED}*"))


def test_compaction_refuses_an_unknown_record(cfg) -> None:
    with pytest.raises(ValueError, match="unknown lake record"):
        lake.compact(cfg, ["spreads"])


def test_spark_reads_the_lake_with_the_date_partition(spark, cfg, rows) -> None:
    lake.write(cfg, "spread", rows, "market-0000000001-00000")
    lake.write(cfg, "spread", rows[:3], "market-0000000002-00001")
    (lake.path(cfg, "spread") / "date=2023-03-12" / ".k.parquet.x.tmp").write_bytes(b"torn")
    df = spark.read.parquet(os.fspath(lake.path(cfg, "spread")))
    assert df.columns == [*SPREAD_FIELDS, "date"]
    types = dict(df.dtypes)
    assert (types["date"], types["window_end"], types["net_bps"]) == (
        "date", "timestamp", "double")
    assert df.count() == len(rows) + 3
    by_day = {r["date"].isoformat(): r["count"] for r in df.groupBy("date").count().collect()}
    before = sum(r["window_end"] < MIDNIGHT for r in rows)
    before3 = sum(r["window_end"] < MIDNIGHT for r in rows[:3])
    assert by_day == {"2023-03-11": before + before3,
                      "2023-03-12": len(rows) - before + 3 - before3}
    top = max(rows, key=lambda r: r["net_bps"])
    [row] = (df.where(df.opportunity_id == top["opportunity_id"]).limit(1)
             .selectExpr("net_bps", "unix_micros(window_end) AS end_us").collect())
    assert row["net_bps"] == top["net_bps"]
    assert row["end_us"] == top["window_end"].value // 1000
