"""Replay the raw Binance websocket recording (``binance-ws-2024-08``) as canonical records.

The files (``<data_dir>/binance-ws-2024-08/<market>_<pair>_<yyyymmdd>.gz``, see
``shared/data/README.md``) are gzip text with one frame per line, ``<receive ns> <JSON frame>``,
in Binance's combined-stream envelope ``{"stream": ..., "data": ...}``
(:func:`read_binance_gz`). Two markets, two venues:

* ``spot_*``: Binance spot, venue id ``binance``;
* ``usdm_*``: Binance USD-M perpetual futures, venue id ``binanceusdm`` (its own taker fee in
  :mod:`arbstream.fees`), so spot against perp of the same symbol is a real basis feed.

``<sym>@bookTicker`` frames become :class:`~arbstream.schemas.Quote` records (``b``/``a`` →
bid/ask, ``B``/``A`` → sizes, dedupe on the update id ``u`` as the live Binance adapter does);
``<sym>@trade`` frames optionally become :class:`~arbstream.schemas.Trade` records (taker side
``sell`` when the buyer is the maker, ``m``). Depth frames and the REST snapshot lines some files
contain are skipped.

Times, integer ms since the epoch, UTC:

* ``received_ts`` is the recorded receive time (ns floored to ms).
* ``exchange_ts``: USD-M frames carry Binance's transaction time ``T`` (``E``, the event time,
  when ``T`` is missing). **Spot bookTicker frames carry no time at all, so a spot quote's
  ``exchange_ts`` is its receive time.** The recorder's clock was about 1.27 s *behind*
  Binance's (median ``E`` − receive time over the spot depth and trade frames: 1,272 ms, 1st to
  99th percentile 1,263 to 1,276 ms; see :func:`estimate_clock_offset_ms`), so on the event-time
  axis spot quotes lag perp quotes by that much. ``spot_clock_offset_ms`` adds a fixed offset to
  spot times to line the two up (0 by default: the receive time, as recorded).

Spot and perp overlap from 2024-08-08 23:54:15 to 23:59:59 UTC (about 5.7 minutes); spot BTC
goes on to 00:05:04. Publishing goes through :func:`producers.replay.publish.publish_quotes`
(same idempotent producer, per-exchange topics keyed by symbol, closing heartbeats), optionally
capped at a rate in records per second.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from arbstream.config import Settings
from arbstream.schemas import Quote, Trade, validation_reason
from producers.capture import CaptureFormatError
from producers.replay.errors import ReplayInputError, ReplayReport
from producers.replay.pairs import symbol_from_pair
from producers.replay.publish import publish_quotes

#: Sub-directory of ``Settings.data_dir`` holding the recording.
BINANCE_SUBDIR = "binance-ws-2024-08"
Market = Literal["spot", "usdm"]
#: File-name market prefix -> arbstream venue (exchange) id.
VENUES: dict[str, str] = {"spot": "binance", "usdm": "binanceusdm"}
_FILE_RE = re.compile(r"^(spot|usdm)_([a-z0-9]+)_(\d{8})\.gz$")


def read_binance_gz(path: str | Path) -> Iterator[tuple[int, str]]:
    """Stream ``(receive_ns, frame)`` from a ``binance-ws-2024-08/*.gz`` file, in file order.

    ``receive_ns`` is the local receive time, integer nanoseconds since the epoch; ``frame``
    the JSON text exactly as Binance sent it (combined-stream envelope).

    Raises:
        producers.capture.CaptureFormatError: a non-blank line lacks the ``<ns> <frame>``
            shape.
    """
    path = Path(path)
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as fp:
        for lineno, raw in enumerate(fp, 1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line:
                continue
            ns, sep, frame = line.partition(" ")
            if not sep or not ns.isdigit():
                raise CaptureFormatError(f"{path}:{lineno}: not '<ns> <frame>': {line[:120]!r}")
            yield int(ns), frame


@dataclass(frozen=True)
class BinanceFile:
    """One recording file: its path, market (``spot``/``usdm``), venue id, canonical symbol."""

    path: Path
    market: Market
    exchange: str
    symbol: str
    day: str

    @classmethod
    def of(cls, path: Path) -> BinanceFile:
        """Describe ``path`` from its name, ``<spot|usdm>_<pair>_<yyyymmdd>.gz``.

        Raises:
            ValueError: the name has another shape or an unknown quote currency.
        """
        match = _FILE_RE.match(path.name)
        if not match:
            raise ValueError(f"{path.name}: expected <spot|usdm>_<pair>_<yyyymmdd>.gz")
        market, pair, day = match.groups()
        return cls(path, market, VENUES[market], symbol_from_pair(pair), day)  # type: ignore[arg-type]


def binance_files(
    data_dir: Path,
    symbols: Iterable[str] | None = None,
    markets: Iterable[Market] | None = None,
) -> list[BinanceFile]:
    """The recording's files under ``data_dir / BINANCE_SUBDIR``, sorted by name.

    Args:
        data_dir: the recorded-data root (``Settings.data_dir``).
        symbols: canonical symbols to keep (``BTC-USDT``, ``ETH-USDT``); None keeps all.
        markets: ``spot`` and/or ``usdm``; None keeps both.

    Raises:
        ReplayInputError: the directory is missing or nothing matches.
    """
    root = Path(data_dir) / BINANCE_SUBDIR
    if not root.is_dir():
        raise ReplayInputError(f"Binance recording not found: {root} (set ARB_DATA_DIR)")
    wanted_symbols = set(symbols) if symbols is not None else None
    wanted_markets = set(markets) if markets is not None else None
    files = [
        f for f in (BinanceFile.of(p) for p in sorted(root.glob("*.gz")))
        if (wanted_symbols is None or f.symbol in wanted_symbols)
        and (wanted_markets is None or f.market in wanted_markets)
    ]
    if not files:
        raise ReplayInputError(
            f"no Binance files under {root} for symbols {sorted(wanted_symbols or [])} "
            f"and markets {sorted(wanted_markets or [])}"
        )
    return files


def quote_from_book_ticker(
    data: Mapping[str, Any], exchange: str, receive_ns: int, clock_offset_ms: int = 0
) -> Quote:
    """A ``@bookTicker`` frame's ``data`` -> :class:`Quote`.

    ``exchange_ts`` is ``T`` (else ``E``) when the frame has one (USD-M), else the receive time
    plus ``clock_offset_ms`` (spot); ``received_ts`` is the receive time, ms.

    Raises:
        KeyError: a field is missing. pydantic.ValidationError: the quote is invalid (crossed,
            non-positive price, unknown symbol shape).
    """
    received = receive_ns // 1_000_000
    event = data.get("T") or data.get("E")
    return Quote.build(
        sequence=data.get("u"),
        exchange=exchange,
        symbol=symbol_from_pair(data["s"]),
        bid=float(data["b"]),
        ask=float(data["a"]),
        bid_size=float(data["B"]),
        ask_size=float(data["A"]),
        exchange_ts=int(event) if event else received + clock_offset_ms,
        received_ts=received,
    )


def trade_from_frame(data: Mapping[str, Any], exchange: str, receive_ns: int) -> Trade:
    """A ``@trade`` frame's ``data`` -> :class:`Trade` (``exchange_ts`` = trade time ``T``).

    Raises:
        KeyError: a field is missing. pydantic.ValidationError: the trade is invalid.
    """
    return Trade(
        exchange=exchange,
        symbol=symbol_from_pair(data["s"]),
        trade_id=str(data["t"]),
        price=float(data["p"]),
        size=float(data["q"]),
        side="sell" if data["m"] else "buy",
        exchange_ts=int(data.get("T") or data["E"]),
        received_ts=receive_ns // 1_000_000,
    )


def read_binance_file(
    file: BinanceFile, trades: bool = False, spot_clock_offset_ms: int = 0
) -> Iterator[Quote | Trade]:
    """The file's bookTicker quotes (and ``@trade`` trades when ``trades``), in file order.

    Raises:
        ReplayInputError: a bookTicker or trade frame cannot be turned into a valid record
            (with the file name, line number and reason); the recording has none.
    """
    offset = spot_clock_offset_ms if file.market == "spot" else 0
    for line, (receive_ns, frame) in enumerate(read_binance_gz(file.path), 1):
        stream_at = frame.find('"stream":"')
        if stream_at < 0:
            continue  # REST snapshot line, no envelope
        kind = frame[stream_at + 10: frame.find('"', stream_at + 10)].partition("@")[2]
        if kind != "bookTicker" and not (trades and kind == "trade"):
            continue
        try:
            data = json.loads(frame)["data"]
            if kind == "bookTicker":
                yield quote_from_book_ticker(data, file.exchange, receive_ns, offset)
            else:
                yield trade_from_frame(data, file.exchange, receive_ns)
        except ValidationError as exc:
            reason = validation_reason(exc)
            raise ReplayInputError(f"{file.path.name} line {line}: {kind}: {reason}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplayInputError(f"{file.path.name} line {line}: {kind}: {exc!r}") from exc


def load_binance_records(
    data_dir: Path,
    symbols: Iterable[str] | None = None,
    markets: Iterable[Market] | None = None,
    trades: bool = False,
    spot_clock_offset_ms: int = 0,
) -> list[Quote | Trade]:
    """Every record of the selected files, sorted by (``exchange_ts``, ``received_ts``).

    217,332 bookTicker quotes for both symbols and markets (61,399 trades more with
    ``trades``); about 5 s on one core.
    """
    records: list[Quote | Trade] = []
    for file in binance_files(data_dir, symbols, markets):
        records.extend(read_binance_file(file, trades, spot_clock_offset_ms))
    records.sort(key=lambda r: (r.exchange_ts, r.received_ts))
    return records


def estimate_clock_offset_ms(file: BinanceFile) -> float:
    """Median of (Binance event time ``E`` − receive time) over a file's frames that carry
    ``E`` (depth, trade; USD-M bookTicker), ms: how far the recorder's clock was behind.

    Raises:
        ReplayInputError: no frame of the file carries ``E``.
    """
    gaps = [
        data["E"] - ns / 1e6
        for ns, frame in read_binance_gz(file.path)
        if '"E":' in frame and "data" in (parsed := json.loads(frame))
        and "E" in (data := parsed["data"])
    ]
    if not gaps:
        raise ReplayInputError(f"{file.path.name}: no frame carries an event time E")
    return statistics.median(gaps)


def replay_binance(
    settings: Settings,
    symbols: Sequence[str] | None = None,
    markets: Sequence[Market] | None = None,
    trades: bool = False,
    rate: float | None = None,
    progress: bool = True,
    spot_clock_offset_ms: int = 0,
) -> ReplayReport:
    """Publish the recording to Kafka in event-time order, at most ``rate`` records/s.

    Loads with :func:`load_binance_records` from ``settings.data_dir`` and publishes with
    :func:`producers.replay.publish.publish_quotes` (quotes to ``md.<venue>.quotes``, trades to
    ``md.<venue>.trades``, one closing heartbeat per venue). ``rate`` None is as fast as
    possible; it counts quotes and trades alike.

    Raises:
        ValueError: a venue (``binance``, ``binanceusdm``) is not in ``settings.exchanges``.
        ReplayInputError, ReplayDeliveryError, RuntimeError: see :func:`publish_quotes`.
    """
    records = load_binance_records(
        settings.data_dir, symbols, markets, trades, spot_clock_offset_ms
    )
    return publish_quotes(records, settings, progress=progress, rate=rate)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m producers.replay.binance [--rate N|max] [--trades]`` (``ARB_*`` config)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="max", help="records per second, or max")
    parser.add_argument("--symbols", default="BTC-USDT,ETH-USDT")
    parser.add_argument("--markets", default="spot,usdm")
    parser.add_argument("--trades", action="store_true", help="also publish @trade frames")
    parser.add_argument("--spot-clock-offset-ms", type=int, default=0)
    args = parser.parse_args(argv)
    settings = Settings()
    exchanges = list(dict.fromkeys([*settings.exchanges, *VENUES.values()]))
    settings = settings.model_copy(update={"exchanges": exchanges})
    report = replay_binance(
        settings, args.symbols.split(","), args.markets.split(","),  # type: ignore[arg-type]
        trades=args.trades, rate=None if args.rate == "max" else float(args.rate),
        spot_clock_offset_ms=args.spot_clock_offset_ms,
    )
    print(report.summary())


if __name__ == "__main__":
    main()
