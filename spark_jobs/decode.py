"""Parse and validate quote, book and heartbeat records in Python, straight into packed Arrow.

The market query's first stage. Each Kafka record is parsed once (orjson) and checked; the
result is one row of the engine's input (:data:`spark_jobs.engine.INPUT_COLUMNS`) per bucket the
record goes to, and the rows of each bucket leave as one packed Arrow IPC table
(:data:`PACKED_DDL`). It runs where the records are read: inside the ``arbmarket`` source's
reader (:mod:`spark_jobs.market_source`), so the JVM only moves a few large rows, or in a
``mapInArrow`` after the built-in ``format("kafka")`` source (:func:`decode_batches`).

Validation is the stream's contract for market data (:class:`arbstream.schemas.Quote`,
:class:`~arbstream.schemas.Book`, :class:`~arbstream.schemas.Heartbeat`): an invalid record
gets ``error``, the first failed check as a sentence (reason codes such as
``record_too_large`` or ``timestamp_out_of_range`` first), keeps its payload bytes, and leaves
the stream as a dead letter. JSON follows RFC 8259 (``NaN`` and ``Infinity`` tokens are
malformed); number fields also accept the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
as Spark's JSON reader does, and then fail their finiteness check.

Keys: a record's bucket is Spark's ``pmod(xxhash64(base), buckets)`` (XXH64 of the UTF-8
base with seed 42, as a signed long), so every symbol of one base lands on one key.
Stablecoin-rate markets (base and quote both USD-like) and heartbeats are copied to every
bucket, with ``home`` true only in their own (a heartbeat's own bucket is that of its
exchange). An invalid record goes to bucket ``offset mod buckets``.
``dedupe_hash`` is Spark's ``xxhash64(dedupe_key)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
import xxhash

from arbstream.schemas import EXCHANGE_RE, MAX_TS_MS, MIN_TS_MS, SCHEMA_VERSION, SYMBOL_RE

#: Seed of Spark's ``xxhash64``.
SPARK_XXHASH_SEED = 42

#: Rows between the source and the stateful operator: ``payload`` is one Arrow IPC stream of
#: :data:`INPUT_SCHEMA` holding ``rows`` records of one ``bucket`` (``kind`` "input").
PACKED_DDL = "bucket int, kind string, rows bigint, payload binary"
PACKED_SCHEMA = pa.schema([("bucket", pa.int32()), ("kind", pa.string()),
                           ("rows", pa.int64()), ("payload", pa.binary())])
_LEVELS = pa.list_(pa.list_(pa.float64()))
#: One engine input row (times UTC ms; prices in quote currency, sizes in base units).
INPUT_SCHEMA = pa.schema([
    ("kind", pa.string()), ("exchange", pa.string()), ("symbol", pa.string()),
    ("bid", pa.float64()), ("ask", pa.float64()), ("bid_size", pa.float64()),
    ("ask_size", pa.float64()), ("exchange_ts", pa.int64()), ("received_ts", pa.int64()),
    ("dedupe_key", pa.string()), ("dedupe_hash", pa.int64()), ("bids", _LEVELS),
    ("asks", _LEVELS), ("error", pa.string()), ("value", pa.binary()), ("topic", pa.string()),
    ("partition", pa.int32()), ("offset", pa.int64()), ("home", pa.bool_()),
])
_NAMES = INPUT_SCHEMA.names

_NON_NUMERIC = {"NaN": math.nan, "Infinity": math.inf, "+Infinity": math.inf,
                "-Infinity": -math.inf, "INF": math.inf, "+INF": math.inf, "-INF": -math.inf}
_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))
_TOPIC_KINDS = ("quotes", "book")
_KINDS = ("quote", "book", "heartbeat")
_INT64 = 1 << 63


@dataclass(frozen=True)
class DecodeConfig:
    """What validation and keying need.

    ``fee_exchanges``: exchanges with a configured taker fee (others are invalid);
    ``usd_quotes``: USD-like currencies (a symbol of two is a stablecoin-rate market);
    ``buckets``: keys of the stateful operator; ``max_record_bytes``: larger payloads are
    invalid (``None``: no limit).
    """

    fee_exchanges: frozenset[str]
    usd_quotes: frozenset[str]
    buckets: int
    max_record_bytes: int | None = None

    @classmethod
    def of(cls, settings: Any) -> DecodeConfig:
        """From :class:`arbstream.config.Settings`."""
        return cls(frozenset(settings.taker_fees), frozenset(settings.usd_quotes),
                   settings.stream_buckets, settings.max_record_bytes)

    def to_json(self) -> str:
        """This configuration as a JSON string (a data source option)."""
        return json.dumps({"fee_exchanges": sorted(self.fee_exchanges),
                           "usd_quotes": sorted(self.usd_quotes), "buckets": self.buckets,
                           "max_record_bytes": self.max_record_bytes})

    @classmethod
    def from_json(cls, text: str) -> DecodeConfig:
        """The inverse of :meth:`to_json`.

        Raises:
            ValueError: not such a JSON object.
        """
        try:
            d = json.loads(text)
            return cls(frozenset(d["fee_exchanges"]), frozenset(d["usd_quotes"]),
                       int(d["buckets"]), d["max_record_bytes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a decode configuration: {exc}") from exc


def spark_xxhash64(text: str) -> int:
    """Spark's ``xxhash64`` of a string column value: XXH64 of its UTF-8 bytes, seed 42, as a
    signed 64-bit integer."""
    h = xxhash.xxh64_intdigest(text.encode(), SPARK_XXHASH_SEED)
    return h - (1 << 64) if h >= _INT64 else h


# --- field readers (JSON value → typed value or None, as Spark's from_json reads them) ------


def _double(v: Any) -> float | None:
    t = type(v)
    if t is float:
        return v
    if t is int:
        try:
            return float(v)
        except OverflowError:
            return None
    if t is str:
        return _NON_NUMERIC.get(v)
    return None


def _long(v: Any) -> int | None:
    return v if type(v) is int and -_INT64 <= v < _INT64 else None


def _str(v: Any) -> str | None:
    return v if type(v) is str else None


def _positive(v: float | None) -> bool:
    return v is not None and 0 < v < math.inf


def _finite_or_null(v: float | None) -> bool:
    return v is None or math.isfinite(v)


def _levels(v: Any) -> list[list[float]] | None:
    """Book levels ``[[price, size], ...]`` with positive finite numbers, else None."""
    if type(v) is not list or not v:
        return None
    out = []
    for lv in v:
        if type(lv) is not list or len(lv) != 2:
            return None
        p, s = _double(lv[0]), _double(lv[1])
        if not (_positive(p) and _positive(s)):
            return None
        out.append([p, s])
    return out


def _strictly(prices: list[float], descending: bool) -> bool:
    pairs = zip(prices, prices[1:], strict=False)
    return all(a > b for a, b in pairs) if descending else all(a < b for a, b in pairs)


def _num(v: float) -> str:
    """A double as Spark casts it to a string for the common cases (``101.0``, ``0.5``)."""
    return repr(v)


def _topic_exchange(topic: str) -> str:
    """``<exchange>`` of ``md.<exchange>.<quotes|book>``, "" for any other topic."""
    parts = topic.split(".")
    if len(parts) == 3 and parts[0] == "md" and parts[2] in _TOPIC_KINDS:
        return parts[1]
    return ""


def _payload_error(value: bytes | None, cfg: DecodeConfig) -> tuple[dict | None, str | None]:
    if value is not None and cfg.max_record_bytes is not None and len(
            value) > cfg.max_record_bytes:
        return None, f"record_too_large: {len(value)} bytes > {cfg.max_record_bytes}"
    if value is None:
        return None, "empty payload"
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "payload is not UTF-8"
        return None, "malformed JSON"
    if type(doc) is not dict:
        doc = {}
    version = doc.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        shown = version if type(version) is int and -(1 << 31) <= version < (1 << 31) else None
        return None, f"unsupported schema_version {'null' if shown is None else shown}"
    return doc, None


class Decoder:
    """Parses, validates and keys records (:meth:`decode`, :meth:`records`); caches the
    per-string facts (valid exchange ids and symbols, buckets, topic exchanges), which repeat
    across records."""

    def __init__(self, cfg: DecodeConfig) -> None:
        self.cfg = cfg
        self._exchanges: dict[str, bool] = {}
        self._symbols: dict[str, tuple[int, bool] | None] = {}  # (bucket of base, rate market)
        self._buckets: dict[str, int] = {}
        self._topics: dict[str, str] = {}

    def bucket_of(self, text: str) -> int:
        """``pmod(xxhash64(text), buckets)``."""
        b = self._buckets.get(text)
        if b is None:
            b = self._buckets[text] = spark_xxhash64(text) % self.cfg.buckets
        return b

    def _exchange_ok(self, exchange: str) -> bool:
        ok = self._exchanges.get(exchange)
        if ok is None:
            ok = self._exchanges[exchange] = EXCHANGE_RE.fullmatch(exchange) is not None
        return ok

    def _symbol(self, symbol: str) -> tuple[int, bool] | None:
        """``(bucket of the base, is a stablecoin-rate market)`` of a canonical symbol, None
        for any other string."""
        if symbol in self._symbols:
            return self._symbols[symbol]
        info = None
        if SYMBOL_RE.fullmatch(symbol):
            base, quote = symbol.split("-")
            usd = self.cfg.usd_quotes
            info = (self.bucket_of(base), base in usd and quote in usd)
        self._symbols[symbol] = info
        return info

    def _topic_exchange(self, topic: str) -> str:
        ex = self._topics.get(topic)
        if ex is None:
            ex = self._topics[topic] = _topic_exchange(topic)
        return ex

    def check(self, doc: dict, topic: str) -> tuple[tuple | None, str | None]:
        """Validate one parsed record of ``topic``.

        Returns ``(fields, None)`` for a valid record, with ``fields`` = ``(kind, exchange,
        symbol, bid, ask, bid_size, ask_size, exchange_ts, received_ts, dedupe_key, bids,
        asks)``, or ``(None, error)`` with the first failed check as a sentence.
        """
        kind = doc.get("type")
        if kind not in _KINDS:
            return None, "type must be 'quote', 'book' or 'heartbeat'"
        exchange = doc.get("exchange")
        if type(exchange) is not str or not self._exchange_ok(exchange):
            return None, "exchange missing or not a lower-case id"
        expected = self._topic_exchange(topic)
        if expected and expected != exchange:
            return None, f"exchange '{exchange}' does not match topic {topic}"
        symbol = doc.get("symbol")
        market = kind != "heartbeat"
        if market and (type(symbol) is not str or self._symbol(symbol) is None):
            return None, "symbol missing or not canonical BASE-QUOTE"
        bids = asks = None
        if kind == "book":
            bids, asks = _levels(doc.get("bids")), _levels(doc.get("asks"))
            if bids is None or asks is None:
                return None, "book levels missing or not [positive price, positive size] pairs"
            if not (_strictly([p for p, _ in bids], True)
                    and _strictly([p for p, _ in asks], False)):
                return None, ("book levels not sorted best first (bids descending, asks "
                              "ascending)")
            if bids[0][0] > asks[0][0]:
                return None, "crossed book: best bid > best ask"
        bid, ask = _double(doc.get("bid")), _double(doc.get("ask"))
        if kind == "quote":
            if not _positive(bid):
                return None, "bid missing or not a positive number"
            if not _positive(ask):
                return None, "ask missing or not a positive number"
        bid_size, ask_size = _double(doc.get("bid_size")), _double(doc.get("ask_size"))
        if not _finite_or_null(bid_size):
            return None, "bid_size is not a finite number"
        if not _finite_or_null(ask_size):
            return None, "ask_size is not a finite number"
        if bid is not None and ask is not None and bid > ask:
            return None, f"crossed quote: bid {_num(bid)} > ask {_num(ask)}"
        if bid_size is not None and bid_size < 0:
            return None, "bid_size is negative"
        if ask_size is not None and ask_size < 0:
            return None, "ask_size is negative"
        exchange_ts, received_ts = _long(doc.get("exchange_ts")), _long(doc.get("received_ts"))
        if exchange_ts is None or exchange_ts <= 0:
            return None, "exchange_ts missing or not a positive number"
        if received_ts is None or received_ts <= 0:
            return None, "received_ts missing or not a positive number"
        for name, ts in (("exchange_ts", exchange_ts), ("received_ts", received_ts)):
            if not MIN_TS_MS <= ts < MAX_TS_MS:
                return None, (f"timestamp_out_of_range: {name} {ts} ms is outside "
                              "2009-01-01..2100-01-01")
        key = doc.get("dedupe_key")
        if type(key) is not str or not key:
            return None, "dedupe_key missing"
        if not _CONTROL.isdisjoint(key):
            return None, "dedupe_key contains control characters (CR, LF, ...)"
        if exchange not in self.cfg.fee_exchanges:
            return None, f"no taker fee configured for exchange {exchange}"
        return (kind, exchange, symbol if market else None, bid, ask, bid_size, ask_size,
                exchange_ts, received_ts, key, bids, asks), None

    def decode(self, value: bytes | None, topic: str) -> tuple[tuple | None, str | None]:
        """Parse and validate one record's payload: :meth:`check` after the payload checks
        (size, empty, UTF-8, JSON, ``schema_version``)."""
        doc, error = _payload_error(value, self.cfg)
        if error is not None:
            return None, error
        return self.check(doc, topic)

    def records(self, values: Sequence[bytes | None], topics: Sequence[str],
                partitions: Sequence[int], offsets: Sequence[int],
                ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Kafka records (parallel sequences) → ``(bucket, batch of INPUT_SCHEMA)`` per
        bucket, in bucket order.

        A valid record gives one row per bucket it goes to (see the module docstring); an
        invalid one gives one row with ``error`` set, ``kind`` and the quote fields null, and
        its ``value``, ``topic``, ``partition`` and ``offset``.
        """
        k = self.cfg.buckets
        rows: dict[int, list[tuple]] = {}
        for value, topic, partition, offset in zip(values, topics, partitions, offsets,
                                                   strict=True):
            fields, error = self.decode(value, topic)
            if fields is None:
                rows.setdefault(offset % k, []).append(
                    (*_INVALID, error, value, topic, partition, offset, True))
                continue
            kind, exchange, symbol, bid, ask, bsz, asz, ets, rts, key, bids, asks = fields
            row = (kind, exchange, symbol, bid, ask, bsz, asz, ets, rts, key,
                   spark_xxhash64(key), bids, asks, None, value, topic, partition, offset)
            if kind == "heartbeat":
                own, fan_out = self.bucket_of(exchange), True
            else:
                own, fan_out = self._symbol(symbol)  # type: ignore[misc]
            if fan_out:
                for b in range(k):
                    rows.setdefault(b, []).append((*row, b == own))
            else:
                rows.setdefault(own, []).append((*row, True))
        for bucket in sorted(rows):
            yield bucket, _batch(rows[bucket])


