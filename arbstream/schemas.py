"""Canonical event schemas: the JSON that travels on every ``md.*`` and ``arb.*`` topic.

Long module: it is the wire contract of every topic in one place (models, their field
rules and the derived Spark schemas), read as one specification.

Every record is a UTF-8 JSON object carrying ``schema_version`` (currently 1) and ``type``.
Timestamps are integer milliseconds since the Unix epoch, UTC. Prices and sizes are JSON
numbers (IEEE-754 doubles once parsed); sizes are ``null`` when the source has none.
The Kafka key of market-data records is the canonical symbol, so one symbol stays ordered
within one partition.

The stream job decodes quotes, books and heartbeats in Python (:mod:`spark_jobs.decode`, whose
tests feed it these models' JSON) and parses trades and health records with Spark's
``from_json`` using :data:`TRADE_DDL` and :data:`HEALTH_DDL`, derived from :class:`Trade` and
:class:`Health` (:mod:`arbstream.spark_schema`); ``tests/core/test_schemas.py`` pins those schemas
and parses real records of the models with them in Spark.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from arbstream.spark_schema import spark_ddl
from arbstream.timestamps import to_ms

SCHEMA_VERSION = 1
#: Sane range of event and receive times, UTC ms: [2009-01-01, 2100-01-01). Records outside it
#: are dead-lettered with reason ``timestamp_out_of_range``.
MIN_TS_MS = 1_230_768_000_000
MAX_TS_MS = 4_102_444_800_000
SYMBOL_RE = re.compile(r"^[A-Z0-9]{2,12}-[A-Z0-9]{2,12}$")
EXCHANGE_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def now_ms() -> int:
    """Current wall-clock time, UTC, integer milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


