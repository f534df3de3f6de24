"""MongoDB and InfluxDB sinks against the real local servers of the session stack."""

from __future__ import annotations

import datetime as dt
import socket
import time
from dataclasses import replace
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import BulkWriteError

from arbstream.config import Settings
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.client import InfluxError, InfluxUnavailableError
from arbstream.store.influx.lines import (
    health_point,
    quote_line,
    spread_line,
    trade_point,
    trade_time_ns,
)
from arbstream.store.influx.queries import min_mid, query
from arbstream.store.influx.schema import ensure_database, ref
from arbstream.store.influx.writer import (
    InfluxWriter,
    write_episodes,
    write_features,
    write_percentiles,
    write_quotes,
    write_spreads,
    write_trades,
)
from arbstream.store.mongo import client as mongo_client
from arbstream.store.mongo.episodes import (
    EPISODE_SORTS,
    _episode_filter,
    count_cross_quote,
    find_episodes,
    upsert_episodes,
)
from arbstream.store.mongo.features import upsert_features, upsert_pair_features
from arbstream.store.mongo.opportunities import (
    _filter,
    delete_opportunities,
    find_opportunities,
    summary,
    upsert_opportunities,
)
from arbstream.store.mongo.schema import (
    EPISODES,
    FEATURES,
    INDEXES,
    OPPORTUNITIES,
    THRESHOLDS,
    TTL_COLLECTIONS,
    TTL_INDEX,
    ensure_indexes,
)
from arbstream.store.mongo.thresholds import upsert_thresholds
from arbstream.timestamps import to_ms, to_utc
from testing.support import unique_name

UTC = dt.UTC
T0 = dt.datetime(2023, 3, 11, 4, 0, 5, tzinfo=UTC)
T0_MS = 1678507205000


def opportunity(
    symbol: str = "BTC-USD",
    window_end: dt.datetime = T0,
    buy: str = "kraken",
    sell: str = "coinbase",
    net_bps: float = 12.5,
) -> dict[str, Any]:
    end_utc = to_utc(window_end)
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


def _coll(conf: MongoConfig) -> Any:
    client = MongoClient(conf.uri.get_secret_value(), tz_aware=True, tzinfo=UTC)
    return client, client[conf.db][OPPORTUNITIES]


# --- MongoDB --------------------------------------------------------------------------------


