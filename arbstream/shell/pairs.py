"""``arbstream pairs``: pair-trading statistics of the configured pairs (``ARB_PAIRS``):
``run`` computes them from the lake (:func:`ml.pairs.run`), ``show`` prints the latest ones
(MongoDB ``pair_stats``). See ``docs/pairs.md``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from pymongo.errors import PyMongoError
from rich.table import Table

from arbstream.console import console, fail, settings_or_exit, time_option
from arbstream.store.config import MongoConfig
from arbstream.store.influx.client import InfluxError
from arbstream.store.mongo.pair_stats import pair_stats

app = typer.Typer(help="Pair-trading statistics (ARB_PAIRS): hedge ratio, spread z-score, "
                  "cointegration.", no_args_is_help=True)


def _num(value: Any, fmt: str = ".4g") -> str:
    return "-" if value is None else format(value, fmt)


@app.command(help="Compute every configured pair from the lake's features of [since, until) "
             "and write InfluxDB and MongoDB pair_stats; publish the pair_signal events the "
             "alert worker's pair rules read. Exit code 1 when a pair could not be computed.")
def run(
    since: Annotated[str | None, typer.Option(help="ISO-8601 start (UTC when naive)")] = None,
    until: Annotated[str | None, typer.Option(help="ISO-8601 end, exclusive")] = None,
    publish: Annotated[bool, typer.Option(help="publish pair_signal events on "
                                          "ARB_PAIRS_TOPIC")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """:func:`ml.pairs.run` with a summary."""
    from ml.pairs import run as run_pairs

    settings = settings_or_exit()
    try:
        result = run_pairs(settings, time_option(since), time_option(until),
                           publish_signals=publish)
    except (InfluxError, PyMongoError, RuntimeError, OSError) as exc:
        raise fail(exc) from None
    summary = result.summary()
    if as_json:
        console.print_json(json.dumps(summary))
    else:
        console.print(f"{len(result.stats)} pair(s) computed, {result.points} InfluxDB points "
                      f"({result.rejected} refused), {result.documents} MongoDB documents, "
                      f"{result.signals} signal(s) published")
        for name, why in result.errors.items():
            console.print(f"[red]{name}[/red]: {why}")
    if result.errors:
        raise typer.Exit(1)


@app.command(help="The latest statistics of each pair (MongoDB pair_stats).")
def show(
    pair: Annotated[list[str] | None, typer.Option(help="pair name, repeatable")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the documents as JSON")] = False,
) -> None:
    """A table (or JSON) of :func:`arbstream.store.mongo.pair_stats.pair_stats`."""
    settings = settings_or_exit()
    try:
        docs = pair_stats(MongoConfig.of(settings), pair or None)
    except PyMongoError as exc:
        raise fail(exc) from None
    if as_json:
        console.print_json(json.dumps(docs, default=str))
        return
    if not docs:
        console.print("no pair statistics yet: run `arbstream pairs run`")
        return
    table = Table("pair", "y", "x", "window end (UTC)", "β", "z", "corr", "β OLS",
                  "ADF p", "coint p", "half-life s", "status")
    for d in docs:
        end = d.get("window_end")
        table.add_row(
            d["pair"], d.get("y", "-"), d.get("x", "-"),
            end.strftime("%Y-%m-%d %H:%M:%S") if end else "-", _num(d.get("beta"), ".5f"),
            _num(d.get("z"), ".2f"), _num(d.get("correlation"), ".3f"),
            _num(d.get("beta_ols"), ".5f"), _num(d.get("adf_pvalue"), ".3g"),
            _num(d.get("coint_pvalue"), ".3g"), _num(d.get("half_life_s"), ".3g"),
            d.get("status", "-") if d.get("status") == "ok" else f"[red]{d.get('error')}[/red]",
        )
    console.print(table)
