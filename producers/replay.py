"""Replay recorded market data onto Kafka as canonical :class:`~arbstream.schemas.Quote` records.

Two inputs are supported:

* **IAQF 1-minute bars** (``<data_dir>/iaqf-2023-03/<exchange>_<pair>.parquet``). Bars carry no
  bid or ask, so each bar becomes one quote: ``exchange_ts`` = bar open + 60 s (the bar's close
  time), ``bid = ask = close``, sizes unknown (``None``). See :func:`load_iaqf_quotes`.
* **Generic tick CSV** with header ``exchange,symbol,ts,bid,ask[,bid_size,ask_size]``. See
  :func:`load_csv_quotes`.

Both are published by :func:`publish_quotes` in event-time order across exchanges, to
``md.<exchange>.quotes`` keyed by symbol, with an idempotent producer; nothing is dropped
silently. :func:`replay_iaqf`, :func:`replay_csv`, :func:`parse_speed` and :func:`parse_time`
are the entry points the ``arbstream replay`` CLI calls.

All timestamps are integer milliseconds since the Unix epoch, UTC.
"""

from __future__ import annotations

import csv
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pydantic import ValidationError
from tqdm import tqdm

from arbstream.config import Settings
from arbstream.schemas import (
    EXCHANGE_RE,
    SYMBOL_RE,
    DeadLetter,
    Heartbeat,
    Quote,
    Trade,
    now_ms,
    validation_reason,
)
from arbstream.topics import DEADLETTER, ensure_topics, quotes_topic, trades_topic

#: Sub-directory of ``Settings.data_dir`` holding the IAQF bars.
IAQF_SUBDIR = "iaqf-2023-03"
#: A bar's close time relative to its open, ms: the quote time of the bar.
BAR_MS = 60_000
#: Quote currencies the pair parser knows; matched longest first (``USDT`` before ``USD``).
QUOTE_CURRENCIES: tuple[str, ...] = ("USDT", "USDC", "USD")
#: Columns (and order) of a quotes frame, as returned by the loaders.
QUOTE_COLUMNS: tuple[str, ...] = (
    "exchange", "symbol", "exchange_ts", "bid", "ask", "bid_size", "ask_size",
)
CSV_REQUIRED: tuple[str, ...] = ("exchange", "symbol", "ts", "bid", "ask")
CSV_OPTIONAL: tuple[str, ...] = ("bid_size", "ask_size")
#: Plausible integer epoch-millisecond range for CSV ``ts`` (1973-03-03 .. 5138-11-16); an
#: integer outside it is almost certainly epoch seconds or microseconds.
EPOCH_MS_RANGE = (10**11, 10**14)
#: At most this many problems are spelled out in a :class:`ReplayInputError` message.
MAX_LISTED_PROBLEMS = 50

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_INT_RE = re.compile(r"^[+-]?\d+$")


# --- errors and report ---------------------------------------------------------------------


@dataclass(frozen=True)
class RowProblem:
    """One rejected input row: its 1-based file ``line`` (header is line 1), why, and the text."""

    line: int
    reason: str
    raw: str


class ReplayInputError(ValueError):
    """Replay input is missing or invalid. ``problems`` lists every bad row (may be empty)."""

    def __init__(self, message: str, problems: Sequence[RowProblem] = ()) -> None:
        self.problems: list[RowProblem] = list(problems)
        if self.problems:
            shown = [f"  line {p.line}: {p.reason}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
            extra = len(self.problems) - MAX_LISTED_PROBLEMS
            if extra > 0:
                shown.append(f"  ... and {extra} more (see ReplayInputError.problems)")
            message = "\n".join([message, *shown])
        super().__init__(message)


class ReplayDeliveryError(RuntimeError):
    """Kafka did not acknowledge every record. ``failed`` counts them; ``report`` has the rest."""

    def __init__(self, message: str, failed: int, report: ReplayReport) -> None:
        super().__init__(message)
        self.failed = failed
        self.report = report


@dataclass(frozen=True)
class ReplayReport:
    """Outcome of one replay.

    Attributes:
        published: records acknowledged by Kafka per topic (``md.<exchange>.quotes``, and
            ``md.<exchange>.trades`` when trades were published).
        deadletters: records acknowledged on ``md.deadletter``.
        elapsed_s: wall-clock seconds from the first produce to the final flush.
        first_event_ts: event time of the first quote published, UTC ms (None when none).
        last_event_ts: latest event time published, UTC ms (None when none); the last
            quote's when the input was sorted.
    """

    published: dict[str, int] = field(default_factory=dict)
    deadletters: int = 0
    elapsed_s: float = 0.0
    first_event_ts: int | None = None
    last_event_ts: int | None = None

    @property
    def quotes(self) -> int:
        """Total quotes acknowledged across every quote topic."""
        return sum(n for t, n in self.published.items() if not t.endswith(".trades"))

    @property
    def trades(self) -> int:
        """Total trades acknowledged across every trade topic."""
        return sum(n for t, n in self.published.items() if t.endswith(".trades"))

    @property
    def first_event_time(self) -> datetime | None:
        return _from_ms(self.first_event_ts)

    @property
    def last_event_time(self) -> datetime | None:
        return _from_ms(self.last_event_ts)

    def summary(self) -> str:
        """One human-readable paragraph: totals, per-topic counts, event-time span, rate."""
        rate = self.quotes / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"published {self.quotes} quotes and {self.deadletters} dead letters "
            f"in {self.elapsed_s:.2f} s ({rate:,.0f} quotes/s)"
        ]
        lines += [f"  {topic}: {n}" for topic, n in sorted(self.published.items())]
        if self.first_event_time and self.last_event_time:
            lines.append(
                f"  event time {self.first_event_time.isoformat()} .. "
                f"{self.last_event_time.isoformat()}"
            )
        return "\n".join(lines)


