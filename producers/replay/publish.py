"""Publishing replayed records to Kafka: ordering, pacing, progress, delivery accounting.

:func:`publish_quotes` sends quotes (and trades) in event-time order across exchanges, to
``md.<exchange>.quotes`` (``.trades``) keyed by symbol, with an idempotent producer; nothing is
dropped silently. :func:`parse_speed` reads the ``--speed`` option.

All timestamps are integer milliseconds since the Unix epoch, UTC.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from tqdm import tqdm

from arbstream.kafka import KafkaConfig, reliable_producer_config
from arbstream.schemas import EXCHANGE_RE, SYMBOL_RE, DeadLetter, Heartbeat, Quote, Trade, now_ms
from arbstream.topics import DEADLETTER, ensure_topics, quotes_topic, trades_topic
from producers.config import ReplayConfig
from producers.replay.errors import ReplayDeliveryError, ReplayInputError, ReplayReport

if TYPE_CHECKING:
    from arbstream.config import Settings

#: Columns (and order) of a quotes frame, as returned by the loaders.
QUOTE_COLUMNS: tuple[str, ...] = (
    "exchange", "symbol", "exchange_ts", "bid", "ask", "bid_size", "ask_size",
)


def parse_speed(text: str) -> float | None:
    """Parse a replay speed: ``max`` -> ``None`` (as fast as possible), else a positive factor.

    ``10`` or ``10x`` means ten times real time; ``0.5`` half speed.

    Raises:
        ValueError: not ``max`` and not a positive finite number.
    """
    raw = text.strip().lower()
    if raw == "max":
        return None
    try:
        speed = float(raw.removesuffix("x"))
    except ValueError:
        speed = math.nan
    if not math.isfinite(speed) or speed <= 0:
        raise ValueError(f"invalid speed {text!r}: use 'max' or a positive number such as 10")
    return speed


def _frame_problems(frame: pd.DataFrame) -> list[str]:
    """Vectorised pre-check of a quotes frame against the :class:`Quote` rules."""
    missing = [c for c in QUOTE_COLUMNS if c not in frame.columns]
    if missing:
        return [f"quotes frame lacks columns {missing}"]
    out: list[str] = []
    checks: dict[str, pd.Series] = {
        "malformed exchange id": ~frame["exchange"].astype(str).str.match(EXCHANGE_RE.pattern),
        "malformed symbol": ~frame["symbol"].astype(str).str.match(SYMBOL_RE.pattern),
        "exchange_ts not a positive integer": ~(
            pd.to_numeric(frame["exchange_ts"], errors="coerce") > 0
        ),
    }
    bid = pd.to_numeric(frame["bid"], errors="coerce")
    ask = pd.to_numeric(frame["ask"], errors="coerce")
    checks["bid/ask missing, non-finite or non-positive"] = ~(
        np.isfinite(bid) & np.isfinite(ask) & (bid > 0) & (ask > 0)
    )
    checks["crossed quote (bid > ask)"] = bid > ask
    for col in ("bid_size", "ask_size"):
        size = pd.to_numeric(frame[col], errors="coerce")
        checks[f"{col} negative or non-finite"] = frame[col].notna() & ~(
            np.isfinite(size) & (size >= 0)
        )
    for reason, mask in checks.items():
        if mask.any():
            rows = frame.index[mask.to_numpy()].tolist()
            out.append(f"{reason}: {int(mask.sum())} row(s), first index {rows[:5]}")
    return out


def _size(value: Any) -> float | None:
    return None if value is None or value != value else float(value)


def quotes_of(frame: pd.DataFrame) -> Iterator[Quote]:
    """The :class:`~arbstream.schemas.Quote` of each row of a recorded-quote frame, in row
    order: columns ``QUOTE_COLUMNS`` (times in UTC ms, prices in the quote currency, sizes in
    the base currency or null) and optionally ``received_ts`` (default: ``exchange_ts``).

    Raises:
        pydantic.ValidationError: a row that is not a valid quote (e.g. bid above ask).
    """
    columns = [frame[c].tolist() for c in QUOTE_COLUMNS]
    received = frame["received_ts"].tolist() if "received_ts" in frame.columns else columns[2]
    for ex, sym, ts, bid, ask, bsz, asz, rts in zip(*columns, received, strict=True):
        yield Quote(
            exchange=ex,
            symbol=sym,
            exchange_ts=int(ts),
            received_ts=int(rts),
            bid=float(bid),
            ask=float(ask),
            bid_size=_size(bsz),
            ask_size=_size(asz),
        )


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def producer_config(kafka: KafkaConfig) -> dict[str, Any]:
    """librdkafka settings of the replay producer: idempotent, acks=all, lz4, short linger."""
    return reliable_producer_config(kafka.client_config(), linger_ms=20,
                                    **{"client.id": "arbstream-replay"})


def publish_quotes(
    quotes: pd.DataFrame | Sequence[Quote] | Iterable[Quote | Trade],
    settings: Settings,
    speed: float | None = None,
    progress: bool = True,
    deadletters: Sequence[DeadLetter] = (),
    heartbeat: bool = True,
    rate: float | None = None,
) -> ReplayReport:
    """Publish quotes to ``md.<exchange>.quotes`` in event-time order, then flush.

    Topics are created first (:func:`arbstream.topics.ensure_topics`). One idempotent
    producer (``acks=all``, lz4, ``linger.ms=20``) sends each quote keyed by its symbol
    (UTF-8) with :meth:`Quote.to_json` as the value. ``deadletters`` go to ``md.deadletter``
    (unkeyed) before the quotes. Quotes are stably sorted by ``exchange_ts``. A full local
    queue is drained by polling and the record retried, never dropped.

    Args:
        quotes: a frame with :data:`QUOTE_COLUMNS` (optionally ``received_ts``, else it equals
            ``exchange_ts``; NaN sizes mean unknown) or a sequence of :class:`Quote`; or any
            other iterable (an iterator, a generator) of :class:`Quote` and :class:`Trade`,
            which is consumed lazily and published in its own order, not sorted: trades go to
            ``md.<exchange>.trades``, and each record's exchange is checked just before it is
            sent (a ValueError then leaves the earlier records published). The next record is
            taken from the iterator only when it is due under ``rate``, so a generator may
            stamp it with the time it is sent.
        settings: Kafka address and the configured exchanges (narrowed to
            :class:`~producers.config.ReplayConfig` once the topics exist).
        speed: None for as fast as possible; N for N x real time (sleeps event-time gaps / N,
            measured on a monotonic clock from the first quote).
        rate: None for no cap; R to send at most R records per second (quotes and trades,
            record n not before n / R s after the first, monotonic clock; sends come in
            bursts of at most 1 ms worth of records). Combines with ``speed`` (both apply).
        progress: show a tqdm progress bar on stderr (only when stderr is a TTY).
        deadletters: rejected input records to publish alongside.
        heartbeat: end with one :class:`Heartbeat` per exchange at the replay's last event
            time, so that every exchange's event-time clock reaches the end of the replay
            (never later: the stream closes the remaining windows once the exchanges are
            idle, and the next replay may start where this one ended).

    Returns:
        A :class:`ReplayReport` with acknowledged counts per topic.

    Raises:
        ValueError: ``speed`` or ``rate`` is not positive, or a quote's exchange is not in
            ``settings.exchanges`` (ARB_EXCHANGES), so it would have no topic.
        ReplayInputError: a frame row breaks the :class:`Quote` rules (checked before
            anything is sent).
        RuntimeError: Kafka is unreachable or a topic cannot be created.
        ReplayDeliveryError: any record was not acknowledged; message carries the count.
    """
    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be a positive number or None (max), got {speed}")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number or None (max), got {rate}")
    lazy = False
    total: int | None
    items: Iterator[Quote | Trade]
    if isinstance(quotes, pd.DataFrame):
        problems = _frame_problems(quotes)
        if problems:
            raise ReplayInputError("invalid quotes frame:\n  " + "\n  ".join(problems))
        frame = quotes.sort_values("exchange_ts", kind="stable")
        total = len(frame)
        exchanges = set(frame["exchange"].unique().tolist())
        items = quotes_of(frame)
    elif isinstance(quotes, Sequence):
        ordered = sorted(quotes, key=lambda q: q.exchange_ts)
        total = len(ordered)
        exchanges = {q.exchange for q in ordered}
        items = iter(ordered)
    else:
        lazy, total, exchanges, items = True, None, set(), iter(quotes)
    cfg = ReplayConfig.of(settings)
    unknown = sorted(exchanges - set(cfg.exchanges))
    if unknown:
        raise ValueError(
            f"quotes for exchanges {unknown} that are not configured; add them to "
            f"ARB_EXCHANGES (configured: {list(cfg.exchanges)})"
        )
    ensure_topics(settings)
    return _publish(items, cfg, exchanges=exchanges, lazy=lazy, total=total, speed=speed,
                    rate=rate, progress=progress, deadletters=deadletters, heartbeat=heartbeat)


def _publish(
    items: Iterator[Quote | Trade],
    cfg: ReplayConfig,
    *,
    exchanges: set[str],
    lazy: bool,
    total: int | None,
    speed: float | None,
    rate: float | None,
    progress: bool,
    deadletters: Sequence[DeadLetter],
    heartbeat: bool,
) -> ReplayReport:
    """The send loop of :func:`publish_quotes`, on validated, ordered ``items`` (``lazy``: an
    iterator whose exchanges are checked one by one, added to ``exchanges``)."""
    producer = Producer(producer_config(cfg.kafka))
    acked: dict[str, int] = {}
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(f"{msg.topic()}: {err.str()}")
        else:
            topic = msg.topic() or ""
            acked[topic] = acked.get(topic, 0) + 1

    beats: list[str] = []

    def on_heartbeat(err: KafkaError | None, msg: Message) -> None:
        (failures if err is not None else beats).append(f"{msg.topic()}: {err}")

    def send(topic: str, key: bytes | None, value: bytes, callback: Any = on_delivery) -> None:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=callback)
                return
            except BufferError:
                producer.poll(0.1)  # local queue full: serve deliveries, then retry

    first_ts: int | None = None
    last_ts: int | None = None
    started = time.monotonic()
    bar = tqdm(
        total=total, unit="quote", desc="replay", disable=not (progress and _is_tty()),
        mininterval=0.5,
    )
    try:
        for letter in deadletters:
            send(DEADLETTER, None, letter.to_json())
        pending = sent = 0
        while True:
            if rate is not None:
                due = started + sent / rate
                while (wait := due - time.monotonic()) > 0.001:
                    producer.poll(min(wait, 0.1))
            quote = next(items, None)
            if quote is None:
                break
            if lazy and quote.exchange not in exchanges:
                if quote.exchange not in cfg.exchanges:
                    producer.flush()
                    raise ValueError(
                        f"a record of exchange {quote.exchange!r}, which is not configured; "
                        f"add it to ARB_EXCHANGES (configured: {list(cfg.exchanges)})"
                    )
                exchanges.add(quote.exchange)
            ts = quote.exchange_ts
            if first_ts is None:
                first_ts = ts
            if last_ts is None or ts > last_ts:
                last_ts = ts
            if speed is not None:
                due = started + (ts - first_ts) / 1000.0 / speed
                while (wait := due - time.monotonic()) > 0:
                    producer.poll(min(wait, 0.1))
            topic = (trades_topic if quote.type == "trade" else quotes_topic)(quote.exchange)
            send(topic, quote.symbol.encode(), quote.to_json())
            sent += 1
            pending += 1
            if pending >= 1000:
                producer.poll(0)
                bar.update(pending)
                pending = 0
        bar.update(pending)
        if heartbeat and last_ts is not None:
            for exchange in sorted(exchanges):
                beat = Heartbeat(exchange=exchange, exchange_ts=last_ts, received_ts=now_ms())
                send(quotes_topic(exchange), exchange.encode(), beat.to_json(), on_heartbeat)
    except KafkaException as exc:
        producer.flush()
        raise _delivery_error(
            f"Kafka refused a record: {exc}", failures, acked, first_ts, last_ts, started
        ) from exc
    finally:
        bar.close()
    try:
        while len(producer) > 0:
            producer.flush(1.0)  # every record gets a report within message.timeout.ms
    except KafkaException as exc:  # a fatal error (confluent-kafka raises it from flush)
        raise _delivery_error(
            f"Kafka failed while flushing: {exc}", failures, acked, first_ts, last_ts, started
        ) from exc
    if failures:
        raise _delivery_error(
            f"{len(failures)} record(s) were not delivered (first: {failures[0]})",
            failures, acked, first_ts, last_ts, started,
        )
    return _report(acked, first_ts, last_ts, started)


def _report(
    acked: dict[str, int], first_ts: int | None, last_ts: int | None, started: float
) -> ReplayReport:
    return ReplayReport(
        published={t: n for t, n in acked.items() if t != DEADLETTER},
        deadletters=acked.get(DEADLETTER, 0),
        elapsed_s=time.monotonic() - started,
        first_event_ts=first_ts,
        last_event_ts=last_ts,
    )


def _delivery_error(
    message: str,
    failures: list[str],
    acked: dict[str, int],
    first_ts: int | None,
    last_ts: int | None,
    started: float,
) -> ReplayDeliveryError:
    report = _report(acked, first_ts, last_ts, started)
    return ReplayDeliveryError(message, failed=max(len(failures), 1), report=report)
