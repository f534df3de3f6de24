"""``arbstream grafana``: publish the provisioned dashboards to a Grafana server, and run
every panel query against InfluxDB as Grafana would."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

import grafana
from arbstream.console import console, err, fail, settings_or_exit
from arbstream.console import time_option as _time
from arbstream.timestamps import to_ms

app = typer.Typer(help="Grafana dashboards (grafana/provisioning/).", no_args_is_help=True)


@app.command("publish")
def grafana_publish(
    datasource: Annotated[bool, typer.Option(
        "--datasource/--no-datasource",
        help="also create or update the InfluxDB datasource (uid arbstream-influxdb)")] = False,
    directory: Annotated[Path | None, typer.Option(
        "--dir", help="dashboard JSON folder (default grafana/provisioning/dashboards/arbstream)",
    )] = None,
) -> None:
    """Push the dashboards to the Grafana at ARB_GRAFANA_URL, into ARB_GRAFANA_FOLDER,
    overwriting same-uid dashboards (token ARB_GRAFANA_TOKEN, or ARB_GRAFANA_USERNAME and
    ARB_GRAFANA_PASSWORD)."""
    settings = settings_or_exit()
    try:
        boards = grafana.load_dashboards(directory or grafana.DASHBOARD_DIR)
        if not boards:
            raise grafana.GrafanaError(f"no dashboard JSON in {directory}")
        report = grafana.publish(settings, boards, datasource=datasource)
    except grafana.GrafanaError as exc:
        raise fail(exc) from None
    if report.datasource:
        console.print(f"datasource {grafana.DATASOURCE_UID}: {report.datasource}")
    base = settings.grafana_url.rstrip("/")
    for uid, url in report.dashboards.items():
        version = report.versions.get(uid)
        console.print(f"{uid}: {base}{url}" + (f" (version {version})" if version else ""))
    console.print(f"{len(report.dashboards)} dashboard(s) in folder "
                  f"{settings.grafana_folder!r} (uid {report.folder_uid})")


@app.command("check")
def grafana_check(
    start: Annotated[str, typer.Option("--from", help="range start, ISO UTC (e.g. 2023-03-11)")],
    end: Annotated[str, typer.Option("--to", help="range end, ISO UTC; also 'now' of the "
                                                  "last-5-min panels")],
    var: Annotated[list[str] | None, typer.Option(
        "--var", help="NAME=VALUE[,VALUE...] (repeatable); others as saved, or the first value",
    )] = None,
    dashboard: Annotated[list[str] | None, typer.Option(
        "--dashboard", help="dashboard uid to check (repeatable; default all)")] = None,
    directory: Annotated[Path | None, typer.Option(
        "--dir", help="dashboard JSON folder (default grafana/provisioning/dashboards/arbstream)",
    )] = None,
) -> None:
    """Run every panel query of the dashboards against ARB_INFLUX_URL for a time range, as
    Grafana would (variables expanded), and list the rows each panel returns. Exit 1 when a
    query fails, 3 when a panel is empty."""
    from arbstream.store.config import InfluxConfig
    from arbstream.store.influx.client import InfluxError
    from arbstream.store.influx.queries import query

    influx = InfluxConfig.of(settings_or_exit())
    lo, hi = _time(start), _time(end)
    if lo is None or hi is None or lo >= hi:
        raise typer.BadParameter(f"--from {start} must be before --to {end}")
    rng = grafana.TimeRange(to_ms(lo), to_ms(hi))
    chosen: dict[str, str | list[str]] = {}
    for item in var or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"--var {item!r}: expected NAME=VALUE")
        chosen[name] = value.split(",") if "," in value else value
    table = Table("dashboard", "panel", "rows", "error")
    errors = empty = 0
    try:
        boards = grafana.load_dashboards(directory or grafana.DASHBOARD_DIR)
        unknown = set(dashboard or []) - set(boards)
        if unknown:
            raise grafana.GrafanaError(f"no dashboard with uid {sorted(unknown)}; "
                                       f"there are {sorted(boards)}")
        for uid, board in boards.items():
            if dashboard and uid not in dashboard:
                continue
            values = {**grafana.current_values(board, lambda q: [
                str(r["value"]) for r in query(influx, q)]), **chosen}
            for r in grafana.check(board, values, rng, rng.to_ms,
                                   lambda q: len(query(influx, q, retries=0))):
                errors += r.error is not None
                empty += r.error is None and r.rows == 0
                style = "red" if r.error else ("yellow" if r.rows == 0 else "")
                table.add_row(uid, r.panel_title, f"[{style}]{r.rows}[/{style}]" if style
                              else str(r.rows), escape(r.error or ""))
    except (grafana.GrafanaError, InfluxError) as exc:
        raise fail(exc) from None
    console.print(table)
    if errors or empty:
        err.print(f"{errors} panel(s) failed, {empty} returned no rows")
        raise typer.Exit(1 if errors else 3)

