"""The ``arbstream`` command line, run in-process with Typer's CliRunner against the real stack.

Configuration reaches the CLI only through ``ARB_*`` environment variables (as in a shell);
``get_settings`` is cached per process, so its cache is cleared around every invocation.
Every test gets its own MongoDB database.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient
from pymongo import MongoClient
from typer.testing import CliRunner, Result

from arbstream.config import Settings, get_settings
from arbstream.records import OPPORTUNITY_FIELDS
from arbstream.shell.cli import app
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.schema import ensure_database
from arbstream.store.influx.writer import write_quotes
from arbstream.store.mongo.episodes import upsert_episodes
from arbstream.store.mongo.opportunities import upsert_opportunities
from arbstream.timestamps import parse_time
from arbstream.topics import DEADLETTER, OPPORTUNITIES, quotes_topic, topic_layout
from producers.replay.iaqf import load_iaqf_quotes

T0 = datetime(2023, 3, 11, 4, 0, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)
#: The table's columns; the CSV carries every field (``csv_columns``).
TABLE_HEADER = ("valid_from,valid_to,windows,pair,buy_exchange,sell_exchange,buy_ask,sell_bid,"
                "gross_bps,net_bps")
CSV_HEADER = ",".join(OPPORTUNITY_FIELDS)

Invoke = Callable[..., Result]


def flat(text: str) -> str:
    """Whitespace collapsed, so rich's line wrapping does not matter."""
    return " ".join(text.split())


@pytest.fixture
def env(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Iterator[Settings]:
    """The session stack's settings as ``ARB_*`` variables, with a fresh MongoDB database.

    Yields the equivalent :class:`Settings` (for seeding and expectations).
    """
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    db = "t_cli_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    values = {
        "ARB_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "ARB_KAFKA_PARTITIONS": str(settings.kafka_partitions),
        "ARB_INFLUX_URL": settings.influx_url,
        "ARB_MONGO_URI": settings.mongo_uri.get_secret_value(),
        "ARB_MONGO_DB": db,
        "ARB_STATE_DIR": str(settings.state_dir),
        "ARB_DATA_DIR": str(settings.data_dir),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)  # no stray .env
    with MongoClient(settings.mongo_uri.get_secret_value()) as client:
        client.drop_database(db)
    get_settings.cache_clear()
    yield settings.model_copy(update={"mongo_db": db})
    get_settings.cache_clear()


@pytest.fixture
def invoke(env: Settings) -> Invoke:
    """Run ``arbstream <args>``; extra ``ARB_*`` variables may be passed as keywords."""
    runner = CliRunner()

    def run(*args: str, **extra_env: str) -> Result:
        get_settings.cache_clear()
        try:
            return runner.invoke(app, list(args), env=extra_env or None)
        finally:
            get_settings.cache_clear()

    return run


def _explain(result: Result) -> str:
    return f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"


# --- stack -----------------------------------------------------------------------------------


def test_status_lists_every_service_healthy(invoke: Invoke, env: Settings) -> None:
    result = invoke("status")
    assert result.exit_code == 0, _explain(result)
    lines = result.stdout.splitlines()
    for name, endpoint in [
        ("kafka", env.kafka_bootstrap),
        ("influxdb", env.influx_url.removeprefix("http://")),
        ("mongodb", env.mongo_uri.get_secret_value().removeprefix("mongodb://")),
    ]:
        [row] = [line for line in lines if re.search(rf"\b{name}\b", line)]
        cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
        assert cells[:3] == [name, endpoint, "yes"], row
        assert cells[3].isdigit(), row  # started by the session stack: it has a pid


def test_status_exits_1_when_a_service_is_down(invoke: Invoke, env: Settings) -> None:
    from arbstream.shell.stack import free_port

    port = free_port()
    result = invoke("status", ARB_MONGO_URI=f"mongodb://127.0.0.1:{port}")
    assert result.exit_code == 1, _explain(result)
    [row] = [line for line in result.stdout.splitlines() if "mongodb" in line]
    cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
    assert cells[:3] == ["mongodb", f"127.0.0.1:{port}", "no"], row
    assert "Connection refused" in flat(result.stdout)
    assert re.search(r"\bkafka\b.*\byes\b", result.stdout)


