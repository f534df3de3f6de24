"""Replay of recorded data: IAQF bars and tick CSV to quotes, and publishing to a real tansu."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from arbstream.config import Settings
from arbstream.schemas import DeadLetter, Heartbeat, Quote, parse_quote
from arbstream.timestamps import parse_time
from arbstream.topics import DEADLETTER, ensure_topics, quotes_topic
from producers.replay.csv import load_csv_quotes, read_csv_quotes, replay_csv
from producers.replay.errors import ReplayInputError
from producers.replay.iaqf import load_iaqf_quotes, parse_iaqf_filename, replay_iaqf
from producers.replay.pairs import symbol_from_pair
from producers.replay.publish import parse_speed, publish_quotes

START = datetime(2023, 3, 11, 4, 0, tzinfo=UTC)
END = datetime(2023, 3, 11, 4, 10, tzinfo=UTC)


def ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


# --- pure: names, times, speeds ------------------------------------------------------------


@pytest.mark.parametrize(
    ("pair", "symbol"),
    [
        ("btcusd", "BTC-USD"),
        ("btcusdt", "BTC-USDT"),
        ("btcusdc", "BTC-USDC"),
        ("usdtusd", "USDT-USD"),
        ("usdcusd", "USDC-USD"),
        ("usdcusdt", "USDC-USDT"),
    ],
)
def test_symbol_from_pair(pair: str, symbol: str) -> None:
    assert symbol_from_pair(pair) == symbol


@pytest.mark.parametrize("pair", ["btceur", "usdt", "", "btc-usd"])
def test_symbol_from_pair_rejects_unknown(pair: str) -> None:
    with pytest.raises(ValueError, match="pair"):
        symbol_from_pair(pair)


def test_parse_iaqf_filename() -> None:
    assert parse_iaqf_filename(Path("binance_usdcusdt.parquet")) == ("binance", "USDC-USDT")
    with pytest.raises(ValueError, match="btceur"):
        parse_iaqf_filename(Path("kraken_btceur.parquet"))
    with pytest.raises(ValueError, match="<exchange>_<pair>"):
        parse_iaqf_filename(Path("btcusd.parquet"))


def test_parse_time_and_speed() -> None:
    assert parse_time("2023-03-11T04:00") == START
    assert parse_time("2023-03-11T04:00:00Z") == START
    assert parse_time("2023-03-11T06:00:00+02:00") == START
    assert parse_time("2023-03-11T06:00:00+02:00").tzinfo == UTC
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_time("yesterday")
    assert parse_speed("max") is None
    assert parse_speed("MAX") is None
    assert parse_speed("10") == 10.0
    assert parse_speed("0.5x") == 0.5
    for bad in ("0", "-2", "fast", "nan", "inf", ""):
        with pytest.raises(ValueError, match="speed"):
            parse_speed(bad)


# --- pure: IAQF bars -----------------------------------------------------------------------


def expected_window(data_dir: Path, lo: datetime, hi: datetime) -> pd.DataFrame:
    """The quotes of [lo, hi), computed independently and directly from the parquet files."""
    parts = []
    for path in sorted((data_dir / "iaqf-2023-03").glob("*.parquet")):
        bars = pd.read_parquet(path)
        quote_time = bars.index + pd.Timedelta(seconds=60)
        sel = bars[(quote_time >= lo) & (quote_time < hi)]
        exchange, pair = path.stem.split("_")
        parts.append(
            pd.DataFrame(
                {
                    "exchange": exchange,
                    "pair": pair,
                    "exchange_ts": [ms(t.to_pydatetime() + timedelta(seconds=60))
                                    for t in sel.index],
                    "close": sel["close"].to_numpy(),
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values(["exchange_ts", "exchange", "pair"]).reset_index(drop=True)


def test_load_iaqf_window_matches_parquet(data_dir: Path) -> None:
    quotes = load_iaqf_quotes(data_dir, START, END)
    expected = expected_window(data_dir, START, END)

    assert list(quotes.columns) == [
        "exchange", "symbol", "exchange_ts", "bid", "ask", "bid_size", "ask_size",
    ]
    assert len(quotes) == len(expected) > 50
    assert quotes["exchange_ts"].dtype == "int64"
    assert quotes["exchange_ts"].tolist() == expected["exchange_ts"].tolist()
    assert quotes["bid"].tolist() == quotes["ask"].tolist()
    assert quotes["bid_size"].isna().all() and quotes["ask_size"].isna().all()
    # deterministic event-time order across exchanges
    keys = list(zip(quotes["exchange_ts"], quotes["exchange"], quotes["symbol"], strict=True))
    assert keys == sorted(keys)
    # per-series counts and prices agree with the parquet files
    for (exchange, pair), rows in expected.groupby(["exchange", "pair"]):
        got = quotes[(quotes.exchange == exchange) & (quotes.symbol == symbol_from_pair(pair))]
        assert got["bid"].tolist() == rows["close"].tolist(), (exchange, pair)
    first, last = quotes.iloc[0], quotes.iloc[-1]
    assert first["exchange_ts"] == ms(START)
    assert (first["exchange"], first["symbol"]) == ("binance", "BTC-USDC")
    assert first["bid"] == expected.iloc[0]["close"]
    assert last["exchange_ts"] == ms(END) - 60_000
    assert last["bid"] == expected.iloc[-1]["close"]
    assert (last["exchange"], symbol_from_pair(expected.iloc[-1]["pair"])) == (
        expected.iloc[-1]["exchange"], last["symbol"],
    )


def test_load_iaqf_bounds_are_half_open(data_dir: Path) -> None:
    quotes = load_iaqf_quotes(data_dir, START, END)
    # the 03:59 bar closes exactly at START: included; the 04:09 bar closes at END: excluded
    assert quotes["exchange_ts"].min() == ms(START)
    assert quotes["exchange_ts"].max() < ms(END)
    at_end = load_iaqf_quotes(data_dir, END, END + timedelta(minutes=1))
    assert set(at_end["exchange_ts"]) == {ms(END)}
    assert not set(at_end["exchange_ts"]) & set(quotes["exchange_ts"])
    # naive bounds mean UTC
    naive = load_iaqf_quotes(data_dir, START.replace(tzinfo=None), END.replace(tzinfo=None))
    assert naive.equals(quotes)
    assert load_iaqf_quotes(data_dir, END, END).empty


def test_load_iaqf_errors(tmp_path: Path) -> None:
    with pytest.raises(ReplayInputError, match="ARB_DATA_DIR"):
        load_iaqf_quotes(tmp_path)
    folder = tmp_path / "iaqf-2023-03"
    folder.mkdir()
    with pytest.raises(ReplayInputError, match="no \\*.parquet"):
        load_iaqf_quotes(tmp_path)
    (folder / "coinbase_btcusd.parquet").write_bytes(b"not parquet")
    with pytest.raises(ReplayInputError, match="not a readable parquet"):
        load_iaqf_quotes(tmp_path)
    (folder / "coinbase_btcusd.parquet").unlink()
    (folder / "coinbase_btceur.parquet").write_bytes(b"")
    with pytest.raises(ReplayInputError, match="btceur"):
        load_iaqf_quotes(tmp_path)


# --- pure: tick CSV -------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "ticks.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_iso_and_epoch_ms(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exchange,symbol,ts,bid,ask,bid_size,ask_size\n"
        "coinbase,BTC-USD,2023-03-11T04:00:00Z,20000.5,20001,1.5,2\n"
        "kraken,BTC-USD,2023-03-11T04:00:00.250,20000,20002,,\n"
        "binance,BTC-USDT,1678507200500,19999,20000,0,3\n"
        "\n"
        "coinbase,USDT-USD,2023-03-11T06:00:01+02:00,1.0001,1.0002,,\n",
    )
    quotes = load_csv_quotes(path)
    assert [q.exchange_ts for q in quotes] == [
        ms(START), ms(START) + 250, ms(START) + 500, ms(START) + 1000,
    ]
    assert all(q.received_ts == q.exchange_ts for q in quotes)
    assert (quotes[0].bid, quotes[0].ask, quotes[0].bid_size, quotes[0].ask_size) == (
        20000.5, 20001.0, 1.5, 2.0,
    )
    assert quotes[1].bid_size is None and quotes[1].ask_size is None
    assert quotes[3].symbol == "USDT-USD"


def test_csv_header_without_sizes(tmp_path: Path) -> None:
    path = write(tmp_path, "ts,exchange,symbol,bid,ask\n1678507200000,kraken,BTC-USD,1,2\n")
    [quote] = load_csv_quotes(path)
    assert (quote.exchange, quote.exchange_ts, quote.bid_size) == ("kraken", 1678507200000, None)


def test_csv_bad_rows_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "exchange,symbol,ts,bid,ask\n"
        "coinbase,BTC-USD,2023-03-11T04:00:00Z,20000,20001\n"  # line 2 ok
        "coinbase,BTC-USD,2023-03-11T04:00:01Z,20002,20001\n"  # line 3 crossed
        "coinbase,btcusd,2023-03-11T04:00:02Z,20000,20001\n"  # line 4 symbol
        "coinbase,BTC-USD,not-a-time,20000,20001\n"  # line 5 ts
        "coinbase,BTC-USD,1678507200,20000,20001\n"  # line 6 epoch seconds
        "coinbase,BTC-USD,2023-03-11T04:00:03Z,abc,20001\n"  # line 7 bid
        "coinbase,BTC-USD,2023-03-11T04:00:04Z,20000\n"  # line 8 field count
        "nowhere,BTC-USD,2023-03-11T04:00:05Z,20000,20001\n",  # line 9 exchange
    )
    with pytest.raises(ReplayInputError) as info:
        load_csv_quotes(path, exchanges=["coinbase", "kraken"])
    err = info.value
    assert [p.line for p in err.problems] == [3, 4, 5, 6, 7, 8, 9]
    text = str(err)
    assert "7 invalid row(s)" in text and "file lines" in text
    for fragment in (
        "line 3: record: crossed quote: bid 20002.0 > ask 20001.0",
        "line 4: symbol",
        "line 5: ts 'not-a-time'",
        "line 6: ts 1678507200 is not plausible epoch milliseconds",
        "line 7: bid 'abc' is not a number",
        "line 8: expected 5 fields, got 4",
        "line 9: exchange 'nowhere' is not configured",
    ):
        assert fragment in text
    assert err.problems[0].raw == "coinbase,BTC-USD,2023-03-11T04:00:01Z,20002,20001"
    # the lenient reader returns the good row alongside the problems
    result = read_csv_quotes(path, exchanges=["coinbase", "kraken"])
    assert len(result.quotes) == 1 and len(result.problems) == 7


def test_csv_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ReplayInputError, match="not found"):
        load_csv_quotes(tmp_path / "missing.csv")
    with pytest.raises(ReplayInputError, match="empty"):
        load_csv_quotes(write(tmp_path, ""))
    with pytest.raises(ReplayInputError, match=r"line 1: bad header \(missing \['ts'\]"):
        load_csv_quotes(write(tmp_path, "exchange,symbol,bid,ask\n"))
    with pytest.raises(ReplayInputError, match="unknown \\['price'\\]"):
        load_csv_quotes(write(tmp_path, "exchange,symbol,ts,bid,ask,price\n"))


# --- Kafka: a real tansu broker ------------------------------------------------------------


def consumer(settings: Settings) -> Consumer:
    return Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": f"test-replay-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,
        }
    )


def read_from(
    settings: Settings, start: dict[str, dict[int, int]]
) -> tuple[dict[str, dict[int, int]], dict[str, list[Message]]]:
    """Consume each topic from ``start`` (topic -> partition -> offset; missing = beginning)
    up to the partition-EOF event of every partition.

    Returns every partition's next offset and the records read, per topic. (tansu answers
    ListOffsets LATEST wrongly, so the end is found by reading up to EOF.)
    """
    c = consumer(settings)
    try:
        meta = c.list_topics(timeout=10).topics
        nxt: dict[str, dict[int, int]] = {}
        assignment = []
        for topic, offsets in start.items():
            nxt[topic] = {}
            for p in sorted(meta[topic].partitions):
                nxt[topic][p] = offsets.get(p, 0)
                assignment.append(TopicPartition(topic, p, offsets.get(p, OFFSET_BEGINNING)))
        c.assign(assignment)
        records: dict[str, list[Message]] = {t: [] for t in start}
        at_eof: set[tuple[str, int]] = set()
        while len(at_eof) < len(assignment):
            msg = c.poll(10)
            assert msg is not None, f"timed out reading {list(start)}"
            topic, partition = msg.topic() or "", msg.partition() or 0
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err
                at_eof.add((topic, partition))
                continue
            records[topic].append(msg)
            nxt[topic][partition] = (msg.offset() or 0) + 1
        return nxt, records
    finally:
        c.close()


def snapshot(settings: Settings, topics: list[str]) -> dict[str, dict[int, int]]:
    """Every partition's next offset now, so a test counts only the records it adds."""
    ensure_topics(settings)
    return read_from(settings, {t: {} for t in topics})[0]


