"""The slices of :class:`~arbstream.config.Settings` the producers use.

The public entry points (:func:`producers.live.produce`, :func:`producers.replay.iaqf.
replay_iaqf`, ...) accept the whole ``Settings`` for the CLI and the tests, create the topics
with it (:func:`arbstream.topics.ensure_topics`) and narrow it at once with ``.of(settings)``;
everything below them sees only these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arbstream.kafka import KafkaConfig

if TYPE_CHECKING:
    from arbstream.config import Settings


@dataclass(frozen=True)
class ProducerConfig:
    """What the live producers need (``ARB_FEED_*``, ``ARB_PRODUCER_*``, ``ARB_KAFKA_*``).

    Attributes:
        kafka: brokers and credentials.
        exchanges: exchange ids with topics (``ARB_EXCHANGES``); a feed must be one of them.
        channels: channels of every feed (``bbo``, ``trades``, ``book``).
        book_depth: levels per side in book records.
        stale_seconds: seconds without a frame before the watchdog reconnects.
        queue_size: bound of the publisher's in-memory queue (records).
        health_interval: seconds between ``md.health`` reports.
        ws_urls, rest_urls: per-exchange endpoint overrides (a local replay server).
        ca_file: extra CA bundle (PEM) trusted for the overridden URLs, or None.
        feed_options: per-exchange extra keyword arguments of the cryptofeed Feed.
        close_timeout: shutdown deadline to deliver what is held, seconds.
        spool_dir: the on-disk spool's directory, or None (records only in memory).
        spool_fsync: ``"never"`` or ``"batch"`` (:mod:`producers.spool`).
    """

    kafka: KafkaConfig
    exchanges: tuple[str, ...]
    channels: tuple[str, ...]
    book_depth: int
    stale_seconds: float
    queue_size: int
    health_interval: float
    ws_urls: Mapping[str, str]
    rest_urls: Mapping[str, str]
    ca_file: Path | None
    feed_options: Mapping[str, Mapping[str, Any]]
    close_timeout: float = 30.0
    spool_dir: Path | None = None
    spool_fsync: str = "never"

    @classmethod
    def of(cls, settings: Settings) -> ProducerConfig:
        """The producers' slice of ``settings``."""
        return cls(
            kafka=KafkaConfig.of(settings),
            exchanges=tuple(settings.exchanges),
            channels=tuple(settings.feed_channels),
            book_depth=settings.book_depth,
            stale_seconds=settings.feed_stale_seconds,
            queue_size=settings.producer_queue_size,
            health_interval=settings.health_interval_seconds,
            ws_urls=dict(settings.feed_ws_urls),
            rest_urls=dict(settings.feed_rest_urls),
            ca_file=settings.feed_ca_file,
            feed_options={k: dict(v) for k, v in settings.feed_options.items()},
            close_timeout=settings.producer_close_timeout_seconds,
            spool_dir=settings.producer_spool_dir,
            spool_fsync=settings.producer_spool_fsync,
        )


@dataclass(frozen=True)
class ReplayConfig:
    """What publishing a replay needs (``ARB_EXCHANGES``, ``ARB_KAFKA_*``); the replay entry
    points read ``ARB_DATA_DIR`` themselves.

    Attributes:
        kafka: brokers and credentials.
        exchanges: exchange ids with topics; records of any other exchange are refused.
    """

    kafka: KafkaConfig
    exchanges: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings) -> ReplayConfig:
        """The replays' slice of ``settings``."""
        return cls(kafka=KafkaConfig.of(settings), exchanges=tuple(settings.exchanges))
