"""``arbstream`` command line: local stack, replays, the streaming job, the demo, queries."""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.table import Table

from alerts.cli import app as alerts_app
from arbstream.config import Settings
from arbstream.console import console, err, fail, settings_or_exit
from arbstream.shell import stack
from grafana.cli import app as grafana_app
from producers.cli import app as producers_app
from producers.cli import parse_time_option as _time
from producers.cli import replay_app

app = typer.Typer(help="Real-time cross-exchange crypto arbitrage.", no_args_is_help=True)
opps_app = typer.Typer(help="Query detected opportunities and episodes (MongoDB).")
app.add_typer(replay_app, name="replay")
app.add_typer(opps_app, name="opportunities")
app.add_typer(grafana_app, name="grafana")
app.add_typer(alerts_app, name="alerts")

DEMO_FROM = "2023-03-10T00:00:00Z"
DEMO_TO = "2023-03-13T00:00:00Z"
#: Columns of ``opportunities list`` (an opportunity holds from ``valid_from`` to
#: ``valid_to``, over ``windows`` windows: one snapshot of its legs).
COLUMNS = [
    "valid_from", "valid_to", "windows", "symbol", "buy_exchange", "sell_exchange", "buy_ask",
    "sell_bid", "gross_bps", "net_bps",
]
EPISODE_COLUMNS = [
    "episode_id", "symbol", "sell_symbol", "cross_quote", "buy_exchange", "sell_exchange",
    "start", "end", "duration_s", "windows", "peak_net_bps", "mean_net_bps", "size_base",
    "size_source", "expected_profit", "profit_currency", "expected_profit_usd", "status",
]
EPISODE_TABLE = [
    "symbol", "buy → sell", "start (UTC)", "duration (s)", "windows", "peak bps", "mean bps",
    "size", "profit USD", "status",
]
#: The demo replays 1-minute bars (quotes 60 s apart): an episode must survive the gap to the
#: next bar, and rolling statistics need an hour of bars.
DEMO_OVERRIDES: dict[str, Any] = {
    "episode_gap_seconds": 120.0,
    "stats_horizon_seconds": 3600.0,
    # The replayed 2023 quotes are far older than any finite retention from now: InfluxDB
    # would drop them on write.
    "influx_raw_retention": "INF",
    "influx_features_retention": "INF",
}




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
def status() -> None:
    """Health-check every service (exit code 1 if any is unhealthy)."""
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


@app.command()
def stream() -> None:
    """Run the Spark streaming job locally (ARB_SPARK_MASTER, default local[2])."""
    from spark_jobs.arbitrage import main

    try:
        stack.ensure_java()
    except stack.StackError as exc:
        raise fail(exc) from None
    main()


# ``produce`` and ``record`` (producers/cli.py), registered here to keep their place.
app.registered_commands.extend(producers_app.registered_commands)


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def print_opportunities(rows: list[dict[str, Any]], fmt: Format) -> None:
    """Print opportunity documents as a table, CSV or JSON lines."""
    if fmt is Format.json:
        for row in rows:
            sys.stdout.write(json.dumps(row, default=_cell) + "\n")
    elif fmt is Format.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(v) if isinstance(v, datetime) else v
                             for v in (row.get(c) for c in COLUMNS)])
    else:
        table = Table(*COLUMNS)
        for row in rows:
            table.add_row(*[_cell(row.get(c)) for c in COLUMNS])
        console.print(table)


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pair_symbol(row: dict[str, Any]) -> str:
    """``BTC-USD``, or ``BTC-USDC/BTC-USD`` (buy leg / sell leg) for a cross-quote pair."""
    sell = row.get("sell_symbol") or row.get("symbol")
    return str(row.get("symbol")) if sell == row.get("symbol") else f"{row['symbol']}/{sell}"


def _size(value: Any) -> str:
    return "-" if value is None else f"{value:.6g}"


