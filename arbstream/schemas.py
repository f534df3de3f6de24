"""Canonical event schemas: the JSON that travels on every ``md.*`` and ``arb.*`` topic.

Every record is a UTF-8 JSON object carrying ``schema_version`` (currently 1) and ``type``.
Timestamps are integer milliseconds since the Unix epoch, UTC. Prices and sizes are JSON
numbers (IEEE-754 doubles once parsed); sizes are ``null`` when the source has none.
The Kafka key of market-data records is the canonical symbol, so one symbol stays ordered
within one partition.

The Spark job parses the same schema with ``from_json`` using :data:`QUOTE_DDL`; keep the
pydantic models and the DDL in step (``tests/test_schemas.py`` checks they agree).
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
SYMBOL_RE = re.compile(r"^[A-Z0-9]{2,12}-[A-Z0-9]{2,12}$")
EXCHANGE_RE = re.compile(r"^[a-z][a-z0-9_]*$")

#: Spark DDL of a quote as parsed by the stream job (``from_json``); mirrors :class:`Quote`.
#: Also parses :class:`Book` records (``bids``/``asks`` levels) and heartbeats.
QUOTE_DDL = (
    "schema_version INT, type STRING, exchange STRING, symbol STRING, "
    "bid DOUBLE, ask DOUBLE, bid_size DOUBLE, ask_size DOUBLE, "
    "exchange_ts BIGINT, received_ts BIGINT, dedupe_key STRING, "
    "bids ARRAY<ARRAY<DOUBLE>>, asks ARRAY<ARRAY<DOUBLE>>"
)


#: Spark DDL of a trade as parsed by the stream job; mirrors :class:`Trade`.
TRADE_DDL = (
    "schema_version INT, type STRING, exchange STRING, symbol STRING, trade_id STRING, "
    "price DOUBLE, size DOUBLE, side STRING, exchange_ts BIGINT, received_ts BIGINT, "
    "dedupe_key STRING"
)


#: Spark DDL of a producer ``health`` record on ``md.health`` (see producers/publisher.py):
#: per-exchange counters since the producer started, rates over the last interval.
HEALTH_DDL = (
    "schema_version INT, type STRING, exchange STRING, ts BIGINT, messages_per_s DOUBLE, "
    "last_message_age_s DOUBLE, queue_depth BIGINT, frames BIGINT, records BIGINT, "
    "reconnects BIGINT, duplicates_dropped BIGINT, gaps BIGINT, missing BIGINT, "
    "deadletters BIGINT, delivery_failures BIGINT"
)
HEALTH_FIELDS = [c.split()[0] for c in HEALTH_DDL.split(", ")]


def now_ms() -> int:
    """Current wall-clock time, UTC, integer milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    exchange: str = Field(pattern=EXCHANGE_RE.pattern, description="lower-case exchange id")
    symbol: str = Field(pattern=SYMBOL_RE.pattern, description="canonical BASE-QUOTE")
    exchange_ts: int = Field(gt=0, description="exchange event time, UTC ms")
    received_ts: int = Field(gt=0, description="time arbstream received it, UTC ms")

    def to_json(self) -> bytes:
        """Serialize to the canonical compact JSON bytes."""
        return self.model_dump_json().encode()


class Quote(_Event):
    """Best bid/offer of one symbol on one exchange at one instant.

    ``dedupe_key`` identifies the same update when it is delivered twice (producer retry,
    exchange resend, replay): ``exchange:symbol:q:<sequence>`` when the exchange numbers its
    updates, else ``exchange:symbol:q:<exchange_ts>:<bid>:<ask>:<bid_size>:<ask_size>``.

    Raises:
        pydantic.ValidationError: non-positive prices or sizes, a crossed book (bid > ask),
            a malformed symbol or exchange id.
    """

    type: Literal["quote"] = "quote"
    bid: float = Field(gt=0)
    ask: float = Field(gt=0)
    bid_size: float | None = Field(None, ge=0)
    ask_size: float | None = Field(None, ge=0)
    dedupe_key: str = ""

    @model_validator(mode="after")
    def _check(self) -> Quote:
        if self.bid > self.ask:
            raise ValueError(f"crossed quote: bid {self.bid} > ask {self.ask}")
        if not self.dedupe_key:
            key = (
                f"{self.exchange}:{self.symbol}:q:{self.exchange_ts}:"
                f"{self.bid!r}:{self.ask!r}:{self.bid_size!r}:{self.ask_size!r}"
            )
            object.__setattr__(self, "dedupe_key", key)
        return self

    @classmethod
    def build(cls, *, sequence: int | None = None, **fields: Any) -> Quote:
        """Build a quote, keying dedupe on the exchange ``sequence`` number when given."""
        if sequence is not None:
            fields["dedupe_key"] = f"{fields['exchange']}:{fields['symbol']}:q:{sequence}"
        return cls(**fields)