def _from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else _EPOCH + timedelta(milliseconds=ms)


# --- small parsers -------------------------------------------------------------------------


def canonical_symbol(pair: str) -> str:
    """Map a concatenated pair name to the canonical ``BASE-QUOTE`` symbol.

    The quote currency is the longest known suffix among :data:`QUOTE_CURRENCIES`, so
    ``btcusdt`` -> ``BTC-USDT``, ``usdtusd`` -> ``USDT-USD``, ``usdcusdt`` -> ``USDC-USDT``.

    Raises:
        ValueError: no known quote currency ends the name, or the base is empty or malformed.
    """
    name = pair.strip().upper()
    for quote in sorted(QUOTE_CURRENCIES, key=len, reverse=True):
        if name.endswith(quote):
            symbol = f"{name[: -len(quote)]}-{quote}"
            if SYMBOL_RE.match(symbol):
                return symbol
            raise ValueError(f"pair {pair!r}: base currency {name[: -len(quote)]!r} is invalid")
    raise ValueError(
        f"pair {pair!r} ends in no known quote currency ({', '.join(QUOTE_CURRENCIES)})"
    )


def parse_iaqf_filename(path: Path) -> tuple[str, str]:
    """``<exchange>_<pair>.parquet`` -> ``(exchange, canonical symbol)``.

    Raises:
        ValueError: the name has no ``_``, a malformed exchange id, or an unknown pair.
    """
    exchange, sep, pair = path.stem.rpartition("_")
    if not sep or not exchange or not pair:
        raise ValueError(f"{path.name}: expected a file name like <exchange>_<pair>.parquet")
    if not EXCHANGE_RE.match(exchange):
        raise ValueError(f"{path.name}: exchange id {exchange!r} is not a lower-case identifier")
    try:
        return exchange, canonical_symbol(pair)
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None


def to_utc(value: datetime) -> datetime:
    """Attach UTC to a naive datetime, convert an aware one to UTC."""
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def datetime_to_ms(value: datetime) -> int:
    """UTC milliseconds since the epoch (naive means UTC), floored, exact integer arithmetic."""
    return (to_utc(value) - _EPOCH) // _MS


def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 date or date-time; naive means UTC. Returns a tz-aware UTC datetime.

    Accepts e.g. ``2023-03-11``, ``2023-03-11T04:00``, ``2023-03-11 04:00:00Z``,
    ``2023-03-11T06:00:00+02:00``.

    Raises:
        ValueError: the text is not ISO-8601.
    """
    try:
        return to_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: expected ISO-8601 such as 2023-03-11T04:00:00Z "
            "(no offset means UTC)"
        ) from None


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


# --- IAQF bars -----------------------------------------------------------------------------


def _empty_quotes() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "exchange": pd.Series([], dtype=object),
            "symbol": pd.Series([], dtype=object),
            "exchange_ts": pd.Series([], dtype=np.int64),
            "bid": pd.Series([], dtype=np.float64),
            "ask": pd.Series([], dtype=np.float64),
            "bid_size": pd.Series([], dtype=np.float64),
            "ask_size": pd.Series([], dtype=np.float64),
        }
    )


def _read_bar_closes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(bar open UTC ms, close) of one IAQF parquet file, validated."""
    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ReplayInputError(f"{path}: not a readable parquet file: {exc}") from exc
    if "close" not in names:
        raise ReplayInputError(f"{path}: no 'close' column (columns: {names})")
    try:
        frame = pd.read_parquet(path, columns=["close"])
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ReplayInputError(f"{path}: not a readable parquet file: {exc}") from exc
    index = frame.index
    if not isinstance(index, pd.DatetimeIndex) or index.tz is None:
        raise ReplayInputError(
            f"{path}: index must be tz-aware UTC bar-open timestamps, got {index.dtype}"
        )
    opens = index.tz_convert("UTC").as_unit("ns").asi8 // 1_000_000
    closes = frame["close"].to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(closes) & (closes > 0))
    if bad.any():
        first = index[bad][:5].tolist()
        raise ReplayInputError(
            f"{path}: {int(bad.sum())} bars have a missing or non-positive close (first: {first})"
        )
    return opens, closes