def test_upsert_twice_keeps_one_document_per_opportunity(msettings: MongoConfig) -> None:
    naive = dt.datetime(2023, 3, 11, 4, 0, 6)  # naive means UTC
    plus2 = dt.datetime(2023, 3, 11, 6, 0, 7, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    rows = [opportunity(), opportunity(window_end=naive), opportunity("ETH-USD", plus2)]

    assert upsert_opportunities(msettings, rows) == 3
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
        assert upsert_opportunities(msettings, iter(replay)) == 3
        second = {d["_id"]: d for d in coll.find()}
    assert second.keys() == first.keys()
    for oid, doc in second.items():
        assert doc["first_seen_at"] == first[oid]["first_seen_at"]
        assert doc["net_bps"] == 99.0 and doc["net"] == 0.0099
        assert doc["sell_bid"] == 20200.0 and doc["symbol"] == first[oid]["symbol"]


def test_upsert_empty_and_chunked_partitions(
    msettings: MongoConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert upsert_opportunities(msettings, []) == 0
    monkeypatch.setattr(mongo_client, "CHUNK_SIZE", 10)
    rows = [opportunity(window_end=T0 + dt.timedelta(seconds=i)) for i in range(25)]
    assert upsert_opportunities(msettings, iter(rows)) == 25  # three bulk writes
    assert upsert_opportunities(msettings, rows[5:] + rows[:5]) == 25
    client, coll = _coll(msettings)
    with client:
        assert coll.count_documents({}) == 25


def test_rows_without_id_are_rejected(msettings: MongoConfig) -> None:
    with pytest.raises(ValueError, match="opportunity_id"):
        upsert_opportunities(msettings, [{**opportunity(), "opportunity_id": None}])


def test_unique_index_on_opportunity_key(msettings: MongoConfig) -> None:
    upsert_opportunities(msettings, [opportunity()])
    client, coll = _coll(msettings)
    with client:
        again = ensure_indexes(client[msettings.db], ttl_seconds=msettings.ttl_seconds)
        assert again[OPPORTUNITIES] == [*INDEXES[OPPORTUNITIES],
                                        TTL_INDEX]
        info = coll.index_information()
    uniq = info["uniq_pair_window"]
    assert uniq.get("unique") is True
    assert [k for k, _ in uniq["key"]] == [
        "symbol", "sell_symbol", "window_end", "buy_exchange", "sell_exchange"
    ]
    assert info["window_end_net_bps"]["key"] == [("window_end", 1), ("net_bps", -1)]
    assert info["net_bps_desc"]["key"] == [("net_bps", -1)]
    assert [k for k, _ in info["symbol_window_end"]["key"]] == ["symbol", "window_end"]

    clash = {**opportunity(), "opportunity_id": "another id for the same opportunity"}
    with pytest.raises(BulkWriteError):
        upsert_opportunities(msettings, [clash])
    # the same buy leg, window and exchanges but another sell symbol is another opportunity
    usdc = {**opportunity(symbol="BTC-USDC"), "sell_symbol": "BTC-USD", "cross_quote": True}
    usdt = {**usdc, "opportunity_id": usdc["opportunity_id"] + "|BTC-USDT",
            "sell_symbol": "BTC-USDT"}
    assert upsert_opportunities(msettings, [usdc, usdt]) == 2


def test_find_opportunities_filters_and_order(msettings: MongoConfig) -> None:
    s = dt.timedelta(seconds=1)
    rows = [
        opportunity("BTC-USD", T0, "kraken", "coinbase", 5.0),
        opportunity("BTC-USD", T0, "binance", "coinbase", 20.0),
        opportunity("BTC-USD", T0 + s, "kraken", "coinbase", 1.0),
        opportunity("BTC-USD", T0 + 2 * s, "kraken", "coinbase", 30.0),
        opportunity("ETH-USD", T0 + s, "kraken", "gemini", 50.0),
    ]
    upsert_opportunities(msettings, rows)

    def keys(found: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
        return [
            (d["symbol"], int((d["window_end"] - T0).total_seconds()), d["net_bps"]) for d in found
        ]

    everything = find_opportunities(msettings)
    assert keys(everything) == [
        ("BTC-USD", 0, 20.0),
        ("BTC-USD", 0, 5.0),
        ("ETH-USD", 1, 50.0),
        ("BTC-USD", 1, 1.0),
        ("BTC-USD", 2, 30.0),
    ]
    assert everything[0]["opportunity_id"] == "BTC-USD|2023-03-11T04:00:05.000Z|binance|coinbase"
    assert everything[0]["window_end"].tzinfo is not None
    assert keys(find_opportunities(msettings, symbol="ETH-USD")) == [("ETH-USD", 1, 50.0)]
    # [since, until) is half-open on window_end; naive bounds are UTC
    assert keys(find_opportunities(msettings, since=T0 + s, until=T0 + 2 * s)) == [
        ("ETH-USD", 1, 50.0),
        ("BTC-USD", 1, 1.0),
    ]
    naive_since = (T0 + 2 * s).replace(tzinfo=None)
    assert keys(find_opportunities(msettings, since=naive_since)) == [("BTC-USD", 2, 30.0)]
    assert keys(find_opportunities(msettings, symbol="BTC-USD", min_net_bps=20.0)) == [
        ("BTC-USD", 0, 20.0),
        ("BTC-USD", 2, 30.0),
    ]
    assert keys(find_opportunities(msettings, limit=2, newest_first=True)) == [
        ("BTC-USD", 2, 30.0),
        ("ETH-USD", 1, 50.0),
    ]


def test_summary_counts_pairs_and_top(msettings: MongoConfig) -> None:
    s = dt.timedelta(seconds=1)
    rows = [
        opportunity("BTC-USD", T0, "kraken", "coinbase", 5.0),
        opportunity("BTC-USD", T0 + s, "kraken", "coinbase", 15.0),
        opportunity("BTC-USD", T0 + 2 * s, "kraken", "coinbase", 10.0),
        opportunity("BTC-USD", T0, "binance", "coinbase", 20.0),
        opportunity("ETH-USD", T0, "kraken", "gemini", 50.0),
    ]
    upsert_opportunities(msettings, rows)
    upsert_opportunities(msettings, rows)  # replay changes nothing

    result = summary(msettings, top_n=2)
    assert result["total"] == 5
    assert result["pairs"] == [
        {
            "symbol": "BTC-USD",
            "sell_symbol": "BTC-USD",
            "buy_exchange": "kraken",
            "sell_exchange": "coinbase",
            "count": 3,
            "max_net_bps": 15.0,
            "avg_net_bps": 10.0,
        },
        {
            "symbol": "BTC-USD",
            "sell_symbol": "BTC-USD",
            "buy_exchange": "binance",
            "sell_exchange": "coinbase",
            "count": 1,
            "max_net_bps": 20.0,
            "avg_net_bps": 20.0,
        },
        {
            "symbol": "ETH-USD",
            "sell_symbol": "ETH-USD",
            "buy_exchange": "kraken",
            "sell_exchange": "gemini",
            "count": 1,
            "max_net_bps": 50.0,
            "avg_net_bps": 50.0,
        },
    ]
    assert [d["net_bps"] for d in result["top"]] == [50.0, 20.0]

    # [since, until) on window_end: only T0 + 1 s and T0 + 2 s remain
    window = summary(msettings, top_n=5, since=T0 + s, until=T0 + 3 * s)
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
    assert quote_line(quote()) == (
        "quote,exchange=kraken,symbol=BTC-USD ask=20001,bid=20000.5,bid_size=0.25 1678507205123"
    )
    # both sizes absent; ints become floats (no 'i' suffix, so no field type conflicts)
    line = quote_line(quote(bid=20000, ask=20001, bid_size=None))
    assert line == "quote,exchange=kraken,symbol=BTC-USD ask=20001,bid=20000 1678507205123"
    # tag values are escaped by influxdb-client
    line = quote_line(quote(exchange="a b,c=d", ask_size=3.0))
    assert line.startswith(r"quote,exchange=a\ b\,c\=d,symbol=BTC-USD ")
    assert "ask_size=3," in line

    spread = opportunity(window_end=dt.datetime(2023, 3, 11, 4, 0, 5, 250000))  # naive = UTC
    assert spread_line(spread) == (  # old minimal rows: same-quote, sell_symbol=symbol
        "spread,buy_exchange=kraken,cross_quote=false,sell_exchange=coinbase,"
        "sell_symbol=BTC-USD,symbol=BTC-USD "
        "buy_ask=20000,gross_bps=100,net_bps=12.5,sell_bid=20200 1678507205250"
    )
    aware = opportunity(window_end=T0.astimezone(dt.timezone(dt.timedelta(hours=-5))))
    assert spread_line(aware).endswith(f" {T0_MS}")
    assert to_ms(T0) == T0_MS


# --- InfluxDB server -----------------------------------------------------------------------


def test_write_and_query_quotes_and_spreads(isettings: InfluxConfig) -> None:
    quotes = [
        quote(),
        quote(exchange="coinbase", bid=20002.0, ask=20003.5, bid_size=None, ask_size=1.5),
        quote(exchange_ts=T0_MS + 1000, bid=19999.0, ask=20000.0, bid_size=2.0, ask_size=3.0),
    ]
    spreads = [
        opportunity(),
        opportunity("ETH-USD", T0 + dt.timedelta(seconds=1), "binance", "gemini", -3.25),
    ]
    assert write_quotes(isettings, quotes) == 3
    assert write_spreads(isettings, spreads) == 2

    assert query(isettings, "SELECT * FROM quote") == []  # not in the default RP
    got = query(isettings, 'SELECT * FROM "raw"."quote" ORDER BY time')
    assert sorted(got, key=lambda r: (r["time"], r["exchange"])) == [
        {"time": T0_MS + 123, "exchange": "coinbase", "symbol": "BTC-USD", "bid": 20002,
         "ask": 20003.5, "bid_size": None, "ask_size": 1.5},
        {"time": T0_MS + 123, "exchange": "kraken", "symbol": "BTC-USD", "bid": 20000.5,
         "ask": 20001, "bid_size": 0.25, "ask_size": None},
        {"time": T0_MS + 1000, "exchange": "kraken", "symbol": "BTC-USD", "bid": 19999,
         "ask": 20000, "bid_size": 2, "ask_size": 3},
    ]  # fmt: skip
    got = query(isettings, "SELECT * FROM spread ORDER BY time")
    assert got == [
        {"time": T0_MS, "symbol": "BTC-USD", "sell_symbol": "BTC-USD", "cross_quote": "false",
         "buy_exchange": "kraken", "sell_exchange": "coinbase", "gross_bps": 100,
         "net_bps": 12.5, "buy_ask": 20000, "sell_bid": 20200},
        {"time": T0_MS + 1000, "symbol": "ETH-USD", "sell_symbol": "ETH-USD",
         "cross_quote": "false", "buy_exchange": "binance", "sell_exchange": "gemini",
         "gross_bps": 100, "net_bps": -3.25, "buy_ask": 20000, "sell_bid": 20200},
    ]  # fmt: skip
    fields = query(isettings, 'SHOW FIELD KEYS FROM "raw"."quote"')
    assert {r["fieldKey"]: r["fieldType"] for r in fields} == dict.fromkeys(
        ["ask", "ask_size", "bid", "bid_size"], "float"
    )
    grouped = query(isettings, 'SELECT count(bid) FROM "raw"."quote" GROUP BY exchange')
    assert {r["exchange"]: r["count"] for r in grouped} == {"coinbase": 1, "kraken": 2}


def test_rewrite_does_not_add_points(isettings: InfluxConfig) -> None:
    quotes = [quote(exchange_ts=T0_MS + i) for i in range(50)]
    spreads = [opportunity(window_end=T0 + dt.timedelta(seconds=i)) for i in range(20)]
    for _ in range(2):
        assert write_quotes(isettings, quotes) == 50
        assert write_spreads(isettings, spreads) == 20
    with InfluxWriter(isettings, batch_lines=7) as writer:  # several batches
        assert writer.write_lines((quote_line(q) for q in quotes), rp="raw") == 50
    assert query(isettings, 'SELECT count(bid) FROM "raw"."quote"')[0]["count"] == 50
    assert query(isettings, "SELECT count(net_bps) FROM spread")[0]["count"] == 20


def test_refused_lines_are_reported_not_retried(isettings: InfluxConfig) -> None:
    """A line InfluxDB refuses (4xx) is reported in ``rejected`` with the server's reason,
    never retried and never raised: the caller dead-letters it (spark_jobs.sinks.records)."""
    writer = InfluxWriter(isettings, retries=3, backoff=5.0)
    started = time.monotonic()
    assert writer.write_lines(["quote,exchange=kraken bid= 1678507205000"]) == 0
    assert time.monotonic() - started < 2.0  # a 4xx is never retried
    line, reason = writer.rejected[-1]
    assert line == "quote,exchange=kraken bid= 1678507205000"
    assert reason.startswith("HTTP 400: unable to parse") and "missing field value" in reason

    assert write_quotes(isettings, [quote()]) == 1  # bid is a float field now
    assert writer.write_lines([f'quote,exchange=kraken bid="x" {T0_MS}'], rp="raw") == 0
    assert "field type conflict" in writer.rejected[-1][1]
    with pytest.raises(InfluxError, match="error parsing query"):
        query(isettings, "SELEC bid FROM quote")


def test_missing_database_error_names_the_fix(isettings: InfluxConfig) -> None:
    missing = replace(isettings, db=isettings.db + "_missing")
    with pytest.raises(InfluxError, match="database not found.*ensure_database"):
        write_quotes(missing, [quote()])
    ensure_database(missing)
    ensure_database(missing)  # idempotent
    assert write_quotes(missing, [quote()]) == 1


def test_unreachable_server_is_retried_then_raised(settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    down = InfluxConfig.of(settings.model_copy(update={"influx_url": f"http://127.0.0.1:{port}"}))
    writer = InfluxWriter(down, retries=2, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(InfluxUnavailableError, match="after 3 attempts.*cannot reach"):
        writer.write_lines(["quote,exchange=kraken bid=1 1"])
    assert time.monotonic() - started >= 0.05 + 0.1  # backed off twice


def test_health_point_line_protocol() -> None:
    row = {"schema_version": 1, "type": "health", "exchange": "kraken", "ts": 1_700_000_000_123,
           "messages_per_s": 12.5, "last_message_age_s": None, "queue_depth": 3, "frames": 10,
           "records": 9, "reconnects": 1, "duplicates_dropped": 0, "gaps": 0, "missing": 0,
           "deadletters": 1, "delivery_failures": 0}
    line = health_point(row).to_line_protocol()
    assert line.startswith("health,exchange=kraken ")
    assert line.endswith(" 1700000000123")
    assert "messages_per_s=12.5" in line and "frames=10," in line  # float 10.0 prints as 10
    assert "last_message_age_s" not in line  # null fields are left out


# --- new records: spreads, episodes, features, percentiles, trades -------------------------

H = dt.timedelta(hours=1)
S = dt.timedelta(seconds=1)


def spread(**over: Any) -> dict[str, Any]:
    """A full cross-quote spread row as the stream hands it over (buy BTC-USDC, sell BTC-USD)."""
    row = {
        **opportunity("BTC-USDC", T0, "coinbase", "kraken", 8.5),
        "opportunity_id": "BTC-USDC/BTC-USD|2023-03-11T04:00:05.000Z|coinbase|kraken",
        "sell_symbol": "BTC-USD", "cross_quote": True,
        "conversion_symbol": "USDC-USD", "conversion_exchange": "kraken",
        "conversion_rate": 0.9125, "conversion_fee": 0.0026, "haircut": 0.0002,
        "size_base": 0.5, "size_source": "top_of_book", "buy_vwap": 20000.0,
        "sell_vwap": 20200.0, "expected_profit": 8.5, "profit_currency": "USDC",
        "expected_profit_usd": 7.75625, "episode_id": "ep-1", "spread_mean_bps": 2.5,
        "spread_std_bps": 2.0, "spread_z": 3.0, "anomaly": True, "is_opportunity": True,
        "extra_key": "ignored",
    }
    return {**row, **over}


def episode_event(event: str = "closed", **over: Any) -> dict[str, Any]:
    row = {
        "episode_id": "BTC-USDC/BTC-USD|coinbase|kraken|2023-03-11T04:00:05.000Z",
        "event": event, "status": "closed" if event == "closed" else "open",
        "symbol": "BTC-USDC", "sell_symbol": "BTC-USD", "cross_quote": True,
        "buy_exchange": "coinbase", "sell_exchange": "kraken",
        "start": T0, "end": T0 + 180 * S, "duration_s": 180.0, "windows": 4,
        "peak_net_bps": 42.5, "mean_net_bps": 20.25, "size_base": 0.5,
        "size_source": "notional", "expected_profit": 85.0, "profit_currency": "USDC",
        "expected_profit_usd": 77.5,
    }
    if event == "opened":
        row.update(end=T0, duration_s=0.0, windows=1, peak_net_bps=10.0, mean_net_bps=10.0)
    return {**row, **over}


def feature(**over: Any) -> dict[str, Any]:
    row = {
        "feature_id": "USDC-USD|kraken|2023-03-11T04:00:05.000Z", "symbol": "USDC-USD",
        "exchange": "kraken", "window_end": T0, "mid": 0.9125, "log_return": -0.0125,
        "volatility": 0.004, "quote_spread_bps": 10.5, "imbalance": None, "latency_ms": 120.0,
        "message_rate": 2.5, "volume": 1500.0, "volume_z": 4.25, "quote_age_s": 0.5,
        "volume_spike": True,
    }
    return {**row, **over}


def percentile(**over: Any) -> dict[str, Any]:
    row = {
        "threshold_id": "BTC-USD|BTC-USD|kraken|coinbase|2023-03-11T04:00:00.000Z",
        "symbol": "BTC-USD", "sell_symbol": "BTC-USD", "cross_quote": False,
        "buy_exchange": "kraken", "sell_exchange": "coinbase",
        "hour_start": dt.datetime(2023, 3, 11, 4), "count": 3600, "mean_bps": -5.5,
        "p50_bps": -4.0, "p75_bps": 1.5, "p95_bps": 9.25, "max_bps": 30.0,
        "aggressive_bps": -4.0, "moderate_bps": 1.5, "conservative_bps": 9.25,
    }
    return {**row, **over}


def trade(**over: Any) -> dict[str, Any]:
    row = {"exchange": "kraken", "symbol": "BTC-USD", "price": 20000.5, "size": 0.125,
           "side": "buy", "exchange_ts": T0_MS + 7, "trade_id": "t1"}
    return {**row, **over}


def _docs(conf: MongoConfig, collection: str) -> dict[str, dict[str, Any]]:
    with MongoClient(conf.uri.get_secret_value(), tz_aware=True, tzinfo=UTC) as client:
        return {d["_id"]: d for d in client[conf.db][collection].find()}


def _without_first_seen(docs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {f: v for f, v in d.items() if f != "first_seen_at"} for k, d in docs.items()}


def test_spread_point_with_every_optional_field() -> None:
    assert spread_line(spread()) == (
        "spread,buy_exchange=coinbase,cross_quote=true,sell_exchange=kraken,"
        "sell_symbol=BTC-USD,symbol=BTC-USDC "
        "anomaly=true,buy_ask=20000,conversion_rate=0.9125,expected_profit_usd=7.75625,"
        "gross_bps=100,net_bps=8.5,sell_bid=20200,size_base=0.5,spread_mean_bps=2.5,"
        f"spread_std_bps=2,spread_z=3 {T0_MS}"
    )
    # None statistics (not enough history yet) are left out; anomaly=False is written
    line = spread_line(spread(spread_mean_bps=None, spread_std_bps=None, spread_z=None,
                                     anomaly=False, size_base=None, expected_profit_usd=None,
                                     conversion_rate=None, cross_quote=False))
    assert line == (
        "spread,buy_exchange=coinbase,cross_quote=false,sell_exchange=kraken,"
        "sell_symbol=BTC-USD,symbol=BTC-USDC "
        f"anomaly=false,buy_ask=20000,gross_bps=100,net_bps=8.5,sell_bid=20200 {T0_MS}"
    )


def test_write_spreads_round_trip(isettings: InfluxConfig) -> None:
    rows = [spread(), spread(window_end=T0 + S, anomaly=False, spread_z=None)]
    for _ in range(2):  # a replay rewrites the same points
        assert write_spreads(isettings, rows) == 2
    got = query(isettings, "SELECT * FROM spread ORDER BY time")
    common = {"symbol": "BTC-USDC", "sell_symbol": "BTC-USD", "cross_quote": "true",
              "buy_exchange": "coinbase", "sell_exchange": "kraken", "gross_bps": 100,
              "net_bps": 8.5, "buy_ask": 20000, "sell_bid": 20200, "size_base": 0.5,
              "expected_profit_usd": 7.75625, "conversion_rate": 0.9125,
              "spread_mean_bps": 2.5, "spread_std_bps": 2}
    assert got == [
        {"time": T0_MS, **common, "spread_z": 3, "anomaly": True},
        {"time": T0_MS + 1000, **common, "spread_z": None, "anomaly": False},
    ]
    kinds = query(isettings, "SHOW FIELD KEYS FROM spread")
    assert {r["fieldKey"]: r["fieldType"] for r in kinds}["anomaly"] == "boolean"


def test_write_episodes_only_closed(isettings: InfluxConfig) -> None:
    opened = episode_event("opened")
    closed = episode_event("closed")
    other = episode_event("closed", episode_id="e2", symbol="ETH-USD", sell_symbol="ETH-USD",
                          cross_quote=False, start=T0 + H, expected_profit_usd=None)
    for _ in range(2):
        assert write_episodes(isettings, [opened, closed, other]) == 2
    got = query(isettings, "SELECT * FROM episode ORDER BY time")
    assert got == [
        {"time": T0_MS, "symbol": "BTC-USDC", "sell_symbol": "BTC-USD", "cross_quote": "true",
         "buy_exchange": "coinbase", "sell_exchange": "kraken", "duration_s": 180,
         "windows": 4, "peak_net_bps": 42.5, "mean_net_bps": 20.25,
         "expected_profit_usd": 77.5},
        {"time": T0_MS + 3_600_000, "symbol": "ETH-USD", "sell_symbol": "ETH-USD",
         "cross_quote": "false", "buy_exchange": "coinbase", "sell_exchange": "kraken",
         "duration_s": 180, "windows": 4, "peak_net_bps": 42.5, "mean_net_bps": 20.25,
         "expected_profit_usd": None},
    ]  # fmt: skip
    assert write_episodes(isettings, [opened]) == 0


def test_write_features_into_the_features_policy(isettings: InfluxConfig) -> None:
    rows = [feature(), feature(window_end=T0 + S, volume_spike=False, mid=0.95, volume_z=None)]
    for _ in range(2):
        assert write_features(isettings, rows) == 2
    assert query(isettings, "SELECT * FROM features") == []  # not the default RP
    got = query(isettings, 'SELECT * FROM "features"."features" ORDER BY time')
    common = {"symbol": "USDC-USD", "exchange": "kraken", "log_return": -0.0125,
              "volatility": 0.004, "quote_spread_bps": 10.5, "latency_ms": 120,
              "message_rate": 2.5, "volume": 1500, "quote_age_s": 0.5}
    assert got == [
        {"time": T0_MS, **common, "mid": 0.9125, "volume_z": 4.25, "volume_spike": True},
        {"time": T0_MS + 1000, **common, "mid": 0.95, "volume_z": None, "volume_spike": False},
    ]
    assert "imbalance" not in got[0]  # None in every row: never written
    assert ref("features") == '"features"."features"'


def test_write_percentiles(isettings: InfluxConfig) -> None:
    for _ in range(2):
        assert write_percentiles(isettings, [percentile()]) == 1
    got = query(isettings, "SELECT * FROM spread_percentiles")
    assert got == [
        {"time": T0_MS - 5000, "symbol": "BTC-USD", "sell_symbol": "BTC-USD",
         "cross_quote": "false", "buy_exchange": "kraken", "sell_exchange": "coinbase",
         "count": 3600, "mean_bps": -5.5, "p50_bps": -4, "p75_bps": 1.5, "p95_bps": 9.25,
         "max_bps": 30, "aggressive_bps": -4, "moderate_bps": 1.5, "conservative_bps": 9.25},
    ]  # fmt: skip
    kinds = query(isettings, "SHOW FIELD KEYS FROM spread_percentiles")
    assert {r["fieldType"] for r in kinds} == {"float"}  # count too: no type conflicts


def test_write_trades_into_the_raw_policy(isettings: InfluxConfig) -> None:
    # t1 and t2: one taker order filling two levels in the same millisecond, same side
    rows = [trade(), trade(trade_id="t2", price=20000.75, size=0.5),
            trade(trade_id="t3", side=None, price=20001, size=2, exchange_ts=T0_MS + 8)]
    ns = trade_time_ns(T0_MS + 7, "t1")
    assert ns // 1_000_000 == T0_MS + 7 and ns != trade_time_ns(T0_MS + 7, "t2")
    assert trade_point(rows[0]).to_line_protocol() == (
        "trade,exchange=kraken,side=buy,symbol=BTC-USD price=20000.5,size=0.125,"
        f'trade_id="t1" {ns}'
    )
    for _ in range(2):  # a rewrite lands on the same points
        assert write_trades(isettings, rows) == 3
    assert query(isettings, "SELECT * FROM trade") == []
    got = query(isettings, 'SELECT * FROM "raw"."trade"')
    assert sorted(got, key=lambda r: r["trade_id"]) == [
        {"time": T0_MS + 7, "exchange": "kraken", "symbol": "BTC-USD", "side": "buy",
         "price": 20000.5, "size": 0.125, "trade_id": "t1"},
        {"time": T0_MS + 7, "exchange": "kraken", "symbol": "BTC-USD", "side": "buy",
         "price": 20000.75, "size": 0.5, "trade_id": "t2"},
        {"time": T0_MS + 8, "exchange": "kraken", "symbol": "BTC-USD", "side": None,
         "price": 20001, "size": 2, "trade_id": "t3"},
    ]  # fmt: skip


def test_ensure_database_creates_and_alters_retention_policies(
    settings: Settings, request: pytest.FixtureRequest
) -> None:
    conf = InfluxConfig.of(settings.model_copy(update={"influx_db": unique_name(request),
                                                       "influx_raw_retention": "2w"}))
    ensure_database(conf)
    ensure_database(conf)  # idempotent

    def policies() -> dict[str, tuple[str, bool]]:
        rows = query(conf, f'SHOW RETENTION POLICIES ON "{conf.db}"')
        return {r["name"]: (r["duration"], r["default"]) for r in rows}

    assert policies() == {"autogen": ("0s", True), "raw": ("336h0m0s", False),
                          "features": ("4320h0m0s", False)}
    altered = replace(conf, raw_retention="30d", features_retention="INF")
    ensure_database(altered)
    assert policies() == {"autogen": ("0s", True), "raw": ("720h0m0s", False),
                          "features": ("0s", False)}


def test_points_beyond_retention_are_dropped_not_raised(
    settings: Settings, request: pytest.FixtureRequest
) -> None:
    conf = InfluxConfig.of(  # raw: 30d
        settings.model_copy(update={"influx_db": unique_name(request)}))
    ensure_database(conf)
    now_ms = int(time.time() * 1000)
    with InfluxWriter(conf) as writer:
        lines = [quote_line(quote()), quote_line(quote(exchange_ts=now_ms))]
        assert writer.write_lines(lines, rp="raw") == 1  # the 2023 quote is too old
        assert writer.dropped == 1
    assert write_quotes(conf, [quote()]) == 0
    got = query(conf, 'SELECT bid FROM "raw"."quote"')
    assert [r["time"] for r in got] == [now_ms]
    with pytest.raises(InfluxError, match="retention policy not found.*ensure_database"):
        InfluxWriter(conf, retries=3, backoff=5.0).write_lines(
            [quote_line(quote())], rp="nope"
        )


def test_min_mid_across_exchanges(isettings: InfluxConfig) -> None:
    rows = [
        quote(symbol="USDC-USD", bid=0.90, ask=0.92, exchange_ts=T0_MS),
        quote(symbol="USDC-USD", bid=0.87, ask=0.89, exchange_ts=T0_MS + 60_000),
        quote(symbol="USDC-USD", exchange="coinbase", bid=0.88, ask=0.885,
              exchange_ts=T0_MS + 120_000),
        quote(symbol="BTC-USD", bid=0.1, ask=0.1, exchange_ts=T0_MS),
    ]
    write_quotes(isettings, rows)
    assert min_mid(isettings, "USDC-USD") == {
        "mid": pytest.approx(0.88), "exchange": "kraken", "time": T0 + 60 * S,
    }
    after = min_mid(isettings, "USDC-USD", since=T0 + 61 * S)
    assert after == {"mid": pytest.approx(0.8825), "exchange": "coinbase", "time": T0 + 120 * S}
    before = min_mid(isettings, "USDC-USD", until=T0 + 60 * S)  # until is exclusive
    assert before == {"mid": pytest.approx(0.91), "exchange": "kraken", "time": T0}
    assert min_mid(isettings, "USDC-USD", since=T0 + H) is None
    assert min_mid(isettings, "ETH-USD") is None


# --- MongoDB: episodes, features, thresholds, indexes --------------------------------------


def test_upsert_episodes_open_then_close_is_replay_safe(msettings: MongoConfig) -> None:
    opened, closed = episode_event("opened"), episode_event("closed")
    eid = opened["episode_id"]
    assert upsert_episodes(msettings, [opened]) == 1
    doc = _docs(msettings, EPISODES)[eid]
    assert doc["status"] == "open" and doc["windows"] == 1 and doc["end"] == T0
    assert "event" not in doc and "episode_id" not in doc
    first_seen = doc["first_seen_at"]

    assert upsert_episodes(msettings, [closed]) == 1
    final = _docs(msettings, EPISODES)
    assert final[eid] == {
        "_id": eid, "status": "closed", "symbol": "BTC-USDC", "sell_symbol": "BTC-USD",
        "cross_quote": True, "buy_exchange": "coinbase", "sell_exchange": "kraken",
        "start": T0, "end": T0 + 180 * S, "duration_s": 180.0, "windows": 4,
        "peak_net_bps": 42.5, "mean_net_bps": 20.25, "size_base": 0.5,
        "size_source": "notional", "expected_profit": 85.0, "profit_currency": "USDC",
        "expected_profit_usd": 77.5, "first_seen_at": first_seen,
    }
    # a replayed batch (opened after closed, in either order) regresses nothing
    assert upsert_episodes(msettings, [opened]) == 1
    assert upsert_episodes(msettings, [closed, opened]) == 2
    assert _docs(msettings, EPISODES) == final


def test_upsert_episodes_closed_first_then_opened(msettings: MongoConfig) -> None:
    closed = episode_event("closed", status="open")  # the event decides the status
    assert upsert_episodes(msettings, iter([closed, episode_event("opened")])) == 2
    [doc] = _docs(msettings, EPISODES).values()
    assert doc["status"] == "closed" and doc["windows"] == 4 and doc["peak_net_bps"] == 42.5
    assert isinstance(doc["first_seen_at"], dt.datetime)
    assert upsert_episodes(msettings, []) == 0
    with pytest.raises(ValueError, match="event must be 'opened' or 'closed'"):
        upsert_episodes(msettings, [{**episode_event("closed"), "event": "extended"}])
    with pytest.raises(ValueError, match="episode_id"):
        upsert_episodes(msettings, [episode_event("closed", episode_id=None)])


def _episodes() -> list[dict[str, Any]]:
    def ep(eid: str, symbol: str, start_min: int, peak: float, duration: float,
           profit: float | None, status: str = "closed", sell: str | None = None
           ) -> dict[str, Any]:
        sell = sell or symbol
        return episode_event(
            "closed" if status == "closed" else "opened", episode_id=eid, symbol=symbol,
            sell_symbol=sell, cross_quote=sell != symbol, start=T0 + start_min * 60 * S,
            peak_net_bps=peak, duration_s=duration, expected_profit_usd=profit,
        )

    return [
        ep("a", "BTC-USD", 0, 10.0, 60.0, 5.0),
        ep("b", "BTC-USDC", 1, 50.0, 30.0, 40.0, sell="BTC-USD"),
        ep("c", "BTC-USD", 2, 30.0, 300.0, None),
        ep("d", "ETH-USDC", 3, 20.0, 120.0, 90.0, status="open", sell="ETH-USD"),
    ]


def test_find_episodes_filters_and_sorts(msettings: MongoConfig) -> None:
    upsert_episodes(msettings, _episodes())

    def ids(**kwargs: Any) -> str:
        return "".join(d["episode_id"] for d in find_episodes(msettings, **kwargs))

    assert ids() == "bcda"  # peak net bps, largest first
    assert ids(sort="duration_s") == "cdab"
    assert ids(sort="expected_profit_usd") == "dbac"  # no profit last
    assert ids(sort="start") == "abcd"
    assert ids(symbol="BTC-USD") == "ca"
    assert ids(since=T0 + 60 * S, until=T0 + 180 * S) == "bc"  # [since, until) on start
    assert ids(since=(T0 + 180 * S).replace(tzinfo=None)) == "d"  # naive means UTC
    assert ids(status="open") == "d"
    assert ids(status="closed", sort="start") == "abc"
    assert ids(cross_quote=True) == "bd"
    assert ids(cross_quote=False) == "ca"
    assert ids(min_peak_bps=30.0) == "bc"
    assert ids(limit=2) == "bc"
    assert ids(limit=0) == "bcda"
    doc = find_episodes(msettings, symbol="BTC-USDC")[0]
    assert doc["episode_id"] == "b" and "_id" not in doc and doc["start"].tzinfo is not None
    with pytest.raises(ValueError, match="sort must be one of"):
        find_episodes(msettings, sort="net_bps")
    with pytest.raises(ValueError, match="status must be"):
        find_episodes(msettings, status="opened")


def test_count_cross_quote(msettings: MongoConfig) -> None:
    upsert_episodes(msettings, _episodes())
    upsert_opportunities(msettings, [spread(), spread(
        opportunity_id="x", window_end=T0 + H, sell_symbol="BTC-USDT"), opportunity()])
    assert count_cross_quote(msettings) == {"opportunities": 2, "episodes": 2}
    assert count_cross_quote(msettings, since=T0 + 120 * S, until=T0 + H) == {
        "opportunities": 0, "episodes": 1,
    }


def test_upsert_pair_features(msettings: MongoConfig) -> None:
    minimal = opportunity()  # an old-style row: no statistics, no sell symbol
    assert upsert_pair_features(msettings, [spread(), minimal]) == 2
    docs = _docs(msettings, FEATURES)
    assert _without_first_seen(docs) == {
        "pair|" + spread()["opportunity_id"]: {
            "_id": "pair|" + spread()["opportunity_id"], "kind": "pair",
            "symbol": "BTC-USDC", "sell_symbol": "BTC-USD", "cross_quote": True,
            "buy_exchange": "coinbase", "sell_exchange": "kraken", "window_end": T0,
            "net_bps": 8.5, "gross_bps": 100.0, "spread_mean_bps": 2.5, "spread_std_bps": 2.0,
            "spread_z": 3.0, "anomaly": True,
        },
        "pair|" + minimal["opportunity_id"]: {
            "_id": "pair|" + minimal["opportunity_id"], "kind": "pair", "symbol": "BTC-USD",
            "sell_symbol": "BTC-USD", "cross_quote": False, "buy_exchange": "kraken",
            "sell_exchange": "coinbase", "window_end": T0, "net_bps": 12.5,
            "gross_bps": 100.0, "spread_mean_bps": None, "spread_std_bps": None,
            "spread_z": None, "anomaly": None,
        },
    }
    assert upsert_pair_features(msettings, [spread(), minimal]) == 2
    assert _docs(msettings, FEATURES) == docs  # identical, first_seen_at included


def test_delete_opportunities_removes_them_and_their_pair_features(msettings: MongoConfig
                                                                    ) -> None:
    kept, gone = opportunity(), opportunity(sell="bitstamp")
    upsert_opportunities(msettings, [kept, gone])
    upsert_pair_features(msettings, [kept, gone])
    assert delete_opportunities(msettings, [gone["opportunity_id"], "never-stored"]) == 1
    assert set(_docs(msettings, OPPORTUNITIES)) == {kept["opportunity_id"]}
    assert set(_docs(msettings, FEATURES)) == {"pair|" + kept["opportunity_id"]}
    assert delete_opportunities(msettings, []) == 0


def test_upsert_features_and_thresholds(msettings: MongoConfig) -> None:
    rows = [feature(), feature(feature_id="USDC-USD|kraken|x", window_end=T0 + S, mid=None)]
    assert upsert_features(msettings, rows) == 2
    docs = _docs(msettings, FEATURES)
    expected = {k: v for k, v in feature().items() if k != "feature_id"}
    assert _without_first_seen(docs)["exchange|" + feature()["feature_id"]] == {
        "_id": "exchange|" + feature()["feature_id"], "kind": "exchange", **expected,
    }
    assert docs["exchange|USDC-USD|kraken|x"]["mid"] is None
    assert upsert_features(msettings, rows) == 2
    assert _docs(msettings, FEATURES) == docs

    assert upsert_thresholds(msettings, [percentile()]) == 1
    thresholds = _docs(msettings, THRESHOLDS)
    row = percentile()
    assert _without_first_seen(thresholds) == {row["threshold_id"]: {
        "_id": row["threshold_id"],
        **{k: v for k, v in row.items() if k != "threshold_id"},
        "hour_start": dt.datetime(2023, 3, 11, 4, tzinfo=UTC),
    }}
    assert upsert_thresholds(msettings, [percentile()]) == 1
    assert _docs(msettings, THRESHOLDS) == thresholds
    with pytest.raises(ValueError, match="feature_id"):
        upsert_features(msettings, [feature(feature_id="")])
    with pytest.raises(ValueError, match="threshold_id"):
        upsert_thresholds(msettings, [percentile(threshold_id=None)])


def test_indexes_on_every_collection_and_ttl(msettings: MongoConfig) -> None:
    conf = replace(msettings, ttl_days=7.5)
    with MongoClient(conf.uri.get_secret_value()) as client:
        db = client[conf.db]
        # an index of the previous version is replaced by the one with sell_symbol
        db[OPPORTUNITIES].create_index(
            [("symbol", 1), ("window_end", 1), ("buy_exchange", 1), ("sell_exchange", 1)],
            name="uniq_symbol_window_pair", unique=True,
        )
        db[OPPORTUNITIES].create_index([("window_end", -1)], name="window_end_desc")
        names = ensure_indexes(db, ttl_seconds=conf.ttl_seconds)
        assert names == {
            c: [*specs, *([TTL_INDEX] if c in TTL_COLLECTIONS else [])]
            for c, specs in INDEXES.items()
        }
        info = {c: db[c].index_information() for c in INDEXES}
        assert not {"uniq_symbol_window_pair", "window_end_desc"} & set(info[OPPORTUNITIES])
        for coll, specs in INDEXES.items():
            for name, (keys, unique) in specs.items():
                assert info[coll][name]["key"] == keys, (coll, name)
                assert bool(info[coll][name].get("unique")) is unique
        assert info[FEATURES]["symbol_exchange_window_end"]["key"] == [
            ("symbol", 1), ("exchange", 1), ("window_end", 1)]
        assert info[FEATURES]["kind_window_end"]["key"] == [("kind", 1), ("window_end", 1)]
        assert info[THRESHOLDS]["pair_hour_start"]["key"] == [
            ("symbol", 1), ("buy_exchange", 1), ("sell_exchange", 1), ("hour_start", 1)]
        assert info[EPISODES]["symbol_start"]["key"] == [("symbol", 1), ("start", 1)]
        # TTL on first_seen_at (wall clock) of the high-volume collections only
        for coll in (OPPORTUNITIES, FEATURES):
            ttl = info[coll][TTL_INDEX]
            assert ttl["key"] == [("first_seen_at", 1)]
            assert ttl["expireAfterSeconds"] == 648_000  # 7.5 days
        for coll in (EPISODES, THRESHOLDS):
            assert not any("expireAfterSeconds" in i for i in info[coll].values())
        # a new TTL is applied in place; the default is Settings().mongo_ttl_days
        ensure_indexes(db)
        assert db[FEATURES].index_information()[TTL_INDEX][
            "expireAfterSeconds"] == 30 * 86_400
    # the writers create the indexes with the configured TTL
    other = replace(conf, db=conf.db + "_w", ttl_days=1)
    with MongoClient(conf.uri.get_secret_value()) as client:
        client.drop_database(other.db)
        upsert_episodes(other, [episode_event()])
        got = client[other.db][OPPORTUNITIES].index_information()
        client.drop_database(other.db)
    assert got[TTL_INDEX]["expireAfterSeconds"] == 86_400


def _plan_stages(plan: dict[str, Any]) -> list[str]:
    stages = [plan["stage"]]
    for key in ("inputStage", "inputStages"):
        child = plan.get(key)
        for sub in child if isinstance(child, list) else [child] if child else []:
            stages += _plan_stages(sub)
    return stages


def test_every_query_uses_an_index(msettings: MongoConfig) -> None:
    """explain() of each query the CLI and demo make: an IXSCAN, never a COLLSCAN."""
    upsert_episodes(msettings, _episodes())
    upsert_opportunities(msettings, [spread(), opportunity()])
    upsert_features(msettings, [feature()])
    upsert_thresholds(msettings, [percentile()])
    since, until = T0, T0 + H
    episode_queries = [
        _episode_filter(),
        _episode_filter(symbol="BTC-USD"),
        _episode_filter(since=since, until=until),
        _episode_filter(status="closed"),
        _episode_filter(cross_quote=True),
        _episode_filter(since=since, until=until, cross_quote=True),
        _episode_filter(min_peak_bps=10.0),
    ]
    with MongoClient(msettings.uri.get_secret_value()) as client:
        db = client[msettings.db]
        cursors = [
            db[EPISODES].find(q).sort(keys)
            for q in episode_queries for keys in EPISODE_SORTS.values()
        ]
        cursors += [
            db[OPPORTUNITIES].find(_filter(*args)).sort(
                [("window_end", 1), ("net_bps", -1)])
            for args in [(), ("BTC-USD",), (None, since, until), (None, None, None, 5.0)]
        ]
        cursors += [
            db[OPPORTUNITIES].find(_filter(since=since, until=until)).sort(
                [("net_bps", -1), ("window_end", 1)]),
            db[OPPORTUNITIES].find({"cross_quote": True,
                                          **_filter(since=since, until=until)}),
            db[FEATURES].find({"symbol": "USDC-USD", "exchange": "kraken",
                                     "window_end": {"$gte": since}}),
            db[FEATURES].find({"kind": "pair", "window_end": {"$gte": since}}),
            db[THRESHOLDS].find({"symbol": "BTC-USD", "buy_exchange": "kraken",
                                       "sell_exchange": "coinbase"}).sort("hour_start", -1),
        ]
        for cursor in cursors:
            plan = cursor.explain()["queryPlanner"]["winningPlan"]
            stages = _plan_stages(plan)
            assert "IXSCAN" in stages and "COLLSCAN" not in stages, (
                plan.get("parsedQuery"), cursor.explain()["queryPlanner"], stages)
