"""Replay of the IAQF 1-minute bars (``<data_dir>/iaqf-2023-03/<exchange>_<pair>.parquet``).

Bars carry no bid or ask, so each bar becomes one quote: ``exchange_ts`` = bar open + 60 s (the
bar's close time), ``bid = ask = close``, sizes unknown (``None``). :func:`load_iaqf_quotes`
reads them; :func:`replay_iaqf` (``arbstream replay iaqf``) publishes them with
:func:`~producers.replay.publish.publish_quotes`.

All timestamps are integer milliseconds since the Unix epoch, UTC.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from arbstream.schemas import EXCHANGE_RE
from arbstream.timestamps import to_ms
from producers.replay.errors import ReplayInputError, ReplayReport
from producers.replay.pairs import symbol_from_pair
from producers.replay.publish import publish_quotes

if TYPE_CHECKING:
    from arbstream.config import Settings

#: Sub-directory of ``Settings.data_dir`` holding the IAQF bars.
IAQF_SUBDIR = "iaqf-2023-03"
#: A bar's close time relative to its open, ms: the quote time of the bar.
BAR_MS = 60_000


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
        return exchange, symbol_from_pair(pair)
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None


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
    received, so :func:`~producers.replay.publish.publish_quotes` sets
    ``received_ts = exchange_ts``.

    Args:
        data_dir: the recorded-data root (``Settings.data_dir``, env ``ARB_DATA_DIR``).
        start: first quote time included (naive means UTC); None for no lower bound.
        end: quote times strictly before ``end`` are included, i.e. ``[start, end)``.

    Returns:
        A frame with columns :data:`~producers.replay.publish.QUOTE_COLUMNS`: ``exchange``
        (str), ``symbol`` (canonical ``BASE-QUOTE``), ``exchange_ts`` (int64 UTC ms),
        ``bid``/``ask`` (float64), ``bid_size``/``ask_size`` (float64, NaN), sorted by
        ``(exchange_ts, exchange, symbol)`` with a fresh ``RangeIndex``. The full three weeks
        is about 280k rows.

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
    lo = to_ms(start) if start is not None else None
    hi = to_ms(end) if end is not None else None
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


def replay_iaqf(
    settings: Settings,
    start: datetime | None = None,
    end: datetime | None = None,
    speed: float | None = None,
    progress: bool = True,
) -> ReplayReport:
    """Replay the IAQF bars in ``[start, end)`` (quote time, UTC) to Kafka.

    Loads with :func:`load_iaqf_quotes` from ``settings.data_dir`` and publishes with
    :func:`~producers.replay.publish.publish_quotes`; see both for the bar-to-quote rule and
    the errors raised.
    """
    quotes = load_iaqf_quotes(settings.data_dir, start, end)
    return publish_quotes(quotes, settings, speed=speed, progress=progress)