def load_iaqf_quotes(
    data_dir: Path, start: datetime | None = None, end: datetime | None = None
) -> pd.DataFrame:
    """Turn the IAQF 1-minute bars under ``data_dir / "iaqf-2023-03"`` into quotes.

    Each bar's close becomes one quote at the bar's close time: ``exchange_ts`` = bar open +
    60 s, ``bid = ask = close``, ``bid_size = ask_size = NaN`` (unknown, published as null).
    Missing minutes simply produce no quote. The recorded data does not say when a quote was
    received, so :func:`publish_quotes` sets ``received_ts = exchange_ts``.

    Args:
        data_dir: the recorded-data root (``Settings.data_dir``, env ``ARB_DATA_DIR``).
        start: first quote time included (naive means UTC); None for no lower bound.
        end: quote times strictly before ``end`` are included, i.e. ``[start, end)``.

    Returns:
        A frame with columns :data:`QUOTE_COLUMNS`: ``exchange`` (str), ``symbol`` (canonical
        ``BASE-QUOTE``), ``exchange_ts`` (int64 UTC ms), ``bid``/``ask`` (float64),
        ``bid_size``/``ask_size`` (float64, NaN), sorted by ``(exchange_ts, exchange, symbol)``
        with a fresh ``RangeIndex``. The full three weeks is about 280k rows.

    Raises:
        ReplayInputError: the directory is missing (set ``ARB_DATA_DIR``), holds no parquet
            files, a file name is not ``<exchange>_<pair>.parquet`` with a known pair, or a
            file is unreadable or malformed (no ``close``, naive index, bad closes).
    """
    folder = Path(data_dir) / IAQF_SUBDIR
    if not folder.is_dir():
        raise ReplayInputError(
            f"IAQF data directory {folder} not found; set ARB_DATA_DIR to the recorded-data "
            f"root that contains {IAQF_SUBDIR}/"
        )
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ReplayInputError(f"no *.parquet files in {folder}")
    lo = datetime_to_ms(start) if start is not None else None
    hi = datetime_to_ms(end) if end is not None else None
    parts: list[pd.DataFrame] = []
    for path in files:
        try:
            exchange, symbol = parse_iaqf_filename(path)
        except ValueError as exc:
            raise ReplayInputError(str(exc)) from None
        opens, closes = _read_bar_closes(path)
        ts = opens + BAR_MS
        keep = np.ones(len(ts), dtype=bool)
        if lo is not None:
            keep &= ts >= lo
        if hi is not None:
            keep &= ts < hi
        n = int(keep.sum())
        if n == 0:
            continue
        parts.append(
            pd.DataFrame(
                {
                    "exchange": np.full(n, exchange, dtype=object),
                    "symbol": np.full(n, symbol, dtype=object),
                    "exchange_ts": ts[keep].astype(np.int64),
                    "bid": closes[keep],
                    "ask": closes[keep],
                    "bid_size": np.full(n, np.nan),
                    "ask_size": np.full(n, np.nan),
                }
            )
        )
    if not parts:
        return _empty_quotes()
    quotes = pd.concat(parts, ignore_index=True)
    quotes = quotes.sort_values(["exchange_ts", "exchange", "symbol"], kind="stable")
    return quotes.reset_index(drop=True)


# --- tick CSV ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CsvQuotes:
    """Result of reading a tick CSV: valid quotes (file order) and every rejected row."""

    quotes: list[Quote]
    problems: list[RowProblem]


