"""``arbstream``: the command line. It mounts each component's Typer sub-app (producers,
the stream job, alerts, Grafana) and adds what runs on a developer's machine: the local stack
(``up``, ``down``, ``status``, ``topics``) and ``demo``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from alerts.cli import app as alerts_app
from arbstream.console import console, fail, settings_or_exit
from arbstream.shell import stack
from arbstream.shell.backfill import backfill
from arbstream.shell.backtest import app as backtest_app
from arbstream.shell.data import app as data_app
from arbstream.shell.demo import DEMO_HELP, demo
from arbstream.shell.lake import app as lake_app
from arbstream.shell.pairs import app as pairs_app
from arbstream.shell.privacy import app as privacy_app
from grafana.cli import app as grafana_app
from ml.cli import app as ml_app
from producers.cli import app as producers_app
from producers.cli import replay_app
from spark_jobs.cli import app as stream_app

app = typer.Typer(help="Real-time cross-exchange crypto arbitrage.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"arbstream {version('arbstream')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the installed arbstream version and exit.")] = False,
) -> None:
    """Real-time cross-exchange crypto arbitrage."""


def _status_table(rows: list[stack.ServiceStatus]) -> Table:
    table = Table("service", "endpoint", "healthy", "pid", "detail")
    for s in rows:
        mark = "[green]yes[/green]" if s.healthy else "[red]no[/red]"
        table.add_row(s.name, s.endpoint, mark, str(s.pid or "-"), s.detail)
    return table


@app.command()
def up() -> None:
    """Start local Kafka (tansu), InfluxDB and MongoDB-protocol servers; create topics."""
    from arbstream.topics import ensure_topics

    settings = settings_or_exit()
    try:
        rows = stack.up(settings)
        stack.ensure_java()  # for `arbstream stream` and `demo` on this machine
        created = ensure_topics(settings)
    except (stack.StackError, RuntimeError) as exc:
        raise fail(exc) from None
    console.print(_status_table(rows))
    if created:
        console.print(f"created {len(created)} topics")


@app.command()
def down() -> None:
    """Stop the local services started from this state directory."""
    stopped = stack.down(settings_or_exit())
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def status(
    live: Annotated[bool, typer.Option(
        "--live", help="Also show the stream job's queries, the exchanges' health and the "
        "last opportunity, refreshed every --interval seconds until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(
        min=0.2, help="Seconds between two refreshes of --live.")] = 2.0,
    once: Annotated[bool, typer.Option(
        "--once", help="Print one frame of the --live view and exit (implies --live).")] = False,
) -> None:
    """Health-check every service (exit code 1 if any is unhealthy); --live watches the
    running job (docs/operations.md)."""
    if live or once:
        from arbstream.shell import status_live

        if not status_live.run(settings_or_exit(), console, interval, once):
            raise typer.Exit(1)
        return
    rows = stack.status(settings_or_exit())
    console.print(_status_table(rows))
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)


@app.command()
def topics() -> None:
    """Create any missing topic with its configured partition count; list them as they are."""
    from arbstream.topics import ensure_topics, partition_counts, topic_layout

    settings = settings_or_exit()
    try:
        created = ensure_topics(settings)
        actual = partition_counts(settings)
    except RuntimeError as exc:
        raise fail(exc) from None
    for name, wanted in topic_layout(settings).items():
        note = "  (created)" if name in created else ""
        if actual.get(name, wanted) != wanted:
            note += f"  (configured {wanted})"
        console.print(f"{name:32} {actual.get(name, '?')} partition(s){note}")


# The components' commands, in the order of `arbstream --help`.
app.registered_commands.extend(stream_app.registered_commands)
app.registered_commands.extend(producers_app.registered_commands)
app.add_typer(replay_app, name="replay")
app.registered_groups.extend(stream_app.registered_groups)
app.command(help=DEMO_HELP)(demo)
app.command()(backfill)
app.add_typer(lake_app, name="lake")
app.add_typer(backtest_app, name="backtest")
app.add_typer(data_app, name="data")
app.add_typer(grafana_app, name="grafana")
app.add_typer(alerts_app, name="alerts")
app.add_typer(ml_app, name="ml")
app.add_typer(pairs_app, name="pairs")
app.add_typer(privacy_app, name="privacy")


if __name__ == "__main__":
    app()
