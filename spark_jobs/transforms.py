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
    (``topic_kinds`` a regex alternation) and, where ``has_symbol``, its canonical symbol."""
    topic_exchange = F.regexp_extract("topic", rf"^md\.([^.]+)\.({topic_kinds})$", 1)
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
    fee = _fee_map(fees)[F.col("exchange")]

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

    checks: list[tuple[Column, Column]] = [
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
            fee.isNull(),
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

    Input: :func:`dedupe` output (quotes, and optionally ``book`` records). Output: one row per
    (symbol, exchange, window) with a quote, with the ``window`` struct (``start`` = ``end`` −
    max_quote_age, ``end``), the latest quote's ``bid, ask, bid_size, ask_size`` and
    ``quote_ts`` (its exchange time), ``messages`` (quotes of the exchange and symbol in the
    window), ``latency_ms`` (their mean ``received_ts − exchange_ts``, ms) and the latest
    book's ``book_bids``/``book_asks`` levels in the window (null without books). "Latest"
    orders by ``ts``, then ``received_ts``, then ``dedupe_key`` so ties resolve the same way
    every time.
    """
    window = F.window(
        "event_time",
        _ms(max_quote_age_seconds),
        _ms(window_seconds),
    )
    is_quote = F.col("type") == "quote" if "type" in quotes.columns else F.lit(True)
    is_book = F.col("type") == "book" if "type" in quotes.columns else F.lit(False)
    latest = F.max(F.when(is_quote, F.struct(
        "ts", "received_ts", "dedupe_key", "bid", "ask", "bid_size", "ask_size"
    )))
    book = F.max(F.when(is_book, F.struct("ts", "received_ts", "dedupe_key", "bids", "asks")))
    return (
        quotes.groupBy("symbol", "exchange", window.alias("window"))
        .agg(
            latest.alias("q"),
            F.count(F.when(is_quote, F.lit(1))).alias("messages"),
            F.avg(F.when(is_quote, F.col("received_ts") - F.col("exchange_ts")))
            .alias("latency_ms"),
            book.alias("b"),
        )
        .where(F.col("q").isNotNull())
        .select(
            "symbol", "exchange", "window",
            F.col("q.bid").alias("bid"),
            F.col("q.ask").alias("ask"),
            F.col("q.bid_size").alias("bid_size"),
            F.col("q.ask_size").alias("ask_size"),
            F.col("q.ts").alias("quote_ts"),
            "messages", "latency_ms",
            F.col("b.bids").alias("book_bids"),
            F.col("b.asks").alias("book_asks"),
        )
    )


def slots(snapshot: DataFrame, window_seconds: float) -> DataFrame:
    """Gather every snapshot of one window, all symbols together: ``slot`` (the window of
    width W ending at the snapshot's ``window.end``) and ``qs``, an array of snapshot structs
    with ``base`` and ``quote`` split from the symbol.

    All symbols share a slot so that cross-quote pairs can use that window's stablecoin rates.
    """
    # Re-window on the first window's time so that the watermark can close this aggregation.
    regroup = F.window(F.window_time("window"), _ms(window_seconds))
    parts = F.split("symbol", "-")
    return snapshot.groupBy(regroup.alias("slot")).agg(
        F.collect_list(F.struct(
            "symbol", parts[0].alias("base"), parts[1].alias("quote"), "exchange", "bid", "ask",
            "bid_size", "ask_size", "quote_ts", "messages", "latency_ms", "window",
            "book_bids", "book_asks",
        )).alias("qs")
    )