def episode_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    """Episode documents as a rich table (columns :data:`EPISODE_TABLE`)."""
    table = Table(*EPISODE_TABLE, title=title)
    for row in rows:
        start = row.get("start")
        table.add_row(
            _pair_symbol(row),
            f"{row.get('buy_exchange')} → {row.get('sell_exchange')}",
            start.strftime("%Y-%m-%d %H:%M:%S") if isinstance(start, datetime) else "-",
            _num(row.get("duration_s"), 0),
            str(row.get("windows", "-")),
            _num(row.get("peak_net_bps")),
            _num(row.get("mean_net_bps")),
            _size(row.get("size_base")),
            _num(row.get("expected_profit_usd")),
            str(row.get("status", "-")),
        )
    return table


def print_episodes(rows: list[dict[str, Any]], fmt: Format) -> None:
    """Print episode documents as a table, CSV (:data:`EPISODE_COLUMNS`) or JSON lines."""
    if fmt is Format.json:
        for row in rows:
            sys.stdout.write(json.dumps(row, default=_cell) + "\n")
    elif fmt is Format.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(EPISODE_COLUMNS)
        for row in rows:
            writer.writerow([
                _cell(v) if isinstance(v := row.get(c), datetime) else v
                for c in EPISODE_COLUMNS
            ])
    else:
        console.print(episode_table(rows))


class Status(StrEnum):
    open = "open"
    closed = "closed"


class EpisodeSort(StrEnum):
    peak_net_bps = "peak_net_bps"
    duration_s = "duration_s"
    expected_profit_usd = "expected_profit_usd"
    start = "start"


@opps_app.command("list")
def opportunities_list(
    symbol: Annotated[str | None, typer.Option(
        help="canonical BASE-QUOTE (with --episodes: of the buy leg)")] = None,
    since: Annotated[str | None, typer.Option(
        help="window_end (episodes: start) >= since, ISO-8601")] = None,
    until: Annotated[str | None, typer.Option(
        help="window_end (episodes: start) < until, ISO-8601")] = None,
    min_net_bps: Annotated[float | None, typer.Option(
        help="net spread floor, bps (episodes: on the peak)")] = None,
    limit: Annotated[int | None, typer.Option(min=0, help="at most this many rows")] = 100,
    fmt: Annotated[Format, typer.Option("--format")] = Format.table,
    episodes: Annotated[bool, typer.Option(
        "--episodes", help="list episodes (runs of consecutive opportunities) instead")] = False,
    status: Annotated[Status | None, typer.Option(help="episodes: open or closed")] = None,
    cross_quote: Annotated[bool | None, typer.Option(
        "--cross-quote/--same-quote",
        help="episodes: only cross-quote (e.g. BTC-USDC/BTC-USD) or same-quote pairs")] = None,
    sort: Annotated[EpisodeSort, typer.Option(
        help="episodes: largest first, or earliest start first")] = EpisodeSort.peak_net_bps,
) -> None:
    """List opportunities ordered by window_end, then net bps; or, with --episodes, episodes
    ordered by --sort."""
    from pymongo.errors import PyMongoError

    from arbstream.store.config import MongoConfig
    from arbstream.store.mongo.episodes import find_episodes
    from arbstream.store.mongo.opportunities import find_opportunities

    if not episodes:
        given = [name for name, value in (("--status", status), ("--cross-quote", cross_quote))
                 if value is not None]
        if sort is not EpisodeSort.peak_net_bps:
            given.append("--sort")
        if given:
            raise typer.BadParameter(f"{', '.join(given)} need(s) --episodes")
    mongo = MongoConfig.of(settings_or_exit())
    try:
        if episodes:
            found = find_episodes(
                mongo, symbol=symbol, since=_time(since), until=_time(until),
                status=status.value if status else None, cross_quote=cross_quote,
                sort=sort.value, limit=limit, min_peak_bps=min_net_bps,
            )
            print_episodes(found, fmt)
            return
        rows = find_opportunities(
            mongo, symbol=symbol, since=_time(since), until=_time(until),
            min_net_bps=min_net_bps, limit=limit,
        )
    except PyMongoError as exc:
        raise fail(exc) from None
    print_opportunities(rows, fmt)