class _Record(BaseModel):
    """A record of a topic: immutable, unknown fields rejected, ``schema_version`` first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION

    def to_json(self) -> bytes:
        """Serialize to the canonical compact JSON bytes."""
        return self.model_dump_json().encode()


class _Event(_Record):
    exchange: str = Field(pattern=EXCHANGE_RE.pattern, description="lower-case exchange id")
    symbol: str = Field(pattern=SYMBOL_RE.pattern, description="canonical BASE-QUOTE")
    exchange_ts: int = Field(gt=0, description="exchange event time, UTC ms")
    received_ts: int = Field(gt=0, description="time arbstream received it, UTC ms")


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


class Heartbeat(_Record):
    """Event-time progress of one exchange feed, with no market data.

    Producers send one when a feed is quiet, and a replay sends one after its last quote, so
    the stream's watermark passes the last windows and they are emitted. ``dedupe_key`` is
    ``exchange:hb:<exchange_ts>``.
    """

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


class Health(_Record):
    """A producer's ``health`` record on ``md.health``: one per exchange every health interval
    (``producers/publisher.py``), counters since the producer started, the rate over the last
    interval. Input of the stream's exchange health (:mod:`spark_jobs.health`).
    """

    type: Literal["health"] = "health"
    exchange: str = Field(pattern=EXCHANGE_RE.pattern)
    ts: int = Field(gt=0, description="when the producer made the record, UTC ms")
    messages_per_s: float = Field(ge=0, description="websocket frames per s, last interval")
    last_message_age_s: float | None = Field(description="s since the last websocket frame; "
                                             "null before the first")
    queue_depth: int = Field(ge=0, description="records queued in the producer process")
    frames: int = Field(ge=0, description="websocket frames received")
    records: int = Field(ge=0, description="records submitted for publishing")
    reconnects: int = Field(ge=0)
    duplicates_dropped: int = Field(ge=0)
    gaps: int = Field(ge=0, description="sequence gaps")
    missing: int = Field(ge=0, description="messages lost in sequence gaps")
    deadletters: int = Field(ge=0)
    delivery_failures: int = Field(ge=0)


#: Spark DDL with which the stream job parses trades (``from_json``): :class:`Trade`'s fields.
TRADE_DDL = spark_ddl(Trade)
#: Spark DDL with which the stream job parses ``md.health`` records: :class:`Health`'s fields.
HEALTH_DDL = spark_ddl(Health)
#: :class:`Health`'s fields, in order: the health columns of the stream.
HEALTH_FIELDS = list(Health.model_fields)


#: Most bytes of the original payload a :class:`DeadLetter` keeps (64 KiB). Longer payloads
#: keep a prefix (``truncated``), so a letter of even a multi-MB record stays far below
#: Kafka's/librdkafka's default ``message.max.bytes`` (1 MB): at most ~88 kB of base64, or
#: this many bytes of text (more once JSON-escaped, at worst 6 characters per byte).
DEADLETTER_MAX_RAW_BYTES = 64 * 1024


class DeadLetter(_Record):
    """A record that failed validation, with why and the payload as received.

    ``raw`` is the payload decoded as UTF-8 when it is valid UTF-8, else base64 with
    ``raw_encoding == "base64"``. It is byte-exact unless ``truncated``: then it holds only
    a prefix of the payload (see :meth:`of`). ``raw_length`` (bytes) and ``raw_sha256`` (hex)
    always describe the whole original payload when set (``None`` in letters written
    before they existed, or by writers that do not fill them, e.g. the Spark stream job).
    ``reason`` is capped at :attr:`MAX_REASON_CHARS` characters (longer ones end in "…").
    """

    #: Most characters of ``reason`` kept.
    MAX_REASON_CHARS: ClassVar[int] = 1000

    type: Literal["deadletter"] = "deadletter"
    stage: str = Field(description="who rejected it: replay, producer, stream, ...")
    reason: str
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    raw: str
    raw_encoding: Literal["utf-8", "base64"] = "utf-8"
    raw_length: int | None = Field(None, ge=0, description="bytes of the original payload")
    raw_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the original payload"
    )
    truncated: bool = Field(False, description="raw holds only a prefix of the payload")
    rejected_ts: int = Field(default_factory=now_ms, description="UTC ms")

    @field_validator("reason")
    @classmethod
    def _cap_reason(cls, reason: str) -> str:
        if len(reason) > cls.MAX_REASON_CHARS:
            return reason[: cls.MAX_REASON_CHARS - 1] + "…"
        return reason

    @classmethod
    def of(
        cls,
        raw: bytes | str,
        reason: str,
        stage: str,
        *,
        max_raw_bytes: int = DEADLETTER_MAX_RAW_BYTES,
        **where: Any,
    ) -> DeadLetter:
        """Wrap a rejected payload, byte-exact when it has at most ``max_raw_bytes`` bytes.

        Args:
            raw: the payload; a ``str`` stands for its UTF-8 bytes.
            reason: why it was rejected; cut to :attr:`MAX_REASON_CHARS` characters.
            stage: who rejected it.
            max_raw_bytes: most bytes of the payload kept in ``raw``. A longer payload keeps
                its first ``max_raw_bytes`` bytes, fewer (up to 3) when that would split a
                UTF-8 character, and ``truncated`` is set. The kept bytes are stored as
                text when they are valid UTF-8, else as base64 (4/3 of their size).
            **where: further fields, e.g. ``source_topic``, ``source_partition``,
                ``source_offset``.

        ``raw_length`` (bytes) and ``raw_sha256`` (hex) are computed on the whole original
        payload, so a truncated letter can still be matched to its record.

        Raises:
            ValueError: ``max_raw_bytes`` is negative.
            pydantic.ValidationError: an unknown or ill-typed field in ``where``.
        """
        if max_raw_bytes < 0:
            raise ValueError(f"max_raw_bytes must be >= 0, got {max_raw_bytes}")
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
        facts: dict[str, Any] = {
            "reason": reason, "stage": stage, "raw_length": len(data),
            "raw_sha256": hashlib.sha256(data).hexdigest(), **where,
        }
        truncated = len(data) > max_raw_bytes
        if not truncated and isinstance(raw, str):
            return cls(raw=raw, **facts)
        kept = data
        if truncated:
            cut = max_raw_bytes
            # back off over UTF-8 continuation bytes (10xxxxxx) so no character is split
            for _ in range(3):
                if cut == 0 or data[cut] & 0xC0 != 0x80:
                    break
                cut -= 1
            kept = data[:cut]
        try:
            return cls(raw=kept.decode("utf-8"), truncated=truncated, **facts)
        except UnicodeDecodeError:
            prefix = data[:max_raw_bytes]  # bytes: no character boundary to respect
            text = base64.b64encode(prefix).decode()
            return cls(raw=text, raw_encoding="base64", truncated=truncated, **facts)


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


# --- arb.opportunities -----------------------------------------------------------------------
# The stream job (spark_jobs.arbitrage._events) publishes one JSON object per opportunity
# window and per episode event: ``schema_version`` and ``type`` first, then every column of
# the tracker record (spark_jobs.tracker.RECORD_FIELDS), written by Spark's ``to_json``:
# timestamps as ISO-8601 strings with the zone (``2023-03-11T04:00:05.000Z``) and null
# columns left out. ``tests/alerts/test_alerts.py`` runs the real ``_events`` and validates it here.

_ISO_MS_RE = re.compile(r"\|(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)$")


def episode_start_ms(episode_id: str) -> int:
    """Start of an episode, UTC ms, from its id ``<pair key>|<start ISO-8601 ms>``.

    Raises:
        ValueError: the id does not end in ``|YYYY-MM-DDTHH:MM:SS.mmmZ``.
    """
    from datetime import datetime

    m = _ISO_MS_RE.search(episode_id)
    if not m:
        raise ValueError(f"episode id must end in |<start ISO-8601 ms>Z, got {episode_id!r}")
    return to_ms(datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f%z"))


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class _ArbEvent(_Record):
    symbol: str = Field(pattern=SYMBOL_RE.pattern, description="buy leg's symbol")
    sell_symbol: str = Field(pattern=SYMBOL_RE.pattern, description="sell leg's symbol")
    cross_quote: bool
    buy_exchange: str = Field(pattern=EXCHANGE_RE.pattern)
    sell_exchange: str = Field(pattern=EXCHANGE_RE.pattern)
    size_base: float | None = Field(None, ge=0, description="base units")
    size_source: Literal["top_of_book", "notional", "book"] | None = None
    expected_profit: float | None = Field(None, description="in profit_currency")
    profit_currency: str | None = None
    expected_profit_usd: float | None = Field(None, description="USD")

    @model_validator(mode="after")
    def _legs(self) -> _ArbEvent:
        for name, value in self:
            if isinstance(value, str) and _CONTROL_RE.search(value):
                raise ValueError(f"{name} contains control characters (CR, LF, ...)")
        if self.cross_quote != (self.symbol != self.sell_symbol):
            raise ValueError(f"cross_quote={self.cross_quote} but symbols {self.symbol} and "
                             f"{self.sell_symbol}")
        if not self.cross_quote and self.buy_exchange == self.sell_exchange:
            raise ValueError(f"same-quote pair on one exchange {self.buy_exchange}")
        return self

    @property
    def profit_usd(self) -> float | None:
        """Expected profit in USD: ``expected_profit_usd``, or ``expected_profit`` when the
        profit currency is USD; ``None`` when unknown."""
        if self.expected_profit_usd is not None:
            return self.expected_profit_usd
        if self.profit_currency == "USD":
            return self.expected_profit
        return None

    @property
    def pair_symbol(self) -> str:
        """``BUY-SYMBOL/SELL-SYMBOL`` for a cross-quote pair, else the symbol."""
        return f"{self.symbol}/{self.sell_symbol}" if self.cross_quote else self.symbol


class OpportunityEvent(_ArbEvent):
    """One opportunity of one pair: one snapshot of its legs (the same quotes, books and
    conversion) over the consecutive windows ending ``valid_from`` .. ``valid_to`` (UTC,
    ``windows`` of them); ``window_start``/``window_end`` are those of its first window and
    ``opportunity_id`` names that window. Buy ``size_base`` on ``buy_exchange`` at
    ``buy_ask``, sell on ``sell_exchange`` at ``sell_bid``. Fees, ``gross`` and ``net`` are
    fractions, ``*_bps`` basis points, prices in each leg's quote currency; ``episode_id``
    names its episode; the rolling statistics are those of its first window.

    Raises:
        pydantic.ValidationError: a missing or malformed field, an unknown field, legs that
            contradict ``cross_quote``, or an ``episode_id`` without its start time.
    """

    type: Literal["opportunity"] = "opportunity"
    opportunity_id: str = Field(min_length=1)
    window_start: AwareDatetime
    window_end: AwareDatetime
    valid_from: AwareDatetime | None = Field(None, description="first window end with this "
                                             "snapshot (= window_end)")
    valid_to: AwareDatetime | None = Field(None, description="last window end with this "
                                           "snapshot so far (early: = valid_from)")
    windows: int | None = Field(None, ge=1, description="windows from valid_from to valid_to")
    buy_ask: float = Field(gt=0)
    buy_ask_size: float | None = Field(None, ge=0)
    buy_ts: AwareDatetime
    sell_bid: float = Field(gt=0)
    sell_bid_size: float | None = Field(None, ge=0)
    sell_ts: AwareDatetime
    conversion_symbol: str | None = None
    conversion_exchange: str | None = None
    conversion_rate: float | None = Field(None, gt=0)
    conversion_fee: float | None = Field(None, ge=0)
    buy_fee: float = Field(ge=0)
    sell_fee: float = Field(ge=0)
    haircut: float = Field(ge=0)
    gross: float
    net: float
    gross_bps: float
    net_bps: float
    usd_rate: float | None = Field(None, gt=0)
    buy_vwap: float | None = None
    sell_vwap: float | None = None
    is_opportunity: Literal[True] = True
    episode_id: str = Field(pattern=_ISO_MS_RE.pattern, description="final: the episode; "
                            "early: the episode it is expected to belong to")
    stage: Literal["early", "final", "retracted"] = Field(
        "final", description="early: emitted in the micro-batch of the quote that opened it, "
        "may change; final: event time has passed the window; retracted: an early version "
        "that is no opportunity in the final state (its last early fields are repeated)")
    emitted_ts: int | None = Field(None, ge=0, description="when the stream emitted this "
                                   "version, UTC ms (processing time)")
    spread_mean_bps: float | None = None
    spread_std_bps: float | None = None
    spread_z: float | None = None
    anomaly: bool = False

    @property
    def event_ms(self) -> int:
        """Event time: the window end, UTC ms."""
        return to_ms(self.window_end)

    @property
    def duration_s(self) -> float:
        """How long the episode has lasted at this window: window end − episode start, s."""
        return (self.event_ms - episode_start_ms(self.episode_id)) / 1000.0


class EpisodeEvent(_ArbEvent):
    """An episode ``opened`` (at its first window) or ``closed`` (gap passed): ``start`` and
    ``end`` (UTC), ``duration_s`` (s), ``windows``, ``peak_net_bps`` and ``mean_net_bps``
    (bps) so far, and the size and expected profit of its most profitable window.

    Raises:
        pydantic.ValidationError: a missing or malformed field, an unknown field, ``status``
            not matching ``event``, or ``end`` before ``start``.
    """

    type: Literal["episode"] = "episode"
    episode_id: str = Field(pattern=_ISO_MS_RE.pattern)
    event: Literal["opened", "closed"]
    status: Literal["open", "closed"]
    start: AwareDatetime
    end: AwareDatetime
    duration_s: float = Field(ge=0)
    windows: int = Field(ge=1)
    peak_net_bps: float
    mean_net_bps: float

    @model_validator(mode="after")
    def _status(self) -> EpisodeEvent:
        if (self.event == "opened") != (self.status == "open"):
            raise ValueError(f"event {self.event!r} with status {self.status!r}")
        if self.end < self.start:
            raise ValueError(f"episode ends ({self.end}) before it starts ({self.start})")
        return self

    @property
    def event_ms(self) -> int:
        """Event time: the end of the episode's last window so far, UTC ms."""
        return to_ms(self.end)


