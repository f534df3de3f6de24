"""Pure DataFrame transformations of the arbitrage job: parse, validate, dedupe, snapshot, spread.

Every function takes and returns a DataFrame and does no I/O, so each is tested on static
DataFrames and the same code runs inside the streaming query. Only Spark's own operators are
used (``from_json``, window aggregations, higher-order array functions): no Python UDFs.

Spread semantics (what ``tests/test_transforms.py`` pins down):

* For each symbol and each event-time window of width ``W`` (ending on multiples of ``W``
  since the epoch), the *snapshot* holds each exchange's latest quote with
  ``exchange_ts`` in ``(window_end - max_quote_age, window_end]``.
* For every ordered pair of distinct exchanges (buy on A at A's ask, sell on B at B's bid):
  ``gross = B.bid / A.ask - 1`` and ``net = gross - fee_A - fee_B`` (fractions; taker fees from
  :mod:`arbstream.fees`); ``gross_bps = gross * 10_000`` and likewise ``net_bps``.
* An opportunity is a pair with ``net > min_net``.

Implementation: Spark windows are ``[start, end)``, so quotes are windowed on ``event_time =
exchange_ts - 1 µs``; a sliding window of length ``max_quote_age`` and slide ``W`` then holds
exactly the quotes with ``exchange_ts`` in ``(end - max_quote_age, end]``.
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
)

BPS = 10_000.0
QUOTE_COLUMNS = [
    "exchange", "symbol", "bid", "ask", "bid_size", "ask_size", "exchange_ts", "received_ts",
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


def _fee_map(fees: Mapping[str, float]) -> Column:
    pairs = [x for exchange, fee in sorted(fees.items()) for x in (F.lit(exchange), F.lit(fee))]
    return F.create_map(*pairs)


def _payload(raw: DataFrame, ddl: str) -> DataFrame:
    """Kafka records → ``topic, partition, offset``, ``raw`` (UTF-8 text or base64),
    ``raw_encoding``, ``_utf8``, ``_json_ok`` and ``q``, the value parsed with ``ddl``."""
    text = F.col("value").cast("string")
    utf8 = F.is_valid_utf8(text)
    return raw.select(
        utf8.alias("_utf8"),
        "topic", "partition", "offset",
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


def parse_quotes(raw: DataFrame, fees: Mapping[str, float]) -> DataFrame:
    """Parse Kafka records into quotes and say why each invalid one is invalid.

    Input: the Kafka source's columns (``key, value, topic, partition, offset, ...``).
    Output: the quote fields of :class:`arbstream.schemas.Quote`, plus ``ts`` (timestamp of
    ``exchange_ts``), ``raw`` (the value as UTF-8 text, or base64 when it is not UTF-8),
    ``raw_encoding``, ``topic``, ``partition``, ``offset`` and ``error``: null for a valid quote,
    else the first failed check as a sentence. Nothing is dropped here.
    """
    parsed = _payload(raw, QUOTE_DDL).select(
        "*", *[F.col(f"q.{c}").alias(c) for c in QUOTE_COLUMNS + ["schema_version", "type"]]
    )
    topic_exchange = F.regexp_extract("topic", r"^md\.([^.]+)\.quotes$", 1)
    fee = _fee_map(fees)[F.col("exchange")]

    is_quote = F.col("type") == "quote"

    def positive(name: str, quote_only: bool = True) -> tuple[Column, Column]:
        col = F.col(name)
        # from_json reads the strings "NaN" and "Infinity" as doubles: reject them too.
        cond = col.isNull() | (col <= 0) | F.isnan(col) | (col == F.lit(float("inf")))
        return (
            (is_quote & cond) if quote_only else cond,
            F.lit(f"{name} missing or not a positive number"),
        )

    checks: list[tuple[Column, Column]] = [
        *_payload_checks(),
        (
            ~F.coalesce(F.col("type"), F.lit("")).isin("quote", "heartbeat"),
            F.lit("type must be 'quote' or 'heartbeat'"),
        ),
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
            is_quote & ~F.coalesce(F.col("symbol").rlike(SYMBOL_JAVA_RE), F.lit(False)),
            F.lit("symbol missing or not canonical BASE-QUOTE"),
        ),
        positive("bid"),
        positive("ask"),
        (
            F.col("bid") > F.col("ask"),
            F.concat(F.lit("crossed quote: bid "), F.col("bid").cast("string"),
                     F.lit(" > ask "), F.col("ask").cast("string")),
        ),
        (F.col("bid_size") < 0, F.lit("bid_size is negative")),
        (F.col("ask_size") < 0, F.lit("ask_size is negative")),
        positive("exchange_ts", quote_only=False),
        positive("received_ts", quote_only=False),
        (F.coalesce(F.length("dedupe_key"), F.lit(0)) == 0, F.lit("dedupe_key missing")),
        (
            fee.isNull(),
            F.concat(F.lit("no taker fee configured for exchange "), F.col("exchange")),
        ),
    ]
    error = F.coalesce(*[F.when(cond, msg) for cond, msg in checks])
    return parsed.select(
        *QUOTE_COLUMNS,
        "type",
        F.timestamp_millis("exchange_ts").alias("ts"),
        "raw", "raw_encoding", "topic", "partition", "offset",
        error.alias("error"),
    )


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
    ]
    error = F.coalesce(*[F.when(cond, msg) for cond, msg in checks])
    return parsed.select(
        *[F.col(f"q.{c}").alias(c) for c in HEALTH_FIELDS],
        F.timestamp_millis(F.col("q.ts")).alias("time"),
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


def dedupe(quotes: DataFrame, watermark_seconds: float) -> DataFrame:
    """Add ``event_time`` (``ts`` − 1 µs), watermark it, and drop repeated ``dedupe_key``s.

    Duplicates are dropped while the first copy's event time is within the watermark delay
    (``dropDuplicatesWithinWatermark``); quotes later than the watermark are dropped by Spark.
    On a static DataFrame (tests, backfills) this is a plain ``dropDuplicates``.
    """
    with_time = quotes.withColumn("event_time", F.col("ts") - F.expr("INTERVAL 1 MICROSECOND"))
    marked = with_time.withWatermark("event_time", _ms(watermark_seconds))
    if marked.isStreaming:
        return marked.dropDuplicatesWithinWatermark(["dedupe_key"])
    return marked.dropDuplicates(["dedupe_key"])


def snapshots(quotes: DataFrame, window_seconds: float, max_quote_age_seconds: float) -> DataFrame:
    """Each exchange's latest quote per symbol and window: the snapshot of the module docstring.

    Input: :func:`dedupe` output. Output: one row per (symbol, exchange, window) with the
    ``window`` struct (``start`` = ``end`` − max_quote_age, ``end``), ``bid``, ``ask`` and
    ``quote_ts`` (the chosen quote's exchange time). "Latest" orders by ``ts``, then
    ``received_ts``, then ``dedupe_key`` so ties resolve the same way every time.
    """
    window = F.window(
        "event_time",
        _ms(max_quote_age_seconds),
        _ms(window_seconds),
    )
    latest = F.max(F.struct("ts", "received_ts", "dedupe_key", "bid", "ask"))
    return (
        quotes.groupBy("symbol", "exchange", window.alias("window"))
        .agg(latest.alias("q"))
        .select(
            "symbol", "exchange", "window",
            F.col("q.bid").alias("bid"),
            F.col("q.ask").alias("ask"),
            F.col("q.ts").alias("quote_ts"),
        )
    )


def pairs(snapshot: DataFrame, window_seconds: float) -> DataFrame:
    """Every ordered pair of distinct exchanges in each (symbol, window) snapshot.

    Output: ``symbol, window_start, window_end, buy_exchange, buy_ask, buy_ts, sell_exchange,
    sell_bid, sell_ts``. Snapshots with one exchange yield nothing.
    """
    # Re-window on the first window's time so that the watermark can close this aggregation.
    regroup = F.window(F.window_time("window"), _ms(window_seconds))
    grouped = snapshot.groupBy("symbol", regroup.alias("slot")).agg(
        F.collect_list(F.struct("exchange", "bid", "ask", "quote_ts", "window")).alias("qs")
    )
    combos = F.filter(
        F.flatten(
            F.transform("qs", lambda a: F.transform("qs", lambda b: F.struct(
                a.alias("buy"), b.alias("sell")
            )))
        ),
        lambda p: p["buy"]["exchange"] != p["sell"]["exchange"],
    )
    return grouped.select("symbol", F.explode(combos).alias("p")).select(
        "symbol",
        F.col("p.buy.window.start").alias("window_start"),
        F.col("p.buy.window.end").alias("window_end"),
        F.col("p.buy.exchange").alias("buy_exchange"),
        F.col("p.buy.ask").alias("buy_ask"),
        F.col("p.buy.quote_ts").alias("buy_ts"),
        F.col("p.sell.exchange").alias("sell_exchange"),
        F.col("p.sell.bid").alias("sell_bid"),
        F.col("p.sell.quote_ts").alias("sell_ts"),
    )


def spreads(pair_rows: DataFrame, fees: Mapping[str, float]) -> DataFrame:
    """Add fees, gross and net spreads (fractions and bps) and a deterministic id.

    ``opportunity_id`` is ``symbol|window_end ISO-8601 UTC ms|buy_exchange|sell_exchange``;
    it is the MongoDB ``_id`` and the Kafka key, so replays overwrite instead of duplicating.
    """
    fee = _fee_map(fees)
    gross = F.col("sell_bid") / F.col("buy_ask") - F.lit(1.0)
    net = F.col("gross") - F.col("buy_fee") - F.col("sell_fee")
    return (
        pair_rows.withColumn("buy_fee", fee[F.col("buy_exchange")])
        .withColumn("sell_fee", fee[F.col("sell_exchange")])
        .withColumn("gross", gross)
        .withColumn("net", net)
        .withColumn("gross_bps", F.col("gross") * BPS)
        .withColumn("net_bps", F.col("net") * BPS)
        .withColumn(
            "opportunity_id",
            F.concat_ws(
                "|", "symbol",
                F.date_format("window_end", "yyyy-MM-dd'T'HH:mm:ss.SSS'Z'"),
                "buy_exchange", "sell_exchange",
            ),
        )
    )


def opportunities(spread_rows: DataFrame, min_net: float) -> DataFrame:
    """Pairs whose net spread (fraction) is strictly above ``min_net``."""
    return spread_rows.where(F.col("net") > F.lit(min_net))


def spread_stream(
    raw: DataFrame,
    fees: Mapping[str, float],
    watermark_seconds: float,
    window_seconds: float,
    max_quote_age_seconds: float,
) -> DataFrame:
    """The whole chain from Kafka records to spread rows (all pairs, not only opportunities)."""
    events = dedupe(valid_events(parse_quotes(raw, fees)), watermark_seconds)
    quotes = events.where(F.col("type") == "quote")
    snap = snapshots(quotes, window_seconds, max_quote_age_seconds)
    return spreads(pairs(snap, window_seconds), fees)
