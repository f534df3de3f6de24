"""The stream job's command line: ``stream`` runs the Spark job, ``opportunities list`` queries
what it wrote to MongoDB (through :mod:`arbstream.store`). Mounted by the ``arbstream`` shell."""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.table import Table

from arbstream.console import console, fail, settings_or_exit
from arbstream.console import time_option as _time
from arbstream.records import OPPORTUNITY_FIELDS

app = typer.Typer(help="The Spark streaming job and its results.", no_args_is_help=True)
opportunities_app = typer.Typer(help="Query detected opportunities and episodes (MongoDB).",
                                no_args_is_help=True)
app.add_typer(opportunities_app, name="opportunities")

#: Columns of the ``opportunities list`` table (an opportunity holds from ``valid_from`` to
#: ``valid_to``, over ``windows`` windows: one snapshot of its legs); the table shows the pair
#: as ``symbol`` or ``buy symbol/sell symbol`` (cross-quote). CSV and JSON carry every field.
COLUMNS = [
    "valid_from", "valid_to", "windows", "pair", "buy_exchange", "sell_exchange", "buy_ask",
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

@app.command()
def stream() -> None:
    """Run the Spark streaming job (ARB_SPARK_MASTER, default local[2]); needs Java 17.

    The broker, InfluxDB and MongoDB are checked first (topics, database, indexes), so a
    service that is down is one error line naming it, not a Spark traceback. A query that
    fails later is restarted from its checkpoint (ARB_STREAM_MAX_RESTARTS...); a failure for
    good (data loss, a refused checkpoint, too many restarts) is one error line and exit 1.
    SIGTERM or Ctrl-C stops the queries cleanly (exit 0)."""
    from pymongo.errors import PyMongoError

    from arbstream.store.influx.client import InfluxError
    from arbstream.topics import ensure_topics
    from spark_jobs.arbitrage import main, prepare_sinks
    from spark_jobs.checkpoint import IncompatibleCheckpointError
    from spark_jobs.supervisor import QueryFailedError

    settings = settings_or_exit()
    for what, check in (("Kafka", lambda: ensure_topics(settings, timeout=10.0)),
                        ("InfluxDB/MongoDB", lambda: prepare_sinks(settings))):
        try:
            check()
        except (RuntimeError, InfluxError, PyMongoError) as exc:
            raise fail(RuntimeError(f"{what} is not available: {exc}; start the services "
                                    "(`arbstream up` locally) or fix ARB_* settings")) from None
    try:
        main()
    except (QueryFailedError, IncompatibleCheckpointError) as exc:
        raise fail(exc) from None


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
        columns = csv_columns(rows)
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])
    else:
        table = Table(*COLUMNS)
        for row in rows:
            table.add_row(*[_pair_symbol(row) if c == "pair" else _cell(row.get(c))
                            for c in COLUMNS])
        console.print(table)


def csv_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The CSV header: every field of :data:`arbstream.records.OPPORTUNITY_FIELDS` in order
    (empty where a document lacks it), then any other key the documents hold
    (``first_seen_at``...), in order of first appearance: the CSV carries every column the
    JSON lines have."""
    order = dict.fromkeys(OPPORTUNITY_FIELDS)
    for row in rows:
        for key in row:
            order.setdefault(key)
    return list(order)


def _csv_cell(value: Any) -> Any:
    """A CSV cell: ISO-8601 UTC for datetimes, JSON for lists and mappings, else as is."""
    if isinstance(value, datetime):
        return _cell(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=_cell)
    return value


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


@opportunities_app.command("list")
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


@opportunities_app.command("tail", help="Follow arb.opportunities: print each opportunity "
                           "and episode event the stream publishes (Ctrl-C to stop).")
def opportunities_tail(
    from_beginning: Annotated[bool, typer.Option(
        help="start at the oldest retained event instead of the next one")] = False,
    max_events: Annotated[int | None, typer.Option(
        "--max", min=1, help="stop after this many events")] = None,
    idle: Annotated[float | None, typer.Option(
        min=0.1, help="stop after this many seconds without an event")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    topic: Annotated[str, typer.Option(help="the topic to follow")] = "arb.opportunities",
) -> None:
    """Consume ``arb.opportunities`` (or ``topic``) without committing offsets (other
    readers are not affected) and print each valid event; an invalid record is reported on
    stderr with its reason, never dropped silently."""
    import time

    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException

    from arbstream.console import err
    from arbstream.schemas import EpisodeEvent, parse_arb_event
    settings = settings_or_exit()
    consumer = Consumer({
        **settings.kafka_client_config(),  # bootstrap, security, SASL
        "group.id": "arbstream-tail",  # required by librdkafka; partitions are assigned, not
        # subscribed, and nothing is committed
        "enable.auto.commit": False,  # a tail reads, it does not move anyone's offsets
        "log_level": 0,  # an unreachable broker is reported once, below
    })
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    seen, last = 0, time.monotonic()
    try:
        meta = consumer.list_topics(topic, timeout=15)
        parts = meta.topics[topic].partitions
        if not parts:
            raise fail(RuntimeError(f"topic {topic} does not exist (yet)"))
        from confluent_kafka import TopicPartition

        consumer.assign([TopicPartition(topic, p, start) for p in parts])
        while max_events is None or seen < max_events:
            msg = consumer.poll(0.5)
            if msg is None:
                if idle is not None and time.monotonic() - last > idle:
                    break
                continue
            if msg.error():
                err.print(f"[red]error:[/red] {msg.error()}")
                continue
            last = time.monotonic()
            try:
                event = parse_arb_event(msg.value() or b"")
            except ValueError as exc:
                err.print(f"invalid record at {msg.topic()}[{msg.partition()}]@"
                          f"{msg.offset()}: {exc}")
                continue
            seen += 1
            if as_json:
                sys.stdout.write(event.model_dump_json() + "\n")
                sys.stdout.flush()
            elif isinstance(event, EpisodeEvent):
                console.print(f"episode {event.event:6} {_pair_symbol(event.model_dump())} "
                              f"{event.buy_exchange} → {event.sell_exchange} peak "
                              f"{event.peak_net_bps:.2f} bps, {event.duration_s:.0f} s")
            else:
                console.print(f"opportunity {getattr(event, 'stage', None) or '':9} "
                              f"{_pair_symbol(event.model_dump())} {event.buy_exchange} → "
                              f"{event.sell_exchange} net {event.net_bps:.2f} bps")
    except KafkaException as exc:
        raise fail(RuntimeError(f"Kafka at {settings.kafka_bootstrap}: {exc}")) from None
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