def test_up_is_a_no_op_on_a_healthy_stack(invoke: Invoke, env: Settings) -> None:
    before = [line for line in invoke("status").stdout.splitlines() if "yes" in line]
    result = invoke("up")
    assert result.exit_code == 0, _explain(result)
    rows = [line for line in result.stdout.splitlines() if "yes" in line]
    assert len(rows) == 3
    pid = [[c.strip() for c in re.split(r"[│|]", r) if c.strip()][3] for r in rows]
    assert pid == [[c.strip() for c in re.split(r"[│|]", r) if c.strip()][3] for r in before]


def test_topics_lists_every_topic_with_partitions(invoke: Invoke, env: Settings) -> None:
    result = invoke("topics")
    assert result.exit_code == 0, _explain(result)
    listed = {}
    for line in result.stdout.splitlines():
        m = re.fullmatch(r"(\S+)\s+(\d+) partition\(s\)(  \(created\))?", line.strip())
        assert m, line
        listed[m[1]] = int(m[2])
    expected = {quotes_topic(e): 2 for e in env.exchanges}
    expected |= {f"md.{e}.trades": 2 for e in env.exchanges}
    expected |= {f"md.{e}.book": 2 for e in env.exchanges}
    expected |= {OPPORTUNITIES: 2, DEADLETTER: 1, "md.health": 1}
    assert listed == expected == topic_layout(env)
    # the broker agrees
    meta = AdminClient(env.kafka_client_config()).list_topics(timeout=10).topics
    assert {t: len(meta[t].partitions) for t in expected} == expected

    again = invoke("topics")  # idempotent: nothing left to create
    assert again.exit_code == 0, _explain(again)
    assert "(created)" not in again.stdout


def test_topics_reports_the_brokers_partition_counts(invoke: Invoke) -> None:
    assert invoke("topics").exit_code == 0  # every topic exists with 2 partitions
    result = invoke("topics", ARB_KAFKA_PARTITIONS="3")
    assert result.exit_code == 0, _explain(result)
    assert re.search(r"md\.kraken\.quotes\s+2 partition", result.stdout), result.stdout


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "ARB_WINDOW_SECONDS", "0.7",
            "max_quote_age_seconds must be a whole multiple of window_seconds "
            "(got 5.0 and 0.7)",
        ),
        ("ARB_KAFKA_BOOTSTRAP", "no-port", "kafka_bootstrap entries must be host:port"),
        ("ARB_EXCHANGES", '["kraken", "mtgox"]', "no taker fee for exchanges ['mtgox']"),
        ("ARB_CONFIG_FILE", "/nonexistent/arb.toml", "ARB_CONFIG_FILE=/nonexistent/arb.toml"),
    ],
)
@pytest.mark.parametrize("command", [["status"], ["opportunities", "list"], ["topics"]])
def test_invalid_configuration_exits_2_naming_the_problem(
    invoke: Invoke, command: list[str], variable: str, value: str, message: str
) -> None:
    result = invoke(*command, **{variable: value})
    assert result.exit_code == 2, _explain(result)
    assert "invalid configuration" in result.stderr
    assert message in flat(result.stderr), result.stderr
    assert "Traceback" not in result.output


# --- opportunities ---------------------------------------------------------------------------


def _row(
    symbol: str, end: datetime, buy: str, sell: str, ask: float, bid: float, gross_bps: float,
    net_bps: float,
) -> dict[str, Any]:
    stamp = end.strftime("%Y-%m-%dT%H:%M:%S.") + f"{end.microsecond // 1000:03d}Z"
    return {
        "opportunity_id": f"{symbol}|{stamp}|{buy}|{sell}",
        "symbol": symbol,
        "window_start": end - SEC,
        "window_end": end,
        "valid_from": end,
        "valid_to": end + 2 * SEC,  # one snapshot over 3 windows
        "windows": 3,
        "buy_exchange": buy,
        "sell_exchange": sell,
        "buy_ask": ask,
        "sell_bid": bid,
        "buy_ts": end - timedelta(milliseconds=400),
        "sell_ts": end - timedelta(milliseconds=150),
        "buy_fee": 0.0026,
        "sell_fee": 0.006,
        "gross": gross_bps / 10_000,
        "net": net_bps / 10_000,
        "gross_bps": gross_bps,
        "net_bps": net_bps,
    }