DEMO_HELP = (
    "Everything on the real data: up, topics, stream, replay the USDC depeg, summary "
    "(opportunities, episodes, cross-quote pairs and the lowest USDC-USD mid).\n\n"
    "The IAQF data are 1-minute bars (quotes 60 s apart), so the demo's stream runs with "
    "episode_gap_seconds=120 (an episode survives the gap to the next bar) and "
    "stats_horizon_seconds=3600 (rolling statistics over an hour of bars), whatever "
    "ARB_EPISODE_GAP_SECONDS and ARB_STATS_HORIZON_SECONDS say.\n\n"
    "It also sets the InfluxDB retention of raw quotes/trades and of features to INF: 2023 "
    "points are older than any finite retention and InfluxDB would drop them. The policies of "
    "ARB_INFLUX_DB stay INF until the next `arbstream stream` applies the configured ones."
)


@app.command(help=DEMO_HELP)
def demo(
    start: Annotated[str, typer.Option("--from")] = DEMO_FROM,
    end: Annotated[str, typer.Option("--to")] = DEMO_TO,
) -> None:
    """Run the demo; see :data:`DEMO_HELP` and :data:`DEMO_OVERRIDES`."""
    from arbstream.shell.latency import detection_latency
    from arbstream.topics import OPPORTUNITIES, ensure_topics
    from producers.replay.iaqf import replay_iaqf
    from spark_jobs import arbitrage
    from spark_jobs.kafka_source import end_offsets
    from spark_jobs.session import build_session

    t0 = time.monotonic()
    base = settings_or_exit()
    # A fresh checkpoint reading from the topics' current end: the demo processes exactly what
    # it replays, and the idempotent sinks make a re-run overwrite instead of duplicate.
    settings = base.model_copy(update={"starting_offsets": "latest", **DEMO_OVERRIDES})
    checkpoint = settings.checkpoint_dir / "demo"
    shutil.rmtree(checkpoint, ignore_errors=True)
    try:
        err.print("starting local services ...")
        stack.up(settings)
        ensure_topics(settings)
        err.print("starting Spark ...")
        stack.ensure_java()
        spark = build_session(settings, app_name="arbstream-demo")
        queries = arbitrage.start(spark, settings, checkpoint)
        arbitrage.wait_started(queries)  # initial offsets are pinned
        initial = {q.name: arbitrage.processed_offsets(q) for q in queries}
        events_from = end_offsets(settings.kafka_client_config(), [OPPORTUNITIES])
        err.print(f"replaying IAQF bars {start} -> {end} at max speed ...")
        replay_started = time.monotonic()
        report = replay_iaqf(settings, _time(start), _time(end), None)
        err.print(report.summary())
        err.print("waiting for the stream to drain the topics ...")
        targets = arbitrage.wait_drained(queries, settings)
        # wait_drained also waits out the idle timer that closes the last windows
        drained = time.monotonic() - replay_started - settings.idle_timeout_seconds
        market = next(q for q in queries if q.name == "market")
        batches = sorted(p["durationMs"].get("triggerExecution", 0) / 1000.0
                         for p in market.recentProgress if p["numInputRows"] > 0)
        for q in queries:
            q.stop()
        err.print("measuring detection latency from Kafka ...")
        market_topics = arbitrage.query_topics(settings)["market"]
        latency = detection_latency(
            settings.kafka_client_config(),
            _ranges(initial["market"], {t: targets[t] for t in market_topics if t in targets}),
            _ranges(events_from, end_offsets(settings.kafka_client_config(), [OPPORTUNITIES])))
    except (stack.StackError, RuntimeError, ValueError, TimeoutError) as exc:
        raise fail(exc) from None
    quote_topics = set(market_topics)
    consumed = sum(
        off - initial["market"].get(t, {}).get(p, 0)
        for t, parts in targets.items() if t in quote_topics for p, off in parts.items()
    )
    from pymongo.errors import PyMongoError

    from arbstream.store.influx.client import InfluxError

    try:
        _demo_summary(settings, _time(start), _time(end), report.quotes, consumed,
                      time.monotonic() - t0)
        rate = report.quotes / drained if drained > 0 else float("nan")
        p50 = batches[len(batches) // 2] if batches else float("nan")
        console.print(
            f"measured: {report.quotes:,} quotes from replay start to drained in {drained:.1f} s "
            f"({rate:,.0f} quotes/s); market micro-batches with data: {len(batches)}, p50 "
            f"{p50:.2f} s, max {max(batches, default=float('nan')):.2f} s. Detection latency, "
            f"quote published to its opportunity's first (early) event in Kafka: "
            f"{latency.summary()}. A replay at full speed is a backlog: live at 10,000 "
            "quotes/s it is under a second (bench/README.md).")
    except (PyMongoError, InfluxError) as exc:
        raise fail(exc) from None


def _ranges(start: dict[str, dict[str, int]], end: dict[str, dict[str, int]]
            ) -> dict[str, dict[str, tuple[int, int]]]:
    """Offset ranges ``[start, end)`` per topic and partition (``start`` 0 when missing)."""
    return {t: {p: (start.get(t, {}).get(p, 0), off) for p, off in parts.items()}
            for t, parts in end.items()}


def _demo_summary(
    settings: Settings, start: datetime | None, end: datetime | None, quotes: int,
    consumed: int, wall: float,
) -> None:
    """Print what the demo found: opportunities per pair, the top opportunities and episodes,
    and the USDC depeg / cross-quote section, for ``[start, end + max quote age]``.

    Raises:
        pymongo.errors.PyMongoError, arbstream.store.influx.client.InfluxError: store errors.
    """
    from datetime import timedelta

    from arbstream.store.config import InfluxConfig, MongoConfig
    from arbstream.store.influx.queries import min_mid
    from arbstream.store.influx.schema import ref
    from arbstream.store.mongo.episodes import count_cross_quote, find_episodes
    from arbstream.store.mongo.opportunities import summary
    from arbstream.store.mongo.schema import EPISODES, FEATURES, OPPORTUNITIES, THRESHOLDS

    mongo = MongoConfig.of(settings)
    # Windows of the last quotes end up to max_quote_age after `end`.
    until = end + timedelta(seconds=settings.max_quote_age_seconds + 1) if end else None
    result = summary(mongo, top_n=10, since=start, until=until)
    table = Table("symbol", "buy on", "sell on", "opportunities", "max net bps", "avg net bps",
                  title="Opportunities per symbol and pair")
    for p in result["pairs"]:
        table.add_row(_pair_symbol(p), p["buy_exchange"], p["sell_exchange"], str(p["count"]),
                      f"{p['max_net_bps']:.2f}", f"{p['avg_net_bps']:.2f}")
    console.print(table)
    console.print("Top 10 by net bps")
    print_opportunities(result["top"], Format.table)
    console.print(episode_table(
        find_episodes(mongo, since=start, until=until, sort="peak_net_bps", limit=10),
        title="Top 10 episodes by peak net bps",
    ))

    cross = count_cross_quote(mongo, since=start, until=until)
    console.print(
        f"\nUSDC depeg / cross-quote: {cross['opportunities']} cross-quote opportunities, "
        f"{cross['episodes']} cross-quote episodes"
    )
    best = find_episodes(mongo, since=start, until=until, cross_quote=True,
                         sort="peak_net_bps", limit=5)
    if best:
        console.print(episode_table(best, title="Best cross-quote episodes"))
    low = min_mid(InfluxConfig.of(settings), "USDC-USD", since=start, until=until)
    if low is None:
        console.print("minimum USDC-USD mid: no USDC-USD quotes in InfluxDB")
    else:
        console.print(
            f"minimum USDC-USD mid: {low['mid']:.4f} on {low['exchange']} at "
            f"{_cell(low['time'])}"
        )
    console.print(
        f"quotes replayed: {quotes}   Kafka records consumed (quotes + heartbeats): {consumed}"
        f"   opportunities: {result['total']}   wall time: {wall:.1f} s\n"
        f"MongoDB: {settings.mongo_db}.{{{OPPORTUNITIES}, {EPISODES}, {FEATURES}, "
        f"{THRESHOLDS}}}   InfluxDB ({settings.influx_url}, db {settings.influx_db}): "
        f"{ref('quote')}, {ref('trade')}, spread, episode, spread_percentiles, "
        f"{ref('features')}, health\n"
        "More: arbstream opportunities list --min-net-bps 10   "
        "arbstream opportunities list --episodes --cross-quote"
    )


if __name__ == "__main__":
    app()