_INVALID = (None,) * 13


def _batch(rows: list[tuple]) -> pa.RecordBatch:
    """Row tuples in :data:`INPUT_SCHEMA` order as one record batch."""
    columns = zip(*rows, strict=True) if rows else [[] for _ in INPUT_SCHEMA]
    return pa.RecordBatch.from_arrays(
        [pa.array(c, t) for c, t in zip(columns, INPUT_SCHEMA.types, strict=True)],
        schema=INPUT_SCHEMA)


def partition_list(keys: Iterable[tuple[str, int]], cfg: DecodeConfig
                   ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """``kind`` "partition" rows naming every source partition ``(topic, partition)``, for
    every bucket (``home`` true in bucket 0): the engine holds its watermark until each has
    had records or gone idle (:meth:`spark_jobs.engine.Engine.process`)."""
    keys = list(keys)
    for bucket in range(cfg.buckets):
        yield bucket, _batch([("partition", *(None,) * 12, None, None, t, p, None, bucket == 0)
                              for t, p in keys])


def pack(table: pa.Table | pa.RecordBatch) -> bytes:
    """Arrow IPC stream bytes of ``table``."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return sink.getvalue().to_pybytes()


def unpack(payload: bytes) -> pa.Table:
    """The table of :func:`pack` bytes."""
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()


def packed(parts: Iterable[tuple[int, pa.RecordBatch]]) -> pa.RecordBatch:
    """``(bucket, batch)`` pairs as one batch of :data:`PACKED_SCHEMA` rows."""
    rows = list(parts)
    return pa.RecordBatch.from_pydict({
        "bucket": [b for b, _ in rows], "kind": ["input"] * len(rows),
        "rows": [t.num_rows for _, t in rows], "payload": [pack(t) for _, t in rows],
    }, schema=PACKED_SCHEMA)


def decode_batches(batches: Iterator[pa.RecordBatch],
                   cfg: DecodeConfig) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body over Kafka source batches (``value, topic, partition, offset``
    columns, any others ignored) → :data:`PACKED_SCHEMA` batches, one row per bucket."""
    decoder = Decoder(cfg)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        cols = {name: batch.column(name).to_pylist()
                for name in ("value", "topic", "partition", "offset")}
        yield packed(decoder.records(cols["value"], cols["topic"], cols["partition"],
                                     cols["offset"]))