#: Columns of :func:`track_rows`: ``kind`` is ``"pair"`` (an ordered pair of legs, buy on
#: ``buy_exchange`` at its ask, sell on ``sell_exchange`` at its bid) or ``"exchange"`` (one
#: exchange's snapshot of one symbol, the input of the per-exchange features).
TRACK_FIELDS: dict[str, str] = {
    "kind": "string", "symbol": "string", "sell_symbol": "string", "cross_quote": "boolean",
    "window_start": "timestamp", "window_end": "timestamp",
    "buy_exchange": "string", "buy_ask": "double", "buy_ask_size": "double",
    "buy_ts": "timestamp", "sell_exchange": "string", "sell_bid": "double",
    "sell_bid_size": "double", "sell_ts": "timestamp",
    "conversion_symbol": "string", "conversion_exchange": "string",
    "conversion_rate": "double", "conversion_fee": "double",
    "profit_currency": "string", "usd_rate": "double",
    "exchange": "string", "bid": "double", "ask": "double", "bid_size": "double",
    "ask_size": "double", "quote_ts": "timestamp", "messages": "bigint", "latency_ms": "double",
    "buy_asks": "array<array<double>>", "sell_bids": "array<array<double>>",
    "book_bids": "array<array<double>>", "book_asks": "array<array<double>>",
}
PAIR_COLUMNS = [
    "symbol", "sell_symbol", "cross_quote", "window_start", "window_end",
    "buy_exchange", "buy_ask", "buy_ask_size", "buy_ts",
    "sell_exchange", "sell_bid", "sell_bid_size", "sell_ts",
    "conversion_symbol", "conversion_exchange", "conversion_rate", "conversion_fee",
    "profit_currency", "usd_rate", "buy_asks", "sell_bids",
]
EXCHANGE_COLUMNS = [
    "symbol", "exchange", "window_start", "window_end", "bid", "ask", "bid_size", "ask_size",
    "quote_ts", "messages", "latency_ms", "usd_rate", "book_bids", "book_asks",
]


def _track_struct(**cols: Column) -> Column:
    return F.struct(*[
        cols[name].cast(dtype).alias(name) if name in cols
        else F.lit(None).cast(dtype).alias(name)
        for name, dtype in TRACK_FIELDS.items()
    ])


