"""Parsing and validation of trades on static Spark DataFrames: ``parse_trades``,
``valid_trades`` and ``dead_letters``.

Only the shared ``spark`` fixture is used (no services). Market-data records (quotes, books,
heartbeats) are decoded in Python and tested in ``tests/test_decode.py``; the spread semantics
through the stream engine in ``tests/test_engine_scenarios.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import TimestampType

from arbstream.schemas import DeadLetter
from spark_jobs.transforms import (
    dead_letters,
    parse_trades,
    valid_trades,
)

RAW_SCHEMA = "key binary, value binary, topic string, partition int, offset long"
FEES = {"coinbase": 0.006, "kraken": 0.0026, "binance": 0.001}
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z
FAR_MS = 9_300_000_000_000_000  # year ~296,700: beyond Spark's timestamp range (~9.22e15 ms)
OUT_OF_RANGE = "timestamp_out_of_range: "
CONTROL = "dedupe_key contains control characters (CR, LF, ...)"

# --- helpers ---------------------------------------------------------------------------------


def raw_frame(spark: SparkSession, items: Iterable[tuple[str, bytes | None]]) -> DataFrame:
    """Kafka-shaped rows of ``(topic, value)`` pairs: no key, partition 0, offsets 0, 1, 2,
    ... in order."""
    return spark.createDataFrame(
        [(None, value, topic, 0, offset) for offset, (topic, value) in enumerate(items)],
        RAW_SCHEMA)


def collect(df: DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with every timestamp column as integer UTC ms (checked to be whole ms)."""
    ts_cols = {f.name for f in df.schema.fields if isinstance(f.dataType, TimestampType)}
    cols = [F.unix_micros(c).alias(c) if c in ts_cols else F.col(c) for c in df.columns]
    out = []
    for row in df.select(*cols).collect():
        d = row.asDict()
        for c in ts_cols:
            if d[c] is not None:
                assert d[c] % 1000 == 0, (c, d)
                d[c] //= 1000
        out.append(d)
    return out



# --- trades ------------------------------------------------------------------------------------


def test_real_trades_parse_and_bad_ones_are_dead_lettered(spark: SparkSession,
                                                          data_dir: Path) -> None:
    from itertools import islice

    from arbstream.schemas import Trade
    from producers.replay.binance import binance_files, read_binance_file

    file = binance_files(data_dir, ["BTC-USDT"], ["spot"])[0]
    trades = list(islice((r for r in read_binance_file(file, trades=True)
                          if isinstance(r, Trade)), 300))
    topic = f"md.{file.exchange}.trades"
    good = json.loads(trades[0].to_json())

    def tbad(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    cases: list[tuple[str, bytes | None, str]] = [
        (topic, tbad(type="quote"), "type must be 'trade'"),
        (topic, tbad(price=0.0), "price missing or not a positive number"),
        (topic, tbad(size="NaN"), "size missing or not a positive number"),
        (topic, tbad(side="long"), "side must be 'buy', 'sell' or null"),
        (topic, tbad(trade_id=""), "trade_id missing"),
        (topic, tbad(symbol="btcusdt"), "symbol missing or not canonical BASE-QUOTE"),
        ("md.kraken.trades", tbad(), f"exchange '{file.exchange}' does not match topic "
                                     "md.kraken.trades"),
        (topic, tbad(exchange_ts=-5), "exchange_ts missing or not a positive number"),
        (topic, tbad(exchange_ts=FAR_MS), f"{OUT_OF_RANGE}exchange_ts {FAR_MS} ms is outside "
                                          "2009-01-01..2100-01-01"),
        (topic, tbad(dedupe_key="t\r\nx"), CONTROL),
        (topic, b'{"type": "trade"', "malformed JSON"),
    ]
    raw = raw_frame(spark, [(topic, t.to_json()) for t in trades] + [(t, v) for t, v, _ in cases])
    parsed = parse_trades(raw)
    rows = sorted(collect(parsed), key=lambda r: r["offset"])
    assert [r["error"] for r in rows] == [None] * len(trades) + [r for _, _, r in cases]
    valid = sorted(collect(valid_trades(parsed)), key=lambda r: r["dedupe_key"])
    want = sorted(({**t.model_dump(exclude={"schema_version", "type"}), "ts": t.exchange_ts}
                   for t in trades), key=lambda r: r["dedupe_key"])
    assert valid == want
    assert {r["side"] for r in valid} == {"buy", "sell"}
    letters = [DeadLetter.model_validate_json(r["value"]) for r in collect(dead_letters(parsed))]
    assert sorted(x.reason for x in letters) == sorted(r for _, _, r in cases)