ArbEvent = Annotated[OpportunityEvent | EpisodeEvent, Field(discriminator="type")]
_ARB_EVENT: TypeAdapter[OpportunityEvent | EpisodeEvent] = TypeAdapter(ArbEvent)


def json_object(raw: bytes | str) -> dict[str, Any]:
    """One record value as a JSON object.

    Raises:
        ValueError: malformed JSON or not UTF-8 (``malformed JSON: ...``), or not an object.
    """
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_arb_event(raw: bytes | str) -> OpportunityEvent | EpisodeEvent:
    """Parse one ``arb.opportunities`` record value.

    Raises:
        ValueError: malformed JSON or not UTF-8, an unknown ``type`` or ``schema_version``, or
            the schema's validation failures in one message.
    """
    obj = json_object(raw)
    try:
        return _ARB_EVENT.validate_python(obj)
    except ValidationError as exc:
        raise ValueError(validation_reason(exc)) from None


# --- arb.pair_signals: the pairs job's latest statistics of each pair ---------------------------

#: A pair-trading leg, ``<exchange id>:<BASE-QUOTE>`` (as ``ARB_PAIRS``).
PAIR_LEG_RE = re.compile(r"^[a-z][a-z0-9_]*:[A-Z0-9]{2,12}-[A-Z0-9]{2,12}$")