#: Seeded opportunities, by a short name.
ROWS = {
    "a": _row("BTC-USD", T0, "kraken", "coinbase", 20000.5, 20210.25, 104.875, 18.5),
    "b": _row("BTC-USD", T0 + SEC, "binance", "kraken", 20100.0, 20173.0, 36.3184, 3.25),
    "c": _row("USDC-USD", T0 + SEC, "kraken", "coinbase", 0.9871, 0.9958, 88.1371, 7.0),
    "d": _row("BTC-USDT", T0 + 2 * SEC, "binance", "coinbase", 20050.0, 20200.0, 74.813, 25.0),
    "e": _row("BTC-USD", T0 + 2 * SEC, "kraken", "coinbase", 20001.0, 20300.0, 149.49, 40.0),
}


@pytest.fixture
def seeded(env: Settings) -> Settings:
    assert upsert_opportunities(MongoConfig.of(env), ROWS.values()) == len(ROWS)
    return env


def _csv_line(name: str) -> dict[str, str]:
    """The CSV cells of seeded row ``name`` (every field it has; ISO-8601 UTC times)."""
    return {k: v.strftime("%Y-%m-%dT%H:%M:%S") + ("Z" if v.microsecond == 0 else
                                                 f".{v.microsecond:06d}Z")
            if isinstance(v, datetime) else str(v) for k, v in ROWS[name].items()}


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ([], "acbed"),  # window_end ascending, then net_bps descending
        (["--symbol", "BTC-USD"], "abe"),
        (["--symbol", "ETH-USD"], ""),
        (["--since", _iso(T0 + SEC)], "cbed"),  # inclusive
        (["--until", _iso(T0 + 2 * SEC)], "acb"),  # exclusive
        (["--since", _iso(T0 + SEC), "--until", _iso(T0 + 2 * SEC)], "cb"),
        (["--since", "2023-03-11T04:00:01.001"], "cbed"),  # naive means UTC
        (["--since", "2023-03-11T06:00:02+02:00", "--until", "2023-03-11T04:00:03Z"], "cb"),
        (["--min-net-bps", "7"], "aced"),  # inclusive floor
        (["--min-net-bps", "7.0001"], "aed"),
        (["--symbol", "BTC-USD", "--min-net-bps", "10", "--until", _iso(T0 + 2 * SEC)], "a"),
        (["--limit", "2"], "ac"),
        (["--limit", "0"], "acbed"),  # 0 means all
    ],
)
def test_opportunities_csv(invoke: Invoke, seeded: Settings, args: list[str], names: str) -> None:
    result = invoke("opportunities", "list", "--format", "csv", *args)
    assert result.exit_code == 0, _explain(result)
    lines = result.stdout.splitlines()
    assert lines[0] == (CSV_HEADER + ",first_seen_at" if names else CSV_HEADER), lines[0]
    got = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [{k: r[k] for k in ROWS[n]} for r, n in zip(got, names, strict=True)] == [
        _csv_line(n) for n in names]
    assert len(got) == len(names)


def test_csv_carries_every_json_column_and_the_cross_quote_legs(invoke: Invoke,
                                                                env: Settings) -> None:
    """A cross-quote opportunity reads as what it is in every format: the CSV has every key
    of the JSON lines (``sell_symbol``, ``cross_quote``, the conversion leg...), and the
    table names the pair ``BTC-USDC/BTC-USDT``."""
    row = {**_row("BTC-USDC", T0, "binance", "binance", 20000.0, 20150.0, 75.0, 40.0),
           "sell_symbol": "BTC-USDT", "cross_quote": True, "conversion_symbol": "USDC-USDT",
           "conversion_exchange": "binance", "conversion_rate": 1.02, "conversion_fee": 0.001}
    assert upsert_opportunities(MongoConfig.of(env), [row]) == 1
    as_json = invoke("opportunities", "list", "--format", "json")
    as_csv = invoke("opportunities", "list", "--format", "csv")
    assert as_json.exit_code == as_csv.exit_code == 0, _explain(as_csv)
    [doc] = [json.loads(line) for line in as_json.stdout.splitlines()]
    [cells] = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert set(doc) <= set(cells)
    assert (cells["sell_symbol"], cells["cross_quote"], cells["conversion_symbol"]) == (
        "BTC-USDT", "True", "USDC-USDT")
    table = invoke("opportunities", "list").stdout
    assert "BTC-USDC/BTC-USDT" in table


