"""Replay of a generic tick CSV: ``exchange,symbol,ts,bid,ask[,bid_size,ask_size]``.

:func:`read_csv_quotes` validates every row through :class:`~arbstream.schemas.Quote` and
lists the bad ones by file line; :func:`load_csv_quotes` requires them all valid;
:func:`replay_csv` (``arbstream replay csv``) publishes them with
:func:`~producers.replay.publish.publish_quotes`, optionally dead-lettering the bad rows.

All timestamps are integer milliseconds since the Unix epoch, UTC.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from arbstream.schemas import DeadLetter, Quote, validation_reason
from arbstream.timestamps import to_ms
from producers.replay.errors import ReplayInputError, ReplayReport, RowProblem
from producers.replay.publish import publish_quotes

if TYPE_CHECKING:
    from arbstream.config import Settings

CSV_REQUIRED: tuple[str, ...] = ("exchange", "symbol", "ts", "bid", "ask")
CSV_OPTIONAL: tuple[str, ...] = ("bid_size", "ask_size")
#: Plausible integer epoch-millisecond range for CSV ``ts`` (1973-03-03 .. 5138-11-16); an
#: integer outside it is almost certainly epoch seconds or microseconds.
EPOCH_MS_RANGE = (10**11, 10**14)

_INT_RE = re.compile(r"^[+-]?\d+$")


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
        return to_ms(datetime.fromisoformat(text))
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
        The quotes in file order (:func:`~producers.replay.publish.publish_quotes` sorts them
        by event time).

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
        ReplayDeliveryError, RuntimeError, ValueError: see
            :func:`~producers.replay.publish.publish_quotes`.
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