def _parse_ts(text: str) -> int:
    if _INT_RE.match(text):
        value = int(text)
        if not EPOCH_MS_RANGE[0] <= value < EPOCH_MS_RANGE[1]:
            raise ValueError(
                f"ts {text} is not plausible epoch milliseconds "
                "(epoch seconds or microseconds?)"
            )
        return value
    try:
        return datetime_to_ms(datetime.fromisoformat(text))
    except ValueError:
        raise ValueError(
            f"ts {text!r} is neither ISO-8601 nor integer epoch milliseconds"
        ) from None


def _parse_number(name: str, text: str, optional: bool) -> float | None:
    if text == "":
        if optional:
            return None
        raise ValueError(f"{name} is empty")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} {text!r} is not finite")
    return value


def _csv_header(path: Path, header: list[str]) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    dupes = sorted({n for n in names if names.count(n) > 1})
    missing = [c for c in CSV_REQUIRED if c not in names]
    unknown = [n for n in names if n not in CSV_REQUIRED + CSV_OPTIONAL]
    if dupes or missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing {missing}")
        if unknown:
            problems.append(f"unknown {unknown}")
        if dupes:
            problems.append(f"duplicated {dupes}")
        raise ReplayInputError(
            f"{path} line 1: bad header ({'; '.join(problems)}); expected columns "
            f"{','.join(CSV_REQUIRED)}[,{','.join(CSV_OPTIONAL)}]"
        )
    return {n: i for i, n in enumerate(names)}


def _csv_row(
    cols: dict[str, int], cells: list[str], exchanges: set[str] | None
) -> Quote:
    if len(cells) != len(cols):
        raise ValueError(f"expected {len(cols)} fields, got {len(cells)}")
    cell = {name: cells[i].strip() for name, i in cols.items()}
    exchange = cell["exchange"]
    if exchanges is not None and exchange not in exchanges:
        raise ValueError(
            f"exchange {exchange!r} is not configured (ARB_EXCHANGES: {sorted(exchanges)})"
        )
    ts = _parse_ts(cell["ts"])
    try:
        return Quote(
            exchange=exchange,
            symbol=cell["symbol"],
            exchange_ts=ts,
            received_ts=ts,
            bid=_parse_number("bid", cell["bid"], optional=False),
            ask=_parse_number("ask", cell["ask"], optional=False),
            bid_size=_parse_number("bid_size", cell.get("bid_size", ""), optional=True),
            ask_size=_parse_number("ask_size", cell.get("ask_size", ""), optional=True),
        )
    except ValidationError as exc:
        raise ValueError(validation_reason(exc).replace("Value error, ", "")) from None


def read_csv_quotes(path: Path, exchanges: Sequence[str] | None = None) -> CsvQuotes:
    """Read a tick CSV, validating every row through :class:`Quote`; never raises for bad rows.

    Format: a header naming ``exchange,symbol,ts,bid,ask`` and optionally ``bid_size``,
    ``ask_size`` (any order, case-insensitive), then one quote per line. ``ts`` is ISO-8601
    (``Z``/offset optional, naive means UTC) or integer epoch milliseconds; empty sizes mean
    unknown. ``received_ts`` is set to ``exchange_ts`` (the file does not say). Blank lines are
    skipped; a quoted field must not span lines.

    Args:
        path: the CSV file (UTF-8).
        exchanges: when given, a row of any other exchange is rejected (it has no topic).

    Returns:
        :class:`CsvQuotes` with the valid quotes in file order and one :class:`RowProblem`
        per rejected row (``line`` is the 1-based file line number; the header is line 1).

    Raises:
        ReplayInputError: the file is missing, unreadable, not UTF-8, empty, or its header is
            wrong.
    """
    path = Path(path)
    allowed = set(exchanges) if exchanges is not None else None
    quotes: list[Quote] = []
    problems: list[RowProblem] = []
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            lines = enumerate(handle, start=1)
            cols: dict[str, int] | None = None
            for number, line in lines:
                raw = line.rstrip("\r\n")
                if not raw.strip():
                    continue
                cells = next(csv.reader([raw]))
                if cols is None:
                    if number != 1:
                        raise ReplayInputError(f"{path}: the header must be on line 1")
                    cols = _csv_header(path, cells)
                    continue
                try:
                    quotes.append(_csv_row(cols, cells, allowed))
                except ValueError as exc:
                    problems.append(RowProblem(line=number, reason=str(exc), raw=raw))
    except FileNotFoundError:
        raise ReplayInputError(f"CSV file {path} not found") from None
    except UnicodeDecodeError as exc:
        raise ReplayInputError(f"{path} is not UTF-8 text: {exc}") from None
    except (OSError, csv.Error) as exc:
        raise ReplayInputError(f"cannot read {path}: {exc}") from exc
    if cols is None:
        raise ReplayInputError(f"{path} is empty; expected a header line")
    return CsvQuotes(quotes=quotes, problems=problems)