def test_opportunities_json_lines(invoke: Invoke, seeded: Settings) -> None:
    result = invoke("opportunities", "list", "--format", "json", "--symbol", "BTC-USD")
    assert result.exit_code == 0, _explain(result)
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["opportunity_id"] for d in docs] == [ROWS[n]["opportunity_id"] for n in "abe"]
    for doc, name in zip(docs, "abe", strict=True):
        row = ROWS[name]
        for key, value in row.items():
            if isinstance(value, datetime):
                assert parse_time(doc[key]) == value, key
                assert doc[key].endswith("Z"), key
            else:
                assert doc[key] == value, key
        assert parse_time(doc["first_seen_at"]) > T0  # set on insert, wall-clock time


def test_opportunities_table(invoke: Invoke, seeded: Settings) -> None:
    result = invoke("opportunities", "list", "--min-net-bps", "5")
    assert result.exit_code == 0, _explain(result)
    out = result.stdout
    for column in TABLE_HEADER.split(","):
        assert column in out
    rows = [
        [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        for line in out.splitlines() if "2023-03-11" in line
    ]
    assert rows == [
        ["2023-03-11T04:00:01Z", "2023-03-11T04:00:03Z", "3", "BTC-USD", "kraken", "coinbase",
         "20000.50", "20210.25", "104.88", "18.50"],
        ["2023-03-11T04:00:02Z", "2023-03-11T04:00:04Z", "3", "USDC-USD", "kraken", "coinbase",
         "0.9871", "0.9958", "88.14", "7.00"],
        ["2023-03-11T04:00:03Z", "2023-03-11T04:00:05Z", "3", "BTC-USD", "kraken", "coinbase",
         "20001.00", "20300.00", "149.49", "40.00"],
        ["2023-03-11T04:00:03Z", "2023-03-11T04:00:05Z", "3", "BTC-USDT", "binance",
         "coinbase", "20050.00", "20200.00", "74.81", "25.00"],
    ]


def test_opportunities_empty_database(invoke: Invoke) -> None:
    result = invoke("opportunities", "list", "--format", "csv")
    assert result.exit_code == 0, _explain(result)
    assert result.stdout.splitlines() == [CSV_HEADER]
    result = invoke("opportunities", "list", "--format", "json")
    assert result.exit_code == 0 and result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["--since", "yesterday"],
        ["--until", "2023-13-01"],
        ["--format", "xml"],
        ["--min-net-bps", "ten"],
    ],
)
def test_opportunities_bad_option_is_a_usage_error(invoke: Invoke, args: list[str]) -> None:
    result = invoke("opportunities", "list", *args)
    assert result.exit_code == 2, _explain(result)
    assert "Traceback" not in result.output


# --- episodes --------------------------------------------------------------------------------

EPISODE_CSV_HEADER = (
    "episode_id,symbol,sell_symbol,cross_quote,buy_exchange,sell_exchange,start,end,"
    "duration_s,windows,peak_net_bps,mean_net_bps,size_base,size_source,expected_profit,"
    "profit_currency,expected_profit_usd,status"
)


def _episode(
    eid: str, symbol: str, sell_symbol: str, buy: str, sell: str, start: datetime,
    duration_s: float, windows: int, peak: float, mean: float, profit_usd: float | None,
    event: str = "closed",
) -> dict[str, Any]:
    return {
        "episode_id": eid, "event": event, "status": "closed" if event == "closed" else "open",
        "symbol": symbol, "sell_symbol": sell_symbol, "cross_quote": symbol != sell_symbol,
        "buy_exchange": buy, "sell_exchange": sell, "start": start,
        "end": start + duration_s * SEC, "duration_s": duration_s, "windows": windows,
        "peak_net_bps": peak, "mean_net_bps": mean, "size_base": 0.5,
        "size_source": "notional", "expected_profit": profit_usd,
        "profit_currency": symbol.split("-")[1], "expected_profit_usd": profit_usd,
    }


#: Seeded episode events, by a short name (the episode id).
EPISODES = {
    "p": _episode("p", "BTC-USD", "BTC-USD", "kraken", "coinbase", T0, 120.0, 3, 18.5, 10.25,
                  25.5),
    "q": _episode("q", "BTC-USDC", "BTC-USD", "coinbase", "kraken", T0 + 60 * SEC, 600.0, 11,
                  95.0, 60.0, 450.75),
    "r": _episode("r", "USDC-USD", "USDC-USD", "kraken", "coinbase", T0 + 120 * SEC, 60.0, 2,
                  7.0, 7.0, None, event="opened"),
    "s": _episode("s", "ETH-USDT", "ETH-USD", "binance", "coinbase", T0 + 180 * SEC, 240.0, 5,
                  40.0, 22.5, 120.0),
}


