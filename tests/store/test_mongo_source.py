"""``arbmongo`` (:mod:`arbstream.store.mongo_source`): Spark reads the stream's MongoDB
collections as pymongo does.

The documents are real: the final opportunities and the episodes of the IAQF bars of
2023-03-11 22:00 .. 2023-03-12 02:00 UTC, computed by the backfill and stored through the
store's own upserts (as the stream's sink stores them), plus one opportunity document without
a window, which must not be left out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from pymongo import MongoClient

from arbstream.config import Settings
from arbstream.records import OPPORTUNITY_FIELDS
from arbstream.shell.backfill import Input, read_quotes
from arbstream.store import lake
from arbstream.store import mongo_source as M
from arbstream.store.config import MongoConfig
from arbstream.store.mongo.episodes import find_episodes, upsert_episodes
from arbstream.store.mongo.opportunities import upsert_opportunities
from spark_jobs.backfill import BackfillConfig, backfill

START = datetime(2023, 3, 11, 22, tzinfo=UTC)
END = datetime(2023, 3, 12, 2, tzinfo=UTC)
NO_TIME = {"_id": "no-window", "symbol": "BTC-USD", "net_bps": 1.5}


@pytest.fixture(scope="module")
def history(data_dir: Path, tmp_path_factory) -> lake.LakeConfig:
    conf = Settings(data_dir=data_dir, episode_gap_seconds=120.0,
                    lake_dir=tmp_path_factory.mktemp("mongo_source") / "lake")
    backfill((q.to_json() for q in read_quotes(conf, Input.iaqf, START, END)[1]), "iaqf",
             BackfillConfig.of(conf))
    return lake.LakeConfig.of(conf)


@pytest.fixture
def stored(msettings: MongoConfig, history: lake.LakeConfig) -> dict[str, list[dict]]:
    """Final opportunities and every episode event, upserted into a fresh database."""
    opps = lake.latest(lake.read(history, "opportunity"), "opportunity")
    opps = opps.filter(pa.compute.equal(opps["stage"], "final")).to_pylist()
    episodes = lake.read(history, "episode").to_pylist()
    assert len(opps) > 10 and len(episodes) > 10
    upsert_opportunities(msettings, opps)
    upsert_episodes(msettings, sorted(episodes, key=lambda e: e["event"] == "closed"))
    with MongoClient(msettings.uri.get_secret_value()) as client:
        client[msettings.db]["opportunities"].insert_one(dict(NO_TIME))
    return {"opportunities": opps, "episodes": episodes}


def _load(spark, conf: MongoConfig, collection: str, schema: str | None = None, **kw):
    spark.dataSource.register(M.MongoDataSource)
    reader = spark.read.format(M.FORMAT).options(
        **M.options(conf.uri.get_secret_value(), conf.db, collection, **kw))
    return (reader.schema(schema) if schema else reader).load()


def _pymongo(conf: MongoConfig, collection: str) -> dict[str, dict]:
    """Every document of ``collection`` by ``_id``, as pymongo reads it (UTC-aware)."""
    with MongoClient(conf.uri.get_secret_value(), tz_aware=True) as client:
        return {d["_id"]: d for d in client[conf.db][collection].find()}


def test_opportunities_read_as_pymongo_reads_them(spark, msettings, stored) -> None:
    df = _load(spark, msettings, "opportunities")
    assert df.columns == list(OPPORTUNITY_FIELDS)
    assert dict(df.dtypes)["window_end"] == "timestamp"
    got = {r["opportunity_id"]: r for r in df.toArrow().to_pylist()}
    want = _pymongo(msettings, "opportunities")
    assert sorted(got) == sorted(want) and NO_TIME["_id"] in got
    for oid, doc in want.items():
        for name in OPPORTUNITY_FIELDS:
            if name != "opportunity_id":
                assert got[oid][name] == doc.get(name), (oid, name)
    for row in stored["opportunities"]:  # the records as the stream computed them
        assert got[row["opportunity_id"]] == row
    assert got[NO_TIME["_id"]]["net_bps"] == 1.5 and got[NO_TIME["_id"]]["window_end"] is None
    # one partition per UTC day of the stored windows, and one for documents without one
    assert df.rdd.getNumPartitions() == 3


def test_a_time_range_and_a_schema_of_ones_own(spark, msettings, stored) -> None:
    since, until = datetime(2023, 3, 11, 23, 30, tzinfo=UTC), datetime(2023, 3, 12, 0, 30,
                                                                         tzinfo=UTC)
    df = _load(spark, msettings, "opportunities", since=since, until=until,
               slice_seconds=600)
    ids = sorted(r["opportunity_id"] for r in df.select("opportunity_id").collect())
    assert ids == sorted(o["opportunity_id"] for o in stored["opportunities"]
                         if since <= o["window_end"] < until)
    assert df.rdd.getNumPartitions() == 6  # 10-minute slices, no null-time partition
    episodes = _load(spark, msettings, "episodes",
                     schema="episode_id string, status string, first_seen_at timestamp, "
                            "`end` timestamp").toArrow()
    want = {e["episode_id"]: e for e in find_episodes(msettings, limit=100_000)}
    assert sorted(episodes.column("episode_id").to_pylist()) == sorted(want)
    for row in episodes.to_pylist():
        assert (row["status"], row["end"]) == (want[row["episode_id"]]["status"],
                                               want[row["episode_id"]]["end"])
        assert row["first_seen_at"] is not None


def test_bad_options_are_refused(spark, msettings) -> None:
    with pytest.raises(Exception, match="arbmongo reads the collections"):
        _load(spark, msettings, "alerts").collect()
    assert M.slices(5, 25, 10) == [(5, 10), (10, 20), (20, 25)]
