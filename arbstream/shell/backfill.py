"""``arbstream backfill``: a recording through the stream's logic, as a batch, into the lake.

The producers read the recording (:mod:`producers.replay`: the IAQF bars, the Binance
websocket capture, tick CSVs) into the quotes a replay would publish, in the order it would
publish them (stably sorted by ``exchange_ts``; Binance by ``exchange_ts`` then
``received_ts``); :func:`spark_jobs.backfill.backfill` runs the market query's decoder and
engine over them and writes the Parquet history (``ARB_LAKE_DIR``). No service is needed:
nothing goes to Kafka, MongoDB or InfluxDB. Components do not import each other, so this
shell module composes them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from arbstream.console import console, err, fail, settings_or_exit
from arbstream.console import time_option as _time
from arbstream.store import lake

if TYPE_CHECKING:
    from arbstream.config import Settings
    from arbstream.schemas import Quote
    from spark_jobs.backfill import BackfillReport


class Input(StrEnum):
    """The recordings ``arbstream backfill`` reads."""

    iaqf = "iaqf"
    binance = "binance"
    csv = "csv"


def _in_range(quotes: Sequence[Quote], start: datetime | None, end: datetime | None
              ) -> list[Quote]:
    """``quotes`` with ``exchange_ts`` in ``[start, end)`` (None: unbounded), order kept."""
    from arbstream.timestamps import to_ms

    lo = to_ms(start) if start is not None else None
    hi = to_ms(end) if end is not None else None
    return [q for q in quotes if (lo is None or q.exchange_ts >= lo)
            and (hi is None or q.exchange_ts < hi)]


def read_quotes(settings: Settings, source: Input, start: datetime | None = None,
                end: datetime | None = None, paths: Sequence[Path] = ()
                ) -> tuple[int, Iterator[Quote]]:
    """The quotes of a recording with ``exchange_ts`` in ``[start, end)``, in the order a
    replay publishes them: ``(how many, the quotes)``, the IAQF ones made one at a time (the
    21 days are 292k quotes).

    Args:
        settings: ``data_dir`` (the recordings) and ``exchanges`` (each quote's must be one).
        source: ``iaqf`` (``<data_dir>/iaqf-2023-03``, no ``paths``), ``binance`` (``paths``:
            ``.gz`` files of the capture, default all of ``<data_dir>/binance-ws-2024-08``;
            bookTicker quotes only) or ``csv`` (``paths``: one or more tick CSVs, required).
        start, end: the event-time range (None: unbounded).
        paths: the files, as above.

    Raises:
        producers.replay.errors.ReplayInputError: a missing or malformed recording (a bad CSV
            row included).
        ValueError: ``paths`` given for ``iaqf`` or missing for ``csv``; a quote of an
            exchange not in ``ARB_EXCHANGES``.
    """
    if source is Input.iaqf:
        from producers.replay.iaqf import load_iaqf_quotes
        from producers.replay.publish import quotes_of

        if paths:
            raise ValueError("--path is not used with --input iaqf (it reads ARB_DATA_DIR)")
        frame = load_iaqf_quotes(settings.data_dir, start, end)
        _check_exchanges(settings, frame["exchange"].unique().tolist())
        return len(frame), quotes_of(frame.sort_values("exchange_ts", kind="stable"))
    elif source is Input.binance:
        from producers.replay.binance import BinanceFile, binance_files, read_binance_file

        files = [BinanceFile.of(Path(p)) for p in paths] or binance_files(settings.data_dir)
        records = [r for f in files for r in read_binance_file(f)]
        records.sort(key=lambda r: (r.exchange_ts, r.received_ts))
        quotes = _in_range(records, start, end)  # type: ignore[arg-type]
    else:
        from producers.replay.csv import load_csv_quotes

        if not paths:
            raise ValueError("--input csv needs at least one --path FILE")
        rows = [q for p in paths for q in load_csv_quotes(Path(p), settings.exchanges)]
        quotes = _in_range(sorted(rows, key=lambda q: q.exchange_ts), start, end)
    _check_exchanges(settings, [q.exchange for q in quotes])
    return len(quotes), iter(quotes)


def _check_exchanges(settings: Settings, exchanges: Iterable[str]) -> None:
    """Raises ValueError for an exchange not in ``ARB_EXCHANGES`` (the stream has no topic
    for it, so a replay refuses it)."""
    unknown = sorted(set(exchanges) - set(settings.exchanges))
    if unknown:
        raise ValueError(f"quotes for exchanges {unknown} that are not configured; add them "
                         f"to ARB_EXCHANGES (configured: {settings.exchanges})")


def _wire(quotes: Iterable[Quote]) -> Iterator[bytes]:
    for quote in quotes:
        yield quote.to_json()


def backfill(
    source: Annotated[Input, typer.Option("--input", help="the recording to read")],
    start: Annotated[str | None, typer.Option("--from", help="ISO-8601, inclusive")] = None,
    end: Annotated[str | None, typer.Option("--to", help="ISO-8601, exclusive")] = None,
    path: Annotated[list[Path] | None, typer.Option(
        "--path", help="binance: .gz files (default: all of ARB_DATA_DIR); csv: tick CSVs "
        "(required, repeatable)")] = None,
    chunk: Annotated[int, typer.Option(
        min=1, help="records per micro-batch (the lake files' unit)")] = 2_000,
) -> None:
    """Run the stream's logic over a recording, as a batch, into the Parquet history
    (ARB_LAKE_DIR): spreads, features, episodes and final opportunities, with no service."""
    from contextlib import ExitStack

    from tqdm import tqdm

    settings = settings_or_exit()
    with ExitStack() as stack:
        def bar(total: int) -> Callable[[int], object]:
            return stack.enter_context(tqdm(
                total=total, unit="quote", desc="backfill", file=sys.stderr,
                disable=not sys.stderr.isatty(), mininterval=0.5)).update

        try:
            report, where = backfill_recording(
                settings, source, _time(start), _time(end), path or [], chunk, bar)
        except (ValueError, OSError) as exc:
            raise fail(exc) from None
    console.print(report.summary())
    console.print(f"lake: {where}")


def backfill_recording(
    settings: Settings, source: Input, start: datetime | None = None,
    end: datetime | None = None, paths: Sequence[Path] = (), chunk: int = 2_000,
    progress: Callable[[int], Callable[[int], object]] | None = None,
) -> tuple[BackfillReport, Path]:
    """Replace ``source``'s earlier backfill in the lake with one of ``[start, end)``: a
    backfill of an input, whatever its range or chunk size, never leaves two runs' rows for
    one window. ``progress(total)`` returns the callback of each chunk's quote count; the
    removal and the reading are reported on stderr.

    Returns:
        ``(the backfill's report, the lake directory)``.

    Raises:
        As :func:`read_quotes` and :func:`spark_jobs.backfill.backfill`.
    """
    from spark_jobs.backfill import BackfillConfig
    from spark_jobs.backfill import backfill as run_backfill

    cfg = BackfillConfig.of(settings, chunk)
    removed = lake.remove(cfg.lake, f"backfill-{source.value}-")
    if removed:
        err.print(f"removed {removed} files of the previous {source} backfill")
    err.print(f"reading the {source} recording ...")
    total, quotes = read_quotes(settings, source, start, end, paths)
    report = run_backfill(_wire(quotes), source.value, cfg,
                          progress(total) if progress is not None else None)
    return report, cfg.lake.dir
