"""``arbstream backtest``: bots replayed against the stream's own signals and the recorded
quotes (:mod:`backtest`)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from arbstream.console import console, err, fail, settings_or_exit
from arbstream.console import time_option as _time
from arbstream.shell.backfill import Input, backfill_recording, read_quotes

app = typer.Typer(help="Backtest trading bots on the stream's signals and recorded quotes.",
                  no_args_is_help=True)

#: Columns of the printed comparison (name in the table -> label).
COLUMNS = {"trades": "trades", "win_rate": "win %", "total_profit_usd": "profit $",
           "avg_profit_usd": "avg $", "largest_win_usd": "best $", "largest_loss_usd": "worst $",
           "profit_factor": "PF", "fees_usd": "fees $", "fill_ratio": "fill",
           "capture": "capture", "sharpe": "Sharpe", "sortino": "Sortino",
           "max_drawdown": "max DD", "end_equity_usd": "equity $"}


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("win_rate", "max_drawdown", "capture", "fill_ratio"):
        return f"{100 * value:.1f}%" if key != "fill_ratio" else f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def comparison_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The bot comparison as a rich table."""
    table = Table(title=title)
    table.add_column("bot")
    for label in COLUMNS.values():
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(row["bot"], *(_fmt(k, row.get(k)) for k in COLUMNS))
    return table


@app.command("run", help="Run the threshold (p50/p75/p95), oracle, naive, ML and pair bots on the "
             "lake's opportunities against the recorded quotes; print the comparison, export the "
             "trades (Parquet, CSV, JSON) under ARB_BACKTEST_OUTPUT_DIR and store the run.")
def run_command(
    source: Annotated[Input, typer.Option("--input", help="the recording whose quotes fill "
                                          "the orders (iaqf or binance)")] = Input.iaqf,
    start: Annotated[str | None, typer.Option("--from", help="ISO-8601, inclusive")] = None,
    end: Annotated[str | None, typer.Option("--to", help="ISO-8601, exclusive")] = None,
    backfill: Annotated[bool, typer.Option(
        help="first run the stream's logic over the same range into the lake "
        "(as `arbstream backfill`)")] = False,
    usdc_pause: Annotated[bool, typer.Option(
        help="scenario: USDC transfers paused over the March 2023 depeg weekend")] = False,
    store: Annotated[bool, typer.Option(help="write MongoDB `backtests` and InfluxDB")] = True,
    ml: Annotated[bool, typer.Option(help="add the ML bot (the registry's champion "
                                     "opportunity scorer) when there is one")] = True,
    ml_version: Annotated[int | None, typer.Option(
        min=1, help="backtest this version of the scorer instead of the champion")] = None,
    signals: Annotated[str, typer.Option(
        help="where the stream's opportunities are read: lake (the Parquet history) or mongo "
        "(MongoDB opportunities)")] = "lake",
    pair_bots: Annotated[bool, typer.Option(
        help="add a z-score pair-trading bot per ARB_PAIRS pair the recording quotes")] = True,
) -> None:
    """``backtest.job.run_job`` on the recording's quotes (see the command's help)."""
    from pymongo.errors import PyMongoError

    from arbstream.privacy import IdHashKeyMissing
    from arbstream.store.influx.client import InfluxError
    from backtest.job import run_job
    from backtest.market import Market

    settings = settings_or_exit()
    since, until = _time(start), _time(end)
    if signals not in ("lake", "mongo"):
        raise typer.BadParameter(f"--signals is lake or mongo, not {signals!r}")
    try:
        if backfill:
            report, where = backfill_recording(settings, source, since, until)
            err.print(f"backfill into {where}: {report.summary()}")
        err.print(f"reading the {source} recording ...")
        first = _training_start(settings, ml_version) if ml else None
        quotes_from = first if first is not None and since is not None and first < since \
            else since  # the ML bot's threshold is chosen on its training range's fills
        _, quotes = read_quotes(settings, source, quotes_from, until)
        market = Market.from_records(quotes, max_age_ms=int(
            settings.max_quote_age_seconds * 1000))
        pairs = _pair_series(settings, market, since, until) if pair_bots else []
        job = run_job(settings, market, source.value, since, until, usdc_paused=usdc_pause,
                      store=store, ml=ml, pair_series=pairs, from_mongo=signals == "mongo",
                      ml_version=ml_version)
    except (ValueError, OSError, IdHashKeyMissing, PyMongoError, InfluxError) as exc:
        raise fail(exc) from None
    console.print(comparison_table(job.table.to_dict("records"), f"backtest {job.run_id}"))
    if "skipped" in job.ml:
        err.print(f"ml bot: not run: {job.ml['skipped']}")
    else:
        err.print(f"ml bot: opportunity_scorer v{job.ml['version']}, threshold "
                  f"{job.ml['threshold']:.3f} chosen on {job.ml['training_signals']} training "
                  "signals (not traded)")
    console.print(f"trades: {job.files.parquet} (.csv, .json); summary: {job.files.summary}")
    if job.stored is not None:
        console.print(f"stored: {job.stored['documents']} MongoDB documents, "
                      f"{job.stored['points']} InfluxDB points")
        for line, reason in job.stored["rejected"]:
            err.print(f"InfluxDB refused a point: {reason}: {line[:120]}")


def _training_start(settings: Any, version: int | None) -> datetime | None:
    """Start of the scorer's training range (the champion, or ``version``), if there is one."""
    from arbstream.store.models import SCORER, RegistryConfig, RegistryError, champion, read_card

    cfg = RegistryConfig.of(settings)
    try:
        card = champion(cfg, SCORER) if version is None else read_card(cfg, SCORER, version)
    except (RegistryError, OSError, ValueError):
        return None
    return None if card is None else card.data.start


def _pair_series(settings: Any, market: Any, since: datetime | None,
                 until: datetime | None) -> list[tuple[str, str, str, Any]]:
    """``(name, y, x, series with t_ms)`` of each configured pair whose legs the recording
    quotes, from the lake's mids (``ml.pairs``); a pair it cannot compute is reported."""
    from arbstream.store.lake import LakeConfig
    from ml.pairs import PairDataError, align, compute, read_features

    quoted = {f"{e}:{s}" for e, s in market.markets}
    pairs = [p for p in settings.pairs if {p.y, p.x} <= quoted]
    if not pairs:
        return []
    features = read_features(LakeConfig.of(settings), since, until)
    out = []
    for p in pairs:
        try:
            stats = compute(align(features, p), p, settings.pairs_window,
                            settings.pairs_z_window, settings.pairs_test_lookback)
        except PairDataError as exc:
            err.print(f"pair bot {p.name}: not run: {exc}")
            continue
        series = stats.series.reset_index()
        series["t_ms"] = series["window_end"].astype("datetime64[ms, UTC]").astype("int64")
        out.append((p.name, p.y, p.x, series))
    return out


@app.command("show")
def show_command(
    run: Annotated[str | None, typer.Option(help="run id (default: the latest)")] = None,
) -> None:
    """Print a stored run's bot comparison (MongoDB `backtests`)."""
    from arbstream.store.config import MongoConfig
    from arbstream.store.mongo.backtests import backtest_run

    settings = settings_or_exit()
    docs = backtest_run(MongoConfig.of(settings), run)
    if not docs:
        raise fail(ValueError(f"no backtest run {run or ''} in MongoDB".replace("  ", " ")))
    rows = [{"bot": d["bot"], **d["metrics"]} for d in docs]
    console.print(comparison_table(rows, f"backtest {docs[0]['run_id']}"))