def track_rows(
    slot_rows: DataFrame, fees: Mapping[str, float], usd_quotes: list[str]
) -> DataFrame:
    """Explode :func:`slots` into pair rows and exchange rows (:data:`TRACK_FIELDS`).

    Pairs, for legs ``a`` (buy at ``a.ask``) and ``b`` (sell at ``b.bid``) of one window:

    * same quote: ``a.symbol == b.symbol`` on different exchanges;
    * cross quote (``cross_quote`` true): same base, different USD-like quote currencies
      (``usd_quotes``, e.g. BTC-USDC bought, BTC-USD sold), any exchanges, the same one
      included (triangular). The sale's proceeds (``b.quote``) are converted back into the
      purchase's currency (``a.quote``) at the best rate quoted in the same window, after its
      taker fee: on a market ``<a.quote>-<b.quote>`` by buying at its ask
      (``conversion_rate = 1 / ask``), or on ``<b.quote>-<a.quote>`` by selling at its bid
      (``conversion_rate = bid``). ``conversion_rate`` is units of ``a.quote`` per unit of
      ``b.quote``. Without a conversion market in the window there is no cross-quote pair.

    ``usd_rate`` is USD per unit of ``profit_currency`` (the buy leg's quote currency): 1 for
    USD, else the mean mid of that currency's ``<C>-USD`` markets in the window (null if
    none). Snapshots of one exchange, or of different bases, make no pair.
    """
    fee = _fee_map(fees)
    usd = F.array(*[F.lit(q) for q in usd_quotes])
    rates = F.filter(
        "qs", lambda x: F.array_contains(usd, x["base"]) & F.array_contains(usd, x["quote"])
    )

    def conversion(into: str, source: str) -> Column:
        """Best way to turn one unit of ``source`` into ``into`` in this window: struct(eff,
        rate, symbol, exchange, fee), compared on ``eff = rate * (1 - fee)``; null if none."""
        def option(r: Column) -> Column:
            f = fee[r["exchange"]]
            buy_into = (r["base"] == into) & (r["quote"] == source)
            sell_source = (r["base"] == source) & (r["quote"] == into)
            rate = F.when(buy_into, F.lit(1.0) / r["ask"]).when(sell_source, r["bid"])
            return F.when(rate.isNotNull() & f.isNotNull(), F.struct(
                (rate * (F.lit(1.0) - f)).alias("eff"), rate.alias("rate"),
                r["symbol"].alias("symbol"), r["exchange"].alias("exchange"), f.alias("fee"),
            ))
        return F.array_max(F.filter(F.transform(rates, option), lambda o: o.isNotNull()))

    def usd_rate(currency: str) -> Column:
        if currency == "USD":
            return F.lit(1.0)
        mids = F.transform(
            F.filter(rates, lambda r: (r["base"] == currency) & (r["quote"] == F.lit("USD"))),
            lambda r: (r["bid"] + r["ask"]) / F.lit(2.0),
        )
        mean = F.aggregate(mids, F.lit(0.0), lambda acc, m: acc + m) / F.size(mids)
        return F.when(F.size(mids) > 0, mean)

    # Rates are computed once per window (a few currencies), then looked up per pair.
    routes = [(i, s) for i in usd_quotes for s in usd_quotes if i != s]
    per_slot = slot_rows.select(
        "qs",
        *[conversion(i, s).alias(f"_conv_{i}_{s}") for i, s in routes],
        *[usd_rate(c).alias(f"_usd_{c}") for c in usd_quotes],
    )

    def lookup_usd(currency: Column) -> Column:
        return F.coalesce(*[F.when(currency == c, F.col(f"_usd_{c}")) for c in usd_quotes])

    def lookup_conv(into: Column, source: Column) -> Column:
        return F.coalesce(*[
            F.when((into == i) & (source == s), F.col(f"_conv_{i}_{s}")) for i, s in routes
        ])

    def pair(a: Column, b: Column) -> Column:
        cross = (
            (a["base"] == b["base"]) & (a["quote"] != b["quote"])
            & ~F.array_contains(usd, a["base"])
            & F.array_contains(usd, a["quote"]) & F.array_contains(usd, b["quote"])
        )
        same = (a["symbol"] == b["symbol"]) & (a["exchange"] != b["exchange"])
        conv = F.when(cross, lookup_conv(a["quote"], b["quote"]))
        keep = same | (cross & conv.isNotNull())
        return F.when(keep, _track_struct(
            kind=F.lit("pair"), symbol=a["symbol"], sell_symbol=b["symbol"],
            cross_quote=cross, window_start=a["window"]["start"], window_end=a["window"]["end"],
            buy_exchange=a["exchange"], buy_ask=a["ask"], buy_ask_size=a["ask_size"],
            buy_ts=a["quote_ts"], sell_exchange=b["exchange"], sell_bid=b["bid"],
            sell_bid_size=b["bid_size"], sell_ts=b["quote_ts"],
            conversion_symbol=conv["symbol"], conversion_exchange=conv["exchange"],
            conversion_rate=conv["rate"], conversion_fee=conv["fee"],
            profit_currency=a["quote"], usd_rate=lookup_usd(a["quote"]),
            buy_asks=a["book_asks"], sell_bids=b["book_bids"],
        ))

    pair_structs = F.filter(
        F.flatten(F.transform("qs", lambda a: F.transform("qs", lambda b: pair(a, b)))),
        lambda p: p.isNotNull(),
    )
    exchange_structs = F.transform("qs", lambda a: _track_struct(
        kind=F.lit("exchange"), symbol=a["symbol"], window_start=a["window"]["start"],
        window_end=a["window"]["end"], exchange=a["exchange"], bid=a["bid"], ask=a["ask"],
        bid_size=a["bid_size"], ask_size=a["ask_size"], quote_ts=a["quote_ts"],
        messages=a["messages"], latency_ms=a["latency_ms"], usd_rate=lookup_usd(a["quote"]),
        book_bids=a["book_bids"], book_asks=a["book_asks"],
    ))
    return per_slot.select(
        F.explode(F.concat(pair_structs, exchange_structs)).alias("r")
    ).select("r.*")


def pairs(
    snapshot: DataFrame,
    window_seconds: float,
    fees: Mapping[str, float],
    usd_quotes: list[str] = ("USD", "USDT", "USDC"),  # type: ignore[assignment]
) -> DataFrame:
    """The pair rows of :func:`track_rows` (:data:`PAIR_COLUMNS`) of a snapshot DataFrame."""
    rows = track_rows(slots(snapshot, window_seconds), fees, list(usd_quotes))
    return rows.where(F.col("kind") == "pair").select(*PAIR_COLUMNS)


