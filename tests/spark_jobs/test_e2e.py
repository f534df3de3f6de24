"""End to end on real data: replay → tansu → Spark → InfluxDB + SecantusDB (+ Kafka sinks).

The slice 2023-03-11 04:00–08:00 UTC (the USDC depeg weekend) is replayed into the running
stream; the opportunities in MongoDB must equal an independent pandas computation of the same
semantics (``tests/reference.py``) exactly. A malformed record sent first must land in
``md.deadletter`` while the stream goes on, and a second run over the same data (fresh
checkpoint, as ``arbstream demo`` does) must not add a single document or point.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from confluent_kafka import Producer

from arbstream.config import Settings
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.queries import query
from arbstream.store.mongo.episodes import find_episodes
from arbstream.store.mongo.opportunities import find_opportunities
from arbstream.topics import DEADLETTER, HEALTH, OPPORTUNITIES, ensure_topics, quotes_topic
from producers.replay.iaqf import replay_iaqf
from spark_jobs import arbitrage
from spark_jobs.kafka_source import end_offsets
from testing.reference import reference_opportunities, reference_spreads, replayed_iaqf_quotes
from testing.support import consume

pytestmark = pytest.mark.e2e

START = datetime(2023, 3, 11, 4, tzinfo=UTC)
END = datetime(2023, 3, 11, 8, tzinfo=UTC)
MALFORMED = b'{"schema_version": 1, "type": "quote", "exchange": "kraken", "bid": '
HEALTH_RECORD = {
    "schema_version": 1, "type": "health", "exchange": "kraken", "ts": 1_678_507_200_000,
    "messages_per_s": 12.5, "last_message_age_s": 0.25, "queue_depth": 3, "frames": 1000,
    "records": 990, "reconnects": 1, "duplicates_dropped": 7, "gaps": 0, "missing": 0,
    "deadletters": 2, "delivery_failures": 0,
}


def _run(spark, settings: Settings, checkpoint: Path, before_replay=None) -> None:
    queries = arbitrage.start(spark, settings, checkpoint)
    try:
        arbitrage.wait_started(queries, timeout=120)
        if before_replay:
            before_replay()
        replay_iaqf(settings, START, END, None, progress=False)
        arbitrage.wait_drained(queries, settings, timeout=600)
    finally:
        for q in queries:
            q.stop()


@pytest.fixture(scope="module")
def e2e_settings(settings: Settings) -> Settings:
    conf = settings.model_copy(update={
        "mongo_db": "e2e", "influx_db": "e2e", "starting_offsets": "latest",
        "trigger_seconds": 0.5,
        # 2023 data: keep it (a 30-day retention would drop it), and bar-sized episode gaps.
        "influx_raw_retention": "INF", "influx_features_retention": "INF",
        "episode_gap_seconds": 120.0, "stats_horizon_seconds": 3600.0,
    })
    ensure_topics(conf)
    return conf


@pytest.fixture(scope="module")
def expected(e2e_settings: Settings) -> pd.DataFrame:
    return replayed_iaqf_quotes(e2e_settings.data_dir, START, END)


@pytest.fixture(scope="module")
def first_run(spark, e2e_settings: Settings, tmp_path_factory) -> dict:
    conf = e2e_settings
    topics = [DEADLETTER, OPPORTUNITIES, HEALTH]
    before = end_offsets(conf.kafka_client_config(), topics)

    def send_malformed() -> None:
        producer = Producer(conf.kafka_client_config())
        producer.produce(quotes_topic("kraken"), key=b"BTC-USD", value=MALFORMED)
        producer.produce(HEALTH, key=b"kraken", value=json.dumps(HEALTH_RECORD).encode())
        producer.produce(HEALTH, key=b"kraken", value=b'{"type": "health"}')
        assert producer.flush(10) == 0

    _run(spark, conf, tmp_path_factory.mktemp("ckpt1"), send_malformed)
    return {"before": before}


def _stored(conf: Settings) -> pd.DataFrame:
    rows = find_opportunities(MongoConfig.of(conf), since=START, until=END + timedelta(seconds=10))
    return pd.DataFrame(rows).sort_values("opportunity_id").reset_index(drop=True)


def _haircut(conf: Settings) -> float:
    return (conf.slippage_bps + conf.latency_haircut_bps) / 10_000.0


def _reference(conf: Settings, expected: pd.DataFrame) -> pd.DataFrame:
    return reference_opportunities(
        expected, conf.taker_fees, conf.window_seconds, conf.max_quote_age_seconds,
        conf.min_net, _haircut(conf), conf.notional_usd,
    ).sort_values("opportunity_id").reset_index(drop=True)


def test_opportunities_equal_pandas_reference(first_run, e2e_settings, expected) -> None:
    conf = e2e_settings
    want = _reference(conf, expected)
    got = _stored(conf)
    assert len(want) > 100  # the depeg weekend has real gross-of-fee gaps
    assert want["cross_quote"].any() and not want["cross_quote"].all()
    assert got["opportunity_id"].tolist() == want["opportunity_id"].tolist()
    for col in ["sell_symbol", "cross_quote", "buy_ask", "sell_bid", "buy_fee", "sell_fee",
                "conversion_symbol", "conversion_exchange", "haircut", "gross", "net",
                "gross_bps", "net_bps", "size_base", "expected_profit", "expected_profit_usd"]:
        w = [None if isinstance(v, float) and v != v else v for v in want[col].tolist()]
        g = [None if isinstance(v, float) and v != v else v for v in got[col].tolist()]
        assert g == w, col
    for col in ["window_start", "window_end", "buy_ts", "sell_ts", "valid_from", "valid_to"]:
        assert [pd.Timestamp(v) for v in got[col]] == [pd.Timestamp(v) for v in want[col]], col
    assert got["windows"].tolist() == want["windows"].tolist()
    assert (want["windows"] > 1).any()  # a bar stays fresh for several windows: one document
    assert (got["net"] > conf.min_net).all()


def test_influx_has_every_quote_and_spread(first_run, e2e_settings, expected) -> None:
    conf = e2e_settings
    spreads = reference_spreads(
        expected, conf.taker_fees, conf.window_seconds, conf.max_quote_age_seconds,
        _haircut(conf), conf.notional_usd,
    )
    q = query(InfluxConfig.of(conf), 'SELECT count("bid") FROM "raw"."quote"')
    s = query(InfluxConfig.of(conf), 'SELECT count("net_bps") FROM "spread"')
    assert q[0]["count"] == len(expected)
    assert s[0]["count"] == len(spreads)
    top = spreads.sort_values("net_bps").iloc[-1]
    rows = query(
        InfluxConfig.of(conf),
        f"SELECT net_bps FROM spread WHERE symbol = '{top.symbol}' "
        f"AND sell_symbol = '{top.sell_symbol}' "
        f"AND buy_exchange = '{top.buy_exchange}' AND sell_exchange = '{top.sell_exchange}' "
        f"AND time = {int(top.window_end.timestamp() * 1000)}ms",
    )
    assert rows[0]["net_bps"] == top.net_bps


def test_malformed_record_dead_lettered_and_opportunities_published(
    first_run, e2e_settings
) -> None:
    conf = e2e_settings
    letters = [json.loads(m.value()) for m in
               consume(conf, DEADLETTER, first_run["before"].get(DEADLETTER, {}))]
    mine = [d for d in letters if d["raw"] == MALFORMED.decode()]
    assert len(mine) == 1
    assert mine[0]["reason"] == "malformed JSON"
    assert mine[0]["stage"] == "stream"
    assert mine[0]["source_topic"] == quotes_topic("kraken")
    published = consume(conf, OPPORTUNITIES, first_run["before"].get(OPPORTUNITIES, {}))
    events = [(m.key().decode(), json.loads(m.value())) for m in published]
    assert all(e["schema_version"] == 1 for _, e in events)
    opps = [(k, e) for k, e in events if e["type"] == "opportunity"]
    assert {k for k, _ in opps} == set(_stored(conf)["opportunity_id"])
    assert all(e["opportunity_id"] == k for k, e in opps)
    episodes = [(k, e) for k, e in events if e["type"] == "episode"]
    assert all(e["episode_id"] == k for k, e in episodes)
    stored = {d["episode_id"] for d in find_episodes(MongoConfig.of(conf), limit=100_000)}
    for event in ("opened", "closed"):
        assert {k for k, e in episodes if e["event"] == event} == stored, event


def _reference_episodes(opps: pd.DataFrame, gap_s: float, w_s: float) -> pd.DataFrame:
    """Episodes from the reference opportunities: a new one when a pair's next opportunity
    window ends more than ``gap_s`` after the previous one."""
    opps = opps.assign(key=[
        (f"{r.symbol}/{r.sell_symbol}" if r.cross_quote else r.symbol)
        + f"|{r.buy_exchange}|{r.sell_exchange}" for r in opps.itertuples()
    ]).sort_values(["key", "window_end"])
    gap = opps.groupby("key")["window_end"].diff() > pd.Timedelta(seconds=gap_s)
    opps["n"] = gap.groupby(opps["key"]).cumsum()
    eps = opps.groupby(["key", "n"]).agg(
        first=("window_end", "min"), end=("window_end", "max"), windows=("net_bps", "size"),
        peak_net_bps=("net_bps", "max"), mean_net_bps=("net_bps", "mean"),
    ).reset_index()
    eps["start"] = eps["first"] - pd.Timedelta(seconds=w_s)
    eps["episode_id"] = eps["key"] + "|" + eps["start"].dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return eps.sort_values("episode_id").reset_index(drop=True)


def test_episodes_follow_the_opportunities(first_run, e2e_settings, expected) -> None:
    conf = e2e_settings
    spreads = reference_spreads(expected, conf.taker_fees, conf.window_seconds,
                                conf.max_quote_age_seconds, _haircut(conf), conf.notional_usd)
    windows = spreads[spreads["net"] > conf.min_net]  # every opportunity window
    want = _reference_episodes(windows, conf.episode_gap_seconds, conf.window_seconds)
    got = pd.DataFrame(find_episodes(MongoConfig.of(conf), limit=100_000)).sort_values(
        "episode_id").reset_index(drop=True)
    assert len(want) > 5
    assert got["episode_id"].tolist() == want["episode_id"].tolist()
    assert (got["status"] == "closed").all()  # the closing heartbeats pass every gap
    assert got["windows"].tolist() == want["windows"].tolist()
    assert got["peak_net_bps"].tolist() == want["peak_net_bps"].tolist()
    assert got["mean_net_bps"].tolist() == pytest.approx(want["mean_net_bps"].tolist(),
                                                         rel=1e-12)
    durations = (want["end"] - want["start"]).dt.total_seconds().tolist()
    assert got["duration_s"].tolist() == durations
    assert got["expected_profit_usd"].notna().all()


def test_features_and_thresholds(first_run, e2e_settings, expected) -> None:
    conf = e2e_settings
    [f] = query(InfluxConfig.of(conf), 'SELECT count("mid") FROM "features"."features"')
    assert f["count"] > len(expected)  # each quote is in max_quote_age / W windows
    rows = query(InfluxConfig.of(conf), "SELECT * FROM \"features\".\"features\" WHERE "
                 "symbol = 'USDC-USD' AND exchange = 'kraken' LIMIT 400")
    assert min(r["mid"] for r in rows) < 0.95  # the depeg is in the features
    assert any(r["volatility"] is not None for r in rows)
    [p] = query(InfluxConfig.of(conf), 'SELECT count("p95_bps") FROM "spread_percentiles"')
    assert p["count"] > 0
    z = query(InfluxConfig.of(conf), 'SELECT count("spread_z") FROM "spread" WHERE anomaly = true')
    assert z and z[0]["count"] > 0


def test_producer_health_reaches_influx(first_run, e2e_settings) -> None:
    rows = query(InfluxConfig.of(e2e_settings), "SELECT * FROM health WHERE exchange = 'kraken'")
    [row] = [r for r in rows if r["time"] == HEALTH_RECORD["ts"]]
    for name, value in HEALTH_RECORD.items():
        if name not in ("schema_version", "type", "exchange", "ts"):
            assert row[name] == value, name
    letters = [json.loads(m.value()) for m in
               consume(e2e_settings, DEADLETTER, first_run["before"].get(DEADLETTER, {}))]
    assert any(d["source_topic"] == HEALTH and d["reason"] == "unsupported schema_version null"
               for d in letters)


def test_rerun_adds_no_duplicates(first_run, spark, e2e_settings, tmp_path_factory) -> None:
    conf = e2e_settings
    before = _stored(conf)
    points = query(InfluxConfig.of(conf), 'SELECT count("net_bps") FROM "spread"')[0]["count"]
    _run(spark, conf, tmp_path_factory.mktemp("ckpt2"))
    after = _stored(conf)
    assert len(after) == len(before)
    # emitted_ts is when the stream emitted this version (processing time): not content
    volatile = ["first_seen_at", "emitted_ts"]
    assert after.drop(columns=volatile).equals(before.drop(columns=volatile))
    assert (after["stage"] == "final").all()
    assert after["first_seen_at"].tolist() == before["first_seen_at"].tolist()
    assert query(InfluxConfig.of(conf),
                 'SELECT count("net_bps") FROM "spread"')[0]["count"] == points
