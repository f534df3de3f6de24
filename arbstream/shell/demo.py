"""``arbstream demo``: the whole pipeline on the recorded USDC depeg, on the local stack, with
a summary of what it found and how fast (detection latency read back from Kafka)."""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from arbstream.config import Settings
from arbstream.console import console, err, fail, settings_or_exit
from arbstream.console import time_option as _time
from arbstream.shell import stack
from spark_jobs.cli import Format, _cell, _pair_symbol, episode_table, print_opportunities

DEMO_FROM = "2023-03-10T00:00:00Z"
DEMO_TO = "2023-03-13T00:00:00Z"
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
        with DrainProgress(settings.idle_timeout_seconds) as shown:
            targets = arbitrage.wait_drained(queries, settings, progress=shown.update)
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


class DrainProgress:
    """Shows the drain's progress on stderr: a live line on a terminal, else a line every
    ``every_s`` seconds (and at each change of phase): records left, read rate, and, once
    caught up, the idle timer that closes the last windows."""

    def __init__(self, idle_timeout_s: float, every_s: float = 15.0) -> None:
        self.idle_timeout_s, self.every_s = idle_timeout_s, every_s
        self.start = time.monotonic()
        self.first: int | None = None
        self.last_print = float("-inf")
        self.caught_up_at: float | None = None
        self.status: Any = None

    def __enter__(self) -> DrainProgress:
        if err.is_terminal:
            self.status = err.status("draining ...")
            self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)

    def text(self, left: int, caught_up: bool, now: float) -> str:
        """The progress line for ``left`` records still to read at ``now`` (monotonic s)."""
        if self.first is None:
            self.first = left
        elapsed = now - self.start
        if caught_up:
            if self.caught_up_at is None:
                self.caught_up_at = now
            waited = now - self.caught_up_at
            return (f"all {self.first:,} records read in {self.caught_up_at - self.start:.0f} "
                    f"s; closing the last windows (idle timer {self.idle_timeout_s:.0f} s, "
                    f"{waited:.0f} s so far)")
        done = self.first - left
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", about {left / rate:.0f} s left" if rate > 0 else ""
        return (f"{done:,} of {self.first:,} records read ({rate:,.0f}/s), {left:,} to "
                f"go{eta}")

    def update(self, left: int, caught_up: bool) -> None:
        """:func:`spark_jobs.arbitrage.wait_drained`'s progress callback."""
        now = time.monotonic()
        phase_change = caught_up and self.caught_up_at is None
        line = self.text(left, caught_up, now)
        if self.status is not None:
            self.status.update(line)
        elif phase_change or now - self.last_print >= self.every_s:
            err.print(line, soft_wrap=True)  # one line each in a log
            self.last_print = now


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