def spreads(
    rows: DataFrame,
    fees: Mapping[str, float],
    haircut: float = 0.0,
    notional_usd: float = 10_000.0,
) -> DataFrame:
    """Add fees, gross and net spreads (fractions and bps), size, profit and a deterministic id.

    Input: pair rows (:data:`PAIR_COLUMNS`); other rows of :func:`track_rows` pass through
    with these columns null. Added columns:

    * ``buy_fee, sell_fee``: taker fees, fractions (:mod:`arbstream.fees`); ``haircut``:
      slippage plus latency haircut, fraction (``ARB_SLIPPAGE_BPS + ARB_LATENCY_HAIRCUT_BPS``
      / 10 000).
    * ``gross = sell_bid / buy_ask - 1`` (same quote) or ``sell_bid * conversion_rate /
      buy_ask - 1`` (cross quote); ``net = gross - buy_fee - sell_fee - conversion_fee -
      haircut`` (no conversion fee for same-quote pairs); ``gross_bps, net_bps`` = × 10 000.
    * ``size_base`` (base units) and ``size_source``: ``"top_of_book"`` = min(buy_ask_size,
      sell_bid_size) when both legs publish sizes, else ``"notional"`` = ``notional_usd`` worth
      at the buy ask (IAQF bars carry no sizes). :mod:`spark_jobs.tracker` replaces it with
      the depth-aware size when books are streamed.
    * ``expected_profit = net * size_base * buy_ask`` in ``profit_currency`` (the buy leg's
      quote currency) and ``expected_profit_usd`` (× ``usd_rate``, null when unknown).
    * ``opportunity_id``: ``symbol|window_end ISO-8601 UTC ms|buy_exchange|sell_exchange``,
      with ``symbol/sell_symbol`` in first place for cross-quote pairs. It is the MongoDB
      ``_id`` and the Kafka key, so replays overwrite instead of duplicating.
    """
    fee = _fee_map(fees)
    conv = F.col("conversion_rate")
    gross = F.when(conv.isNull(), F.col("sell_bid") / F.col("buy_ask")).otherwise(
        F.col("sell_bid") * conv / F.col("buy_ask")
    ) - F.lit(1.0)
    net = (
        F.col("gross") - F.col("buy_fee") - F.col("sell_fee")
        - F.coalesce(F.col("conversion_fee"), F.lit(0.0)) - F.col("haircut")
    )
    sized = F.col("buy_ask_size").isNotNull() & F.col("sell_bid_size").isNotNull()
    usd_per_quote = F.col("usd_rate")
    notional_size = F.lit(notional_usd) / F.coalesce(usd_per_quote, F.lit(1.0)) / F.col("buy_ask")
    pair_key = F.when(
        F.col("cross_quote"), F.concat_ws("/", "symbol", "sell_symbol")
    ).otherwise(F.col("symbol"))
    return (
        rows.withColumn("buy_fee", fee[F.col("buy_exchange")])
        .withColumn("sell_fee", fee[F.col("sell_exchange")])
        .withColumn("haircut", F.when(F.col("buy_exchange").isNotNull(), F.lit(haircut)))
        .withColumn("gross", gross)
        .withColumn("net", net)
        .withColumn("gross_bps", F.col("gross") * BPS)
        .withColumn("net_bps", F.col("net") * BPS)
        .withColumn("size_base", F.when(
            sized, F.least("buy_ask_size", "sell_bid_size")
        ).otherwise(notional_size))
        .withColumn("size_source", F.when(F.col("buy_exchange").isNull(), F.lit(None))
                    .when(sized, F.lit("top_of_book")).otherwise(F.lit("notional")))
        .withColumn("expected_profit", F.col("net") * F.col("size_base") * F.col("buy_ask"))
        .withColumn("expected_profit_usd", F.col("expected_profit") * usd_per_quote)
        .withColumn(
            "opportunity_id",
            F.when(F.col("buy_exchange").isNotNull(), F.concat_ws(
                "|", pair_key,
                F.date_format("window_end", "yyyy-MM-dd'T'HH:mm:ss.SSS'Z'"),
                "buy_exchange", "sell_exchange",
            )),
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
    usd_quotes: list[str] = ("USD", "USDT", "USDC"),  # type: ignore[assignment]
    haircut: float = 0.0,
    notional_usd: float = 10_000.0,
) -> DataFrame:
    """The whole chain from Kafka records to :func:`track_rows` with :func:`spreads` columns:
    every pair (not only opportunities) and every exchange snapshot of every window."""
    events = dedupe(valid_events(parse_quotes(raw, fees)), watermark_seconds)
    quotes = events.where(F.col("type").isin("quote", "book"))
    snap = snapshots(quotes, window_seconds, max_quote_age_seconds)
    rows = track_rows(slots(snap, window_seconds), fees, list(usd_quotes))
    return spreads(rows, fees, haircut, notional_usd)
