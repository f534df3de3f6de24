"""Pure DataFrame transformations of the stream job: parse and validate trade and health
records (market data is decoded in Python: :mod:`spark_jobs.decode`).

Every function takes and returns a DataFrame and does no I/O, so each is tested on static
DataFrames and the same code runs inside the streaming queries. Only Spark's own operators are
used (``from_json``, ``try_parse_json``, higher-order array functions): no Python UDFs. Each
record is parsed once; an invalid one keeps its payload and gets ``error``, the first failed
check as a sentence (reason codes such as ``timestamp_out_of_range`` or ``record_too_large``
first), and leaves the stream as a dead letter. Snapshots, pairs and spreads are computed by
the market query's stateful operator (:mod:`spark_jobs.engine`).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from arbstream.schemas import (
    EXCHANGE_RE,
    HEALTH_DDL,
    HEALTH_FIELDS,
    MAX_TS_MS,
    MIN_TS_MS,
    SCHEMA_VERSION,
    SYMBOL_RE,
    TRADE_DDL,
)

TRADE_COLUMNS = [
    "exchange", "symbol", "trade_id", "price", "size", "side", "exchange_ts", "received_ts",
    "dedupe_key",
]


def _java_regex(pattern: str) -> str:
    """A ``^...$`` pattern for Spark's ``rlike`` (Java), where ``$`` also matches before a
    final newline: anchor at the very end of input with ``\\z`` instead."""
    return pattern.removesuffix("$") + r"\z"


EXCHANGE_JAVA_RE = _java_regex(EXCHANGE_RE.pattern)
SYMBOL_JAVA_RE = _java_regex(SYMBOL_RE.pattern)


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)} milliseconds"


def _payload(raw: DataFrame, ddl: str) -> DataFrame:
    """Kafka records → ``topic, partition, offset``, ``raw`` (UTF-8 text or base64),
    ``raw_encoding``, ``_utf8``, ``_json_ok`` and ``q``, the value parsed with ``ddl``."""
    text = F.col("value").cast("string")
    utf8 = F.is_valid_utf8(text)
    return raw.select(
        utf8.alias("_utf8"),
        "value", "topic", "partition", "offset",
        F.when(utf8, text).otherwise(F.base64(F.col("value"))).alias("raw"),
        F.when(utf8, F.lit("utf-8")).otherwise(F.lit("base64")).alias("raw_encoding"),
        F.when(utf8, F.try_parse_json(text)).isNotNull().alias("_json_ok"),
        F.from_json(text, ddl).alias("q"),
    )


def _payload_checks() -> list[tuple[Column, Column]]:
    return [
        (F.col("raw").isNull(), F.lit("empty payload")),
        (~F.col("_utf8"), F.lit("payload is not UTF-8")),
        (~F.col("_json_ok"), F.lit("malformed JSON")),
        (
            F.col("q.schema_version").isNull() | (F.col("q.schema_version") != SCHEMA_VERSION),
            F.concat(F.lit("unsupported schema_version "),
                     F.coalesce(F.col("q.schema_version").cast("string"), F.lit("null"))),
        ),
    ]


def _identity_checks(topic_kinds: str, has_symbol: Column) -> list[tuple[Column, Column]]:
    """Checks of a market-data record's exchange id, its topic ``md.<exchange>.<kind>``
    (``topic_kinds`` kinds joined by ``|``) and, where ``has_symbol``, its canonical symbol."""
    # md.<exchange>.<kind> by splitting, not a regex per row; "" when the topic has no such form
    parts = F.split(F.col("topic"), r"\.")
    kinds = F.array(*[F.lit(k) for k in topic_kinds.split("|")])
    topic_exchange = F.when(
        (F.size(parts) == 3) & (parts[0] == "md") & F.array_contains(kinds, parts[2]), parts[1]
    ).otherwise(F.lit(""))
    return [
        (
            ~F.coalesce(F.col("exchange").rlike(EXCHANGE_JAVA_RE), F.lit(False)),
            F.lit("exchange missing or not a lower-case id"),
        ),
        (
            (topic_exchange != "") & (topic_exchange != F.col("exchange")),
            F.concat(F.lit("exchange '"), F.col("exchange"),
                     F.lit("' does not match topic "), F.col("topic")),
        ),
        (
            has_symbol & ~F.coalesce(F.col("symbol").rlike(SYMBOL_JAVA_RE), F.lit(False)),
            F.lit("symbol missing or not canonical BASE-QUOTE"),
        ),
    ]


#: ASCII control characters (CR, LF, NUL, ...): never allowed in ids.
CONTROL_CHARS_RE = r"[\x00-\x1f\x7f]"


def _time_checks() -> list[tuple[Column, Column]]:
    """Checks of a market-data record's event and receive times and its dedupe key."""
    return [
        _positive("exchange_ts"),
        _positive("received_ts"),
        *[(~_in_range(name), F.concat(
            F.lit(f"timestamp_out_of_range: {name} "), F.col(name).cast("string"),
            F.lit(" ms is outside 2009-01-01..2100-01-01"))) for name in ("exchange_ts",
                                                                          "received_ts")],
        (F.coalesce(F.length("dedupe_key"), F.lit(0)) == 0, F.lit("dedupe_key missing")),
        (F.col("dedupe_key").rlike(CONTROL_CHARS_RE),
         F.lit("dedupe_key contains control characters (CR, LF, ...)")),
    ]


