"""The Spark schemas of wire records against their pydantic models (:mod:`arbstream.schemas`).

The stream parses trades and health records with ``from_json`` using :data:`TRADE_DDL` and
:data:`HEALTH_DDL`, derived from :class:`Trade` and :class:`Health`
(:mod:`arbstream.spark_schema`). Here the derived schemas are pinned: a model change that
changes what the stream parses fails until :data:`EXPECTED` and the stream's checks
(``spark_jobs/transforms.py``) follow it. Spark then parses JSON of real model records with
them and must give back every value. Only the shared ``spark`` fixture is used (no services).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    DataType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructType,
)

from arbstream.config import Settings
from arbstream.schemas import HEALTH_DDL, HEALTH_FIELDS, TRADE_DDL, Health, Trade
from arbstream.shell.stack import free_port
from arbstream.spark_schema import spark_columns, spark_ddl, spark_type
from producers.publisher import Publisher

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_123  # UTC ms: beyond 32 bits, as every epoch-ms value
BIG = 2**40 + 1  # a counter beyond 32 bits
COUNTERS = ("queue_depth", "frames", "records", "reconnects", "duplicates_dropped", "gaps",
            "missing", "deadletters", "delivery_failures")

#: The Spark schema each model's JSON is parsed with: columns in model field order (the key
#: order of ``model_dump_json``), all nullable.
EXPECTED: dict[type[BaseModel], tuple[str, list[tuple[str, DataType]]]] = {
    Trade: (TRADE_DDL, [
        ("schema_version", IntegerType()), ("exchange", StringType()), ("symbol", StringType()),
        ("exchange_ts", LongType()), ("received_ts", LongType()), ("type", StringType()),
        ("trade_id", StringType()), ("price", DoubleType()), ("size", DoubleType()),
        ("side", StringType()), ("dedupe_key", StringType()),
    ]),
    Health: (HEALTH_DDL, [
        ("schema_version", IntegerType()), ("type", StringType()), ("exchange", StringType()),
        ("ts", LongType()), ("messages_per_s", DoubleType()),
        ("last_message_age_s", DoubleType()), *[(c, LongType()) for c in COUNTERS],
    ]),
}

MODELS = list(EXPECTED)


def records(model: type[BaseModel]) -> list[BaseModel]:
    """Real records of ``model`` with the values that break a wrong type: epoch ms and counters
    beyond 32 bits, fractional and tiny doubles, null optional fields."""
    if model is Trade:
        return [
            Trade(exchange="kraken", symbol="BTC-USD", trade_id="t-1", price=27123.45,
                  size=1e-8, side="buy", exchange_ts=T0, received_ts=T0 + 7),
            Trade(exchange="coinbase_pro", symbol="ETH-USDT", trade_id="9", price=0.1,
                  size=3.5, exchange_ts=T0, received_ts=T0),
        ]
    assert model is Health, f"no records of {model.__name__}"
    return [
        Health(exchange="kraken", ts=T0, messages_per_s=12.345, last_message_age_s=0.25,
               **dict.fromkeys(COUNTERS, BIG)),
        Health(exchange="binance", ts=T0, messages_per_s=0.0, last_message_age_s=None,
               **dict.fromkeys(COUNTERS, 0)),
    ]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_spark_schema_agrees_with_the_model(spark: SparkSession, model: type[BaseModel]
                                            ) -> None:
    ddl, expected = EXPECTED[model]
    assert ddl == spark_ddl(model)
    schema = StructType.fromDDL(ddl)
    assert schema.names == list(model.model_fields)
    assert [(f.name, f.dataType) for f in schema.fields] == expected
    assert all(f.nullable for f in schema.fields), "from_json must also parse bad records"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_model_json_round_trips_through_from_json(spark: SparkSession, model: type[BaseModel]
                                                  ) -> None:
    ddl, _ = EXPECTED[model]
    sent = records(model)
    raw = spark.createDataFrame([(r.model_dump_json(),) for r in sent], "value string")
    parsed = raw.select(F.from_json("value", ddl).alias("r")).select("r.*")
    assert parsed.columns == list(model.model_fields)
    assert [row.asDict() for row in parsed.collect()] == [r.model_dump() for r in sent]


def test_health_fields_are_the_pinned_columns() -> None:
    """The columns, in order, of ``parse_health`` output and the stream's health rows."""
    assert [name for name, _ in EXPECTED[Health][1]] == HEALTH_FIELDS


def test_publisher_health_records_are_health_models(tmp_path: Path) -> None:
    pub = Publisher(Settings(state_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{free_port()}"))
    pub.frame_received("kraken")
    pub.stats["binance"].reconnects += 1  # an exchange without a frame yet
    records = pub.health()
    assert [r["exchange"] for r in records] == ["binance", "kraken"]
    for record in records:
        assert list(Health.model_validate(record).model_dump()) == list(record)


def test_spark_types_of_annotations() -> None:
    assert spark_type(Literal[1]) == "INT"
    assert spark_type(Literal["a", "b"] | None) == "STRING"
    assert spark_type(Literal[True]) == "BOOLEAN"
    assert spark_type(int | None) == "BIGINT"
    assert spark_type(float) == "DOUBLE"
    for unmapped in (list[float], float | str, Literal[1, "a"], bytes):
        with pytest.raises(TypeError, match="no Spark type"):
            spark_type(unmapped)


def test_a_field_without_a_spark_type_is_named() -> None:
    class Levels(BaseModel):
        depth: int
        bids: list[tuple[float, float]]

    with pytest.raises(TypeError, match=r"^Levels\.bids: no Spark type"):
        spark_columns(Levels)


def test_core_schemas_import_without_pyspark() -> None:
    code = ("import sys, arbstream.schemas, arbstream.spark_schema; "
            "assert 'pyspark' not in sys.modules, 'pyspark imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
