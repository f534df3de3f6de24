"""The producers' commands: ``arbstream produce``, ``record`` and ``replay iaqf|csv``.

:data:`app` holds ``produce`` and ``record`` and the ``replay`` group (:data:`replay_app`);
``arbstream.cli`` mounts them on the main command line. Heavy imports happen inside the
commands, so building the command line stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from arbstream.config import Settings
from arbstream.console import console, fail, settings_or_exit, time_option

app = typer.Typer(help="Market-data producers: live feeds, recordings and replays.",
                  no_args_is_help=True)
replay_app = typer.Typer(help="Publish recorded market data to the quote topics.",
                         no_args_is_help=True)
app.add_typer(replay_app, name="replay")


def _speed(value: str) -> float | None:
    from producers.replay.publish import parse_speed

    try:
        return parse_speed(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


SpeedOpt = Annotated[str, typer.Option("--speed", help="'max' or N for N x real time")]


@replay_app.command("iaqf")
def replay_iaqf_cmd(
    start: Annotated[str | None, typer.Option("--from", help="ISO-8601, inclusive")] = None,
    end: Annotated[str | None, typer.Option("--to", help="ISO-8601, exclusive")] = None,
    speed: SpeedOpt = "max",
) -> None:
    """Replay the IAQF 1-minute bars: each close becomes a quote at bar open + 60 s."""
    from producers.replay.iaqf import replay_iaqf

    try:
        report = replay_iaqf(settings_or_exit(), time_option(start),
                             time_option(end), _speed(speed))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise fail(exc) from None
    console.print(report.summary())


@replay_app.command("csv")
def replay_csv_cmd(
    path: Path,
    speed: SpeedOpt = "max",
    deadletter: Annotated[
        bool, typer.Option(help="publish bad rows to md.deadletter instead of stopping")
    ] = False,
) -> None:
    """Replay a tick CSV: exchange,symbol,ts,bid,ask[,bid_size,ask_size]."""
    from producers.replay.csv import replay_csv

    try:
        report = replay_csv(settings_or_exit(), path, _speed(speed), deadletter)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise fail(exc) from None
    console.print(report.summary())


def _feeds_arg(settings: Settings, exchange: str | None, symbols: str | None,
               all_: bool) -> dict[str, list[str]]:
    if all_ == bool(exchange):
        raise typer.BadParameter("give either --all or --exchange (with --symbols)")
    if all_:
        return dict(settings.feeds)
    assert exchange is not None
    chosen = [s.strip() for s in symbols.split(",")] if symbols else settings.feeds.get(exchange)
    if not chosen:
        raise typer.BadParameter(f"no --symbols given and ARB_FEEDS has none for {exchange}")
    return {exchange: chosen}


@app.command()
def produce(
    exchange: Annotated[str | None, typer.Option(help="exchange id, e.g. binance")] = None,
    symbols: Annotated[str | None, typer.Option(help="BTC-USDT,ETH-USDT")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every feed in ARB_FEEDS")] = False,
) -> None:
    """Stream live websocket market data into the per-exchange topics until SIGTERM.

    Exit codes: 0 all delivered, 1 configuration or start-up error, 3 records undelivered at
    the shutdown deadline, 4 fatal Kafka error, 5 other producer error (docs/producers.md).
    """
    import asyncio
    import logging

    from rich.markup import escape

    from arbstream.console import err
    from producers.errors import ProducerError
    from producers.live import produce as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = settings_or_exit()
    feeds = _feeds_arg(settings, exchange, symbols, all_)
    try:
        stats = asyncio.run(run(settings, feeds))
    except ProducerError as exc:  # exit codes 3, 4, 5: producers/errors.py
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(exc.exit_code) from None
    except (ValueError, RuntimeError) as exc:
        raise fail(exc) from None
    for name, s in stats.items():
        console.print(f"{name}: {s.frames} frames, {s.records} records, "
                      f"{s.reconnects} reconnects, {s.duplicates_dropped} duplicates dropped, "
                      f"{s.gaps} gaps, {s.deadletters} dead letters")


@app.command()
def record(
    exchange: Annotated[str, typer.Option(help="exchange id")],
    symbols: Annotated[str, typer.Option(help="comma-separated BASE-QUOTE")],
    out: Annotated[Path, typer.Option(help="directory for the capture files")],
    seconds: Annotated[float | None, typer.Option(help="stop after this long")] = None,
) -> None:
    """Capture raw websocket frames in the shared capture line format, for replay sets."""
    import asyncio

    from producers.live import record as run

    settings = settings_or_exit()
    try:
        path = asyncio.run(run(settings, exchange, [s.strip() for s in symbols.split(",")],
                               out, seconds))
    except (ValueError, RuntimeError) as exc:
        raise fail(exc) from None
    console.print(f"recorded to {path}")