def _in_range(name: str) -> Column:
    """``name`` (UTC ms) within [:data:`MIN_TS_MS`, :data:`MAX_TS_MS`); false for null."""
    col = F.col(name)
    return F.coalesce((col >= MIN_TS_MS) & (col < MAX_TS_MS), F.lit(False))


def event_ts(name: str = "exchange_ts") -> Column:
    """Timestamp of the UTC-ms column ``name``, null outside the sane range (so that a value
    beyond year 294,247 never overflows ``timestamp_millis``)."""
    return F.when(_in_range(name), F.timestamp_millis(F.col(name).cast("long")))


def _positive(name: str, when: Column | None = None) -> tuple[Column, Column]:
    """Check that ``name`` is a finite positive number (where ``when`` holds)."""
    col = F.col(name)
    # from_json reads the strings "NaN" and "Infinity" as doubles: reject them too.
    cond = col.isNull() | (col <= 0) | F.isnan(col) | (col == F.lit(float("inf")))
    return (cond if when is None else when & cond,
            F.lit(f"{name} missing or not a positive number"))


def _first_error(checks: list[tuple[Column, Column]]) -> Column:
    return F.coalesce(*[F.when(cond, msg) for cond, msg in checks])


def parse_trades(raw: DataFrame) -> DataFrame:
    """Parse ``md.<exchange>.trades`` records (:data:`arbstream.schemas.TRADE_DDL`, derived from
    :class:`arbstream.schemas.Trade`) and say why each invalid one is invalid.

    Output: :data:`TRADE_COLUMNS` (price in quote currency, size in base units, side the taker
    side or null, times UTC ms), ``ts`` (timestamp of ``exchange_ts``) and the dead-letter
    columns (``raw, raw_encoding, topic, partition, offset, error``).
    """
    parsed = _payload(raw, TRADE_DDL).select(
        "*", *[F.col(f"q.{c}").alias(c) for c in TRADE_COLUMNS + ["type"]]
    )
    checks = [
        *_payload_checks(),
        (F.coalesce(F.col("type"), F.lit("")) != "trade", F.lit("type must be 'trade'")),
        *_identity_checks("trades", F.lit(True)),
        (F.coalesce(F.length("trade_id"), F.lit(0)) == 0, F.lit("trade_id missing")),
        _positive("price"),
        _positive("size"),
        (~F.coalesce(F.col("side").isin("buy", "sell"), F.col("side").isNull()),
         F.lit("side must be 'buy', 'sell' or null")),
        *_time_checks(),
    ]
    return parsed.select(
        *TRADE_COLUMNS,
        event_ts().alias("ts"),
        "raw", "raw_encoding", "topic", "partition", "offset",
        _first_error(checks).alias("error"),
    )


def valid_trades(parsed: DataFrame) -> DataFrame:
    """The valid trades of :func:`parse_trades`: :data:`TRADE_COLUMNS` plus ``ts``."""
    return parsed.where(F.col("error").isNull()).select(*TRADE_COLUMNS, "ts")


def parse_health(raw: DataFrame) -> DataFrame:
    """Parse producers' ``md.health`` records (:data:`arbstream.schemas.HEALTH_DDL`, derived
    from :class:`arbstream.schemas.Health`).

    Output: the health fields (:data:`arbstream.schemas.HEALTH_FIELDS`), ``time`` (timestamp
    of ``ts``), and the dead-letter columns (``raw, raw_encoding, topic, partition, offset,
    error``).
    """
    parsed = _payload(raw, HEALTH_DDL)
    checks = [
        *_payload_checks(),
        (F.coalesce(F.col("q.type"), F.lit("")) != "health", F.lit("type must be 'health'")),
        (
            ~F.coalesce(F.col("q.exchange").rlike(EXCHANGE_JAVA_RE), F.lit(False)),
            F.lit("exchange missing or not a lower-case id"),
        ),
        (F.coalesce(F.col("q.ts"), F.lit(0)) <= 0, F.lit("ts missing or not positive")),
        (~F.coalesce((F.col("q.ts") >= MIN_TS_MS) & (F.col("q.ts") < MAX_TS_MS), F.lit(True)),
         F.lit("timestamp_out_of_range: ts is outside 2009-01-01..2100-01-01")),
    ]
    error = _first_error(checks)
    return parsed.select(
        *[F.col(f"q.{c}").alias(c) for c in HEALTH_FIELDS],
        F.when(error.isNull(), F.timestamp_millis(F.col("q.ts"))).alias("time"),
        "raw", "raw_encoding", "topic", "partition", "offset", error.alias("error"),
    )


def dead_letters(parsed: DataFrame, stage: str = "stream") -> DataFrame:
    """The invalid rows of :func:`parse_trades` or :func:`parse_health` as ``md.deadletter``
    records.

    Output columns ``key`` (the source topic) and ``value``: canonical
    :class:`arbstream.schemas.DeadLetter` JSON with the reason and the raw payload.
    """
    bad = parsed.where(F.col("error").isNotNull())
    value = F.to_json(
        F.struct(
            F.lit(SCHEMA_VERSION).alias("schema_version"),
            F.lit("deadletter").alias("type"),
            F.lit(stage).alias("stage"),
            F.col("error").alias("reason"),
            F.col("topic").alias("source_topic"),
            F.col("partition").alias("source_partition"),
            F.col("offset").alias("source_offset"),
            F.coalesce(F.col("raw"), F.lit("")).alias("raw"),
            F.col("raw_encoding"),
            F.unix_millis(F.current_timestamp()).alias("rejected_ts"),
        )
    )
    return bad.select(F.col("topic").alias("key"), value.alias("value"))
