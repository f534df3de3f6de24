"""MongoDB and InfluxDB sinks against the real local servers of the session stack."""

from __future__ import annotations

import datetime as dt
import re
import socket
import time
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import BulkWriteError

from arbstream.config import Settings
from spark_jobs.sinks import influx, mongo

UTC = dt.UTC
T0 = dt.datetime(2023, 3, 11, 4, 0, 5, tzinfo=UTC)
T0_MS = 1678507205000


def _unique_name(request: pytest.FixtureRequest) -> str:
    return "t_sinks_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]


@pytest.fixture
def msettings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Session settings with a fresh MongoDB database for this test."""
    conf = settings.model_copy(update={"mongo_db": _unique_name(request)})
    with MongoClient(conf.mongo_uri.get_secret_value()) as client:
        client.drop_database(conf.mongo_db)
    return conf


@pytest.fixture
def isettings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Session settings with an InfluxDB database of this test's own, created."""
    conf = settings.model_copy(update={"influx_db": _unique_name(request)})
    influx.ensure_database(conf)
    return conf


def opportunity(
    symbol: str = "BTC-USD",
    window_end: dt.datetime = T0,
    buy: str = "kraken",
    sell: str = "coinbase",
    net_bps: float = 12.5,
) -> dict[str, Any]:
    end_utc = mongo.to_utc(window_end)
    stamp = end_utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{end_utc.microsecond // 1000:03d}Z"
    return {
        "opportunity_id": f"{symbol}|{stamp}|{buy}|{sell}",
        "symbol": symbol,
        "window_start": window_end - dt.timedelta(seconds=1),
        "window_end": window_end,
        "buy_exchange": buy,
        "sell_exchange": sell,
        "buy_ask": 20000.0,
        "sell_bid": 20200.0,
        "buy_ts": window_end - dt.timedelta(milliseconds=300),
        "sell_ts": window_end - dt.timedelta(milliseconds=100),
        "buy_fee": 0.0026,
        "sell_fee": 0.006,
        "gross": 0.01,
        "net": net_bps / 10_000,
        "gross_bps": 100.0,
        "net_bps": net_bps,
    }


def _coll(conf: Settings) -> Any:
    client = MongoClient(conf.mongo_uri.get_secret_value(), tz_aware=True, tzinfo=UTC)
    return client, client[conf.mongo_db][mongo.OPPORTUNITIES]


# --- MongoDB --------------------------------------------------------------------------------


def test_upsert_twice_keeps_one_document_per_opportunity(msettings: Settings) -> None:
    naive = dt.datetime(2023, 3, 11, 4, 0, 6)  # naive means UTC
    plus2 = dt.datetime(2023, 3, 11, 6, 0, 7, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    rows = [opportunity(), opportunity(window_end=naive), opportunity("ETH-USD", plus2)]

    assert mongo.upsert_opportunities(msettings, rows) == 3
    client, coll = _coll(msettings)
    with client:
        first = {d["_id"]: d for d in coll.find()}
        assert len(first) == 3
        doc = first["BTC-USD|2023-03-11T04:00:06.000Z|kraken|coinbase"]
        assert doc["window_end"] == dt.datetime(2023, 3, 11, 4, 0, 6, tzinfo=UTC)
        assert doc["buy_ts"] == dt.datetime(2023, 3, 11, 4, 0, 5, 700000, tzinfo=UTC)
        assert first["ETH-USD|2023-03-11T04:00:07.000Z|kraken|coinbase"]["window_end"] == (
            dt.datetime(2023, 3, 11, 4, 0, 7, tzinfo=UTC)
        )
        assert "opportunity_id" not in doc

        time.sleep(0.01)
        replay = [{**r, "net_bps": 99.0, "net": 0.0099} for r in rows]
        assert mongo.upsert_opportunities(msettings, iter(replay)) == 3
        second = {d["_id"]: d for d in coll.find()}
    assert second.keys() == first.keys()
    for oid, doc in second.items():
        assert doc["first_seen_at"] == first[oid]["first_seen_at"]
        assert doc["net_bps"] == 99.0 and doc["net"] == 0.0099
        assert doc["sell_bid"] == 20200.0 and doc["symbol"] == first[oid]["symbol"]


def test_upsert_empty_and_chunked_partitions(
    msettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert mongo.upsert_opportunities(msettings, []) == 0
    monkeypatch.setattr(mongo, "CHUNK_SIZE", 10)
    rows = [opportunity(window_end=T0 + dt.timedelta(seconds=i)) for i in range(25)]
    assert mongo.upsert_opportunities(msettings, iter(rows)) == 25  # three bulk writes
    assert mongo.upsert_opportunities(msettings, rows[5:] + rows[:5]) == 25
    client, coll = _coll(msettings)
    with client:
        assert coll.count_documents({}) == 25


def test_rows_without_id_are_rejected(msettings: Settings) -> None:
    with pytest.raises(ValueError, match="opportunity_id"):
        mongo.upsert_opportunities(msettings, [{**opportunity(), "opportunity_id": None}])


def test_unique_index_on_opportunity_key(msettings: Settings) -> None:
    mongo.upsert_opportunities(msettings, [opportunity()])
    client, coll = _coll(msettings)
    with client:
        assert mongo.ensure_indexes(client[msettings.mongo_db]) == list(mongo.INDEXES)  # again
        info = coll.index_information()
    uniq = info["uniq_symbol_window_pair"]
    assert uniq.get("unique") is True
    assert [k for k, _ in uniq["key"]] == ["symbol", "window_end", "buy_exchange", "sell_exchange"]
    assert info["window_end_desc"]["key"] == [("window_end", -1)]
    assert info["net_bps_desc"]["key"] == [("net_bps", -1)]
    assert [k for k, _ in info["symbol_window_end"]["key"]] == ["symbol", "window_end"]

    clash = {**opportunity(), "opportunity_id": "another id for the same opportunity"}
    with pytest.raises(BulkWriteError):
        mongo.upsert_opportunities(msettings, [clash])


def test_find_opportunities_filters_and_order(msettings: Settings) -> None:
    s = dt.timedelta(seconds=1)
    rows = [
        opportunity("BTC-USD", T0, "kraken", "coinbase", 5.0),
        opportunity("BTC-USD", T0, "binance", "coinbase", 20.0),
        opportunity("BTC-USD", T0 + s, "kraken", "coinbase", 1.0),
        opportunity("BTC-USD", T0 + 2 * s, "kraken", "coinbase", 30.0),
        opportunity("ETH-USD", T0 + s, "kraken", "gemini", 50.0),
    ]
    mongo.upsert_opportunities(msettings, rows)

    def keys(found: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
        return [
            (d["symbol"], int((d["window_end"] - T0).total_seconds()), d["net_bps"]) for d in found
        ]

    everything = mongo.find_opportunities(msettings)
    assert keys(everything) == [
        ("BTC-USD", 0, 20.0),
        ("BTC-USD", 0, 5.0),
        ("ETH-USD", 1, 50.0),
        ("BTC-USD", 1, 1.0),
        ("BTC-USD", 2, 30.0),
    ]
    assert everything[0]["opportunity_id"] == "BTC-USD|2023-03-11T04:00:05.000Z|binance|coinbase"
    assert everything[0]["window_end"].tzinfo is not None
    assert keys(mongo.find_opportunities(msettings, symbol="ETH-USD")) == [("ETH-USD", 1, 50.0)]
    # [since, until) is half-open on window_end; naive bounds are UTC
    assert keys(mongo.find_opportunities(msettings, since=T0 + s, until=T0 + 2 * s)) == [
        ("ETH-USD", 1, 50.0),
        ("BTC-USD", 1, 1.0),
    ]
    naive_since = (T0 + 2 * s).replace(tzinfo=None)
    assert keys(mongo.find_opportunities(msettings, since=naive_since)) == [("BTC-USD", 2, 30.0)]
    assert keys(mongo.find_opportunities(msettings, symbol="BTC-USD", min_net_bps=20.0)) == [
        ("BTC-USD", 0, 20.0),
        ("BTC-USD", 2, 30.0),
    ]
    assert keys(mongo.find_opportunities(msettings, limit=2, newest_first=True)) == [
        ("BTC-USD", 2, 30.0),
        ("ETH-USD", 1, 50.0),
    ]


def test_summary_counts_pairs_and_top(msettings: Settings) -> None:
    s = dt.timedelta(seconds=1)
    rows = [
        opportunity("BTC-USD", T0, "kraken", "coinbase", 5.0),
        opportunity("BTC-USD", T0 + s, "kraken", "coinbase", 15.0),
        opportunity("BTC-USD", T0 + 2 * s, "kraken", "coinbase", 10.0),
        opportunity("BTC-USD", T0, "binance", "coinbase", 20.0),
        opportunity("ETH-USD", T0, "kraken", "gemini", 50.0),
    ]
    mongo.upsert_opportunities(msettings, rows)
    mongo.upsert_opportunities(msettings, rows)  # replay changes nothing

    result = mongo.summary(msettings, top_n=2)
    assert result["total"] == 5
    assert result["pairs"] == [
        {
            "symbol": "BTC-USD",
            "buy_exchange": "kraken",
            "sell_exchange": "coinbase",
            "count": 3,
            "max_net_bps": 15.0,
            "avg_net_bps": 10.0,
        },
        {
            "symbol": "BTC-USD",
            "buy_exchange": "binance",
            "sell_exchange": "coinbase",
            "count": 1,
            "max_net_bps": 20.0,
            "avg_net_bps": 20.0,
        },
        {
            "symbol": "ETH-USD",
            "buy_exchange": "kraken",
            "sell_exchange": "gemini",
            "count": 1,
            "max_net_bps": 50.0,
            "avg_net_bps": 50.0,
        },
    ]
    assert [d["net_bps"] for d in result["top"]] == [50.0, 20.0]

    # [since, until) on window_end: only T0 + 1 s and T0 + 2 s remain
    window = mongo.summary(msettings, top_n=5, since=T0 + s, until=T0 + 3 * s)
    assert window["total"] == 2
    assert [(p["count"], p["max_net_bps"]) for p in window["pairs"]] == [(2, 15.0)]
    assert [d["net_bps"] for d in window["top"]] == [15.0, 10.0]


# --- InfluxDB line protocol ----------------------------------------------------------------


def quote(**over: Any) -> dict[str, Any]:
    row = {
        "exchange": "kraken",
        "symbol": "BTC-USD",
        "bid": 20000.5,
        "ask": 20001.0,
        "bid_size": 0.25,
        "ask_size": None,
        "exchange_ts": T0_MS + 123,
        "received_ts": T0_MS + 150,
    }
    return {**row, **over}


def test_line_protocol_formatting() -> None:
    assert influx.quote_line(quote()) == (
        "quote,exchange=kraken,symbol=BTC-USD ask=20001,bid=20000.5,bid_size=0.25 1678507205123"
    )
    # both sizes absent; ints become floats (no 'i' suffix, so no field type conflicts)
    line = influx.quote_line(quote(bid=20000, ask=20001, bid_size=None))
    assert line == "quote,exchange=kraken,symbol=BTC-USD ask=20001,bid=20000 1678507205123"
    # tag values are escaped by influxdb-client
    line = influx.quote_line(quote(exchange="a b,c=d", ask_size=3.0))
    assert line.startswith(r"quote,exchange=a\ b\,c\=d,symbol=BTC-USD ")
    assert "ask_size=3," in line

    spread = opportunity(window_end=dt.datetime(2023, 3, 11, 4, 0, 5, 250000))  # naive = UTC
    assert influx.spread_line(spread) == (
        "spread,buy_exchange=kraken,sell_exchange=coinbase,symbol=BTC-USD "
        "buy_ask=20000,gross_bps=100,net_bps=12.5,sell_bid=20200 1678507205250"
    )
    aware = opportunity(window_end=T0.astimezone(dt.timezone(dt.timedelta(hours=-5))))
    assert influx.spread_line(aware).endswith(f" {T0_MS}")
    assert influx.to_epoch_ms(T0) == T0_MS


# --- InfluxDB server -----------------------------------------------------------------------


def test_write_and_query_quotes_and_spreads(isettings: Settings) -> None:
    quotes = [
        quote(),
        quote(exchange="coinbase", bid=20002.0, ask=20003.5, bid_size=None, ask_size=1.5),
        quote(exchange_ts=T0_MS + 1000, bid=19999.0, ask=20000.0, bid_size=2.0, ask_size=3.0),
    ]
    spreads = [
        opportunity(),
        opportunity("ETH-USD", T0 + dt.timedelta(seconds=1), "binance", "gemini", -3.25),
    ]
    assert influx.write_quotes(isettings, quotes) == 3
    assert influx.write_spreads(isettings, spreads) == 2

    got = influx.query(isettings, "SELECT * FROM quote ORDER BY time")
    assert sorted(got, key=lambda r: (r["time"], r["exchange"])) == [
        {"time": T0_MS + 123, "exchange": "coinbase", "symbol": "BTC-USD", "bid": 20002,
         "ask": 20003.5, "bid_size": None, "ask_size": 1.5},
        {"time": T0_MS + 123, "exchange": "kraken", "symbol": "BTC-USD", "bid": 20000.5,
         "ask": 20001, "bid_size": 0.25, "ask_size": None},
        {"time": T0_MS + 1000, "exchange": "kraken", "symbol": "BTC-USD", "bid": 19999,
         "ask": 20000, "bid_size": 2, "ask_size": 3},
    ]  # fmt: skip
    got = influx.query(isettings, "SELECT * FROM spread ORDER BY time")
    assert got == [
        {"time": T0_MS, "symbol": "BTC-USD", "buy_exchange": "kraken",
         "sell_exchange": "coinbase", "gross_bps": 100, "net_bps": 12.5, "buy_ask": 20000,
         "sell_bid": 20200},
        {"time": T0_MS + 1000, "symbol": "ETH-USD", "buy_exchange": "binance",
         "sell_exchange": "gemini", "gross_bps": 100, "net_bps": -3.25, "buy_ask": 20000,
         "sell_bid": 20200},
    ]  # fmt: skip
    fields = influx.query(isettings, "SHOW FIELD KEYS FROM quote")
    assert {r["fieldKey"]: r["fieldType"] for r in fields} == dict.fromkeys(
        ["ask", "ask_size", "bid", "bid_size"], "float"
    )
    grouped = influx.query(isettings, "SELECT count(bid) FROM quote GROUP BY exchange")
    assert {r["exchange"]: r["count"] for r in grouped} == {"coinbase": 1, "kraken": 2}


def test_rewrite_does_not_add_points(isettings: Settings) -> None:
    quotes = [quote(exchange_ts=T0_MS + i) for i in range(50)]
    spreads = [opportunity(window_end=T0 + dt.timedelta(seconds=i)) for i in range(20)]
    for _ in range(2):
        assert influx.write_quotes(isettings, quotes) == 50
        assert influx.write_spreads(isettings, spreads) == 20
    with influx.InfluxWriter(isettings, batch_lines=7) as writer:  # several batches
        assert writer.write_lines(influx.quote_line(q) for q in quotes) == 50
    assert influx.query(isettings, "SELECT count(bid) FROM quote")[0]["count"] == 50
    assert influx.query(isettings, "SELECT count(net_bps) FROM spread")[0]["count"] == 20


def test_bad_line_protocol_is_a_clear_error_not_retried(isettings: Settings) -> None:
    writer = influx.InfluxWriter(isettings, retries=3, backoff=5.0)
    started = time.monotonic()
    with pytest.raises(influx.InfluxError, match="HTTP 400.*unable to parse") as err:
        writer.write_lines(["quote,exchange=kraken bid= 1678507205000"])
    assert time.monotonic() - started < 2.0  # a 4xx is never retried
    assert not isinstance(err.value, influx.InfluxUnavailableError)
    assert err.value.status == 400 and "missing field value" in err.value.body

    assert influx.write_quotes(isettings, [quote()]) == 1  # bid is a float field now
    with pytest.raises(influx.InfluxError, match="field type conflict"):
        writer.write_lines([f'quote,exchange=kraken bid="x" {T0_MS}'])
    with pytest.raises(influx.InfluxError, match="error parsing query"):
        influx.query(isettings, "SELEC bid FROM quote")


def test_missing_database_error_names_the_fix(isettings: Settings) -> None:
    missing = isettings.model_copy(update={"influx_db": isettings.influx_db + "_missing"})
    with pytest.raises(influx.InfluxError, match="database not found.*ensure_database"):
        influx.write_quotes(missing, [quote()])
    influx.ensure_database(missing)
    influx.ensure_database(missing)  # idempotent
    assert influx.write_quotes(missing, [quote()]) == 1


def test_unreachable_server_is_retried_then_raised(settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    down = settings.model_copy(update={"influx_url": f"http://127.0.0.1:{port}"})
    writer = influx.InfluxWriter(down, retries=2, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(influx.InfluxUnavailableError, match="after 3 attempts.*cannot reach"):
        writer.write_lines(["quote,exchange=kraken bid=1 1"])
    assert time.monotonic() - started >= 0.05 + 0.1  # backed off twice


def test_health_point_line_protocol() -> None:
    row = {"schema_version": 1, "type": "health", "exchange": "kraken", "ts": 1_700_000_000_123,
           "messages_per_s": 12.5, "last_message_age_s": None, "queue_depth": 3, "frames": 10,
           "records": 9, "reconnects": 1, "duplicates_dropped": 0, "gaps": 0, "missing": 0,
           "deadletters": 1, "delivery_failures": 0}
    line = influx.health_point(row).to_line_protocol()
    assert line.startswith("health,exchange=kraken ")
    assert line.endswith(" 1700000000123")
    assert "messages_per_s=12.5" in line and "frames=10," in line  # float 10.0 prints as 10
    assert "last_message_age_s" not in line  # null fields are left out