def read_new(settings: Settings, before: dict[str, dict[int, int]]) -> dict[str, list[Message]]:
    return read_from(settings, before)[1]


QUOTE_TOPICS = [quotes_topic(e) for e in ("binance", "coinbase", "kraken")]


def without_heartbeat(
    settings: Settings, records: list[Message], exchange: str, last_ts: int
) -> list[Message]:
    """The quote records, after checking the replay's closing heartbeat for ``exchange``:
    exactly one, at the replay's last event time (never in the future)."""
    beats = [m for m in records if json.loads(m.value())["type"] == "heartbeat"]
    assert len(beats) == 1
    beat = Heartbeat.model_validate_json(beats[0].value())
    assert beat.exchange == exchange
    assert beat.exchange_ts == last_ts
    return [m for m in records if m is not beats[0]]


def test_replay_iaqf_window_to_kafka(settings: Settings) -> None:
    expected = load_iaqf_quotes(settings.data_dir, START, END)
    before = snapshot(settings, QUOTE_TOPICS)

    report = replay_iaqf(settings, START, END, speed=None, progress=False)

    assert report.quotes == len(expected)
    assert report.deadletters == 0
    assert report.first_event_ts == ms(START)
    assert report.last_event_ts == ms(END) - 60_000
    got = read_new(settings, before)
    for exchange in ("binance", "coinbase", "kraken"):
        topic = quotes_topic(exchange)
        rows = expected[expected.exchange == exchange]
        records = without_heartbeat(settings, got[topic], exchange, report.last_event_ts)
        assert report.published[topic] == len(rows) == len(records)
        by_partition: dict[int, list[Quote]] = defaultdict(list)
        for msg in records:
            quote = parse_quote(msg.value())
            assert msg.key() == quote.symbol.encode()
            by_partition[msg.partition()].append(quote)
        for quotes in by_partition.values():  # event-time order within each partition
            assert [q.exchange_ts for q in quotes] == sorted(q.exchange_ts for q in quotes)
        want = sorted(
            (
                Quote(
                    exchange=exchange, symbol=r.symbol, exchange_ts=r.exchange_ts,
                    received_ts=r.exchange_ts, bid=r.bid, ask=r.ask,
                )
                for r in rows.itertuples()
            ),
            key=lambda q: (q.exchange_ts, q.symbol),
        )
        have = sorted(
            (q for qs in by_partition.values() for q in qs),
            key=lambda q: (q.exchange_ts, q.symbol),
        )
        assert have == want


