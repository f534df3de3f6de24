"""Kafka topic names and their creation with explicit partition counts.

Market data is per exchange: ``md.<exchange>.quotes``, ``md.<exchange>.trades`` and
``md.<exchange>.book`` (top-N snapshots). The Spark job publishes ``arb.opportunities``, the
pairs job ``arb.pair_signals`` (``ARB_PAIRS_TOPIC``);
anything that fails validation goes to ``md.deadletter``; producers report on ``md.health``.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from arbstream.config import Settings

log = logging.getLogger(__name__)

DEADLETTER = "md.deadletter"
HEALTH = "md.health"
OPPORTUNITIES = "arb.opportunities"
#: Default of ``ARB_PAIRS_TOPIC``: the pairs job's ``pair_signal`` events.
PAIR_SIGNALS = "arb.pair_signals"


def quotes_topic(exchange: str) -> str:
    return f"md.{exchange}.quotes"


def trades_topic(exchange: str) -> str:
    return f"md.{exchange}.trades"


def book_topic(exchange: str) -> str:
    return f"md.{exchange}.book"


def topic_layout(settings: Settings) -> dict[str, int]:
    """Every topic arbstream needs, mapped to its partition count."""
    layout: dict[str, int] = {}
    for exchange in settings.exchanges:
        layout[quotes_topic(exchange)] = settings.kafka_partitions
        layout[trades_topic(exchange)] = settings.kafka_partitions
        layout[book_topic(exchange)] = settings.kafka_partitions
    layout[OPPORTUNITIES] = settings.kafka_partitions
    layout[DEADLETTER] = 1
    layout[HEALTH] = 1
    return layout


def admin_config(settings: Settings) -> dict:
    """The admin client's configuration: the shared client settings with librdkafka's own
    log lines off (``log_level`` 0). An unreachable broker makes librdkafka log every
    reconnection attempt (hundreds of lines in 15 s); the callers raise one error with
    librdkafka's reason instead."""
    return {**settings.kafka_client_config(), "log_level": 0}


def new_topic(settings: Settings, name: str, partitions: int) -> NewTopic:
    """A topic to create: ``partitions``, ``ARB_KAFKA_REPLICATION`` replicas and, when set,
    ``min.insync.replicas`` = ``ARB_KAFKA_MIN_INSYNC_REPLICAS`` (with ``acks=all``, the
    producers' setting, a write then needs that many replicas)."""
    config = ({"min.insync.replicas": str(settings.kafka_min_insync_replicas)}
              if settings.kafka_min_insync_replicas else {})
    return NewTopic(name, num_partitions=partitions,
                    replication_factor=settings.kafka_replication, config=config)


def partition_counts(settings: Settings, timeout: float = 15.0) -> dict[str, int]:
    """Partition count of every topic on the broker.

    Raises:
        RuntimeError: the broker is unreachable.
    """
    admin = AdminClient(admin_config(settings))
    try:
        topics = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise RuntimeError(f"Kafka at {settings.kafka_bootstrap} unreachable: {exc}") from exc
    return {name: len(meta.partitions) for name, meta in topics.items()}


def ensure_topics(settings: Settings, timeout: float = 15.0) -> list[str]:
    """Create missing topics with their explicit partition counts; return those created.

    Existing topics are left alone; a topic with fewer partitions than configured is logged.

    Raises:
        RuntimeError: when the broker is unreachable or refuses a creation.
    """
    existing = partition_counts(settings, timeout)
    wanted = topic_layout(settings)
    for name, parts in existing.items():
        if name in wanted and parts < wanted[name]:
            log.warning("%s has %d partitions, config asks %d", name, parts, wanted[name])
    new = [new_topic(settings, name, parts) for name, parts in wanted.items()
           if name not in existing]
    if not new:
        return []
    admin = AdminClient(admin_config(settings))
    created = []
    for name, future in admin.create_topics(new, request_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: a concurrent creator won
                raise RuntimeError(f"could not create topic {name}: {exc}") from exc
    return created


def ensure_topic(settings: Settings, name: str, partitions: int = 1,
                 timeout: float = 15.0) -> bool:
    """Create topic ``name`` with ``partitions`` when it is missing (the pairs job's
    ``ARB_PAIRS_TOPIC``, which is not in :func:`topic_layout`); whether it was created.

    Raises:
        RuntimeError: the broker is unreachable or refuses the creation.
    """
    if name in partition_counts(settings, timeout):
        return False
    admin = AdminClient(admin_config(settings))
    new = new_topic(settings, name, partitions)
    try:
        admin.create_topics([new], request_timeout=timeout)[name].result()
    except KafkaException as exc:
        if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: a concurrent creator won
            raise RuntimeError(f"could not create topic {name}: {exc}") from exc
        return False
    return True
