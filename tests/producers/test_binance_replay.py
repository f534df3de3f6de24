"""Binance websocket recording (``binance-ws-2024-08``) → canonical quotes and trades → tansu.

Expected values are read here straight from the gzip lines (``<receive ns> <JSON frame>``) with
``gzip`` and ``json``, independently of :mod:`producers.replay.binance`: counts per file, the
first and last bookTicker and trade of each file field by field. Publishing runs a slice into
the session's real tansu broker and reads it back. The rate check is a lower bound only (no
timing upper bounds in unit tests).
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from arbstream.config import Settings
from arbstream.schemas import Heartbeat, Quote, Trade
from arbstream.topics import ensure_topics, quotes_topic, trades_topic
from producers.replay.binance import (
    VENUES,
    BinanceFile,
    binance_files,
    estimate_clock_offset_ms,
    load_binance_records,
    read_binance_file,
    replay_binance,
)
from producers.replay.errors import ReplayInputError
from producers.replay.publish import publish_quotes
from spark_jobs.kafka_source import end_offsets
from testing.support import consume

#: bookTicker and trade frames per file, counted with zcat | grep on the raw files.
COUNTS = {
    "spot_btcusdt_20240808.gz": (28_040, 9_757),
    "spot_btcusdt_20240809.gz": (45_134, 10_147),
    "spot_ethusdt_20240808.gz": (24_077, 6_106),
    "usdm_btcusdt_20240808.gz": (66_089, 21_313),
    "usdm_ethusdt_20240808.gz": (53_992, 14_076),
}


def raw_frames(path: Path, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """``(receive ns, data)`` of every ``@<kind>`` frame of a file, read independently."""
    out = []
    with gzip.open(path, "rt") as fp:
        for line in fp:
            ns, _, frame = line.rstrip("\n").partition(" ")
            doc = json.loads(frame)
            if doc.get("stream", "").endswith("@" + kind):
                out.append((int(ns), doc["data"]))
    return out


def expected_quote(path: Path, ns: int, d: dict[str, Any]) -> Quote:
    spot = path.name.startswith("spot_")
    symbol = d["s"].replace("USDT", "-USDT")
    return Quote(
        exchange="binance" if spot else "binanceusdm", symbol=symbol,
        bid=float(d["b"]), ask=float(d["a"]), bid_size=float(d["B"]), ask_size=float(d["A"]),
        exchange_ts=ns // 1_000_000 if spot else d["T"], received_ts=ns // 1_000_000,
        dedupe_key=f"{'binance' if spot else 'binanceusdm'}:{symbol}:q:{d['u']}",
    )


@pytest.fixture(scope="module")
def files(data_dir: Path) -> list[BinanceFile]:
    return binance_files(data_dir)


def test_files_and_venues(files: list[BinanceFile]) -> None:
    assert [f.path.name for f in files] == sorted(COUNTS)
    assert {(f.market, f.exchange) for f in files} == {("spot", "binance"),
                                                       ("usdm", "binanceusdm")}
    assert {f.symbol for f in files} == {"BTC-USDT", "ETH-USDT"}
    assert VENUES == {"spot": "binance", "usdm": "binanceusdm"}
    assert Settings().taker_fees["binanceusdm"] == 0.0005


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_file_against_raw_json(data_dir: Path, files: list[BinanceFile], name: str) -> None:
    [file] = [f for f in files if f.path.name == name]
    records = list(read_binance_file(file, trades=True))
    quotes = [r for r in records if isinstance(r, Quote)]
    trades = [r for r in records if isinstance(r, Trade)]
    assert (len(quotes), len(trades)) == COUNTS[name]

    raw_quotes = raw_frames(file.path, "bookTicker")
    for got, (ns, d) in ((quotes[0], raw_quotes[0]), (quotes[-1], raw_quotes[-1])):
        assert got == expected_quote(file.path, ns, d)
    if file.market == "spot":  # no event time in spot bookTicker: the receive time
        assert all(q.exchange_ts == q.received_ts for q in quotes)
    else:
        assert quotes[0].exchange_ts == raw_quotes[0][1]["T"] != quotes[0].received_ts

    raw_trades = raw_frames(file.path, "trade")
    for got, (ns, d) in ((trades[0], raw_trades[0]), (trades[-1], raw_trades[-1])):
        assert got == Trade(
            exchange=file.exchange, symbol=file.symbol, trade_id=str(d["t"]),
            price=float(d["p"]), size=float(d["q"]), side="sell" if d["m"] else "buy",
            exchange_ts=d["T"], received_ts=ns // 1_000_000,
        )


def test_exact_first_values(files: list[BinanceFile]) -> None:
    """Two quotes spelled out from the raw lines, so the parsing is pinned by hand too."""
    spot = next(read_binance_file(next(f for f in files if f.path.name.startswith("spot_eth"))))
    # 1723161254024619568 {"stream":"ethusdt@bookTicker","data":{"u":35346513501,
    #   "s":"ETHUSDT","b":"2683.80000000","B":"3.02920000","a":"2683.81000000","A":"31.43950000"}}
    assert spot == Quote(
        exchange="binance", symbol="ETH-USDT", bid=2683.8, ask=2683.81, bid_size=3.0292,
        ask_size=31.4395, exchange_ts=1723161254024, received_ts=1723161254024,
        dedupe_key="binance:ETH-USDT:q:35346513501",
    )
    perp = next(read_binance_file(next(f for f in files if f.path.name.startswith("usdm_btc"))))
    # 1723161255088169167 {"stream":"btcusdt@bookTicker","data":{"e":"bookTicker",
    #   "u":5123107839020,"s":"BTCUSDT","b":"61800.20","B":"2.507","a":"61800.30","A":"2.510",
    #   "T":1723161256313,"E":1723161256313}}
    assert perp == Quote(
        exchange="binanceusdm", symbol="BTC-USDT", bid=61800.2, ask=61800.3, bid_size=2.507,
        ask_size=2.51, exchange_ts=1723161256313, received_ts=1723161255088,
        dedupe_key="binanceusdm:BTC-USDT:q:5123107839020",
    )


def test_load_sorted_and_clock_offset(data_dir: Path, files: list[BinanceFile]) -> None:
    records = load_binance_records(data_dir)
    assert len(records) == sum(q for q, _ in COUNTS.values()) == 217_332
    keys = [(r.exchange_ts, r.received_ts) for r in records]
    assert keys == sorted(keys)
    shifted = load_binance_records(data_dir, ["ETH-USDT"], ["spot"], spot_clock_offset_ms=1272)
    assert shifted[0].exchange_ts == shifted[0].received_ts + 1272
    # The recorder's clock was about 1.27 s behind Binance's (shared/data/README.md).
    for file in files:
        assert 1200 < estimate_clock_offset_ms(file) < 1300


def test_bad_frame_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "spot_btcusdt_20240808.gz"
    good = '{"u":1,"s":"BTCUSDT","b":"2.0","B":"1","a":"2.5","A":"1"}'
    crossed = '{"u":2,"s":"BTCUSDT","b":"3.0","B":"1","a":"2.5","A":"1"}'
    with gzip.open(path, "wt") as fp:
        for i, data in enumerate([good, crossed]):
            fp.write(f"{10**18 + i} {{\"stream\":\"btcusdt@bookTicker\",\"data\":{data}}}\n")
    records = read_binance_file(BinanceFile.of(path))
    assert next(records).bid == 2.0
    with pytest.raises(ReplayInputError, match="line 2: bookTicker: .*crossed quote"):
        next(records)


def test_publish_slice_to_kafka_at_a_rate(settings: Settings, data_dir: Path) -> None:
    venues = list(VENUES.values())
    topics = [t for v in venues for t in (quotes_topic(v), trades_topic(v))]
    ensure_topics(settings)
    before = end_offsets(settings.kafka_client_config(), topics)
    # The overlap of the four feeds: from the first perp quote on, quotes and trades.
    records = load_binance_records(data_dir, trades=True)
    start = next(i for i, r in enumerate(records) if r.exchange == "binanceusdm")
    n, rate = 1_500, 3_000.0
    batch = records[start:start + n]

    report = publish_quotes(iter(batch), settings, progress=False, rate=rate)

    assert report.elapsed_s >= n / rate * 0.8
    assert report.quotes + report.trades == n
    assert report.trades == sum(isinstance(r, Trade) for r in batch) > 0
    assert report.last_event_ts == max(r.exchange_ts for r in batch)
    for topic in topics:
        records_read = consume(settings, topic, before.get(topic, {}))
        docs = [json.loads(m.value()) for m in records_read]
        beats = [d for d in docs if d["type"] == "heartbeat"]
        if topic.endswith(".quotes"):
            [beat] = beats
            # at the replay's last event time, never in the future
            assert Heartbeat.model_validate(beat).exchange_ts == report.last_event_ts
        by_partition: dict[int, list[Any]] = defaultdict(list)
        for msg, doc in zip(records_read, docs, strict=True):
            if doc["type"] != "heartbeat":
                model = Trade if doc["type"] == "trade" else Quote
                record = model.model_validate(doc)
                assert msg.key() == record.symbol.encode()
                by_partition[msg.partition()].append(record)
        exchange = topic.split(".")[1]
        want = [r for r in batch if r.exchange == exchange
                and isinstance(r, Trade) == topic.endswith(".trades")]
        assert report.published.get(topic, 0) == len(want)
        got = [r for rs in by_partition.values() for r in rs]
        assert sorted(got, key=lambda r: r.dedupe_key) == sorted(want, key=lambda r: r.dedupe_key)
        for rs in by_partition.values():  # a symbol keeps its order within its partition
            keys = {r.dedupe_key for r in rs}
            in_order = [r.dedupe_key for r in want if r.dedupe_key in keys]
            assert [r.dedupe_key for r in rs] == in_order


def test_lazy_publish_rejects_unconfigured_venue(settings: Settings, data_dir: Path) -> None:
    narrow = settings.model_copy(update={"exchanges": ["binance"]})
    file = binance_files(data_dir, ["BTC-USDT"], ["usdm"])[0]
    with pytest.raises(ValueError, match="binanceusdm.*ARB_EXCHANGES"):
        publish_quotes(itertools.islice(read_binance_file(file), 3), narrow, progress=False)
    with pytest.raises(ValueError, match="binanceusdm"):
        replay_binance(narrow, ["BTC-USDT"], ["usdm"], progress=False)