class Trade(_Event):
    """One executed trade. ``side`` is the taker side when the exchange reports it.

    ``dedupe_key`` is ``exchange:symbol:t:<trade_id>``.
    """

    type: Literal["trade"] = "trade"
    trade_id: str = Field(min_length=1)
    price: float = Field(gt=0)
    size: float = Field(gt=0)
    side: Literal["buy", "sell"] | None = None
    dedupe_key: str = ""

    @model_validator(mode="after")
    def _key(self) -> Trade:
        if not self.dedupe_key:
            key = f"{self.exchange}:{self.symbol}:t:{self.trade_id}"
            object.__setattr__(self, "dedupe_key", key)
        return self


class Book(_Event):
    """Snapshot of the top ``depth`` levels of one order book, best level first.

    ``bids`` descend and ``asks`` ascend by price; each level is ``[price, size]``.
    ``dedupe_key`` is ``exchange:symbol:b:<sequence or exchange_ts>``.
    """

    type: Literal["book"] = "book"
    depth: int = Field(gt=0)
    bids: list[tuple[float, float]]
    asks: list[tuple[float, float]]
    sequence: int | None = None
    dedupe_key: str = ""

    @model_validator(mode="after")
    def _check(self) -> Book:
        if len(self.bids) > self.depth or len(self.asks) > self.depth:
            raise ValueError(f"more than depth={self.depth} levels")
        if self.bids and self.asks and self.bids[0][0] > self.asks[0][0]:
            raise ValueError(f"crossed book: bid {self.bids[0][0]} > ask {self.asks[0][0]}")
        if not self.dedupe_key:
            key = f"{self.exchange}:{self.symbol}:b:{self.sequence or self.exchange_ts}"
            object.__setattr__(self, "dedupe_key", key)
        return self


class Heartbeat(BaseModel):
    """Event-time progress of one exchange feed, with no market data.

    Producers send one when a feed is quiet, and a replay sends one after its last quote, so
    the stream's watermark passes the last windows and they are emitted. ``dedupe_key`` is
    ``exchange:hb:<exchange_ts>``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["heartbeat"] = "heartbeat"
    exchange: str = Field(pattern=EXCHANGE_RE.pattern)
    exchange_ts: int = Field(gt=0, description="event time reached, UTC ms")
    received_ts: int = Field(gt=0, description="UTC ms")
    dedupe_key: str = ""

    @model_validator(mode="after")
    def _key(self) -> Heartbeat:
        if not self.dedupe_key:
            object.__setattr__(self, "dedupe_key", f"{self.exchange}:hb:{self.exchange_ts}")
        return self

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class DeadLetter(BaseModel):
    """A record that failed validation, with why and the payload exactly as received.

    ``raw`` is the payload decoded as UTF-8 when it is valid UTF-8, else base64 with
    ``raw_encoding == "base64"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    type: Literal["deadletter"] = "deadletter"
    stage: str = Field(description="who rejected it: replay, producer, stream, ...")
    reason: str
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    raw: str
    raw_encoding: Literal["utf-8", "base64"] = "utf-8"
    rejected_ts: int = Field(default_factory=now_ms, description="UTC ms")

    @classmethod
    def of(cls, raw: bytes | str, reason: str, stage: str, **where: Any) -> DeadLetter:
        """Wrap a rejected payload, keeping it byte-exact."""
        if isinstance(raw, str):
            return cls(raw=raw, reason=reason, stage=stage, **where)
        try:
            return cls(raw=raw.decode("utf-8"), reason=reason, stage=stage, **where)
        except UnicodeDecodeError:
            text = base64.b64encode(raw).decode()
            return cls(raw=text, raw_encoding="base64", reason=reason, stage=stage, **where)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def validation_reason(err: ValidationError) -> str:
    """One-line, human-readable summary of a pydantic validation error."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "record"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_quote(raw: bytes) -> Quote:
    """Parse canonical quote JSON bytes.

    Raises:
        ValueError: malformed JSON, or the schema's validation failures in one message.
    """
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed JSON: {exc}") from None
    try:
        return Quote.model_validate(obj)
    except ValidationError as exc:
        raise ValueError(validation_reason(exc)) from None