def load_csv_quotes(path: Path, exchanges: Sequence[str] | None = None) -> list[Quote]:
    """Read a tick CSV (see :func:`read_csv_quotes`) and require every row to be valid.

    Returns:
        The quotes in file order (:func:`publish_quotes` sorts them by event time).

    Raises:
        ReplayInputError: the file or header is bad, or any row is invalid. Then the error
            lists every bad row by its 1-based file line number (header = line 1) with its
            reason, and ``.problems`` holds them all.
    """
    result = read_csv_quotes(path, exchanges)
    if result.problems:
        raise ReplayInputError(
            f"{len(result.problems)} invalid row(s) in {path} (line numbers are file lines; "
            "the header is line 1); nothing was published",
            result.problems,
        )
    return result.quotes


# --- publishing ----------------------------------------------------------------------------


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


def _iter_frame(frame: pd.DataFrame) -> Iterator[Quote]:
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


def producer_config(settings: Settings) -> dict[str, Any]:
    """librdkafka settings of the replay producer: idempotent, acks=all, lz4, short linger."""
    return {
        **settings.kafka_client_config(),
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 20,
        "client.id": "arbstream-replay",
    }


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
        settings: Kafka address and the configured exchanges.
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
        items = _iter_frame(frame)
    elif isinstance(quotes, Sequence):
        ordered = sorted(quotes, key=lambda q: q.exchange_ts)
        total = len(ordered)
        exchanges = {q.exchange for q in ordered}
        items = iter(ordered)
    else:
        lazy, total, exchanges, items = True, None, set(), iter(quotes)
    configured = set(settings.exchanges)
    unknown = sorted(exchanges - configured)
    if unknown:
        raise ValueError(
            f"quotes for exchanges {unknown} that are not configured; add them to "
            f"ARB_EXCHANGES (configured: {settings.exchanges})"
        )

    ensure_topics(settings)
    producer = Producer(producer_config(settings))
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
                if quote.exchange not in configured:
                    producer.flush()
                    raise ValueError(
                        f"a record of exchange {quote.exchange!r}, which is not configured; "
                        f"add it to ARB_EXCHANGES (configured: {settings.exchanges})"
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
    while len(producer) > 0:
        producer.flush(1.0)  # every record gets a report within message.timeout.ms
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


# --- CLI entry points ----------------------------------------------------------------------


def replay_iaqf(
    settings: Settings,
    start: datetime | None = None,
    end: datetime | None = None,
    speed: float | None = None,
    progress: bool = True,
) -> ReplayReport:
    """Replay the IAQF bars in ``[start, end)`` (quote time, UTC) to Kafka.

    Loads with :func:`load_iaqf_quotes` from ``settings.data_dir`` and publishes with
    :func:`publish_quotes`; see both for the bar-to-quote rule and the errors raised.
    """
    quotes = load_iaqf_quotes(settings.data_dir, start, end)
    return publish_quotes(quotes, settings, speed=speed, progress=progress)


def replay_csv(
    settings: Settings,
    path: Path,
    speed: float | None = None,
    deadletter: bool = False,
    progress: bool = True,
) -> ReplayReport:
    """Replay a tick CSV (format in :func:`read_csv_quotes`) to Kafka.

    With ``deadletter=False`` any bad row aborts before anything is published
    (:class:`ReplayInputError` listing every bad row by file line number). With
    ``deadletter=True`` each bad row goes to ``md.deadletter`` as
    ``DeadLetter.of(raw_line, "<file> line N: <reason>", stage="replay")`` and the valid rows
    are published; the report counts both. Rows of exchanges not in ``settings.exchanges``
    count as bad rows.

    Raises:
        ReplayInputError: missing/unreadable file or bad header (always), bad rows (unless
            ``deadletter``).
        ReplayDeliveryError, RuntimeError, ValueError: see :func:`publish_quotes`.
    """
    path = Path(path)
    if deadletter:
        result = read_csv_quotes(path, settings.exchanges)
        letters = [
            DeadLetter.of(p.raw, f"{path.name} line {p.line}: {p.reason}", stage="replay")
            for p in result.problems
        ]
        return publish_quotes(
            result.quotes, settings, speed=speed, progress=progress, deadletters=letters
        )
    quotes = load_csv_quotes(path, settings.exchanges)
    return publish_quotes(quotes, settings, speed=speed, progress=progress)