@pytest.fixture
def seeded_episodes(env: Settings) -> Settings:
    assert upsert_episodes(MongoConfig.of(env), EPISODES.values()) == len(EPISODES)
    return env


def _episode_csv_line(name: str) -> list[str]:
    e = EPISODES[name]
    values = {**e, "status": "closed" if e["event"] == "closed" else "open"}
    return [
        _iso(values[c]) if isinstance(values[c], datetime) else
        "" if values[c] is None else str(values[c])
        for c in EPISODE_CSV_HEADER.split(",")
    ]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ([], "qspr"),  # peak net bps, largest first
        (["--sort", "duration_s"], "qspr"),
        (["--sort", "expected_profit_usd"], "qspr"),  # no profit last
        (["--sort", "start"], "pqrs"),
        (["--symbol", "BTC-USDC"], "q"),  # the buy leg's symbol
        (["--since", _iso(T0 + 60 * SEC), "--until", _iso(T0 + 180 * SEC)], "qr"),  # on start
        (["--status", "open"], "r"),
        (["--status", "closed", "--sort", "start"], "pqs"),
        (["--cross-quote"], "qs"),
        (["--same-quote"], "pr"),
        (["--min-net-bps", "18.5"], "qsp"),  # on the peak
        (["--limit", "2"], "qs"),
        (["--limit", "0", "--sort", "start"], "pqrs"),
    ],
)
def test_episodes_csv(
    invoke: Invoke, seeded_episodes: Settings, args: list[str], names: str
) -> None:
    result = invoke("opportunities", "list", "--episodes", "--format", "csv", *args)
    assert result.exit_code == 0, _explain(result)
    assert result.stdout.splitlines()[0] == EPISODE_CSV_HEADER
    got = list(csv.reader(io.StringIO(result.stdout)))[1:]
    assert got == [_episode_csv_line(n) for n in names]


def test_episodes_json_lines(invoke: Invoke, seeded_episodes: Settings) -> None:
    result = invoke("opportunities", "list", "--episodes", "--format", "json", "--cross-quote")
    assert result.exit_code == 0, _explain(result)
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["episode_id"] for d in docs] == ["q", "s"]
    for doc in docs:
        row = EPISODES[doc["episode_id"]]
        for key, value in row.items():
            if key == "event":
                assert key not in doc
            elif isinstance(value, datetime):
                assert parse_time(doc[key]) == value and doc[key].endswith("Z"), key
            else:
                assert doc[key] == value, key
        assert parse_time(doc["first_seen_at"]) > T0