CSV_WITH_BAD_ROW = (
    "exchange,symbol,ts,bid,ask,bid_size,ask_size\n"
    "kraken,BTC-USD,2023-03-11T04:00:02Z,20010,20011,0.5,0.7\n"
    "coinbase,BTC-USD,2023-03-11T04:00:01Z,20005,20004,1,1\n"  # line 3: crossed
    "coinbase,BTC-USD,2023-03-11T04:00:00Z,20000,20001,1,2\n"
)


def test_replay_csv_deadletter(settings: Settings, tmp_path: Path) -> None:
    path = write(tmp_path, CSV_WITH_BAD_ROW)
    topics = [quotes_topic("coinbase"), quotes_topic("kraken"), DEADLETTER]
    before = snapshot(settings, topics)

    report = replay_csv(settings, path, speed=None, deadletter=True, progress=False)

    assert report.published == {quotes_topic("coinbase"): 1, quotes_topic("kraken"): 1}
    assert report.deadletters == 1
    assert report.first_event_ts == ms(START)  # sorted by event time, not file order
    assert report.last_event_ts == ms(START) + 2000
    got = read_new(settings, before)
    [letter_msg] = got[DEADLETTER]
    letter = DeadLetter.model_validate(json.loads(letter_msg.value()))
    assert letter.stage == "replay"
    assert letter.raw == "coinbase,BTC-USD,2023-03-11T04:00:01Z,20005,20004,1,1"
    assert letter.reason.startswith("ticks.csv line 3: ")
    assert "crossed quote" in letter.reason
    last = report.last_event_ts
    [cb] = without_heartbeat(settings, got[quotes_topic("coinbase")], "coinbase", last)
    [kr] = without_heartbeat(settings, got[quotes_topic("kraken")], "kraken", last)
    assert cb.key() == b"BTC-USD"
    assert parse_quote(cb.value()) == Quote(
        exchange="coinbase", symbol="BTC-USD", exchange_ts=ms(START), received_ts=ms(START),
        bid=20000, ask=20001, bid_size=1, ask_size=2,
    )
    assert parse_quote(kr.value()).bid_size == 0.5


