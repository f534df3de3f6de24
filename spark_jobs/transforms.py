"""Pure DataFrame transformations of the stream job: parse and validate Kafka records.

Every function takes and returns a DataFrame and does no I/O, so each is tested on static
DataFrames and the same code runs inside the streaming queries. Only Spark's own operators are
used (``from_json``, ``try_parse_json``, higher-order array functions): no Python UDFs. Each
record is parsed once; an invalid one keeps its payload and gets ``error``, the first failed
check as a sentence (reason codes such as ``timestamp_out_of_range`` or ``record_too_large``
first), and leaves the stream as a dead letter. Snapshots, pairs and spreads are computed by
the market query's stateful operator (:mod:`spark_jobs.engine`).
"""

from __future__ import annotations

from collections.abc import Mapping

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from arbstream.schemas import (
    EXCHANGE_RE,
    HEALTH_DDL,
    HEALTH_FIELDS,
    QUOTE_DDL,
    SCHEMA_VERSION,
    SYMBOL_RE,
    TRADE_DDL,
)

BPS = 10_000.0
QUOTE_COLUMNS = [
    "exchange", "symbol", "bid", "ask", "bid_size", "ask_size", "exchange_ts", "received_ts",
    "dedupe_key", "bids", "asks",
]
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


#: Sane range of event and receive times, UTC ms: [2009-01-01, 2100-01-01).
MIN_TS_MS = 1_230_768_000_000
MAX_TS_MS = 4_102_444_800_000
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


def parse_quotes(raw: DataFrame, fees: Mapping[str, float],
                 max_record_bytes: int | None = None) -> DataFrame:
    """Parse Kafka records into quotes and say why each invalid one is invalid.

    Input: the Kafka source's columns (``key, value, topic, partition, offset, ...``).
    A record longer than ``max_record_bytes`` (when given) is invalid before anything else.

    Output: the quote fields of :class:`arbstream.schemas.Quote`, plus ``ts`` (timestamp of
    ``exchange_ts``, null outside 2009..2100), ``value`` (the payload bytes), ``raw`` (the
    value as UTF-8 text, or base64 when it is not UTF-8),
    ``raw_encoding``, ``topic``, ``partition``, ``offset`` and ``error``: null for a valid quote,
    else the first failed check as a sentence. Nothing is dropped here.
    """
    parsed = _payload(raw, QUOTE_DDL).select(
        "*", *[F.col(f"q.{c}").alias(c) for c in QUOTE_COLUMNS + ["schema_version", "type"]]
    )
    has_fee = F.col("exchange").isin(*sorted(fees))  # a hash-set lookup, not a map per row

    is_quote = F.col("type") == "quote"
    is_book = F.col("type") == "book"

    def levels_ok(name: str) -> Column:
        return (F.size(name) > 0) & F.forall(
            name, lambda lv: (F.size(lv) == 2) & (lv[0] > 0) & (lv[1] > 0)
            & ~F.isnan(lv[0]) & ~F.isnan(lv[1]) & (lv[0] < F.lit(float("inf")))
            & (lv[1] < F.lit(float("inf")))
        )

    def levels_sorted(name: str, best_first_desc: bool) -> Column:
        """Prices strictly ordered best first: bids descending, asks ascending."""
        prices = F.transform(name, lambda lv: lv[0])
        return (F.sort_array(prices, asc=not best_first_desc) == prices) & (
            F.size(F.array_distinct(prices)) == F.size(prices))

    size_checks = [] if max_record_bytes is None else [(
        F.octet_length("value") > max_record_bytes,
        F.concat(F.lit("record_too_large: "), F.octet_length("value").cast("string"),
                 F.lit(f" bytes > {max_record_bytes}")),
    )]
    checks: list[tuple[Column, Column]] = [
        *size_checks,
        *_payload_checks(),
        (
            ~F.coalesce(F.col("type"), F.lit("")).isin("quote", "heartbeat", "book"),
            F.lit("type must be 'quote', 'book' or 'heartbeat'"),
        ),
        *_identity_checks("quotes|book", is_quote | is_book),
        (
            is_book & ~F.coalesce(levels_ok("bids") & levels_ok("asks"), F.lit(False)),
            F.lit("book levels missing or not [positive price, positive size] pairs"),
        ),
        (
            is_book & ~(levels_sorted("bids", True) & levels_sorted("asks", False)),
            F.lit("book levels not sorted best first (bids descending, asks ascending)"),
        ),
        (
            is_book & (F.col("bids")[0][0] > F.col("asks")[0][0]),
            F.lit("crossed book: best bid > best ask"),
        ),
        _positive("bid", is_quote),
        _positive("ask", is_quote),
        *[(F.isnan(F.col(n)) | (F.abs(F.col(n)) == F.lit(float("inf"))),
           F.lit(f"{n} is not a finite number")) for n in ("bid_size", "ask_size")],
        (
            F.col("bid") > F.col("ask"),
            F.concat(F.lit("crossed quote: bid "), F.col("bid").cast("string"),
                     F.lit(" > ask "), F.col("ask").cast("string")),
        ),
        (F.col("bid_size") < 0, F.lit("bid_size is negative")),
        (F.col("ask_size") < 0, F.lit("ask_size is negative")),
        *_time_checks(),
        (
            ~F.coalesce(has_fee, F.lit(False)),
            F.concat(F.lit("no taker fee configured for exchange "), F.col("exchange")),
        ),
    ]
    return parsed.select(
        *QUOTE_COLUMNS,
        "type",
        event_ts().alias("ts"),
        "raw", "raw_encoding", "value", "topic", "partition", "offset",
        _first_error(checks).alias("error"),
    )


def parse_trades(raw: DataFrame) -> DataFrame:
    """Parse ``md.<exchange>.trades`` records (:data:`arbstream.schemas.TRADE_DDL`) and say
    why each invalid one is invalid.

    Output: :data:`TRADE_COLUMNS` (price in quote currency, size in base units, side the taker
    side or null, times UTC ms), ``ts`` (timestamp of ``exchange_ts``) and the dead-letter
    columns of :func:`parse_quotes` (``raw, raw_encoding, topic, partition, offset, error``).
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
    """Parse producers' ``md.health`` records (:data:`arbstream.schemas.HEALTH_DDL`).

    Output: the health fields, ``time`` (timestamp of ``ts``), and the dead-letter columns of
    :func:`parse_quotes` (``raw, raw_encoding, topic, partition, offset, error``).
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


def valid_events(parsed: DataFrame) -> DataFrame:
    """Valid quotes and heartbeats of :func:`parse_quotes`: quote columns, ``type``, ``ts``.

    Heartbeats (``{"type": "heartbeat", "exchange", "exchange_ts", "received_ts", ...}``) carry
    only event time. They move the watermark, so windows close while a market is quiet and
    after a finite replay, and are removed before the snapshots.
    """
    return parsed.where(F.col("error").isNull()).select(*QUOTE_COLUMNS, "type", "ts")


def valid_quotes(parsed: DataFrame) -> DataFrame:
    """The valid quotes of :func:`parse_quotes` (no heartbeats): quote columns plus ``ts``."""
    return valid_events(parsed).where(F.col("type") == "quote").drop("type")


def dead_letters(parsed: DataFrame, stage: str = "stream") -> DataFrame:
    """The invalid rows of :func:`parse_quotes` as ``md.deadletter`` records.

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
