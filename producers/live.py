"""Live websocket producers: cryptofeed feeds → normalized records → Kafka.

``arbstream produce`` runs :func:`produce`: one cryptofeed feed per exchange (adapters in
:mod:`producers.exchanges`, built by :func:`producers.exchanges.feed.make_feed`), each
connection under arbstream's reconnect/watchdog/dead-letter policy
(:mod:`producers.resilience`), all records through one :class:`~producers.publisher.
Publisher`. SIGTERM or SIGINT stops the feeds, then what is held is delivered within
``ARB_PRODUCER_CLOSE_TIMEOUT_SECONDS``; a fatal Kafka error stops everything (exit codes:
:mod:`producers.errors`).

``arbstream record`` runs :func:`record`: the same feeds with cryptofeed's raw-data recorder
(``AsyncFileCallback``), which writes frames in the line format of
``shared/data/exchange-ws-captures`` (and the REST metadata responses), for replay sets.

Both accept the whole ``Settings`` and narrow it at once to
:class:`~producers.config.ProducerConfig`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arbstream.config import Settings
from arbstream.topics import ensure_topics
from producers.config import ProducerConfig
from producers.errors import ProducerError, UndeliveredError
from producers.exchanges.feed import make_feed
from producers.publisher import ExchangeStats, Publisher
from producers.resilience import FeedHooks, start_resilient
from producers.spool import Spool

log = logging.getLogger(__name__)


def _ssl_context(cfg: ProducerConfig) -> ssl.SSLContext | None:
    if cfg.ca_file is None:
        return None
    return ssl.create_default_context(cafile=str(cfg.ca_file))


def _hooks(publisher: Publisher, exchange: str) -> FeedHooks:
    def reconnect() -> None:
        publisher.reconnected(exchange)
        publisher.reset_sequences(exchange)  # sequences restart or jump on a new connection

    return FeedHooks(
        frame=lambda: publisher.frame_received(exchange),
        reconnect=reconnect,
        bad_frame=lambda raw, reason: publisher.deadletter(exchange, raw, reason),
    )


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def _build_feeds(cfg: ProducerConfig, feeds: Mapping[str, list[str]], on_event: Any) -> dict:
    unknown = sorted(set(feeds) - set(cfg.exchanges))
    if unknown:
        raise ValueError(f"exchanges {unknown} are not in ARB_EXCHANGES, so they have no topics")
    ctx = _ssl_context(cfg)
    return {
        exchange: make_feed(
            exchange, symbols, set(cfg.channels), on_event,
            book_depth=cfg.book_depth,
            ws_url=cfg.ws_urls.get(exchange),
            rest_url=cfg.rest_urls.get(exchange),
            ssl_context=ctx,
            timeout=cfg.stale_seconds,
            feed_options=cfg.feed_options.get(exchange),
        )
        for exchange, symbols in feeds.items()
    }


async def produce(
    settings: Settings,
    feeds: Mapping[str, list[str]],
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    publisher: Publisher | None = None,
) -> dict[str, ExchangeStats]:
    """Stream ``feeds`` (exchange id → canonical symbols) into Kafka until ``stop`` is set.

    Returns the final per-exchange counters. Pass ``publisher`` to watch them while running.
    ``settings`` creates the topics and is then narrowed to :class:`ProducerConfig`.

    Stops on ``stop`` (or SIGTERM/SIGINT with ``handle_signals``) or when the publisher fails;
    then the feeds stop and what is held is delivered within ``ARB_PRODUCER_CLOSE_TIMEOUT_
    SECONDS``.

    Raises:
        ValueError: an exchange is unknown to cryptofeed or not in ``ARB_EXCHANGES``.
        RuntimeError: Kafka is unreachable at start-up (topics cannot be created).
        UndeliveredError: records were still undelivered at the shutdown deadline (its
            ``undelivered`` counts them; exit code 3).
        ProducerFatalError: librdkafka reported a fatal error (exit code 4).
        ProducerError: another unrecoverable client error (exit code 5).
        SpoolError: the spool directory is in use by another process.
    """
    stop = stop or asyncio.Event()
    ensure_topics(settings)
    cfg = ProducerConfig.of(settings)
    publisher = publisher or make_publisher(cfg)
    built = await asyncio.to_thread(_build_feeds, cfg, feeds, publisher.submit)
    loop = asyncio.get_running_loop()
    for exchange, feed in built.items():
        start_resilient(feed, loop, _hooks(publisher, exchange), cfg.stale_seconds)
        log.info("%s: streaming %s %s", exchange, ", ".join(feeds[exchange]),
                 "+".join(cfg.channels))
    if handle_signals:
        _stop_on_signals(stop)
    runner = asyncio.create_task(publisher.run())
    stopped = asyncio.create_task(stop.wait())
    failure: ProducerError | None = None
    try:
        await asyncio.wait({runner, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        for feed in built.values():
            feed.stop()
        for feed in built.values():
            with contextlib.suppress(Exception):
                await feed.shutdown()
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            pass
        except ProducerError as exc:
            failure = exc
        undelivered = await publisher.close()
    if failure is not None:  # fatal or client error: exit 4 or 5, the supervisor restarts
        failure.undelivered, failure.spooled = undelivered, publisher.spool is not None
        raise failure
    if undelivered:
        raise UndeliveredError(
            f"stopped with records undelivered {cfg.close_timeout:g} s after the stop "
            "(ARB_PRODUCER_CLOSE_TIMEOUT_SECONDS)",
            undelivered, publisher.spool is not None)
    return dict(publisher.stats)


def make_publisher(cfg: ProducerConfig) -> Publisher:
    """The publisher of ``cfg``: its queue, health period, shutdown deadline and spool.

    Raises:
        SpoolError: the spool directory is in use by another process.
    """
    spool = (Spool(cfg.spool_dir, fsync=cfg.spool_fsync)  # type: ignore[arg-type]
             if cfg.spool_dir is not None else None)
    return Publisher(cfg.kafka, cfg.queue_size, cfg.health_interval,
                     close_timeout=cfg.close_timeout, spool=spool)


async def record(
    settings: Settings,
    exchange: str,
    symbols: list[str],
    out: Path,
    seconds: float | None = None,
    stop: asyncio.Event | None = None,
) -> Path:
    """Record raw frames of one exchange to ``out`` until ``stop``, a signal or ``seconds``.

    Files are named like the shared captures (``NAME.ws.<n>.0`` for websocket connections,
    ``NAME.0`` for the configuration and REST metadata); returns ``out``.
    """
    from cryptofeed.connection import Connection
    from cryptofeed.raw_data_collection import AsyncFileCallback

    cfg = dataclasses.replace(ProducerConfig.of(settings), exchanges=(exchange,))
    out.mkdir(parents=True, exist_ok=True)
    recorder = AsyncFileCallback(str(out))
    Connection.raw_data_callback = recorder  # cryptofeed's hook: every frame, both ways

    async def ignore(_event: Any) -> None:
        return None

    stop = stop or asyncio.Event()
    try:
        feed = (await asyncio.to_thread(
            _build_feeds, cfg, {exchange: symbols}, ignore,
        ))[exchange]
        recorder.write_header(feed.id, json.dumps(feed._feed_config))
        hooks = FeedHooks(frame=lambda: None, reconnect=lambda: None,
                          bad_frame=lambda raw, reason: ignore(None))
        start_resilient(feed, asyncio.get_running_loop(), hooks, cfg.stale_seconds)
        _stop_on_signals(stop)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        feed.stop()
        with contextlib.suppress(Exception):
            await feed.shutdown()
    finally:
        recorder.stop()
        Connection.raw_data_callback = None
    return out