class PairSignal(_Record):
    """The latest pair-trading statistics of one pair, published by the pairs job
    (:mod:`ml.pairs`) on ``ARB_PAIRS_TOPIC`` once per run and pair, key = the pair name; the
    alert worker's pair-trading rules fire on ``|z|``.

    ``signal_id`` = ``<pair>|<excursion start ISO-8601 ms>Z`` names the spread's current
    excursion (since its z-score last changed sign), the unit an alert is sent once for, as an
    episode is for spreads. ``window_end`` is the latest common window end (UTC); ``z``
    (standard deviations), ``beta`` (hedge ratio of log mids), ``alpha``, ``spread`` (log
    units) and ``correlation`` (of log returns) are the rolling values there; ``adf_pvalue``,
    ``coint_pvalue`` and ``half_life_s`` (s; ``None`` when the spread does not mean-revert)
    those of the test lookback. ``emitted_ts``: UTC ms, wall clock.

    Raises:
        pydantic.ValidationError: a missing, malformed or unknown field, a ``signal_id`` not
            of ``pair``, or an excursion starting after ``window_end``.
    """

    type: Literal["pair_signal"] = "pair_signal"
    pair: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    y: str = Field(pattern=PAIR_LEG_RE.pattern, description="dependent leg, exchange:SYMBOL")
    x: str = Field(pattern=PAIR_LEG_RE.pattern, description="independent leg, exchange:SYMBOL")
    signal_id: str = Field(pattern=_ISO_MS_RE.pattern)
    window_end: AwareDatetime
    excursion_start: AwareDatetime
    z: float = Field(allow_inf_nan=False)
    beta: float = Field(allow_inf_nan=False)
    alpha: float = Field(allow_inf_nan=False)
    spread: float = Field(allow_inf_nan=False)
    correlation: float | None = Field(None, allow_inf_nan=False)
    adf_pvalue: float | None = Field(None, ge=0, le=1)
    coint_pvalue: float | None = Field(None, ge=0, le=1)
    half_life_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    emitted_ts: int = Field(gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> PairSignal:
        if not self.signal_id.startswith(self.pair + "|"):
            raise ValueError(f"signal_id must start with the pair name {self.pair}|")
        if self.excursion_start > self.window_end:
            raise ValueError("excursion_start is after window_end")
        return self

    @property
    def event_ms(self) -> int:
        """Event time: the latest window end, UTC ms."""
        return to_ms(self.window_end)

    @property
    def duration_s(self) -> float:
        """How long the current excursion has lasted: window end − its start, s."""
        return (self.event_ms - to_ms(self.excursion_start)) / 1000.0