def _table_rows(out: str) -> list[list[str]]:
    return [
        [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        for line in out.splitlines() if "2023-03-11" in line
    ]


def test_episodes_table(invoke: Invoke, seeded_episodes: Settings) -> None:
    result = invoke("opportunities", "list", "--episodes")
    assert result.exit_code == 0, _explain(result)
    out = flat(result.stdout)
    for column in ["symbol", "buy → sell", "start (UTC)", "duration (s)", "windows",
                   "peak bps", "mean bps", "size", "profit USD", "status"]:
        assert column in out
    assert "episode_id" not in out
    assert _table_rows(result.stdout) == [
        ["BTC-USDC/BTC-USD", "coinbase → kraken", "2023-03-11 04:01:01", "600", "11",
         "95.00", "60.00", "0.5", "450.75", "closed"],
        ["ETH-USDT/ETH-USD", "binance → coinbase", "2023-03-11 04:03:01", "240", "5",
         "40.00", "22.50", "0.5", "120.00", "closed"],
        ["BTC-USD", "kraken → coinbase", "2023-03-11 04:00:01", "120", "3", "18.50",
         "10.25", "0.5", "25.50", "closed"],
        ["USDC-USD", "kraken → coinbase", "2023-03-11 04:02:01", "60", "2", "7.00", "7.00",
         "0.5", "-", "open"],
    ]


def test_episodes_empty_database(invoke: Invoke) -> None:
    result = invoke("opportunities", "list", "--episodes", "--format", "csv")
    assert result.exit_code == 0, _explain(result)
    assert result.stdout.splitlines() == [EPISODE_CSV_HEADER]


@pytest.mark.parametrize(
    "args",
    [
        ["--status", "closed"],  # episode options need --episodes
        ["--cross-quote"],
        ["--sort", "start"],
        ["--episodes", "--status", "opened"],
        ["--episodes", "--sort", "net_bps"],
    ],
)
def test_episode_options_usage_errors(invoke: Invoke, args: list[str]) -> None:
    result = invoke("opportunities", "list", *args)
    assert result.exit_code == 2, _explain(result)
    assert "Traceback" not in result.output


def test_demo_summary_reports_episodes_and_the_depeg(
    env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from arbstream.shell import demo as cli

    conf = env.model_copy(update={
        "influx_db": "t_cli_demo_summary", **cli.DEMO_OVERRIDES,
    })
    ensure_database(InfluxConfig.of(conf))
    cross = {**ROWS["d"], "opportunity_id": "cross", "symbol": "BTC-USDC",
             "sell_symbol": "BTC-USD", "cross_quote": True}
    upsert_opportunities(MongoConfig.of(conf), [*ROWS.values(), cross])
    upsert_episodes(MongoConfig.of(conf), EPISODES.values())
    ts = int(T0.timestamp() * 1000)
    write_quotes(InfluxConfig.of(conf), [
        {"exchange": "kraken", "symbol": "USDC-USD", "bid": 0.95, "ask": 0.96,
         "exchange_ts": ts},
        {"exchange": "coinbase", "symbol": "USDC-USD", "bid": 0.877, "ask": 0.879,
         "exchange_ts": ts + 90_000},
    ])
    cli._demo_summary(conf, T0, T0 + timedelta(hours=1), 1234, 1300, 4.5)
    out = capsys.readouterr().out
    text = flat(out)
    assert "Top 10 episodes by peak net bps" in text
    assert "USDC depeg / cross-quote: 1 cross-quote opportunities, 2 cross-quote episodes" in text
    assert "Best cross-quote episodes" in text
    assert "minimum USDC-USD mid: 0.8780 on coinbase at 2023-03-11T04:01:31Z" in text
    assert '"raw"."quote"' in text and '"features"."features"' in text
    rows = _table_rows(out)
    top = [r for r in rows if len(r) == 10 and not r[0].startswith("2023")]  # episodes
    assert [r[0] for r in top] == [  # top episodes, then the cross-quote ones
        "BTC-USDC/BTC-USD", "ETH-USDT/ETH-USD", "BTC-USD", "USDC-USD",
        "BTC-USDC/BTC-USD", "ETH-USDT/ETH-USD",
    ]
    assert "quotes replayed: 1234" in text


# --- replay ----------------------------------------------------------------------------------

CSV_GOOD = [
    "kraken,BTC-USD,2023-03-11T04:00:00Z,20000,20001",
    "coinbase,BTC-USD,2023-03-11T04:00:02Z,20010,20011",
]
CSV_BAD = "kraken,BTC-USD,2023-03-11T04:00:01Z,abc,20001"


@pytest.fixture
def bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "ticks.csv"
    path.write_text("\n".join(["exchange,symbol,ts,bid,ask", CSV_GOOD[0], CSV_BAD,
                               CSV_GOOD[1]]) + "\n")
    return path


def test_replay_csv_bad_row_exits_1_naming_the_line(invoke: Invoke, bad_csv: Path) -> None:
    result = invoke("replay", "csv", str(bad_csv))
    assert result.exit_code == 1, _explain(result)
    err = flat(result.stderr)
    assert "1 invalid row(s)" in err
    assert "line 3: bid 'abc' is not a number" in err
    assert "nothing was published" in err
    assert "Traceback" not in result.output


def test_replay_csv_with_deadletter_publishes_the_rest(invoke: Invoke, bad_csv: Path) -> None:
    result = invoke("replay", "csv", str(bad_csv), "--deadletter")
    assert result.exit_code == 0, _explain(result)
    out = flat(result.stdout)
    assert "published 2 quotes and 1 dead letters" in out
    assert f"{quotes_topic('coinbase')}: 1" in out
    assert f"{quotes_topic('kraken')}: 1" in out


def test_replay_csv_missing_file_exits_1(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("replay", "csv", str(tmp_path / "nope.csv"))
    assert result.exit_code == 1, _explain(result)
    assert "not found" in flat(result.stderr)


def test_replay_iaqf_reports_the_published_count(invoke: Invoke, env: Settings) -> None:
    start, end = "2023-03-11T04:00", "2023-03-11T04:05"
    quotes = load_iaqf_quotes(env.data_dir, parse_time(start), parse_time(end))
    assert len(quotes) > 0
    result = invoke("replay", "iaqf", "--from", start, "--to", end)
    assert result.exit_code == 0, _explain(result)
    out = flat(result.stdout)
    assert f"published {len(quotes)} quotes and 0 dead letters" in out
    for exchange, n in quotes.groupby("exchange").size().items():
        assert f"{quotes_topic(str(exchange))}: {n}" in out
    first = datetime.fromtimestamp(quotes["exchange_ts"].min() / 1000, UTC)
    last = datetime.fromtimestamp(quotes["exchange_ts"].max() / 1000, UTC)
    assert f"event time {first.isoformat()} .. {last.isoformat()}" in out


@pytest.mark.parametrize("speed", ["fast", "0", "-2", "nan", "inf", ""])
@pytest.mark.parametrize("command", ["iaqf", "csv"])
def test_replay_bad_speed_is_a_usage_error(
    invoke: Invoke, bad_csv: Path, command: str, speed: str
) -> None:
    target = ["--from", "2023-03-11T04:00", "--to", "2023-03-11T04:01"]
    args = target if command == "iaqf" else [str(bad_csv), "--deadletter"]
    result = invoke("replay", command, *args, "--speed", speed)
    assert result.exit_code == 2, _explain(result)
    assert "invalid speed" in flat(result.stderr)
    assert "published" not in result.output


def test_replay_iaqf_bad_time_is_a_usage_error(invoke: Invoke) -> None:
    result = invoke("replay", "iaqf", "--from", "11/03/2023")
    assert result.exit_code == 2, _explain(result)
    assert "invalid time '11/03/2023'" in flat(result.stderr)


# --- known bugs ------------------------------------------------------------------------------


def test_error_text_with_brackets_is_printed_verbatim(invoke: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text("exchange,symbol,ts,bid,ask\nkraken,BTC-USD,2023-03-11T04:00:00Z,[/b],1\n")
    result = invoke("replay", "csv", str(path))
    assert result.exit_code == 1, _explain(result)
    assert "line 2: bid '[/b]' is not a number" in flat(result.stderr)  # MarkupError today


def test_invalid_configuration_is_printed_verbatim(invoke: Invoke) -> None:
    result = invoke("status", ARB_WINDOW_SECONDS="0.7")
    assert result.exit_code == 2, _explain(result)
    assert "[type=value_error" in result.stderr  # swallowed as an unknown style tag today


def test_opportunities_tail_prints_events_and_reports_invalid_records(env: Settings) -> None:
    """Real depeg events (the stream's wire format) and one malformed record on a topic:
    `opportunities tail --json` prints every valid event as it was published and reports the
    bad one on stderr."""
    import uuid
    from datetime import UTC

    from confluent_kafka import Producer

    from arbstream.schemas import parse_arb_event
    from arbstream.topics import ensure_topic
    from testing.alert_events import iaqf_events

    events = iaqf_events(env.data_dir, datetime(2023, 3, 11, 4, tzinfo=UTC),
                         datetime(2023, 3, 11, 4, 20, tzinfo=UTC), env)[:6]
    assert len(events) == 6
    topic = f"tail.{uuid.uuid4().hex[:8]}"
    ensure_topic(env, topic, partitions=1)
    producer = Producer(env.kafka_client_config())
    for i, (key, value) in enumerate(events):
        producer.produce(topic, value=value, key=key)
        if i == 2:
            producer.produce(topic, value=b"{not json", key=b"x")
    assert producer.flush(10) == 0
    get_settings.cache_clear()
    result = CliRunner().invoke(app, [
        "opportunities", "tail", "--topic", topic, "--from-beginning", "--max", "6", "--json"])
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    got = [parse_arb_event(line) for line in result.stdout.splitlines()]
    assert got == [parse_arb_event(v) for _, v in events]
    assert "invalid record" in result.stderr and "@3" in result.stderr