def test_replay_csv_bad_row_publishes_nothing(settings: Settings, tmp_path: Path) -> None:
    path = write(tmp_path, CSV_WITH_BAD_ROW)
    topics = [quotes_topic("coinbase"), quotes_topic("kraken"), DEADLETTER]
    before = snapshot(settings, topics)
    with pytest.raises(ReplayInputError, match="line 3: record: crossed quote"):
        replay_csv(settings, path, speed=None, deadletter=False, progress=False)
    assert all(not records for records in read_new(settings, before).values())


def test_publish_paced_and_unconfigured_exchange(settings: Settings) -> None:
    base = ms(START)
    quotes = [
        Quote(exchange="gemini", symbol="ETH-USD", exchange_ts=base + i * 500,
              received_ts=base + i * 500, bid=1500 + i, ask=1501 + i)
        for i in range(3)
    ]
    before = snapshot(settings, [quotes_topic("gemini")])
    report = publish_quotes(quotes, settings, speed=5.0, progress=False)  # 1 s of events
    assert report.published == {quotes_topic("gemini"): 3}
    assert 0.2 <= report.elapsed_s < 2.0
    [records] = read_new(settings, before).values()
    records = without_heartbeat(settings, records, "gemini", report.last_event_ts)
    assert [parse_quote(m.value()) for m in records] == quotes

    narrow = settings.model_copy(update={"exchanges": ["coinbase"]})
    with pytest.raises(ValueError, match="ARB_EXCHANGES"):
        publish_quotes(quotes, narrow, progress=False)


def test_publish_rejects_invalid_frame_before_kafka() -> None:
    frame = pd.DataFrame(
        {
            "exchange": ["coinbase", "coinbase"], "symbol": ["BTC-USD", "BTC-USD"],
            "exchange_ts": [ms(START), ms(START) + 1], "bid": [2.0, 3.0], "ask": [2.5, 2.9],
            "bid_size": [None, -1.0], "ask_size": [None, None],
        }
    )
    nowhere = Settings(kafka_bootstrap="127.0.0.1:1")  # never contacted: checks come first
    with pytest.raises(ReplayInputError, match=r"crossed quote \(bid > ask\): 1 row\(s\)"):
        publish_quotes(frame, nowhere, progress=False)
    with pytest.raises(ValueError, match="speed"):
        publish_quotes(frame, nowhere, speed=0, progress=False)
